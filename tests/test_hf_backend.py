"""The hf backend on text LMs: tiny GPT-2 (plain prompts) and Llama (chat template) checkpoints built offline by
tests/stage_scripts/make_tiny_lm.py, run through `tools/bench.py inference` (the inference stage in its venv)."""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import struct
import subprocess
import wave

import pytest

from conftest import DAEMON_PY, ROOT, canonical_dataset

BENCH = os.path.join(ROOT, "tools", "bench.py")
RESULT_FIELDS = {"sample_id", "dataset_id", "backend", "run_config", "request_messages", "response", "status",
                 "latency_ms", "attempts", "error"}
PROMPTS = [  # lengths from 1 to ~30 tokens, so a batch of 4 mixes short and long (left padding)
    "Hi", "What is two plus two?", "Tell me a story about a fox and a dog that bark at night under the blue sky.",
    "The cat", "one two three four five six seven eight nine ten eleven twelve", "Describe the sound.", "Grass is",
    "Question: what colour is the sea? Answer:", "A dog barks at night. The cat sat on the mat. The sky is blue.",
    "(A) red (B) blue (C) green", "I am fine", "Hello, how are you today?",
]
MC = [
    ("Question: what colour is the sea? Answer:", ["red", "blue", "green"]),
    ("What is two plus two?", ["Four.", "five", "The cat sat on the mat."]),
    ("The sky is", ["blue.", "green.", "a dog"]),
    ("Grass is", ["green.", "blue.", "one two three"]),
]


def text_rows() -> list:
    rows = [{"id": f"q{i:02d}", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS)]
    rows[3]["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    rows[5]["messages"] = [{"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": "Hello, how are you today?"},
                           {"role": "user", "content": "I am fine, thank you."}]
    return rows


