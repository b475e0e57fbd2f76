"""evaluator.api.tracking: the history store shared with the daemon, evaluation contexts with real W&B (offline) and
MLflow (SQLite) stores, and results as pandas data. No mocks: the one fault injected is a failing callable
integration, which is the user's own code by definition."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from evaluator.api import tracking as T
from evaluator.common.errors import EvaluatorError
from recorder.sinks import LocalHistorySink, ResultRecord
from recorder.wandb_sink import run_id
from test_recorder_wandb import wandb_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Scored:
    """An EvaluationResult's shape as the store reads it: metrics, stderr, per-category values, samples with
    per-sample scores, info (dataset id, n)."""

    def __init__(self, hits: list[int], dataset_id: str = "qa"):
        self.metrics = {"exact_match": sum(hits) / len(hits)}
        self.stderr = {"exact_match": 0.1}
        self.per_category = {}
        self.samples = [{"sample_id": f"s{i}", "status": "ok", "prediction": "A" if h else "B", "target": "A",
                         "scores": {"exact_match": float(h)}} for i, h in enumerate(hits)]
        self.info = {"dataset_id": dataset_id, "n": len(hits)}


def run_python(code: str) -> str:
    """Run code in a fresh interpreter of this venv from the checkout; returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def daemon_result(cache, run, iteration, bench, metrics) -> ResultRecord:
    """A result as the daemon records it: metrics.json in the results tree, then its LocalHistorySink."""
    out = cache / "results" / run / f"iter_{iteration:07d}" / bench
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "n": 4}))
    record = ResultRecord(run=run, iteration=iteration, benchmark=bench, metrics=metrics, n=4, tokens_b=iteration / 1000,
                          metrics_path=str(out / "metrics.json"))
    LocalHistorySink(str(cache)).record(record)
    return record


# ---- the store ---------------------------------------------------------------------------------------------------
def test_a_tracked_run_is_seen_by_a_fresh_process_and_by_the_daemons_history_sink(tmp_path):
    tracker = T.MetricsTracker(cache_dir=str(tmp_path))
    tracker.start_run("notebook", iteration=500, lr=3e-4, note="warmup off")
    tracker.log_metrics({"accuracy": 0.75, "latency": 120.5}, benchmark="qa")
    tracker.end_run()

    seen = json.loads(run_python(f"""
        import json
        from evaluator.api import get_metrics_history
        print(json.dumps(get_metrics_history(cache_dir={str(tmp_path)!r})))
    """))
    assert [(e["run"], e["iteration"], e["benchmark"], e["metrics"]) for e in seen] == [
        ("notebook", 500, "qa", {"accuracy": 0.75, "latency": 120.5})]
    assert seen[0]["metadata"]["lr"] == 3e-4 and seen[0]["metadata"]["note"] == "warmup off"
    assert seen[0]["metadata"]["duration"] >= 0 and seen[0]["recorded_at"].endswith("+00:00")
    assert seen[0]["recorded_by"] == "evaluator.api"
    # the daemon's own sink reads the same line: its summary.md and curves.png will show the run
    sink = LocalHistorySink(str(tmp_path))
    rows = sink.rows("notebook")
    assert [(r["iteration"], r["benchmark"], r["metrics"]["accuracy"]) for r in rows] == [(500, "qa", 0.75)]
    sink.flush()  # what a daemon pass does with a history newer than its views
    assert "accuracy" in (tmp_path / "results" / "notebook" / "summary.md").read_text()
    assert (tmp_path / "results" / "notebook" / "curves.png").exists()


def test_the_store_is_configures_cache_dir_when_none_is_given(tmp_path):
    from evaluator.api.evaluate import configure

    before = configure()
    configure(cache_dir=str(tmp_path))
    try:
        T.record_result("nb", 0, "qa", {"accuracy": 0.5})
        assert [e["run"] for e in T.get_metrics_history()] == ["nb"]
        assert (tmp_path / "results" / "nb" / "history.jsonl").exists()
        configure(cache_dir="")
        with pytest.raises(EvaluatorError, match=r"cache_dir: not set; pass cache_dir=\.\.\. or call"):
            T.get_metrics_history()
    finally:
        configure(**before)


