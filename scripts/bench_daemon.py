#!/usr/bin/env python
"""Benchmark the evaluation daemon: detection latency, scan time, idle cost, executor overhead.

    .venvs/daemon/bin/python scripts/bench_daemon.py --output bench_results.json [--quick]

Every measurement runs the real daemon (tools/evaluator.py) or the real layout classes on a
temporary checkpoint folder; timings come from the ledger's wall-clock timestamps, not its logs.
Checkpoints are whole Megatron saves (iter_%07d/mp_rank_00/model_optim_rng.pt, non-empty), and a daemon
starts nothing before their files stood still for watch.settle_seconds after the tracker (SETTLE_SECONDS
here), so detection latencies include that wait.
Prints progress to stderr, one table to stdout, and writes every number to --output.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluator.daemon.checkpoints import MEGATRON_TRACKER, HuggingFaceLayout, MegatronLayout  # noqa: E402
from evaluator.daemon.ledger import Ledger  # noqa: E402

EVALUATOR = os.path.join(ROOT, "tools", "evaluator.py")
DAEMON_PYTHON = os.path.join(ROOT, ".venvs", "daemon", "bin", "python")
INFERENCE_PYTHON = os.path.join(ROOT, ".venvs", "inference", "bin", "python")
# stages that do almost nothing, so the measured time is the daemon's own
TRIVIAL_BENCHMARK = {
    "name": "echo",
    "inference": "{python} -c 'import sys; open(\"predictions.jsonl\",\"w\").write(sys.argv[1])' {checkpoint}",
    "evaluation": "echo '{{\"acc\": 0.5}}' > metrics.json",
}
STARTED = time.monotonic()
SETTLE_SECONDS = 0.5  # watch.settle_seconds of every daemon started here (the default is 2)


def progress(msg: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def row(value: float, unit: str, notes: str = "", **extra) -> dict:
    return {"value": round(value, 4), "unit": unit, "notes": notes, **extra}


# ---- fixtures --------------------------------------------------------------------------------
def write_config(workdir: str, watch: dict, benchmarks: list[dict]) -> str:
    """A config file in `workdir` watching `workdir/ckpt`; JSON is valid YAML, so no quoting games."""
    cfg = {"auto_eval": {
        "project_name": "bench", "model_name": "bench", "cache_dir": os.path.join(workdir, "cache"),
        "watch": {"paths": [os.path.join(workdir, "ckpt")], "layout": "megatron", "iteration_interval": 1000,
                  "settle_seconds": SETTLE_SECONDS, **watch},
        "executor": {"backoff_seconds": 0.5, "gpus": []},
        "benchmarks": benchmarks,
    }}
    path = os.path.join(workdir, "cfg.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def write_tracker(root: str, iteration: int) -> float:
    """Megatron-style in-place tracker write; returns the wall time just before it."""
    t = time.time()
    with open(os.path.join(root, MEGATRON_TRACKER), "w") as f:
        f.write(str(iteration))
    return t


def write_megatron_save(root: str, iteration: int) -> None:
    """The file a (legacy, one-rank) Megatron save writes; an iter dir without it is never complete."""
    rank = os.path.join(root, f"iter_{iteration:07d}", "mp_rank_00")
    os.makedirs(rank)
    with open(os.path.join(rank, "model_optim_rng.pt"), "wb") as f:
        f.write(b"\0" * 1024)


def make_megatron(root: str, iterations: list[int]) -> None:
    os.makedirs(root, exist_ok=True)
    for it in iterations:
        write_megatron_save(root, it)
    if iterations:
        write_tracker(root, max(iterations))


def make_huggingface(root: str, iterations: list[int]) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    weights = struct.pack("<Q", len(header)) + header + b"\0" * 8
    for it in iterations:
        d = os.path.join(root, f"checkpoint-{it}")
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write('{"model_type": "bench"}')
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(weights)


# ---- the daemon process ----------------------------------------------------------------------
def start_daemon(config: str, workdir: str, *flags: str) -> subprocess.Popen:
    log = open(os.path.join(workdir, "daemon.log"), "wb")
    try:
        return subprocess.Popen([DAEMON_PYTHON, EVALUATOR, "--config", config, *flags], cwd=workdir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child holds its own copy


def stop_daemon(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        progress(f"daemon pid {proc.pid} ignored SIGTERM for 10 s: SIGKILL")
        proc.kill()
        proc.wait()


def daemon_log(workdir: str, lines: int = 20) -> str:
    try:
        with open(os.path.join(workdir, "daemon.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_for_log(proc: subprocess.Popen, workdir: str, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in daemon_log(workdir, 1000):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode} before logging {text!r}:\n{daemon_log(workdir)}")
        time.sleep(0.02)
    raise RuntimeError(f"daemon did not log {text!r} within {timeout:g}s:\n{daemon_log(workdir)}")


def open_ledger(workdir: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{os.path.join(workdir, 'cache', 'ledger.sqlite3')}?mode=ro", uri=True, timeout=5)


# ---- 1. detection latency --------------------------------------------------------------------
def detection_latency(mode: str, poll_seconds: float, n: int, max_gap: float) -> dict:
    """Seconds from a tracker write to the ledger row, over n new checkpoints on a live daemon."""
    progress(f"detection latency, {mode} (poll_seconds={poll_seconds:g}): {n} checkpoints")
    latencies = []
    with tempfile.TemporaryDirectory(prefix="bench_detect_") as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        os.makedirs(ckpt)
        config = write_config(tmp, {"mode": mode, "poll_seconds": poll_seconds}, [TRIVIAL_BENCHMARK])
        proc = start_daemon(config, tmp)
        try:
            wait_for_log(proc, tmp, "watching " if mode == "inotify" else "daemon started")
            time.sleep(0.5)
            db = open_ledger(tmp)
            for i in range(1, n + 1):
                iteration = 1000 * i
                write_megatron_save(ckpt, iteration)
                written = write_tracker(ckpt, iteration)
                deadline = time.monotonic() + poll_seconds + 10 if mode == "polling" else time.monotonic() + 10
                while True:
                    found = db.execute("SELECT created_at FROM jobs WHERE iteration = ?", (iteration,)).fetchone()
                    if found:
                        latencies.append(found[0] - written)
                        break
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{mode}: iteration {iteration} never reached the ledger:\n{daemon_log(tmp)}")
                    time.sleep(0.005)
                if i % 5 == 0 or i == n:
                    progress(f"  {mode}: {i}/{n} detected, last {latencies[-1] * 1000:.1f} ms")
                # a random gap, so writes do not phase-lock to the rescan timer or to stage starts
                time.sleep(random.uniform(0, max_gap))
            db.close()
        finally:
            stop_daemon(proc)
    ms = [x * 1000 for x in latencies]
    note = f"poll_seconds={poll_seconds:g}" + (" (events only)" if mode == "inotify" else "") + \
        f", incl. settle_seconds={SETTLE_SECONDS:g}"
    samples = [round(x, 2) for x in ms]
    return {
        f"detect_{mode}_p50": row(percentile(ms, 50), "ms", f"{note}, n={n}", samples=samples),
        f"detect_{mode}_p95": row(percentile(ms, 95), "ms", f"{note}, max {max(ms):.1f} ms"),
    }


# ---- 2. scan time ----------------------------------------------------------------------------
def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def scan_time(count: int, repeats: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
        progress(f"scan: building a megatron layout with {count} iter dirs")
        root = os.path.join(tmp, "megatron")
        make_megatron(root, [100 * i for i in range(1, count + 1)])
        # files must stand still for settle_seconds after the tracker: the first scan only notes them
        layout = MegatronLayout("bench", root, settle_seconds=0.0)
        layout.scan()
        seconds, found = timed(layout.scan, repeats)
        assert len(found) == count and all(c.complete for c in found), "megatron scan missed checkpoints"
        out["scan_megatron_10k"] = row(seconds * 1000, "ms", f"{count} iter dirs, deep checks (rank files, settle "
                                                              f"signature), median of {repeats}")

        progress(f"scan: building a huggingface layout with {count} checkpoint dirs")
        root = os.path.join(tmp, "hf")
        iterations = [100 * i for i in range(1, count + 1)]
        make_huggingface(root, iterations)
        first, settled = [], []
        for _ in range(repeats):  # a fresh layout each time: its settle tracker starts empty
            layout = HuggingFaceLayout("bench", root, settle_seconds=0.0)
            t = time.perf_counter()
            found = layout.scan()
            first.append(time.perf_counter() - t)
            n_first = sum(c.complete for c in found)
            t = time.perf_counter()
            found = layout.scan()
            settled.append(time.perf_counter() - t)
            n_settled = sum(c.complete for c in found)
        assert n_settled == count, f"huggingface second scan found {n_settled}/{count} complete"
        known = frozenset(iterations)
        seconds, found = timed(lambda: HuggingFaceLayout("bench", root).scan(known), repeats)
        assert len(found) == count
        out["scan_hf_10k_first"] = row(statistics.median(first) * 1000, "ms",
                                       f"deep checks, {n_first}/{count} complete (no trainer_state.json: settling)")
        out["scan_hf_10k_settled"] = row(statistics.median(settled) * 1000, "ms",
                                         f"deep checks again, settle_seconds=0: {n_settled}/{count} complete")
        out["scan_hf_10k_known"] = row(seconds * 1000, "ms", f"all in known_complete, median of {repeats}")
        progress("scan: done")
    return out


# ---- 3. idle cost ----------------------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def proc_cpu_seconds_precise(pid: int) -> Optional[float]:
    """Run time of all live threads from schedstat (ns, finer than 10 ms ticks); None without schedstat."""
    if not os.path.exists(f"/proc/{pid}/schedstat"):
        return None
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # the thread exited since listdir
    return total / 1e9


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def idle_cost(window: float, checkpoints: int = 100) -> dict:
    """CPU % and RSS of a daemon with nothing to do: every checkpoint already recorded."""
    progress(f"idle: daemon over {checkpoints} recorded checkpoints, sampling for {window:g}s")
    with tempfile.TemporaryDirectory(prefix="bench_idle_") as tmp:
        iterations = [1000 * i for i in range(1, checkpoints + 1)]
        make_megatron(os.path.join(tmp, "ckpt"), iterations)
        Ledger(os.path.join(tmp, "cache")).close()  # the daemon's own schema
        db = sqlite3.connect(os.path.join(tmp, "cache", "ledger.sqlite3"))
        now = time.time()
        with db:
            db.executemany("INSERT INTO jobs (run, iteration, benchmark, path, state, created_at, updated_at)"
                           " VALUES ('bench', ?, 'echo', ?, 'recorded', ?, ?)",
                           [(it, os.path.join(tmp, "ckpt", f"iter_{it:07d}"), now, now) for it in iterations])
        db.close()
        config = write_config(tmp, {"mode": "inotify"}, [TRIVIAL_BENCHMARK])  # default poll_seconds (10)
        proc = start_daemon(config, tmp)
        try:
            wait_for_log(proc, tmp, "watching ")
            time.sleep(3.0)  # let startup (imports, env probes, first scan) finish
            cpu0, fine0, t0 = proc_cpu_seconds(proc.pid), proc_cpu_seconds_precise(proc.pid), time.monotonic()
            rss = []
            while time.monotonic() - t0 < window:
                rss.append(proc_rss_mib(proc.pid))
                time.sleep(0.5)
            cpu1, fine1, t1 = proc_cpu_seconds(proc.pid), proc_cpu_seconds_precise(proc.pid), time.monotonic()
            if proc.poll() is not None:
                raise RuntimeError(f"idle daemon exited {proc.returncode}:\n{daemon_log(tmp)}")
        finally:
            stop_daemon(proc)
    tick = 1 / os.sysconf("SC_CLK_TCK")
    pct = 100 * (cpu1 - cpu0) / (t1 - t0)
    out = {
        "idle_cpu": row(pct, "%", f"/proc stat over {t1 - t0:.0f}s (resolution {100 * tick / (t1 - t0):.2f}%); "
                                  f"inotify, poll_seconds=10, {checkpoints} recorded ckpts"),
        "idle_rss": row(statistics.mean(rss), "MiB", f"max {max(rss):.1f} MiB; startup used {cpu0:.2f} CPU-s"),
    }
    if fine0 is not None:
        out["idle_cpu_schedstat"] = row(100 * (fine1 - fine0) / (t1 - t0), "%", "same window, per-thread schedstat (ns)")
    return out


# ---- 4. executor overhead --------------------------------------------------------------------
def stage_seconds(db: sqlite3.Connection, start: str, end: str) -> list[float]:
    """Per job: seconds from its `start` transition to the following `end` transition."""
    started, spans = {}, []
    for ts, run, iteration, bench, to_state in db.execute(
            "SELECT ts, run, iteration, benchmark, to_state FROM events ORDER BY id"):
        key = (run, iteration, bench)
        if to_state == start:
            started[key] = ts
        elif to_state == end and key in started:
            spans.append(ts - started.pop(key))
    return spans


def executor_overhead(k: int) -> dict:
    progress(f"executor: --once over a backlog of {k} checkpoints")
    with tempfile.TemporaryDirectory(prefix="bench_exec_") as tmp:
        make_megatron(os.path.join(tmp, "ckpt"), [1000 * i for i in range(1, k + 1)])
        config = write_config(tmp, {"mode": "inotify"}, [TRIVIAL_BENCHMARK])
        began = time.time()
        proc = start_daemon(config, tmp, "--once")
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"--once over {k} checkpoints took over 120 s:\n{daemon_log(tmp)}") from None
        finally:
            stop_daemon(proc)
        wall = time.time() - began
        if proc.returncode != 0:
            raise RuntimeError(f"--once exited {proc.returncode}:\n{daemon_log(tmp)}")
        db = open_ledger(tmp)
        recorded = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'recorded'").fetchone()[0]
        if recorded != k:
            raise RuntimeError(f"--once recorded {recorded}/{k} jobs:\n{daemon_log(tmp)}")
        infer = stage_seconds(db, "inferring", "inferred")
        score = stage_seconds(db, "scoring", "scored")
        first_ts, last_ts = db.execute("SELECT MIN(ts), MAX(ts) FROM events").fetchone()
        db.close()
    progress("executor: timing the stage venv's interpreter startup")
    startup = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run([INFERENCE_PYTHON, "-c", "pass"], check=True)
        startup.append(time.perf_counter() - t)
    module = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([INFERENCE_PYTHON, "-m", "evaluator.stages.command", "--help"], check=True,
                       stdout=subprocess.DEVNULL)
        module.append(time.perf_counter() - t)
    per_ckpt = wall / k
    serial = statistics.mean(infer) + statistics.mean(score)
    return {
        "exec_wall_per_ckpt": row(per_ckpt * 1000, "ms", f"--once wall {wall:.2f}s / K={k} "
                                                          f"(incl. daemon startup, settle_seconds={SETTLE_SECONDS:g})"),
        "exec_steady_per_ckpt": row((last_ts - first_ts) / k * 1000, "ms", "first to last ledger event / K (no startup)"),
        "exec_daemon_startup": row((first_ts - began) * 1000, "ms", "process start to first ledger event"),
        "exec_infer_stage_mean": row(statistics.mean(infer) * 1000, "ms", "ledger inferring->inferred"),
        "exec_eval_stage_mean": row(statistics.mean(score) * 1000, "ms", "ledger scoring->scored"),
        "exec_overhead_per_ckpt": row((per_ckpt - serial) * 1000, "ms",
                                      "wall/K minus (infer+eval mean); <0 = lanes overlap"),
        "exec_python_startup": row(statistics.median(startup) * 1000, "ms",
                                   "floor: .venvs/inference/bin/python -c pass, median of 10"),
        "exec_stage_module_startup": row(statistics.median(module) * 1000, "ms",
                                         "python -m evaluator.stages.command --help, median of 5"),
    }


# ---- main ------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_results.json", help="JSON file for every number")
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter windows (~1 min)")
    args = parser.parse_args()
    quick = args.quick
    poll_seconds = 1.0

    measurements = {}
    measurements.update(detection_latency("inotify", 3600.0, 8 if quick else 20, max_gap=0.25))
    measurements.update(detection_latency("polling", poll_seconds, 8 if quick else 20, max_gap=poll_seconds))
    measurements.update(scan_time(10_000, 3 if quick else 5))
    measurements.update(idle_cost(10.0 if quick else 20.0))
    measurements.update(executor_overhead(10 if quick else 20))

    print(f"{'measure':<24} {'value':>10}  {'unit':<5} notes")
    for name, m in measurements.items():
        print(f"{name:<24} {m['value']:>10.3f}  {m['unit']:<5} {m['notes']}")
    result = {
        "measurements": measurements,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    progress(f"done in {time.monotonic() - STARTED:.0f}s; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
