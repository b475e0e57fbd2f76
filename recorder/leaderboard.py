"""Leaderboard, as Data-Juicer's: for each leaderboard metric, min-max normalise the values over every
(model, iteration) that has it, then sum a (model, iteration)'s normalised values into its score.

Decisions written where they apply:
- a metric that every entry scored the same on (max == min) separates nobody: it adds 0 to each;
- an entry missing a metric gets nothing for it (the table shows how many metrics each entry has);
- higher is better for every metric (as Data-Juicer); leave lower-is-better metrics out of the list.
Metric names are `benchmark.metric` (Data-Juicer's `mmlu.EM`) or `benchmark/metric`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

from evaluator.common.scale import scale_note, scaled
from recorder.sinks import ResultRecord


@dataclass
class Entry:
    model: str
    iteration: int
    tokens_b: Optional[float]
    score: float
    values: dict = field(default_factory=dict)  # metric -> raw value
    normalised: dict = field(default_factory=dict)  # metric -> value in [0, 1]
    label: str = ""


def resolve_metric(name: str, known: set[tuple[str, str]]) -> Optional[tuple[str, str]]:
    """`mmlu.EM` -> ("mmlu", "EM"): split where a known (benchmark, metric) pair results."""
    if "/" in name:
        bench, metric = name.split("/", 1)
        return (bench, metric) if (bench, metric) in known else None
    parts = name.split(".")
    for i in range(1, len(parts)):
        pair = (".".join(parts[:i]), ".".join(parts[i:]))
        if pair in known:
            return pair
    return None


def build(records: Iterable[ResultRecord], metrics: list[str],
          excluded: Iterable[str] = ()) -> tuple[list[Entry], list[str]]:
    """Entries sorted best first, and the leaderboard metrics no record has."""
    excluded = set(excluded)
    points: dict[tuple[str, str], dict[tuple[str, int], float]] = defaultdict(dict)
    tokens: dict[tuple[str, int], Optional[float]] = {}
    for rec in records:
        if rec.run in excluded:
            continue
        for metric, value in rec.metrics.items():
            points[(rec.benchmark, metric)][(rec.run, rec.iteration)] = float(value)
        if rec.tokens_b is not None or (rec.run, rec.iteration) not in tokens:
            tokens[(rec.run, rec.iteration)] = rec.tokens_b
    known = set(points)
    chosen, missing = [], []
    for name in metrics:
        pair = resolve_metric(name, known)
        if pair is None:
            missing.append(name)
        else:
            chosen.append((name, pair))
    entries: dict[tuple[str, int], Entry] = {}
    for name, pair in chosen:
        values = points[pair]
        lo, hi = min(values.values()), max(values.values())
        for who, value in values.items():
            e = entries.setdefault(who, Entry(model=who[0], iteration=who[1], tokens_b=tokens.get(who), score=0.0))
            e.values[name] = value
            # halves: exact in binary, and hi - lo of two finite metrics near +-1e308 would overflow to inf
            e.normalised[name] = (value / 2 - lo / 2) / (hi / 2 - lo / 2) if hi > lo else 0.0
            e.score += e.normalised[name]
    ordered = sorted(entries.values(), key=lambda e: (-e.score, e.model, e.iteration))
    per_model = defaultdict(int)
    for e in ordered:
        per_model[e.model] += 1
    for e in ordered:
        e.label = e.model if per_model[e.model] == 1 else f"{e.model}@{e.iteration}"
    return ordered, missing


def markdown(entries: list[Entry], metrics: list[str], scale: float = 1) -> str:
    """The table; the metrics' raw values times `scale` (evaluator/common/scale.py), the score as it is."""
    shown = [m for m in metrics if any(m in e.values for e in entries)]
    head = ["rank", "model", "iteration", "tokens (B)", "score", "metrics"] + shown
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for rank, e in enumerate(entries, 1):
        cells = [str(rank), e.model, str(e.iteration), "" if e.tokens_b is None else f"{e.tokens_b:.4g}",
                 f"{e.score:.4f}", f"{len(e.values)}/{len(shown)}"]
        cells += [f"{scaled(e.values[m], scale, m):.4g}" if m in e.values else "" for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\n{scale_note(scale)}\n" if scale_note(scale) else ""
    return "\n".join(lines) + "\n" + note


def as_rows(entries: list[Entry], metrics: list[str]) -> tuple[list[str], list[list]]:
    """Columns and rows for a W&B table (normalised values per metric)."""
    columns = ["label", "model", "iteration", "tokens_b", "score"] + metrics
    rows = [[e.label, e.model, e.iteration, e.tokens_b, e.score] + [e.normalised.get(m) for m in metrics]
            for e in entries]
    return columns, rows
