"""`hf` backend: transformers generate() on a checkpoint directory, batched.

- Loads AutoConfig first; audio-LLM families (Whisper, Qwen2-Audio, Qwen2.5/3-Omni, Gemma 3n) go to
  `audio.AudioRunner`; everything else to `text.TextRunner`: a causal LM (AutoModelForCausalLM) or, for
  encoder-decoders, AutoModelForSeq2SeqLM, with AutoTokenizer.
- Batches are sorted by prompt length (longest first, so padding is small and an out-of-memory shows early)
  and left-padded; results come back in sample order. Greedy unless temperature > 0; the seed is set at load
  and again by reconfigure().
- Prompt: the tokenizer's chat template when it has one (option `chat_template: false` turns it off);
  otherwise the turns' texts joined by newlines, fed as they are.
- dtype/device: `device` option or CUDA when present; `dtype: auto` is bfloat16 on CUDA (float16 where bf16
  is unsupported) and float32 on CPU.
- A batch that raises is retried one sample at a time, so one bad sample costs only itself (status=error).
- Shared prompt prefix (option `shared_prefix`, default on; decoder-only models without sliding-window attention):
  the tokens every prompt of a batch starts with (a system prompt, few-shot examples) are run once and their
  key/value cache is copied to every row, which continues after it left-padded; each row reads exactly its own
  tokens at its own positions, so only floating-point rounding differs (same texts on the real model, choice
  log-likelihoods within 3e-5). Not with num_beams or num_return_sequences > 1 (generate() expands the batch).
- Option `choice_scoring: loglikelihood`: no generation (a sample without `choices` fails alone): each choice is scored
  by the summed log-probability of its continuation after the prompt (lm-evaluation-harness's `acc` rule) and the
  best choice's text is the response. The continuation is lm-eval 0.4.10's: " <choice>" after a plain prompt,
  "<choice>" after a chat-template prompt (lm-eval drops the target delimiter under --apply_chat_template,
  lm_eval/api/task.py construct_requests); option `target_delimiter` (a string) puts that string before every
  choice instead, in both modes (`" "` is what this backend scored under chat templates before 2026-11-30).
  Scored in batches of up to batch_size choices: each question's context is run once (left-padded with its
  neighbours), its key/value cache is copied to every choice, and all continuations run in one right-padded
  forward; questions go longest first.
- Warm workers (evaluator/stages/inference/stage.py WarmBackend): LOAD_OPTIONS are the options that change what
  load() builds; reconfigure() takes the next benchmark's parameters and run-time options; swap() loads the next
  checkpoint's weights into the built model when its config and tokenizer are unchanged (text models only).

Where: loading, batching, error isolation, warm-worker hooks and the dispatch of choice scoring here (HFBackend);
prompts, the shared prefix's key/value cache, generation and loglikelihood scoring in text.py (TextRunner).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from typing import Optional

from evaluator.common.records import ERROR, RunError, RunResult

from evaluator.stages.checkpoint_compat import CheckpointFormatError, checkpoint_view, reads_as_is, release_view

from ..params import COMMON_GENERATION, GenerationParams, MODEL_ALIASES, Progress, apply_stop, missing_local_model
from . import ModelLoadError
from .text import TextRunner, pack
# lived here before text.py: evaluator/daemon/fingerprint.py and tests still import them from hf
from .text import (CHAT_CHOICE_RULE as CHAT_CHOICE_RULE, chat_choice_rule as chat_choice_rule,
                   shared_prefix_length as shared_prefix_length, target_delimiter as target_delimiter,
                   use_shared_prefix as use_shared_prefix)

DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 32}


def pick_device_dtype(options: dict):
    import torch
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    name = str(options.get("dtype", "auto"))
    if name == "auto":
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"backend_options.dtype: unknown torch dtype {name!r}")
    return device, dtype


def error_result(base: dict, exc: BaseException, latency_ms: float = 0.0) -> RunResult:
    retryable = "out of memory" in str(exc).lower()
    return RunResult(**base, status=ERROR, latency_ms=latency_ms,
                     error=RunError(type=type(exc).__name__, message=str(exc)[:2000], retryable=retryable))


def sample_bases(samples: list, dataset_id: str, backend: str, run_config: dict):
    """base(i): the RunResult fields every result of sample i carries, whatever its outcome."""
    def base(i: int) -> dict:
        return {"sample_id": samples[i].id, "dataset_id": dataset_id, "backend": backend, "run_config": run_config,
                "request_messages": samples[i].messages}
    return base


def generate_isolated(batch: list, request, record, base, results: list) -> None:
    """Run `request(batch)` on a batch of sample indices and hand its outputs to `record(batch, outputs,
    latency_ms)`. A batch that raises is retried one sample at a time, so one bad sample costs only itself
    (its result is a status=error row)."""
    t0 = time.perf_counter()
    try:
        outputs = request(batch)
    except Exception as e:
        if len(batch) == 1:
            results[batch[0]] = error_result(base(batch[0]), e, (time.perf_counter() - t0) * 1000)
            return
        for i in batch:
            generate_isolated([i], request, record, base, results)
        return
    record(batch, outputs, (time.perf_counter() - t0) * 1000)


# files that decide how text becomes tokens; a checkpoint whose set differs in name or content is not swapped
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def config_fields(path: str) -> Optional[dict]:
    """config.json's fields, without transformers_version (it records who saved the file, not the model)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict):
        data.pop("transformers_version", None)
    return data


