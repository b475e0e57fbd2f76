"""The evaluation stage: predictions.jsonl + the benchmark's references -> scores.jsonl, then metrics.json.

    python -m evaluator.stages.evaluation --job <job.json>      (in .venvs/evaluation; also inside a warm worker,
                                                                evaluator/stages/worker.py, which calls main())

The job's `benchmark` mapping is the same one the inference stage got (type, dataset, options, sample_size)
plus `metrics` (names from the metric registry; default: metadata.json's, else the benchmark's) and
`metric_options` ({metric: {option: value}}). Predictions come from job.extra["predictions"] or
<output_dir>/predictions.jsonl. Only the samples that have a prediction are scored; a sample whose
inference failed (status=error) is scored as an empty answer, so it counts as wrong, and the count is
reported as `n_error`.

scores.jsonl: one row per scored sample, in prediction order (`score_rows`): {schema_version, sample_id, status,
category, prediction, target?, references?, choices?, scores: {metric: value | null}, compared: {metric:
{prediction, reference}}}; failed samples are rows with status "error" and their (wrong) scores; with no
per-sample metric every row has `scores: {}`. Written atomically before metrics.json.
metrics.json: {benchmark, iteration, tokens_b, n, n_error, metrics, stderr, per_category, unavailable,
per_sample: {metric: "mean" | "sentence"}, methods: {metric: label}, versions, ...}, written atomically and
last (the done file). Exit codes: 0 done; 1 no metric could be computed; 2 bad predictions, benchmark spec or
dataset (the message names file:line or the key).
"""
from __future__ import annotations

import json
import math
import os
import time

from evaluator.benchmarks.registry import default_metrics, load_benchmark
from evaluator.common.atomic import write_text_atomic
from evaluator.common.contracts import PREDICTIONS, SCORES, SCORES_SCHEMA_VERSION, StageJob
from evaluator.common.errors import EvaluatorError
from evaluator.common.records import read_results

from ..common import library_versions, metrics_header, stage_log, stage_main, write_metrics

VERSIONED = ("aac-metrics", "pycocoevalcap", "sentence-transformers", "transformers", "torch", "lm-eval")


class NoMetricError(EvaluatorError):
    """Every requested metric is unavailable here (e.g. SPICE without its jars)."""


log = stage_log("evaluation")


def score(job: StageJob) -> tuple[dict, list[dict]]:
    """The metrics.json document and the scores.jsonl rows for a job (raises EvaluatorError on bad input)."""
    from .metrics import MetricInput, compute  # torch-heavy metrics import lazily inside
    bench = job.benchmark
    kind = bench.get("type") or "dataset"
    predictions_path = job.extra.get("predictions") or os.path.join(job.output_dir, PREDICTIONS)
    try:
        results = read_results(predictions_path)
    except (ValueError, FileNotFoundError) as e:
        raise EvaluatorError(str(e)) from None
    if not results:
        raise EvaluatorError(f"{predictions_path}: no prediction rows")
    dataset = load_benchmark(kind, bench.get("dataset"), bench.get("options"))
    by_id = dataset.by_id()
    unknown = [r.sample_id for r in results if r.sample_id not in by_id]
    if unknown:
        raise EvaluatorError(f"{predictions_path}: {len(unknown)} prediction(s) for samples not in dataset "
                             f"{dataset.dataset_id!r} ({dataset.root}), e.g. {unknown[0]!r}; wrong dataset?")
    seen = set()
    for r in results:
        if r.sample_id in seen:
            raise EvaluatorError(f"{predictions_path}: sample {r.sample_id!r} has more than one prediction")
        seen.add(r.sample_id)
    if len(results) < len(dataset.samples):
        log(f"scoring the {len(results)} of {len(dataset.samples)} samples that have predictions")
    samples = [by_id[r.sample_id] for r in results]
    names = list(bench.get("metrics") or default_metrics(kind, dataset))
    if not names:
        raise EvaluatorError(f"benchmark {bench.get('name')!r}: no metrics configured and dataset "
                             f"{dataset.dataset_id!r} names none (set `metrics:` in the benchmark)")
    ok = [r.ok for r in results]
    # cache_dir "": the caption metrics' default ($AAC_METRICS_CACHE_PATH, else .venvs/aac-metrics-cache)
    inp = MetricInput(predictions=[r.text if r.ok else "" for r in results], samples=samples, ok=ok,
                      options=dict(bench.get("metric_options") or {}), cache_dir="", output_dir=job.output_dir)
    log(f"benchmark {bench.get('name')!r}: {len(results)} predictions ({ok.count(False)} failed in inference), "
        f"metrics: {', '.join(names)}")
    t0 = time.perf_counter()
    result = compute(names, inp)
    for name, why in sorted(result.unavailable.items()):
        log(f"{name}: {why}")
    if not result.values:
        raise NoMetricError("no metric could be computed: " +
                             "; ".join(f"{k}: {v}" for k, v in sorted(result.unavailable.items())))
    doc = {
        **metrics_header(job, kind), "dataset_id": dataset.dataset_id, "n": len(results), "n_error": ok.count(False), "metrics": result.values, "stderr": result.stderr,
        "per_category": result.per_category, "unavailable": result.unavailable, "versions": library_versions(VERSIONED),
        "per_sample": result.per_sample_kind, "methods": result.methods, "notes": result.notes,
        "timings": {"score_s": round(time.perf_counter() - t0, 3)}, "predictions": predictions_path,
    }
    from .metrics.caption import subset_note  # aac-metrics is imported inside its functions only
    doc.update(subset_note(list(result.values), len(results), len(dataset.samples)))
    for warning in doc.get("warnings", []):
        log(f"warning: {warning}")
    return doc, score_rows(results, samples, result)


def score_rows(results: list, samples: list, result) -> list[dict]:
    """scores.jsonl's rows: one per prediction (a RunResult), in order, with `samples[i]` its Sample and `result`
    the MetricResult over them (see the module docstring)."""
    rows = []
    for i, (r, s) in enumerate(zip(results, samples)):
        row = {"schema_version": SCORES_SCHEMA_VERSION, "sample_id": r.sample_id, "status": r.status,
               "category": s.category, "prediction": r.text if r.ok else ""}
        for key in ("target", "references", "choices"):
            value = getattr(s, key)
            if value is not None and value != []:
                row[key] = value
        row["scores"] = {}
        for name, series in result.per_sample.items():
            value = series[i]
            if value is not None and not math.isfinite(value):
                raise EvaluatorError(f"metric {name!r}: sample {r.sample_id!r} has the per-sample value {value!r}; "
                                     "expected a finite number")
            row["scores"][name] = value
        row["compared"] = {name: series[i] for name, series in result.compared.items() if series[i] is not None}
        rows.append(row)
    return rows


def write_scores(job: StageJob, rows: list[dict]) -> None:
    """scores.jsonl, atomically; before metrics.json, so a result that is done always has its per-sample file."""
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    write_text_atomic(os.path.join(job.output_dir, SCORES), text)


def run(job: StageJob) -> int:
    try:
        doc, rows = score(job)
    except NoMetricError as e:
        log(f"error: {e}")
        return 1
    except EvaluatorError as e:
        log(f"error: {e}")
        return 2
    write_scores(job, rows)
    return write_metrics(job, doc, log)


def main(argv=None) -> int:
    return stage_main(__doc__.splitlines()[0], evaluation=run, argv=argv)
