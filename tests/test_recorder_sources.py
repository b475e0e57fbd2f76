"""wandb_writer's sources (HELM output, inline results, a results tree) and the leaderboard arithmetic."""
from __future__ import annotations

import json
import os

import pytest

from evaluator.common.errors import EvaluatorError
from recorder import leaderboard
from recorder.sinks import ResultRecord
from recorder.sources import (helm_iteration, records_from_file, records_from_helm, records_from_results,
                              records_from_wandb_dir)


# ---- HELM: files shaped as `helm-summarize` writes runs/<suite>/groups/<group>.json ----------------
# (a JSON list of asdict_without_nones(Table): header cells with description / lower_is_better / metadata,
# row cells whose `value` is left out when there was no matching run, the aggregate table first)
def header(*metrics):
    cells = [{"value": "Model/adapter", "markdown": False, "metadata": {}}]
    for name, perturbation in metrics:
        meta = {"metric": name, "run_group": "MMLU"}
        if perturbation:
            meta["perturbation"] = perturbation
        cells.append({"value": f"{name} ({perturbation})" if perturbation else name,
                      "description": f"Massive Multitask Language Understanding\n\n{name}: exact match",
                      "markdown": False, "lower_is_better": False, "metadata": meta})
    cells.append({"value": "# eval", "description": "Number of evaluation instances.", "markdown": False,
                  "metadata": {"metric": "# eval", "run_group": "MMLU"}})
    return cells


def row(model, em, em_robust, n=100, bold=False):
    def cell(v):
        if v is None:
            return {"description": "No matching runs", "markdown": False}
        out = {"value": v, "description": f"min={v:.3f}, mean={v:.3f}, max={v:.3f}, sum={v:.3f} (1)", "style": {},
               "markdown": False}
        if bold:
            out["style"] = {"font-weight": "bold"}
        return out

    return [{"value": model, "description": "", "href": "?group=mmlu&subgroup=MMLU&runSpecs=%5B%5D", "markdown": False,
             "run_spec_names": [f"mmlu:subject=x,model={model}"]}, cell(em), cell(em_robust), cell(n)]


def write_helm(root, suite="proj-llama"):
    groups = root / "runs" / suite / "groups"
    groups.mkdir(parents=True)
    cols = header(("EM", None), ("EM", "Robustness"))
    mmlu = [
        {"title": "MMLU", "header": cols, "name": "mmlu",
         "rows": [row("mymodel/proj-llama/1000", 0.30, 0.25), row("mymodel/proj-llama/2000", 0.40, 0.33, bold=True)],
         "links": [{"text": "LaTeX", "href": f"benchmark_output/runs/{suite}/groups/latex/mmlu_mmlu.tex"},
                   {"text": "JSON", "href": f"benchmark_output/runs/{suite}/groups/json/mmlu_mmlu.json"}]},
        {"title": "subject: abstract_algebra, method: multiple_choice_joint", "header": cols,
         "name": "mmlu_subject:abstract_algebra,method:multiple_choice_joint",
         "rows": [row("mymodel/proj-llama/1000", 0.20, 0.18), row("mymodel/proj-llama/2000", None, None)],
         "links": []},
        {"title": "subject: anatomy, method: multiple_choice_joint", "header": cols,
         "name": "mmlu_subject:anatomy,method:multiple_choice_joint",
         "rows": [row("mymodel/proj-llama/1000", 0.40, 0.32), row("mymodel/proj-llama/2000", 0.45, 0.40)],
         "links": []},
    ]
    (groups / "mmlu.json").write_text(json.dumps(mmlu, indent=2))
    boolq_cols = [dict(c, metadata=dict(c["metadata"], run_group="BoolQ")) for c in cols]
    boolq = [{"title": "", "header": boolq_cols, "name": "boolq_",
              "rows": [row("mymodel/proj-llama/2000", 0.70, 0.61)], "links": []}]
    (groups / "boolq.json").write_text(json.dumps(boolq, indent=2))


