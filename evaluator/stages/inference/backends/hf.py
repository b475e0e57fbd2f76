"""`hf` backend: transformers generate() on a checkpoint directory, batched.

- Loads AutoConfig first; audio-LLM families (Whisper, Qwen2-Audio, Qwen2.5/3-Omni, Gemma 3n) go to
  `audio.AudioRunner`; everything else is a causal LM (AutoModelForCausalLM) or, for encoder-decoders,
  AutoModelForSeq2SeqLM, with AutoTokenizer.
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
  Scored in batches of up to batch_size choices: each question's context is run once (left-padded with its neighbours), its key/value cache is copied to every choice, and all
  continuations run in one right-padded forward; questions go longest first.
- Warm workers (evaluator/stages/inference/stage.py WarmBackend): LOAD_OPTIONS are the options that change what
  load() builds; reconfigure() takes the next benchmark's parameters and run-time options; swap() loads the next
  checkpoint's weights into the built model when its config and tokenizer are unchanged (text models only).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from evaluator.common.records import ERROR, RunError, RunResult

from evaluator.stages.checkpoint_compat import checkpoint_view, reads_as_is, release_view

from ...common import option_on
from ..params import COMMON_GENERATION, GenerationParams, MODEL_ALIASES, Progress, apply_stop
from . import ModelLoadError

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


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def has_audio(messages) -> bool:
    return any(isinstance(m["content"], list) and any(p.get("type") == "audio" for p in m["content"])
               for m in messages)


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


def use_chat_template(options: dict) -> bool:
    """Option `chat_template` (default on): false/"false"/"no"/0 turn the checkpoint's template off."""
    return option_on(options, "chat_template")


def use_shared_prefix(options: dict) -> bool:
    """Option `shared_prefix` (default on): false/"false"/"no"/0 run every row of a batch from its first token."""
    return option_on(options, "shared_prefix")


def shared_prefix_length(rows: list) -> int:
    """How many leading tokens all `rows` (token id sequences) have in common, leaving each row at least one token
    of its own (the forward after the shared part needs an input in every row); 0 for fewer than two rows."""
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def target_delimiter(options: dict, chat: bool) -> str:
    """What precedes each choice in loglikelihood scoring: option `target_delimiter` when set, else lm-eval 0.4.10's
    rule: " " after a plain prompt, nothing after a chat-template prompt (its generation prompt ends the context)."""
    value = options.get("target_delimiter")
    if value is None:
        return "" if chat else " "
    if not isinstance(value, str):
        raise ModelLoadError(f"backend_options.target_delimiter: expected a string (e.g. \" \" or \"\"), got {value!r}")
    return value


# The rule chat-template loglikelihood scoring follows when no target_delimiter is set, versioned: results made under
# another rule must not share a curve. evaluator/daemon/fingerprint.py puts it in the settings of the benchmarks it
# applies to (chat_choice_rule), so no other benchmark's fingerprint moves. Until 2026-11-30 it was " <choice>".
CHAT_CHOICE_RULE = "lm-eval-0.4.10 (choice without target delimiter)"


def chat_choice_rule(options: dict) -> Optional[str]:
    """CHAT_CHOICE_RULE for a benchmark whose numbers depend on it: loglikelihood choice scoring with the chat template
    not turned off and no target_delimiter of its own; None otherwise. (Whether the checkpoint has a template at all is
    not known before it loads, so a template-less checkpoint with these options carries the rule too.)"""
    if options.get("choice_scoring") != "loglikelihood" or not use_chat_template(options) \
            or options.get("target_delimiter") is not None:
        return None
    return CHAT_CHOICE_RULE


def pack(order: list, size, limit: int) -> list:
    """Consecutive batches of `order` whose size(i) sum to at most `limit` (one item alone may exceed it)."""
    batches, batch, total = [], [], 0
    for i in order:
        if batch and total + size(i) > limit:
            batches.append(batch)
            batch, total = [], 0
        batch.append(i)
        total += size(i)
    if batch:
        batches.append(batch)
    return batches