def test_the_api_sees_what_the_daemon_recorded(tmp_path):
    daemon_result(tmp_path, "tiny", 1000, "qa", {"exact_match": 0.5})
    daemon_result(tmp_path, "tiny", 2000, "qa", {"exact_match": 0.75})
    history = T.get_metrics_history(cache_dir=str(tmp_path))
    assert [(e["run"], e["iteration"], e["metrics"]["exact_match"], e["recorded_by"]) for e in history] == [
        ("tiny", 1000, 0.5, "daemon"), ("tiny", 2000, 0.75, "daemon")]
    assert all(e["recorded_at"] for e in history), "a daemon result's time is its metrics.json's"


def test_recording_a_result_again_is_a_new_revision_that_replaces_its_history_line(tmp_path):
    for value in (0.5, 0.6):
        T.record_result("nb", 0, "qa", {"accuracy": value}, cache_dir=str(tmp_path))
    history = T.get_metrics_history(cache_dir=str(tmp_path))
    assert [(e["metrics"]["accuracy"], e["revision"]) for e in history] == [(0.6, 1)]
    doc = json.loads((tmp_path / "results" / "nb" / "iter_0000000" / "qa" / "metrics.json").read_text())
    assert doc["revision"] == 1 and doc["metrics"] == {"accuracy": 0.6}
    frame = T.load_results(str(tmp_path))
    assert list(zip(frame.value, frame.revision)) == [(0.6, 1)], "one row per result: its latest revision"


def test_recording_into_a_run_the_daemon_records_is_refused(tmp_path):
    daemon_result(tmp_path, "tiny", 1000, "qa", {"exact_match": 0.5})
    with pytest.raises(EvaluatorError, match="run 'tiny': .* holds results the daemon recorded"):
        T.record_result("tiny", 2000, "qa", {"exact_match": 0.6}, cache_dir=str(tmp_path))
    assert [e["iteration"] for e in T.get_metrics_history(cache_dir=str(tmp_path))] == [1000]


def test_recording_into_a_run_the_daemons_ledger_holds_is_refused_before_it_records_anything(tmp_path):
    # the daemon has the run's first checkpoint in flight (a ledger row, no history line yet): an API line for the
    # same key would make the daemon's local sink take its own result for a re-offer and drop it
    from evaluator.daemon.ledger import Ledger

    led = Ledger(str(tmp_path))
    led.db.execute("INSERT INTO jobs (run, iteration, benchmark, state, path, created_at, updated_at) "
                   "VALUES ('tiny', 1000, 'qa', 'scoring', '/ckpt', 0, 0)")
    led.close()
    with pytest.raises(EvaluatorError, match="run 'tiny': the daemon's ledger .* has 1 job"):
        T.record_result("tiny", 1000, "qa", {"exact_match": 0.6}, cache_dir=str(tmp_path))
    assert not (tmp_path / "results" / "tiny").exists()
    T.record_result("notebook", 1000, "qa", {"exact_match": 0.6}, cache_dir=str(tmp_path))  # another name is fine


def test_a_metric_that_is_not_a_number_is_an_error_naming_it(tmp_path):
    tracker = T.MetricsTracker(cache_dir=str(tmp_path))
    tracker.start_run("nb")
    with pytest.raises(EvaluatorError, match=r"metrics\.cost: expected a number, got 'cheap'"):
        tracker.log_metrics({"accuracy": 0.5, "cost": "cheap"})


def test_a_run_name_that_is_not_one_folder_is_refused(tmp_path):
    with pytest.raises(EvaluatorError, match="run_name: expected a non-empty name without '/'"):
        T.MetricsTracker(cache_dir=str(tmp_path)).start_run("../elsewhere")


