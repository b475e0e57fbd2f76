"""`tools/wandb_writer.py` end to end: a real subprocess, no API key, W&B offline files read back."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import time

import pytest
import yaml

from conftest import DAEMON_PY, ROOT
from test_recorder_sources import write_helm, write_result
from test_recorder_wandb import history, wandb_runs

WRITER = os.path.join(ROOT, "tools", "wandb_writer.py")


def writer(cfg, *args, timeout=180):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no API key: auto -> offline
    return subprocess.run([DAEMON_PY, WRITER, "--config", str(cfg), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def config(tmp_path, **top):
    path = tmp_path / "recorder.yaml"
    path.write_text(yaml.safe_dump(top, sort_keys=False))
    return path


def files_under(path):
    return sorted(p for p in glob.glob(os.path.join(str(path), "**"), recursive=True))


def results_tree(tmp_path):
    root = tmp_path / "cache" / "results"
    for it in (3000, 1000, 2000):  # written out of order
        write_result(root, "tiny", it, "qa", {"acc": it / 10000, "f1": 0.5}, tokens_b=it * 0.002)
        time.sleep(0.01)
    return root


def test_print_only_prints_every_iteration_and_writes_nothing_then_a_real_run_logs_them_offline(tmp_path):
    root = results_tree(tmp_path)
    cfg = config(tmp_path, project="proj", evals=[{"eval_type": "native", "model_name": "tiny", "source": "results",
                                                   "results_dir": str(root)}])
    before = files_under(tmp_path)
    proc = writer(cfg, "--print-only")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "| iteration | tokens (B) | qa/acc | qa/f1 |" in lines
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 1000 | 2 | 0.1 | 0.5 |", "| 2000 | 4 | 0.2 | 0.5 |", "| 3000 | 6 | 0.3 | 0.5 |"]
    assert files_under(tmp_path) == before, "--print-only must touch nothing"

    proc = writer(cfg)
    assert proc.returncode == 0, proc.stderr
    assert "W&B (offline)" in proc.stdout and "wandb sync" in proc.stdout
    wandb_dir = tmp_path / "cache" / "wandb"  # beside the results tree: the daemon's <cache_dir>/wandb
    assert [(r["iteration"], r["qa/acc"]) for r in history(wandb_dir)] == [(1000, 0.1), (2000, 0.2), (3000, 0.3)]
    assert all(os.path.basename(os.path.dirname(r["path"])).startswith("offline-run-") for r in wandb_runs(wandb_dir))

    proc = writer(cfg)  # again: idempotent, nothing logged twice
    assert proc.returncode == 0, proc.stderr
    assert len(history(wandb_dir)) == 3


def test_backfill_adds_only_what_the_daemons_run_does_not_have(tmp_path):
    from recorder.sinks import MlflowSettings, RecorderSettings, ResultRecord, WandbSettings
    from recorder.wandb_sink import WandbSink

    root = results_tree(tmp_path)
    daemon_side = RecorderSettings(cache_dir=str(tmp_path / "cache"), project="proj", mlflow=MlflowSettings("", ""),
                                   wandb=WandbSettings(project="proj", mode="offline", dir=str(tmp_path / "cache" / "wandb")))
    WandbSink(daemon_side).record(ResultRecord(run="tiny", iteration=2000, benchmark="qa", metrics={"acc": 0.2, "f1": 0.5}))
    cfg = config(tmp_path, project="proj", evals=[{"model_name": "tiny", "source": "results", "results_dir": str(root)}])
    proc = writer(cfg)
    assert proc.returncode == 0, proc.stderr
    assert [r["iteration"] for r in history(tmp_path / "cache" / "wandb")] == [2000, 1000, 3000]


def test_a_backfill_of_many_results_writes_one_offline_session_not_one_per_result(tmp_path):
    root = results_tree(tmp_path)
    cfg = config(tmp_path, project="proj", evals=[{"model_name": "tiny", "source": "results", "results_dir": str(root)}])
    proc = writer(cfg)
    assert proc.returncode == 0, proc.stderr
    assert len(wandb_runs(tmp_path / "cache" / "wandb")) == 1
    assert [(r["iteration"], r["_step"]) for r in history(tmp_path / "cache" / "wandb")] == [(1000, 0), (2000, 1), (3000, 2)]


def test_helm_summary_only_logs_the_headline_metric_only(tmp_path):
    write_helm(tmp_path / "helm")
    cfg = config(tmp_path, project="proj", base_url=None, evals=[{
        "eval_type": "helm", "model_name": "proj-llama", "source": "helm", "helm_output_dir": str(tmp_path / "helm"),
        "helm_suite_name": "proj-llama", "token_per_iteration": 0.5,
        "benchmarks": [{"name": "mmlu", "metrics": ["EM"]}, {"name": "boolq", "metrics": ["EM"]}]}])
    proc = writer(cfg, "--summary-only")
    assert proc.returncode == 0, proc.stderr
    rows = history(tmp_path / "wandb")  # W&B folder beside the config for a HELM source
    got = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    assert got == [{"iteration": 1000, "tokens_b": 500, "mmlu/EM": 0.3},
                   {"iteration": 2000, "tokens_b": 1000, "mmlu/EM": 0.4},
                   {"iteration": 2000, "tokens_b": 1000, "boolq/EM": 0.7}]


def test_leaderboard_from_two_sources_with_hand_computed_scores_and_a_bar_chart(tmp_path):
    root = tmp_path / "cache" / "results"
    write_result(root, "tiny", 1000, "mmlu", {"EM": 0.30})
    write_result(root, "tiny", 1000, "boolq", {"EM": 0.60})
    write_result(root, "tiny", 2000, "mmlu", {"EM": 0.40})
    write_result(root, "tiny", 2000, "boolq", {"EM": 0.70})
    cfg = config(tmp_path, project="proj", output_dir="board", sinks=["wandb"], evals=[
        {"model_name": "tiny", "source": "results", "results_dir": str(root)},
        {"eval_type": "helm", "model_name": "llama-7b", "source": "file", "token_num": 1000,
         "eval_result": {"mmlu": {"EM": 0.50}, "boolq": {"EM": 0.62}}},
        {"model_name": "debug", "source": "file", "eval_result": {"mmlu": {"EM": 0.99}}}],
        leaderboard=True, leaderboard_metrics=["mmlu.EM", "boolq.EM"], excluded_runs=["debug"])
    proc = writer(cfg)
    assert proc.returncode == 0, proc.stderr
    board = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    # mmlu 0.30 0.40 0.50 -> 0 0.5 1; boolq 0.60 0.70 0.62 -> 0 1 0.2 (debug excluded)
    assert [(e["label"], round(e["score"], 9)) for e in board] == [("tiny@2000", 1.5), ("llama-7b", 1.2),
                                                                   ("tiny@1000", 0.0)]
    png = (tmp_path / "board" / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 3000
    assert "| 1 | tiny | 2000 |" in proc.stdout
    board_runs = [r for r in wandb_runs(tmp_path / "board" / "wandb") if r["name"] == "leaderboard"]
    assert len(board_runs) == 1 and board_runs[0]["rows"][0]["leaderboard/table/_type"] == "table-file"


def test_config_errors_name_the_file_line_and_key_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("project: p\nevals:\n  - model_name: m\n    source: helm\n    helm_suite: s\n")
    proc = writer(cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{cfg}:5: evals[0].helm_suite: unknown key; did you mean 'helm_suite_name'?" in proc.stderr
    cfg.write_text("project: p\nevals:\n  - model_name: m\n    source: helm\n")
    proc = writer(cfg)
    assert proc.returncode == 2 and "evals[0].helm_output_dir: source: helm needs `helm_output_dir`" in proc.stderr
    cfg.write_text("auto_eval:\n  project_name: p\n")
    proc = writer(cfg)
    assert proc.returncode == 2 and "this is a daemon config" in proc.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "recorder", "*.yaml"))),
                         ids=os.path.basename)
def test_example_recorder_configs_load(path):
    from recorder.writer import load_writer_config

    cfg = load_writer_config(path)
    assert cfg.project and (cfg.evals or cfg.leaderboard)


def test_a_backfill_after_a_rerun_logs_the_new_revision_once_and_keeps_fingerprint_out_of_the_metrics(tmp_path):
    root = tmp_path / "cache" / "results"
    write_result(root, "tiny", 1000, "qa", {"acc": 0.1}, fingerprint="ab12", revision=0)
    write_result(root, "tiny", 2000, "qa", {"acc": 0.2}, fingerprint="ab12", revision=0)
    cfg = config(tmp_path, project="proj", sinks=["wandb", "local"], output_dir=str(tmp_path / "cache"),
                 evals=[{"model_name": "tiny", "source": "results", "results_dir": str(root)}])
    assert writer(cfg).returncode == 0
    write_result(root, "tiny", 2000, "qa", {"acc": 0.25}, fingerprint="cd34", revision=1)  # what a rerun leaves
    for _ in range(2):  # the second time: nothing new
        proc = writer(cfg)
        assert proc.returncode == 0, proc.stderr
    rows = history(tmp_path / "cache" / "wandb")
    assert [(r["iteration"], r["qa/acc"], r.get("qa/revision"), r["qa/fingerprint"]) for r in rows] == [
        (1000, 0.1, None, "ab12"), (2000, 0.2, None, "ab12"), (2000, 0.25, 1, "cd34")]
    local = [json.loads(x) for x in (tmp_path / "cache" / "results" / "tiny" / "history.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["metrics"], r["revision"]) for r in local] == [
        (1000, {"acc": 0.1}, 0), (2000, {"acc": 0.25}, 1)]


# ---- read everything, then write (probe of 2026-12-02) -------------------------------------------------------
@pytest.mark.parametrize("second", [
    {"evals": [{"model_name": "second", "source": "results", "results_dir": "./nope"}]},
    {"leaderboard": True, "leaderboard_metrics": ["zz.acc"]},
], ids=["an-eval-that-cannot-be-read", "a-leaderboard-that-cannot-be-built"])
def test_a_writer_that_fails_on_a_later_eval_or_its_leaderboard_has_written_nothing(tmp_path, second):
    first = {"model_name": "first", "source": "file", "eval_result": {"qa": {"acc": 0.9}}}
    cfg = config(tmp_path, project="p", sinks=["local"],
                 **{**second, "evals": [first] + second.get("evals", [])})
    before = files_under(tmp_path)
    proc = writer(cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert files_under(tmp_path) == before, "eval 1 was written before eval 2 or the leaderboard failed"


def test_two_results_of_one_model_iteration_and_benchmark_are_refused_naming_both(tmp_path):
    one = {"model_name": "m", "source": "file", "eval_result": {"qa": {"acc": 0.2}}}
    cfg = config(tmp_path, project="p", sinks=["local"], leaderboard=True, leaderboard_metrics=["qa.acc"],
                 evals=[one, {**one, "eval_result": {"qa": {"acc": 0.9}}}])
    before = files_under(tmp_path)
    proc = writer(cfg)  # the sinks kept the first (0.2), the leaderboard ranked the last (0.9)
    assert proc.returncode == 2, proc.stderr
    assert "two results for model 'm' iteration 0 benchmark 'qa': evals[0] (file) and evals[1] (file)" in proc.stderr
    assert files_under(tmp_path) == before


def test_results_folders_iter_100_and_iter_0000100_are_one_iteration_twice_and_refused(tmp_path):
    for name, acc in (("iter_0000100", 0.5), ("iter_100", 0.1)):
        (tmp_path / "tree" / "m" / name / "qa").mkdir(parents=True)
        (tmp_path / "tree" / "m" / name / "qa" / "metrics.json").write_text(json.dumps({"metrics": {"acc": acc}}))
    cfg = config(tmp_path, project="p", sinks=["local"],
                 evals=[{"model_name": "m", "source": "results", "results_dir": str(tmp_path / "tree")}])
    proc = writer(cfg)
    assert proc.returncode == 2 and "iteration 100 benchmark 'qa'" in proc.stderr
    assert "iter_0000100/qa/metrics.json" in proc.stderr and "iter_100/qa/metrics.json" in proc.stderr


def test_inline_results_take_numbers_as_written_and_refuse_true_or_a_quoted_number(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("project: p\nsinks: [local]\nevals:\n  - model_name: m\n    source: file\n"
                   "    eval_result: {qa: {acc: true, f1: 1e-3}}\n")
    proc = writer(cfg)  # pydantic's float read true as 1.0
    assert proc.returncode == 2 and "evals[0].eval_result.qa: metrics.acc: expected a number, got True" in proc.stderr
    cfg.write_text(cfg.read_text().replace("acc: true", "acc: '0.5'"))
    proc = writer(cfg)
    assert proc.returncode == 2 and "metrics.acc: expected a number, got '0.5'" in proc.stderr
    cfg.write_text(cfg.read_text().replace("acc: '0.5'", "acc: 5e-1"))  # YAML 1.1 reads 5e-1 as a string
    proc = writer(cfg)
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "results" / "m" / "history.jsonl").read_text().splitlines()[-1])
    assert row["metrics"] == {"acc": 0.5, "f1": 0.001}


@pytest.mark.parametrize("top, message", [
    ({"sinks": []}, "sinks: no sink to write the evals to"),
    ({"sinks": ["local", "local"]}, "sinks[1]: 'local' is listed twice"),
    ({"sinks": ["local"], "leaderboard": True, "leaderboard_metrics": []}, "leaderboard_metrics: list should have at least 1 item"),
], ids=["no-sink", "a-sink-twice", "no-leaderboard-metric"])
def test_a_writer_config_that_would_quietly_do_nothing_or_something_else_is_refused(tmp_path, top, message):
    cfg = config(tmp_path, project="p", evals=[{"model_name": "m", "source": "file", "eval_result": {"qa": {"acc": 1}}}],
                 **top)
    proc = writer(cfg)
    assert proc.returncode == 2 and message in proc.stderr.lower(), proc.stderr


def test_a_metric_near_the_float_limit_is_recorded_and_its_curve_drawn_without_it(tmp_path):
    cfg = config(tmp_path, project="p", sinks=["local"],
                 evals=[{"model_name": "m", "source": "file", "eval_result": {"qa": {"x": 1e308, "acc": 0.5}}}])
    proc = writer(cfg)  # matplotlib raised "arange: cannot compute length": curves.png and summary.md not written
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results" / "m" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "results" / "m" / "history.jsonl").read_text())["metrics"]["x"] == 1e308


def test_a_helm_benchmark_name_is_checked_as_the_folder_name_it_becomes(tmp_path):
    cfg = config(tmp_path, project="p", sinks=["local"],
                 evals=[{"model_name": "m", "source": "helm", "helm_output_dir": ".", "helm_suite_name": "s",
                         "benchmarks": [{"name": "../../escaped", "metrics": ["EM"]}]}])
    proc = writer(cfg)
    assert proc.returncode == 2 and "evals[0].benchmarks[0].name: expected letters, digits" in proc.stderr, proc.stderr
