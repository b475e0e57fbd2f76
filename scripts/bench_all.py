#!/usr/bin/env python
"""`make bench`: every benchmark script of the project in one run, one table, one JSON file.

    .venvs/daemon/bin/python scripts/bench_all.py [--output bench_results.json] [--quick]

Runs, each in the python it needs (each script re-executes itself in its venv where it must):
  scripts/bench_daemon.py     detection latency p50/p95 (inotify, polling), scan of 10,000 dirs, idle CPU/RSS,
                              executor overhead per checkpoint
  scripts/bench_pipeline.py   a backlog of 20 checkpoints, overlapping lanes vs strictly serial
  scripts/bench_inference.py  hf backend batched vs a per-sample loop (samples/s, ratio)
  scripts/bench_metrics.py    CIDEr-D / METEOR through our evaluation stage vs aac-metrics directly
  scripts/bench_scale.py      10,000 checkpoints x 20 benchmarks: first admission, rescan, pass time, SIGTERM -> exit,
                              idle CPU, RSS, each beside its goal (issue 12)
  scripts/bench_loglikelihood.py   loglikelihood multiple choice: unbatched vs batched vs lm-evaluation-harness (real model)
  scripts/bench_checkpoint_cost.py per-checkpoint cost: one process per stage vs sessions vs warm workers vs the limit,
                              K = 1, 3, 5 benchmarks on the real model (issue 13); again with --backend vllm
  scripts/check_vllm_reload.py     vLLM's in-place weight reload vs a fresh engine on the new checkpoint (real model)
  scripts/bench_compare.py    checkpoint comparison vs prev/best: McNemar, bootstrap, end to end, per checkpoint, n <= 10k
Every figure is measured here, in this run; a section that fails is reported as failed, not filled in.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON_PY = os.path.join(ROOT, ".venvs", "daemon", "bin", "python")
VLLM_PY = os.path.join(ROOT, ".venvs", "inference-vllm-cpu", "bin", "python")
SECTIONS = [  # name, script, extra args (normal), extra args (--quick); the vllm ones need VLLM_PY
    ("daemon", "bench_daemon.py", [], ["--quick"]),
    ("pipeline", "bench_pipeline.py", ["--checkpoints", "20"], ["--checkpoints", "8"]),
    ("inference", "bench_inference.py", [], []),
    ("metrics", "bench_metrics.py", [], []),
    ("scale", "bench_scale.py", [], ["--quick"]),
    # issue 13, on the real model (`make real-model`, a dependency of `make bench`)
    ("loglikelihood", "bench_loglikelihood.py", ["--model", os.path.join(ROOT, ".venvs", "models", "smollm2-135m-instruct")],
     ["--model", os.path.join(ROOT, ".venvs", "models", "smollm2-135m-instruct"), "--repeats", "1"]),
    ("checkpoint_cost", "bench_checkpoint_cost.py", [], ["--ks", "1,5", "--samples", "20"]),
    # the same with real vLLM (its CPU build, `make setup-vllm-cpu`), and why a vllm worker does not reload weights
    ("checkpoint_cost_vllm", "bench_checkpoint_cost.py", ["--backend", "vllm"],
     ["--backend", "vllm", "--vllm-eager", "--ks", "1,5", "--samples", "20", "--checkpoints", "2"]),
    ("vllm_reload", "check_vllm_reload.py", [], ["--eager"]),
    ("compare", "bench_compare.py", [], ["--quick"]),  # cheap: ~30 s (~6 s with --quick: n = 500, 2000)
]


def flatten(prefix: str, value, out: list) -> None:
    """Nested JSON -> (dotted name, number, unit, notes) rows; bench_daemon's {value, unit, notes} rows kept whole."""
    if isinstance(value, dict) and "value" in value and isinstance(value["value"], (int, float)):
        out.append((prefix, value["value"], value.get("unit", ""), value.get("notes", "")))
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):  # e.g. bench_inference's runs: named by their model and device
        for i, item in enumerate(value):
            name = "_".join(str(item[k]) for k in ("model", "device") if isinstance(item, dict) and k in item) or str(i)
            flatten(f"{prefix}.{name}", item, out)
    elif isinstance(value, bool):  # a yes/no finding (identical outputs, reload equals fresh): 1 or 0
        out.append((prefix, int(value), "", "1 = yes"))
    elif isinstance(value, (int, float)):
        out.append((prefix, value, "", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "bench_results.json"))
    parser.add_argument("--quick", action="store_true", help="shorter daemon windows and a smaller backlog")
    args = parser.parse_args()
    results, failed, skipped = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        for name, script, normal, quick in SECTIONS:
            if "vllm" in name and not os.path.isfile(VLLM_PY):  # make setup-vllm-cpu skips CPUs without AVX-512
                skipped[name] = f"no {VLLM_PY} (vLLM's CPU build needs an x86 CPU with AVX-512)"
                print(f"[bench] {name}: skipped, {skipped[name]}", file=sys.stderr, flush=True)
                continue
            out = os.path.join(tmp, f"{name}.json")
            cmd = [DAEMON_PY, os.path.join(ROOT, "scripts", script), "--output", out] + (quick if args.quick else normal)
            print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            code = subprocess.call(cmd, cwd=ROOT)
            if code != 0 or not os.path.exists(out):
                failed.append(name)
                results[name] = {"failed": f"{script} exited {code}"}
                continue
            with open(out) as f:
                results[name] = json.load(f)
            results[name]["section_wall_s"] = round(time.monotonic() - t0, 1)
    rows: list = []
    for name, data in results.items():
        flatten(name, data.get("measurements", data) if isinstance(data, dict) else data, rows)
    print(f"\n{'figure':<52} {'value':>12} {'unit':<5} notes")
    for key, value, unit, notes in rows:
        print(f"{key:<52} {value:>12.4g} {unit:<5} {notes}")
    for name in failed:
        print(f"{name:<52} {'FAILED':>12}       {results[name]['failed']}")
    for name, why in skipped.items():
        print(f"{name:<52} {'skipped':>12}       {why}")
    doc = {"sections": results, "failed": failed, "skipped": skipped,
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(args.output, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
