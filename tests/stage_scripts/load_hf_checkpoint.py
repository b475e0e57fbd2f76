"""Inference stage for the rotation tests: really load the checkpoint it is given and generate.

    load_hf_checkpoint.py CHECKPOINT OUT_DIR [--sleep S]

Loading with AutoModelForCausalLM/AutoTokenizer proves the (pinned) checkpoint holds everything
inference needs; --sleep makes the stage slower than the trainer's rotation.
"""
import argparse
import json
import os
import time

p = argparse.ArgumentParser()
p.add_argument("checkpoint")
p.add_argument("out")
p.add_argument("--sleep", type=float, default=0.0)
a = p.parse_args()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
tok = AutoTokenizer.from_pretrained(a.checkpoint)
model = AutoModelForCausalLM.from_pretrained(a.checkpoint)
ids = tok("the cat", return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
text = tok.decode(out[0], skip_special_tokens=True)
time.sleep(a.sleep)
with open(os.path.join(a.out, "predictions.jsonl"), "w") as f:
    f.write(json.dumps({"sample_id": "0", "checkpoint": a.checkpoint, "files": sorted(os.listdir(a.checkpoint)),
                        "response": {"text": text}}) + "\n")
