"""Result sinks, looked up by name from `recorder.sinks` in the config.

The daemon hands each scored result to every configured sink and marks it recorded for a sink
only after that sink accepted it (ledger table `recordings`). A sink must therefore be
idempotent per `ResultRecord.record_key` (run, iteration, benchmark, revision): after a crash between
"sink accepted" and "ledger updated" the same result is offered again and must not be written twice.
A `rerun` makes a new revision of the same (run, iteration, benchmark); a sink stores a record only when
its revision is higher than every revision it already holds for that key (`supersedes`), so a re-offer,
or an older revision offered late, adds nothing. Each sink decides that from its own durable storage
(history.jsonl, the W&B transaction logs, the MLflow store), never from memory alone, so a restarted
daemon knows too. What each sink shows after a rerun: docs/recording.md, "Re-runs and settings fingerprints".

Sinks: `local` (always on: history.jsonl, curves.png, summary.md), `wandb`, `mlflow`. The W&B and
MLflow libraries are imported only when such a sink records its first result, so a daemon that
does not use them starts without them.

This package is a leaf: it knows ResultRecord and its own settings dataclasses, never the daemon.
evaluator/daemon/sink_setup.py turns a daemon config into RecorderSettings; recorder/writer.py does the same
for a wandb_writer config.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Optional, Protocol

from evaluator.common.atomic import write_text_atomic
from evaluator.common.contracts import RESERVED_METRIC_NAMES
from evaluator.common.secrets import redact_obj

FLUSH_RETRY_SECONDS = 60.0


class RecordKey(NamedTuple):
    """What a sink stores at most once: one revision of one (run, iteration, benchmark) result."""

    run: str
    iteration: int
    benchmark: str
    revision: int


@dataclass
class ResultRecord:
    run: str
    iteration: int
    benchmark: str
    metrics: dict
    tokens_b: Optional[float] = None
    n: Optional[int] = None
    stderr: dict = field(default_factory=dict)
    per_category: dict = field(default_factory=dict)
    checkpoint: str = ""
    metrics_path: str = ""
    versions: dict = field(default_factory=dict)
    revision: int = 0  # 0: the first evaluation of (run, iteration, benchmark); each `rerun` adds 1
    fingerprint: str = ""  # the benchmark's settings fingerprint (short hex); "" when unknown
    # the compare.json document (evaluator.common.contracts.COMPARE): this result against the run's previous and
    # best checkpoints; None when no comparison was made (first checkpoint, no per-sample scores)
    comparison: Optional[dict] = None
    # the run's best checkpoint once this result is counted, by the run's `best:` rule:
    # {"iteration": int, "score": float, "rule": str}; None when the run has no rule or no scored checkpoint yet
    best: Optional[dict] = None

    @property
    def key(self) -> tuple:
        """(run, iteration, benchmark): the result, whatever its revision."""
        return (self.run, self.iteration, self.benchmark)

    @property
    def record_key(self) -> RecordKey:
        """The sinks' idempotence key: the result and its revision."""
        return RecordKey(self.run, self.iteration, self.benchmark, self.revision)


def supersedes(revision: int, held: Optional[int]) -> bool:
    """Whether a sink holding revision `held` of a result (None: none) stores `revision` of it: only a
    higher one. The same revision again is a re-offer after a crash; a lower one is stale."""
    return held is None or revision > held


def check_metric_names(result: ResultRecord) -> None:
    """Raise ValueError if a metric of `result` is named like a series the sinks log beside it."""
    clash = sorted(set(result.metrics) & set(RESERVED_METRIC_NAMES))
    if clash:
        raise ValueError(f"{result.run}@{result.iteration}/{result.benchmark}: metric name(s) {clash} are reserved "
                         f"for the sinks' `<benchmark>/revision` and `<benchmark>/fingerprint` series; rename the "
                         f"metric in the benchmark")


