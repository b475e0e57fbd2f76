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
import logging
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Optional, Protocol

from evaluator.common.atomic import write_text_atomic
from evaluator.common.checks import iteration_problem
from evaluator.common.contracts import COMPARE, COMPARE_SCHEMA_VERSION, RESERVED_METRIC_NAMES, validate_metrics
from evaluator.common.errors import EvaluatorError
from evaluator.common.secrets import redact_obj

log = logging.getLogger("evaluator")

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
        names = ", ".join(f"`<benchmark>/{n}`" for n in RESERVED_METRIC_NAMES)
        raise ValueError(f"{result.run}@{result.iteration}/{result.benchmark}: metric name(s) {clash} are reserved "
                         f"for the sinks' own series ({names}); rename the metric in the benchmark")


# ---- the comparison, as the sinks show it -------------------------------------------------------
COMPARED_AGAINST = ("prev", "best")  # the keys of compare.json's `against`, in the order the views show them
# a <comparison>'s per-metric line: every key the sinks read (compare.json schema, evaluator/common/contracts.py)
_LINE_KEYS = ("old", "new", "delta", "n", "method", "p", "significant", "fixed", "broken")
BEST_KEYS = ("iteration", "score", "rule")  # ResultRecord.best


def _against(result: ResultRecord, against: str) -> Optional[dict]:
    """compare.json's `against.<against>` comparison of the result (checked), or None when none was made."""
    doc = result.comparison
    if doc is None:
        return None
    where = f"{result.run}@{result.iteration}/{result.benchmark}: {COMPARE}"
    if not isinstance(doc, dict) or doc.get("schema_version") != COMPARE_SCHEMA_VERSION:
        got = doc.get("schema_version") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{where}: schema_version: expected {COMPARE_SCHEMA_VERSION}, got {got!r}")
    if not isinstance(doc.get("against"), dict) or against not in doc["against"]:
        raise ValueError(f"{where}: against.{against}: missing (expected a comparison or null)")
    other = doc["against"][against]
    if other is None:
        return None
    for key in ("iteration", "main_metric", "metrics", "alpha"):
        if key not in other:
            raise ValueError(f"{where}: against.{against}.{key}: missing")
    if not isinstance(other["metrics"], dict) or not isinstance(other["metrics"].get(other["main_metric"]), dict):
        raise ValueError(f"{where}: against.{against}.metrics.{other['main_metric']}: missing (the main_metric's line)")
    for metric, line in other["metrics"].items():
        missing = [k for k in _LINE_KEYS if not isinstance(line, dict) or k not in line]
        if missing:
            raise ValueError(f"{where}: against.{against}.metrics.{metric}: missing {', '.join(missing)}")
    return other


def comparison_lines(result: ResultRecord, against: str) -> list[dict]:
    """Every metric's line of the result's comparison with its `against` ("prev" | "best") checkpoint, the main
    metric first: {"iteration" (the other checkpoint's), "metric", "main", "old", "new", "delta", "ci", "p",
    "method", "significant", "n", "fixed", "broken", "alpha"}; [] when no such comparison was made. A malformed
    compare.json document raises ValueError naming the key (it is the daemon's output: a bug, never a number)."""
    other = _against(result, against)
    if other is None:
        return []
    main = other["main_metric"]
    out = []
    for metric in [main] + sorted(m for m in other["metrics"] if m != main):
        line = other["metrics"][metric]
        row = {"iteration": other["iteration"], "metric": metric, "main": metric == main, "alpha": other["alpha"],
               "ci": line.get("ci")}
        row.update({k: line[k] for k in _LINE_KEYS})
        out.append(row)
    return out


def comparison_summary(result: ResultRecord, against: str) -> Optional[dict]:
    """The main metric's line of `comparison_lines` without `main`; None when no such comparison was made."""
    lines = comparison_lines(result, against)
    if not lines:
        return None
    return {k: v for k, v in lines[0].items() if k != "main"}


def best_of(result: ResultRecord) -> Optional[dict]:
    """The run's best checkpoint as the result carries it ({"iteration", "score", "rule"}), checked; None if unknown."""
    best = result.best
    if best is None:
        return None
    missing = [k for k in BEST_KEYS if not isinstance(best, dict) or k not in best]
    if missing:
        raise ValueError(f"{result.run}@{result.iteration}/{result.benchmark}: best: missing {', '.join(missing)} "
                         f"(expected {{'iteration', 'score', 'rule'}})")
    return {k: best[k] for k in BEST_KEYS}


def comparison_flips(result: ResultRecord) -> list[dict]:
    """Every flip of the result's comparisons: the <flip> rows of compare.json with `against` ("prev" | "best"),
    `against_iteration`, `change` ("fixed" | "broken") and `metric` added; [] without a comparison."""
    rows = []
    for against in COMPARED_AGAINST:
        other = _against(result, against)
        if other is None:
            continue
        for change in ("fixed", "broken"):
            for flip in (other.get("flips") or {}).get(change) or []:
                rows.append(dict(flip, against=against, against_iteration=other["iteration"], change=change,
                                 metric=other["main_metric"]))
    return rows


def history_row(result: ResultRecord) -> dict:
    """The history.jsonl line of a result: its fields, with the comparison document replaced by the main metric's
    summary against the previous (`vs_prev`) and best (`vs_best`) checkpoints, and `best` only when known."""
    row = asdict(result)
    del row["comparison"]  # the whole document (with its flips) stays in the result folder's compare.json
    best = best_of(result)
    if best is None:
        del row["best"]
    else:
        row["best"] = best
    for against in COMPARED_AGAINST:
        summary = comparison_summary(result, against)
        if summary is not None:
            row[f"vs_{against}"] = summary
    return row


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


