"""Registry of benchmark types: which stage module runs each stage, in which venv.

A stage is started as `<venv python> -m <module> --job <job.json>`; the inference module runs in
the inference venv on the GPU lane, the evaluation module in the evaluation venv on the CPU lane.
The dataset types share the native stages, which look the loader up in evaluator.benchmarks.registry: every
loader there is a benchmark type here, so the names of the dataset types have one definition (that registry).
This module and the registry are standard library only (tools/bench.py imports both).
"""
from __future__ import annotations

from dataclasses import dataclass

from evaluator.benchmarks.registry import BENCHMARKS

NATIVE_INFERENCE = "evaluator.stages.inference"
NATIVE_EVALUATION = "evaluator.stages.evaluation"


@dataclass(frozen=True)
class BenchmarkType:
    name: str
    inference_module: str
    evaluation_module: str
    needs_dataset: bool = False


def _native(name: str) -> BenchmarkType:
    return BenchmarkType(name, NATIVE_INFERENCE, NATIVE_EVALUATION, needs_dataset=True)


BENCHMARK_TYPES: dict[str, BenchmarkType] = {
    "command": BenchmarkType("command", "evaluator.stages.command", "evaluator.stages.command"),
    # the dataset types (gpt_eval is Data-Juicer's GPT evaluation: native inference answers the questions, the
    # llm_judge metric reviews them)
    **{name: _native(name) for name in BENCHMARKS},
    # external harnesses: the inference-lane module runs the harness on the checkpoint, the evaluation-lane
    # module converts its results into metrics.json (docs/gpt_eval_lm_eval.md)
    "lm-eval": BenchmarkType("lm-eval", "evaluator.stages.lm_eval", "evaluator.stages.lm_eval"),
    "helm": BenchmarkType("helm", "evaluator.stages.helm", "evaluator.stages.helm"),
}
