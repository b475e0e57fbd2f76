"""The daemon's decisions (evaluator/daemon/policy.py): pure functions, a fake clock, no venvs, milliseconds."""
from __future__ import annotations

import pytest

from evaluator.common.contracts import EVALUATION, INFERENCE
from evaluator.daemon import ledger as L
from evaluator.daemon import policy as P
from evaluator.daemon.checkpoints import Checkpoint, Selection

NOW = 1_000_000.0
KEY = L.JobKey("run", 1000, "qa")
RETRY = P.RetryPolicy(max_attempts=3, backoff_seconds=30, backoff_max_seconds=600, tempfail_seconds=3600)
SEL = Selection.make(1000, None, 1000)
RUN = P.RunSpec("run", "/ckpt", "megatron")


FULL = "the disk of cache_dir /c is full (12 KiB free)"


def job(state=L.PENDING, **kw) -> L.Job:
    return L.Job(run=KEY.run, iteration=KEY.iteration, benchmark=KEY.benchmark, path="/ckpt/iter_0001000",
                 state=state, **kw)


def end(stage=INFERENCE, code=0, **kw) -> P.StageEnd:
    return P.StageEnd(stage=stage, returncode=code, seconds=1.0, **kw)


# ---- what an exit means --------------------------------------------------------------------------
@pytest.mark.parametrize("stage_end, attempts, to, retry_in, counted", [
    (end(INFERENCE, 0), 1, L.INFERRED, None, False),                       # done: attempts reset
    (end(EVALUATION, 0), 0, L.SCORED, None, False),
    (end(INFERENCE, 0, done_problem="no run_metadata.json written"), 0, L.FAILED, 30, True),
    (end(INFERENCE, 3), 0, L.FAILED, 30, True),                            # a crash: an attempt, backoff 30
    (end(INFERENCE, 3), 1, L.FAILED, 60, True),                            # doubling
    (end(INFERENCE, 3), 2, L.FAILED, None, True),                          # the 3rd attempt was the last
    (end(INFERENCE, -9, timed_out=True, timeout_minutes=1), 0, L.FAILED, 30, True),
    (end(INFERENCE, 2), 0, L.FAILED, None, True),                          # bad spec: failed for good at once
    (end(EVALUATION, 2), 0, L.FAILED, None, True),
    (end(INFERENCE, 75), 2, L.FAILED, 30, False),                          # retry later: not an attempt
    (end(INFERENCE, 1, outside_cause=FULL), 2, L.FAILED, 30, False),           # no room for its outputs: later,
    (end(EVALUATION, 2, outside_cause=FULL), 0, L.FAILED, 30, False),          # even a 2 (an empty metrics.json)
    (end(EVALUATION, 0, done_problem="metrics.json: not valid JSON", outside_cause=FULL), 2, L.FAILED, 30, False),
])
def test_an_exit_outcome_follows_the_exit_code_protocol(stage_end, attempts, to, retry_in, counted):
    move = P.stage_outcome(job(P.STAGE_STATES[stage_end.stage][1], attempts=attempts), stage_end, RETRY, NOW)
    assert move.to == to
    if to == L.FAILED:
        assert move.fields["next_retry_at"] == (None if retry_in is None else NOW + retry_in)
        assert move.fields["attempts" if counted else "tempfail_since"] == (attempts + 1 if counted else NOW)
        assert move.fields["resume_state"] == P.STAGE_STATES[stage_end.stage][0]


def test_exit_2_says_why_it_is_not_retried_and_keeps_the_log_tail():
    move = P.stage_outcome(job(L.INFERRING), end(INFERENCE, 2, log_tail="bad option 'max_concurency'"), RETRY, NOW)
    assert "exit 2" in move.fields["last_error"] and "not retried" in move.fields["last_error"]
    assert move.fields["last_error"].endswith("bad option 'max_concurency'")


def test_exit_75_waits_double_each_time_within_its_own_budget_then_fails_for_good():
    first = P.stage_outcome(job(L.INFERRING), end(INFERENCE, 75), RETRY, NOW)
    assert first.fields["next_retry_at"] == NOW + 30 and "attempts" not in first.fields
    later = P.stage_outcome(job(L.INFERRING, tempfail_since=NOW), end(INFERENCE, 75), RETRY, NOW + 100)
    assert later.fields["next_retry_at"] == NOW + 200  # waited as long again as it has been waiting
    spent = P.stage_outcome(job(L.INFERRING, tempfail_since=NOW), end(INFERENCE, 75), RETRY, NOW + 3600)
    assert spent.to == L.FAILED and spent.fields["next_retry_at"] is None


