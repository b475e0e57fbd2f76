"""The vllm backend in a warm worker (issue 13): one engine per checkpoint session. A checkpoint's benchmarks reuse
the engine with their own sampling parameters and batch size; another checkpoint or another engine option builds
a new engine; a benchmark whose generation parameters are refused fails alone.

Stand-in, for speed and for what it can log: a fake `vllm` package (tests/test_hf_backend.py FAKE_VLLM: it logs
every engine init and every generate call, and its vllm.platforms reports a CUDA device) is put first on
PYTHONPATH. Everything else is real: `python -m evaluator.stages.worker` in the inference venv (its real
transformers does the checkpoint format check on the checkpoint folders), fed job specs over the JSON-line protocol
of evaluator/stages/worker.py, running the real inference stage. Real vLLM (its CPU build) in the real daemon on
the real model: tests/test_vllm_real.py.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from conftest import DAEMON_PY, EVALUATOR, ROOT, canonical_dataset, write_config
from evaluator.common.contracts import StageJob
from evaluator.stages.inference.backends.vllm import ENGINE_OPTIONS, VLLMBackend
from test_hf_backend import FAKE_VLLM, write_fake_vllm

# older vLLM releases refuse top_k=0 (newer ones read it as "no limit", as our own check does): a parameter the
# spec check lets through and SamplingParams rejects
FAKE_VLLM_REFUSING_TOP_K_0 = FAKE_VLLM + '''
class SamplingParams:
    def __init__(self, **kwargs):
        if kwargs.get("top_k") == 0:
            raise ValueError("top_k must be -1 (disable), or at least 1, got 0.")
        self.kwargs = kwargs
'''
ROWS = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"what is {i} plus {i}"}]} for i in range(3)]


@pytest.fixture
def stand_in(tmp_path):
    """Fake vllm + torch, two checkpoint folders and a dataset; returns a runner of warm-worker sessions."""
    fakes = tmp_path / "fakes"
    write_fake_vllm(fakes, FAKE_VLLM_REFUSING_TOP_K_0)
    for name in ("ckpt-100", "ckpt-200"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                                 "transformers_version": "4.57.1"}))
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())  # the two folders' files differ
    data = canonical_dataset(tmp_path / "data", ROWS)
    log = tmp_path / "vllm.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fakes), ROOT]), FAKE_VLLM_LOG=str(log))
    count = iter(range(1, 1000))

    def job(checkpoint: str, **bench) -> str:
        out = tmp_path / f"job{next(count)}"
        out.mkdir()
        spec = {"name": out.name, "type": "dataset", "dataset": data, "backend": "vllm", **bench}
        StageJob(stage="inference", run="r", iteration=int(checkpoint.split("-")[1]),
                 checkpoint=str(tmp_path / checkpoint), benchmark=spec, output_dir=str(out)).write(
            str(out / "infer.job.json"))
        return str(out)

    def session(*outs: str) -> list[int]:
        """The jobs through warm workers, as the daemon's local executor sends them: one worker takes jobs until
        one fails (then it exits), and a fresh worker takes the rest. Returns each job's rc."""
        rcs: list[int] = []
        while len(rcs) < len(outs):
            lines = "".join(json.dumps({"module": "evaluator.stages.inference", "job": f"{out}/infer.job.json",
                                        "log": f"{out}/infer.stderr.log", "cwd": ROOT, "token": "t"}) + "\n"
                            for out in outs[len(rcs):])
            proc = subprocess.run([os.path.join(ROOT, ".venvs", "inference", "bin", "python"), "-m",
                                   "evaluator.stages.worker"], input=lines, capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=300)
            answers = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
            assert proc.returncode == 0 and answers, proc.stderr[-3000:]
            rcs += [a["rc"] for a in answers]
        return rcs

    def calls() -> list[dict]:
        with open(log) as f:
            return [json.loads(line) for line in f]

    return job, session, calls


