"""Bad input at the command line and in the files a user hands the tools: one line naming the flag, key or
file:line, exit 2, nothing left half-written, and the daemon going on with what is good."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import (bench, bench_py, canonical_dataset, ledger_rows, megatron_checkpoint, run_cli,  # noqa: F401
                      venvs, write_config)


def one_line_error(proc, said: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and said in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, said", [
    (("--end-iteration", str(10 ** 23)), "--end-iteration: expected an integer from 0 to 9223372036854775807"),
    (("--begin-iteration", str(10 ** 23)), "--begin-iteration: expected an integer from 0 to 9223372036854775807"),
    (("--iteration-interval", str(10 ** 23)), "--iteration-interval: expected an integer from 1 to"),
])
def test_an_iteration_flag_beyond_what_the_ledger_holds_exits_2_naming_it(tmp_path, args, said):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")])
    one_line_error(run_cli("--config", cfg, "--once", *args), said)  # before: an OverflowError traceback


def test_an_end_iteration_below_the_default_begin_names_the_config_key(tmp_path):
    cfg = write_config(tmp_path, [bench("qa")], watch={"end_iteration": 500})
    one_line_error(run_cli("--config", cfg, "--once"),
                   "watch.end_iteration: expected >= the begin iteration (1000, the default begin")


def test_a_checkpoint_named_beyond_any_iteration_is_ignored_and_the_others_are_evaluated(tmp_path, venvs):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("step_1000", f"step_{10 ** 20}"):  # the second: 21 digits, more than the ledger's integers hold
        (ckpt / name).write_bytes(b"w")
        (ckpt / f"{name}.done").touch()
    cfg = write_config(tmp_path, [bench("qa")], watch={"layout": "glob", "pattern": r"step_(\d+)",
                                                        "done_marker": "{name}.done", "settle_seconds": 0})
    proc = run_cli("--config", cfg, "--once", check=0, timeout=240)
    assert "Traceback" not in proc.stderr, proc.stderr  # before: every scan of the run failed at the ledger
    assert [(r["iteration"], r["state"]) for r in ledger_rows(tmp_path / "cache")] == [(1000, "recorded")]


def test_dry_run_with_a_cache_dir_that_is_a_file_exits_2_naming_the_key(tmp_path):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    (tmp_path / "cache").write_text("not a folder")
    cfg = write_config(tmp_path, [bench("qa")])
    for mode in ("--dry-run", "--once"):
        one_line_error(run_cli("--config", cfg, mode), "auto_eval.cache_dir:")


def test_model_type_glob_without_a_pattern_exits_2_naming_the_key(tmp_path):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")])
    for mode in ("--dry-run", "--once"):
        one_line_error(run_cli("--config", cfg, mode, "--model-type", "glob"),
                       "--model-type glob: auto_eval.watch.pattern: the glob layout needs a regex")


def test_a_main_metric_the_benchmark_does_not_report_is_refused_with_a_suggestion(tmp_path):
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "q"}],
                                                 "target": "a"}])
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": data, "metrics": ["exact_match"],
                                   "main_metric": "exact_mach"}])
    proc = run_cli("--config", cfg, "--dry-run")
    one_line_error(proc, "main_metric: benchmark 'qa' reports no metric 'exact_mach'")
    assert "did you mean 'exact_match'" in proc.stderr


@pytest.mark.parametrize("csv, said", [
    ("id,question,answer\n1,q1,a1\n1,q2,a2\n", ":3: id '1' already used on line 2"),  # named the written file
    ("id,question,answer\n1,,a1\n2,q2,a2\n", ":2: messages[0].content: empty"),  # refused by the dataset check
])
def test_make_dataset_names_the_input_line_of_a_bad_row_and_writes_nothing(tmp_path, csv, said):
    (tmp_path / "in.csv").write_text(csv)
    out = tmp_path / "ds"
    proc = bench_py("make-dataset", "--input", str(tmp_path / "in.csv"), "--output-dir", str(out),
                    "--dataset-id", "x", "--target-column", "answer")
    one_line_error(proc, f"{tmp_path / 'in.csv'}{said}")
    assert ".making-" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_make_dataset_into_a_file_exits_2_naming_the_flag(tmp_path):
    (tmp_path / "qa.csv").write_text("id,question,answer\n1,q1,a1\n")
    proc = bench_py("make-dataset", "--input", str(tmp_path / "qa.csv"), "--output-dir", str(tmp_path / "qa.csv"),
                    "--dataset-id", "x", "--target-column", "answer")
    one_line_error(proc, "--output-dir:")


def test_bench_run_with_a_model_path_that_does_not_exist_says_so(tmp_path, venvs):
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "q"}],
                                                 "target": "a"}])
    proc = bench_py("run", data, "--model", str(tmp_path / "no-model"), "--output-root", str(tmp_path / "out"))
    # before: "OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert f"model '{tmp_path / 'no-model'}': no such checkpoint directory" in proc.stdout + proc.stderr


@pytest.mark.parametrize("row, said", [
    ({"sample_id": "1", "status": "ok", "response": {"text": 2}}, ":1: response.text: expected a string"),
    ({"sample_id": "1", "status": "error", "response": {"text": ""}, "error": "boom"}, ":1: error: expected an object"),
])
def test_bench_eval_with_a_bad_prediction_row_exits_2_naming_file_and_line(tmp_path, venvs, row, said):
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "q"}],
                                                 "target": "a"}], metrics=["exact_match"])
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps(row) + "\n")
    proc = bench_py("eval", data, "--predictions", str(preds), "--output-root", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert f"{preds}{said}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_a_prediction_file_that_is_not_utf8_names_the_line(tmp_path):
    from evaluator.common.records import read_results

    preds = tmp_path / "predictions.jsonl"
    good = json.dumps({"sample_id": "1", "status": "ok", "response": {"text": "a"}})
    preds.write_bytes(good.encode() + b"\n" + b'{"sample_id": "2", "status": "ok", "response": {"text": "\xe9"}}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not UTF-8 text"):
        read_results(str(preds))


def test_an_error_row_without_a_type_is_read_as_an_error_not_a_crash(tmp_path):
    from evaluator.common.records import read_results

    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"sample_id": "1", "status": "error", "response": {"text": ""},
                                 "error": {"message": "boom"}}) + "\n")
    (result,) = read_results(str(preds))
    assert not result.ok and result.error.message == "boom" and result.error.type == "error"


def test_a_config_with_end_below_begin_in_the_file_still_names_file_and_line(tmp_path):
    cfg = write_config(tmp_path, [bench("qa")], watch={"begin_iteration": 5000, "end_iteration": 2000})
    proc = run_cli("--config", cfg, "--dry-run")
    one_line_error(proc, "auto_eval.watch.end_iteration: expected >= begin_iteration (5000), got 2000")
    assert yaml.safe_load(open(cfg))["auto_eval"]["watch"]["end_iteration"] == 2000


@pytest.mark.parametrize("section, key", [("executor", "max_attempts"), ("executor", "worker_max_jobs"),
                                          ("watch", "poll_seconds")])
def test_true_where_a_number_is_expected_exits_2_naming_the_key(tmp_path, section, key):
    cfg = write_config(tmp_path, [bench("qa")], **{section: {key: True}})
    one_line_error(run_cli("--config", cfg, "--dry-run"), f"auto_eval.{section}.{key}: expected a number, got true")


def test_a_metadata_json_that_is_a_list_says_it_expected_an_object(tmp_path):
    from evaluator.benchmarks.dataset import DatasetError, read_metadata

    (tmp_path / "metadata.json").write_text("[1]")
    with pytest.raises(DatasetError, match=r"metadata.json: expected a JSON object .*got list"):
        read_metadata(str(tmp_path))


def test_bench_eval_on_a_dataset_folder_that_does_not_exist_says_so(tmp_path):
    proc = bench_py("eval", str(tmp_path / "gone"), "--predictions", str(tmp_path / "p.jsonl"))
    one_line_error(proc, f"{tmp_path / 'gone'}: no such dataset directory")


def test_a_main_metric_a_metric_invents_is_taken(tmp_path):
    """llm_judge reports win_rate, accuracy reports unparsed_rate: names no registry lists before a first result."""
    data = canonical_dataset(tmp_path / "mc", [{"id": "1", "messages": [{"role": "user", "content": "q"}],
                                                 "choices": ["a", "b"], "target": "a"}])
    cfg = write_config(tmp_path, [{"name": "mc", "type": "text-mc", "dataset": data, "metrics": ["accuracy"],
                                   "main_metric": "unparsed_rate"}])
    run_cli("--config", cfg, "--dry-run", check=0)


def test_make_dataset_with_a_template_that_is_no_format_string_exits_2_naming_the_flag(tmp_path):
    (tmp_path / "qa.csv").write_text("id,question,answer\n1,q1,a1\n")
    proc = bench_py("make-dataset", "--input", str(tmp_path / "qa.csv"), "--output-dir", str(tmp_path / "ds"),
                    "--dataset-id", "x", "--target-column", "answer", "--template", "{question")
    one_line_error(proc, "--template: expected a format string of {column} names, got '{question'")  # was ValueError


def test_bench_eval_with_an_output_root_that_is_a_file_exits_2_naming_the_flag(tmp_path):
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "q"}],
                                                 "target": "a"}], metrics=["exact_match"])
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"sample_id": "1", "status": "ok", "response": {"text": "a"}}) + "\n")
    (tmp_path / "a-file").write_text("")
    proc = bench_py("eval", data, "--predictions", str(preds), "--output-root", str(tmp_path / "a-file"))
    one_line_error(proc, f"--output-root: cannot create {tmp_path / 'a-file'}")  # was NotADirectoryError
