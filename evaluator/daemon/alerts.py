"""Regression alerts: the rules of the config's `alerts:` section, checked as pure functions over values.

Three kinds of rule (docs/insight.md, "Regression alerts"):
- **drop**: a metric worse than a reference by more than `drop` (absolute) or `drop_relative` (a fraction of the
  reference). The reference is the previous checkpoint's value (`versus: prev`), the run's best so far (`best`),
  both read from the paired comparison (compare.json), or a fixed `threshold`. `min_n` and `significant: a`
  (the comparison's paired-test p < a) keep noise out. `direction: lower` for metrics where lower is better.
- **stuck**: a metric exactly 0 or exactly 1 on `stuck: K` consecutive checkpoints with a result.
- **failed**: a stage of one (checkpoint, benchmark) failed `failed: K` times (attempts; exit 75 does not count).

`evaluate` / `evaluate_failure` return one `Check` per rule that applies: FIRE (with the alert's message), PASS
(the checkpoint does not break the rule: an open alert of that rule for that run and benchmark at this iteration
or before closes) or UNKNOWN (the rule could not be checked: no comparison yet, too few samples, the metric
missing; nothing fires, nothing closes). The daemon (insight.py, `Insight`) stores, logs and delivers them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from evaluator.daemon.best import reported  # the one rule for "metrics.json carries this name"

FIRE, PASS, UNKNOWN = "fire", "pass", "unknown"
DROP, STUCK, FAILED = "drop", "stuck", "failed"
VERSUS = ("prev", "best", "threshold")
STUCK_VALUES = (0.0, 1.0)
EPS = 1e-12  # a drop of exactly `drop` counts despite float rounding of new - old


@dataclass(frozen=True)
class Rule:
    """One alert rule, checked per (run, checkpoint, benchmark). `id` is stable across restarts (the ledger keys
    alerts on it): the rule's `name:`, else a description of what it checks."""

    id: str
    kind: str  # DROP | STUCK | FAILED
    benchmark: Optional[str]  # None: any benchmark (failed rules only)
    metric: Optional[str] = None
    versus: Optional[str] = None  # prev | best | threshold (drop rules)
    drop: float = 0.0
    drop_relative: Optional[float] = None
    threshold: Optional[float] = None
    higher_is_better: bool = True
    min_n: Optional[int] = None
    significant: Optional[float] = None  # fire only when the paired test's p < this
    count: Optional[int] = None  # K of stuck / failed

    def applies_to(self, benchmark: str) -> bool:
        return self.benchmark is None or self.benchmark == benchmark


@dataclass(frozen=True)
class Check:
    rule: Rule
    outcome: str  # FIRE | PASS | UNKNOWN
    text: str  # the alert's message (FIRE), or why it passes / could not be checked


@dataclass(frozen=True)
class Result:
    """What a check needs of one scored result: its metrics.json values and n."""

    run: str
    iteration: int
    benchmark: str
    metrics: dict
    n: Optional[int] = None


# ---- from the config -----------------------------------------------------------------------------------------
def rule_kind(r) -> str:
    """The kind a configured rule (config.AlertRuleConfig, or anything with its attributes) asks for."""
    if r.stuck is not None:
        return STUCK
    if r.failed is not None:
        return FAILED
    return DROP


def describe(r) -> str:
    """A rule's default id: what it checks, e.g. `qa/exact_match drop>=0.05 vs prev p<0.05 n>=100`."""
    kind = rule_kind(r)
    where = r.benchmark or "*"
    if kind == FAILED:
        return f"{where} failed>={r.failed}"
    if kind == STUCK:
        return f"{where}/{r.metric} stuck>={r.stuck}"
    versus = r.versus or ("threshold" if r.threshold is not None else "prev")
    amount = f"drop>={r.drop_relative:g}x" if r.drop_relative is not None else f"drop>={r.drop or 0:g}"
    reference = f"threshold {_fmt(r.threshold)}" if versus == "threshold" else versus
    text = f"{where}/{r.metric} {amount} vs {reference}"
    if getattr(r, "direction", "higher") == "lower":
        text += " (lower is better)"
    if r.significant is not None:
        text += f" p<{r.significant:g}"
    if r.min_n is not None:
        text += f" n>={r.min_n}"
    return text


def build_rules(configured: list) -> list[Rule]:
    """config.AlertRuleConfig items (already checked by `problems`) -> Rules."""
    out = []
    for r in configured:
        kind = rule_kind(r)
        versus = None
        if kind == DROP:
            versus = r.versus or ("threshold" if r.threshold is not None else "prev")
        out.append(Rule(id=r.name or describe(r), kind=kind, benchmark=r.benchmark, metric=r.metric, versus=versus,
                        drop=r.drop or 0.0, drop_relative=r.drop_relative, threshold=r.threshold,
                        higher_is_better=r.direction != "lower", min_n=r.min_n, significant=r.significant,
                        count=r.stuck if kind == STUCK else r.failed if kind == FAILED else None))
    return out


