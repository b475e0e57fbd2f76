"""`helm`: Stanford CRFM HELM as an external-harness benchmark type (Data-Juicer's `--eval-type helm`).

    python -m evaluator.stages.helm --job <job.json>

Inference lane: runs HELM from its own environment (crfm-helm pins conflict with both stage venvs):

    <env>/bin/helm-run --conf-paths <output_dir>/helm_spec.conf --suite <suite> -m <eval_instances> -n <threads>
        -o <output_path> --local-path <output_dir>/helm_cache --enable-local-huggingface-models <model link>
    <env>/bin/helm-summarize --suite <suite> -o <output_path>          (best effort: for `wandb_writer --source helm`)

- The spec is spec_template with every `<model>` replaced by the model name, as Data-Juicer does. HELM names a
  local Hugging Face model `huggingface/<folder name>`, so the checkpoint is linked as
  <output_dir>/helm_model/<run>_<iteration> and the model is `huggingface/<run>_<iteration>`: all checkpoints
  share one suite (Data-Juicer's `<project_name>-<model_name>`), their runs differ by model, and the recorder's
  HELM source reads the iteration after the last `_`.
- env (helm.helm_env_name): a virtualenv/conda prefix directory holding bin/helm-run, or a conda env name looked
  up with `conda env list`. No helm-run there is a clear error (exit 2), not a retry loop.
- The checkpoint must be a Hugging Face model folder (config.json); convert Megatron checkpoints first.
Evaluation lane: HELM's per-run `<output_path>/runs/<suite>/<run>/stats.json` -> metrics.json (convert_stats).

options: spec_template (required), output_path (default <output_dir>/benchmark_output), env (default crfm-helm),
eval_instances (100), num_threads (1), suite_prefix (default the run name), metrics (HELM stat names to keep;
default HEADLINE_STATS), extra_args.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

from evaluator.common.atomic import read_json, write_json_atomic, write_text_atomic
from evaluator.common.contracts import RUN_METADATA, StageJob
from evaluator.common.errors import EvaluatorError
from evaluator.stages.checkpoint_compat import CheckpointFormatError, checkpoint_view, installed_in
from evaluator.stages.common import metrics_header, stage_log, stage_main, write_metrics

OPTIONS = ("spec_template", "output_path", "env", "eval_instances", "num_threads", "suite_prefix", "metrics",
           "extra_args")
DEFAULT_ENV = "crfm-helm"
# HELM's accuracy-type stats (the headline of its scenarios); bookkeeping stats (num_*, runtime, logprob) are left out
HEADLINE_STATS = ("exact_match", "quasi_exact_match", "prefix_exact_match", "quasi_prefix_exact_match", "f1_score",
                  "rouge_1", "rouge_2", "rouge_l", "bleu_1", "bleu_4", "math_equiv", "math_equiv_chain_of_thought",
                  "NDCG@10", "RR@10", "equivalent", "exact_match@5", "quasi_exact_match@5")
SPLITS = ("test", "valid")


log = stage_log("helm")


def _options(job: StageJob) -> dict:
    options = dict(job.benchmark.get("options") or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise EvaluatorError(f"benchmark {job.benchmark.get('name')!r}: options: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(OPTIONS)})")
    return options


def _resolve(path: str, job: StageJob) -> str:
    path = os.path.expanduser(str(path))
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(job.extra.get("config_dir") or os.getcwd(), path))


# ---------------------------------------------------------------------------------------------------------------
# finding HELM

def _conda_env_prefix(name: str) -> Optional[str]:
    conda = os.environ.get("CONDA_EXE") or shutil.which("conda")
    if not conda:
        return None
    try:
        out = subprocess.run([conda, "env", "list", "--json"], capture_output=True, text=True, timeout=60)
        envs = json.loads(out.stdout).get("envs", []) if out.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return next((e for e in envs if os.path.basename(e.rstrip("/")) == name), None)


def find_helm_tool(env: str, tool: str = "helm-run") -> str:
    """The `tool` script of the HELM environment `env` (a prefix directory or a conda env name)."""
    looked = []
    prefixes = []
    expanded = os.path.expanduser(env)
    if os.sep in env or os.path.isdir(expanded):
        prefixes.append(os.path.abspath(expanded))
    else:
        prefix = _conda_env_prefix(env)
        if prefix:
            prefixes.append(prefix)
        elif os.environ.get("CONDA_EXE") or shutil.which("conda"):
            looked.append(f"conda env {env!r}: not listed by `conda env list`")
        else:
            looked.append(f"conda env {env!r}: conda is not on PATH")
    for prefix in prefixes:
        path = os.path.join(prefix, "bin", tool)
        if os.access(path, os.X_OK):
            return path
        looked.append(path)
    raise EvaluatorError(f"helm: {tool} not found in the HELM environment {env!r} (looked at: {'; '.join(looked)}). "
                         "Install HELM there (`pip install crfm-helm`, see thirdparty/README.md) and point "
                         "helm.helm_env_name (or the benchmark's options.env) at its prefix directory or conda env name")


# ---------------------------------------------------------------------------------------------------------------
# running it (inference lane)

def script_interpreter(script: str) -> Optional[str]:
    """The python a console script runs with (its #! line), or None when it names none (a shell wrapper)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    parts = first[2:].split() if first.startswith("#!") else []
    if parts and os.path.basename(parts[0]) == "env" and len(parts) > 1:
        parts = [shutil.which(parts[1]) or parts[1]]
    return parts[0] if parts and os.path.basename(parts[0]).startswith("python") else None


def model_name(job: StageJob) -> str:
    return f"huggingface/{job.run}_{job.iteration}"


def run_inference(job: StageJob) -> int:
    started = time.time()
    try:
        options = _options(job)
        if not options.get("spec_template"):
            raise EvaluatorError("helm: options.spec_template (helm.helm_spec_template_path) is required")
        template = _resolve(options["spec_template"], job)
        if not os.path.isfile(template):
            raise EvaluatorError(f"helm: spec template not found: {template}")
        if not os.path.isfile(os.path.join(job.checkpoint, "config.json")):
            raise EvaluatorError(f"helm: {job.checkpoint} is not a Hugging Face model folder (no config.json); "
                                 "HELM runs local Hugging Face models, so convert the checkpoint first")
        helm_run = find_helm_tool(str(options.get("env") or DEFAULT_ENV))
    except EvaluatorError as e:
        log(f"error: {e}")
        return 2
    # HELM loads the checkpoint with its own environment's transformers (crfm-helm pins 4.x): it gets the
    # checkpoint, a translated view of it, or nothing (checkpoint_compat); asked of helm-run's interpreter
    python = script_interpreter(helm_run)
    if python is None:
        log(f"warning: {helm_run} names no python interpreter, so whether HELM's transformers reads "
            f"{job.checkpoint} faithfully (issue 16: rope_parameters under transformers 4.x) is not checked")
        source = job.checkpoint
    else:
        try:
            source = checkpoint_view(job.checkpoint, installed_in(python, job.checkpoint), log=log)
        except CheckpointFormatError as e:
            log(f"error: {e}")
            return 2
    output_path = _resolve(options["output_path"], job) if options.get("output_path") \
        else os.path.join(job.output_dir, "benchmark_output")
    suite = str(options.get("suite_prefix") or job.run)
    model = model_name(job)
    link_dir = os.path.join(job.output_dir, "helm_model")
    link = os.path.join(link_dir, model.split("/", 1)[1])
    os.makedirs(link_dir, exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.abspath(source), link)
    with open(template, encoding="utf-8") as f:
        spec = f.read().replace("<model>", model)
    spec_path = os.path.join(job.output_dir, "helm_spec.conf")
    write_text_atomic(spec_path, spec)
    cache = os.path.join(job.output_dir, "helm_cache")
    shutil.rmtree(cache, ignore_errors=True)  # Data-Juicer starts each checkpoint with a fresh cache too
    cmd = [helm_run, "--conf-paths", spec_path, "--suite", suite, "-m", str(int(options.get("eval_instances", 100))),
           "-n", str(int(options.get("num_threads", 1))), "-o", output_path, "--local-path", cache,
           "--enable-local-huggingface-models", link, *[str(a) for a in options.get("extra_args") or []]]
    log(" ".join(cmd))
    code = subprocess.call(cmd, cwd=job.output_dir)
    if code != 0:
        log(f"error: helm-run exited {code}")
        return 1
    try:
        summarize = find_helm_tool(str(options.get("env") or DEFAULT_ENV), "helm-summarize")
        if subprocess.call([summarize, "--suite", suite, "-o", output_path], cwd=job.output_dir) != 0:
            log("warning: helm-summarize failed; metrics.json does not need it (wandb_writer --source helm does)")
    except EvaluatorError as e:
        log(f"warning: {e}")
    runs = model_runs(output_path, suite, model)
    if not runs:
        log(f"error: helm-run exited 0 but {os.path.join(output_path, 'runs', suite)} has no run for {model}")
        return 1
    meta = {"model": model, "checkpoint": job.checkpoint, "run": job.run, "iteration": job.iteration,
            "tokens_b": job.tokens_b, "benchmark": job.benchmark.get("name"), "benchmark_type": "helm",
            "backend": "helm", "seed": job.seed, "attempt": job.attempt,
            "helm": {"helm_run": helm_run, "suite": suite, "output_path": output_path, "spec": spec_path,
                     "runs": runs, "command": cmd},
            "timings": {"total_s": round(time.time() - started, 3)}, "started_at": started, "finished_at": time.time()}
    write_json_atomic(os.path.join(job.output_dir, RUN_METADATA), meta)  # last: the daemon's done marker
    log(f"done: {len(runs)} HELM run(s) for {model} in suite {suite}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# stats.json -> metrics.json (evaluation lane; pure Python)

def model_runs(output_path: str, suite: str, model: str) -> list[str]:
    """The run folders of `suite` that ran `model` (by run_spec.json's adapter_spec, else the folder name)."""
    out = []
    for run_dir in sorted(glob.glob(os.path.join(output_path, "runs", suite, "*", ""))):
        run_dir = run_dir.rstrip(os.sep)
        if not os.path.isfile(os.path.join(run_dir, "stats.json")):
            continue
        spec_model = None
        try:
            adapter = read_json(os.path.join(run_dir, "run_spec.json")).get("adapter_spec") or {}
            spec_model = adapter.get("model_deployment") or adapter.get("model")
        except (OSError, ValueError, AttributeError):
            pass
        if spec_model == model or (spec_model is None and f"model={model.replace('/', '_')}" in os.path.basename(run_dir)):
            out.append(run_dir)
    return out


def _stderr(stat: dict) -> Optional[float]:
    """HELM's variance is the population one; our stderr is the sample std (ddof=1) / sqrt(n)."""
    n, var = stat.get("count") or 0, stat.get("variance")
    if n < 2 or not isinstance(var, (int, float)):
        return None
    return math.sqrt(max(var, 0.0) * n / (n - 1) / n)


def run_stats(path: str, keep: tuple) -> dict[str, dict]:
    """{stat name: {"mean", "count", "stderr"}} of one stats.json: the test split (else valid), unperturbed and
    not split further (sub_split), names in `keep`."""
    try:
        stats = read_json(path)
    except ValueError as e:
        raise EvaluatorError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(stats, list):
        raise EvaluatorError(f"{path}: expected HELM's list of stats, got {type(stats).__name__}")
    plain = [s for s in stats if isinstance(s, dict) and isinstance(s.get("name"), dict)
             and "perturbation" not in s["name"] and "sub_split" not in s["name"]]
    split = next((sp for sp in SPLITS if any(s["name"].get("split") == sp for s in plain)), None)
    out = {}
    for s in plain:
        name = s["name"].get("name")
        mean = s.get("mean")
        if s["name"].get("split") != split or name not in keep or isinstance(mean, bool) \
                or not isinstance(mean, (int, float)) or not s.get("count"):
            continue
        out[name] = {"mean": float(mean), "count": int(s["count"]), "stderr": _stderr(s)}
    return out


def convert_stats(run_dirs: list[str], keep: tuple = HEADLINE_STATS) -> dict:
    """HELM runs -> {n, metrics, stderr, per_category}: per run in per_category (keyed by the run's name), and
    `<scenario>.<stat>` = the mean over the scenario's runs (HELM's own group aggregate), stderr
    sqrt(sum(se^2)) / k over its k runs."""
    per_category, by_scenario, n = {}, {}, 0
    for run_dir in run_dirs:
        name = os.path.basename(run_dir)
        stats = run_stats(os.path.join(run_dir, "stats.json"), keep)
        if not stats:
            continue
        count = max(s["count"] for s in stats.values())
        n += count
        per_category[name] = {**{k: s["mean"] for k, s in stats.items()}, "n": count}
        scenario = name.split(":", 1)[0]
        for stat, s in stats.items():
            by_scenario.setdefault((scenario, stat), []).append(s)
    if not by_scenario:
        raise EvaluatorError(f"no HELM stat among {', '.join(keep)} in {len(run_dirs)} run(s) "
                             f"({', '.join(os.path.basename(r) for r in run_dirs)}); set options.metrics")
    metrics, stderr = {}, {}
    for (scenario, stat), items in sorted(by_scenario.items()):
        key = f"{scenario}.{stat}"
        metrics[key] = math.fsum(s["mean"] for s in items) / len(items)
        if all(s["stderr"] is not None for s in items):
            stderr[key] = math.sqrt(math.fsum(s["stderr"] ** 2 for s in items)) / len(items)
    return {"n": n, "metrics": metrics, "stderr": stderr, "per_category": per_category}


def run_evaluation(job: StageJob) -> int:
    meta_path = os.path.join(job.output_dir, RUN_METADATA)
    try:
        options = _options(job)
        meta = read_json(meta_path)["helm"]
        runs = model_runs(meta["output_path"], meta["suite"], model_name(job)) or meta["runs"]
        keep = tuple(options.get("metrics") or HEADLINE_STATS)
        converted = convert_stats(runs, keep)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"error: cannot read the HELM runs named by {meta_path}: {type(e).__name__}: {e}")
        return 2
    except EvaluatorError as e:
        log(f"error: {e}")
        return 2
    doc = {**metrics_header(job, "helm"), "n_error": 0, **converted, "unavailable": {}, "versions": {},
           "helm": {"suite": meta["suite"], "output_path": meta["output_path"], "runs": runs}}
    return write_metrics(job, doc, log)


def main(argv=None) -> int:
    return stage_main(__doc__.splitlines()[0], run_inference, run_evaluation, argv)


if __name__ == "__main__":
    sys.exit(main())
