"""`vllm` backend: vLLM's offline engine (`vllm.LLM`) on a checkpoint directory or hub id, on whatever device
vLLM's platform detection finds (a CUDA GPU; the CPU build in .venvs/inference-vllm-cpu).

- Needs vLLM installed in the inference venv and a device it can run on; without either, load() raises
  ModelLoadError saying which is missing. It never falls back to the hf backend: a result must say what produced it.
- Chat checkpoints (a tokenizer chat template) go through `LLM.chat(conversations, SamplingParams)`; audio parts
  are sent as `input_audio` content parts (openai.to_openai_messages: wav/mp3 bytes as they are, other formats
  as wav), so vLLM decodes, resamples and places
  the model's audio placeholders itself. Checkpoints without a chat template (or option `chat_template: false`)
  go through `LLM.generate(prompts)` with the turns' texts joined by newlines, like the hf backend; audio
  then needs a chat template. Whisper-style encoder-decoders: use the hf backend.
- vLLM schedules (continuous batching) inside one call; `batch_size` (default 256) only sets how many samples
  one call gets, i.e. how often progress is reported. A call that raises is retried one sample at a time, so a
  bad sample (e.g. an unreadable audio file) costs only itself.
- Options: tensor_parallel_size, gpu_memory_utilization, max_model_len, dtype, enforce_eager,
  trust_remote_code, limit_mm_per_prompt (default {"audio": 4}), engine_args (a mapping passed to vllm.LLM
  as it is). Generation: max_new_tokens -> max_tokens, temperature (0 = greedy), top_p, stop; other
  `generation:` keys go to SamplingParams by name.
- Warm workers (evaluator/stages/inference/stage.py WarmBackend): one engine per checkpoint session. LOAD_OPTIONS
  (the engine options, engine_args, chat_template, weight_reload) and the seed decide what load() builds; the next
  benchmark on the same checkpoint with the same LOAD_OPTIONS gets the engine as it is through reconfigure() (its
  own SamplingParams, batch_size, choice_scoring check). Another checkpoint: by default a fresh worker
  (fresh_worker_per_checkpoint), so each checkpoint pays one engine start. With `weight_reload: true` the worker
  keeps its engine and swap() reloads the next checkpoint's weights in place (vllm_reload.py: vLLM's
  reload_weights plus the repacking of a tied lm_head that vLLM 0.16's CPU build misses) when its config.json,
  tokenizer and generation config files and its tensors (names, shapes, dtypes) equal those the engine was built
  from; anything else builds a new engine. Verified equal to a fresh engine, log-probability for
  log-probability, on vLLM 0.16's CPU build, compiled and eager (scripts/check_vllm_reload.py); not verified on
  a GPU here, hence off by default: run that script on the GPU first.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import sys
from typing import Optional

from evaluator.common.records import RunResult
from evaluator.stages.checkpoint_compat import checkpoint_view, release_view
from evaluator.stages.common import switch_value

from ..params import COMMON_GENERATION, GenerationParams, Progress, apply_stop, missing_local_model
from . import ModelLoadError
from .hf import CheckpointTensors, config_fields, generate_isolated, sample_bases, tokenizer_digest, weight_files
from .text import text_of, use_chat_template
from .audio import check_audio_input
from .openai import to_openai_messages  # the OpenAI chat format vLLM's LLM.chat takes, audio as input_audio

ENGINE_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype", "enforce_eager",
                  "trust_remote_code", "limit_mm_per_prompt")
RELOAD_EXTENSION = "evaluator.stages.inference.backends.vllm_reload.ReloadExtension"


def weight_reload(options: dict) -> bool:
    """Whether the options turn on in-place weight reload across checkpoints (`weight_reload`, off by default)."""
    return bool(switch_value(options.get("weight_reload", False)))


def reload_signature(path: str) -> Optional[tuple]:
    """What must be equal for a checkpoint's weights to be reloaded into an engine built from another one: its
    config.json fields, its tokenizer and generation config files, and its tensors (name -> shape, dtype); None when
    the folder has no readable config or weights (a fresh load then reports it properly)."""
    config = config_fields(path)
    try:
        files = weight_files(path) if os.path.isdir(path) else []
        tensors = CheckpointTensors(files).index if files and config is not None else None
    except Exception:  # an unreadable index or header: a fresh load reports it
        return None
    if tensors is None:
        return None
    return (config, tokenizer_digest(path, extra=("generation_config.json",)),
            {name: (shape, str(dtype)) for name, (shape, dtype, _) in tensors.items()})


def vllm_device() -> str:
    """The device type vLLM found (cuda, rocm's "cuda", cpu, xpu, tpu...), or "" when it found none it can run on
    (a CUDA build of vLLM on a machine without a visible GPU)."""
    from vllm.platforms import current_platform
    return "" if current_platform.is_unspecified() else str(current_platform.device_type)


def check_scoring(options: dict) -> None:
    if options.get("choice_scoring") not in (None, "generate"):
        raise ModelLoadError("backend_options.choice_scoring: the vllm backend generates only; "
                             "use the hf backend for choice_scoring=loglikelihood")


def batch_size(options: dict) -> int:
    # vLLM batches inside one call; this only sets how many samples a call gets (progress reports)
    return int(options.get("batch_size") or 256)


STEREO_KEPT = False  # vLLM's AudioMediaIO loads audio as mono (librosa / its load_audio, mono=True)


class VLLMBackend:
    name = "vllm"
    OPTIONS = ENGINE_OPTIONS + ("engine_args", "chat_template", "weight_reload", "choice_scoring", "batch_size")
    # what the engine is built from (a warm worker builds a new one when any differs); batch_size and
    # choice_scoring are per benchmark (reconfigure)
    LOAD_OPTIONS = ENGINE_OPTIONS + ("engine_args", "chat_template", "weight_reload")

    @staticmethod
    def fresh_worker_per_checkpoint(options: dict) -> bool:
        """A second vllm.LLM in one process may not get the first one's GPU memory back (vLLM issues #6544, #21073,
        #4678; on the CPU build the first engine-core process exits before the next starts: test_vllm_real.py): a
        warm worker keeps one engine for a checkpoint's benchmarks and the next checkpoint gets a fresh worker
        (local executor, `choose_worker`), unless `weight_reload` keeps the engine and reloads the weights."""
        return not weight_reload(options)

    # generation: keys SamplingParams takes; it raises TypeError on any other (min_new_tokens is its min_tokens;
    # no beam search, no language/task)
    GENERATION = COMMON_GENERATION + ("top_k", "min_p", "repetition_penalty", "presence_penalty",
                                      "frequency_penalty", "stop_token_ids", "ignore_eos", "n")

    def __init__(self, model: str, options: dict, params: GenerationParams, seed: int = 0,
                 alias: Optional[str] = None):
        self.model_path, self.options, self.params, self.seed, self.alias = model, dict(options), params, seed, alias
        self.llm = None

    def load(self) -> dict:
        if importlib.util.find_spec("vllm") is None:
            raise ModelLoadError(f"backend vllm cannot run here: vLLM is not installed in {sys.prefix} (build the "
                                 "inference venv with `WITH_VLLM=1 make setup` on a CUDA machine, or use the CPU "
                                 "build: `make setup-vllm-cpu`, envs.inference: .venvs/inference-vllm-cpu), or "
                                 "choose --backend hf.")
        self.device = vllm_device()
        if not self.device:
            raise ModelLoadError("backend vllm cannot run here: vLLM found no device to run on (no CUDA GPU is "
                                 "visible and this vLLM is not its CPU build). Run it on a CUDA machine, use the CPU "
                                 "build (`make setup-vllm-cpu`), or choose --backend hf.")
        check_scoring(self.options)
        if missing_local_model(self.model_path):
            raise ModelLoadError(missing_local_model(self.model_path))
        # the vLLM venv pins transformers 4.x: a checkpoint saved by 5.x is read through a translated view or
        # refused (CheckpointFormatError, exit 2), never misread (checkpoint_compat.py); the view lives until close()
        self.source = checkpoint_view(self.model_path, log=lambda line: print(line, file=sys.stderr, flush=True))
        import vllm
        kwargs = {k: self.options[k] for k in ENGINE_OPTIONS if k in self.options}
        kwargs.setdefault("limit_mm_per_prompt", {"audio": 4})
        kwargs.update(self.options.get("engine_args") or {})
        self.signature = None
        if weight_reload(self.options):
            kwargs["worker_extension_cls"] = RELOAD_EXTENSION
            self.signature = reload_signature(self.model_path)
        try:
            self.llm = vllm.LLM(model=self.source, seed=self.seed, **kwargs)
        except Exception as e:  # vLLM raises many types (ValueError, OSError, RuntimeError) for a bad model
            msg = f"cannot load model {self.model_path!r} with vLLM: {type(e).__name__}: {str(e).strip()[:800]}"
            if self.alias:
                msg += (f"\n  {self.alias!r} is an alias of the hub model {self.model_path!r}; download it where the "
                        f"hub is reachable (`huggingface-cli download {self.model_path}`) and pass --model <dir>.")
            raise ModelLoadError(msg) from None
        tokenizer = self.llm.get_tokenizer()
        self.chat = bool(use_chat_template(self.options) and getattr(tokenizer, "chat_template", None))
        self.batch_size = batch_size(self.options)
        self.sampling = self._sampling_params(vllm.SamplingParams, self.params)
        return {"engine": "vllm", "vllm": vllm.__version__, "device": self.device, "batch_size": self.batch_size,
                "chat": self.chat, **{k: v for k, v in kwargs.items() if k in ENGINE_OPTIONS}}

    def reconfigure(self, params: GenerationParams, options: dict) -> None:
        """Take the next benchmark's generation parameters and run-time options; the engine is kept as it is.

        The LOAD_OPTIONS must be those of load() (the worker builds a new engine otherwise). ModelLoadError, as
        load() raises it, for choice_scoring or generation parameters SamplingParams rejects; the backend is then
        left as it was."""
        changed = [k for k in self.LOAD_OPTIONS if options.get(k) != self.options.get(k)]
        if changed:
            raise ValueError(f"reconfigure cannot change {', '.join(changed)} (they decide the engine load() "
                             "built); close this backend and load a new one")
        check_scoring(options)
        import vllm
        sampling = self._sampling_params(vllm.SamplingParams, params)
        self.params, self.options, self.sampling = params, dict(options), sampling
        self.batch_size = batch_size(self.options)

    def run_info(self) -> dict:
        """The part of load()'s info that reconfigure() changes."""
        return {"batch_size": self.batch_size, "chat": self.chat}

    def swap(self, model_path: str) -> bool:
        """With `weight_reload`: load `model_path`'s weights into the running engine when the checkpoint is, but for
        its tensors' values, the one the engine was built from (reload_signature); True when swapped. False, with
        the engine untouched, otherwise (the caller builds a new engine). ModelLoadError when the reload fails
        midway: the engine is then closed, never used half-swapped."""
        if self.llm is None or self.signature is None or not weight_reload(self.options):
            return False
        if reload_signature(model_path) != self.signature:
            return False
        source = checkpoint_view(model_path, log=lambda line: print(line, file=sys.stderr, flush=True))
        try:
            self.llm.collective_rpc("evaluator_reload_weights", args=(source,))
            self.llm.reset_prefix_cache()  # KV blocks computed with the old weights must not serve the new ones
        except Exception as e:
            release_view(source)
            self.close()
            raise ModelLoadError(f"reloading the weights of {model_path!r} into the vLLM engine failed midway "
                                 f"({type(e).__name__}: {str(e).strip()[:600]}); the engine was closed") from None
        release_view(getattr(self, "source", None) or "")
        self.source, self.model_path = source, model_path
        return True

    def _sampling_params(self, cls, p: GenerationParams):
        kwargs = dict(max_tokens=p.max_new_tokens, temperature=0.0 if p.greedy else p.temperature,
                      top_p=1.0 if p.greedy else p.top_p, stop=list(p.stop) or None, seed=self.seed)
        kwargs.update(p.extra)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"generation: vLLM's SamplingParams rejects {sorted(p.extra) or kwargs}: {e}") \
                from None

    def _request(self, samples) -> list:
        for s in samples:  # vLLM decodes audio to mono itself: a spatial multichannel clip fails its sample
            check_audio_input(s, "the vllm backend", None, STEREO_KEPT)
        if self.chat:
            return self.llm.chat([to_openai_messages(s.messages) for s in samples], self.sampling, use_tqdm=False)
        for s in samples:
            if s.audio_paths():
                raise ValueError(f"sample {s.id!r} has audio input but the checkpoint has no chat template to "
                                 "place it; the vllm backend needs one for audio")
        prompts = ["\n".join(text_of(m["content"]) for m in s.messages) for s in samples]
        return self.llm.generate(prompts, self.sampling, use_tqdm=False)

    def run(self, samples: list, dataset_id: str, progress: Progress) -> list:
        run_config = {"model": self.alias or self.model_path, "backend": self.name, "seed": self.seed,
                      "batch_size": self.batch_size, "params": self.params.to_dict()}
        results: list[Optional[RunResult]] = [None] * len(samples)
        base = sample_bases(samples, dataset_id, self.name, run_config)
        for start in range(0, len(samples), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(samples))))
            generate_isolated(batch, lambda b: self._request([samples[i] for i in b]),
                              lambda b, outputs, ms: self._record(b, outputs, ms, base, results), base, results)
            progress.update(len(batch))
        return results

    def _record(self, batch, outputs, latency_ms, base, results) -> None:
        latency = round(latency_ms, 3)
        for i, out in zip(batch, outputs):
            completion = out.outputs[0]
            prompt_tokens = len(out.prompt_token_ids or [])
            n = len(completion.token_ids)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            results[i] = RunResult(**base(i), response={"text": apply_stop(completion.text, self.params.stop).strip(),
                                                        "usage": usage, "finish_reason": completion.finish_reason},
                                   latency_ms=latency)

    def close(self) -> None:
        self.llm = None
        gc.collect()  # another engine option on the same checkpoint builds the next engine in this process
        release_view(getattr(self, "source", None) or "")
