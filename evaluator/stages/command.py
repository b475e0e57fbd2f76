"""The `command` stage: run a configured shell command template for one checkpoint.

    python -m evaluator.stages.command --job <job.json>

The template comes from the benchmark spec (`inference:` or `evaluation:` key) and may use
{checkpoint} {iteration} {output_dir} {run} {benchmark} {tokens_b} {seed} {python} {config_dir}; each
value is shell-quoted. {python} is this venv's interpreter, so a command runs in the stage's venv;
{config_dir} is the config file's folder (for scripts kept beside it). The command runs in {output_dir}.
Uses: Megatron->HF conversion, external harnesses, user scripts.

Exit code is the command's own (0 done, 75 retry later, other failed). After exit 0:
- inference: run_metadata.json is written (unless the command wrote one) -- the daemon's "done" marker;
- evaluation: the command must have written metrics.json; a flat {"name": number} object is
  wrapped into the metrics.json contract, anything else invalid fails the stage.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from evaluator.common.atomic import read_json, write_json_atomic
from evaluator.common.contracts import (
    EVALUATION, EXIT_OK, INFERENCE, METRICS, RUN_METADATA, StageJob, render_template, validate_metrics)

def render(template: str, job: StageJob) -> str:
    """Fill the placeholders (format specs allowed, e.g. iter_{iteration:07d}); each value is shell-quoted."""
    values = {
        "checkpoint": job.checkpoint, "iteration": job.iteration, "output_dir": job.output_dir,
        "run": job.run, "benchmark": job.benchmark.get("name", ""), "seed": job.seed,
        "tokens_b": "" if job.tokens_b is None else job.tokens_b, "python": sys.executable,
        "config_dir": job.extra.get("config_dir", ""),
    }
    return render_template(template, values)


def _finish_metrics(job: StageJob) -> int:
    path = os.path.join(job.output_dir, METRICS)
    if not os.path.exists(path):
        print(f"command stage: the evaluation command exited 0 but wrote no {path}", file=sys.stderr)
        return 1
    data = read_json(path)
    if isinstance(data, dict) and "metrics" not in data:
        data = {"metrics": data}
    if isinstance(data, dict):
        data.setdefault("benchmark", job.benchmark.get("name"))
        data.setdefault("iteration", job.iteration)
        data.setdefault("tokens_b", job.tokens_b)
    try:
        validate_metrics(data, path)
    except ValueError as e:
        print(f"command stage: {e}", file=sys.stderr)
        return 1
    write_json_atomic(path, data)
    return EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="job spec JSON written by the daemon")
    args = parser.parse_args(argv)
    job = StageJob.read(args.job)
    template = job.benchmark.get(job.stage)
    if not template:
        print(f"command stage: benchmark {job.benchmark.get('name')!r} has no '{job.stage}' command", file=sys.stderr)
        return 2
    command = render(template, job)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    print(f"command stage ({job.stage}, iteration {job.iteration}): {command}", file=sys.stderr, flush=True)
    started = time.time()
    code = subprocess.call(["/bin/sh", "-c", command], cwd=job.output_dir, env=env)
    if code != EXIT_OK:
        print(f"command stage: command exited {code}", file=sys.stderr)
        return code
    if job.stage == INFERENCE:
        meta_path = os.path.join(job.output_dir, RUN_METADATA)
        if not os.path.exists(meta_path):
            write_json_atomic(meta_path, {
                "stage": "command", "command": command, "checkpoint": job.checkpoint,
                "iteration": job.iteration, "run": job.run, "benchmark": job.benchmark.get("name"),
                "started_at": started, "seconds": round(time.time() - started, 3),
            })
        return EXIT_OK
    if job.stage == EVALUATION:
        return _finish_metrics(job)
    print(f"command stage: unknown stage {job.stage!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