def summary(calls: list[dict]) -> list[tuple]:
    """Each engine init as (init, checkpoint folder, gpu_memory_utilization); each call as (generate, max_tokens,
    number of prompts)."""
    out = []
    for call in calls:
        if "init" in call:
            out.append(("init", os.path.basename(call["init"]["model"]), call["init"].get("gpu_memory_utilization")))
        else:
            out.append(("generate", call["generate"]["sampling"]["max_tokens"], len(call["generate"]["prompts"])))
    return out


def read(out: str, name: str):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f] if name.endswith(".jsonl") else json.load(f)


@pytest.fixture
def full_session(stand_in):
    """Three benchmarks on checkpoint 100 (other generation parameters, batch_size, choice_scoring), then one on
    checkpoint 200, then one on checkpoint 200 with another gpu_memory_utilization: one worker runs all five."""
    job, session, calls = stand_in
    outs = [job("ckpt-100", generation={"max_new_tokens": 4}),
            job("ckpt-100", generation={"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9}, batch_size=1),
            job("ckpt-100", generation={"max_new_tokens": 2, "stop": ["X"]},
                backend_options={"choice_scoring": "generate"}),
            job("ckpt-200", generation={"max_new_tokens": 4}),
            job("ckpt-200", generation={"max_new_tokens": 4}, backend_options={"gpu_memory_utilization": 0.5})]
    rcs = session(*outs)
    return outs, rcs, calls()


@pytest.mark.slow
def test_a_checkpoints_benchmarks_share_one_vllm_engine_with_their_own_sampling_and_batch_size(full_session):
    outs, rcs, calls = full_session
    assert rcs == [0] * 5
    assert summary(calls)[:6] == [("init", "ckpt-100", None), ("generate", 4, 3),
                                  ("generate", 9, 1), ("generate", 9, 1), ("generate", 9, 1),
                                  ("generate", 2, 3)]
    assert calls[2]["generate"]["sampling"] == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "stop": None,
                                                "seed": 0}
    assert calls[5]["generate"]["sampling"] == {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "stop": ["X"],
                                                "seed": 0}
    assert [read(out, "run_metadata.json")["timings"]["model"] for out in outs[:3]] == [
        "loaded", "reused (warm worker, same checkpoint)", "reused (warm worker, same checkpoint)"]
    # one worker: the log of each job names the same process
    pids = {open(os.path.join(out, "infer.stderr.log")).read().split("warm worker pid ")[1].split()[0]
            for out in outs}
    assert len(pids) == 1


@pytest.mark.slow
def test_each_benchmark_of_a_session_writes_its_own_predictions_and_run_metadata(full_session):
    outs, rcs, _ = full_session
    assert rcs == [0] * 5
    for out, tokens, batch in zip(outs, (4, 9, 2, 4, 4), (256, 1, 256, 256, 256)):
        rows, meta = read(out, "predictions.jsonl"), read(out, "run_metadata.json")
        assert [r["sample_id"] for r in rows] == ["q0", "q1", "q2"] and all(r["status"] == "ok" for r in rows)
        assert rows[1]["response"]["text"] == "WHAT IS 1 PLUS 1"
        assert {(r["run_config"]["params"]["max_new_tokens"], r["run_config"]["batch_size"]) for r in rows} == {
            (tokens, batch)}
        assert meta["generation"]["max_new_tokens"] == tokens and meta["n_ok"] == 3
        assert meta["checkpoint"].endswith("ckpt-200" if out in outs[3:] else "ckpt-100")
        # how this job ran, not how the worker's first job did (it said batch_size 256 for the second job)
        assert meta["backend_info"]["batch_size"] == batch, (out, meta["backend_info"])


@pytest.mark.slow
def test_another_checkpoint_or_another_engine_option_builds_a_new_engine(full_session):
    outs, rcs, calls = full_session
    assert rcs == [0] * 5
    assert summary(calls)[6:] == [("init", "ckpt-200", None), ("generate", 4, 3),
                                  ("init", "ckpt-200", 0.5), ("generate", 4, 3)]
    assert [read(out, "run_metadata.json")["timings"]["model"] for out in outs[3:]] == ["loaded", "loaded"]
    assert read(outs[4], "run_metadata.json")["backend_info"]["gpu_memory_utilization"] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("bench, rc, message", [
    ({"generation": {"top_k": 0}}, 1, "SamplingParams rejects ['top_k']: top_k must be -1 (disable)"),
    ({"generation": {"num_beams": 4}}, 2, "generation.num_beams: the vllm backend does not take num_beams"),
    ({"backend_options": {"choice_scoring": "loglikelihood"}}, 1, "the vllm backend generates only"),
], ids=["refused_by_sampling_params", "not_a_vllm_parameter", "loglikelihood_scoring"])
def test_a_refused_benchmark_mid_session_fails_alone_and_the_next_one_runs(stand_in, bench, rc, message):
    job, session, calls = stand_in
    before, bad, after = job("ckpt-100"), job("ckpt-100", **bench), job("ckpt-100", generation={"max_new_tokens": 5})
    assert session(before, bad, after) == [0, rc, 0]
    assert message in open(os.path.join(bad, "infer.stderr.log")).read()
    assert not os.path.exists(os.path.join(bad, "run_metadata.json"))
    assert not os.path.exists(os.path.join(bad, "predictions.jsonl"))
    for out in (before, after):
        assert len(read(out, "predictions.jsonl")) == 3 and read(out, "run_metadata.json")["n_ok"] == 3
    # the failed job ended its worker; the next one ran in a fresh worker with a fresh engine
    assert summary(calls()) == [("init", "ckpt-100", None), ("generate", 64, 3),
                                ("init", "ckpt-100", None), ("generate", 5, 3)]


def test_every_engine_option_decides_whether_an_engine_is_reused():
    """An option that changes vllm.LLM(...) but not the reuse key would give a benchmark another benchmark's
    engine; batch_size and choice_scoring are read per benchmark (reconfigure)."""
    assert set(ENGINE_OPTIONS) | {"engine_args", "chat_template"} <= set(VLLMBackend.LOAD_OPTIONS)
    assert set(VLLMBackend.OPTIONS) - set(VLLMBackend.LOAD_OPTIONS) == {"batch_size", "choice_scoring"}


# ---- which warm worker a job gets (pure: evaluator/daemon/local.py choose_worker) -------------------------------

class Idle:
    def __init__(self, session: str):
        self.session = session.rstrip("*+")
        self.bound = session.endswith("*")  # it ran a vllm job (a fresh-session backend)
        self.engine = session.endswith(("*", "+"))  # "+": it ran a vllm job reloading weights in place


@pytest.mark.parametrize("warm, fresh, idle_sessions, chosen, retired", [
    ("on", False, ["ckpt-1"], 0, []),            # hf: any idle worker, the next checkpoint's weights swap in
    ("on", True, ["ckpt-1"], None, [0]),         # vllm: another checkpoint gets a fresh worker
    ("on", True, ["ckpt-1", "ckpt-2"], 1, []),   # vllm: the worker of this checkpoint's session is reused
    ("checkpoint", False, ["ckpt-1"], None, [0]),
    ("checkpoint", False, ["ckpt-2"], 0, []),
    ("on", False, [], None, []),
    # an hf job never takes a worker that ran a vllm job on another checkpoint (its engine would follow it to
    # the next checkpoint, where a vllm job would build a second one in the same process); that worker retires
    ("on", False, ["ckpt-1*"], None, [0]),
    ("on", False, ["ckpt-1*", "ckpt-3"], 1, [0]),
    ("on", True, ["ckpt-2*"], 0, []),            # a vllm job on its own checkpoint: reused
], ids=["hf-any", "vllm-fresh", "vllm-same-session", "checkpoint-mode-fresh", "checkpoint-mode-same", "none-idle",
        "hf-not-after-vllm", "hf-other-worker", "bound-same-session"])
def test_a_vllm_job_on_another_checkpoint_never_reuses_a_warm_worker(warm, fresh, idle_sessions, chosen, retired):
    from evaluator.daemon.local import choose_worker
    idle = [Idle(s) for s in idle_sessions]
    worker, retire = choose_worker(idle, "ckpt-2", warm, fresh, engine=fresh)
    assert worker is (None if chosen is None else idle[chosen])
    assert retire == [idle[i] for i in retired]


@pytest.mark.parametrize("engine, idle_sessions, chosen, retired", [
    (True, ["ckpt-1+"], 0, []),             # a reloading vllm job takes the engine of another checkpoint (swap)
    (True, ["ckpt-1"], 0, []),              # or any worker
    (False, ["ckpt-1+"], None, [0]),        # an hf job does not: it would close the engine, the next vllm job
    (False, ["ckpt-1+", "ckpt-3"], 1, [0]),  # would build another one in the same process
    (False, ["ckpt-2+"], None, [0]),         # not even on its own checkpoint
    (False, ["ckpt-2*"], None, [0]),
    (True, ["ckpt-2+"], 0, []),
], ids=["reload-takes-engine", "reload-takes-any", "hf-not-after-reload", "hf-other-worker-after-reload",
        "hf-not-same-checkpoint-reload", "hf-not-same-checkpoint-bound", "vllm-same-checkpoint"])
def test_a_worker_holding_a_reloading_vllm_engine_is_given_only_vllm_jobs_of_other_checkpoints(engine, idle_sessions,
                                                                                               chosen, retired):
    from evaluator.daemon.local import choose_worker
    idle = [Idle(s) for s in idle_sessions]
    worker, retire = choose_worker(idle, "ckpt-2", "on", False, engine)
    assert worker is (None if chosen is None else idle[chosen])
    assert retire == [idle[i] for i in retired]


def test_only_the_vllm_backend_asks_for_a_fresh_worker_per_checkpoint_unless_it_reloads_weights():
    from evaluator.stages.inference.backends import BACKENDS, fresh_worker_per_checkpoint
    assert {name: fresh_worker_per_checkpoint(name, {}) for name in BACKENDS} == {"hf": False, "vllm": True,
                                                                                 "openai": False}
    for value, fresh in ((True, False), ("on", False), (False, True), ("off", True)):
        assert fresh_worker_per_checkpoint("vllm", {"weight_reload": value}) is fresh, value


RELOAD_RULES = r"""
import json, os, shutil, sys, torch
from safetensors.torch import save_file
from evaluator.stages.inference.backends.vllm import VLLMBackend, reload_signature
from evaluator.stages.inference.params import GenerationParams
root = sys.argv[1]

def make(name, config=None, tensors=None, files=None):
    d = os.path.join(root, name)
    os.makedirs(d)
    cfg = {"model_type": "llama", "hidden_size": 4, "transformers_version": "4.57.1", **(config or {})}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = {"a.weight": torch.ones(2, 4), "b.weight": torch.ones(4)}
    t.update(tensors or {})
    save_file({k: v for k, v in t.items() if v is not None}, os.path.join(d, "model.safetensors"))
    for fname, text in {"tokenizer.json": "{}", "generation_config.json": '{"eos_token_id": 2}', **(files or {})}.items():
        with open(os.path.join(d, fname), "w") as f:
            f.write(text)
    return d

base = reload_signature(make("base"))
same = {
    "other values": make("values", tensors={"a.weight": torch.zeros(2, 4)}),
    "another transformers_version": make("tv", config={"transformers_version": "5.0.0"}),
}
other = {
    "config": make("config", config={"hidden_size": 8}),
    "tokenizer": make("tok", files={"tokenizer.json": '{"x": 1}'}),
    "chat template": make("chat", files={"chat_template.jinja": "{{ messages }}"}),
    "generation config": make("gen", files={"generation_config.json": '{"eos_token_id": 3}'}),
    "extra tensor": make("extra", tensors={"c.weight": torch.ones(1)}),
    "missing tensor": make("missing", tensors={"b.weight": None}),
    "shape": make("shape", tensors={"a.weight": torch.ones(4, 2)}),
    "dtype": make("dtype", tensors={"a.weight": torch.ones(2, 4, dtype=torch.bfloat16)}),
}
out = {"base": base is not None, "no weights": reload_signature(os.path.join(root, "nowhere")) is None}
out.update({k: reload_signature(v) == base for k, v in {**same, **other}.items()})

class Engine:  # a loaded engine's stand-in: records what swap asks of it
    def __init__(self):
        self.calls = []
    def collective_rpc(self, method, args=()):
        self.calls.append([method, [os.path.basename(a) for a in args]])
    def reset_prefix_cache(self):
        self.calls.append(["reset_prefix_cache", []])

def swapped(options, target):
    b = VLLMBackend(os.path.join(root, "base"), options, GenerationParams())
    b.llm, b.signature = Engine(), (base if options.get("weight_reload") else None)
    return b.swap(target), b.llm.calls
out["swap"] = {"reload on, other values": swapped({"weight_reload": True}, same["other values"]),
               "reload on, other config": swapped({"weight_reload": True}, other["config"]),
               "reload off": swapped({}, same["other values"])}
print(json.dumps(out))
"""


def test_weight_reload_swaps_only_a_checkpoint_equal_to_the_engines_but_for_its_values(tmp_path):
    """vLLM's reload_weights only warns about a tensor it did not load and never rereads config, tokenizer or
    generation config: swap() reloads only a checkpoint whose config.json (but transformers_version), tokenizer,
    generation config and tensor names/shapes/dtypes equal the engine's, and only with `weight_reload` on; then it
    reloads through the worker extension and drops the prefix cache. Real safetensors files in the inference venv;
    the engine is a stand-in recording calls (the real reload: tests/test_vllm_real.py)."""
    proc = subprocess.run([os.path.join(ROOT, ".venvs", "inference", "bin", "python"), "-c", RELOAD_RULES,
                           str(tmp_path)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    swap = out.pop("swap")
    assert out == {"base": True, "no weights": True, "other values": True, "another transformers_version": True,
                   "config": False, "tokenizer": False, "chat template": False, "generation config": False,
                   "extra tensor": False, "missing tensor": False, "shape": False, "dtype": False}
    assert swap == {"reload on, other values": [True, [["evaluator_reload_weights", ["values"]],
                                                       ["reset_prefix_cache", []]]],
                    "reload on, other config": [False, []],
                    "reload off": [False, []]}


# ---- through the real daemon --------------------------------------------------------------------------------------
PID_LOGGING = '''
_StandIn = LLM


class LLM(_StandIn):
    def __init__(self, model, **kwargs):
        log("pid", os.getpid())
        super().__init__(model, **kwargs)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        log("generate_pid", os.getpid())
        return super().generate(prompts, sampling_params, use_tqdm)
'''


def daemon_with_stand_in(tmp_path, fakes, benches) -> list[dict]:
    """The real daemon (`--once`, warm_workers: on) on the huggingface run under tmp_path/ckpt, the stand-in vllm
    in `fakes` first on PYTHONPATH; returns the stand-in's log (each engine init and call)."""
    cfg = write_config(tmp_path, benches, watch={"layout": "huggingface", "iteration_interval": 100},
                       executor={"warm_workers": "on"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fakes), ROOT]), FAKE_VLLM_LOG=str(tmp_path / "vllm.log"))
    proc = subprocess.run([DAEMON_PY, EVALUATOR, "--config", cfg, "--once"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "vllm.log") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_the_daemon_gives_each_checkpoint_of_a_vllm_benchmark_its_own_worker_and_engine(tmp_path):
    """The real daemon (`--once`, warm_workers: on) on two checkpoints x two vllm benchmarks: each checkpoint's two
    benchmarks share one engine in one worker, and the second checkpoint gets a fresh worker (a second engine in
    one process may not get the first one's GPU memory back). Stand-in vllm/torch first on PYTHONPATH, as above; the
    daemon, its executor, the workers and both stages are real."""
    fakes = tmp_path / "fakes"
    write_fake_vllm(fakes, FAKE_VLLM + PID_LOGGING)
    for step in (100, 200):
        ckpt = tmp_path / "ckpt" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "transformers_version": "4.57.1"}))
        header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", step))
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    rows = [dict(r, target=r["messages"][0]["content"].upper()) for r in ROWS]
    data = canonical_dataset(tmp_path / "data", rows)
    benches = [{"name": name, "type": "dataset", "dataset": data, "backend": "vllm", "metrics": ["exact_match"],
                "generation": {"max_new_tokens": n}} for name, n in (("a", 4), ("b", 2))]
    calls = daemon_with_stand_in(tmp_path, fakes, benches)
    engines = [(os.path.basename(c["init"]["model"]), pid) for c, pid in
               zip([c for c in calls if "init" in c], [c["pid"] for c in calls if "pid" in c])]
    assert sorted(name for name, _ in engines) == ["checkpoint-100", "checkpoint-200"]  # one engine each
    assert engines[0][1] != engines[1][1]  # in two worker processes
    by_pid = {}
    for c in calls:
        if "generate_pid" in c:
            by_pid[c["generate_pid"]] = by_pid.get(c["generate_pid"], 0) + 1
    assert sorted(by_pid.values()) == [2, 2]  # each worker ran both benchmarks of its checkpoint
    meta = {(it, b): read(str(tmp_path / "cache" / "results" / "tiny" / f"iter_{it:07d}" / b), "run_metadata.json")
            for it in (100, 200) for b in "ab"}
    assert sorted(m["timings"]["model"] for m in meta.values()) == ["loaded", "loaded"] + \
        ["reused (warm worker, same checkpoint)"] * 2
    for it in (100, 200):  # recorded with their metrics
        assert read(str(tmp_path / "cache" / "results" / "tiny" / f"iter_{it:07d}" / "a"),
                    "metrics.json")["metrics"]["exact_match"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")], ids=["hf-first", "vllm-first"])
def test_an_hf_benchmark_between_vllm_ones_does_not_carry_a_vllm_worker_to_the_next_checkpoint(tmp_path, tiny_lm,
                                                                                              names):
    """One hf benchmark and one vllm benchmark on three checkpoints, warm_workers: on. The hf job on the next
    checkpoint took the worker that had just built a vLLM engine (hf asks for no fresh worker), which moved the
    worker's session to that checkpoint, so the vllm job there "reused" it and built a second engine in the same
    process, then a third (a closed engine may not give its GPU memory back). Each engine must be built in a
    worker of its own. Stand-in vllm first on PYTHONPATH (FAKE_VLLM, no fake torch: the hf jobs run real
    transformers on a tiny GPT-2); the daemon, its executor and workers are real."""
    fakes = tmp_path / "fakes"
    (fakes / "vllm").mkdir(parents=True)
    (fakes / "vllm" / "__init__.py").write_text(FAKE_VLLM + PID_LOGGING)
    from test_hf_backend import FAKE_PLATFORMS
    (fakes / "vllm" / "platforms.py").write_text(FAKE_PLATFORMS)
    model = tiny_lm("gpt2")
    for step in (100, 200, 300):
        ckpt = tmp_path / "ckpt" / f"checkpoint-{step}"
        shutil.copytree(model, ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    data = canonical_dataset(tmp_path / "data", [dict(r, target="x") for r in ROWS])
    benches = [{"name": name, "type": "dataset", "dataset": data, "backend": backend, "metrics": ["exact_match"],
                "generation": {"max_new_tokens": 3}} for name, backend in zip(names, ("hf", "vllm"))]
    calls = daemon_with_stand_in(tmp_path, fakes, benches)
    inits = [os.path.basename(c["init"]["model"]) for c in calls if "init" in c]
    pids = [c["pid"] for c in calls if "pid" in c]
    assert sorted(inits) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert len(set(pids)) == 3, list(zip(inits, pids))  # one engine per worker process
