"""Shared helpers for the tests: real venvs, real daemon processes, real checkpoint folders."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = os.path.join(ROOT, ".venvs")
DAEMON_PY = os.path.join(VENVS, "daemon", "bin", "python")
EVALUATOR = os.path.join(ROOT, "tools", "evaluator.py")
FAKE_STAGE = os.path.join(ROOT, "tests", "stage_scripts", "fake_stage.py")


@pytest.fixture(scope="session")
def venvs():
    """The real stage venvs made by `make setup`; missing ones are a failure, not a skip."""
    paths = {name: os.path.join(VENVS, name, "bin", "python") for name in ("inference", "evaluation")}
    missing = [p for p in paths.values() if not os.access(p, os.X_OK)]
    assert not missing, f"stage venvs missing: {missing}; run `make setup` first"
    return paths


def fake(stage: str, mode: str = "ok", sleep: float = 0.0, extra: str = "") -> str:
    """A command template running tests/stage_scripts/fake_stage.py in the stage's venv."""
    return (f"{{python}} {FAKE_STAGE} {stage} --out {{output_dir}} --checkpoint {{checkpoint}} "
            f"--iteration {{iteration}} --mode {mode} --sleep {sleep} {extra}").strip()


def bench(name: str, infer_mode="ok", eval_mode="ok", infer_sleep=0.0, eval_sleep=0.0, extra="") -> dict:
    return {"name": name, "type": "command", "inference": fake("infer", infer_mode, infer_sleep, extra),
            "evaluation": fake("eval", eval_mode, eval_sleep)}


def write_config(tmp, benchmarks, watch=None, executor=None, **top) -> str:
    cfg = {"project_name": "test", "model_name": "tiny", "cache_dir": str(tmp / "cache"),
           "watch": {"paths": [str(tmp / "ckpt")], "layout": "megatron", "iteration_interval": 1000,
                     "poll_seconds": 0.5, "settle_seconds": 0.3, **(watch or {})},
           "executor": {"backoff_seconds": 0.2, "max_attempts": 2, "kill_grace_seconds": 1, "gpus": [],
                        **(executor or {})},
           "benchmarks": benchmarks, **top}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({"auto_eval": cfg}))
    return str(path)


def megatron_checkpoint(root, iteration: int, tracker: bool = True, payload: bytes = b"weights") -> str:
    path = os.path.join(str(root), f"iter_{iteration:07d}")
    os.makedirs(os.path.join(path, "mp_rank_00"), exist_ok=True)
    with open(os.path.join(path, "mp_rank_00", "model_optim_rng.pt"), "wb") as f:
        f.write(payload)
    if tracker:
        set_tracker(root, iteration)
    return path


def set_tracker(root, iteration) -> None:
    tmp = os.path.join(str(root), ".tracker.tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, os.path.join(str(root), "latest_checkpointed_iteration.txt"))


def run_cli(*args, timeout=120, check=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([DAEMON_PY, EVALUATOR, *args], capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


class DaemonProcess:
    """A real daemon in the background; stopped by PID at teardown whatever happens."""

    def __init__(self, cfg: str, *args: str, log_path: str):
        self.log_path = log_path
        self.logf = open(log_path, "ab")
        self.proc = subprocess.Popen([DAEMON_PY, EVALUATOR, "--config", cfg, *args],
                                     stdout=self.logf, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.logf.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemons(tmp_path):
    started: list[DaemonProcess] = []

    def start(cfg: str, *args: str) -> DaemonProcess:
        d = DaemonProcess(cfg, *args, log_path=str(tmp_path / f"daemon{len(started)}.log"))
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; a bounded wait, not a speed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ledger_rows(cache_dir) -> list[dict]:
    path = os.path.join(str(cache_dir), "ledger.sqlite3")
    if not os.path.exists(path):
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY run, iteration, benchmark")]
    except sqlite3.OperationalError:  # schema not created yet
        return []
    finally:
        db.close()


def ledger_events(cache_dir) -> list[dict]:
    db = sqlite3.connect(f"file:{os.path.join(str(cache_dir), 'ledger.sqlite3')}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM events ORDER BY id")]
    finally:
        db.close()


def history(cache_dir, run="tiny") -> list[dict]:
    path = os.path.join(str(cache_dir), "results", run, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def invocations(cache_dir, iteration: int, benchmark: str, run="tiny") -> list[dict]:
    path = os.path.join(str(cache_dir), "results", run, f"iter_{iteration:07d}", benchmark, "invocations.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


MAKE_TINY_LM = os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_lm.py")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, venvs):
    """build(arch="gpt2", chat=False) -> a tiny text LM checkpoint directory, built once per session
    (tests/stage_scripts/make_tiny_lm.py in the inference venv: real tokenizer, real save_pretrained)."""
    built: dict = {}

    def build(arch: str = "gpt2", chat: bool = False) -> str:
        key = (arch, chat)
        if key not in built:
            out = str(tmp_path_factory.mktemp(f"tiny-{arch}{'-chat' if chat else ''}") / "model")
            cmd = [venvs["inference"], MAKE_TINY_LM, out, "--arch", arch] + (["--chat-template"] if chat else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            built[key] = out
        return built[key]

    return build


def canonical_dataset(root, rows, dataset_id="toy", **meta) -> str:
    """Write a canonical dataset directory (test.jsonl + metadata.json) from plain row dicts."""
    os.makedirs(str(root), exist_ok=True)
    with open(os.path.join(str(root), "test.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(str(root), "metadata.json"), "w") as f:
        json.dump({"dataset_id": dataset_id, **meta}, f)
    return str(root)


def run_in_evaluation_venv(venvs, tmp_path, script: str, *args: str) -> dict:
    """Run `script` (python -c) in the evaluation venv with an output path as argv[1]; its JSON output."""
    out = tmp_path / "out.json"
    proc = subprocess.run([venvs["evaluation"], "-c", script, str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def bench_py(*args, timeout=300) -> subprocess.CompletedProcess:
    """tools/bench.py under the daemon venv's python (it starts each stage in its own venv)."""
    return subprocess.run([DAEMON_PY, os.path.join(ROOT, "tools", "bench.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm with accounting (scripts/slurm_local.sh start; .ci/run starts it): a failure, not a skip."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        proc = None
    assert proc is not None and proc.returncode == 0 and proc.stdout.strip(), (
        "no Slurm answers here: start one with `bash scripts/slurm_local.sh start` (CI does)")
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True)
    assert acct.returncode == 0, f"sacct does not work (slurmdbd?): {acct.stderr}"
