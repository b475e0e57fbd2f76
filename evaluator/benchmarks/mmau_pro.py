"""MMAU-Pro (Hugging Face gamma-lab-umd/MMAU-Pro): audio question answering, one or more clips per question.

Layout (what the Hugging Face repo holds, with data.zip unpacked beside it):

    <root>/test.parquet        rows: id, audio_path (list of paths), question, choices (list), answer (the
                               choice text), category, plus task_identifier, kwargs, transcription, ...
    <root>/data/<uuid>.wav     audio_path entries are `data/<uuid>.wav`, relative to the rows file

`source` is the rows file or its directory (test.jsonl, test.json, test.parquet tried in that order, else
the only .jsonl/.json/.parquet there). JSON/JSONL need only the standard library; parquet needs pyarrow
(scripts/download_datasets.sh writes test.jsonl beside test.parquet so that no venv needs it).

Rows are of three kinds, and one dataset holds one kind (`options.task`), as NeMo-Skills splits MMAU-Pro into
closed_form / open_ended / instruction_following; each kind's default metrics are the published methods
(metrics/mmau.py, docs/benchmarks.md "MMAU-Pro scoring"):
  mc           (default) closed-form multiple choice: at least 2 choices. target = the answer (choice text),
               choices kept, letter in metadata; scored with `mmau_pro_embed` and `mmau_string_match`
               (`accuracy`, our letter/text extraction, on request), per category and per skill.
  open         category "open", or fewer than 2 choices: free answer; target = the reference answer;
               scored with `mmau_pro_judge`.
  instruction  category "instruction following": target = the answer when the row has one; task_identifier and
               kwargs kept in metadata; scored with `mmau_pro_if` (NeMo-Skills' rule checks).
Rows of the other kinds are skipped with a count printed to stderr and kept in metadata.json `skipped`.
An mc row whose answer is not one of its choices can never be scored right: it fails the load with
file:line, or is skipped and counted with `options.bad_answer: skip`.

Prompt: NeMo-Skills' (mmau-pro/prepare.py): the question, a blank line and the choices as "A. text" lines for mc;
the question alone otherwise (`options.prompt` replaces it; fields {question}, {choices}). The closed-form
methods match the answer's text against the choices, so no "answer with the letter" instruction is added.
Audio: every clip of a row becomes an audio part, in order (category "multi" rows carry several). Clips of a
spatial category (SPATIAL_CATEGORIES) are marked `"spatial": true`: their channels carry the answer, so a
backend must feed them as they are or fail the sample (backends/audio.py), never mix them down.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

from .dataset import Dataset, DatasetError, Sample, raise_problems
from .text import LETTERS, cell_text, format_prompt, read_records

MC_PROMPT = "{question}\n\n{choices}"
OPEN_PROMPT = "{question}"
DATA_FILES = ("test.jsonl", "test.json", "test.parquet")
ROW_TYPES = (".jsonl", ".json", ".parquet")
TASKS = {"mc": ("multiple_choice", ["mmau_pro_embed", "mmau_string_match"], MC_PROMPT),
         "open": ("open_qa", ["mmau_pro_judge"], OPEN_PROMPT),
         "instruction": ("instruction_following", ["mmau_pro_if"], OPEN_PROMPT)}
MAPPED = ("id", "audio_path", "question", "choices", "answer", "category")
INSTRUCTION_CATEGORY = "instruction following"
OPEN_CATEGORY = "open"
SPATIAL_CATEGORIES = ("spatial_audio", "spatial")  # NeMo-Skills' tables say spatial_audio


def lettered_choices(choices: list) -> str:
    """NeMo-Skills' choice lines: "A. text"."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def find_rows_file(source: str) -> str:
    source = os.path.abspath(source)
    if os.path.isfile(source):
        if not source.lower().endswith(ROW_TYPES):
            raise DatasetError(f"{source}: expected a .jsonl, .json or .parquet file of MMAU-Pro rows")
        return source
    for name in DATA_FILES:
        if os.path.isfile(os.path.join(source, name)):
            return os.path.join(source, name)
    found = sorted(n for n in os.listdir(source) if n.lower().endswith(ROW_TYPES))
    if len(found) == 1:
        return os.path.join(source, found[0])
    if not found:
        raise DatasetError(f"{source}: no MMAU-Pro rows file ({', '.join(DATA_FILES)}); "
                           "fetch it with scripts/download_datasets.sh mmau-pro")
    raise DatasetError(f"{source}: several rows files ({', '.join(found)}); point the dataset at one of them")


def _parquet_rows(path: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow, which this venv lacks; convert it once "
                           f"to JSONL beside it (scripts/download_datasets.sh mmau-pro does) or point the "
                           f"dataset at a .jsonl/.json file") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file; the user can fix only the file
        raise DatasetError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return list(enumerate(rows, 1))


def _kind(row: dict, choices: list) -> str:
    category = str(row.get("category") or "").strip().lower()
    if category == INSTRUCTION_CATEGORY:
        return "instruction"
    if category == OPEN_CATEGORY or len(choices) < 2:
        return "open"
    return "mc"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".").casefold()


