"""Per-sample scores: the evaluation stage writes scores.jsonl (one row per scored sample, what each metric compared)
before metrics.json, whose `per_sample` and `methods` say how each number aggregates and what computed it.

The text metrics and the judge are pure Python, so most tests run the stage in-process in the daemon venv; one
runs it inside a warm evaluation worker in the evaluation venv (the daemon's default path)."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from conftest import ROOT, venvs  # noqa: F401  (venvs: a fixture)
from test_gpt_eval import FAST, JudgeServer, dj_files

from evaluator.common.contracts import METRICS as METRICS_FILE, SCORES, SCORES_SCHEMA_VERSION, StageJob
from evaluator.common.records import ERROR, RunError, RunResult, write_results
from evaluator.stages.evaluation import stage
from evaluator.stages.evaluation.metrics import METRICS, MetricResult, label, source_metric
from evaluator.stages.evaluation.metrics.stats import sentence_scores

QA_ROWS = [
    {"question": "What sits on the mat?", "answer": ["The Cat!", "a kitten"], "category": "animals"},
    {"question": "Colour of the sky?", "answer": "blue", "category": "colours"},
    {"question": "Two plus two?", "answer": "four", "category": "numbers"},
    {"question": "Colour of grass?", "answer": "green", "category": "colours"},
]
QA_PREDICTIONS = ["a cat.", "The sky is blue", None, "Green!"]  # None: inference failed

MC_ROWS = [
    {"question": "Which animal barks?", "choices": ["cat meowing", "dog barking", "rain"], "answer": "dog barking"},
    {"question": "Which is weather?", "choices": ["cat meowing", "dog barking", "rain"], "answer": "C"},
    {"question": "Which meows?", "choices": ["cat meowing", "dog barking", "rain"], "answer": "A"},
    {"question": "Which is loud?", "choices": ["cat meowing", "dog barking", "rain"], "answer": "B"},
]
MC_PREDICTIONS = ["The answer is (B)", "A", "no idea", None]


def predictions(ids, texts, dataset_id="d") -> list[RunResult]:
    out = []
    for sid, text in zip(ids, texts):
        if text is None:
            out.append(RunResult(sample_id=sid, dataset_id=dataset_id, backend="hf", run_config={}, request_messages=[],
                                 response={"text": "", "usage": {}}, status=ERROR,
                                 error=RunError("timeout", "inference timed out", retryable=False)))
        else:
            out.append(RunResult(sample_id=sid, dataset_id=dataset_id, backend="hf", run_config={},
                                 request_messages=[], response={"text": text, "usage": {}}))
    return out


def eval_job(tmp_path, kind, dataset, texts, ids, **bench) -> StageJob:
    out = tmp_path / "out"
    write_results(str(out / "predictions.jsonl"), predictions(ids, texts))
    job = StageJob(stage="evaluation", run="r", iteration=1000, checkpoint="/ckpt", output_dir=str(out),
                   benchmark={"name": "b", "type": kind, "dataset": str(dataset), **bench})
    job.write(str(out / "eval.job.json"))
    return job


def text_job(tmp_path, kind, rows, texts, reverse=False, **bench) -> StageJob:
    """A text-qa/text-mc file and predictions for its rows (texts[i] for row i; reverse: written last row first)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [f"data-{i}" for i in range(len(rows))]  # the text loaders' ids: file stem and row number
    pairs = list(zip(ids, texts))[::-1] if reverse else list(zip(ids, texts))
    return eval_job(tmp_path, kind, data, [t for _, t in pairs], [i for i, _ in pairs], **bench)


def run_stage(job: StageJob) -> tuple[list[dict], dict]:
    assert stage.main(["--job", os.path.join(job.output_dir, "eval.job.json")]) == 0
    return read_outputs(job.output_dir)


def read_outputs(out) -> tuple[list[dict], dict]:
    with open(os.path.join(out, SCORES), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, METRICS_FILE), encoding="utf-8") as f:
        return rows, json.load(f)


def assert_rows_agree_with_metrics(rows: list[dict], doc: dict) -> None:
    """Every "mean" metric is the mean of its per-sample values (nulls left out), to 1e-12."""
    assert doc["per_sample"], "no per-sample metric to check"
    for name, kind in doc["per_sample"].items():
        values = [row["scores"][name] for row in rows]
        if kind == "mean":
            present = [v for v in values if v is not None]
            assert abs(math.fsum(present) / len(present) - doc["metrics"][name]) <= 1e-12, name


# ---------------------------------------------------------------------------------------------------------------
# text-qa / text-mc through the stage

