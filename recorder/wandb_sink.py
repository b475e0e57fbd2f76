"""W&B sink: one run per (project, run name), with a deterministic id, resumed for every result.

Each result is one short W&B session: init(resume="allow") -> define_metric -> one log() row ->
finish(). finish() returns only once the row is in the run's local transaction log
(`<dir>/wandb/{offline-,}run-<time>-<id>/run-<id>.wandb`), so "accepted" means durable; a run that
stays open across results would hold rows in wandb-core's buffer, and a crash would lose rows the
ledger already calls recorded.

Row: `iteration`, `tokens_b` (when known) and `<benchmark>/<metric>` for every metric,
`<benchmark>/fingerprint` (the settings fingerprint, a string, when known), `<benchmark>/revision` (only on
a rerun: 1, 2, ...), plus (unless summary-only) the tables `<benchmark>/summary_table` (metric, value,
stderr, n, per category, revision, fingerprint) and `<benchmark>/samples` (the first rows of
predictions.jsonl). `define_metric("<benchmark>/*", step_metric="iteration")` makes the curves use
iteration as x, so checkpoints that finish out of order still draw correct curves.

Comparison (when the result carries compare.json, `ResultRecord.comparison`): `<benchmark>/delta_vs_prev` and
`<benchmark>/p_vs_prev` (the main metric against the previous checkpoint; on the same `<benchmark>/*` x axis),
and unless summary-only the tables `<benchmark>/comparison` (every metric against prev and best, with the test's
method) and `<benchmark>/flips` (the samples the main metric fixed or broke, both predictions and the reference).
These names are in RESERVED_METRIC_NAMES, so no metric can share their series. The run's best checkpoint
(`ResultRecord.best`) goes to the run summary as `best/iteration`, `best/score`, `best/rule`; since each offline
session uploads its own summary, every session repeats the newest best found in the run's local logs.

Re-runs: W&B history cannot be edited, so a rerun's row is logged like any other, at the same
`iteration`: the chart gains a second point at that x and `<benchmark>/revision` marks it.
docs/recording.md ("Re-runs and settings fingerprints") says why this and not a separate series.

Mode: `auto` is online when WANDB_API_KEY is set and offline otherwise; offline runs are uploaded
later with `wandb sync <dir>/wandb` (wandb syncs the segments of one run id in start-time order).
Offline W&B cannot know the last step of earlier segments, so the sink passes an explicit step that
continues after the largest `_step` found in the local logs of that run id; segments never overlap.

Exactly once, across processes: every write to a run id happens under a file lock
(`<dir>/wandb/.locks/<run id>.lock`, RunLock) held while the sink re-reads the run's transaction logs
(only those whose size or mtime changed) and writes the next session, so the daemon and a
`wandb_writer` backfill never log one (iteration, benchmark, revision) twice or reuse a step; a revision
at or below one already in the logs is skipped (a re-offer after a crash, or stale).

Bounded: several ready results go into one session (`record_batch`), and once MAX_SESSIONS unsynced
offline sessions exist the next session carries their rows over and replaces them. wandb's scratch
files stay under `<dir>/wandb` and are removed. docs/recording.md says why, from wandb's sync code.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

from filelock import FileLock, Timeout

from evaluator.common.contracts import RESERVED_METRIC_NAMES
from recorder.sinks import (BEST_KEYS, COMPARED_AGAINST, RecorderSettings, ResultRecord, WandbSettings, best_of,
                            check_metric_names, comparison_flips, comparison_lines, comparison_summary, supersedes)

log = logging.getLogger("evaluator")

LOG_MAGIC = b":W&B"
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4, little-endian), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
TABLE_KEYS = ("summary_table", "samples", "comparison", "flips")
BEST_SUMMARY = "best/"  # + iteration, score, rule: the run summary keys of the run's best checkpoint
SAMPLE_TEXT_CHARS = 500
LOG_WAIT_SECONDS = 30.0  # how long a finished session may take to reach its transaction log
MAX_SESSIONS = 16  # unsynced offline sessions of one run before the next session merges them
LOCK_TIMEOUT_SECONDS = 600.0  # a writer holds a run's lock for one session (seconds; a merge longer)


def run_id(project: str, run: str) -> str:
    """Deterministic W&B run id for (project, run): a readable slug plus a hash, so ids never collide."""
    digest = hashlib.sha256(f"{project}\0{run}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-")[:40] or "run"
    return f"{slug}-{digest}"


def resolve_mode(mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """auto -> online with WANDB_API_KEY, else offline. A `wandb login` in ~/.netrc does not count:
    set `mode: online` to use it."""
    if mode == "auto":
        return "online" if environ.get("WANDB_API_KEY") else "offline"
    return mode


# ---- reading the local transaction logs ------------------------------------------------------
def log_records(path: str) -> Iterator[bytes]:
    """The records of a run-<id>.wandb file (LevelDB-style log: 32 KiB blocks of CRC-checked chunks).

    Stops at the first torn or corrupt chunk: what a crash leaves at the end of the log."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(LOG_MAGIC):
        raise ValueError(f"{path}: not a W&B transaction log (no {LOG_MAGIC!r} header)")
    pos, parts = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        pos += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (FULL, LAST):
            yield b"".join(parts)
            parts = []


