"""Operator walls (issue 14) through the real daemon CLI and real stage venvs: a missing dataset holds only its
benchmark, --once says when jobs failed, data that cannot be scored is refused at start, changed settings never
share a curve silently, and `rerun` / `invalidate` do what they say."""
from __future__ import annotations

import json
import os
import shutil

import yaml

from conftest import (bench, canonical_dataset, history, invocations, ledger_rows, megatron_checkpoint, run_cli,
                      wait_until, write_config)


def states(cache):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}


def with_dataset(b: dict, path) -> dict:
    """A command benchmark that names a dataset folder (its presence decides whether it may run)."""
    return {**b, "dataset": str(path)}


def edit_config(cfg: str, change) -> None:
    with open(cfg) as f:
        data = yaml.safe_load(f)
    change(data["auto_eval"])
    with open(cfg, "w") as f:
        yaml.safe_dump(data, f)


def evaluated(tmp_path, iterations=(1000, 2000), **watch):
    """A run with these Megatron checkpoints, evaluated once by `--once` with one command benchmark `qa`."""
    for it in iterations:
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")], watch=watch or None)
    run_cli("--config", cfg, "--once", check=0)
    return cfg, tmp_path / "cache"


def test_a_missing_dataset_holds_only_its_benchmark_while_the_others_run(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa"), with_dataset(bench("later"), tmp_path / "not-mounted")])
    proc = run_cli("--config", cfg, "--once", check=1)
    assert states(tmp_path / "cache") == {(1000, "qa"): "recorded", (1000, "later"): "pending"}
    assert "benchmark later: held" in proc.stderr and "not-mounted does not exist" in proc.stderr
    # the dataset appears: the next run evaluates it, and nothing twice
    os.makedirs(tmp_path / "not-mounted")
    run_cli("--config", cfg, "--once", check=0)
    assert states(tmp_path / "cache") == {(1000, "qa"): "recorded", (1000, "later"): "recorded"}
    assert len(invocations(tmp_path / "cache", 1000, "qa")) == 2  # one inference, one evaluation


def test_a_dataset_that_appears_while_the_daemon_runs_is_picked_up(tmp_path, venvs, daemons):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa"), with_dataset(bench("later"), tmp_path / "not-mounted")])
    d = daemons(cfg)
    wait_until(lambda: states(tmp_path / "cache").get((1000, "qa")) == "recorded", what="qa recorded")
    assert states(tmp_path / "cache")[(1000, "later")] == "pending"
    os.makedirs(tmp_path / "not-mounted")
    wait_until(lambda: states(tmp_path / "cache").get((1000, "later")) == "recorded", what="later recorded")
    assert "benchmark later: can run" in d.log()


def test_no_benchmark_with_its_dataset_exits_3_so_a_service_retries(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [with_dataset(bench("qa"), tmp_path / "not-mounted")])
    proc = run_cli("--config", cfg, "--once", check=3)
    assert "no benchmark can run" in proc.stderr and "not-mounted" in proc.stderr


def test_once_exits_1_when_a_job_failed(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_mode="crash")])
    proc = run_cli("--config", cfg, "--once", check=1)
    assert states(tmp_path / "cache") == {(1000, "qa"): "failed"}
    assert "1 job(s) failed" in proc.stderr


def test_a_dataset_whose_metadata_names_no_metrics_is_refused_before_any_work(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    data = canonical_dataset(tmp_path / "qa-data", [{"id": "1", "messages": [{"role": "user", "content": "1+1"}],
                                                    "target": "2"}])
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": data}])
    for flags in (["--once"], ["--dry-run"]):
        proc = run_cli("--config", cfg, *flags, check=2)
        assert "no metrics to compute" in proc.stderr and "metadata.json" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "cache" / "results")


def test_an_unknown_metric_in_metadata_json_is_refused_with_the_file(tmp_path):
    data = canonical_dataset(tmp_path / "qa-data", [], metrics=["exact_macth"])
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": data}])
    proc = run_cli("--config", cfg, "--dry-run", check=2)
    assert "metadata.json" in proc.stderr and "exact_macth" in proc.stderr and "exact_match" in proc.stderr


