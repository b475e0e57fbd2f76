"""Registry of benchmark types: which stage module runs each stage, in which venv.

A stage is started as `<venv python> -m <module> --job <job.json>`; the inference module runs in
the inference venv on the GPU lane, the evaluation module in the evaluation venv on the CPU lane.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkType:
    name: str
    inference_module: str
    evaluation_module: str


BENCHMARK_TYPES: dict[str, BenchmarkType] = {
    "command": BenchmarkType("command", "evaluator.stages.command", "evaluator.stages.command"),
}
