"""`rerun` / `invalidate` on a result folder that cannot be written (`chattr +i` here; the same as a read-only
export, EACCES or a full disk where superseded/ cannot be made): each row is done whole or left as it was, with
one line naming the folder, the other rows go on, and the command exits 1 with its summary, never a traceback."""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from conftest import bench, history, ledger_rows, megatron_checkpoint, run_cli, write_config


def states(cache) -> dict:
    return {r["iteration"]: r["state"] for r in ledger_rows(cache)}


def evaluated(tmp_path, iterations=(1000, 2000)):
    """Megatron checkpoints evaluated and recorded once by `--once` with one command benchmark `qa`."""
    for it in iterations:
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")], watch={"snapshot": "none"}, recorder={"plots": False})
    run_cli("--config", cfg, "--once", check=0)
    cache = tmp_path / "cache"
    assert states(cache) == {it: "recorded" for it in iterations}
    return cfg, cache


def result(cache, iteration: int):
    return cache / "results" / "tiny" / f"iter_{iteration:07d}" / "qa"


@contextlib.contextmanager
def immutable(path):
    """`chattr +i` on path (root is not stopped by chmod), undone whatever happens."""
    probe = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"chattr +i does not work on {path} ({probe.stderr.strip() or 'exit ' + str(probe.returncode)}):"
                    f" needs root and a filesystem with the immutable attribute (ext4, xfs, btrfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def line_of(proc: subprocess.CompletedProcess, key: str) -> str:
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith(key)]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_rerun_leaves_a_result_whose_folder_cannot_be_written_as_it_was_and_queues_the_others(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    before = sorted(os.listdir(result(cache, 1000)))
    with immutable(result(cache, 1000)):
        proc = run_cli("rerun", "--config", cfg, "--iterations", "1000-2000")
    no_traceback(proc)
    line = line_of(proc, "tiny@1000/qa")
    assert "left as it was" in line and str(result(cache, 1000)) in line and "Operation not permitted" in line
    assert "run `rerun` again" in line
    assert "rerun: 1 of 2 row(s) queued for re-evaluation; 1 could not be" in proc.stdout
    rows = {r["iteration"]: r for r in ledger_rows(cache)}
    assert (rows[1000]["state"], rows[1000]["revision"]) == ("recorded", 0)
    assert (rows[2000]["state"], rows[2000]["revision"]) == ("pending", 1)
    assert sorted(os.listdir(result(cache, 1000))) == before


def test_invalidate_leaves_a_result_whose_folder_cannot_be_written_recorded_and_in_the_history(tmp_path, venvs):
    """It used to mark the row invalidated, then fail moving its files: the history still showed it."""
    cfg, cache = evaluated(tmp_path)
    with immutable(result(cache, 1000)):
        proc = run_cli("invalidate", "--config", cfg, "--iterations", "1000-2000")
    no_traceback(proc)
    line = line_of(proc, "tiny@1000/qa")
    assert "left as it was" in line and str(result(cache, 1000)) in line and "run `invalidate` again" in line
    assert "invalidate: 1 of 2 row(s) invalidated; 1 could not be" in proc.stdout
    assert states(cache) == {1000: "recorded", 2000: "invalidated"}
    assert [r["iteration"] for r in history(cache)] == [1000]
    assert (result(cache, 1000) / "metrics.json").exists()


def test_a_result_file_that_cannot_be_moved_puts_back_those_already_moved(tmp_path, venvs):
    """predictions.jsonl and run_metadata.json go aside before metrics.json refuses: they come back, no superseded/."""
    cfg, cache = evaluated(tmp_path, iterations=(1000,))
    folder = result(cache, 1000)
    before = sorted(os.listdir(folder))
    assert {"predictions.jsonl", "metrics.json"} <= set(before)
    with immutable(folder / "metrics.json"):
        proc = run_cli("rerun", "--config", cfg, "--iterations", "1000")
    no_traceback(proc)
    assert "metrics.json" in line_of(proc, "tiny@1000/qa")
    assert sorted(os.listdir(folder)) == before
    assert states(cache) == {1000: "recorded"}


def test_invalidate_whose_history_cannot_be_rewritten_says_so_and_running_it_again_finishes(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path, iterations=(1000,))
    with immutable(cache / "results" / "tiny"):  # history.jsonl is rewritten by a rename in this folder
        proc = run_cli("invalidate", "--config", cfg, "--iterations", "1000")
    no_traceback(proc)
    line = line_of(proc, "tiny@1000/qa")
    assert "the local history still shows it" in line and "run `invalidate` again to finish" in line
    assert str(cache / "results" / "tiny") in line
    assert "invalidate: 0 of 1 row(s) invalidated; 1 could not be" in proc.stdout
    run_cli("invalidate", "--config", cfg, "--iterations", "1000", check=0)
    assert states(cache) == {1000: "invalidated"} and history(cache) == []
    assert not (result(cache, 1000) / "metrics.json").exists()
