"""The canonical dataset contract (evaluator/benchmarks/dataset.py), RunResult records, and
`tools/bench.py make-dataset`. Pure Python: runs in the daemon venv."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from evaluator.benchmarks.dataset import (DatasetError, Sample, load_dataset, write_dataset)
from evaluator.benchmarks.registry import kind_for, load_benchmark
from evaluator.common.records import ERROR, RunError, RunResult, read_results, write_results


def write_rows(root, rows, meta=None):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump(meta if meta is not None else {"dataset_id": "d1"}, f)
    return str(root)


def bench_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_text_audio_and_multi_turn_rows_load(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    root = write_rows(tmp_path, [
        {"id": "q1", "messages": [{"role": "user", "content": "2+2?"}], "target": "4"},
        {"id": "q2", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"}],
         "choices": ["bye", "hi"], "category": "chat", "metadata": {"src": 1}},
        {"id": 3, "messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                                            {"type": "text", "text": "describe"}]}],
         "references": ["a beep", "a tone"]},
    ], {"dataset_id": "mixed", "metrics": ["exact_match"], "unknown_key": {"kept": True}})
    ds = load_dataset(root)
    assert ds.dataset_id == "mixed" and ds.metadata["unknown_key"] == {"kept": True}
    assert [s.id for s in ds.samples] == ["q1", "q2", "3"]
    assert len(ds.samples[1].messages) == 4 and ds.samples[1].category == "chat"
    assert ds.samples[2].audio_paths() == [str(tmp_path / "a.wav")]  # made absolute
    assert ds.samples[2].prompt_text() == "describe"
    assert len(load_dataset(root, sample_size=2).samples) == 2


def test_bad_rows_are_all_reported_with_file_and_line(tmp_path):
    root = write_rows(tmp_path, [
        {"id": "ok", "messages": [{"role": "user", "content": "x"}]},
        "{not json",
        {"id": "", "messages": [{"role": "user", "content": "x"}]},
        {"id": "r", "messages": [{"role": "robot", "content": "x"}]},
        {"id": "a", "messages": [{"role": "user", "content": [{"type": "audio", "path": "missing.wav"}]}]},
        {"id": "t", "messages": [{"role": "user", "content": "x"}], "references": "not a list"},
        {"id": "ok", "messages": [{"role": "user", "content": "dup"}]},
        {"id": "z", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ])
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    msg = str(e.value)
    path = os.path.join(root, "test.jsonl")
    for line, what in [(2, "not valid JSON"), (3, "id: expected a non-empty string"), (4, "messages[0]"),
                       (5, "audio file not found"), (6, "references: expected a non-empty list"),
                       (7, "already used on line 1"), (8, "the last turn is the assistant's")]:
        assert f"{path}:{line}: " in msg and what in msg, (line, what, msg)


def test_metadata_problems(tmp_path):
    root = write_rows(tmp_path, [{"id": "1", "messages": [{"role": "user", "content": "x"}]}], {"name": "no id"})
    with pytest.raises(DatasetError, match="dataset_id: expected a non-empty string"):
        load_dataset(root)
    os.remove(os.path.join(root, "metadata.json"))
    with pytest.raises(DatasetError, match="metadata.json: missing"):
        load_dataset(root)


def test_write_then_load_round_trip(tmp_path):
    samples = [Sample(id="a", messages=[{"role": "user", "content": "q"}], target="t", choices=["t", "u"])]
    write_dataset(str(tmp_path / "d"), {"dataset_id": "rt"}, samples)
    assert load_dataset(str(tmp_path / "d")).samples == samples
    assert kind_for(str(tmp_path / "d")) == ("dataset", str(tmp_path / "d"))
    assert load_benchmark("dataset", str(tmp_path / "d")).samples == samples


def test_run_results_round_trip_and_bad_rows(tmp_path):
    rows = [RunResult("a", "d", "hf", {}, [], {"text": "x", "usage": {"completion_tokens": 1}}),
            RunResult("b", "d", "hf", {}, [], status=ERROR, error=RunError("Timeout", "slow", True))]
    path = str(tmp_path / "p.jsonl")
    assert write_results(path, rows) == 2
    back = read_results(path)
    assert back == rows and back[0].text == "x" and not back[1].ok and back[1].error.retryable
    with open(path, "a") as f:
        f.write('{"sample_id": "c", "status": "maybe", "response": {}}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: status: expected 'ok' or 'error'"):
        read_results(path)


def test_make_dataset_from_csv_with_choices_and_categories(tmp_path):
    src = tmp_path / "mc.csv"
    src.write_text('qid,question,A,B,C,answer,subject\n'
                   '1,"Which is blue, the sky or grass?",sky,grass,sun,sky,nature\n'
                   '2,What is 2+2?,3,4,5,4,math\n')
    out = tmp_path / "ds"
    r = bench_cli("make-dataset", "--input", str(src), "--output-dir", str(out), "--dataset-id", "mc1",
                  "--id-column", "qid", "--choices-columns", "A,B,C", "--target-column", "answer",
                  "--category-column", "subject", "--metrics", "accuracy")
    assert r.returncode == 0, r.stderr
    ds = load_dataset(str(out))
    assert ds.metadata["metrics"] == ["accuracy"]
    first = ds.samples[0]
    assert first.id == "1" and first.choices == ["sky", "grass", "sun"] and first.target == "sky"
    assert first.category == "nature"
    assert first.messages[0]["content"] == "Which is blue, the sky or grass?\n(A) sky\n(B) grass\n(C) sun"


def test_make_dataset_from_jsonl_with_references_list_and_template(tmp_path):
    src = tmp_path / "caps.jsonl"
    src.write_text(json.dumps({"name": "x", "refs": ["a dog", "a dog barks"]}) + "\n")
    out = tmp_path / "ds"
    r = bench_cli("make-dataset", "--input", str(src), "--output-dir", str(out), "--dataset-id", "caps",
                  "--template", "Describe {name}.", "--references-columns", "refs", "--system-prompt", "be short")
    assert r.returncode == 0, r.stderr
    s = load_dataset(str(out)).samples[0]
    assert s.references == ["a dog", "a dog barks"]
    assert s.messages == [{"role": "system", "content": "be short"}, {"role": "user", "content": "Describe x."}]


def test_make_dataset_errors_name_the_column_and_line(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text("question,answer\nhi,there\n")
    r = bench_cli("make-dataset", "--input", str(src), "--output-dir", str(tmp_path / "o"), "--dataset-id", "q",
                  "--target-column", "answr")
    assert r.returncode == 2
    assert f"{src}:2: no target column 'answr' (columns: question, answer)" in r.stderr
    r = bench_cli("make-dataset", "--input", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o"),
                  "--dataset-id", "q")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_make_dataset_refuses_short_and_long_csv_rows(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text("question,answer\nWhat is 3+3?\n")
    r = bench_cli("make-dataset", "--input", str(src), "--output-dir", str(tmp_path / "o"), "--dataset-id", "q",
                  "--target-column", "answer")
    assert r.returncode == 2 and f"{src}:2: 1 field(s), the header has 2" in r.stderr
    src.write_text("question,answer\nWhat is 3+3?,6,extra\n")
    r = bench_cli("make-dataset", "--input", str(src), "--output-dir", str(tmp_path / "o"), "--dataset-id", "q")
    assert r.returncode == 2 and f"{src}:2: 3 field(s), the header has 2" in r.stderr


@pytest.mark.parametrize("generation, message", [
    ({"stop": 5}, "generation.stop: expected a string or a list of strings"),
    ({"stop": ["ok", 1]}, "generation.stop: expected a string or a list of strings"),
    ({"num_return_sequences": 2}, "generation.num_return_sequences: one answer per sample"),
    ({"max_new_tokens": 0}, "generation.max_new_tokens: expected an integer >= 1"),
    ({"max_new_tokens": -3}, "generation.max_new_tokens: expected an integer >= 1"),
    ({"temperature": -0.5}, "generation.temperature: expected a number >= 0"),
    ({"top_p": 1.5}, "generation.top_p: expected a number <= 1"),
    ({"max_new_token": 4}, "generation.max_new_token: unknown generation parameter; did you mean 'max_new_tokens'"),
])
def test_generation_parameters_that_cannot_work_are_refused(generation, message):
    from evaluator.common.errors import EvaluatorError
    from evaluator.stages.inference.params import GenerationParams
    with pytest.raises(EvaluatorError, match=message):
        GenerationParams.from_dict(generation, "generation")
    assert GenerationParams.from_dict({"stop": "\n"}).stop == ["\n"]


def run_inference_stage(tmp_path, benchmark: dict) -> subprocess.CompletedProcess:
    """`python -m evaluator.stages.inference --job ...` as the daemon starts it (it stops before any model loads)."""
    from evaluator.common.contracts import INFERENCE, StageJob
    job = tmp_path / "infer.job.json"
    StageJob(stage=INFERENCE, run="r", iteration=1, checkpoint=str(tmp_path / "no-model"),
             benchmark={"name": "b", "type": "dataset", **benchmark}, output_dir=str(tmp_path / "out")).write(str(job))
    return subprocess.run([sys.executable, "-m", "evaluator.stages.inference", "--job", str(job)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_non_utf8_byte_in_test_jsonl_is_named_by_file_and_line(tmp_path):
    root = write_rows(tmp_path / "d", [{"id": "ok", "messages": [{"role": "user", "content": "x"}]}])
    with open(os.path.join(root, "test.jsonl"), "ab") as f:
        f.write(b'{"id": "bad", "messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(DatasetError, match=r"test\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_dataset(root)


def test_the_inference_stage_exits_2_on_a_non_utf8_dataset(tmp_path):
    root = write_rows(tmp_path / "d", [{"id": "ok", "messages": [{"role": "user", "content": "x"}]}])
    with open(os.path.join(root, "test.jsonl"), "ab") as f:
        f.write(b"\xff\xfe\n")
    proc = run_inference_stage(tmp_path, {"dataset": root})
    assert proc.returncode == 2, proc.stderr
    assert f"{root}/test.jsonl:2: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_the_inference_stage_exits_2_on_a_backend_option_the_backend_does_not_read(tmp_path):
    """The hf backend used to ignore an unknown option; a typo then silently changed nothing."""
    root = write_rows(tmp_path / "d", [{"id": "ok", "messages": [{"role": "user", "content": "x"}]}])
    proc = run_inference_stage(tmp_path, {"dataset": root, "backend": "hf", "backend_options": {"dtyp": "float32"}})
    assert proc.returncode == 2, proc.stderr
    assert "backend_options.dtyp: not an option of the hf backend; did you mean 'dtype'?" in proc.stderr


def test_the_inference_stage_exits_2_on_an_unknown_generation_parameter(tmp_path):
    root = write_rows(tmp_path / "d", [{"id": "ok", "messages": [{"role": "user", "content": "x"}]}])
    proc = run_inference_stage(tmp_path, {"dataset": root, "generation": {"max_new_token": 4}})
    assert proc.returncode == 2, proc.stderr
    assert "generation.max_new_token: unknown generation parameter; did you mean 'max_new_tokens'?" in proc.stderr


def test_make_dataset_names_the_line_of_a_non_utf8_byte(tmp_path):
    src = tmp_path / "q.csv"
    src.write_bytes(b"question,answer\nhi,there\nna\xefve,x\n")
    r = bench_cli("make-dataset", "--input", str(src), "--output-dir", str(tmp_path / "o"), "--dataset-id", "q")
    assert r.returncode == 2 and f"{src}:3: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
