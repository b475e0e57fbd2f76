"""Specification of the best checkpoint's rule (evaluator/daemon/best.py): how checkpoints are ranked, which ones
are candidates, and how a `best:` section is checked at config load (key path, file:line, did-you-mean).
Pure functions and the config loader: no venv, no daemon."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from evaluator.common.errors import EvaluatorError
from evaluator.daemon import best as B
from evaluator.daemon.config import load_config

QA_EM = B.BestRule((B.Term("qa", "exact_match"),), "max")


def ranking(rule: B.BestRule, scores, exclude=()) -> list[tuple[int, float]]:
    return [(r.iteration, round(r.score, 9)) for r in B.choose(rule, scores, exclude)]


# ---- ranking ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule, scores, expected", [
    pytest.param(QA_EM, {1000: {"qa": {"exact_match": 0.4}}, 2000: {"qa": {"exact_match": 0.6}},
                         3000: {"qa": {"exact_match": 0.5}}},
                 [(2000, 0.6), (3000, 0.5), (1000, 0.4)], id="max: the highest first"),
    pytest.param(B.BestRule((B.Term("lm", "loss"),), "min"),
                 {1000: {"lm": {"loss": 2.0}}, 2000: {"lm": {"loss": 1.5}}, 3000: {"lm": {"loss": 1.7}}},
                 [(2000, 1.5), (3000, 1.7), (1000, 2.0)], id="min: the lowest first"),
    pytest.param(B.BestRule((B.Term("qa", "exact_match", 0.7), B.Term("mc", "accuracy", 0.3)), "max"),
                 {1000: {"qa": {"exact_match": 0.5}, "mc": {"accuracy": 0.9}},   # 0.35 + 0.27 = 0.62
                  2000: {"qa": {"exact_match": 0.6}, "mc": {"accuracy": 0.5}}},  # 0.42 + 0.15 = 0.57
                 [(1000, 0.62), (2000, 0.57)], id="weighted sum over two benchmarks"),
    pytest.param(B.BestRule((B.Term("qa", "exact_match"), B.Term("mc", "accuracy")), "max"),
                 {1000: {"qa": {"exact_match": 0.5}, "mc": {"accuracy": 0.5}},
                  2000: {"qa": {"exact_match": 0.9}}},  # mc not recorded yet
                 [(1000, 1.0)], id="a checkpoint missing a benchmark of the rule is no candidate"),
    pytest.param(QA_EM, {1000: {"qa": {"token_f1": 0.9}}, 2000: {"qa": {"exact_match": 0.1}}},
                 [(2000, 0.1)], id="a result without the rule's metric is no candidate"),
    pytest.param(QA_EM, {3000: {"qa": {"exact_match": 0.5}}, 1000: {"qa": {"exact_match": 0.5}},
                         2000: {"qa": {"exact_match": 0.5}}},
                 [(1000, 0.5), (2000, 0.5), (3000, 0.5)], id="ties: the earlier checkpoint stays ahead"),
    pytest.param(QA_EM, {}, [], id="no results: no best"),
])
def test_choose_ranks_candidates_best_first(rule, scores, expected):
    assert ranking(rule, scores) == expected


def test_choose_leaves_out_the_excluded_checkpoint_to_find_the_best_other_one():
    scores = {1000: {"qa": {"exact_match": 0.4}}, 2000: {"qa": {"exact_match": 0.6}}}
    assert ranking(QA_EM, scores, exclude=[2000]) == [(1000, 0.4)]


def test_kept_is_the_keep_best_best_checkpoints():
    rule = B.BestRule((B.Term("qa", "exact_match"),), "max", keep=2)
    scores = {it: {"qa": {"exact_match": v}} for it, v in [(1000, 0.1), (2000, 0.3), (3000, 0.2), (4000, 0.05)]}
    assert [r.iteration for r in B.kept(rule, scores)] == [2000, 3000]


def test_a_rule_describes_itself_in_one_line():
    assert QA_EM.describe() == "max qa.exact_match"
    weighted = B.BestRule((B.Term("qa", "exact_match", 0.7), B.Term("mc", "accuracy", 0.3)), "min")
    assert weighted.describe() == "min 0.7*qa.exact_match + 0.3*mc.accuracy"
    assert B.summary(QA_EM, B.Ranked(2000, 0.6, {})) == {"iteration": 2000, "score": 0.6, "rule": "max qa.exact_match"}


# ---- the config section ------------------------------------------------------------------------------------------
HEADER = """\
auto_eval:
  project_name: demo
  model_name: tiny
