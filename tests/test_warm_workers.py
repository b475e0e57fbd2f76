"""Warm workers (issue 13) through the real daemon and the real stage venvs: the same predictions and metrics as one
process per (checkpoint x benchmark); one benchmark's failure, a worker killed mid-job, a hung job and a daemon
killed mid-session each cost only what they must; no worker outlives its daemon."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from conftest import (DAEMON_PY, ROOT, DaemonProcess, canonical_dataset, history, ledger_rows, pid_alive, run_cli,
                      wait_until, write_config)

ROWS = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "target": str(2 * i)}
        for i in range(6)]
WORKER_ENV = b"CKPT_EVAL_WORKER="
CRASHING_DAEMON = os.path.join(ROOT, "tests", "stage_scripts", "crashing_daemon.py")
PR_SET_CHILD_SUBREAPER = 36


def hf_run(root, model: str, steps=(100, 200)) -> None:
    for step in steps:
        dest = os.path.join(str(root), f"checkpoint-{step}")
        shutil.copytree(model, dest)
        with open(os.path.join(dest, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step}, f)


def qa(name: str, data: str, **kw) -> dict:
    return {"name": name, "type": "dataset", "dataset": data, "metrics": ["exact_match", "token_f1"],
            "generation": {"max_new_tokens": 6}, **kw}


def config(tmp_path, benchmarks, warm="on", **executor):
    return write_config(tmp_path, benchmarks, watch={"layout": "huggingface", "iteration_interval": 100},
                        executor={"warm_workers": warm, **executor})


def workers_of(cache_dir) -> list[int]:
    """Pids of live warm workers of the daemon on this cache_dir (their environment names it)."""
    needle = WORKER_ENV + str(cache_dir).encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(name))
            except OSError:
                pass
    return [p for p in pids if pid_alive(p)]


def outputs(cache, name="tiny") -> dict:
    out = {}
    for row in ledger_rows(cache):
        d = os.path.join(str(cache), "results", name, f"iter_{row['iteration']:07d}", row["benchmark"])
        with open(os.path.join(d, "predictions.jsonl")) as f:
            texts = [json.loads(line)["response"]["text"] for line in f]
        with open(os.path.join(d, "metrics.json")) as f:
            metrics = json.load(f)["metrics"]
        out[(row["iteration"], row["benchmark"])] = (texts, metrics)
    return out


@pytest.fixture
def silent_port():
    """A real TCP listener that accepts connections (the kernel's backlog) and never answers: an endpoint that hangs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def test_warm_workers_give_the_same_predictions_and_metrics_as_one_process_per_stage(tmp_path, tiny_lm):
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "qa", ROWS)
    results = {}
    for warm in ("off", "checkpoint", "on"):
        base = tmp_path / warm
        hf_run(base / "ckpt", model)
        cfg = config(base, [qa("long", data), qa("short", data, generation={"max_new_tokens": 2})], warm=warm)
        proc = run_cli("--config", cfg, "--once", check=0, timeout=600)
        results[warm] = outputs(base / "cache")
        assert len(results[warm]) == 4
        if warm != "off":
            assert "warm worker pid" in proc.stderr
    assert results["on"] == results["off"] == results["checkpoint"]
    # one inference worker served all four jobs: later jobs did not load the stage's imports again
    logs = [open(tmp_path / "on" / "cache" / "results" / "tiny" / f"iter_{it:07d}" / b / "infer.stderr.log").read()
            for it in (100, 200) for b in ("long", "short")]
    assert sum("warm worker pid" in text and "job 1:" in text for text in logs) == 1


def test_a_bad_benchmark_in_a_session_fails_alone_and_its_neighbours_are_recorded(tmp_path, tiny_lm):
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "qa", ROWS)
    broken = canonical_dataset(tmp_path / "broken", ROWS)
    with open(os.path.join(broken, "test.jsonl"), "a") as f:
        f.write("{not json\n")
    hf_run(tmp_path / "ckpt", model, steps=(100,))
    cfg = config(tmp_path, [qa("a", data), qa("b", broken), qa("c", data)])
    run_cli("--config", cfg, "--once", check=1, timeout=600)
    rows = {r["benchmark"]: r for r in ledger_rows(tmp_path / "cache")}
    assert rows["a"]["state"] == rows["c"]["state"] == "recorded"
    assert rows["b"]["state"] == "failed" and "not valid JSON" in rows["b"]["last_error"]
    assert sorted(r["benchmark"] for r in history(tmp_path / "cache")) == ["a", "c"]


