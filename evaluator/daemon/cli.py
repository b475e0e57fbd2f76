"""`python tools/evaluator.py`: run the daemon, plan (--dry-run), or show `status`.

Flags follow Data-Juicer's tools/evaluator.py (begin/end/interval/check-interval/model-type/eval-type).
A user error (config, paths) prints one line per problem and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from typing import Optional

from evaluator.common.errors import EvaluatorError
from evaluator.daemon import ledger as L
from evaluator.daemon import policy as P
from evaluator.daemon.checkpoints import Selection
from evaluator.daemon.config import EVAL_TYPES, LAYOUT_NAMES, AutoEvalConfig, load_config

EPILOG = """subcommands:
  status --config CFG [--json] [--run R] [--retry-recording] [--cancel-jobs]
                                 jobs (state, attempts, last error), snapshots, results a sink refused

examples:
  python tools/evaluator.py --config config/megatron.yaml --begin-iteration 2000
  python tools/evaluator.py --config cfg.yaml --begin-iteration 2000 --iteration-interval 1000 --dry-run --json
  python tools/evaluator.py status --config cfg.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluator.py", description="Watch training checkpoints and evaluate each complete one.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file with an auto_eval: section")
    p.add_argument("--begin-iteration", type=int, default=None,
                   help="first iteration to evaluate (default: the iteration interval, as Data-Juicer)")
    p.add_argument("--end-iteration", type=int, default=None,
                   help="last iteration to evaluate; the daemon exits once it is done (default: watch forever)")
    p.add_argument("--iteration-interval", type=int, default=None,
                   help="evaluate every N iterations from --begin-iteration (default 1000, or watch.iteration_interval)")
    p.add_argument("--check-interval", "--check-iterval", dest="check_interval", type=float, default=None,
                   help="minutes between full rescans (default: watch.poll_seconds, 10 s); inotify events "
                        "are acted on at once regardless")
    p.add_argument("--model-type", choices=LAYOUT_NAMES, default=None,
                   help="checkpoint layout (default: watch.layout, else megatron)")
    p.add_argument("--eval-type", choices=EVAL_TYPES, default="native",
                   help="native: the configured benchmarks (default); gpt / helm: Data-Juicer's evaluation from the "
                        "gpt_evaluation: / helm: section instead (docs/gpt_eval_lm_eval.md)")
    p.add_argument("--once", action="store_true", help="process the checkpoints that exist now, then exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan (which jobs would run) and run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as a JSON array")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def build_status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluator.py status", description="Show the ledger: one row per job.")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="print the rows as a JSON array")
    p.add_argument("--run", default=None, help="only this run")
    p.add_argument("--retry-recording", action="store_true",
                   help="offer results a sink refused (set aside after recorder.max_failures) to it again; "
                        "a running daemon picks them up at its next pass")
    p.add_argument("--cancel-jobs", action="store_true",
                   help="executor.type slurm: scancel the jobs in flight (a stopped daemon leaves them running); "
                        "the next start retries them")
    return p


def apply_flags(cfg: AutoEvalConfig, args) -> Selection:
    w = cfg.watch
    if args.iteration_interval is not None:
        if args.iteration_interval < 1:
            raise EvaluatorError(f"--iteration-interval: expected an integer >= 1, got {args.iteration_interval}")
        w.iteration_interval = args.iteration_interval
    if args.begin_iteration is not None:
        if args.begin_iteration < 0:
            raise EvaluatorError(f"--begin-iteration: expected an integer >= 0, got {args.begin_iteration}")
        w.begin_iteration = args.begin_iteration
    if args.end_iteration is not None:
        w.end_iteration = args.end_iteration
    if args.check_interval is not None:
        if args.check_interval <= 0:
            raise EvaluatorError(f"--check-interval: expected minutes > 0, got {args.check_interval}")
        w.poll_seconds = args.check_interval * 60
    sel = Selection.make(w.begin_iteration, w.end_iteration, w.iteration_interval)
    if sel.end is not None and sel.end < sel.begin:
        raise EvaluatorError(f"--end-iteration: expected >= begin iteration ({sel.begin}), got {sel.end}")
    return sel


