"""The demo's toy trainers (scripts/train_toy_lm.py, scripts/train_toy_captioner.py) write what real ones do.

Each trainer runs for real with --quick in the inference venv: checkpoints appear file by file with
trainer_state.json last and readable by another user, the held-out data is in the layout the
benchmarks read, and a checkpoint loads through the Auto classes and generates.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import wave

import pytest

from conftest import ROOT
from evaluator.benchmarks import clotho
from evaluator.benchmarks.dataset import load_dataset

LM = os.path.join(ROOT, "scripts", "train_toy_lm.py")
CAPTIONER = os.path.join(ROOT, "scripts", "train_toy_captioner.py")

# Loads one checkpoint the way the inference stage does and prints what it generated, as JSON.
LOAD_AND_GENERATE = r"""
import json, sys
import soundfile, torch
from transformers import AutoModelForCausalLM, AutoModelForSpeechSeq2Seq, AutoProcessor, AutoTokenizer
kind, ckpt, data = sys.argv[1:4]
if kind == "lm":
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    prompts = [json.loads(line)["messages"][0]["content"] for line in open(data + "/test.jsonl")][:4]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    info = {"chat_template": tok.chat_template, "eos": tok.eos_token, "pad": tok.pad_token,
            "padding_side": tok.padding_side, "model": type(model).__name__}
else:
    proc = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(ckpt)
    audio, rate = soundfile.read(data + "/evaluation/toy_000.wav", dtype="float32")
    feats = proc(audio=[audio], sampling_rate=rate, return_tensors="pt").input_features
    out = model.generate(feats, do_sample=False)
    texts = proc.batch_decode(out, skip_special_tokens=True)
    info = {"processor": type(proc).__name__, "model": type(model).__name__}