def test_helm_groups_give_the_headline_metric_per_iteration_and_subjects_as_details(tmp_path):
    write_helm(tmp_path / "helm")
    benches = [{"name": "mmlu", "metrics": ["EM"]}, {"name": "boolq", "metrics": ["EM"]}]
    records, problems = records_from_helm("proj-llama", str(tmp_path / "helm"), "proj-llama", benches,
                                          token_per_iteration=0.5)
    assert problems == []
    got = {(r.iteration, r.benchmark): r.metrics for r in records}
    assert got == {
        (1000, "mmlu"): {"EM": 0.30, "subject_abstract_algebra/EM": 0.20, "subject_anatomy/EM": 0.40},
        (2000, "mmlu"): {"EM": 0.40, "subject_anatomy/EM": 0.45},  # no value in the cell: left out, not 0
        (2000, "boolq"): {"EM": 0.70},
    }
    assert {r.iteration: r.tokens_b for r in records} == {1000: 500.0, 2000: 1000.0}


def test_helm_summary_only_keeps_the_headline_table(tmp_path):
    write_helm(tmp_path / "helm")
    records, _ = records_from_helm("m", str(tmp_path / "helm"), "proj-llama", [{"name": "mmlu", "metrics": ["EM"]}],
                                   summary_only=True)
    assert [(r.iteration, r.metrics) for r in records] == [(1000, {"EM": 0.30}), (2000, {"EM": 0.40})]


def test_helm_perturbed_columns_are_matched_by_their_own_name_only(tmp_path):
    write_helm(tmp_path / "helm")
    records, _ = records_from_helm("m", str(tmp_path / "helm"), "proj-llama",
                                   [{"name": "mmlu", "metrics": ["EM (Robustness)"]}], summary_only=True)
    assert [r.metrics for r in records] == [{"EM (Robustness)": 0.25}, {"EM (Robustness)": 0.33}]
    # a combined table ("MMLU - EM" headers) that lists the perturbed column first
    cols = header(("EM", "Robustness"), ("EM", None))
    for c in cols[1:3]:
        c["value"] = "MMLU - " + c["value"]
    table = [{"title": "Accuracy", "header": cols, "rows": [row("mymodel/x/1000", 0.25, 0.30)]}]
    (tmp_path / "helm" / "runs" / "proj-llama" / "groups" / "core.json").write_text(json.dumps(table))
    records, _ = records_from_helm("m", str(tmp_path / "helm"), "proj-llama", [{"name": "core", "metrics": ["EM"]}])
    assert [r.metrics for r in records] == [{"EM": 0.30}]


def test_helm_default_benchmarks_skip_missing_scenarios_and_report_them(tmp_path):
    write_helm(tmp_path / "helm")
    records, problems = records_from_helm("m", str(tmp_path / "helm"), "proj-llama", None, summary_only=True)
    assert sorted({r.benchmark for r in records}) == ["boolq", "mmlu"]
    assert len(problems) == 14 and any("hellaswag.json: no such file" in p for p in problems)


def test_helm_suite_with_nothing_parsable_is_an_error_naming_the_files(tmp_path):
    with pytest.raises(EvaluatorError, match=r"groups/mmlu.json: no such file"):
        records_from_helm("m", str(tmp_path), "nosuite", [{"name": "mmlu", "metrics": ["EM"]}])


def test_helm_iteration_comes_from_the_model_name_as_data_juicer_reads_it():
    assert helm_iteration("mymodel/proj-llama/2000", 0) == 2000
    assert helm_iteration("llama_iter_3000", 0) == 3000
    assert helm_iteration("mymodel/proj-llama/4000 [max_tokens: 5]", 0) == 4000
    assert helm_iteration("openai/gpt2", 7) == 7  # no iteration in the name: default_iteration


# ---- file and results tree -----------------------------------------------------------------------
def test_inline_results_are_one_record_per_benchmark_at_the_default_iteration():
    records = records_from_file("llama-7b", {"mmlu": {"EM": 0.345}, "boolq": {"EM": 0.751}}, default_iteration=0,
                                token_num=1000)
    assert {(r.iteration, r.benchmark, r.metrics["EM"], r.tokens_b) for r in records} == {
        (0, "mmlu", 0.345, 1000.0), (0, "boolq", 0.751, 1000.0)}


def write_result(root, model, it, bench, metrics, **extra):
    out = root / model / f"iter_{it:07d}" / bench
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "iteration": it, **extra}))


