"""The daemon's memory: one row per (run, iteration, benchmark), in SQLite (WAL) in cache_dir.

States (docs/architecture.md):
    pending -> inferring -> inferred -> scoring -> scored -> recorded
    failed   (attempts, next_retry_at; next_retry_at NULL = failed for good; resume_state says where a retry restarts)
    vanished (checkpoint deleted before its inference finished)
    skipped  (outside begin/end/interval)
    invalidated (withdrawn by `tools/evaluator.py invalidate`; `rerun` brings it back)
Each row carries the settings `fingerprint` its result was made with (fingerprint.py) and a `revision`: 0 for
the first evaluation, +1 for each `rerun`, so the sinks tell a re-run apart from a result offered twice.
Every transition is one transaction that names the states it may come from, so two code paths can
never both move the same row. The `events` table keeps every transition (status, tests, audits).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional

PENDING, INFERRING, INFERRED, SCORING, SCORED, RECORDED = "pending", "inferring", "inferred", "scoring", "scored", "recorded"
FAILED, VANISHED, SKIPPED, INVALIDATED = "failed", "vanished", "skipped", "invalidated"
# snapshot states (table `snapshots`, one row per pinned (run, iteration)); see snapshots.py
PINNING, PINNED, UNPINNED, RELEASED = "pinning", "pinned", "unpinned", "released"  # + VANISHED
STATES = (PENDING, INFERRING, INFERRED, SCORING, SCORED, RECORDED, FAILED, VANISHED, SKIPPED, INVALIDATED)
# the states whose outputs were made with the row's fingerprint (what changed settings would mix into a curve)
HAS_OUTPUTS = (INFERRED, SCORING, SCORED, RECORDED)
# what `rerun` may start again (Ledger.restart, its own guarded write) and `invalidate` may withdraw: nothing running, nothing mid-recording
RERUNNABLE = (RECORDED, FAILED, VANISHED, SKIPPED, INVALIDATED, INFERRED, PENDING)
# (not SCORED: its sinks may be recording it right now, and a line appended after the withdrawal would bring it back)
INVALIDATABLE = (RECORDED, INFERRED, FAILED, PENDING)
RUNNING = (INFERRING, SCORING)

# to-state -> the states it may be entered from
ALLOWED: dict[str, tuple[str, ...]] = {
    # SCORING: the checkpoint changed under the stage; VANISHED: its checkpoint is back (never evaluated)
    PENDING: (SKIPPED, INFERRING, FAILED, INFERRED, SCORING, VANISHED),
    INFERRING: (PENDING,),
    INFERRED: (INFERRING, SCORING, FAILED, SCORED),
    SCORING: (INFERRED,),
    SCORED: (SCORING,),
    RECORDED: (SCORED,),
    FAILED: (INFERRING, SCORING, PENDING),  # PENDING: a checkpoint found invalid, or a stage that could not start
    VANISHED: (PENDING, INFERRING, FAILED, SKIPPED),
    SKIPPED: (PENDING, FAILED),  # FAILED: a retry that was due, now outside begin/end/interval
    INVALIDATED: INVALIDATABLE,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL,
    path TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, resume_state TEXT, next_retry_at REAL, last_error TEXT,
    pid INTEGER, pid_start TEXT, started_at REAL, infer_job TEXT, eval_job TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (run, iteration, benchmark));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
    run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL,
    from_state TEXT, to_state TEXT NOT NULL, note TEXT);
CREATE TABLE IF NOT EXISTS snapshots (
    run TEXT NOT NULL, iteration INTEGER NOT NULL, state TEXT NOT NULL,
    source TEXT NOT NULL, path TEXT, bytes INTEGER NOT NULL DEFAULT 0, manifest TEXT, note TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (run, iteration));
CREATE TABLE IF NOT EXISTS recordings (
    run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL, sink TEXT NOT NULL,
    recorded_at REAL NOT NULL, PRIMARY KEY (run, iteration, benchmark, sink));
CREATE TABLE IF NOT EXISTS deliveries (
    run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL, sink TEXT NOT NULL,
    failures INTEGER NOT NULL, next_try_at REAL, quarantined INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    updated_at REAL NOT NULL, PRIMARY KEY (run, iteration, benchmark, sink));
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL,
    run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL, message TEXT NOT NULL,
    created_at REAL NOT NULL, closed_at REAL, closed_by TEXT, UNIQUE (rule, run, iteration, benchmark));
CREATE TABLE IF NOT EXISTS alert_deliveries (
    alert INTEGER NOT NULL, channel TEXT NOT NULL, delivered_at REAL, failures INTEGER NOT NULL DEFAULT 0,
    next_try_at REAL, last_error TEXT, PRIMARY KEY (alert, channel));
CREATE TABLE IF NOT EXISTS fingerprints (
    fingerprint TEXT NOT NULL, benchmark TEXT NOT NULL, settings TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, benchmark));
"""
# created after the columns they name exist (older ledgers gain columns first)
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_state_iteration ON jobs (state, iteration);
CREATE INDEX IF NOT EXISTS jobs_run_iteration ON jobs (run, iteration);
CREATE INDEX IF NOT EXISTS events_key ON events (run, iteration, benchmark);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
DROP INDEX IF EXISTS jobs_state;
"""
# rows whose predictions exist and count: HAS_OUTPUTS, and failed ones with a retry that resumes at scoring
_HAS_OUTPUTS_SQL = "(state IN ({marks}) OR (state = ? AND resume_state = ? AND next_retry_at IS NOT NULL))"
EVENTS_KEEP_SECONDS = 30 * 86400  # transitions older than this are pruned (status shows the newest)
_OF_SCORED_ROW = "JOIN jobs j ON j.run=d.run AND j.iteration=d.iteration AND j.benchmark=d.benchmark"


def _owed(held_back: str) -> str:
    """WHERE clause: row `j` is scored (1st parameter), a sink (2nd, 3rd) has not accepted it, and its
    `deliveries` row `d` for that sink does not hold it back by `held_back`."""
    return ("j.state = ? AND NOT EXISTS (SELECT 1 FROM recordings r WHERE r.run=j.run AND r.iteration=j.iteration"
            " AND r.benchmark=j.benchmark AND r.sink=?) AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.run=j.run"
            f" AND d.iteration=j.iteration AND d.benchmark=j.benchmark AND d.sink=? AND ({held_back}))")


class LedgerConflict(RuntimeError):
    """A transition found the row in a state it may not leave that way (a bug, not user error)."""


class LedgerUnavailable(RuntimeError):
    """The ledger cannot be written (disk full, read-only, I/O error); the ledger itself stays intact."""


def file_error(e: BaseException) -> bool:
    """An error of the database file (I/O, full, read-only, locked; damaged: 'file is not a database',
    'disk image is malformed'), not of a statement (IntegrityError and the like are bugs and stay loud)."""
    return isinstance(e, sqlite3.OperationalError) or type(e) is sqlite3.DatabaseError


class _Connection(sqlite3.Connection):
    """The daemon's connection: an error of the database file becomes LedgerUnavailable on reads as well as
    writes, so the loop pauses on it (Daemon.guarded) and keeps what it has not applied, instead of ending."""

    path = ""

    def _unavailable(self, sql: str, e: sqlite3.DatabaseError) -> BaseException:
        if not file_error(e):
            return e
        what = "read" if sql.lstrip().upper().startswith("SELECT") else "write"
        return LedgerUnavailable(f"cannot {what} the ledger {self.path}: {e}")

    def execute(self, sql, *args):
        try:
            return super().execute(sql, *args)
        except sqlite3.DatabaseError as e:
            raise self._unavailable(sql, e) from None

    def executemany(self, sql, *args):
        try:
            return super().executemany(sql, *args)
        except sqlite3.DatabaseError as e:
            raise self._unavailable(sql, e) from None

    def executescript(self, sql):
        try:
            return super().executescript(sql)
        except sqlite3.DatabaseError as e:
            raise self._unavailable(sql, e) from None


class JobKey(NamedTuple):
    run: str
    iteration: int
    benchmark: str

    def __str__(self) -> str:
        return f"{self.run}@{self.iteration}/{self.benchmark}"


@dataclass
class Job:
    run: str
    iteration: int
    benchmark: str
    path: str
    state: str
    attempts: int = 0
    resume_state: Optional[str] = None
    next_retry_at: Optional[float] = None
    last_error: Optional[str] = None
    pid: Optional[int] = None
    pid_start: Optional[str] = None
    started_at: Optional[float] = None
    infer_job: Optional[str] = None  # handle of the inference stage: a pid (local) or a Slurm job id
    eval_job: Optional[str] = None  # handle of the evaluation stage
    created_at: float = 0.0
    updated_at: float = 0.0
    token: Optional[str] = None  # intent of the stage start, durable before the side effect (executors.py)
    tempfail_since: Optional[float] = None  # first of an unbroken run of exit-75s (their own time budget)
    fingerprint: Optional[str] = None  # the settings its outputs were made with (None: made before fingerprints)
    revision: int = 0  # 0: first evaluation; +1 per `rerun`

    @property
    def key(self) -> JobKey:
        return JobKey(self.run, self.iteration, self.benchmark)


FIELDS = tuple(Job.__dataclass_fields__)
MUTABLE = ("path", "attempts", "resume_state", "next_retry_at", "last_error", "pid", "pid_start", "started_at",
           "infer_job", "eval_job", "token", "tempfail_since", "fingerprint", "revision")
ADDED_COLUMNS = {"infer_job": "TEXT", "eval_job": "TEXT", "token": "TEXT", "tempfail_since": "REAL",
                 "fingerprint": "TEXT", "revision": "INTEGER NOT NULL DEFAULT 0"}


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Ledger:
    def __init__(self, cache_dir: str, readonly: bool = False):
        self.path = os.path.join(cache_dir, "ledger.sqlite3")
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            try:
                self.db.execute("SELECT 1 FROM jobs LIMIT 1")
            except sqlite3.OperationalError:
                # WAL needs to create -shm beside the database; in a cache_dir this user cannot write
                # (the service runs as another user) and with the daemon stopped, read it as immutable
                self.db.close()
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, timeout=30)
        else:
            os.makedirs(cache_dir, exist_ok=True)
            try:
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, factory=_Connection)
                self.db.path = self.path
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
                columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
                for name, kind in ADDED_COLUMNS.items():  # ledgers made by older versions
                    if name not in columns:
                        self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                self.db.executescript(INDEXES)
            except sqlite3.DatabaseError as e:  # connect itself (the statements raise LedgerUnavailable already)
                if not file_error(e):
                    raise
                raise LedgerUnavailable(f"cannot open the ledger {self.path}: {e}") from None
        self.db.row_factory = sqlite3.Row
        self.identity = _identity(self.path)  # the file this connection writes (replaced() compares)
        # a read-only look at a ledger written by an older version lacks newer columns: read what exists
        have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        self.fields = [f for f in FIELDS if f in have]
        self._select = f"SELECT {', '.join(self.fields)} FROM jobs"

    def close(self) -> None:
        self.db.close()

    def replaced(self) -> Optional[str]:
        """What became of the ledger file when it is no longer the one this connection writes (deleted, or
        another file put in its place: what is written goes nowhere a restart finds), else None."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            now = None
        except OSError:
            return None  # unreadable for a moment (EIO): the ledger's own writes say what is wrong
        else:
            now = (st.st_dev, st.st_ino)
        if now == self.identity or self.identity is None:
            return None
        return f"{self.path} was {'deleted' if now is None else 'replaced by another file'} under the running daemon"

    # ---- reads ---------------------------------------------------------------------------
    def jobs(self, states: Iterable[str] = (), run: Optional[str] = None, iteration: Optional[int] = None,
             newest_first: Optional[bool] = None, limit: Optional[int] = None,
             benchmarks: Optional[Iterable[str]] = None) -> list[Job]:
        """Rows filtered in SQL (`benchmarks`: only these); ordered by (run, iteration, benchmark), or by iteration
        when `newest_first` is given (the dispatch order), at most `limit` of them."""
        sql, args = self._select, []
        where = []
        states = tuple(states)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if run is not None:
            # with a state filter, "+run" keeps SQLite on the (state, iteration) index: the primary key's
            # run prefix would read every row of the run (200k) to find the few in that state
            where.append("+run = ?" if states else "run = ?")
            args.append(run)
        if iteration is not None:
            where.append("iteration = ?")
            args.append(iteration)
        if benchmarks is not None:
            names = tuple(benchmarks)
            where.append(f"benchmark IN ({', '.join('?' * len(names))})" if names else "0")
            args += names
        if where:
            sql += " WHERE " + " AND ".join(where)
        if newest_first is None:
            sql += " ORDER BY run, iteration, benchmark"
        else:
            sql += f" ORDER BY iteration {'DESC' if newest_first else 'ASC'}, run, benchmark"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Job(**dict(r)) for r in self.db.execute(sql, args)]

    def get(self, key: tuple) -> Optional[Job]:
        row = self.db.execute(f"{self._select} WHERE run=? AND iteration=? AND benchmark=?", tuple(key)).fetchone()
        return Job(**dict(row)) if row else None

    def counts(self, run: Optional[str] = None) -> dict[str, int]:
        """state -> number of rows (GROUP BY, not a Python loop over every row)."""
        if run is None:
            rows = self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        else:
            rows = self.db.execute("SELECT state, COUNT(*) FROM jobs WHERE run=? GROUP BY state", (run,))
        return {state: n for state, n in rows}

    def runs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT run FROM jobs ORDER BY run")]

    def known(self, run: str) -> dict[int, set[str]]:
        """iteration -> benchmarks with a row, for one run (what a scan need not look at again)."""
        out: dict[int, set[str]] = {}
        for iteration, bench in self.db.execute("SELECT iteration, benchmark FROM jobs WHERE run=?", (run,)):
            out.setdefault(iteration, set()).add(bench)
        return out

    def due_retries(self, now: float) -> list[Job]:
        return [Job(**dict(r)) for r in self.db.execute(
            f"{self._select} WHERE state=? AND next_retry_at IS NOT NULL AND next_retry_at <= ?"
            " ORDER BY next_retry_at", (FAILED, now))]

    def runnable(self) -> list[tuple[str, str, int]]:
        """(run, benchmark, rows) still to run or running, or failed with a retry to come (GROUP BY)."""
        return self.db.execute(
            "SELECT run, benchmark, COUNT(*) FROM jobs WHERE state IN (?, ?, ?, ?) OR "
            "(state = ? AND next_retry_at IS NOT NULL) GROUP BY run, benchmark",
            (PENDING, INFERRED, INFERRING, SCORING, FAILED)).fetchall()

    def finality_between(self, begin: int, end: int) -> dict[str, dict[tuple, tuple]]:
        """run -> {(iteration, benchmark): (state, next_retry_at)} for iterations in [begin, end]."""
        out: dict[str, dict[tuple, tuple]] = {}
        for run, it, bench, state, retry in self.db.execute(
                "SELECT run, iteration, benchmark, state, next_retry_at FROM jobs WHERE iteration BETWEEN ? AND ?",
                (begin, end)):
            out.setdefault(run, {})[(it, bench)] = (state, retry)
        return out

    def newest_iterations(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT run, MAX(iteration) FROM jobs GROUP BY run").fetchall())

    def next_retry(self) -> Optional[float]:
        row = self.db.execute("SELECT MIN(next_retry_at) FROM jobs WHERE state=?", (FAILED,)).fetchone()
        return row[0] if row else None

    def events(self, key: Optional[tuple] = None) -> list[dict]:
        if key is None:
            rows = self.db.execute("SELECT * FROM events ORDER BY id")
        else:
            rows = self.db.execute(
                "SELECT * FROM events WHERE run=? AND iteration=? AND benchmark=? ORDER BY id", tuple(key))
        return [dict(r) for r in rows]

    def stale_outputs(self, benchmark: str, fingerprint: str, runs: Optional[list] = None) -> dict[str, int]:
        """Older fingerprint -> rows of `benchmark` whose outputs were made with it (not `fingerprint`); of the
        runs `runs` only, when given (the configured runs that evaluate it)."""
        if "fingerprint" not in self.fields:
            return {}  # a read-only look at a ledger from before fingerprints
        if runs is not None and not runs:
            return {}
        marks = ", ".join("?" * len(HAS_OUTPUTS))
        in_runs = f" AND run IN ({', '.join('?' * len(runs))})" if runs is not None else ""
        return dict(self.db.execute(
            f"SELECT fingerprint, COUNT(*) FROM jobs WHERE benchmark=? AND {_HAS_OUTPUTS_SQL.format(marks=marks)} "
            f"AND fingerprint IS NOT NULL AND fingerprint != ?{in_runs} GROUP BY fingerprint",
            (benchmark, *HAS_OUTPUTS, FAILED, INFERRED, fingerprint, *(runs or ()))).fetchall())

    def adopt_fingerprint(self, benchmark: str, fingerprint: str) -> int:
        """Rows with outputs made before fingerprints existed are taken to have today's settings."""
        marks = ", ".join("?" * len(HAS_OUTPUTS))
        with self._tx():
            cur = self.db.execute(f"UPDATE jobs SET fingerprint=? WHERE benchmark=? AND fingerprint IS NULL AND "
                                  f"{_HAS_OUTPUTS_SQL.format(marks=marks)}",
                                  (fingerprint, benchmark, *HAS_OUTPUTS, FAILED, INFERRED))
        return cur.rowcount

    def settings_of(self, fingerprint: str, benchmark: str) -> Optional[dict]:
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='fingerprints'").fetchone():
            return None  # a read-only look at a ledger from before fingerprints
        row = self.db.execute("SELECT settings FROM fingerprints WHERE fingerprint=? AND benchmark=?",
                              (fingerprint, benchmark)).fetchone()
        return json.loads(row[0]) if row else None

    def put_settings(self, fingerprint: str, benchmark: str, settings: dict) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO fingerprints VALUES (?, ?, ?, ?)",
                            (fingerprint, benchmark, json.dumps(settings, sort_keys=True, default=str), time.time()))

    def recorded_sinks(self, key: tuple) -> set[str]:
        rows = self.db.execute("SELECT sink FROM recordings WHERE run=? AND iteration=? AND benchmark=?", tuple(key))
        return {r[0] for r in rows}

    # ---- writes (each one transaction) -----------------------------------------------------
    def add(self, run: str, iteration: int, benchmark: str, path: str, state: str = PENDING) -> bool:
        """Insert a row if it is new; returns whether it was inserted."""
        return bool(self.add_many([(run, iteration, benchmark, path, state, None)]))

    def add_many(self, rows: Iterable[tuple]) -> list[JobKey]:
        """Insert (run, iteration, benchmark, path, state, last_error) rows that are new, in ONE
        transaction (one fsync for a whole checkpoint backlog); returns the keys inserted."""
        now = time.time()
        added = []
        with self._tx():
            for run, iteration, benchmark, path, state, error in rows:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO jobs (run, iteration, benchmark, path, state, last_error, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run, iteration, benchmark, path, state, error, now, now))
                if cur.rowcount:
                    key = JobKey(run, iteration, benchmark)
                    self._event(key, None, state, "discovered" if error is None else error.splitlines()[0])
                    added.append(key)
        return added

    def transition(self, key: tuple, to_state: str, note: str = "", then: Optional[Callable[[], None]] = None,
                   **fields) -> Job:
        """Move a row to `to_state` from any state ALLOWED lists; set `fields` in the same transaction. `then`
        runs once the move is allowed, before it is written, while no other process can write the ledger (files
        moved with the row: an exception from it leaves the row as it was)."""
        bad = set(fields) - set(MUTABLE)
        if bad:
            raise ValueError(f"not mutable: {sorted(bad)}")
        key = tuple(key)
        sources = ALLOWED[to_state]
        with self._tx():
            row = self.db.execute(
                "SELECT state FROM jobs WHERE run=? AND iteration=? AND benchmark=?", key).fetchone()
            if row is None or row[0] not in sources:
                raise LedgerConflict(f"{key}: cannot go {row[0] if row else 'missing'} -> {to_state}")
            if then is not None:
                then()
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(
                f"UPDATE jobs SET state = ?, updated_at = ?{', ' + sets if sets else ''}"
                " WHERE run=? AND iteration=? AND benchmark=?",
                (to_state, time.time(), *fields.values(), *key))
            self._event(key, row[0], to_state, note)
        return self.get(key)

    def update(self, key: tuple, **fields) -> None:
        """Set fields without changing state (e.g. the pid once the stage process exists)."""
        bad = set(fields) - set(MUTABLE)
        if bad:
            raise ValueError(f"not mutable: {sorted(bad)}")
        with self._tx():
            self.db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)}, updated_at = ?"
                            " WHERE run=? AND iteration=? AND benchmark=?", (*fields.values(), time.time(), *key))

    def restart(self, key: tuple, note: str, state: str = PENDING, then: Optional[Callable[[], None]] = None,
                **fields) -> Job:
        """`rerun`: back to pending as a new revision, with no attempts, and owed to every sink again. state
        INFERRED: a scored row whose metrics.json is lost is scored again from its kept predictions as a new
        revision (Daemon.score_again), so no sink keeps the first number beside another's second."""
        key = tuple(key)
        with self._tx():
            row = self.db.execute("SELECT state, revision FROM jobs WHERE run=? AND iteration=? AND benchmark=?",
                                  key).fetchone()
            if row is None or row[0] not in (RERUNNABLE if state == PENDING else (SCORED,)):
                raise LedgerConflict(f"{key}: cannot re-run a row that is {row[0] if row else 'missing'}")
            if then is not None:  # as transition's
                then()
            values = {"attempts": 0, "resume_state": None, "next_retry_at": None, "last_error": None, "token": None,
                      "tempfail_since": None, "pid": None, "pid_start": None, "infer_job": None, "eval_job": None,
                      "revision": row[1] + (row[0] != PENDING), **fields}
            self.db.execute(
                f"UPDATE jobs SET state = ?, updated_at = ?, {', '.join(f'{k} = ?' for k in values)}"
                " WHERE run=? AND iteration=? AND benchmark=?", (state, time.time(), *values.values(), *key))
            for table in ("recordings", "deliveries"):
                self.db.execute(f"DELETE FROM {table} WHERE run=? AND iteration=? AND benchmark=?", key)
            self._event(key, row[0], state, note)
        return self.get(key)

    def prune_events(self, now: Optional[float] = None, keep_seconds: float = EVENTS_KEEP_SECONDS) -> int:
        """Drop transitions older than keep_seconds (the events table must not grow without bound)."""
        with self._tx():
            cur = self.db.execute("DELETE FROM events WHERE ts < ?", ((now or time.time()) - keep_seconds,))
        return cur.rowcount

    # ---- snapshots ------------------------------------------------------------------------
    def snapshot(self, run: str, iteration: int) -> Optional[dict]:
        row = self.db.execute("SELECT * FROM snapshots WHERE run=? AND iteration=?", (run, iteration)).fetchone()
        return dict(row) if row else None

    def snapshots(self, states: Iterable[str] = ()) -> list[dict]:
        states = tuple(states)
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='snapshots'").fetchone():
            return []  # a read-only look at a ledger from before snapshots existed
        sql = "SELECT * FROM snapshots"
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
        return [dict(r) for r in self.db.execute(sql + " ORDER BY run, iteration", states)]

    def put_snapshot(self, run: str, iteration: int, state: str, source: str, **fields) -> None:
        """Insert or replace the snapshot row of (run, iteration)."""
        now = time.time()
        cols = {"state": state, "source": source, "path": None, "bytes": 0, "manifest": None, "note": None, **fields}
        with self._tx():
            self.db.execute(
                f"INSERT OR REPLACE INTO snapshots (run, iteration, {', '.join(cols)}, created_at, updated_at)"
                f" VALUES (?, ?, {', '.join('?' * len(cols))}, ?, ?)", (run, iteration, *cols.values(), now, now))

    def pinned_bytes(self) -> int:
        """Bytes held by pinning and pinned snapshots: one SQL SUM, not a Python loop over every row."""
        (total,) = self.db.execute("SELECT COALESCE(SUM(bytes), 0) FROM snapshots WHERE state IN (?, ?)",
                                   (PINNING, PINNED)).fetchone()
        return int(total)

    def drop_snapshot(self, run: str, iteration: int) -> None:
        with self._tx():
            self.db.execute("DELETE FROM snapshots WHERE run=? AND iteration=?", (run, iteration))

    def set_snapshot(self, run: str, iteration: int, state: str, **fields) -> None:
        sets = "".join(f", {k} = ?" for k in fields)
        with self._tx():
            self.db.execute(f"UPDATE snapshots SET state = ?, updated_at = ?{sets} WHERE run=? AND iteration=?",
                            (state, time.time(), *fields.values(), run, iteration))

    # ---- the recording outbox: scored rows x sinks -------------------------------------------
    def deliveries_due(self, sinks: list[str], now: float, limit: int = 100) -> list[tuple[Job, str]]:
        """(scored row, sink) pairs not yet recorded there, not quarantined, not backing off; oldest first."""
        out = []
        for sink in sinks:
            rows = self.db.execute(
                f"{self._select.replace('FROM jobs', 'FROM jobs AS j')} WHERE "
                f"{_owed('d.quarantined=1 OR d.next_try_at > ?')} ORDER BY j.iteration, j.run, j.benchmark LIMIT ?",
                (SCORED, sink, sink, now, limit))
            out += [(Job(**dict(r)), sink) for r in rows]
        return out

    def recorded_without(self, sink: str) -> int:
        """Recorded results the sink `sink` never accepted: recorded before it was configured."""
        return self.db.execute("SELECT COUNT(*) FROM jobs j WHERE j.state=? AND NOT EXISTS (SELECT 1 FROM recordings r "
                               "WHERE r.run=j.run AND r.iteration=j.iteration AND r.benchmark=j.benchmark AND "
                               "r.sink=?)", (RECORDED, sink)).fetchone()[0]

    def next_delivery(self) -> Optional[float]:
        row = self.db.execute(
            f"SELECT MIN(d.next_try_at) FROM deliveries d {_OF_SCORED_ROW} WHERE d.quarantined=0 AND j.state=?",
            (SCORED,)).fetchone()
        return row[0] if row else None

    def undelivered(self, sinks: list[str], give_up_after: Optional[int] = None) -> int:
        """(scored row, sink) pairs still to be accepted, leaving out quarantined ones (and, with
        give_up_after, those that failed that many times in a row: --once does not wait for them)."""
        after = give_up_after if give_up_after is not None else 1 << 30
        query = f"SELECT COUNT(*) FROM jobs AS j WHERE {_owed('d.quarantined=1 OR d.failures >= ?')}"
        return sum(self.db.execute(query, (SCORED, sink, sink, after)).fetchone()[0] for sink in sinks)

    def given_up_deliveries(self, after: int) -> int:
        """Scored results a sink refused `after` times in a row (or set aside): --once does not wait for them."""
        (n,) = self.db.execute(f"SELECT COUNT(*) FROM deliveries d {_OF_SCORED_ROW} WHERE j.state=? AND "
                               "(d.quarantined=1 OR d.failures >= ?)", (SCORED, after)).fetchone()
        return n

    def mark_recorded(self, key: tuple, sink: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO recordings VALUES (?, ?, ?, ?, ?)", (*key, sink, time.time()))
            self.db.execute("DELETE FROM deliveries WHERE run=? AND iteration=? AND benchmark=? AND sink=?",
                            (*key, sink))

    def delivery_failures(self, key: tuple, sink: str) -> int:
        row = self.db.execute("SELECT failures FROM deliveries WHERE run=? AND iteration=? AND benchmark=? AND sink=?",
                              (*key, sink)).fetchone()
        return row[0] if row else 0

    def delivery_failed(self, key: tuple, sink: str, failures: int, next_try_at: Optional[float], error: str) -> None:
        """Count a failed delivery; next_try_at None = quarantined (set aside until retried by hand)."""
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO deliveries (run, iteration, benchmark, sink, failures, next_try_at, quarantined,"
                " last_error, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, sink, failures, next_try_at, int(next_try_at is None), error, time.time()))

    def quarantined(self) -> list[dict]:
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='deliveries'").fetchone():
            return []
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM deliveries WHERE quarantined=1 ORDER BY run, iteration, benchmark, sink")]

    def retry_deliveries(self, run: Optional[str] = None) -> int:
        """Offer quarantined (and backing-off) results to their sinks again (status --retry-recording)."""
        with self._tx():
            if run is None:
                cur = self.db.execute("DELETE FROM deliveries")
            else:
                cur = self.db.execute("DELETE FROM deliveries WHERE run=?", (run,))
        return cur.rowcount

    # ---- regression alerts (alerts.py): fired once per (rule, checkpoint); delivered per channel -------------
    def _has_table(self, name: str) -> bool:
        return bool(self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone())

    def add_alert(self, rule: str, key: tuple, message: str, channels: list[str]) -> Optional[int]:
        """Store a fired alert with one pending delivery per channel; None when (rule, key) fired before."""
        with self._tx():
            cur = self.db.execute("INSERT OR IGNORE INTO alerts (rule, run, iteration, benchmark, message, created_at)"
                                  " VALUES (?, ?, ?, ?, ?, ?)", (rule, *key, message, time.time()))
            if not cur.rowcount:
                return None
            alert = cur.lastrowid
            self.db.executemany("INSERT INTO alert_deliveries (alert, channel) VALUES (?, ?)",
                                [(alert, c) for c in channels])
        return alert

    def close_alerts(self, rule: str, run: str, benchmark: str, iteration: int, why: str) -> list[int]:
        """Close the open alerts of `rule` for (run, benchmark) at `iteration` or before; returns their ids."""
        with self._tx():
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM alerts WHERE rule=? AND run=? AND benchmark=? AND iteration<=? AND closed_at IS NULL",
                (rule, run, benchmark, iteration))]
            self.db.executemany("UPDATE alerts SET closed_at=?, closed_by=? WHERE id=?",
                                [(time.time(), why, i) for i in ids])
        return ids

    def ack_alerts(self, ids: Optional[list[int]] = None, run: Optional[str] = None) -> int:
        """Close open alerts by hand (`status --ack`): these ids, or all (of one run)."""
        sql, args = "UPDATE alerts SET closed_at=?, closed_by=? WHERE closed_at IS NULL", [time.time(), "acknowledged"]
        if ids is not None:
            sql += f" AND id IN ({', '.join('?' * len(ids))})"
            args += ids
        if run is not None:
            sql += " AND run=?"
            args.append(run)
        with self._tx():
            return self.db.execute(sql, args).rowcount

    def results_before(self, run: str, benchmark: str, iteration: int, limit: int) -> list[Job]:
        """The newest `limit` rows of (run, benchmark) below `iteration` that have a result (scored, recorded),
        oldest first (what a `stuck:` alert rule looks back at)."""
        if limit <= 0:
            return []
        rows = self.db.execute(f"{self._select} WHERE run=? AND benchmark=? AND iteration<? AND state IN (?, ?)"
                               " ORDER BY iteration DESC LIMIT ?", (run, benchmark, iteration, SCORED, RECORDED, limit))
        return [Job(**dict(r)) for r in rows][::-1]

    def alerts(self, open_only: bool = False, run: Optional[str] = None) -> list[dict]:
        """Alert rows (oldest first), each with `deliveries`: {channel: {delivered_at, failures, next_try_at,
        last_error}}."""
        if not self._has_table("alerts"):
            return []  # a read-only look at a ledger from before alerts
        where = [c for c, on in (("closed_at IS NULL", open_only), ("run=?", run is not None)) if on]
        rows = [dict(r) for r in self.db.execute(
            "SELECT * FROM alerts" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id",
            [run] if run is not None else [])]
        by_id = {r["id"]: r for r in rows}
        for r in rows:
            r["deliveries"] = {}
        if rows:
            for d in self.db.execute(f"SELECT * FROM alert_deliveries WHERE alert IN ({', '.join('?' * len(rows))})",
                                     list(by_id)):
                d = dict(d)
                by_id[d.pop("alert")]["deliveries"][d.pop("channel")] = d
        return rows

    def alert_deliveries_due(self, channels: list[str], now: float, limit: int = 100) -> list[tuple[dict, str]]:
        """(alert, channel) pairs not yet delivered there and not backing off; oldest first."""
        if not channels:
            return []
        rows = self.db.execute(
            "SELECT a.*, d.channel FROM alert_deliveries d JOIN alerts a ON a.id = d.alert WHERE d.delivered_at IS NULL"
            f" AND d.channel IN ({', '.join('?' * len(channels))}) AND (d.next_try_at IS NULL OR d.next_try_at <= ?)"
            " ORDER BY a.id LIMIT ?", (*channels, now, limit))
        out = []
        for r in rows:
            r = dict(r)
            out.append((r, r.pop("channel")))
        return out

    def next_alert_delivery(self) -> Optional[float]:
        if not self._has_table("alert_deliveries"):
            return None
        row = self.db.execute("SELECT MIN(next_try_at) FROM alert_deliveries WHERE delivered_at IS NULL").fetchone()
        return row[0] if row else None

    def alerts_undelivered(self, channels: list[str], give_up_after: Optional[int] = None) -> int:
        """Deliveries still owed on these channels (with give_up_after: leaving out those that failed that often)."""
        if not channels:
            return 0
        (n,) = self.db.execute(
            f"SELECT COUNT(*) FROM alert_deliveries WHERE delivered_at IS NULL AND channel IN "
            f"({', '.join('?' * len(channels))}) AND failures < ?",
            (*channels, give_up_after if give_up_after is not None else 1 << 30)).fetchone()
        return n

    def alert_delivered(self, alert: int, channel: str) -> None:
        with self._tx():
            self.db.execute("UPDATE alert_deliveries SET delivered_at=?, next_try_at=NULL, last_error=NULL"
                            " WHERE alert=? AND channel=?", (time.time(), alert, channel))

    def alert_delivery_failed(self, alert: int, channel: str, next_try_at: float, error: str) -> int:
        """Count a failed delivery (the alert stays pending until delivered); returns the failures so far."""
        with self._tx():
            self.db.execute("UPDATE alert_deliveries SET failures=failures+1, next_try_at=?, last_error=?"
                            " WHERE alert=? AND channel=?", (next_try_at, error, alert, channel))
            row = self.db.execute("SELECT failures FROM alert_deliveries WHERE alert=? AND channel=?",
                                  (alert, channel)).fetchone()
        return row[0] if row else 0

    def alert_failures(self, alert: int, channel: str) -> int:
        row = self.db.execute("SELECT failures FROM alert_deliveries WHERE alert=? AND channel=?",
                              (alert, channel)).fetchone()
        return row[0] if row else 0

    def _event(self, key: tuple, src: Optional[str], dst: str, note: str) -> None:
        self.db.execute(
            "INSERT INTO events (ts, run, iteration, benchmark, from_state, to_state, note) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), *key, src, dst, note))

    def _tx(self):
        return _Transaction(self.db, self.path)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; a write the disk refuses becomes LedgerUnavailable (rolled back)."""

    def __init__(self, db: sqlite3.Connection, path: str):
        self.db = db
        self.path = path

    # the transaction's own statements on the plain connection: their errors are handled here (a failed COMMIT
    # rolled back), not turned into LedgerUnavailable by _Connection before that
    def __enter__(self):
        try:
            sqlite3.Connection.execute(self.db, "BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            if not file_error(e):
                raise
            raise LedgerUnavailable(f"cannot write the ledger {self.path}: {e}") from None
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                sqlite3.Connection.execute(self.db, "COMMIT")
                return False
            except sqlite3.DatabaseError as e:
                if not file_error(e):
                    raise
                self._rollback()
                raise LedgerUnavailable(f"cannot write the ledger {self.path}: {e}") from None
        self._rollback()
        if isinstance(exc, LedgerUnavailable):
            return False  # a statement inside said so already (rolled back above)
        if file_error(exc):
            raise LedgerUnavailable(f"cannot write the ledger {self.path}: {exc}") from None
        return False

    def _rollback(self) -> None:
        if self.db.in_transaction:
            try:
                sqlite3.Connection.execute(self.db, "ROLLBACK")
            except sqlite3.DatabaseError:
                pass  # SQLite rolled back already (e.g. SQLITE_FULL), or the file is damaged
