"""`tools/evaluator.py status`: what the daemon is doing, on one screen.

    status --config CFG [--run R] [--last N] [--watch [SECONDS]] [--json] [--retry-recording] [--cancel-jobs]
           [--check] [--ack ID|all ...]

Exit codes: 0; 1 with --check while a regression alert is open (CHECK_OPEN_ALERTS); 2 bad config or arguments.

Text, top to bottom:
  daemon: alive (pid, host, heartbeat age) | NOT RUNNING (...) | stopped cleanly at ... | never started
  what the daemon reported in daemon.json: what it holds (a missing dataset, an unreadable run folder), benchmarks
      whose settings changed under results (with the operator's choices: rerun, invalidate, a new name), hints
      per run (why nothing runs)
  per run: the iteration x benchmark table. A cell is the headline metric of a scored / recorded result (the
      benchmark's `main_metric`, else the first metric of its metrics.json) or a state symbol (SYMBOLS); the best
      checkpoint's row is marked `<- best` (others kept by keep_best `<- kept`); under the table the best checkpoint
      (best.json) and, per benchmark, its newest result against the previous checkpoint (compare.json)
  in flight: elapsed time, progress where the stage reports it (progress.json), Slurm job ids or pids
  failed: attempts, next retry, the first line of the error and the stage's own message from its log tail
  notes: other rows with a last_error (waiting to pin, a sink that refused, vanished)
  recording set aside, snapshots held, runs in the ledger that are not configured now

--json prints one object; these keys are stable (schema_version 1):
  schema_version  1
  now             wall time of the report
  daemon          {state: alive|stalled|stopped|dead|never|unknown, text, pid, host, started_at, beat_at, stopped_at}
                  (stalled: no heartbeat, but its pid holds the cache_dir lock: paused on its ledger or hung)
  runs            [{run, configured, root, layout, benchmarks: [name], metrics: {benchmark: headline metric | null},
                    counts: {state: n}, iterations: n (all), shown: n (the newest, --last),
                    rows: [{iteration, cells: {benchmark: cell | null}}]   (null: no job),
                    best: results/<run>/best.json {iteration, score, rule, checkpoint, snapshot, metrics, kept, ...}
                          | null,
                    last_comparison: [{benchmark, iteration, against, metric, old, new, delta, p, method, ci, n,
                                       significant, fixed, broken}]  (per benchmark: its newest result vs the
                                       previous checkpoint, from compare.json)}]
                  cell = {state, symbol, value (number | null), metric (str | null), note (str | null),
                          progress ({done, total, updated_at} | null)}
  jobs            [every ledger row of the shown runs: its fields (Job, incl. fingerprint and revision where the
                    ledger has them) + elapsed_s, progress, error (the summary lines shown as text)]
  unavailable     [{benchmark, run, reason}]            as the daemon last reported them ([] when none)
  settings_changed [{benchmark, results, changes}]      idem
  hints           {run: [str]}                          idem ({} when none)
  snapshots       held snapshots (pinning, pinned, unpinned), without their manifest
  set_aside       results a sink refused recorder.max_failures times: {run, iteration, benchmark, sink, failures,
                    last_error, ...}
  not_configured  [{run, jobs}]: runs in the ledger that the config does not name now
  actions         [str]: what --retry-recording / --cancel-jobs / --ack did
  alerts          [{id, rule, run, iteration, benchmark, message, created_at, closed_at, closed_by,
                    deliveries: {channel: {delivered_at, failures, next_try_at, last_error}}}]  every alert, oldest
                    first; closed_at null = open
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import re
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from evaluator.common.contracts import (EVALUATION, INFERENCE, LOG_FILE, METRICS, PROGRESS, STAGES, read_metrics,
                                         result_dir)
from evaluator.common.errors import EvaluatorError, did_you_mean
from evaluator.daemon import heartbeat as H
from evaluator.daemon import ledger as L
from evaluator.daemon.config import AutoEvalConfig, load_config

# The inference stage writes <output_dir>/progress.json {"done", "total", "updated_at"} while it generates.
SCHEMA_VERSION = 1
INVALIDATED = L.INVALIDATED  # the ledger's withdrawn results (rerun / invalidate)
DEFAULT_LAST = 30  # iterations per run in the table (the newest); --last 0 shows all
DETAIL_LIMIT = 20  # lines per details section; --json lists every row
DEFAULT_WATCH_SECONDS = 5.0
CHECK_OPEN_ALERTS = 1  # `status --check` exits with it while a regression alert is open

# state -> table symbol; a scored / recorded cell shows its value instead
SYMBOLS = {L.PENDING: ".", L.INFERRING: ">", L.INFERRED: "~", L.SCORING: "~", L.SKIPPED: "-", L.VANISHED: "v",
           INVALIDATED: "i"}
FAILED_FINAL, FAILED_RETRY, NO_VALUE, STALE = "x", "!", "?", "?"
LEGEND = ("legend: 0.512 headline metric (main_metric, else the first in metrics.json)  . pending  >24% inferring  "
          "~ inferred/scoring\n"
          "        x failed for good  ! failed, will retry  - skipped  v vanished  i invalidated  "
          "? no readable metric  >? ~? daemon not running")
ERROR_LINE = re.compile(r"^(?:\S+: )?error:|^ERROR\b", re.IGNORECASE)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Fault)\b(?::.*)?$")
STAGE_PREFIX = re.compile(r"^\[[\w-]+\]\s*")  # "[inference] " (evaluator/stages/common.py stage_log)
PROGRESS_BAR = re.compile(r"\[[#.]+\]\s*\d+/\d+")
ATTEMPT_SEPARATOR = "==== "  # local.py starts each attempt's part of the appended log with it
# lines that say nothing the first line does not: the separator, the command stage's echo of its command and
# its "command exited N" (evaluator/stages/command.py), progress lines
NOISE = re.compile(r"^(?:==== |command stage \([\w-]+, iteration -?\d+\): |command stage: command exited -?\d+$"
                   r"|command stage: its [\w.]+ is kept as [\w.]+\.refused \(not a result\)$)")


# ---- values -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """What a stage reports in progress.json."""

    done: int
    total: int
    updated_at: float

    def text(self) -> str:
        return f"{self.done}/{self.total} ({self.percent}%)"

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0


@dataclass(frozen=True)
class Headline:
    """The number a cell shows for a result, or why it has none."""

    metric: Optional[str]
    value: Optional[float]
    note: Optional[str] = None


@dataclass(frozen=True)
class Cell:
    state: str
    symbol: str  # what the table prints
    value: Optional[float] = None
    metric: Optional[str] = None
    note: Optional[str] = None
    progress: Optional[Progress] = None


@dataclass
class RunTable:
    run: str
    configured: bool
    root: Optional[str]
    layout: Optional[str]
    benchmarks: list[str]
    metrics: dict[str, Optional[str]]  # benchmark -> the headline metric's name (None: not known yet)
    counts: dict[str, int]
    iterations: int  # all the run's iterations in the ledger
    rows: list[tuple[int, dict[str, Optional[Cell]]]]  # the shown ones, oldest first
    best: Optional[dict] = None  # results/<run>/best.json (the daemon's best checkpoint), None without one
    comparisons: list[dict] = field(default_factory=list)  # per benchmark: its newest result vs the previous one


@dataclass
class Report:
    now: float
    config_path: str
    cache_dir: str
    daemon_state: str
    daemon_text: str
    daemon_doc: Optional[dict]
    runs: list[RunTable]
    jobs: list[L.Job]
    progress: dict[L.JobKey, Progress]
    set_aside: list[dict]
    snapshots: list[dict]
    not_configured: list[tuple[str, int]]
    max_attempts: int
    executor: str
    only_run: Optional[str] = None
    messages: list[str] = field(default_factory=list)  # what --retry-recording / --cancel-jobs did
    alerts: list[dict] = field(default_factory=list)  # the ledger's regression alerts, oldest first


# ---- pure decisions -----------------------------------------------------------------------------------------
def headline(doc: dict, main_metric: Optional[str]) -> Headline:
    """The metric a cell shows: `main_metric` when configured, else the first metric of metrics.json."""
    metrics = doc.get("metrics") or {}
    if main_metric is not None and main_metric not in metrics:
        return Headline(main_metric, None, f"metrics.json has no {main_metric!r} (main_metric); it has "
                                           f"{', '.join(metrics) or 'no metrics'}")
    if not metrics:
        return Headline(None, None, "metrics.json has no metrics")
    name = main_metric if main_metric is not None else next(iter(metrics))
    return Headline(name, float(metrics[name]))  # read_metrics refused an integer no float holds


def is_running(state: str) -> bool:
    return state in L.RUNNING


def cell(job: L.Job, result: Optional[Headline], progress: Optional[Progress], daemon_up: bool) -> Cell:
    """One table cell for a ledger row."""
    state = job.state
    if state in (L.SCORED, L.RECORDED):
        if result is None or result.value is None:
            return Cell(state, NO_VALUE, None, result.metric if result else None,
                        result.note if result else "no metrics.json")
        return Cell(state, format_value(result.value), result.value, result.metric)
    if state == L.FAILED:
        return Cell(state, FAILED_FINAL if job.next_retry_at is None else FAILED_RETRY)
    symbol = SYMBOLS.get(state, "?")
    if is_running(state) and not daemon_up:
        return Cell(state, symbol + STALE, progress=progress)
    if state == L.INFERRING and progress is not None:
        return Cell(state, f"{symbol}{progress.percent}%", progress=progress)
    return Cell(state, symbol, progress=progress)


def format_value(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def read_progress_doc(doc, started_at: Optional[float]) -> Optional[Progress]:
    """A progress.json document -> Progress; None when malformed or left over from an earlier attempt."""
    if not isinstance(doc, dict):
        return None
    done, total, at = doc.get("done"), doc.get("total"), doc.get("updated_at")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (done, total, at)):
        return None
    if total <= 0 or done < 0:
        return None
    if started_at is not None and at < started_at - 5:  # written before this attempt began (5 s: clock slack)
        return None
    return Progress(int(min(done, total)), int(total), float(at))


def error_summary(last_error: Optional[str]) -> list[str]:
    """The first line of a row's last_error and the stage's own message from the log tail under it:
    the last `error:` line and the last exception line of a traceback in the last attempt's part of the log, else
    its last line that is not NOISE (else its last progress line)."""
    if not last_error:
        return []
    lines = last_error.splitlines()
    head, tail = lines[0].strip(), [ln.strip() for ln in lines[1:] if ln.strip()]
    starts = [i for i, ln in enumerate(tail) if ln.startswith(ATTEMPT_SEPARATOR)]
    tail = tail[starts[-1] + 1:] if starts else tail  # the last attempt's part of the log
    plain = [STAGE_PREFIX.sub("", ln) for ln in tail]
    picked: list[int] = []
    for pattern in (ERROR_LINE, EXCEPTION_LINE):
        hits = [i for i, text in enumerate(plain) if pattern.search(text)]
        if hits:
            picked.append(hits[-1])
    if not picked:
        rest = [i for i, text in enumerate(plain) if not (NOISE.search(text) or PROGRESS_BAR.search(text))]
        progress = [i for i, text in enumerate(plain) if PROGRESS_BAR.search(text)]
        picked = rest[-1:] or progress[-1:]  # only progress lines: the last says how far it got
    out = [head]
    for i in sorted(set(picked)):
        text = tail[i].strip()
        if text and text != head and text not in head:
            out.append(text[:400])
    return out


def stage_of(last_error: str) -> Optional[str]:
    first = last_error.split(":", 1)[0] if last_error else ""
    return first if first in STAGES else None


# ---- reading what is on disk ---------------------------------------------------------------------------------
def read_headline(cache_dir: str, job: L.Job, main_metric: Optional[str]) -> Headline:
    path = os.path.join(result_dir(cache_dir, job.run, job.iteration, job.benchmark), METRICS)
    try:
        return headline(read_metrics(path), main_metric)
    except FileNotFoundError:
        return Headline(main_metric, None, f"{path} is missing")
    except (OSError, ValueError) as e:
        return Headline(main_metric, None, str(e))


def read_progress(cache_dir: str, job: L.Job) -> Optional[Progress]:
    path = os.path.join(result_dir(cache_dir, job.run, job.iteration, job.benchmark), PROGRESS)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None  # no report (yet): the stage does not write one, or has not started generating
    return read_progress_doc(doc, job.started_at)


def configured_runs(cfg: AutoEvalConfig) -> Optional[list]:
    from evaluator.daemon.build import resolve_runs

    try:
        return resolve_runs(cfg)
    except EvaluatorError:
        return None  # a config that names no runs still shows its ledger


def daemon_liveness(cache_dir: str, now: float) -> tuple[Optional[dict], str, str]:
    """(daemon.json, liveness, what to say). A daemon that stops cleanly between the read of daemon.json and the
    check of its pid is not "gone (killed?)": daemon.json is read again, and then says it stopped."""
    for _ in range(2):
        try:
            doc = H.read_state(cache_dir)
            state, text = H.liveness(doc, now, H.pid_exists(doc), H.holds_lock(cache_dir, doc))
        except (OSError, ValueError) as e:
            return None, "unknown", f"unknown: {e}"
        if state != H.DEAD:
            break
    return doc, state, text


def gather(cfg: AutoEvalConfig, config_path: str, only_run: Optional[str], last: Optional[int],
           now: float) -> Report:
    """Read the ledger, daemon.json, and the metrics / progress files of the rows shown."""
    if not os.path.exists(os.path.join(cfg.cache_dir, "ledger.sqlite3")):
        raise EvaluatorError(f"no ledger in cache_dir {cfg.cache_dir}: the daemon has not run with this config yet")
    specs = configured_runs(cfg)
    # daemon.json before the rows: a daemon that stops in between shows as running beside rows it put back to
    # pending, never as stopped beside rows still marked running
    doc, state, text = daemon_liveness(cfg.cache_dir, now)
    try:
        led = L.Ledger(cfg.cache_dir, readonly=True)
        try:
            ledger_runs = led.runs()
            check_run(only_run, specs, ledger_runs)
            jobs = led.jobs(run=only_run)
            snaps = [s for s in led.snapshots([L.PINNING, L.PINNED, L.UNPINNED]) if only_run in (None, s["run"])]
            set_aside = [d for d in led.quarantined() if only_run in (None, d["run"])]
            alert_rows = led.alerts(run=only_run)
        finally:
            led.close()
    except L.LedgerUnavailable as e:
        raise EvaluatorError(str(e)) from None
    except sqlite3.Error as e:
        raise EvaluatorError(f"cannot read the ledger in {cfg.cache_dir}: {e}") from None

    daemon_up = state in (H.ALIVE, H.STALLED)  # stalled: its process is there, paused or hung, its rows with it
    full = H.disk_full(cfg.cache_dir)
    if full and daemon_up:  # the usual reason a daemon pauses
        text += f"; {full}: the daemon starts no stage and waits, losing nothing, until there is room"

    main_metric = {b.name: b.main_metric for b in cfg.benchmarks}
    by_run: dict[str, list[L.Job]] = {}
    for j in jobs:
        by_run.setdefault(j.run, []).append(j)
    progress = {j.key: p for j in jobs if j.state == L.INFERRING
                for p in [read_progress(cfg.cache_dir, j)] if p is not None}

    order = [(s.name, s) for s in specs or []] + [(r, None) for r in sorted(by_run)
                                                  if specs is None or r not in {s.name for s in specs}]
    tables = []
    for name, spec in order:
        if only_run is not None and name != only_run:
            continue
        rows = by_run.get(name, [])
        in_ledger = {j.benchmark for j in rows}
        # a configured run: its benchmarks now (+ dropped ones it still has rows of); otherwise what the ledger has
        benches = [b.name for b in cfg.benchmarks
                   if (spec.runs_benchmark(b.name) if spec is not None else b.name in in_ledger)]
        benches += sorted(in_ledger - set(benches))
        grid: dict[int, dict[str, L.Job]] = {}
        for j in rows:
            grid.setdefault(j.iteration, {})[j.benchmark] = j
        iterations = sorted(grid)
        shown = iterations if not last else iterations[-last:]
        labels: dict[str, Optional[str]] = {b: main_metric.get(b) for b in benches}
        table_rows = []
        for it in shown:
            cells: dict[str, Optional[Cell]] = {}
            for b in benches:
                j = grid[it].get(b)
                if j is None:
                    cells[b] = None
                    continue
                result = read_headline(cfg.cache_dir, j, main_metric.get(b)) \
                    if j.state in (L.SCORED, L.RECORDED) else None
                cells[b] = cell(j, result, progress.get(j.key), daemon_up)
                if labels[b] is None and result is not None and result.metric:
                    labels[b] = result.metric
            table_rows.append((it, cells))
        counts: dict[str, int] = {}
        for j in rows:
            counts[j.state] = counts.get(j.state, 0) + 1
        # the layout the daemon ran with (--model-type may differ from the config's), else the config's
        layout = ((doc or {}).get("runs") or {}).get(name, {}).get("layout") or (spec.layout if spec else None)
        tables.append(RunTable(name, spec is not None, spec.root if spec else None, layout,
                               benches, labels, counts, len(iterations), table_rows, read_best(cfg.cache_dir, name),
                               last_comparisons(cfg.cache_dir, rows, benches)))
    stale = []
    if specs is not None:
        names = {s.name for s in specs}
        stale = [(r, len(js)) for r, js in sorted(by_run.items()) if r not in names]
    return Report(now, config_path, cfg.cache_dir, state, text, doc, tables, jobs, progress, set_aside, snaps, stale,
                  cfg.executor.max_attempts, cfg.executor.type, only_run, alerts=alert_rows)


def check_run(only_run: Optional[str], specs: Optional[list], ledger_runs: list[str]) -> None:
    """--run R names a configured run or one the ledger has; anything else is a typo, not "no jobs"."""
    if only_run is None:
        return
    known = sorted({s.name for s in specs or []} | set(ledger_runs))
    if only_run not in known:
        raise EvaluatorError(f"--run {only_run!r}: no such run in the config or the ledger; known runs: "
                             f"{', '.join(known) or 'none'}{did_you_mean(only_run, known)}")


# ---- text ---------------------------------------------------------------------------------------------------
def render_text(r: Report) -> str:
    out: list[str] = [f"daemon: {r.daemon_text}"]
    out += r.messages
    out += daemon_reports(r)
    out += alert_lines(r)
    for t in r.runs:
        out.append("")
        out += run_table(t)
    if any(t.rows for t in r.runs):
        out.append(LEGEND)
    out += in_flight(r)
    out += failed(r)
    out += notes(r)
    out += tail_sections(r)
    return "\n".join(out) + "\n"


def daemon_reports(r: Report) -> list[str]:
    doc = r.daemon_doc or {}
    out: list[str] = []
    beat_at = doc.get("beat_at")
    when = "" if r.daemon_state == H.ALIVE or not isinstance(beat_at, (int, float)) else \
        f" (as of its last heartbeat, {H.clock(beat_at)})"
    changed = [c for c in doc.get("settings_changed") or [] if isinstance(c, dict)]
    changed_names = {c.get("benchmark") for c in changed}
    # a benchmark held for changed settings has its own section below, with the choices
    unavailable = [u for u in doc.get("unavailable") or [] if isinstance(u, dict) and r.only_run in (None, u.get("run"))
                   and not (u.get("benchmark") in changed_names and u.get("run") is None)]
    if unavailable:
        out.append(f"held{when}: nothing of these starts, the others run (looked at again at every rescan)")
        for u in unavailable:
            what = " ".join(x for x in (f"benchmark {u['benchmark']}" if u.get("benchmark") else "",
                                        f"run {u['run']}" if u.get("run") else "") if x) or "-"
            out.append(f"  {what}: {u.get('reason', '')}")
    for c in changed:
        b = c.get("benchmark")
        out.append(f"settings changed{when}: benchmark {b} is held: {c.get('results', '?')} result(s) were made with "
                   f"other settings ({'; '.join(c.get('changes') or []) or 'what changed is not known'})")
        out.append(f"  choose: `tools/evaluator.py rerun --config {r.config_path} --benchmark {b}` re-evaluates them "
                   f"with the current settings; `tools/evaluator.py invalidate --config {r.config_path} --benchmark "
                   f"{b}` withdraws them; or give the new settings a new benchmark name (a new curve)")
    hints = doc.get("hints") or {}
    for run in sorted(hints):
        if r.only_run not in (None, run) or not hints[run]:
            continue
        out.append(f"hints for run {run}{when}:")
        out += [f"  {h}" for h in hints[run]]
    return out


def open_alerts(r: Report) -> list[dict]:
    return [a for a in r.alerts if a["closed_at"] is None]


def alert_lines(r: Report) -> list[str]:
    """Open regression alerts, each with where it was delivered; closed ones are counted (--json lists them)."""
    opened = open_alerts(r)
    closed = len(r.alerts) - len(opened)
    if not opened:
        return [f"alerts: none open ({closed} closed)"] if closed else []
    out = [f"alerts: {len(opened)} open{f', {closed} closed' if closed else ''} (`status --ack ID|all` closes one; "
           f"a later checkpoint that keeps the rule closes it too)"]
    for a in opened[-DETAIL_LIMIT:]:
        out.append(f"  #{a['id']}  {H.clock(a['created_at'])}  {a['message']}")
        sent = []
        for channel, d in sorted(a["deliveries"].items()):
            if d["delivered_at"] is not None:
                sent.append(f"{channel} delivered")
            else:
                retry = f", next try {H.clock(d['next_try_at'])}" if d["next_try_at"] else ""
                sent.append(f"{channel} pending ({d['failures']} failure(s){retry}"
                            f"{': ' + d['last_error'] if d['last_error'] else ''})")
        out.append("      sent to: log" + "".join(f"; {x}" for x in sent))
    return out


def run_table(t: RunTable) -> list[str]:
    where = f" — {t.root} ({t.layout})" if t.configured else " — not configured now"
    summary = ", ".join(f"{s} {t.counts[s]}" for s in L.STATES if t.counts.get(s))
    summary += "".join(f", {s} {n}" for s, n in t.counts.items() if s not in L.STATES)
    head = f"run {t.run}{where}: {t.iterations} iteration(s)" + (f"; {summary}" if summary else "")
    if not t.iterations:
        return [f"run {t.run}{where}: no jobs yet"]
    out = [head]
    if t.iterations > len(t.rows):
        out.append(f"  ({t.iterations - len(t.rows)} older iteration(s) not shown; --last 0 shows all)")
    width = {b: max(len(b), len(t.metrics.get(b) or ""), *(len(c.symbol) for _, cs in t.rows
                                                           for c in [cs.get(b)] if c is not None)) for b in t.benchmarks}
    it_width = max(len("iteration"), *(len(str(it)) for it, _ in t.rows))
    out.append("  " + f"{'iteration':>{it_width}}  " + "  ".join(f"{b:<{width[b]}}" for b in t.benchmarks).rstrip())
    if any(t.metrics.values()):
        out.append("  " + " " * it_width + "  " +
                   "  ".join(f"{t.metrics.get(b) or '':<{width[b]}}" for b in t.benchmarks).rstrip())
    marks = best_marks(t.best)
    for it, cells in t.rows:
        out.append(("  " + f"{it:>{it_width}}  " +
                    "  ".join(f"{(cells[b].symbol if cells[b] else ''):<{width[b]}}" for b in t.benchmarks)).rstrip()
                   + (f"  <- {marks[it]}" if it in marks else ""))
    out += best_lines(t.best)
    out += [comparison_line(c) for c in t.comparisons]
    return out


# ---- the best checkpoint and the last comparison (docs/insight.md) -------------------------------------------------
def read_best(cache_dir: str, run: str) -> Optional[dict]:
    """results/<run>/best.json as the daemon wrote it; None when there is none (no `best:` rule, no candidate yet)
    or it cannot be read."""
    from evaluator.daemon.best import BEST_FILE

    try:
        with open(os.path.join(cache_dir, "results", run, BEST_FILE), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("iteration"), int) else None


def best_marks(best: Optional[dict]) -> dict[int, str]:
    """iteration -> its marker in the table: the best checkpoint, the others kept by keep_best."""
    if not best:
        return {}
    marks = {k["iteration"]: "kept" for k in best.get("kept") or [] if isinstance(k, dict) and "iteration" in k}
    marks[best["iteration"]] = "best"
    return marks


def format_number(v) -> str:
    return format_value(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def best_lines(best: Optional[dict]) -> list[str]:
    if not best:
        return []
    snapshot = best.get("snapshot")
    where = f"snapshot kept at {snapshot}" if snapshot else f"no snapshot kept (the checkpoint: {best.get('checkpoint')})"
    out = [f"  best: iteration {best['iteration']} ({best.get('rule')} = {format_number(best.get('score'))}); {where}"]
    others = [k for k in best.get("kept") or [] if isinstance(k, dict) and k.get("iteration") != best["iteration"]]
    if others:
        out.append("  also kept (keep_best): " + ", ".join(
            f"{k['iteration']} ({format_number(k.get('score'))})" for k in others))
    return out


def comparison_summary(doc: dict) -> Optional[dict]:
    """A compare.json document -> its main metric against the previous checkpoint (None without one)."""
    prev = (doc.get("against") or {}).get("prev") if isinstance(doc, dict) else None
    if not isinstance(prev, dict):
        return None
    metric = prev.get("main_metric")
    m = (prev.get("metrics") or {}).get(metric)
    if not isinstance(m, dict):
        return None
    return {"benchmark": doc.get("benchmark"), "iteration": doc.get("iteration"), "against": prev.get("iteration"),
            "metric": metric, **{k: m.get(k) for k in ("old", "new", "delta", "p", "method", "ci", "n",
                                                      "significant", "fixed", "broken")}}


def last_comparisons(cache_dir: str, rows: list, benches: list[str]) -> list[dict]:
    """Per benchmark, its newest scored/recorded result's comparison with the previous checkpoint (compare.json)."""
    from evaluator.common.contracts import COMPARE

    newest: dict[str, L.Job] = {}
    for j in rows:
        if j.state in (L.SCORED, L.RECORDED) and (j.benchmark not in newest or j.iteration > newest[j.benchmark].iteration):
            newest[j.benchmark] = j
    out = []
    for b in benches:
        j = newest.get(b)
        if j is None:
            continue
        try:
            with open(os.path.join(result_dir(cache_dir, j.run, j.iteration, b), COMPARE), encoding="utf-8") as f:
                summary = comparison_summary(json.load(f))
        except (OSError, ValueError):
            continue  # no comparison: no per-sample scores (a command benchmark), or the first checkpoint
        if summary is not None:
            out.append(summary)
    return out


