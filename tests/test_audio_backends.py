"""The hf backend on audio-LLM checkpoints: real tiny random checkpoints of each family, built offline in the
inference venv (tests/stage_scripts/make_tiny_audio_models.py), run through `tools/bench.py inference` on a
canonical dataset of synthetic wav clips at 8 k / 22.05 k / 44.1 k (stereo) / 16 kHz."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import wave

import pytest

from conftest import DAEMON_PY, ROOT, canonical_dataset

BUILDER = os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_audio_models.py")
BENCH = os.path.join(ROOT, "tools", "bench.py")
# Qwen3-Omni runs in the hub layout (whole model, thinker used, talker off); Qwen2.5-Omni as a bare thinker.
FAMILIES = ["whisper", "qwen2_audio", "qwen2_5_omni", "qwen3_omni_full", "gemma3n"]
CLIPS = {  # name: (sample rate, channels, seconds)
    "low.wav": (8000, 1, 1.0), "mid.wav": (22050, 2, 1.5), "high.wav": (44100, 2, 2.0), "short.wav": (16000, 1, 0.7),
}


def write_wav(path: str, rate: int, channels: int, seconds: float, freq: float = 440.0,
              amplitudes=(0.8, 0.4)) -> None:
    """16-bit PCM sine; channel k has amplitude amplitudes[k] (in phase), so the mono mixdown is their mean."""
    n = int(rate * seconds)
    frames = bytearray()
    for i in range(n):
        s = math.sin(2 * math.pi * freq * i / rate)
        for ch in range(channels):
            frames += struct.pack("<h", int(32767 * amplitudes[ch] * s))
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))


def user(*parts) -> list:
    return [{"role": "user", "content": [{"type": "audio", "path": p} if p.endswith(".wav") else
                                         {"type": "text", "text": p} for p in parts]}]


@pytest.fixture(scope="session")
def audio_models(venvs, tmp_path_factory):
    """Every family's tiny checkpoint, built once per session (one python start-up for all)."""
    out = tmp_path_factory.mktemp("audio_models")
    proc = subprocess.run([venvs["inference"], BUILDER, str(out), "all"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {family: os.path.join(str(out), family) for family in FAMILIES}


@pytest.fixture(scope="session")
def audio_dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("audio_ds"))
    os.makedirs(os.path.join(root, "clips"))
    for name, (rate, channels, seconds) in CLIPS.items():
        write_wav(os.path.join(root, "clips", name), rate, channels, seconds)
    with open(os.path.join(root, "clips", "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00not really a wav file")
    rows = [
        {"id": "low", "messages": user("clips/low.wav", "What do you hear?")},
        {"id": "mid", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                   *user("Describe the sound.", "clips/mid.wav")]},
        {"id": "high", "messages": user("clips/high.wav", "Answer with one word.")},
        {"id": "short", "messages": user("clips/short.wav")},
        {"id": "two_clips", "messages": user("Compare", "clips/low.wav", "with", "clips/high.wav")},
        {"id": "corrupt", "messages": user("clips/corrupt.wav", "What do you hear?")},
    ]
    return canonical_dataset(root, rows, "tiny_audio")


def bench_inference(dataset: str, model: str, out: str, *extra: str, timeout: int = 300):
    proc = subprocess.run([DAEMON_PY, BENCH, "inference", dataset, "--model", model, "--output-root", out,
                           "--model-name", "m", "--param", "max_new_tokens=6", *extra],
                          capture_output=True, text=True, timeout=timeout)
    predictions = os.path.join(out, "m", os.path.basename(dataset), "predictions.jsonl")
    rows = []
    if os.path.exists(predictions):
        with open(predictions) as f:
            rows = [json.loads(line) for line in f]
    return proc, rows


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_answers_every_readable_clip_and_isolates_a_corrupt_one(family, audio_models, audio_dataset,
                                                                           tmp_path):
    proc, rows = bench_inference(audio_dataset, audio_models[family], str(tmp_path), "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["sample_id"] for r in rows] == ["low", "mid", "high", "short", "two_clips", "corrupt"]
    by_id = {r["sample_id"]: r for r in rows}

    corrupt = by_id.pop("corrupt")
    assert corrupt["status"] == "error"
    assert "corrupt.wav" in corrupt["error"]["message"] and "cannot read audio" in corrupt["error"]["message"]
    if family == "whisper":  # an encoder-decoder takes one clip per sample
        two = by_id.pop("two_clips")
        assert two["status"] == "error" and "at most 1" in two["error"]["message"]
    seconds = {"low": 1.0, "mid": 1.5, "high": 2.0, "short": 0.7, "two_clips": 3.0}
    for sample_id, row in by_id.items():
        assert row["status"] == "ok", row["error"]
        usage = row["response"]["usage"]
        assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 6
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # resampled to 16 kHz, duration kept
        assert usage["audio_seconds"] == pytest.approx(seconds[sample_id], abs=0.01)
        assert isinstance(row["response"]["text"], str)
    if family != "whisper":  # the processor expanded each clip into audio positions: two clips, more positions
        prompt_tokens = {k: r["response"]["usage"]["prompt_tokens"] for k, r in by_id.items()}
        assert prompt_tokens["two_clips"] > prompt_tokens["low"]
    with open(os.path.join(str(tmp_path), "m", os.path.basename(audio_dataset), "run_metadata.json")) as f:
        meta = json.load(f)
    assert meta["backend_info"]["runner"] == "AudioRunner"
    assert meta["backend_info"]["sampling_rate"] == 16000
    assert meta["n_error"] == (2 if family == "whisper" else 1)


@pytest.mark.slow
def test_stereo_clips_are_mixed_down_and_resampled_to_the_processor_rate(venvs, tmp_path):
    """load_audio: 44.1 kHz stereo (channel amplitudes 0.8 and 0.4, in phase) -> 16 kHz mono of amplitude 0.6,
    with the duration kept; 8 kHz mono keeps its amplitude."""
    write_wav(str(tmp_path / "stereo.wav"), 44100, 2, 1.0, freq=440.0)
    write_wav(str(tmp_path / "mono.wav"), 8000, 1, 0.5, freq=440.0, amplitudes=(0.5,))
    script = (
        "import json, sys\n"
        "from evaluator.stages.inference.backends.audio import load_audio\n"
        "out = {}\n"
        "for name in ('stereo', 'mono'):\n"
        f"    x = load_audio({str(tmp_path)!r} + '/' + name + '.wav', 16000)\n"
        "    core = x[len(x) // 10: -len(x) // 10]  # away from the resampler's edges\n"
        "    out[name] = [len(x), float(abs(core).max()), str(x.dtype), x.ndim]\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([venvs["inference"], "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["stereo"][0] == 16000 and out["mono"][0] == 8000
    assert out["stereo"][1] == pytest.approx(0.6, abs=0.01)
    assert out["mono"][1] == pytest.approx(0.5, abs=0.01)
    assert out["stereo"][2:] == ["float32", 1]


def test_a_missing_audio_file_is_a_dataset_error_naming_file_and_line(tmp_path):
    """Checked when the dataset loads, before any model: the checkpoint named here need not exist."""
    root = str(tmp_path / "ds")
    os.makedirs(root)
    write_wav(os.path.join(root, "here.wav"), 16000, 1, 0.5)
    canonical_dataset(root, [{"id": "a", "messages": user("here.wav", "hi")},
                         {"id": "b", "messages": user("gone.wav", "hi")}])
    proc, rows = bench_inference(root, str(tmp_path / "no-such-checkpoint"), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "test.jsonl:2" in proc.stderr and "audio file not found" in proc.stderr and "gone.wav" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert rows == []


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage_config", "weights_missing"])
def test_an_unloadable_checkpoint_exits_1_with_a_clear_message(damage, audio_models, audio_dataset, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(audio_models["qwen2_audio"], broken)
    if damage == "garbage_config":
        with open(os.path.join(broken, "config.json"), "w") as f:
            f.write("{ this is not json")
    else:
        os.remove(os.path.join(broken, "model.safetensors"))
    proc, rows = bench_inference(audio_dataset, broken, str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"cannot load model {broken!r}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert rows == []
