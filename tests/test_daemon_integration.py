"""The daemon end to end: real daemon processes, real stage subprocesses in the real stage venvs,
real checkpoint folders written while the daemon watches, real signals."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

from conftest import (bench, daemons, history, invocations, ledger_events, ledger_rows, megatron_checkpoint,  # noqa: F401
                      pid_alive, run_cli, set_tracker, venvs, wait_until, write_config)

pytestmark = pytest.mark.slow


def states(cache):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}


def test_once_evaluates_every_complete_checkpoint_in_the_stage_venvs(tmp_path, venvs):
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    megatron_checkpoint(tmp_path / "ckpt", 4000, tracker=False)  # beyond the tracker: still being written
    cfg = write_config(tmp_path, [bench("qa")], megatron={"checkpoint_path": str(tmp_path / "ckpt"),
                                                          "token_per_iteration": 0.002})
    run_cli("--config", cfg, "--once", check=0)
    cache = tmp_path / "cache"
    assert states(cache) == {(1000, "qa"): "recorded", (2000, "qa"): "recorded", (3000, "qa"): "recorded"}
    rows = history(cache)
    assert [(r["iteration"], r["metrics"]["iteration_k"]) for r in rows] == [(1000, 1.0), (2000, 2.0), (3000, 3.0)]
    assert rows[2]["tokens_b"] == pytest.approx(6.0)  # 3000 iterations x 0.002 B tokens
    inf = invocations(cache, 2000, "qa")
    assert [i["stage"] for i in inf] == ["infer", "eval"]
    # each stage ran in its own venv
    assert inf[0]["python"] == venvs["inference"] and inf[1]["python"] == venvs["evaluation"]
    out = cache / "results" / "tiny" / "iter_0002000" / "qa"
    for name in ("infer.job.json", "eval.job.json", "predictions.jsonl", "run_metadata.json", "metrics.json",
                 "infer.stderr.log", "eval.stderr.log"):
        assert (out / name).exists(), name
    job = json.loads((out / "infer.job.json").read_text())
    assert job["iteration"] == 2000 and job["checkpoint"].endswith("iter_0002000") and job["stage"] == "inference"


def test_stage_venvs_have_their_conflicting_transformers_pins(tmp_path, venvs):
    probe = "{python} -c 'import transformers, sys; open(sys.argv[1], \"w\").write(transformers.__version__)'"
    b = {"name": "pins", "type": "command",
         "inference": probe + " infer_version.txt",
         "evaluation": probe + " eval_version.txt && echo '{{\"ok\": 1}}' > metrics.json"}
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [b])
    run_cli("--config", cfg, "--once", check=0)
    out = tmp_path / "cache" / "results" / "tiny" / "iter_0001000" / "pins"
    infer_version = (out / "infer_version.txt").read_text()
    assert int(infer_version.split(".")[0]) >= 5 or infer_version >= "4.51.1"
    assert (out / "eval_version.txt").read_text().startswith("4.42.")


def test_lanes_overlap_checkpoint_n_is_scored_while_n_plus_1_generates(tmp_path, venvs):
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=1.0, eval_sleep=1.0)])
    run_cli("--config", cfg, "--once", check=0)
    ev = ledger_events(tmp_path / "cache")

    def spans(start_state, end_state):
        out = {}
        for e in ev:
            if e["to_state"] == start_state:
                out[e["iteration"]] = [e["ts"], None]
            elif e["to_state"] == end_state and e["from_state"] == start_state:
                out[e["iteration"]][1] = e["ts"]
        return out

    infer, score = spans("inferring", "inferred"), spans("scoring", "scored")
    overlaps = [(s, i) for s, (s0, s1) in score.items() for i, (i0, i1) in infer.items()
                if i != s and s0 < i1 and i0 < s1]
    assert overlaps, f"no evaluation ran while another checkpoint was generating: infer={infer} score={score}"


def stage_spans(events) -> list[tuple]:
    """(start, end) of every stage run, from the ledger's events."""
    open_, spans = {}, []
    for e in events:
        key = (e["iteration"], e["benchmark"])
        if e["to_state"] in ("inferring", "scoring"):
            open_[key] = e["ts"]
        elif e["to_state"] in ("inferred", "scored") and key in open_:
            spans.append((open_.pop(key), e["ts"]))
    return spans


