"""Installable where users train: `pip install <checkout>` into a fresh venv (PyPI) brings the Python API with light
dependencies only; torch, transformers and the evaluation venv's pins stay out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, canonical_dataset

pytestmark = pytest.mark.slow

# what must never come with the API: the user's own (torch, transformers) and the stage/daemon venvs' packages
HEAVY = {"torch", "transformers", "aac-metrics", "sentence-transformers", "vllm", "numpy", "pandas", "wandb",
         "mlflow", "matplotlib", "watchdog"}

USE = textwrap.dedent("""
    import json, sys
    import evaluator.api as hret
    imported = sorted(m for m in ("torch", "transformers", "numpy", "pandas", "wandb", "mlflow") if m in sys.modules)
    result = hret.quick_eval(lambda prompt: "4", dataset=sys.argv[1], metrics=["exact_match"])
    print(json.dumps({"file": hret.__file__, "imported": imported, "metrics": result.metrics, "n": result.info["n"]}))
""")


def test_pip_install_of_the_checkout_brings_the_api_with_light_dependencies_only(tmp_path):
    venv = tmp_path / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", ROOT],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-4000:]
    data = canonical_dataset(tmp_path / "sums", [
        {"id": "a", "messages": [{"role": "user", "content": "2+2="}], "target": "4"},
        {"id": "b", "messages": [{"role": "user", "content": "3+3="}], "target": "6"}], dataset_id="sums")
    script = tmp_path / "use.py"
    script.write_text(USE)
    # from outside the checkout, so the installed copy is the one imported
    run = subprocess.run([py, str(script), data], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(venv))
    assert out["imported"] == []
    assert out["metrics"] == {"exact_match": 0.5} and out["n"] == 2
    listed = subprocess.run([py, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True, timeout=120)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"ckpt-evaluator", "pyyaml", "pydantic", "filelock"} <= installed
    assert not installed & HEAVY, installed & HEAVY


def test_the_project_venvs_install_the_checkout_without_its_dependencies():
    """Its install_requires must never reach the pinned venvs: scripts/setup_envs.sh installs it with --no-deps."""
    with open(os.path.join(ROOT, "scripts", "setup_envs.sh")) as f:
        installs = [line for line in f if "pip install" in line and '"$ROOT"' in line]
    assert installs and all("--no-deps" in line for line in installs), installs