def problems(configured: list, metrics: dict[str, Optional[list[str]]], max_attempts: int,
             did_you_mean) -> list[tuple[tuple, str]]:
    """What is wrong with the configured rules, as (key path under `alerts`, text).

    metrics: benchmark name -> the metric names it reports (None: not knowable before its first result, e.g. a
    command benchmark without `metrics:`; any name is taken then). max_attempts: executor.max_attempts (a failed
    rule asking for more failures than a job may have would never fire)."""
    out: list[tuple[tuple, str]] = []
    ids: dict[str, int] = {}
    for i, r in enumerate(configured):
        loc = ("rules", i)
        kind = rule_kind(r)
        if r.stuck is not None and r.failed is not None:
            out.append((loc + ("failed",), "give one of `stuck:` and `failed:` per rule"))
            continue
        drop_keys = [k for k in ("versus", "drop", "drop_relative", "threshold", "significant", "min_n")
                     if getattr(r, k) is not None] + (["direction"] if r.direction != "higher" else [])
        if kind != DROP and drop_keys:
            out.append((loc + (drop_keys[0],), f"only used by drop rules, not with `{kind}:`"))
        if r.benchmark is None:
            if kind != FAILED:
                out.append((loc + ("benchmark",), "required (only a `failed:` rule may leave it out: any benchmark)"))
        elif r.benchmark not in metrics:
            out.append((loc + ("benchmark",), f"no benchmark named {r.benchmark!r} (configured: "
                                              f"{', '.join(metrics) or 'none'}){did_you_mean(r.benchmark, metrics)}"))
        if kind == FAILED:
            if r.metric is not None:
                out.append((loc + ("metric",), "a `failed:` rule counts stage failures; it takes no metric"))
            if r.failed > max_attempts:
                out.append((loc + ("failed",), f"expected at most executor.max_attempts ({max_attempts}): a job is "
                                               f"not tried more often than that, got {r.failed}"))
        elif r.metric is None:
            out.append((loc + ("metric",), "required: the metric the rule watches"))
        elif r.benchmark in metrics and metrics[r.benchmark] is not None and not reported(r.metric,
                                                                                          metrics[r.benchmark]):
            known = metrics[r.benchmark]
            out.append((loc + ("metric",), f"benchmark {r.benchmark!r} reports no metric {r.metric!r} (it reports "
                                           f"{', '.join(known) or 'none'}){did_you_mean(r.metric, known)}"))
        if kind == DROP:
            versus = r.versus or ("threshold" if r.threshold is not None else "prev")
            if versus == "threshold" and r.threshold is None:
                out.append((loc + ("threshold",), "required with `versus: threshold`"))
            if versus != "threshold" and r.threshold is not None:
                out.append((loc + ("threshold",), f"only used with `versus: threshold`, not {versus}"))
            if versus == "threshold" and r.significant is not None:
                out.append((loc + ("significant",), "a fixed threshold has no paired test; use it with versus "
                                                    "prev or best"))
            if r.drop is not None and r.drop_relative is not None:
                out.append((loc + ("drop_relative",), "give `drop` (absolute) or `drop_relative`, not both"))
        rid = r.name or describe(r)
        if rid in ids:
            out.append((loc + ("name",), f"the same rule as rules[{ids[rid]}] ({rid!r}); give each a distinct `name:`"))
        ids.setdefault(rid, i)
    return out


# ---- checking ------------------------------------------------------------------------------------------------
def _fmt(v: Optional[float]) -> str:
    return "?" if v is None else f"{v:.4g}"


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _worse_by(rule: Rule, new: float, reference: float) -> float:
    """How much worse `new` is than `reference` (negative: better)."""
    return reference - new if rule.higher_is_better else new - reference


def _breaks(rule: Rule, worse: float, reference: float) -> bool:
    if rule.drop_relative is not None:
        return worse > 0 and worse >= rule.drop_relative * abs(reference) - EPS
    return worse > 0 and worse >= rule.drop - EPS


def _where(result: Result) -> str:
    return f"{result.run}@{result.iteration}/{result.benchmark}"


