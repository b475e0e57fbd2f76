"""The `command` stage: run a configured shell command template for one checkpoint.

    python -m evaluator.stages.command --job <job.json>

The template comes from the benchmark spec (`inference:` or `evaluation:` key) and may use the placeholders of
contracts.COMMAND_PLACEHOLDERS, each value shell-quoted; {scratch_dir} is created before the command runs. The
command runs in {output_dir}. Uses: Megatron->HF conversion, external harnesses, user scripts. The contract
(placeholders, metrics.json, exit codes, environment) is docs/benchmarks.md, "The `command` benchmark contract".

Exit code: the command's own (0 done, 2 failed for good, 75 retry later, other failed); 2 also for a template
this job cannot fill and for an invalid metrics.json. After exit 0:
- inference: run_metadata.json is written (unless the command wrote one) -- the daemon's "done" marker;
- evaluation: the command must have written metrics.json, either the contract form ({"metrics": {...}, "n": ...})
  or a flat {"name": number} object whose reserved keys (contracts.METRICS_FIELDS: `n`, `stderr`, ...) are not
  metrics; the stage writes it back in the contract form.
After any other exit, or a metrics.json refused, the done file the command wrote (if any) is moved to
`<name>.refused`: the results tree holds a done file only for a result.
"""
from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import time

from evaluator.common.atomic import read_json, write_json_atomic
from evaluator.common.contracts import (
    COMMAND_PLACEHOLDERS, EVALUATION, EXIT_BAD_SPEC, EXIT_OK, INFERENCE, METRICS, METRICS_FIELDS, RUN_METADATA,
    StageJob, is_number, render_template, validate_metrics)
from evaluator.stages.common import metrics_header

# placeholders whose value the daemon puts into the job spec's `extra`
EXTRA_PLACEHOLDERS = ("config_dir", "scratch_dir")


class TemplateError(ValueError):
    """The command template cannot be filled for this job."""


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses ({{ and }} are literal braces, not placeholders)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def render(template: str, job: StageJob) -> str:
    """Fill the placeholders (format specs allowed, e.g. iter_{iteration:07d}); each value is shell-quoted."""
    values = {
        "checkpoint": job.checkpoint, "iteration": job.iteration, "output_dir": job.output_dir,
        "run": job.run, "benchmark": job.benchmark.get("name", ""), "seed": job.seed,
        "tokens_b": "" if job.tokens_b is None else job.tokens_b, "python": sys.executable,
        **{name: job.extra[name] for name in EXTRA_PLACEHOLDERS if name in job.extra},
    }
    try:
        names = placeholders(template)
    except ValueError as e:
        raise TemplateError(f"bad command template ({e}); write literal braces as {{{{ }}}}") from None
    for name in sorted(names):
        if name not in COMMAND_PLACEHOLDERS:
            raise TemplateError(f"unknown placeholder {{{name}}} (known: "
                                f"{', '.join('{%s}' % p for p in COMMAND_PLACEHOLDERS)})")
        if name not in values:
            raise TemplateError(f"the job spec gives no extra.{name}, which {{{name}}} needs (is the daemon "
                                f"that wrote it older than this stage?)")
    try:
        return render_template(template, values)
    except (ValueError, IndexError) as e:
        raise TemplateError(f"bad format spec in the command template ({e})") from None


def contract_form(data: object, job: StageJob, path: str) -> dict:
    """The metrics.json an evaluation command wrote -> the contract form, with this job's header; raises
    ValueError naming the key and the file.

    Flat form: every key outside METRICS_FIELDS is a metric and must be a number; the reserved keys keep their
    contract meaning (a flat `"n": 100` is the sample count, not a metric)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    header = metrics_header(job, "command")
    reserved = set(METRICS_FIELDS) | set(header)
    if "metrics" in data:
        doc = dict(data)
    else:
        for name, value in data.items():
            if name not in reserved and not is_number(value):
                raise ValueError(f"{path}: {name!r} is {value!r}, not a number: in a flat metrics.json every key "
                                 f"is a metric except the reserved {', '.join(METRICS_FIELDS)} (write the "
                                 f"{{\"metrics\": {{...}}}} form to keep other fields)")
        doc = {k: v for k, v in data.items() if k in reserved}
        doc["metrics"] = {k: v for k, v in data.items() if k not in reserved}
    for key in ("benchmark", "iteration"):  # the result would be filed under another job
        if doc.get(key) is not None and doc[key] != header[key]:
            raise ValueError(f"{path}: {key} is {doc[key]!r} but this job's is {header[key]!r}")
    return validate_metrics({**doc, **header}, path)


def _finish_metrics(job: StageJob) -> int:
    path = os.path.join(job.output_dir, METRICS)
    if not os.path.exists(path):
        print(f"command stage: the evaluation command exited 0 but wrote no {path}", file=sys.stderr)
        return 1
    if os.path.getsize(path) == 0:  # `json.dump(m, open(...))` on a full disk exits 0 and leaves this
        return _refused(job, f"{path} is empty: a write that did not finish (a full disk?); tried again", code=1)
    try:
        doc = contract_form(read_json(path), job, path)
    except json.JSONDecodeError as e:
        return _refused(job, f"{path}:{e.lineno}: not valid JSON ({e.msg})")
    except UnicodeDecodeError as e:
        return _refused(job, f"{path}: not UTF-8 text (byte {e.start}: {e.reason})")
    except ValueError as e:
        return _refused(job, str(e))
    write_json_atomic(path, doc, sort_keys=False)  # the command's metric order: its first is the headline (status)
    return EXIT_OK


def _refused(job: StageJob, why: str, code: int = EXIT_BAD_SPEC) -> int:
    """A stage that failed leaves no done file: what the command wrote under that name is moved to `<name>.refused`
    (kept to read), so the results tree never holds it as a result (`wandb_writer`'s `results` source reads it).
    `why` is logged last: `status` shows a failed job's last log line."""
    done = os.path.join(job.output_dir, METRICS if job.stage == EVALUATION else RUN_METADATA)
    if os.path.exists(done):
        try:
            os.replace(done, done + ".refused")
            print(f"command stage: its {os.path.basename(done)} is kept as {os.path.basename(done)}.refused "
                  f"(not a result)", file=sys.stderr)
        except OSError as e:
            print(f"command stage: could not move {done} aside: {e}", file=sys.stderr)
    print(f"command stage: {why}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="job spec JSON written by the daemon")
    args = parser.parse_args(argv)
    job = StageJob.read(args.job)
    template = job.benchmark.get(job.stage)
    if not template:
        print(f"command stage: benchmark {job.benchmark.get('name')!r} has no '{job.stage}' command", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        command = render(template, job)
    except TemplateError as e:
        print(f"command stage: {args.job}: {job.stage}: {e}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if "scratch_dir" in placeholders(template):
        try:
            os.makedirs(job.extra["scratch_dir"], exist_ok=True)
        except OSError as e:  # a full or read-only disk: worth another attempt later
            print(f"command stage: cannot create {{scratch_dir}} {job.extra['scratch_dir']}: {e}", file=sys.stderr)
            return 1
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    print(f"command stage ({job.stage}, iteration {job.iteration}): {command}", file=sys.stderr, flush=True)
    started = time.time()
    code = subprocess.call(["/bin/sh", "-c", command], cwd=job.output_dir, env=env)
    if code != EXIT_OK:
        return _refused(job, f"command exited {code}", code)
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
    return EXIT_BAD_SPEC


if __name__ == "__main__":
    sys.exit(main())