def comparison_line(c: dict) -> str:
    """e.g. `qa 3000 vs 2000: exact_match 0.61 -> 0.51, delta -0.1 (p=0.0001, mcnemar_exact, n=500), significant`."""
    num = format_number
    p = c.get("p")
    p_text = f"p={p:.2g}" if isinstance(p, (int, float)) else "p=?"
    flips = f"; {c['fixed']} fixed, {c['broken']} broken" if c.get("fixed") is not None else ""
    verdict = "significant" if c.get("significant") else "not significant"
    return (f"  last comparison: {c['benchmark']} {c['iteration']} vs {c['against']}: {c['metric']} {num(c.get('old'))}"
            f" -> {num(c.get('new'))}, delta {num(c.get('delta'))} ({p_text}, {c.get('method')}, n={c.get('n')}), "
            f"{verdict}{flips}")


def handles(j: L.Job, executor: str) -> str:
    if not (j.infer_job or j.eval_job):
        return ""
    if executor == "slurm":
        return f"slurm jobs {j.infer_job or '-'}/{j.eval_job or '-'}"
    return f"pid {j.pid}" if j.pid else ""


def revision(j: L.Job) -> str:
    rev = getattr(j, "revision", None) or 0
    return f"rev {rev}" if rev > 0 else ""