def _history_row(line: str, path: str, number: int) -> dict:
    """One line of history.jsonl; a damaged one is an error naming file:line (never skipped: the line may be the
    only record of a result, and without it the result would be appended a second time). Its metrics, revision,
    n, stderr and tokens_b follow the metrics.json rules (a NaN is no result)."""
    try:
        row = json.loads(line)
    except ValueError as e:
        row = e
    if not isinstance(row, dict) or not all(k in row for k in ("run", "iteration", "benchmark", "metrics")):
        raise EvaluatorError(f"{path}:{number}: not a result line (expected a JSON object with run, iteration, "
                             f"benchmark, metrics); repair or remove that line")
    try:
        if not isinstance(row["run"], str) or not isinstance(row["benchmark"], str):
            raise ValueError(f"{path}:{number}: run, benchmark: expected names, got {row['run']!r}, "
                             f"{row['benchmark']!r}")
        problem = iteration_problem(row["iteration"])
        if problem:
            raise ValueError(f"{path}:{number}: iteration: {problem}")
        validate_metrics(row, f"{path}:{number}")
    except ValueError as e:
        raise EvaluatorError(f"{e}; repair or remove that line") from None
    return row


class LocalHistorySink:
    """<cache_dir>/results/<run>/history.jsonl (one line per result), curves.png and summary.md.

    One line per (run, iteration, benchmark): a higher revision replaces the line of the lower one (the
    file is rewritten atomically), so the views show one point per iteration, the latest evaluation."""

    name = "local"

    def __init__(self, cache_dir: str, plots: bool = True, redraw_stale: bool = False):
        """`redraw_stale`: the first flush also redraws every run's views a stopped daemon left older than their
        history (the daemon's sink; not `invalidate` or the API, which touch one run)."""
        self.cache_dir = cache_dir
        self.plots = plots
        self._rows: dict[str, list[dict]] = {}  # run -> rows of its history.jsonl (re-read when the file changed)
        self._stamps: dict[str, tuple] = {}  # run -> (size, mtime) of history.jsonl when last read or written
        self._index: dict[str, dict[tuple, int]] = {}  # run -> result key -> its position in the rows
        self._dirty: set[str] = set()  # runs whose plots are older than their history
        self._retry_flush_at = 0.0
        self._views_checked = not (plots and redraw_stale)  # else flush() looks once for stale views

    def _path(self, run: str, name: str = "history.jsonl") -> str:
        return os.path.join(self.cache_dir, "results", run, name)

    def rows(self, run: str) -> list[dict]:
        path = self._path(run)
        stamp = _stamp(path)  # taken before reading: a line appended meanwhile changes it, so it is read next time
        if run not in self._rows or self._stamps.get(run) != stamp:  # first use, or another writer's change
            rows = []
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    for number, line in enumerate(f, 1):
                        if line.endswith("\n"):  # an unterminated last line is a torn write
                            rows.append(_history_row(line, path, number))
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
        row = history_row(result)
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
            _write_rows(path, rows[:at] + [row] + rows[at + 1:])
            rows[at] = row  # only once written: a failed write (disk full) must leave the cache saying the old line
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
        path = self._path(run)
        _write_rows(path, rows[:at] + rows[at + 1:])
        del rows[at]  # only once written, as in _record
        self._index[run] = {(r["run"], r["iteration"], r["benchmark"]): i for i, r in enumerate(rows)}
        self._stamps[run] = _stamp(path)
        if self.plots:
            self._dirty.add(run)
        return True

    def flush(self) -> None:
        """Redraw curves.png and rewrite summary.md of every run that got a result since the last flush; the first
        flush of a process also redraws the views a stopped daemon left older than their history."""
        if not self._views_checked:
            self._views_checked = True
            root = os.path.join(self.cache_dir, "results")
            for folder, subdirs, files in os.walk(root):
                subdirs[:] = [d for d in subdirs if not d.startswith("iter_")]  # results, not runs: not walked
                if "history.jsonl" in files:
                    try:
                        self.rows(os.path.relpath(folder, root))  # marks a run whose views are older than its history
                    except (OSError, EvaluatorError) as e:  # that run's own record says so; the others are redrawn
                        log.warning("recorder local: %s", e)
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


def _write_rows(path: str, rows: list[dict]) -> None:
    """history.jsonl rewritten whole, atomically: a crash leaves the old file or the new one."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


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
        data = f.read()  # rare: after a crash mid-write (that result was never marked recorded: it comes again)
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
    # or a hand-edited or damaged line: say what was dropped, so a result it held is not lost in silence
    log.warning("%s: dropped its unterminated last line (%d bytes: %r...): a write cut short", path,
                len(data) - cut, data[cut:cut + 80])


# ---- registry --------------------------------------------------------------------------------
def _wandb(settings: RecorderSettings):
    from recorder.wandb_sink import WandbSink

    return WandbSink(settings)


def _mlflow(settings: RecorderSettings):
    from recorder.mlflow_sink import MlflowSink

    return MlflowSink(settings)


SINKS: dict[str, Callable[[RecorderSettings], Sink]] = {
    "local": lambda s: LocalHistorySink(s.cache_dir, plots=s.plots, redraw_stale=True),
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
