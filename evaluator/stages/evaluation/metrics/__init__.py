"""The one metric registry: metric name -> MetricSpec, and `compute(names, inp)`.

A metric function is named "module:function" and imported on first use, so this module (and text.py) stays
pure Python: the daemon venv's tests import it without torch or aac-metrics.

Function contract: `func(inp: MetricInput, names: list[str]) -> MetricResult`. compute() calls each function
once with every requested name that points at it (the caption metrics share one PTB tokenisation this way).

Result conventions (docs/metrics.md has the full rules):
- `values[m]` is the metric on the whole set, raw scale (accuracy in [0, 1], CIDEr-D in [0, 10]).
- How `values[m]` aggregates is declared in the registry (`MetricSpec.aggregate`), not left to each function:
  "mean" metrics have `per_sample[m]` with values[m] == mean(per_sample[m]) (over the non-null entries) and
  `stderr[m]` = sample std (ddof=1) / sqrt(n); "corpus" metrics (bleu_*, meteor) pool statistics over the set
  and have no stderr; they may still have `per_sample[m]` (sentence-level values, not averaging to values[m]).
- `per_sample[m][i]` is sample i's value in sample order, or None where the metric has none for that sample
  (e.g. a question the judge could not judge).
- `compared[m][i]` = {"prediction", "reference"}: what metric m compared for sample i (the normalised prediction
  and the reference it matched best; the extracted choice and the target), or None.
- compute() fills `methods[m]` (the method label, e.g. "aac-metrics CIDEr-D ...") for every reported metric and
  `per_sample_kind[m]` ("mean" | "sentence") for every metric with per-sample values; an output name a function
  invents (unparsed_rate, win_rate, sbert_sim_minilm_l6) is labelled by the registered metric it came from.
- `per_category[c]` = {metric: value, "n": count} when any sample has a category; mean metrics average
  their per-sample scores over the category, corpus metrics are recomputed on the category's samples.
- `unavailable[m]` = "unavailable: missing ..." when files a metric needs are absent; never a substitute number.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from evaluator.benchmarks.dataset import Sample
from evaluator.common.checks import number_problem
from evaluator.common.errors import EvaluatorError, did_you_mean


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
    per_sample: dict[str, list[Optional[float]]] = field(default_factory=dict)
    # per metric, per sample: {"prediction", "reference"} as the metric compared them, or None
    compared: dict[str, list[Optional[dict]]] = field(default_factory=dict)
    # filled by compute() from the registry (a function may set its own, e.g. naming the judge model)
    methods: dict[str, str] = field(default_factory=dict)
    per_sample_kind: dict[str, str] = field(default_factory=dict)  # "mean" | "sentence"
    # remarks a reader of metrics.json needs about how the set was scored (JSON values), e.g. the number of
    # captions made one line before PTB tokenisation
    notes: dict[str, object] = field(default_factory=dict)

    def merge(self, other: "MetricResult") -> None:
        self.values.update(other.values)
        self.stderr.update(other.stderr)
        self.unavailable.update(other.unavailable)
        self.per_sample.update(other.per_sample)
        self.compared.update(other.compared)
        self.methods.update(other.methods)
        self.per_sample_kind.update(other.per_sample_kind)
        self.notes.update(other.notes)
        for category, metrics in other.per_category.items():
            self.per_category.setdefault(category, {}).update(metrics)


AGGREGATES = ("mean", "corpus")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    func: str  # "module:function", imported lazily
    needs: Optional[str]  # the Sample field every sample must carry: "target" | "references" | "choices" | None
    description: str
    options: tuple[str, ...] = ()  # the metric_options keys its function reads for it (option_problems)
    # "mean": the value is the mean of per-sample values (stderr = sd / sqrt(n)); "corpus": pooled over the set
    # (no stderr; per-sample values, if any, are sentence-level and do not average to the value)
    aggregate: str = "mean"
    method: str = ""  # what computes it, shown beside the number (metrics.json `methods`, docs/metrics.md)
    # needs the evaluation venv's libraries (aac-metrics, sentence-transformers, torch): the Python API
    # (evaluator/api) runs such metrics through the evaluation stage in that venv, the others in the caller's process
    evaluation_venv: bool = False

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"metric {self.name!r}: aggregate {self.aggregate!r}, expected one of {AGGREGATES}")


_TEXT = "evaluator.stages.evaluation.metrics.text"
_CAPTION = "evaluator.stages.evaluation.metrics.caption:caption_metrics"
_MMAU = "evaluator.stages.evaluation.metrics.mmau"
# what caption.py reads: every caption metric runs Java (PTB tokenisation); SPICE has a timeout; the model-based
# ones (FENSE's fluency checker and SBERT) a torch device and batch size
_JAVA = ("java_path",)
_SPICE = _JAVA + ("spice_timeout",)
_MODEL = ("device", "batch_size")
# what judge.py's JudgeSettings.from_options reads
JUDGE_OPTIONS = ("base_url", "api_key", "api_key_env", "organization", "model", "max_concurrency", "timeout",
                 "max_retries", "retry_backoff", "temperature", "max_tokens", "swap", "reviews_file",
                 "max_failure_rate")


def _spec(name: str, func: str, needs: Optional[str], description: str, options: tuple = (), *,
          aggregate: str = "mean", method: str = "", evaluation_venv: bool = False) -> MetricSpec:
    # every caption metric runs aac-metrics (and Java): the evaluation venv's
    return MetricSpec(name, func, needs, description, options, aggregate, method,
                      evaluation_venv or func == _CAPTION)


_AAC = "aac-metrics"


METRICS: dict[str, MetricSpec] = {s.name: s for s in [
    _spec("exact_match", f"{_TEXT}:exact_match", "target",
          "SQuAD exact match (lowercase, drop punctuation and a/an/the, collapse spaces); max over target + references",
          method="SQuAD exact match (ours, SQuAD v1.1 normalisation; best of target + references)"),
    _spec("token_f1", f"{_TEXT}:token_f1", "target",
          "SQuAD token F1 over the same normalisation; max over target + references",
          method="SQuAD token F1 (ours, SQuAD v1.1 normalisation, v2.0 empty-answer rule; best of target + references)"),
    _spec("accuracy", f"{_TEXT}:accuracy", "choices",
          "multiple choice: the answer extracted from free text equals the target choice; also reports unparsed_rate",
          method="multiple-choice accuracy, choice extracted from free text by our rules (docs/metrics.md)"),
    _spec("bleu", _CAPTION, "references", "alias: bleu_1, bleu_2, bleu_3, bleu_4", aggregate="corpus",
          method="alias of bleu_1..bleu_4"),
    *[_spec(f"bleu_{k}", _CAPTION, "references", f"corpus BLEU-{k} (coco-caption, 'closest' ref length) on PTB tokens",
            _JAVA, aggregate="corpus", method=f"{_AAC} BLEU-{k} (coco-caption port, corpus), PTB tokens")
      for k in (1, 2, 3, 4)],
    _spec("rouge_l", _CAPTION, "references", "ROUGE-L (beta 1.2, max over references) on PTB tokens; mean over samples",
          _JAVA, method=f"{_AAC} ROUGE-L (coco-caption port), PTB tokens"),
    _spec("meteor", _CAPTION, "references", "METEOR 1.5 (-l en -norm), corpus score from the jar, on PTB tokens", _JAVA,
          aggregate="corpus", method=f"{_AAC} METEOR 1.5 jar (corpus), PTB tokens"),
    _spec("cider_d", _CAPTION, "references", "CIDEr-D (n=4, sigma=6, x10) on PTB tokens; mean over samples", _JAVA,
          method=f"{_AAC} CIDEr-D (coco-caption port), PTB tokens"),
    _spec("spice", _CAPTION, "references", "SPICE 1.0 (needs stanford-corenlp-3.6.0 jars in the cache)", _SPICE,
          method=f"{_AAC} SPICE 1.0 jar"),
    _spec("spider", _CAPTION, "references", "(cider_d + spice) / 2 per sample; needs SPICE", _SPICE,
          method=f"{_AAC} SPIDEr ((CIDEr-D + SPICE) / 2)"),
    _spec("spider_fl", _CAPTION, "references", "spider x (1 - 0.9 * fluency error); needs SPICE + the FENSE echecker",
          _SPICE + _MODEL, method=f"{_AAC} SPIDEr-FL (FENSE fluency penalty)"),
    _spec("fense", _CAPTION, "references",
          "FENSE: paraphrase-TinyBERT-L6-v2 similarity x fluency penalty; needs its checkpoints", _JAVA + _MODEL,
          method=f"{_AAC} FENSE (paraphrase-TinyBERT-L6-v2 x fluency penalty)"),
    _spec("sbert_sim", _CAPTION, "references",
          "cosine similarity of SBERT embeddings (option sbert_model); reported under a name saying the model",
          _JAVA + ("sbert_model",) + _MODEL, method=f"{_AAC} SBERT cosine similarity (the model is in the name)"),
    _spec("llm_judge", "evaluator.stages.evaluation.metrics.judge:llm_judge", None,
          "an LLM grades each answer (see judge.py)", JUDGE_OPTIONS,
          method="pairwise LLM judge against a baseline answer (Data-Juicer/FastChat review), both orders"),
    # MMAU-Pro / MMAU scoring as the benchmarks' reference code does it (mmau.py; docs/benchmarks.md)
    _spec("mmau_pro_embed", f"{_MMAU}:mmau_pro_embed", "choices",
          "MMAU-Pro closed-form: embed prediction and choices (NV-Embed-v2 or option embed_model), argmax cosine "
          "equals the target; unavailable without the model files", ("embed_model", "device"), evaluation_venv=True,
          method="MMAU-Pro closed-form embedding match (NeMo-Skills nvembed_judge: argmax cosine over the choices)"),
    _spec("mmau_string_match", f"{_MMAU}:mmau_string_match", "choices",
          "MMAU v1 evaluation.py string_match: all answer tokens in the prediction, no token of another choice",
          method="MMAU v1 evaluation.py string_match (token sets; Sakshi113/MMAU)"),
    _spec("mmau_pro_judge", f"{_MMAU}:mmau_pro_judge", "target",
          "MMAU-Pro open-ended: an LLM judge answers Yes/No with NeMo-Skills' judge/speechlm prompt",
          tuple(o for o in JUDGE_OPTIONS if o not in ("swap", "reviews_file", "max_failure_rate")),
          method="LLM judge Yes/No with NeMo-Skills judge/speechlm prompt"),
    _spec("mmau_pro_if", f"{_MMAU}:mmau_pro_if", None,
          "MMAU-Pro instruction following: NeMo-Skills' rule check for the row's task_identifier/kwargs",
          method="NeMo-Skills MMAU-Pro instruction-following rule checks (evaluate_aif_constraints)"),
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


def _option_number(low: Optional[float] = None, high: Optional[float] = None, integer: bool = False,
                   low_open: bool = False, null: bool = False, many: bool = False) -> Callable[[object], Optional[str]]:
    """A check for a numeric metric option, as lenient as the int()/float() the metric calls on it (so "30"
    passes) but refusing what that call would refuse, truncate (2.5 as an integer) or misread (a bool):
    the problem with a value, or None. `many`: a list of such numbers is taken too (SPICE's timeouts)."""
    what = "an integer" if integer else "a number"

    def one(value) -> Optional[str]:
        return number_problem(value, low, high, integer, low_open, numeric_strings=True)

    def check(value) -> Optional[str]:
        if value is None:
            return None if null else f"expected {what}, got null"
        if many and isinstance(value, list) and value:
            return next((p for p in map(one, value) if p), None)
        return one(value)
    return check


# The values the metrics convert (int()/float()) or hand to a library that needs a number; other options are
# taken as they come. Keyed by option name: no two metrics read one name differently.
OPTION_VALUES: dict[str, Callable[[object], Optional[str]]] = {
    "batch_size": _option_number(1, integer=True),
    "spice_timeout": _option_number(0, low_open=True, null=True, many=True),
    "max_concurrency": _option_number(1, integer=True),
    "timeout": _option_number(0, low_open=True),
    "max_retries": _option_number(0, integer=True),
    "retry_backoff": _option_number(0),
    "temperature": _option_number(0, null=True),
    "max_tokens": _option_number(1, integer=True, null=True),
    "max_failure_rate": _option_number(0, 1),
}


def option_problems(metric_options: dict, metrics: Optional[list] = None) -> list[tuple[tuple, str]]:
    """((metric, option), what is wrong) for config `metric_options:` ({metric: {option: value}}): a metric name
    that is unknown or not among `metrics` (the benchmark's; None: any may be), an option no computed metric
    reads, a value the metric cannot take. One function renders a group (the caption metrics share one run),
    and every option given under any of its metrics reaches all of them, so an option counts as read when a
    computed metric of the same function reads it."""
    known = list(METRICS) + list(ALIASES)
    wanted = known
    if metrics:
        try:
            wanted = list(dict.fromkeys(list(metrics) + expand(list(metrics))))
        except EvaluatorError:
            pass  # the unknown name in `metrics` is the caller's problem to report
    problems: list[tuple[tuple, str]] = []
    for name, options in metric_options.items():
        if name not in known:
            problems.append(((name,), f"unknown metric {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})"))
            continue
        if name not in wanted:
            problems.append(((name,), f"{name!r} is not one of this benchmark's metrics ({', '.join(metrics)})"
                                      f"{did_you_mean(name, wanted)}"))
            continue
        if not isinstance(options, dict):
            problems.append(((name,), f"expected a mapping of option: value, got {options!r:.80}"))
            continue
        members = ALIASES.get(name, [name])
        funcs = {METRICS[m].func for m in members}
        computed = [m for m in METRICS if m in wanted and METRICS[m].func in funcs]
        accepted = list(dict.fromkeys(o for m in members + computed for o in METRICS[m].options))
        for key, value in options.items():
            if key not in accepted:
                elsewhere = [m for m in METRICS if METRICS[m].func in funcs and key in METRICS[m].options]
                if elsewhere:
                    text = f"{key} is read by {', '.join(elsewhere)} only, which this benchmark does not compute"
                elif accepted:
                    text = f"not an option of {name}{did_you_mean(key, accepted)} (known: {', '.join(accepted)})"
                else:
                    text = f"{name} takes no options"
                problems.append(((name, key), text))
            elif key in OPTION_VALUES and (problem := OPTION_VALUES[key](value)) is not None:
                problems.append(((name, key), problem))
    return problems


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
        if needs == "choices":  # the gold choice must be one of them (or a letter of one), whatever is answered
            from .text import resolve_target
            for s in inp.samples:
                resolve_target(s)


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
        part = _load(func)(inp, members)
        _check_lengths(func, part, len(inp.samples))
        label(part, members, func)
        result.merge(part)
    return result


def source_metric(output: str, members: list[str], func: str = "") -> str:
    """The registered metric an output name of a metric function belongs to: the member it is, else the member
    it extends (`sbert_sim_minilm_l6` -> sbert_sim), else the function's only member (`unparsed_rate` ->
    accuracy, `win_rate` -> llm_judge). A name none of these explains is a bug in the function."""
    if output in members:
        return output
    extended = [m for m in members if output.startswith(m + "_")]
    if extended:
        return max(extended, key=len)
    if len(members) == 1:
        return members[0]
    raise ValueError(f"metric function {func or '?'} reported {output!r}, which is none of the metrics it was "
                     f"called for ({', '.join(members)}) nor a name extending one")


def label(part: MetricResult, members: list[str], func: str = "") -> None:
    """Fill `methods` (for every reported value) and `per_sample_kind` (for every per-sample series) from the
    registry entries the outputs come from; a method the function set itself (naming a model) is kept."""
    for name in list(part.values) + list(part.per_sample):
        spec = METRICS[source_metric(name, members, func)]
        if name in part.values:
            part.methods.setdefault(name, spec.method)
        if name in part.per_sample:
            part.per_sample_kind[name] = "mean" if spec.aggregate == "mean" else "sentence"


def _check_lengths(func: str, part: MetricResult, n: int) -> None:
    for kind, table in (("per_sample", part.per_sample), ("compared", part.compared)):
        for name, series in table.items():
            if len(series) != n:
                raise ValueError(f"metric function {func}: {kind}[{name!r}] has {len(series)} entries for {n} samples")
