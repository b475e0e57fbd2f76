"""Faults an operator of a long training run meets, through the real CLI (tools/evaluator.py): real daemon
processes, real stage subprocesses in the real venvs, real signals, real mounts (the tests run as root).

Two faults are injected: a kill -9 at a chosen line of the daemon (tests/stage_scripts/crashing_daemon.py
wraps one method of the real daemon so that the process SIGKILLs itself there), which a test cannot time from
outside, and one sink refusing one result every time (refusing_sink_daemon.py), which no real value produces.
Everything else is produced for real.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from conftest import (DAEMON_PY, ROOT, bench, daemons, fake, history, invocations, ledger_events, ledger_rows,  # noqa: F401
                      megatron_checkpoint, pid_alive, run_cli, venvs, wait_until, write_config)

pytestmark = pytest.mark.slow

CRASHING_DAEMON = os.path.join(ROOT, "tests", "stage_scripts", "crashing_daemon.py")
REFUSING_DAEMON = os.path.join(ROOT, "tests", "stage_scripts", "refusing_sink_daemon.py")


# ---- helpers -----------------------------------------------------------------------------------------
def states(cache, run=None):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache) if run in (None, r["run"])}


def rows_by_key(cache):
    return {(r["run"], r["iteration"], r["benchmark"]): r for r in ledger_rows(cache)}


def history_keys(cache, run="tiny"):
    return [(h["iteration"], h["benchmark"]) for h in history(cache, run)]


def crash_daemon(tmp_path, cfg: str, crash_at: str, *args: str, on_call: int = 1, timeout: float = 90) -> str:
    """Run the real daemon with one injected kill -9 (crashing_daemon.py) and wait until it has died there;
    returns its log."""
    log_path = tmp_path / f"crash-{crash_at.rsplit(':', 2)[1]}.log"
    env = dict(os.environ, CRASH_AT=crash_at, CRASH_ON_CALL=str(on_call))
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([DAEMON_PY, CRASHING_DAEMON, "--config", cfg, *args], stdout=logf,
                                stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text(errors="replace")
    assert code == -signal.SIGKILL and "injected crash point reached" in log, f"exit {code}\n{log}"
    return log


def token_processes(token: str) -> list[int]:
    """Live pids whose environment carries this stage token (CKPT_EVAL_TOKEN=<token>:<stage>)."""
    needle = f"CKPT_EVAL_TOKEN={token}:".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(needle) for v in env) and pid_alive(int(name)):
            pids.append(int(name))
    return pids


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def umount(path) -> None:
    subprocess.run(["umount", str(path)], check=False, capture_output=True, text=True)


def fill(path) -> None:
    """Write zeros to `path` until the disk has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def status(cfg, *args) -> str:
    return run_cli("status", "--config", cfg, *args, check=0).stdout


# ---- 1-3: kill -9 at the lines between an intent and its effect ------------------------------------------
def test_kill_9_after_the_intent_before_submit_starts_each_stage_once_after_restart(tmp_path, venvs):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa"), bench("mc")])
    cache = tmp_path / "cache"
    crash_daemon(tmp_path, cfg, "evaluator.daemon.local:LocalExecutor.submit:before")
    intent = [r for r in ledger_rows(cache) if r["state"] == "inferring"]
    assert len(intent) == 1 and intent[0]["token"] and intent[0]["pid"] is None, intent  # the hard case

    run_cli("--config", cfg, "--once", check=0)

    assert set(states(cache).values()) == {"recorded"} and len(states(cache)) == 4
    assert sorted(history_keys(cache)) == [(1000, "mc"), (1000, "qa"), (2000, "mc"), (2000, "qa")]
    for it in (1000, 2000):
        for name in ("qa", "mc"):
            assert [i["stage"] for i in invocations(cache, it, name)] == ["infer", "eval"], (it, name)


