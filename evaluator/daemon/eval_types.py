"""`--eval-type gpt|helm`: Data-Juicer's two evaluations, built from its config sections as one benchmark.

- gpt:  `gpt_evaluation:` -> a `gpt_eval` benchmark (native inference answers the questions, the llm_judge
        metric reviews them against the baseline answers). Keys: question_file, baseline_file, prompt_file,
        reviewer_file (paths against the config file's folder); openai_api_key / openai_organization for the judge;
        base_url (ours: any OpenAI-compatible endpoint); worker_num / max_retry (Data-Juicer's gpt_evaluator
        flags). Answers are generated with up to megatron.max_tokens new tokens (Data-Juicer's knob, default 512).
        answer_file / result_file are not used: each checkpoint's predictions.jsonl and judge_reviews.jsonl in its
        result directory take their place.
- helm: `helm:` -> a `helm` benchmark (evaluator/stages/helm.py runs helm-run from helm_env_name with
        helm_spec_template_path into helm_output_path, then converts HELM's stats.json into metrics.json).

The benchmark replaces the configured `benchmarks:` for this run of the daemon, as Data-Juicer's --eval-type picks
one evaluation; watch.paths[].benchmarks filters do not apply to it. The judge's API key travels to the
evaluation stage in the environment (JUDGE_API_KEY_ENV), never in a job file.
"""
from __future__ import annotations

import os
from typing import Optional

from evaluator.common.errors import EvaluatorError
from evaluator.daemon.config import AutoEvalConfig, BenchmarkConfig

JUDGE_API_KEY_ENV = "EVALUATOR_JUDGE_API_KEY"
GPT_BENCHMARK = "gpt_eval"
HELM_BENCHMARK = "helm"
DEFAULT_MAX_TOKENS = 512
REVIEWS_FILE = "judge_reviews.jsonl"


def _path(cfg: AutoEvalConfig, section: str, key: str, value: Optional[str], required: bool) -> Optional[str]:
    if not value:
        if required:
            raise EvaluatorError(f"--eval-type: auto_eval.{section}.{key} is required (Data-Juicer's default files "
                                 "are not shipped; point it at your file)")
        return None
    path = os.path.normpath(os.path.join(cfg.config_dir, os.path.expanduser(value)))
    if not os.path.exists(path):
        raise EvaluatorError(f"auto_eval.{section}.{key}: no such file: {path}")
    return path


def gpt_benchmark(cfg: AutoEvalConfig) -> BenchmarkConfig:
    g = cfg.gpt_evaluation
    if g is None:
        raise EvaluatorError("--eval-type gpt: the config has no auto_eval.gpt_evaluation: section (question_file, "
                             "baseline_file, prompt_file, reviewer_file; see docs/gpt_eval_lm_eval.md)")
    files = {key: _path(cfg, "gpt_evaluation", key, getattr(g, key), key in ("question_file", "baseline_file"))
             for key in ("question_file", "baseline_file", "prompt_file", "reviewer_file")}
    judge: dict = {"reviews_file": REVIEWS_FILE, "max_concurrency": g.worker_num, "max_retries": g.max_retry}
    if g.base_url:
        judge["base_url"] = g.base_url
    if g.openai_organization:
        judge["organization"] = g.openai_organization
    if g.openai_api_key is not None:
        os.environ[JUDGE_API_KEY_ENV] = g.openai_api_key.get_secret_value()  # inherited by the stages
        judge["api_key_env"] = JUDGE_API_KEY_ENV
    max_tokens = cfg.megatron.max_tokens if cfg.megatron else DEFAULT_MAX_TOKENS
    return BenchmarkConfig(
        name=GPT_BENCHMARK, type="gpt_eval", dataset=files["question_file"],
        options={k: v for k, v in files.items() if v and k != "question_file"},
        generation={"max_new_tokens": max_tokens}, metrics=["llm_judge"], metric_options={"llm_judge": judge},
        main_metric="win_rate")


def helm_benchmark(cfg: AutoEvalConfig) -> BenchmarkConfig:
    h = cfg.helm
    if h is None:
        raise EvaluatorError("--eval-type helm: the config has no auto_eval.helm: section (helm_spec_template_path, "
                             "helm_output_path, helm_env_name; see docs/gpt_eval_lm_eval.md)")
    template = _path(cfg, "helm", "helm_spec_template_path", h.helm_spec_template_path, True)
    output = os.path.normpath(os.path.join(cfg.config_dir, os.path.expanduser(h.helm_output_path))) \
        if h.helm_output_path else None
    options = {"spec_template": template, "output_path": output, "env": h.helm_env_name,
               "eval_instances": h.eval_instances, "suite_prefix": f"{cfg.project_name}-{cfg.model_name}"}
    return BenchmarkConfig(name=HELM_BENCHMARK, type="helm", options={k: v for k, v in options.items() if v})


def apply_eval_type(cfg: AutoEvalConfig, eval_type: str) -> None:
    """Replace the configured benchmarks with Data-Juicer's `gpt` or `helm` evaluation (no-op for `native`)."""
    if eval_type == "native":
        return
    if eval_type == "gpt":
        bench = gpt_benchmark(cfg)
    elif eval_type == "helm":
        bench = helm_benchmark(cfg)
    else:
        raise EvaluatorError(f"--eval-type: expected native, gpt or helm, got {eval_type!r}")
    cfg.benchmarks = [bench]
    for path in cfg.watch.paths:
        path.benchmarks = None