def limited(title: str, rows: list[L.Job]) -> tuple[list[str], list[L.Job]]:
    """A section title and its newest DETAIL_LIMIT rows (by last change), shown in key order."""
    if not rows:
        return [], []
    shown = sorted(sorted(rows, key=lambda j: j.updated_at)[-DETAIL_LIMIT:], key=lambda j: j.key)
    more = f"; the {DETAIL_LIMIT} newest shown, --json lists all" if len(rows) > len(shown) else ""
    return ["", f"{title} ({len(rows)}{more}):"], shown


def stale_note(r: Report) -> str:
    """Why a row the ledger shows running may not be."""
    if r.daemon_state in (H.NEVER, "unknown"):
        return "(no heartbeat: is the daemon running?)"
    if r.executor == "slurm":
        return "(daemon not running: the Slurm job keeps running; the next start re-attaches to it)"
    return "(daemon not running: resumed at its next start)"


def in_flight(r: Report) -> list[str]:
    rows = [j for j in r.jobs if j.state in (*L.RUNNING, L.INFERRED)]
    out, shown = limited("in flight", rows)
    dead = r.daemon_state not in (H.ALIVE, H.STALLED)
    for j in shown:
        if is_running(j.state):
            p = r.progress.get(j.key)
            what = j.state + (f" {p.text()}" if p else "")
            since = j.started_at or j.updated_at
            what += f", {H.duration(r.now - since)}" if since else ""
            if p and r.now - p.updated_at > 30:
                what += f" (progress reported {H.duration(r.now - p.updated_at)} ago)"
        else:
            what = f"inferred, waiting for an evaluation slot {H.duration(r.now - j.updated_at)}"
        parts = [what, f"attempt {j.attempts + 1}" if j.attempts else "", handles(j, r.executor), revision(j)]
        if dead and is_running(j.state):
            parts.append(stale_note(r))
        out.append(f"  {j.key}  " + "  ".join(p for p in parts if p))
    return out