def test_kill_9_after_submit_before_the_pid_is_recorded_stops_the_orphan_by_its_token(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=3.0)])
    cache = tmp_path / "cache"
    crash_daemon(tmp_path, cfg, "evaluator.daemon.daemon:Daemon.record_started:before")
    row = ledger_rows(cache)[0]
    assert row["state"] == "inferring" and row["pid"] is None and row["token"], row
    orphans = token_processes(row["token"])
    assert orphans, "the stage started before the kill -9 should still run (that is the hard case)"

    died_at: dict[int, float] = {}
    done = threading.Event()

    def watch_orphans():
        while not done.is_set() and len(died_at) < len(orphans):
            for pid in orphans:
                if pid not in died_at and not pid_alive(pid):
                    died_at[pid] = time.time()
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_orphans)
    watcher.start()
    try:
        run_cli("--config", cfg, "--once", check=0)
    finally:
        done.set()
        watcher.join()

    assert not [p for p in orphans if pid_alive(p)], "the restarted daemon must stop the orphaned stage"
    assert states(cache) == {(1000, "qa"): "recorded"} and history_keys(cache) == [(1000, "qa")]
    runs = [i for i in invocations(cache, 1000, "qa") if i["stage"] == "infer"]
    assert len(runs) == 1, runs  # the orphan was stopped before it could finish: one inference ran to its end
    # no two inference processes of the job at once: every orphan was gone before the new one started
    assert set(died_at) == set(orphans) and max(died_at.values()) <= runs[0]["start"], (died_at, runs)


