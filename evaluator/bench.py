"""One-off runs: `tools/bench.py make-dataset | inference | eval | run | list` (lalm_bench style).

    tools/bench.py inference <benchmark|dataset-dir>... --model PATH|ALIAS [--backend hf|vllm|openai]
        [--dataset PATH] [--output-root DIR] [--sample-size N] [--batch-size N] [--param k=v]... [--backend-opt k=v]...
    tools/bench.py eval <benchmark|dataset-dir> --predictions FILE [--metrics a,b] [--output-root DIR]
    tools/bench.py run <benchmark|dataset-dir>... --model PATH ...     (inference, then evaluation)

Outputs go to <output-root>/<model-name>/<benchmark>/ (predictions.jsonl, run_metadata.json, metrics.json,
result_<benchmark>.txt, infer|eval.stderr.log). Each stage runs in its own venv (.venvs/inference,
.venvs/evaluation) whichever python started this, through the same job-spec files the daemon writes. Several
benchmarks share one warm worker (evaluator/stages/worker.py) per stage: the model loads once for all of them,
then the evaluation libraries once; each benchmark keeps its own folder, log and exit code, and one failing
does not stop the others. Relative paths (and the default outputs/) resolve against the current directory.
Standard library only.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from evaluator.benchmarks import registry
from evaluator.benchmarks.dataset import ColumnMap, make_dataset, rows_to_samples
from evaluator.common.atomic import read_json, write_text_atomic
from evaluator.common.checks import folder_name_problem, run_name_problem
from evaluator.common.contracts import (EVALUATION, INFERENCE, JOB_FILE, LOG_FILE, METRICS, PREDICTIONS,
                                        WARM_STAGE_MODULES, StageJob)
from evaluator.common.errors import EvaluatorError
from evaluator.common.scale import PAPER_SCALE, scale_note, scaled
from evaluator.common.secrets import is_secret
from evaluator.daemon.stages import BENCHMARK_TYPES  # a plain table: no daemon machinery is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_module(stage: str, kind: str) -> str:
    """The module the daemon would run for this benchmark type (evaluator/daemon/stages.py)."""
    btype = BENCHMARK_TYPES[kind]
    return btype.inference_module if stage == INFERENCE else btype.evaluation_module


def user_path(path: Optional[str]) -> Optional[str]:
    """A path the user typed, absolute: relative to the current directory, as any command-line tool reads it."""
    if path is None:
        return None
    return os.path.abspath(os.path.expanduser(path))


def venv_python(stage: str) -> str:
    env = "inference" if stage == INFERENCE else "evaluation"
    override = os.environ.get(f"EVALUATOR_{env.upper()}_PYTHON")
    python = override or os.path.join(ROOT, ".venvs", env, "bin", "python")
    if not os.path.exists(python):
        raise EvaluatorError(f"{python}: the {env} venv is missing; run `make setup` first")
    return python


def model_name_of(model: str) -> str:
    """outputs/<model-name>/: the checkpoint folder's name, with its parent for trainer-style checkpoint-N."""
    if not os.path.exists(model):
        return model.replace("/", "_")
    path = os.path.abspath(model).rstrip("/")
    base = os.path.basename(path)
    if base.startswith(("checkpoint-", "iter_", "global_step")):
        return f"{os.path.basename(os.path.dirname(path))}_{base}"
    return base


