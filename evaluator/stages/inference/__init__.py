"""The inference stage (runs in .venvs/inference): benchmarks -> predictions.jsonl. See stage.py."""
