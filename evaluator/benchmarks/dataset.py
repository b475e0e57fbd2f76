"""The canonical dataset: a directory with `test.jsonl` + `metadata.json` (DESIGN.md, "Contracts").

Row: {"id", "messages": [{"role", "content": str | [{"type": "text", "text"} | {"type": "audio", "path"}]}],
      "target"?: str, "references"?: [str], "choices"?: [str], "category"?: str, "metadata"?: {}}
metadata.json: {"dataset_id": str, ...}; only dataset_id is required, unknown keys are kept.

Audio paths are relative to the dataset directory (or absolute). Loading checks every row and reports all
bad ones as `file:line: what is wrong`. Standard library only: the daemon, both stage venvs and
tools/bench.py use it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

from evaluator.common.atomic import write_json_atomic, write_text_atomic
from evaluator.common.errors import EvaluatorError

TEST_FILE = "test.jsonl"
METADATA_FILE = "metadata.json"
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "audio")
MAX_REPORTED = 20


class DatasetError(EvaluatorError):
    """A dataset that cannot be used as it is; the message lists file:line problems."""


@dataclass
class Sample:
    id: str
    messages: list
    target: Optional[str] = None
    references: Optional[list] = None
    choices: Optional[list] = None
    category: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and (k != "metadata" or v)}

    def audio_paths(self) -> list:
        return [part["path"] for message in self.messages if isinstance(message["content"], list)
                for part in message["content"] if part.get("type") == "audio"]

    def prompt_text(self) -> str:
        """The last user turn's text parts, joined (what a caption/MC metric shows as the input)."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                content = message["content"]
                if isinstance(content, str):
                    return content
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return ""


@dataclass
class Dataset:
    root: str
    metadata: dict
    samples: list

    @property
    def dataset_id(self) -> str:
        return self.metadata["dataset_id"]

    def by_id(self) -> dict:
        return {s.id: s for s in self.samples}


MAX_CHOICES = 26  # lettered A..Z (metrics/text.py reads letter answers)


def _is_empty(content: Any) -> bool:
    """No text and no audio: a string of whitespace, or parts that are all blank text."""
    if isinstance(content, str):
        return not content.strip()
    return all(p.get("type") == "text" and not p.get("text", "").strip() for p in content)