def test_text_qa_rows_follow_the_predictions_and_average_to_metrics_json(tmp_path):
    rows, doc = run_stage(text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS, reverse=True))
    assert [r["sample_id"] for r in rows] == ["data-3", "data-2", "data-1", "data-0"]  # prediction order
    assert all(r["schema_version"] == SCORES_SCHEMA_VERSION for r in rows)
    assert doc["per_sample"] == {"exact_match": "mean", "token_f1": "mean"}
    assert [r["scores"]["exact_match"] for r in rows] == [1.0, 0.0, 0.0, 1.0]
    assert_rows_agree_with_metrics(rows, doc)
    assert [r["category"] for r in rows] == ["colours", "numbers", "colours", "animals"]
    assert rows[3]["target"] == "The Cat!" and rows[3]["references"] == ["The Cat!", "a kitten"]


def test_metrics_json_names_the_method_of_every_metric(tmp_path):
    _, doc = run_stage(text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS))
    assert doc["methods"] == {"exact_match": METRICS["exact_match"].method, "token_f1": METRICS["token_f1"].method}
    assert doc["methods"]["exact_match"].startswith("SQuAD exact match")


def test_qa_compared_shows_the_normalised_prediction_and_the_gold_it_matched_best(tmp_path):
    rows, _ = run_stage(text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS))
    assert rows[0]["prediction"] == "a cat."  # raw text kept beside the normalised form
    assert rows[0]["compared"]["exact_match"] == {"prediction": "cat", "reference": "cat"}
    assert rows[1]["compared"]["token_f1"] == {"prediction": "sky is blue", "reference": "blue"}
    assert rows[1]["scores"]["token_f1"] == pytest.approx(0.5)


def test_failed_inference_is_an_error_row_scored_as_wrong(tmp_path):
    rows, doc = run_stage(text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS))
    failed = rows[2]
    assert failed["status"] == "error" and failed["prediction"] == ""
    assert failed["scores"] == {"exact_match": 0.0, "token_f1": 0.0}
    assert failed["compared"]["exact_match"] == {"prediction": "", "reference": "four"}
    assert doc["n"] == 4 and doc["n_error"] == 1
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]


def test_mc_compared_shows_the_extracted_choice_against_the_target(tmp_path):
    rows, doc = run_stage(text_job(tmp_path, "text-mc", MC_ROWS, MC_PREDICTIONS))
    assert [r["compared"]["accuracy"] for r in rows] == [
        {"prediction": "(B) dog barking", "reference": "(B) dog barking"},
        {"prediction": "(A) cat meowing", "reference": "(C) rain"},
        {"prediction": None, "reference": "(A) cat meowing"},  # unparsed: no choice picked
        {"prediction": None, "reference": "(B) dog barking"},  # failed inference
    ]
    assert [r["scores"] for r in rows] == [{"accuracy": 1.0, "unparsed_rate": 0.0}, {"accuracy": 0.0, "unparsed_rate": 0.0},
                                           {"accuracy": 0.0, "unparsed_rate": 1.0}, {"accuracy": 0.0, "unparsed_rate": 0.0}]
    assert rows[0]["choices"] == ["cat meowing", "dog barking", "rain"] and rows[3]["status"] == "error"
    assert doc["per_sample"] == {"accuracy": "mean", "unparsed_rate": "mean"}
    assert doc["methods"]["unparsed_rate"] == METRICS["accuracy"].method  # an output labelled by its metric
    assert_rows_agree_with_metrics(rows, doc)


def test_scores_jsonl_is_written_before_metrics_json(tmp_path):
    """A fault writing metrics.json (here: a directory in its place, which os.replace cannot overwrite) comes after
    scores.jsonl is complete, and leaves no metrics.json: a result that is done always has its scores."""
    job = text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS)
    os.makedirs(os.path.join(job.output_dir, METRICS_FILE))
    with pytest.raises(IsADirectoryError):
        stage.main(["--job", os.path.join(job.output_dir, "eval.job.json")])
    with open(os.path.join(job.output_dir, SCORES), encoding="utf-8") as f:
        assert len([json.loads(line) for line in f]) == len(QA_ROWS)
    assert not os.path.isfile(os.path.join(job.output_dir, METRICS_FILE))


def test_a_bad_job_writes_neither_file(tmp_path):
    job = text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS, metrics=["accuracy"])  # QA rows have no choices
    assert stage.main(["--job", os.path.join(job.output_dir, "eval.job.json")]) == 2
    assert not os.path.exists(os.path.join(job.output_dir, SCORES))
    assert not os.path.exists(os.path.join(job.output_dir, METRICS_FILE))


# ---------------------------------------------------------------------------------------------------------------
# the LLM judge: values for judged questions only, and a result with no per-sample metric at all

@pytest.fixture
def judge_server(tmp_path):
    started = []

    def start(script):
        started.append(JudgeServer(tmp_path, script))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def judge_job(tmp_path, server, **options) -> StageJob:
    root = dj_files(tmp_path / "gpt", questions=[("1", "writing"), ("2", "math"), ("3", "writing")])
    return eval_job(tmp_path, "gpt_eval", root, ["answer-1", "answer-2", "answer-3"], ["1", "2", "3"],
                    metrics=["llm_judge"],
                    metric_options={"llm_judge": {"base_url": server.base_url, "swap": False, **FAST, **options}})