def benchmark_spec(args, target: str) -> dict:
    """The benchmark mapping the stages get for `target` (a name or dataset directory), as a config
    `benchmarks:` entry would give it."""
    if target in BENCHMARK_TYPES and target not in registry.BENCHMARKS and target != "command":
        kind, source = target, None  # an external harness (lm-eval, helm): --dataset names its tasks/spec
    else:
        if target not in registry.BENCHMARKS:
            target = user_path(target)
        kind, source = registry.kind_for(target)
    if args.dataset:
        source = user_path(args.dataset)
    if args.name is not None and folder_name_problem(args.name):
        raise EvaluatorError(f"--name: {folder_name_problem(args.name)}")
    if getattr(args, "model_name", None) is not None and run_name_problem(args.model_name):
        raise EvaluatorError(f"--model-name: {run_name_problem(args.model_name)}")
    name = args.name or (os.path.basename(os.path.abspath(source)) if kind == "dataset" else kind)
    from evaluator.stages.inference.params import parse_kv  # stdlib-only module
    spec = {"name": name, "type": kind, "dataset": source, "options": parse_kv(args.option, "--option")}
    if getattr(args, "model", None) is not None:
        spec.update(backend=args.backend, generation=parse_kv(args.param, "--param"),
                    backend_options=parse_kv(args.backend_opt, "--backend-opt"), sample_size=args.sample_size,
                    batch_size=args.batch_size, max_error_rate=args.max_error_rate)
        # the daemon's config checks, before any stage starts (a typo fails here, not in every sample)
        from evaluator.stages.inference import backends, params

        problems = [f"--param {k}: {m}" for k, m in params.generation_problems(spec["generation"], args.backend)]
        if args.backend in backends.BACKENDS:  # credentials: the secret policy in stage_environment says what to do
            plain = {k: v for k, v in spec["backend_options"].items() if k != "api_key" and not is_secret(k)}
            problems += [f"--backend-opt {k}: {m}" for k, m in backends.option_problems(args.backend, plain)]
        if problems:
            raise EvaluatorError("; ".join(problems))
    if getattr(args, "metrics", None) is not None:
        spec["metrics"] = metric_names(args.metrics, "--metrics")
    if getattr(args, "sample_size", None) is not None:
        spec["sample_size"] = args.sample_size
    return spec