def answer_index(answer: str, choices: list) -> Optional[int]:
    """The choice the answer names: the exact text, else the one choice equal ignoring case, spacing and a
    final period."""
    if answer in choices:
        return choices.index(answer)
    matches = [i for i, c in enumerate(choices) if _norm(c) == _norm(answer)]
    return matches[0] if len(matches) == 1 else None


def _audio_paths(value, base: str) -> tuple[list, Optional[str]]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        return [], f"audio_path: expected a path or a non-empty list of paths, got {value!r:.80}"
    full = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in paths]
    missing = [p for p in full if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return full, f"audio file not found: {missing[0]}{more}"
    return full, None


def _extras(row: dict) -> dict:
    """The row's other fields (skills, length_type, task_identifier, ...) where JSON can hold them."""
    out = {}
    for key, value in row.items():
        if key in MAPPED:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[str(key)] = value
    return out


def load(source: str, options: dict) -> Dataset:
    """MMAU-Pro rows + audio -> samples of one kind (options.task: mc | open)."""
    task = options.get("task", "mc")
    if task not in TASKS:
        raise DatasetError(f"options.task: expected one of {', '.join(TASKS)}, got {task!r}")
    on_bad_answer = options.get("bad_answer", "error")
    if on_bad_answer not in ("error", "skip"):
        raise DatasetError(f"options.bad_answer: expected error or skip, got {on_bad_answer!r}")
    task_type, metrics, default_prompt = TASKS[task]
    template = str(options.get("prompt", default_prompt))
    path = find_rows_file(source)
    base = os.path.join(os.path.dirname(path), options.get("audio_root") or "")
    if path.lower().endswith(".parquet"):
        rows, problems, unit = _parquet_rows(path), [], "row "
    else:
        (rows, problems), unit = read_records(path), ""
    samples, seen, skipped = [], {}, {}
    for line, row in rows:
        where = f"{path}:{unit}{line}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {type(row).__name__}")
            continue
        raw_choices = row.get("choices") or []
        choices = [cell_text(c) for c in raw_choices] if isinstance(raw_choices, list) else None
        if choices is None or any(c is None for c in choices):
            problems.append(f"{where}: choices: expected a list of strings, got {raw_choices!r:.80}")
            continue
        kind = _kind(row, choices)
        if kind == "mc" and len(choices) > len(LETTERS):
            problems.append(f"{where}: {len(choices)} choices; at most {len(LETTERS)} can be lettered")
            continue
        if kind != task:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        bad = []
        sample_id = cell_text(row.get("id"))
        if not sample_id:
            bad.append("id: expected a non-empty string")
        elif sample_id in seen:
            bad.append(f"id {sample_id!r} already used at {seen[sample_id]}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            bad.append("question: expected a non-empty string")
        answer = cell_text(row.get("answer"))
        if task == "instruction":
            answer = answer if answer and answer.strip() else None
            if not cell_text(row.get("task_identifier")):
                bad.append("task_identifier: expected the name of the instruction's check")
        elif answer is None or not answer.strip():
            bad.append("answer: expected a non-empty string")
        audio, problem = _audio_paths(row.get("audio_path"), base)
        if problem:
            bad.append(problem)
        if bad:
            problems += [f"{where}: {b}" for b in bad]
            continue
        seen[sample_id] = where
        metadata = {**_extras(row), "question": question.strip(), "source_line": line}
        fields = {"question": question.strip(), "choices": ""}
        if task == "mc":
            correct = answer_index(answer, choices)
            if correct is None:
                if on_bad_answer == "skip":
                    skipped["bad_answer"] = skipped.get("bad_answer", 0) + 1
                    continue
                problems.append(f"{where}: answer {answer!r} is not one of the choices {choices!r:.200} "
                                "(options.bad_answer: skip leaves such rows out, counted)")
                continue
            answer, fields["choices"] = choices[correct], lettered_choices(choices)
            metadata["letter"] = LETTERS[correct]
        prompt = format_prompt(template, fields)
        category = cell_text(row.get("category"))
        spatial = {"spatial": True} if (category or "").strip().lower() in SPATIAL_CATEGORIES else {}
        samples.append(Sample(
            id=sample_id, target=answer, choices=choices if task == "mc" else None,
            category=category or None, metadata=metadata,
            messages=[{"role": "user", "content": [*({"type": "audio", "path": p, **spatial} for p in audio),
                                                   {"type": "text", "text": prompt}]}]))
    if problems:
        raise_problems(problems, path)
    if skipped:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        print(f"mmau-pro: {path}: {len(samples)} {task} rows loaded; skipped {counts} (options.task / "
              f"options.bad_answer; see docs/benchmarks.md)", file=sys.stderr)
    if not samples:
        raise DatasetError(f"{path}: no {task} rows" + (f" (skipped: {skipped})" if skipped else ""))
    metadata = {"dataset_id": "mmau-pro" if task == "mc" else f"mmau-pro-{task}", "name": "MMAU-Pro",
                "task_type": task_type, "metrics": metrics, "prompt": template, "task": task,
                "source": path, "skipped": skipped}
    return Dataset(root=os.path.dirname(path), metadata=metadata, samples=samples)
