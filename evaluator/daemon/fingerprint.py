"""A benchmark's settings fingerprint: everything that changes its numbers, hashed, so one curve never mixes settings.

`settings(bench, cfg)` is the dict that is hashed: the benchmark spec minus what cannot change a number (its
name, `main_metric`, `max_error_rate`), the seed it runs with, the dataset's content digest, and
SCORING_VERSION. A scoring change that alters only some benchmarks adds a key to those benchmarks' settings only
(`chat_choice_rule`: hf loglikelihood choice scoring under a chat template). `fingerprint(settings)` is the first
12 hex digits of its SHA-256 over canonical JSON; the ledger keeps the settings of every fingerprint it has seen,
so `changes(old, new)` can say what changed ("generation.max_new_tokens: 8 -> 2").

The dataset digest hashes the content of its text files (jsonl/json/csv/tsv/txt/yaml/parquet up to 64 MiB each:
the samples, references and metadata) and only the relative path and size of everything else (audio), so a
dataset copied to another mount keeps its fingerprint while an edited reference or a replaced clip does not.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from evaluator.stages.inference.backends import hf  # its module level is standard library only

# Bump when a change to the stages alters the numbers of an unchanged benchmark spec (a scoring fix): every
# benchmark then reports changed settings, and the operator re-runs or keeps the old curve by name.
SCORING_VERSION = 1
CONTENT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".parquet")
CONTENT_MAX_BYTES = 64 << 20
MAX_FILES = 100_000  # a dataset folder bigger than this is described by its first files in sorted order
# spec fields that never change a benchmark's numbers
NEUTRAL_FIELDS = ("name", "main_metric", "max_error_rate", "batch_size")
# backend and metric options that only change how fast or how patiently the same numbers are made (concurrency,
# timeouts, retries, where a server logs): changing them must not hold a benchmark
NEUTRAL_OPTIONS = ("batch_size", "max_concurrency", "timeout", "max_retries", "retry_backoff", "retry_backoff_max",
                   "rate_limit", "serve_timeout", "serve_log", "serve_port", "trace_prefix", "gpu_memory_utilization",
                   "api_key_env", "spice_timeout", "java_path", "reviews_file",
                   "weight_reload")  # vllm: the same numbers, an engine kept instead of built again


def dataset_digest(path: Optional[str]) -> Optional[str]:
    """Content digest of a dataset file or folder (see the module docstring); None for no dataset."""
    if not path:
        return None
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else _files(path)
    for f in files:
        rel = os.path.relpath(f, path) if f != path else os.path.basename(f)
        size = os.path.getsize(f)
        h.update(f"{rel}\0{size}\0".encode())
        if f.lower().endswith(CONTENT_SUFFIXES) and size <= CONTENT_MAX_BYTES:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def dataset_stamp(path: Optional[str]) -> Optional[str]:
    """A cheap signature of a dataset's files (names, sizes, mtimes): a change means "digest it again"."""
    if not path or not os.path.exists(path):
        return None
    files = [path] if os.path.isfile(path) else _files(path)
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # regular files only: a FIFO or a device named like data would block or never end the read
        out += [f for n in sorted(filenames) if not n.startswith(".") and os.path.isfile(f := os.path.join(dirpath, n))]
        if len(out) >= MAX_FILES:
            break
    return sorted(out)[:MAX_FILES]


def settings(bench, seed: int, digest: Optional[str]) -> dict:
    """What the fingerprint covers: a BenchmarkConfig's spec (minus NEUTRAL_FIELDS), the seed, the data."""
    # the dataset's path is left out: its content digest stands for it (a moved dataset is the same data)
    spec = {k: v for k, v in bench.model_dump().items() if k not in NEUTRAL_FIELDS and k != "dataset"}
    spec["backend_options"] = _without_neutral(spec.get("backend_options") or {})
    spec["metric_options"] = {m: _without_neutral(o or {}) for m, o in (spec.get("metric_options") or {}).items()}
    spec["seed"] = seed
    spec["dataset_content"] = digest
    spec["scoring_version"] = SCORING_VERSION
    # a scoring change that alters only some benchmarks' numbers enters only their settings, so the others keep
    # their fingerprints (and their curves): hf loglikelihood choice scoring under a chat template (backends/text.py)
    rule = hf.chat_choice_rule(bench.backend_options or {}) if bench.backend == "hf" else None
    if rule is not None:
        spec["chat_choice_rule"] = rule
    return spec


def _without_neutral(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS}


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Flat differences between two settings dicts: `key.sub: old -> new` (unset shows as `-`)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, name + ".")
        elif a != b:
            if key == "dataset_content":
                out.append("dataset content changed")
            elif isinstance(a, str) and isinstance(b, str) and max(len(a), len(b)) > 60:
                out.append(f"{name}: {_around_difference(a, b)}")
            else:
                out.append(f"{name}: {_show(a)} -> {_show(b)}")
    return out


_UNSET: Any = object()


def _around_difference(a: str, b: str, context: int = 25) -> str:
    """Two long strings (command templates): the part where they differ, not their common start."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - context)

    def cut(s: str) -> str:
        return ("..." if start else "") + s[start:i + context] + ("..." if len(s) > i + context else "")
    return f"{cut(a)!r} -> {cut(b)!r}"


def _show(v: Any) -> str:
    if v is _UNSET or v is None:
        return "-"
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."
