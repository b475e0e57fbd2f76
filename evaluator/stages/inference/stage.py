"""The inference stage: one checkpoint x one benchmark -> predictions.jsonl + run_metadata.json.

    python -m evaluator.stages.inference --job <job.json>      (in .venvs/inference)

The job's `benchmark` mapping (config `benchmarks:` entry) names the data and how to run it:
    type            benchmark loader (dataset, clotho, mmau-pro, text-mc, text-qa, gpt_eval, ...)
    dataset         its file or directory
    options         loader options (split, prompt, ...)
    backend         hf (default) | vllm | openai
    generation      max_new_tokens, temperature (0 = greedy), top_p, stop, ... (others go to the backend)
    backend_options backend settings (batch_size, device, dtype, base_url, max_concurrency, ...)
    sample_size     first N samples only
    max_error_rate  fraction of samples allowed to fail before the stage fails (default 0.1)

Exit codes: 0 done (run_metadata.json written last); 1 the model cannot load or more than max_error_rate of
the samples failed; 2 bad benchmark spec or dataset, an unknown generation parameter or backend option included
(a bad option value surfaces when the model loads: exit 1) or a checkpoint this venv's transformers would misread
(evaluator/stages/checkpoint_compat.py); 75 some samples failed with retryable errors (429,
5xx, timeouts, out of memory): run again later rather than score them as wrong. Non-retryable sample failures
within the limit are status=error rows.
"""
from __future__ import annotations

import os
import socket
import time

from evaluator.benchmarks.registry import load_benchmark
from evaluator.common.atomic import write_json_atomic
from evaluator.common.contracts import EXIT_TEMPFAIL, PREDICTIONS, PROGRESS, RUN_METADATA, StageJob, is_number
from evaluator.common.errors import EvaluatorError
from evaluator.common.records import DEFAULT_MAX_ERROR_RATE, too_many_errors, write_results
from evaluator.common.secrets import redact_obj
from evaluator.stages.checkpoint_compat import CheckpointFormatError

from .. import common
from ..common import library_versions, stage_log, stage_main
from .backends import ModelLoadError, backend_class, option_problems
from .params import GenerationParams, Progress, resolve_model

VERSIONED = ("torch", "transformers", "tokenizers", "accelerate", "vllm", "openai", "soundfile", "lm-eval")
# <output_dir>/progress.json {"done", "total", "updated_at"}: what `status` shows while this stage generates.
PROGRESS_EVERY_S = 5.0


log = stage_log("inference")


class ReportedProgress(Progress):
    """The stderr progress line, plus progress.json for `status`, rewritten at most every `file_every` seconds.
    A report that cannot be written is logged once and otherwise ignored: progress is never worth a failed job."""

    def __init__(self, total: int, path: str, file_every: float = PROGRESS_EVERY_S):
        super().__init__(total)
        self.path, self.file_every = path, file_every
        self.file_last = float("-inf")
        self.broken = False

    def update(self, n: int = 1) -> None:
        super().update(n)
        if time.monotonic() - self.file_last >= self.file_every:
            self.report()

    def report(self) -> None:
        self.file_last = time.monotonic()
        if self.broken:
            return
        try:
            write_json_atomic(self.path, {"done": self.done, "total": self.total, "updated_at": time.time()})
        except OSError as e:
            self.broken = True
            log(f"warning: cannot write {self.path} ({e}); status shows no progress for this job")


def model_stamp(path: str) -> tuple:
    """What says a checkpoint folder is still the one loaded: its top-level files' names, sizes and mtimes."""
    try:
        with os.scandir(path) as it:
            return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it if e.is_file()))
    except OSError:
        return ()


