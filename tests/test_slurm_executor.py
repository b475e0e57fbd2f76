"""The Slurm executor class itself: pure parsing of Slurm's answers, and submit / recover / poll / cancel
against a real single-node Slurm (scripts/slurm_local.sh start; .ci/run starts it).

A Slurm that is not there is a failure here, not a skip: CI must prove this path."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import wait_until
from evaluator.common.contracts import EVALUATION, INFERENCE
from evaluator.daemon import slurm
from evaluator.daemon.config import ExecutorConfig
from evaluator.daemon.executors import Intent, Launch, SubmitError
from evaluator.daemon.slurm import JobState, SlurmExecutor, exit_of, job_name, parse_sacct, parse_scontrol

# ---- pure: names and Slurm's answers ----------------------------------------------------------------


def test_job_name_is_readable_carries_the_token_and_survives_sacct_lists():
    name = job_name(("my run,v2", 1000, "qa|x"), INFERENCE, "tok123")
    assert name == "eval-my_run_v2-1000-qa_x-tok123-infer"
    assert job_name(("r", 5, "b"), EVALUATION, "t").endswith("-t-evalu")


@pytest.mark.parametrize("state, exit_code, reason, expected", [
    ("COMPLETED", "0:0", "None", (0, False, "")),
    ("FAILED", "3:0", "NonZeroExitCode", (3, False, "Slurm job 7 FAILED (NonZeroExitCode)")),
    ("FAILED", "75:0", "None", (75, False, "Slurm job 7 FAILED")),  # retry-later survives the trip
    ("CANCELLED", "0:15", "None", (-15, False, "Slurm job 7 CANCELLED")),
    ("TIMEOUT", "0:0", "TimeLimit", (1, True, "Slurm job 7 TIMEOUT (TimeLimit)")),
    ("NODE_FAIL", "", "", (1, False, "Slurm job 7 NODE_FAIL")),
    ("RUNNING", "0:0", "None", None),
    ("PENDING", "0:0", "Dependency", None),
    ("COMPLETING", "0:0", "None", None),
])
def test_exit_of_maps_slurm_states_to_exit_codes(state, exit_code, reason, expected):
    assert exit_of("7", JobState(state, exit_code, reason)) == expected


def test_sacct_lines_give_state_first_word_exit_code_and_elapsed():
    text = "12|CANCELLED by 0|0:15|Dependency|\n13|FAILED|3:0|None|4\n13|COMPLETED|0:0|None|9\n"
    states = parse_sacct(text)
    assert states["12"] == JobState("CANCELLED", "0:15", "Dependency", None)
    assert states["13"] == JobState("COMPLETED", "0:0", "None", 9.0)  # a requeued job: its latest record


def test_a_job_cancelled_after_it_ran_says_by_whom_not_why_it_once_waited():
    """An evaluation that waited on its inference (Reason Dependency), ran 8 s and was scancel'ed by root was
    reported as "CANCELLED (Dependency)", as if Slurm had dropped it for its dependency."""
    (state,) = parse_sacct("16|CANCELLED by 0|0:15|Dependency|8\n").values()
    assert state == JobState("CANCELLED", "0:15", "by uid 0", 8.0)
    assert exit_of("16", state) == (-15, False, "Slurm job 16 CANCELLED (by uid 0)")


def test_scontrol_one_liners_give_name_and_state_of_every_job_in_memory():
    text = ("JobId=1 JobName=eval-r-1-b-t-infer UserId=root(0) JobState=FAILED Reason=NonZeroExitCode "
            "Dependency=(null) ExitCode=3:0 RunTime=00:00:03\n"
            "JobId=2 JobName=eval-r-1-b-t-evalu JobState=CANCELLED Reason=DependencyNeverSatisfied ExitCode=0:0\n")
    jobs = parse_scontrol(text)
    assert jobs["1"] == ("eval-r-1-b-t-infer", JobState("FAILED", "3:0", "NonZeroExitCode"))
    assert exit_of("2", jobs["2"][1]) == (1, False, "Slurm job 2 CANCELLED (DependencyNeverSatisfied)")


# ---- real Slurm -------------------------------------------------------------------------------------


def executor(**kw) -> SlurmExecutor:
    ex = ExecutorConfig(type="slurm", slurm_poll_max_seconds=0.3, **{"max_in_flight": 4, **kw})
    return SlurmExecutor(ex, {INFERENCE: 600, EVALUATION: 600})


def launch(tmp_path, stage: str, script: str, key=None, token=None, then=None) -> Launch:
    key = key or (f"x{os.getpid()}-{uuid.uuid4().hex[:6]}", 1000, "qa")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return Launch(key, stage, token or uuid.uuid4().hex[:12], ("bash", "-c", script), str(out),
                  str(out / f"{stage}.log"), 600, then)


def pipeline(tmp_path, infer_script: str, eval_script: str = "echo scored") -> Launch:
    first = launch(tmp_path, INFERENCE, infer_script)
    return launch(tmp_path, INFERENCE, infer_script, key=first.key, token=first.token,
                  then=launch(tmp_path, EVALUATION, eval_script, key=first.key, token=first.token))


def exits_until(ex: SlurmExecutor, n: int, timeout: float = 60) -> list:
    got = []
    wait_until(lambda: got.extend(ex.poll()) or len(got) >= n, timeout=timeout, interval=0.2,
               what=f"{n} exit(s) from poll")
    return got


def slurm_state(job_id: str) -> str:
    """The job's final state as accounting records it (polled: sacct lags the end by a moment)."""
    def final():
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                             text=True).stdout.split()
        return out[0] if out and out[0] not in ("PENDING", "RUNNING") else None
    return wait_until(final, timeout=30, interval=0.5, what=f"a final state of job {job_id} in sacct")


