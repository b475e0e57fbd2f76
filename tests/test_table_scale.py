"""x100 in printed tables (issue 16 item 3): papers print caption metrics and accuracy x100; what is stored stays raw."""
from __future__ import annotations

import json

import pytest

from evaluator.bench import build_parser, table_scale, write_summary
from evaluator.common.errors import EvaluatorError
from recorder import leaderboard
from recorder.sinks import ResultRecord
from recorder.writer import load_writer_config

METRICS_JSON = {"n": 4, "metrics": {"cider_d": 0.4512, "bleu_4": 0.172}, "stderr": {"cider_d": 0.031},
                "per_category": {"indoor": {"n": 2, "cider_d": 0.5}}, "unavailable": {},
                "methods": {"cider_d": "aac-metrics CIDEr-D"}}


def summary_lines(tmp_path, scale) -> list[str]:
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS_JSON))
    return open(write_summary(str(tmp_path), {"name": "clotho", "type": "clotho"}, scale)).read().splitlines()


def test_bench_summary_on_the_raw_scale_by_default(tmp_path):
    lines = summary_lines(tmp_path, 1)
    assert "cider_d: 0.4512 (stderr 0.031)" in lines and "bleu_4: 0.172" in lines
    assert not any("x100" in line for line in lines)
    assert "method of cider_d: aac-metrics CIDEr-D" in lines


def test_bench_summary_x100_scales_values_and_stderr_not_counts_and_says_so(tmp_path):
    lines = summary_lines(tmp_path, 100)
    assert "cider_d: 45.12 (stderr 3.1)" in lines and "bleu_4: 17.2" in lines
    assert "n: 4" in lines and "[indoor] cider_d=50, n=2" in lines
    assert "values x100 (papers' convention; the stored values are raw)" in lines
    assert json.loads((tmp_path / "metrics.json").read_text()) == METRICS_JSON


@pytest.mark.parametrize("argv, scale", [(["eval", "clotho", "--predictions", "p.jsonl"], 1),
                                         (["eval", "clotho", "--predictions", "p.jsonl", "--x100"], 100),
                                         (["run", "clotho", "--model", "m", "--x100"], 100)])
def test_bench_x100_flag_sets_the_table_scale(argv, scale):
    assert table_scale(build_parser().parse_args(argv)) == scale


def test_leaderboard_markdown_x100_scales_the_metric_columns_not_the_score():
    records = [ResultRecord(run=m, iteration=1, benchmark="clotho", metrics={"cider_d": v})
               for m, v in (("a", 0.45), ("b", 0.30))]
    entries, _ = leaderboard.build(records, ["clotho.cider_d"])
    table = leaderboard.markdown(entries, ["clotho.cider_d"], 100)
    assert "| 1 | a | 1 |  | 1.0000 | 1/1 | 45 |" in table
    assert table.rstrip().endswith("values x100 (papers' convention; the stored values are raw)")


def test_recorder_config_takes_scale_1_or_100_only(tmp_path):
    cfg = tmp_path / "recorder.yaml"
    cfg.write_text("project: p\nleaderboard: true\nscale: 100\n")
    assert load_writer_config(str(cfg)).scale == 100
    cfg.write_text("project: p\nleaderboard: true\nscale: 10\n")
    with pytest.raises(EvaluatorError, match="scale"):
        load_writer_config(str(cfg))
