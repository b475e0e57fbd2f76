"""Paired tests for two results on the same samples: is the difference between two checkpoints real or noise?

Standard library only (the daemon calls it once per recorded result; docs/insight.md, "Comparing checkpoints").

- 0/1 metrics (every value on both sides in {0, 1}: exact_match, accuracy): the exact McNemar test, i.e. the
  two-sided binomial test of the discordant pairs at p = 0.5 (statsmodels' `mcnemar(exact=True)`, scipy's
  `binomtest(b, b + c, 0.5)`), computed with exact integers; the CI of the difference of the paired proportions is
  Newcombe's square-and-add interval (Newcombe 1998, method 10: Wilson score limits of both marginals combined
  with the continuity-corrected phi; as in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency
  Tables", ch. 8).
- any other metric: a seeded paired bootstrap of the mean difference (`paired_bootstrap`).
"""
from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Sequence

MCNEMAR = "mcnemar_exact"
BOOTSTRAP = "paired_bootstrap"
NEWCOMBE = "newcombe_square_and_add"  # the CI of a McNemar entry
PERCENTILE = "bootstrap_percentile"  # the CI of a bootstrap entry
DEFAULT_RESAMPLES = 2000


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 * P(X <= min(b, c)), X ~ Binomial(b + c,
    1/2), capped at 1 (scipy's binomtest at p = 0.5 reduces to this: the distribution is symmetric). b + c == 0
    (no discordant pair): 1.0.

    Exact integer arithmetic, one rounding at the end, so it holds for any n (slower past ~10^5 discordant pairs).
    """
    if isinstance(b, bool) or isinstance(c, bool) or not isinstance(b, int) or not isinstance(c, int) \
            or b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: expected two counts >= 0, got {b!r}, {c!r}")
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return 1.0
    term, tail = 1, 1  # C(n, 0), and the sum of C(n, i) for i <= k
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        tail += term
    return min(1.0, (2 * tail) / (1 << n))


def wilson_interval(x: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval (no continuity correction) of a proportion x/n."""
    p = x / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return (centre - half) / scale, (centre + half) / scale


def newcombe_paired_ci(both: int, fixed: int, broken: int, neither: int,
                       level: float = 0.95) -> tuple[float, float]:
    """Newcombe's square-and-add CI (method 10) of new - old for paired 0/1 outcomes.

    both: 1 on both sides; fixed: old 0, new 1; broken: old 1, new 0; neither: 0 on both."""
    n = both + fixed + broken + neither
    if n <= 0:
        raise ValueError("newcombe_paired_ci: no pairs")
    z = _z(level)
    new_hits, old_hits = both + fixed, both + broken
    p_new, p_old = new_hits / n, old_hits / n
    l_new, u_new = wilson_interval(new_hits, n, z)
    l_old, u_old = wilson_interval(old_hits, n, z)
    if 0 in (new_hits, n - new_hits, old_hits, n - old_hits):
        phi = 0.0
    else:
        # the phi coefficient of the 2x2 table, continuity-corrected as Newcombe's method 10 does
        a = both * neither - fixed * broken
        if a > n / 2:
            a = a - n / 2
        elif a >= 0:
            a = 0
        phi = a / math.sqrt(new_hits * (n - new_hits) * old_hits * (n - old_hits))
    delta = p_new - p_old
    lower = delta - math.sqrt(max(0.0, (p_new - l_new) ** 2 + (u_old - p_old) ** 2
                                  - 2 * phi * (p_new - l_new) * (u_old - p_old)))
    upper = delta + math.sqrt(max(0.0, (p_old - l_old) ** 2 + (u_new - p_new) ** 2
                                  - 2 * phi * (p_old - l_old) * (u_new - p_new)))
    return lower, upper


def paired_bootstrap(old: Sequence[float], new: Sequence[float], seed: int = 0,
                     resamples: int = DEFAULT_RESAMPLES, level: float = 0.95) -> tuple[float, float, float]:
    """(ci_lo, ci_hi, p) for the mean of new - old by a seeded paired bootstrap.

    Each of `resamples` resamples draws n pairs with replacement (random.Random(seed).choices over the
    per-sample differences d) and takes their mean d*. CI: the percentile interval of the d* (linear
    interpolation between order statistics, numpy's default). p, two-sided, from the bootstrap distribution shifted
    to the null (Efron & Tibshirani 1993, §16.4): p = (1 + #{|d* - mean(d)| >= |mean(d)|}) / (resamples + 1), so
    p >= 1 / (resamples + 1), and p = 1 when the mean difference is 0.
    """
    diffs = _differences(old, new)
    if resamples < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level!r}")
    n = len(diffs)
    delta = math.fsum(diffs) / n
    choices = random.Random(seed).choices
    # sum, not fsum: half the time, and its rounding (~1e-13 at n = 10^4) is far below any CI's width
    means = sorted(sum(choices(diffs, k=n)) / n for _ in range(resamples))
    extreme = sum(1 for m in means if abs(m - delta) >= abs(delta))
    tail = (1 - level) / 2
    return _quantile(means, tail), _quantile(means, 1 - tail), (1 + extreme) / (resamples + 1)


