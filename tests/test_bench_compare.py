"""scripts/bench_compare.py at --quick sizes (n = 500, 2000): it writes every figure, and the comparisons it timed
found what its planted results hold (a smoke run of the real script, not a timing test: no speed is asserted)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import DAEMON_PY, ROOT

SIZES = (500, 2000)
PER_N = ("read", "mcnemar", "bootstrap", "compare", "per_checkpoint")


def is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_compare") / "bench_compare.json"
    proc = subprocess.run([DAEMON_PY, os.path.join(ROOT, "scripts", "bench_compare.py"), "--quick", "--output",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "per 1k samples" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def test_bench_compare_quick_writes_every_figure_as_a_positive_number(bench):
    keys = [f"{name}_n{n}_s" for n in SIZES for name in PER_N]
    keys += [f"bootstrap_share_n{n}" for n in SIZES] + ["compare_s_per_1k_samples", "per_checkpoint_s_per_1k_samples"]
    for key in keys:
        assert is_positive_number(bench.get(key)), (key, bench.get(key))
    assert bench["per_1k_from_n"] == max(SIZES)
    assert bench["compare_s_per_1k_samples"] == pytest.approx(bench["compare_n2000_s"] / 2)
    assert bench["setup"]["sizes"] == list(SIZES) and "compare_n10000_s" not in bench
    for key, row in bench["measurements"].items():  # what scripts/bench_all.py's table shows
        assert is_positive_number(row["value"]) and row["unit"] == "s", key


def test_the_timed_comparison_vs_best_finds_the_planted_drop_in_both_metrics(bench):
    for n in SIZES:
        vs_best = bench["checks"][f"n{n}"]["vs_best"]
        assert vs_best["exact_match"]["method"] == "mcnemar_exact"
        assert vs_best["token_f1"]["method"] == "paired_bootstrap"
        # planted: 5 % of the samples fixed, 15 % broken
        assert (vs_best["exact_match"]["fixed"], vs_best["exact_match"]["broken"]) == (n * 5 // 100, n * 15 // 100)
        assert vs_best["exact_match"]["delta"] == pytest.approx(-0.10)
        for metric, entry in vs_best.items():
            assert entry["p"] < 0.01 and entry["significant"] and entry["delta"] < 0, (n, metric, entry)
    assert bench["checks_ok"] is True


def test_the_timed_comparison_vs_prev_finds_no_difference_where_none_was_planted(bench):
    for n in SIZES:
        vs_prev = bench["checks"][f"n{n}"]["vs_prev"]
        assert set(vs_prev) == {"exact_match", "token_f1"}
        assert vs_prev["exact_match"]["fixed"] == vs_prev["exact_match"]["broken"] == n * 5 // 100
        for metric, entry in vs_prev.items():
            assert entry["delta"] == pytest.approx(0, abs=1e-12), (n, metric)
            assert entry["p"] > 0.5 and not entry["significant"], (n, metric, entry)