@pytest.mark.slow
def test_a_pipeline_reports_inference_with_its_running_evaluation_then_the_evaluation(tmp_path, slurm_cluster):
    ex = executor()
    lch = pipeline(tmp_path, "echo generated")
    started = ex.submit(lch)
    assert started.where == f"Slurm job {started.handle}" and started.then_handle
    (infer,) = exits_until(ex, 1)
    assert (infer.stage, infer.returncode, infer.token) == (INFERENCE, 0, lch.token)
    assert infer.then_started.stage == EVALUATION and infer.then_started.handle == started.then_handle
    assert ex.busy() and ex.running() == [(lch.key, EVALUATION)]
    (evalu,) = exits_until(ex, 1)
    assert (evalu.stage, evalu.returncode) == (EVALUATION, 0)
    assert not ex.busy()
    assert "scored" in (tmp_path / "out" / "evaluation.log").read_text()


@pytest.mark.slow
def test_a_failed_inference_keeps_its_exit_code_and_cancels_its_evaluation(tmp_path, slurm_cluster):
    ex = executor()
    started = ex.submit(pipeline(tmp_path, "sleep 1; exit 3"))
    (infer,) = exits_until(ex, 1)
    assert infer.returncode == 3 and infer.then_started is None
    assert infer.reason.startswith(f"Slurm job {started.handle} FAILED")
    assert not ex.busy()  # the evaluation is forgotten: poll never reports it
    assert slurm_state(started.then_handle) == "CANCELLED"