def test_a_429_storm_of_90_seconds_does_not_fail_a_job():
    since, now, j = None, NOW, job(L.INFERRING)
    for _ in range(10):  # ten 75s in a row, each retried when asked
        move = P.stage_outcome(j, end(INFERENCE, 75), RETRY, now)
        assert move.fields["next_retry_at"] is not None
        since = move.fields["tempfail_since"]
        j = job(L.INFERRING, tempfail_since=since, attempts=0)
        now = move.fields["next_retry_at"]
        if now - NOW > 90:
            break
    assert P.stage_outcome(j, end(INFERENCE, 0), RETRY, now).to == L.INFERRED


def test_a_stage_that_cannot_start_for_want_of_room_waits_for_it_without_spending_attempts():
    """ENOSPC preparing the stage on a full cache_dir failed the job for good after max_attempts (3 quick
    retries), and nothing reran it when the space came back."""
    move = P.start_failed(job(L.PENDING, attempts=2), INFERENCE, "preparing the stage: [Errno 28] No space left",
                          RETRY, NOW, outside_cause=FULL)
    assert move.to == L.FAILED and move.fields["next_retry_at"] == NOW + 30 and "attempts" not in move.fields
    assert FULL in move.fields["last_error"] and "not counted as an attempt" in move.note
    other = P.start_failed(job(L.PENDING, attempts=2), INFERENCE, "sbatch: error", RETRY, NOW)
    assert other.fields["attempts"] == 3 and other.fields["next_retry_at"] is None  # anything else: an attempt


CONTROLLER_DOWN = "the Slurm controller could not be reached"


@pytest.mark.parametrize("problem, outside_cause, waited, to, retry_in, counted", [
    # a controller outage of a few minutes: waits on the tempfail budget, attempts untouched
    ("sbatch: Unable to contact slurm controller (connect failure)", CONTROLLER_DOWN, 0, L.FAILED, 30, False),
    ("sbatch: Socket timed out on send/recv operation", CONTROLLER_DOWN, 100, L.FAILED, 100, False),
    ("sbatch: Unable to contact slurm controller", CONTROLLER_DOWN, 3600, L.FAILED, None, False),  # budget spent
    ("preparing the stage: [Errno 28] No space left", FULL, 0, L.FAILED, 30, False),  # a full disk: the same path
    ("sbatch: Invalid partition name specified", None, 0, L.FAILED, None, True),  # a refusal: the last attempt
])
def test_a_start_that_failed_for_a_cause_outside_the_job_waits_instead_of_spending_attempts(
        problem, outside_cause, waited, to, retry_in, counted):
    since = None if waited == 0 else NOW - waited
    move = P.start_failed(job(L.INFERRING, attempts=2, tempfail_since=since), INFERENCE, problem, RETRY, NOW,
                          outside_cause=outside_cause)
    assert move.to == to
    assert move.fields["next_retry_at"] == (None if retry_in is None else NOW + retry_in)
    assert ("attempts" in move.fields) == counted
    assert problem in move.fields["last_error"] and (outside_cause or "") in move.fields["last_error"]


def test_a_crash_after_tempfails_restarts_the_attempt_count_not_the_budget_clock():
    move = P.stage_outcome(job(L.INFERRING, tempfail_since=NOW - 10), end(INFERENCE, 1), RETRY, NOW)
    assert move.fields["attempts"] == 1 and move.fields["tempfail_since"] is None


def test_an_inference_whose_checkpoint_was_deleted_vanishes_instead_of_retrying():
    move = P.stage_outcome(job(L.INFERRING), end(INFERENCE, 1, checkpoint_gone=True), RETRY, NOW)
    assert move.to == L.VANISHED and move.fields["next_retry_at"] is None


def test_a_checkpoint_that_changed_under_the_stage_discards_the_result_without_spending_an_attempt():
    move = P.stage_outcome(job(L.INFERRING, attempts=1), end(INFERENCE, 0, changed="mp_rank_00/x.pt: size"),
                           RETRY, NOW)
    assert move.to == L.PENDING and move.discard_snapshot and "attempts" not in move.fields