def stage_environment(job: StageJob) -> dict:
    """The environment a stage runs `job` in (its own process or a warm worker). An `api_key` given with
    --backend-opt travels here and is taken out of the job's benchmark, never written into the job spec file;
    any other option named like a secret is refused."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    options = job.benchmark.get("backend_options") or {}
    if "api_key" in options:
        env["OPENAI_API_KEY"] = str(options["api_key"])
        options = {k: v for k, v in options.items() if k != "api_key"}
        job.benchmark = {**job.benchmark, "backend_options": options}
    secrets = [k for k in options if is_secret(k)]
    if secrets:  # the one secret policy: nothing named like a credential is written into a job spec
        raise EvaluatorError(f"--backend-opt {secrets[0]}=...: a secret does not go into the job spec; export it "
                             f"and pass --backend-opt {secrets[0]}_env=VARIABLE_NAME (or api_key=... for the "
                             f"OpenAI key, which travels in the stage's environment)")
    return env


def exit_code(returncode: int) -> int:
    """A child's returncode as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_process(cmd: list, log_path: str, env: dict) -> int:
    """One stage process; its output goes to the terminal and to the stage log."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stderr.write(line)
        return exit_code(proc.wait())


class StageWorker:
    """A warm stage worker (evaluator/stages/worker.py) in one stage venv, started on the first job: `run` hands
    it a job, shows the job's log on the terminal as the worker writes it, and returns the job's exit code.

    The worker exits after a failed job (and may die mid-job); the next `run` then starts a fresh one. A job
    needing another environment also gets a fresh one. The worker is in this process's group (Ctrl-C reaches
    it) and dies with it (PR_SET_PDEATHSIG)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.proc: Optional[subprocess.Popen] = None
        self.env: Optional[dict] = None

    def __enter__(self) -> "StageWorker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)

    def run(self, module: str, job_path: str, log_path: str, env: dict) -> int:
        if self.proc is not None and (env != self.env or self.proc.poll() is not None):
            self.close()
        if self.proc is None:
            # stderr: the terminal (what the worker says between jobs: a crash before the first one)
            self.proc = subprocess.Popen([venv_python(self.stage), "-m", "evaluator.stages.worker"], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            self.env = env
        open(log_path, "wb").close()  # the log holds this run's job only, as a stage process's log does
        request = {"module": module, "job": job_path, "log": log_path, "cwd": ROOT,
                   "token": f"bench-{os.getpid()}:{self.stage}"}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
        except OSError:  # it died between jobs: reported below as a death mid-job
            pass
        answer = self._wait_answer(log_path)
        if answer is None:
            code = exit_code(self.proc.wait()) or 1
            print(f"bench: the {self.stage} worker (pid {self.proc.pid}) died mid-job (exit {code})", file=sys.stderr)
            self.close()
            return code
        code = int(answer["rc"])
        if code != 0:
            self.close()  # it exits by itself after a failure; wait, so its memory (a GPU's) is free again
        return code

    def _wait_answer(self, log_path: str) -> Optional[dict]:
        """Tail the job's log to stderr until the worker answers; None when it exits without an answer."""
        fd = self.proc.stdout.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        received = b""
        with open(log_path, "rb") as log:
            while b"\n" not in received:
                ready, _, _ = select.select([fd], [], [], 0.2)
                sys.stderr.write(decoder.decode(log.read()))
                sys.stderr.flush()
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        return None
                    received += chunk
            # the worker restores its fds before it answers: the log is complete
            sys.stderr.write(decoder.decode(log.read(), final=True))
            sys.stderr.flush()
        return json.loads(received.split(b"\n", 1)[0])

    def close(self, kill: bool = False) -> None:
        """End the worker: EOF and wait (it finishes its job first), or kill it now."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()
        self.proc.stdout.close()
        self.proc, self.env = None, None


@dataclass
class BenchmarkRun:
    """One benchmark of a bench.py command: where it writes and how it ended."""
    spec: dict
    out_dir: str
    predictions: str  # what its evaluation scores
    code: Optional[int] = None  # None while its stages succeed; the exit code of the stage that failed
    result: str = ""  # the file to open: its predictions or metrics, or the log of the stage that failed


def run_benchmarks(stage: str, runs: list, model: str, seed: int) -> None:
    """Run `stage` for each benchmark whose stages so far succeeded, in one warm worker per stage venv (a native
    stage loads its model or libraries once for all of them); a benchmark that fails keeps its exit code in
    `run.code`, and the benchmarks after it go on in a fresh worker. A stage no worker runs (an external
    harness) runs as its own process."""
    pending = [r for r in runs if r.code is None]
    jobs = []
    for run in pending:  # every job spec first: a refused secret stops the command before any stage starts
        job = make_job(stage, run.spec, model, run.out_dir, seed,
                       {"predictions": run.predictions} if stage == EVALUATION else None)
        env = stage_environment(job)
        make_output_dir(run.out_dir)
        job_path = os.path.join(run.out_dir, JOB_FILE[stage])
        job.write(job_path)
        jobs.append((run, job_path, env))
    with StageWorker(stage) as worker:
        for run, job_path, env in jobs:
            if stage == INFERENCE:
                print(f"bench: {run.spec['name']} ({run.spec['type']}) x {model} -> {run.out_dir}", file=sys.stderr)
            else:
                print(f"bench: {run.spec['name']}: evaluation of {run.predictions}", file=sys.stderr)
            module = stage_module(stage, run.spec["type"])
            log_path = os.path.join(run.out_dir, LOG_FILE[stage])
            if module in WARM_STAGE_MODULES:
                code = worker.run(module, job_path, log_path, env)
            else:
                code = run_process([venv_python(stage), "-m", module, "--job", job_path], log_path, env)
            if code != 0:
                print(f"bench: {run.spec['name']}: the {stage} stage exited {code}; log: {log_path}",
                      file=sys.stderr)
                run.code, run.result = code, log_path


def make_job(stage: str, spec: dict, model: str, out_dir: str, seed: int, extra: Optional[dict] = None) -> StageJob:
    return StageJob(stage=stage, run=model_name_of(model), iteration=0, checkpoint=model, benchmark=spec,
                    output_dir=out_dir, seed=seed, extra=extra or {})


def write_summary(out_dir: str, spec: dict, scale: float = 1) -> str:
    """lalm_bench's result_<benchmark>.txt: the metrics in a few readable lines beside metrics.json; values times
    `scale` (evaluator/common/scale.py), counts as they are."""
    data = read_json(os.path.join(out_dir, METRICS))
    lines = [f"benchmark: {spec['name']} ({spec['type']})", f"n: {data.get('n')}"]
    if data.get("subset"):
        lines.append(f"subset: {data['n']} of {data.get('n_full')} samples")
    lines += [f"warning: {w}" for w in data.get("warnings") or []]
    if scale_note(scale):
        lines.append(scale_note(scale))
    for name, value in sorted(data["metrics"].items()):
        se = (data.get("stderr") or {}).get(name)
        lines.append(f"{name}: {scaled(value, scale, name):.6g}"
                     + (f" (stderr {scaled(se, scale, name):.4g})" if se is not None else ""))
    for name, why in sorted((data.get("unavailable") or {}).items()):
        lines.append(f"{name}: {why}")
    for name, method in sorted((data.get("methods") or {}).items()):
        lines.append(f"method of {name}: {method}")
    for category, values in sorted((data.get("per_category") or {}).items()):
        lines.append(f"[{category}] " + ", ".join(f"{k}={scaled(v, scale, k):.4g}"
                                                  for k, v in sorted(values.items())))
    path = os.path.join(out_dir, f"result_{spec['name']}.txt")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


# make-dataset's default metrics: the first entry whose metrics every row can feed. Multiple choice is scored
# as text-mc is, a question with an answer as text-qa is (references count as more accepted answers), and
# references alone as captions, with the caption metrics that need no files beyond the pycocoevalcap wheel.
SUGGESTED_METRICS = (("choices", registry.get("text-mc").metrics), ("target", registry.get("text-qa").metrics),
                     ("references", ("bleu_4", "meteor", "rouge_l", "cider_d")))


def metric_names(text: str, flag: str) -> list:
    """`a,b` -> ["a", "b"], each a name of the metric registry (aliases such as bleu included)."""
    from evaluator.stages.evaluation.metrics import expand  # stdlib-only module
    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not names:
        raise EvaluatorError(f"{flag}: expected metric names, e.g. {flag} exact_match,token_f1")
    try:
        expand(names)
    except EvaluatorError as e:  # "metrics: unknown metric 'x'; did you mean ...": name the flag instead
        raise EvaluatorError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    return names


def metrics_problem(names, samples: list) -> Optional[str]:
    """Why the rows cannot feed these metrics (the evaluation stage's own check), or None."""
    from evaluator.stages.evaluation.metrics import MetricInput, check_inputs, expand
    n = len(samples)
    try:
        check_inputs(expand(list(names)), MetricInput(predictions=[""] * n, samples=samples, ok=[True] * n,
                                                      options={}, cache_dir=""))
    except EvaluatorError as e:
        return str(e)
    return None


def scoring_problem(spec: dict) -> Optional[str]:
    """Why a dataset benchmark's metrics cannot score its rows, or None (also when the data does not load: the
    inference stage then fails that benchmark alone, naming file:line)."""
    if spec["type"] not in registry.BENCHMARKS:
        return None
    try:
        data = registry.load_benchmark(spec["type"], spec["dataset"], spec["options"], spec.get("sample_size"))
    except EvaluatorError:
        return None
    names = spec.get("metrics") or registry.default_metrics(spec["type"], data)
    return metrics_problem(names, data.samples) if names else None


def suggested_metrics(samples: list) -> tuple[Optional[str], list]:
    """(the field they score, metric names) for the first SUGGESTED_METRICS entry these rows fit; (None, [])."""
    for field_name, names in SUGGESTED_METRICS:
        if metrics_problem(names, samples) is None:
            return field_name, list(names)
    return None, []


def cmd_make_dataset(args) -> int:
    columns = ColumnMap(id=args.id_column, prompt=args.prompt_column, target=args.target_column,
                        references=args.references_columns, choices=args.choices_columns,
                        category=args.category_column, audio=args.audio_column, system=args.system_prompt,
                        template=args.template)
    metrics = metric_names(args.metrics, "--metrics") if args.metrics is not None else None
    samples = rows_to_samples(user_path(args.input), columns)
    scored_field = None
    if metrics is None:
        scored_field, metrics = suggested_metrics(samples)
    else:
        problem = metrics_problem(metrics, samples)
        if problem:
            raise EvaluatorError(f"--metrics: {problem}")
    extra = {"metrics": metrics} if metrics else {}
    if args.task_type:
        extra["task_type"] = args.task_type
    ds = make_dataset(user_path(args.input), user_path(args.output_dir), args.dataset_id, samples, extra)
    print(f"wrote {len(ds.samples)} samples to {ds.root} (dataset_id {ds.dataset_id})")
    if scored_field:
        print(f"metrics: {', '.join(metrics)} (every row has {scored_field}; --metrics chooses others)")
    elif not metrics:
        print("bench: note: metadata.json names no metrics (not every row has a target, references or choices); "
              "a benchmark on this dataset needs `metrics:` in its config, or run again with --metrics "
              "(e.g. llm_judge)", file=sys.stderr)
    return 0


def cmd_inference(args, then_eval: bool = False) -> int:
    if len(args.benchmark) > 1:
        for flag, value in (("--dataset", args.dataset), ("--name", args.name)):
            if value is not None:
                raise EvaluatorError(f"{flag} applies to one benchmark; got {len(args.benchmark)} "
                                     f"({', '.join(args.benchmark)}): run the one it is for on its own")
    model = user_path(args.model) if os.path.exists(user_path(args.model)) else args.model  # else hub id/alias
    model_dir = os.path.join(user_path(args.output_root), args.model_name or model_name_of(model))
    runs: list = []
    for target in args.benchmark:  # every benchmark checked before a stage starts: a typo costs no model load
        spec = benchmark_spec(args, target)
        out_dir = os.path.join(model_dir, spec["name"])
        twin = next((r for r in runs if r.out_dir == out_dir), None)
        if twin is not None:
            raise EvaluatorError(f"{target}: benchmark {spec['name']!r} is given twice (both would write {out_dir});"
                                 f" run one of them on its own with --name")
        runs.append(BenchmarkRun(spec, out_dir, os.path.join(out_dir, PREDICTIONS)))
    if then_eval:
        for run in runs:  # data its evaluation would refuse: that benchmark fails now, before the model loads
            problem = scoring_problem(run.spec)
            if problem:
                print(f"bench: {run.spec['name']}: error: {problem}", file=sys.stderr)
                make_output_dir(run.out_dir)
                run.code, run.result = 2, os.path.join(run.out_dir, LOG_FILE[INFERENCE])
                write_text_atomic(run.result, f"[bench] error: {problem}\n")
    run_benchmarks(INFERENCE, runs, model, args.seed)
    if then_eval:
        return evaluate(runs, model, args.seed, table_scale(args))
    for run in runs:
        if run.code is None:
            run.code, run.result = 0, run.predictions
            print(run.predictions)
    return finish(runs)


def evaluate(runs: list, model: str, seed: int, scale: float = 1) -> int:
    """The evaluation stage for each benchmark whose inference succeeded, then its result_<name>.txt."""
    run_benchmarks(EVALUATION, runs, model, seed)
    for run in runs:
        if run.code is None:
            summary = write_summary(run.out_dir, run.spec, scale)
            print(open(summary, encoding="utf-8").read(), end="")
            run.code, run.result = 0, os.path.join(run.out_dir, METRICS)
            print(run.result)
    return finish(runs)


def finish(runs: list) -> int:
    """The command's exit code, the worst of the benchmarks' (0 only if all succeeded); with several, a table
    of each one's exit code and the file to open."""
    if len(runs) > 1:
        width = max(len(r.spec["name"]) for r in runs)
        print(f"\n{'benchmark':{width}s}  exit  file")
        for run in runs:
            print(f"{run.spec['name']:{width}s}  {run.code:4d}  {run.result}")
    return max(r.code for r in runs)


def cmd_eval(args) -> int:
    spec = benchmark_spec(args, args.benchmark)
    predictions = user_path(args.predictions)
    if not os.path.isfile(predictions):
        raise EvaluatorError(f"--predictions {predictions}: no such file")
    model = args.model_name or _model_from_predictions(predictions)
    out_dir = os.path.join(user_path(args.output_root), model, spec["name"]) if args.output_root \
        else os.path.dirname(predictions)
    make_output_dir(out_dir)
    return evaluate([BenchmarkRun(spec, out_dir, predictions)], model, args.seed, table_scale(args))


def make_output_dir(path: str) -> None:
    """A benchmark's output folder; an --output-root that is a file or cannot be written is one line, not a
    traceback."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise EvaluatorError(f"--output-root: cannot create {path}: {e.strerror or e}") from None


def _model_from_predictions(predictions: str) -> str:
    meta = os.path.join(os.path.dirname(predictions), "run_metadata.json")
    if os.path.isfile(meta):
        model = read_json(meta).get("model")
        if model:
            return model_name_of(model)
    return "predictions"


def cmd_list(args) -> int:
    print("benchmarks:")
    for name, spec in sorted(registry.BENCHMARKS.items()):
        print(f"  {name:12s} {spec.description}  (default metrics: {', '.join(spec.metrics) or 'from metadata.json'})")
    from evaluator.stages.inference.backends import BACKENDS
    from evaluator.stages.inference.params import MODEL_ALIASES
    external = [k for k in BENCHMARK_TYPES if k not in registry.BENCHMARKS and k != "command"]
    print("external harnesses (give --dataset and --option tasks=...): " + ", ".join(external))
    print("backends: " + ", ".join(BACKENDS))
    print("model aliases: " + ", ".join(f"{k} -> {v}" for k, v in MODEL_ALIASES.items()))
    return 0


def _common(p, with_model: bool) -> None:
    if with_model:
        p.add_argument("benchmark", nargs="+", help="benchmark names (see `list`) or canonical dataset directories; "
                       "several run in one session: the model loads once")
    else:
        p.add_argument("benchmark", help="a benchmark name (see `list`) or a canonical dataset directory")
    p.add_argument("--dataset", help="the benchmark's data file/directory (for a named benchmark; one benchmark only)")
    p.add_argument("--name", help="benchmark name used for the output folder (default: the dataset/benchmark name; "
                   "one benchmark only)")
    p.add_argument("--option", action="append", default=[], metavar="K=V", help="loader option (split=..., prompt=...)")
    p.add_argument("--output-root", default="outputs", help="default: outputs/ in the current directory")
    p.add_argument("--model-name", help="output folder name for the model (default: from the checkpoint path)")
    p.add_argument("--seed", type=int, default=0)
    if with_model:  # eval scores the predictions it is given: a sample size there would be ignored
        p.add_argument("--sample-size", type=int, help="first N samples only")
        p.add_argument("--model", required=True, help="checkpoint directory, hub id or alias (gemma3n, ...)")
        p.add_argument("--backend", default="hf", help="hf (default), vllm or openai")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--param", action="append", default=[], metavar="K=V",
                       help="generation parameter (max_new_tokens=32, temperature=0, stop=...)")
        p.add_argument("--backend-opt", action="append", default=[], metavar="K=V",
                       help="backend option (device=cuda, base_url=..., max_concurrency=8, ...)")
        p.add_argument("--max-error-rate", type=float, default=0.1, help="fail when more samples error (default 0.1)")


def _x100(p: argparse.ArgumentParser) -> None:
    p.add_argument("--x100", action="store_true", help="print metric values x100 as papers do (CIDEr-D 45.1, "
                   "accuracy 61.2); metrics.json keeps the raw values")


def table_scale(args) -> float:
    return PAPER_SCALE if getattr(args, "x100", False) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/bench.py", description="One-off benchmark runs on a checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-dataset", help="CSV/TSV/JSONL -> canonical dataset directory")
    p.add_argument("--input", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--dataset-id", required=True)
    p.add_argument("--id-column", help="column holding each row's id (default: `id` where a row has one, "
                   "else <file stem>-<row index>)")
    p.add_argument("--prompt-column", default="question")
    p.add_argument("--template", help="prompt template over the columns, e.g. '{question}\\n{choices_block}'")
    p.add_argument("--target-column")
    p.add_argument("--references-columns", help="a,b,c or one column holding a JSON list")
    p.add_argument("--choices-columns", help="A,B,C,D or one column holding a JSON list")
    p.add_argument("--category-column")
    p.add_argument("--audio-column", help="column with an audio path (relative to the input file)")
    p.add_argument("--system-prompt")
    p.add_argument("--metrics", help="comma-separated metric names stored in metadata.json (default: from the "
                   "rows: choices -> accuracy, target -> exact_match,token_f1, references -> bleu_4,meteor,rouge_l,"
                   "cider_d)")
    p.add_argument("--task-type")
    p = sub.add_parser("inference", help="run the inference stage once")
    _common(p, True)
    p = sub.add_parser("eval", help="score a predictions.jsonl")
    _common(p, False)
    p.set_defaults(output_root=None)  # default: beside the predictions file
    p.add_argument("--predictions", required=True)
    p.add_argument("--metrics", help="comma-separated metric names (default: the benchmark's)")
    _x100(p)
    p = sub.add_parser("run", help="inference then evaluation")
    _common(p, True)
    p.add_argument("--metrics", help="comma-separated metric names (default: the benchmark's)")
    _x100(p)
    sub.add_parser("list", help="benchmarks, backends, model aliases")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"make-dataset": cmd_make_dataset, "inference": cmd_inference, "eval": cmd_eval, "list": cmd_list,
                "run": lambda a: cmd_inference(a, then_eval=True)}
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe (`list | head`) surfaces here, inside the handler below
        return code
    except EvaluatorError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the stage or worker got the same Ctrl-C (one process group) and is ended
        print("bench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away; what is still buffered would fail again at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
