"""`tools/bench.py run` with several benchmarks: one warm worker per stage for all of them (the model loads once),
each benchmark with its own folder, log and exit code, one failing without stopping the others."""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import bench_py, canonical_dataset

QA = [{"id": f"q{i}", "messages": [{"role": "user", "content": text}], "target": target}
      for i, (text, target) in enumerate([("The sky is", "blue."), ("Grass is", "green."),
                                          ("one two three", "four five"), ("The cat sat on the", "mat.")])]
MORE = [{"id": f"m{i}", "messages": [{"role": "user", "content": text}], "target": target, "category": cat}
        for i, (text, target, cat) in enumerate([("Hello, how are you", "today?", "chat"),
                                                 ("I am fine,", "thank you.", "chat"), ("red green", "blue", "colour")])]
ARGS = ("--param", "max_new_tokens=5", "--metrics", "exact_match,token_f1")


def worker_header(folder, log="infer.stderr.log") -> tuple[int, int]:
    """(pid, job number) from the header the warm worker wrote at the top of the job's log."""
    text = (folder / log).read_text()
    found = re.findall(r"^==== .* warm worker pid (\d+) job (\d+):", text, re.M)
    assert len(found) == 1, text[-3000:]
    return int(found[0][0]), int(found[0][1])


def predictions(folder) -> list:
    """The prediction rows without their wall-clock latency."""
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "latency_ms"} for row in rows]


def scores(folder) -> dict:
    doc = json.loads((folder / "metrics.json").read_text())
    return {k: doc[k] for k in ("n", "metrics", "stderr", "per_category")}


@pytest.mark.slow
def test_two_benchmarks_in_one_run_share_one_worker_per_stage_and_equal_separate_runs(tmp_path, tiny_lm):
    model = tiny_lm("gpt2")
    qa = canonical_dataset(tmp_path / "qa", QA, dataset_id="qa")
    more = canonical_dataset(tmp_path / "more", MORE, dataset_id="more")
    r = bench_py("run", qa, more, "--model", model, "--output-root", str(tmp_path / "together"), *ARGS)
    assert r.returncode == 0, r.stderr[-4000:]
    together = tmp_path / "together" / "model"
    for name in ("qa", "more"):
        single = bench_py("run", str(tmp_path / name), "--model", model, "--output-root", str(tmp_path / name / "out"),
                          *ARGS)
        assert single.returncode == 0, single.stderr[-4000:]
        alone = tmp_path / name / "out" / "model" / name
        assert predictions(together / name) == predictions(alone)
        assert scores(together / name) == scores(alone)
    for log in ("infer.stderr.log", "eval.stderr.log"):
        (pid_qa, job_qa), (pid_more, job_more) = worker_header(together / "qa", log), worker_header(together / "more",
                                                                                                   log)
        assert pid_qa == pid_more and (job_qa, job_more) == (1, 2), log
    meta = json.loads((together / "more" / "run_metadata.json").read_text())
    assert meta["timings"]["model"].startswith("reused")  # the second benchmark did not load the model again
    assert "[inference] done" in r.stderr  # each stage's log still reaches the terminal
    table = r.stdout[r.stdout.index("benchmark  exit  file"):].splitlines()[1:]
    assert [line.split() for line in table] == [["qa", "0", str(together / "qa" / "metrics.json")],
                                               ["more", "0", str(together / "more" / "metrics.json")]]


@pytest.mark.slow
def test_a_bad_dataset_fails_alone_and_the_benchmarks_after_it_run_in_a_fresh_worker(tmp_path, tiny_lm):
    model = tiny_lm("gpt2")
    qa = canonical_dataset(tmp_path / "qa", QA, dataset_id="qa")
    bad = canonical_dataset(tmp_path / "bad", QA, dataset_id="bad")
    with open(os.path.join(bad, "test.jsonl"), "a") as f:
        f.write("{not json\n")
    more = canonical_dataset(tmp_path / "more", MORE, dataset_id="more")
    r = bench_py("run", qa, bad, more, "--model", model, "--output-root", str(tmp_path / "out"), *ARGS)
    assert r.returncode == 2, r.stderr[-4000:]
    out = tmp_path / "out" / "model"
    assert (out / "qa" / "metrics.json").exists() and (out / "more" / "metrics.json").exists()
    assert not (out / "bad" / "run_metadata.json").exists() and not (out / "bad" / "metrics.json").exists()
    assert "test.jsonl:5" in (out / "bad" / "infer.stderr.log").read_text()
    (pid_qa, _), (pid_more, job_more) = worker_header(out / "qa"), worker_header(out / "more")
    assert pid_more != pid_qa and job_more == 1
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout[r.stdout.index("benchmark  exit"):].splitlines()[1:]}
    assert rows == {"qa": ["0", str(out / "qa" / "metrics.json")], "bad": ["2", str(out / "bad" / "infer.stderr.log")],
                    "more": ["0", str(out / "more" / "metrics.json")]}


@pytest.mark.parametrize("flag", ["--dataset", "--name"])
def test_dataset_or_name_with_two_benchmarks_is_refused_before_anything_runs(tmp_path, flag):
    qa = canonical_dataset(tmp_path / "qa", QA, dataset_id="qa")
    more = canonical_dataset(tmp_path / "more", MORE, dataset_id="more")
    r = bench_py("run", qa, more, flag, str(tmp_path / "x"), "--model", str(tmp_path / "no-model"),
                 "--output-root", str(tmp_path / "out"))
    assert r.returncode == 2 and f"{flag} applies to one benchmark" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_same_benchmark_twice_is_refused_before_anything_runs(tmp_path):
    qa = canonical_dataset(tmp_path / "qa", QA, dataset_id="qa")
    r = bench_py("inference", qa, qa, "--model", str(tmp_path / "no-model"), "--output-root", str(tmp_path / "out"))
    assert r.returncode == 2 and "'qa' is given twice" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