def test_a_stage_group_that_lost_its_leader_after_a_kill_9_is_stopped_by_the_restarted_daemon(tmp_path, venvs):
    """The daemon is killed, then the leader of a stage it started (the OOM killer takes both, say): the stage's
    shell and command live on in its process group without the leader. The restarted daemon finds them by their
    token and must stop that group, not only a group whose leader it can still find (scripts/chaos_kill9.py found
    this). The kill -9 comes before the stage's pid is recorded, so the leader is known only by the token too."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cache = tmp_path / "cache"
    crash_daemon(tmp_path, write_config(tmp_path, [bench("qa", infer_sleep=60)]),
                 "evaluator.daemon.daemon:Daemon.record_started:before")
    token = ledger_rows(cache)[0]["token"]
    stage = wait_until(lambda: len(token_processes(token)) >= 2 and token_processes(token),
                       what="the stage and the command it runs")
    leader = os.getpgid(stage[0])
    orphans = [p for p in stage if p != leader]
    os.kill(leader, signal.SIGKILL)
    try:
        wait_until(lambda: not pid_alive(leader), what="the stage's leader gone")
        assert orphans and all(pid_alive(p) for p in orphans), "the hard case: its group lives on without it"
        fast = write_config(tmp_path, [bench("qa")])  # the next attempt ends at once; the orphans sleep for 60 s

        run_cli("--config", fast, "--once", check=0)

        assert [p for p in orphans if pid_alive(p)] == [], "the restarted daemon must stop the leaderless group"
        assert states(cache) == {(1000, "qa"): "recorded"} and history_keys(cache) == [(1000, "qa")]
        assert len([i for i in invocations(cache, 1000, "qa") if i["stage"] == "infer" and i["end"]]) == 1
    finally:
        try:
            os.killpg(leader, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_kill_9_between_a_sink_accepting_and_the_ledger_noting_it_duplicates_nothing(tmp_path, venvs):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")])
    cache = tmp_path / "cache"
    crash_daemon(tmp_path, cfg, "evaluator.daemon.ledger:Ledger.mark_recorded:before")
    accepted = history_keys(cache)
    assert len(accepted) == 1 and states(cache)[accepted[0]] == "scored", (accepted, states(cache))

    run_cli("--config", cfg, "--once", check=0)

    assert states(cache) == {(1000, "qa"): "recorded", (2000, "qa"): "recorded"}
    assert sorted(history_keys(cache)) == [(1000, "qa"), (2000, "qa")]  # each exactly once


# ---- 4-5: what the config says changed -----------------------------------------------------------------
def test_a_run_renamed_with_pending_jobs_is_evaluated_under_its_new_name_and_the_old_one_listed(
        tmp_path, venvs, daemons):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cache = tmp_path / "cache"
    old = write_config(tmp_path, [bench("qa", infer_sleep=60)], watch={"paths": [{"path": str(tmp_path / "ckpt"),
                                                                                  "name": "old"}]})
    d = daemons(old)
    wait_until(lambda: states(cache, "old") == {(1000, "qa"): "inferring", (2000, "qa"): "pending"},
               what="old@1000 running, old@2000 queued")
    assert d.stop() == 0
    assert set(states(cache, "old").values()) == {"pending"}

    new = write_config(tmp_path, [bench("qa")], watch={"paths": [{"path": str(tmp_path / "ckpt"), "name": "new"}]})
    proc = run_cli("--config", new, "--once", timeout=120)

    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert states(cache, "new") == {(1000, "qa"): "recorded", (2000, "qa"): "recorded"}
    assert states(cache, "old") == {(1000, "qa"): "pending", (2000, "qa"): "pending"}  # left as they are
    assert history_keys(cache, "new") == [(1000, "qa"), (2000, "qa")]
    assert "run old: not configured now" in status(new)


def test_a_per_run_benchmark_list_is_honoured_and_once_still_ends(tmp_path, venvs):
    for run in ("a", "b"):
        megatron_checkpoint(tmp_path / run, 1000)
    cfg = write_config(tmp_path, [bench("qa"), bench("mc")],
                       watch={"paths": [{"path": str(tmp_path / "a"), "name": "a", "benchmarks": ["qa"]},
                                        {"path": str(tmp_path / "b"), "name": "b"}]})
    cache = tmp_path / "cache"

    proc = run_cli("--config", cfg, "--once", timeout=90)

    assert proc.returncode == 0, proc.stderr
    assert states(cache, "a") == {(1000, "qa"): "recorded"}  # no mc job was ever created for run a
    assert states(cache, "b") == {(1000, "qa"): "recorded", (1000, "mc"): "recorded"}
    assert invocations(cache, 1000, "mc", run="a") == []


# ---- 6: storage that drops, and storage that really deletes ---------------------------------------------
@pytest.mark.parametrize("outage", ["tmpfs", "bind-mount"])
def test_a_run_folder_that_comes_back_empty_for_a_while_vanishes_nothing(tmp_path, venvs, daemons, outage):
    """What an NFS mount that drops leaves behind: the mount point, an empty folder (on another device, or
    on the same one for a bind mount). Pending jobs wait; nothing is vanished; all are evaluated after."""
    ckpt = tmp_path / "ckpt"
    for it in (1000, 2000, 3000):
        megatron_checkpoint(ckpt, it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=1.0)],
                       watch={"snapshot": "none", "poll_seconds": 0.2, "vanish_grace_seconds": 1})
    cache = tmp_path / "cache"
    empty = tmp_path / "empty"
    empty.mkdir()
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "inferring" and len(states(cache)) == 3,
               what="1000 in flight, 2000 and 3000 queued")
    try:
        if outage == "tmpfs":  # an empty folder on another device
            mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ckpt))
        else:  # an empty folder on the same device
            mount("--bind", str(empty), str(ckpt))
        assert os.listdir(ckpt) == []
        wait_until(lambda: "is not available" in d.log(), what="the outage to be noticed")
        time.sleep(3.0)  # three times the vanish grace, fifteen rescans
        assert "vanished" not in states(cache).values(), states(cache)
    finally:
        umount(ckpt)
    assert os.path.exists(ckpt / "iter_0002000")
    wait_until(lambda: set(states(cache).values()) == {"recorded"}, what="every job recorded after the outage")
    assert d.stop() == 0
    assert sorted(history_keys(cache)) == [(1000, "qa"), (2000, "qa"), (3000, "qa")]


@pytest.mark.parametrize("deleted", [2000, 34000], ids=["queued-in-pin-window", "queued-beyond-pin-window"])
def test_a_deleted_checkpoint_is_vanished_only_after_the_vanish_grace(tmp_path, venvs, daemons, deleted):
    """36 checkpoints: the daemon takes the manifest of the next 32 in dispatch order (PIN_WINDOW); 34000 is
    queued without one when it is deleted."""
    for k in range(1, 37):
        megatron_checkpoint(tmp_path / "ckpt", k * 1000)
    # 1 s a stage: 2000 is still queued when a loaded machine gets to delete it after 1000 started
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=1.0)],
                       watch={"snapshot": "none", "poll_seconds": 0.2, "vanish_grace_seconds": 3})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: len(states(cache)) == 36 and "inferring" in states(cache).values(), what="36 jobs queued")
    deleted_at = time.time()
    shutil.rmtree(tmp_path / "ckpt" / f"iter_{deleted:07d}")
    time.sleep(2.0)
    assert states(cache)[(deleted, "qa")] == "pending", "vanished before the grace period was over"
    wait_until(lambda: states(cache).get((deleted, "qa")) == "vanished", what=f"{deleted} vanished", timeout=20)
    assert d.stop() == 0
    vanished = [e for e in ledger_events(cache) if e["iteration"] == deleted and e["to_state"] == "vanished"]
    assert len(vanished) == 1 and vanished[0]["ts"] - deleted_at >= 3.0, vanished
    assert invocations(cache, deleted, "qa") == []


# ---- 7: the exit-code protocol ------------------------------------------------------------------------
def test_a_stage_exiting_2_fails_for_good_at_once_with_its_message_in_status(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    bad = {"name": "badspec", "type": "command", "evaluation": "echo '{{\"score\": 1}}' > metrics.json",
           "inference": "echo 'bad spec: options.split must be one of test, dev' >&2; exit 2"}
    cfg = write_config(tmp_path, [bad], executor={"max_attempts": 3, "backoff_seconds": 0.1})
    cache = tmp_path / "cache"

    run_cli("--config", cfg, "--once", check=1, timeout=90)  # --once exits 1 when jobs failed

    row = ledger_rows(cache)[0]
    assert row["state"] == "failed" and row["attempts"] == 1 and row["next_retry_at"] is None, row
    assert [e["to_state"] for e in ledger_events(cache)] == ["pending", "inferring", "failed"]  # no retry
    assert "bad spec: options.split must be one of test, dev" in status(cfg)


def test_a_stage_exiting_75_is_retried_without_spending_attempts(tmp_path, venvs):
    """max_attempts 1: had a 75 counted as an attempt, the job would fail for good at the first one."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    busy_twice = {"name": "busy", "type": "command", "evaluation": "echo '{{\"score\": 1}}' > metrics.json",
                  "inference": "n=$(cat tries 2>/dev/null || echo 0); echo $((n + 1)) > tries; "
                               "if [ $n -lt 2 ]; then echo 'rate limited, retry later' >&2; exit 75; fi"}
    cfg = write_config(tmp_path, [busy_twice], executor={"max_attempts": 1, "backoff_seconds": 0.1})
    cache = tmp_path / "cache"

    run_cli("--config", cfg, "--once", check=0, timeout=90)

    row = ledger_rows(cache)[0]
    assert row["state"] == "recorded" and row["attempts"] == 0, row
    starts = [e for e in ledger_events(cache) if e["to_state"] == "inferring"]
    assert len(starts) == 3
    assert (cache / "results" / "tiny" / "iter_0001000" / "busy" / "tries").read_text().strip() == "3"