def test_end_run_records_all_of_the_runs_benchmarks_or_none_when_one_is_refused(tmp_path):
    tracker = T.MetricsTracker(cache_dir=str(tmp_path))
    tracker.start_run("nb")
    tracker.log_metrics({"accuracy": 0.9}, benchmark="a")
    unpaired = Scored([1, 0])
    unpaired.samples = [{"x": 1}]  # no sample_id, status, scores: refused when it is recorded
    tracker.log_metrics(unpaired, benchmark="b")
    for _ in range(2):  # asked again, still nothing: 'a' is not recorded a second time as its revision 1
        with pytest.raises(EvaluatorError, match=r"nb@0/b: samples\[0\]: missing sample_id, status, scores"):
            tracker.end_run()
    assert T.get_metrics_history(cache_dir=str(tmp_path)) == []
    assert not (tmp_path / "results" / "nb").exists()


def test_an_iteration_beyond_what_the_daemons_ledger_holds_is_refused(tmp_path):
    with pytest.raises(EvaluatorError, match=r"^iteration: expected a whole number from 0 to 2\*\*63-1 .*got "
                                             r"9223372036854775808$"):
        T.MetricsTracker(cache_dir=str(tmp_path)).start_run("big", iteration=2 ** 63)
    T.record_result("big", 2 ** 63 - 1, "qa", {"accuracy": 0.5}, cache_dir=str(tmp_path))  # the largest one is fine
    assert list(T.load_results(str(tmp_path)).iteration) == [2 ** 63 - 1]


# ---- track_metrics ----------------------------------------------------------------------------------------------
def test_track_metrics_records_the_named_metrics_of_each_call_at_the_next_iteration(tmp_path):
    @T.track_metrics(["accuracy", "latency"], cache_dir=str(tmp_path))
    def custom_evaluation(acc):
        return {"accuracy": acc, "latency": 120.5, "other_metric": "not tracked"}

    assert custom_evaluation(0.8)["other_metric"] == "not tracked", "the function's value is returned unchanged"
    custom_evaluation(0.9)
    history = T.get_metrics_history("custom_evaluation", cache_dir=str(tmp_path))
    assert [(e["iteration"], e["metrics"]) for e in history] == [
        (0, {"accuracy": 0.8, "latency": 120.5}), (1, {"accuracy": 0.9, "latency": 120.5})]


def test_track_metrics_raises_when_a_named_metric_is_missing(tmp_path):
    @T.track_metrics(["accuracy", "f1"], cache_dir=str(tmp_path))
    def evaluation():
        return {"accuracy": 0.8}

    with pytest.raises(EvaluatorError, match="evaluation returned no 'f1'"):
        evaluation()
    assert T.get_metrics_history(cache_dir=str(tmp_path)) == []


# ---- comparisons ------------------------------------------------------------------------------------------------
def test_compare_runs_pairs_the_runs_on_their_samples_and_says_what_it_compared(tmp_path):
    tracker = T.MetricsTracker(cache_dir=str(tmp_path))
    runs = {"baseline": [1, 0, 0, 1, 0, 0, 1, 0], "improved": [1, 1, 1, 1, 1, 1, 1, 0]}
    for name, hits in runs.items():
        tracker.start_run(name)
        tracker.log_metrics(Scored(hits))
        tracker.end_run()
    c = tracker.compare_runs("exact_match")
    assert c["runs"]["baseline"]["value"] == 3 / 8 and c["runs"]["improved"]["value"] == 7 / 8
    assert c["_stats"]["best"] == 7 / 8 and c["_stats"]["best_run"] == "improved"
    assert c["_stats"]["average"] == pytest.approx(5 / 8)
    pair = c["paired"]["baseline"]
    # 4 samples fixed by `improved`, none broken: exact McNemar on binary scores, p = 2 * 0.5**4
    assert (pair["against"], pair["method"], pair["n"], pair["delta"]) == ("improved", "mcnemar_exact", 8, -0.5)
    assert pair["p"] == pytest.approx(0.125)
    assert "paired test" in c["compared"] and "qa/exact_match" in c["compared"]


def test_compare_metric_says_why_a_run_without_per_sample_scores_is_not_paired(tmp_path):
    T.record_result("a", 0, "qa", Scored([1, 1, 0, 0]), cache_dir=str(tmp_path))
    T.record_result("b", 0, "qa", {"exact_match": 0.25}, cache_dir=str(tmp_path))
    c = T.compare_metric("exact_match", cache_dir=str(tmp_path))
    assert c["paired"] == {} and "scores.jsonl" in c["not_paired"]["b"]


