"""`tools/evaluator.py compare`: the paired comparison of two checkpoints (or two runs) on the samples both scored.

    compare --config CFG [--run R] A B          iterations A (old) and B (new) of run R
    compare --config CFG --run R --run-b R2 A [B]   run R at iteration A against run R2 at B (default: A)
    compare DIR_A DIR_B                         two result folders (old, new) directly

The table and the flips come from evaluator/common/compare.py (docs/insight.md). Exit codes: 0 no significant
regression of the main metric, 1 a significant regression (new worse than old at --alpha), 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

from evaluator.common.compare import compare_dirs, render_table
from evaluator.common.contracts import result_dir
from evaluator.common.errors import EvaluatorError, did_you_mean
from evaluator.common.paired import DEFAULT_RESAMPLES, alpha_problem

EXIT_REGRESSION = 1
JSON_SCHEMA_VERSION = 1

EPILOG = """direction: higher is better for every metric the project computes today, so the new result is worse
when its main metric is lower; name a metric with --lower-is-better M (repeatable) to say that for it a rise is
worse. The main metric is --metric, else the benchmark's `main_metric` in the config (when it has per-sample
values), else the first metric of the new result's metrics.json that has per-sample values.

exit codes: 0 no significant regression of the main metric on any benchmark compared; 1 a significant regression
(the new result worse than the old one, p < --alpha); 2 bad input (one line on stderr).

examples:
  python tools/evaluator.py compare --config cfg.yaml 2000 3000
  python tools/evaluator.py compare --config cfg.yaml --run base --run-b lr-sweep 3000
  python tools/evaluator.py compare results/tiny/iter_0002000/qa results/tiny/iter_0003000/qa --json
"""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a result folder and what it is."""

    run: Optional[str]
    iteration: Optional[int]
    path: str

    def label(self) -> str:
        if self.run is None:
            return self.path
        return f"{self.run} iteration {self.iteration}"


@dataclass(frozen=True)
class Pair:
    benchmark: Optional[str]
    old: Side
    new: Side
    main_metric: Optional[str]
    explicit: bool  # named by the user (--benchmark, or folders): a problem with it is an error, not a note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluator.py compare", epilog=EPILOG,
        usage="%(prog)s --config CFG [--run R] [--run-b R2] [options] A [B]\n"
              "       %(prog)s [options] DIR_A DIR_B", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare two results on the samples both scored: per metric the difference, a paired test "
                    "(exact McNemar for 0/1 metrics, a seeded paired bootstrap otherwise), its CI, and the "
                    "samples the new result fixed or broke. A is the old result, B the new one.")
    p.add_argument("items", nargs="+", metavar="A B",
                   help="with --config: iterations A and B (one iteration with --run-b); without: two result folders")
    p.add_argument("--config", default=None, help="YAML file with an auto_eval: section (result folders from its "
                                                  "cache_dir)")
    p.add_argument("--run", default=None, help="the run of A (and of B without --run-b); default: the config's "
                                               "only run")
    p.add_argument("--run-b", default=None, help="the run of B: compare two runs")
    p.add_argument("--benchmark", action="append", default=None,
                   help="a benchmark (repeatable); default: every benchmark both results have")
    p.add_argument("--metric", default=None, help="the main metric (the exit code and the flips follow it)")
    p.add_argument("--lower-is-better", action="append", default=[], metavar="M",
                   help="a metric for which lower values are better (repeatable)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05; the CI is 1-alpha)")
    p.add_argument("--flips", type=int, default=10, metavar="N",
                   help="fixed and broken samples shown of each (default 10)")
    p.add_argument("--seed", type=int, default=0, help="the paired bootstrap's seed (default 0)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"the paired bootstrap's resamples (default {DEFAULT_RESAMPLES})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    return p


def parse_iteration(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise EvaluatorError(f"{text!r}: expected an iteration number (with --config; to compare two result "
                             f"folders leave --config out)") from None
    if value < 0:
        raise EvaluatorError(f"{text!r}: expected an iteration >= 0")
    return value


def iterations_of(cache_dir: str, run: str) -> list[int]:
    folder = os.path.join(cache_dir, "results", run)
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("iter_") and name[5:].isdigit():
            found.append(int(name[5:]))
    return sorted(found)


def benchmarks_in(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))) if os.path.isdir(path) else []


