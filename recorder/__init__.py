"""Sinks that record scored results (runs in the daemon venv; never imports torch)."""