# ---- 8: a result one sink refuses every time --------------------------------------------------------------
def test_a_result_one_sink_refuses_is_set_aside_while_later_results_reach_it(tmp_path, venvs):
    """MLflow refuses the result of iteration 1000 every time (an injected refusal, refusing_sink_daemon.py: no
    value a stage may report is refused by a real sink) until the operator's fix; the local sink takes it."""
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    scored = {"name": "qa", "type": "command", "inference": "true",
              "evaluation": "echo \"{{\\\"score\\\": {iteration}}}\" > metrics.json"}
    cfg = write_config(tmp_path, [scored], executor={"max_attempts": 2, "backoff_seconds": 0.1},
                       recorder={"sinks": ["local", "mlflow"], "max_failures": 2})
    cache = tmp_path / "cache"
    marker = tmp_path / "refuse"
    marker.write_text("")
    env = dict(os.environ, REFUSE_SINK="recorder.mlflow_sink:MlflowSink", REFUSE_ITERATION="1000",
               REFUSE_WHILE=str(marker))

    first = subprocess.run([DAEMON_PY, REFUSING_DAEMON, "--config", cfg, "--once"], capture_output=True, text=True,
                           timeout=240, env=env)

    assert first.returncode == 1, first.stderr  # the set-aside result stays queued
    assert states(cache) == {(1000, "qa"): "scored", (2000, "qa"): "recorded", (3000, "qa"): "recorded"}
    assert mlflow_steps(cache, "qa/score") == [2000, 3000]  # later results kept reaching MLflow
    assert sorted(history_keys(cache)) == [(1000, "qa"), (2000, "qa"), (3000, "qa")]  # local took all of them
    shown = status(cfg)
    assert "recording set aside: 1 result(s)" in shown and "mlflow" in shown and "injected refusal" in shown, shown

    marker.unlink()  # the operator's fix
    assert "1 result(s) offered to their sinks again" in status(cfg, "--retry-recording")
    run_cli("--config", cfg, "--once", check=0, timeout=240)

    assert set(states(cache).values()) == {"recorded"}
    assert mlflow_steps(cache, "qa/score") == [1000, 2000, 3000]
    assert len(history(cache)) == 3


def mlflow_steps(cache, key: str) -> list[int]:
    db = sqlite3.connect(f"file:{cache / 'mlflow.db'}?mode=ro", uri=True, timeout=10)
    try:
        return sorted(r[0] for r in db.execute("SELECT step FROM metrics WHERE key = ?", (key,)))
    finally:
        db.close()


