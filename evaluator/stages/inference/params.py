"""Generation parameters (the one table of what a benchmark may set) and small helpers every backend shares.

Standard library only: the daemon checks `generation:` at config load with generation_problems(), against
GENERATION_PARAMS (the values) and the chosen backend class's GENERATION (the names it takes)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from evaluator.common.checks import number_problem
from evaluator.common.errors import EvaluatorError, did_you_mean

# Public model ids behind the short names lalm_bench uses. Offline they fail with a clear message.
MODEL_ALIASES = {
    "gemma3n": "google/gemma-3n-E4B-it",
    "qwen2_5-omni": "Qwen/Qwen2.5-Omni-7B",
    "qwen3-omni": "Qwen/Qwen3-Omni-30B-A3B-Instruct",
}


def _number(low=None, high=None, integer=False, low_open=False):
    """A check for a numeric generation parameter: the problem with a value, or None."""
    return lambda value: number_problem(value, low, high, integer, low_open)


def _strings(value) -> Optional[str]:
    ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
    return None if ok else f"expected a string or a list of strings, got {value!r}"


def _token_ids(value) -> Optional[str]:
    ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    return None if ok else f"expected a list of token ids, got {value!r}"


def _one(value) -> Optional[str]:
    return None if value == 1 else f"one answer per sample is recorded; got {value!r}"


def _of_type(kind: type, what: str):
    return lambda value: None if isinstance(value, kind) else f"expected {what}, got {value!r}"


# The generation parameters a benchmark may set (config `generation:`, bench.py --param), each with its check.
# max_new_tokens, temperature, top_p and stop are read here; the others go to the backend by name (hf generate(),
# vLLM SamplingParams, the OpenAI request body), and only to a backend whose class lists them in GENERATION.
# One table, so a typo fails at config load, not in every stage.
GENERATION_PARAMS: dict[str, Callable[[object], Optional[str]]] = {
    "max_new_tokens": _number(1, integer=True),
    "max_tokens": _number(1, integer=True),  # the OpenAI/vLLM spelling of max_new_tokens
    "temperature": _number(0),  # 0 = greedy
    "top_p": _number(0, 1, low_open=True),
    "stop": _strings,
    "top_k": _number(-1, integer=True),  # -1 / 0: no limit (vLLM / transformers)
    "min_p": _number(0, 1),
    "min_new_tokens": _number(0, integer=True),
    "repetition_penalty": _number(0, low_open=True),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "length_penalty": _number(),
    "no_repeat_ngram_size": _number(0, integer=True),
    "num_beams": _number(1, integer=True),
    "stop_token_ids": _token_ids,
    "ignore_eos": _of_type(bool, "true or false"),
    "language": _of_type(str, "a language name or code"),  # Whisper-style audio models
    "task": _of_type(str, "transcribe or translate"),  # Whisper-style audio models
    "n": _one,
    "num_return_sequences": _one,
}
# What GenerationParams reads itself and hands every backend in its own terms: each backend's GENERATION starts so.
COMMON_GENERATION = ("max_new_tokens", "max_tokens", "temperature", "top_p", "stop")


def _backend(name: str):
    from .backends import backend_class  # backend modules import nothing heavy at module level
    return backend_class(name)


def generation_problems(data: Optional[dict], backend: Optional[str] = None) -> list[tuple[str, str]]:
    """(parameter, what is wrong) for every unknown or out-of-range generation parameter and, given a backend
    name, every one that backend would refuse or ignore (its class's GENERATION). An unknown backend name is not
    reported here: backends.backend_class says what is wrong with it."""
    from .backends import BACKENDS
    data = data or {}
    cls = _backend(backend) if backend in BACKENDS else None
    problems = []
    for key, value in data.items():
        check = GENERATION_PARAMS.get(key)
        if check is None:
            problems.append((key, f"unknown generation parameter{did_you_mean(key, GENERATION_PARAMS)} "
                                  f"(known: {', '.join(GENERATION_PARAMS)})"))
        elif cls is not None and key not in cls.GENERATION:
            others = [name for name in BACKENDS if key in _backend(name).GENERATION]
            hint = getattr(cls, "GENERATION_HINT", "")
            problems.append((key, f"the {backend} backend does not take {key} (the {' and '.join(others)} "
                                  f"backend{'s' if len(others) > 1 else ''} do{'' if len(others) > 1 else 'es'})"
                                  f"{'; ' + hint if hint else ''}; it takes {', '.join(cls.GENERATION)}"))
        elif (problem := check(value)) is not None:
            problems.append((key, problem))
    if "max_new_tokens" in data and "max_tokens" in data:
        problems.append(("max_tokens", "another name of max_new_tokens, which is given too; give one of them"))
    return problems


@dataclass
class GenerationParams:
    """Greedy by default (temperature 0). Parameters beyond the first four go to `extra` and on to the backend."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, data: Optional[dict], where: str = "generation",
                  backend: Optional[str] = None) -> "GenerationParams":
        """Checked parameters; EvaluatorError names the first unknown or out-of-range one, or, given a backend
        name, the first one that backend does not take."""
        problems = generation_problems(data, backend)
        if problems:
            key, text = problems[0]
            raise EvaluatorError(f"{where}.{key}: {text}")
        data = dict(data or {})
        out = cls()
        if "max_new_tokens" in data or "max_tokens" in data:
            out.max_new_tokens = int(data.pop("max_new_tokens", data.pop("max_tokens", None)))
        out.temperature = float(data.pop("temperature", out.temperature))
        out.top_p = float(data.pop("top_p", out.top_p))
        stop = data.pop("stop", [])
        out.stop = [stop] if isinstance(stop, str) else stop
        out.extra = data
        return out


def parse_kv(items: list, what: str) -> dict:
    """`k=v` strings (bench.py --param / --backend-opt) -> dict; values parsed as JSON when they parse."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise EvaluatorError(f"{what} {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def apply_stop(text: str, stop: list) -> str:
    """Cut at the first stop string (the stop string itself is dropped, as OpenAI does)."""
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def resolve_model(model: str) -> tuple[str, Optional[str]]:
    """(path or hub id, alias used or None). A local path wins over an alias of the same name."""
    if os.path.exists(model):
        return os.path.abspath(model), None
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model], model
    return model, None


def missing_local_model(model: str) -> Optional[str]:
    """Why `model`, written as a local path (absolute, ./, ../, ~), cannot be loaded: it does not exist; else None
    (a hub id, or there). Said before a library takes it for a malformed hub id."""
    if (os.path.isabs(model) or model.startswith((".", "~"))) and not os.path.exists(os.path.expanduser(model)):
        return f"model {model!r}: no such checkpoint directory"
    return None


class Progress:
    """A progress line on stderr at most every `every` seconds: done/total, rate, ETA. Line-based, so it reads
    well in infer.stderr.log and on a terminal alike."""

    def __init__(self, total: int, what: str = "samples", every: float = 5.0, out=None):
        self.total, self.what, self.every = total, what, every
        self.out = out or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            print(f"[inference] [{bar}] {self.done}/{self.total} {self.what} {rate:.2f}/s "
                  f"elapsed {elapsed:.0f}s eta {eta:.0f}s", file=self.out, flush=True)
