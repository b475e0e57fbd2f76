"""`make demo` end to end, shortened: the real toy trainers (two checkpoints each), the real daemon, both stage
venvs, the recorder. What a newcomer's first command does, in a temporary folder (DEMO_DIR)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_runs_both_toy_trainings_and_records_rising_curves(tmp_path, venvs):
    env = dict(os.environ, DEMO_DIR=str(tmp_path / "demo"), DEMO_TIMEOUT="900",
               LM_ARGS="--steps 600 --save-every 300", CAPTIONER_ARGS="--steps 100 --save-every 50")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=1000)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    cache = tmp_path / "demo" / "cache" / "results"
    for run, bench, metric, iterations in [("toy-lm", "arith", "exact_match", [300, 600]),
                                           ("toy-captioner", "captions", "cider_d", [50, 100])]:
        rows = [json.loads(line) for line in (cache / run / "history.jsonl").read_text().splitlines()]
        assert sorted(r["iteration"] for r in rows) == iterations
        first, last = sorted(rows, key=lambda r: r["iteration"])[0], sorted(rows, key=lambda r: r["iteration"])[-1]
        assert last["metrics"][metric] > first["metrics"][metric], rows
        assert (cache / run / "curves.png").stat().st_size > 0
        assert f"{metric}: " in out and "(rose)" in out
        last_row = sorted(rows, key=lambda r: r["iteration"])[-1]
        assert last_row["vs_prev"]["iteration"] == iterations[0]  # the daemon compared the last two checkpoints
        best = json.loads((cache / run / "best.json").read_text())
        assert best["iteration"] in iterations and os.path.isdir(best["snapshot"])
    caption_metrics = json.loads((cache / "toy-captioner" / "iter_0000100" / "captions" / "metrics.json").read_text())
    assert {"cider_d", "bleu_4", "meteor", "rouge_l", "sbert_sim_minilm_l6"} <= set(caption_metrics["metrics"])
    assert list((tmp_path / "demo" / "cache" / "wandb" / "wandb").glob("offline-run-*"))
    assert "wandb sync" in out
    assert "last two checkpoints:" in out and "best checkpoint: iteration" in out
