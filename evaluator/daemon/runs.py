"""The training runs a config names (`resolve_runs`), apart from build.py so that a training script resolves its run
(evaluator.api.training) without the daemon's own packages (watchdog)."""
from __future__ import annotations

import os
from typing import Optional

from evaluator.common.checks import run_name_problem
from evaluator.common.errors import EvaluatorError
from evaluator.daemon.config import AutoEvalConfig, glob_pattern_problem
from evaluator.daemon.policy import RunSpec


def resolve_runs(cfg: AutoEvalConfig, model_type: Optional[str] = None) -> list[RunSpec]:
    """The training runs to watch: watch.paths, or Data-Juicer's megatron.checkpoint_path."""
    paths = list(cfg.watch.paths)
    default_layout = model_type or cfg.watch.layout or "megatron"
    if not paths:
        if cfg.megatron and cfg.megatron.checkpoint_path:
            return _checked([RunSpec(cfg.model_name, cfg.megatron.checkpoint_path, default_layout)], cfg, model_type)
        raise EvaluatorError("invalid config: auto_eval.watch.paths: no checkpoint folder to watch; "
                             "set watch.paths or megatron.checkpoint_path")
    runs = []
    for p in paths:
        name = p.name or (cfg.model_name if len(paths) == 1 else os.path.basename(p.path.rstrip("/")))
        runs.append(RunSpec(name, p.path, p.layout or default_layout,
                            tuple(p.benchmarks) if p.benchmarks is not None else None))
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            raise EvaluatorError(f"invalid config: auto_eval.watch.paths: two runs are named {r.name!r}; give each "
                                 f"path a distinct `name:` (it names the folder of its results)")
    for r in runs:
        if run_name_problem(r.name):
            raise EvaluatorError(f"invalid config: run name (model_name or watch.paths[].name): "
                                 f"{run_name_problem(r.name)}")
        if os.path.exists(r.root) and not os.path.isdir(r.root):
            raise EvaluatorError(f"invalid config: auto_eval.watch.paths: {r.root} is not a folder")
    return _checked(runs, cfg, model_type)


def _checked(runs: list[RunSpec], cfg: AutoEvalConfig, model_type: Optional[str]) -> list[RunSpec]:
    """--model-type glob needs watch.pattern: the config's own check saw another layout."""
    if model_type == "glob" and any(r.layout == "glob" for r in runs) and glob_pattern_problem(cfg.watch.pattern):
        raise EvaluatorError(f"--model-type glob: auto_eval.watch.pattern: {glob_pattern_problem(cfg.watch.pattern)}")
    return runs
