"""Result sinks, looked up by name from `recorder.sinks` in the config.

The daemon hands each scored result to every configured sink and marks it recorded for a sink
only after that sink accepted it (ledger table `recordings`). A sink must therefore be
idempotent per (run, iteration, benchmark): after a crash between "sink accepted" and "ledger
updated" the same result is offered again and must not be written twice.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol


@dataclass
class ResultRecord:
    run: str
    iteration: int
    benchmark: str
    metrics: dict
    tokens_b: Optional[float] = None
    n: Optional[int] = None
    stderr: dict = field(default_factory=dict)
    per_category: dict = field(default_factory=dict)
    checkpoint: str = ""
    metrics_path: str = ""

    @property
    def key(self) -> tuple:
        return (self.run, self.iteration, self.benchmark)


class Sink(Protocol):
    name: str

    def record(self, result: ResultRecord) -> None:
        """Store the result or raise; must be idempotent per result.key."""


class LocalHistorySink:
    """Appends one JSON line per result to <cache_dir>/results/<run>/history.jsonl."""

    name = "local"

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self._keys: dict[str, set] = {}  # run -> keys in its history.jsonl (read once, then kept)

    def _path(self, run: str) -> str:
        return os.path.join(self.cache_dir, "results", run, "history.jsonl")

    def recorded_keys(self, run: str) -> set:
        if run not in self._keys:
            keys = set()
            path = self._path(run)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.endswith("\n"):  # an unterminated last line is a torn write
                            row = json.loads(line)
                            keys.add((row["run"], row["iteration"], row["benchmark"]))
            self._keys[run] = keys
        return self._keys[run]

    def record(self, result: ResultRecord) -> None:
        keys = self.recorded_keys(result.run)
        if result.key in keys:
            return  # offered again after a crash: already written once
        path = self._path(result.run)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _drop_torn_tail(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        keys.add(result.key)


def _drop_torn_tail(path: str) -> None:
    """Cut a line left half-written by a crash, so the next row starts on a line of its own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()  # rare: only after a crash mid-write
        f.truncate(data.rfind(b"\n") + 1)


SINKS = {"local": LocalHistorySink}


def make_sinks(names: list[str], cache_dir: str) -> list:
    return [SINKS[name](cache_dir) for name in names]
