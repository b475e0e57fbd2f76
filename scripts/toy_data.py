"""Shared parts of the toy trainers (scripts/train_toy_lm.py, scripts/train_toy_captioner.py).

Everything here works offline: BPE tokenizers are trained with the `tokenizers` library, sounds are
synthesised with numpy, and datasets are written in the layouts the evaluator reads (a canonical
dataset folder; the Clotho-v2 evaluation split). Checkpoints are written the way a real trainer
writes them: file by file, not atomically, trainer_state.json last.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SAMPLE_RATE = 16000


# --- tokenizers -------------------------------------------------------------------------------------------

def train_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str], split_digits: bool = False) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (digits kept one per token when split_digits)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    # Single-digit tokens keep arithmetic learnable: "68" and "86" share their pieces.
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def vocab_and_merges(tok: Tokenizer) -> tuple[dict, list[tuple[str, str]]]:
    """The BPE vocab and merges of `tok`, in the form transformers' GPT-2/Whisper tokenizers take."""
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


# --- synthetic sounds ---------------------------------------------------------------------------------------

def _tone(freq: float, n: int, rng) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi))


def _sweep(f0: float, f1: float, n: int) -> np.ndarray:
    return np.sin(2 * np.pi * np.cumsum(np.geomspace(f0, f1, n)) / SAMPLE_RATE)


def _pulses(n: int, per_second: float, length: int, freq: float, rng) -> np.ndarray:
    x = np.zeros(n)
    step = int(SAMPLE_RATE / per_second)
    pulse = _tone(freq, length, rng) if freq else np.ones(length)
    for start in range(int(rng.integers(0, step)), n - length, step):
        x[start:start + length] = pulse
    return x


def synth_sound(kind: str, seconds: float, rng) -> np.ndarray:
    """One synthetic sound event of `kind` (a key of SOUND_KINDS), float32 in [-1, 1], 16 kHz."""
    n = int(seconds * SAMPLE_RATE)
    amp = rng.uniform(0.3, 0.8)
    if kind == "low_tone":
        x = _tone(rng.uniform(100, 350), n, rng)
    elif kind == "high_tone":
        x = _tone(rng.uniform(2000, 5000), n, rng)
    elif kind == "buzz":  # a square wave: harsh and full of harmonics
        x = 0.5 * np.sign(_tone(rng.uniform(80, 200), n, rng))
    elif kind == "warble":  # a siren-like tone wobbling a few times a second
        t = np.arange(n) / SAMPLE_RATE
        f = rng.uniform(700, 1500) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
        x = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)
    elif kind == "rising_chirp":
        x = _sweep(rng.uniform(100, 500), rng.uniform(3000, 6000), n)
    elif kind == "falling_chirp":
        x = _sweep(rng.uniform(3000, 6000), rng.uniform(100, 500), n)
    elif kind == "noise":
        x = 0.5 * rng.standard_normal(n)
    elif kind == "crackle":  # sparse random impulses of random size, like a fire or vinyl
        x = np.zeros(n)
        hits = rng.integers(0, n, size=int(seconds * rng.uniform(30, 80)))
        x[hits] = rng.uniform(-1, 1, size=len(hits))
    elif kind == "fast_clicks":
        x = _pulses(n, rng.uniform(15, 25), 40, 0, rng)
    elif kind == "slow_clicks":
        x = _pulses(n, rng.uniform(2, 4), 40, 0, rng)
    elif kind == "beeps":
        x = _pulses(n, rng.uniform(2, 4), int(0.12 * SAMPLE_RATE), rng.uniform(700, 1500), rng)
    elif kind == "silence":
        x = np.zeros(n)
    else:
        raise ValueError(f"unknown sound kind {kind!r}")
    return (amp * x).astype(np.float32)


# Five paraphrases per kind: the Clotho layout has five reference captions per clip.
SOUND_KINDS = {
    "low_tone": ["a low hum", "a deep steady tone", "a low droning sound", "a low pitched tone", "a deep hum"],
    "high_tone": ["a high beep", "a shrill whistle", "a high steady tone", "a high pitched tone", "a piercing whistle"],
    "buzz": ["a harsh buzz", "a loud buzzing sound", "an electric buzz", "a rough buzzing tone", "a buzzer sounding"],
    "warble": ["a wailing siren", "a warbling tone", "a siren going up and down", "an alarm wailing",
               "a wobbling whistle"],
    "rising_chirp": ["a rising chirp", "a sweep from low to high", "a tone going up", "a rising whistle",
                     "an upward sweep"],
    "falling_chirp": ["a falling chirp", "a sweep from high to low", "a tone going down", "a falling whistle",
                      "a downward sweep"],
    "noise": ["loud static", "a loud hiss", "a burst of white noise", "harsh static noise", "a rushing noise"],
    "crackle": ["crackling", "a fire crackling", "popping and crackling", "crackles like an old record",
                "random pops"],
    "fast_clicks": ["rapid clicking", "fast ticking", "a rapid series of clicks", "quick clicks", "a fast rattle"],
    "slow_clicks": ["slow clicking", "a slow ticking clock", "a few slow clicks", "slow ticks", "occasional clicks"],
    "beeps": ["a few short beeps", "repeated beeping", "a series of beeps", "short beeps", "beeping at intervals"],
    "silence": ["silence", "nothing can be heard", "a quiet room", "no sound at all", "complete silence"],
}
JOINERS = ["followed by", "then", "and then", "before", "giving way to"]