@dataclass
class RunLog:
    """What one local W&B session logged: its run record and its history rows."""

    path: str
    project: str = ""
    run_id: str = ""
    name: str = ""
    rows: list = field(default_factory=list)
    staged: list = field(default_factory=list)  # artifact files wandb staged for a later upload (table copies)
    best: Optional[dict] = None  # the last best/* run summary the session set ({"iteration", "score", "rule"})


def read_run_log(path: str) -> RunLog:
    from wandb.proto import wandb_internal_pb2 as pb

    out = RunLog(path)
    for raw in log_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.project, out.run_id, out.name = rec.run.project, rec.run.run_id, rec.run.display_name
        elif kind == "history":
            out.rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "artifact":
            out.staged += [c.local_path for c in rec.artifact.manifest.contents if c.local_path]
        elif kind == "summary":
            found = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update}
            best = {k: found[BEST_SUMMARY + k] for k in BEST_KEYS if BEST_SUMMARY + k in found}
            if len(best) == len(BEST_KEYS):
                out.best = best
    return out


def run_logs(wandb_dir: str, rid: str = "*") -> list[str]:
    """Transaction logs under <wandb_dir>/wandb, oldest session first (the latest-run link skipped)."""
    found = []
    for path in glob.glob(os.path.join(wandb_dir, "wandb", "*run-*", f"run-{rid}.wandb")):
        if not os.path.islink(os.path.dirname(path)):
            found.append(path)
    return sorted(found, key=lambda p: (os.path.getmtime(p), p))


def row_revision(row: dict, benchmark: str) -> int:
    """The revision a history row holds for `benchmark`: `<benchmark>/revision`, logged only on reruns (0 without)."""
    return int(row.get(f"{benchmark}/revision") or 0)


def logged_keys(rows: list[dict]) -> set[tuple[int, str, int]]:
    """(iteration, benchmark, revision) found in history rows (a benchmark is the prefix of `<bench>/...`)."""
    keys = set()
    for row in rows:
        if "iteration" not in row:
            continue
        for bench in {key.split("/", 1)[0] for key in row if "/" in key and not key.startswith("_")}:
            keys.add((int(row["iteration"]), bench, row_revision(row, bench)))
    return keys


