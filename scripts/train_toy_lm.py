"""Toy LM training run for the demo: a tiny GPT-2 learns three-digit addition on CPU.

Prompts read "Q: 234+567=? A:" and the model is trained to continue with " 801" and end-of-text, so a
greedy decode of the continuation, stripped, is the answer. Before training, the held-out sums are
written as a canonical dataset (<data-out>/test.jsonl + metadata.json; the prompt is the raw user
text, no chat template). Every --save-every steps a Hugging Face checkpoint-<step>/ (model, tokenizer,
generation config, trainer_state.json last) is written file by file, --write-delay seconds apart, so
an evaluator watching <out> sees it half-written for a while; exact match on the held-out set rises
from about 0 at the first checkpoint as training goes on. <out>/training_done marks the end.

    .venvs/inference/bin/python scripts/train_toy_lm.py --out demo/runs/toy-lm --data-out demo/data/toy-lm
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import numpy as np
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import toy_data  # scripts/ is on sys.path when this file runs as a script

EOS, PAD = "<|endoftext|>", "<|pad|>"
DATA_SEED = 1234  # the held-out split does not depend on --seed, so every run is scored on the same set
HELD_OUT = 150
TRAIN_POOL = 20000  # of 810k possible sums: the model has to learn to add, not memorise


def prompt(a: int, b: int) -> str:
    return f"Q: {a}+{b}=? A:"


def split_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """A fixed pool of distinct three-digit pairs, split into (train, held-out)."""
    rng = random.Random(DATA_SEED)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < TRAIN_POOL + HELD_OUT:
        pairs.add((rng.randint(100, 999), rng.randint(100, 999)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    return ordered[HELD_OUT:], ordered[:HELD_OUT]


def write_dataset(directory: str, held_out: list[tuple[int, int]]) -> None:
    rows = [{"id": f"add-{i:04d}", "messages": [{"role": "user", "content": prompt(a, b)}], "target": str(a + b)}
            for i, (a, b) in enumerate(held_out)]
    toy_data.write_canonical_dataset(directory, rows, {
        "dataset_id": "toy-lm-arith", "name": "Toy three-digit addition", "version": "1", "task_type": "qa",
        "metrics": ["exact_match"]})


def build_tokenizer(train: list[tuple[int, int]]) -> PreTrainedTokenizerFast:
    corpus = [f"{prompt(a, b)} {a + b}" for a, b in train[:2000]]
    tok = toy_data.train_bpe(corpus, vocab_size=300, special_tokens=[EOS, PAD], split_digits=True)
    # Left padding: batched generate() continues every prompt from its last real token.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   padding_side="left")


def encode(tok, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (loss on the answer and end-of-text only), right-padded."""
    prompts = tok([prompt(a, b) for a, b in pairs]).input_ids
    answers = [q + [tok.eos_token_id] for q in tok([f" {a + b}" for a, b in pairs]).input_ids]
    length = max(len(p) + len(q) for p, q in zip(prompts, answers))
    ids = torch.full((len(pairs), length), tok.pad_token_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (p, q) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(q)] = torch.tensor(p + q)
        labels[i, len(p):len(p) + len(q)] = torch.tensor(q)
        mask[i, :len(p) + len(q)] = 1
    return ids, mask, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder: checkpoint-<step>/ are written here")
    p.add_argument("--data-out", required=True, help="folder for the held-out canonical dataset")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--save-every", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluator runs beside us)")
    p.add_argument("--write-delay", type=float, default=0.2, help="seconds between checkpoint files")
    p.add_argument("--quick", action="store_true", help="a few steps and 2 checkpoints, for tests")
    a = p.parse_args()
    if a.quick:
        a.steps, a.save_every = 20, 10
    toy_data.check_fresh_output(a.out)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    t_start = time.monotonic()

    train, held_out = split_pairs()
    write_dataset(a.data_out, held_out)
    tok = build_tokenizer(train)
    ids, mask, labels = encode(tok, train)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_new_tokens=6, do_sample=False)
    print(f"[toy-lm] {sum(x.numel() for x in model.parameters()):,} params, vocab {len(tok)}, "
          f"{len(train)} train / {len(held_out)} held-out sums; dataset in {a.data_out}", flush=True)

    os.makedirs(a.out, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    gen = torch.Generator().manual_seed(a.seed)
    log_history, losses, tokens_seen, last_print = [], [], 0, time.monotonic()
    model.train()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(train), (a.batch_size,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        tokens_seen += int(mask[idx].sum())
        if step % a.save_every == 0 or time.monotonic() - last_print > 5:
            mean_loss = round(float(np.mean(losses)), 4)
            log_history.append({"step": step, "loss": mean_loss, "learning_rate": sched.get_last_lr()[0],
                                "num_input_tokens_seen": tokens_seen})
            print(f"[toy-lm] step {step}/{a.steps} loss {mean_loss:.4f} "
                  f"elapsed {time.monotonic() - t_start:.1f}s", flush=True)
            losses, last_print = [], time.monotonic()
        if step % a.save_every == 0:
            state = {"global_step": step, "max_steps": a.steps, "save_steps": a.save_every,
                     "train_batch_size": a.batch_size, "num_input_tokens_seen": tokens_seen,
                     "log_history": log_history}
            path = toy_data.write_checkpoint(a.out, step, [model.save_pretrained, tok.save_pretrained], state,
                                             a.write_delay)
            print(f"[toy-lm] saved {path}", flush=True)
    toy_data.mark_done(a.out)
    print(f"[toy-lm] done: {a.steps} steps in {time.monotonic() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
