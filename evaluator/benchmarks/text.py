"""Text benchmarks from local files: `text-mc` (MMLU/KMMLU-style multiple choice) and `text-qa`.

A source is a .jsonl, .json (a list of objects), .csv or .tsv file, or a directory of such files (every one
directly inside, in name order). Every row is checked; all bad rows are reported together as `file:line`.

text-mc accepts three row shapes (detected per row, named in metadata.json `source_format`):
  mmlu          columns question, A, B, C, D[, E...], answer = a letter ("B", "(B)")
  kmmlu         the same columns, answer = a 1-based index ("2" is B), Category column
  choices-list  question, choices = [..], answer = the choice text, a letter, or an index (0-based: the
                Hugging Face convention of cais/mmlu; `options.answer_index_base: 1` changes it)
A CSV whose first row is already a question (6 fields, the last a letter) is the original headerless
MMLU file (data/test/<subject>_test.csv) and is read as question, A, B, C, D, answer.
The target is the choice text; the letter goes to the row's metadata.

text-qa: question/answer columns (names configurable) -> prompt/target; an answer given as a list keeps
every item as `references` and the first as `target`.
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Callable, Optional

from .dataset import Dataset, DatasetError, Sample, raise_problems, choices_block

FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv")
MC_PROMPT = "{question}\n{choices}\nAnswer:"
QA_PROMPT = "{question}"
CATEGORY_COLUMNS = ("category", "Category", "subject")  # cais/mmlu: subject; KMMLU: Category
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- reading rows with their line numbers (also used by the MMAU-Pro loader) -------------------------------

def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_list(path: str, text: str) -> list[tuple[int, object]]:
    """Elements of a top-level JSON list with the line each starts on (json.load would lose the lines)."""
    decoder = json.JSONDecoder()
    i = _skip_space(text, 0)
    if text[i:i + 1] != "[":
        raise DatasetError(f"{path}:1: expected a JSON list of row objects ([{{...}}, ...])")
    out, line, counted = [], 1, 0
    i = _skip_space(text, i + 1)
    if text[i:i + 1] == "]":
        return out
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out.append((line, value))
        i = _skip_space(text, end)
        if text[i:i + 1] == ",":
            i = _skip_space(text, i + 1)
            continue
        if text[i:i + 1] == "]":
            return out
        bad_line = line + text.count("\n", counted, i)
        raise DatasetError(f"{path}:{bad_line}: expected ',' or ']' after a list element")


def _csv_rows(path: str, delimiter: str, headerless: Optional[Callable[[list], Optional[list]]]):
    """(line, {column: value}) per record; a quoted field may span lines, the record's first line is given."""
    problems, rows = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header, start = None, 1
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:
                continue
            if header is None:
                header = headerless(fields) if headerless else None
                if header is None:
                    header = [h.strip() for h in fields]
                    continue
            if len(fields) != len(header):
                problems.append(f"{path}:{line}: {len(fields)} fields, the header has {len(header)} "
                                f"({', '.join(header)}); a comma inside a value needs \"quotes\"")
                continue
            rows.append((line, dict(zip(header, fields))))
    return rows, problems


def read_records(path: str, headerless: Optional[Callable[[list], Optional[list]]] = None) -> tuple[list, list]:
    """Rows of a .jsonl/.json/.csv/.tsv file as ([(line, row)], problems).

    headerless: for CSV, given the first record's fields, returns column names when that record is data
    rather than a header (None otherwise).
    """
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".csv", ".tsv"):
            return _csv_rows(path, "\t" if ext == ".tsv" else ",", headerless)
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if ext == ".json":
        return _json_list(path, text), []
    if ext != ".jsonl":
        raise DatasetError(f"{path}: expected a {', '.join(FILE_TYPES)} file")
    rows, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return rows, problems


def source_files(source: str, types: tuple = FILE_TYPES) -> list[str]:
    """The file itself, or every file of `types` directly inside the directory, in name order."""
    source = os.path.abspath(source)
    if os.path.isfile(source):
        if not source.lower().endswith(types):
            raise DatasetError(f"{source}: expected a {', '.join(types)} file")
        return [source]
    files = sorted(os.path.join(source, n) for n in os.listdir(source)
                   if n.lower().endswith(types) and os.path.isfile(os.path.join(source, n)))
    if not files:
        raise DatasetError(f"{source}: no {', '.join(types)} file in this directory")
    return files


def format_prompt(template: str, fields: dict) -> str:
    try:
        return template.format(**fields)
    except KeyError as e:
        raise DatasetError(f"options.prompt: no field {e.args[0]!r} in the template {template!r} "
                           f"(fields: {', '.join(sorted(fields))})") from None
    except (IndexError, ValueError) as e:
        raise DatasetError(f"options.prompt: not a valid template {template!r} ({e}); "
                           "use named fields such as {question}") from None