def metrics_of(row: dict) -> dict[str, dict[str, float]]:
    """benchmark -> {metric: value} from one history row (tables, their fields and the revision left out)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if "/" not in key or key.startswith("_") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bench, metric = key.split("/", 1)
        if metric.split("/", 1)[0] in TABLE_KEYS or metric in RESERVED_METRIC_NAMES:
            continue
        out.setdefault(bench, {})[metric] = value
    return out


# ---- the sink --------------------------------------------------------------------------------
# wandb keeps process-wide state (wandb.run, one wandb-core service, tempfile and env lookups), so one
# process runs one W&B session at a time; other processes are kept out by RunLock.
_PROCESS_LOCK = threading.RLock()


def _import_wandb(mode: str):
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # also for any wandb code path that reads the environment
    import wandb

    return wandb


def _settings(wandb, ws: WandbSettings):
    extra = {"base_url": ws.base_url} if ws.base_url else {}
    return wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True,
                          disable_git=True, save_code=False, x_save_requirements=False,
                          init_timeout=ws.init_timeout, **extra)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _staged_under(wandb_dir: str):
    """Make wandb's scratch files land under `<wandb_dir>/wandb/.tmp/<pid>` and its artifact staging under
    `<wandb_dir>/wandb/.data`, and remove the scratch files the session made.

    wandb writes each logged Table to a `tempfile.TemporaryDirectory()` that lives until the process
    exits (and forever after a kill -9), plus module-level `wandb-media`/`wandb-artifacts` folders made at
    import; its artifact copies go to WANDB_DATA_DIR (default ~/.local/share/wandb), kept until a
    `wandb sync` uploads them. Scratch folders of processes that no longer exist are removed here too."""
    root = os.path.join(wandb_dir, "wandb")
    scratch_root = os.path.join(root, ".tmp")
    scratch = os.path.join(scratch_root, str(os.getpid()))
    os.makedirs(scratch, exist_ok=True)
    for name in os.listdir(scratch_root):
        if name.isdigit() and int(name) != os.getpid() and not _pid_alive(int(name)):
            shutil.rmtree(os.path.join(scratch_root, name), ignore_errors=True)
    saved_tempdir, saved_data = tempfile.tempdir, os.environ.get("WANDB_DATA_DIR")
    tempfile.tempdir = scratch
    os.environ["WANDB_DATA_DIR"] = os.path.join(root, ".data")
    import wandb  # noqa: F401  (first import makes its module-level scratch folders, which must stay)

    before = set(os.listdir(scratch))
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_data is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = saved_data
        for name in set(os.listdir(scratch)) - before:
            path = os.path.join(scratch, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


class RunLock:
    """Exclusive right to write one W&B run id, shared by every process using the same W&B folder (the
    daemon and a `wandb_writer` backfill): `<dir>/wandb/.locks/<run id>.lock`. Held across reading the
    transaction logs back and writing the next session, so two processes never log the same
    (iteration, benchmark) twice or reuse a step."""

    def __init__(self, wandb_dir: str, rid: str, timeout: float):
        os.makedirs(os.path.join(wandb_dir, "wandb", ".locks"), exist_ok=True)
        self.path = os.path.join(wandb_dir, "wandb", ".locks", f"{rid}.lock")
        self.lock = FileLock(self.path, timeout=timeout, thread_local=False)

    def __enter__(self):
        try:
            self.lock.acquire()
        except Timeout:
            raise TimeoutError(f"W&B run lock {self.path} is held by another writer for more than "
                               f"{self.lock.timeout:g}s") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


@dataclass
class _SeenLog:
    """What one transaction log held when it was last read, keyed by its size and mtime."""

    stamp: tuple
    keys: set  # (iteration, benchmark, revision)
    max_step: int
    n_rows: int
    has_run: bool
    staged: list
    best: Optional[dict]


class RunLogs:
    """The transaction logs of one run id under a W&B folder, re-read only where they changed.

    `refresh()` stats every log and reads again only those whose (size, mtime) differ from the last
    read, so checking before each write stays cheap while another process may have added sessions."""

    def __init__(self, wandb_dir: str, rid: str):
        self.wandb_dir, self.rid = wandb_dir, rid
        self.seen: dict[str, _SeenLog] = {}

    def refresh(self) -> None:
        present = {}
        for path in run_logs(self.wandb_dir, self.rid):
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed by a compaction between glob and stat
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            old = self.seen.get(path)
            if old is None or old.stamp != stamp:
                log = read_run_log(path)
                steps = [int(r["_step"]) for r in log.rows if "_step" in r]
                old = _SeenLog(stamp, logged_keys(log.rows), max(steps, default=-1), len(log.rows),
                               bool(log.run_id), log.staged, log.best)
            present[path] = old
        self.seen = present

    def revisions(self) -> dict[tuple[int, str], int]:
        """(iteration, benchmark) -> the highest revision logged for it."""
        out: dict[tuple[int, str], int] = {}
        for seen in self.seen.values():
            for iteration, bench, revision in seen.keys:
                out[(iteration, bench)] = max(revision, out.get((iteration, bench), revision))
        return out

    def best(self) -> Optional[dict]:
        """The best checkpoint the newest session holding one put in the run summary (None: none did)."""
        held = [s for s in self.seen.values() if s.best is not None]
        return max(held, key=lambda s: s.max_step).best if held else None

    @property
    def next_step(self) -> int:
        return 1 + max((s.max_step for s in self.seen.values()), default=-1)


def is_synced(path: str) -> bool:
    """`wandb sync` marks a transaction log it uploaded with a `<log>.synced` file beside it."""
    return os.path.exists(path + ".synced")


MERGE_MANIFEST = "ckpt_evaluator_replaces.json"


class WandbSink:
    """Offline sessions of a run are bounded: when `max_sessions` unsynced offline sessions of the run
    exist, the next session carries their rows over (same `_step`s, tables re-made from their files)
    and, once every row is read back from it, the sessions it replaces are deleted. See docs/recording.md."""

    name = "wandb"

    def __init__(self, settings: RecorderSettings, max_sessions: int = MAX_SESSIONS,
                 lock_timeout: float = LOCK_TIMEOUT_SECONDS):
        self.settings = settings
        self.ws = settings.wandb
        self.max_sessions = max(2, max_sessions)
        self.lock_timeout = lock_timeout
        self._logs: dict[str, RunLogs] = {}

    def _run_logs(self, rid: str) -> RunLogs:
        if rid not in self._logs:
            self._logs[rid] = RunLogs(self.ws.dir, rid)
        return self._logs[rid]

    def _check_dir(self) -> None:
        os.makedirs(self.ws.dir, exist_ok=True)  # raises if the folder cannot be made: W&B would fall back to /tmp
        if not os.access(self.ws.dir, os.W_OK):
            raise PermissionError(f"W&B folder {self.ws.dir} is not writable")

    def _init(self, wandb, mode: str, rid: str, name: str, config: dict, group=None, tags=None):
        run = wandb.init(project=self.ws.project, entity=self.ws.entity, id=rid, name=name, resume="allow",
                         group=group, tags=tags, job_type="eval", dir=self.ws.dir, mode=mode, config=config,
                         settings=_settings(wandb, self.ws))
        where = os.path.realpath(run.dir)
        if not where.startswith(os.path.realpath(self.ws.dir) + os.sep):
            _finish(wandb, run, exit_code=1)
            raise RuntimeError(f"W&B wrote the run to {where}, not under {self.ws.dir}")
        return run

    def record(self, result: ResultRecord) -> None:
        """Log one result; returns once its row is read back from the run's transaction log."""
        self.record_batch([result])

    def record_batch(self, results: list[ResultRecord]) -> None:
        """Log several results (of any runs) with one session per run; returns once every row is read
        back. All or nothing as far as the caller knows: on an error none counts as accepted, and
        those that did reach the log are skipped when offered again."""
        by_run: dict[str, list[ResultRecord]] = {}
        for r in results:
            by_run.setdefault(r.run, []).append(r)
        mode = resolve_mode(self.ws.mode)
        self._check_dir()
        with _PROCESS_LOCK, _staged_under(self.ws.dir):
            wandb = _import_wandb(mode)
            for run, batch in by_run.items():
                self._record_run(wandb, mode, run, batch)

    def _record_run(self, wandb, mode: str, run: str, batch: list[ResultRecord]) -> None:
        rid = run_id(self.ws.project, run)
        with RunLock(self.ws.dir, rid, self.lock_timeout):
            finish_merges(self.ws.dir, rid)
            logs = self._run_logs(rid)
            logs.refresh()
            held, todo = logs.revisions(), []
            for r in batch:
                # this revision or a newer one already in the log: re-offered after a crash, stale, or a backfill
                if supersedes(r.revision, held.get((r.iteration, r.benchmark))):
                    check_metric_names(r)
                    held[(r.iteration, r.benchmark)] = r.revision
                    todo.append(r)
            if not todo:
                return
            merge = self._sessions_to_merge(logs) if mode == "offline" else []
            carried = {path: read_run_log(path).rows for path in merge}
            rows = [(int(row["_step"]), _relog_row(wandb, row, os.path.dirname(path)))
                    for path, old in carried.items() for row in old if "_step" in row]
            step = logs.next_step
            for i, r in enumerate(todo):
                rows.append((step + i, self._row(wandb, r)))
            config = dict(self.settings.run_config, model_name=run)
            config["versions"] = dict(config.get("versions") or {}, wandb=wandb.__version__)
            benches = sorted({k.split("/", 1)[0] for _, row in rows for k in row if "/" in k})
            # each offline session uploads its own run summary, so every session repeats the latest best
            best = next((b for b in map(best_of, reversed(todo)) if b is not None), None) or logs.best()
            self._session(wandb, mode, rid, run, config, rows, benches, best,
                          expect={(r.iteration, r.benchmark, r.revision) for r in todo} | logged_keys(
                              [row for old in carried.values() for row in old]),
                          replaces=merge)

    def _sessions_to_merge(self, logs: RunLogs) -> list[str]:
        """The unsynced offline sessions to carry into the next one, once there are `max_sessions` of them."""
        unsynced = [p for p, s in logs.seen.items()
                    if s.n_rows and not is_synced(p) and os.path.basename(os.path.dirname(p)).startswith("offline-")]
        if len(unsynced) < self.max_sessions:
            return []
        return sorted(unsynced, key=lambda p: logs.seen[p].max_step)

    def _row(self, wandb, result: ResultRecord) -> dict:
        row = {"iteration": result.iteration}
        if result.tokens_b is not None:
            row["tokens_b"] = result.tokens_b
        for name, value in result.metrics.items():
            row[f"{result.benchmark}/{name}"] = value
        if result.fingerprint:
            row[f"{result.benchmark}/fingerprint"] = result.fingerprint
        if result.revision:  # only on reruns, so the revision panel marks exactly the iterations re-run
            row[f"{result.benchmark}/revision"] = result.revision
        vs_prev = comparison_summary(result, "prev")
        for name, key in (("delta_vs_prev", "delta"), ("p_vs_prev", "p")):
            value = None if vs_prev is None else _number(vs_prev[key])
            if value is not None and math.isfinite(value):  # the main metric's; a null p is left out, not invented
                row[f"{result.benchmark}/{name}"] = value
        if not self.settings.summary_only:
            row[f"{result.benchmark}/summary_table"] = wandb.Table(*summary_table(result))
            samples = sample_rows(result, self.ws.sample_predictions)
            if samples:
                row[f"{result.benchmark}/samples"] = wandb.Table(
                    columns=["iteration", "sample_id", "input", "prediction", "status"], data=samples)
            compared = comparison_table(result)
            if compared[1]:
                row[f"{result.benchmark}/comparison"] = wandb.Table(*compared)
            flips = flips_table(result)
            if flips[1]:
                row[f"{result.benchmark}/flips"] = wandb.Table(*flips)
        return row

    def _session(self, wandb, mode, rid, name, config, rows, benches, best, expect, replaces) -> None:
        run = self._init(wandb, mode, rid, name, config, self.ws.group, self.ws.tags or None)
        session = os.path.dirname(run.dir)
        session_log = os.path.join(session, f"run-{rid}.wandb")
        try:
            if replaces:  # written before any row, so a crash mid-merge is recognised (finish_merges)
                _write_json(os.path.join(session, MERGE_MANIFEST),
                            {"replaces": [os.path.dirname(p) for p in replaces], "rows": len(rows)})
            run.define_metric("iteration")
            run.define_metric("tokens_b")
            for bench in benches:
                run.define_metric(f"{bench}/*", step_metric="iteration")
            for step, row in sorted(rows, key=lambda sr: sr[0]):
                if mode == "offline":
                    run.log(row, step=step)
                else:
                    run.log(row)  # online resume knows the run's last step
            if best is not None:
                run.summary.update({BEST_SUMMARY + k: best[k] for k in BEST_KEYS})
        except BaseException:
            _finish(wandb, run, exit_code=1)
            raise
        _finish(wandb, run)
        await_rows(session_log, expect, len(rows))
        if replaces:
            finish_merges(self.ws.dir, rid)
            if not os.path.isdir(session):
                raise RuntimeError(f"W&B run {rid}: `wandb sync` uploaded sessions while they were merged; "
                                   f"the merge was undone, the results are offered again later")

    def log_leaderboard(self, columns: list[str], data: list[list], title: str) -> str:
        """A `leaderboard` run in the project: the table and a bar chart of the score. Returns the run id."""
        mode = resolve_mode(self.ws.mode)
        self._check_dir()
        rid = run_id(self.ws.project, "leaderboard")
        with _PROCESS_LOCK, _staged_under(self.ws.dir), RunLock(self.ws.dir, rid, self.lock_timeout):
            wandb = _import_wandb(mode)
            logs = self._run_logs(rid)
            logs.refresh()
            run = self._init(wandb, mode, rid, "leaderboard", {"project": self.ws.project}, "leaderboard",
                             ["leaderboard"])
            try:
                table = wandb.Table(columns=columns, data=data)
                row = {"leaderboard/table": table,
                       "leaderboard/score": wandb.plot.bar(table, "label", "score", title=title)}
                if mode == "offline":
                    run.log(row, step=logs.next_step)
                else:
                    run.log(row)
            except BaseException:
                _finish(wandb, run, exit_code=1)
                raise
            _finish(wandb, run)
            await_rows(os.path.join(os.path.dirname(run.dir), f"run-{rid}.wandb"), set(), 1)
        return rid

    def alert(self, run: str, title: str, text: str) -> None:
        """`wandb.alert` on the W&B run of `run` (a session with no rows). Online only: W&B sends alerts from its
        server, an offline run would keep it until `wandb sync`, too late to be an alert."""
        mode = resolve_mode(self.ws.mode)
        if mode != "online":
            raise RuntimeError(f"W&B runs {mode}: wandb.alert needs an online run")
        self._check_dir()
        rid = run_id(self.ws.project, run)
        with _PROCESS_LOCK, _staged_under(self.ws.dir), RunLock(self.ws.dir, rid, self.lock_timeout):
            wandb = _import_wandb(mode)
            session = self._init(wandb, mode, rid, run, dict(self.settings.run_config, model_name=run), self.ws.group,
                                 self.ws.tags or None)
            try:
                session.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
            except BaseException:
                _finish(wandb, session, exit_code=1)
                raise
            _finish(wandb, session)

    def close(self) -> None:
        """Stop wandb's background service and remove this process's scratch folder (daemon stop)."""
        with _PROCESS_LOCK:
            if "wandb" in sys.modules:
                sys.modules["wandb"].teardown()
            shutil.rmtree(os.path.join(self.ws.dir, "wandb", ".tmp", str(os.getpid())), ignore_errors=True)


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _relog_row(wandb, row: dict, session: str) -> dict:
    """A history row read from a session, ready to be logged again: tables re-made from their files
    under `<session>/files`, wandb's own `_` keys left for wandb to set."""
    out, tables = {}, {}
    for key, value in row.items():
        if key.startswith("_"):
            continue
        parts = key.rsplit("/", 1)
        if len(parts) == 2 and parts[1] == "_type" and value == "table-file":
            tables[parts[0]] = row.get(f"{parts[0]}/path")
    for key, value in row.items():
        if key.startswith("_") or any(key.startswith(t + "/") for t in tables):
            continue
        out[key] = value
    for key, rel in tables.items():
        with open(os.path.join(session, "files", rel), encoding="utf-8") as f:
            data = json.load(f)
        out[key] = wandb.Table(columns=data["columns"], data=data["data"])
    return out