def test_compare_metric_of_a_metric_in_two_benchmarks_asks_which(tmp_path):
    T.record_result("a", 0, "qa", {"accuracy": 0.5}, cache_dir=str(tmp_path))
    T.record_result("a", 0, "mc", {"accuracy": 0.7}, cache_dir=str(tmp_path))
    with pytest.raises(EvaluatorError, match="recorded for benchmarks mc, qa: pass benchmark="):
        T.compare_metric("accuracy", cache_dir=str(tmp_path))
    assert T.compare_metric("accuracy", benchmark="mc", cache_dir=str(tmp_path))["_stats"]["best"] == 0.7


# what a damaged store holds (file under results/a/, its text; None: a folder there), and the error naming it
DAMAGE = {
    "a history line without metrics": ("history.jsonl", '{"run": "a", "iteration": 10, "benchmark": "qa"}\n',
                                       r"history\.jsonl:1: not a result line"),
    "an iteration as a string": ("history.jsonl", '{"run": "a", "iteration": "10", "benchmark": "qa", '
                                                  '"metrics": {"acc": 0.5}}\n',
                                 r"history\.jsonl:1: iteration: expected a whole number"),
    "a revision that is no number": ("history.jsonl", '{"run": "a", "iteration": 10, "benchmark": "qa", '
                                                      '"metrics": {"acc": 0.5}, "revision": "x"}\n',
                                     r"history\.jsonl:1: revision: expected a whole number"),
    "a NaN metric": ("history.jsonl", '{"run": "a", "iteration": 10, "benchmark": "qa", "metrics": {"acc": NaN}}\n',
                     r"history\.jsonl:1: metrics\.acc: expected a finite number"),
    "metrics.json holding a list": ("iter_0000010/qa/metrics.json", "[1]", r"metrics\.json: expected a JSON object"),
    "metrics.json not UTF-8": ("iter_0000010/qa/metrics.json", b'{"x": "\xff"}', r"metrics\.json: not UTF-8 text"),
    "metrics.json a folder": ("iter_0000010/qa/metrics.json", None, r"metrics\.json: cannot be read \(Is a directory\)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_store_is_an_error_naming_the_file_never_a_traceback_or_a_nan_best(tmp_path, damage):
    for run, value in (("a", 0.5), ("b", 0.7)):
        T.record_result(run, 10, "qa", {"acc": value}, cache_dir=str(tmp_path))
    name, text, said = DAMAGE[damage]
    path = tmp_path / "results" / "a" / name
    if text is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(EvaluatorError, match=said):
        T.compare_metric("acc", cache_dir=str(tmp_path))


# ---- evaluation contexts ----------------------------------------------------------------------------------------
def test_a_context_logs_to_mlflow_at_step_iteration(tmp_path):
    from mlflow.tracking import MlflowClient

    for iteration, value in ((200, 0.6), (100, 0.5)):
        with T.evaluation_context(run_name="ckpt-run", iteration=iteration, cache_dir=str(tmp_path)) as ctx:
            ctx.log_to_mlflow(experiment_name="training")
            ctx.metrics_tracker.log_metrics({"accuracy": value}, benchmark="qa")
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    exp = client.get_experiment_by_name("training")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "ckpt-run"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "qa/accuracy")) == [
        (100, 0.5), (200, 0.6)]


def test_a_failing_integration_raises_after_the_others_ran(tmp_path):
    seen = []

    def monitor(run_result, results):
        seen.append(run_result["metrics"])

    def broken(run_result, results):
        raise ConnectionError("monitoring endpoint down")  # the user's own integration: the fault is real code

    with pytest.raises(T.IntegrationFailed, match="broken: ConnectionError: monitoring endpoint down"):
        with T.evaluation_context(run_name="r", cache_dir=str(tmp_path)) as ctx:
            ctx.add_mlops_integration(broken)
            ctx.add_mlops_integration(monitor)
            ctx.metrics_tracker.log_metrics({"accuracy": 0.5}, benchmark="qa")
    assert seen == [{"qa": {"accuracy": 0.5}}]
    assert [e["run"] for e in T.get_metrics_history(cache_dir=str(tmp_path))] == ["r"], "recorded locally first"