def test_a_stage_that_could_not_start_is_an_attempt_so_a_deterministic_error_ends():
    move = P.start_failed(job(L.INFERRING, attempts=2), INFERENCE, "OSError: [Errno 28] No space left", RETRY, NOW)
    assert move.to == L.FAILED and move.fields["next_retry_at"] is None and "No space left" in move.fields["last_error"]


def test_backoff_doubles_and_is_capped():
    assert [RETRY.delay(n) for n in (1, 2, 3, 5, 10)] == [30, 60, 120, 480, 600]


# ---- finality, retries ------------------------------------------------------------------------------
@pytest.mark.parametrize("state, retry, final", [
    (L.RECORDED, None, True), (L.VANISHED, None, True), (L.SKIPPED, None, True), (L.FAILED, None, True),
    (L.FAILED, NOW, False), (L.PENDING, None, False), (L.SCORED, None, False), (L.INFERRING, None, False),
])
def test_finality_has_one_definition(state, retry, final):
    assert P.is_final(state, retry) is final


def test_a_due_retry_resumes_where_the_failure_happened():
    assert P.due_retry(job(L.FAILED, next_retry_at=NOW, resume_state=L.INFERRED), NOW).to == L.INFERRED
    assert P.due_retry(job(L.FAILED, next_retry_at=NOW + 1, resume_state=L.INFERRED), NOW) is None
    assert P.due_retry(job(L.FAILED, next_retry_at=None), NOW) is None


# ---- admission and reconciliation ------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint, state", [
    (Checkpoint("run", 1000, "/c", True), L.PENDING),
    (Checkpoint("run", 1500, "/c", True), L.SKIPPED),  # off the interval
    (Checkpoint("run", 1000, "/c", False, "settling"), None),
    (Checkpoint("run", 1000, "/c", False, "crashed save", invalid="mp_rank_00: no model_optim_rng.pt"), L.FAILED),
])
def test_admission_turns_a_scan_verdict_into_rows(checkpoint, state):
    rows = P.admit(checkpoint, set(), RUN, ["qa", "mc"], SEL)
    assert [r.state for r in rows] == ([] if state is None else [state, state])
    if state == L.FAILED:
        assert "checkpoint invalid" in rows[0].error


def test_admission_adds_only_what_is_new_and_what_the_run_takes():
    narrowed = P.RunSpec("run", "/ckpt", "megatron", benchmarks=("qa",))
    c = Checkpoint("run", 1000, "/c", True)
    assert [r.key.benchmark for r in P.admit(c, set(), narrowed, ["qa", "mc"], SEL)] == ["qa"]
    assert [r.key.benchmark for r in P.admit(c, {"qa"}, RUN, ["qa", "mc"], SEL)] == ["mc"]


@pytest.mark.parametrize("missing_for, vanished", [(None, False), (5.0, False), (29.9, False), (30.0, True)])
def test_a_missing_checkpoint_vanishes_only_after_the_grace_period(missing_for, vanished):
    move = P.reconcile(job(L.PENDING), None, protected=False, missing_for=missing_for, grace=30.0, selected=True)
    assert (move is not None and move.to == L.VANISHED) is vanished


def test_a_pinned_checkpoint_or_a_row_past_inference_never_vanishes_with_its_original():
    assert P.reconcile(job(L.PENDING), None, protected=True, missing_for=999, grace=30, selected=True) is None
    assert P.reconcile(job(L.INFERRED), None, protected=False, missing_for=999, grace=30, selected=True) is None


def test_reconciliation_follows_a_changed_selection_and_a_moved_folder():
    here = Checkpoint("run", 1000, "/ckpt/iter_0001000", True)
    assert P.reconcile(job(L.SKIPPED), here, False, None, 30, selected=True).to == L.PENDING
    assert P.reconcile(job(L.PENDING), here, False, None, 30, selected=False).to == L.SKIPPED
    # a failed attempt waiting for its retry, after --begin-iteration was raised past it: not retried
    waiting = job(L.FAILED, resume_state=L.PENDING, next_retry_at=5.0)
    assert P.reconcile(waiting, here, False, None, 30, selected=False).to == L.SKIPPED
    assert P.reconcile(waiting, here, False, None, 30, selected=True) is None
    assert P.reconcile(job(L.FAILED, resume_state=L.PENDING), here, False, None, 30, selected=False) is None  # final
    moved = Checkpoint("run", 1000, "/new/iter_0001000", True)
    move = P.reconcile(job(L.PENDING), moved, False, None, 30, selected=True)
    assert move.to is None and move.fields == {"path": "/new/iter_0001000"}