def test_results_tree_is_read_in_iteration_order_and_bad_files_are_reported(tmp_path):
    root = tmp_path / "results"
    for it in (3000, 1000, 2000):  # written out of order
        write_result(root, "tiny", it, "qa", {"acc": it / 10000}, tokens_b=it * 0.001)
    write_result(root, "tiny", 1000, "mc", {"acc": 0.9})
    (root / "tiny" / "iter_0002000" / "mc").mkdir()
    (root / "tiny" / "iter_0002000" / "mc" / "metrics.json").write_text('{"metrics": {"acc": "high"}}')
    records, problems = records_from_results("tiny", str(root), token_per_iteration=0.002)
    assert [(r.iteration, r.benchmark, r.metrics["acc"], r.tokens_b) for r in records] == [
        (1000, "mc", 0.9, 2.0), (1000, "qa", 0.1, 1.0), (2000, "qa", 0.2, 2.0), (3000, "qa", 0.3, 3.0)]
    assert len(problems) == 1 and "iter_0002000/mc/metrics.json" in problems[0] and "expected a number" in problems[0]


def test_results_dir_pointing_at_the_cache_dir_gets_a_hint(tmp_path):
    write_result(tmp_path / "cache" / "results", "tiny", 1000, "qa", {"acc": 1})
    with pytest.raises(EvaluatorError, match=r"did you mean results_dir: .*cache/results"):
        records_from_results("tiny", str(tmp_path / "cache"))


# ---- leaderboard ---------------------------------------------------------------------------------
def rec(model, it, bench, value, tokens=None):
    return ResultRecord(run=model, iteration=it, benchmark=bench, metrics={"EM": value}, tokens_b=tokens)


def test_leaderboard_min_max_normalises_each_metric_and_sums_by_hand():
    records = [rec("llama", 1000, "mmlu", 0.30, 2.0), rec("llama", 1000, "boolq", 0.60, 2.0), rec("llama", 1000, "raft", 0.5),
               rec("llama", 2000, "mmlu", 0.40, 4.0), rec("llama", 2000, "boolq", 0.70, 4.0), rec("llama", 2000, "raft", 0.5),
               rec("baseline", 0, "mmlu", 0.50), rec("baseline", 0, "boolq", 0.62), rec("baseline", 0, "raft", 0.5),
               rec("huge", 0, "mmlu", 0.90)]
    entries, missing = leaderboard.build(records, ["mmlu.EM", "boolq/EM", "raft.EM", "quac.F1"], excluded=["huge"])
    assert missing == ["quac.F1"]
    # mmlu: 0.30 0.40 0.50 -> 0, 0.5, 1   (huge's 0.90 is excluded, so it does not stretch the range)
    # boolq: 0.60 0.70 0.62 -> 0, 1, 0.2
    # raft: all 0.5 -> separates nobody: 0 each
    got = [(e.label, e.iteration, round(e.score, 9), e.tokens_b) for e in entries]
    assert got == [("llama@2000", 2000, 1.5, 4.0), ("baseline", 0, 1.2, None), ("llama@1000", 1000, 0.0, 2.0)]
    assert entries[1].normalised == {"mmlu.EM": 1.0, "boolq/EM": pytest.approx(0.2), "raft.EM": 0.0}
    table = leaderboard.markdown(entries, ["mmlu.EM", "boolq/EM", "raft.EM"])
    assert table.splitlines()[2].startswith("| 1 | llama | 2000 | 4 | 1.5000 | 3/3 | 0.4 | 0.7 | 0.5 |")


def test_leaderboard_metric_names_with_dots_resolve_against_known_benchmarks():
    records = [ResultRecord(run="m", iteration=1, benchmark="mmlu.v2", metrics={"acc.norm": 0.5})]
    assert leaderboard.resolve_metric("mmlu.v2.acc.norm", {("mmlu.v2", "acc.norm")}) == ("mmlu.v2", "acc.norm")
    entries, missing = leaderboard.build(records, ["mmlu.v2.acc.norm"])
    assert missing == [] and entries[0].values == {"mmlu.v2.acc.norm": 0.5}