class WarmBackend:
    """The backend a warm worker keeps between jobs (evaluator/stages/worker.py); in a one-job process it is
    loaded and closed per job, as always.

    Reused as it is for the same checkpoint (unchanged files) and the same load settings (the backend's
    LOAD_OPTIONS, seed, alias), with the next benchmark's generation parameters (`reconfigure`); for another
    checkpoint with the same settings the backend may `swap` its weights in (hf: same config, strict state-dict
    load), else it is closed and the next one loaded from scratch (vllm, openai: no swap). Every backend in the
    tree has LOAD_OPTIONS and `reconfigure`; one without them is loaded and closed per job, even in a warm worker."""

    def __init__(self):
        self.backend = None
        self.key = None  # (backend class, load settings)
        self.model = None  # (path, stamp) loaded
        self.info: dict = {}

    def acquire(self, cls, model: str, options: dict, params, seed: int, alias):
        load_options = getattr(cls, "LOAD_OPTIONS", None)
        key = (cls, alias, seed, tuple(sorted((k, repr(options.get(k))) for k in load_options)) if load_options
               is not None else None)
        stamp = (model, model_stamp(model))
        warm = common.WARM and load_options is not None and hasattr(cls, "reconfigure")
        if warm and self.backend is not None and self.key == key:
            if self.model == stamp:
                self.backend.reconfigure(params, options)
                return self.backend, self.described(), "reused (warm worker, same checkpoint)"
            swap = getattr(self.backend, "swap", None)
            if swap is not None and swap(model):
                self.backend.reconfigure(params, options)
                self.model = stamp
                self.info = {**self.info, "checkpoint": model}
                return self.backend, self.described(), "weights swapped in (warm worker, same architecture)"
        self.drop()
        backend = cls(model, options, params, seed, alias)
        info = backend.load()
        if warm:
            self.backend, self.key, self.model, self.info = backend, key, stamp, info
            if self.drop not in common.WORKER_EXIT:
                common.WORKER_EXIT.append(self.drop)
        else:
            self.backend = backend
        return backend, info, "loaded"

    def described(self) -> dict:
        """load()'s info with what reconfigure() changed (the backend's run_info: batch_size, chat...): each job's
        run_metadata.json describes how that job ran, not how the first job of the worker did."""
        run_info = getattr(self.backend, "run_info", None)
        self.info = {**self.info, **(run_info() if run_info is not None else {})}
        return self.info

    def release(self) -> None:
        """After a job: a one-job process closes the backend; a warm worker keeps it."""
        if not common.WARM or self.key is None:
            self.drop()

    def drop(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.key, self.model, self.info = None, None, None, {}


WARM_BACKEND = WarmBackend()


def run(job: StageJob) -> int:
    bench = job.benchmark
    started = time.time()
    try:
        kind = bench.get("type") or "dataset"
        dataset = load_benchmark(kind, bench.get("dataset"), bench.get("options"), bench.get("sample_size"))
        backend_name = bench.get("backend") or "hf"
        params = GenerationParams.from_dict(bench.get("generation"), "generation", backend=backend_name)
        options = dict(bench.get("backend_options") or {})
        if bench.get("batch_size") is not None:
            options["batch_size"] = bench["batch_size"]
        batch_size = options.get("batch_size")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise EvaluatorError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        max_error_rate = bench.get("max_error_rate", DEFAULT_MAX_ERROR_RATE)
        if not is_number(max_error_rate) or not 0 <= max_error_rate <= 1:  # NaN fails too: it would never fail
            raise EvaluatorError(f"max_error_rate: expected a fraction from 0 to 1, got {max_error_rate!r}")
        cls = backend_class(backend_name)
        unknown = option_problems(backend_name, options)
        if unknown:
            raise EvaluatorError("; ".join(f"backend_options.{key}: {text}" for key, text in unknown))
    except EvaluatorError as e:
        log(f"error: {e}")
        return 2
    progress_path = os.path.join(job.output_dir, PROGRESS)
    try:
        os.remove(progress_path)  # an earlier attempt's report is not this one's
    except FileNotFoundError:
        pass
    model, alias = resolve_model(job.checkpoint)
    log(f"benchmark {bench.get('name')!r} ({kind}, {len(dataset.samples)} samples from {dataset.root}), "
        f"backend {backend_name}, model {alias or model}")
    t0 = time.perf_counter()
    try:
        backend, info, how = WARM_BACKEND.acquire(cls, model, options, params, job.seed, alias)
    except CheckpointFormatError as e:  # this venv's transformers would misread the checkpoint: a bad spec
        log(f"error: {e}")
        return 2
    except ModelLoadError as e:
        log(f"error: {e}")
        return 1
    load_s = time.perf_counter() - t0
    log(f"model {how} in {load_s:.1f}s: {info}")
    t1 = time.perf_counter()
    progress = ReportedProgress(len(dataset.samples), progress_path)
    progress.report()  # 0/N: the model is loaded and generation begins
    try:
        results = backend.run(dataset.samples, dataset.dataset_id, progress)
    except EvaluatorError as e:
        log(f"error: {e}")
        return 1
    finally:
        WARM_BACKEND.release()
    run_s = time.perf_counter() - t1
    write_results(os.path.join(job.output_dir, PREDICTIONS), results)
    n = len(results)
    errors = [r for r in results if not r.ok]
    usage = [r.response.get("usage") or {} for r in results if r.ok]
    prompt_tokens = sum(int(u.get("prompt_tokens") or 0) for u in usage)
    completion_tokens = sum(int(u.get("completion_tokens") or 0) for u in usage)
    error_rate = len(errors) / n if n else 0.0
    if errors:
        kinds = list(dict.fromkeys(f"{r.error.type}: {r.error.message[:200]}" for r in errors if r.error))
        log(f"{len(errors)}/{n} samples failed; first kinds: " + " | ".join(kinds[:3]))
    retryable = [r for r in errors if r.error and r.error.retryable]
    if retryable:
        # a 429 / 5xx / timeout / out-of-memory says nothing about the model: scoring those samples as wrong would
        # draw a dip on the curve that is not there. Ask to be run again later (the daemon bounds the attempts).
        log(f"error: {len(retryable)}/{n} samples failed with retryable errors; exit {EXIT_TEMPFAIL} (retry later), "
            f"no run_metadata.json")
        return EXIT_TEMPFAIL
    if too_many_errors(len(errors), n, max_error_rate):
        log(f"error: {len(errors)}/{n} samples failed ({error_rate:.1%}), above max_error_rate "
            f"{max_error_rate:.1%}; predictions kept in {PREDICTIONS} for inspection, no run_metadata.json")
        return 1
    meta = {
        "model": alias or model, "checkpoint": job.checkpoint, "run": job.run, "iteration": job.iteration,
        "tokens_b": job.tokens_b, "benchmark": bench.get("name"), "benchmark_type": kind,
        "dataset_id": dataset.dataset_id, "dataset_dir": dataset.root, "backend": backend_name,
        "backend_info": info, "backend_options": redact_obj(options), "generation": params.to_dict(),
        "seed": job.seed, "attempt": job.attempt, "n": n, "n_ok": n - len(errors), "n_error": len(errors),
        "error_rate": error_rate, "versions": library_versions(VERSIONED),
        "timings": {"load_s": round(load_s, 3), "run_s": round(run_s, 3), "total_s": round(time.time() - started, 3),
                    "model": how},
        "samples_per_s": round(n / run_s, 3) if run_s > 0 else None,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "completion_tokens_per_s": round(completion_tokens / run_s, 3) if run_s > 0 else None,
        "host": socket.gethostname(), "started_at": started, "finished_at": time.time(),
    }
    write_json_atomic(os.path.join(job.output_dir, RUN_METADATA), meta)  # last: the daemon's done marker
    log(f"done: {n} samples ({len(errors)} errors) in {run_s:.1f}s, {meta['samples_per_s']} samples/s")
    return 0


def main(argv=None) -> int:
    return stage_main(__doc__.splitlines()[0], inference=run, argv=argv)