def test_the_grace_default_is_a_few_poll_intervals():
    assert P.vanish_grace(None, 10) == 30 and P.vanish_grace(None, 60) == 180 and P.vanish_grace(2.0, 60) == 2.0


# ---- what runs next ---------------------------------------------------------------------------------------
def test_choose_serves_runs_fairly_and_skips_what_is_not_wanted():
    rows = [L.Job("a", it, "qa", "/", L.PENDING) for it in (1, 2, 3, 4)] + [L.Job("b", 9, "qa", "/", L.PENDING)]
    chosen = P.choose(rows, 2, lambda j: True)
    assert [(j.run, j.iteration) for j in chosen] == [("a", 1), ("b", 9)]  # b is not stuck behind a's backlog
    assert [j.run for j in P.choose(rows, 5, lambda j: j.run == "b")] == ["b"]
    assert P.choose(rows, 0, lambda j: True) == []


def test_wanted_is_one_definition_for_removed_runs_benchmarks_and_per_run_lists():
    runs = {"run": P.RunSpec("run", "/c", "megatron", benchmarks=("qa",))}
    assert P.wanted(runs, {"qa", "mc"}, "run", "qa")
    assert not P.wanted(runs, {"qa", "mc"}, "run", "mc")  # not in this run's list
    assert not P.wanted(runs, {"mc"}, "run", "qa")  # removed from the config
    assert not P.wanted(runs, {"qa"}, "renamed-away", "qa")  # a run no longer configured


# ---- recording -----------------------------------------------------------------------------------------
def test_a_result_a_sink_keeps_refusing_is_quarantined_not_retried_forever():
    assert P.delivery_failed(1, 4, RETRY, NOW) == NOW + 30
    assert P.delivery_failed(3, 4, RETRY, NOW) == NOW + 120
    assert P.delivery_failed(4, 4, RETRY, NOW) is None


# ---- when to stop -------------------------------------------------------------------------------------------
def test_idle_needs_nothing_runnable_or_undelivered():
    assert P.idle(P.Backlog())
    assert not P.idle(P.Backlog(runnable=1))
    assert not P.idle(P.Backlog(undelivered=1))


def test_range_finished_waits_for_every_expected_iteration_but_not_for_one_never_saved():
    runs = [P.RunSpec("run", "/c", "megatron")]
    done = {(1000, "qa"): True, (3000, "qa"): True}
    assert P.range_finished(range(1000, 3001, 1000), runs, ["qa"], {"run": done}, {"run": 3000})  # 2000 never saved
    assert not P.range_finished(range(1000, 3001, 1000), runs, ["qa"], {"run": {(1000, "qa"): True}}, {"run": 1000})
    assert not P.range_finished(range(1000, 2001, 1000), runs, ["qa"], {"run": {(1000, "qa"): True}}, {"run": 1000})
    assert not P.range_finished(range(1000, 1001, 1000), runs, ["qa"], {"run": {(1000, "qa"): False}}, {"run": 1000})
    assert not P.range_finished(None, runs, ["qa"], {}, {})


def test_range_finished_with_an_end_iteration_far_away_looks_only_at_the_rows_and_the_disk():
    """--end-iteration 10**23: the range is never listed (it held more iterations than memory)."""
    runs = [P.RunSpec("run", "/c", "megatron")]
    far = range(1000, 10 ** 23 + 1, 1000)
    done = {(1000, "qa"): True, (2000, "qa"): True}
    assert not P.range_finished(far, runs, ["qa"], {"run": done}, {"run": 2000}, {"run": {1000, 2000}})
    assert not P.range_finished(range(1000, 10 ** 23, 1000), runs, ["qa"], {}, {}, {})
    done_to_end = {(1000, "qa"): True, (10 ** 23, "qa"): True}
    assert P.range_finished(far, runs, ["qa"], {"run": done_to_end}, {"run": 10 ** 23}, {"run": {10 ** 23}})
    assert not P.range_finished(far, runs, ["qa"], {"run": {**done_to_end, (10 ** 23, "qa"): False}},
                                {"run": 10 ** 23}, {"run": {10 ** 23}})


