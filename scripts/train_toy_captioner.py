"""Toy audio-captioning training run for the demo: a tiny Whisper learns to caption synthetic sounds on CPU.

Clips are one sound event (tones, a buzz, a siren, chirps, noise, crackle, clicks, beeps, silence) or
two in a row ("a low hum followed by rapid clicking"); each kind has five paraphrases, and a random
one is the target every time, so the model has to learn both events and a way to say them. Before
training, held-out clips are written in the Clotho-v2 layout (<data-out>/clotho_captions_evaluation.csv
with five references per clip, <data-out>/evaluation/*.wav, 16 kHz mono). Every --save-every steps a
Hugging Face checkpoint-<step>/ (model, processor = feature extractor + tokenizer, generation config,
trainer_state.json last) is written file by file, --write-delay seconds apart; it loads with
AutoProcessor + AutoModelForSpeechSeq2Seq. <out>/training_done marks the end.

    .venvs/inference/bin/python scripts/train_toy_captioner.py --out demo/runs/toy-captioner \\
        --data-out demo/data/toy-clotho
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import numpy as np
import torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                          WhisperProcessor, WhisperTokenizer)
from transformers.utils import logging as hf_logging

import toy_data  # scripts/ is on sys.path when this file runs as a script

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
CLIP_SECONDS = 3  # the feature extractor's window: 300 mel frames -> 150 encoder positions
DATA_SEED = 1234  # the held-out clips do not depend on --seed, so every run is scored on the same set
HELD_OUT = 80
KINDS = list(toy_data.SOUND_KINDS)
PAIRS = [(a, b) for a in KINDS for b in KINDS if a != b]


def random_clip(rng) -> tuple[tuple[str, ...], np.ndarray]:
    """A third of the clips hold one event, the rest two different ones in a row."""
    if rng.random() < 1 / 3:
        kinds = (KINDS[rng.integers(len(KINDS))],)
        seconds = rng.uniform(1.0, CLIP_SECONDS)
    else:
        kinds = PAIRS[rng.integers(len(PAIRS))]
        seconds = rng.uniform(2.0, CLIP_SECONDS)
    return kinds, toy_data.sound_clip(kinds, seconds, rng)


def write_dataset(directory: str) -> None:
    rng = np.random.default_rng(DATA_SEED)
    clips = []
    for i in range(HELD_OUT):
        kinds, audio = random_clip(rng)
        clips.append((f"toy_{i:03d}.wav", audio, [toy_data.caption(kinds, v) for v in range(5)]))
    toy_data.write_clotho_evaluation(directory, clips)


def build_processor() -> WhisperProcessor:
    corpus = [" " + toy_data.caption(kinds, v) for kinds in [(k,) for k in KINDS] + PAIRS for v in range(5)]
    vocab, merges = toy_data.vocab_and_merges(toy_data.train_bpe(corpus, vocab_size=400, special_tokens=[]))
    tok = WhisperTokenizer(vocab=vocab, merges=merges, extra_special_tokens=SPECIALS, pad_token="<|endoftext|>")
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=CLIP_SECONDS)
    return WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def build_model(tok) -> WhisperForConditionalGeneration:
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    eot = ids["<|endoftext|>"]
    # The encoder needs exactly 2x its positions in mel frames: 100 frames a second.
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                        decoder_ffn_dim=256, max_source_positions=CLIP_SECONDS * 50, max_target_positions=32,
                        dropout=0.0, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                        decoder_start_token_id=ids["<|startoftranscript|>"],
                        begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(cfg)
    gc = GenerationConfig.from_model_config(cfg)
    # An English-only, no-timestamps Whisper: generate() looks these up and fails without them.
    gc.no_timestamps_token_id, gc.is_multilingual, gc.max_length = ids["<|notimestamps|>"], False, 32
    gc.begin_suppress_tokens = gc.suppress_tokens = None
    model.generation_config = gc
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder: checkpoint-<step>/ are written here")
    p.add_argument("--data-out", required=True, help="folder for the held-out clips in the Clotho-v2 layout")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-clips", type=int, default=1500, help="size of the fixed pool of training clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluator runs beside us)")
    p.add_argument("--write-delay", type=float, default=0.2, help="seconds between checkpoint files")
    p.add_argument("--quick", action="store_true", help="a few steps and 2 checkpoints, for tests")
    a = p.parse_args()
    if a.quick:
        a.steps, a.save_every, a.train_clips = 4, 2, 64
    toy_data.check_fresh_output(a.out)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    t_start = time.monotonic()

    write_dataset(a.data_out)
    proc = build_processor()
    tok = proc.tokenizer
    model = build_model(tok)
    rng = np.random.default_rng(a.seed)
    pool = [random_clip(rng) for _ in range(a.train_clips)]
    feats = torch.from_numpy(proc.feature_extractor([x for _, x in pool], sampling_rate=toy_data.SAMPLE_RATE,
                                                    return_tensors="np").input_features)
    print(f"[toy-captioner] {sum(x.numel() for x in model.parameters()):,} params, vocab {len(tok)}, "
          f"{len(pool)} training clips ready in {time.monotonic() - t_start:.1f}s; "
          f"{HELD_OUT} held-out clips in {a.data_out}", flush=True)

    def labels_for(batch: list[int]) -> tuple[torch.Tensor, int]:
        captions = [toy_data.caption(pool[i][0], random.randrange(5)) for i in batch]
        enc = tok(captions, padding=True, return_tensors="pt")  # <|startoftranscript|> <|notimestamps|> ... eot
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        # generate() and the loss both start from decoder_start_token_id: drop the tokenizer's copy.
        return labels[:, 1:], int(enc.attention_mask.sum())

    os.makedirs(a.out, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    warmup = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    gen = torch.Generator().manual_seed(a.seed)
    log_history, losses, tokens_seen, last_print = [], [], 0, time.monotonic()
    model.train()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(pool), (a.batch_size,), generator=gen)
        labels, n_tokens = labels_for(idx.tolist())
        loss = model(input_features=feats[idx], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        tokens_seen += n_tokens
        if step % a.save_every == 0 or time.monotonic() - last_print > 5:
            mean_loss = round(float(np.mean(losses)), 4)
            log_history.append({"step": step, "loss": mean_loss, "learning_rate": sched.get_last_lr()[0],
                                "num_input_tokens_seen": tokens_seen})
            print(f"[toy-captioner] step {step}/{a.steps} loss {mean_loss:.4f} "
                  f"elapsed {time.monotonic() - t_start:.1f}s", flush=True)
            losses, last_print = [], time.monotonic()
        if step % a.save_every == 0:
            state = {"global_step": step, "max_steps": a.steps, "save_steps": a.save_every,
                     "train_batch_size": a.batch_size, "num_input_tokens_seen": tokens_seen,
                     "log_history": log_history}
            path = toy_data.write_checkpoint(a.out, step, [model.save_pretrained, proc.save_pretrained], state,
                                             a.write_delay)
            print(f"[toy-captioner] saved {path}", flush=True)
    toy_data.mark_done(a.out)
    print(f"[toy-captioner] done: {a.steps} steps in {time.monotonic() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