def test_an_mlflow_store_that_cannot_be_written_raises(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(T.IntegrationFailed, match="^mlflow: "):
        with T.evaluation_context(run_name="r", cache_dir=str(tmp_path / "cache")) as ctx:
            ctx.log_to_mlflow("exp", tracking_uri="sqlite:///" + str(tmp_path / "file" / "mlflow.db"))
            ctx.metrics_tracker.log_metrics({"accuracy": 0.5}, benchmark="qa")


def test_a_context_refuses_an_hret_keyword_it_replaces_before_anything_runs(tmp_path):
    with pytest.raises(EvaluatorError, match="evaluation_context: model=: the decorated function is the model"):
        T.evaluation_context(dataset="kmmlu", model="huggingface", cache_dir=str(tmp_path))


def test_without_an_active_wandb_run_the_context_logs_through_our_wandb_sink(tmp_path):
    with T.evaluation_context(run_name="nb", iteration=300, cache_dir=str(tmp_path)) as ctx:
        ctx.log_to_wandb(project_name="evals", mode="offline")
        ctx.metrics_tracker.log_metrics({"accuracy": 0.5}, benchmark="qa")
    (run,) = wandb_runs(tmp_path / "wandb")
    assert run["id"] == run_id("evals", "nb") and run["project"] == "evals"
    assert [(r["iteration"], r["qa/accuracy"]) for r in run["rows"]] == [(300, 0.5)]
    assert ("qa/*", "iteration") in run["metrics"]


@pytest.mark.slow
def test_a_trainers_active_wandb_run_gets_the_eval_metrics_at_its_iterations_and_stays_open(tmp_path):
    out = run_python(f"""
        import json, wandb
        from evaluator.api import evaluation_context
        run = wandb.init(mode="offline", dir={str(tmp_path / "trainer")!r}, project="trainer", id="train-1",
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        run.define_metric("train/global_step")
        run.define_metric("*", step_metric="train/global_step", step_sync=True)  # as transformers' WandbCallback
        open_after = []
        for step in (10, 20, 30):
            run.log({{"train/loss": 1.0 / step, "train/global_step": step}})
            if step != 20:
                with evaluation_context(run_name="trainer", iteration=step, cache_dir={str(tmp_path / "cache")!r}) as ctx:
                    ctx.log_to_wandb()
                    ctx.metrics_tracker.log_metrics({{"accuracy": step / 100}}, benchmark="qa")
                open_after.append(wandb.run is run)
        run.log({{"train/loss": 0.01, "train/global_step": 40}})  # the trainer goes on logging to its run
        run.finish()
        print(json.dumps(open_after))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == [True, True], "the trainer's run is still the active one"
    (run,) = wandb_runs(tmp_path / "trainer")  # one session: ours went into the trainer's run, none of our own
    assert run["id"] == "train-1"
    evals = [(r["iteration"], r["qa/accuracy"]) for r in run["rows"] if "qa/accuracy" in r]
    assert evals == [(10, 0.1), (30, 0.3)]
    assert ("qa/*", "iteration") in run["metrics"] and ("iteration", "") in run["metrics"]
    assert [r["train/global_step"] for r in run["rows"] if "train/loss" in r] == [10, 20, 30, 40], \
        "rows the trainer logged after our evaluations are in its run: we did not finish it"
    assert not (tmp_path / "cache" / "wandb").exists(), "no run of our own was started"


QA = [("q1", "Capital of France?", "Paris"), ("q2", "2+2?", "4"), ("q3", "Color of the sky?", "blue"),
      ("q4", "3+3?", "6")]


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in QA))
    return str(path)


def test_ctx_evaluate_runs_the_function_and_records_its_result_with_its_per_sample_scores(tmp_path, qa_file):
    answers = {q: a for _, q, a in QA}
    with T.evaluation_context(dataset=qa_file, run_name="nb", iteration=7, cache_dir=str(tmp_path / "cache"),
                              benchmark_type="text-qa", metrics=["exact_match"], work_dir=str(tmp_path / "work")) as ctx:
        result = ctx.evaluate(lambda prompt: answers[prompt] if prompt != "2+2?" else "four")
        path = ctx.save_results(str(tmp_path / "out.json"))
    assert result.metrics["exact_match"] == 0.75
    (entry,) = T.get_metrics_history(cache_dir=str(tmp_path / "cache"))
    assert (entry["run"], entry["iteration"], entry["benchmark"], entry["n"]) == ("nb", 7, "text-qa", 4)
    assert entry["metrics"]["exact_match"] == 0.75
    samples = T.load_samples(str(tmp_path / "cache"))
    assert list(zip(samples.sample_id, samples.exact_match)) == [("q1", 1.0), ("q2", 0.0), ("q3", 1.0), ("q4", 1.0)]
    saved = json.loads(open(path).read())
    assert saved["iteration"] == 7 and saved["results"][0]["metrics"]["exact_match"] == 0.75


def test_ctx_benchmark_records_each_function_as_a_run_that_compare_metric_pairs(tmp_path, qa_file):
    answers = {q: a for _, q, a in QA}
    with T.evaluation_context(dataset=qa_file, iteration=1, cache_dir=str(tmp_path / "cache"),
                              benchmark_type="text-qa", metrics=["exact_match"]) as ctx:
        ctx.benchmark({"good": lambda p: answers[p], "bad": lambda p: "no idea" if p != "2+2?" else "4"})
    c = T.compare_metric("exact_match", runs=["good", "bad"], cache_dir=str(tmp_path / "cache"))
    assert {r: v["value"] for r, v in c["runs"].items()} == {"good": 1.0, "bad": 0.25}
    assert c["paired"]["bad"]["method"] == "mcnemar_exact" and c["paired"]["bad"]["broken"] == 3


def test_ctx_benchmark_with_a_work_dir_records_each_functions_own_per_sample_scores(tmp_path, qa_file):
    answers = {q: a for _, q, a in QA}
    with T.evaluation_context(dataset=qa_file, iteration=1, cache_dir=str(tmp_path / "cache"),
                              benchmark_type="text-qa", metrics=["exact_match"], work_dir=str(tmp_path / "w")) as ctx:
        ctx.benchmark({"good": lambda p: answers[p], "bad": lambda p: "no idea" if p != "2+2?" else "4"})
    c = T.compare_metric("exact_match", runs=["good", "bad"], cache_dir=str(tmp_path / "cache"))
    assert c["paired"]["bad"]["broken"] == 3, "each run's scores.jsonl is its own function's"


# a second result for one (run, benchmark) of a context: it would replace the first as its revision 1
SECOND_RESULT = {
    "ctx.benchmark key = the context's run": lambda ctx: (ctx.evaluate(lambda p: "Paris"),
                                                          ctx.benchmark({"sft": lambda p: "wrong"})),
    "one ctx.benchmark key twice": lambda ctx: (ctx.benchmark({"base": lambda p: "Paris"}),
                                                ctx.benchmark({"base": lambda p: "wrong"})),
    "the context's own run logged into after a ctx.benchmark of its name": lambda ctx: (
        ctx.benchmark({"sft": lambda p: "Paris"}), ctx.metrics_tracker.log_metrics({"exact_match": 0.1},
                                                                                   benchmark="text-qa")),
}


@pytest.mark.parametrize("case", SECOND_RESULT)
def test_a_context_refuses_a_second_result_for_one_run_and_benchmark_recording_nothing(tmp_path, qa_file, case):
    with pytest.raises(EvaluatorError, match="run '(sft|base)' already has a 'text-qa' result in this context"):
        with T.evaluation_context(dataset=qa_file, run_name="sft", iteration=10, cache_dir=str(tmp_path / "cache"),
                                  benchmark_type="text-qa", metrics=["exact_match"]) as ctx:
            SECOND_RESULT[case](ctx)
    assert T.get_metrics_history(cache_dir=str(tmp_path / "cache")) == []


def test_ctx_benchmark_refuses_a_run_name_that_is_not_one_folder_before_any_function_runs(tmp_path, qa_file):
    calls = []
    with T.evaluation_context(dataset=qa_file, cache_dir=str(tmp_path), benchmark_type="text-qa") as ctx:
        with pytest.raises(EvaluatorError, match="run: expected a non-empty name without '/'"):
            ctx.benchmark({"good": lambda p: calls.append(p) or "x", "team/bad": lambda p: "x"})
    assert calls == []


def test_a_context_refuses_metadata_that_is_not_a_dict_when_it_is_made(tmp_path):
    with pytest.raises(EvaluatorError, match="^evaluation_context: metadata: expected a dict of name -> JSON value, "
                                             "got 'ab'$"):
        T.evaluation_context(run_name="r", cache_dir=str(tmp_path), metadata="ab")


def test_save_results_to_a_path_under_a_file_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with T.evaluation_context(run_name="r", cache_dir=str(tmp_path / "cache")) as ctx:
        ctx.metrics_tracker.log_metrics({"accuracy": 0.5}, benchmark="qa")
        with pytest.raises(EvaluatorError, match=r"^save_results: path: .*file/r\.json: cannot be written \(a file "):
            ctx.save_results(str(tmp_path / "file" / "r.json"))


def test_a_result_whose_work_dir_a_later_run_reused_is_recorded_with_its_own_per_sample_scores(tmp_path, qa_file):
    from evaluator.api import quick_eval

    answers = {q: a for _, q, a in QA}
    good = quick_eval(lambda p: answers[p], qa_file, benchmark_type="text-qa", metrics=["exact_match"],
                      work_dir=str(tmp_path / "w"))
    quick_eval(lambda p: "no idea", qa_file, benchmark_type="text-qa", metrics=["exact_match"],
               work_dir=str(tmp_path / "w"))  # overwrites the folder's files
    T.record_result("good", 0, "qa", good, cache_dir=str(tmp_path / "cache"))
    frame = T.load_samples(str(tmp_path / "cache"), "good")
    assert list(frame.exact_match) == [1.0] * len(QA), "the recorded per-sample scores are good's own"


# ---- results as data --------------------------------------------------------------------------------------------
def test_load_results_has_one_row_per_run_iteration_benchmark_and_metric(tmp_path):
    daemon_result(tmp_path, "tiny", 1000, "qa", {"exact_match": 0.5, "token_f1": 0.6})
    T.record_result("nb", 0, "qa", Scored([1, 0, 1, 1]), cache_dir=str(tmp_path), tokens_b=1.5)
    frame = T.load_results(str(tmp_path))
    assert list(frame.columns) == T.RESULT_COLUMNS
    assert [tuple(r) for r in frame[["run", "iteration", "benchmark", "metric", "value", "n"]].itertuples(
        index=False)] == [("nb", 0, "qa", "exact_match", 0.75, 4), ("tiny", 1000, "qa", "exact_match", 0.5, 4),
                          ("tiny", 1000, "qa", "token_f1", 0.6, 4)]
    nb = frame[frame.run == "nb"].iloc[0]
    assert nb.stderr == 0.1 and nb.tokens_b == 1.5
    assert len(T.load_results(str(tmp_path), run="tiny")) == 2


def test_load_samples_has_one_row_per_sample_with_a_column_per_metric(tmp_path):
    daemon_result(tmp_path, "tiny", 1000, "qa", {"exact_match": 0.5})  # no scores.jsonl: listed, adds no rows
    T.record_result("nb", 0, "qa", Scored([1, 0, 1]), cache_dir=str(tmp_path))
    frame = T.load_samples(str(tmp_path))
    assert list(frame.columns) == T.SAMPLE_COLUMNS + ["exact_match"]
    assert list(frame.sample_id) == ["s0", "s1", "s2"] and list(frame.exact_match) == [1.0, 0.0, 1.0]
    assert frame.attrs["without_scores"] == [str(tmp_path / "results" / "tiny" / "iter_0001000" / "qa")]