@pytest.mark.slow
def test_a_refused_second_sbatch_cancels_the_first_and_tracks_nothing(tmp_path, slurm_cluster, monkeypatch):
    # fault injection: an `sbatch` earlier on PATH that passes the first submission to the real sbatch
    # and refuses the second, as a cluster does for a bad account or a full queue
    real = shutil.which("sbatch")
    count = tmp_path / "sbatch.count"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(
        "#!/bin/bash\n"
        f"n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}\n"
        "if [ $n -ge 2 ]; then echo 'sbatch: error: Batch job submission failed: Invalid qos' >&2; exit 1; fi\n"
        f"exec {real} \"$@\"\n")
    (fake_bin / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    ex = executor()
    lch = pipeline(tmp_path, "sleep 30")
    with pytest.raises(SubmitError, match="Invalid qos") as err:
        ex.submit(lch)
    first = re.search(r"Slurm job (\d+)", str(err.value)).group(1)
    assert not ex.busy() and ex.free_slots(INFERENCE) == 4
    assert slurm_state(first) == "CANCELLED"


@pytest.mark.slow
def test_a_restarted_daemon_recovers_running_and_finished_pipelines_by_token(tmp_path, slurm_cluster, caplog):
    before = executor()
    running = pipeline(tmp_path, "sleep 4")
    done = pipeline(tmp_path, "echo fast")
    r1, d1 = before.submit(running), before.submit(done)
    slurm_state(d1.then_handle)  # finished while "no daemon ran": only sacct knows it now
    after = executor()
    found = after.recover([Intent(running.key, INFERENCE, running.token),  # no handle: killed before the ledger
                           Intent(done.key, INFERENCE, done.token, handle=d1.handle)])
    assert found[(running.key, INFERENCE)].handle == r1.handle
    assert found[(running.key, INFERENCE)].then_handle == r1.then_handle
    assert found[(done.key, INFERENCE)].then_handle == d1.then_handle
    assert "sacct failed" not in caplog.text
    exits = exits_until(after, 4)
    assert [(e.key, e.stage, e.returncode) for e in exits if e.key == done.key] == [
        (done.key, INFERENCE, 0), (done.key, EVALUATION, 0)]  # the evaluation is reported after its inference
    assert {(e.stage, e.returncode) for e in exits if e.key == running.key} == {(INFERENCE, 0), (EVALUATION, 0)}


@pytest.mark.slow
def test_recovery_finds_a_pipeline_the_controller_forgot_through_accounting(tmp_path, slurm_cluster, monkeypatch):
    done = pipeline(tmp_path, "echo fast")
    started = executor().submit(done)
    slurm_state(started.then_handle)
    name = job_name(done.key, EVALUATION, done.token)
    wait_until(lambda: name in subprocess.run(  # sacct's time window shows a job a few seconds after its submission
        ["sacct", "-n", "-X", "-P", f"--name={name}", "-S", "now-1hours", "-E", "now", "-s", slurm.ALL_STATES,
         "-o", "JobName"], capture_output=True, text=True).stdout, timeout=30, interval=0.5, what="sacct's window")
    # MinJobAge after its end the controller forgets a job: squeue lists nothing of it any more
    real_run = slurm._run
    monkeypatch.setattr(slurm, "_run", lambda argv, **kw: (
        subprocess.CompletedProcess(argv, 0, "", "") if argv[0] == "squeue" else real_run(argv, **kw)))
    found = executor().recover([Intent(done.key, INFERENCE, done.token)])
    assert (found[(done.key, INFERENCE)].handle, found[(done.key, INFERENCE)].then_handle) == (
        started.handle, started.then_handle)


@pytest.mark.slow
def test_recovering_a_scoring_row_tracks_its_evaluation_job(tmp_path, slurm_cluster):
    lch = pipeline(tmp_path, "echo generated", "sleep 2")
    started = executor().submit(lch)
    after = executor()
    found = after.recover([Intent(lch.key, EVALUATION, lch.token)])
    assert list(found) == [(lch.key, EVALUATION)] and found[(lch.key, EVALUATION)].handle == started.then_handle
    (evalu,) = exits_until(after, 1)
    assert (evalu.stage, evalu.returncode) == (EVALUATION, 0)


@pytest.mark.slow
def test_an_inference_without_its_chained_evaluation_is_cancelled_on_recovery(tmp_path, slurm_cluster):
    # what a daemon killed between the two sbatch calls leaves: the inference job alone
    lone = launch(tmp_path, INFERENCE, "sleep 30")
    started = executor().submit(lone)
    after = executor()
    assert after.recover([Intent(lone.key, INFERENCE, lone.token)]) == {}
    assert not after.busy()
    assert slurm_state(started.handle) == "CANCELLED"


@pytest.mark.slow
def test_max_in_flight_counts_pipelines_and_lone_evaluations_and_cancel_frees_them(tmp_path, slurm_cluster):
    ex = executor(max_in_flight=2)
    lch = pipeline(tmp_path, "sleep 30")
    started = ex.submit(lch)
    assert ex.free_slots(INFERENCE) == ex.free_slots(EVALUATION) == 1  # two jobs, one pipeline
    rescore = launch(tmp_path, EVALUATION, "sleep 30")
    lone = ex.submit(rescore)
    assert lone.then_handle is None
    assert ex.free_slots(INFERENCE) == ex.free_slots(EVALUATION) == 0
    ex.cancel(lch.key)
    ex.cancel(rescore.key)
    assert ex.free_slots(INFERENCE) == 2 and not ex.busy()
    assert {slurm_state(i) for i in (started.handle, started.then_handle, lone.handle)} == {"CANCELLED"}


@pytest.mark.slow
def test_stop_leaves_jobs_running(tmp_path, slurm_cluster):
    ex = executor()
    lch = pipeline(tmp_path, "sleep 30")
    started = ex.submit(lch)
    assert ex.stop() == []
    queued = subprocess.run(["squeue", "-h", "-j", started.handle, "-o", "%T"], capture_output=True, text=True)
    assert queued.stdout.strip() in ("PENDING", "RUNNING")
    slurm.cancel([started.handle, started.then_handle])


@pytest.mark.slow
def test_one_poll_is_one_squeue_and_one_sacct_call_whatever_the_number_of_jobs(tmp_path, slurm_cluster, monkeypatch):
    ex = executor()
    launches = [pipeline(tmp_path, "echo generated") for _ in range(3)]
    handles = [ex.submit(lch).handle for lch in launches]
    for h in handles:
        slurm_state(h)
    calls = []
    real_run = slurm._run
    monkeypatch.setattr(slurm, "_run", lambda argv, **kw: calls.append(argv[0]) or real_run(argv, **kw))
    exits = ex.poll()
    assert len(exits) == 3 and all(e.then_started for e in exits)
    assert calls == ["squeue", "sacct"]


@pytest.mark.slow
def test_a_job_slurm_no_longer_knows_fails_with_a_clear_reason(tmp_path, slurm_cluster, monkeypatch):
    monkeypatch.setattr(slurm, "PURGED_AFTER_S", 0.0)
    ex = executor()
    ex.jobs["999999999"] = slurm.SlurmJob(("r", 1, "b"), EVALUATION, "tok", "999999999", time.monotonic())
    (gone,) = exits_until(ex, 1, timeout=10)
    assert gone.returncode == 1 and "unknown to squeue and sacct" in gone.reason


# ---- a controller that does not answer, a scancel that fails --------------------------------------------


@pytest.mark.parametrize("returncode, stderr, unreachable", [
    (1, "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", True),
    (1, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", True),
    (1, "sbatch: error: Slurm temporarily unavailable", True),
    (124, "sbatch timed out after 30 s", True),  # our own timeout
    (1, "sbatch: error: Batch job submission failed: Invalid partition name specified", False),  # a refusal
    (1, "sbatch: error: Batch job submission failed: Invalid qos specification", False),
    (127, "`sbatch` not found; is this a Slurm submit host?", False),
])
def test_a_slurm_client_that_could_not_reach_the_controller_is_told_from_a_refusal(returncode, stderr, unreachable):
    assert slurm._unreachable(subprocess.CompletedProcess(["sbatch"], returncode, "", stderr)) == unreachable


def fake_client(tmp_path, monkeypatch, name: str, body: str) -> str:
    """Fault injection: a Slurm client `name` earlier on PATH running the shell lines `body` ($REAL is the real
    client); returns the folder it is in."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    real = shutil.which(name, path=os.environ["PATH"].removeprefix(f"{fake_bin}:"))
    (fake_bin / name).write_text(f"#!/bin/bash\nREAL={real}\n{body}\n")
    (fake_bin / name).chmod(0o755)
    if not os.environ["PATH"].startswith(f"{fake_bin}:"):
        monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    return str(fake_bin)


def queued_named(name: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "--me", f"--name={name}", "-o", "%i"], capture_output=True,
                          text=True).stdout.split()


@pytest.mark.slow
def test_an_unreachable_controller_is_a_submit_failure_outside_the_job_and_a_refusal_is_not(tmp_path, slurm_cluster,
                                                                                          monkeypatch):
    # fault injection: sbatch answers as it does while slurmctld is down (`scontrol shutdown`), nothing is queued
    fake_client(tmp_path, monkeypatch, "sbatch", "echo 'sbatch: error: Batch job submission failed: Unable to "
                                                 "contact slurm controller (connect failure)' >&2; exit 1")
    with pytest.raises(SubmitError, match="Unable to contact slurm controller") as err:
        executor().submit(pipeline(tmp_path, "echo generated"))
    assert err.value.outside_cause == slurm.CONTROLLER_DOWN
    fake_client(tmp_path, monkeypatch, "sbatch", "exec $REAL --partition=no-such-partition \"$@\"")
    with pytest.raises(SubmitError, match="(?i)invalid partition") as err:
        executor().submit(pipeline(tmp_path, "echo generated"))
    assert err.value.outside_cause is None  # the job's own settings: an attempt


@pytest.mark.slow
def test_a_failed_scancel_of_a_failed_inferences_evaluation_is_a_warning_and_slurm_removes_it(tmp_path,
                                                                                           slurm_cluster, caplog,
                                                                                           monkeypatch):
    ex = executor()
    started = ex.submit(pipeline(tmp_path, "sleep 1; exit 3"))
    # fault injection: scancel fails as it does while the controller drops
    fake_client(tmp_path, monkeypatch, "scancel", "echo 'scancel: error: Unable to contact slurm controller' >&2; "
                                                  "exit 1")
    (infer,) = exits_until(ex, 1)  # the daemon's poll goes on
    assert infer.returncode == 3 and not ex.busy()
    assert f"could not cancel Slurm job(s) {started.then_handle}" in caplog.text
    assert "--cancel-jobs" not in caplog.text
    assert slurm_state(started.then_handle) == "CANCELLED"  # --kill-on-invalid-dep=yes
    with pytest.raises(slurm.EvaluatorError, match=f"--cancel-jobs: scancel {started.handle} failed"):
        slurm.cancel([started.handle])  # `status --cancel-jobs` does say so


@pytest.mark.slow
def test_a_submission_the_controller_queued_after_sbatch_gave_up_is_cancelled_by_name_when_it_shows_up(
        tmp_path, slurm_cluster, caplog, monkeypatch):
    # fault injection: sbatch queues the job for real, then fails as it does when a hung controller answers after
    # sbatch's own timeout; scancel cannot reach the controller until `down` is removed
    down = tmp_path / "down"
    down.touch()
    fake_client(tmp_path, monkeypatch, "sbatch", "$REAL \"$@\" >/dev/null\n"
                "echo 'sbatch: error: Batch job submission failed: Socket timed out on send/recv operation' >&2; "
                "exit 1")
    fake_client(tmp_path, monkeypatch, "scancel", f"if [ -e {down} ]; then echo 'scancel: error: Unable to contact "
                                                  "slurm controller' >&2; exit 1; fi\nexec $REAL \"$@\"")
    ex = executor()
    lch = launch(tmp_path, EVALUATION, "sleep 60")
    with pytest.raises(SubmitError, match="Socket timed out") as err:
        ex.submit(lch)
    assert err.value.outside_cause == slurm.CONTROLLER_DOWN
    name = job_name(lch.key, EVALUATION, lch.token)
    (stray,) = queued_named(name)  # nobody tracks it, and it would write the results folder of the next attempt
    assert ex.poll() == [] and queued_named(name) == [stray]  # still unreachable: tried again later
    down.unlink()
    wait_until(lambda: ex.poll() == [] and not queued_named(name), timeout=20, interval=0.3, what="the stray cancelled")
    assert slurm_state(stray) == "CANCELLED"
    assert f"cancelled Slurm job {stray} ({name})" in caplog.text


@pytest.mark.slow
def test_a_submission_sbatch_gave_up_on_is_cancelled_at_once_when_the_controller_answers_scancel(
        tmp_path, slurm_cluster, monkeypatch):
    # fault injection: sbatch queues the job for real, then reports a timeout (see above); scancel works
    fake_client(tmp_path, monkeypatch, "sbatch", "$REAL \"$@\" >/dev/null\n"
                "echo 'sbatch: error: Batch job submission failed: Socket timed out on send/recv operation' >&2; "
                "exit 1")
    lch = launch(tmp_path, EVALUATION, "sleep 60")
    with pytest.raises(SubmitError):
        executor().submit(lch)
    assert queued_named(job_name(lch.key, EVALUATION, lch.token)) == []