# ---- 9: an error while preparing one job ----------------------------------------------------------------
def test_an_oserror_preparing_one_job_fails_that_job_and_the_others_are_evaluated(tmp_path, venvs):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa"), bench("mc")], executor={"max_attempts": 2, "backoff_seconds": 0.1})
    cache = tmp_path / "cache"
    blocked = cache / "results" / "tiny" / "iter_0001000" / "qa"  # its result folder's path is a file
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")

    proc = run_cli("--config", cfg, "--once", timeout=90)

    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # --once: a job failed
    rows = rows_by_key(cache)
    bad = rows[("tiny", 1000, "qa")]
    assert bad["state"] == "failed" and bad["attempts"] == 2 and bad["next_retry_at"] is None, bad
    assert "preparing the stage" in bad["last_error"]
    assert {k: r["state"] for k, r in rows.items() if k != ("tiny", 1000, "qa")} == {
        ("tiny", 1000, "mc"): "recorded", ("tiny", 2000, "qa"): "recorded", ("tiny", 2000, "mc"): "recorded"}


# ---- 10: SIGHUP: tests/test_daemon_integration.py::test_sigterm_mid_stage_stops_cleanly... (parametrized)


# ---- 11: cache_dir on a disk that fills up ----------------------------------------------------------------
@contextlib.contextmanager
def daemon_on_a_small_disk(tmp_path, daemons, **config):
    """A daemon whose cache_dir is on a 4 MB tmpfs, iteration 1000 recorded; yields (daemon, cfg, cache, disk).
    The mount goes however the test ends."""
    ckpt = tmp_path / "ckpt"
    megatron_checkpoint(ckpt, 1000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    d = None
    try:
        cfg = write_config(tmp_path, [bench("qa")], cache_dir=str(disk / "cache"), watch={"snapshot": "none"},
                           recorder={"plots": False}, **config)
        cache = disk / "cache"
        d = daemons(cfg)
        wait_until(lambda: states(cache) == {(1000, "qa"): "recorded"}, what="1000 recorded")
        yield d, cfg, cache, disk
    finally:
        if d is not None:
            d.kill()  # a failed assertion must not leave the mount busy
        umount(disk)


def test_a_full_cache_disk_pauses_the_daemon_and_it_resumes_when_space_returns(tmp_path, venvs, daemons):
    with daemon_on_a_small_disk(tmp_path, daemons) as (d, cfg, cache, disk):
        filler = disk / "filler"
        fill(filler)
        megatron_checkpoint(tmp_path / "ckpt", 2000)
        wait_until(lambda: "cannot write the ledger" in d.log() and "paused" in d.log(), timeout=30,
                   what="the daemon to say it cannot write the ledger")
        assert d.proc.poll() is None, "the daemon must pause, not die"
        assert "1000" in status(cfg)  # the ledger still opens and reads
        filler.unlink()
        wait_until(lambda: states(cache).get((2000, "qa")) == "recorded", timeout=60,
                   what="2000 recorded once space returned")
        assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()
        assert sorted(history_keys(cache)) == [(1000, "qa"), (2000, "qa")]


def test_a_nearly_full_cache_disk_holds_new_stages_and_they_run_once_space_returns(tmp_path, venvs, daemons):
    """A ledger that still commits (a grown SQLite WAL is reused; here: 600 KB left for its pages) did not pause
    the daemon: every new job started, failed for want of room (ENOSPC preparing it, or inside the stage) and
    was failed for good after max_attempts; nothing reran it when the space came back."""
    with daemon_on_a_small_disk(tmp_path, daemons, executor={"max_attempts": 1}) as (d, cfg, cache, disk):
        filler = disk / "filler"
        fill(filler)
        os.truncate(filler, os.path.getsize(filler) - 600 * 1024)  # under LOW_DISK_BYTES (1 MiB) free
        megatron_checkpoint(tmp_path / "ckpt", 2000)
        wait_until(lambda: "no stage starts until there is room" in d.log(), timeout=30, what="the hold")
        wait_until(lambda: states(cache).get((2000, "qa")) == "pending", timeout=30, what="2000 queued")
        time.sleep(2)  # several dispatch passes: none starts it
        row = [r for r in ledger_rows(cache) if r["iteration"] == 2000][0]
        assert row["state"] == "pending" and row["attempts"] == 0, row
        assert "is full" in status(cfg)
        filler.unlink()
        wait_until(lambda: states(cache).get((2000, "qa")) == "recorded", timeout=60,
                   what="2000 recorded once space returned")
        assert "cache_dir has room again: stages start" in d.log()
        assert d.stop() == 0
        assert sorted(history_keys(cache)) == [(1000, "qa"), (2000, "qa")]


def test_once_on_a_nearly_full_cache_disk_exits_1_saying_the_jobs_wait_for_room(tmp_path, venvs):
    """--once held the new stages for room, as a running daemon does, and waited for ever (nothing it runs frees
    space). It exits 1 naming the waiting jobs and the full disk; they stay queued, not failed, for the next run."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    try:
        cfg = write_config(tmp_path, [bench("qa")], cache_dir=str(disk / "cache"), watch={"snapshot": "none"},
                           recorder={"plots": False})
        cache = disk / "cache"
        assert run_cli("--config", cfg, "--once").returncode == 0
        filler = disk / "filler"
        fill(filler)
        os.truncate(filler, os.path.getsize(filler) - 600 * 1024)  # under LOW_DISK_BYTES (1 MiB) free
        megatron_checkpoint(tmp_path / "ckpt", 2000)
        proc = run_cli("--config", cfg, "--once", timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "1 job(s) waiting, none can start" in proc.stderr and "is full" in proc.stderr, proc.stderr[-3000:]
        row = [r for r in ledger_rows(cache) if r["iteration"] == 2000][0]
        assert row["state"] == "pending" and row["attempts"] == 0, row
        filler.unlink()
        assert run_cli("--config", cfg, "--once").returncode == 0
        assert sorted(history_keys(cache)) == [(1000, "qa"), (2000, "qa")]
    finally:
        umount(disk)


def test_a_stage_that_fills_the_cache_disk_itself_gets_the_room_back_and_runs_again(tmp_path, venvs, daemons):
    """A command benchmark's inference filled the disk with its {scratch_dir} (a model conversion) and failed. With
    max_attempts 1 it failed for good; with the full-disk hold it waited for room its own files held, for ever.
    The failed attempt's outputs and scratch are deleted, and it runs again without spending an attempt."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    marker = tmp_path / "filled-once"
    fills = (f"if [ ! -e {marker} ]; then touch {marker}; mkdir -p {{scratch_dir}}; "
             f"head -c 8M /dev/zero > {{scratch_dir}}/model.bin; exit 1; fi; " + fake("infer"))
    d = None
    try:
        cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": fills,
                                       "evaluation": fake("eval")}], cache_dir=str(disk / "cache"),
                           watch={"snapshot": "none"}, executor={"max_attempts": 1}, recorder={"plots": False})
        cache = disk / "cache"
        d = daemons(cfg)
        wait_until(lambda: states(cache) == {(1000, "qa"): "recorded"}, timeout=120, what="1000 recorded")
        assert d.stop() == 0
        assert marker.exists() and history_keys(cache) == [(1000, "qa")]
        assert "cache_dir" in d.log() and "is full" in d.log() and "not counted as an attempt" in d.log()
    finally:
        if d is not None:
            d.kill()
        umount(disk)


