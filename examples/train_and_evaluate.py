"""Fine-tune a tiny model for a few steps and evaluate it from the training loop (docs/python_api.md).

    .venvs/inference/bin/python examples/train_and_evaluate.py [--out outputs/train_and_evaluate] [--steps 300]

1. A tiny GPT-2 (built from a config: random weights, no download) and a byte-level BPE tokenizer learn one-digit
   sums ("Q: 3+4=? A:" -> " 7") with the Hugging Face Trainer; the sums are also written as a canonical dataset
   (<out>/data/sums: test.jsonl + metadata.json) and an evaluator config (<out>/evaluator.yaml) watching <out>/run.
2. `EvaluatorCallback` at every save: the checkpoint's completion notice (a daemon watching <out>/run takes it at
   once instead of waiting settle_seconds) and a quick in-process evaluation of the sums (exact_match).
3. After training, `evaluate_checkpoint` on the last checkpoint: the daemon's own stages (.venvs/inference for
   generation, .venvs/evaluation for scoring), ledger and local history (<out>/cache/results/toy-sums/).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments)
from transformers.utils import logging as hf_logging

from evaluator import api as hret

EOS, PAD = "<|endoftext|>", "<|pad|>"
SUMS = [(a, b) for a in range(10) for b in range(10)]


def prompt(a: int, b: int) -> str:
    return f"Q: {a}+{b}=? A:"


def write_files(out: str, save_every: int) -> tuple[str, str]:
    """The sums as a canonical dataset, and an evaluator config whose one benchmark scores them."""
    data = os.path.join(out, "data", "sums")
    os.makedirs(data, exist_ok=True)
    rows = [{"id": f"sum-{a}{b}", "messages": [{"role": "user", "content": prompt(a, b)}], "target": str(a + b)}
            for a, b in SUMS]
    with open(os.path.join(data, "test.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(data, "metadata.json"), "w") as f:
        json.dump({"dataset_id": "toy-sums", "metrics": ["exact_match"]}, f)
    config = os.path.join(out, "evaluator.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"auto_eval": {
            "project_name": "examples", "model_name": "toy-sums", "cache_dir": "cache",
            "watch": {"paths": ["run"], "layout": "huggingface", "iteration_interval": save_every},
            "benchmarks": [{"name": "sums", "type": "dataset", "dataset": "data/sums",
                            "generation": {"max_new_tokens": 3}, "batch_size": 50}]}}, f, sort_keys=False)
    return data, config


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([f"{prompt(a, b)} {a + b}" for a, b in SUMS], trainer=trainers.BpeTrainer(
        vocab_size=120, special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


class Sums(torch.utils.data.Dataset):
    """Prompt + answer + end-of-text, the loss on the answer only, right-padded to one length."""

    def __init__(self, tok: PreTrainedTokenizerFast):
        prompts = tok([prompt(a, b) for a, b in SUMS]).input_ids
        answers = [ids + [tok.eos_token_id] for ids in tok([f" {a + b}" for a, b in SUMS]).input_ids]
        length = max(len(p) + len(q) for p, q in zip(prompts, answers))
        self.rows = []
        for p, q in zip(prompts, answers):
            pad = length - len(p) - len(q)
            self.rows.append({"input_ids": torch.tensor(p + q + [tok.pad_token_id] * pad),
                              "attention_mask": torch.tensor([1] * (len(p) + len(q)) + [0] * pad),
                              "labels": torch.tensor([-100] * len(p) + q + [-100] * pad)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/train_and_evaluate", help="folder for everything this writes (replaced)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=100)
    a = p.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = os.path.abspath(a.out)
    shutil.rmtree(out, ignore_errors=True)
    data, config = write_files(out, a.save_every)

    tok = build_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    callback = hret.EvaluatorCallback(config=config, quick_eval={
        "dataset": data, "metrics": ["exact_match"], "max_new_tokens": 3, "batch_size": 50})
    args = TrainingArguments(os.path.join(out, "run"), max_steps=a.steps, save_steps=a.save_every,
                             per_device_train_batch_size=20, learning_rate=3e-3, lr_scheduler_type="constant",
                             logging_steps=a.save_every, save_only_model=True, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Sums(tok), processing_class=tok, callbacks=[callback]).train()

    for step, result in sorted(callback.quick_results.items()):
        print(f"step {step}: quick eval in the loop: exact_match {result.metrics['exact_match']:.3f} (n={result.info['n']})")
    print(f"completion notices written: {len(callback.notices)} (in {os.path.dirname(callback.notices[-1])})")
    last = os.path.join(out, "run", f"checkpoint-{a.steps}")
    checked = hret.evaluate_checkpoint(last, a.steps, config=config)
    print(f"step {a.steps}: evaluate_checkpoint: {'handed to the running daemon' if checked.handed_to_daemon else 'ran here'}"
          f", states {checked.states}, metrics {checked.metrics}")
    print(f"history: {os.path.join(out, 'cache', 'results', 'toy-sums', 'history.jsonl')}")


if __name__ == "__main__":
    main()
