"""The Python API's evaluation half (evaluator/api/evaluate.py): a user's function run over a benchmark and scored.

Pure parts run here (the daemon venv: no torch); the caption metric runs through the real evaluation venv; the
notebook test runs the caller's code in .venvs/inference (torch + transformers, no aac-metrics: a user's
environment) on the real SmolLM2, and every number is checked against `tools/bench.py eval` on the same predictions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import yaml

from conftest import DAEMON_PY, ROOT, VENVS
from evaluator import api as hret
from evaluator.api.evaluate import TooManyErrors, input_mode
from evaluator.common.errors import EvaluatorError

BENCH = os.path.join(ROOT, "tools", "bench.py")
REAL_MODEL = os.path.join(VENVS, "models", "smollm2-135m-instruct")
QA = [("q1", "Capital of France?", "Paris", "geo"), ("q2", "2+2?", "4", "math"),
      ("q3", "Color of the sky?", "blue", "geo"), ("q4", "3+3?", "6", "math"),
      ("q5", "Largest planet?", "Jupiter", "geo")]
ANSWERS = {"Capital of France?": "Paris", "2+2?": "four", "Color of the sky?": "The sky is blue",
           "3+3?": "6", "Largest planet?": "Saturn"}


@pytest.fixture(autouse=True)
def work_in_tmp(tmp_path):
    """Each test's work folders under its tmp_path; process-wide settings restored after."""
    before = hret.configure()
    hret.configure(cache_dir=str(tmp_path / "cache"))
    yield
    hret.configure(**before)


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a, "category": c}) + "\n"
                            for i, q, a, c in QA), encoding="utf-8")
    return str(path)


