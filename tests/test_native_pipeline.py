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
    r = run_cli("--config", cfg, "--once")  # 3, not 2: a systemd service retries (the share may mount later)
    assert r.returncode == 3 and "no benchmark can run" in r.stderr and "nope/here does not exist" in r.stderr
    r = run_cli("--config", cfg, "--dry-run")  # says the benchmark is held
    assert r.returncode == 0 and "benchmark qa: held" in r.stdout and "nope/here does not exist" in r.stdout
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": ".", "backend": "tgi"}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "benchmarks[0].backend" in r.stderr


PYCOCO_CIDER = """
import json, sys
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.cider.cider import Cider
data = json.load(open(sys.argv[1]))
tok = PTBTokenizer()
gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in data["refs"].items()})
res = tok.tokenize({k: [{"caption": v}] for k, v in data["cands"].items()})
print(json.dumps(Cider().compute_score(gts, res)[0]))
"""


def test_bench_eval_cider_d_equals_pycocoevalcap(tmp_path, venvs):
    """The issue's acceptance: tools/bench.py eval ... --metrics cider_d == pycocoevalcap's PTB-tokenised Cider."""
    import random
    rng = random.Random(7)
    words = "a dog barks loudly while the rain falls on metal roof and birds sing in distance car engine".split()

    def sentence():
        s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        return s.capitalize() + rng.choice([".", "!", "", " ,"])

    rows, preds, refs, cands = [], [], {}, {}
    for i in range(40):
        sid = f"clip_{i:03d}.wav"
        refs[sid] = [sentence() for _ in range(5)]
        cands[sid] = sentence()
        rows.append({"id": sid, "messages": [{"role": "user", "content": "Describe the audio."}], "references": refs[sid]})
        preds.append({"sample_id": sid, "status": "ok", "response": {"text": cands[sid], "usage": {}}})
    data = canonical_dataset(tmp_path / "caps", rows, dataset_id="caps")
    pfile = tmp_path / "predictions.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in preds))
    r = bench_py("eval", data, "--predictions", str(pfile), "--metrics", "cider_d", "--output-root", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    [metrics_path] = list((tmp_path / "out").glob("*/caps/metrics.json"))
    ours = json.loads(metrics_path.read_text())["metrics"]["cider_d"]
    (tmp_path / "in.json").write_text(json.dumps({"refs": refs, "cands": cands}))
    import subprocess
    proc = subprocess.run([venvs["evaluation"], "-c", PYCOCO_CIDER, str(tmp_path / "in.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ours > 0 and abs(ours - reference) < 1e-9, (ours, reference)