def test_leaderboard_can_read_the_runs_logged_locally_to_wandb(tmp_path):
    from recorder.sinks import MlflowSettings, RecorderSettings, WandbSettings
    from recorder.wandb_sink import WandbSink

    s = RecorderSettings(cache_dir=str(tmp_path), project="proj",
                         wandb=WandbSettings(project="proj", mode="offline", dir=str(tmp_path / "wb")),
                         mlflow=MlflowSettings("unused", "unused"), summary_only=True)
    sink = WandbSink(s)
    sink.record(rec("llama", 1000, "mmlu", 0.3))
    sink.record(rec("llama", 2000, "mmlu", 0.4))
    sink.record(rec("other", 0, "mmlu", 0.35))
    other = RecorderSettings(cache_dir=str(tmp_path), project="another", wandb=WandbSettings(
        project="another", mode="offline", dir=str(tmp_path / "wb")), mlflow=s.mlflow, summary_only=True)
    WandbSink(other).record(rec("elsewhere", 0, "mmlu", 0.99))  # another project: not on this leaderboard
    found = records_from_wandb_dir(str(tmp_path / "wb"), "proj")
    assert [(r.run, r.iteration, r.metrics) for r in found] == [
        ("llama", 1000, {"EM": 0.3}), ("llama", 2000, {"EM": 0.4}), ("other", 0, {"EM": 0.35})]
    entries, _ = leaderboard.build(found, ["mmlu.EM"])
    assert [(e.label, round(e.score, 9)) for e in entries] == [("llama@2000", 1.0), ("other", 0.5), ("llama@1000", 0.0)]
    assert os.path.isdir(tmp_path / "wb" / "wandb")


def test_a_leaderboard_read_from_wandb_logs_takes_a_reruns_values_not_the_first_ones(tmp_path):
    from recorder.sinks import MlflowSettings, RecorderSettings, WandbSettings
    from recorder.wandb_sink import WandbSink

    s = RecorderSettings(cache_dir=str(tmp_path), project="proj",
                         wandb=WandbSettings(project="proj", mode="offline", dir=str(tmp_path / "wb")),
                         mlflow=MlflowSettings("unused", "unused"), summary_only=True)
    sink = WandbSink(s)
    sink.record(rec("llama", 1000, "mmlu", 0.3))
    again = rec("llama", 1000, "mmlu", 0.35)
    again.revision, again.fingerprint = 1, "cd34"
    sink.record(again)
    found = records_from_wandb_dir(str(tmp_path / "wb"), "proj")
    assert [(r.iteration, r.metrics, r.revision, r.fingerprint) for r in found] == [(1000, {"EM": 0.35}, 1, "cd34")]


def test_results_tree_carries_fingerprint_and_revision_into_the_record_not_its_metrics(tmp_path):
    root = tmp_path / "results"
    write_result(root, "tiny", 1000, "qa", {"acc": 0.1})  # written before fingerprints: revision 0, none
    write_result(root, "tiny", 2000, "qa", {"acc": 0.25}, fingerprint="cd34", revision=1)
    write_result(root, "tiny", 3000, "qa", {"acc": 0.3}, fingerprint=None, revision=None)
    write_result(root, "tiny", 4000, "qa", {"acc": 0.4}, revision="1")
    write_result(root, "tiny", 5000, "qa", {"acc": 0.5}, fingerprint=12)
    records, problems = records_from_results("tiny", str(root))
    assert [(r.iteration, r.metrics, r.revision, r.fingerprint) for r in records] == [
        (1000, {"acc": 0.1}, 0, ""), (2000, {"acc": 0.25}, 1, "cd34"), (3000, {"acc": 0.3}, 0, "")]
    assert [p.rsplit("metrics.json: ", 1)[1] for p in problems] == [
        "revision: expected a whole number >= 0 (0: first evaluation), got '1'",
        "fingerprint: expected a string (the settings hash), got 12"]


# ---- values and iterations no reader should take (probe of 2026-12-02) ---------------------------------------
def helm_table(tmp_path, rows):
    """One scenario `s` whose only table has an EM column and these (model cell, value) rows."""
    groups = tmp_path / "helm" / "runs" / "suite" / "groups"
    groups.mkdir(parents=True, exist_ok=True)
    table = {"title": "S", "header": [{"value": "Model"}, {"value": "EM"}],
             "rows": [[{"value": model}, {"value": value}] for model, value in rows]}
    (groups / "s.json").write_text(json.dumps([table]))  # json writes NaN / Infinity as Python reads them back
    return str(tmp_path / "helm")


