"""The recorder inside a real daemon: real stages, real W&B offline files, a real MLflow store."""
from __future__ import annotations

import sqlite3

import pytest

from conftest import (bench, daemons, history, ledger_rows, megatron_checkpoint, run_cli, venvs,  # noqa: F401
                      wait_until, write_config)
from test_recorder_wandb import history as wandb_history

pytestmark = pytest.mark.slow
ALL_SINKS = {"recorder": {"sinks": ["local", "wandb", "mlflow"]}, "wandb": {"mode": "offline"}}


def mlflow_steps(cache, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cache}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.run_name for r in runs] == ["tiny"]
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))


def states(cache):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}


def random_metric_with_wandb_blocked(tmp_path, sinks: dict):
    """Iteration 1000 with a `command` benchmark scoring random.random() (a second scoring gives another number),
    and W&B unable to record (<cache_dir>/wandb is a file: a real fault) until `blocker` is unlinked;
    returns (cfg, cache, blocker)."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cache = tmp_path / "cache"
    cache.mkdir()
    blocker = cache / "wandb"
    blocker.write_text("in the way")
    sample = "{python} -c \"import json, random; json.dump({{'acc': random.random()}}, open('metrics.json', 'w'))\""
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": "true", "evaluation": sample}],
                       executor={"backoff_seconds": 0.3}, **sinks)
    return cfg, cache, blocker


def test_a_sink_that_fails_several_times_then_recovers_records_each_result_exactly_once(tmp_path, venvs, daemons):
    """Fault injected for real: <cache_dir>/wandb is a regular file, so the W&B sink cannot write; then it is removed."""
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cache = tmp_path / "cache"
    cache.mkdir()
    blocker = cache / "wandb"
    blocker.write_text("in the way")
    cfg = write_config(tmp_path, [bench("qa")], executor={"backoff_seconds": 0.3},
                       megatron={"token_per_iteration": 0.002}, **ALL_SINKS)
    d = daemons(cfg)
    # each (result, sink) backs off on its own: the local sink takes both results while W&B keeps failing
    wait_until(lambda: d.log().count("recorder wandb:") >= 3 and [h["iteration"] for h in history(cache)] == [1000, 2000],
               timeout=120, what="three failed W&B attempts and both results in the local history")
    assert states(cache) == {(1000, "qa"): "scored", (2000, "qa"): "scored"}  # kept, not lost, not recorded
    blocker.unlink()
    wait_until(lambda: set(states(cache).values()) == {"recorded"}, timeout=120, what="recorded after recovery")
    assert d.stop() == 0
    rows = wandb_history(cache / "wandb")
    # in either order: each (result, sink) retries on its own backoff, and W&B plots by step_metric=iteration
    assert sorted((r["iteration"], r["qa/iteration_k"], r["tokens_b"]) for r in rows) == \
        [(1000, 1.0, 2.0), (2000, 2.0, 4.0)]
    assert mlflow_steps(cache, "qa/iteration_k") == [1000, 2000]
    assert [h["iteration"] for h in history(cache)] == [1000, 2000]
    run_dir = cache / "results" / "tiny"
    assert (run_dir / "curves.png").stat().st_size > 0
    assert "| 2000 | 4 | 2 | 1 |" in (run_dir / "summary.md").read_text()  # iteration, tokens, qa/iteration_k, qa/rows


def test_a_crash_between_sinks_accepting_and_the_ledger_noting_it_duplicates_nothing(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")], **ALL_SINKS)
    run_cli("--config", cfg, "--once", check=0)
    cache = tmp_path / "cache"
    assert states(cache) == {(1000, "qa"): "recorded"}
    # the state a crash right after the sinks accepted leaves behind: scored, no recordings noted
    db = sqlite3.connect(cache / "ledger.sqlite3")
    with db:
        db.execute("UPDATE jobs SET state = 'scored'")
        db.execute("DELETE FROM recordings")
    db.close()
    run_cli("--config", cfg, "--once", check=0)  # a fresh daemon offers the result to every sink again
    assert states(cache) == {(1000, "qa"): "recorded"}
    assert [r["iteration"] for r in wandb_history(cache / "wandb")] == [1000]
    assert mlflow_steps(cache, "qa/iteration_k") == [1000]
    assert [h["iteration"] for h in history(cache)] == [1000]


def test_sink_choice_follows_the_config(tmp_path):
    from evaluator.daemon.config import load_config
    from evaluator.daemon.sink_setup import sink_names

    def names(**top):
        return sink_names(load_config(write_config(tmp_path, [bench("qa")], **top)))

    assert names() == ["local"]  # default: offline-safe, nothing but files in cache_dir
    assert names(wandb={"project": "dj-project"}) == ["local", "wandb"]  # Data-Juicer's wandb: section
    assert names(wandb={"project": "p"}, recorder={"sinks": ["mlflow"]}) == ["local", "mlflow"]  # explicit wins; local stays
    proc = run_cli("--config", write_config(tmp_path, [bench("qa")], recorder={"sinks": ["local", "wandbb"]}), "--dry-run")
    assert proc.returncode == 2 and "unknown sink 'wandbb'" in proc.stderr and "did you mean 'wandb'" in proc.stderr


def test_a_result_whose_metrics_are_lost_after_one_sink_recorded_it_is_scored_again_for_every_sink(
        tmp_path, venvs, daemons):
    """The local sink recorded revision 0, W&B could not yet (<cache_dir>/wandb is a file: a real fault), then
    metrics.json was lost. It was scored again under the same revision: W&B and metrics.json got the second number
    (a judge, sampling), history.jsonl kept the first for ever. Now it is a new revision every sink records."""
    import json
    import os

    cfg, cache, blocker = random_metric_with_wandb_blocked(tmp_path, ALL_SINKS)
    d = daemons(cfg)
    wait_until(lambda: [h["iteration"] for h in history(cache)] == [1000], timeout=120, what="local recorded 1000")
    metrics = cache / "results" / "tiny" / "iter_0001000" / "qa" / "metrics.json"
    first = json.loads(metrics.read_text())["metrics"]["acc"]
    os.unlink(metrics)  # lost (or unreadable) before W&B took it
    wait_until(lambda: "scored again as revision 1" in d.log(), timeout=60, what="scored again")
    blocker.unlink()
    wait_until(lambda: states(cache) == {(1000, "qa"): "recorded"} and ledger_rows(cache)[0]["revision"] == 1,
               timeout=120, what="revision 1 recorded by every sink")
    assert d.stop() == 0
    second = json.loads(metrics.read_text())["metrics"]["acc"]
    assert second != first  # random.random(): the second scoring gave another number
    assert [(h["metrics"]["acc"], h["revision"]) for h in history(cache)] == [(second, 1)]
    assert [r["qa/acc"] for r in wandb_history(cache / "wandb")] == [second]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{cache}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.data.metrics["qa/acc"] == second  # it took revision 0 as well: the newest value is the new one


def test_a_metrics_file_that_cannot_be_read_for_a_while_is_recorded_once_as_it_is_not_scored_again(
        tmp_path, venvs, daemons):
    """The local sink recorded revision 0, W&B could not yet; then metrics.json failed every read with EIO for a
    while (storage trouble: the file is there). That was taken for a lost file and scored again as a new revision,
    so W&B and MLflow got a second point (or a different number) beside the first. A read error of a file that is
    there is a delivery failure with backoff: once the file reads again, every sink records revision 0's number.
    The fault is real: metrics.json is swapped for a symlink to /proc/self/mem, which opens and fails every read
    with EIO."""
    import json
    import os

    sinks = dict(ALL_SINKS, recorder=dict(ALL_SINKS["recorder"], max_failures=100))
    cfg, cache, blocker = random_metric_with_wandb_blocked(tmp_path, sinks)
    d = daemons(cfg)
    wait_until(lambda: [h["iteration"] for h in history(cache)] == [1000], timeout=120, what="local recorded 1000")
    metrics = cache / "results" / "tiny" / "iter_0001000" / "qa" / "metrics.json"
    saved = metrics.read_bytes()
    first = json.loads(saved)["metrics"]["acc"]
    aside = tmp_path / "eio-link"
    os.symlink("/proc/self/mem", aside)
    with pytest.raises(OSError):  # the fault is real on this machine
        with open(aside, "rb") as f:
            f.read(1)
    os.replace(aside, metrics)
    blocker.unlink()
    wait_until(lambda: "Input/output error" in d.log(), timeout=60, what="the daemon meeting the read error")
    assert d.stop() == 0
    d = daemons(cfg)  # a restart's recovery meets the same fault
    wait_until(lambda: "its metrics.json cannot be read now" in d.log(), timeout=60, what="recovery meeting it")
    held = tmp_path / "metrics.json.tmp"
    held.write_bytes(saved)
    os.replace(held, metrics)
    wait_until(lambda: states(cache) == {(1000, "qa"): "recorded"}, timeout=120, what="recorded by every sink")
    assert d.stop() == 0
    assert "scored again" not in d.log()
    assert ledger_rows(cache)[0]["revision"] == 0
    assert json.loads(metrics.read_text())["metrics"]["acc"] == first
    assert [(h["metrics"]["acc"], h["revision"]) for h in history(cache)] == [(first, 0)]
    assert [r["qa/acc"] for r in wandb_history(cache / "wandb")] == [first]
    assert mlflow_steps(cache, "qa/acc") == [1000]