def failed(r: Report) -> list[str]:
    rows = [j for j in r.jobs if j.state == L.FAILED]
    out, shown = limited("failed", rows)
    for j in shown:
        if j.next_retry_at is None:
            what = f"failed for good after {j.attempts} attempt(s)" if j.attempts else "failed for good"
        else:
            wait = j.next_retry_at - r.now
            what = (f"attempt {j.attempts} of {r.max_attempts} failed, retry at {H.clock(j.next_retry_at)} "
                    f"({'in ' + H.duration(wait) if wait > 0 else 'due now'})")
            if getattr(j, "tempfail_since", None) is not None and not j.attempts:
                what = (f"asked to retry later (exit 75) for {H.duration(r.now - j.tempfail_since)}, retry at "
                        f"{H.clock(j.next_retry_at)}")
        summary = error_summary(j.last_error)
        rev = revision(j)
        out.append(f"  {j.key}  {what}{'  ' + rev if rev else ''}" + (f": {summary[0]}" if summary else ""))
        out += [f"      {line}" for line in summary[1:]]
        stage = stage_of(j.last_error or "")
        if stage and "\n" in (j.last_error or ""):
            log = os.path.join(result_dir(r.cache_dir, j.run, j.iteration, j.benchmark), LOG_FILE[stage])
            out.append(f"      log: {log}")
    return out