def finish_merges(wandb_dir: str, rid: str) -> None:
    """Complete or undo merges a crash interrupted, and drop sessions that hold no run record.

    A merged session lists the sessions it replaces in MERGE_MANIFEST. Holding all its rows, it is
    complete: the sessions it replaces are deleted (with the artifact copies they staged). Holding
    fewer, or if `wandb sync` uploaded one of those sessions meanwhile, it is deleted itself (its rows are all still in the sessions it was to replace, and its new
    rows were never reported accepted). A session whose log has no run record (killed before its first
    block reached the disk) would stop `wandb sync` altogether and holds nothing: it is deleted. Call
    with the run's RunLock held."""
    for path in run_logs(wandb_dir, rid):
        session = os.path.dirname(path)
        manifest = os.path.join(session, MERGE_MANIFEST)
        try:
            log = read_run_log(path)
        except (FileNotFoundError, ValueError):
            log = RunLog(path)
        if os.path.exists(manifest):
            with open(manifest, encoding="utf-8") as f:
                merge = json.load(f)
            replaced_synced = any(is_synced(os.path.join(old, f"run-{rid}.wandb")) for old in merge["replaces"])
            if len(log.rows) >= merge["rows"] and not replaced_synced:
                for old in merge["replaces"]:
                    _remove_session(old, rid)
                os.remove(manifest)
            else:
                _remove_session(session, rid)
        elif not log.run_id:
            _remove_session(session, rid)