def test_rescans_run_on_the_monotonic_clock_whatever_the_wall_clock_does():
    # the loop passes time.monotonic(); a wall clock stepped back an hour would not be seen here at all
    assert P.rescan_due(last_scan=100.0, poll_seconds=10, now_monotonic=110.0)
    assert not P.rescan_due(last_scan=100.0, poll_seconds=10, now_monotonic=109.9)


def test_choose_keeps_the_turn_between_runs_across_passes_of_one_free_slot():
    """With one slot per pass, the lowest iteration of any run won every pass: run a's backlog held b back."""
    rows = [L.Job("a", it, "qa", "/", L.PENDING) for it in (1, 2, 3, 4)] + [L.Job("b", 9, "qa", "/", L.PENDING),
                                                                           L.Job("b", 10, "qa", "/", L.PENDING)]
    served, last = [], None
    for _ in range(4):
        job = P.choose([r for r in rows if r not in served], 1, lambda j: True, after=last)[0]
        served.append(job)
        last = job.run
    assert [(j.run, j.iteration) for j in served] == [("a", 1), ("b", 9), ("a", 2), ("b", 10)]


def test_range_finished_waits_for_a_benchmark_added_to_iterations_it_has_seen():
    """Iterations with rows for qa only, mc added to the config since: its rows are still to come."""
    spec = P.RunSpec("r", "/ckpt", "megatron")
    rows = {"r": {(1000, "qa"): True, (2000, "qa"): True}}
    assert not P.range_finished(range(1000, 2001, 1000), [spec], ["qa", "mc"], rows, {"r": 5000}, {"r": {1000, 2000, 5000}})
    # not on disk (rotated away before mc was added): not waited for
    assert P.range_finished(range(1000, 2001, 1000), [spec], ["qa", "mc"], rows, {"r": 5000}, {"r": {5000}})
    # an iteration with no row at all below a later one was never saved (or rotated away unseen)
    assert P.range_finished(range(1000, 2001, 500), [spec], ["qa"], rows, {"r": 5000}, {"r": {1000, 2000, 5000}})


def test_a_vanished_row_whose_checkpoint_is_complete_again_goes_back_to_pending():
    job = L.Job("r", 2000, "qa", "/ckpt/iter_0002000", L.VANISHED)
    back = Checkpoint("r", 2000, "/ckpt/iter_0002000", True)
    move = P.reconcile(job, back, False, None, 30.0, True)
    assert move.to == L.PENDING and move.fields["last_error"] is None
    assert P.reconcile(job, Checkpoint("r", 2000, "/ckpt/iter_0002000", False), False, None, 30.0, True) is None
    assert P.reconcile(job, back, False, None, 30.0, False) is None  # outside the selection now: left vanished
    assert P.reconcile(job, None, False, 99.0, 30.0, True) is None


def test_after_a_checkpoint_change_its_iterations_other_benchmarks_start_over_by_what_a_sink_has_seen():
    changed = ("a", 1000, "qa")
    rows = [L.Job("a", 1000, b, "/", state) for b, state in (
        ("qa", L.PENDING), ("inferring", L.INFERRING), ("inferred", L.INFERRED), ("scoring", L.SCORING),
        ("scored", L.SCORED), ("recorded", L.RECORDED), ("failed", L.FAILED), ("pending", L.PENDING))]
    rows += [L.Job("a", 2000, "inferring", "/", L.INFERRING), L.Job("b", 1000, "recorded", "/", L.RECORDED)]
    moves, rerun, recording = P.siblings_after_change(rows, changed)
    # not yet seen by a sink: back to pending, the running ones to be stopped by the loop
    assert [(m.key, m.to) for m in moves] == [(("a", 1000, b), L.PENDING) for b in ("inferring", "inferred", "scoring")]
    assert all(m.fields["token"] is None and "found the checkpoint changed" in m.note for m in moves)
    assert [j.key for j in rerun] == [("a", 1000, "recorded")]  # a new revision of the new save
    assert [j.key for j in recording] == [("a", 1000, "scored")]  # being recorded now: named, not touched


def test_a_checkpoint_outside_the_selection_rotated_away_vanishes_without_a_warning():
    skipped = P.reconcile(job(L.SKIPPED), None, protected=False, missing_for=99, grace=30, selected=False)
    pending = P.reconcile(job(L.PENDING), None, protected=False, missing_for=99, grace=30, selected=True)
    assert (skipped.to, skipped.level) == (L.VANISHED, "info")  # was a WARNING per benchmark per rotated save
    assert (pending.to, pending.level) == (L.VANISHED, "warning")
