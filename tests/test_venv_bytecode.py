"""Every stage process starts from compiled bytecode (scripts/setup_envs.sh installs with --compile-bytecode).

uv does not compile .pyc files by default; where Python may not write them (PYTHONDONTWRITEBYTECODE=1, as on these
machines and in many container images, or a read-only venv), every stage process compiled torch and transformers
from source again: 6.8 s instead of 3.4 s to import them in the inference venv, 7.0 s instead of 3.0 s for the
evaluation venv's aac-metrics and sentence-transformers, per stage process and per warm worker start."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import VENVS

# what a stage (or the daemon) imports when it starts, per venv
STARTUP_IMPORTS = {
    "daemon": ["evaluator.daemon.daemon", "evaluator.daemon.cli", "watchdog.observers", "apscheduler",
               "filelock", "yaml", "wandb", "mlflow"],
    "inference": ["evaluator.stages.worker", "evaluator.stages.inference.backends.hf", "torch", "transformers",
                  "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
                  "safetensors.torch"],
    "evaluation": ["evaluator.stages.worker", "evaluator.stages.evaluation.stage", "aac_metrics",
                   "sentence_transformers"],
}

# imports the modules without writing any .pyc, then lists the site-packages modules that had none to read
PROBE = r"""
import importlib, importlib.util, json, os, sys
sys.dont_write_bytecode = True
for name in sys.argv[1:]:
    importlib.import_module(name)
site = tuple(p for p in sys.path if p.endswith("site-packages"))
loaded = [f for m in list(sys.modules.values())
          for f in [getattr(m, "__file__", None) or ""] if f.endswith(".py") and f.startswith(site)]
print(json.dumps({"loaded": len(loaded),
                  "from_source": sorted(f for f in loaded if not os.path.exists(importlib.util.cache_from_source(f)))}))
"""


@pytest.mark.parametrize("venv", sorted(STARTUP_IMPORTS))
def test_a_venv_imports_what_its_processes_start_with_from_compiled_bytecode(venv, venvs):
    python = os.path.join(VENVS, venv, "bin", "python")
    proc = subprocess.run([python, "-c", PROBE, *STARTUP_IMPORTS[venv]], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["loaded"] > 100  # the probe saw the heavy libraries, not an empty import
    assert found["from_source"] == [], (f"{len(found['from_source'])} of {found['loaded']} modules compiled from "
                                        f"source at every start: {found['from_source'][:10]}")
