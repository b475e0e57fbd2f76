#!/usr/bin/env python
"""`make demo`'s operator view of the daemon's results (run with .venvs/daemon/bin/python).

    demo_report.py --config config/demo.yaml --check   prints `done` when every checkpoint on disk is recorded,
                                                       `failed: ...` when a job ended failed/vanished, else `waiting`
    demo_report.py --config config/demo.yaml           iteration x metric table per run, the main metric's first ->
                                                       last change (exit 1 unless it rose), curves.png, W&B run
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluator.daemon import ledger as L  # noqa: E402
from evaluator.daemon.config import load_config  # noqa: E402
from evaluator.daemon.build import resolve_runs  # noqa: E402


def checkpoints_on_disk(root: str) -> set:
    """Iterations whose checkpoint-N/ has its trainer_state.json (written last by the toy trainers)."""
    return {int(os.path.basename(os.path.dirname(p)).split("-")[1])
            for p in glob.glob(os.path.join(root, "checkpoint-*", "trainer_state.json"))}


def check(cfg, runs) -> str:
    path = os.path.join(cfg.cache_dir, "ledger.sqlite3")
    if not os.path.exists(path):
        return "waiting"
    led = L.Ledger(cfg.cache_dir, readonly=True)
    try:
        jobs = led.jobs()
    finally:
        led.close()
    for j in jobs:
        if j.state == L.VANISHED or (j.state == L.FAILED and j.next_retry_at is None):
            return f"failed: {j.run} iteration {j.iteration} {j.benchmark}: {j.state}: {(j.last_error or '')[-800:]}"
    recorded = {(j.run, j.iteration, j.benchmark) for j in jobs if j.state == L.RECORDED}
    for run in runs:
        for it in checkpoints_on_disk(run.root):
            for bench in cfg.benchmarks:
                if run.runs_benchmark(bench.name) and (run.name, it, bench.name) not in recorded:
                    return "waiting"
    return "done"


def report(cfg, runs) -> int:
    main_metric = {b.name: b.main_metric for b in cfg.benchmarks}
    ok = True
    for run in runs:
        hist = os.path.join(cfg.cache_dir, "results", run.name, "history.jsonl")
        rows = [json.loads(line) for line in open(hist)] if os.path.exists(hist) else []
        for bench in sorted({r["benchmark"] for r in rows}):
            mine = sorted((r for r in rows if r["benchmark"] == bench), key=lambda r: r["iteration"])
            names = sorted({k for r in mine for k in r["metrics"]})
            lead = main_metric.get(bench) or names[0]
            names = [lead] + [n for n in names if n != lead]
            print(f"run {run.name} / {bench}")
            print(f"  {'iteration':>9} " + " ".join(f"{n[:14]:>14}" for n in names))
            for r in mine:
                print(f"  {r['iteration']:>9} " + " ".join(
                    f"{r['metrics'][n]:>14.4f}" if n in r["metrics"] else f"{'-':>14}" for n in names))
            first, last = mine[0]["metrics"].get(lead), mine[-1]["metrics"].get(lead)
            rose = first is not None and last is not None and last > first
            ok &= rose
            print(f"  {lead}: {first:.4f} at iteration {mine[0]['iteration']} -> {last:.4f} at "
                  f"{mine[-1]['iteration']} ({'rose' if rose else 'DID NOT RISE'})")
            vs = mine[-1].get("vs_prev")  # the daemon's paired comparison of the last two checkpoints
            if vs:
                print(f"  last two checkpoints: {vs['metric']} {vs['old']:.4f} at {vs['iteration']} -> {vs['new']:.4f}, "
                      f"delta {vs['delta']:+.4f}, p={vs['p']:.3g} ({vs['method']}, n={vs['n']}, "
                      f"{'significant' if vs['significant'] else 'not significant'}; "
                      f"{vs['fixed']} fixed, {vs['broken']} broken)")
        if not rows:
            print(f"run {run.name}: no results recorded")
            ok = False
        best = os.path.join(cfg.cache_dir, "results", run.name, "best.json")
        if os.path.exists(best):
            with open(best) as f:
                b = json.load(f)
            print(f"  best checkpoint: iteration {b['iteration']} ({b['rule']} = {b['score']:.4g}), "
                  f"kept at {os.path.relpath(b.get('snapshot') or b['checkpoint'], ROOT)}")
        curves = os.path.join(cfg.cache_dir, "results", run.name, "curves.png")
        if os.path.exists(curves):
            print(f"  curves: {os.path.relpath(curves, ROOT)} ({os.path.getsize(curves)} bytes)")
        print()
    wandb_dir = os.path.join(cfg.cache_dir, "wandb", "wandb")
    sessions = sorted(glob.glob(os.path.join(wandb_dir, "offline-run-*")))
    if sessions:
        print(f"W&B offline run(s): {len(sessions)} session folder(s) in {os.path.relpath(wandb_dir, ROOT)}")
        print(f"  upload with: .venvs/daemon/bin/wandb sync {os.path.relpath(wandb_dir, ROOT)}")
    print("results tree: " + os.path.relpath(os.path.join(cfg.cache_dir, "results"), ROOT) +
          "/<run>/iter_<N>/<benchmark>/ (predictions.jsonl, run_metadata.json, scores.jsonl, metrics.json, "
          "compare.json, logs)")
    print("compare two checkpoints: .venvs/daemon/bin/python tools/evaluator.py compare --config "
          "config/demo.yaml --run toy-lm 600 900")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "demo.yaml"))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config)
    runs = resolve_runs(cfg)
    if args.check:
        print(check(cfg, runs))
        return 0
    return report(cfg, runs)


if __name__ == "__main__":
    sys.exit(main())
