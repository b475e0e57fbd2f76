"""The ledger: states, transactional transitions, durability across reopen, concurrent readers."""
from __future__ import annotations

import sqlite3

import pytest

from evaluator.daemon import ledger as L
from evaluator.daemon.ledger import Ledger, LedgerConflict

KEY = ("run", 1000, "qa")


@pytest.fixture
def led(tmp_path):
    ledger = Ledger(str(tmp_path))
    yield ledger
    ledger.close()


def test_a_new_row_starts_pending_and_adding_it_again_changes_nothing(led):
    assert led.add(*KEY, path="/ckpt/iter_0001000") is True
    led.transition(KEY, L.INFERRING)
    assert led.add(*KEY, path="/elsewhere") is False
    job = led.get(KEY)
    assert job.state == L.INFERRING and job.path == "/ckpt/iter_0001000"


def test_the_happy_path_walks_every_state_and_logs_each_transition(led):
    led.add(*KEY, path="/p")
    for state in (L.INFERRING, L.INFERRED, L.SCORING, L.SCORED, L.RECORDED):
        led.transition(KEY, state)
    assert [e["to_state"] for e in led.events(KEY)] == ["pending", "inferring", "inferred", "scoring", "scored", "recorded"]
    assert [e["from_state"] for e in led.events(KEY)][1:] == ["pending", "inferring", "inferred", "scoring", "scored"]


@pytest.mark.parametrize("path", [
    (L.RECORDED,),                 # pending -> recorded skips the stages
    (L.SCORING,),                  # pending -> scoring skips inference
    (L.INFERRING, L.INFERRING),    # the same stage cannot be started twice
    (L.INFERRING, L.INFERRED, L.INFERRING),
])
def test_illegal_transitions_are_refused_and_leave_the_row_as_it_was(led, path):
    led.add(*KEY, path="/p")
    *legal, illegal = path
    for s in legal:
        led.transition(KEY, s)
    before = led.get(KEY)
    with pytest.raises(LedgerConflict):
        led.transition(KEY, illegal)
    assert led.get(KEY).state == before.state
    assert len(led.events(KEY)) == 1 + len(legal)  # the refused move left no event


def test_a_vanished_row_leaves_only_for_pending_when_its_checkpoint_is_back(led):
    led.add(*KEY, path="/p")
    led.transition(KEY, L.VANISHED)
    for s in L.STATES:
        if s not in (L.VANISHED, L.PENDING):
            with pytest.raises(LedgerConflict):
                led.transition(KEY, s)
    led.transition(KEY, L.PENDING)  # reconcile: the checkpoint is complete on disk again, never evaluated


def test_failed_keeps_attempts_retry_time_and_where_to_resume(led):
    led.add(*KEY, path="/p")
    led.transition(KEY, L.INFERRING)
    led.transition(KEY, L.INFERRED)
    led.transition(KEY, L.SCORING)
    led.transition(KEY, L.FAILED, attempts=1, resume_state=L.INFERRED, next_retry_at=123.0, last_error="boom")
    job = led.get(KEY)
    assert (job.state, job.attempts, job.resume_state, job.next_retry_at, job.last_error) == (
        L.FAILED, 1, L.INFERRED, 123.0, "boom")
    led.transition(KEY, L.INFERRED, next_retry_at=None)  # a retry restarts at scoring, not at inference
    assert led.get(KEY).state == L.INFERRED


def test_only_known_fields_can_be_set(led):
    led.add(*KEY, path="/p")
    with pytest.raises(ValueError):
        led.transition(KEY, L.INFERRING, state="recorded")
    with pytest.raises(ValueError):
        led.update(KEY, run="other")


def test_rows_survive_closing_and_reopening(tmp_path):
    a = Ledger(str(tmp_path))
    a.add(*KEY, path="/p")
    a.transition(KEY, L.INFERRING, pid=4242, pid_start="99")
    a.close()
    b = Ledger(str(tmp_path))
    job = b.get(KEY)
    b.close()
    assert (job.state, job.pid, job.pid_start) == (L.INFERRING, 4242, "99")


def test_the_database_is_in_wal_mode_so_status_can_read_while_the_daemon_writes(tmp_path):
    writer = Ledger(str(tmp_path))
    writer.add(*KEY, path="/p")
    mode = sqlite3.connect(writer.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reader = Ledger(str(tmp_path), readonly=True)
    writer.db.execute("BEGIN IMMEDIATE")  # the daemon holds a write transaction...
    writer.db.execute("UPDATE jobs SET state='inferring'")
    assert reader.get(KEY).state == L.PENDING  # ...and a reader still sees the last committed state
    writer.db.execute("COMMIT")
    assert reader.get(KEY).state == L.INFERRING
    reader.close()
    writer.close()


def test_a_sink_is_marked_recorded_once(led):
    led.add(*KEY, path="/p")
    led.mark_recorded(KEY, "local")
    led.mark_recorded(KEY, "local")
    assert led.recorded_sinks(KEY) == {"local"}


def test_a_ledger_from_before_slurm_support_is_read_and_upgraded(tmp_path):
    old = sqlite3.connect(str(tmp_path / "ledger.sqlite3"))
    old.executescript("""CREATE TABLE jobs (run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL,
        path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, resume_state TEXT,
        next_retry_at REAL, last_error TEXT, pid INTEGER, pid_start TEXT, started_at REAL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (run, iteration, benchmark));
        INSERT INTO jobs VALUES ('run', 1000, 'qa', '/p', 'recorded', 0, NULL, NULL, NULL, NULL, NULL, NULL, 1, 1);""")
    old.commit()
    old.close()
    reader = Ledger(str(tmp_path), readonly=True)  # e.g. `status` or --dry-run before the daemon restarts
    assert reader.get(KEY).state == L.RECORDED and reader.get(KEY).infer_job is None
    reader.close()
    writer = Ledger(str(tmp_path))
    writer.update(KEY, infer_job="42")
    assert writer.get(KEY).infer_job == "42"
    writer.close()


def test_what_moves_with_a_row_runs_under_the_ledgers_write_lock_and_undoes_the_move_when_it_fails(led, tmp_path):
    """invalidate moved a row's files before its transition: a daemon starting the row in between found its
    outputs gone (a spurious attempt). `then` runs once the move is allowed, while no one else can write."""
    led.add("r", 1000, "qa", "/ckpt/iter_0001000", state=L.INFERRED)
    other = sqlite3.connect(str(tmp_path / "ledger.sqlite3"), timeout=0.1)
    seen = []

    def held() -> None:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("UPDATE jobs SET state='scoring'")  # the daemon starting the evaluation: it waits
        seen.append(led.get(("r", 1000, "qa")).state)

    assert led.transition(("r", 1000, "qa"), L.INVALIDATED, then=held).state == L.INVALIDATED
    assert seen == [L.INFERRED]

    def refused() -> None:
        raise PermissionError(1, "Operation not permitted")

    led.add("r", 2000, "qa", "/ckpt/iter_0002000", state=L.RECORDED)
    with pytest.raises(PermissionError):
        led.restart(("r", 2000, "qa"), "rerun", then=refused)
    assert led.get(("r", 2000, "qa")).state == L.RECORDED and led.get(("r", 2000, "qa")).revision == 0
    called = []
    with pytest.raises(LedgerConflict):  # not allowed: nothing moves
        led.transition(("r", 2000, "qa"), L.INFERRING, then=lambda: called.append(1))
    assert called == []
    other.close()
