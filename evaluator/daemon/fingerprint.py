"""A benchmark's settings fingerprint: everything that changes its numbers, hashed, so one curve never mixes settings.

`settings(bench, cfg)` is the dict that is hashed: the benchmark spec minus what cannot change a number (its
name, `main_metric`, `max_error_rate`), the seed it runs with, the dataset's content digest, and
SCORING_VERSION. `fingerprint(settings)` is the first 12 hex digits of its SHA-256 over canonical JSON; the
ledger keeps the settings of every fingerprint it has seen, so `changes(old, new)` can say what changed
("generation.max_new_tokens: 8 -> 2").

The dataset digest hashes the content of its text files (jsonl/json/csv/tsv/txt/yaml/parquet up to 64 MiB each:
the samples, references and metadata) and only the relative path and size of everything else (audio), so a
dataset copied to another mount keeps its fingerprint while an edited reference or a replaced clip does not.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

# Bump when a change to the stages alters the numbers of an unchanged benchmark spec (a scoring fix): every
# benchmark then reports changed settings, and the operator re-runs or keeps the old curve by name.
SCORING_VERSION = 1
CONTENT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".parquet")
CONTENT_MAX_BYTES = 64 << 20
MAX_FILES = 100_000  # a dataset folder bigger than this is described by its first files in sorted order
# spec fields that never change a benchmark's numbers
NEUTRAL_FIELDS = ("name", "main_metric", "max_error_rate")


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


def _files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
        if len(out) >= MAX_FILES:
            break
    return sorted(out)[:MAX_FILES]


def settings(bench, seed: int, digest: Optional[str]) -> dict:
    """What the fingerprint covers: a BenchmarkConfig's spec (minus NEUTRAL_FIELDS), the seed, the data."""
    # the dataset's path is left out: its content digest stands for it (a moved dataset is the same data)
    spec = {k: v for k, v in bench.model_dump().items() if k not in NEUTRAL_FIELDS and k != "dataset"}
    spec["seed"] = seed
    spec["dataset_content"] = digest
    spec["scoring_version"] = SCORING_VERSION
    return spec


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
            else:
                out.append(f"{name}: {_show(a)} -> {_show(b)}")
    return out


_UNSET: Any = object()


def _show(v: Any) -> str:
    if v is _UNSET or v is None:
        return "-"
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."