def bench(dataset: str, model: str, out: str, *extra: str, env=None, timeout=300):
    proc = subprocess.run([DAEMON_PY, BENCH, "inference", dataset, "--model", model, "--output-root", out,
                           "--model-name", "m", *extra], capture_output=True, text=True, timeout=timeout,
                          env=env)
    path = os.path.join(out, "m", os.path.basename(dataset), "predictions.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f]
    return proc, rows


@pytest.fixture(scope="session")
def tiny_lms(tiny_lm) -> dict:
    return {"gpt2": tiny_lm("gpt2"), "llama": tiny_lm("llama", chat=True)}


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> str:
    return canonical_dataset(str(tmp_path_factory.mktemp("text") / "prompts"), text_rows(), "tiny_text")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_outputs_equal_one_by_one_outputs_in_sample_order(arch, tiny_lms, text_dataset, tmp_path):
    # min_new_tokens keeps the end token away, so every row has 10 tokens to compare, not an empty string
    params = ["--param", "max_new_tokens=10", "--param", "min_new_tokens=10"]
    p4, batched = bench(text_dataset, tiny_lms[arch], str(tmp_path / "b4"), "--batch-size", "4", *params)
    p1, single = bench(text_dataset, tiny_lms[arch], str(tmp_path / "b1"), "--batch-size", "1", *params)
    assert p4.returncode == 0, p4.stderr[-3000:]
    assert p1.returncode == 0, p1.stderr[-3000:]
    ids = [f"q{i:02d}" for i in range(len(PROMPTS))]
    assert [r["sample_id"] for r in batched] == ids == [r["sample_id"] for r in single]
    assert all(r["status"] == "ok" for r in batched + single)
    assert [r["run_config"]["batch_size"] for r in (batched[0], single[0])] == [4, 1]
    texts = [r["response"]["text"] for r in batched]
    assert texts == [r["response"]["text"] for r in single]
    assert len(set(texts)) > 1 and all(texts)
    for b, s in zip(batched, single):
        assert b["response"]["usage"] == s["response"]["usage"]  # padding is not counted
        assert b["response"]["usage"]["completion_tokens"] == 10


@pytest.fixture(scope="session")
def gpt2_reference(venvs, tiny_lms, text_dataset) -> dict:
    """Computed directly with transformers in the inference venv, not through the backend: per prompt of the
    text dataset [prompt tokens, greedy tokens up to the end token (max 12)]; per MC question the summed
    log p(" choice" | question) of each choice, one forward pass per choice."""
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({tiny_lms['gpt2']!r})
model = AutoModelForCausalLM.from_pretrained({tiny_lms['gpt2']!r}).eval()
usage = {{}}
for line in open({os.path.join(text_dataset, 'test.jsonl')!r}):
    r = json.loads(line)  # no chat template: the turns' texts joined by newlines
    ids = tok("\\n".join(m["content"] for m in r["messages"]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    usage[r["id"]] = [ids.shape[1], next((k + 1 for k, t in enumerate(new) if t == tok.eos_token_id), len(new))]
mc = []
for question, choices in {MC!r}:
    ctx = tok(question)["input_ids"]
    scores = []
    for choice in choices:
        ids = tok(question + " " + choice)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
    mc.append(scores)
print(json.dumps({{"usage": usage, "mc": mc}}))
"""
    proc = subprocess.run([venvs["inference"], "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_usage_counts_the_prompt_tokens_and_the_generated_tokens_up_to_the_end_token(tiny_lms, text_dataset,
                                                                                   gpt2_reference, tmp_path):
    proc, rows = bench(text_dataset, tiny_lms["gpt2"], str(tmp_path), "--param", "max_new_tokens=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in rows:
        prompt_tokens, completion_tokens = gpt2_reference["usage"][row["sample_id"]]
        assert row["response"]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens}


@pytest.mark.slow
def test_loglikelihood_choice_scoring_picks_the_choice_with_the_highest_summed_logprob(tiny_lms, gpt2_reference,
                                                                                     tmp_path):
    root = canonical_dataset(str(tmp_path / "mc"), [
        {"id": f"mc{i}", "messages": [{"role": "user", "content": q}], "choices": c, "target": c[0]}
        for i, (q, c) in enumerate(MC)])
    proc, rows = bench(root, tiny_lms["gpt2"], str(tmp_path / "out"), "--backend-opt", "choice_scoring=loglikelihood")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["sample_id"] for r in rows] == [f"mc{i}" for i in range(len(MC))]
    for row, (_, choices), scores in zip(rows, MC, gpt2_reference["mc"]):
        assert row["status"] == "ok", row["error"]
        assert row["response"]["choice_logprobs"] == pytest.approx(scores, abs=1e-3)
        assert row["response"]["text"] == choices[max(range(len(scores)), key=scores.__getitem__)]


# questions of different lengths with 2-5 choices of 1 to ~12 tokens; the third has an empty prompt, the fourth a
# trailing space (moved to the continuation), the last no choices at all
SCORED = [
    ("Question: what colour is the sea? Answer:", ["red", "blue", "green", "a dog barks at night under the sky"]),
    ("What is two plus two?", ["Four.", "five", "The cat sat on the mat."]),
    ("", ["blue.", "green.", "a dog"]),
    ("Grass is ", ["green.", "blue.", "one two three four five"]),
    ("Tell me a story about a fox and a dog that bark at night under the blue sky. The cat",
     ["sat", "sat on the mat", "B", "(A) red", "is fine, thank you."]),
    ("Hi", ["(A)", "(B)"]),
    ("The sky is", ["blue.", "green. Grass is blue. The cat sat on the mat.", "a dog"]),
    ("Describe the sound.", []),
]
SCORING = r"""
import json, sys
sys.path.insert(0, "scripts")
from bench_loglikelihood import unbatched_choice_logprobs   # the backend's rule before batching: the reference
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.inference.backends.hf import HFBackend
from evaluator.stages.inference.params import GenerationParams, Progress

path, chat, questions = sys.argv[1], sys.argv[2] == "chat", json.loads(sys.argv[3])
samples = [Sample(id=f"s{i}", messages=[{"role": "user", "content": q}], choices=c or None)
           for i, (q, c) in enumerate(questions)]
# batch_size 5: batches split questions unevenly, so each holds contexts and continuations of several lengths
backend = HFBackend(path, {"choice_scoring": "loglikelihood", "batch_size": 5, "dtype": "float32",
                           "chat_template": chat}, GenerationParams())
backend.load()
rows = backend.run(samples, "mc", Progress(len(samples)))
scorable = [s for s in samples if s.choices]
lm = HFLM(pretrained=backend.runner.model, tokenizer=backend.runner.tokenizer, batch_size=4, device="cpu")
requests = [Instance(request_type="loglikelihood", doc={},
                     arguments=(backend.runner.prompt(s), backend.runner.continuation(c)), idx=0)
            for s in scorable for c in s.choices]
harness = iter(logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True))
print(json.dumps({
    "batched": [r.to_dict() for r in rows],
    "unbatched": [unbatched_choice_logprobs(backend.runner, s) for s in scorable],
    "lm_eval": [[next(harness) for _ in s.choices] for s in scorable],
}))
"""


@pytest.fixture(scope="module", params=[("gpt2", "plain"), ("llama", "chat"), ("llama", "plain")],
                ids=["gpt2", "llama-chat", "llama-plain"])
def scored(request, venvs, tiny_lms) -> dict:
    """Every question of SCORED scored by the batched backend, by the unbatched rule and by lm-evaluation-harness's
    HFLM.loglikelihood, on the same model object (inference venv)."""
    arch, prompts = request.param
    proc = subprocess.run([venvs["inference"], "-c", SCORING, tiny_lms[arch], prompts, json.dumps(SCORED)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = out["batched"]
    ok = [r for r, (_, choices) in zip(rows, SCORED) if choices]
    return {"rows": rows, "batched": [r["response"]["choice_logprobs"] for r in ok],
            "picked": [r["response"]["text"] for r in ok], "unbatched": out["unbatched"], "lm_eval": out["lm_eval"]}


def best_choices(scores: list) -> list:
    choices = [c for _, c in SCORED if c]
    return [c[max(range(len(s)), key=s.__getitem__)] for c, s in zip(choices, scores)]


@pytest.mark.slow
def test_batched_loglikelihood_equals_one_forward_per_choice(scored):
    for batched, reference in zip(scored["batched"], scored["unbatched"], strict=True):
        assert batched == pytest.approx(reference, abs=1e-5)
    assert scored["picked"] == best_choices(scored["unbatched"])


@pytest.mark.slow
def test_batched_loglikelihood_equals_lm_evaluation_harness_on_the_same_requests(scored):
    for batched, harness in zip(scored["batched"], scored["lm_eval"], strict=True):
        assert batched == pytest.approx(harness, abs=1e-5)
    assert scored["picked"] == best_choices(scored["lm_eval"])


@pytest.mark.slow
def test_a_question_without_choices_fails_alone_in_a_batched_run(scored):
    statuses = [r["status"] for r in scored["rows"]]
    assert statuses == ["ok"] * (len(SCORED) - 1) + ["error"]
    assert "has no choices to score" in scored["rows"][-1]["error"]["message"]


@pytest.fixture(scope="module")
def first_ten_with_an_audio_row(tiny_lms, tmp_path_factory):
    """12 rows, the third carrying an audio part, run with --sample-size 10 on the (text-only) Llama."""
    root = str(tmp_path_factory.mktemp("mixed") / "mixed")
    os.makedirs(root)
    with wave.open(os.path.join(root, "beep.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 5))) for i in range(8000)))
    rows = text_rows()
    rows[2]["messages"] = [{"role": "user", "content": [{"type": "audio", "path": "beep.wav"},
                                                        {"type": "text", "text": "What is this?"}]}]
    canonical_dataset(root, rows, "tiny_text")
    return bench(root, tiny_lms["llama"], str(tmp_path_factory.mktemp("mixed_out")), "--sample-size", "10",
                 "--param", "max_new_tokens=4", "--max-error-rate", "0.2")


@pytest.mark.slow
def test_sample_size_writes_exactly_that_many_rows_with_every_result_field(first_ten_with_an_audio_row):
    proc, rows = first_ten_with_an_audio_row
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["sample_id"] for r in rows] == [f"q{i:02d}" for i in range(10)]
    for row in rows:
        assert set(row) == RESULT_FIELDS
        assert row["dataset_id"] == "tiny_text" and row["backend"] == "hf" and row["attempts"] == 1
        assert row["run_config"]["params"]["max_new_tokens"] == 4
        assert row["request_messages"] and row["latency_ms"] >= 0


@pytest.mark.slow
def test_a_text_model_given_an_audio_sample_fails_that_sample_only(first_ten_with_an_audio_row):
    _, rows = first_ten_with_an_audio_row
    errors = [r for r in rows if r["status"] == "error"]
    assert [r["sample_id"] for r in errors] == ["q02"]
    assert "audio" in errors[0]["error"]["message"] and "text-only" in errors[0]["error"]["message"]
    assert all(r["error"] is None and r["response"]["usage"]["completion_tokens"] >= 1
               for r in rows if r["sample_id"] != "q02")


@pytest.mark.slow
def test_a_model_alias_offline_exits_1_saying_which_hub_model_and_how_to_download(text_dataset, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # as on a machine without the hub, without its retries
    proc, rows = bench(text_dataset, "gemma3n", str(tmp_path), env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "'gemma3n' is an alias of the hub model 'google/gemma-3n-E4B-it'" in proc.stderr
    assert "huggingface-cli download google/gemma-3n-E4B-it" in proc.stderr
    assert "Traceback" not in proc.stderr and rows == []


@pytest.mark.slow
def test_a_local_directory_named_like_an_alias_is_used_as_the_checkpoint(venvs, tiny_lms, text_dataset, tmp_path):
    """The daemon's job names `gemma3n`; a ./gemma3n checkpoint in the stage's working directory wins."""
    shutil.copytree(tiny_lms["gpt2"], str(tmp_path / "gemma3n"))
    job = {"stage": "inference", "run": "r", "iteration": 0, "checkpoint": "gemma3n", "output_dir": str(tmp_path / "o"),
           "benchmark": {"name": "prompts", "type": "dataset", "dataset": text_dataset, "sample_size": 2,
                         "generation": {"max_new_tokens": 2}}}
    os.makedirs(job["output_dir"])
    with open(tmp_path / "job.json", "w") as f:
        json.dump(job, f)
    proc = subprocess.run([venvs["inference"], "-m", "evaluator.stages.inference", "--job", str(tmp_path / "job.json")],
                          cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(job["output_dir"], "run_metadata.json")) as f:
        meta = json.load(f)
    assert meta["model"] == str(tmp_path / "gemma3n") and meta["backend_info"]["model_type"] == "gpt2"


# ---- the vllm backend ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vllm_backend_without_vllm_or_a_device_exits_1_and_never_falls_back_to_hf(tiny_lms, text_dataset, tmp_path):
    proc, rows = bench(text_dataset, tiny_lms["gpt2"], str(tmp_path), "--backend", "vllm")
    if proc.returncode == 0:  # a CUDA machine with vLLM installed: the rows must come from vLLM
        assert rows and all(r["backend"] == "vllm" for r in rows)
        return
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "backend vllm cannot run here" in proc.stderr and "--backend hf" in proc.stderr
    assert "vLLM is not installed" in proc.stderr or "vLLM found no device" in proc.stderr
    assert "Traceback" not in proc.stderr and rows == []


FAKE_VLLM = '''
import base64, json, os, types
__version__ = "0.16.0-fake"
LOG = os.environ["FAKE_VLLM_LOG"]

def log(kind, data):
    with open(LOG, "a") as f:
        f.write(json.dumps({kind: data}) + "\\n")

class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

def output(prompt_len, text):
    return types.SimpleNamespace(prompt_token_ids=list(range(prompt_len)), outputs=[types.SimpleNamespace(
        text=text, token_ids=[7, 8, 9], finish_reason="stop")])

class LLM:
    def __init__(self, model, **kwargs):
        log("init", {"model": model, **kwargs})

    def get_tokenizer(self):
        return types.SimpleNamespace(chat_template=os.environ.get("FAKE_CHAT_TEMPLATE") or None)

    def chat(self, conversations, sampling_params, use_tqdm=True):
        log("chat", {"conversations": conversations, "sampling": sampling_params.kwargs})
        outs = []
        for conv in conversations:
            parts = [p for m in conv if not isinstance(m["content"], str) for p in m["content"]]
            audio = [base64.b64decode(p["input_audio"]["data"]) for p in parts if p["type"] == "input_audio"]
            if any(a.startswith(b"BAD") for a in audio):
                raise ValueError("cannot decode audio")
            outs.append(output(10 * len(conv), f" heard {len(audio)} clip(s) "))
        return outs

    def generate(self, prompts, sampling_params, use_tqdm=True):
        log("generate", {"prompts": prompts, "sampling": sampling_params.kwargs})
        return [output(len(p.split()), p.upper()) for p in prompts]
'''
FAKE_TORCH = "class cuda:\n    is_available = staticmethod(lambda: True)\n"
# vllm.platforms.current_platform: the device vLLM found (a CUDA GPU, for the stand-in)
FAKE_PLATFORMS = ("import types\ncurrent_platform = types.SimpleNamespace(device_type='cuda', "
                  "is_unspecified=lambda: False)\n")


def write_fake_vllm(fakes, source: str = FAKE_VLLM) -> None:
    """A stand-in `vllm` package (with vllm.platforms) and `torch` under `fakes`, to put first on PYTHONPATH."""
    (fakes / "vllm").mkdir(parents=True)
    (fakes / "torch").mkdir()
    (fakes / "vllm" / "__init__.py").write_text(source)
    (fakes / "vllm" / "platforms.py").write_text(FAKE_PLATFORMS)
    (fakes / "torch" / "__init__.py").write_text(FAKE_TORCH)


def run_with_fake_vllm(tmp_path, rows, chat_template: bool, *extra):
    fakes = tmp_path / "fakes"
    write_fake_vllm(fakes)
    dataset = canonical_dataset(str(tmp_path / "ds"), rows)
    env = dict(os.environ, PYTHONPATH=str(fakes), FAKE_VLLM_LOG=str(tmp_path / "vllm.log"),
               FAKE_CHAT_TEMPLATE="{{ messages }}" if chat_template else "",
               EVALUATOR_INFERENCE_PYTHON=DAEMON_PY)  # no torch needed: the fakes stand in for vLLM and CUDA
    proc, out = bench(dataset, "org/some-chat-model", str(tmp_path / "out"), "--backend", "vllm", *extra, env=env)
    with open(tmp_path / "vllm.log") as f:
        calls = [json.loads(line) for line in f]
    return proc, out, calls


def test_vllm_that_finds_no_device_exits_1_naming_it_and_never_falls_back_to_hf(tmp_path):
    """A CUDA build of vLLM on a machine with no visible GPU: its platform detection finds nothing (the stand-in's
    vllm.platforms says so, as vLLM's UnspecifiedPlatform does)."""
    fakes = tmp_path / "fakes"
    write_fake_vllm(fakes)
    (fakes / "vllm" / "platforms.py").write_text(FAKE_PLATFORMS.replace("'cuda'", "''").replace(
        "lambda: False", "lambda: True"))
    dataset = canonical_dataset(str(tmp_path / "ds"), [{"id": "a", "messages": [{"role": "user", "content": "hi"}]}])
    env = dict(os.environ, PYTHONPATH=str(fakes), FAKE_VLLM_LOG=str(tmp_path / "vllm.log"),
               EVALUATOR_INFERENCE_PYTHON=DAEMON_PY)
    proc, rows = bench(dataset, "org/some-chat-model", str(tmp_path / "out"), "--backend", "vllm", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "backend vllm cannot run here: vLLM found no device" in proc.stderr and "--backend hf" in proc.stderr
    assert "Traceback" not in proc.stderr and rows == [] and not (tmp_path / "vllm.log").exists()


def test_vllm_backend_sends_chats_with_audio_parts_and_maps_options_and_generation(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "beep.wav").write_bytes(b"RIFF....WAVEfake audio bytes")
    (tmp_path / "ds" / "broken.wav").write_bytes(b"BAD bytes")
    rows = [{"id": "text", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"id": "audio", "messages": [{"role": "user", "content": [{"type": "audio", "path": "beep.wav"},
                                                                      {"type": "text", "text": "What is it?"}]}]},
            {"id": "broken", "messages": [{"role": "user", "content": [{"type": "audio", "path": "broken.wav"}]}]}]
    proc, out, calls = run_with_fake_vllm(
        tmp_path, rows, True, "--param", "max_new_tokens=7", "--param", "stop=END", "--max-error-rate", "0.5",
        "--backend-opt", "tensor_parallel_size=2", "--backend-opt", "gpu_memory_utilization=0.5",
        "--backend-opt", "max_model_len=2048")
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = calls[0]["init"]
    assert init == {"model": "org/some-chat-model", "seed": 0, "tensor_parallel_size": 2,
                    "gpu_memory_utilization": 0.5, "max_model_len": 2048, "limit_mm_per_prompt": {"audio": 4}}
    first = calls[1]["chat"]
    assert first["sampling"] == {"max_tokens": 7, "temperature": 0.0, "top_p": 1.0, "stop": ["END"], "seed": 0}
    assert first["conversations"][0] == rows[0]["messages"]
    audio_part, text_part = first["conversations"][1][0]["content"]
    assert audio_part == {"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF....WAVEfake audio bytes").decode(), "format": "wav"}}
    assert text_part == {"type": "text", "text": "What is it?"}
    # the batch failed on the broken clip: each sample was retried alone, only that one failed
    assert [r["sample_id"] for r in out] == ["text", "audio", "broken"]
    assert [r["status"] for r in out] == ["ok", "ok", "error"]
    assert all(r["backend"] == "vllm" for r in out)
    assert "cannot decode audio" in out[2]["error"]["message"]
    assert out[1]["response"]["text"] == "heard 1 clip(s)"
    assert out[1]["response"]["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_vllm_backend_without_a_chat_template_generates_from_the_joined_turns(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "two plus two"}]},
            {"id": "b", "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                                     {"role": "user", "content": "again"}]}]
    proc, out, calls = run_with_fake_vllm(tmp_path, rows, False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert calls[1]["generate"]["prompts"] == ["two plus two", "Hello\nHi\nagain"]
    assert [r["response"]["text"] for r in out] == ["TWO PLUS TWO", "HELLO\nHI\nAGAIN"]
    assert out[0]["response"]["usage"]["prompt_tokens"] == 3