def test_a_worker_killed_mid_job_fails_that_job_only_and_a_fresh_worker_runs_the_rest(tmp_path, tiny_lm, silent_port,
                                                                                       daemons):
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "qa", ROWS)
    hf_run(tmp_path / "ckpt", model, steps=(100,))
    hang = qa("b", data, backend="openai", backend_options={"base_url": f"http://127.0.0.1:{silent_port}/v1",
                                                            "timeout": 600, "max_retries": 0})
    cfg = config(tmp_path, [qa("a", data), hang, qa("c", data)], max_attempts=1)
    cache = tmp_path / "cache"
    daemons(cfg)
    wait_until(lambda: {r["benchmark"]: r["state"] for r in ledger_rows(cache)}.get("b") == "inferring",
               timeout=300, what="b inferring (hung on the silent endpoint)")
    # kill the worker running b (the inference lane's): the one whose current job log is b's. The row says
    # inferring once the job is handed over; the worker names itself in the log when it reads the job, later
    b_log = cache / "results" / "tiny" / "iter_0000100" / "b" / "infer.stderr.log"
    text = wait_until(lambda: b_log.exists() and "warm worker pid " in b_log.read_text() and b_log.read_text(),
                      timeout=120, what="b's worker to name itself in b's log")
    pid = int(text.split("warm worker pid ")[1].split()[0])
    assert pid in workers_of(cache)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: {r["benchmark"]: r["state"] for r in ledger_rows(cache)} ==
               {"a": "recorded", "b": "failed", "c": "recorded"}, timeout=300, what="a, c recorded; b failed")
    b = {r["benchmark"]: r for r in ledger_rows(cache)}["b"]
    assert "died mid-job" in b["last_error"] or "-9" in b["last_error"] or "signal" in b["last_error"], b
    assert sorted(r["benchmark"] for r in history(cache)) == ["a", "c"]


def test_a_hung_job_is_killed_at_its_timeout_and_the_next_job_gets_a_fresh_worker(tmp_path, tiny_lm, silent_port):
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "qa", ROWS)
    hf_run(tmp_path / "ckpt", model, steps=(100,))
    hang = qa("b", data, backend="openai", backend_options={"base_url": f"http://127.0.0.1:{silent_port}/v1",
                                                            "timeout": 600, "max_retries": 0})
    cfg = config(tmp_path, [qa("a", data), hang, qa("c", data)], max_attempts=1, inference_timeout_minutes=1.0,
                 kill_grace_seconds=1)
    run_cli("--config", cfg, "--once", check=1, timeout=600)
    rows = {r["benchmark"]: r for r in ledger_rows(tmp_path / "cache")}
    assert rows["a"]["state"] == rows["c"]["state"] == "recorded"
    assert rows["b"]["state"] == "failed" and "timed out" in rows["b"]["last_error"]
    assert workers_of(tmp_path / "cache") == []


def test_kill_9_of_the_daemon_mid_session_leaves_no_worker_and_a_restart_runs_only_the_rest(tmp_path, tiny_lm,
                                                                                           silent_port, daemons):
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "qa", ROWS)
    hf_run(tmp_path / "ckpt", model, steps=(100,))
    hang = qa("b", data, backend="openai", backend_options={"base_url": f"http://127.0.0.1:{silent_port}/v1",
                                                            "timeout": 600, "max_retries": 0})
    cfg = config(tmp_path, [qa("a", data), hang, qa("c", data)])
    cache = tmp_path / "cache"
    d = daemons(cfg)
    wait_until(lambda: {r["benchmark"]: r["state"] for r in ledger_rows(cache)}.get("b") == "inferring",
               timeout=300, what="b inferring")
    assert workers_of(cache)
    d.kill()
    wait_until(lambda: workers_of(cache) == [], timeout=30, what="the workers to die with their daemon")
    # b becomes answerable (a fast benchmark now), a must not run again, c runs
    cfg = config(tmp_path, [qa("a", data), qa("b", data), qa("c", data)])
    run_cli("--config", cfg, "--once", check=0, timeout=600)
    rows = {r["benchmark"]: r for r in ledger_rows(cache)}
    assert {b: r["state"] for b, r in rows.items()} == {"a": "recorded", "b": "recorded", "c": "recorded"}
    hist = history(cache)
    assert sorted(r["benchmark"] for r in hist) == ["a", "b", "c"]  # a recorded once
    a_log = (cache / "results" / "tiny" / "iter_0000100" / "a" / "infer.stderr.log").read_text()
    assert a_log.count("==== ") == 1  # a's inference ran once


