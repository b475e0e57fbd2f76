"""The best checkpoint of a run: its `best:` rule, parsed, checked and applied (pure; no files, no ledger).

A rule scores a checkpoint from its recorded metrics: one benchmark/metric pair, or a weighted sum of several
(`weights:`), to be maximised or minimised (`mode`). A checkpoint is a candidate only when every benchmark the
rule needs has a scored/recorded result with the metric in it: a half-evaluated checkpoint never becomes best.
`choose` ranks the candidates best first; the daemon keeps the first `keep_best` snapshots (evaluator/daemon/
insight.py, `Insight.update_best`) and writes `<cache_dir>/results/<run>/best.json`.

Ties go to the earlier iteration: a later checkpoint must be strictly better to take the place of one already
kept (its snapshot is not swapped for an equal one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from evaluator.common.errors import did_you_mean

MODES = ("max", "min")
BEST_FILE = "best.json"  # <cache_dir>/results/<run>/best.json
BEST_SCHEMA_VERSION = 1

# {iteration: {benchmark: {metric: value}}}: what choose() reads (metrics.json's `metrics` per result)
Scores = Mapping[int, Mapping[str, Mapping[str, float]]]
Problem = tuple[tuple, str]  # (key path, message), as evaluator/common/yamlconf.py reports them


@dataclass(frozen=True)
class Term:
    benchmark: str
    metric: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.benchmark}.{self.metric}"


@dataclass(frozen=True)
class BestRule:
    """How a run's checkpoints are ranked; `keep` snapshots of the best are kept (keep_best)."""

    terms: tuple[Term, ...]
    mode: str = "max"
    keep: int = 1

    @property
    def benchmarks(self) -> frozenset[str]:
        return frozenset(t.benchmark for t in self.terms)

    def describe(self) -> str:
        """One line naming the rule, e.g. 'max qa.exact_match' or 'max 0.7*qa.exact_match + 0.3*mc.accuracy'."""
        if len(self.terms) == 1 and self.terms[0].weight == 1.0:
            return f"{self.mode} {self.terms[0].name}"
        return f"{self.mode} " + " + ".join(f"{t.weight:g}*{t.name}" for t in self.terms)


@dataclass(frozen=True)
class Ranked:
    """A candidate checkpoint: its score under the rule and the values that made it."""

    iteration: int
    score: float
    metrics: dict  # {"benchmark.metric": value}


def score(rule: BestRule, results: Mapping[str, Mapping[str, float]]) -> Optional[Ranked]:
    """The rule's score of one checkpoint's results ({benchmark: {metric: value}}), as a Ranked with iteration -1;
    None when a benchmark or metric the rule needs is missing (not a candidate)."""
    values = {}
    for t in rule.terms:
        value = (results.get(t.benchmark) or {}).get(t.metric)
        if value is None or isinstance(value, bool):
            return None
        values[t.name] = float(value)
    total = sum(t.weight * values[t.name] for t in rule.terms)
    return Ranked(-1, total, values)


def choose(rule: BestRule, scores: Scores, exclude: Iterable[int] = ()) -> list[Ranked]:
    """Every candidate checkpoint ranked best first (ties: the earlier iteration first); `exclude`: iterations
    left out (a result compared with the best *other* checkpoint)."""
    skip = set(exclude)
    ranked = []
    for iteration, results in scores.items():
        if iteration in skip:
            continue
        r = score(rule, results)
        if r is not None:
            ranked.append(Ranked(iteration, r.score, r.metrics))
    sign = -1.0 if rule.mode == "max" else 1.0
    return sorted(ranked, key=lambda r: (sign * r.score, r.iteration))


def kept(rule: BestRule, scores: Scores) -> list[Ranked]:
    """The checkpoints whose snapshots are kept: the rule's `keep` best."""
    return choose(rule, scores)[:rule.keep]


def summary(rule: BestRule, best: Ranked) -> dict:
    """ResultRecord.best: {"iteration", "score", "rule"}."""
    return {"iteration": best.iteration, "score": best.score, "rule": rule.describe()}