def notes(r: Report) -> list[str]:
    rows = [j for j in r.jobs if j.last_error and j.state not in (L.FAILED, *L.RUNNING, L.INFERRED)]
    out, shown = limited("notes", rows)
    for j in shown:
        summary = error_summary(j.last_error)
        rev = revision(j)
        out.append(f"  {j.key}  {j.state}{'  ' + rev if rev else ''}: {summary[0]}")
        out += [f"      {line}" for line in summary[1:]]
    return out


def tail_sections(r: Report) -> list[str]:
    out: list[str] = []
    if r.set_aside:
        out.append(f"\nrecording set aside: {len(r.set_aside)} result(s) a sink refused {r.set_aside[0]['failures']}+ "
                   f"times (`status --retry-recording` offers them again)")
        for d in r.set_aside:
            out.append(f"  {d['run']:<20} {d['iteration']:>10}  {d['benchmark']:<20} {d['sink']:<8} {d['last_error']}")
    if r.snapshots:
        pinned = sum(s["bytes"] for s in r.snapshots if s["state"] in (L.PINNING, L.PINNED))
        out.append(f"\nsnapshots: {len(r.snapshots)} held, {pinned / 1e6:.1f} MB pinned")
        for s in r.snapshots:
            out.append(f"  {s['run']:<20} {s['iteration']:>10}  {s['state']:<9} {s['bytes'] / 1e6:>9.1f} MB  "
                       f"{s['path'] or s['source']}{'  (' + s['note'] + ')' if s['note'] else ''}")
    for run, n in r.not_configured:
        out.append(f"\nrun {run}: not configured now ({n} job(s) left as they are; a renamed run is evaluated "
                   f"again under its new name)")
    return out