def is_binary(values: Sequence[float]) -> bool:
    return all(v == 0 or v == 1 for v in values)


def compare_values(old: Sequence[float], new: Sequence[float], *, alpha: float = 0.05, seed: int = 0,
                   resamples: int = DEFAULT_RESAMPLES) -> dict:
    """One `metrics` entry of a comparison (docs/insight.md) for the paired per-sample values of one metric.

    Exact McNemar with Newcombe's CI when every value on both sides is 0 or 1, else the seeded paired bootstrap.
    The CI's level is 1 - alpha; `significant` is p < alpha. fixed / broken: samples whose value rose / fell."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    diffs = _differences(old, new)
    n = len(diffs)
    level = 1 - alpha
    fixed = sum(1 for d in diffs if d > 0)
    broken = sum(1 for d in diffs if d < 0)
    entry: dict = {"old": math.fsum(old) / n, "new": math.fsum(new) / n, "delta": math.fsum(diffs) / n, "n": n}
    if is_binary(old) and is_binary(new):
        both = sum(1 for o, w in zip(old, new) if o == 1 and w == 1)
        ci: tuple[float, float] = newcombe_paired_ci(both, fixed, broken, n - both - fixed - broken, level)
        entry.update(method=MCNEMAR, p=mcnemar_exact(fixed, broken), ci_method=NEWCOMBE)
    else:
        lo, hi, p = paired_bootstrap(old, new, seed=seed, resamples=resamples, level=level)
        ci = (lo, hi)
        entry.update(method=BOOTSTRAP, p=p, ci_method=PERCENTILE, seed=seed, resamples=resamples)
    entry.update(ci=[ci[0], ci[1]], ci_level=level, significant=entry["p"] < alpha, fixed=fixed, broken=broken)
    return entry


def _differences(old: Sequence[float], new: Sequence[float]) -> list[float]:
    if len(old) != len(new):
        raise ValueError(f"paired values: {len(old)} old vs {len(new)} new; pairs need both")
    if not old:
        raise ValueError("paired values: no pairs to compare")
    for side, values in (("old", old), ("new", new)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"paired values: {side} has {v!r}; expected finite numbers")
    return [w - o for o, w in zip(old, new)]


def _quantile(ordered: list[float], q: float) -> float:
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def alpha_problem(alpha: object) -> str | None:
    """What keeps `alpha` from being a significance level, or None: a number in (0, 1) whose confidence level
    1 - alpha is below 1 in floating point (1 - 1e-300 is 1.0)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1 or not 1 - alpha < 1:
        return f"expected a significance level between 0 and 1 (e.g. 0.05), got {alpha!r}"
    return None


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"CI level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(1 - (1 - level) / 2)