def _check_content(content: Any, where: str, root: str, check_files: bool) -> tuple[Any, list]:
    """Returns (normalised content, problems). Audio paths become absolute."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        return content, [f"{where}: expected a string or a non-empty list of content parts"]
    problems, parts = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            problems.append(f"{at}: expected {{\"type\": \"text\"|\"audio\", ...}}, got {part!r:.80}")
            continue
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                problems.append(f"{at}.text: expected a string")
            parts.append(part)
            continue
        path = part.get("path") or part.get("audio")
        if not isinstance(path, str) or not path:
            problems.append(f"{at}: an audio part needs \"path\": \"file.wav\" (relative to the dataset directory)")
            continue
        full = path if os.path.isabs(path) else os.path.join(root, path)
        if check_files and not os.path.isfile(full):
            problems.append(f"{at}.path: audio file not found: {full}")
        parts.append({**part, "type": "audio", "path": full})
    return parts, problems


def parse_row(data: Any, where: str, root: str, check_files: bool = True) -> tuple[Optional[Sample], list]:
    """Validate one test.jsonl row; returns (Sample or None, problems)."""
    if not isinstance(data, dict):
        return None, [f"{where}: expected a JSON object, got {type(data).__name__}"]
    problems = []
    sample_id = data.get("id")
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool) or str(sample_id) == "":
        problems.append(f"{where}: id: expected a non-empty string")
    messages = data.get("messages")
    out_messages = []
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: messages: expected a non-empty list of {{\"role\", \"content\"}}")
        messages = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            problems.append(f"{at}: expected {{\"role\": {'|'.join(ROLES)}, \"content\": ...}}")
            continue
        content, bad = _check_content(message["content"], f"{at}.content", root, check_files)
        problems += bad
        if not bad and i == len(messages) - 1 and _is_empty(content):  # the turn answered: a model answers an
            problems.append(f"{at}.content: empty (no text and no audio)")  # empty prompt, and it was scored
        out_messages.append({**message, "content": content})
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") in ("assistant", "system"):
        problems.append(f"{where}: messages: the last turn is the {messages[-1]['role']}'s; nothing to answer "
                        f"(the last turn is the user's)")
    for key in ("target", "category"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"{where}: {key}: expected a string, got {data[key]!r:.60}")
    if isinstance(data.get("target"), str) and not data["target"].strip():
        problems.append(f"{where}: target: empty (leave it out when the sample has none)")
    for key in ("references", "choices"):
        value = data.get(key)
        if value is not None and (not isinstance(value, list) or not value
                                  or not all(isinstance(x, str) for x in value)):
            problems.append(f"{where}: {key}: expected a non-empty list of strings")
        elif value is not None and any(not x.strip() for x in value):
            problems.append(f"{where}: {key}[{next(i for i, x in enumerate(value) if not x.strip())}]: empty")
    choices = data.get("choices")
    if isinstance(choices, list) and not 2 <= len(choices) <= MAX_CHOICES:
        problems.append(f"{where}: choices: expected 2 to {MAX_CHOICES} choices (lettered A..Z), got {len(choices)}")
    if data.get("metadata") is not None and not isinstance(data["metadata"], dict):
        problems.append(f"{where}: metadata: expected an object")
    if problems:
        return None, problems
    return Sample(id=str(sample_id), messages=out_messages, target=data.get("target"),
                  references=data.get("references"), choices=data.get("choices"),
                  category=data.get("category"), metadata=data.get("metadata") or {}), []


def read_utf8(path: str) -> str:
    """A data file's text; a byte that is not UTF-8 is a DatasetError naming file:line, not a traceback."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                           "re-save the file as UTF-8") from None


def raise_problems(problems: list, what: str) -> None:
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    raise DatasetError(f"{what}: {len(problems)} problem(s)\n  " + "\n  ".join(shown) + more)


def read_metadata(root: str) -> dict:
    path = os.path.join(root, METADATA_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing; a dataset directory needs {TEST_FILE} and {METADATA_FILE} "
                           "({\"dataset_id\": ...}); build one with `tools/bench.py make-dataset`")
    try:
        meta = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object ({{\"dataset_id\": ...}}), got {type(meta).__name__}")
    if not isinstance(meta.get("dataset_id"), str) or not meta["dataset_id"]:
        raise DatasetError(f"{path}: dataset_id: expected a non-empty string")
    if "metrics" in meta and not (isinstance(meta["metrics"], list) and all(isinstance(m, str) for m in meta["metrics"])):
        raise DatasetError(f"{path}: metrics: expected a list of metric names")
    return meta


def is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TEST_FILE)) and os.path.isfile(os.path.join(path, METADATA_FILE))


