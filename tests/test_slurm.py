"""The daemon with executor.type slurm, end to end through the CLI, on a real single-node Slurm
(scripts/slurm_local.sh start; .ci/run starts it). The executor class itself: test_slurm_executor.py.

Ledger columns these tests read: `infer_job` (the inference job id), `eval_job` (its chained evaluation's,
or a lone re-score's), `token` (the intent, part of every job name: eval-<run>-<it>-<bench>-<token>-<infer|evalu>).
A Slurm that is not there is a failure here, not a skip: CI must prove this path."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from conftest import (bench, daemons, history, ledger_rows, megatron_checkpoint, run_cli, venvs,  # noqa: F401
                      wait_until, write_config)
from evaluator.daemon.slurm import ALL_STATES

pytestmark = pytest.mark.slow


def slurm_config(tmp_path, benches, **executor):
    # unique across concurrent test sessions: sacct is filtered by the job names derived from it
    name = f"s{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cfg = write_config(tmp_path, benches, model_name=name,
                       executor={"type": "slurm", "max_in_flight": 4, "slurm_poll_max_seconds": 0.5,
                                 "backoff_seconds": 0.2, "max_attempts": 2, "gpus": None, **executor})
    return cfg, name


def sacct_jobs(run: str) -> list[dict]:
    """Every job this test's daemon submitted ({id, name, state, exit}), oldest first.

    Finished ones from accounting, asked by a time window with every state named (`-s`; without it the
    window leaves out jobs cancelled while they waited on a dependency); queued ones from squeue (sacct's
    window lists no job that was never eligible yet, e.g. one pending on its dependency). The run name is
    unique to the test, and so is the job name prefix."""
    jobs = {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-S", "now-2hours", "-E", "now", "-s", ALL_STATES,
                          "-o", "JobID,JobName,State,ExitCode"], capture_output=True, text=True, check=True).stdout
    queued = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T|"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines() + queued.splitlines():  # squeue's later line wins: it is current
        job_id, job_name, state, exit_code = line.split("|")
        if job_name.startswith(f"eval-{run}-"):
            jobs[job_id] = {"id": job_id, "name": job_name, "state": state.split()[0], "exit": exit_code}
    return sorted(jobs.values(), key=lambda r: int(r["id"]))


def fake_sbatch(tmp_path, monkeypatch, second: str, when: str = "$((n % 2)) = 0") -> None:
    """Fault injection: an `sbatch` earlier on PATH that runs the shell line `second` on the calls where the test
    `when` holds ($n counts the calls from 1; by default the even ones: the chained evaluation) and hands the
    other calls to the real sbatch."""
    real = shutil.which("sbatch")
    count, fake_bin = tmp_path / "sbatch.count", tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(
        "#!/bin/bash\n"
        f"n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}\n"
        f"if [ {when} ]; then {second}; fi\n"
        f"exec {real} \"$@\"\n")
    (fake_bin / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")


def finished(jobs: list[dict], n: int):
    return jobs if len(jobs) == n and not {"RUNNING", "PENDING"} & {j["state"] for j in jobs} else None


def states(cache):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}


def test_a_checkpoint_is_evaluated_end_to_end_through_sbatch(tmp_path, venvs, slurm_cluster):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg, run = slurm_config(tmp_path, [bench("qa")])
    run_cli("--config", cfg, "--once", check=0, timeout=240)
    cache = tmp_path / "cache"
    assert states(cache) == {(1000, "qa"): "recorded", (2000, "qa"): "recorded"}
    # each result once, with its own checkpoint's number; in the order Slurm finished them (the two run at once)
    assert sorted((h["iteration"], h["metrics"]["iteration_k"]) for h in history(cache, run=run)) == \
        [(1000, 1.0), (2000, 2.0)]
    out = cache / "results" / run / "iter_0001000" / "qa"
    script = (out / "infer.sbatch").read_text()
    assert "#SBATCH --output=" in script and "-m evaluator.stages.command --job" in script
    assert (out / "eval.sbatch").exists() and "fake stage" not in (out / "infer.stderr.log").read_text()
    jobs = wait_until(lambda: (lambda j: j if len(j) == 4 and all(x["state"] == "COMPLETED" for x in j) else None)(
        sacct_jobs(run)), timeout=60, interval=1, what="sacct to show 4 completed jobs")
    rows = ledger_rows(cache)
    assert {r["infer_job"] for r in rows} | {r["eval_job"] for r in rows} == {j["id"] for j in jobs}


def test_a_failing_stage_is_retried_then_failed_and_its_evaluation_job_never_runs(tmp_path, venvs, slurm_cluster):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_mode="crash")])
    run_cli("--config", cfg, "--once", check=1, timeout=240)
    cache = tmp_path / "cache"
    row = ledger_rows(cache)[0]
    assert row["state"] == "failed" and row["attempts"] == 2 and row["next_retry_at"] is None
    assert "Slurm job" in row["last_error"] and "FAILED" in row["last_error"]
    assert "crashing on purpose" in row["last_error"]  # the log tail from the job's output
    jobs = wait_until(lambda: finished(sacct_jobs(run), 4), timeout=60, interval=1, what="4 finished jobs in sacct")
    infer = [j for j in jobs if j["name"].endswith("-infer")]
    evals = [j for j in jobs if j["name"].endswith("-evalu")]
    assert [j["state"] for j in infer] == ["FAILED", "FAILED"] and all(j["exit"] == "3:0" for j in infer)
    assert len(evals) == 2 and all(j["state"] == "CANCELLED" for j in evals)


def test_a_cancelled_job_is_retried(tmp_path, venvs, slurm_cluster, daemons):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=4)], max_attempts=3)
    cache = tmp_path / "cache"
    d = daemons(cfg)
    first = wait_until(lambda: (ledger_rows(cache) or [{}])[0].get("infer_job"), timeout=60, what="a submitted job")
    subprocess.run(["scancel", first], check=True)
    wait_until(lambda: states(cache).get((1000, "qa")) == "recorded", timeout=120, interval=0.5, what="recorded")
    assert d.stop() == 0
    row = ledger_rows(cache)[0]
    assert row["infer_job"] != first
    events = [e for e in __import__("conftest").ledger_events(cache) if e["to_state"] == "failed"]
    assert len(events) == 1 and "CANCELLED" in events[0]["note"]


def test_kill_9_with_jobs_in_flight_then_restart_reattaches_and_submits_nothing_twice(tmp_path, venvs, slurm_cluster, daemons):
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=3)], max_in_flight=2)
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: len([r for r in ledger_rows(cache) if r["infer_job"]]) == 2, timeout=60,
               what="two pipelines submitted")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    # 2 pipelines x (inference + chained evaluation), still in Slurm's hands (accounting lags a little)
    before = {j["id"] for j in wait_until(lambda: (lambda j: j if len(j) >= 4 else None)(sacct_jobs(run)),
                                          timeout=30, interval=0.5, what="4 jobs in sacct")}
    assert len(before) == 4
    proc = run_cli("--config", cfg, "--once", check=0, timeout=240)
    assert "re-attached to Slurm job" in proc.stderr
    assert set(states(cache).values()) == {"recorded"} and len(states(cache)) == 3
    keys = [(h["iteration"], h["benchmark"]) for h in history(cache, run=run)]
    assert sorted(keys) == [(1000, "qa"), (2000, "qa"), (3000, "qa")]  # each recorded exactly once
    time.sleep(2)  # let accounting catch up, so a duplicate would be visible
    jobs = wait_until(lambda: (lambda j: j if len(j) >= 6 else None)(sacct_jobs(run)), timeout=30,
                      interval=0.5, what="6 jobs in sacct")
    assert len(jobs) == 6 and before <= {j["id"] for j in jobs}, jobs  # no duplicate submission
    names = [j["name"] for j in jobs]
    assert len(set(names)) == 6


def test_max_in_flight_is_respected(tmp_path, venvs, slurm_cluster):
    for it in (1000, 2000, 3000, 4000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=1)], max_in_flight=1)
    run_cli("--config", cfg, "--once", check=0, timeout=300)
    assert set(states(tmp_path / "cache").values()) == {"recorded"}
    # from the ledger's own transitions: a pipeline is in flight from submission to scored
    from conftest import ledger_events
    spans = {}
    for e in ledger_events(tmp_path / "cache"):
        if e["to_state"] == "inferring":
            spans[e["iteration"]] = [e["ts"], None]
        elif e["to_state"] == "scored":
            spans[e["iteration"]][1] = e["ts"]
    assert len(spans) == 4
    for a, (a0, a1) in spans.items():
        for b, (b0, b1) in spans.items():
            assert a == b or a1 <= b0 or b1 <= a0, f"pipelines {a} and {b} overlapped with max_in_flight=1"


def test_status_cancel_jobs_cancels_what_a_stopped_daemon_left_running(tmp_path, venvs, slurm_cluster, daemons):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=60)])
    cache = tmp_path / "cache"
    d = daemons(cfg)
    job_id = wait_until(lambda: (ledger_rows(cache) or [{}])[0].get("infer_job"), timeout=60, what="a submitted job")
    assert d.stop() == 0
    time.sleep(1)
    assert subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip(), \
        "stopping the daemon must leave its Slurm jobs running"
    out = run_cli("status", "--config", cfg, "--cancel-jobs", check=0).stdout
    assert "cancelled 2 Slurm job(s)" in out
    wait_until(lambda: all(j["state"] == "CANCELLED" for j in sacct_jobs(run)) and len(sacct_jobs(run)) == 2,
               timeout=60, interval=1, what="both jobs cancelled in sacct")


def test_status_cancel_jobs_finds_jobs_the_ledger_knows_only_by_their_token(tmp_path, venvs, slurm_cluster, daemons):
    """A daemon killed between sbatch and noting the job ids leaves a row with its intent token and no ids:
    --cancel-jobs said "cancelled 0 Slurm job(s)" and both jobs ran on. It finds them by name, as recovery does."""
    import sqlite3

    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=60)])
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: (ledger_rows(cache) or [{}])[0].get("eval_job"), timeout=60, what="a submitted pipeline")
    d.kill()  # kill -9: the jobs run on
    db = sqlite3.connect(cache / "ledger.sqlite3")
    with db:  # as if it died before noting the ids: only the token the intent wrote first is there
        db.execute("UPDATE jobs SET infer_job=NULL, eval_job=NULL")
    db.close()
    assert ledger_rows(cache)[0]["token"]
    out = run_cli("status", "--config", cfg, "--cancel-jobs", check=0).stdout
    assert "cancelled 2 Slurm job(s)" in out, out
    wait_until(lambda: all(j["state"] == "CANCELLED" for j in sacct_jobs(run)) and len(sacct_jobs(run)) == 2,
               timeout=60, interval=1, what="both jobs cancelled in sacct")


def test_a_refused_evaluation_sbatch_fails_the_attempt_and_cancels_its_inference(tmp_path, venvs, slurm_cluster, monkeypatch):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=5)])
    fake_sbatch(tmp_path, monkeypatch, "echo 'sbatch: error: Batch job submission failed: Invalid qos (injected)' >&2; "
                                       "exit 1")
    proc = run_cli("--config", cfg, "--once", check=1, timeout=240)
    assert "Traceback" not in proc.stderr
    row = ledger_rows(tmp_path / "cache")[0]
    assert row["state"] == "failed" and row["attempts"] == 2 and "Invalid qos (injected)" in row["last_error"]
    jobs = wait_until(lambda: finished(sacct_jobs(run), 2), timeout=60, interval=1, what="2 finished jobs in sacct")
    assert [(j["name"][-6:], j["state"]) for j in jobs] == [("-infer", "CANCELLED")] * 2


def test_kill_9_between_the_two_sbatch_calls_then_restart_runs_the_pipeline_once(tmp_path, venvs, slurm_cluster,
                                                                                 monkeypatch):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_sleep=2)])
    path = os.environ["PATH"]
    fake_sbatch(tmp_path, monkeypatch, "kill -9 $PPID; exit 1")  # the daemon dies after the inference's sbatch
    assert run_cli("--config", cfg, "--once", timeout=120).returncode == -signal.SIGKILL
    cache = tmp_path / "cache"
    row = ledger_rows(cache)[0]
    assert row["state"] == "inferring" and row["token"] and not row["infer_job"]  # the intent, not the job id
    monkeypatch.setenv("PATH", path)
    run_cli("--config", cfg, "--once", check=0, timeout=240)
    assert states(cache) == {(1000, "qa"): "recorded"}
    assert len(history(cache, run=run)) == 1
    jobs = wait_until(lambda: finished(sacct_jobs(run), 3), timeout=60, interval=1, what="3 finished jobs in sacct")
    first, again = jobs[0], jobs[1:]
    assert first["name"].endswith(f"-{row['token']}-infer") and first["state"] == "CANCELLED"  # found by token
    assert [(j["name"][-6:], j["state"]) for j in again] == [("-infer", "COMPLETED"), ("-evalu", "COMPLETED")]


def test_a_controller_outage_at_submission_is_waited_out_not_counted_as_attempts(tmp_path, venvs, slurm_cluster,
                                                                                   monkeypatch):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa")])  # max_attempts 2
    # fault injection: the first 3 sbatch calls answer as sbatch does while slurmctld is down; then it is back
    fake_sbatch(tmp_path, monkeypatch, "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm "
                                       "controller (connect failure)' >&2; exit 1", when="$n -le 3")
    proc = run_cli("--config", cfg, "--once", check=0, timeout=240)
    assert "not counted as an attempt" in proc.stderr and "could not be reached" in proc.stderr
    assert states(tmp_path / "cache") == {(1000, "qa"): "recorded"}
    assert ledger_rows(tmp_path / "cache")[0]["attempts"] == 0