@pytest.mark.parametrize("value, shown", [(float("nan"), "got nan"), (float("inf"), "got inf"),
                                          (10 ** 400, "got an integer no float holds")], ids=["nan", "inf", "huge-int"])
def test_a_helm_cell_that_is_no_finite_number_skips_its_scenario_naming_the_row(tmp_path, value, shown):
    helm = helm_table(tmp_path, [("m/s/1000", 0.5), ("m/s/2000", value)])
    with pytest.raises(EvaluatorError, match=rf"s.json: table 0 row 1: EM: expected a finite number, {shown}"):
        records_from_helm("m", helm, "suite", [{"name": "s", "metrics": ["EM"]}])


def test_two_helm_rows_of_one_iteration_are_refused_not_one_silently_kept(tmp_path):
    helm = helm_table(tmp_path, [("modelA/s/1000", 0.9), ("modelB/s/1000", 0.1)])
    with pytest.raises(EvaluatorError, match=r"rows 0 \('modelA/s/1000'\) and 1 \('modelB/s/1000'\) both read as "
                                             r"iteration 1000"):
        records_from_helm("m", helm, "suite", [{"name": "s", "metrics": ["EM"]}])


def test_a_helm_model_name_ending_in_no_iteration_gets_the_default_and_one_beyond_2_63_is_refused():
    assert helm_iteration("model_-5", 7) == 7  # a minus sign is no iteration (it was recorded at -5)
    assert helm_iteration("model/٣", 7) == 7  # an Arabic-Indic digit is a digit to Python, not to us
    with pytest.raises(EvaluatorError, match=r"iteration 99999999999999999999 is beyond 9223372036854775807"):
        helm_iteration("model/99999999999999999999", 0)


def test_tokens_from_an_iteration_beyond_a_float_are_refused_not_recorded_as_infinity():
    from recorder.sources import tokens_for
    with pytest.raises(EvaluatorError, match=r"token_per_iteration: .* is beyond a float"):
        tokens_for(10 ** 18, None, 1e300)


def test_a_results_tree_without_one_readable_result_is_an_error_listing_what_was_skipped(tmp_path):
    bad = tmp_path / "results" / "tiny" / "iter_0001000" / "qa"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{torn")
    with pytest.raises(EvaluatorError, match=r"no readable metrics.json under .*tiny/iter_\*/<benchmark>/\n  skipped "
                                             r".*iter_0001000/qa/metrics.json"):
        records_from_results("tiny", str(tmp_path / "results"))


def test_a_results_folder_named_beyond_2_63_is_skipped_with_a_note(tmp_path):
    root = tmp_path / "results"
    write_result(root, "tiny", 1000, "qa", {"acc": 0.5})
    big = root / "tiny" / "iter_99999999999999999999" / "qa"
    big.mkdir(parents=True)
    (big / "metrics.json").write_text(json.dumps({"metrics": {"acc": 0.9}}))
    records, problems = records_from_results("tiny", str(root))
    assert [r.iteration for r in records] == [1000]
    assert len(problems) == 1 and "iteration 99999999999999999999 is not one" in problems[0]


def test_leaderboard_of_metrics_near_the_float_limit_ranks_the_better_model_first():
    entries, _ = leaderboard.build([rec("a", 0, "qa", -1e308), rec("b", 0, "qa", 1e308)], ["qa.EM"])
    assert [(e.model, e.score) for e in entries] == [("b", 1.0), ("a", 0.0)]  # hi - lo overflowed: b got NaN, last


def test_a_helm_scenario_whose_rows_have_no_number_says_so(tmp_path):
    helm = helm_table(tmp_path, [("m/s/1000", "0.3"), ("m/s/2000", None)])  # a string is no HELM value
    with pytest.raises(EvaluatorError, match=r"skipped HELM scenario s: .*s.json: no row has a number in the "
                                             r"\['EM'\] column"):  # the reason list was empty
        records_from_helm("m", helm, "suite", [{"name": "s", "metrics": ["EM"]}])