# ---- 12: inotify after the run folder was replaced --------------------------------------------------------
def test_inotify_watches_a_run_folder_that_was_deleted_and_created_again(tmp_path, venvs, daemons):
    ckpt = tmp_path / "ckpt"
    megatron_checkpoint(ckpt, 1000)
    cfg = write_config(tmp_path, [bench("qa")], watch={"mode": "inotify", "poll_seconds": 60,
                                                        "vanish_grace_seconds": 600})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "recorded", what="1000 recorded")
    shutil.rmtree(ckpt)
    time.sleep(1.0)
    ckpt.mkdir()
    time.sleep(1.0)
    written_at = time.monotonic()
    megatron_checkpoint(ckpt, 2000)
    wait_until(lambda: states(cache).get((2000, "qa")) is not None, timeout=20,
               what="2000 queued without waiting for the 60 s rescan")
    assert time.monotonic() - written_at < 20
    wait_until(lambda: states(cache).get((2000, "qa")) == "recorded", what="2000 recorded")
    assert d.stop() == 0


# ---- 13: an interrupted Megatron save ----------------------------------------------------------------------
def test_an_interrupted_megatron_save_is_never_evaluated_and_status_calls_it_invalid(tmp_path, venvs):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0001000" / "mp_rank_00").mkdir(parents=True)  # the save was killed before writing its file
    megatron_checkpoint(ckpt, 2000)  # training resumed and saved again: the tracker is past 1000
    cfg = write_config(tmp_path, [bench("qa")])
    cache = tmp_path / "cache"

    run_cli("--config", cfg, "--once", check=1, timeout=90)  # --once exits 1 when jobs failed

    assert states(cache) == {(1000, "qa"): "failed", (2000, "qa"): "recorded"}
    assert invocations(cache, 1000, "qa") == []
    line = [ln for ln in status(cfg).splitlines() if "tiny@1000/qa" in ln][0]  # its line in the details
    assert "failed" in line and "checkpoint invalid" in line, line