def test_overlap_lanes_false_runs_one_stage_at_a_time(tmp_path, venvs):
    """The strictly serial baseline scripts/bench_pipeline.py compares against."""
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=0.5, eval_sleep=0.5)], executor={"overlap_lanes": False})
    run_cli("--config", cfg, "--once", check=0)
    spans = sorted(stage_spans(ledger_events(tmp_path / "cache")))
    assert len(spans) == 6
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_new_checkpoint_is_noticed_through_inotify_without_rescans(tmp_path, venvs, daemons):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], watch={"mode": "inotify", "poll_seconds": 3600})
    d = daemons(cfg)
    wait_until(lambda: "watching" in d.log(), what="the daemon to watch the folder")
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    wait_until(lambda: states(tmp_path / "cache").get((1000, "qa")) == "recorded", timeout=60,
               what="iteration 1000 recorded")
    assert d.stop() == 0


def test_polling_mode_finds_checkpoints_by_rescanning(tmp_path, venvs, daemons):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")], watch={"mode": "polling", "poll_seconds": 0.3})
    d = daemons(cfg)
    wait_until(lambda: "daemon started" in d.log(), what="daemon start")
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    wait_until(lambda: states(tmp_path / "cache").get((1000, "qa")) == "recorded", what="iteration 1000 recorded")
    assert "polling" in d.log() and "watching" not in d.log()
    assert d.stop() == 0


