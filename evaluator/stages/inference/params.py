"""Generation parameters and small helpers every backend shares (no torch here)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from evaluator.common.errors import EvaluatorError

# Public model ids behind the short names lalm_bench uses. Offline they fail with a clear message.
MODEL_ALIASES = {
    "gemma3n": "google/gemma-3n-E4B-it",
    "qwen2_5-omni": "Qwen/Qwen2.5-Omni-7B",
    "qwen3-omni": "Qwen/Qwen3-Omni-30B-A3B-Instruct",
}


@dataclass
class GenerationParams:
    """Greedy by default (temperature 0). Unknown keys go to `extra` and on to the backend as they are."""

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
    def from_dict(cls, data: Optional[dict], where: str = "generation") -> "GenerationParams":
        data = dict(data or {})
        out = cls()
        try:
            if "max_new_tokens" in data or "max_tokens" in data:
                out.max_new_tokens = int(data.pop("max_new_tokens", data.pop("max_tokens", None)))
            if "temperature" in data:
                out.temperature = float(data.pop("temperature"))
            if "top_p" in data:
                out.top_p = float(data.pop("top_p"))
        except (TypeError, ValueError) as e:
            raise EvaluatorError(f"{where}: {e}") from None
        if "stop" in data:
            stop = data.pop("stop")
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise EvaluatorError(f"{where}.stop: expected a string or a list of strings, got {stop!r}")
            out.stop = stop
        for key in ("num_return_sequences", "n"):
            if key in data and data[key] != 1:
                raise EvaluatorError(f"{where}.{key}: one answer per sample is recorded; got {data[key]!r}")
        if out.max_new_tokens < 1:
            raise EvaluatorError(f"{where}.max_new_tokens: expected >= 1, got {out.max_new_tokens}")
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