def tokenizer_digest(path: str, extra: tuple = ()) -> dict:
    """{file name: (size, sha256)} of the tokenizer files (and the `extra` files) present in the checkpoint folder."""
    digest = {}
    for name in TOKENIZER_FILES + tuple(extra):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            h = hashlib.sha256()
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest[name] = (os.path.getsize(file), h.hexdigest())
    return digest


def weight_files(path: str) -> list:
    """The checkpoint's weight files (safetensors preferred, shards from the index), [] when there are none."""
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if name.endswith(".index.json"):
            with open(file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, shard) for shard in shards]
        return [file]
    return []


class CheckpointTensors:
    """Name -> (shape, dtype) of a checkpoint's tensors without reading them; tensors() reads them one by one."""

    def __init__(self, files: list):
        import torch
        self.files, self.index, self._bins = files, {}, {}
        for file in files:
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.index[key] = (tuple(sl.get_shape()), sl.get_dtype(), file)
            else:  # a pickled state dict: mmap, so nothing is read until a tensor is copied
                sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                self._bins[file] = sd
                for key, t in sd.items():
                    self.index[key] = (tuple(t.shape), str(t.dtype), file)

    def read(self, keys: list):
        """(key, tensor) for `keys`, file by file, each tensor read only when asked for."""
        by_file: dict = {}
        for key in keys:
            by_file.setdefault(self.index[key][2], []).append(key)
        for file, names in by_file.items():
            if file in self._bins:
                for key in names:
                    yield key, self._bins[file][key]
                continue
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                for key in names:
                    yield key, f.get_tensor(key)


