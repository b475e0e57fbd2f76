"""kill -9 at random points (scripts/chaos_kill9.py), through the real CLI: real daemon processes, real stage
processes in the real venvs, a real tiny hf model in warm workers, the local sink and a real W&B offline run.
A few rounds per fixed seed: the daemon, its warm workers and its stage processes are SIGKILLed and the daemon
restarted; afterwards every result is recorded exactly once everywhere and nothing the daemons started lives on."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import DAEMON_PY, ROOT, tiny_lm, venvs  # noqa: F401

pytestmark = pytest.mark.slow

CHAOS = os.path.join(ROOT, "scripts", "chaos_kill9.py")
ROUNDS = 5


@pytest.mark.parametrize("seed", [3, 11])
def test_kill_9_at_random_points_loses_and_duplicates_no_result(tmp_path, tiny_lm, seed):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([DAEMON_PY, CHAOS, "--seed", str(seed), "--rounds", str(ROUNDS), "--output", str(out),
                           "--workdir", str(tmp_path / "work"), "--model", tiny_lm("gpt2")],
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and report["violations"] == [], proc.stdout[-6000:] + proc.stderr[-3000:]
    # not vacuous: things were killed (a round whose --once daemon had ended by itself kills nothing) and the
    # daemon came back after a kill -9
    assert report["kills"]["total"] > ROUNDS // 2, report["kills"]
    assert report["kills"]["daemon"] + report["kills"]["daemon+stage"] >= 1 and report["restarts"] >= 1, report
    assert len(report["checkpoints"]) >= 2 and "lm" in report["benchmarks"] and report["wandb"]


def test_kill_9_while_the_trainer_rotates_checkpoints_away_records_each_seen_one_once_or_none_of_it(tmp_path, tiny_lm):
    """save_total_limit: the newest 2 checkpoints are kept, older ones deleted right after each new save, whatever
    the daemon is doing. A checkpoint pinned before it went is evaluated on its own weights (`weights_ok`); one
    that went first is `vanished` with nothing recorded; none fails."""
    out = tmp_path / "chaos.json"
    proc = subprocess.run([DAEMON_PY, CHAOS, "--seed", "21", "--rounds", "6", "--rotate", "2", "--checkpoints", "2",
                           "--max-checkpoints", "5", "--add-share", "0.9", "--output", str(out),
                           "--workdir", str(tmp_path / "work"), "--model", tiny_lm("gpt2")],
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and report["violations"] == [], proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report["deleted_checkpoints"], report["events"]  # not vacuous: the trainer did delete checkpoints
    assert report["kills"]["total"] >= 3 and report["restarts"] >= 1, report["kills"]
