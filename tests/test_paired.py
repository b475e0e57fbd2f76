"""The paired tests behind `compare` and compare.json (evaluator/common/paired.py), against scipy where scipy has
the same test, and on planted differences where it has none."""
from __future__ import annotations

import random

import pytest
from scipy.stats import binomtest

from evaluator.common.paired import (BOOTSTRAP, MCNEMAR, NEWCOMBE, PERCENTILE, compare_values, mcnemar_exact,
                                     newcombe_paired_ci, paired_bootstrap)


def scipy_mcnemar(b: int, c: int) -> float:
    return 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue


def generated_tables():
    rng = random.Random(15)
    tables = [(b, c) for b in range(0, 41) for c in range(0, 41)]  # every small table, ties and zeros included
    tables += [(0, n) for n in (1, 2, 10, 100, 1000, 5000)] + [(n, 0) for n in (1, 7, 5000)]  # all one way
    tables += [(2500, 2500), (2499, 2501), (2450, 2550), (2400, 2600), (2000, 3000), (1, 4999)]  # n = 5000
    tables += [(rng.randrange(0, 3000), rng.randrange(0, 3000)) for _ in range(60)]
    return tables


def test_mcnemar_exact_equals_scipys_binomial_test_to_1e_12_on_generated_tables():
    worst = max((abs(mcnemar_exact(b, c) - scipy_mcnemar(b, c)), (b, c)) for b, c in generated_tables())
    assert worst[0] <= 1e-12, worst


def test_mcnemar_without_discordant_pairs_is_1():
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_all_discordant_one_way_is_twice_half_to_the_n():
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5 ** 10, rel=1e-15)
    assert mcnemar_exact(10, 0) == mcnemar_exact(0, 10)
    assert mcnemar_exact(0, 1) == 1.0  # capped: 2 * 0.5


def test_mcnemar_refuses_a_count_that_is_not_one():
    for b, c in ((-1, 3), (1.5, 2), (True, 2)):
        with pytest.raises(ValueError, match="counts"):
            mcnemar_exact(b, c)


def test_newcombe_ci_reproduces_the_published_cavo_2012_interval():
    """Fagerland, Lydersen & Laake, ch. 8 (R package contingencytables): the table [[59, 6], [16, 80]] gives
    estimate -0.0621, 95% CI -0.1186 to -0.0046 (row proportion minus column proportion)."""
    lo, hi = newcombe_paired_ci(both=59, fixed=6, broken=16, neither=80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)


def test_newcombe_ci_without_discordant_pairs_is_around_zero_and_not_empty():
    lo, hi = newcombe_paired_ci(both=40, fixed=0, broken=0, neither=60)
    assert lo < 0 < hi


def test_bootstrap_is_reproducible_with_its_seed_and_differs_with_another():
    rng = random.Random(1)
    old = [rng.random() for _ in range(300)]
    new = [v + rng.gauss(0.01, 0.2) for v in old]
    assert paired_bootstrap(old, new, seed=3) == paired_bootstrap(old, new, seed=3)
    assert paired_bootstrap(old, new, seed=3) != paired_bootstrap(old, new, seed=4)


def test_bootstrap_ci_holds_the_mean_difference_and_p_is_1_for_no_difference():
    rng = random.Random(2)
    old = [rng.random() for _ in range(200)]
    new = [v + rng.gauss(0.0, 0.1) for v in old]
    lo, hi, _ = paired_bootstrap(old, new)
    delta = sum(n - o for o, n in zip(old, new)) / len(old)
    assert lo < delta < hi
    assert paired_bootstrap(old, list(old))[2] == 1.0


def planted_binary(n: int, drop_points: int, seed: int) -> tuple[list[float], list[float]]:
    """500 0/1 samples at accuracy 0.6 in the old result; the new one loses drop_points % net, with 5 % of the
    samples flipping each way as noise on top."""
    rng = random.Random(seed)
    old = [1.0 if i < 0.6 * n else 0.0 for i in range(n)]
    rng.shuffle(old)
    new = list(old)
    ones = [i for i, v in enumerate(old) if v == 1]
    zeros = [i for i, v in enumerate(old) if v == 0]
    rng.shuffle(ones)
    rng.shuffle(zeros)
    noise = n * 5 // 100
    net = n * drop_points // 100
    for i in ones[:noise + net]:
        new[i] = 0.0
    for i in zeros[:noise]:
        new[i] = 1.0
    return old, new


def test_a_planted_10_point_drop_on_500_binary_samples_is_significant():
    old, new = planted_binary(500, 10, seed=0)
    entry = compare_values(old, new)
    assert entry["method"] == MCNEMAR and entry["ci_method"] == NEWCOMBE
    assert entry["delta"] == pytest.approx(-0.10)
    assert entry["significant"] and entry["p"] < 0.001
    assert entry["ci"][1] < 0


def test_a_1_point_wobble_on_500_binary_samples_is_not_significant():
    old, new = planted_binary(500, 1, seed=0)
    entry = compare_values(old, new)
    assert entry["delta"] == pytest.approx(-0.01)
    assert not entry["significant"] and entry["p"] > 0.05
    assert entry["ci"][0] < 0 < entry["ci"][1]


def planted_continuous(n: int, drop: float, seed: int) -> tuple[list[float], list[float]]:
    """Per-sample scores in [0, 1] (like token F1) with sample-to-sample noise of sd 0.15 around a planted shift."""
    rng = random.Random(seed)
    old = [rng.uniform(0.2, 0.9) for _ in range(n)]
    new = [o - drop + rng.gauss(0.0, 0.15) for o in old]
    shift = sum(n_ - o for o, n_ in zip(old, new)) / n + drop  # remove the noise's own mean: the planted shift exact
    return old, [v - shift for v in new]


def test_a_planted_10_point_drop_of_a_continuous_metric_is_significant():
    old, new = planted_continuous(500, 0.10, seed=0)
    entry = compare_values(old, new, seed=0)
    assert entry["method"] == BOOTSTRAP and entry["ci_method"] == PERCENTILE
    assert (entry["seed"], entry["resamples"]) == (0, 2000)
    assert entry["delta"] == pytest.approx(-0.10)
    assert entry["significant"] and entry["p"] == pytest.approx(1 / 2001)  # no resample as far from 0
    assert entry["ci"][1] < 0


def test_a_1_point_wobble_of_a_continuous_metric_is_not_significant():
    old, new = planted_continuous(500, 0.01, seed=0)
    entry = compare_values(old, new, seed=0)
    assert entry["delta"] == pytest.approx(-0.01)
    assert not entry["significant"] and entry["p"] > 0.05
    assert entry["ci"][0] < 0 < entry["ci"][1]


def test_compare_values_counts_fixed_and_broken_and_uses_mcnemar_only_for_0_1_values():
    entry = compare_values([1, 0, 0, 1, 1], [1, 1, 0, 0, 0])
    assert (entry["fixed"], entry["broken"], entry["n"]) == (1, 2, 5)
    assert entry["p"] == pytest.approx(scipy_mcnemar(1, 2), abs=1e-12)
    assert compare_values([1, 0, 0.5], [1, 1, 0.5])["method"] == BOOTSTRAP


def test_compare_values_refuses_unpaired_or_non_finite_values():
    with pytest.raises(ValueError, match="pairs"):
        compare_values([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        compare_values([1.0, float("nan")], [1.0, 0.0])
    with pytest.raises(ValueError, match="no pairs"):
        compare_values([], [])
