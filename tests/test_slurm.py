"""The Slurm executor on a real single-node Slurm (scripts/slurm_local.sh start; .ci/run starts it).

A Slurm that is not there is a failure here, not a skip: CI must prove this path."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from conftest import (bench, daemons, history, ledger_rows, megatron_checkpoint, run_cli, venvs,  # noqa: F401
                      wait_until, write_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        proc = None
    assert proc is not None and proc.returncode == 0 and proc.stdout.strip(), (
        "no Slurm answers here: start one with `bash scripts/slurm_local.sh start` (CI does)")
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True)
    assert acct.returncode == 0, f"sacct does not work (slurmdbd?): {acct.stderr}"


def slurm_config(tmp_path, benches, **executor):
    # unique across concurrent test sessions: sacct is filtered by the job names derived from it
    name = f"s{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cfg = write_config(tmp_path, benches, model_name=name,
                       executor={"type": "slurm", "max_in_flight": 4, "slurm_poll_max_seconds": 0.5,
                                 "backoff_seconds": 0.2, "max_attempts": 2, "gpus": None, **executor})
    return cfg, name


def sacct_jobs(run: str, cache) -> list[dict]:
    """Every job this test's daemon submitted, as Slurm's accounting saw them.

    Asked by job id (a window of ids around the ones the ledger knows), not by time: sacct's time
    window leaves out jobs cancelled while they waited on a dependency."""
    known = [int(x) for r in ledger_rows(cache) for x in (r["infer_job"], r["eval_job"]) if x]
    lo, hi = max(1, min(known) - 100), max(known) + 100
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(map(str, range(lo, hi))),
                          "-o", "JobID,JobName,State,ExitCode,Submit,End"],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        job_id, job_name, state, exit_code, submit, end = line.split("|")
        if job_name.startswith(f"eval-{run}-"):
            rows.append({"id": job_id, "name": job_name, "state": state.split()[0], "exit": exit_code,
                         "submit": submit, "end": end})
    return rows


def states(cache):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}


def test_a_checkpoint_is_evaluated_end_to_end_through_sbatch(tmp_path, venvs, slurm):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg, run = slurm_config(tmp_path, [bench("qa")])
    run_cli("--config", cfg, "--once", check=0, timeout=240)
    cache = tmp_path / "cache"
    assert states(cache) == {(1000, "qa"): "recorded", (2000, "qa"): "recorded"}
    assert [h["metrics"]["iteration_k"] for h in history(cache, run=run)] == [1.0, 2.0]
    out = cache / "results" / run / "iter_0001000" / "qa"
    script = (out / "infer.sbatch").read_text()
    assert "#SBATCH --output=" in script and "-m evaluator.stages.command --job" in script
    assert (out / "eval.sbatch").exists() and "fake stage" not in (out / "infer.stderr.log").read_text()
    jobs = wait_until(lambda: (lambda j: j if len(j) == 4 and all(x["state"] == "COMPLETED" for x in j) else None)(
        sacct_jobs(run, cache)), timeout=60, interval=1, what="sacct to show 4 completed jobs")
    rows = ledger_rows(cache)
    assert {r["infer_job"] for r in rows} | {r["eval_job"] for r in rows} == {j["id"] for j in jobs}


def test_a_failing_stage_is_retried_then_failed_and_its_evaluation_job_never_runs(tmp_path, venvs, slurm):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg, run = slurm_config(tmp_path, [bench("qa", infer_mode="crash")])
    run_cli("--config", cfg, "--once", check=0, timeout=240)
    cache = tmp_path / "cache"
    row = ledger_rows(cache)[0]
    assert row["state"] == "failed" and row["attempts"] == 2 and row["next_retry_at"] is None
    assert "Slurm job" in row["last_error"] and "FAILED" in row["last_error"]
    assert "crashing on purpose" in row["last_error"]  # the log tail from the job's output
    jobs = wait_until(lambda: (lambda j: j if len(j) == 4 and "RUNNING" not in {x["state"] for x in j}
                               and "PENDING" not in {x["state"] for x in j} else None)(sacct_jobs(run, cache)),
                      timeout=60, interval=1, what="4 finished jobs in sacct")
    infer = [j for j in jobs if j["name"].endswith("-infer")]
    evals = [j for j in jobs if j["name"].endswith("-evalu")]
    assert [j["state"] for j in infer] == ["FAILED", "FAILED"] and all(j["exit"] == "3:0" for j in infer)
    assert len(evals) == 2 and all(j["state"] == "CANCELLED" for j in evals)


def test_a_cancelled_job_is_retried(tmp_path, venvs, slurm, daemons):
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


def test_kill_9_with_jobs_in_flight_then_restart_reattaches_and_submits_nothing_twice(tmp_path, venvs, slurm, daemons):
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
    before = {j["id"] for j in wait_until(lambda: (lambda j: j if len(j) >= 4 else None)(sacct_jobs(run, cache)),
                                          timeout=30, interval=0.5, what="4 jobs in sacct")}
    assert len(before) == 4
    proc = run_cli("--config", cfg, "--once", check=0, timeout=240)
    assert "re-attached to Slurm job" in proc.stderr
    assert set(states(cache).values()) == {"recorded"} and len(states(cache)) == 3
    keys = [(h["iteration"], h["benchmark"]) for h in history(cache, run=run)]
    assert sorted(keys) == [(1000, "qa"), (2000, "qa"), (3000, "qa")]  # each recorded exactly once
    time.sleep(2)  # let accounting catch up, so a duplicate would be visible
    jobs = wait_until(lambda: (lambda j: j if len(j) >= 6 else None)(sacct_jobs(run, cache)), timeout=30,
                      interval=0.5, what="6 jobs in sacct")
    assert len(jobs) == 6 and before <= {j["id"] for j in jobs}, jobs  # no duplicate submission
    names = [j["name"] for j in jobs]
    assert len(set(names)) == 6


def test_max_in_flight_is_respected(tmp_path, venvs, slurm):
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


def test_status_cancel_jobs_cancels_what_a_stopped_daemon_left_running(tmp_path, venvs, slurm, daemons):
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
    wait_until(lambda: all(j["state"] == "CANCELLED" for j in sacct_jobs(run, cache)) and len(sacct_jobs(run, cache)) == 2,
               timeout=60, interval=1, what="both jobs cancelled in sacct")