print(json.dumps({"texts": texts, "new_tokens": int(out.shape[1]), **info}))
"""


def train(venvs, script: str, out, data_out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([venvs["inference"], script, "--out", str(out), "--data-out", str(data_out), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_runs(venvs, tmp_path_factory):
    """Both trainers run once with --quick; tests read what they left."""
    root = tmp_path_factory.mktemp("toy")
    runs = {}
    for kind, script in (("lm", LM), ("captioner", CAPTIONER)):
        proc = train(venvs, script, root / kind, root / f"{kind}-data", "--quick", "--write-delay", "0.05")
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
        runs[kind] = (root / kind, root / f"{kind}-data", proc.stdout)
    return runs


def checkpoints(out) -> list[str]:
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    return sorted((os.path.join(out, n) for n in names), key=lambda p: int(p.rsplit("-", 1)[1]))


def load_and_generate(venvs, kind: str, ckpt: str, data) -> dict:
    proc = subprocess.run([venvs["inference"], "-c", LOAD_AND_GENERATE, kind, ckpt, str(data)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lm", "captioner"])
def test_checkpoints_land_file_by_file_with_trainer_state_last(quick_runs, kind):
    out, _, stdout = quick_runs[kind]
    ckpts = checkpoints(out)
    expected = {"lm": ["checkpoint-10", "checkpoint-20"], "captioner": ["checkpoint-2", "checkpoint-4"]}[kind]
    assert [os.path.basename(c) for c in ckpts] == expected
    needed = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "trainer_state.json"]
    if kind == "captioner":
        needed.append("processor_config.json")
    for ckpt in ckpts:
        files = os.listdir(ckpt)
        assert set(needed) <= set(files), f"{ckpt}: {files}"
        mtimes = {f: os.stat(os.path.join(ckpt, f)).st_mtime_ns for f in files}
        order = sorted(files, key=mtimes.get)
        assert order[0] == "config.json" and order[-1] == "trainer_state.json", order
        assert order.index("model.safetensors") < order.index("generation_config.json"), order
        assert len(set(mtimes.values())) == len(files), "files should land one by one, --write-delay apart"
        assert all(os.stat(os.path.join(ckpt, f)).st_mode & 0o777 == 0o644 for f in files)
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        assert state["global_step"] == int(ckpt.rsplit("-", 1)[1])
        assert state["log_history"] and state["log_history"][-1]["step"] == state["global_step"]
    assert os.path.exists(os.path.join(out, "training_done"))
    assert "loss" in stdout and "elapsed" in stdout


@pytest.mark.slow
def test_lm_held_out_set_is_a_canonical_dataset_of_raw_prompts(quick_runs):
    _, data, _ = quick_runs["lm"]
    with open(data / "metadata.json") as f:
        meta = json.load(f)
    assert meta["dataset_id"] == "toy-lm-arith" and meta["metrics"] == ["exact_match"]
    with open(data / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert 100 <= len(rows) <= 200
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        [message] = r["messages"]
        assert message["role"] == "user"
        a, b = message["content"].removeprefix("Q: ").removesuffix("=? A:").split("+")
        assert r["target"] == str(int(a) + int(b))
    assert len(load_dataset(str(data)).samples) == len(rows)  # and the project's own loader agrees


@pytest.mark.slow
def test_captioner_held_out_clips_follow_the_clotho_v2_layout(quick_runs):
    _, data, _ = quick_runs["captioner"]
    with open(data / "clotho_captions_evaluation.csv", newline="") as f:
        header = f.readline().strip()
        rows = list(csv.reader(f))
    assert header == "file_name,caption_1,caption_2,caption_3,caption_4,caption_5"
    assert 50 <= len(rows) <= 100
    for file_name, *captions in rows:
        assert len(captions) == 5 and all(c.strip() for c in captions), file_name
        with wave.open(str(data / "evaluation" / file_name)) as w:
            assert (w.getframerate(), w.getnchannels()) == (16000, 1)
            assert 0 < w.getnframes() <= 3 * 16000
    assert sorted(os.listdir(data / "evaluation")) == sorted(r[0] for r in rows)
    dataset = clotho.load(str(data), {})  # the project's own Clotho loader finds every clip
    assert len(dataset.samples) == len(rows) and all(len(s.references) == 5 for s in dataset.samples)


@pytest.mark.slow
def test_lm_checkpoint_loads_with_auto_classes_and_generates_from_raw_prompts(quick_runs, venvs):
    out, data, _ = quick_runs["lm"]
    result = load_and_generate(venvs, "lm", checkpoints(out)[-1], data)
    assert result["model"] == "GPT2LMHeadModel"
    assert result["chat_template"] is None  # the inference stage must feed the raw prompt
    assert (result["eos"], result["pad"], result["padding_side"]) == ("<|endoftext|>", "<|pad|>", "left")
    assert len(result["texts"]) == 4


@pytest.mark.slow
def test_captioner_checkpoint_loads_with_auto_classes_and_captions_a_clip(quick_runs, venvs):
    out, data, _ = quick_runs["captioner"]
    result = load_and_generate(venvs, "captioner", checkpoints(out)[-1], data)
    assert (result["processor"], result["model"]) == ("WhisperProcessor", "WhisperForConditionalGeneration")
    assert len(result["texts"]) == 1 and result["new_tokens"] > 1


@pytest.mark.slow
def test_same_seed_gives_the_same_weights(quick_runs, venvs, tmp_path):
    out, _, _ = quick_runs["lm"]
    proc = train(venvs, LM, tmp_path / "again", tmp_path / "data", "--quick", "--write-delay", "0")
    assert proc.returncode == 0, proc.stderr
    for ckpt in checkpoints(out):
        with open(os.path.join(ckpt, "model.safetensors"), "rb") as a, \
                open(tmp_path / "again" / os.path.basename(ckpt) / "model.safetensors", "rb") as b:
            assert a.read() == b.read(), ckpt


def test_trainer_refuses_a_folder_that_already_holds_a_run(venvs, tmp_path):
    (tmp_path / "run" / "checkpoint-10").mkdir(parents=True)
    proc = train(venvs, LM, tmp_path / "run", tmp_path / "data", "--quick")
    assert proc.returncode == 2
    assert "already holds a training run" in proc.stderr and "Traceback" not in proc.stderr