def test_changed_settings_hold_the_benchmark_until_the_operator_reruns(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    first = {r["iteration"]: r["fingerprint"] for r in ledger_rows(cache)}
    assert len(set(first.values())) == 1 and None not in first.values()
    metrics = json.loads((cache / "results" / "tiny" / "iter_0001000" / "qa" / "metrics.json").read_text())
    assert metrics["fingerprint"] == first[1000]  # the numbers say which settings made them

    edit_config(cfg, lambda c: c["benchmarks"][0].update(seed=7))  # a setting that changes numbers
    megatron_checkpoint(tmp_path / "ckpt", 3000)
    # its only benchmark held: nothing can run, a config decision (exit 2: a service does not loop on it)
    proc = run_cli("--config", cfg, "--once", check=2)
    assert "settings changed since 2 result(s)" in proc.stderr and "seed: 0 -> 7" in proc.stderr
    assert invocations(cache, 3000, "qa") == []  # not run under new settings beside old ones

    proc = run_cli("rerun", "--config", cfg, "--benchmark", "qa", check=0)
    assert "2 of 2 row(s) queued" in proc.stdout, proc.stdout
    run_cli("--config", cfg, "--once", check=0)
    rows = {r["iteration"]: r for r in ledger_rows(cache)}
    assert {it: r["state"] for it, r in rows.items()} == {1000: "recorded", 2000: "recorded", 3000: "recorded"}
    assert len({r["fingerprint"] for r in rows.values()}) == 1 and rows[1000]["fingerprint"] != first[1000]
    assert (rows[1000]["revision"], rows[3000]["revision"]) == (1, 0)
    # one point per iteration on the local curve, each with the new settings
    hist = history(cache)
    assert sorted(r["iteration"] for r in hist) == [1000, 2000, 3000]
    assert {r["fingerprint"] for r in hist} == {rows[1000]["fingerprint"]}
    old = cache / "results" / "tiny" / "iter_0001000" / "qa" / "superseded" / "rev0" / "metrics.json"
    assert json.loads(old.read_text())["fingerprint"] == first[1000]  # the old result is kept, aside


def test_rerun_of_a_checkpoint_no_longer_on_disk_says_why_and_changes_nothing(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path, snapshot="none")
    shutil.rmtree(tmp_path / "ckpt" / "iter_0001000")
    proc = run_cli("rerun", "--config", cfg, "--iterations", "0-5000", check=1)
    assert "checkpoint no longer on disk" in proc.stdout and "1 of 2 row(s) queued" in proc.stdout
    rows = {r["iteration"]: r for r in ledger_rows(tmp_path / "cache")}
    assert (rows[1000]["state"], rows[1000]["revision"]) == ("recorded", 0)
    assert (rows[2000]["state"], rows[2000]["revision"]) == ("pending", 1)


def test_invalidate_withdraws_a_result_from_the_curve_and_it_is_not_run_again(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    run_cli("invalidate", "--config", cfg, "--iterations", "2000", check=0)
    assert [r["iteration"] for r in history(cache)] == [1000]
    run_cli("--config", cfg, "--once", check=0)
    assert states(cache) == {(1000, "qa"): "recorded", (2000, "qa"): "invalidated"}
    assert len(invocations(cache, 2000, "qa")) == 2  # not evaluated again
    run_cli("rerun", "--config", cfg, "--iterations", "2000", check=0)  # and back
    run_cli("--config", cfg, "--once", check=0)
    assert states(cache)[(2000, "qa")] == "recorded"
    assert sorted(r["iteration"] for r in history(cache)) == [1000, 2000]


def test_rerun_and_invalidate_refuse_unknown_names_and_an_empty_selection(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path, (1000,))
    proc = run_cli("rerun", "--config", cfg, "--benchmark", "qaa", check=2)
    assert "did you mean 'qa'" in proc.stderr
    proc = run_cli("invalidate", "--config", cfg, check=2)
    assert "--run, --iterations and/or --benchmark" in proc.stderr
    proc = run_cli("rerun", "--config", cfg, "--iterations", "3000-1000", check=2)
    assert "--iterations" in proc.stderr


def test_scratch_dir_of_a_command_benchmark_is_deleted_once_the_job_is_final(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    b = bench("conv")
    b["inference"] = "mkdir -p {scratch_dir}/hf && echo weights > {scratch_dir}/hf/model.bin && " + b["inference"]
    cfg = write_config(tmp_path, [b])
    run_cli("--config", cfg, "--once", check=0)
    scratch = tmp_path / "cache" / "scratch" / "tiny" / "iter_0001000" / "conv"
    assert states(tmp_path / "cache") == {(1000, "conv"): "recorded"}
    assert not scratch.exists()
    job = json.loads((tmp_path / "cache" / "results" / "tiny" / "iter_0001000" / "conv" / "infer.job.json").read_text())
    assert job["extra"]["scratch_dir"] == str(scratch)


def hf_checkpoint(root, step: int) -> str:
    path = os.path.join(str(root), f"checkpoint-{step}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"weights")
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    return path


def test_hf_checkpoints_watched_with_the_default_megatron_layout_say_which_layout(tmp_path, venvs):
    for step in (100, 200):
        hf_checkpoint(tmp_path / "ckpt", step)
    cfg = write_config(tmp_path, [bench("qa")], watch={"layout": None})
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "the huggingface layout" in proc.stdout and "--model-type huggingface" in proc.stdout, proc.stdout
    proc = run_cli("--config", cfg, "--once", check=1)  # not a silent exit 0
    assert "the huggingface layout" in proc.stderr


def test_a_watch_path_that_is_a_checkpoint_itself_names_its_parent(tmp_path, venvs):
    path = hf_checkpoint(tmp_path / "out", 300)
    cfg = write_config(tmp_path, [bench("qa")], watch={"paths": [path], "layout": "huggingface"})
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "points at a checkpoint itself" in proc.stdout and str(tmp_path / "out") in proc.stdout


def test_a_watch_path_that_does_not_exist_is_not_silent(tmp_path, venvs):
    cfg = write_config(tmp_path, [bench("qa")], watch={"paths": [str(tmp_path / "ckpts-typo")]})
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "ckpts-typo does not exist" in proc.stdout
    proc = run_cli("--config", cfg, "--once", check=1)
    assert "ckpts-typo does not exist" in proc.stderr


def test_checkpoints_all_outside_the_interval_are_explained_with_the_numbers(tmp_path, venvs):
    for it in (300, 600, 900):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")])  # interval 1000: none of them
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "none selected by begin=1000 interval=1000" in proc.stdout, proc.stdout
    run_cli("--config", cfg, "--once", check=1)
    state = json.loads((tmp_path / "cache" / "daemon.json").read_text())
    assert any("none selected" in h for h in state["hints"]["tiny"])  # what `status` shows


def test_dry_run_says_which_benchmarks_are_held_and_plans_the_others(tmp_path, venvs):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa"), with_dataset(bench("later"), tmp_path / "not-mounted")])
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "planned: 2 job(s)" in proc.stdout and "benchmark later: held (2 job(s) wait)" in proc.stdout
    run_cli("--config", cfg, "--once", check=1)
    edit_config(cfg, lambda c: c["benchmarks"][0].update(seed=3))
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "benchmark qa: held" in proc.stdout and "seed: 0 -> 3" in proc.stdout, proc.stdout


def test_rerun_while_the_daemon_runs_is_picked_up_and_recorded_once(tmp_path, venvs, daemons):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")])
    cache = tmp_path / "cache"
    daemons(cfg)
    wait_until(lambda: set(states(cache).values()) == {"recorded"} and len(states(cache)) == 2, what="recorded")
    run_cli("rerun", "--config", cfg, "--iterations", "2000", check=0)
    wait_until(lambda: {r["iteration"]: (r["state"], r["revision"]) for r in ledger_rows(cache)}
               == {1000: ("recorded", 0), 2000: ("recorded", 1)}, what="the rerun recorded")
    hist = history(cache)
    assert sorted((r["iteration"], r["revision"]) for r in hist) == [(1000, 0), (2000, 1)]
    assert len(invocations(cache, 2000, "qa")) == 4  # two runs of two stages, no more


def snapshot_states(cache) -> dict:
    import sqlite3

    with sqlite3.connect(cache / "ledger.sqlite3") as db:
        return dict(db.execute("SELECT iteration, state FROM snapshots"))


def test_invalidate_of_a_row_waiting_for_its_retry_releases_its_snapshot_while_the_daemon_runs(tmp_path, venvs,
                                                                                             daemons):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_mode="crash")], executor={"backoff_seconds": 600})
    cache = tmp_path / "cache"
    daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "failed", what="the inference failed once")
    assert snapshot_states(cache) == {1000: "pinned"}  # kept for the retry in 10 minutes
    assert (cache / "snapshots" / "tiny" / "1000").is_dir()
    run_cli("invalidate", "--config", cfg, "--iterations", "1000", check=0)
    # nothing will read it again: the running daemon lets it go at its next rescan, not at its next start
    wait_until(lambda: snapshot_states(cache) == {1000: "released"}, what="the snapshot released")
    assert not (cache / "snapshots" / "tiny" / "1000").exists()