# ---- JSON ---------------------------------------------------------------------------------------------------
def cell_json(c: Optional[Cell]) -> Optional[dict]:
    if c is None:
        return None
    p = c.progress
    return {"state": c.state, "symbol": c.symbol, "value": c.value, "metric": c.metric, "note": c.note,
            "progress": progress_json(p)}


def progress_json(p: Optional[Progress]) -> Optional[dict]:
    return None if p is None else {"done": p.done, "total": p.total, "updated_at": p.updated_at}


def report_json(r: Report) -> dict:
    doc = r.daemon_doc or {}
    jobs = []
    for j in r.jobs:
        row = dict(j.__dict__)
        row.setdefault("fingerprint", None)
        row.setdefault("revision", 0)
        row["elapsed_s"] = (r.now - j.started_at) if is_running(j.state) and j.started_at else None
        row["progress"] = progress_json(r.progress.get(j.key))
        row["error"] = error_summary(j.last_error)
        jobs.append(row)
    return {
        "schema_version": SCHEMA_VERSION,
        "now": r.now,
        "daemon": {"state": r.daemon_state, "text": r.daemon_text,
                   **{k: doc.get(k) for k in ("pid", "host", "started_at", "beat_at", "stopped_at")}},
        "runs": [{"run": t.run, "configured": t.configured, "root": t.root, "layout": t.layout,
                  "benchmarks": t.benchmarks, "metrics": t.metrics, "counts": t.counts, "iterations": t.iterations,
                  "shown": len(t.rows),
                  "rows": [{"iteration": it, "cells": {b: cell_json(c) for b, c in cells.items()}}
                           for it, cells in t.rows],
                  "best": t.best, "last_comparison": t.comparisons} for t in r.runs],
        "jobs": jobs,
        "unavailable": [u for u in doc.get("unavailable") or [] if r.only_run in (None, u.get("run"))],
        "settings_changed": doc.get("settings_changed") or [],
        "hints": {k: v for k, v in (doc.get("hints") or {}).items() if r.only_run in (None, k)},
        "snapshots": [{k: v for k, v in s.items() if k != "manifest"} for s in r.snapshots],
        "set_aside": r.set_aside,
        "not_configured": [{"run": run, "jobs": n} for run, n in r.not_configured],
        "actions": r.messages,
        "alerts": r.alerts,
    }


