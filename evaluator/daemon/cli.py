"""`python tools/evaluator.py`: run the daemon, plan (--dry-run), or dispatch a subcommand (status.py, rerun.py,
compare_cli.py).

Flags follow Data-Juicer's tools/evaluator.py (begin/end/interval/check-interval/model-type/eval-type).
A user error (config, paths) prints one line per problem and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from typing import Optional

from evaluator.common.errors import EvaluatorError
from evaluator.daemon import ledger as L
from evaluator.daemon import policy as P
from evaluator.common.checks import MAX_ITERATION
from evaluator.daemon.checkpoints import Selection
from evaluator.daemon.config import EVAL_TYPES, LAYOUT_NAMES, AutoEvalConfig, load_config

EPILOG = """subcommands:
  status --config CFG [--run R] [--last N] [--watch [SECONDS]] [--json] [--retry-recording] [--cancel-jobs]
                                 whether the daemon runs, the iteration x benchmark table (headline metric or
                                 state), jobs in flight with progress, failures with the stage's own message;
                                 [--check] exits 1 while a regression alert is open, [--ack ID|all] closes alerts
  rerun --config CFG [--run R] [--iterations 1000-3000,5000] [--benchmark B ...]
                                 re-evaluate recorded results (current settings)
  invalidate --config CFG [--run R] [--iterations 1000-3000,5000] [--benchmark B ...]
                                 withdraw results from the curves
  compare --config CFG [--run R] [--run-b R2] A [B] | compare DIR_A DIR_B [--json] [--flips N] [--alpha A]
                                 paired comparison of two results (delta, McNemar / bootstrap p, CI, flips);
                                 exit 1 on a significant regression of the main metric

examples:
  python tools/evaluator.py --config config/megatron.yaml --begin-iteration 2000
  python tools/evaluator.py --config cfg.yaml --begin-iteration 2000 --iteration-interval 1000 --dry-run --json
  python tools/evaluator.py status --config cfg.yaml
  python tools/evaluator.py compare --config cfg.yaml 2000 3000
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


def apply_flags(cfg: AutoEvalConfig, args) -> Selection:
    w = cfg.watch
    for flag, value, low in (("--iteration-interval", args.iteration_interval, 1),
                             ("--begin-iteration", args.begin_iteration, 0), ("--end-iteration", args.end_iteration, 0)):
        if value is not None and not low <= value <= MAX_ITERATION:
            raise EvaluatorError(f"{flag}: expected an integer from {low} to {MAX_ITERATION} (2^63-1), got {value}")
    if args.iteration_interval is not None:
        w.iteration_interval = args.iteration_interval
    if args.begin_iteration is not None:
        w.begin_iteration = args.begin_iteration
    if args.end_iteration is not None:
        w.end_iteration = args.end_iteration
    if args.check_interval is not None:
        if not (math.isfinite(args.check_interval) and args.check_interval > 0):
            raise EvaluatorError(f"--check-interval: expected minutes > 0, got {args.check_interval}")
        w.poll_seconds = args.check_interval * 60
    sel = Selection.make(w.begin_iteration, w.end_iteration, w.iteration_interval)
    if sel.end is not None and sel.end < sel.begin:
        where = "--end-iteration" if args.end_iteration is not None else f"{cfg.config_path}: watch.end_iteration"
        begin = ("--begin-iteration" if args.begin_iteration is not None else "watch.begin_iteration"
                 if w.begin_iteration is not None else "the default begin: the iteration interval")
        raise EvaluatorError(f"{where}: expected >= the begin iteration ({sel.begin}, {begin}), got {sel.end}")
    return sel