def load_dataset(root: str, sample_size: Optional[int] = None, check_files: bool = True) -> Dataset:
    """Load and validate a canonical dataset directory. `sample_size` keeps the first N rows (file order)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a directory (expected a dataset directory with {TEST_FILE} + {METADATA_FILE})")
    meta = read_metadata(root)
    path = os.path.join(root, TEST_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing")
    samples, problems, seen = [], [], {}
    for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            continue
        sample, bad = parse_row(data, where, root, check_files)
        problems += bad
        if sample is None:
            continue
        if sample.id in seen:
            problems.append(f"{where}: id {sample.id!r} already used on line {seen[sample.id]}")
            continue
        seen[sample.id] = lineno
        samples.append(sample)
    if problems:
        raise_problems(problems, path)
    if not samples:
        raise DatasetError(f"{path}: no rows")
    if sample_size is not None:
        samples = samples[:sample_size]
    return Dataset(root=root, metadata=meta, samples=samples)


def write_dataset(root: str, metadata: dict, samples: Iterable[Sample]) -> int:
    """Write a canonical dataset directory (each file atomically); returns the row count."""
    if not metadata.get("dataset_id"):
        raise DatasetError("metadata: dataset_id is required")
    os.makedirs(root, exist_ok=True)
    rows = [json.dumps(s.to_dict(), ensure_ascii=False) for s in samples]
    write_text_atomic(os.path.join(root, TEST_FILE), "".join(r + "\n" for r in rows))
    write_json_atomic(os.path.join(root, METADATA_FILE), metadata)
    return len(rows)


# ---------------------------------------------------------------------------------------------------------------
# make-dataset: CSV / JSONL with arbitrary columns -> canonical dataset (tools/bench.py make-dataset)

@dataclass
class ColumnMap:
    """Which input column feeds which field. List-valued fields take several columns (a,b,c) or one column
    holding a JSON list."""

    id: Optional[str] = None  # None: the `id` column where a row has one, else <file stem>-<row index>
    prompt: str = "question"
    target: Optional[str] = None
    references: Optional[str] = None
    choices: Optional[str] = None
    category: Optional[str] = None
    audio: Optional[str] = None
    system: Optional[str] = None  # a fixed system prompt text (not a column)
    template: Optional[str] = None  # prompt template over the row's columns, e.g. "{question}\n{choices_block}"


def _read_rows(path: str) -> list[tuple[int, dict]]:
    if path.endswith(".jsonl"):
        rows = []
        for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return rows
    if path.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""), delimiter="\t" if path.endswith(".tsv") else ",")
        return [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
    raise DatasetError(f"{path}: expected a .csv, .tsv or .jsonl file")


def _list_field(row: dict, spec: str, where: str) -> Optional[list]:
    columns = [c.strip() for c in spec.split(",") if c.strip()]
    missing = [c for c in columns if c not in row]
    if missing:
        raise DatasetError(f"{where}: no column {missing[0]!r} (columns: {', '.join(row)})")
    if len(columns) == 1:
        value = row[columns[0]]
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                return [str(v) for v in json.loads(value)]
            except json.JSONDecodeError:
                raise DatasetError(f"{where}: column {columns[0]!r}: looks like a JSON list but does not parse") from None
        return [str(value)] if value not in (None, "") else None
    values = [str(row[c]) for c in columns if row[c] not in (None, "")]
    return values or None


def choices_block(choices: list) -> str:
    return "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))


DEFAULT_ID_COLUMN = "id"


def _sample_id(row: dict, columns: ColumnMap, stem: str, index: int, where: str) -> str:
    """--id-column must exist in every row; by default the `id` column is used where a row has a value, the
    rule text-mc/text-qa follow (docs/benchmarks.md), so an id-less file gets <file stem>-<row index>."""
    if columns.id:
        if columns.id not in row:
            raise DatasetError(f"{where}: no id column {columns.id!r} (columns: {', '.join(row)})")
        return str(row[columns.id])
    value = row.get(DEFAULT_ID_COLUMN)
    return str(value) if value not in (None, "") else f"{stem}-{index}"


def rows_to_samples(input_path: str, columns: ColumnMap) -> list:
    """Convert a CSV/TSV/JSONL file's rows into canonical samples (DatasetError names file:line)."""
    if not os.path.isfile(input_path):
        raise DatasetError(f"{input_path}: no such file")
    base = os.path.dirname(os.path.abspath(input_path))
    stem = os.path.splitext(os.path.basename(input_path))[0]
    samples = []
    seen: dict[str, int] = {}  # id -> the input line that used it first
    for lineno, row in _read_rows(input_path):
        where = f"{input_path}:{lineno}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object per line")
        if None in row or None in row.values():  # csv.DictReader pads a short row with None, keys a long one None
            fields = len([v for k, v in row.items() if k is not None and v is not None]) + len(row.get(None) or [])
            raise DatasetError(f"{where}: {fields} field(s), the header has {len([k for k in row if k is not None])}")
        sample_id = _sample_id(row, columns, stem, len(samples), where)
        if sample_id in seen:
            raise DatasetError(f"{where}: id {sample_id!r} already used on line {seen[sample_id]}")
        seen[sample_id] = lineno
        choices = _list_field(row, columns.choices, where) if columns.choices else None
        if columns.template:
            try:
                prompt = columns.template.format(**row, choices_block=choices_block(choices or []))
            except KeyError as e:
                raise DatasetError(f"--template: no column {e.args[0]!r} (columns: {', '.join(row)})") from None
            except (ValueError, IndexError) as e:  # '{question' or '{0}': not a template of named columns
                raise DatasetError(f"--template: expected a format string of {{column}} names, got {columns.template!r} "
                                   f"({e})") from None
        else:
            if columns.prompt not in row:
                raise DatasetError(f"{where}: no prompt column {columns.prompt!r} (columns: {', '.join(row)}); "
                                   "pass --prompt-column")
            prompt = str(row[columns.prompt])
            if choices:
                prompt = f"{prompt}\n{choices_block(choices)}"
        content: Any = prompt
        if columns.audio:
            audio = row.get(columns.audio)
            if not audio:
                raise DatasetError(f"{where}: column {columns.audio!r} is empty (expected an audio path)")
            path = audio if os.path.isabs(audio) else os.path.join(base, audio)
            content = [{"type": "audio", "path": os.path.abspath(path)}, {"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": columns.system}] if columns.system else []) + \
            [{"role": "user", "content": content}]
        target = None
        if columns.target:
            if columns.target not in row:
                raise DatasetError(f"{where}: no target column {columns.target!r} (columns: {', '.join(row)})")
            target = str(row[columns.target])
        samples.append(Sample(
            id=sample_id, messages=messages, target=target,
            references=_list_field(row, columns.references, where) if columns.references else None,
            choices=choices, category=str(row[columns.category]) if columns.category and row.get(columns.category) else None,
            metadata={"source_line": lineno}))
    if not samples:
        raise DatasetError(f"{input_path}: no rows")
    return samples


