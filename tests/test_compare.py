"""Paired comparison of two result folders (evaluator/common/compare.py) and `tools/evaluator.py compare`: the
document, the flips, the errors, and the command's output and exit codes (run as a real subprocess)."""
from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from conftest import DAEMON_PY, EVALUATOR, ROOT, write_config
from evaluator.common.compare import compare_dirs, compare_document, prompt_text, render_table
from evaluator.common.contracts import result_dir
from evaluator.common.errors import EvaluatorError
from evaluator.common.paired import mcnemar_exact

N = 500


def write_result(folder, scores: dict, *, benchmark="qa", dataset_id="qa-v1", run="tiny", iteration=1000,
                 predictions: dict = None, order=None, per_sample=None, extra_rows=None) -> str:
    """A result folder as the evaluation stage leaves it: scores.jsonl (schema of docs/insight.md),
    predictions.jsonl and metrics.json. scores: {metric: {sample_id: value}}; predictions: {sample_id: text}."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    ids = order or list(next(iter(scores.values())))
    predictions = predictions or {}
    rows, preds = [], []
    for sid in ids:
        text = predictions.get(sid, f"answer {sid}")
        rows.append({"schema_version": 1, "sample_id": sid, "status": "ok", "category": None, "prediction": text,
                     "target": f"gold {sid}", "scores": {m: v.get(sid) for m, v in scores.items()},
                     "compared": {"exact_match": {"prediction": text.lower(), "reference": f"gold {sid}"}}})
        preds.append({"sample_id": sid, "dataset_id": dataset_id, "backend": "hf", "run_config": {},
                      "request_messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": f"question {sid}?"},
                                                                        {"type": "audio", "path": "a.wav"}]}],
                      "response": {"text": text, "usage": {}}, "status": "ok"})
    rows += extra_rows or []
    with open(os.path.join(folder, "scores.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in preds)
    means = {m: sum(v.values()) / len(v) for m, v in scores.items() if v and None not in v.values()}
    doc = {"benchmark": benchmark, "dataset_id": dataset_id, "run": run, "iteration": iteration, "n": len(ids),
           "metrics": means or {"x": 0.0}, "per_sample": per_sample or {m: "mean" for m in scores}}
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(doc, f)
    return folder


def planted_pair(tmp_path, drop_points=10, n=N, seed=0, cache=None, run="tiny", iterations=(1000, 2000),
                 benchmark="qa"):
    """Two results of n 0/1 samples: the old one at accuracy 0.6, the new one drop_points % lower net, with 5 % of
    the samples flipping each way on top; plus a continuous token_f1 moving with them."""
    rng = random.Random(seed)
    ids = [f"q{i}" for i in range(n)]
    old = {sid: 1.0 if i < 0.6 * n else 0.0 for i, sid in enumerate(ids)}
    new = dict(old)
    ones = [s for s in ids if old[s] == 1]
    zeros = [s for s in ids if old[s] == 0]
    rng.shuffle(ones)
    rng.shuffle(zeros)
    noise, net = n * 5 // 100, n * drop_points // 100
    for s in ones[:noise + net]:
        new[s] = 0.0
    for s in zeros[:noise]:
        new[s] = 1.0
    f1_old = {s: 0.5 * old[s] + 0.3 for s in ids}
    f1_new = {s: 0.5 * new[s] + 0.3 for s in ids}
    dirs = []
    for it, em, f1 in ((iterations[0], old, f1_old), (iterations[1], new, f1_new)):
        folder = result_dir(cache, run, it, benchmark) if cache else tmp_path / f"iter{it}"
        dirs.append(write_result(folder, {"exact_match": em, "token_f1": f1}, run=run, iteration=it,
                                 benchmark=benchmark,
                                 predictions={s: ("right" if em[s] else "wrong") + f" {s}" for s in ids}))
    return dirs[0], dirs[1], old, new


# ---- the comparison document ----------------------------------------------------------------------------------
def test_planted_drop_gives_mcnemar_on_the_discordant_pairs_and_a_significant_negative_delta(tmp_path):
    old_dir, new_dir, old, new = planted_pair(tmp_path)
    c = compare_dirs(new_dir, old_dir)
    em = c["metrics"]["exact_match"]
    fixed = sum(1 for s in old if new[s] > old[s])
    broken = sum(1 for s in old if new[s] < old[s])
    assert (em["fixed"], em["broken"]) == (fixed, broken) == (25, 75)
    assert em["method"] == "mcnemar_exact" and em["p"] == mcnemar_exact(25, 75)
    assert em["old"] == pytest.approx(0.6) and em["new"] == pytest.approx(0.5) and em["delta"] == pytest.approx(-0.1)
    assert em["significant"] and em["ci"][1] < 0 and em["ci_level"] == 0.95 and em["n"] == N
    assert c["metrics"]["token_f1"]["method"] == "paired_bootstrap"
    assert (c["n_common"], c["only_new"], c["only_old"], c["alpha"]) == (N, 0, 0, 0.05)
    assert (c["run"], c["iteration"], c["result_dir"]) == ("tiny", 1000, old_dir)


def test_main_metric_defaults_to_the_first_metric_of_metrics_json_with_per_sample_values(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    assert compare_dirs(new_dir, old_dir)["main_metric"] == "exact_match"
    assert compare_dirs(new_dir, old_dir, main_metric="token_f1")["main_metric"] == "token_f1"


def test_flips_carry_prompt_both_predictions_reference_and_scores_and_stop_at_max_flips(tmp_path):
    old_dir, new_dir, old, new = planted_pair(tmp_path)
    c = compare_dirs(new_dir, old_dir, max_flips=7)
    assert len(c["flips"]["fixed"]) == 7 and len(c["flips"]["broken"]) == 7
    flip = c["flips"]["broken"][0]
    sid = flip["sample_id"]
    assert (old[sid], new[sid]) == (1.0, 0.0)
    assert flip == {"sample_id": sid, "prompt": f"question {sid}?", "old_prediction": f"right {sid}",
                    "new_prediction": f"wrong {sid}", "reference": f"gold {sid}", "old_score": 1.0,
                    "new_score": 0.0}


def test_only_the_samples_both_results_scored_are_compared(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    old_dir = write_result(tmp_path / "a", {"exact_match": {s: 1.0 for s in ids[:5]}})
    new_dir = write_result(tmp_path / "b", {"exact_match": {s: 0.0 if s == "s1" else 1.0 for s in ids[1:]}})
    c = compare_dirs(new_dir, old_dir)
    assert (c["n_common"], c["only_new"], c["only_old"]) == (4, 1, 1)
    assert (c["metrics"]["exact_match"]["n"], c["metrics"]["exact_match"]["broken"]) == (4, 1)


def test_a_null_score_leaves_that_sample_out_of_that_metric_only(tmp_path):
    ids = ["a", "b", "c"]
    old_dir = write_result(tmp_path / "a", {"exact_match": {s: 1.0 for s in ids},
                                            "llm_judge": {"a": 0.5, "b": None, "c": 0.25}})
    new_dir = write_result(tmp_path / "b", {"exact_match": {s: 1.0 for s in ids},
                                            "llm_judge": {"a": 0.75, "b": 1.0, "c": 0.25}})
    c = compare_dirs(new_dir, old_dir)
    assert (c["metrics"]["exact_match"]["n"], c["metrics"]["llm_judge"]["n"]) == (3, 2)


def test_a_metric_on_one_side_only_is_named_as_not_compared(tmp_path):
    old_dir = write_result(tmp_path / "a", {"exact_match": {"a": 1.0, "b": 0.0}})
    new_dir = write_result(tmp_path / "b", {"exact_match": {"a": 1.0, "b": 1.0}, "token_f1": {"a": 1.0, "b": 0.5}})
    c = compare_dirs(new_dir, old_dir)
    assert list(c["metrics"]) == ["exact_match"]
    assert c["not_compared"] == {"token_f1": "only in the new result"}


def test_compare_document_compares_with_prev_and_best_and_names_each(tmp_path):
    base, mid, _, _ = planted_pair(tmp_path, drop_points=0, iterations=(1000, 2000))
    new_dir = write_result(tmp_path / "iter3000", {"exact_match": {f"q{i}": 0.0 for i in range(N)},
                                                   "token_f1": {f"q{i}": 0.3 for i in range(N)}}, iteration=3000)
    doc = compare_document("tiny", "qa", 3000, 1, new_dir, prev=("tiny", 2000, mid), best=("tiny", 1000, base))
    assert {k: doc[k] for k in ("schema_version", "run", "benchmark", "iteration", "revision")} == \
        {"schema_version": 1, "run": "tiny", "benchmark": "qa", "iteration": 3000, "revision": 1}
    assert (doc["against"]["prev"]["iteration"], doc["against"]["prev"]["result_dir"]) == (2000, mid)
    assert (doc["against"]["best"]["iteration"], doc["against"]["best"]["result_dir"]) == (1000, base)
    assert doc["against"]["best"]["metrics"]["exact_match"]["delta"] == pytest.approx(-0.6)
    json.dumps(doc, allow_nan=False)  # the daemon writes it as JSON


def test_compare_document_with_a_main_metric_that_has_no_per_sample_values_compares_the_others(tmp_path):
    # the benchmark's main_metric (from the config) is corpus-level only: the daemon's compare.json still compares
    # the metrics that have per-sample values (the alert rules on them need it), headed by the first of them
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    doc = compare_document("tiny", "qa", 2000, 0, new_dir, prev=("tiny", 1000, old_dir), main_metric="spider")
    prev = doc["against"]["prev"]
    assert prev["main_metric"] == "exact_match" and set(prev["metrics"]) == {"exact_match", "token_f1"}


def test_compare_document_without_prev_or_best_has_nulls(tmp_path):
    _, new_dir, _, _ = planted_pair(tmp_path)
    assert compare_document("tiny", "qa", 2000, 0, new_dir)["against"] == {"prev": None, "best": None}


def test_the_same_seed_gives_the_same_bootstrap_numbers_and_they_are_recorded(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path, drop_points=1)
    a = compare_dirs(new_dir, old_dir, seed=5, resamples=300)["metrics"]["token_f1"]
    b = compare_dirs(new_dir, old_dir, seed=5, resamples=300)["metrics"]["token_f1"]
    assert a == b and (a["seed"], a["resamples"]) == (5, 300)


def test_prompt_is_the_text_of_the_last_user_message():
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "second"}]}]
    assert prompt_text(messages) == "second"
    assert prompt_text([{"role": "system", "content": "s"}]) is None


# ---- errors ---------------------------------------------------------------------------------------------------
def test_a_result_without_scores_jsonl_is_refused_saying_why(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    os.remove(os.path.join(old_dir, "scores.jsonl"))
    with pytest.raises(EvaluatorError, match=r"scores\.jsonl: missing: .*before per-sample scores existed"):
        compare_dirs(new_dir, old_dir)


def test_a_malformed_scores_row_is_refused_with_file_and_line(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path, n=10)
    path = os.path.join(old_dir, "scores.jsonl")
    lines = open(path).read().splitlines()
    bad = json.loads(lines[2])
    bad["scores"]["exact_match"] = "yes"
    lines[2] = json.dumps(bad)
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(EvaluatorError, match=rf"{path}:3: scores.exact_match: expected a finite number"):
        compare_dirs(new_dir, old_dir)
    lines[2] = "{not json"
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(EvaluatorError, match=rf"{path}:3: not valid JSON"):
        compare_dirs(new_dir, old_dir)


def test_a_duplicate_sample_is_refused_naming_both_lines(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path, n=10)
    path = os.path.join(new_dir, "scores.jsonl")
    first = open(path).readline()
    with open(path, "a") as f:
        f.write(first)
    with pytest.raises(EvaluatorError, match=rf"{path}:11: sample_id 'q0' again \(first at line 1\)"):
        compare_dirs(new_dir, old_dir)


def test_a_row_of_another_schema_version_is_refused(tmp_path):
    old_dir = write_result(tmp_path / "a", {"exact_match": {"a": 1.0}},
                           extra_rows=[{"schema_version": 2, "sample_id": "z", "status": "ok", "scores": {}}])
    new_dir = write_result(tmp_path / "b", {"exact_match": {"a": 1.0}})
    with pytest.raises(EvaluatorError, match=r"scores.jsonl:2: schema_version: expected 1 .*got 2"):
        compare_dirs(new_dir, old_dir)


@pytest.mark.parametrize("key,value", [("benchmark", "other"), ("dataset_id", "qa-v2")])
def test_results_of_another_benchmark_or_dataset_are_refused(tmp_path, key, value):
    old_dir = write_result(tmp_path / "a", {"exact_match": {"a": 1.0}})
    new_dir = write_result(tmp_path / "b", {"exact_match": {"a": 1.0}}, **{key: value})
    with pytest.raises(EvaluatorError, match=rf"{key} '{value}', but .* cannot be compared"):
        compare_dirs(new_dir, old_dir)


def test_an_unknown_main_metric_is_refused_with_the_compared_ones(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path, n=10)
    with pytest.raises(EvaluatorError, match=r"'exact_mach'.*exact_match, token_f1; did you mean 'exact_match'"):
        compare_dirs(new_dir, old_dir, main_metric="exact_mach")


def test_results_without_a_common_sample_are_refused(tmp_path):
    old_dir = write_result(tmp_path / "a", {"exact_match": {"a": 1.0}})
    new_dir = write_result(tmp_path / "b", {"exact_match": {"b": 1.0}})
    with pytest.raises(EvaluatorError, match="no sample in common"):
        compare_dirs(new_dir, old_dir)


# ---- the table -------------------------------------------------------------------------------------------------
def test_table_shows_each_metric_with_method_and_the_flips_side_by_side(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    c = compare_dirs(new_dir, old_dir, max_flips=2)
    text = render_table(c, width=100)
    header = text.splitlines()[0].split()
    assert header == ["metric", "old", "new", "delta", "95%", "CI", "p", "method", "n", "fixed", "broken"]
    em = next(line for line in text.splitlines() if "exact_match" in line and "mcnemar_exact" in line)
    assert em.startswith("* exact_match") and "0.6000" in em and "0.5000" in em and "-0.1000" in em
    assert " 25 " in em and em.rstrip().endswith("75") and "!" in em
    flip = c["flips"]["broken"][0]
    pair_line = next(line for line in text.splitlines() if f"right {flip['sample_id']}" in line)
    assert pair_line.index("old (1): right") < pair_line.index("|") < pair_line.index("new (0): wrong")
    assert all(len(line) <= 100 for line in text.splitlines() if "|" in line)


# ---- the command -----------------------------------------------------------------------------------------------
def compare_cmd(*args):
    return subprocess.run([DAEMON_PY, EVALUATOR, "compare", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_exits_1_on_a_significant_regression_and_prints_table_and_flips(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    p = compare_cmd(old_dir, new_dir, "--flips", "3")
    assert p.returncode == 1, p.stderr
    assert "REGRESSION" in p.stdout and "exact_match: 0.6000 -> 0.5000" in p.stdout
    assert "mcnemar_exact" in p.stdout and "flips of exact_match: 25 fixed, 75 broken" in p.stdout


def test_cli_exits_0_on_a_1_point_wobble(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path, drop_points=1)
    p = compare_cmd(old_dir, new_dir)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "no significant regression of the main metric at alpha 0.05" in p.stdout


def test_cli_exits_0_on_a_significant_improvement(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    assert compare_cmd(new_dir, old_dir).returncode == 0


def test_cli_lower_is_better_turns_a_significant_rise_into_the_regression(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    assert compare_cmd(new_dir, old_dir, "--lower-is-better", "exact_match").returncode == 1
    assert compare_cmd(old_dir, new_dir, "--lower-is-better", "exact_match").returncode == 0


def test_cli_json_is_one_object_with_the_comparison(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    p = compare_cmd(old_dir, new_dir, "--json", "--flips", "2", "--metric", "token_f1", "--resamples", "200")
    doc = json.loads(p.stdout)
    assert doc["regression"] is True and p.returncode == 1
    (entry,) = doc["comparisons"]
    assert entry["comparison"]["main_metric"] == "token_f1" and len(entry["comparison"]["flips"]["broken"]) == 2
    assert entry["comparison"]["metrics"]["token_f1"]["resamples"] == 200
    assert (entry["old"]["result_dir"], entry["new"]["result_dir"]) == (old_dir, new_dir)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    old_dir, new_dir, _, _ = planted_pair(tmp_path, n=10)
    os.remove(os.path.join(old_dir, "scores.jsonl"))
    for args in ([old_dir, new_dir], [old_dir], [old_dir, new_dir, "--alpha", "2"],
                 [str(tmp_path / "nowhere"), new_dir]):
        p = compare_cmd(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_cli_with_config_compares_two_iterations_of_a_run(tmp_path):
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": "true", "evaluation": "true",
                                   "main_metric": "exact_match"}])
    cache = str(tmp_path / "cache")
    planted_pair(tmp_path, cache=cache, iterations=(1000, 2000))
    os.makedirs(os.path.join(cache, "results", "an-older-run", "iter_0001000"))  # not configured: not the default
    p = compare_cmd("--config", cfg, "1000", "2000")
    assert p.returncode == 1, p.stderr
    assert p.stdout.startswith("== qa: tiny iteration 1000 (old) -> tiny iteration 2000 (new)")
    p = compare_cmd("--config", cfg, "1000", "3000")
    assert p.returncode == 2 and "run 'tiny' has no results at iteration 3000" in p.stderr
    assert "iterations with results: 1000, 2000" in p.stderr
    p = compare_cmd("--config", cfg, "--run", "tinny", "1000", "2000")
    assert p.returncode == 2 and "did you mean 'tiny'" in p.stderr


def test_cli_with_config_whose_main_metric_is_corpus_level_compares_the_per_sample_metrics(tmp_path):
    # command benchmarks take any metric name; `spider` has no per-sample values in these results
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": "true", "evaluation": "true",
                                   "main_metric": "spider"}])
    planted_pair(tmp_path, cache=str(tmp_path / "cache"), iterations=(1000, 2000))
    p = compare_cmd("--config", cfg, "1000", "2000", "--json")
    assert p.returncode == 1, p.stderr  # the 10-point drop of exact_match, the first metric with per-sample values
    (entry,) = json.loads(p.stdout)["comparisons"]
    assert entry["comparison"]["main_metric"] == "exact_match"
    p = compare_cmd("--config", cfg, "1000", "2000", "--metric", "spider")  # named on the command line: an error
    assert p.returncode == 2 and "main metric 'spider': no per-sample values" in p.stderr


def test_cli_with_config_compares_two_runs_at_an_iteration(tmp_path):
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": "true", "evaluation": "true"}],
                       watch={"paths": [{"path": str(tmp_path / "a"), "name": "base"},
                                        {"path": str(tmp_path / "b"), "name": "sweep"}]})
    cache = str(tmp_path / "cache")
    old_dir, _, _, _ = planted_pair(tmp_path, cache=cache, run="base", iterations=(1000, 9000))
    _, new_dir, _, _ = planted_pair(tmp_path, cache=cache, run="sweep", iterations=(9001, 1000))
    p = compare_cmd("--config", cfg, "--run", "base", "--run-b", "sweep", "1000", "--json")
    assert p.returncode == 1, p.stderr
    (entry,) = json.loads(p.stdout)["comparisons"]
    assert (entry["old"]["run"], entry["new"]["run"]) == ("base", "sweep")
    assert (entry["old"]["result_dir"], entry["new"]["result_dir"]) == (old_dir, new_dir)
    p = compare_cmd("--config", cfg, "1000", "2000")
    assert p.returncode == 2 and "name one" in p.stderr


def test_cli_with_config_skips_a_benchmark_without_scores_and_compares_the_others(tmp_path):
    benches = [{"name": b, "type": "command", "inference": "true", "evaluation": "true"} for b in ("qa", "old")]
    cfg = write_config(tmp_path, benches)
    cache = str(tmp_path / "cache")
    planted_pair(tmp_path, cache=cache, drop_points=1)
    a, b, _, _ = planted_pair(tmp_path, cache=cache, benchmark="old", drop_points=1)
    os.remove(os.path.join(a, "scores.jsonl"))
    p = compare_cmd("--config", cfg, "1000", "2000")
    assert p.returncode == 0, p.stderr
    assert "skipped old:" in p.stdout and "before per-sample scores existed" in p.stdout
    p = compare_cmd("--config", cfg, "--benchmark", "old", "1000", "2000")
    assert p.returncode == 2 and "before per-sample scores existed" in p.stderr


# ---- with what the real evaluation stage writes ------------------------------------------------------------------
def test_compare_reads_what_the_evaluation_stage_writes(tmp_path):
    """The text metrics are pure Python, so the real stage runs in-process here; the old checkpoint answers every
    question, the new one breaks one answer and fails inference on another (an error row, scored as wrong)."""
    from evaluator.common.contracts import StageJob
    from evaluator.common.records import ERROR, RunError, RunResult, write_results
    from evaluator.stages.evaluation import stage

    data = tmp_path / "data.jsonl"
    rows = [{"question": "Colour of the sky?", "answer": "blue"}, {"question": "Two plus two?", "answer": "four"},
            {"question": "Colour of grass?", "answer": "green"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [f"data-{i}" for i in range(len(rows))]  # the text loader's ids: file stem and row number

    def evaluate(name, texts):
        out = tmp_path / name
        results = [RunResult(sample_id=sid, dataset_id="d", backend="hf", run_config={},
                             request_messages=[{"role": "user", "content": row["question"]}],
                             response={"text": text or "", "usage": {}}, status="ok" if text else ERROR,
                             error=None if text else RunError("timeout", "timed out"))
                   for sid, row, text in zip(ids, rows, texts)]
        write_results(str(out / "predictions.jsonl"), results)
        job = StageJob(stage="evaluation", run="r", iteration=1000, checkpoint="/ckpt", output_dir=str(out),
                       benchmark={"name": "qa", "type": "text-qa", "dataset": str(data)})
        job.write(str(out / "eval.job.json"))
        assert stage.main(["--job", str(out / "eval.job.json")]) == 0
        return str(out)

    old_dir = evaluate("old", ["Blue.", "four", "green"])
    new_dir = evaluate("new", ["Blue.", "five", None])
    c = compare_dirs(new_dir, old_dir)
    em = c["metrics"]["exact_match"]
    assert (c["main_metric"], em["method"], em["n"], em["fixed"], em["broken"]) == \
        ("exact_match", "mcnemar_exact", 3, 0, 2)
    assert c["metrics"]["token_f1"]["method"] == "mcnemar_exact"  # all-or-nothing F1 on one-word answers
    broken = {f["sample_id"]: f for f in c["flips"]["broken"]}
    assert broken["data-1"] == {"sample_id": "data-1", "prompt": "Two plus two?", "old_prediction": "four",
                                "new_prediction": "five", "reference": "four", "old_score": 1.0, "new_score": 0.0}
    assert broken["data-2"]["new_prediction"] == ""  # the failed inference