# ---- 11b: a restart on a full cache disk ----------------------------------------------------------------------
def test_a_restart_on_a_full_cache_disk_pauses_recovery_and_finishes_it_when_space_returns(tmp_path, venvs, daemons):
    """Killed mid-stage, restarted while cache_dir is full: recovery (killing the orphaned stage, putting its row
    back) and the benchmark check (a benchmark added meanwhile) write the ledger. They were run once and the
    failure ignored: the row stayed `inferring` for good and --once never ended; a failing benchmark check ended
    the daemon with a traceback. Both must pause until the ledger can be written, then finish."""
    ckpt = tmp_path / "ckpt"
    megatron_checkpoint(ckpt, 1000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    first = second = None
    try:
        cache = disk / "cache"
        cfg = write_config(tmp_path, [bench("qa", infer_sleep=8)], cache_dir=str(cache), watch={"snapshot": "none"},
                           recorder={"plots": False})
        first = daemons(cfg)
        wait_until(lambda: states(cache) == {(1000, "qa"): "inferring"}, what="qa inferring")
        first.kill()  # kill -9: its stage lives on, its row says inferring
        cfg = write_config(tmp_path, [bench("qa", infer_sleep=8), bench("mc")], cache_dir=str(cache),
                           watch={"snapshot": "none"}, recorder={"plots": False})
        filler = disk / "filler"
        fill(filler)
        second = daemons(cfg, "--once")
        wait_until(lambda: "cannot write the ledger" in second.log() and "paused" in second.log(), timeout=60,
                   what="the restarted daemon to pause on the full disk")
        assert second.proc.poll() is None, second.log()
        filler.unlink()
        assert second.proc.wait(timeout=120) == 0, second.log()
        assert "Traceback" not in second.log(), second.log()
        assert states(cache) == {(1000, "qa"): "recorded", (1000, "mc"): "recorded"}
        assert sorted(history_keys(cache)) == [(1000, "mc"), (1000, "qa")]
    finally:
        for d in (first, second):
            if d is not None:
                d.kill()
        umount(disk)


def test_a_daemon_started_on_a_full_cache_disk_exits_3_so_a_service_retries(tmp_path, venvs):
    """The ledger cannot be opened on a full disk (its -wal file cannot be made): exit 3 (the unit's
    Restart=on-failure retries it), not exit 2, which the unit never retries (RestartPreventExitStatus=2)."""
    ckpt = tmp_path / "ckpt"
    megatron_checkpoint(ckpt, 1000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    try:
        cfg = write_config(tmp_path, [bench("qa")], cache_dir=str(disk / "cache"), watch={"snapshot": "none"},
                           recorder={"plots": False})
        run_cli("--config", cfg, "--once", check=0, timeout=90)  # a clean stop: no -wal/-shm file is left
        fill(disk / "filler")
        proc = run_cli("--config", cfg, "--once", timeout=90)
        assert proc.returncode == 3, (proc.returncode, proc.stderr)
        assert "auto_eval.cache_dir" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    finally:
        umount(disk)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_once_stopped_by_a_signal_before_its_work_is_done_does_not_exit_0(tmp_path, venvs, daemons, sig):
    """--once exits 0 only when every job ended well; stopped by a signal mid-stage it exited 0 with its jobs still
    pending (a script or evaluate_checkpoint(timeout=) read that as done). It exits 128 + the signal."""
    ckpt = tmp_path / "ckpt"
    megatron_checkpoint(ckpt, 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=30)])
    cache = tmp_path / "cache"
    d = daemons(cfg, "--once")
    wait_until(lambda: states(cache) == {(1000, "qa"): "inferring"}, what="qa inferring")
    assert d.stop(sig) == 128 + sig
    assert states(cache) == {(1000, "qa"): "pending"}


