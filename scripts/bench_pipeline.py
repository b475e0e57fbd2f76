#!/usr/bin/env python
"""Pipelining benchmark: a backlog of K checkpoints through the real daemon with overlapping lanes vs strictly
serial (executor.overlap_lanes: false), side by side in one run.

    .venvs/daemon/bin/python scripts/bench_pipeline.py [--checkpoints 20] [--infer-seconds 1.0]
        [--eval-seconds 0.8] [--output bench_pipeline.json]

Each stage is a command stage that holds its lane for a fixed time (sleep: inference would hold the GPU,
evaluation the CPU), so what is measured is the daemon's scheduling, not model speed. Times come from the
ledger's events. Ratios:
  total/serial                          overlapped wall / strictly serial wall (lower is better)
  total/max(sum inference, sum eval)    overlapped wall / the busier lane's total work (1.0 is the floor)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_daemon import (daemon_log, make_megatron, open_ledger, progress, row, stage_seconds,  # noqa: E402
                          start_daemon, stop_daemon, write_config)


def stage_benchmark(infer_s: float, eval_s: float) -> dict:
    return {"name": "hold",
            "inference": f"{{python}} -c 'import time; time.sleep({infer_s}); open(\"predictions.jsonl\", \"w\").close()'",
            "evaluation": f"{{python}} -c 'import time; time.sleep({eval_s}); "
                          f"open(\"metrics.json\", \"w\").write(\"{{{{\\\"acc\\\": 0.5}}}}\")'"}


def one_backlog(k: int, infer_s: float, eval_s: float, overlap: bool) -> dict:
    label = "overlapping lanes" if overlap else "strictly serial"
    progress(f"pipeline: {k} checkpoints, {label}")
    with tempfile.TemporaryDirectory(prefix="bench_pipe_") as tmp:
        make_megatron(os.path.join(tmp, "ckpt"), [1000 * i for i in range(1, k + 1)])
        config = write_config(tmp, {"mode": "inotify"}, [stage_benchmark(infer_s, eval_s)])
        with open(config) as f:
            cfg = json.load(f)
        cfg["auto_eval"]["executor"]["overlap_lanes"] = overlap
        with open(config, "w") as f:
            json.dump(cfg, f)
        proc = start_daemon(config, tmp, "--once")
        try:
            proc.wait(timeout=60 + k * (infer_s + eval_s) * 3)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"--once over {k} checkpoints did not finish:\n{daemon_log(tmp)}") from None
        finally:
            stop_daemon(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"--once exited {proc.returncode}:\n{daemon_log(tmp)}")
        db = open_ledger(tmp)
        recorded = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'recorded'").fetchone()[0]
        if recorded != k:
            raise RuntimeError(f"recorded {recorded}/{k} jobs:\n{daemon_log(tmp)}")
        infer = stage_seconds(db, "inferring", "inferred")
        score = stage_seconds(db, "scoring", "scored")
        first = db.execute("SELECT MIN(ts) FROM events WHERE to_state = 'inferring'").fetchone()[0]
        last = db.execute("SELECT MAX(ts) FROM events WHERE to_state = 'scored'").fetchone()[0]
        db.close()
    return {"total": last - first, "sum_inference": sum(infer), "sum_evaluation": sum(score)}


def measure(k: int, infer_s: float, eval_s: float) -> dict:
    overlapped = one_backlog(k, infer_s, eval_s, overlap=True)
    serial = one_backlog(k, infer_s, eval_s, overlap=False)
    busier = max(overlapped["sum_inference"], overlapped["sum_evaluation"])
    return {
        "pipeline_total_overlapped": row(overlapped["total"], "s", f"{k} checkpoints, first inference start to last scored"),
        "pipeline_total_serial": row(serial["total"], "s", "same backlog, one stage at a time"),
        "pipeline_sum_inference": row(overlapped["sum_inference"], "s", f"stage wall, inference held {infer_s}s + startup"),
        "pipeline_sum_evaluation": row(overlapped["sum_evaluation"], "s", f"stage wall, evaluation held {eval_s}s + startup"),
        "pipeline_ratio_total_serial": row(overlapped["total"] / serial["total"], "x", "overlapped / serial (lower is better)"),
        "pipeline_ratio_total_busier_lane": row(overlapped["total"] / busier, "x",
                                                "overlapped / max(sum inference, sum evaluation); 1.0 = floor"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--infer-seconds", type=float, default=1.0)
    parser.add_argument("--eval-seconds", type=float, default=0.8)
    parser.add_argument("--output", default="bench_pipeline.json")
    args = parser.parse_args()
    started = time.time()
    result = measure(args.checkpoints, args.infer_seconds, args.eval_seconds)
    for name, m in result.items():
        print(f"{name:<34} {m['value']:>9.3f} {m['unit']:<2} {m['notes']}")
    with open(args.output, "w") as f:
        json.dump({"measurements": result, "checkpoints": args.checkpoints,
                   "wall_s": round(time.time() - started, 1)}, f, indent=2)
    progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