def _remove_session(session: str, rid: str) -> None:
    """Delete a session folder and the artifact copies its log staged for upload (renamed first, so
    `wandb sync` never sees half of it)."""
    path = os.path.join(session, f"run-{rid}.wandb")
    if not os.path.isdir(session):
        return
    staged = []
    if os.path.exists(path):
        try:
            staged = read_run_log(path).staged
        except ValueError:
            pass
    trash = os.path.join(os.path.dirname(session), ".trash")
    os.makedirs(trash, exist_ok=True)
    gone = os.path.join(trash, os.path.basename(session))
    shutil.rmtree(gone, ignore_errors=True)
    os.rename(session, gone)
    for f in staged:
        if os.path.isfile(f):
            os.remove(f)
    shutil.rmtree(gone, ignore_errors=True)


def await_rows(path: str, keys: set, n_rows: int, timeout: float = LOG_WAIT_SECONDS) -> None:
    """Return once the session's transaction log holds `n_rows` history rows covering `keys` ((iteration,
    benchmark, revision)); raise if it does not within `timeout`.

    finish() can return a few milliseconds before wandb-core has written the last records, so
    "accepted" is decided by reading the rows back, not by finish() returning."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        if os.path.exists(path):
            rows = read_run_log(path).rows
            if len(rows) >= n_rows and keys <= logged_keys(rows):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"W&B did not write {n_rows} rows ({sorted(keys)[:3]}...) to {path} within {timeout:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def summary_table(result: ResultRecord) -> tuple[list[str], list[list]]:
    """Columns and rows: one row per metric overall, then one per (category, metric)."""
    columns = ["iteration", "tokens_b", "category", "metric", "value", "stderr", "n", "versions", "revision",
               "fingerprint"]
    versions = json.dumps(result.versions, sort_keys=True) if result.versions else ""
    rows = [[result.iteration, result.tokens_b, "all", name, float(value), _number(result.stderr.get(name)),
             result.n, versions, result.revision, result.fingerprint] for name, value in sorted(result.metrics.items())]
    for category, values in sorted((result.per_category or {}).items()):
        if isinstance(values, dict):
            for name, value in sorted(values.items()):
                if _number(value) is not None:
                    rows.append([result.iteration, result.tokens_b, str(category), name, float(value), None, None,
                                 versions, result.revision, result.fingerprint])
    return columns, rows


def comparison_table(result: ResultRecord) -> tuple[list[str], list[list]]:
    """Columns and rows: one row per (against, metric) of the result's compare.json, the main metric first."""
    columns = ["iteration", "against", "against_iteration", "metric", "main", "old", "new", "delta", "ci_low",
               "ci_high", "p", "method", "significant", "alpha", "n", "fixed", "broken"]
    rows = []
    for against in COMPARED_AGAINST:
        for line in comparison_lines(result, against):
            ci = line["ci"] if isinstance(line["ci"], list) and len(line["ci"]) == 2 else [None, None]
            rows.append([result.iteration, against, line["iteration"], line["metric"], line["main"],
                         _number(line["old"]), _number(line["new"]), _number(line["delta"]), _number(ci[0]),
                         _number(ci[1]), _number(line["p"]), str(line["method"]), bool(line["significant"]),
                         _number(line["alpha"]), line["n"], line["fixed"], line["broken"]])
    return columns, rows


