"""Storage faults and bad input met in the field, through the real CLIs: each gives one readable line and exit 2,
or holds only what it touches, and never a traceback.

The faults are real: a dataset file whose read fails with EIO (a symlink to /proc/self/mem, which any process can
open and none can read at offset 0), a ledger file that is not a database, a cache_dir where the lock file cannot
be made, a HELM output file that is not UTF-8 or is a folder, a rename onto a folder.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess

import pytest

from conftest import (DAEMON_PY, ROOT, bench, bench_py, canonical_dataset, fake, history, ledger_rows,
                      megatron_checkpoint, run_cli, venvs, write_config)  # noqa: F401
from evaluator.common.atomic import write_text_atomic
from evaluator.daemon import ledger as L

WRITER = os.path.join(ROOT, "tools", "wandb_writer.py")
LOCAL = {"sinks": ["local"], "plots": False}


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("error:", "wandb_writer:")), last
    for needle in needles:
        assert needle in last, last


def unreadable_dataset(root) -> str:
    """A dataset folder whose extra.jsonl fails every read with EIO."""
    path = canonical_dataset(root, [{"id": "1", "messages": [{"role": "user", "content": "hi"}], "target": "x"}])
    os.symlink("/proc/self/mem", os.path.join(path, "extra.jsonl"))
    with pytest.raises(OSError):  # the fault is real on this machine
        with open(os.path.join(path, "extra.jsonl"), "rb") as f:
            f.read(1)
    return path


# ---- a dataset that cannot be read --------------------------------------------------------------------------
def test_a_dataset_file_that_cannot_be_read_holds_only_its_benchmark_and_the_others_are_recorded(tmp_path):
    data = unreadable_dataset(tmp_path / "bad")
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("good"), dict(bench("bad"), dataset=data)], recorder=LOCAL)
    proc = run_cli("--config", cfg, "--once")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]  # 1: a job waits
    assert f"benchmark bad: held, nothing of it starts: dataset {data} cannot be read" in proc.stderr
    assert "Input/output error" in proc.stderr
    states = {r["benchmark"]: r["state"] for r in ledger_rows(tmp_path / "cache")}
    assert states == {"good": "recorded", "bad": "pending"}
    assert [h["benchmark"] for h in history(tmp_path / "cache")] == ["good"]


def test_a_dataset_that_cannot_be_read_as_the_only_benchmark_exits_2_and_dry_run_shows_it_held(tmp_path):
    data = unreadable_dataset(tmp_path / "bad")
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [dict(bench("bad"), dataset=data)], recorder=LOCAL)
    one_line_error(run_cli("--config", cfg, "--once"), "no benchmark can run", f"{data} cannot be read")
    proc = run_cli("--config", cfg, "--dry-run")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"benchmark bad: held (1 job(s) wait): dataset {data} cannot be read" in proc.stdout


# ---- the cache_dir and its ledger ---------------------------------------------------------------------------
def test_a_ledger_file_that_is_not_a_database_stops_the_daemon_and_dry_run_with_one_line_naming_it(tmp_path):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    (tmp_path / "cache").mkdir()
    ledger = tmp_path / "cache" / "ledger.sqlite3"
    ledger.write_bytes(random.Random(0).randbytes(8192))
    for args in (("--once",), ("--dry-run",), ("status",)):
        one_line_error(run_cli(*(args[:1] if args == ("status",) else ()), "--config", cfg,
                               *(() if args == ("status",) else args)), str(ledger.parent), "not a database")
    assert ledger.read_bytes() == random.Random(0).randbytes(8192)  # left as it was, for the operator to look at


def test_a_cache_dir_where_the_lock_file_cannot_be_made_exits_2_naming_the_key(tmp_path):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    (tmp_path / "cache" / "daemon.lock").mkdir(parents=True)  # open(O_CREAT) on it fails (EISDIR), as a
    # read-only or full filesystem would fail it
    one_line_error(run_cli("--config", cfg, "--once"), "auto_eval.cache_dir: cannot write",
                   str(tmp_path / "cache" / "daemon.lock"))


def test_the_daemons_ledger_turns_a_damaged_file_into_unavailable_and_keeps_a_statement_bug_loud(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ledger.sqlite3").write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(L.LedgerUnavailable, match="not a database"):
        L.Ledger(str(tmp_path / "bad"))
    led = L.Ledger(str(tmp_path / "good"))
    try:
        with pytest.raises(sqlite3.IntegrityError):  # a bug in a statement is not a storage fault to wait out
            led.db.execute("INSERT INTO jobs (run) VALUES (NULL)")
        assert led.jobs() == []
    finally:
        led.close()


def test_an_atomic_write_that_fails_leaves_no_temp_file_behind(tmp_path):
    target = tmp_path / "metrics.json"
    target.mkdir()
    (target / "keep").write_text("x")  # a rename onto a non-empty folder fails
    with pytest.raises(OSError):
        write_text_atomic(str(target), "{}")
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
    write_text_atomic(str(tmp_path / "ok.json"), "{}")
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "ok.json"]


# ---- numbers that are not numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_config_number_given_as_nan_or_infinity_exits_2_naming_the_key(tmp_path, value):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    text = open(cfg).read().replace("settle_seconds: 0.3", f"settle_seconds: {value}")
    assert value in text
    open(cfg, "w").write(text)
    one_line_error(run_cli("--config", cfg, "--dry-run"), "auto_eval.watch.settle_seconds", "finite")


@pytest.mark.parametrize("args, named", [(("--check-interval", "nan"), "--check-interval"),
                                         (("--check-interval", "inf"), "--check-interval"),
                                         (("status", "--watch", "nan"), "--watch")])
def test_a_cli_interval_that_is_not_a_finite_number_exits_2(tmp_path, args, named):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    if args[0] == "status":
        proc = run_cli("status", "--config", cfg, *args[1:])
    else:
        proc = run_cli("--config", cfg, "--once", *args)
    one_line_error(proc, named)


def test_bench_py_refuses_a_batch_size_below_1_and_a_max_error_rate_outside_0_to_1_before_loading(tmp_path, venvs):
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "hi"}],
                                                "target": "x"}], metrics=["exact_match"])
    for args, said in ((("--batch-size", "0"), "batch_size: expected an integer >= 1, got 0"),
                       (("--backend-opt", "batch_size=-2"), "batch_size: expected an integer >= 1, got -2"),
                       (("--max-error-rate", "nan"), "max_error_rate: expected a fraction from 0 to 1, got nan"),
                       (("--max-error-rate", "2"), "max_error_rate: expected a fraction from 0 to 1, got 2.0")):
        proc = bench_py("inference", data, "--model", str(tmp_path / "no-model"), "--output-root",
                        str(tmp_path / "out"), *args)
        assert proc.returncode == 2 and f"[inference] error: {said}" in proc.stderr, proc.stderr[-3000:]
        assert "the inference stage exited 2" in proc.stderr and "Traceback" not in proc.stderr


# ---- YAML that no config can be -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, said", [
    ("auto_eval:\n  ? [a, b]\n  : 1\n", ":2: not valid YAML (a key must be a plain value, not a list)"),
    ("auto_eval:\n  a: &a [*a]\n", ":2: not valid YAML (an alias used inside the node it names)"),
], ids=["unhashable-key", "recursive-alias"])
def test_yaml_with_a_list_as_key_or_a_self_referring_alias_exits_2_in_both_tools(tmp_path, text, said):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    one_line_error(run_cli("--config", str(cfg), "--dry-run"), f"{cfg}{said}")
    proc = subprocess.run([DAEMON_PY, WRITER, "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    one_line_error(proc, f"{cfg}{said}")


# ---- wandb_writer: HELM output that cannot be read --------------------------------------------------------------
@pytest.mark.parametrize("fault", ["not-utf8", "a-folder"])
def test_a_helm_group_file_that_cannot_be_read_is_an_error_naming_it(tmp_path, fault):
    from test_recorder_sources import write_helm

    write_helm(tmp_path / "helm")
    group = tmp_path / "helm" / "runs" / "proj-llama" / "groups" / "mmlu.json"
    group.unlink()
    if fault == "not-utf8":
        group.write_bytes(b"\xff\xfe[]")
    else:
        group.mkdir()
    cfg = tmp_path / "recorder.yaml"
    cfg.write_text(json.dumps({"project": "p", "evals": [{
        "eval_type": "helm", "model_name": "proj-llama", "source": "helm", "helm_output_dir": str(tmp_path / "helm"),
        "helm_suite_name": "proj-llama", "benchmarks": [{"name": "mmlu", "metrics": ["EM"]}]}]}))
    proc = subprocess.run([DAEMON_PY, WRITER, "--config", str(cfg), "--print-only"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(group) in proc.stderr and ("not UTF-8" if fault == "not-utf8" else "cannot be read") in proc.stderr


# ---- checkpoints with an odd file ------------------------------------------------------------------------------
def test_a_checkpoint_holding_a_dangling_link_waits_with_its_reason_and_once_ends_on_the_others(tmp_path):
    """It was `pending` with no reason while the daemon re-pinned it every pass and --once never ended."""
    root = tmp_path / "ckpt"
    path = megatron_checkpoint(root, 1000, tracker=False)
    os.symlink("../nowhere/tok.json", os.path.join(path, "tokenizer.json"))
    megatron_checkpoint(root, 2000)
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    proc = run_cli("--config", cfg, "--once", timeout=90)
    reason = f"cannot read {path}/tokenizer.json: a symbolic link to ../nowhere/tok.json, which does not exist"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"tiny iteration 1000: 1 job(s) waiting, the checkpoint cannot be pinned: {reason}" in proc.stderr
    rows = {r["iteration"]: r for r in ledger_rows(tmp_path / "cache")}
    assert rows[2000]["state"] == "recorded" and rows[1000]["state"] == "pending"
    assert reason in rows[1000]["last_error"]
    status = run_cli("status", "--config", cfg)
    assert status.returncode == 0 and reason in status.stdout


def test_an_entry_whose_name_has_a_non_ascii_digit_is_ignored_and_the_other_checkpoints_are_found(tmp_path):
    from evaluator.daemon.checkpoints import GlobLayout
    from test_checkpoints import complete_iterations, settled_scan

    for name in ("step_10", "step_20", "step_²"):
        (tmp_path / name).write_bytes(b"w")
        (tmp_path / f"{name}.done").touch()
    layout = GlobLayout("run", str(tmp_path), pattern=r"step_(.+)", done_marker="{name}.done")
    assert complete_iterations(settled_scan(layout)) == [10, 20]


def test_a_safetensors_header_with_an_offset_beyond_any_integer_is_not_complete_and_the_scan_goes_on(tmp_path):
    import struct

    from evaluator.daemon.checkpoints import HuggingFaceLayout, safetensors_problem
    from test_checkpoints import by_iteration, make_hf_checkpoint, settled_scan

    make_hf_checkpoint(tmp_path, 10)
    bad = make_hf_checkpoint(tmp_path, 20) / "model.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert safetensors_problem(str(bad)) == "header not parseable"
    found = by_iteration(settled_scan(HuggingFaceLayout("run", str(tmp_path))))
    assert found[10].complete and not found[20].complete


def test_a_checkpoint_saved_without_its_tokenizer_is_refused_with_exit_2_not_scored_on_empty_prompts(tmp_path, tiny_lm):
    """transformers 5 builds a 1-token tokenizer from a folder with none: every prompt was empty and multiple
    choice 'scored' 0.25 by always picking the first choice."""
    import shutil

    model = tmp_path / "checkpoint-20"
    shutil.copytree(tiny_lm("gpt2"), model)
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(model / name)
    data = canonical_dataset(tmp_path / "mc", [{"id": "1", "messages": [{"role": "user", "content": "1+2="}],
                                                "choices": ["3", "4"], "target": "3"}], metrics=["accuracy"])
    proc = bench_py("run", data, "--model", str(model), "--output-root", str(tmp_path / "out"),
                    "--backend-opt", "choice_scoring=loglikelihood")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{model}: no tokenizer saved with the checkpoint" in proc.stderr
    assert "the inference stage exited 2" in proc.stderr
    assert not list((tmp_path / "out").rglob("metrics.json"))


def test_a_damaged_history_line_is_an_error_naming_the_file_and_line_not_skipped(tmp_path):
    from recorder.sinks import LocalHistorySink, ResultRecord

    sink = LocalHistorySink(str(tmp_path), plots=False)
    sink.record(ResultRecord(run="r", iteration=1000, benchmark="qa", metrics={"acc": 0.5}))
    history_file = tmp_path / "results" / "r" / "history.jsonl"
    history_file.write_text(history_file.read_text() + "garbage line\n")
    fresh = LocalHistorySink(str(tmp_path), plots=False)
    with pytest.raises(Exception) as e:
        fresh.record(ResultRecord(run="r", iteration=2000, benchmark="qa", metrics={"acc": 0.6}))
    assert f"{history_file}:2: not a result line" in str(e.value)
    assert history_file.read_text().count("\n") == 2  # nothing appended behind a line it could not read


# ---- names that become folders ---------------------------------------------------------------------------------
def test_a_benchmark_named_dot_dot_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("..")], recorder=LOCAL)
    one_line_error(run_cli("--config", cfg, "--dry-run"), "auto_eval.benchmarks[0].name", "it names a folder")


def test_bench_py_refuses_a_name_that_is_not_one_folder_and_a_sample_size_for_eval(tmp_path):
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "hi"}],
                                                "target": "x"}], metrics=["exact_match"])
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("")
    for args, said in ((("--name", "a/b"), "--name: expected letters"), (("--name", ".."), "--name: expected letters"),
                       (("--model-name", "../up"), "--model-name: expected a relative folder name")):
        proc = bench_py("eval", data, "--predictions", str(predictions), *args)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = bench_py("eval", data, "--predictions", str(predictions), "--sample-size", "2")
    assert proc.returncode == 2 and "unrecognized arguments: --sample-size" in proc.stderr


@pytest.mark.parametrize("evals, said", [
    ([{"model_name": "m", "source": "file", "eval_result": {"qa": {}}}], "evals[0].eval_result.qa"),
    ([{"model_name": "../escape", "source": "file", "eval_result": {"qa": {"acc": 1}}}], "evals[0].model_name"),
    ([{"model_name": "m", "source": "file", "eval_result": {"a/b": {"acc": 1}}}], "evals[0].eval_result.a/b"),
    ([{"model_name": "m", "source": "file", "eval_result": {"qa": {"revision": 1}}}], "a reserved name"),
    ([{"model_name": "m", "source": "file", "eval_result": {"qa": {"acc": ".nan"}}}],
     "evals[0].eval_result.qa: metrics.acc: expected a finite number, got nan"),
], ids=["empty-metrics", "model-name-up", "benchmark-slash", "reserved-metric", "nan"])
def test_wandb_writer_checks_inline_results_as_a_stages_metrics_json_is_checked(tmp_path, evals, said):
    cfg = tmp_path / "recorder.yaml"
    text = json.dumps({"project": "p", "sinks": ["local"], "output_dir": str(tmp_path / "out"), "evals": evals})
    cfg.write_text(text.replace('".nan"', ".nan"))
    proc = subprocess.run([DAEMON_PY, WRITER, "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert said in proc.stderr and str(cfg) in proc.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


# ---- the Python API: check everything, then change state ------------------------------------------------------
def test_a_refused_start_run_leaves_the_open_run_and_its_metrics_as_they_were(tmp_path):
    from evaluator.api.tracking import MetricsTracker
    from evaluator.common.errors import EvaluatorError

    tracker = MetricsTracker(cache_dir=str(tmp_path))
    tracker.start_run("baseline", lr=1e-4)
    tracker.log_metrics({"accuracy": 0.31}, benchmark="qa")
    with pytest.raises(EvaluatorError, match="still open with metrics logged"):
        tracker.start_run("new-model", iteration=-1)
    with pytest.raises(EvaluatorError, match="still open"):
        tracker.start_run("second")  # would have dropped baseline's metrics
    out = tracker.end_run()
    assert out["metadata"]["run_name"] == "baseline" and out["metadata"]["lr"] == 1e-4
    with pytest.raises(EvaluatorError, match="iteration"):
        tracker.start_run("new-model", iteration=-1)
    with pytest.raises(EvaluatorError, match="tokens_b"):
        tracker.start_run("new-model", tokens_b=float("nan"))
    assert tracker.run_metadata == {}


def test_a_refused_re_record_keeps_the_earlier_result(tmp_path):
    from evaluator.api.tracking import get_metrics_history, record_result
    from evaluator.common.errors import EvaluatorError

    record_result("r", 0, "qa", {"acc": 0.5}, cache_dir=str(tmp_path))
    folder = tmp_path / "results" / "r" / "iter_0000000" / "qa"
    before = (folder / "metrics.json").read_text()
    for kwargs in ({"metadata": {"x": {1, 2}}}, {"tokens_b": "many"}, {"tokens_b": -1.0}):
        with pytest.raises(EvaluatorError):
            record_result("r", 0, "qa", {"acc": 0.6}, cache_dir=str(tmp_path), **kwargs)
    assert (folder / "metrics.json").read_text() == before
    with pytest.raises(EvaluatorError, match="finite number"):
        record_result("r", 1, "qa", {"acc": 10 ** 400}, cache_dir=str(tmp_path))
    assert [(e["iteration"], e["metrics"]) for e in get_metrics_history(cache_dir=str(tmp_path))] == [(0, {"acc": 0.5})]


def test_a_refused_configure_changes_no_setting():
    import importlib

    from evaluator.common.errors import EvaluatorError
    E = importlib.import_module("evaluator.api.evaluate")

    before = E.configure()
    for kwargs in ({"max_workers": 0}, {"seed": "abc"}, {"cache_dir": 5}, {"max_error_rate": float("nan")},
                   {"max_workers": 2, "seed": 1.5}):
        with pytest.raises(EvaluatorError):
            E.configure(**kwargs)
        assert E.configure() == before


def test_run_function_refuses_wrong_argument_types_before_calling_the_function(tmp_path):
    import importlib

    from evaluator.common.errors import EvaluatorError
    E = importlib.import_module("evaluator.api.evaluate")

    data = canonical_dataset(tmp_path / "qa", [{"id": str(i), "messages": [{"role": "user", "content": "hi"}],
                                                "target": "2"} for i in range(4)], metrics=["exact_match"])
    calls = []

    def fn(x):
        calls.append(x)
        return "2"
    for kwargs, said in (({"batch_size": 2.5}, "batch_size"), ({"sample_size": 2.5}, "sample_size"),
                         ({"sample_size": "2"}, "sample_size"), ({"sample_size": True}, "sample_size"),
                         ({"metrics": 5}, "metrics"), ({"options": [1]}, "options"),
                         ({"metric_options": [1]}, "metric_options"),
                         ({"metrics": ["exact_match"], "metric_options": {"exact_match": {"foo": 1}}},
                          "metric_options.exact_match.foo")):
        with pytest.raises(EvaluatorError, match=said):
            E.run_function(fn, data, work_dir=str(tmp_path / "w"), **kwargs)
    assert calls == []
    result = E.run_function(lambda xs: ["2"] * len(xs), data, batch_size=2.0, work_dir=str(tmp_path / "w2"))
    assert result.metrics["exact_match"] == 1.0  # a whole float is a count


def test_compare_models_and_benchmark_refuse_bad_keywords_and_alpha_before_any_model_runs(tmp_path):
    import importlib

    from evaluator.common.errors import EvaluatorError
    E = importlib.import_module("evaluator.api.evaluate")

    calls = []

    def fn(x):
        calls.append(x)
        return "2"
    models = {"a": fn, "b": fn}
    for kwargs, said in (({"name": "zz"}, "named by its key"), ({"foo": 1}, "foo=: not an option"),
                         ({"alpha": "0.1"}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"model": "x"}, "model=")):
        with pytest.raises(EvaluatorError, match=said):
            E.compare_models(models, str(tmp_path), **kwargs)
    with pytest.raises(EvaluatorError, match="named by its key"):
        E.benchmark(str(tmp_path), name="x")
    assert calls == []


def test_evaluator_callback_checks_its_arguments_when_made_not_at_the_first_save():
    from evaluator.api.training import EvaluatorCallback
    from evaluator.common.errors import EvaluatorError

    with pytest.raises(EvaluatorError, match="evaluate=True .* pass config="):
        EvaluatorCallback(quick_eval={"dataset": "/data"}, evaluate=True)
    with pytest.raises(EvaluatorError, match="datset=: not an option"):
        EvaluatorCallback(quick_eval={"datset": "/data"})
    with pytest.raises(EvaluatorError, match="max_new_tokens"):
        EvaluatorCallback(quick_eval={"dataset": "/data", "max_new_tokens": 0})


def test_quick_eval_reports_a_venv_metric_it_cannot_compute_as_unavailable_beside_the_others(tmp_path, venvs):
    """bench.py eval on the same predictions exits 0 with exact_match and fense unavailable (no FENSE checkpoint
    here); the API failed the whole result because its venv part (fense alone) had nothing to compute."""
    import importlib
    E = importlib.import_module("evaluator.api.evaluate")

    data = canonical_dataset(tmp_path / "cap", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": "describe"}], "target": "a dog barks",
         "references": ["a dog barks", "a dog is barking"]} for i in range(3)])
    result = E.quick_eval(lambda text: "a dog barks", data, metrics=["exact_match", "fense"],
                          work_dir=str(tmp_path / "w"))
    assert result.metrics == {"exact_match": 1.0}
    assert "fense" in result.info["unavailable"] and result.info["unavailable"]["fense"]


# ---- operator commands -----------------------------------------------------------------------------------------
def recorded_rows(tmp_path, states: dict) -> str:
    """A config and its ledger with one qa row per iteration in the given state (and its metrics.json)."""
    from evaluator.common.contracts import result_dir
    from test_status import to_state

    (tmp_path / "ckpt").mkdir(exist_ok=True)
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    led = L.Ledger(str(tmp_path / "cache"))
    try:
        for it, state in states.items():
            led.add("tiny", it, "qa", megatron_checkpoint(tmp_path / "ckpt", it))
            to_state(led, ("tiny", it, "qa"), state)
            out = result_dir(str(tmp_path / "cache"), "tiny", it, "qa")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"metrics": {"rows": 1}}, f)
    finally:
        led.close()
    return cfg


def test_cancel_jobs_with_the_local_executor_is_refused_and_never_calls_scancel(tmp_path):
    """It handed the local stages' pids to scancel, which cancels whatever Slurm job has that number."""
    cfg = recorded_rows(tmp_path, {1000: "inferring"})
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    called = tmp_path / "scancel-called"
    (fake_bin / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {called}\n")  # fault catcher, not a Slurm stand-in
    (fake_bin / "scancel").chmod(0o755)
    proc = subprocess.run([DAEMON_PY, os.path.join(ROOT, "tools", "evaluator.py"), "status", "--config", cfg,
                           "--cancel-jobs"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}"))
    one_line_error(proc, "--cancel-jobs", "executor.type slurm")
    assert not called.exists()


def test_invalidate_leaves_a_result_that_is_being_recorded_alone(tmp_path):
    """A sink recording it meanwhile appended its line after the withdrawal: withdrawn in the ledger, back in the
    history and plots."""
    cfg = recorded_rows(tmp_path, {1000: "scored", 2000: "recorded"})
    proc = run_cli("invalidate", "--config", cfg, "--run", "tiny")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "scored      scored right now: try again when it is done" in proc.stdout, proc.stdout
    states = {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")}
    assert states == {1000: "scored", 2000: "invalidated"}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["rerun", "invalidate"])
def test_rerun_and_invalidate_with_the_ledger_locked_exit_2_and_leave_the_result_where_it_was(tmp_path, command):
    """rerun moved the result's files aside, then the ledger refused: a traceback, the row still `recorded` and
    its files under superseded/."""
    import threading

    cfg = recorded_rows(tmp_path, {1000: "recorded"})
    folder = tmp_path / "cache" / "results" / "tiny" / "iter_0001000" / "qa"
    holder = sqlite3.connect(str(tmp_path / "cache" / "ledger.sqlite3"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the ledger past the command's 30 s busy timeout
    release = threading.Timer(45, lambda: None)
    try:
        proc = run_cli(command, "--config", cfg, "--iterations", "1000", timeout=120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        release.cancel()
    one_line_error(proc, "database is locked", "left as it was")
    assert sorted(os.listdir(folder)) == ["metrics.json"]
    assert {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")} == {1000: "recorded"}


@pytest.mark.parametrize("alpha", ["1e-300", "0", "1", "nan"])
def test_compare_alpha_that_is_no_significance_level_exits_2_not_1(tmp_path, alpha):
    """Exit 1 means 'significant regression' to CI: 1e-300 passed the check and failed later with a traceback."""
    from test_compare import write_result

    old = write_result(tmp_path / "old", {"exact_match": {"a": 1.0, "b": 0.0}})
    new = write_result(tmp_path / "new", {"exact_match": {"a": 1.0, "b": 1.0}})
    one_line_error(run_cli("compare", old, new, "--alpha", alpha), "--alpha")


def test_compare_lower_is_better_counts_and_lists_a_fall_as_fixed(tmp_path):
    from test_compare import write_result

    ids = [f"s{i}" for i in range(10)]
    old = write_result(tmp_path / "old", {"loss": {s: 0.5 for s in ids}})
    new = write_result(tmp_path / "new", {"loss": {s: 0.25 for s in ids}})
    proc = run_cli("compare", old, new, "--lower-is-better", "loss", "--flips", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # better, not a regression
    assert "flips of loss: 10 fixed, 0 broken" in proc.stdout
    assert "fixed (new scores lower):" in proc.stdout and "\nbroken (new" not in proc.stdout
    worse = run_cli("compare", new, old, "--lower-is-better", "loss", "--flips", "1")
    assert worse.returncode == 1 and "flips of loss: 0 fixed, 10 broken" in worse.stdout
    assert "broken (new scores higher):" in worse.stdout


def test_a_leaderboard_from_wandb_logs_skips_a_session_killed_before_its_header(tmp_path):
    from recorder.sinks import MlflowSettings, RecorderSettings, WandbSettings
    from recorder.sources import records_from_wandb_dir
    from recorder.wandb_sink import WandbSink
    from test_recorder_sources import rec

    s = RecorderSettings(cache_dir=str(tmp_path), project="proj",
                         wandb=WandbSettings(project="proj", mode="offline", dir=str(tmp_path / "wb")),
                         mlflow=MlflowSettings("unused", "unused"), summary_only=True)
    WandbSink(s).record(rec("llama", 1000, "mmlu", 0.3))
    killed = tmp_path / "wb" / "wandb" / "offline-run-20261201_000000-other" / "run-other.wandb"
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"")
    assert [(r.run, r.iteration) for r in records_from_wandb_dir(str(tmp_path / "wb"), "proj")] == [("llama", 1000)]


# ---- a real trainer's leftovers --------------------------------------------------------------------------------
def test_a_trainer_save_that_crashed_before_trainer_state_json_is_never_taken_for_finished(tmp_path):
    """A Trainer killed inside its save leaves config, weights and training_args.bin but no trainer_state.json;
    the settle rule meant for save_pretrained folders took it for finished, and the resumed run's complete re-save
    of that step was never evaluated."""
    from evaluator.daemon.checkpoints import HuggingFaceLayout
    from test_checkpoints import by_iteration, make_hf_checkpoint, settled_scan

    make_hf_checkpoint(tmp_path / "trainer", 20)
    crashed = make_hf_checkpoint(tmp_path / "trainer", 25, trainer_state=False)
    (crashed / "training_args.bin").write_bytes(b"args")
    found = by_iteration(settled_scan(HuggingFaceLayout("run", str(tmp_path / "trainer"))))
    assert found[20].complete and not found[25].complete
    assert "without trainer_state.json" in found[25].reason
    (crashed / "trainer_state.json").write_text(json.dumps({"global_step": 25}))  # the resumed run's re-save
    assert by_iteration(settled_scan(HuggingFaceLayout("run", str(tmp_path / "trainer"))))[25].complete
    # a run of save_pretrained folders (no trainer_state.json anywhere): settled sizes are their marker
    make_hf_checkpoint(tmp_path / "plain", 30, trainer_state=False)
    assert by_iteration(settled_scan(HuggingFaceLayout("run", str(tmp_path / "plain"))))[30].complete
    # beside the Trainer's saves, a folder without trainer_state.json cannot be told from one of its saves that
    # crashed after the weights (transformers 5 writes training_args.bin later): it waits, named in a run hint,
    # unless a completion notice (EvaluatorCallback) says it is finished
    make_hf_checkpoint(tmp_path / "trainer", 30, trainer_state=False)
    assert not by_iteration(settled_scan(HuggingFaceLayout("run", str(tmp_path / "trainer"))))[30].complete


@pytest.mark.parametrize("word, means", [("on", "on"), ("off", "off"), ("checkpoint", "checkpoint")])
def test_warm_workers_unquoted_on_and_off_mean_on_and_off(tmp_path, word, means):
    """YAML 1.1 reads an unquoted on/off as true/false, and the README writes them unquoted."""
    from evaluator.daemon.config import load_config

    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    text = open(cfg).read().replace("executor:\n", f"executor:\n    warm_workers: {word}\n")
    assert f"warm_workers: {word}" in text
    open(cfg, "w").write(text)
    assert load_config(cfg).executor.warm_workers == means


# ---- numbers: multiple choice, letter answers, counts ------------------------------------------------------------
@pytest.mark.parametrize("choices, target, prediction, right", [
    (["1", "-1", "0", "5"], "-1", "1", 0.0),
    (["1", "-1", "0", "5"], "-1", "-1", 1.0),
    (["C", "C++", "Go", "Rust"], "C++", "C", 0.0),
    (["C", "C++", "Go", "Rust"], "C++", "C++", 1.0),
    (["1 2", "1/2", "2", "0"], "1/2", "1 2", 0.0),
    (["1 2", "1/2", "2", "0"], "1/2", "The answer is 1/2.", 1.0),
    (["True", "False", "True"], "True", "True", 1.0),  # duplicates: the same text is the same answer
    (["C", "C++", "Java", "Python"], "Java", "The answer is C++", 0.0),  # not the letter C (Java)
    (["C", "C++", "Java", "Python"], "C++", "The answer is C++", 1.0),
    (["C", "C++", "Java", "Python"], "C", "The answer is C.", 1.0),
])
def test_choices_that_differ_only_in_punctuation_are_different_answers(choices, target, prediction, right):
    """Punctuation turned into spaces made '1' and '-1' one answer: a wrong pick counted as right."""
    from test_metrics_text import run, sample

    result = run(["accuracy"], [prediction], [sample(0, choices=choices, target=target)])
    assert result.values["accuracy"] == right


@pytest.mark.parametrize("row, said", [
    ({"messages": [{"role": "user", "content": "  "}], "target": "x"}, "messages[0].content: empty"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}], "target": "x"},
     "messages[0].content: empty"),
    ({"messages": [{"role": "system", "content": "be brief"}], "target": "x"},
     "messages: the last turn is the system's"),
    ({"messages": [{"role": "user", "content": "q"}], "target": " "}, "target: empty"),
    ({"messages": [{"role": "user", "content": "q"}], "choices": ["London", "", "Paris"], "target": "Paris"},
     "choices[1]: empty"),
    ({"messages": [{"role": "user", "content": "q"}], "choices": ["Berlin"], "target": "Berlin"},
     "choices: expected 2 to 26 choices"),
    ({"messages": [{"role": "user", "content": "q"}], "choices": [f"opt{i}" for i in range(30)], "target": "opt28"},
     "choices: expected 2 to 26 choices"),
], ids=["blank", "blank-part", "system-last", "blank-target", "blank-choice", "one-choice", "30-choices"])
def test_a_row_no_model_can_answer_or_be_scored_on_is_refused_with_file_and_line(tmp_path, row, said):
    from evaluator.benchmarks.registry import load_benchmark
    from evaluator.common.errors import EvaluatorError

    good = {"id": "ok", "messages": [{"role": "user", "content": "q"}], "target": "x"}
    data = tmp_path / "ds"
    data.mkdir()
    (data / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"id": "bad", **row}) + "\n")
    (data / "metadata.json").write_text(json.dumps({"dataset_id": "d"}))
    with pytest.raises(EvaluatorError) as e:
        load_benchmark("dataset", str(data))
    assert f"test.jsonl:2: {said}" in str(e.value)


def test_x100_prints_rates_x100_and_counts_as_they_are():
    from evaluator.common.scale import scaled

    assert scaled(0.612, 100, "accuracy") == pytest.approx(61.2)
    assert scaled(0.25, 100, "unparsed_rate") == 25.0
    for count in ("n", "mmau_pro_if_unknown", "judged", "judge_errors", "mmau_pro_embed_no_answer", "mmau.judged"):
        assert scaled(3.0, 100, count) == 3.0
    assert scaled(7.5, 100, "score") == 7.5  # an LLM judge's 1-10 score


def test_a_judged_category_counts_all_its_samples_whichever_metric_comes_last():
    """mmau_pro_judge wrote n = its judged samples into per_category, over exact_match's n when it came last."""
    from evaluator.benchmarks.dataset import Sample
    from evaluator.stages.evaluation.metrics import MetricInput, compute
    from test_mmau_pro import ChatServer

    samples = [Sample(id=f"o{i}", messages=[{"role": "user", "content": "q"}], target="A busy street.",
                      category="open", metadata={"question": "Describe the scene."}) for i in range(3)]
    with ChatServer(lambda body: "Reasoning: ok.\nJudgement: Yes",
                    refuse=lambda body: "Model Response: refused" in body["messages"][0]["content"]) as server:
        options = {"mmau_pro_judge": {"base_url": server.base_url, "model": "j", "max_retries": 0,
                                      "max_failure_rate": 0.5}}
        for order in (["mmau_pro_judge", "exact_match"], ["exact_match", "mmau_pro_judge"]):
            result = compute(order, MetricInput(["A busy street.", "x", "refused"], samples, [True] * 3, options, ""))
            assert result.per_category["open"]["n"] == 3, (order, result.per_category)
            assert result.per_category["open"]["exact_match"] == pytest.approx(1 / 3)


def test_a_prompt_longer_than_the_models_positions_fails_alone_saying_so(tmp_path, tiny_lm):
    """GPT-2 failed every sample of the batch with IndexError (and on CUDA a device assert); a RoPE model ran past
    its positions and the answer was scored as if nothing were wrong."""
    data = canonical_dataset(tmp_path / "long", [
        {"id": "long", "messages": [{"role": "user", "content": "The cat sat on the mat. " * 60}], "target": "x"},
        {"id": "short", "messages": [{"role": "user", "content": "hi"}], "target": "x"}], metrics=["exact_match"])
    proc = bench_py("run", data, "--model", tiny_lm("gpt2"), "--output-root", str(tmp_path / "out"),
                    "--param", "max_new_tokens=4", "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for path in (tmp_path / "out").rglob("predictions.jsonl"):
        rows = {r["sample_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert rows["short"]["status"] == "ok" and rows["long"]["status"] == "error"
    assert "max_new_tokens 4 > the model's" in rows["long"]["error"]["message"]
    assert "positions (max_position_embeddings)" in rows["long"]["error"]["message"]


@pytest.mark.parametrize("value, on", [("False", False), ("off", False), ("NO", False), ("0", False), (False, False),
                                       ("true", True), ("On", True), (1, True)])
def test_switch_options_read_the_usual_spellings_of_on_and_off(value, on):
    """'False' and 'off' (from --backend-opt k=v) were read as on: the chat template stayed on."""
    from evaluator.stages.common import option_on

    assert option_on({"chat_template": value}, "chat_template") is on


def test_a_switch_or_choice_scoring_value_that_means_nothing_is_refused_before_loading():
    from evaluator.stages.inference.backends import option_problems

    problems = dict(option_problems("hf", {"chat_template": "maybe", "choice_scoring": "LOGLIKELIHOOD"}))
    assert problems == {"chat_template": "expected true or false, got 'maybe'",
                        "choice_scoring": "expected generate or loglikelihood, got 'LOGLIKELIHOOD'"}


def test_bench_py_run_refuses_data_its_metrics_cannot_score_before_the_model_loads(tmp_path):
    """A gold that is not one of its choices, or accuracy on rows without choices, surfaced only after inference
    had run on every sample."""
    mc = canonical_dataset(tmp_path / "mc", [{"id": "a", "messages": [{"role": "user", "content": "color?"}],
                                              "choices": ["red", "blue"], "target": "purple"}], metrics=["accuracy"])
    qa = canonical_dataset(tmp_path / "qa", [{"id": "q", "messages": [{"role": "user", "content": "hi"}],
                                              "target": "x"}], metrics=["accuracy"])
    for data, said in ((mc, "target 'purple' is neither one of its choices"),
                       (qa, "metric 'accuracy' needs 'choices' on every sample")):
        proc = bench_py("run", data, "--model", str(tmp_path / "no-model"), "--output-root", str(tmp_path / "out"))
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "[inference]" not in proc.stderr  # no stage started


# ---- selection and scheduling ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_held_benchmarks_backlog_does_not_starve_the_others_of_the_run(tmp_path):
    """Dispatch read the oldest 65 pending rows of a run and only then dropped the held ones: once those were all
    held, a newer runnable row was never read and --once never ended."""
    root = tmp_path / "ckpt"
    for it in range(1000, 69000, 1000):
        megatron_checkpoint(root, it)
    cfg = write_config(tmp_path, [bench("mc"), dict(bench("zz"), dataset=str(tmp_path / "not-mounted"))],
                       recorder=LOCAL, executor={"inference_concurrency": 2, "evaluation_concurrency": 2})
    proc = run_cli("--config", cfg, "--once", timeout=600)
    assert proc.returncode == 1 and "benchmark zz held with 68 job(s) waiting" in proc.stderr, proc.stderr[-3000:]
    states = [r["state"] for r in ledger_rows(tmp_path / "cache") if r["benchmark"] == "mc"]
    assert states == ["recorded"] * 68


def test_end_iteration_waits_for_a_checkpoint_saved_after_a_newer_one_and_for_a_benchmark_added_since(tmp_path):
    """Iterations on disk with no row yet were taken for 'never saved' because the run had a later row: the daemon
    exited 0 at once and they were never evaluated."""
    root = tmp_path / "ckpt"
    megatron_checkpoint(root, 1000)
    megatron_checkpoint(root, 3000)
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    run_cli("--config", cfg, "--once", check=0)
    megatron_checkpoint(root, 2000, tracker=False)  # an older save that landed after the newer one
    proc = run_cli("--config", cfg, "--end-iteration", "3000", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")} == {
        1000: "recorded", 2000: "recorded", 3000: "recorded"}
    cfg = write_config(tmp_path, [bench("qa"), bench("mc")], recorder=LOCAL)  # a benchmark added since
    proc = run_cli("--config", cfg, "--end-iteration", "3000", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted((r["iteration"], r["state"]) for r in ledger_rows(tmp_path / "cache") if r["benchmark"] == "mc") \
        == [(1000, "recorded"), (2000, "recorded"), (3000, "recorded")]


def test_end_iteration_exits_1_when_a_job_in_the_range_failed_for_good(tmp_path):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_mode="crash")], recorder=LOCAL)
    proc = run_cli("--config", cfg, "--end-iteration", "1000", timeout=120)
    assert proc.returncode == 1 and "--end-iteration: 1 job(s) failed" in proc.stderr, proc.stderr[-3000:]


def test_runs_take_turns_when_one_slot_serves_them_all(tmp_path):
    """With one slot, the lowest iteration of any run won every pass: run b waited for all of run a."""
    from conftest import invocations

    for it in range(1000, 7000, 1000):
        megatron_checkpoint(tmp_path / "a", it)
    for it in (100000, 101000):
        megatron_checkpoint(tmp_path / "b", it)
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL,
                       watch={"paths": [{"path": str(tmp_path / "a"), "name": "a"},
                                        {"path": str(tmp_path / "b"), "name": "b"}]},
                       executor={"inference_concurrency": 1, "evaluation_concurrency": 1})
    run_cli("--config", cfg, "--once", check=0, timeout=300)
    started = {(run, it): invocations(tmp_path / "cache", it, "qa", run=run)[0]["start"]
               for run, its in (("a", range(1000, 7000, 1000)), ("b", (100000, 101000))) for it in its}
    assert started[("b", 100000)] < started[("a", 3000)] and started[("b", 101000)] < started[("a", 4000)]


def test_dry_run_plans_a_row_an_earlier_selection_skipped_that_this_one_takes(tmp_path):
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    run_cli("--config", cfg, "--once", "--begin-iteration", "3000", check=0)
    plan = run_cli("--config", cfg, "--dry-run", "--json", "--begin-iteration", "1000", check=0)
    planned = sorted(j["iteration"] for j in json.loads(plan.stdout))
    run_cli("--config", cfg, "--once", "--begin-iteration", "1000", check=0)
    assert planned == [1000, 2000]
    assert {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")} == {
        1000: "recorded", 2000: "recorded", 3000: "recorded"}


def test_a_checkpoint_that_comes_back_after_it_vanished_is_evaluated_then(tmp_path, daemons):
    """It stayed `vanished` for good, silently, though it was never evaluated and is on disk again."""
    import shutil

    from conftest import wait_until

    root = tmp_path / "ckpt"
    megatron_checkpoint(root, 1000)
    path = megatron_checkpoint(root, 2000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=4.0)], recorder=LOCAL,
                       watch={"snapshot": "none", "vanish_grace_seconds": 1},
                       executor={"inference_concurrency": 1})
    d = daemons(cfg)

    def state(it):
        return {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")}.get(it)
    wait_until(lambda: state(1000) == "inferring" and state(2000) == "pending", timeout=60, what="2000 admitted")
    shutil.move(path, tmp_path / "aside")  # gone while 1000 is evaluated
    wait_until(lambda: state(2000) == "vanished", timeout=60, what="2000 vanished")
    shutil.move(tmp_path / "aside", path)  # restored
    wait_until(lambda: state(2000) == "recorded", timeout=60, what="2000 evaluated once it is back")
    assert "the checkpoint is back" in d.log()
    assert sorted(h["iteration"] for h in history(tmp_path / "cache")) == [1000, 2000]


def test_an_empty_system_message_before_the_question_is_accepted(tmp_path):
    """Exported datasets often carry an empty system turn; only the turn the model answers must say something."""
    from evaluator.benchmarks.registry import load_benchmark

    data = canonical_dataset(tmp_path / "ds", [{"id": "1", "messages": [{"role": "system", "content": ""},
                                                                         {"role": "user", "content": "q"}],
                                                "target": "x"}])
    assert [s.id for s in load_benchmark("dataset", data).samples] == ["1"]


def test_end_iteration_counts_only_the_failures_of_its_range(tmp_path):
    root = tmp_path / "ckpt"
    megatron_checkpoint(root, 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_mode="crash")], recorder=LOCAL)
    run_cli("--config", cfg, "--once", check=1)  # 1000 failed for good
    megatron_checkpoint(root, 2000)
    cfg = write_config(tmp_path, [bench("qa")], recorder=LOCAL)
    proc = run_cli("--config", cfg, "--begin-iteration", "2000", "--end-iteration", "2000", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_bench_py_run_fails_only_the_benchmark_whose_data_its_metrics_cannot_score(tmp_path, tiny_lm):
    """The check before the model loads must not fail the neighbours (one benchmark's bad spec fails alone)."""
    mc = canonical_dataset(tmp_path / "mc", [{"id": "a", "messages": [{"role": "user", "content": "color?"}],
                                              "choices": ["red", "blue"], "target": "purple"}], metrics=["accuracy"])
    qa = canonical_dataset(tmp_path / "qa", [{"id": "q", "messages": [{"role": "user", "content": "hi"}],
                                              "target": "x"}], metrics=["exact_match"])
    proc = bench_py("run", mc, qa, "--model", tiny_lm("gpt2"), "--output-root", str(tmp_path / "out"),
                    "--param", "max_new_tokens=2")
    assert proc.returncode == 2 and "target 'purple' is neither one of its choices" in proc.stderr, proc.stderr
    assert list((tmp_path / "out").rglob("qa/metrics.json")) and not list((tmp_path / "out").rglob("mc/metrics.json"))


def test_the_daemon_records_to_wandb_with_a_service_of_its_own_not_one_it_inherited(tmp_path):
    """A daemon started by a process running a W&B service (a trainer, a notebook, a test runner: WANDB_SERVICE in
    its environment) used that service; a daemon killed mid-record left its run open there, and every later daemon
    failed with 'run ID ... is in use' (found by the clean-clone CI's chaos test). Here a real wandb process holds
    the run open in its service, as the killed daemon's did."""
    import signal

    from recorder.wandb_sink import run_id

    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")], recorder={"sinks": ["wandb"], "plots": False},
                       wandb={"mode": "offline", "dir": str(tmp_path / "wb")})
    holder_code = ("import os, sys, time, wandb\n"
                   f"r = wandb.init(mode='offline', dir={str(tmp_path / 'held')!r}, project='test', "
                   f"id={run_id('test', 'tiny')!r})\n"
                   "print(os.environ['WANDB_SERVICE'], flush=True)\n"
                   "time.sleep(300)\n")
    (tmp_path / "held").mkdir()
    holder = subprocess.Popen([DAEMON_PY, "-c", holder_code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        service = holder.stdout.readline().strip()
        assert service, "the holder's wandb service did not start"
        proc = subprocess.run([DAEMON_PY, os.path.join(ROOT, "tools", "evaluator.py"), "--config", cfg, "--once"],
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, WANDB_SERVICE=service))
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 0 and "is in use" not in proc.stderr, proc.stderr[-3000:]
    assert {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")} == {1000: "recorded"}


def test_results_of_a_run_no_longer_configured_do_not_hold_a_changed_benchmark(tmp_path, venvs):
    """Runs a and b evaluated qa; b finished and left the config; then qa's settings changed. `rerun --benchmark qa`
    restarts a's results and refuses b's (not configured); yet b's old results kept qa held for every configured
    run (exit 2, "settings changed"), and only invalidating them (dropping them from b's curves) let it go."""
    for run in ("a", "b"):
        megatron_checkpoint(tmp_path / run, 1000)

    def config(runs, evaluation_extra=""):
        qa = {"name": "qa", "type": "command", "inference": fake("infer"), "evaluation": fake("eval") + evaluation_extra}
        return write_config(tmp_path, [qa], watch={"paths": [{"path": str(tmp_path / r), "name": r} for r in runs]})

    run_cli("--config", config(["a", "b"]), "--once", check=0)
    cfg = config(["a"], " --sleep 0.01")  # qa's evaluation changed
    held = run_cli("--config", cfg, "--once")
    assert held.returncode == 2 and "held" in held.stderr  # a's results were made with the old settings
    run_cli("rerun", "--config", cfg, "--benchmark", "qa")  # restarts a's; b's are refused (not configured)
    run_cli("--config", cfg, "--once", check=0)
    rows = {(r["run"], r["benchmark"]): r["state"] for r in ledger_rows(tmp_path / "cache")}
    assert rows == {("a", "qa"): "recorded", ("b", "qa"): "recorded"}


def test_rerun_finds_checkpoints_whose_run_folder_moved(tmp_path, venvs):
    """The run folder moved (storage reorganised) and the config points at the new place; then a benchmark's
    settings changed. `rerun` checked each recorded row's old path and refused every one ("checkpoint no longer on
    disk"), leaving the benchmark held. It must find them where the configured run's layout finds them now."""
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)

    def config(root, evaluation_extra=""):
        qa = {"name": "qa", "type": "command", "inference": fake("infer"), "evaluation": fake("eval") + evaluation_extra}
        return write_config(tmp_path, [qa], watch={"paths": [str(tmp_path / root)]})

    run_cli("--config", config("ckpt"), "--once", check=0)
    os.rename(tmp_path / "ckpt", tmp_path / "moved")
    cfg = config("moved", " --sleep 0.01")
    proc = run_cli("rerun", "--config", cfg, "--benchmark", "qa")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = ledger_rows(tmp_path / "cache")
    assert {r["path"] for r in rows} == {str(tmp_path / "moved" / f"iter_{it:07d}") for it in (1000, 2000)}
    run_cli("--config", cfg, "--once", check=0)
    assert {(r["iteration"], r["state"], r["revision"]) for r in ledger_rows(tmp_path / "cache")} == {
        (1000, "recorded", 1), (2000, "recorded", 1)}


def test_a_sink_added_later_is_said_to_lack_the_results_recorded_before_it(tmp_path, venvs):
    """The daemon records each result to the sinks configured when it is scored; a sink added afterwards never
    receives the earlier ones. That was silent (an empty W&B project, with the curves in history.jsonl); the start
    now says how many it lacks and, for W&B, how to add them."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    run_cli("--config", write_config(tmp_path, [bench("qa")], recorder={"plots": False}), "--once", check=0)
    megatron_checkpoint(tmp_path / "ckpt", 2000)
    cfg = write_config(tmp_path, [bench("qa")], recorder={"sinks": ["local", "wandb"], "plots": False},
                       wandb={"mode": "offline", "dir": str(tmp_path / "wb")})
    proc = run_cli("--config", cfg, "--once", check=0)
    assert "sink wandb: 1 result(s) recorded before it was configured are not in it" in proc.stderr, proc.stderr
    assert "wandb_writer.py" in proc.stderr
    again = run_cli("--config", cfg, "--once", check=0)
    assert "sink wandb: 1 result(s)" in again.stderr  # still missing: said at every start
    assert "sink local:" not in again.stderr