def plan(cfg: AutoEvalConfig, selection: Selection, model_type: Optional[str]) -> tuple[list[dict], list]:
    """The jobs a daemon would run now, and the checkpoints it would not (with why)."""
    from evaluator.daemon.build import make_layouts, resolve_runs

    runs = resolve_runs(cfg, model_type)
    layouts = make_layouts(cfg, runs)
    found = {name: layout.scan() for name, layout in layouts.items()}
    settling = [c for cps in found.values() for c in cps if c.settle_deadline is not None]
    if settling:  # settle-based layouts need a second look before anything counts as complete
        wait = max(c.settle_deadline for c in settling) - time.monotonic()
        print(f"dry-run: waiting {max(wait, 0):.1f}s for {len(settling)} checkpoint(s) to settle", file=sys.stderr)
        time.sleep(max(wait, 0))
        found = {name: layout.scan() for name, layout in layouts.items()}
    have: dict[str, dict[int, dict[str, L.Job]]] = {}
    if os.path.exists(os.path.join(cfg.cache_dir, "ledger.sqlite3")):
        led = L.Ledger(cfg.cache_dir, readonly=True)
        for j in led.jobs():
            have.setdefault(j.run, {}).setdefault(j.iteration, {})[j.benchmark] = j
        led.close()
    benchmarks = [b.name for b in cfg.benchmarks]
    tpi = cfg.token_per_iteration
    jobs, not_planned = [], []
    for run in runs:
        for c in found[run.name]:
            if not (c.complete or c.invalid):
                not_planned.append((c, c.reason or "incomplete"))
                continue
            if not selection.selects(c.iteration):
                not_planned.append((c, f"outside begin={selection.begin} end={selection.end} interval={selection.interval}"))
                continue
            rows = have.get(run.name, {}).get(c.iteration, {})
            # the daemon's own admission decision for what the ledger does not have yet
            new = {r.key.benchmark: r for r in P.admit(c, set(rows), run, benchmarks, selection)}
            failed = [r for r in new.values() if r.state == L.FAILED]
            if failed:
                not_planned.append((c, failed[0].error))
            for bench in benchmarks or [None]:
                job = rows.get(bench)
                if job is not None:
                    if P.job_final(job) or not run.runs_benchmark(bench):
                        continue
                elif bench is not None and (bench not in new or new[bench].state != L.PENDING):
                    continue  # not this run's benchmark, or admitted as failed (listed above)
                jobs.append({"run": run.name, "iteration": c.iteration, "path": c.path, "benchmark": bench,
                             "layout": run.layout, "state": job.state if job else "new",
                             "tokens_b": c.iteration * tpi if tpi else None})
    newest = cfg.watch.order == "newest-first"
    jobs.sort(key=lambda j: (-j["iteration"] if newest else j["iteration"], j["run"], j["benchmark"] or ""))
    return jobs, not_planned


def print_plan(jobs: list[dict], not_planned: list, selection: Selection) -> None:
    print(f"selection: begin={selection.begin} end={selection.end or 'none (watch forever)'} interval={selection.interval}")
    if not jobs:
        print("planned: nothing to run now")
    else:
        print(f"planned: {len(jobs)} job(s)")
        print(f"  {'run':<20} {'iteration':>10}  {'benchmark':<20} {'state':<10} path")
        for j in jobs:
            print(f"  {j['run']:<20} {j['iteration']:>10}  {str(j['benchmark'] or '-'):<20} {j['state']:<10} {j['path']}")
    if not_planned:
        print(f"not planned: {len(not_planned)} checkpoint(s)")
        for c, why in not_planned:
            print(f"  {c.run:<20} {c.iteration:>10}  {why}")


