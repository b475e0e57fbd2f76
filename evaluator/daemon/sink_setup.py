"""The daemon config -> the recorder's sinks: which sinks, and the settings they get.

This wiring lives on the daemon side so that `recorder/` stays a leaf that knows nothing of the daemon config
(dependencies point one way: evaluator.common <- recorder <- evaluator.daemon).
"""
from __future__ import annotations

import os

from evaluator.daemon.config import AutoEvalConfig
from recorder.sinks import SINKS, RecorderSettings, Sink, WandbSettings, mlflow_settings, versions


def sink_names(cfg: AutoEvalConfig) -> list[str]:
    """The sinks a daemon config asks for: `recorder.sinks` when given, else local (+ wandb when the
    config has Data-Juicer's `wandb:` section). `local` is always on."""
    if "sinks" in cfg.recorder.model_fields_set:
        names = list(cfg.recorder.sinks)
    else:
        names = ["local"] + (["wandb"] if cfg.wandb is not None else [])
    if "local" not in names:
        names.insert(0, "local")
    return list(dict.fromkeys(names))


def settings_from_config(cfg: AutoEvalConfig) -> RecorderSettings:
    """What the sinks are told; run_config (W&B config, MLflow params) is masked by RecorderSettings itself."""
    project = (cfg.wandb.project if cfg.wandb and cfg.wandb.project else None) or cfg.project_name
    w = cfg.wandb
    wandb_dir = (w.dir if w and w.dir else None) or os.path.join(cfg.cache_dir, "wandb")
    wandb = WandbSettings(
        project=project, dir=os.path.join(cfg.config_dir or os.getcwd(), os.path.expanduser(wandb_dir)),
        mode=w.mode if w else "auto", base_url=w.base_url if w else None, entity=w.entity if w else None,
        group=w.group if w else None, tags=list(w.tags) if w else [],
        sample_predictions=w.sample_predictions if w else 5, init_timeout=w.init_timeout if w else 60.0)
    m = cfg.recorder.mlflow
    mlflow = mlflow_settings(cfg.cache_dir, m.tracking_uri, m.experiment or project, cfg.config_dir)
    run_config = {
        "project_name": cfg.project_name,
        "model_name": cfg.model_name,
        "token_per_iteration": cfg.token_per_iteration or None,
        "benchmarks": [b.model_dump(exclude_none=True) for b in cfg.benchmarks],
        "versions": versions(),
    }
    return RecorderSettings(cache_dir=cfg.cache_dir, project=project, wandb=wandb, mlflow=mlflow,
                            run_config=run_config, plots=cfg.recorder.plots)


def make_sinks(cfg: AutoEvalConfig) -> list[Sink]:
    """One sink per name of sink_names(cfg), each built by its factory in recorder.sinks.SINKS."""
    settings = settings_from_config(cfg)
    return [SINKS[name](settings) for name in sink_names(cfg)]
