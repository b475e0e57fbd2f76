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

from conftest import (DAEMON_PY, ROOT, bench, bench_py, canonical_dataset, history, ledger_rows,
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
