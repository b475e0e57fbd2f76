"""The daemon: runs in the light daemon venv and never imports torch, transformers, vllm or aac_metrics."""
