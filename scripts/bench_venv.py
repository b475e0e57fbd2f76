"""For benchmark scripts any python may start: re-execute in .venvs/inference when torch is not importable here."""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE_PYTHON = os.path.join(ROOT, ".venvs", "inference", "bin", "python")


def ensure_torch(script: str) -> None:
    """Go on here if torch imports; else exec `script` (with the same arguments) in the inference venv, once."""
    if importlib.util.find_spec("torch") is not None:
        return
    if os.environ.get("BENCH_REEXEC") or not os.path.exists(INFERENCE_PYTHON):
        raise SystemExit(f"torch is not importable here nor in {INFERENCE_PYTHON}; run `make setup`")
    env = dict(os.environ, BENCH_REEXEC="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.execve(INFERENCE_PYTHON, [INFERENCE_PYTHON, os.path.abspath(script), *sys.argv[1:]], env)