# ---- the command ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluator.py status",
        description="Whether the daemon runs, the iteration x benchmark table of each run (headline metric or "
                    "state), jobs in flight with progress, failures with the stage's own message.")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object (keys: evaluator/daemon/status.py)")
    p.add_argument("--run", default=None, help="only this run (a configured run, or one the ledger has)")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help=f"the newest N iterations per run in the table (default {DEFAULT_LAST}; 0: all)")
    p.add_argument("--watch", type=float, nargs="?", const=DEFAULT_WATCH_SECONDS, default=None, metavar="SECONDS",
                   help=f"redraw every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C")
    p.add_argument("--retry-recording", action="store_true",
                   help="offer results a sink refused (set aside after recorder.max_failures) to it again; "
                        "a running daemon picks them up at its next pass")
    p.add_argument("--cancel-jobs", action="store_true",
                   help="executor.type slurm: scancel the jobs in flight (a stopped daemon leaves them running); "
                        "the next start retries them")
    p.add_argument("--check", action="store_true",
                   help=f"exit {CHECK_OPEN_ALERTS} while a regression alert is open (for CI and monitoring)")
    p.add_argument("--ack", action="append", default=None, metavar="ID|all",
                   help="close open alerts: an alert's number (repeatable) or `all` (with --run: that run's)")
    return p