def cell_text(value) -> Optional[str]:
    """A cell as text: strings as they are, numbers printed (2.0 as "2"), anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return None


# --- shared row plumbing -------------------------------------------------------------------------------------

class _Rows:
    """Walks every row of every source file, tracking ids, categories and problems."""

    def __init__(self, source: str, options: dict, headerless=None):
        self.source = os.path.abspath(source)
        self.is_dir = os.path.isdir(self.source)
        self.root = self.source if self.is_dir else os.path.dirname(self.source)
        self.id_column = options.get("id_column", "id")
        self.category_column = options.get("category_column")
        self.problems: list = []
        self.seen: dict = {}
        self.files = source_files(source)
        self.headerless = headerless

    def __iter__(self):
        for path in self.files:
            rows, bad = read_records(path, self.headerless)
            self.problems += bad
            stem = os.path.splitext(os.path.basename(path))[0]
            for index, (line, row) in enumerate(rows):
                where = f"{path}:{line}"
                if not isinstance(row, dict):
                    self.problems.append(f"{where}: expected an object, got {type(row).__name__}")
                    continue
                yield path, stem, index, line, where, row

    def sample_id(self, row: dict, stem: str, index: int, where: str) -> Optional[str]:
        value = cell_text(row.get(self.id_column))
        sample_id = value if value not in (None, "") else f"{stem}-{index}"
        if sample_id in self.seen:
            self.problems.append(f"{where}: id {sample_id!r} already used at {self.seen[sample_id]}")
            return None
        self.seen[sample_id] = where
        return sample_id

    def category(self, row: dict, stem: str) -> Optional[str]:
        names = [self.category_column] if self.category_column else CATEGORY_COLUMNS
        for name in names:
            value = cell_text(row.get(name))
            if value:
                return value
        return stem if self.is_dir else None

    def row_metadata(self, path: str, line: int) -> dict:
        meta = {"source_line": line}
        if self.is_dir:
            meta["source_file"] = os.path.basename(path)
        return meta

    def dataset_id(self, options: dict) -> str:
        return options.get("dataset_id") or os.path.splitext(os.path.basename(self.source))[0]


# --- text-mc -------------------------------------------------------------------------------------------------

def _mmlu_headerless(fields: list, question_column: str = "question") -> Optional[list]:
    """The original MMLU CSVs have no header: question, A, B, C, D, answer-letter. A first row naming the
    question or answer column is a header, whatever its last field looks like."""
    names = {f.strip().lower() for f in fields}
    if names & {"question", "answer", question_column.lower()}:
        return None
    if len(fields) >= 4:
        answer = fields[-1].strip().upper()
        if len(answer) == 1 and answer in LETTERS[:len(fields) - 2]:
            return ["question", *LETTERS[:len(fields) - 2], "answer"]
    return None


def _column_choices(row: dict) -> tuple[list, Optional[str]]:
    """A, B, C, ... columns while present; empty trailing ones dropped. Returns (choices, problem)."""
    values = []
    for letter in LETTERS:
        if letter not in row:
            break
        values.append(cell_text(row[letter]) or "")
    while values and not values[-1].strip():
        values.pop()
    empty = [LETTERS[i] for i, v in enumerate(values) if not v.strip()]
    if empty:
        return values, f"choice {empty[0]} is empty"
    return values, None


def _letter(text: str) -> Optional[str]:
    match = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?\.?", text)
    return match.group(1).upper() if match else None


def resolve_answer(answer, choices: list, layout: str, index_base: int) -> tuple[Optional[int], str]:
    """The correct choice's index and the answer's form (letter/index/text), or (None, why not).

    Columns layout (MMLU/KMMLU): a letter or an index. Choices-list layout: for a string, the exact choice
    text first (so a choice "2" is matched as text, not as an index), then a letter, then an index;
    a JSON number is always an index.
    """
    n = len(choices)
    if answer is None or isinstance(answer, bool) or (isinstance(answer, str) and not answer.strip()):
        return None, "no answer"
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, int):
        index = answer - index_base
        form = f"index{index_base}"
    elif isinstance(answer, str):
        text = answer.strip()
        if layout == "choices-list" and text in choices:
            return choices.index(text), "text"
        letter = _letter(text)
        if letter is not None:
            index, form = LETTERS.index(letter), "letter"
        elif text.isdigit():
            index, form = int(text) - index_base, f"index{index_base}"
        elif text in choices:
            return choices.index(text), "text"
        else:
            return None, f"answer {answer!r} is not a letter, an index or one of the choices"
    else:
        return None, f"answer {answer!r}: expected a letter, an index or the choice text"
    if not 0 <= index < n:
        shown = answer if form == "letter" else f"{answer} ({index_base}-based index)"
        return None, f"answer {shown} is out of range for {n} choices"
    return index, form


def load_mc(source: str, options: dict) -> Dataset:
    """text-mc: MMLU/KMMLU-style multiple choice -> samples with choices, target = the correct choice text."""
    q_col = options.get("question_column", "question")
    rows = _Rows(source, options, headerless=lambda fields: _mmlu_headerless(fields, q_col))
    a_col = options.get("answer_column", "answer")
    c_col = options.get("choices_column", "choices")
    template = options.get("prompt", MC_PROMPT)
    base_option = options.get("answer_index_base")
    if base_option not in (None, 0, 1):
        raise DatasetError(f"options.answer_index_base: expected 0 or 1, got {base_option!r}")
    samples, formats = [], {}
    for path, stem, index, line, where, row in rows:
        bad = []
        question = cell_text(row.get(q_col))
        if not question or not question.strip():
            bad.append(f"no question (column {q_col!r}; columns: {', '.join(map(str, row))})")
        if c_col in row:
            layout = "choices-list"
            raw = row[c_col]
            if isinstance(raw, str) and raw.strip().startswith("["):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError:
                    pass
            choices = [cell_text(c) for c in raw] if isinstance(raw, list) else None
            if not choices or not 2 <= len(choices) <= len(LETTERS) or any(c is None or not c.strip() for c in choices):
                bad.append(f"{c_col}: expected a list of 2 to {len(LETTERS)} non-empty strings, got {raw!r:.80}")
        elif "A" in row and "B" in row:
            layout = "columns"
            choices, problem = _column_choices(row)
            if problem:
                bad.append(problem)
            elif len(choices) < 2:
                bad.append("expected at least 2 non-empty choices in columns A, B, ...")
        else:
            layout, choices = None, None
            bad.append(f"no choices: expected a {c_col!r} list or A, B, C, D columns "
                       f"(columns: {', '.join(map(str, row))})")
        if a_col not in row:
            bad.append(f"no answer column {a_col!r}")
        correct, form = None, ""
        if not bad:
            base = base_option if base_option is not None else (1 if layout == "columns" else 0)
            correct, form = resolve_answer(row[a_col], choices, layout, base)
            if correct is None:
                bad.append(form)
        sample_id = rows.sample_id(row, stem, index, where) if not bad else None
        if bad or sample_id is None:
            rows.problems += [f"{where}: {b}" for b in bad]
            continue
        fmt = "choices-list" if layout == "choices-list" else ("kmmlu" if form.startswith("index") else "mmlu")
        formats[fmt] = formats.get(fmt, 0) + 1
        prompt = format_prompt(template, {**{str(k): v for k, v in row.items()},
                                          "question": question.strip(), "choices": choices_block(choices)})
        samples.append(Sample(
            id=sample_id, messages=[{"role": "user", "content": prompt}], target=choices[correct],
            choices=choices, category=rows.category(row, stem),
            metadata={"letter": LETTERS[correct], **rows.row_metadata(path, line)}))
    if rows.problems:
        raise_problems(rows.problems, rows.source)
    if not samples:
        raise DatasetError(f"{rows.source}: no rows")
    metadata = {"dataset_id": rows.dataset_id(options), "name": options.get("name", rows.dataset_id(options)),
                "task_type": "multiple_choice", "metrics": ["accuracy"], "prompt": template,
                "source": rows.source, "source_format": next(iter(formats)) if len(formats) == 1 else "mixed",
                "source_formats": formats}
    return Dataset(root=rows.root, metadata=metadata, samples=samples)


# --- text-qa -------------------------------------------------------------------------------------------------

def load_qa(source: str, options: dict) -> Dataset:
    """text-qa: question -> answer rows; `target` is the answer (the first one when a list is given)."""
    rows = _Rows(source, options)
    q_col = options.get("question_column", "question")
    a_col = options.get("answer_column", "answer")
    template = options.get("prompt", QA_PROMPT)
    samples = []
    for path, stem, index, line, where, row in rows:
        bad = []
        question = cell_text(row.get(q_col))
        if not question or not question.strip():
            bad.append(f"no question (column {q_col!r}; columns: {', '.join(map(str, row))})")
        answer = row.get(a_col)
        answers = answer if isinstance(answer, list) else [answer]
        answers = [cell_text(a) for a in answers]
        if not answers or any(a is None or not a.strip() for a in answers):
            bad.append(f"no answer (column {a_col!r}: expected a non-empty string or list of strings, "
                       f"got {answer!r:.60})")
        sample_id = rows.sample_id(row, stem, index, where) if not bad else None
        if bad or sample_id is None:
            rows.problems += [f"{where}: {b}" for b in bad]
            continue
        prompt = format_prompt(template, {**{str(k): v for k, v in row.items()}, "question": question.strip()})
        samples.append(Sample(
            id=sample_id, messages=[{"role": "user", "content": prompt}], target=answers[0],
            references=answers if isinstance(answer, list) else None, category=rows.category(row, stem),
            metadata=rows.row_metadata(path, line)))
    if rows.problems:
        raise_problems(rows.problems, rows.source)
    if not samples:
        raise DatasetError(f"{rows.source}: no rows")
    metadata = {"dataset_id": rows.dataset_id(options), "name": options.get("name", rows.dataset_id(options)),
                "task_type": "qa", "metrics": ["exact_match", "token_f1"], "prompt": template,
                "source": rows.source}
    return Dataset(root=rows.root, metadata=metadata, samples=samples)
