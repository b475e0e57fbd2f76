"""The native stages end to end: real tiny checkpoints in a Hugging Face run folder, the daemon running the
inference stage in .venvs/inference and the evaluation stage in .venvs/evaluation, metrics recorded;
and tools/bench.py run/eval on the same data."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import bench_py, canonical_dataset, history, run_cli, write_config

pytestmark = pytest.mark.slow

ROWS = [{"id": f"q{i}", "messages": [{"role": "user", "content": text}], "target": target, "category": cat}
        for i, (text, target, cat) in enumerate([
            ("The sky is", "blue.", "colour"), ("Grass is", "green.", "colour"), ("one two three", "four five", "count"),
            ("The cat sat on the", "mat.", "story"), ("Hello, how are you", "today?", "chat"),
            ("I am fine,", "thank you.", "chat")])]


def hf_checkpoint(run_dir, step, model_dir):
    path = os.path.join(str(run_dir), f"checkpoint-{step}")
    shutil.copytree(model_dir, path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_daemon_runs_native_stages_on_hf_checkpoints(tmp_path, tiny_lm):
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "data", ROWS, dataset_id="toy-qa", metrics=["exact_match", "token_f1"])
    for step in (10, 20):
        hf_checkpoint(tmp_path / "ckpt", step, model)
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": data,
                                   "generation": {"max_new_tokens": 6}, "batch_size": 4}],
                       watch={"layout": "huggingface", "iteration_interval": 10, "settle_seconds": 0})
    proc = run_cli("--config", cfg, "--once", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = sorted(history(tmp_path / "cache"), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in rows] == [10, 20]
    for step in (10, 20):
        out = tmp_path / "cache" / "results" / "tiny" / f"iter_{step:07d}" / "qa"
        preds = read_jsonl(out / "predictions.jsonl")
        assert [p["sample_id"] for p in preds] == [r["id"] for r in ROWS]
        assert all(p["status"] == "ok" and p["backend"] == "hf" for p in preds)
        meta = json.loads((out / "run_metadata.json").read_text())
        assert meta["iteration"] == step and meta["n"] == len(ROWS) and meta["versions"]["transformers"].startswith("5.")
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n"] == len(ROWS) and metrics["iteration"] == step
        assert set(metrics["metrics"]) >= {"exact_match", "token_f1"}
        assert metrics["versions"]["transformers"].startswith("4.42")  # scored in the other venv
        assert set(metrics["per_category"]) == {"colour", "count", "story", "chat"}
        # the same model at both steps: same predictions, same numbers
    m10, m20 = (json.loads((tmp_path / "cache" / "results" / "tiny" / f"iter_{s:07d}" / "qa" / "metrics.json")
                           .read_text())["metrics"] for s in (10, 20))
    assert m10 == m20


def test_bench_run_then_eval_rescores_identically(tmp_path, tiny_lm):
    model = tiny_lm("llama", chat=True)
    data = canonical_dataset(tmp_path / "data", ROWS, dataset_id="toy-qa", metrics=["exact_match"])
    out = tmp_path / "out"
    r = bench_py("run", data, "--model", model, "--output-root", str(out), "--param", "max_new_tokens=5",
                 "--metrics", "exact_match,token_f1")
    assert r.returncode == 0, r.stderr[-4000:]
    folder = out / "model" / "data"
    first = json.loads((folder / "metrics.json").read_text())
    summary = (folder / "result_data.txt").read_text()
    assert "exact_match:" in summary and "token_f1:" in summary
    assert (folder / "infer.stderr.log").read_text().count("[inference] done") == 1
    r = bench_py("eval", data, "--predictions", str(folder / "predictions.jsonl"), "--metrics", "exact_match,token_f1",
                 "--output-root", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr[-4000:]
    second = json.loads((tmp_path / "again" / "model" / "data" / "metrics.json").read_text())
    assert first["metrics"] == second["metrics"] and first["stderr"] == second["stderr"]


def test_eval_rejects_predictions_from_another_dataset_and_unknown_metrics(tmp_path):
    data = canonical_dataset(tmp_path / "data", ROWS, dataset_id="toy-qa")
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"sample_id": "other-1", "status": "ok", "response": {"text": "x"}}) + "\n")
    r = bench_py("eval", data, "--predictions", str(preds), "--metrics", "exact_match")
    assert r.returncode == 2
    assert "prediction(s) for samples not in dataset 'toy-qa'" in r.stderr and "'other-1'" in r.stderr
    preds.write_text(json.dumps({"sample_id": "q0", "status": "ok", "response": {"text": "blue."}}) + "\n")
    r = bench_py("eval", data, "--predictions", str(preds), "--metrics", "exact_mach")
    assert r.returncode == 2 and "exact_match" in r.stderr  # did-you-mean
    assert not (tmp_path / "metrics.json").exists()
    r = bench_py("eval", data, "--predictions", str(preds), "--metrics", "exact_match")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["n"] == 1 and doc["metrics"]["exact_match"] == 1.0


def test_config_errors_for_dataset_benchmarks(tmp_path):
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset"}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "benchmarks[0].dataset" in r.stderr and "needs `dataset:`" in r.stderr
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": "nope/here"}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "nope/here" in r.stderr
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": ".", "backend": "tgi"}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "benchmarks[0].backend" in r.stderr