def ack_alerts(cfg: AutoEvalConfig, which: list[str], run: Optional[str]) -> str:
    """Close open alerts by hand (the ledger keeps them, closed by `acknowledged`)."""
    ids = None
    if "all" not in which:
        try:
            ids = [int(x.lstrip("#")) for x in which]
        except ValueError:
            raise EvaluatorError(f"--ack: expected alert numbers or `all`, got {' '.join(which)}") from None
    try:
        writable = L.Ledger(cfg.cache_dir)
        try:
            if ids is not None:
                known = {a["id"]: a for a in writable.alerts(run=run)}
                unknown = [i for i in ids if i not in known]
                if unknown:
                    raise EvaluatorError(f"--ack: no alert #{unknown[0]}{f' of run {run}' if run else ''} (status "
                                         f"lists the open ones with their numbers)")
            n = writable.ack_alerts(ids, run)
        finally:
            writable.close()
    except L.LedgerUnavailable as e:
        raise EvaluatorError(str(e)) from None
    return f"{n} alert(s) acknowledged (closed)"


def retry_recording(cfg: AutoEvalConfig, run: Optional[str]) -> str:
    try:
        writable = L.Ledger(cfg.cache_dir)
        try:
            n = writable.retry_deliveries(run)
        finally:
            writable.close()
    except L.LedgerUnavailable as e:
        raise EvaluatorError(str(e)) from None
    return f"{n} result(s) offered to their sinks again"


def cancel_jobs(cfg, jobs: list[L.Job]) -> str:
    """scancel the Slurm jobs of running rows: those the ledger holds the ids of, and those known only by the
    row's intent token (a daemon killed between sbatch and noting the id): found by their names, as recovery does."""
    from evaluator.daemon.slurm import cancel, job_name, queued_named

    if cfg.executor.type != "slurm":  # a local stage's handle is its pid: never a number to give scancel
        raise EvaluatorError(f"--cancel-jobs: cancels the Slurm jobs of executor.type slurm; this config runs "
                             f"{cfg.executor.type!r} stages (stop the daemon to stop them: its stages stop with it)")

    ids = [j.infer_job for j in jobs if j.state == L.INFERRING and j.infer_job]
    ids += [j.eval_job for j in jobs if j.state in (L.INFERRING, L.INFERRED, L.SCORING) and j.eval_job]
    names = {job_name(j.key, stage, j.token) for j in jobs
             if j.token and j.state in (L.INFERRING, L.INFERRED, L.SCORING)
             for stage in ((INFERENCE, EVALUATION) if j.state == L.INFERRING else (EVALUATION,))}
    cancel(ids)  # those the ledger knows first, whatever squeue says next
    if names:
        try:
            found = [i for i in queued_named(names) if i not in ids]
        except EvaluatorError as e:
            raise EvaluatorError(f"{e} (cancelled the {len(ids)} the ledger knows: {' '.join(ids) or '-'})") from None
        cancel(found)
        ids += found
    return f"cancelled {len(ids)} Slurm job(s): {' '.join(ids) or '-'}"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.last is not None and args.last < 0:
        raise EvaluatorError(f"--last: expected an integer >= 0, got {args.last}")
    if args.watch is not None and not (math.isfinite(args.watch) and args.watch > 0):
        raise EvaluatorError(f"--watch: expected seconds > 0, got {args.watch:g}")
    if args.watch is not None and (args.retry_recording or args.cancel_jobs or args.ack or args.check):
        raise EvaluatorError("--watch only shows; run --retry-recording / --cancel-jobs / --ack / --check once, "
                             "without it")
    cfg = load_config(args.config, require_datasets=False, check_data=False)  # status shows, whatever the data
    last = args.last if args.last is not None else DEFAULT_LAST
    report = gather(cfg, args.config, args.run, last, time.time())  # checks --run before changing anything
    messages = []
    if args.retry_recording:
        messages.append(retry_recording(cfg, args.run))
    if args.cancel_jobs:
        messages.append(cancel_jobs(cfg, report.jobs))
    if args.ack:
        messages.append(ack_alerts(cfg, args.ack, args.run))
    if messages:
        report = gather(cfg, args.config, args.run, last, time.time())
        report.messages = messages
    if args.watch is None:
        show(report, args.json)
        return CHECK_OPEN_ALERTS if args.check and open_alerts(report) else 0
    return watch(cfg, args, last, report)


def show(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report_json(report), indent=2) + "\n")
    else:
        sys.stdout.write(render_text(report))
    sys.stdout.flush()  # a closed pipe surfaces here, inside main's BrokenPipeError handler


CLEAR = "\x1b[H\x1b[2J"


def watch(cfg: AutoEvalConfig, args, last: Optional[int], report: Report) -> int:
    """Redraw every args.watch seconds until Ctrl-C; the screen is cleared only on a terminal."""
    tty = sys.stdout.isatty()
    # Ctrl-C ends it even when started with SIGINT ignored (a background job of a non-interactive shell inherits
    # that, and Python then raises no KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            if tty and not args.json:
                sys.stdout.write(CLEAR + f"every {args.watch:g}s, {H.clock(report.now)}  (Ctrl-C ends)\n")
            show(report, args.json)
            if not tty and not args.json:
                sys.stdout.write("\n")
            time.sleep(args.watch)
            report = gather(cfg, args.config, args.run, last, time.time())
    except KeyboardInterrupt:
        return 0