def test_a_worker_whose_daemon_is_killed_before_the_worker_could_die_with_it_exits_at_once(tmp_path, tiny_lm,
                                                                                           silent_port):
    """kill -9 of the daemon right after it handed a job to a fresh worker, before the worker asked the kernel to
    kill it with its parent (PR_SET_PDEATHSIG): the daemon is the real CLI with one injected crash point
    (tests/stage_scripts/crashing_daemon.py, as in test_daemon_faults.py). Meanwhile this test process is a child
    subreaper, as systemd --user or a supervisor is: the orphan is adopted by it, not by pid 1. The worker must
    exit without running the job (found by scripts/chaos_kill9.py)."""
    model = tiny_lm("gpt2")
    data = canonical_dataset(tmp_path / "qa", ROWS)
    hf_run(tmp_path / "ckpt", model, steps=(100,))
    hang = qa("b", data, backend="openai", backend_options={"base_url": f"http://127.0.0.1:{silent_port}/v1",
                                                            "timeout": 600, "max_retries": 0})
    cfg = config(tmp_path, [hang])
    cache = tmp_path / "cache"
    env = dict(os.environ, CRASH_AT="evaluator.daemon.local:LocalExecutor._submit_warm:after")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        proc = subprocess.run([DAEMON_PY, CRASHING_DAEMON, "--config", cfg], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == -signal.SIGKILL and "injected crash point reached" in proc.stderr, proc.stderr
        wait_until(lambda: workers_of(cache) == [], timeout=120, what="the orphaned worker to exit")
        log = (cache / "results" / "tiny" / "iter_0000100" / "b" / "infer.stderr.log").read_text()
        assert "warm worker pid" not in log, log  # the orphan never ran the job of its dead daemon
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in workers_of(cache):
            os.killpg(pid, signal.SIGKILL)
        reap_adopted()


def reap_adopted() -> None:
    """Reap the zombies of processes this test process adopted as a subreaper (its own children are not waited for
    elsewhere)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid() and fields[0] == "Z":
                    os.waitpid(int(name), os.WNOHANG)
            except (OSError, ChildProcessError):
                pass


def test_daemon_process_helper_is_importable():
    assert DaemonProcess  # the fixture's class: killing it is a real SIGKILL (conftest.DaemonProcess.kill)


def test_a_self_served_checkpoint_is_served_once_for_all_its_benchmarks(tmp_path, tiny_lm):
    """backend openai on a local checkpoint starts `transformers serve`: once per checkpoint session, not per
    benchmark (the second benchmark reuses the server with its own generation parameters)."""
    model = tiny_lm("gpt2", chat=True)
    data = canonical_dataset(tmp_path / "qa", ROWS)
    hf_run(tmp_path / "ckpt", model, steps=(100,))
    cfg = config(tmp_path, [qa("a", data, backend="openai"),
                            qa("b", data, backend="openai", generation={"max_new_tokens": 2})])
    run_cli("--config", cfg, "--once", check=0, timeout=600)
    meta = {b: json.load(open(tmp_path / "cache" / "results" / "tiny" / "iter_0000100" / b / "run_metadata.json"))
            for b in ("a", "b")}
    assert meta["a"]["timings"]["model"] == "loaded"
    assert meta["b"]["timings"]["model"].startswith("reused")
    assert meta["a"]["backend_info"]["server_pid"] == meta["b"]["backend_info"]["server_pid"]
    assert meta["b"]["generation"]["max_new_tokens"] == 2