def status(argv: list[str]) -> int:
    args = build_status_parser().parse_args(argv)
    cfg = load_config(args.config, require_datasets=False)
    if not os.path.exists(os.path.join(cfg.cache_dir, "ledger.sqlite3")):
        raise EvaluatorError(f"no ledger in cache_dir {cfg.cache_dir}: the daemon has not run with this config yet")
    try:
        led = L.Ledger(cfg.cache_dir, readonly=True)
        jobs = led.jobs(run=args.run)
        snaps = [s for s in led.snapshots([L.PINNING, L.PINNED, L.UNPINNED]) if args.run in (None, s["run"])]
        set_aside = [d for d in led.quarantined() if args.run in (None, d["run"])]
        led.close()
        if args.retry_recording:
            writable = L.Ledger(cfg.cache_dir)
            n = writable.retry_deliveries(args.run)
            writable.close()
            print(f"{n} result(s) offered to their sinks again")
            set_aside = []
    except L.LedgerUnavailable as e:
        raise EvaluatorError(str(e)) from None
    except sqlite3.Error as e:
        raise EvaluatorError(f"cannot read the ledger in {cfg.cache_dir}: {e}") from None
    if args.cancel_jobs:
        from evaluator.daemon.slurm import cancel

        ids = [j.infer_job for j in jobs if j.state == L.INFERRING and j.infer_job]
        ids += [j.eval_job for j in jobs if j.state in (L.INFERRING, L.INFERRED, L.SCORING) and j.eval_job]
        cancel(ids)
        print(f"cancelled {len(ids)} Slurm job(s): {' '.join(ids) or '-'}")
    if args.json:
        print(json.dumps({"jobs": [j.__dict__ for j in jobs],
                          "snapshots": [{k: v for k, v in s.items() if k != "manifest"} for s in snaps]}, indent=2))
        return 0
    print(f"{'run':<20} {'iteration':>10}  {'benchmark':<20} {'state':<10} {'attempts':>8}  {'next retry':<19} last error")
    for j in jobs:
        retry = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.next_retry_at)) if j.next_retry_at else "-"
        first = (j.last_error or "").splitlines()[0] if j.last_error else ""
        if j.state in L.RUNNING + (L.INFERRED,) and (j.infer_job or j.eval_job):
            first = f"slurm jobs {j.infer_job or '-'}/{j.eval_job or '-'} {first}".rstrip()
        print(f"{j.run:<20} {j.iteration:>10}  {j.benchmark:<20} {j.state:<10} {j.attempts:>8}  {retry:<19} {first}")
    counts = {s: sum(1 for j in jobs if j.state == s) for s in L.STATES}
    print("total: " + (", ".join(f"{s}={n}" for s, n in counts.items() if n) or "no jobs"))
    try:
        from evaluator.daemon.build import resolve_runs

        configured = {r.name for r in resolve_runs(cfg)}
    except EvaluatorError:
        configured = None
    if configured is not None:
        stale = sorted({j.run for j in jobs} - configured)
        for run in stale:
            n = sum(1 for j in jobs if j.run == run)
            print(f"run {run}: not configured now ({n} job(s) left as they are; a renamed run is evaluated again "
                  f"under its new name)")
    if set_aside:
        print(f"\nrecording set aside: {len(set_aside)} result(s) a sink refused {set_aside[0]['failures']}+ times "
              f"(`status --retry-recording` offers them again)")
        for d in set_aside:
            print(f"  {d['run']:<20} {d['iteration']:>10}  {d['benchmark']:<20} {d['sink']:<8} {d['last_error']}")
    if snaps:
        pinned = sum(s["bytes"] for s in snaps if s["state"] in (L.PINNING, L.PINNED))
        print(f"\nsnapshots: {len(snaps)} held, {pinned / 1e6:.1f} MB pinned")
        for s in snaps:
            print(f"  {s['run']:<20} {s['iteration']:>10}  {s['state']:<9} {s['bytes'] / 1e6:>9.1f} MB  "
                  f"{s['path'] or s['source']}{'  (' + s['note'] + ')' if s['note'] else ''}")
    for j in jobs:
        if j.state == L.FAILED and j.last_error and "\n" in j.last_error:
            print(f"\n--- {j.run}@{j.iteration}/{j.benchmark}: {j.last_error.splitlines()[0]}; log tail:")
            print("\n".join("    " + line for line in j.last_error.splitlines()[1:]))
    return 0


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    cfg = load_config(args.config, require_datasets=not args.dry_run)
    selection = apply_flags(cfg, args)
    if args.dry_run:
        for b in cfg.benchmarks:
            if b.dataset and not os.path.exists(b.dataset):
                print(f"warning: benchmark {b.name!r}: dataset {b.dataset} does not exist (a real run refuses to start)",
                      file=sys.stderr)
    if args.json and not args.dry_run:
        raise EvaluatorError("--json goes with --dry-run (or with the status subcommand)")
    if args.eval_type != "native":  # Data-Juicer's gpt / helm evaluation replaces the configured benchmarks
        from evaluator.daemon.eval_types import apply_eval_type
        apply_eval_type(cfg, args.eval_type)
    if args.dry_run:
        jobs, not_planned = plan(cfg, selection, args.model_type)
        if args.json:
            print(json.dumps(jobs, indent=2))
        else:
            print_plan(jobs, not_planned, selection)
        return 0
    from evaluator.daemon.build import build

    return build(cfg, selection, args.model_type, once=args.once).run()


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "status":
            return status(argv[1:])
        return run(argv)
    except EvaluatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `status | head`: the reader went away; not an error of ours
        sys.stderr.close()
        return 0