def config_pairs(args) -> list[Pair]:
    """The result folders --config, --run, --run-b, --benchmark and the iterations name."""
    from evaluator.daemon.build import resolve_runs
    from evaluator.daemon.config import load_config

    cfg = load_config(args.config, require_datasets=False, check_data=False)
    try:
        configured = [r.name for r in resolve_runs(cfg)]
    except EvaluatorError:
        configured = []  # a config naming no run still has its results
    results = os.path.join(cfg.cache_dir, "results")
    on_disk = benchmarks_in(results)
    known = list(dict.fromkeys(configured + on_disk))
    for flag, name in (("--run", args.run), ("--run-b", args.run_b)):
        if name is not None and name not in known:
            raise EvaluatorError(f"{flag} {name!r}: no such run in the config or under {results}; known runs: "
                                 f"{', '.join(known) or 'none'}{did_you_mean(name, known)}")
    run_a = args.run
    if run_a is None:
        candidates = configured or on_disk  # a config's one run, though older runs left results beside it
        if len(candidates) != 1:
            raise EvaluatorError(f"--run: {len(candidates) or 'no'} runs ({', '.join(candidates) or '-'}); "
                                 f"name one")
        run_a = candidates[0]
    run_b = args.run_b or run_a
    items = [parse_iteration(x) for x in args.items]
    if run_b == run_a and len(items) != 2:
        raise EvaluatorError(f"expected two iterations A B of run {run_a!r} (or --run-b R2 to compare two runs), "
                             f"got {len(items)}")
    if len(items) > 2:
        raise EvaluatorError(f"expected iterations A [B], got {len(items)}")
    it_a, it_b = items[0], items[-1]
    for run, it in ((run_a, it_a), (run_b, it_b)):
        folder = os.path.dirname(result_dir(cfg.cache_dir, run, it, "x"))
        if not os.path.isdir(folder):
            have = iterations_of(cfg.cache_dir, run)
            raise EvaluatorError(f"run {run!r} has no results at iteration {it} ({folder}); iterations with "
                                 f"results: {', '.join(map(str, have[-20:])) or 'none'}")
    dir_a = os.path.dirname(result_dir(cfg.cache_dir, run_a, it_a, "x"))
    dir_b = os.path.dirname(result_dir(cfg.cache_dir, run_b, it_b, "x"))
    in_a, in_b = benchmarks_in(dir_a), benchmarks_in(dir_b)
    order = [b.name for b in cfg.benchmarks]
    common = sorted(set(in_a) & set(in_b), key=lambda b: (order.index(b) if b in order else len(order), b))
    if args.benchmark:
        for name in args.benchmark:
            if name not in common:
                raise EvaluatorError(f"--benchmark {name!r}: not in both results ({dir_a}: {', '.join(in_a) or '-'}; "
                                     f"{dir_b}: {', '.join(in_b) or '-'}){did_you_mean(name, common)}")
        chosen = list(dict.fromkeys(args.benchmark))
    else:
        if not common:
            raise EvaluatorError(f"no benchmark in both {dir_a} ({', '.join(in_a) or 'none'}) and {dir_b} "
                                 f"({', '.join(in_b) or 'none'})")
        chosen = common
    main = {b.name: b.main_metric for b in cfg.benchmarks}
    return [Pair(b, Side(run_a, it_a, result_dir(cfg.cache_dir, run_a, it_a, b)),
                 Side(run_b, it_b, result_dir(cfg.cache_dir, run_b, it_b, b)),
                 args.metric or main.get(b), bool(args.benchmark)) for b in chosen]