# ---- parsing and checking the config section (config.py's BestConfig) --------------------------------------------
def parse(section, main_metrics: Mapping[str, Optional[str]]) -> BestRule:
    """A checked `best:` section -> BestRule (`problems` returned nothing for it). A term without `metric` takes
    its benchmark's `main_metric`."""
    if section.weights:
        terms = tuple(Term(w.benchmark, w.metric or main_metrics.get(w.benchmark) or "", float(w.weight))
                      for w in section.weights)
    else:
        terms = (Term(section.benchmark, section.metric or main_metrics.get(section.benchmark) or ""),)
    return BestRule(terms, section.mode, section.keep_best)


def problems(section, loc: tuple, benchmarks: Mapping[str, Optional[list[str]]],
             main_metrics: Mapping[str, Optional[str]], run_benchmarks: Mapping[str, Optional[Iterable[str]]]
             ) -> list[Problem]:
    """What is wrong with one `best:` section at key path `loc`.

    benchmarks: configured benchmark name -> the metric names its results will carry, None where they cannot be
    known before it runs (a `command` benchmark, a dataset not there yet). run_benchmarks: run name -> the
    benchmarks it takes (None: all) for the runs this rule applies to."""
    out: list[Problem] = []
    if section.weights and (section.benchmark or section.metric):
        return [(loc, "give either benchmark/metric or weights (a weighted sum), not both")]
    if not section.weights and not section.benchmark:
        return [(loc + ("benchmark",), "the benchmark whose metric ranks the checkpoints (or `weights:` for a "
                                       "weighted sum of several)")]
    entries = ([(loc + ("weights", i), w.benchmark, w.metric) for i, w in enumerate(section.weights)]
               if section.weights else [(loc, section.benchmark, section.metric)])
    names = list(benchmarks)
    seen = set()
    for where, bench, metric in entries:
        if bench not in benchmarks:
            out.append((where + ("benchmark",), f"no benchmark named {bench!r} (configured: "
                                                f"{', '.join(names) or 'none'}){did_you_mean(bench, names)}"))
            continue
        metric = metric or main_metrics.get(bench)
        if not metric:
            out.append((where + ("metric",), f"which metric of {bench!r} ranks the checkpoints? set `metric:` (or "
                                             f"the benchmark's main_metric)"))
            continue
        if (bench, metric) in seen:
            out.append((where, f"{bench}.{metric} is named twice"))
        seen.add((bench, metric))
        known = benchmarks[bench]
        if known is not None and not reported(metric, known):
            out.append((where + ("metric",), f"benchmark {bench!r} reports no metric {metric!r} (it reports "
                                             f"{', '.join(known)}){did_you_mean(metric, known)}"))
        for run, taken in run_benchmarks.items():
            if taken is not None and bench not in taken:
                out.append((where + ("benchmark",), f"run {run!r} does not evaluate {bench!r} (watch.paths "
                                                    f"benchmarks: {', '.join(taken) or 'none'}): no checkpoint of it "
                                                    f"could ever be best"))
    return out


def reported(metric: str, names: list[str]) -> bool:
    """Whether a metric of that name appears in metrics.json when the benchmark computes `names`: the name
    itself, or a labelled variant of it (sbert_sim is reported as sbert_sim_<model>)."""
    return metric in names or any(metric.startswith(n + "_") for n in names)


def rules_by_run(cfg, run_names: list[str]) -> dict[str, BestRule]:
    """Run name -> its rule: the watch.paths entry's own `best:`, else auto_eval.best; runs without either are
    left out (no best tracking). `run_names` in watch.paths order, as build.resolve_runs makes them."""
    main = {b.name: b.main_metric for b in cfg.benchmarks}
    sections = [p.best or cfg.best for p in cfg.watch.paths] if cfg.watch.paths else [cfg.best]
    return {name: parse(s, main) for name, s in zip(run_names, sections) if s is not None}
