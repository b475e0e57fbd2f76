"""The one metric registry: metric name -> MetricSpec, and `compute(names, inp)`.

A metric function is named "module:function" and imported on first use, so this module (and text.py) stays
pure Python: the daemon venv's tests import it without torch or aac-metrics.

Function contract: `func(inp: MetricInput, names: list[str]) -> MetricResult`. compute() calls each function
once with every requested name that points at it (the caption metrics share one PTB tokenisation this way).

Result conventions (docs/metrics.md has the full rules):
- `values[m]` is the metric on the whole set, raw scale (accuracy in [0, 1], CIDEr-D in [0, 10]).
- `per_sample[m]` exists only for mean metrics, where values[m] == mean(per_sample[m]); those also get
  `stderr[m]` = sample std (ddof=1) / sqrt(n). Corpus metrics (bleu_*, meteor) have neither.
- `per_category[c]` = {metric: value, "n": count} when any sample has a category; mean metrics average
  their per-sample scores over the category, corpus metrics are recomputed on the category's samples.
- `unavailable[m]` = "unavailable: missing ..." when files a metric needs are absent; never a substitute number.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Optional

from evaluator.benchmarks.dataset import Sample
from evaluator.common.errors import EvaluatorError


@dataclass
class MetricInput:
    predictions: list[str]  # one per sample, same order; "" for samples whose inference failed
    samples: list[Sample]
    ok: list[bool]  # False where inference failed (those count as wrong / empty caption)
    options: dict  # per-metric options from config, e.g. {"sbert_model": path}
    cache_dir: str  # aac-metrics cache (jars); see caption.default_cache_dir()
    output_dir: str = ""  # the stage's result folder: relative output files of a metric (judge reviews) go here


@dataclass
class MetricResult:
    values: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)

    def merge(self, other: "MetricResult") -> None:
        self.values.update(other.values)
        self.stderr.update(other.stderr)
        self.unavailable.update(other.unavailable)
        self.per_sample.update(other.per_sample)
        for category, metrics in other.per_category.items():
            self.per_category.setdefault(category, {}).update(metrics)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    func: str  # "module:function", imported lazily
    needs: Optional[str]  # the Sample field every sample must carry: "target" | "references" | "choices" | None
    description: str


_TEXT = "evaluator.stages.evaluation.metrics.text"
_CAPTION = "evaluator.stages.evaluation.metrics.caption:caption_metrics"


def _spec(name: str, func: str, needs: Optional[str], description: str) -> MetricSpec:
    return MetricSpec(name, func, needs, description)


METRICS: dict[str, MetricSpec] = {s.name: s for s in [
    _spec("exact_match", f"{_TEXT}:exact_match", "target",
          "SQuAD exact match (lowercase, drop punctuation and a/an/the, collapse spaces); max over target + references"),
    _spec("token_f1", f"{_TEXT}:token_f1", "target",
          "SQuAD token F1 over the same normalisation; max over target + references"),
    _spec("accuracy", f"{_TEXT}:accuracy", "choices",
          "multiple choice: the answer extracted from free text equals the target choice; also reports unparsed_rate"),
    _spec("bleu", _CAPTION, "references", "alias: bleu_1, bleu_2, bleu_3, bleu_4"),
    *[_spec(f"bleu_{k}", _CAPTION, "references", f"corpus BLEU-{k} (coco-caption, 'closest' ref length) on PTB tokens")
      for k in (1, 2, 3, 4)],
    _spec("rouge_l", _CAPTION, "references", "ROUGE-L (beta 1.2, max over references) on PTB tokens; mean over samples"),
    _spec("meteor", _CAPTION, "references", "METEOR 1.5 (-l en -norm), corpus score from the jar, on PTB tokens"),
    _spec("cider_d", _CAPTION, "references", "CIDEr-D (n=4, sigma=6, x10) on PTB tokens; mean over samples"),
    _spec("spice", _CAPTION, "references", "SPICE 1.0 (needs stanford-corenlp-3.6.0 jars in the cache)"),
    _spec("spider", _CAPTION, "references", "(cider_d + spice) / 2 per sample; needs SPICE"),
    _spec("spider_fl", _CAPTION, "references", "spider x (1 - 0.9 * fluency error); needs SPICE + the FENSE echecker"),
    _spec("fense", _CAPTION, "references",
          "FENSE: paraphrase-TinyBERT-L6-v2 similarity x fluency penalty; needs its checkpoints"),
    _spec("sbert_sim", _CAPTION, "references",
          "cosine similarity of SBERT embeddings (option sbert_model); reported under a name saying the model"),
    _spec("llm_judge", "evaluator.stages.evaluation.metrics.judge:llm_judge", None,
          "an LLM grades each answer (see judge.py)"),
]}

# Names that stand for several metrics.
ALIASES: dict[str, list[str]] = {"bleu": ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]}


def expand(names: list[str]) -> list[str]:
    """Expand aliases and drop repeats, keeping order; unknown names raise EvaluatorError with a suggestion."""
    out: list[str] = []
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise EvaluatorError(f"metrics: unknown metric {name!r}{hint} (known: {', '.join(METRICS)})")
        for item in ALIASES.get(name, [name]):
            if item not in out:
                out.append(item)
    return out


def _has(sample: Sample, needs: str) -> bool:
    value = getattr(sample, needs)
    return value is not None and value != [] and value != ""


def check_inputs(names: list[str], inp: MetricInput) -> None:
    """Every sample must carry what each requested metric needs (accuracy: choices and target)."""
    n = len(inp.samples)
    if not (len(inp.predictions) == len(inp.ok) == n):
        raise ValueError(f"MetricInput: {len(inp.predictions)} predictions, {len(inp.ok)} ok flags, {n} samples")
    if n == 0:
        raise EvaluatorError("metrics: no samples to score")
    for name in names:
        needs = METRICS[name].needs
        fields = ("choices", "target") if needs == "choices" else (needs,) if needs else ()
        for f in fields:
            missing = [s.id for s in inp.samples if not _has(s, f)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise EvaluatorError(f"metric {name!r} needs {f!r} on every sample; sample {missing[0]!r} has none{more}")


def _load(func: str):
    module, _, attr = func.partition(":")
    return getattr(importlib.import_module(module), attr)


def compute(names: list[str], inp: MetricInput) -> MetricResult:
    """Score predictions with the named metrics (aliases expanded); see the module docstring for the result."""
    names = expand(names)
    check_inputs(names, inp)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(METRICS[name].func, []).append(name)
    result = MetricResult()
    for func, members in groups.items():
        result.merge(_load(func)(inp, members))
    return result