def flips_table(result: ResultRecord) -> tuple[list[str], list[list]]:
    """Columns and rows: one row per flip (a sample the main metric fixed or broke) against prev and best."""
    columns = ["iteration", "against", "against_iteration", "change", "metric", "sample_id", "prompt",
               "old_prediction", "new_prediction", "reference", "old_score", "new_score"]
    rows = [[result.iteration, f["against"], f["against_iteration"], f["change"], f["metric"],
             str(f.get("sample_id", "")), _short(_text(f.get("prompt"))), _short(_text(f.get("old_prediction"))),
             _short(_text(f.get("new_prediction"))), _short(_text(f.get("reference"))),
             _number(f.get("old_score")), _number(f.get("new_score"))] for f in comparison_flips(result)]
    return columns, rows


def _text(value) -> str:
    """A table cell from a flip's text field: a list (several references) joined with ` | `."""
    if isinstance(value, list):
        return " | ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _finish(wandb, run, exit_code: int = 0) -> None:
    """End a session. A finish that fails (a full disk while W&B closes its own debug log) leaves the run open in
    W&B's service, which then refuses the run id to every later session of this process ("run ID ... is in use"):
    the service is torn down, so the next session starts a fresh one."""
    try:
        run.finish(exit_code=exit_code) if exit_code else run.finish()
    except BaseException:
        try:
            wandb.teardown(exit_code=1)
        except Exception as e:  # the finish's own error is the one to report; this one only said in the log
            log.warning("recorder wandb: tearing W&B down after a failed finish failed too: %s: %s",
                        type(e).__name__, e)
        raise


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sample_rows(result: ResultRecord, limit: int) -> list[list]:
    """The first `limit` rows of predictions.jsonl beside metrics.json (RunResult rows), shortened."""
    if limit <= 0 or not result.metrics_path:
        return []
    path = os.path.join(os.path.dirname(result.metrics_path), "predictions.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a display table: a bad line is left out, the metrics are what count
            if not isinstance(row, dict):
                continue
            response = row.get("response") if isinstance(row.get("response"), dict) else {}
            prediction = response.get("text", row.get("prediction", ""))
            rows.append([result.iteration, str(row.get("sample_id", row.get("id", ""))),
                         _short(_last_user_text(row.get("request_messages") or row.get("messages"))),
                         _short(prediction), str(row.get("status", ""))])
    return rows


def _last_user_text(messages) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
            return str(content or "")
    return ""


def _short(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= SAMPLE_TEXT_CHARS else text[:SAMPLE_TEXT_CHARS] + "..."