def test_a_checkpoint_rewritten_while_a_killed_daemons_stage_read_it_is_discarded_at_restart(tmp_path, venvs):
    from evaluator.daemon.snapshots import LINK_FROM_BYTES

    ck = megatron_checkpoint(tmp_path / "ckpt", 1000, payload=b"a" * LINK_FROM_BYTES)  # hardlinked weights
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=3.0)])
    cache = tmp_path / "cache"
    crash_daemon(tmp_path, cfg, "evaluator.daemon.daemon:Daemon.record_started:after")
    row = ledger_rows(cache)[0]
    assert row["state"] == "inferring" and row["token"], row
    rank_file = os.path.join(ck, "mp_rank_00", "model_optim_rng.pt")
    before = os.stat(rank_file).st_mtime_ns
    with open(rank_file, "wb") as f:  # a resumed trainer's torch.save: the same inode (the snapshot's hardlink)
        f.write(b"b" * LINK_FROM_BYTES)
    os.utime(rank_file, ns=(before + 10**9, before + 10**9))
    deadline = time.time() + 60
    while token_processes(row["token"]) and time.time() < deadline:  # the orphaned stage ends on its own
        time.sleep(0.1)
    assert not token_processes(row["token"])

    proc = run_cli("--config", cfg, "--once", "-v", check=0)
    # before: "recovered after restart: outputs complete", and the orphan's result of the old bytes was recorded
    assert "the checkpoint changed while the stage read it" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert states(cache) == {(1000, "qa"): "recorded"} and history_keys(cache) == [(1000, "qa")]
    assert len([i for i in invocations(cache, 1000, "qa") if i["stage"] == "infer"]) == 2  # read again, whole


def test_a_checkpoint_rewritten_under_one_benchmark_is_evaluated_again_by_all_its_benchmarks(tmp_path, venvs,
                                                                                           daemons):
    """A resumed trainer re-saves an iteration while its second benchmark reads it: the first benchmark's result,
    recorded from the earlier save, is evaluated again (revision 1), so both results describe one save."""
    from evaluator.daemon.snapshots import LINK_FROM_BYTES

    ck = megatron_checkpoint(tmp_path / "ckpt", 1000, payload=b"a" * LINK_FROM_BYTES)  # hardlinked weights
    cfg = write_config(tmp_path, [bench("a_fast"), bench("b_slow", infer_sleep=4.0)])
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "a_fast")) == "recorded"
               and states(cache).get((1000, "b_slow")) == "inferring", what="a recorded while b reads", timeout=60)
    rank_file = os.path.join(ck, "mp_rank_00", "model_optim_rng.pt")
    before = os.stat(rank_file).st_mtime_ns
    with open(rank_file, "wb") as f:  # torch.save of the re-save: the same inode, the snapshot's hardlink
        f.write(b"b" * LINK_FROM_BYTES)
    os.utime(rank_file, ns=(before + 10**9, before + 10**9))
    wait_until(lambda: "evaluated again as revision 1" in d.log(), what="a_fast rerun", timeout=60)
    wait_until(lambda: set(states(cache).values()) == {"recorded"}
               and rows_by_key(cache)[("tiny", 1000, "a_fast")]["revision"] == 1, what="both recorded again", timeout=60)
    assert d.stop() == 0
    # before: a_fast kept the earlier save's result, b_slow recorded the new save's, nothing said so
    for name in ("a_fast", "b_slow"):
        assert len([i for i in invocations(cache, 1000, name) if i["stage"] == "infer"]) == 2, name
    assert {(r["benchmark"], r.get("revision", 0)) for r in history(cache)} == {("a_fast", 1), ("b_slow", 0)}


def test_a_ledger_deleted_under_the_running_daemon_stops_it_with_a_clear_error(tmp_path, venvs, daemons):
    """A cleanup script removed ledger.sqlite3*: the daemon kept writing into the deleted file, logged nothing, and
    `status` said it had never run while it was alive; what it did next was lost at the next restart."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")], watch={"snapshot": "none"})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache) == {(1000, "qa"): "recorded"}, what="1000 recorded")
    for suffix in ("", "-wal", "-shm"):
        (cache / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    assert d.proc.wait(timeout=60) == 2
    assert "ledger.sqlite3 was deleted under the running daemon: stopping" in d.log()
    assert "Traceback" not in d.log()
    run_cli("--config", cfg, "--once", timeout=120)  # a new ledger: 1000 evaluated again, recorded once
    assert history_keys(cache) == [(1000, "qa")]