def test_slow_writer_partial_checkpoints_are_never_started_early(tmp_path, venvs, daemons):
    """A Megatron writer that writes shards in chunks and the tracker last, and an HF writer with no
    final marker: every stage must see the checkpoint exactly as complete as the writer meant it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    manifest = tmp_path / "manifest.json"
    sizes = {}

    def write_slowly(path, size, chunk=4096):
        with open(path, "wb") as f:
            for i in range(0, size, chunk):
                f.write(os.urandom(min(chunk, size - i)))
                f.flush()
                time.sleep(0.02)

    def writer():
        for it in (1000, 2000, 3000):
            base = ckpt / f"iter_{it:07d}"
            want = {}
            for rank in range(2):
                (base / f"mp_rank_0{rank}").mkdir(parents=True)
                rel = f"mp_rank_0{rank}/model_optim_rng.pt"
                want[rel] = 40_000 + it
            sizes[str(it)] = want
            manifest.write_text(json.dumps(sizes))
            for rel, size in want.items():
                write_slowly(base / rel, size)
            set_tracker(ckpt, it)  # rank 0 writes the tracker after every rank saved

    cfg = write_config(tmp_path, [bench("qa", extra=f"--manifest {manifest}")],
                       watch={"mode": "inotify", "poll_seconds": 0.2})
    d = daemons(cfg)
    t = threading.Thread(target=writer)
    t.start()
    t.join()
    wait_until(lambda: [s for s in states(tmp_path / "cache").values()] == ["recorded"] * 3, timeout=90,
               what="three checkpoints recorded")
    assert d.stop() == 0
    for it in (1000, 2000, 3000):
        pred = (tmp_path / "cache" / "results" / "tiny" / f"iter_{it:07d}" / "qa" / "predictions.jsonl").read_text()
        seen = json.loads(pred)["seen"]
        assert seen["complete_at_start"], f"iteration {it} started on a partial checkpoint: {seen}"


def test_huggingface_checkpoint_without_marker_waits_for_sizes_to_settle(tmp_path, venvs, daemons):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    manifest = tmp_path / "manifest.json"
    d_cfg = write_config(tmp_path, [bench("qa", extra=f"--manifest {manifest}")],
                         watch={"layout": "huggingface", "settle_seconds": 1.0, "iteration_interval": 50,
                                "mode": "inotify", "poll_seconds": 0.2})
    d = daemons(d_cfg)
    base = ckpt / "checkpoint-50"
    base.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [25000], "data_offsets": [0, 100000]}}).encode()
    blob = len(header).to_bytes(8, "little") + header + os.urandom(100000)
    extra = os.urandom(30000)
    manifest.write_text(json.dumps({"50": {"config.json": 2, "model.safetensors": len(blob), "tokenizer.json": len(extra)}}))
    (base / "config.json").write_text("{}")
    with open(base / "model.safetensors", "wb") as f:  # header first, then data in chunks
        for i in range(0, len(blob), 8192):
            f.write(blob[i:i + 8192])
            f.flush()
            time.sleep(0.03)
    # weights whole, but the writer is still busy with other files: settle must hold it back
    with open(base / "tokenizer.json", "wb") as f:
        for i in range(0, len(extra), 3000):
            f.write(extra[i:i + 3000])
            f.flush()
            time.sleep(0.2)
    wait_until(lambda: states(tmp_path / "cache").get((50, "qa")) == "recorded", what="checkpoint-50 recorded")
    assert d.stop() == 0
    pred = (tmp_path / "cache" / "results" / "tiny" / "iter_0000050" / "qa" / "predictions.jsonl").read_text()
    assert json.loads(pred)["seen"]["complete_at_start"], pred


def test_crash_hang_and_tempfail_are_retried_a_bounded_number_of_times_then_failed(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    benches = [bench("good"), bench("crash", infer_mode="crash"), bench("busy", infer_mode="tempfail"),
               bench("hang", infer_mode="hang"), bench("badeval", eval_mode="crash")]
    cfg = write_config(tmp_path, benches, executor={"max_attempts": 2, "backoff_seconds": 0.2,
                                                    "inference_timeout_minutes": 0.04, "kill_grace_seconds": 0.5,
                                                    "inference_concurrency": 2, "tempfail_minutes": 0.03})
    run_cli("--config", cfg, "--once", check=1, timeout=180)  # --once says jobs failed
    cache = tmp_path / "cache"
    rows = {r["benchmark"]: r for r in ledger_rows(cache)}
    assert rows["good"]["state"] == "recorded"
    for name in ("crash", "hang", "badeval"):
        r = rows[name]
        assert r["state"] == "failed" and r["attempts"] == 2 and r["next_retry_at"] is None, r
    assert "exit 3" in rows["crash"]["last_error"] and "crashing on purpose" in rows["crash"]["last_error"]
    # exit 75 is retried on its own time budget (executor.tempfail_minutes), never counted as an attempt
    busy = rows["busy"]
    assert busy["state"] == "failed" and busy["attempts"] == 0 and busy["next_retry_at"] is None, busy
    assert "exit 75" in busy["last_error"] and len(invocations(cache, 1000, "busy")) >= 3
    assert "timed out" in rows["hang"]["last_error"]
    assert rows["badeval"]["last_error"].startswith("evaluation:")
    assert len(invocations(cache, 1000, "crash")) == 2  # bounded: exactly max_attempts runs
    assert [i["stage"] for i in invocations(cache, 1000, "badeval")] == ["infer", "eval", "eval"]  # retried from inferred
    # the hung stage ignored SIGTERM and left a child: both were killed with the whole group
    for line in (cache / "results" / "tiny" / "iter_0001000" / "hang" / "hang.pids").read_text().split("\n"):
        for pid in line.split():
            assert not pid_alive(int(pid)), f"hung stage process {pid} survived"
    assert [h["benchmark"] for h in history(cache)] == ["good"]  # no partial result recorded
    status = run_cli("status", "--config", cfg, check=0).stdout
    assert "failed" in status and "crashing on purpose" in status  # the log tail is shown


def test_kill_9_mid_stage_then_restart_records_every_job_exactly_once(tmp_path, venvs, daemons):
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=2.0), bench("mc", eval_sleep=1.0)])
    cache = tmp_path / "cache"
    d = daemons(cfg)
    # qa's stage (2 s): mc's is dispatched first and ends in a blink, so its pid may be gone before the kill
    running = wait_until(lambda: [r for r in ledger_rows(cache) if r["state"] == "inferring" and r["pid"]
                                  and r["benchmark"] == "qa"], what="qa's stage in flight")
    orphan = running[0]["pid"]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert pid_alive(orphan), "the stage should outlive a kill -9 of the daemon (that is the hard case)"
    run_cli("--config", cfg, "--once", check=0, timeout=180)
    assert not pid_alive(orphan), "the restarted daemon must stop the previous daemon's leftover stage"
    assert set(states(cache).values()) == {"recorded"} and len(states(cache)) == 6
    rows = history(cache)
    keys = [(r["iteration"], r["benchmark"]) for r in rows]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6, keys  # each exactly once
    notes = [e["note"] for e in ledger_events(cache)]
    assert any(n.startswith("recovered after restart") for n in notes)


def test_restart_after_stage_finished_unobserved_trusts_only_verified_outputs(tmp_path, venvs, daemons):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=1.0)])
    cache = tmp_path / "cache"
    d = daemons(cfg)
    row = wait_until(lambda: [r for r in ledger_rows(cache) if r["state"] == "inferring" and r["pid"]],
                     what="inference in flight")[0]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    wait_until(lambda: not pid_alive(row["pid"]), what="the orphaned stage to finish on its own")
    run_cli("--config", cfg, "--once", check=0)
    assert states(cache) == {(1000, "qa"): "recorded"}
    # its outputs were complete, so inference was not run again
    assert [i["stage"] for i in invocations(cache, 1000, "qa")] == ["infer", "eval"]
    assert any(e["note"] == "recovered after restart: outputs complete" for e in ledger_events(cache))


def test_checkpoint_deleted_mid_stage_ends_vanished_without_retries(tmp_path, venvs, daemons):
    """snapshot: none evaluates in place, so a deleted checkpoint is lost (see test_snapshots.py for pinning)."""
    path = megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_mode="needs_checkpoint", infer_sleep=1.5)],
                       executor={"max_attempts": 5, "backoff_seconds": 0.1}, watch={"snapshot": "none"})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "inferring", what="inference in flight")
    shutil.rmtree(path)
    wait_until(lambda: states(cache).get((1000, "qa")) == "vanished", what="vanished")
    time.sleep(1.5)  # long enough for several retries, were there any
    assert d.stop() == 0
    row = ledger_rows(cache)[0]
    assert row["state"] == "vanished" and "deleted" in row["last_error"]
    assert [e["to_state"] for e in ledger_events(cache)] == ["pending", "inferring", "vanished"]
    assert history(cache) == []


def test_pending_checkpoint_deleted_before_its_turn_is_vanished(tmp_path, venvs, daemons):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=1.5)], watch={"snapshot": "none", "vanish_grace_seconds": 1})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "inferring" and states(cache).get((2000, "qa")) == "pending",
               what="1000 running, 2000 queued")
    shutil.rmtree(tmp_path / "ckpt" / "iter_0002000")
    wait_until(lambda: states(cache).get((2000, "qa")) == "vanished", what="2000 vanished")
    wait_until(lambda: states(cache).get((1000, "qa")) == "recorded", what="1000 recorded")
    assert d.stop() == 0
    assert invocations(cache, 2000, "qa") == []


def test_a_daemon_starting_while_another_process_holds_the_lock_for_a_moment_waits_it_out(tmp_path):
    """evaluate_checkpoint asks whether a daemon runs by taking daemon.lock for a moment: a daemon (a systemd
    service) starting in that moment exited 2, "another daemon is already running", and was not restarted."""
    from filelock import FileLock

    from evaluator.api.training import daemon_running
    from evaluator.common.errors import EvaluatorError
    from evaluator.daemon.build import LOCK_WAIT_SECONDS, take_lock
    from evaluator.daemon.heartbeat import LOCK_FILE
    moment = FileLock(str(tmp_path / LOCK_FILE), thread_local=False)  # released by the timer thread
    moment.acquire()
    threading.Timer(0.3, moment.release).start()
    lock = take_lock(str(tmp_path))  # waits the moment out
    assert lock.is_locked and daemon_running(str(tmp_path))
    started = time.monotonic()
    with pytest.raises(EvaluatorError, match="another daemon is already running"):
        take_lock(str(tmp_path))  # a daemon holds it: refused once the wait is over
    assert time.monotonic() - started >= LOCK_WAIT_SECONDS * 0.9
    lock.release()
    assert not daemon_running(str(tmp_path))


def test_second_daemon_on_the_same_cache_dir_is_refused(tmp_path, venvs, daemons):
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, [bench("qa")])
    first = daemons(cfg)
    wait_until(lambda: "daemon started" in first.log(), what="first daemon")
    second = run_cli("--config", cfg, timeout=60)
    assert second.returncode == 2
    assert "another daemon" in second.stderr and "Traceback" not in second.stderr
    assert first.proc.poll() is None, "the first daemon must keep running"
    assert first.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: a closed terminal, a `kill -HUP`
def test_sigterm_mid_stage_stops_cleanly_and_returns_the_job_to_pending(tmp_path, venvs, daemons, sig):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=60)], executor={"kill_grace_seconds": 5})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    row = wait_until(lambda: [r for r in ledger_rows(cache) if r["state"] == "inferring" and r["pid"]],
                     what="inference in flight")[0]
    d.proc.send_signal(sig)
    assert d.proc.wait(timeout=10) == 0  # the service contract: stop within 10 s
    assert not pid_alive(row["pid"])
    after = ledger_rows(cache)[0]
    assert after["state"] == "pending" and after["attempts"] == 0 and after["pid"] is None
    # and the next start picks it up again
    cfg2 = write_config(tmp_path, [bench("qa")])
    run_cli("--config", cfg2, "--once", check=0)
    assert states(cache) == {(1000, "qa"): "recorded"}


def test_gpu_slots_get_one_cuda_device_each_and_the_cpu_lane_none(tmp_path, venvs):
    for it in (1000, 2000, 3000, 4000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=0.8)], executor={"gpus": ["0", "1"]})
    run_cli("--config", cfg, "--once", check=0)
    cache = tmp_path / "cache"
    runs = [(it, i) for it in (1000, 2000, 3000, 4000) for i in invocations(cache, it, "qa")]
    infer = [i for _, i in runs if i["stage"] == "infer"]
    assert {i["gpu"] for i in infer} == {"0", "1"}
    assert all(i["gpu"] == "" for _, i in runs if i["stage"] == "eval")
    for a in infer:  # two jobs never share a GPU at the same time
        for b in infer:
            if a is not b and a["gpu"] == b["gpu"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"]


def test_end_iteration_stops_the_daemon_once_the_range_is_done(tmp_path, venvs, daemons):
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")])
    d = daemons(cfg, "--begin-iteration", "2000", "--end-iteration", "3000")
    assert d.proc.wait(timeout=60) == 0
    assert states(tmp_path / "cache") == {(1000, "qa"): "skipped", (2000, "qa"): "recorded", (3000, "qa"): "recorded"}


def test_restart_with_a_wider_range_picks_up_skipped_checkpoints(tmp_path, venvs):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")])
    run_cli("--config", cfg, "--once", "--begin-iteration", "2000", check=0)
    assert states(tmp_path / "cache") == {(1000, "qa"): "skipped", (2000, "qa"): "recorded"}
    run_cli("--config", cfg, "--once", "--begin-iteration", "1000", check=0)
    assert states(tmp_path / "cache") == {(1000, "qa"): "recorded", (2000, "qa"): "recorded"}
    assert len(history(tmp_path / "cache")) == 2


def test_run_without_benchmarks_or_with_helm_eval_type_is_a_clear_error(tmp_path):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [])
    proc = run_cli("--config", cfg, "--once")
    assert proc.returncode == 2 and "auto_eval.benchmarks" in proc.stderr and "Traceback" not in proc.stderr
    cfg = write_config(tmp_path, [bench("qa")])
    proc = run_cli("--config", cfg, "--once", "--eval-type", "helm")
    assert proc.returncode == 2 and "--eval-type helm" in proc.stderr


def test_missing_stage_venv_is_a_clear_error_naming_the_key(tmp_path):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")], envs={"inference": str(tmp_path / "no-such-venv")})
    proc = run_cli("--config", cfg, "--once")
    assert proc.returncode == 2 and "auto_eval.envs.inference" in proc.stderr and "make setup" in proc.stderr
    assert not (tmp_path / "cache" / "ledger.sqlite3").exists()  # nothing half-started


def test_a_sink_that_fails_is_retried_and_records_the_result_once(tmp_path, venvs, daemons):
    """Real fault: history.jsonl is a directory, so the local sink cannot append; then it is fixed."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")], executor={"backoff_seconds": 0.3})
    cache = tmp_path / "cache"
    blocker = cache / "results" / "tiny" / "history.jsonl"
    blocker.mkdir(parents=True)
    d = daemons(cfg)
    wait_until(lambda: "recorder local:" in d.log(), what="the sink failure to be logged")
    assert states(cache) == {(1000, "qa"): "scored"}  # scored, kept, not lost and not marked recorded
    blocker.rmdir()
    wait_until(lambda: states(cache).get((1000, "qa")) == "recorded", what="recorded after the sink recovered")
    assert d.stop() == 0
    assert [(h["iteration"], h["benchmark"]) for h in history(cache)] == [(1000, "qa")]