def sound_clip(kinds: tuple[str, ...], seconds: float, rng) -> np.ndarray:
    """A clip of the events in `kinds` one after another, each a random share of `seconds`, faint hiss on top."""
    if len(kinds) == 1:
        parts = [synth_sound(kinds[0], seconds, rng)]
    else:
        first = seconds * rng.uniform(0.4, 0.6)
        parts = [synth_sound(kinds[0], first, rng), synth_sound(kinds[1], seconds - first, rng)]
    x = np.concatenate(parts)
    return (x + rng.uniform(0, 0.004) * rng.standard_normal(len(x))).astype(np.float32)


def caption(kinds: tuple[str, ...], variant: int) -> str:
    """Paraphrase number `variant` (0-4) of the caption of a clip of `kinds`."""
    first = SOUND_KINDS[kinds[0]][variant % 5]
    if len(kinds) == 1:
        return first
    second = SOUND_KINDS[kinds[1]][(variant + 2) % 5]
    return f"{first} {JOINERS[variant % 5]} {second}"


# --- datasets ----------------------------------------------------------------------------------------------

def write_canonical_dataset(directory: str, rows: list[dict], metadata: dict) -> None:
    """A canonical dataset: <directory>/test.jsonl (one row a line) + metadata.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "test.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(directory, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)


def write_clotho_evaluation(directory: str, clips: list[tuple[str, np.ndarray, list[str]]]) -> None:
    """The Clotho-v2 evaluation split: clotho_captions_evaluation.csv + evaluation/<file_name> wavs.

    clips: (file_name, 16 kHz mono audio, five reference captions).
    """
    import soundfile  # only this writer needs it

    os.makedirs(os.path.join(directory, "evaluation"), exist_ok=True)
    with open(os.path.join(directory, "clotho_captions_evaluation.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # quotes only the fields that need it, as Clotho's own files do
        writer.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for file_name, audio, refs in clips:
            writer.writerow([file_name, *refs])
            soundfile.write(os.path.join(directory, "evaluation", file_name), audio, SAMPLE_RATE, subtype="PCM_16")


# --- checkpoints -------------------------------------------------------------------------------------------

# The order files land in (config and weights first, as in a Trainer's save); others follow, trainer_state.json last.
FILE_ORDER = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "preprocessor_config.json", "processor_config.json", "generation_config.json"]


def write_checkpoint(out: str, step: int, save_fns: list, trainer_state: dict, delay: float) -> str:
    """Write <out>/checkpoint-<step>/ file by file, `delay` seconds apart, trainer_state.json last.

    save_fns: callables taking a directory (model.save_pretrained, processor.save_pretrained). They save to
    a scratch folder first only so the files can be placed in a fixed order; each copy is a plain,
    non-atomic write, as on shared storage, so a watcher may see a checkpoint half-written.
    """
    target = os.path.join(out, f"checkpoint-{step}")
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toy-ckpt-") as scratch:
        for save in save_fns:
            save(scratch)
        names = sorted(os.listdir(scratch), key=lambda n: (FILE_ORDER.index(n) if n in FILE_ORDER else 99, n))
        for name in names:
            shutil.copyfile(os.path.join(scratch, name), os.path.join(target, name))
            # save_pretrained leaves model.safetensors 0600: an evaluator running as another user could not read it.
            os.chmod(os.path.join(target, name), 0o644)
            time.sleep(delay)
    state_path = os.path.join(target, "trainer_state.json")
    with open(state_path, "w", encoding="utf-8") as f:
        json.dump(trainer_state, f, indent=2)
    os.chmod(state_path, 0o644)
    return target


def check_fresh_output(out: str) -> None:
    """Refuse to mix two runs in one folder: exit 2 if `out` already holds checkpoints."""
    if os.path.isdir(out) and any(n.startswith("checkpoint-") or n == "training_done" for n in os.listdir(out)):
        print(f"error: {out} already holds a training run (checkpoint-*/training_done); remove it first",
              file=sys.stderr)
        raise SystemExit(2)


def mark_done(out: str) -> None:
    with open(os.path.join(out, "training_done"), "w", encoding="utf-8") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