@pytest.fixture
def mc_file(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"id": "m1", "question": "2+2?", "choices": ["3", "4", "5"], "answer": "B"},
            {"id": "m2", "question": "Red fruit?", "choices": ["apple", "banana", "lime"], "answer": "A"},
            {"id": "m3", "question": "Even number?", "choices": ["7", "9", "8"], "answer": "C"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def caption_dir(tmp_path):
    """A canonical dataset with a target (exact_match) and references (cider_d) on every row."""
    root = tmp_path / "captions"
    root.mkdir()
    rows = [("c1", "a dog barks", ["a dog barks loudly", "a dog is barking"]),
            ("c2", "rain falls", ["rain falls on a roof", "heavy rain is falling"]),
            ("c3", "a car passes", ["a car passes by quickly", "a vehicle drives past"]),
            ("c4", "birds sing", ["birds sing in the trees", "many birds are singing"])]
    (root / "test.jsonl").write_text("".join(json.dumps(
        {"id": i, "messages": [{"role": "user", "content": f"Describe: {t}"}], "target": t, "references": refs})
        + "\n" for i, t, refs in rows), encoding="utf-8")
    (root / "metadata.json").write_text(json.dumps({"dataset_id": "captions-mini"}))
    return str(root)


def answer(prompt: str) -> str:
    return ANSWERS[prompt]


def bench_eval(dataset: str, predictions: str, metrics: str, out, *extra) -> dict:
    """`tools/bench.py eval` on a predictions file: its metrics.json."""
    proc = subprocess.run([DAEMON_PY, BENCH, "eval", dataset, "--predictions", predictions, "--metrics", metrics,
                           "--output-root", str(out), "--model-name", "m", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [os.path.join(d, "metrics.json") for d, _, files in os.walk(out) if "metrics.json" in files]
    return json.load(open(path))


# ---- running the function --------------------------------------------------------------------------------------
def test_a_function_raising_on_one_sample_gives_one_error_sample_and_the_rest_are_scored(qa_file):
    def flaky(prompt: str) -> str:
        if prompt == "3+3?":
            raise RuntimeError("CUDA out of memory (simulated by the test's own function)")
        return answer(prompt)
    result = hret.quick_eval(flaky, qa_file, benchmark_type="text-qa", max_error_rate=0.2)
    errors = [s for s in result.samples if s["status"] == "error"]
    assert [(s["sample_id"], s["error"]["type"], s["prediction"]) for s in errors] == [("q4", "RuntimeError", None)]
    assert "out of memory" in errors[0]["error"]["message"]
    assert result.info["n_error"] == 1 and result.info["errors"][0]["sample_id"] == "q4"
    # the failed sample counts as wrong, as in the stage: of the five only q1 is right
    assert result.metrics["exact_match"] == pytest.approx(1 / 5)


def test_samples_carry_input_reference_prediction_scores_and_status(qa_file):
    result = hret.quick_eval(answer, qa_file, benchmark_type="text-qa")
    first = result.samples[0]
    assert (first["input"], first["reference"], first["prediction"], first["status"]) == \
        ("Capital of France?", "Paris", "Paris", "ok")
    assert first["scores"] == {"exact_match": 1.0, "token_f1": 1.0}
    assert result.metrics == {"exact_match": pytest.approx(2 / 5), "token_f1": pytest.approx((1 + 0.5 + 1) / 5)}
    assert result.per_category["geo"]["n"] == 3 and result.stderr["exact_match"] > 0
    assert result.info["dataset_id"] and result.info["n"] == 5 and "exact_match" in result.info["methods"]


def test_a_batched_function_gets_lists_of_batch_size_and_answers_stay_with_their_samples(qa_file):
    seen = []

    def batched(prompts: list) -> list:
        seen.append(len(prompts))
        return [answer(p) for p in prompts]
    result = hret.quick_eval(batched, qa_file, benchmark_type="text-qa", batch_size=2)
    assert seen == [2, 2, 1]
    assert [s["prediction"] for s in result.samples] == [ANSWERS[q] for _, q, _, _ in QA]


def test_a_batch_that_raises_is_an_error_on_each_of_its_samples(qa_file):
    def batched(prompts: list) -> list:
        if "3+3?" in prompts:
            raise ValueError("bad batch")
        return [answer(p) for p in prompts]
    result = hret.quick_eval(batched, qa_file, benchmark_type="text-qa", batch_size=2, max_error_rate=0.5)
    assert [s["sample_id"] for s in result.samples if s["status"] == "error"] == ["q3", "q4"]


def test_max_workers_calls_the_function_from_that_many_threads_at_once(qa_file):
    # four calls must be inside the function together to pass the barrier; one at a time, each call would wait
    # for the others, time out and be an error sample
    barrier = threading.Barrier(4, timeout=30)
    threads = set()

    def slow(prompt: str) -> str:
        threads.add(threading.get_ident())
        if prompt != "Largest planet?":
            barrier.wait()
        return answer(prompt)
    result = hret.quick_eval(slow, qa_file, benchmark_type="text-qa", max_workers=4, max_error_rate=0)
    assert result.info["n_error"] == 0 and len(threads) == 4
    assert [s["prediction"] for s in result.samples] == [ANSWERS[q] for _, q, _, _ in QA]


def test_more_errors_than_max_error_rate_raise_with_the_samples_kept(qa_file):
    def broken(prompt: str) -> str:
        if prompt.endswith("?") and "+" in prompt:
            raise KeyError(prompt)
        return answer(prompt)
    with pytest.raises(TooManyErrors, match=r"2/5 samples failed \(40.0%\), above max_error_rate 20.0%") as e:
        hret.quick_eval(broken, qa_file, benchmark_type="text-qa", max_error_rate=0.2)
    assert [s["status"] for s in e.value.result.samples].count("error") == 2
    assert os.path.isfile(os.path.join(e.value.result.info["work_dir"], "predictions.jsonl"))
    # exactly at the limit the run is scored, as the inference stage decides (evaluator/common/records.py)
    assert hret.quick_eval(broken, qa_file, benchmark_type="text-qa", max_error_rate=0.4).info["n_error"] == 2


def test_the_default_max_error_rate_is_the_inference_stages(qa_file):
    def two_fail(prompt: str) -> str:
        if "+" in prompt:
            raise RuntimeError("no")
        return answer(prompt)
    with pytest.raises(TooManyErrors, match="above max_error_rate 10.0%"):
        hret.quick_eval(two_fail, qa_file, benchmark_type="text-qa")


def test_an_answer_that_is_not_a_string_is_an_error_sample(qa_file):
    result = hret.quick_eval(lambda p: 4 if p == "2+2?" else answer(p), qa_file, benchmark_type="text-qa",
                             max_error_rate=0.2)
    (bad,) = [s for s in result.samples if s["status"] == "error"]
    assert bad["sample_id"] == "q2" and "returned int, expected str" in bad["error"]["message"]


def test_text_mc_accuracy_extracts_the_chosen_letter(mc_file):
    letters = {"2+2?": "(B)", "Red fruit?": "The answer is A", "Even number?": "A"}
    result = hret.quick_eval(lambda p: letters[p.split("\n")[0]], mc_file, benchmark_type="text-mc")
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert [s["scores"]["accuracy"] for s in result.samples] == [1.0, 1.0, 0.0]


def test_sample_size_runs_the_first_samples_only(qa_file):
    calls = []
    result = hret.quick_eval(lambda p: calls.append(p) or answer(p), qa_file, benchmark_type="text-qa", sample_size=2)
    assert len(calls) == 2 and result.info["n"] == 2 and result.info["n_full"] == 5


# ---- what the function takes -----------------------------------------------------------------------------------
def test_input_mode_follows_the_first_parameter_name_or_annotation():
    def by_name(messages): ...
    def by_hint(history: list[dict]) -> str: ...
    def batched(batch: list[list[dict]]) -> list: ...
    def text(prompt: str) -> str: ...
    assert [input_mode(by_name, False, None), input_mode(by_hint, False, None), input_mode(batched, True, None),
            input_mode(text, False, None), input_mode(text, False, "messages")] == \
        ["messages", "messages", "messages", "text", "messages"]


def test_a_messages_function_gets_the_whole_history_and_a_text_function_is_refused_it(tmp_path):
    root = tmp_path / "chat"
    root.mkdir()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Say yes"}]
    (root / "test.jsonl").write_text(json.dumps({"id": "t1", "messages": history, "target": "yes"}) + "\n")
    (root / "metadata.json").write_text(json.dumps({"dataset_id": "chat", "metrics": ["exact_match"]}))
    got = []
    result = hret.quick_eval(lambda messages: got.append(messages) or "yes", str(root))
    assert got == [history] and result.metrics["exact_match"] == 1.0
    with pytest.raises(EvaluatorError, match=r"sample 't1' has the turns \[system, user, assistant, user\].*"
                                             r"input=\"messages\""):
        hret.quick_eval(lambda prompt: "yes", str(root))


@pytest.fixture
def mmau_dir(tmp_path):
    """An MMAU-Pro-format set (closed-form rows); its audio files exist (the loader checks), their content is unread."""
    root = tmp_path / "mmau-pro"
    (root / "data").mkdir(parents=True)
    for name in ("a.wav", "b.wav"):
        (root / "data" / name).write_bytes(b"RIFF")
    rows = [{"id": "x1", "audio_path": ["data/a.wav"], "question": "What is heard?",
             "choices": ["A dog", "A cat", "Rain"], "answer": "Rain", "category": "sound"},
            {"id": "x2", "audio_path": ["data/a.wav", "data/b.wav"], "question": "Which clip is louder?",
             "choices": ["The first", "The second"], "answer": "The second", "category": "multi"}]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def test_an_audio_benchmark_gives_a_messages_function_the_audio_paths(mmau_dir):
    heard = {}

    def listen(messages: list[dict]) -> str:
        parts = messages[-1]["content"]
        paths = [p["path"] for p in parts if p["type"] == "audio"]
        heard[len(paths)] = paths
        return "Rain" if len(paths) == 1 else "The first"
    result = hret.quick_eval(listen, str(mmau_dir), benchmark_type="mmau-pro", metrics=["mmau_string_match"])
    assert heard == {1: [str(mmau_dir / "data" / "a.wav")],
                     2: [str(mmau_dir / "data" / "a.wav"), str(mmau_dir / "data" / "b.wav")]}
    assert [s["scores"]["mmau_string_match"] for s in result.samples] == [1.0, 0.0]
    with pytest.raises(EvaluatorError, match="sample 'x1' has an audio part; a text function cannot get it"):
        hret.quick_eval(lambda prompt: "Rain", str(mmau_dir), benchmark_type="mmau-pro", metrics=["mmau_string_match"])


# ---- decorators, comparison, settings --------------------------------------------------------------------------
def test_the_decorated_function_called_with_no_arguments_evaluates_itself(qa_file):
    @hret.evaluate(dataset=qa_file, benchmark_type="text-qa", metrics=["exact_match"])
    def my_model(input_text: str) -> str:
        return answer(input_text)
    result = my_model()
    assert list(result.metrics) == ["exact_match"] and result.info["name"].endswith("my_model")
    assert my_model.fn("2+2?") == "four"  # the function itself stays callable
    assert my_model(sample_size=1).info["n"] == 1


def test_hret_keywords_this_api_replaces_are_refused_with_what_to_do():
    with pytest.raises(EvaluatorError, match="model=: the decorated function is the model here"):
        hret.evaluate(dataset="x", model="huggingface")
    with pytest.raises(EvaluatorError, match="samplesize=: not an option; did you mean 'sample_size'"):
        hret.evaluate(dataset="x", samplesize=3)


def test_compare_models_runs_every_function_on_the_same_samples_with_a_paired_test(qa_file):
    better = dict(ANSWERS, **{"2+2?": "4", "Largest planet?": "Jupiter"})
    results = hret.compare_models({"baseline": answer, "better": lambda p: better[p]}, qa_file,
                                  benchmark_type="text-qa")
    assert results["baseline"].metrics["exact_match"] == pytest.approx(2 / 5)
    assert results["better"].metrics["exact_match"] == pytest.approx(4 / 5)
    entry = results.comparisons["better"]["metrics"]["exact_match"]
    # 0/1 scores on the same 5 samples: exact McNemar on the 2 fixed, 0 broken pairs
    assert (entry["method"], entry["n"], entry["fixed"], entry["broken"], entry["p"]) == \
        ("mcnemar_exact", 5, 2, 0, 0.5)
    assert entry["delta"] == pytest.approx(0.4)
    rows = results.table()
    assert {(r["model"], r["metric"]) for r in rows} == {("better", "exact_match"), ("better", "token_f1")}


def test_compare_models_with_a_work_dir_keeps_each_functions_files_apart(qa_file, tmp_path):
    # one shared folder would hold only the last function's scores.jsonl, and the comparison would pair it with itself
    better = dict(ANSWERS, **{"2+2?": "4", "Largest planet?": "Jupiter"})
    results = hret.compare_models({"baseline": answer, "better": lambda p: better[p]}, qa_file,
                                  benchmark_type="text-qa", work_dir=str(tmp_path / "ab"))
    assert results["baseline"].info["work_dir"] != results["better"].info["work_dir"]
    assert all(r.info["work_dir"].startswith(str(tmp_path / "ab")) for r in results.values())
    entry = results.comparisons["better"]["metrics"]["exact_match"]
    assert (entry["old"], entry["new"], entry["fixed"]) == (pytest.approx(2 / 5), pytest.approx(4 / 5), 2)


def test_the_benchmark_decorator_compares_the_functions_it_returns(qa_file):
    @hret.benchmark(dataset=qa_file, benchmark_type="text-qa")
    def ab_test():
        return {"a": answer, "b": lambda p: "Paris"}
    results = ab_test()
    assert list(results) == ["a", "b"] and results.baseline == "a"
    assert results.comparisons["b"]["metrics"]["exact_match"]["method"] == "mcnemar_exact"


def test_configure_refuses_an_unknown_setting_naming_it():
    with pytest.raises(EvaluatorError, match="configure: max_worker: not a setting; did you mean 'max_workers'"):
        hret.configure(max_worker=2)
    with pytest.raises(EvaluatorError, match="configure: max_workers: "):
        hret.configure(max_workers=0)
    with pytest.raises(EvaluatorError, match=r"configure: seed: expected an integer >= 0, got -1"):
        hret.configure(seed=-1)  # the daemon config's range (MAX_SEED): numpy refuses a negative seed
    with pytest.raises(EvaluatorError, match=r"configure: seed: expected an integer <= 4294967295"):
        hret.configure(seed=2 ** 32)


def test_a_configured_evaluation_python_that_is_missing_is_an_error_naming_the_setting(caption_dir, tmp_path):
    hret.configure(evaluation_python=str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(EvaluatorError, match=r"evaluation_python: no python at .*no-venv/bin/python"):
        hret.quick_eval(lambda p: "x", caption_dir, metrics=["cider_d"])


def test_quick_eval_runs_a_benchmark_of_the_daemons_config_file(tmp_path, qa_file):
    cfg = {"auto_eval": {"project_name": "p", "model_name": "m", "cache_dir": str(tmp_path / "daemon-cache"),
                         "watch": {"paths": [str(tmp_path)]},
                         "benchmarks": [{"name": "qa", "type": "text-qa", "dataset": qa_file, "sample_size": 3,
                                         "metrics": ["token_f1"]}]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = hret.quick_eval(answer, benchmark="qa", config=str(path))
    assert (list(result.metrics), result.info["n"], result.info["benchmark"]) == (["token_f1"], 3, "qa")
    assert result.info["work_dir"].startswith(str(tmp_path / "daemon-cache"))  # the config's cache_dir
    with pytest.raises(EvaluatorError, match=r"benchmark='qaa': not in .*; did you mean 'qa'"):
        hret.quick_eval(answer, benchmark="qaa")


def test_load_config_errors_name_the_key_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("auto_eval:\n  project_name: p\n  model_name: m\n  benchmarks:\n"
                    "    - name: qa\n      type: text-qa\n      sample_size: 0\n")
    with pytest.raises(EvaluatorError, match=r"bad.yaml:7: auto_eval\.benchmarks\[0\]\.sample_size: "
                                             r"input should be greater than or equal to 1"):
        hret.load_config(str(path))


def test_load_config_without_a_file_names_its_argument_not_a_cli_flag(tmp_path):
    with pytest.raises(EvaluatorError, match="^load_config: path: expected the config file's path, got None$"):
        hret.load_config(None)
    with pytest.raises(EvaluatorError, match=r"^load_config: path: no such file: .*missing\.yaml$"):
        hret.load_config(str(tmp_path / "missing.yaml"))


# what each bad argument is refused with; (tmp_path, qa_file) -> the keyword arguments of quick_eval
BAD_ARGUMENTS = {
    "benchmark_type not a name": (lambda tmp, qa: {"benchmark_type": 1},
                                  r"^benchmark_type: unknown benchmark type 1 \(known: "),
    "work_dir a file": (lambda tmp, qa: {"benchmark_type": "text-qa", "work_dir": qa},
                        r"^work_dir: .*qa\.jsonl: expected a folder, found a file$"),
    "work_dir under a file": (lambda tmp, qa: {"benchmark_type": "text-qa", "work_dir": os.path.join(qa, "w")},
                              r"^work_dir: .*qa\.jsonl/w: cannot hold the run's files \(a file is where a folder"),
    "a data file without benchmark_type": (lambda tmp, qa: {},
                                           r"^dataset: .*qa\.jsonl: not a canonical dataset directory .*for another "
                                           r"layout pass benchmark_type= \(one of: .*text-qa"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_a_bad_argument_is_refused_naming_it_before_the_function_runs(tmp_path, qa_file, case):
    make_kwargs, said = BAD_ARGUMENTS[case]
    calls = []
    with pytest.raises(EvaluatorError, match=said):
        hret.quick_eval(lambda p: calls.append(p) or "x", qa_file, **make_kwargs(tmp_path, qa_file))
    assert calls == [], "refused before the function was called on any sample"


def test_save_json_to_a_path_under_a_file_is_an_error_naming_the_path(tmp_path, qa_file):
    result = hret.quick_eval(answer, qa_file, benchmark_type="text-qa", metrics=["exact_match"])
    with pytest.raises(EvaluatorError, match=r"^save_json: path: .*qa\.jsonl/r\.json: cannot be written \(a file is "):
        result.save_json(os.path.join(qa_file, "r.json"))


def test_results_save_as_json_and_load_as_a_dataframe(tmp_path, qa_file):
    result = hret.quick_eval(answer, qa_file, benchmark_type="text-qa")
    saved = json.load(open(result.save_json(str(tmp_path / "r.json"))))
    assert saved["metrics"] == result.metrics and len(saved["samples"]) == 5
    assert result["metrics"] is result.metrics and "info" in result and result.get("nothing") is None  # as HRET's
    pytest.importorskip("pandas", reason="the daemon venv has no pandas; to_dataframe runs in the notebook test")


def test_importing_the_api_imports_no_heavy_library():
    code = ("import sys, evaluator.api; heavy = [m for m in ('torch', 'transformers', 'wandb', 'mlflow', 'pandas', "
            "'pydantic', 'aac_metrics') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ---- the numbers equal tools/bench.py eval's ---------------------------------------------------------------------
@pytest.mark.slow
def test_in_process_text_metrics_equal_bench_eval_on_the_same_predictions(tmp_path, qa_file):
    def flaky(prompt: str) -> str:
        if prompt == "3+3?":
            raise RuntimeError("no")
        return answer(prompt)
    result = hret.quick_eval(flaky, qa_file, benchmark_type="text-qa", max_error_rate=0.2)
    doc = bench_eval("text-qa", os.path.join(result.info["work_dir"], "predictions.jsonl"), "exact_match,token_f1",
                     tmp_path / "bench", "--dataset", qa_file)
    assert (result.metrics, result.stderr, result.per_category) == (doc["metrics"], doc["stderr"], doc["per_category"])


@pytest.mark.slow
def test_cider_d_runs_in_the_evaluation_venv_and_equals_bench_eval(tmp_path, caption_dir, venvs):
    def caption(prompt: str) -> str:
        return prompt.split(": ", 1)[1] if "rain" not in prompt else "water drops"
    hret.configure(evaluation_python=os.path.join(VENVS, "evaluation"))  # a venv folder, as the daemon's envs take
    result = hret.quick_eval(caption, caption_dir, metrics=["exact_match", "cider_d"])
    assert list(result.metrics) == ["exact_match", "cider_d"]
    assert "aac-metrics" in result.info["versions"]["evaluation_venv"]  # scored where aac-metrics is installed
    assert all(set(s["scores"]) == {"exact_match", "cider_d"} for s in result.samples)
    doc = bench_eval(caption_dir, os.path.join(result.info["work_dir"], "predictions.jsonl"), "exact_match,cider_d",
                     tmp_path / "bench")
    assert (result.metrics, result.stderr) == (doc["metrics"], doc["stderr"])


NOTEBOOK = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from evaluator import api as hret

model_dir, qa_file, cache, out = sys.argv[1:5]
hret.configure(cache_dir=cache)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

def generate(prompt: str) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

result = hret.quick_eval(generate, qa_file, benchmark_type="text-qa")
results = hret.compare_models({"smollm2": generate, "paris": lambda p: "Paris"}, qa_file, benchmark_type="text-qa")
frame = result.to_dataframe()
json.dump({"quick": {"metrics": result.metrics, "stderr": result.stderr, "work_dir": result.info["work_dir"],
                     "predictions": [s["prediction"] for s in result.samples]},
           "compare": {name: {"metrics": r.metrics, "work_dir": r.info["work_dir"]} for name, r in results.items()},
           "table": results.table(), "frame_columns": list(frame.columns), "frame_rows": len(frame)},
          open(out, "w"))
"""


@pytest.mark.slow
def test_a_notebook_in_the_inference_venv_evaluates_smollm2_and_matches_bench_eval(tmp_path, qa_file, venvs):
    assert os.path.isfile(os.path.join(REAL_MODEL, ".complete.json")), \
        f"no converted real model at {REAL_MODEL}; run `make real-model`"
    script, out = tmp_path / "notebook.py", tmp_path / "out.json"
    script.write_text(textwrap.dedent(NOTEBOOK))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([venvs["inference"], str(script), REAL_MODEL, qa_file, str(tmp_path / "cache"), str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.load(open(out))
    # the model's own answers, one per sample (this 135M model answers these terse questions poorly: the test
    # checks the plumbing and the numbers, tests/test_real_model.py the model)
    predictions = got["quick"]["predictions"]
    assert len(predictions) == 5 and all(isinstance(p, str) and p for p in predictions) and len(set(predictions)) > 1
    assert got["frame_rows"] == 5 and "score_exact_match" in got["frame_columns"]
    doc = bench_eval("text-qa", os.path.join(got["quick"]["work_dir"], "predictions.jsonl"), "exact_match,token_f1",
                     tmp_path / "bench", "--dataset", qa_file)
    assert (got["quick"]["metrics"], got["quick"]["stderr"]) == (doc["metrics"], doc["stderr"])
    # the same function run again inside compare_models gives the same numbers (greedy decoding)
    assert got["compare"]["smollm2"]["metrics"] == got["quick"]["metrics"]
    assert {(r["model"], r["metric"]) for r in got["table"]} == {("paris", "exact_match"), ("paris", "token_f1")}
    assert {r["method"] for r in got["table"] if r["metric"] == "exact_match"} == {"mcnemar_exact"}
    paris = bench_eval("text-qa", os.path.join(got["compare"]["paris"]["work_dir"], "predictions.jsonl"),
                       "exact_match,token_f1", tmp_path / "bench-paris", "--dataset", qa_file)
    assert got["compare"]["paris"]["metrics"] == paris["metrics"]