def plan(cfg: AutoEvalConfig, selection: Selection, model_type: Optional[str]) -> tuple[list[dict], list, dict]:
    """The jobs a daemon would run now, the checkpoints it would not (with why), and per run the set-up hints
    (hints.diagnose: a wrong layout, a path that is a checkpoint itself, nothing selected...)."""
    from evaluator.daemon.hints import diagnose

    from evaluator.daemon.build import check_cache_dir, make_layouts, resolve_runs

    check_cache_dir(cfg)
    runs = resolve_runs(cfg, model_type)
    layouts = make_layouts(cfg, runs)
    found = {name: layout.scan() for name, layout in layouts.items()}
    settling = [c for cps in found.values() for c in cps  # only what it would evaluate is waited for
                if c.settle_deadline is not None and selection.selects(c.iteration)]
    if settling:  # settle-based layouts need a second look before anything counts as complete
        wait = max(c.settle_deadline for c in settling) - time.monotonic()
        print(f"dry-run: waiting {max(wait, 0):.1f}s for {len(settling)} checkpoint(s) to settle", file=sys.stderr)
        time.sleep(max(wait, 0))
        found = {name: layout.scan() for name, layout in layouts.items()}
    from evaluator.daemon.daemon import assess

    have: dict[str, dict[int, dict[str, L.Job]]] = {}
    led = None
    try:
        if os.path.exists(os.path.join(cfg.cache_dir, "ledger.sqlite3")):
            led = L.Ledger(cfg.cache_dir, readonly=True)
        for j in led.jobs() if led else []:
            have.setdefault(j.run, {}).setdefault(j.iteration, {})[j.benchmark] = j
        # what the daemon would hold (a missing dataset, changed settings): nothing of those runs
        by_name = {r.name: r for r in runs}
        held = {b.name: a.hold for b in cfg.benchmarks
                if (a := assess(b, cfg.seed, led, None, cfg.config_path,
                                [r.name for r in runs if P.wanted(by_name, [b.name], r.name, b.name)])).hold}
    except sqlite3.Error as e:
        raise EvaluatorError(f"cannot read the ledger in {cfg.cache_dir}: {e}") from None
    finally:
        if led:
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
                    # a row skipped by an earlier selection that this one takes goes back to pending (reconcile)
                    # (and a vanished one whose checkpoint is complete on disk again)
                    taken_again = (job.state == L.SKIPPED or (job.state == L.VANISHED and c.complete)) \
                        and run.runs_benchmark(bench)
                    if (P.job_final(job) and not taken_again) or not run.runs_benchmark(bench):
                        continue
                elif bench is not None and (bench not in new or new[bench].state != L.PENDING):
                    continue  # not this run's benchmark, or admitted as failed (listed above)
                jobs.append({"run": run.name, "iteration": c.iteration, "path": c.path, "benchmark": bench,
                             "layout": run.layout, "state": job.state if job else "new",
                             "tokens_b": c.iteration * tpi if tpi else None})
    newest = cfg.watch.order == "newest-first"
    for name, why in held.items():
        n = sum(1 for j in jobs if j["benchmark"] == name)
        not_planned.append((name, f"held ({n} job(s) wait): {why}"))
    jobs = [j for j in jobs if j["benchmark"] not in held]
    jobs.sort(key=lambda j: (-j["iteration"] if newest else j["iteration"], j["run"], j["benchmark"] or ""))
    hints = {run.name: diagnose(run.root, run.layout, found[run.name], selection, cfg.watch.pattern) for run in runs}
    return jobs, not_planned, hints


def print_plan(jobs: list[dict], not_planned: list, selection: Selection, hints: dict) -> None:
    print(f"selection: begin={selection.begin} end={selection.end or 'none (watch forever)'} interval={selection.interval}")
    if not jobs:
        print("planned: nothing to run now")
    else:
        print(f"planned: {len(jobs)} job(s)")
        print(f"  {'run':<20} {'iteration':>10}  {'benchmark':<20} {'state':<10} path")
        for j in jobs:
            print(f"  {j['run']:<20} {j['iteration']:>10}  {str(j['benchmark'] or '-'):<20} {j['state']:<10} {j['path']}")
    if not_planned:
        print(f"not planned: {len(not_planned)} checkpoint(s) or benchmark(s)")
        for c, why in not_planned:
            if isinstance(c, str):  # a held benchmark
                print(f"  benchmark {c}: {why}")
            else:
                print(f"  {c.run:<20} {c.iteration:>10}  {why}")
    for run, found in hints.items():
        for h in found:
            print(f"{h.level}: run {run}: {h.text}")


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    # a library's own log file on a full disk (W&B's debug log) would print '--- Logging error ---' and a traceback
    # per line; that sink's failure is reported, counted and retried as the delivery's failure instead
    logging.raiseExceptions = False
    # a dataset that is not there yet holds its benchmark only (the daemon runs the others, and it once it appears)
    cfg = load_config(args.config, require_datasets=False)
    selection = apply_flags(cfg, args)
    if args.json and not args.dry_run:
        raise EvaluatorError("--json goes with --dry-run (or with the status subcommand)")
    if args.eval_type != "native":  # Data-Juicer's gpt / helm evaluation replaces the configured benchmarks
        from evaluator.daemon.eval_types import apply_eval_type
        apply_eval_type(cfg, args.eval_type)
    if args.dry_run:
        jobs, not_planned, hints = plan(cfg, selection, args.model_type)
        if args.json:
            print(json.dumps(jobs, indent=2))
            for run, found in hints.items():  # the plan stays a JSON array on stdout; hints go to stderr
                for h in found:
                    print(f"{h.level}: run {run}: {h.text}", file=sys.stderr)
        else:
            print_plan(jobs, not_planned, selection, hints)
        return 0
    from evaluator.daemon.build import build

    # the daemon runs a W&B service of its own: one inherited from the process that started it (a trainer, a
    # notebook, a test runner) would keep a killed daemon's run open there ("run ID ... is in use"), and every
    # later daemon could not record to that run until that process ended
    os.environ.pop("WANDB_SERVICE", None)
    code = build(cfg, selection, args.model_type, once=args.once).run()
    if threading.active_count() > 1:
        # a sink call still hung (the outbox waits a moment, then leaves it behind): end without waiting for it,
        # and without the interpreter tearing down under a thread that may be writing (an abort, exit -6)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "status":
            from evaluator.daemon import status

            return status.main(argv[1:])
        if argv and argv[0] in ("rerun", "invalidate"):
            from evaluator.daemon import rerun

            return rerun.main(argv[0], argv[1:])
        if argv and argv[0] == "compare":
            from evaluator.daemon import compare_cli

            return compare_cli.main(argv[1:])
        return run(argv)
    except EvaluatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `status | head`: the reader went away; not an error of ours
        # what is still buffered for stdout would fail again at exit ("Exception ignored ... BrokenPipeError")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
