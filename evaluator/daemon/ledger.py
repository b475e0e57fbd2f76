"""The daemon's memory: one row per (run, iteration, benchmark), in SQLite (WAL) in cache_dir.

States (docs/architecture.md):
    pending -> inferring -> inferred -> scoring -> scored -> recorded
    failed   (attempts, next_retry_at; next_retry_at NULL = failed for good; resume_state says where a retry restarts)
    vanished (checkpoint deleted before its inference finished)
    skipped  (outside begin/end/interval)
Every transition is one transaction that names the states it may come from, so two code paths can
never both move the same row. The `events` table keeps every transition (status, tests, audits).
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Iterable, Optional

PENDING, INFERRING, INFERRED, SCORING, SCORED, RECORDED = "pending", "inferring", "inferred", "scoring", "scored", "recorded"
FAILED, VANISHED, SKIPPED = "failed", "vanished", "skipped"
# snapshot states (table `snapshots`, one row per pinned (run, iteration)); see snapshots.py
PINNING, PINNED, UNPINNED, RELEASED = "pinning", "pinned", "unpinned", "released"  # + VANISHED
STATES = (PENDING, INFERRING, INFERRED, SCORING, SCORED, RECORDED, FAILED, VANISHED, SKIPPED)
RUNNING = (INFERRING, SCORING)
TERMINAL = (RECORDED, VANISHED)

# to-state -> the states it may be entered from
ALLOWED: dict[str, tuple[str, ...]] = {
    PENDING: (SKIPPED, INFERRING, FAILED, INFERRED),
    INFERRING: (PENDING,),
    INFERRED: (INFERRING, SCORING, FAILED, SCORED),
    SCORING: (INFERRED,),
    SCORED: (SCORING,),
    RECORDED: (SCORED,),
    FAILED: (INFERRING, SCORING),
    VANISHED: (PENDING, INFERRING, FAILED, SKIPPED),
    SKIPPED: (PENDING,),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    run TEXT NOT NULL, iteration INTEGER NOT NULL, benchmark TEXT NOT NULL,
    path TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, resume_state TEXT, next_retry_at REAL, last_error TEXT,
    pid INTEGER, pid_start TEXT, started_at REAL, infer_job TEXT, eval_job TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (run, iteration, benchmark));
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
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
"""


class LedgerConflict(RuntimeError):
    """A transition found the row in a state it may not leave that way (a bug, not user error)."""


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
    infer_job: Optional[str] = None  # Slurm job ids (executor.type slurm)
    eval_job: Optional[str] = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def key(self) -> tuple:
        return (self.run, self.iteration, self.benchmark)


FIELDS = tuple(Job.__dataclass_fields__)
MUTABLE = ("path", "attempts", "resume_state", "next_retry_at", "last_error", "pid", "pid_start", "started_at",
           "infer_job", "eval_job")


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
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            for name in ("infer_job", "eval_job"):  # ledgers made before Slurm support
                if name not in columns:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} TEXT")
        self.db.row_factory = sqlite3.Row
        # a read-only look at a ledger written by an older version lacks newer columns: read what exists
        have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        self.fields = [f for f in FIELDS if f in have]

    def close(self) -> None:
        self.db.close()

    # ---- reads ---------------------------------------------------------------------------
    def jobs(self, states: Iterable[str] = (), run: Optional[str] = None, iteration: Optional[int] = None) -> list[Job]:
        sql, args = f"SELECT {', '.join(self.fields)} FROM jobs", []
        where = []
        states = tuple(states)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if run is not None:
            where.append("run = ?")
            args.append(run)
        if iteration is not None:
            where.append("iteration = ?")
            args.append(iteration)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY run, iteration, benchmark"
        return [Job(**dict(r)) for r in self.db.execute(sql, args)]

    def get(self, key: tuple) -> Optional[Job]:
        row = self.db.execute(
            f"SELECT {', '.join(self.fields)} FROM jobs WHERE run=? AND iteration=? AND benchmark=?", key).fetchone()
        return Job(**dict(row)) if row else None

    def events(self, key: Optional[tuple] = None) -> list[dict]:
        if key is None:
            rows = self.db.execute("SELECT * FROM events ORDER BY id")
        else:
            rows = self.db.execute(
                "SELECT * FROM events WHERE run=? AND iteration=? AND benchmark=? ORDER BY id", key)
        return [dict(r) for r in rows]

    def recorded_sinks(self, key: tuple) -> set[str]:
        rows = self.db.execute("SELECT sink FROM recordings WHERE run=? AND iteration=? AND benchmark=?", key)
        return {r[0] for r in rows}

    # ---- writes (each one transaction) -----------------------------------------------------
    def add(self, run: str, iteration: int, benchmark: str, path: str, state: str = PENDING) -> bool:
        """Insert a row if it is new; returns whether it was inserted."""
        now = time.time()
        with self._tx():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO jobs (run, iteration, benchmark, path, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", (run, iteration, benchmark, path, state, now, now))
            if cur.rowcount:
                self._event((run, iteration, benchmark), None, state, "discovered")
            return bool(cur.rowcount)

    def transition(self, key: tuple, to_state: str, note: str = "", **fields) -> Job:
        """Move a row to `to_state` from any state ALLOWED lists; set `fields` in the same transaction."""
        bad = set(fields) - set(MUTABLE)
        if bad:
            raise ValueError(f"not mutable: {sorted(bad)}")
        sources = ALLOWED[to_state]
        with self._tx():
            row = self.db.execute(
                "SELECT state FROM jobs WHERE run=? AND iteration=? AND benchmark=?", key).fetchone()
            if row is None or row[0] not in sources:
                raise LedgerConflict(f"{key}: cannot go {row[0] if row else 'missing'} -> {to_state}")
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

    def set_snapshot(self, run: str, iteration: int, state: str, **fields) -> None:
        sets = "".join(f", {k} = ?" for k in fields)
        with self._tx():
            self.db.execute(f"UPDATE snapshots SET state = ?, updated_at = ?{sets} WHERE run=? AND iteration=?",
                            (state, time.time(), *fields.values(), run, iteration))

    def mark_recorded(self, key: tuple, sink: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO recordings VALUES (?, ?, ?, ?, ?)", (*key, sink, time.time()))

    def _event(self, key: tuple, src: Optional[str], dst: str, note: str) -> None:
        self.db.execute(
            "INSERT INTO events (ts, run, iteration, benchmark, from_state, to_state, note) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), *key, src, dst, note))

    def _tx(self):
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
