"""W&B sink: one run per (project, run name), with a deterministic id, resumed for every result.

Each result is one short W&B session: init(resume="allow") -> define_metric -> one log() row ->
finish(). finish() returns only once the row is in the run's local transaction log
(`<dir>/wandb/{offline-,}run-<time>-<id>/run-<id>.wandb`), so "accepted" means durable; a run that
stays open across results would hold rows in wandb-core's buffer, and a crash would lose rows the
ledger already calls recorded.

Row: `iteration`, `tokens_b` (when known) and `<benchmark>/<metric>` for every metric, plus (unless
summary-only) the tables `<benchmark>/summary_table` (metric, value, stderr, n, per category) and
`<benchmark>/samples` (the first rows of predictions.jsonl). `define_metric("<benchmark>/*",
step_metric="iteration")` makes the curves use iteration as x, so checkpoints that finish out of
order still draw correct curves.

Mode: `auto` is online when WANDB_API_KEY is set and offline otherwise; offline runs are uploaded
later with `wandb sync <dir>/wandb` (wandb syncs the segments of one run id in start-time order).
Offline W&B cannot know the last step of earlier segments, so the sink passes an explicit step that
continues after the largest `_step` found in the local logs of that run id; segments never overlap.

Exactly once: before logging, the sink reads the local transaction logs of the run id (once per
process, then keeps the set) and skips a (iteration, benchmark) that is already there -- so a result
offered again after a crash is not logged twice, even by a new process.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

from recorder.sinks import RecorderSettings, ResultRecord, WandbSettings

LOG_MAGIC = b":W&B"
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4, little-endian), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
TABLE_KEYS = ("summary_table", "samples")
SAMPLE_TEXT_CHARS = 500
LOG_WAIT_SECONDS = 30.0  # how long a finished session may take to reach its transaction log


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
    return out


def run_logs(wandb_dir: str, rid: str = "*") -> list[str]:
    """Transaction logs under <wandb_dir>/wandb, oldest session first (the latest-run link skipped)."""
    found = []
    for path in glob.glob(os.path.join(wandb_dir, "wandb", "*run-*", f"run-{rid}.wandb")):
        if not os.path.islink(os.path.dirname(path)):
            found.append(path)
    return sorted(found, key=lambda p: (os.path.getmtime(p), p))


def logged_keys(rows: list[dict]) -> set[tuple[int, str]]:
    """(iteration, benchmark) pairs found in history rows (a benchmark is the prefix of `<bench>/...`)."""
    keys = set()
    for row in rows:
        if "iteration" not in row:
            continue
        for key in row:
            if "/" in key and not key.startswith("_"):
                keys.add((int(row["iteration"]), key.split("/", 1)[0]))
    return keys


def metrics_of(row: dict) -> dict[str, dict[str, float]]:
    """benchmark -> {metric: value} from one history row (tables and their fields left out)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if "/" not in key or key.startswith("_") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bench, metric = key.split("/", 1)
        if metric.split("/", 1)[0] in TABLE_KEYS:
            continue
        out.setdefault(bench, {})[metric] = value
    return out


# ---- the sink --------------------------------------------------------------------------------
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


class _RunState:
    def __init__(self, rows: list[dict]):
        self.keys = logged_keys(rows)
        self.next_step = 1 + max((int(r["_step"]) for r in rows if "_step" in r), default=-1)