@dataclass(frozen=True)
class ChoiceRequest:
    """One question's loglikelihood requests as tokens: the context (never empty) and each choice's continuation."""

    context: tuple
    continuations: tuple

    @property
    def rows(self) -> int:
        return len(self.continuations)

    def sort_key(self) -> tuple:
        # longest context first (contexts share a left-padded forward), then longest continuation
        return -len(self.context), -max((len(c) for c in self.continuations), default=0)


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


def tokenizer_digest(path: str) -> dict:
    """{file name: (size, sha256)} of the tokenizer files present in the checkpoint folder."""
    digest = {}
    for name in TOKENIZER_FILES:
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
    # every backend_options key this backend (and audio.AudioRunner) reads; batch_size is also the benchmark's own key
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
        except ModelLoadError:
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
        targets = dict(plan)
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
        order = sorted(range(len(samples)), key=lambda i: -self.runner.length(samples[i]))
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


class TextRunner:
    """Causal or seq2seq text LM with its tokenizer."""

    def __init__(self, path, config, device, dtype, params: GenerationParams, options: dict):
        import transformers
        self.device = device
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an eos token; cannot batch")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = transformers.AutoModelForSeq2SeqLM if self.seq2seq else transformers.AutoModelForCausalLM
        self.model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
        self.configure(params, options)
        self.eos_ids = self._eos_ids()
        self.prefix_memo = None  # (tokens, key/value cache) of the last shared prefix: prefix_cache

    def configure(self, params: GenerationParams, options: dict) -> None:
        """The generation parameters and prompt options (chat_template) of the next benchmark."""
        self.params = params
        self.chat = bool(use_chat_template(options) and getattr(self.tokenizer, "chat_template", None))
        self.target_delimiter = target_delimiter(options, self.chat)
        self.share = use_shared_prefix(options) and self.prefix_cacheable()

    def prefix_cacheable(self) -> bool:
        """Whether a key/value cache of a shared prompt prefix can be computed once and copied to every row: decoder
        -only models without sliding-window attention (a window would have to be cut per row)."""
        config = self.model.config
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        # a checkpoint asking generate() for its own cache kind (static, hybrid, ...) would refuse a prebuilt one
        own_cache = getattr(self.model.generation_config, "cache_implementation", None) not in (None, "dynamic")
        return not self.seq2seq and not sliding and not own_cache

    def forget_prefix(self) -> None:
        """Drop the remembered prefix cache: at every benchmark's start (its numbers depend on it alone) and before
        the weights change (HFBackend.swap)."""
        self.prefix_memo = None

    def prefix_cache(self, prefix: tuple):
        """The key/value cache of `prefix` in one row. Batches of one benchmark mostly start alike (the same template
        and instruction): the part in common with the last batch's prefix is copied from its cache, and only the
        tokens after it go through the model."""
        import copy
        import torch
        known, kept = self.prefix_memo or ((), None)
        common = 0
        while common < min(len(known), len(prefix)) and known[common] == prefix[common]:
            common += 1
        cache = None
        if common:
            cache = copy.deepcopy(kept)
            if common < len(known):  # a negative count removes that many tokens (transformers 4.x and 5.x alike)
                cache.crop(common - len(known))
        if common < len(prefix):
            with torch.inference_mode():
                cache = self.model(input_ids=torch.tensor([prefix[common:]], device=self.device),
                                   position_ids=torch.arange(common, len(prefix), device=self.device)[None],
                                   past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
        if not all(hasattr(cache, f) for f in ("crop", "batch_repeat_interleave")):
            print(f"[inference] shared_prefix: off for this model (its {type(cache).__name__} cannot be copied to "
                  "every row)", file=sys.stderr, flush=True)
            return None
        self.prefix_memo = (prefix, copy.deepcopy(cache))
        return cache

    def batch_layout(self, rows: list, share: bool):
        """A batch of token id rows as the model reads it: (ids, mask, p, cache).

        With p > 0 the first p tokens are every row's own shared prefix: it is run once, in one row (prefix_cache),
        and its key/value cache (repeated for every row) is returned; each row continues after it, left-padded to
        the batch's widest (the padding masked out, positions counted on from p, so every row is what it is alone).
        With p = 0 (one row, nothing shared, sharing off): plain left padding and no cache."""
        import torch
        p = shared_prefix_length(rows) if share else 0
        pad = self.tokenizer.pad_token_id
        width = p + max(len(r) - p for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        ids[:, :p] = torch.tensor(rows[0][:p], dtype=torch.long)
        mask[:, :p] = 1
        for q, r in enumerate(rows):
            ids[q, width - (len(r) - p):] = torch.tensor(r[p:], dtype=torch.long)
            mask[q, width - (len(r) - p):] = 1
        cache = self.prefix_cache(tuple(rows[0][:p])) if p else None
        if cache is not None:
            cache.batch_repeat_interleave(len(rows))
        elif p:  # this model's cache cannot be copied to every row: the batch runs whole, and so do the next ones
            self.share = False
            return self.batch_layout(rows, False)
        return ids, mask, p, cache

    def _eos_ids(self) -> set:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def read_generation_config(self, path: str) -> None:
        """The checkpoint's generation_config.json (or the one its config implies), as from_pretrained reads it."""
        import transformers
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            self.model.generation_config = transformers.GenerationConfig.from_pretrained(path)
        else:
            self.model.generation_config = transformers.GenerationConfig.from_model_config(self.model.config)
        self.eos_ids = self._eos_ids()

    def copy_plan(self, checkpoint: dict) -> Optional[list]:
        """[(checkpoint key, model tensor)] that loads `checkpoint` ({key: (shape, dtype, file)}) strictly: every
        model tensor from exactly one key of the same shape, nothing left over; None when it does not fit.
        Tied tensors (lm_head sharing the embedding) are one tensor: the checkpoint holds it under one of their names
        (save_pretrained keeps one); when it holds several, the first in the model's order is copied."""
        groups: dict = {}  # storage -> the model's names for that tensor, in model order
        tensors = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            groups.setdefault(key, []).append(name)
            tensors[name] = tensor
        plan, used = [], set()
        for names in groups.values():
            present = [n for n in names if n in checkpoint]
            if not present:
                return None
            used.update(present)
            name = present[0]
            if tuple(checkpoint[name][0]) != tuple(tensors[name].shape):
                return None
            plan.append((name, tensors[name]))
        if set(checkpoint) - used:
            return None
        return plan

    def prompt(self, sample) -> str:
        if has_audio(sample.messages):
            raise ValueError(f"sample {sample.id!r} has audio input but this checkpoint is a text-only model")
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in sample.messages]
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def length(self, sample) -> int:
        try:
            return len(self.tokenizer(self.prompt(sample), add_special_tokens=not self.chat)["input_ids"])
        except Exception:
            return 0  # the error surfaces (per sample) when the batch runs

    def generate(self, samples) -> list:
        import torch
        prompts = [self.prompt(s) for s in samples]
        rows = self.tokenizer(prompts, add_special_tokens=not self.chat)["input_ids"]
        # a shared prompt prefix (system prompt, few-shot examples) is run once per batch, unless generate() would
        # expand the batch (beams, several sequences per prompt), which a prebuilt cache does not follow
        single = all(int(self.params.extra.get(k) or 1) == 1 for k in ("num_beams", "num_return_sequences"))
        ids, mask, _, cache = self.batch_layout(rows, self.share and single)
        kwargs = dict(max_new_tokens=self.params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if self.params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.params.temperature, top_p=self.params.top_p)
        kwargs.update(self.params.extra)
        if cache is not None:
            kwargs["past_key_values"] = cache
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out if self.seq2seq else out[:, ids.shape[1]:]
        results = []
        for row, prompt_tokens in zip(new.tolist(), mask.sum(-1).tolist()):
            if self.seq2seq and row and row[0] == self.model.generation_config.decoder_start_token_id:
                row = row[1:]
            n = len(row)
            for k, tok in enumerate(row):
                if tok in self.eos_ids:
                    n = k + 1
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            results.append((text, {"prompt_tokens": int(prompt_tokens), "completion_tokens": n,
                                   "total_tokens": int(prompt_tokens) + n}))
        return results

    # ---- loglikelihood scoring ------------------------------------------------------------------------------
    def continuation(self, choice: str) -> str:
        """The text scored for `choice` after the prompt (lm-eval's (context, continuation) request's second half)."""
        return self.target_delimiter + choice

    def encode_choices(self, sample) -> ChoiceRequest:
        """lm-evaluation-harness's tokenisation of (prompt, continuation(choice)): the context's trailing whitespace
        moves to the continuation, context+continuation is encoded whole and the continuation's tokens are what
        follows the context's own encoding; an empty context is the eos token. The model reads the context's encoding
        followed by those tokens, as lm-eval feeds it (the whole encoding itself unless a token spans the boundary)."""
        if self.seq2seq:
            raise ValueError("choice_scoring=loglikelihood supports causal LMs only")
        if not sample.choices:
            raise ValueError(f"sample {sample.id!r} has no choices to score")
        context = self.prompt(sample)
        spaces = len(context) - len(context.rstrip())
        context, moved = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
        ctx_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        wholes = self.tokenizer([context + moved + self.continuation(choice) for choice in sample.choices],
                                add_special_tokens=False)["input_ids"]
        continuations = tuple(tuple(whole[len(ctx_ids):]) for whole in wholes)
        if not ctx_ids:  # nothing to condition on: lm-eval prefixes the eos token
            if self.tokenizer.eos_token_id is None:
                raise ValueError(f"sample {sample.id!r}: empty prompt and the tokenizer has no eos token to start from")
            ctx_ids = [self.tokenizer.eos_token_id]
        return ChoiceRequest(context=tuple(ctx_ids), continuations=continuations)

    def score(self, requests: list) -> list:
        """Per request, the summed log-probability of each continuation after its context.

        Two forwards (after the batch's shared prefix, run once: batch_layout): the contexts, left-padded (attention
        mask and position ids make each row what it is alone), whose last position scores every continuation's first
        token; then every continuation longer than one token, right-padded after a copy of its own context's
        key/value cache."""
        import torch
        import torch.nn.functional as F
        pad = self.tokenizer.pad_token_id
        ctx_lens = [len(r.context) for r in requests]
        ids, mask, p, cache = self.batch_layout([r.context for r in requests], self.share)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        with torch.inference_mode():
            out = self.model(input_ids=ids[:, p:].to(dev), attention_mask=mask.to(dev),
                             position_ids=positions[:, p:].to(dev), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            first = F.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
            # per choice, its tokens' float32 log-probabilities; summed at the end in float32 in token order, as
            # the unbatched rule and lm-eval sum them, so only the forwards' rounding differs
            tokens = [[first[q, c[:1]] for c in r.continuations] for q, r in enumerate(requests)]
            rows = [(q, k) for q, r in enumerate(requests) for k, c in enumerate(r.continuations) if len(c) > 1]
            if rows:
                tails = [requests[q].continuations[k] for q, k in rows]
                length = max(len(t) for t in tails) - 1
                inputs = torch.full((len(rows), length), pad, dtype=torch.long)
                targets = torch.zeros((len(rows), length), dtype=torch.long)
                valid = torch.zeros((len(rows), length), dtype=torch.long)
                for j, t in enumerate(tails):
                    inputs[j, :len(t) - 1] = torch.tensor(t[:-1])
                    targets[j, :len(t) - 1] = torch.tensor(t[1:])
                    valid[j, :len(t) - 1] = 1
                owner = torch.tensor([q for q, _ in rows])
                cache = out.past_key_values
                cache.reorder_cache(owner.to(dev))
                del out
                starts = torch.tensor(ctx_lens)[owner]
                out = self.model(input_ids=inputs.to(dev), attention_mask=torch.cat([mask[owner], valid], 1).to(dev),
                                 position_ids=(starts[:, None] + torch.arange(length)).to(dev),
                                 past_key_values=cache, use_cache=True)
                logprobs = F.log_softmax(out.logits.float(), dim=-1)
                picked = logprobs.gather(2, targets.to(dev)[:, :, None])[:, :, 0].cpu()
                for j, (q, k) in enumerate(rows):
                    tokens[q][k] = torch.cat([tokens[q][k], picked[j, :len(tails[j]) - 1]])
        return [[float(t.sum()) for t in per_choice] for per_choice in tokens]

    def choice_logprobs(self, sample) -> list:
        """One sample's choices scored alone (the loglikelihood rule of encode_choices and score)."""
        return self.score([self.encode_choices(sample)])[0]
