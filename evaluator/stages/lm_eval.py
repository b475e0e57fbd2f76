"""`lm-eval`: lm-evaluation-harness as an external-harness benchmark type.

    python -m evaluator.stages.lm_eval --job <job.json>

Inference lane (.venvs/inference): runs the harness on the checkpoint,

    python -m lm_eval --model hf --model_args pretrained=<checkpoint>,dtype=<dtype>[,...] --tasks <names>
        [--include_path <local task YAMLs>] --output_path <output_dir>/lm_eval --log_samples --seed <seed>
        [--num_fewshot N] [--limit sample_size] [--batch_size B] [--device D] [--apply_chat_template]

then writes predictions.jsonl (one RunResult per harness sample: the choice it picked, or the text it generated,
from --log_samples) and run_metadata.json last, naming the harness's results file.
Evaluation lane (.venvs/evaluation, which has no lm-eval): converts that results JSON into metrics.json.

Benchmark config (docs/gpt_eval_lm_eval.md):
    type: lm-eval
    dataset: tasks/                  # optional: folder of local task YAMLs (--include_path), relative to the config
    options:
      tasks: [my_mc]                 # required: task or group names
      include_path: tasks/           # instead of dataset:; relative to the config file's folder
      num_fewshot: 0
      model_args: {dtype: float32}   # more --model_args (pretrained is the checkpoint)
      apply_chat_template: false
      extra_args: ["--trust_remote_code"]
    batch_size: 8                    # --batch_size (default 1: no padding, the numbers match an unbatched run)
    sample_size: 100                 # --limit
    backend_options: {device: cpu}   # --device (default cuda when available)

metrics.json from the harness's `results`: each metric as lm-eval names it, the filter dropped when it is
"none" ("acc,none" -> acc) and joined with "_" otherwise ("exact_match,strict-match" -> exact_match_strict-match),
its "<metric>_stderr,<filter>" as stderr. One task (or one group, which the harness aggregates itself): its
numbers as they are, a group's subtasks in per_category. Several: per task in per_category, and each metric
they all share averaged weighted by the tasks' sample counts (n = the sum), stderr sqrt(sum((n_i/n)^2 se_i^2)).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Optional

from evaluator.common.atomic import read_json, write_json_atomic
from evaluator.common.contracts import PREDICTIONS, RUN_METADATA, StageJob
from evaluator.common.errors import EvaluatorError
from evaluator.stages.checkpoint_compat import CheckpointFormatError, checkpoint_view
from evaluator.stages.common import metrics_header, stage_log, stage_main, write_metrics
from evaluator.common.records import RunResult, write_results

HARNESS_DIR = "lm_eval"  # under the output dir: the harness's own output (results_*.json, samples_*.jsonl)
OPTIONS = ("tasks", "include_path", "num_fewshot", "model_args", "apply_chat_template", "extra_args")


log = stage_log("lm-eval")


# ---------------------------------------------------------------------------------------------------------------
# the command line

def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def harness_args(job: StageJob, device: Optional[str], model: Optional[str] = None) -> list[str]:
    """The lm_eval command-line arguments for a job (raises EvaluatorError on a bad benchmark spec); `model`: the
    folder to load instead of job.checkpoint (a translated view of it, checkpoint_compat)."""
    bench = job.benchmark
    options = dict(bench.get("options") or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise EvaluatorError(f"benchmark {bench.get('name')!r}: options: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(OPTIONS)})")
    tasks = options.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise EvaluatorError(f"benchmark {bench.get('name')!r}: options.tasks: expected a list of lm-eval task names")
    model_args = {"pretrained": model or job.checkpoint, "dtype": "auto"}
    extra = options.get("model_args") or {}
    if not isinstance(extra, dict):
        raise EvaluatorError("options.model_args: expected a mapping, e.g. {dtype: float32}")
    model_args.update({str(k): v for k, v in extra.items()})
    args = ["--model", "hf", "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", ",".join(tasks), "--output_path", os.path.join(job.output_dir, HARNESS_DIR), "--log_samples",
            "--seed", str(job.seed), "--batch_size", str(bench.get("batch_size") or 1)]
    include = options.get("include_path") or bench.get("dataset")
    if include:
        include = _resolve(str(include), job.extra.get("config_dir") or os.getcwd())
        if not os.path.isdir(include):
            raise EvaluatorError(f"benchmark {bench.get('name')!r}: include_path: no such directory: {include}")
        args += ["--include_path", include]
    if options.get("num_fewshot") is not None:
        args += ["--num_fewshot", str(int(options["num_fewshot"]))]
    if bench.get("sample_size"):
        args += ["--limit", str(int(bench["sample_size"]))]
    if device:
        args += ["--device", device]
    if options.get("apply_chat_template"):
        args.append("--apply_chat_template")
    args += [str(a) for a in options.get("extra_args") or []]
    return args


# ---------------------------------------------------------------------------------------------------------------
# running the harness (in the inference venv)

def _device(bench: dict) -> Optional[str]:
    device = (bench.get("backend_options") or {}).get("device")
    if device:
        return str(device)
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


def harness_files(out_dir: str) -> tuple[Optional[str], list[str]]:
    """(newest results_*.json, its samples_*.jsonl files) under <out_dir>/lm_eval."""
    results = sorted(glob.glob(os.path.join(out_dir, HARNESS_DIR, "**", "results_*.json"), recursive=True),
                     key=os.path.getmtime)
    if not results:
        return None, []
    newest = results[-1]
    stamp = os.path.basename(newest)[len("results_"):-len(".json")]
    samples = sorted(glob.glob(os.path.join(os.path.dirname(newest), f"samples_*_{stamp}.jsonl")))
    return newest, samples


def _float(x) -> Optional[float]:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sample_records(samples_path: str, dataset_id: str, run_config: dict) -> list[RunResult]:
    """RunResult rows from one --log_samples file: a multiple-choice sample's response is the continuation with the
    highest log-likelihood (lm-eval's `acc` pick), a generation sample's the filtered text."""
    task = os.path.basename(samples_path)[len("samples_"):].rsplit("_", 1)[0]
    out = []
    with open(samples_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            doc = row.get("doc") or {}
            ident = doc.get("id") if isinstance(doc, dict) and isinstance(doc.get("id"), (str, int)) else row.get("doc_id")
            raw_args = row.get("arguments") or []
            if isinstance(raw_args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
                raw_args = [a for _, a in sorted(raw_args.items(), key=lambda kv: int(re.sub(r"\D", "", kv[0]) or 0))]
            args = list(raw_args)
            context = args[0].get("arg_0", "") if args and isinstance(args[0], dict) else (args[0][0] if args else "")
            resps = row.get("filtered_resps") or []
            response: dict = {"text": "", "usage": {}}
            pairs = [r for r in resps if isinstance(r, (list, tuple)) and len(r) == 2]
            if pairs and len(pairs) == len(resps) and len(args) == len(resps):
                logprobs = [_float(r[0]) for r in pairs]
                best = max(range(len(logprobs)), key=lambda k: logprobs[k] if logprobs[k] is not None else -math.inf)
                choice = args[best].get("arg_1", "") if isinstance(args[best], dict) else args[best][1]
                response.update(text=str(choice).strip(), choice_logprobs=logprobs)
            elif resps:
                first = resps[0]
                response["text"] = first if isinstance(first, str) else json.dumps(first)
            response["lm_eval_metrics"] = {m: row[m] for m in row.get("metrics") or [] if m in row}
            out.append(RunResult(sample_id=f"{task}/{ident}", dataset_id=dataset_id, backend="lm-eval",
                                 run_config=run_config, request_messages=[{"role": "user", "content": context}],
                                 response=response))
    return out


def run_inference(job: StageJob) -> int:
    bench = job.benchmark
    started = time.time()
    try:
        args = harness_args(job, _device(bench))
    except EvaluatorError as e:
        log(f"error: {e}")
        return 2
    try:
        import lm_eval
        version = lm_eval.__version__
    except ImportError:
        log(f"error: lm-eval is not installed in {sys.prefix} (the inference venv; thirdparty/envs/inference.in)")
        return 2
    try:  # the harness loads the checkpoint with this venv's transformers: a translated view, or a refusal
        source = checkpoint_view(job.checkpoint, log=log)
    except CheckpointFormatError as e:
        log(f"error: {e}")
        return 2
    if source != job.checkpoint:
        args = harness_args(job, _device(bench), source)
    harness_out = os.path.join(job.output_dir, HARNESS_DIR)
    if os.path.isdir(harness_out):  # an earlier attempt's results must not be taken for this one's
        shutil.rmtree(harness_out)
    cmd = [sys.executable, "-m", "lm_eval", *args]
    log(f"lm-eval {version}: python -m lm_eval {' '.join(args)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [_repo_root(), os.environ.get("PYTHONPATH")] if p))
    code = subprocess.call(cmd, cwd=job.output_dir, env=env)
    if code != 0:
        log(f"error: lm-eval exited {code}")
        return 1 if code != 75 else 75
    results, samples = harness_files(job.output_dir)
    if results is None:
        log(f"error: lm-eval exited 0 but wrote no results_*.json under {harness_out}")
        return 1
    run_config = {"model": job.checkpoint, "backend": "lm-eval", "seed": job.seed, "args": args}
    records = [r for path in samples for r in sample_records(path, bench.get("name") or "lm-eval", run_config)]
    write_results(os.path.join(job.output_dir, PREDICTIONS), records)
    meta = {"model": job.checkpoint, "checkpoint": job.checkpoint, "run": job.run, "iteration": job.iteration,
            "tokens_b": job.tokens_b, "benchmark": bench.get("name"), "benchmark_type": "lm-eval",
            "backend": "lm-eval", "seed": job.seed, "attempt": job.attempt, "n": len(records), "n_ok": len(records),
            "n_error": 0, "lm_eval": {"version": version, "args": args, "results_file": results,
                                      "samples_files": samples},
            "timings": {"total_s": round(time.time() - started, 3)}, "started_at": started, "finished_at": time.time()}
    write_json_atomic(os.path.join(job.output_dir, RUN_METADATA), meta)  # last: the daemon's done marker
    log(f"done: {len(records)} samples in {time.time() - started:.1f}s; results {results}")
    return 0


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------------------------
# results JSON -> metrics.json (in the evaluation venv; pure Python)

def metric_name(key: str) -> Optional[tuple[str, bool]]:
    """'acc,none' -> ('acc', False); 'acc_stderr,none' -> ('acc', True); 'alias' -> None."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    is_stderr = metric.endswith("_stderr")
    if is_stderr:
        metric = metric[: -len("_stderr")]
    return (metric if filt == "none" else f"{metric}_{filt}"), is_stderr


def task_metrics(entry: dict) -> tuple[dict, dict]:
    values, errors = {}, {}
    for key, raw in entry.items():
        parsed = metric_name(key)
        value = _float(raw) if not isinstance(raw, bool) else None
        if parsed is None or value is None:
            continue  # "alias", and stderr "N/A" where the harness computed none
        name, is_stderr = parsed
        (errors if is_stderr else values)[name] = value
    return values, {k: v for k, v in errors.items() if k in values}


def convert_results(data: dict, tasks: Optional[list] = None) -> dict:
    """lm-eval's results JSON -> {n, metrics, stderr, per_category} (see the module docstring)."""
    results = data.get("results")
    if not isinstance(results, dict) or not results:
        raise EvaluatorError("lm-eval results: no 'results' object")
    groups = {g: list(subs) for g, subs in (data.get("group_subtasks") or {}).items() if subs}
    n_samples = data.get("n-samples") or {}

    def size(name: str) -> int:
        if name in groups:
            return sum(size(s) for s in groups[name])
        info = n_samples.get(name) or {}
        return int(info.get("effective", info.get("original", 0)) or 0)

    if tasks:
        requested = [t for t in tasks if t in results]
        missing = [t for t in tasks if t not in results]
        if missing:
            what = "none of the tasks" if not requested else "the task(s)"
            raise EvaluatorError(f"lm-eval results: {what} {', '.join(missing)} not in the results "
                                 f"({', '.join(results)})")
    else:
        requested = [t for t in results if not any(t in subs for subs in groups.values())]
    per_category = {}
    if len(requested) == 1:
        top = requested[0]
        metrics, stderr = task_metrics(results[top])
        n = size(top)
        for sub in groups.get(top, []):
            if sub in results:
                values, _ = task_metrics(results[sub])
                per_category[sub] = {**values, "n": size(sub)}
    else:
        parts = {t: (task_metrics(results[t]), size(t)) for t in requested}
        for t, ((values, _), n_t) in parts.items():
            per_category[t] = {**values, "n": n_t}
        n = sum(n_t for _, n_t in parts.values())
        shared = set.intersection(*(set(values) for (values, _), _ in parts.values()))
        metrics, stderr = {}, {}
        for name in sorted(shared):
            if n == 0:
                break
            metrics[name] = sum(values[name] * n_t for (values, _), n_t in parts.values()) / n
            if all(name in errs for (_, errs), _ in parts.values()):
                stderr[name] = math.sqrt(sum((n_t / n) ** 2 * errs[name] ** 2 for (_, errs), n_t in parts.values()))
    if not metrics:
        raise EvaluatorError(f"lm-eval results: no numeric metric for {', '.join(requested)}")
    return {"n": n, "metrics": metrics, "stderr": stderr, "per_category": per_category}


def run_evaluation(job: StageJob) -> int:
    meta_path = os.path.join(job.output_dir, RUN_METADATA)
    try:
        meta = read_json(meta_path)
        results_file = meta["lm_eval"]["results_file"]
        data = read_json(results_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"error: cannot read the harness results named by {meta_path}: {type(e).__name__}: {e}")
        return 2
    tasks = (job.benchmark.get("options") or {}).get("tasks")
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
    try:
        converted = convert_results(data, tasks)
    except EvaluatorError as e:
        log(f"error: {results_file}: {e}")
        return 2
    doc = {**metrics_header(job, "lm-eval"), "n_error": 0, **converted, "unavailable": {},
           "versions": {"lm-eval": data.get("lm_eval_version"), "transformers": data.get("transformers_version")},
           "lm_eval": {"results_file": results_file, "n-shot": data.get("n-shot"), "versions": data.get("versions"),
                       "higher_is_better": data.get("higher_is_better")}}
    return write_metrics(job, doc, log)


def main(argv=None) -> int:
    return stage_main(__doc__.splitlines()[0], run_inference, run_evaluation, argv)


if __name__ == "__main__":
    sys.exit(main())