def folder_pairs(args) -> list[Pair]:
    if args.run or args.run_b or args.benchmark:
        raise EvaluatorError("--run, --run-b and --benchmark need --config (without it, name two result folders)")
    if len(args.items) != 2:
        raise EvaluatorError(f"expected two result folders DIR_A DIR_B (old, new), got {len(args.items)} "
                             f"argument(s); with --config: iterations")
    old, new = args.items
    return [Pair(None, Side(None, None, old), Side(None, None, new), args.metric, True)]


def is_regression(comparison: dict, lower_is_better: set[str]) -> bool:
    """A significant change of the main metric in the worse direction (a fall; a rise where lower is better)."""
    m = comparison["metrics"][comparison["main_metric"]]
    worse = m["delta"] > 0 if comparison["main_metric"] in lower_is_better else m["delta"] < 0
    return bool(m["significant"] and worse)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if alpha_problem(args.alpha):
        raise EvaluatorError(f"--alpha: {alpha_problem(args.alpha)}")
    if args.flips < 0:
        raise EvaluatorError(f"--flips: expected a count >= 0, got {args.flips}")
    if args.resamples < 1:
        raise EvaluatorError(f"--resamples: expected a count >= 1, got {args.resamples}")
    pairs = config_pairs(args) if args.config else folder_pairs(args)
    lower = set(args.lower_is_better)
    done, skipped = [], []
    for pair in pairs:
        try:
            # the config's main_metric is a preference (it may be corpus-level); --metric is what the user asked
            comparison = compare_dirs(pair.new.path, pair.old.path, main_metric=pair.main_metric, seed=args.seed,
                                      resamples=args.resamples, alpha=args.alpha, max_flips=args.flips,
                                      strict_main_metric=args.metric is not None,
                                      lower_is_better=frozenset(lower))
        except EvaluatorError as e:
            if pair.explicit:
                raise
            skipped.append((pair, str(e)))
            continue
        done.append((pair, comparison, is_regression(comparison, lower)))
    if not done:
        raise EvaluatorError(f"nothing could be compared: {skipped[0][1]}" +
                             (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    regressed = any(r for _, _, r in done)
    if args.json:
        doc = {"schema_version": JSON_SCHEMA_VERSION, "alpha": args.alpha, "regression": regressed,
               "lower_is_better": sorted(lower),
               "comparisons": [{"benchmark": p.benchmark, "old": side_json(p.old), "new": side_json(p.new),
                                "regression": r, "comparison": c} for p, c, r in done],
               "skipped": [{"benchmark": p.benchmark, "reason": why} for p, why in skipped]}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(render_text(done, skipped, args.alpha, lower))
    sys.stdout.flush()
    return EXIT_REGRESSION if regressed else 0


def side_json(side: Side) -> dict:
    return {"run": side.run, "iteration": side.iteration, "result_dir": side.path}


def render_text(done: list, skipped: list, alpha: float, lower: set[str]) -> str:
    width = shutil.get_terminal_size((100, 24)).columns
    out = []
    for pair, comparison, _ in done:
        title = f"{pair.benchmark}: " if pair.benchmark else ""
        out.append(f"== {title}{pair.old.label()} (old) -> {pair.new.label()} (new)")
        out.append(render_table(comparison, width, frozenset(lower)))
    for pair, why in skipped:
        out.append(f"skipped {pair.benchmark}: {why}")
    verdicts = []
    for pair, comparison, regressed in done:
        name = comparison["main_metric"]
        m = comparison["metrics"][name]
        if regressed:
            verdicts.append(f"REGRESSION {pair.benchmark or pair.new.path} {name}: {m['old']:.4f} -> {m['new']:.4f} "
                            f"(delta {m['delta']:+.4f}, p {m['p']:.2g} < alpha {alpha:g}, {m['method']}, "
                            f"n {m['n']})")
    if not verdicts:
        verdicts.append(f"no significant regression of the main metric at alpha {alpha:g} "
                        f"({len(done)} benchmark(s) compared)")
    return "\n".join(out + verdicts) + "\n"
