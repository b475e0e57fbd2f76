"""`tools/bench.py` as a user runs it: make-dataset from their own directory, with relative paths, the dataset
it writes scored by `tools/bench.py eval` without further flags, and output piped into `head`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from evaluator.benchmarks.dataset import load_dataset

BENCH = os.path.join(ROOT, "tools", "bench.py")

QA_CSV = "question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n"


def bench_in(cwd, *args, timeout=60):
    """tools/bench.py started from `cwd`, as a user in their own directory would."""
    return subprocess.run([sys.executable, BENCH, *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout)


def make(tmp_path, *args):
    """make-dataset on tmp_path/qa.csv into tmp_path/ds (absolute paths: these tests are not about paths)."""
    return bench_in(tmp_path, "make-dataset", "--input", str(tmp_path / "qa.csv"), "--output-dir", str(tmp_path / "ds"),
                    "--dataset-id", "d", *args)


def test_relative_paths_resolve_against_the_current_directory(tmp_path):
    (tmp_path / "qa.csv").write_text(QA_CSV)
    r = bench_in(tmp_path, "make-dataset", "--input", "qa.csv", "--output-dir", "data/my_qa", "--dataset-id", "my-qa",
                 "--target-column", "answer")
    assert r.returncode == 0, r.stderr
    assert len(load_dataset(str(tmp_path / "data" / "my_qa")).samples) == 2
    assert not os.path.exists(os.path.join(ROOT, "data", "my_qa"))


def test_the_readme_example_writes_a_dataset_that_eval_scores_without_metric_flags(tmp_path, venvs):
    (tmp_path / "qa.csv").write_text(QA_CSV)
    r = bench_in(tmp_path, "make-dataset", "--input", "qa.csv", "--output-dir", "data/my_qa", "--dataset-id", "my-qa",
                 "--target-column", "answer")
    assert r.returncode == 0, r.stderr
    assert "metrics: exact_match, token_f1" in r.stdout
    ds = load_dataset(str(tmp_path / "data" / "my_qa"))
    assert ds.metadata["metrics"] == ["exact_match", "token_f1"]
    answers = {"qa-0": "4", "qa-1": "Lyon"}
    (tmp_path / "predictions.jsonl").write_text("".join(
        json.dumps({"sample_id": s.id, "status": "ok", "response": {"text": answers[s.id], "usage": {}}}) + "\n"
        for s in ds.samples))
    r = bench_in(tmp_path, "eval", "data/my_qa", "--predictions", "predictions.jsonl", "--output-root", "out",
                 timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [metrics_path] = (tmp_path / "out").glob("*/my_qa/metrics.json")
    assert json.loads(metrics_path.read_text())["metrics"]["exact_match"] == 0.5


@pytest.mark.parametrize("columns, flags, metrics", [
    ("question,answer\nq,a\n", ["--target-column", "answer"], ["exact_match", "token_f1"]),
    ("question,A,B,answer\nq,x,y,x\n", ["--choices-columns", "A,B", "--target-column", "answer"], ["accuracy"]),
    ("question,r1,r2\nq,a dog,a cat\n", ["--references-columns", "r1,r2"], ["bleu_4", "meteor", "rouge_l", "cider_d"]),
])
def test_without_metrics_flag_the_metrics_follow_what_every_row_has(tmp_path, columns, flags, metrics):
    (tmp_path / "qa.csv").write_text(columns)
    r = make(tmp_path, *flags)
    assert r.returncode == 0, r.stderr
    assert load_dataset(str(tmp_path / "ds")).metadata["metrics"] == metrics


def test_rows_with_nothing_to_score_against_get_no_metrics_and_a_note_saying_so(tmp_path):
    (tmp_path / "qa.csv").write_text("question\nWrite a poem.\n")
    r = make(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "metrics" not in load_dataset(str(tmp_path / "ds")).metadata
    assert "note: metadata.json names no metrics" in r.stderr and "--metrics" in r.stderr


def test_metrics_flag_writes_the_named_metrics(tmp_path):
    (tmp_path / "qa.csv").write_text("question\nWrite a poem.\n")
    r = make(tmp_path, "--metrics", "llm_judge")
    assert r.returncode == 0, r.stderr
    assert load_dataset(str(tmp_path / "ds")).metadata["metrics"] == ["llm_judge"]


def test_an_unknown_metric_is_one_line_naming_the_flag_and_nothing_is_written(tmp_path):
    (tmp_path / "qa.csv").write_text(QA_CSV)
    r = make(tmp_path, "--target-column", "answer", "--metrics", "exact_mach")
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("bench: error: --metrics: unknown metric 'exact_mach'; did you mean 'exact_match'")
    assert not (tmp_path / "ds").exists()


def test_a_metric_the_rows_cannot_feed_is_refused_before_writing(tmp_path):
    (tmp_path / "qa.csv").write_text(QA_CSV)
    r = make(tmp_path, "--target-column", "answer", "--metrics", "accuracy")
    assert r.returncode == 2
    assert "--metrics: metric 'accuracy' needs 'choices' on every sample" in r.stderr
    assert not (tmp_path / "ds").exists()


def test_the_id_column_is_used_by_default(tmp_path):
    (tmp_path / "qa.csv").write_text("id,question,answer\nq7,What is 2+2?,4\nq9,Capital of France?,Paris\n")
    assert make(tmp_path, "--target-column", "answer").returncode == 0
    assert [s.id for s in load_dataset(str(tmp_path / "ds")).samples] == ["q7", "q9"]


def test_without_an_id_column_ids_are_file_stem_and_row_index(tmp_path):
    (tmp_path / "qa.csv").write_text(QA_CSV)
    assert make(tmp_path, "--target-column", "answer").returncode == 0
    assert [s.id for s in load_dataset(str(tmp_path / "ds")).samples] == ["qa-0", "qa-1"]


def test_id_column_flag_overrides_the_id_column_and_must_exist(tmp_path):
    (tmp_path / "qa.csv").write_text("id,key,question,answer\n1,k1,What is 2+2?,4\n")
    assert make(tmp_path, "--target-column", "answer", "--id-column", "key").returncode == 0
    assert [s.id for s in load_dataset(str(tmp_path / "ds")).samples] == ["k1"]
    r = make(tmp_path, "--target-column", "answer", "--id-column", "qid")
    assert r.returncode == 2 and "qa.csv:2: no id column 'qid'" in r.stderr


def test_a_reader_that_goes_away_early_gets_no_traceback(tmp_path):
    """`tools/bench.py list | head -1`: the read end is closed before bench.py writes."""
    proc = subprocess.Popen([sys.executable, BENCH, "list"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in stderr, stderr
