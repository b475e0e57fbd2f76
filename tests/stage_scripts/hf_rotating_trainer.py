"""A real Hugging Face Trainer run that writes rotating checkpoints, for tests of the checkpoint watcher.

    hf_rotating_trainer.py --out DIR [--steps 40] [--save-steps 5] [--save-total-limit 2]
      [--step-seconds 0.2] [--save-safetensors | --no-save-safetensors] [--seed 0]

Trains a tiny GPT-2 (hidden 32, 2 layers, 26-token word-level vocab, 19k params) built from a config, with a
tokenizer built offline (no hub), on a tiny synthetic text set, using `transformers.Trainer` on CPU.
The Trainer writes DIR/checkpoint-N/ every --save-steps steps (model, config, generation config,
tokenizer, training args, optimizer, scheduler, RNG state, trainer_state.json last) and deletes old
ones beyond --save-total-limit itself. Each kept checkpoint loads back with
AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained.

A callback sleeps --step-seconds after each step so saves are spread out in wall time.
stdout: `SAVED <step> <abs checkpoint path>` after each save (the checkpoint is complete and older ones
already rotated away by then), and `DONE <n_saves>` at the end. DIR/saves.json is a JSON list of every saved step.
"""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--save-steps", type=int, default=5)
p.add_argument("--save-total-limit", type=int, default=2)
p.add_argument("--step-seconds", type=float, default=0.0)
p.add_argument("--save-safetensors", action=argparse.BooleanOptionalAction, default=True)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
if not a.save_safetensors:
    # transformers >= 5 dropped the option: save_pretrained always writes model.safetensors.
    sys.exit("hf_rotating_trainer: --no-save-safetensors is not supported (transformers 5 always writes safetensors)")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()  # save_pretrained shows a "Writing model shards" bar on stderr otherwise
torch.set_num_threads(min(2, os.cpu_count() or 1))
set_seed(a.seed)

# --- tiny synthetic corpus and an offline word-level tokenizer ------------------------------------------
SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the robot", "a child"]
VERBS = ["sees", "likes", "finds", "follows", "hears", "wants"]
OBJECTS = ["the ball", "a tree", "the moon", "some water", "the door", "a song"]
TEXTS = [f"{s} {v} {o} ." for s in SUBJECTS for v in VERBS for o in OBJECTS]  # 216 sentences

SPECIALS = ["<pad>", "<unk>", "<eos>"]
words = sorted({w for t in TEXTS for w in t.split()})
vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>",
    model_max_length=16, padding_side="left",  # saved so: a decoder-only LM batch-generates with left padding
)

SEQ = 8  # 5 or 6 words + <eos>, padded to 8
enc = tokenizer([t + " <eos>" for t in TEXTS], padding="max_length", max_length=SEQ, truncation=True,
                padding_side="right")  # training rows: tokens at positions 0.., padding (masked out) at the end


class TextSet(torch.utils.data.Dataset):
    def __init__(self, enc):
        self.ids = torch.tensor(enc["input_ids"])
        self.mask = torch.tensor(enc["attention_mask"])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


# --- tiny GPT-2 from a config --------------------------------------------------------------------------
cfg = GPT2Config(
    vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
)
model = GPT2LMHeadModel(cfg)


# --- callbacks ------------------------------------------------------------------------------------------
class Pace(TrainerCallback):
    def __init__(self, seconds):
        self.seconds = seconds
        self.saves = []

    def on_step_end(self, args, state, control, **kw):
        if self.seconds > 0:
            time.sleep(self.seconds)

    def on_save(self, args, state, control, **kw):
        # Fires after checkpoint-N is fully written (trainer_state.json last) and old ones are rotated.
        path = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self.saves.append(state.global_step)
        print(f"SAVED {state.global_step} {path}", flush=True)


out = os.path.abspath(a.out)
os.makedirs(out, exist_ok=True)
targs = TrainingArguments(
    output_dir=out,
    max_steps=a.steps,
    per_device_train_batch_size=16,
    learning_rate=3e-3,
    warmup_steps=0,
    weight_decay=0.0,
    save_strategy="steps",
    save_steps=a.save_steps,
    save_total_limit=a.save_total_limit,
    eval_strategy="no",
    logging_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=a.seed,
    data_seed=a.seed,
)
pace = Pace(a.step_seconds)
trainer = Trainer(model=model, args=targs, train_dataset=TextSet(enc), processing_class=tokenizer,
                  callbacks=[pace])
trainer.remove_callback(PrinterCallback)  # it would print the final metrics dict to stdout
trainer.train()

with open(os.path.join(out, "saves.json"), "w") as f:
    json.dump(pace.saves, f)  # every step saved, in order, e.g. [5, 10, ..., 40]
print(f"DONE {len(pace.saves)}", flush=True)
