"""`gpt_eval`: Data-Juicer's GPT evaluation (its copy of FastChat's llm_judge `table/` files) as canonical samples.

The checkpoint answers the questions (the native inference stage); the `llm_judge` metric then has a judge model
compare each answer with the baseline answer (metrics/judge.py). Files, JSON Lines:

  question file   {"question_id", "text", "category"}                 (FastChat MT-bench rows: "turns": [first, ...])
  baseline file   {"question_id", "text", "model_id"?, "answer_id"?}  (FastChat model answers: "choices": [{"turns"}])
  prompt file     {"category"?, "prompt_id"?, "system_prompt", "prompt_template", "defaults": {...}, "description"?}
  reviewer file   {"category"?, "reviewer_id"?, "prompt_id"?, "metadata": {"temperature", "max_tokens", "model"?}}

Where they are: `dataset:` is a directory holding question.jsonl, prompt.jsonl, reviewer.jsonl and one baseline
answer file (baseline.jsonl, else the only answer*.jsonl in it, else the only .jsonl under answer/), or the
question file itself; options question_file / baseline_file / prompt_file / reviewer_file name a file explicitly
(relative paths: against the dataset directory). Without prompt and reviewer files the judge uses its built-in
pairwise prompt.

Which prompt and reviewer judge a question (Data-Juicer's rule, with FastChat's ids): the reviewer of the
question's category, else the "general" one (else the only one); its prompt is the one its prompt_id names, else
the prompt of the question's category, else "general" (else the only one). A question with multi-turn `turns` is
asked its first turn only, as Data-Juicer's answer generator does.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .dataset import Dataset, DatasetError, Sample, raise_problems

GENERAL = "general"
FILE_OPTIONS = ("question_file", "baseline_file", "prompt_file", "reviewer_file")
# `answer_file` / `result_file` are Data-Juicer's outputs; here predictions.jsonl and llm_judge's reviews_file
KNOWN_OPTIONS = FILE_OPTIONS + ("dataset_id", "name")


def _read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise DatasetError(f"gpt_eval: {what}: no such file: {path}")
    rows, problems = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append((lineno, row))
    if problems:
        raise_problems(problems, path)
    if not rows:
        raise DatasetError(f"{path}: no rows ({what})")
    return rows


def _first_turn(row: dict, key: str) -> Optional[str]:
    """`text`, else the first of `turns` (FastChat MT-bench)."""
    if isinstance(row.get(key), str):
        return row[key]
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    return None


def _answer_text(row: dict) -> Optional[str]:
    text = _first_turn(row, "text")
    if text is not None:
        return text
    choices = row.get("choices")  # FastChat llm_judge model answers
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return _first_turn(choices[0], "text")
    return None


def _qid(row: dict) -> Optional[str]:
    value = row.get("question_id")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value) == "":
        return None
    return str(value)


def locate_files(source: str, options: dict) -> dict[str, Optional[str]]:
    """question/baseline/prompt/reviewer file paths from `dataset:` and the options (prompt/reviewer may be None)."""
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise DatasetError(f"gpt_eval: unknown option(s) {', '.join(unknown)} (known: {', '.join(KNOWN_OPTIONS)})")
    source = os.path.abspath(source)
    root = source if os.path.isdir(source) else os.path.dirname(source)
    files: dict[str, Optional[str]] = {}
    for key in FILE_OPTIONS:
        value = options.get(key)
        files[key] = None if not value else (value if os.path.isabs(value) else os.path.join(root, value))
    if os.path.isfile(source):
        files["question_file"] = files["question_file"] or source
    if not os.path.isdir(source):
        return files
    for key, name in (("question_file", "question.jsonl"), ("prompt_file", "prompt.jsonl"),
                      ("reviewer_file", "reviewer.jsonl")):
        if files[key] is None and os.path.isfile(os.path.join(root, name)):
            files[key] = os.path.join(root, name)
    if files["baseline_file"] is None:
        files["baseline_file"] = _find_baseline(root)
    return files


def _find_baseline(root: str) -> Optional[str]:
    if os.path.isfile(os.path.join(root, "baseline.jsonl")):
        return os.path.join(root, "baseline.jsonl")
    answers = sorted(n for n in os.listdir(root) if n.startswith("answer") and n.endswith(".jsonl"))
    answer_dir = os.path.join(root, "answer")
    nested = sorted(os.path.join(d, n) for d, _, names in os.walk(answer_dir) for n in names
                    if n.endswith(".jsonl")) if os.path.isdir(answer_dir) else []
    candidates = [os.path.join(root, n) for n in answers] or nested
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise DatasetError(f"gpt_eval: {root}: several baseline answer files ({', '.join(candidates)}); "
                           "name one with options.baseline_file")
    return None


def _by_key(rows: list[tuple[int, dict]], path: str, key: str, what: str) -> dict[str, tuple[int, dict]]:
    out: dict[str, tuple[int, dict]] = {}
    for lineno, row in rows:
        value = row.get(key)
        if value is None:
            continue
        value = str(value)
        if value in out:
            raise DatasetError(f"{path}:{lineno}: {what} {key} {value!r} already given on line {out[value][0]}")
        out[value] = (lineno, row)
    return out


def _pick(table: dict, category: Optional[str], rows: list) -> Optional[tuple[int, dict]]:
    """The entry of the category, else "general", else the only one."""
    if category is not None and category in table:
        return table[category]
    if GENERAL in table:
        return table[GENERAL]
    return rows[0] if len(rows) == 1 else None


class JudgeSetup:
    """Prompt and reviewer files resolved into the per-question judge settings (metadata.judge)."""

    def __init__(self, prompt_file: Optional[str], reviewer_file: Optional[str]):
        self.prompt_file, self.reviewer_file = prompt_file, reviewer_file
        self.prompts = _read_jsonl(prompt_file, "prompt_file") if prompt_file else []
        self.reviewers = _read_jsonl(reviewer_file, "reviewer_file") if reviewer_file else []
        problems = []
        for lineno, row in self.prompts:
            where = f"{prompt_file}:{lineno}"
            if not isinstance(row.get("prompt_template"), str):
                problems.append(f"{where}: prompt_template: expected a string")
                continue
            if row.get("system_prompt") is not None and not isinstance(row["system_prompt"], str):
                problems.append(f"{where}: system_prompt: expected a string")
            defaults = row.get("defaults") or {}
            if not isinstance(defaults, dict):
                problems.append(f"{where}: defaults: expected an object")
                continue
            try:
                row["prompt_template"].format(question="q", answer_1="a", answer_2="b", **defaults)
            except (KeyError, IndexError, ValueError) as e:
                problems.append(f"{where}: prompt_template does not format with question, answer_1, answer_2 and "
                                f"the defaults' keys ({', '.join(defaults) or 'none'}): {type(e).__name__}: {e}")
        for lineno, row in self.reviewers:
            meta = row.get("metadata", {})
            if not isinstance(meta, dict):
                problems.append(f"{reviewer_file}:{lineno}: metadata: expected an object "
                                "({\"temperature\", \"max_tokens\", \"model\"?})")
        if problems:
            raise_problems(problems, prompt_file or reviewer_file or "gpt_eval")
        self.prompt_by_id = _by_key(self.prompts, prompt_file, "prompt_id", "prompt") if prompt_file else {}
        self.prompt_by_cat = _by_key(self.prompts, prompt_file, "category", "prompt") if prompt_file else {}
        self.reviewer_by_cat = _by_key(self.reviewers, reviewer_file, "category", "reviewer") if reviewer_file else {}

    def for_category(self, category: Optional[str], where: str) -> dict:
        judge: dict = {}
        reviewer = _pick(self.reviewer_by_cat, category, self.reviewers) if self.reviewers else None
        if self.reviewers and reviewer is None:
            raise DatasetError(f"{where}: no reviewer for category {category!r} and no 'general' reviewer "
                               f"in {self.reviewer_file}")
        if reviewer is not None:
            meta = reviewer[1].get("metadata") or {}
            judge.update({k: meta[k] for k in ("temperature", "max_tokens", "model") if meta.get(k) is not None})
            judge["reviewer"] = f"{self.reviewer_file}:{reviewer[0]}"
        if self.prompts:
            prompt = None
            prompt_id = reviewer[1].get("prompt_id") if reviewer is not None else None
            if prompt_id is not None:
                prompt = self.prompt_by_id.get(str(prompt_id))
                if prompt is None:
                    raise DatasetError(f"{self.reviewer_file}:{reviewer[0]}: prompt_id {prompt_id!r} is not in "
                                       f"{self.prompt_file}")
            prompt = prompt or _pick(self.prompt_by_cat, category, self.prompts)
            if prompt is None:
                raise DatasetError(f"{where}: no prompt for category {category!r} and no 'general' prompt "
                                   f"in {self.prompt_file}")
            row = prompt[1]
            judge.update({"system_prompt": row.get("system_prompt") or "", "prompt_template": row["prompt_template"],
                          "defaults": row.get("defaults") or {}, "prompt": f"{self.prompt_file}:{prompt[0]}"})
        return judge


def load(source: str, options: dict) -> Dataset:
    """gpt_eval: questions -> samples carrying the baseline answer and the judge prompt (metadata)."""
    files = locate_files(source, options)
    if not files["question_file"]:
        raise DatasetError(f"gpt_eval: {source}: no question file (question.jsonl, or options.question_file)")
    if not files["baseline_file"]:
        raise DatasetError(f"gpt_eval: {source}: no baseline answer file (baseline.jsonl, answer*.jsonl, "
                           "answer/**/*.jsonl, or options.baseline_file)")
    questions_path, baseline_path = files["question_file"], files["baseline_file"]
    setup = JudgeSetup(files["prompt_file"], files["reviewer_file"])
    baselines, problems = {}, []
    for lineno, row in _read_jsonl(baseline_path, "baseline_file"):
        where = f"{baseline_path}:{lineno}"
        qid, text = _qid(row), _answer_text(row)
        if qid is None or text is None:
            problems.append(f"{where}: expected {{\"question_id\", \"text\"}} (or FastChat's \"choices\": "
                            f"[{{\"turns\": [...]}}]), got keys {', '.join(row)}")
        elif qid in baselines:
            problems.append(f"{where}: question_id {qid!r} already answered on line {baselines[qid][0]}")
        else:
            baselines[qid] = (lineno, text, row.get("model_id"))
    samples, seen = [], {}
    for lineno, row in _read_jsonl(questions_path, "question_file"):
        where = f"{questions_path}:{lineno}"
        qid, text = _qid(row), _first_turn(row, "text")
        category = row.get("category")
        if qid is None or text is None or not text.strip():
            problems.append(f"{where}: expected {{\"question_id\", \"text\", \"category\"}} "
                            f"(or FastChat's \"turns\": [...]), got keys {', '.join(row)}")
            continue
        if category is not None and not isinstance(category, str):
            problems.append(f"{where}: category: expected a string, got {category!r:.40}")
            continue
        if qid in seen:
            problems.append(f"{where}: question_id {qid!r} already used on line {seen[qid]}")
            continue
        seen[qid] = lineno
        if qid not in baselines:
            problems.append(f"{where}: question_id {qid!r} has no answer in the baseline file {baseline_path}")
            continue
        _, baseline, model_id = baselines[qid]
        samples.append(Sample(
            id=qid, messages=[{"role": "user", "content": text}], category=category,
            metadata={"question": text, "baseline": {"text": baseline, "model_id": model_id},
                      "judge": setup.for_category(category, where), "source_line": lineno}))
    if problems:
        raise_problems(problems, questions_path)
    if not samples:
        raise DatasetError(f"{questions_path}: no questions")
    dataset_id = options.get("dataset_id") or os.path.splitext(os.path.basename(questions_path))[0]
    if dataset_id == "question":  # Data-Juicer's / FastChat's file name says nothing; use its folder's
        dataset_id = os.path.basename(os.path.dirname(questions_path)) or dataset_id
    models = sorted({str(m) for _, _, m in baselines.values() if m})
    metadata = {"dataset_id": dataset_id, "name": options.get("name", dataset_id), "task_type": "pairwise_judge",
                "metrics": ["llm_judge"], "baseline_model": models[0] if len(models) == 1 else models or None,
                **{key: path for key, path in files.items() if path}}
    return Dataset(root=os.path.dirname(questions_path), metadata=metadata, samples=samples)