def test_a_scratch_folder_left_by_a_crash_is_swept_at_the_next_start(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path, (1000,))
    left = tmp_path / "cache" / "scratch" / "tiny" / "iter_0001000" / "qa"
    left.mkdir(parents=True)
    (left / "model.bin").write_bytes(b"x" * 100)
    run_cli("--config", cfg, "--once", check=0)
    assert not left.exists()


def test_a_held_benchmark_does_not_hold_snapshots_so_the_others_finish_a_long_backlog(tmp_path, venvs):
    for it in range(1000, 36000, 1000):  # 35 checkpoints: more than the daemon pins ahead (32)
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa"), with_dataset(bench("later"), tmp_path / "not-mounted")])
    run_cli("--config", cfg, "--once", check=1, timeout=600)  # 1: `later` is held with work waiting
    s = states(tmp_path / "cache")
    assert sum(v == "recorded" for (it, b), v in s.items() if b == "qa") == 35
    assert all(v == "pending" for (it, b), v in s.items() if b == "later")


def test_a_pending_retry_of_scoring_counts_as_made_with_the_old_settings(tmp_path, venvs, daemons):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", eval_mode="crash")], executor={"backoff_seconds": 600})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "failed", what="the evaluation failed once")
    d.stop()
    edit_config(cfg, lambda c: c["benchmarks"][0].update(seed=5, evaluation=bench("qa")["evaluation"]))
    proc = run_cli("--config", cfg, "--once", check=2)  # its predictions were made with seed 0: held
    assert "settings changed since 1 result(s)" in proc.stderr
    assert [i["stage"] for i in invocations(cache, 1000, "qa")] == ["infer", "eval"]