# ---- what the sinks are told (built by evaluator/daemon/sink_setup.py or by recorder/writer.py) ---
@dataclass
class WandbSettings:
    project: str
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline
    dir: str = ""  # W&B writes <dir>/wandb/{offline-,}run-<time>-<id>/
    base_url: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)
    sample_predictions: int = 5  # rows of predictions.jsonl shown per checkpoint (0: none)
    init_timeout: float = 60.0  # seconds; online only: a W&B server that is down costs this per retry


@dataclass
class MlflowSettings:
    tracking_uri: str
    experiment: str
    artifact_location: Optional[str] = None  # only used when the sink creates the experiment
    request_timeout: float = 30.0  # seconds one call to a tracking server may take, its retries included


@dataclass
class RecorderSettings:
    cache_dir: str
    project: str
    wandb: WandbSettings
    mlflow: MlflowSettings
    run_config: dict = field(default_factory=dict)  # W&B config / MLflow params; never holds secrets
    plots: bool = True  # local sink: curves.png and summary.md
    summary_only: bool = False  # only the metrics: no W&B tables (wandb_writer --summary-only)

    def __post_init__(self):
        # masked here, where every builder's run_config passes, so no sink can publish a secret to a server
        self.run_config = redact_obj(self.run_config)


class Sink(Protocol):
    name: str

    def record(self, result: ResultRecord) -> None:
        """Store the result or raise; must be idempotent per result.key."""

    # Optional: `flush()` -- called once per daemon pass (and at the end of wandb_writer) to refresh
    # views derived from what was recorded (plots); a failure there is logged, never loses a result.


# ---- local -----------------------------------------------------------------------------------
def row_revision(row: dict) -> int:
    """The revision of a history.jsonl row; rows written before revisions existed are revision 0."""
    return int(row.get("revision") or 0)


