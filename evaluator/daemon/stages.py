"""Registry of benchmark types: which stage module runs each stage, in which venv.

A stage is started as `<venv python> -m <module> --job <job.json>`; the inference module runs in
the inference venv on the GPU lane, the evaluation module in the evaluation venv on the CPU lane.
The dataset types share the native stages, which look the loader up in evaluator.benchmarks.registry.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    **{name: _native(name) for name in ("dataset", "clotho", "mmau-pro", "text-mc", "text-qa")},
}