def test_judge_rows_have_values_for_judged_questions_and_null_for_the_rest(tmp_path, judge_server):
    server = judge_server({"rules": [{"contains": "A2: base-1", "replies": ["8 6"]},
                                     {"contains": "A2: base-2", "replies": ["I cannot tell"]},
                                     {"contains": "A2: base-3", "replies": ["3 9"]}]})
    rows, doc = run_stage(judge_job(tmp_path, server))
    assert [r["scores"]["win_rate"] for r in rows] == [1.0, None, 0.0]
    assert [r["scores"]["score"] for r in rows] == [8.0, None, 3.0]
    assert "judged" not in rows[0]["scores"]  # a count has no per-sample value
    assert rows[0]["compared"]["win_rate"] == {"prediction": "answer-1", "reference": "base-1"}
    assert doc["per_sample"] == {m: "mean" for m in ("win_rate", "tie_rate", "loss_rate", "score", "baseline_score")}
    assert doc["methods"]["win_rate"].endswith("judge model judge-model")
    assert_rows_agree_with_metrics(rows, doc)


def test_without_per_sample_values_every_sample_still_has_a_row(tmp_path, judge_server):
    server = judge_server({"rules": [{"contains": "", "replies": ["what a lovely day"]}]})  # nothing parses
    rows, doc = run_stage(judge_job(tmp_path, server))
    assert doc["metrics"] == {"judged": 0, "judge_unparsed": 3, "judge_errors": 0}
    assert doc["per_sample"] == {}
    assert [(r["sample_id"], r["scores"], r["prediction"]) for r in rows] == [
        ("1", {}, "answer-1"), ("2", {}, "answer-2"), ("3", {}, "answer-3")]


# ---------------------------------------------------------------------------------------------------------------
# the registry: how each metric aggregates and what computes it

def test_every_registered_metric_declares_how_it_aggregates_and_its_method():
    assert all(spec.method for spec in METRICS.values()), [m for m, s in METRICS.items() if not s.method]
    assert {m for m in ("bleu_1", "bleu_4", "meteor", "exact_match", "accuracy", "cider_d", "rouge_l", "llm_judge")
            if METRICS[m].aggregate == "corpus"} == {"bleu_1", "bleu_4", "meteor"}
    with pytest.raises(ValueError, match="aggregate 'median'"):
        type(METRICS["exact_match"])("x", "m:f", None, "d", aggregate="median")


@pytest.mark.parametrize("output, members, expected", [
    ("cider_d", ["bleu_1", "cider_d"], "cider_d"),
    ("sbert_sim_minilm_l6", ["cider_d", "sbert_sim"], "sbert_sim"),  # named after its model
    ("unparsed_rate", ["accuracy"], "accuracy"),
    ("win_rate", ["llm_judge"], "llm_judge"),
])
def test_an_output_name_is_labelled_by_the_metric_it_comes_from(output, members, expected):
    assert source_metric(output, members) == expected


def test_an_output_no_requested_metric_explains_is_a_bug_named_with_its_function():
    with pytest.raises(ValueError, match=r"caption_metrics reported 'mystery'.*bleu_1, cider_d"):
        source_metric("mystery", ["bleu_1", "cider_d"], "caption_metrics")


def test_sentence_values_of_a_corpus_metric_are_marked_sentence_and_get_no_stderr():
    part = MetricResult(values={"bleu_4": 0.3})
    sentence_scores("bleu_4", [0.1, 0.5], part)
    label(part, ["bleu_4"])
    assert part.per_sample_kind == {"bleu_4": "sentence"} and part.stderr == {}
    assert part.methods["bleu_4"] == METRICS["bleu_4"].method


# ---------------------------------------------------------------------------------------------------------------
# the daemon's default path: a warm evaluation worker in the evaluation venv

def test_a_warm_evaluation_worker_writes_scores_jsonl_before_metrics_json(tmp_path, venvs):  # noqa: F811
    job = text_job(tmp_path, "text-qa", QA_ROWS, QA_PREDICTIONS)
    request = {"module": "evaluator.stages.evaluation", "job": os.path.join(job.output_dir, "eval.job.json"),
               "log": str(tmp_path / "eval.stderr.log"), "cwd": ROOT, "token": "t:evaluation"}
    proc = subprocess.run([venvs["evaluation"], "-m", "evaluator.stages.worker"], input=json.dumps(request) + "\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:] + (tmp_path / "eval.stderr.log").read_text()[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["rc"] == 0
    rows, doc = read_outputs(job.output_dir)
    assert doc["versions"]["transformers"].startswith("4.42")  # scored in the evaluation venv
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    assert_rows_agree_with_metrics(rows, doc)
    out = tmp_path / "out"
    assert os.stat(out / SCORES).st_mtime_ns <= os.stat(out / METRICS_FILE).st_mtime_ns