class HFBackend:
    name = "hf"
    # every backend_options key this backend (and its runners, text.TextRunner and audio.AudioRunner) reads;
    # batch_size is also the benchmark's own key
    OPTIONS = ("batch_size", "device", "dtype", "chat_template", "choice_scoring", "target_delimiter", "shared_prefix")
    # the options that change what load() builds; the others (batch_size, chat_template, choice_scoring) only change
    # how prompts are made and batched, and reconfigure() takes them without a reload
    LOAD_OPTIONS = ("device", "dtype")
    # generation: keys generate() takes (GenerationConfig fields); it raises on any other ("model_kwargs are not
    # used"), e.g. presence_penalty, stop_token_ids, ignore_eos, n. language/task: Whisper-style checkpoints only.
    GENERATION = COMMON_GENERATION + ("top_k", "min_p", "min_new_tokens", "repetition_penalty", "length_penalty",
                                      "no_repeat_ngram_size", "num_beams", "num_return_sequences", "language", "task")

    def __init__(self, model: str, options: dict, params: GenerationParams, seed: int = 0,
                 alias: Optional[str] = None):
        self.model_path, self.options, self.params, self.seed, self.alias = model, dict(options), params, seed, alias
        self.runner = None

    # ---- loading ---------------------------------------------------------------------------------------------
    def load(self) -> dict:
        import torch
        import transformers
        transformers.set_seed(self.seed)
        if missing_local_model(self.model_path):
            raise ModelLoadError(missing_local_model(self.model_path))
        if not os.path.isdir(self.model_path) and "HF_HUB_OFFLINE" not in os.environ and self.alias is None \
                and "/" not in self.model_path:
            raise ModelLoadError(f"model {self.model_path!r}: no such checkpoint directory "
                                 f"(and not a hub id or alias; aliases: {', '.join(MODEL_ALIASES)})")
        self.device, self.dtype = pick_device_dtype(self.options)
        # what this venv's transformers reads faithfully: the checkpoint, or a translated view of it (read in full
        # by the loads below, then removed); CheckpointFormatError (exit 2) when it would misread it
        source = checkpoint_view(self.model_path, log=lambda line: print(line, file=sys.stderr, flush=True))
        try:
            config = transformers.AutoConfig.from_pretrained(source)
            from . import audio
            if audio.is_audio_model(config):
                self.runner = audio.AudioRunner(source, config, self.device, self.dtype, self.params,
                                                self.options, self.seed)
            else:
                self.runner = TextRunner(source, config, self.device, self.dtype, self.params, self.options)
        except (ModelLoadError, CheckpointFormatError):  # said already; a format error is exit 2 (no retry)
            raise
        except Exception as e:  # OSError / ValueError from a missing or broken config, weights or tokenizer
            raise ModelLoadError(self._load_hint(e)) from None
        finally:
            release_view(source)
        self.batch_size = self._batch_size()
        # what swap() compares the next checkpoint against (a local folder only; a hub model is never swapped)
        self.loaded_config = config_fields(self.model_path) if os.path.isdir(self.model_path) else None
        self.loaded_tokenizer = tokenizer_digest(self.model_path) if self.loaded_config is not None else None
        info = {"model_type": config.model_type, "architectures": getattr(config, "architectures", None),
                "device": self.device, "dtype": str(self.dtype).replace("torch.", ""), "batch_size": self.batch_size,
                "runner": type(self.runner).__name__, **getattr(self.runner, "info", {})}
        if self.device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
        return info

    def run_info(self) -> dict:
        """The part of load()'s info that reconfigure() changes."""
        return {"batch_size": self.batch_size, **getattr(self.runner, "info", {})}

    def _batch_size(self) -> int:
        return int(self.options.get("batch_size")
                   or DEFAULT_BATCH_SIZE["cuda" if self.device.startswith("cuda") else "cpu"])

    def _load_hint(self, e: BaseException) -> str:
        msg = f"cannot load model {self.model_path!r}: {type(e).__name__}: {str(e).strip()[:800]}"
        if self.alias:
            msg += (f"\n  {self.alias!r} is an alias of the hub model {self.model_path!r}; this machine could not "
                    "fetch it. Download it where the hub is reachable (`huggingface-cli download "
                    f"{self.model_path}`) and pass --model <that directory>.")
        return msg

    # ---- warm-worker hooks -----------------------------------------------------------------------------------
    def reconfigure(self, params: GenerationParams, options: dict) -> None:
        """Take the next benchmark's generation parameters and run-time options without reloading.

        The LOAD_OPTIONS must be those of load() (the worker reloads otherwise); the seed is set again, so each
        benchmark starts from the random state a fresh load would give it."""
        changed = [k for k in self.LOAD_OPTIONS if options.get(k) != self.options.get(k)]
        if changed:
            raise ValueError(f"reconfigure cannot change {', '.join(changed)} (they decide what load() built); "
                             "close this backend and load a new one")
        import transformers
        self.params, self.options = params, dict(options)
        self.batch_size = self._batch_size()
        self.runner.configure(params, self.options)
        transformers.set_seed(self.seed)

    def swap(self, model_path: str) -> bool:
        """Load `model_path`'s weights into the loaded model when its config.json and tokenizer files equal the
        loaded checkpoint's and its tensors are exactly the model's (names, shapes); True when swapped.

        False, with the loaded model untouched, when anything differs (the caller then loads from scratch).
        ModelLoadError when copying fails midway: the model is then closed, never used half-swapped."""
        if not isinstance(self.runner, TextRunner) or self.loaded_config is None or not os.path.isdir(model_path):
            return False
        if config_fields(model_path) != self.loaded_config or tokenizer_digest(model_path) != self.loaded_tokenizer:
            return False
        if not reads_as_is(model_path):  # e.g. written by a newer transformers: a fresh load checks it properly
            return False
        files = weight_files(model_path)
        if not files:
            return False
        try:
            tensors = CheckpointTensors(files)
        except Exception:  # an unreadable header: let a full load report it properly
            return False
        plan = self.runner.copy_plan(tensors.index)
        if plan is None:
            return False
        import torch
        twins = [[name, *others] for name, _, others in plan if others]
        if twins:  # tied in the model, held more than once in the file: swapped only if they are one tensor
            try:
                read = dict(tensors.read([key for group in twins for key in group]))
            except Exception:
                return False
            if not all(torch.equal(read[group[0]], read[other]) for group in twins for other in group[1:]):
                return False  # a fresh load unties them (transformers warns and keeps both)
        targets = {name: tensor for name, tensor, _ in plan}
        self.runner.forget_prefix()  # computed with the weights about to be replaced
        try:
            with torch.no_grad():
                for key, tensor in tensors.read(list(targets)):
                    targets[key].copy_(tensor)
            self.runner.read_generation_config(model_path)
        except Exception as e:
            self.close()
            raise ModelLoadError(f"swapping in the weights of {model_path!r} failed midway ({type(e).__name__}: "
                                 f"{str(e).strip()[:600]}); the model was closed, load it again") from None
        self.model_path = model_path
        return True

    # ---- running ---------------------------------------------------------------------------------------------
    def run(self, samples: list, dataset_id: str, progress: Progress) -> list:
        run_config = {"model": self.alias or self.model_path, "backend": self.name, "seed": self.seed,
                      "batch_size": self.batch_size, "params": self.params.to_dict()}
        results: list[Optional[RunResult]] = [None] * len(samples)
        base = sample_bases(samples, dataset_id, self.name, run_config)
        scoring = self.options.get("choice_scoring")
        if scoring not in (None, "generate", "loglikelihood"):
            raise ModelLoadError(f"backend_options.choice_scoring: expected generate|loglikelihood, got {scoring!r}")
        if isinstance(self.runner, TextRunner):
            self.runner.forget_prefix()
        if scoring == "loglikelihood":
            self._score_choices(samples, base, results, progress)
            return results
        lengths = [self.runner.length(s) for s in samples]  # tokenised once: the batch order and the check
        order = sorted(range(len(samples)), key=lambda i: -lengths[i])
        if isinstance(self.runner, TextRunner):  # over the model's positions: that sample fails alone, saying why
            keep = []
            for i in order:
                why = self.runner.too_long(lengths[i])
                if why:
                    results[i] = error_result(base(i), ValueError(why))
                    progress.update(1)
                else:
                    keep.append(i)
            order = keep
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            generate_isolated(batch, lambda b: self.runner.generate([samples[i] for i in b]),
                              lambda b, outputs, ms: self._record(b, outputs, ms, base, results), base, results)
            progress.update(len(batch))
        return results

    def _record(self, batch, outputs, latency_ms, base, results) -> None:
        # latency: the batch's wall time, since every sample in it waited that long
        for i, (text, usage) in zip(batch, outputs):
            results[i] = RunResult(**base(i), response={"text": apply_stop(text, self.params.stop).strip(),
                                                        "usage": usage}, latency_ms=round(latency_ms, 3))

    def _score_choices(self, samples, base, results, progress) -> None:
        """Every sample's choices scored, batch_size choices per batch; a sample that cannot be scored fails alone."""
        if not isinstance(self.runner, TextRunner):
            raise ModelLoadError("backend_options.choice_scoring=loglikelihood: supported for text causal LMs only, "
                                 f"not for this {type(self.runner).__name__} checkpoint")
        requests = {}
        for i, sample in enumerate(samples):
            try:
                requests[i] = self.runner.encode_choices(sample)
            except Exception as e:
                results[i] = error_result(base(i), e)
                progress.update(1)
        order = sorted(requests, key=lambda i: requests[i].sort_key())
        for batch in pack(order, lambda i: requests[i].rows, self.batch_size):
            generate_isolated(batch, lambda b: self.runner.score([requests[i] for i in b]),
                              lambda b, outputs, ms: self._record_scores(samples, b, outputs, ms, base, results),
                              base, results)
            progress.update(len(batch))

    @staticmethod
    def _record_scores(samples, batch, outputs, latency_ms, base, results) -> None:
        for i, scores in zip(batch, outputs):
            best = max(range(len(scores)), key=lambda k: scores[k])  # first best on ties, as numpy argmax
            results[i] = RunResult(**base(i), response={"text": samples[i].choices[best], "usage": {},
                                                        "choice_logprobs": scores},
                                   latency_ms=round(latency_ms, 3))

    def close(self) -> None:
        """Free the model (and, on CUDA, the allocator's cached blocks)."""
        runner, self.runner = self.runner, None
        if runner is None:
            return
        device = getattr(runner, "device", "cpu")
        for attr in ("model", "generator"):
            if hasattr(runner, attr):
                delattr(runner, attr)
        del runner
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