def test_an_interrupted_invalidate_is_finished_by_running_it_again(tmp_path, venvs):
    import sqlite3

    cfg, cache = evaluated(tmp_path)
    db = sqlite3.connect(cache / "ledger.sqlite3")  # what a kill -9 right after its ledger transaction leaves
    db.execute("UPDATE jobs SET state='invalidated' WHERE iteration=2000")
    db.commit()
    db.close()
    assert sorted(r["iteration"] for r in history(cache)) == [1000, 2000]
    run_cli("invalidate", "--config", cfg, "--iterations", "2000", check=0)
    assert [r["iteration"] for r in history(cache)] == [1000]
    assert not (cache / "results" / "tiny" / "iter_0002000" / "qa" / "metrics.json").exists()


def test_rerun_refuses_a_benchmark_the_config_no_longer_runs(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path, (1000,))
    edit_config(cfg, lambda c: c["benchmarks"].append(bench("mc")) or c["benchmarks"].pop(0))
    proc = run_cli("rerun", "--config", cfg, "--benchmark", "qa", check=1)
    assert "not configured now" in proc.stdout
    assert states(cache) == {(1000, "qa"): "recorded"}
    assert (cache / "results" / "tiny" / "iter_0001000" / "qa" / "metrics.json").exists()


def test_dry_run_reads_a_ledger_written_before_fingerprints(tmp_path, venvs):
    import sqlite3

    cfg, cache = evaluated(tmp_path, (1000,))
    db = sqlite3.connect(cache / "ledger.sqlite3")
    for sql in ("DROP INDEX IF EXISTS jobs_state_iteration", "ALTER TABLE jobs DROP COLUMN fingerprint",
                "ALTER TABLE jobs DROP COLUMN revision", "DROP TABLE fingerprints"):
        db.execute(sql)
    db.commit()
    db.close()
    proc = run_cli("--config", cfg, "--dry-run", check=0)
    assert "Traceback" not in proc.stderr
    run_cli("--config", cfg, "--once", check=0)  # and the daemon upgrades it
    assert {r["fingerprint"] is not None for r in ledger_rows(cache)} == {True}