class WandbSink:
    name = "wandb"

    def __init__(self, settings: RecorderSettings):
        self.settings = settings
        self.ws = settings.wandb
        self._runs: dict[str, _RunState] = {}

    def _state(self, run: str, rid: str) -> _RunState:
        if run not in self._runs:
            rows = []
            for path in run_logs(self.ws.dir, rid):
                rows += read_run_log(path).rows
            self._runs[run] = _RunState(rows)
        return self._runs[run]

    def _init(self, wandb, mode: str, rid: str, name: str, config: dict, group=None, tags=None):
        os.makedirs(self.ws.dir, exist_ok=True)  # raises if the folder cannot be made: W&B would fall back to /tmp
        if not os.access(self.ws.dir, os.W_OK):
            raise PermissionError(f"W&B folder {self.ws.dir} is not writable")
        run = wandb.init(project=self.ws.project, entity=self.ws.entity, id=rid, name=name, resume="allow",
                         group=group, tags=tags, job_type="eval", dir=self.ws.dir, mode=mode, config=config,
                         settings=_settings(wandb, self.ws))
        where = os.path.realpath(run.dir)
        if not where.startswith(os.path.realpath(self.ws.dir) + os.sep):
            run.finish(exit_code=1)
            raise RuntimeError(f"W&B wrote the run to {where}, not under {self.ws.dir}")
        return run

    def record(self, result: ResultRecord) -> None:
        mode = resolve_mode(self.ws.mode)
        wandb = _import_wandb(mode)
        rid = run_id(self.ws.project, result.run)
        state = self._state(result.run, rid)
        if (result.iteration, result.benchmark) in state.keys:
            return  # already in this run's log: offered again after a crash, or a backfill
        row = {"iteration": result.iteration}
        if result.tokens_b is not None:
            row["tokens_b"] = result.tokens_b
        for name, value in result.metrics.items():
            row[f"{result.benchmark}/{name}"] = value
        if not self.settings.summary_only:
            row[f"{result.benchmark}/summary_table"] = wandb.Table(*summary_table(result))
            samples = sample_rows(result, self.ws.sample_predictions)
            if samples:
                row[f"{result.benchmark}/samples"] = wandb.Table(
                    columns=["iteration", "sample_id", "input", "prediction", "status"], data=samples)
        config = dict(self.settings.run_config, model_name=result.run)
        config["versions"] = dict(config.get("versions") or {}, wandb=wandb.__version__)
        run = self._init(wandb, mode, rid, result.run, config, self.ws.group, self.ws.tags or None)
        session_log = os.path.join(os.path.dirname(run.dir), f"run-{rid}.wandb")
        try:
            run.define_metric("iteration")
            run.define_metric("tokens_b")
            run.define_metric(f"{result.benchmark}/*", step_metric="iteration")
            if mode == "offline":
                run.log(row, step=state.next_step)
            else:
                run.log(row)  # online resume knows the run's last step
        except BaseException:
            self._runs.pop(result.run, None)  # unsure what reached the log: read it again next time
            run.finish(exit_code=1)
            raise
        run.finish()
        try:
            await_row(session_log, result.iteration, result.benchmark)
        except BaseException:
            self._runs.pop(result.run, None)
            raise
        state.keys.add((result.iteration, result.benchmark))
        state.next_step += 1

    def log_leaderboard(self, columns: list[str], data: list[list], title: str) -> str:
        """A `leaderboard` run in the project: the table and a bar chart of the score. Returns the run id."""
        mode = resolve_mode(self.ws.mode)
        wandb = _import_wandb(mode)
        rid = run_id(self.ws.project, "leaderboard")
        state = self._state("\0leaderboard", rid)
        run = self._init(wandb, mode, rid, "leaderboard", {"project": self.ws.project}, "leaderboard", ["leaderboard"])
        try:
            table = wandb.Table(columns=columns, data=data)
            row = {"leaderboard/table": table,
                   "leaderboard/score": wandb.plot.bar(table, "label", "score", title=title)}
            if mode == "offline":
                run.log(row, step=state.next_step)
            else:
                run.log(row)
        except BaseException:
            self._runs.pop("\0leaderboard", None)
            run.finish(exit_code=1)
            raise
        run.finish()
        state.next_step += 1
        return rid


def await_row(path: str, iteration: int, benchmark: str, timeout: float = LOG_WAIT_SECONDS) -> None:
    """Return once the session's transaction log holds the row; raise if it does not within `timeout`.

    finish() can return a few milliseconds before wandb-core has written the last records, so
    "accepted" is decided by reading the row back, not by finish() returning."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        if os.path.exists(path) and (iteration, benchmark) in logged_keys(read_run_log(path).rows):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"W&B did not write iteration {iteration} of {benchmark} to {path} within {timeout:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def summary_table(result: ResultRecord) -> tuple[list[str], list[list]]:
    """Columns and rows: one row per metric overall, then one per (category, metric)."""
    columns = ["iteration", "tokens_b", "category", "metric", "value", "stderr", "n", "versions"]
    versions = json.dumps(result.versions, sort_keys=True) if result.versions else ""
    rows = [[result.iteration, result.tokens_b, "all", name, float(value), _number(result.stderr.get(name)),
             result.n, versions] for name, value in sorted(result.metrics.items())]
    for category, values in sorted((result.per_category or {}).items()):
        if isinstance(values, dict):
            for name, value in sorted(values.items()):
                if _number(value) is not None:
                    rows.append([result.iteration, result.tokens_b, str(category), name, float(value), None, None,
                                 versions])
    return columns, rows


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
