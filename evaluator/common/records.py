"""RunResult: one row of predictions.jsonl, the file the inference stage hands to the evaluation stage.

    {"sample_id", "dataset_id", "backend", "run_config", "request_messages",
     "response": {"text", "usage"}, "status": "ok"|"error", "latency_ms", "attempts",
     "error": {"type", "message", "retryable"} | null}

Standard library only: both stage venvs (and the daemon's recorder) read it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .atomic import write_text_atomic

OK = "ok"
ERROR = "error"
# the fraction of a run's samples that may fail before the run fails (inference stage, Python API)
DEFAULT_MAX_ERROR_RATE = 0.1


def too_many_errors(n_error: int, n: int, max_error_rate: float) -> bool:
    """More than `max_error_rate` of the `n` samples failed: the run fails (at the limit it does not)."""
    return n > 0 and n_error / n > max_error_rate


@dataclass
class RunError:
    type: str
    message: str
    retryable: bool = False


@dataclass
class RunResult:
    sample_id: str
    dataset_id: str
    backend: str
    run_config: dict
    request_messages: list
    response: dict = field(default_factory=lambda: {"text": "", "usage": {}})
    status: str = OK
    latency_ms: float = 0.0
    attempts: int = 1
    error: Optional[RunError] = None

    @property
    def text(self) -> str:
        return (self.response or {}).get("text") or ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "predictions") -> "RunResult":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("sample_id", "status", "response") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if data["status"] not in (OK, ERROR):
            raise ValueError(f"{where}: status: expected 'ok' or 'error', got {data['status']!r}")
        if not isinstance(data["response"], dict):
            raise ValueError(f"{where}: response: expected an object with 'text'")
        text = data["response"].get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: response.text: expected a string (the model's answer), got {text!r}"[:300])
        error = data.get("error")
        if error is not None and (not isinstance(error, dict) or not isinstance(error.get("type") or "", str)
                                  or not isinstance(error.get("message") or "", str)):
            raise ValueError(f"{where}: error: expected an object {{type, message, retryable}} or null, "
                             f"got {error!r}"[:300])
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        kwargs["sample_id"] = str(data["sample_id"])
        kwargs.setdefault("dataset_id", "")
        kwargs.setdefault("backend", "")
        kwargs.setdefault("run_config", {})
        kwargs.setdefault("request_messages", [])
        kwargs["error"] = RunError(type=error.get("type") or "error", message=error.get("message") or "",
                                   retryable=bool(error.get("retryable"))) if error is not None else None
        return cls(**kwargs)


def write_results(path: str, results: Iterable[RunResult]) -> int:
    """Write predictions.jsonl atomically (temp name + rename); returns the row count."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in results]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def jsonl_rows(path: str, error: type = ValueError) -> Iterable[tuple[str, int, Any]]:
    """(where "file:line", line number, parsed value) for every non-blank line of a JSONL file; a line that is not
    JSON raises `error` naming file:line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{where}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                yield where, lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None


def read_results(path: str) -> list[RunResult]:
    """Read predictions.jsonl; a bad row raises ValueError naming file:line and what is wrong."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such predictions file")
    return [RunResult.from_dict(data, where) for where, _, data in jsonl_rows(path)]
