#!/usr/bin/env python
"""The daemon at scale: 10,000 Megatron checkpoints x 20 benchmarks (200,000 ledger rows).

    .venvs/daemon/bin/python scripts/bench_scale.py [--output F] [--checkpoints N] [--benchmarks B]
        [--quick] [--before REV]

Real checkpoint folders (`iter_%07d/mp_rank_00/model_optim_rng.pt`, tracker at the newest) and a trivial
`command` benchmark (`true`, then a one-line metrics.json), so every figure is the daemon's own cost:

  first_admission_s                   first scans of the run with an empty ledger, until every row is in
                                      (work only: the configured settle_seconds wait is reported beside it)
  rescan_nothing_new_ms               scan(run) when every checkpoint is known (median)
  pass_ms_200k_rows                   step() with the rows in the ledger, stages running (median; p95/max beside)
  sigterm_to_exit_during_admission_s  the real CLI (tools/evaluator.py), SIGTERM once it logs admitting
  sigterm_to_exit_busy_pass_s         the real CLI on the full ledger, SIGTERM while stages run
  idle_cpu_percent, rss_mb            the real CLI with every row recorded, over --idle-seconds

The in-process figures call the daemon's own code (`build(cfg, selection)` and its methods) in a worker
process whose `evaluator` package is the measured checkout. `--before REV` measures the same figures on an
old commit (a `git worktree` in the temp dir) side by side; the old daemon had no `build()`, so a shim
labelled BEFORE-SHIM below does what its `_run_locked` did before its loop. A figure the old code cannot
give within its time cap is null, with a note saying what was seen. Temp files live under /tmp and are
removed at the end. Timing figures are printed against the goals of issue 12; nothing here asserts speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON_PY = os.path.join(ROOT, ".venvs", "daemon", "bin", "python")
RUN = "scale"
STEP = 100  # iterations between checkpoints (the selection's interval)
GOALS = {  # issue 12, on a 2-core machine
    "first_admission_s": 10.0,
    "rescan_nothing_new_ms": 100.0,
    "pass_ms_200k_rows": 50.0,
    "sigterm_to_exit_during_admission_s": 10.0,
    "sigterm_to_exit_busy_pass_s": 10.0,
    "idle_cpu_percent": 1.0,
    "rss_mb": 300.0,
}
UNITS = {"first_admission_s": "s", "rescan_nothing_new_ms": "ms", "pass_ms_200k_rows": "ms",
         "sigterm_to_exit_during_admission_s": "s", "sigterm_to_exit_busy_pass_s": "s",
         "idle_cpu_percent": "%", "rss_mb": "MB"}
STARTED = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench_scale {time.monotonic() - STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# ---- fixtures (parent) -----------------------------------------------------------------------------
def make_checkpoints(root: str, n: int) -> list[int]:
    """n finished Megatron saves (legacy layout, one rank) and the tracker naming the newest."""
    iterations = [STEP * i for i in range(1, n + 1)]
    os.makedirs(root)
    for it in iterations:
        rank = os.path.join(root, f"iter_{it:07d}", "mp_rank_00")
        os.makedirs(rank)
        with open(os.path.join(rank, "model_optim_rng.pt"), "wb") as f:
            f.write(b"weights")
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iterations[-1]))
    return iterations


def write_config(path: str, ckpt: str, cache: str, benchmarks: int, settle: float, poll: float) -> str:
    """Keys both the current and the pre-rewrite config accept; JSON is YAML."""
    bench = [{"name": f"b{i:02d}", "type": "command", "inference": "true",
              "evaluation": "echo '{{\"acc\": 0.5}}' > metrics.json"} for i in range(benchmarks)]
    cfg = {"auto_eval": {
        "project_name": "bench-scale", "model_name": RUN, "cache_dir": cache,
        "watch": {"paths": [ckpt], "layout": "megatron", "iteration_interval": STEP,
                  "settle_seconds": settle, "poll_seconds": poll},
        "envs": {"inference": os.path.join(ROOT, ".venvs", "inference"),
                 "evaluation": os.path.join(ROOT, ".venvs", "evaluation")},
        "executor": {"gpus": [], "backoff_seconds": 1.0},
        "benchmarks": bench,
    }}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def ledger_count(cache: str, state: Optional[str] = None) -> int:
    path = os.path.join(cache, "ledger.sqlite3")
    if not os.path.exists(path):
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        if state is None:
            return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM jobs WHERE state=?", (state,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


# ---- worker: the daemon's own methods, in a process importing the measured checkout -----------------
class Worker:
    """Runs one phase in-process. `evaluator` comes from --code (asserted), so the old checkout can be measured."""

    def __init__(self, args):
        self.args = args
        self.out = {"phase": args.phase, "notes": {}}
        sys.path.insert(0, args.code)
        import evaluator
        import evaluator.daemon.daemon as D
        from evaluator.daemon import ledger as L
        from evaluator.daemon.checkpoints import Selection
        from evaluator.daemon.config import load_config

        here = os.path.dirname(os.path.abspath(evaluator.__file__))
        assert here == os.path.join(os.path.abspath(args.code), "evaluator"), f"imported {here}, not {args.code}"
        self.D, self.L = D, L
        self.old = not os.path.exists(os.path.join(args.code, "evaluator", "daemon", "build.py"))
        if not self.old:
            import evaluator.daemon.build as B  # the composition root (a module of its own since the rewrite)
            self.B = B
        self.cfg = load_config(args.config)
        w = self.cfg.watch
        self.Selection = Selection
        self.selection = Selection.make(w.begin_iteration, w.end_iteration, w.iteration_interval)
        self.cache = self.cfg.cache_dir
        self.daemon = None
        signal.signal(signal.SIGTERM, self._killed)  # the parent's time cap: keep what was measured

    def save(self) -> None:
        write_json(self.args.result, self.out)

    def _killed(self, *_):
        self.out["killed_by_time_cap"] = True
        self.save()
        os._exit(3)

    def rows(self) -> int:
        return self.daemon.ledger.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    # -- the two code shapes ------------------------------------------------------------------
    def make_daemon(self):
        if not self.old:
            self.daemon = self.B.build(self.cfg, self.selection)
            if self.daemon.watcher is not None:
                self.daemon.watcher.start()  # as run() does (shutdown() joins its thread)
                self.daemon.watching = True
            return self.daemon
        # BEFORE-SHIM: the old Daemon(cfg, selection) made its parts in _run_locked, right before its loop;
        # this is that code, minus the lock, signals, watcher and rescanner threads
        D = self.D
        d = D.Daemon(self.cfg, self.selection)
        d._wake_r, d._wake_w = os.pipe()
        os.set_blocking(d._wake_r, False)
        os.set_blocking(d._wake_w, False)
        d.pythons = d._check_envs()
        ex = self.cfg.executor
        gpus = ex.gpus if ex.gpus is not None else D.detect_gpus()
        lanes = D.Lanes(ex.inference_concurrency or max(1, len(gpus)), ex.evaluation_concurrency, gpus,
                        overlap=ex.overlap_lanes)
        d.executor = D.LocalExecutor(lanes, ex.kill_grace_seconds)
        d.sinks = D.make_sinks(self.cfg)
        d.ledger = D.L.Ledger(self.cfg.cache_dir)
        w = self.cfg.watch
        d.keeper = D.SnapshotKeeper(d.ledger, self.cfg.cache_dir, d.layouts, w.snapshot, w.snapshot_max_gb,
                                    w.snapshot_exclude, d._poke)
        self.daemon = d
        return d

    def close_daemon(self) -> None:
        d = self.daemon
        if not self.old:
            d.shutdown()
            return
        # BEFORE-SHIM: the old _shutdown, minus the threads the shim never started
        for sp in d.executor.stop_all():
            back = self.L.PENDING if sp.stage == "inference" else self.L.INFERRED
            d.ledger.transition(sp.key, back, "daemon stopped mid-stage", pid=None, pid_start=None)
        d.keeper.shutdown()
        d.ledger.close()

    def scan(self) -> None:
        if self.old:
            self.daemon.scan({RUN})  # BEFORE-SHIM: the old scan took a set of runs
        else:
            self.daemon.scan(RUN)

    def settle_at(self) -> Optional[float]:
        d = self.daemon
        return d.settling.get(RUN) if self.old else d.state[RUN].settle_at

    # -- phases -------------------------------------------------------------------------------
    def admission(self) -> None:
        """First scans with an empty ledger, until every row is admitted (or the parent's cap ends it)."""
        total = self.args.total_rows
        self.make_daemon()
        calls = []
        began = time.perf_counter()
        while True:
            t = time.perf_counter()
            self.scan()
            calls.append(time.perf_counter() - t)
            n = self.rows()
            self.out.update(admission_scan_calls=len(calls), admission_work_s=sum(calls),
                            admission_wall_s=time.perf_counter() - began, rows=n,
                            admission_scan_s_max=max(calls))
            self.save()
            if n >= total:
                break
            if len(calls) > 50:
                raise RuntimeError(f"{n}/{total} rows after {len(calls)} scans")
            deadline = self.settle_at()  # files must stand still for settle_seconds after the tracker
            time.sleep(max(0.0, deadline - time.monotonic()) if deadline is not None else 0.05)
        self.out["admission_complete"] = True
        self.close_daemon()
        self.save()

    def fill(self) -> None:
        """Rows put in by SQL (not the daemon's admission) in the measured checkout's schema."""
        ledger = self.L.Ledger(self.cache)
        now = time.time()
        ckpt = self.cfg.watch.paths[0].path
        names = [b.name for b in self.cfg.benchmarks]
        ledger.db.execute("BEGIN")
        ledger.db.executemany(
            "INSERT OR IGNORE INTO jobs (run, iteration, benchmark, path, state, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((RUN, it, name, os.path.join(ckpt, f"iter_{it:07d}"), self.args.state, now, now)
             for it in range(STEP, STEP * (self.args.total_rows // len(names)) + 1, STEP) for name in names))
        ledger.db.execute("COMMIT")
        self.out["rows"] = ledger.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        ledger.close()
        self.save()

    def timed(self, name: str, fn, repeats: int, budget: float) -> None:
        """Median ms of up to `repeats` calls (at least one), stopping early past `budget` seconds."""
        times = []
        began = time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - began < budget):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
            self.out[f"{name}_ms"] = statistics.median(times)
            self.out[f"{name}_ms_max"] = max(times)
            self.out[f"{name}_calls"] = len(times)
            self.save()

    def steady(self) -> None:
        """A restarted daemon on the full ledger: recover, its first scan, rescans with nothing new, the
        parts of a pass, then passes of step() while the trivial stages run."""
        a = self.args
        d = self.make_daemon()
        self.out["rows"] = self.rows()
        self.timed("recover", d.recover, 1, 0)
        self.timed("restart_scan", self.scan, 1, 0)  # known rows loaded, every row reconciled once
        self.timed("rescan_nothing_new", self.scan, 5, a.budget / 6)
        def heartbeat():
            d.last_heartbeat = float("-inf")  # it logs once a minute: make it due
            d.heartbeat()
        self.timed("heartbeat", heartbeat, 3, a.budget / 12)
        # idle() answers "busy" at once while a rescan is pending: time the ledger query behind it
        dirty = d._dirty if self.old else d.dirty
        pending = set(dirty)
        dirty.clear()
        self.timed("idle", d.idle, 3, a.budget / 12)
        dirty.update(pending)
        # range_finished only works with --end-iteration: time it with a finite selection
        sel = d.selection
        d.selection = self.Selection(sel.begin, STEP * (a.total_rows // len(self.cfg.benchmarks)), sel.interval)

        def range_finished():
            d.changed = True  # it answers from the ledger only after a transition
            return d.range_finished()
        self.timed("range_finished", range_finished, 3, a.budget / 12)
        d.selection = sel

        # each part of a pass, timed where step() calls it (the methods' own names, old and new)
        parts = {}
        for name in ("apply_exits", "finish_stage", "scan_changed_runs", "scan", "pin_ahead", "pin_snapshots", "release_retries",
                     "dispatch", "deliver", "record", "heartbeat"):
            fn = getattr(d, name, None)
            if fn is None:
                continue
            parts[name] = []

            def wrapped(*args, _fn=fn, _name=name, **kw):
                t = time.perf_counter()
                self.out["in_progress"] = _name
                try:
                    return _fn(*args, **kw)
                finally:
                    parts[_name].append((time.perf_counter() - t) * 1000)
                    self.out["in_progress"] = None
            setattr(d, name, wrapped)
        passes = []
        began = time.monotonic()
        recorded0 = d.ledger.db.execute("SELECT COUNT(*) FROM jobs WHERE state='recorded'").fetchone()[0]
        while time.monotonic() - began < a.pass_seconds:
            self.out["in_progress_pass_since"] = time.monotonic() - began
            t = time.perf_counter()
            d.step()
            passes.append((time.perf_counter() - t) * 1000)
            self.out.update(passes=len(passes), pass_ms=statistics.median(passes), pass_ms_max=max(passes),
                            pass_ms_p95=sorted(passes)[int(0.95 * (len(passes) - 1))],
                            pass_parts_ms={k: round(statistics.median(v), 3) for k, v in parts.items() if v},
                            pass_parts_ms_max={k: round(max(v), 3) for k, v in parts.items() if v})
            self.save()
            wait = d._sleep_seconds() if self.old else d.sleep_seconds()
            d._sleep(min(wait, 0.25))  # run() sleeps the same way; a SIGCHLD would wake it sooner
        self.out["stages_recorded_during_passes"] = d.ledger.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state='recorded'").fetchone()[0] - recorded0
        self.out["pass_window_s"] = time.monotonic() - began
        self.close_daemon()
        self.save()


def worker_main(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, filename=args.log, format="%(asctime)s %(levelname)-7s %(message)s")
    w = Worker(args)
    getattr(w, args.phase)()
    return 0


# ---- parent: workers and the real CLI -------------------------------------------------------------
class Variant:
    """One checkout being measured: its code, its caches, its figures."""

    def __init__(self, label: str, code: str, work: str):
        self.label, self.code, self.work = label, code, work
        os.makedirs(work)
        self.env = dict(os.environ, PYTHONPATH=code)  # stages started by its CLI import the same checkout
        self.env.pop("PYTHONSTARTUP", None)
        self.figures: dict = {k: None for k in GOALS}
        self.details: dict = {}
        self.notes: dict = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)


def run_worker(v: Variant, phase: str, config: str, cap: float, **extra) -> tuple[dict, bool]:
    """(results, finished): a worker phase under a time cap; past it the worker is stopped and keeps
    what it measured so far."""
    result = v.path(f"{phase}.json")
    cmd = [DAEMON_PY, os.path.abspath(__file__), "--worker", "--phase", phase, "--code", v.code, "--config", config,
           "--result", result, "--log", v.path(f"{phase}.log")]
    for k, val in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(val)]
    with open(v.path(f"{phase}.stderr"), "wb") as err:
        proc = subprocess.Popen(cmd, env=v.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        proc.wait(timeout=cap)
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finished = False
    if proc.returncode not in (0, 3, -signal.SIGKILL):
        with open(v.path(f"{phase}.stderr"), errors="replace") as f:
            raise RuntimeError(f"{v.label} worker {phase} exited {proc.returncode}:\n{f.read()[-3000:]}")
    data = {}
    if os.path.exists(result):
        with open(result) as f:
            data = json.load(f)
    return data, finished


class LogTail:
    """New lines of a growing log, read incrementally (a log of 200,000 lines is not re-read each poll)."""

    def __init__(self, path: str):
        self.path, self.pos, self.partial = path, 0, ""

    def lines(self) -> list[str]:
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        text = self.partial + chunk
        *done, self.partial = text.split("\n")
        return done


class Cli:
    """tools/evaluator.py of a checkout, as a background process."""

    def __init__(self, v: Variant, config: str, name: str):
        self.log_path = v.path(f"{name}.cli.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([DAEMON_PY, os.path.join(v.code, "tools", "evaluator.py"), "--config", config],
                                         env=v.env, cwd=v.work, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.tail = LogTail(self.log_path)

    def wait_for(self, pattern: str, timeout: float) -> Optional[str]:
        """The first new log line matching `pattern`, or None after `timeout` seconds."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.tail.lines():
                if rx.search(line):
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode} before logging /{pattern}/:\n"
                                   f"{self.last_lines()}")
            time.sleep(0.02)
        return None

    def last_lines(self, n: int = 15) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def sigterm(self, cap: float) -> Optional[float]:
        """Seconds from SIGTERM to exit; None (and SIGKILL) if it is still running after `cap`."""
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=cap)
            return time.monotonic() - t
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for pid {pid}")


# ---- one checkout, every figure ---------------------------------------------------------------------
def measure(v: Variant, a, ckpt: str) -> None:
    total = a.checkpoints * a.benchmarks
    caps = a.caps
    cfg_a = write_config(v.path("a.yaml"), ckpt, v.path("cache_a"), a.benchmarks, a.settle, a.poll)

    # 1. first admission (in-process)
    progress(f"{v.label}: first admission of {total} rows (daemon methods, empty ledger)")
    data, finished = run_worker(v, "admission", cfg_a, caps["admission"], total_rows=total)
    v.details["admission"] = {k: data.get(k) for k in ("admission_work_s", "admission_wall_s", "admission_scan_calls",
                                                         "admission_scan_s_max", "rows")}
    if data.get("admission_complete"):
        v.figures["first_admission_s"] = data["admission_work_s"]
        v.notes["first_admission_s"] = (f"{data['admission_scan_calls']} scan(run) call(s) totalling "
                                        f"{data['admission_work_s']:.2f}s" + (
                                            f"; wall {data['admission_wall_s']:.2f}s with the settle_seconds="
                                            f"{a.settle:g} wait between them" if data['admission_scan_calls'] > 1
                                            else ""))
    else:
        rows = ledger_count(v.path("cache_a"))
        rate = rows / caps["admission"] if rows else 0
        v.notes["first_admission_s"] = (f"not finished after {caps['admission']:.0f}s: {rows} of {total} rows "
                                        f"admitted (~{rate:.0f} rows/s" +
                                        (f"; all {total} would take ~{total / rate:.0f}s at that rate)" if rate else ")"))
        progress(f"{v.label}: {v.notes['first_admission_s']}; the rest put in by SQL for the next figures")
        run_worker(v, "fill", cfg_a, caps["fill"], total_rows=total, state="pending")
        v.notes["ledger_a"] = "rows the admission did not reach were inserted by SQL (pending) for the later figures"

    # 2. restart, rescans, parts of a pass, passes (in-process)
    progress(f"{v.label}: restart on {total} rows: recover, scans, step() for {a.pass_seconds:g}s")
    data, finished = run_worker(v, "steady", cfg_a, caps["steady"], total_rows=total, pass_seconds=a.pass_seconds,
                                budget=caps["steady"] / 2)
    keep = ("rows", "recover_ms", "restart_scan_ms", "rescan_nothing_new_ms", "rescan_nothing_new_ms_max",
            "rescan_nothing_new_calls", "heartbeat_ms", "idle_ms", "range_finished_ms", "passes", "pass_ms",
            "pass_ms_p95", "pass_ms_max", "pass_parts_ms", "pass_parts_ms_max", "stages_recorded_during_passes",
            "pass_window_s")
    v.details["steady"] = {k: data.get(k) for k in keep if k in data}
    v.figures["rescan_nothing_new_ms"] = data.get("rescan_nothing_new_ms")
    if data.get("rescan_nothing_new_ms") is not None:
        v.notes["rescan_nothing_new_ms"] = (f"median of {data['rescan_nothing_new_calls']} scan(run), max "
                                            f"{data['rescan_nothing_new_ms_max']:.1f} ms; restart's first scan "
                                            f"{data.get('restart_scan_ms', float('nan')):.0f} ms")
    if data.get("passes"):
        v.figures["pass_ms_200k_rows"] = data["pass_ms"]
        v.notes["pass_ms_200k_rows"] = (f"median of {data['passes']} step() over {data.get('pass_window_s', 0):.0f}s "
                                        f"with {total} rows, stages running; p95 {data['pass_ms_p95']:.1f} ms, max "
                                        f"{data['pass_ms_max']:.1f} ms")
    if not finished:
        where = data.get("in_progress")
        v.notes["steady_cap"] = (f"stopped at the {caps['steady']:.0f}s cap" +
                                 (f", inside {where}() of pass {data.get('passes', 0) + 1} after "
                                  f"{data.get('in_progress_pass_since', 0):.0f}s of passes" if where else ""))
        if not data.get("passes"):
            v.notes["pass_ms_200k_rows"] = "no step() finished before the cap: " + v.notes["steady_cap"]
        progress(f"{v.label}: {v.notes['steady_cap']}")

    # 3. SIGTERM while admitting (real CLI, empty ledger)
    cfg_b = write_config(v.path("b.yaml"), ckpt, v.path("cache_b"), a.benchmarks, a.settle, a.poll)
    progress(f"{v.label}: CLI, SIGTERM while it admits")
    cli = Cli(v, cfg_b, "admission")
    try:
        line = cli.wait_for(r"admitted \d+ job|complete: queued", caps["trigger"])
        t = cli.sigterm(caps["sigterm"])
    finally:
        cli.kill()
    rows = ledger_count(v.path("cache_b"))
    v.figures["sigterm_to_exit_during_admission_s"] = t
    v.details["sigterm_admission"] = {"rows_at_exit": rows, "rows_total": total}
    what = "at its first admission log line" if line else f"after {caps['trigger']:.0f}s without an admission log line"
    v.notes["sigterm_to_exit_during_admission_s"] = (
        f"SIGTERM {what}; {rows}/{total} rows in the ledger at exit" if t is not None else
        f"SIGTERM {what}; still running after {caps['sigterm']:.0f}s (killed); {rows}/{total} rows in the ledger")
    shutil.rmtree(v.path("cache_b"), ignore_errors=True)

    # 4. SIGTERM at startup (recover + first scan of a full ledger) and during a busy pass (real CLI)
    progress(f"{v.label}: CLI on the full ledger, SIGTERM at startup")
    cli = Cli(v, cfg_a, "startup")
    try:
        cli.wait_for(r"daemon started", caps["trigger"])
        time.sleep(0.5)
        t = cli.sigterm(caps["sigterm"])
    finally:
        cli.kill()
    v.details["sigterm_to_exit_at_startup_s"] = t
    v.notes["sigterm_to_exit_at_startup_s"] = ("0.5 s after 'daemon started' (recovery and the first scan of "
                                               f"{total} rows)" + ("" if t is not None else
                                                                   f"; still running after {caps['sigterm']:.0f}s (killed)"))
    progress(f"{v.label}: CLI on the full ledger, SIGTERM during a busy pass")
    cli = Cli(v, cfg_a, "busy")
    try:
        line = cli.wait_for(r": started \(", caps["trigger"])
        if line:
            time.sleep(2.0)  # past startup, in the steady rhythm of passes starting and reaping stages
        t = cli.sigterm(caps["sigterm"])
    finally:
        cli.kill()
    v.figures["sigterm_to_exit_busy_pass_s"] = t
    what = ("2 s after the first stage started" if line else
            f"after {caps['trigger']:.0f}s with no stage started yet (inside its first pass)")
    v.notes["sigterm_to_exit_busy_pass_s"] = f"SIGTERM {what}" + (
        "" if t is not None else f"; still running after {caps['sigterm']:.0f}s (killed)")

    # 5. idle: every row recorded (put in by SQL), default poll_seconds, inotify where available
    cfg_c = write_config(v.path("c.yaml"), ckpt, v.path("cache_c"), a.benchmarks, a.settle, 10.0)
    run_worker(v, "fill", cfg_c, caps["fill"], total_rows=total, state="recorded")
    progress(f"{v.label}: CLI idle over {total} recorded rows, {a.idle_seconds:g}s window")
    cli = Cli(v, cfg_c, "idle")
    try:
        cli.wait_for(r"daemon started", caps["trigger"])
        # startup (recovery, the first scan reconciling every row) first: wait for 2 s under 2 % CPU
        waited = time.monotonic()
        quiet = False
        while time.monotonic() - waited < caps["idle_startup"]:
            c0 = cpu_seconds(cli.proc.pid)
            time.sleep(2.0)
            if cpu_seconds(cli.proc.pid) - c0 < 0.04:
                quiet = True
                break
        startup_wait = time.monotonic() - waited
        c0, t0 = cpu_seconds(cli.proc.pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < a.idle_seconds:
            rss.append(status_mb(cli.proc.pid, "VmRSS"))
            time.sleep(0.5)
        c1, t1 = cpu_seconds(cli.proc.pid), time.monotonic()
        peak = status_mb(cli.proc.pid, "VmHWM")
        if cli.proc.poll() is not None:
            raise RuntimeError(f"idle daemon exited:\n{cli.last_lines()}")
        t = cli.sigterm(caps["sigterm"])
    finally:
        cli.kill()
    v.figures["idle_cpu_percent"] = 100 * (c1 - c0) / (t1 - t0)
    v.figures["rss_mb"] = max(rss)
    v.details.update(rss_peak_mb=peak, sigterm_to_exit_idle_s=t, idle_startup_wait_s=round(startup_wait, 1))
    v.notes["idle_cpu_percent"] = (f"utime+stime over {t1 - t0:.0f}s, poll_seconds=10, {total} recorded rows; "
                                   + (f"startup settled after {startup_wait:.0f}s" if quiet else
                                      f"never under 2 % CPU for 2 s within {caps['idle_startup']:.0f}s of start"))
    v.notes["rss_mb"] = f"max VmRSS in the idle window; VmHWM (peak since start) {peak:.0f} MB"


def met(figures: dict) -> dict:
    return {k: (None if figures.get(k) is None else figures[k] <= goal) for k, goal in GOALS.items()}


def report(variants: list[Variant]) -> str:
    head = f"{'figure':<38} {'goal':>10}" + "".join(f" {v.label:>14} {'met':>5}" for v in variants)
    lines = [head, "-" * len(head)]
    for k, goal in GOALS.items():
        unit = UNITS[k]
        line = f"{k:<38} {'<= ' + format(goal, 'g') + ' ' + unit:>10}"
        for v in variants:
            val = v.figures.get(k)
            ok = met(v.figures)[k]
            line += f" {'null' if val is None else format(val, '.3g') + ' ' + unit:>14} " \
                    f"{'-' if ok is None else ('yes' if ok else 'NO'):>5}"
        lines.append(line)
    for v in variants:
        lines.append(f"\n{v.label} notes:")
        lines += [f"  {k}: {n}" for k, n in v.notes.items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=os.path.join(ROOT, "bench_scale.json"))
    p.add_argument("--checkpoints", type=int, default=None, help="default 10000 (500 with --quick)")
    p.add_argument("--benchmarks", type=int, default=None, help="default 20 (5 with --quick)")
    p.add_argument("--quick", action="store_true", help="500 x 5, short windows (a smoke run, not the figures)")
    p.add_argument("--before", metavar="REV", default=None,
                   help="also measure commit REV (a git worktree in the temp dir), side by side")
    p.add_argument("--idle-seconds", type=float, default=None, help="idle CPU window (default 20, 3 with --quick)")
    p.add_argument("--pass-seconds", type=float, default=None, help="step() window (default 15, 3 with --quick)")
    # worker mode (one phase in a process importing --code)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--phase", "--code", "--config", "--result", "--log", "--state"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--total-rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.pass_seconds = a.pass_seconds or 0.0
        return worker_main(a)
    a.checkpoints = a.checkpoints or (500 if a.quick else 10_000)
    a.benchmarks = a.benchmarks or (5 if a.quick else 20)
    a.idle_seconds = a.idle_seconds or (3.0 if a.quick else 20.0)
    a.pass_seconds = a.pass_seconds or (3.0 if a.quick else 15.0)
    a.settle = 0.3 if a.quick else 1.0
    a.poll = 10.0
    # time caps: past them a figure is null with a note (the pre-rewrite daemon needs them)
    a.caps = {"admission": 90.0, "fill": 300.0, "steady": 240.0, "trigger": 60.0, "sigterm": 45.0,
              "idle_startup": 30.0 if a.quick else 60.0}

    work = tempfile.mkdtemp(prefix="bench_scale_", dir="/tmp")
    worktree = None
    variants: list[Variant] = []
    try:
        progress(f"{a.checkpoints} Megatron checkpoints x {a.benchmarks} benchmarks in {work}")
        ckpt = os.path.join(work, "ckpt")
        make_checkpoints(ckpt, a.checkpoints)
        after = Variant("after", ROOT, os.path.join(work, "after"))
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "evaluator", "recorder", "tools"],
                               capture_output=True, text=True).stdout.strip()
        after.label = f"after {rev}{'+dirty' if dirty else ''}" if rev else "after"  # the working tree is measured
        variants.append(after)
        if a.before:
            worktree = os.path.join(work, "before_src")
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", worktree, a.before], check=True,
                           capture_output=True)
            variants.append(Variant(f"before {a.before}", worktree, os.path.join(work, "before")))
        for v in variants:
            measure(v, a, ckpt)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree], capture_output=True)
            subprocess.run(["git", "-C", ROOT, "worktree", "prune"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    after = variants[0]
    # bench_all.py's table reads `measurements` ({value, unit, notes} rows, as bench_daemon.py writes)
    measurements = {k: {"value": after.figures[k], "unit": UNITS[k],
                        "notes": f"goal <= {goal:g}: {'met' if met(after.figures)[k] else 'NOT met'}"}
                    for k, goal in GOALS.items() if after.figures[k] is not None}
    doc = {**after.figures, "goals": GOALS, "met": met(after.figures), "units": UNITS, "notes": after.notes,
           "measurements": measurements,
           "details": after.details, "code": after.label,
           "setup": {"checkpoints": a.checkpoints, "benchmarks": a.benchmarks, "rows": a.checkpoints * a.benchmarks,
                     "layout": "megatron (iter_%07d/mp_rank_00/model_optim_rng.pt, tracker at the newest)",
                     "stage": "command: inference `true`, evaluation a one-line metrics.json",
                     "settle_seconds": a.settle, "poll_seconds": a.poll, "idle_seconds": a.idle_seconds,
                     "pass_seconds": a.pass_seconds, "caps_s": a.caps, "quick": a.quick},
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if len(variants) > 1:
        b = variants[1]
        doc["before"] = {**b.figures, "met": met(b.figures), "notes": b.notes, "details": b.details, "code": b.label}
    print(report(variants))
    write_json(a.output, doc)
    progress(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
