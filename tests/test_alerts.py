"""Regression alert rules (evaluator/daemon/alerts.py) as pure functions over values, their config checks, and
the ledger's alerts table: milliseconds, no venvs."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from evaluator.common.errors import EvaluatorError
from evaluator.daemon import alerts as A
from evaluator.daemon import ledger as L
from evaluator.daemon.config import AlertRuleConfig, AlertsConfig, WandbConfig, load_config
from evaluator.daemon.notify import make_channels, webhook_url


def rule(**kw) -> A.Rule:
    return A.build_rules([AlertRuleConfig(**{"benchmark": "qa", "metric": "exact_match", **kw})])[0]


def comparison(old=0.61, new=0.51, p=0.0001, n=500, versus="prev", iteration=2000, metric="exact_match") -> dict:
    side = {"run": "r", "iteration": iteration, "n_common": n, "alpha": 0.05, "main_metric": metric,
            "metrics": {metric: {"old": old, "new": new, "delta": new - old, "n": n, "method": "mcnemar_exact",
                                 "p": p, "ci": [new - old - 0.04, new - old + 0.04], "ci_level": 0.95,
                                 "significant": p is not None and p < 0.05, "fixed": 12, "broken": 62}}}
    other = "best" if versus == "prev" else "prev"
    return {"schema_version": 1, "run": "r", "benchmark": "qa", "iteration": 3000, "revision": 0,
            "against": {versus: side, other: None}}


def result(value=0.51, n=500, metric="exact_match", iteration=3000) -> A.Result:
    return A.Result("r", iteration, "qa", {metric: value}, n)


def outcome(r: A.Rule, res: A.Result, comp=None, history=()) -> str:
    (check,) = A.evaluate([r], res, comp, list(history))
    return check.outcome


# ---- drop rules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, comp, expected", [
    ({"drop": 0.05, "significant": 0.05}, comparison(p=0.0001), A.FIRE),  # a 10-point drop, p = 1e-4
    ({"drop": 0.05, "significant": 0.05}, comparison(p=0.3), A.PASS),  # the same drop, but noise
    ({"drop": 0.05}, comparison(new=0.60), A.PASS),  # a 1-point wobble is below the drop
    ({"drop": 0.05}, comparison(old=0.61, new=0.56), A.FIRE),  # exactly the drop (0.61 - 0.56 rounds to 0.04999...)
    ({}, comparison(new=0.609), A.FIRE),  # no drop given: any drop
    ({}, comparison(new=0.62), A.PASS),  # a rise
    ({"drop": 0.05, "min_n": 1000}, comparison(n=500), A.UNKNOWN),  # too few common samples: not checked
    ({"drop": 0.05}, None, A.UNKNOWN),  # first checkpoint: nothing to compare with
    ({"drop": 0.05, "versus": "best"}, comparison(versus="prev"), A.UNKNOWN),  # no best comparison
    ({"drop": 0.05, "versus": "best"}, comparison(versus="best"), A.FIRE),
    ({"drop_relative": 0.1}, comparison(old=0.6, new=0.53), A.FIRE),  # 0.07 >= 10% of 0.6
    ({"drop_relative": 0.1}, comparison(old=0.6, new=0.55), A.PASS),  # 0.05 < 0.06
    ({"direction": "lower"}, comparison(old=0.10, new=0.20), A.FIRE),  # an error rate that rose
    ({"direction": "lower"}, comparison(old=0.20, new=0.10), A.PASS),
    ({"significant": 0.05}, comparison(p=None), A.PASS),  # no p-value: never "significant"
])
def test_drop_rule_against_the_paired_comparison(settings, comp, expected):
    assert outcome(rule(**settings), result(), comp) == expected


@pytest.mark.parametrize("settings, value, n, expected", [
    ({"threshold": 0.5}, 0.45, 500, A.FIRE),
    ({"threshold": 0.5}, 0.5, 500, A.PASS),  # at the threshold is not below it
    ({"threshold": 0.5, "drop": 0.1}, 0.45, 500, A.PASS),  # below, but not by 0.1
    ({"threshold": 0.5, "min_n": 100}, 0.1, 20, A.UNKNOWN),
    ({"threshold": 0.2, "direction": "lower"}, 0.3, 500, A.FIRE),
])
def test_threshold_rule_needs_no_comparison(settings, value, n, expected):
    assert outcome(rule(**settings), result(value, n), None) == expected


def test_a_fired_drop_says_what_dropped_by_how_much_and_how_sure():
    (check,) = A.evaluate([rule(drop=0.05, significant=0.05)], result(), comparison(), [])
    assert check.text.startswith("r@3000/qa: exact_match 0.51, down 0.1 from 0.61 at iteration 2000 (prev; "
                                 "mcnemar_exact p=0.0001, n=500)")
    assert "exact_match drop>=0.05 vs prev p<0.05" in check.text  # the rule's id


def test_a_metric_missing_from_the_result_is_not_a_number_of_zero():
    (check,) = A.evaluate([rule(threshold=0.5)], result(metric="token_f1"), None, [])
    assert check.outcome == A.UNKNOWN and "no number for 'exact_match'" in check.text


def test_rules_of_other_benchmarks_are_not_checked():
    other = A.build_rules([AlertRuleConfig(benchmark="mc", metric="accuracy", threshold=0.5)])
    assert A.evaluate(other, result(), None, []) == []


# ---- stuck and failed rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("history, value, expected", [
    ([(1000, {"exact_match": 0.0}), (2000, {"exact_match": 0.0})], 0.0, A.FIRE),
    ([(1000, {"exact_match": 1.0}), (2000, {"exact_match": 1.0})], 1.0, A.FIRE),
    ([(1000, {"exact_match": 0.0}), (2000, {"exact_match": 0.1})], 0.0, A.PASS),
    ([(1000, {"exact_match": 1.0}), (2000, {"exact_match": 0.0})], 0.0, A.PASS),  # 0 and 1 are not one value
    ([(2000, {"exact_match": 0.0})], 0.0, A.PASS),  # two checkpoints so far, three asked for
    ([(1000, {}), (2000, {"exact_match": 0.0})], 0.0, A.PASS),  # an unreadable result is not a 0
    ([(500, {"exact_match": 0.3}), (1000, {"exact_match": 0.0}), (2000, {"exact_match": 0.0})], 0.0, A.FIRE),
])
def test_stuck_rule_looks_at_the_last_k_checkpoints(history, value, expected):
    assert outcome(rule(stuck=3), result(value), None, history) == expected


def test_failed_rule_fires_at_the_kth_failure_of_a_job_and_passes_once_it_is_scored():
    rules = A.build_rules([AlertRuleConfig(failed=2)])  # no benchmark: any
    assert A.evaluate_failure(rules, "r", 1000, "qa", 1, "inference: exit 3") == []
    (check,) = A.evaluate_failure(rules, "r", 1000, "qa", 2, "inference: exit 3\ntraceback...")
    assert check.outcome == A.FIRE and check.text == "r@1000/qa: failed 2 time(s): inference: exit 3 [rule * failed>=2]"
    assert [c.outcome for c in A.evaluate_success(rules, "qa")] == [A.PASS]
    assert A.evaluate(rules, result(), None, []) == []  # not a metric rule


# ---- config -----------------------------------------------------------------------------------------------------
def write_cfg(tmp_path, rules, **alerts) -> str:
    data = tmp_path / "data"
    os.makedirs(data, exist_ok=True)
    (data / "test.jsonl").write_text(json.dumps({"id": "q1", "messages": [{"role": "user", "content": "2+2?"}],
                                                 "target": "4"}) + "\n")
    (data / "metadata.json").write_text(json.dumps({"dataset_id": "toy", "metrics": ["accuracy"]}))
    cfg = {"project_name": "p", "model_name": "m", "cache_dir": str(tmp_path / "cache"),
           "watch": {"paths": [str(tmp_path / "ckpt")]},
           "benchmarks": [{"name": "qa", "type": "dataset", "dataset": str(data), "metrics": ["exact_match", "bleu"]},
                          {"name": "mc", "type": "dataset", "dataset": str(data)},  # metrics from metadata.json
                          {"name": "cmd", "type": "command", "inference": "true", "evaluation": "true"}],
           "alerts": {"rules": rules, **alerts}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"auto_eval": cfg}, sort_keys=False))
    return str(path)


def config_error(tmp_path, rules, **alerts) -> str:
    with pytest.raises(EvaluatorError) as e:
        load_config(write_cfg(tmp_path, rules, **alerts))
    return str(e.value)


def test_an_unknown_benchmark_is_a_config_error_with_key_path_line_and_did_you_mean(tmp_path):
    msg = config_error(tmp_path, [{"benchmark": "qa", "metric": "exact_match", "drop": 0.05},
                                  {"benchmark": "qaa", "metric": "exact_match", "drop": 0.05}])
    assert "cfg.yaml:" in msg and "auto_eval.alerts.rules[1].benchmark: no benchmark named 'qaa'" in msg
    assert "did you mean 'qa'?" in msg


def test_an_unknown_metric_is_a_config_error_naming_what_the_benchmark_reports(tmp_path):
    msg = config_error(tmp_path, [{"benchmark": "qa", "metric": "exact_mach", "drop": 0.05}])
    assert "auto_eval.alerts.rules[0].metric: benchmark 'qa' reports no metric 'exact_mach'" in msg
    assert "exact_match, bleu_1, bleu_2, bleu_3, bleu_4" in msg and "did you mean 'exact_match'?" in msg


def test_metric_names_come_from_metadata_json_when_the_benchmark_names_none(tmp_path):
    load_config(write_cfg(tmp_path, [{"benchmark": "mc", "metric": "accuracy", "stuck": 3}]))
    msg = config_error(tmp_path, [{"benchmark": "mc", "metric": "exact_match", "stuck": 3}])
    assert "rules[0].metric: benchmark 'mc' reports no metric 'exact_match' (it reports accuracy)" in msg


def test_a_command_benchmark_takes_any_metric_name_its_metrics_json_may_carry(tmp_path):
    cfg = load_config(write_cfg(tmp_path, [{"benchmark": "cmd", "metric": "score", "threshold": 0.3}]))
    assert A.build_rules(cfg.alerts.rules)[0].versus == "threshold"


@pytest.mark.parametrize("rules, where, text", [
    ([{"benchmark": "qa", "metric": "exact_match", "versus": "threshold"}], "rules[0].threshold", "required"),
    ([{"benchmark": "qa", "metric": "exact_match", "threshold": 0.5, "significant": 0.05}], "rules[0].significant",
     "no paired test"),
    ([{"benchmark": "qa", "metric": "exact_match", "drop": 0.1, "drop_relative": 0.1}], "rules[0].drop_relative",
     "not both"),
    ([{"benchmark": "qa", "metric": "exact_match", "stuck": 3, "drop": 0.1}], "rules[0].drop", "only used by drop"),
    ([{"benchmark": "qa", "metric": "exact_match", "failed": 2}], "rules[0].metric", "takes no metric"),
    ([{"benchmark": "qa", "failed": 9}], "rules[0].failed", "at most executor.max_attempts (3)"),
    ([{"metric": "exact_match", "drop": 0.1}], "rules[0].benchmark", "required"),
    ([{"benchmark": "qa", "drop": 0.1}], "rules[0].metric", "required"),
    ([{"benchmark": "qa", "metric": "exact_match"}, {"benchmark": "qa", "metric": "exact_match"}], "rules[1].name",
     "the same rule as rules[0]"),
    ([{"benchmark": "qa", "metric": "exact_match", "significant": 1.5}], "rules[0].significant", "less than 1"),
])
def test_rule_problems_name_the_key(tmp_path, rules, where, text):
    msg = config_error(tmp_path, rules)
    assert f"auto_eval.alerts.{where}" in msg and text in msg, msg


def test_the_webhook_url_is_read_from_the_environment_never_from_the_config(tmp_path):
    msg = config_error(tmp_path, [{"benchmark": "qa", "metric": "exact_match"}], webhook_url="https://hooks/x")
    assert "auto_eval.alerts.webhook_url: unknown key; did you mean 'webhook_env'?" in msg
    section = AlertsConfig(rules=[AlertRuleConfig(failed=1)], webhook_env="EVAL_ALERT_WEBHOOK")
    with pytest.raises(EvaluatorError, match="EVAL_ALERT_WEBHOOK is not set"):
        webhook_url(section, {})
    (channel,) = make_channels(section, [], {"EVAL_ALERT_WEBHOOK": "http://127.0.0.1:9/secret-path"})
    assert "secret-path" not in repr(channel)


def test_a_webhook_variable_that_is_not_an_http_url_is_a_config_error_that_does_not_show_it():
    section = AlertsConfig(rules=[AlertRuleConfig(failed=1)], webhook_env="EVAL_ALERT_WEBHOOK")
    for url in ("hooks.slack.com/services/T0/B0/secret-token", "ftp://hooks/secret-token", "https:///secret-token"):
        with pytest.raises(EvaluatorError, match="EVAL_ALERT_WEBHOOK: expected an http:// or https:// URL") as e:
            webhook_url(section, {"EVAL_ALERT_WEBHOOK": url})
        assert "secret-token" not in str(e.value)


# ---- the ledger: once per (rule, checkpoint), closed by a later pass or by hand -------------------------------
def test_an_alert_is_stored_once_per_rule_and_checkpoint_and_closes_up_to_a_passing_iteration(tmp_path):
    led = L.Ledger(str(tmp_path))
    first = led.add_alert("r1", ("run", 2000, "qa"), "dropped", ["webhook"])
    assert first is not None
    assert led.add_alert("r1", ("run", 2000, "qa"), "dropped again", ["webhook"]) is None
    later = led.add_alert("r1", ("run", 4000, "qa"), "dropped", ["webhook"])
    assert [a["id"] for a in led.alerts(open_only=True)] == [first, later]
    assert led.close_alerts("r1", "run", "qa", 3000, "iteration 3000 passes") == [first]
    assert [a["id"] for a in led.alerts(open_only=True)] == [later]
    assert led.ack_alerts(None) == 1 and led.alerts(open_only=True) == []
    assert led.alerts()[1]["closed_by"] == "acknowledged"


def test_a_failed_delivery_backs_off_and_stays_pending_until_delivered(tmp_path):
    led = L.Ledger(str(tmp_path))
    alert = led.add_alert("r1", ("run", 2000, "qa"), "dropped", ["webhook"])
    assert [(a["id"], c) for a, c in led.alert_deliveries_due(["webhook"], now=100.0)] == [(alert, "webhook")]
    assert led.alert_delivery_failed(alert, "webhook", 130.0, "webhook answered HTTP 500") == 1
    assert led.alert_deliveries_due(["webhook"], now=120.0) == []
    assert len(led.alert_deliveries_due(["webhook"], now=130.0)) == 1
    assert led.alerts_undelivered(["webhook"]) == 1 and led.next_alert_delivery() == 130.0
    led.alert_delivered(alert, "webhook")
    assert led.alerts_undelivered(["webhook"]) == 0
    assert led.alerts()[0]["deliveries"]["webhook"]["failures"] == 1


def test_wandb_alert_is_a_channel_only_when_the_wandb_sink_runs_online(tmp_path, caplog):
    from evaluator.daemon.sink_setup import make_sinks

    path = write_cfg(tmp_path, [{"benchmark": "qa", "metric": "exact_match"}])
    for mode, expected in (("offline", []), ("online", ["wandb"])):
        cfg = load_config(path)
        cfg.wandb = WandbConfig(mode=mode)  # a `wandb:` section adds the wandb sink
        with caplog.at_level("INFO", logger="evaluator"):
            channels = make_channels(cfg.alerts, make_sinks(cfg), {})
        assert [c.name for c in channels] == expected
    assert "wandb.alert skipped: W&B runs offline" in caplog.text
