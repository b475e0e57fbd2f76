"""The `lm-eval` benchmark type: lm-evaluation-harness on local YAML tasks, its results JSON as metrics.json, and
the fidelity check: our own log-likelihood multiple-choice scoring picks exactly the harness's choices."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT, VENVS, run_cli, venvs  # noqa: F401  (venvs: a fixture)

from evaluator.common.contracts import StageJob
from evaluator.common.errors import EvaluatorError
from evaluator.stages.lm_eval import convert_results, harness_args, metric_name

MAKE_TINY_LM = os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_lm.py")


# ---- results JSON -> metrics.json ----------------------------------------------------------------------------
def harness_results(**tasks) -> dict:
    """A results JSON as lm-eval writes it, for tasks given as name=(n, acc, acc_stderr)."""
    return {"results": {t: {"alias": t, "acc,none": acc, "acc_stderr,none": se, "acc_norm,none": acc / 2,
                            "acc_norm_stderr,none": "N/A"} for t, (n, acc, se) in tasks.items()},
            "n-samples": {t: {"original": n, "effective": n} for t, (n, _, _) in tasks.items()},
            "group_subtasks": {t: [] for t in tasks}, "lm_eval_version": "0.4.9.2"}


def test_one_task_keeps_the_harness_numbers_and_drops_the_none_filter():
    out = convert_results(harness_results(arc=(40, 0.25, 0.07)), ["arc"])
    assert out == {"n": 40, "metrics": {"acc": 0.25, "acc_norm": 0.125}, "stderr": {"acc": 0.07}, "per_category": {}}


def test_several_tasks_become_categories_and_sample_weighted_means():
    out = convert_results(harness_results(a=(30, 0.5, 0.09), b=(10, 0.1, 0.1)), ["a", "b"])
    assert out["n"] == 40 and out["metrics"]["acc"] == pytest.approx((30 * 0.5 + 10 * 0.1) / 40)
    assert out["stderr"]["acc"] == pytest.approx(((30 / 40 * 0.09) ** 2 + (10 / 40 * 0.1) ** 2) ** 0.5)
    assert "acc_norm" not in out["stderr"]  # the harness gave "N/A": no error bar rather than a made-up one
    assert out["per_category"] == {"a": {"acc": 0.5, "acc_norm": 0.25, "n": 30}, "b": {"acc": 0.1, "acc_norm": 0.05, "n": 10}}


def test_a_group_keeps_the_harness_aggregate_and_lists_its_subtasks():
    data = harness_results(sub1=(10, 0.2, 0.1), sub2=(30, 0.6, 0.05))
    data["results"]["grp"] = {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": 0.04}
    data["group_subtasks"]["grp"] = ["sub1", "sub2"]
    out = convert_results(data, ["grp"])
    assert out["metrics"] == {"acc": 0.5} and out["stderr"] == {"acc": 0.04} and out["n"] == 40
    assert set(out["per_category"]) == {"sub1", "sub2"}


def test_filters_other_than_none_stay_in_the_metric_name():
    assert metric_name("exact_match,strict-match") == ("exact_match_strict-match", False)
    assert metric_name("exact_match_stderr,flexible-extract") == ("exact_match_flexible-extract", True)
    assert metric_name("alias") is None


def test_results_without_the_requested_task_are_an_error():
    with pytest.raises(EvaluatorError, match="none of the tasks b not in the results"):
        convert_results(harness_results(a=(3, 1.0, 0.0)), ["b"])


def test_harness_command_line_from_the_benchmark_spec(tmp_path):
    (tmp_path / "tasks").mkdir()
    job = StageJob(stage="inference", run="r", iteration=5, checkpoint="/ckpt/checkpoint-5", output_dir=str(tmp_path),
                   seed=3, benchmark={"name": "h", "type": "lm-eval", "sample_size": 20, "batch_size": 4,
                                      "options": {"tasks": "a,b", "include_path": "tasks", "num_fewshot": 5,
                                                  "model_args": {"dtype": "float32"}}},
                   extra={"config_dir": str(tmp_path)})
    args = harness_args(job, "cpu")
    assert args[:6] == ["--model", "hf", "--model_args", "pretrained=/ckpt/checkpoint-5,dtype=float32", "--tasks", "a,b"]
    for flag, value in (("--include_path", str(tmp_path / "tasks")), ("--num_fewshot", "5"), ("--limit", "20"),
                        ("--batch_size", "4"), ("--seed", "3"), ("--device", "cpu"),
                        ("--output_path", str(tmp_path / "lm_eval"))):
        assert args[args.index(flag) + 1] == value
    job.benchmark["options"]["fewshot"] = 3
    with pytest.raises(EvaluatorError, match="unknown key.*fewshot"):
        harness_args(job, None)


# ---- the harness itself and the fidelity of our own scoring (slow) ---------------------------------------------
WORDS = ["blue", "green", "red", "four", "five", "one two", "the mat", "a dog", "a fox", "the sea", "fine", "night"]
STEMS = ["Question: {q}\nAnswer:", "Question: {q}\nAnswer: ", "{q}\n"]  # trailing spaces: lm-eval moves them


def mc_rows(n=24, seed=7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = rng.sample(WORDS, rng.choice([2, 3, 4]))
        q = rng.choice(["What colour is the sky?", "Where did the cat sit?", "What is two plus two?",
                        "What barks at night?", "How are you today?"])
        rows.append({"id": f"q{i}", "question": q, "stem": STEMS[i % len(STEMS)].format(q=q), "choices": choices,
                     "answer": rng.randrange(len(choices))})
    return rows


TASK_YAML = {"task": "tiny_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
             "doc_to_text": "{{stem}}", "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
             "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                             {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny-gpt2"
    subprocess.run([os.path.join(VENVS, "inference", "bin", "python"), MAKE_TINY_LM, str(out), "--arch", "gpt2",
                    "--train-steps", "30"], check=True, capture_output=True, timeout=300)
    return str(out)


@pytest.mark.slow
def test_daemon_lm_eval_matches_our_loglikelihood_choice_scoring_sample_for_sample(tmp_path, tiny_gpt2, venvs):
    """One daemon pass over a tiny GPT-2 checkpoint: lm-evaluation-harness (type lm-eval) on a local YAML task and
    our own text-mc with `choice_scoring: loglikelihood` on the same JSONL. Accuracy equal exactly, every sample's
    pick equal, the log-likelihoods equal to float noise."""
    rows = mc_rows()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump(
        {**TASK_YAML, "dataset_kwargs": {"data_files": {"test": str(tasks / "data.jsonl")}}}, sort_keys=False))
    shutil.copytree(tiny_gpt2, tmp_path / "ckpt" / "checkpoint-1000")
    cfg = {"auto_eval": {
        "project_name": "p", "model_name": "tiny", "cache_dir": str(tmp_path / "cache"),
        "watch": {"paths": [str(tmp_path / "ckpt")], "layout": "huggingface", "settle_seconds": 0.2},
        "executor": {"gpus": [], "max_attempts": 1},
        "benchmarks": [
            {"name": "harness", "type": "lm-eval", "dataset": "tasks",
             "options": {"tasks": ["tiny_mc"], "model_args": {"dtype": "float32"}}, "backend_options": {"device": "cpu"}},
            {"name": "native", "type": "text-mc", "dataset": "tasks/data.jsonl", "options": {"prompt": "{stem}"},
             "backend_options": {"choice_scoring": "loglikelihood", "device": "cpu", "dtype": "float32"}}]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("--config", str(tmp_path / "cfg.yaml"), "--once", timeout=400, check=0)
    out = tmp_path / "cache" / "results" / "tiny" / "iter_0001000"
    harness = json.loads((out / "harness" / "metrics.json").read_text())
    native = json.loads((out / "native" / "metrics.json").read_text())
    assert harness["n"] == native["n"] == len(rows)
    assert harness["metrics"]["acc"] == native["metrics"]["accuracy"]
    assert harness["stderr"]["acc"] == pytest.approx(native["stderr"]["accuracy"], rel=1e-12)
    assert set(harness["metrics"]) == {"acc", "acc_norm"} and harness["versions"]["lm-eval"]

    def predictions(name):
        path = out / name / "predictions.jsonl"
        return {json.loads(line)["sample_id"].split("/")[-1]: json.loads(line) for line in path.read_text().splitlines()}

    theirs, ours = predictions("harness"), predictions("native")
    assert set(theirs) == set(ours) == {r["id"] for r in rows}
    for row in rows:
        t, o = theirs[row["id"]], ours[row["id"]]
        assert t["request_messages"][0]["content"] == o["request_messages"][-1]["content"] == row["stem"]
        assert t["response"]["text"] == o["response"]["text"], row["id"]
        assert t["response"]["choice_logprobs"] == pytest.approx(o["response"]["choice_logprobs"], abs=1e-4)
        assert t["response"]["lm_eval_metrics"]["acc"] == float(o["response"]["text"] == row["choices"][row["answer"]])
    assert 0 < harness["metrics"]["acc"] < 1  # a set where picking matters, not all right or all wrong


@pytest.mark.slow
def test_bench_run_lm_eval_uses_the_harness_stages(tmp_path, tiny_gpt2):
    """tools/bench.py runs an external-harness type through the same stage modules as the daemon."""
    from conftest import bench_py
    rows = mc_rows(8)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump(
        {**TASK_YAML, "dataset_kwargs": {"data_files": {"test": str(tasks / "data.jsonl")}}}, sort_keys=False))
    r = bench_py("run", "lm-eval", "--dataset", str(tasks), "--option", 'tasks=["tiny_mc"]', "--model", tiny_gpt2,
                 "--backend-opt", "device=cpu", "--output-root", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "tiny-gpt2" / "lm-eval" / "metrics.json").read_text())
    assert metrics["n"] == len(rows) and set(metrics["metrics"]) == {"acc", "acc_norm"}
    assert (tmp_path / "out" / "tiny-gpt2" / "lm-eval" / "result_lm-eval.txt").exists()


# ---- what the hf backend scores under a chat template, and the curves it may not join (issue 16 item 0) ---------
def test_the_continuation_is_lm_evals_space_choice_plainly_and_the_bare_choice_after_a_chat_template():
    from evaluator.stages.inference.backends.hf import target_delimiter
    assert target_delimiter({}, chat=False) == " " and target_delimiter({}, chat=True) == ""
    assert target_delimiter({"target_delimiter": " "}, chat=True) == " "  # the scoring before 2026-11-30, by name
    assert target_delimiter({"target_delimiter": ""}, chat=False) == ""
    with pytest.raises(EvaluatorError, match="backend_options.target_delimiter: expected a string"):
        target_delimiter({"target_delimiter": 1}, chat=True)


def bench_settings(**backend_options) -> dict:
    from evaluator.daemon import fingerprint as F
    from evaluator.daemon.config import BenchmarkConfig
    return F.settings(BenchmarkConfig(name="mc", type="text-mc", dataset="/data/mc", backend_options=backend_options),
                      0, "d1")


def test_chat_template_loglikelihood_benchmarks_get_new_settings_and_no_other_benchmark_does():
    from evaluator.daemon import fingerprint as F
    from evaluator.stages.inference.backends.hf import CHAT_CHOICE_RULE
    changed = bench_settings(choice_scoring="loglikelihood")
    before = {k: v for k, v in changed.items() if k != "chat_choice_rule"}  # what the same spec hashed to before
    assert F.changes(before, changed) == [f"chat_choice_rule: - -> {CHAT_CHOICE_RULE}"]
    for unchanged in (bench_settings(), bench_settings(choice_scoring="generate"),
                      bench_settings(choice_scoring="loglikelihood", chat_template=False),
                      bench_settings(choice_scoring="loglikelihood", target_delimiter=" ")):
        assert "chat_choice_rule" not in unchanged