"""


def config(tmp_path: Path, block: str) -> Path:
    """A config with a QA dataset benchmark `qa` (exact_match, token_f1), a command benchmark `cmd`, and `block`."""
    data = tmp_path / "qa-data"
    data.mkdir(exist_ok=True)
    (data / "test.jsonl").write_text(json.dumps({"id": "1", "messages": [{"role": "user", "content": "1+1"}],
                                                 "target": "2"}) + "\n")
    (data / "metadata.json").write_text(json.dumps({"dataset_id": "toy", "metrics": ["exact_match", "token_f1"]}))
    text = HEADER + textwrap.indent(textwrap.dedent("""\
        benchmarks:
          - {name: qa, type: dataset, dataset: qa-data, main_metric: exact_match}
          - {name: cmd, inference: 'run {checkpoint}', evaluation: 'score {output_dir}'}
        """) + textwrap.dedent(block), "  ")
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error(path: Path) -> str:
    with pytest.raises(EvaluatorError) as err:
        load_config(str(path))
    return str(err.value)


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_a_best_rule_naming_an_unknown_benchmark_names_the_key_and_line_with_a_suggestion(tmp_path):
    path = config(tmp_path, "best: {benchmark: qaa, metric: exact_match}\n")
    msg = error(path)
    assert f"{path}:{line_of(path, 'best:')}: auto_eval.best.benchmark: no benchmark named 'qaa'" in msg
    assert "did you mean 'qa'?" in msg


def test_a_best_rule_naming_a_metric_the_benchmark_does_not_report_is_refused(tmp_path):
    path = config(tmp_path, "best: {benchmark: qa, metric: exact_macth}\n")
    msg = error(path)
    assert "auto_eval.best.metric: benchmark 'qa' reports no metric 'exact_macth'" in msg
    assert "did you mean 'exact_match'?" in msg  # the names come from the dataset's metadata.json


def test_a_weighted_term_is_checked_at_its_own_key_path(tmp_path):
    path = config(tmp_path, """\
        best:
          weights:
            - {benchmark: qa, metric: token_f1, weight: 0.5}
            - {benchmark: qa, metric: acuracy, weight: 0.5}
        """)
    msg = error(path)
    assert f":{line_of(path, 'acuracy')}: auto_eval.best.weights[1].metric: benchmark 'qa' reports no metric" in msg


def test_a_rule_needs_a_metric_when_the_benchmark_has_no_main_metric(tmp_path):
    path = config(tmp_path, "best: {benchmark: cmd}\n")
    assert "auto_eval.best.metric: which metric of 'cmd' ranks the checkpoints?" in error(path)


def test_benchmark_and_weights_together_are_refused(tmp_path):
    path = config(tmp_path, "best: {benchmark: qa, weights: [{benchmark: cmd, metric: x}]}\n")
    assert "auto_eval.best: give either benchmark/metric or weights" in error(path)


def test_keep_best_must_be_at_least_one(tmp_path):
    path = config(tmp_path, "best: {benchmark: qa, keep_best: 0}\n")
    assert "auto_eval.best.keep_best" in error(path)


def test_an_unknown_key_in_best_gets_a_suggestion(tmp_path):
    path = config(tmp_path, "best: {benchmark: qa, keep_bset: 2}\n")
    msg = error(path)
    assert "keep_bset" in msg and "did you mean 'keep_best'?" in msg


def test_a_run_that_does_not_evaluate_the_rules_benchmark_is_refused(tmp_path):
    path = config(tmp_path, """\
        watch:
          paths:
            - {path: ckpt, name: a, benchmarks: [cmd], best: {benchmark: qa}}
        """)
    assert "auto_eval.watch.paths[0].best.benchmark: run 'a' does not evaluate 'qa'" in error(path)


def test_a_command_benchmarks_metric_cannot_be_known_before_it_runs_and_is_taken(tmp_path):
    cfg = load_config(str(config(tmp_path, "best: {benchmark: cmd, metric: anything, mode: min}\n")))
    assert B.rules_by_run(cfg, ["tiny"]) == {"tiny": B.BestRule((B.Term("cmd", "anything"),), "min")}


def test_auto_eval_best_applies_to_every_run_without_its_own(tmp_path):
    cfg = load_config(str(config(tmp_path, """\
        best: {benchmark: qa, keep_best: 2}
        watch:
          paths:
            - {path: a}
            - {path: b, best: {benchmark: cmd, metric: loss, mode: min}}
        """)))
    rules = B.rules_by_run(cfg, ["a", "b"])
    assert rules["a"] == B.BestRule((B.Term("qa", "exact_match"),), "max", keep=2)  # main_metric fills metric
    assert rules["b"] == B.BestRule((B.Term("cmd", "loss"),), "min", keep=1)


def test_no_best_section_means_no_best_tracking(tmp_path):
    cfg = load_config(str(config(tmp_path, "")))
    assert B.rules_by_run(cfg, ["tiny"]) == {}