def test_huggingface_checkpoint_completed_inside_its_folder_is_noticed_without_rescans(tmp_path, venvs, daemons):
    """Only the run folder is watched; a checkpoint whose last file lands inside it is re-checked."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = write_config(tmp_path, [bench("qa")], watch={"layout": "huggingface", "iteration_interval": 10,
                                                        "mode": "inotify", "poll_seconds": 3600})
    d = daemons(cfg)
    wait_until(lambda: "watching" in d.log(), what="the daemon to watch the folder")
    base = ckpt / "checkpoint-10"
    base.mkdir()  # the only event in the watched folder
    time.sleep(0.5)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    (base / "trainer_state.json").write_text('{"global_step": 10}')
    wait_until(lambda: states(tmp_path / "cache").get((10, "qa")) == "recorded", what="checkpoint-10 recorded")
    assert d.stop() == 0


def test_a_run_folder_that_disappears_for_a_while_loses_nothing(tmp_path, venvs, daemons):
    """An NFS hiccup or a moved-and-restored folder: queued jobs wait, they are not 'vanished'."""
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=1.0)], watch={"snapshot": "none", "poll_seconds": 0.2})
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: states(cache).get((1000, "qa")) == "inferring", what="1000 in flight")
    os.rename(tmp_path / "ckpt", tmp_path / "ckpt.away")
    wait_until(lambda: "is not available" in d.log(), what="the outage to be noticed")
    time.sleep(0.5)
    os.rename(tmp_path / "ckpt.away", tmp_path / "ckpt")
    wait_until(lambda: set(states(cache).values()) <= {"recorded", "vanished", "failed"} and len(states(cache)) == 3
               and "inferring" not in states(cache).values(), what="all final")
    assert d.stop() == 0
    final = states(cache)
    assert final[(2000, "qa")] == "recorded" and final[(3000, "qa")] == "recorded", final


def test_end_iteration_does_not_wait_for_an_iteration_that_was_never_saved(tmp_path, venvs, daemons):
    for it in (1000, 3000):  # 2000 was never saved (or rotated away before anyone saw it)
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [bench("qa")])
    d = daemons(cfg, "--begin-iteration", "1000", "--end-iteration", "3000")
    assert d.proc.wait(timeout=60) == 0
    assert states(tmp_path / "cache") == {(1000, "qa"): "recorded", (3000, "qa"): "recorded"}


def test_once_with_a_sink_that_stays_down_exits_keeps_the_result_and_records_it_next_time(tmp_path, venvs):
    """Real fault: history.jsonl is a directory for the whole first run."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [bench("qa")], executor={"backoff_seconds": 0.05, "max_attempts": 3})
    cache = tmp_path / "cache"
    blocker = cache / "results" / "tiny" / "history.jsonl"
    blocker.mkdir(parents=True)
    first = run_cli("--config", cfg, "--once", timeout=120)
    assert first.returncode == 1 and "could not be recorded" in first.stderr
    row = ledger_rows(cache)[0]
    assert row["state"] == "scored" and row["last_error"].startswith("recorder local:")
    assert "recorder local" in run_cli("status", "--config", cfg, check=0).stdout
    blocker.rmdir()
    run_cli("--config", cfg, "--once", check=0)
    assert states(cache) == {(1000, "qa"): "recorded"} and len(history(cache)) == 1
    assert ledger_rows(cache)[0]["last_error"] is None
