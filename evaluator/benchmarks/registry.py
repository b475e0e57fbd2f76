"""The benchmark registry: a benchmark name -> how to load its data as canonical samples, its default
metrics and prompt. Looked up by the stages (from the job's benchmark spec) and by tools/bench.py.

A loader is `load(source, options) -> Dataset`, where `source` is the file or directory the user points at
(config `dataset:` / bench.py's positional argument) and `options` the benchmark's `options:` mapping
(split, prompt, ...). Loaders live in their own modules and are imported only when used.

`dataset` is the plain canonical directory (test.jsonl + metadata.json); a directory given where a
benchmark name is expected is taken as one.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Optional

from evaluator.common.errors import EvaluatorError

from .dataset import Dataset, is_dataset_dir, load_dataset


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    loader: str  # "module:function"
    metrics: tuple = ()  # default metrics when neither the config nor metadata.json names any
    description: str = ""
    default_source: Optional[str] = None  # relative to the repo root, for bench.py without --dataset
    options: dict = field(default_factory=dict)  # default loader options
    known_options: Optional[tuple] = ()  # the loader options it reads (a typo is an error); None: it checks itself


def _load_canonical(source: str, options: dict) -> Dataset:
    return load_dataset(source)


TEXT_OPTIONS = ("question_column", "answer_column", "choices_column", "category_column", "id_column",
                "answer_index_base", "prompt", "dataset_id", "name")

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "dataset": BenchmarkSpec("dataset", "evaluator.benchmarks.registry:_load_canonical", (),
                             "a canonical dataset directory (test.jsonl + metadata.json)"),
    # Layouts, options and matching rules: docs/benchmarks.md. Loader defaults live in the loader modules.
    "clotho": BenchmarkSpec(
        "clotho", "evaluator.benchmarks.clotho:load",
        ("cider_d", "spider", "fense", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "sbert_sim"),
        "Clotho-v2.1 audio captioning: clotho_captions_<split>.csv + <split>/*.wav (options: split, prompt)",
        default_source="data/clotho-v2", known_options=("split", "prompt", "audio_dir", "encoding")),
    "mmau-pro": BenchmarkSpec(
        "mmau-pro", "evaluator.benchmarks.mmau_pro:load", ("mmau_pro_embed", "mmau_string_match"),
        "MMAU-Pro audio QA: test.jsonl|json|parquet + data/*.wav (options: task mc|open|instruction, prompt, "
        "bad_answer)",
        default_source="data/mmau-pro", known_options=("task", "prompt", "bad_answer", "audio_root")),
    "text-mc": BenchmarkSpec(
        "text-mc", "evaluator.benchmarks.text:load_mc", ("accuracy",),
        "MMLU/KMMLU-style multiple choice from .jsonl/.json/.csv/.tsv (a file or a folder of them)",
        known_options=TEXT_OPTIONS),
    "text-qa": BenchmarkSpec(
        "text-qa", "evaluator.benchmarks.text:load_qa", ("exact_match", "token_f1"),
        "question -> answer from .jsonl/.json/.csv/.tsv (options: question_column, answer_column, prompt)",
        known_options=TEXT_OPTIONS),
    "gpt_eval": BenchmarkSpec(
        "gpt_eval", "evaluator.benchmarks.gpt_eval:load", ("llm_judge",),
        "Data-Juicer's GPT evaluation: question/baseline/prompt/reviewer .jsonl files, judged pairwise by an LLM "
        "(options: question_file, baseline_file, prompt_file, reviewer_file; docs/gpt_eval_lm_eval.md)",
        known_options=None),
}


def register(spec: BenchmarkSpec) -> None:
    BENCHMARKS[spec.name] = spec


def get(name: str) -> BenchmarkSpec:
    if not isinstance(name, str) or name not in BENCHMARKS:  # 1 or a list: the same answer, not a TypeError
        from evaluator.common.errors import did_you_mean
        raise EvaluatorError(f"unknown benchmark type {name!r} (known: {', '.join(sorted(BENCHMARKS))})"
                             f"{did_you_mean(name, BENCHMARKS)}")
    return BENCHMARKS[name]


def option_problems(kind: str, options: Optional[dict]) -> list:
    """`options.<key>: ...` lines for loader options the benchmark type does not read (typos would be ignored)."""
    import difflib
    known = get(kind).known_options
    if known is None:
        return []
    out = []
    for key in options or {}:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(f"options.{key}: not an option of benchmark type {kind!r} "
                       f"(known: {', '.join(known) or 'none'}){hint}")
    return out


def load_benchmark(kind: str, source: Optional[str], options: Optional[dict] = None,
                   sample_size: Optional[int] = None) -> Dataset:
    """Load benchmark `kind` from `source` as canonical samples; the first `sample_size` rows if given."""
    spec = get(kind)
    problems = option_problems(kind, options)
    if problems:
        raise EvaluatorError("; ".join(problems))
    if not source and spec.default_source:  # relative to the repository root, wherever we run from
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        source = os.path.join(root, spec.default_source)
    if not source:
        raise EvaluatorError(f"benchmark {kind!r}: no data given (set `dataset:` to its file or directory)")
    if not os.path.exists(source):
        raise EvaluatorError(f"benchmark {kind!r}: dataset path not found: {source}")
    module, func = spec.loader.split(":")
    dataset = getattr(importlib.import_module(module), func)(source, {**spec.options, **(options or {})})
    if sample_size is not None:
        if sample_size < 1:
            raise EvaluatorError(f"sample_size: expected a positive number, got {sample_size}")
        dataset.samples = dataset.samples[:sample_size]
    return dataset


def default_metrics(kind: str, dataset: Dataset) -> list:
    """Metrics to compute when the config names none: metadata.json's `metrics`, else the benchmark's."""
    return list(dataset.metadata.get("metrics") or get(kind).metrics)


def kind_for(name_or_dir: str) -> tuple[str, Optional[str]]:
    """bench.py's positional argument: a registered benchmark name, or a dataset directory/file."""
    if name_or_dir in BENCHMARKS:
        return name_or_dir, None
    if os.path.isdir(name_or_dir) and is_dataset_dir(name_or_dir):
        return "dataset", name_or_dir
    if os.path.exists(name_or_dir):
        raise EvaluatorError(f"{name_or_dir}: not a canonical dataset directory (test.jsonl + metadata.json); "
                             "for another layout pass the benchmark name and --dataset PATH")
    if os.sep in name_or_dir or name_or_dir.startswith((".", "~")):  # meant as a folder: say that it is not there
        raise EvaluatorError(f"{name_or_dir}: no such dataset directory (nor a benchmark name: "
                             f"{', '.join(BENCHMARKS)})")
    get(name_or_dir)  # raises with the known names
    raise AssertionError("unreachable")