def make_dataset(input_path: str, output_dir: str, dataset_id: str, samples: list,
                 extra_metadata: Optional[dict] = None) -> Dataset:
    """Write samples converted from `input_path` as a canonical dataset directory and load it back (validated)."""
    meta = {"dataset_id": dataset_id, "source": os.path.abspath(input_path), **(extra_metadata or {})}
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DatasetError(f"--output-dir: {output_dir} is a file, not a folder")
    # written and checked in a folder inside output_dir first (same filesystem, no rights needed on its parent):
    # a dataset that fails the check leaves nothing behind, and its message names the input line
    made = not os.path.isdir(output_dir)
    staging = os.path.join(output_dir, f".making-{os.getpid()}")
    try:
        write_dataset(staging, meta, samples)
        try:
            load_dataset(staging)
        except DatasetError as e:
            raise DatasetError(_input_lines(str(e), os.path.join(staging, TEST_FILE), input_path, samples)) from None
        for name in (TEST_FILE, METADATA_FILE):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    except OSError as e:
        raise DatasetError(f"--output-dir: cannot write {output_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
    return load_dataset(output_dir)


def _input_lines(message: str, written: str, input_path: str, samples: list) -> str:
    """A check's message about the written test.jsonl, naming the input file's lines instead."""
    def line(m: re.Match) -> str:
        index = int(m.group(1)) - 1
        source = samples[index].metadata.get("source_line") if 0 <= index < len(samples) else None
        return f"{input_path}:{source}" if source else m.group(0)
    return re.sub(re.escape(written) + r":(\d+)", line, message).replace(written, input_path)