def check_drop(rule: Rule, result: Result, comparison: Optional[dict]) -> Check:
    new = _number(result.metrics.get(rule.metric))
    if new is None:
        return Check(rule, UNKNOWN, f"metrics.json has no number for {rule.metric!r} "
                                    f"(it has {', '.join(result.metrics) or 'none'})")
    if rule.versus == "threshold":
        if rule.min_n is not None and (result.n is None or result.n < rule.min_n):
            return Check(rule, UNKNOWN, f"n={result.n} < min_n {rule.min_n}")
        worse = _worse_by(rule, new, rule.threshold)
        if not _breaks(rule, worse, rule.threshold):
            return Check(rule, PASS, f"{rule.metric} {_fmt(new)} vs threshold {_fmt(rule.threshold)}")
        side = "below" if rule.higher_is_better else "above"
        return Check(rule, FIRE, f"{_where(result)}: {rule.metric} {_fmt(new)} is {side} the threshold "
                                 f"{_fmt(rule.threshold)} (n={result.n if result.n is not None else '?'}) "
                                 f"[rule {rule.id}]")
    against = ((comparison or {}).get("against") or {}).get(rule.versus)
    if not against:
        return Check(rule, UNKNOWN, f"no comparison with the {rule.versus} checkpoint (compare.json)")
    m = (against.get("metrics") or {}).get(rule.metric)
    if not isinstance(m, dict):
        return Check(rule, UNKNOWN, f"the comparison with the {rule.versus} checkpoint has no {rule.metric!r}")
    old, new_c, n, p = _number(m.get("old")), _number(m.get("new")), m.get("n"), _number(m.get("p"))
    if old is None or new_c is None:
        return Check(rule, UNKNOWN, f"the comparison of {rule.metric!r} has no old/new value")
    if rule.min_n is not None and (not isinstance(n, int) or n < rule.min_n):
        return Check(rule, UNKNOWN, f"n={n} common samples < min_n {rule.min_n}")
    worse = _worse_by(rule, new_c, old)
    old_it = against.get("iteration")
    test = f"{m.get('method') or 'paired test'} p={p:.3g}" if p is not None else "no p-value"
    if not _breaks(rule, worse, old):
        return Check(rule, PASS, f"{rule.metric} {_fmt(new_c)} vs {_fmt(old)} at {old_it}")
    if rule.significant is not None and (p is None or p >= rule.significant):
        return Check(rule, PASS, f"{rule.metric} {_fmt(new_c)} vs {_fmt(old)} at {old_it}: not significant at "
                                 f"{rule.significant:g} ({test})")
    what = "down" if rule.higher_is_better else "up"
    return Check(rule, FIRE, f"{_where(result)}: {rule.metric} {_fmt(new_c)}, {what} {_fmt(abs(worse))} from "
                             f"{_fmt(old)} at iteration {old_it} ({rule.versus}; {test}, n={n}) [rule {rule.id}]")


def check_stuck(rule: Rule, result: Result, history: list[tuple[int, dict]]) -> Check:
    """history: (iteration, metrics) of the run+benchmark's earlier results, oldest first."""
    values = [(it, _number(m.get(rule.metric))) for it, m in history if it < result.iteration]
    values.append((result.iteration, _number(result.metrics.get(rule.metric))))
    last = values[-rule.count:]
    if last[-1][1] is None:
        return Check(rule, UNKNOWN, f"metrics.json has no number for {rule.metric!r}")
    if len(last) < rule.count:
        return Check(rule, PASS, f"{len(last)} of {rule.count} checkpoints so far")
    stuck = next((s for s in STUCK_VALUES if all(v == s for _, v in last)), None)
    if stuck is None:
        return Check(rule, PASS, f"{rule.metric} {_fmt(last[-1][1])}")
    return Check(rule, FIRE, f"{_where(result)}: {rule.metric} is {stuck:g} on the last {rule.count} checkpoints "
                             f"(iterations {', '.join(str(it) for it, _ in last)}) [rule {rule.id}]")


def evaluate(rules: list[Rule], result: Result, comparison: Optional[dict],
             history: list[tuple[int, dict]]) -> list[Check]:
    """Every drop and stuck rule of the result's benchmark, checked against one scored result."""
    out = []
    for rule in rules:
        if not rule.applies_to(result.benchmark) or rule.kind == FAILED:
            continue
        out.append(check_drop(rule, result, comparison) if rule.kind == DROP else check_stuck(rule, result, history))
    return out


def evaluate_failure(rules: list[Rule], run: str, iteration: int, benchmark: str, attempts: int,
                     error: Optional[str]) -> list[Check]:
    """The failed rules of a job whose stage just failed for the `attempts`-th time."""
    first = (error or "").strip().splitlines()[:1]
    out = []
    for rule in rules:
        if rule.kind != FAILED or not rule.applies_to(benchmark):
            continue
        if attempts >= rule.count:
            out.append(Check(rule, FIRE, f"{run}@{iteration}/{benchmark}: failed {attempts} time(s)"
                                         f"{': ' + first[0][:300] if first else ''} [rule {rule.id}]"))
    return out


def evaluate_success(rules: list[Rule], benchmark: str) -> list[Check]:
    """A job of `benchmark` was scored: its failed rules pass (an open failure alert at or before it closes)."""
    return [Check(r, PASS, "scored") for r in rules if r.kind == FAILED and r.applies_to(benchmark)]
