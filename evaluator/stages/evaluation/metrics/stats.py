"""Aggregation helpers shared by the metric modules: mean, standard error, per-category grouping.

Pure Python (runs in the daemon venv's tests too).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from evaluator.benchmarks.dataset import Sample

UNCATEGORIZED = "(none)"


def mean(xs: Sequence[float]) -> float:
    """Exactly rounded mean (math.fsum), so the result does not depend on the order of the samples."""
    return math.fsum(xs) / len(xs)


def stderr(xs: Sequence[float]) -> Optional[float]:
    """Standard error of the mean: sample standard deviation (ddof=1) / sqrt(n); None when n < 2 (undefined)."""
    n = len(xs)
    if n < 2:
        return None
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def category_groups(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """category -> sample indices (sample order). {} when no sample has a category; samples without one,
    when others have one, are grouped under "(none)" so the groups' n add up to the whole set."""
    if not any(s.category for s in samples):
        return {}
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.category or UNCATEGORIZED, []).append(i)
    return groups


def mean_metric(name: str, scores: Sequence[float], groups: dict[str, list[int]], result,
                value: Optional[float] = None) -> None:
    """Record a mean metric on `result` (a MetricResult): value, stderr, per-sample scores, per-category means.

    `value` is the library's own aggregate when it has one (kept as the reported number); otherwise mean(scores).
    """
    scores = [float(x) for x in scores]
    result.values[name] = float(value) if value is not None else mean(scores)
    err = stderr(scores)
    if err is not None:
        result.stderr[name] = err
    result.per_sample[name] = scores
    for category, idx in groups.items():
        entry = result.per_category.setdefault(category, {"n": len(idx)})
        entry[name] = mean([scores[i] for i in idx])


def sentence_scores(name: str, scores: Sequence[float], result) -> None:
    """Record a corpus metric's sentence-level values (per_sample only: they do not average to the corpus value,
    so no stderr and no per-category mean comes from them)."""
    result.per_sample[name] = [float(x) for x in scores]


def spread(values: Sequence[float], indices: Sequence[int], n: int) -> list[Optional[float]]:
    """Values computed on a subset (sample `indices[k]` has `values[k]`) as a series over all n samples, None
    where the subset has no entry."""
    out: list[Optional[float]] = [None] * n
    for i, v in zip(indices, values):
        out[i] = v
    return out
