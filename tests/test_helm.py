"""The `helm` benchmark type (Data-Juicer's --eval-type helm): HELM's per-run stats.json as metrics.json, a clear
error without helm-run, and the daemon driving a stand-in helm-run (crfm-helm itself is not installed here)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli, venvs  # noqa: F401  (venvs: a fixture)

from evaluator.stages.helm import convert_stats, model_runs

FAKE_HELM = os.path.join(ROOT, "tests", "stage_scripts", "fake_helm.py")
SPEC = """entries: [
  {description: "mmlu:model=<model>,subject=anatomy,data_augmentation=canonical", priority: 2}
  {description: "mmlu:model=<model>,subject=philosophy,data_augmentation=canonical", priority: 3}
  {description: "boolq:model=<model>,data_augmentation=canonical", priority: 1}
]
"""


def write_run(root, suite, name, model, stats):
    run = root / "runs" / suite / name
    run.mkdir(parents=True)
    (run / "stats.json").write_text(json.dumps(stats))
    (run / "run_spec.json").write_text(json.dumps({"name": name, "adapter_spec": {"model": model}}))


def s(name, mean, count, variance, **key):
    return {"name": {"name": name, "split": "test", **key}, "count": count, "mean": mean, "variance": variance}


def test_helm_stats_of_this_checkpoints_runs_become_scenario_means_and_per_run_categories(tmp_path):
    model = "huggingface/tiny_2000"
    write_run(tmp_path, "suite", "mmlu:subject=a,model=huggingface_tiny_2000", model,
              [s("exact_match", 0.5, 4, 0.25), s("exact_match", 0.0, 4, 0.0, perturbation={"name": "typos"}),
               s("num_instances", 4.0, 4, 0.0), s("exact_match", 0.9, 4, 0.09, sub_split="x")])
    write_run(tmp_path, "suite", "mmlu:subject=b,model=huggingface_tiny_2000", model, [s("exact_match", 1.0, 2, 0.0)])
    write_run(tmp_path, "suite", "boolq:model=huggingface_tiny_2000", model,
              [s("quasi_exact_match", 0.75, 8, 0.1875), {"name": {"name": "exact_match", "split": "valid"},
                                                         "count": 8, "mean": 0.0, "variance": 0.0}])
    write_run(tmp_path, "suite", "mmlu:subject=a,model=huggingface_tiny_1000", "huggingface/tiny_1000",
              [s("exact_match", 0.0, 4, 0.0)])  # another checkpoint's run in the same suite
    runs = model_runs(str(tmp_path), "suite", model)
    assert [os.path.basename(r) for r in runs] == ["boolq:model=huggingface_tiny_2000",
                                                   "mmlu:subject=a,model=huggingface_tiny_2000",
                                                   "mmlu:subject=b,model=huggingface_tiny_2000"]
    out = convert_stats(runs)
    assert out["metrics"] == {"boolq.quasi_exact_match": 0.75, "mmlu.exact_match": 0.75}  # mean over the subjects
    se_a = (0.25 * 4 / 3 / 4) ** 0.5  # HELM's population variance -> sample stderr
    assert out["stderr"]["mmlu.exact_match"] == pytest.approx((se_a ** 2 + 0.0) ** 0.5 / 2)
    assert out["stderr"]["boolq.quasi_exact_match"] == pytest.approx((0.1875 * 8 / 7 / 8) ** 0.5)
    assert out["per_category"]["mmlu:subject=a,model=huggingface_tiny_2000"] == {"exact_match": 0.5, "n": 4}
    assert out["n"] == 4 + 2 + 8


def helm_job(tmp_path, checkpoint, env) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (tmp_path / "spec.conf").write_text(SPEC)
    job = {"stage": "inference", "run": "tiny", "iteration": 1000, "checkpoint": str(checkpoint),
           "output_dir": str(out), "seed": 0, "extra": {},
           "benchmark": {"name": "helm", "type": "helm", "options": {"spec_template": str(tmp_path / "spec.conf"),
                                                                     "env": str(env)}}}
    path = out / "infer.job.json"
    path.write_text(json.dumps(job))
    return str(path)


def hf_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    header = b'{"__metadata__":{}}'  # a whole (empty) safetensors file: the layout checks its header
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def test_helm_run_missing_from_the_configured_env_is_a_clear_error(tmp_path):
    (tmp_path / "helm-env" / "bin").mkdir(parents=True)
    job = helm_job(tmp_path, hf_folder(tmp_path / "ckpt"), tmp_path / "helm-env")
    proc = subprocess.run([sys.executable, "-m", "evaluator.stages.helm", "--job", job], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"helm-run not found in the HELM environment '{tmp_path / 'helm-env'}'" in proc.stderr
    assert "pip install crfm-helm" in proc.stderr


def fake_helm_env(tmp_path):
    bin_dir = tmp_path / "helm-env" / "bin"
    bin_dir.mkdir(parents=True)
    for tool, sub in (("helm-run", "run"), ("helm-summarize", "summarize")):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_HELM} {sub} \"$@\"\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "helm-env"


def test_daemon_eval_type_helm_runs_helm_from_its_env_and_records_the_stats(tmp_path, venvs):
    env = fake_helm_env(tmp_path)
    hf_folder(tmp_path / "ckpt" / "checkpoint-1000")
    (tmp_path / "helm_spec_template.conf").write_text(SPEC)
    cfg = {"auto_eval": {
        "project_name": "proj", "model_name": "tiny", "cache_dir": str(tmp_path / "cache"),
        "watch": {"paths": [str(tmp_path / "ckpt")], "layout": "huggingface", "settle_seconds": 0.1},
        "executor": {"gpus": [], "max_attempts": 1},
        "helm": {"helm_spec_template_path": "helm_spec_template.conf", "helm_output_path": "helm_out",
                 "helm_env_name": str(env), "eval_instances": 7}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("--config", str(tmp_path / "cfg.yaml"), "--eval-type", "helm", "--once", timeout=180, check=0)
    out = tmp_path / "cache" / "results" / "tiny" / "iter_0001000" / "helm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"mmlu.exact_match", "mmlu.quasi_exact_match", "boolq.exact_match",
                                       "boolq.quasi_exact_match"}
    assert len(metrics["per_category"]) == 3 and metrics["n"] == 30
    calls = [json.loads(line) for line in (tmp_path / "helm_out" / "fake_helm_calls.jsonl").read_text().splitlines()]
    run_argv, summarize_argv = calls
    assert run_argv[run_argv.index("--suite") + 1] == "proj-tiny"  # Data-Juicer's suite: <project>-<model>
    assert run_argv[run_argv.index("-m") + 1] == "7" and summarize_argv[:3] == ["summarize", "--suite", "proj-tiny"]
    assert os.path.basename(run_argv[run_argv.index("--enable-local-huggingface-models") + 1]) == "tiny_1000"
    spec = (out / "helm_spec.conf").read_text()
    assert "model=huggingface/tiny_1000,subject=anatomy" in spec and "<model>" not in spec
    history = [json.loads(line) for line in (tmp_path / "cache" / "results" / "tiny" / "history.jsonl").read_text().splitlines()]
    assert history[0]["iteration"] == 1000 and history[0]["metrics"]["mmlu.exact_match"] == metrics["metrics"]["mmlu.exact_match"]