class LocalHistorySink:
    """<cache_dir>/results/<run>/history.jsonl (one line per result), curves.png and summary.md.

    One line per (run, iteration, benchmark): a higher revision replaces the line of the lower one (the
    file is rewritten atomically), so the views show one point per iteration, the latest evaluation."""

    name = "local"

    def __init__(self, cache_dir: str, plots: bool = True):
        self.cache_dir = cache_dir
        self.plots = plots
        self._rows: dict[str, list[dict]] = {}  # run -> rows of its history.jsonl (re-read when the file changed)
        self._stamps: dict[str, tuple] = {}  # run -> (size, mtime) of history.jsonl when last read or written
        self._index: dict[str, dict[tuple, int]] = {}  # run -> result key -> its position in the rows
        self._dirty: set[str] = set()  # runs whose plots are older than their history
        self._retry_flush_at = 0.0

    def _path(self, run: str, name: str = "history.jsonl") -> str:
        return os.path.join(self.cache_dir, "results", run, name)

    def rows(self, run: str) -> list[dict]:
        path = self._path(run)
        stamp = _stamp(path)  # taken before reading: a line appended meanwhile changes it, so it is read next time
        if run not in self._rows or self._stamps.get(run) != stamp:  # first use, or another writer's change
            rows = []
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.endswith("\n"):  # an unterminated last line is a torn write
                            rows.append(json.loads(line))
            self._rows[run] = rows
            self._stamps[run] = stamp
            self._index[run] = {(r["run"], r["iteration"], r["benchmark"]): i for i, r in enumerate(rows)}
            if rows and self.plots and _older(self._path(run, "curves.png"), path):
                self._dirty.add(run)  # e.g. the last daemon died between an append and the redraw
        return self._rows[run]

    def record(self, result: ResultRecord) -> None:
        with self._locked(result.run):
            self._record(result)

    def _locked(self, run: str):
        """An exclusive lock on the run's history: the daemon's sink and `invalidate` (another process) both
        rewrite it, and a line one appends must not be lost to the other's rename."""
        path = os.path.join(self.cache_dir, ".locks", f"history-{hashlib.sha1(run.encode()).hexdigest()[:16]}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _FileLock(path)

    def _record(self, result: ResultRecord) -> None:
        rows = self.rows(result.run)
        at = self._index[result.run].get(result.key)
        if not supersedes(result.revision, None if at is None else row_revision(rows[at])):
            return  # offered again after a crash (or an older revision): the file already has it or a newer one
        path = self._path(result.run)
        row = asdict(result)
        if at is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _drop_torn_tail(path)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._index[result.run][result.key] = len(rows)
            rows.append(row)
        else:  # a rerun: its line replaces the earlier revision's; a crash leaves the old file or the new, whole
            rows[at] = row
            write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        self._stamps[result.run] = _stamp(path)
        if self.plots:
            self._dirty.add(result.run)

    def withdraw(self, run: str, iteration: int, benchmark: str) -> bool:
        """Drop one result's line (an invalidated result: `tools/evaluator.py invalidate`); returns whether it was
        there. The file is rewritten atomically; a daemon's sink sees the change by the file's size and mtime."""
        with self._locked(run):
            return self._withdraw(run, iteration, benchmark)

    def _withdraw(self, run: str, iteration: int, benchmark: str) -> bool:
        rows = self.rows(run)
        at = self._index[run].get((run, iteration, benchmark))
        if at is None:
            return False
        del rows[at]
        path = self._path(run)
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        self._index[run] = {(r["run"], r["iteration"], r["benchmark"]): i for i, r in enumerate(rows)}
        self._stamps[run] = _stamp(path)
        if self.plots:
            self._dirty.add(run)
        return True

    def flush(self) -> None:
        """Redraw curves.png and rewrite summary.md of every run that got a result since the last flush."""
        if not self._dirty or time.monotonic() < self._retry_flush_at:
            return
        from recorder import plots  # matplotlib is imported only when there is something to draw

        for run in sorted(self._dirty):
            rows = self._rows[run]
            try:
                plots.write_summary_md(run, rows, self._path(run, "summary.md"))
                plots.write_curves(run, rows, self._path(run, "curves.png"))
            except Exception:
                self._retry_flush_at = time.monotonic() + FLUSH_RETRY_SECONDS  # e.g. disk full: not every pass
                raise
            self._dirty.discard(run)


class _FileLock:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def _stamp(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _older(path: str, than: str) -> bool:
    return not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(than)


def _drop_torn_tail(path: str) -> None:
    """Cut a line left half-written by a crash, so the next row starts on a line of its own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()  # rare: only after a crash mid-write
        f.truncate(data.rfind(b"\n") + 1)


# ---- registry --------------------------------------------------------------------------------
def _wandb(settings: RecorderSettings):
    from recorder.wandb_sink import WandbSink

    return WandbSink(settings)


def _mlflow(settings: RecorderSettings):
    from recorder.mlflow_sink import MlflowSink

    return MlflowSink(settings)


SINKS: dict[str, Callable[[RecorderSettings], Sink]] = {
    "local": lambda s: LocalHistorySink(s.cache_dir, plots=s.plots),
    "wandb": _wandb,
    "mlflow": _mlflow,
}


def mlflow_settings(cache_dir: str, tracking_uri: Optional[str], experiment: str,
                    base_dir: str = "") -> MlflowSettings:
    """Default store: SQLite in cache_dir (MLflow 3 keeps the plain-file store read-only), artifacts beside it."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if "://" not in uri:  # a bare path: a SQLite file, relative to the config's folder
            uri = "sqlite:///" + os.path.abspath(os.path.join(base_dir or os.getcwd(), uri))
        return MlflowSettings(tracking_uri=uri, experiment=experiment)
    return MlflowSettings(tracking_uri="sqlite:///" + os.path.join(os.path.abspath(cache_dir), "mlflow.db"),
                          experiment=experiment,
                          artifact_location="file://" + os.path.join(os.path.abspath(cache_dir), "mlflow-artifacts"))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ckpt-evaluator")
    except PackageNotFoundError:  # a checkout that was never installed (make setup installs it)
        ours = "not installed"
    return {"python": platform.python_version(), "ckpt_evaluator": ours}
