"""Sinks on storage that fails for real: a small tmpfs mounted under the test (the tests run as root) and filled,
then freed. A sink that failed while the disk was full records the result right once the space is back, in the
same process, and the local views a stopped daemon left behind are redrawn at the next start."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import bench, daemons, megatron_checkpoint, run_cli, venvs, write_config  # noqa: F401
from recorder.sinks import LocalHistorySink, ResultRecord


@pytest.fixture
def small_disk():
    """mount(path, size): a tmpfs of `size` at `path`, unmounted after the test; fill(path) fills it."""
    mounted = []

    def mount(path, size: str) -> None:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(str(path))

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", path], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], check=False)  # still busy: detached, never left mounted


def fill(folder) -> str:
    """Write a file until the disk is full; returns its path (unlink it to free the space)."""
    path = os.path.join(str(folder), "filler")
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    return path


def result(it: int, value: float, revision: int = 0) -> ResultRecord:
    return ResultRecord(run="tiny", iteration=it, benchmark="qa", metrics={"acc": value}, revision=revision)


def test_a_rerun_the_full_disk_refused_is_written_once_the_space_is_back(tmp_path, small_disk):
    run_dir = tmp_path / "results" / "tiny"
    small_disk(run_dir, "64k")
    sink = LocalHistorySink(str(tmp_path), plots=False)
    sink.record(result(1000, 0.25))
    filler = fill(run_dir)
    with pytest.raises(OSError):
        sink.record(result(1000, 0.75, revision=1))  # the rewrite of history.jsonl has no room
    os.unlink(filler)

    sink.record(result(1000, 0.75, revision=1))  # offered again by the daemon's backoff, same process

    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    # before: the sink's cache already held revision 1, so the retry "succeeded" without writing
    assert [(r["revision"], r["metrics"]["acc"]) for r in rows] == [(1, 0.75)]


def test_the_first_flush_of_a_new_process_redraws_views_older_than_the_history(tmp_path):
    stopped = LocalHistorySink(str(tmp_path))
    stopped.record(result(1000, 0.25))
    stopped.record(result(2000, 0.5))  # the daemon stopped before its redraw

    LocalHistorySink(str(tmp_path), redraw_stale=True).flush()  # the next daemon's sink, with no new result

    run_dir = tmp_path / "results" / "tiny"
    assert (run_dir / "curves.png").stat().st_size > 0
    assert "2000" in (run_dir / "summary.md").read_text()


def test_invalidate_does_not_walk_or_redraw_other_runs(tmp_path):
    """A withdrawal touches its own run only: another run's damaged history must not fail it (review finding)."""
    other = tmp_path / "results" / "other"
    other.mkdir(parents=True)
    (other / "history.jsonl").write_text("not json\n")
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result(1000, 0.25))
    assert LocalHistorySink(str(tmp_path)).withdraw("tiny", 1000, "qa")
    LocalHistorySink(str(tmp_path)).flush()  # as rerun.withdraw_local does
    assert (tmp_path / "results" / "tiny" / "history.jsonl").read_text() == ""


def test_a_daemon_with_nothing_new_to_record_redraws_the_views_it_finds_stale(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")])
    run_cli("--config", cfg, "--once", check=0, timeout=240)
    curves = tmp_path / "cache" / "results" / "tiny" / "curves.png"
    curves.unlink()  # e.g. a disk that was full at the last redraw

    run_cli("--config", cfg, "--once", check=0, timeout=240)

    assert curves.stat().st_size > 0


def test_the_wandb_sink_records_again_in_the_same_process_once_a_full_disk_has_room(tmp_path, small_disk):
    from recorder.sinks import MlflowSettings, RecorderSettings, WandbSettings
    from recorder.wandb_sink import WandbSink, _staged_under
    from test_recorder_wandb import history

    with _staged_under(str(tmp_path / "first-import")):  # wandb's import-time scratch folders live for the process:
        import wandb  # noqa: F401  (made off the small disk, which this test unmounts; later tests use them)
    wandb_dir = tmp_path / "wandb"
    small_disk(wandb_dir, "2m")
    settings = RecorderSettings(cache_dir=str(tmp_path), project="proj",
                                wandb=WandbSettings(project="proj", mode="offline", dir=str(wandb_dir)),
                                mlflow=MlflowSettings(tracking_uri="unused", experiment="unused"))
    sink = WandbSink(settings)
    try:
        sink.record(result(1000, 0.25))
        filler = fill(wandb_dir)
        with pytest.raises(Exception):
            sink.record(result(2000, 0.5))
        os.unlink(filler)

        # before: "run ID ... is in use" for every later result of this run, until the process restarted
        sink.record(result(2000, 0.5))
        sink.record(result(3000, 0.75))
    finally:
        sink.close()  # W&B's service holds files under the mount

    rows = sorted((r["iteration"], r["qa/acc"]) for r in history(wandb_dir))
    assert rows == [(1000, 0.25), (2000, 0.5), (3000, 0.75)]


def test_status_of_a_daemon_paused_on_a_full_cache_disk_says_the_disk_is_full(tmp_path, venvs, small_disk, daemons):
    from conftest import ledger_rows, wait_until

    small_disk(tmp_path / "cache", "4m")
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")])
    d = daemons(cfg)
    wait_until(lambda: [r["state"] for r in ledger_rows(tmp_path / "cache")] == ["recorded"], timeout=120,
               what="1000 recorded")
    filler = fill(tmp_path / "cache")
    megatron_checkpoint(tmp_path / "ckpt", 2000)
    wait_until(lambda: "paused (nothing is lost" in d.log(), timeout=120, what="the daemon paused")

    shown = run_cli("status", "--config", cfg, check=0).stdout
    assert "is full" in shown and "waits, losing nothing" in shown and "NOT RUNNING" not in shown, shown

    os.unlink(filler)
    wait_until(lambda: [r["state"] for r in ledger_rows(tmp_path / "cache")] == ["recorded", "recorded"],
               timeout=120, what="2000 recorded once there is room")
    assert d.stop() == 0
