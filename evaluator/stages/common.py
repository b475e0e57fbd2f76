"""What every stage module shares: its entry point, its log line, the library versions it reports.

A stage module is run as `python -m <module> --job <job.json>` (evaluator/daemon/stages.py); a module that
serves both lanes (an external harness) gets both runners and picks by the job's stage. Standard library only.
"""
from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata as importlib_metadata
from typing import Callable, Optional

from evaluator.common.contracts import EVALUATION, INFERENCE, StageJob

Runner = Callable[[StageJob], int]


def stage_log(prefix: str) -> Callable[[str], None]:
    """A `log(msg)` writing `[prefix] msg` to stderr (the daemon keeps it as infer|eval.stderr.log)."""
    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)
    return log


def library_versions(names: tuple) -> dict:
    """{python, <distribution>: version} for the named distributions installed in this venv."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def stage_main(description: str, inference: Optional[Runner] = None, evaluation: Optional[Runner] = None,
               argv=None) -> int:
    """Parse `--job`, read the job spec and run the runner of its stage (exit 2 for a stage it has none for)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help="job spec JSON (written by the daemon or tools/bench.py)")
    job = StageJob.read(parser.parse_args(argv).job)
    runner = {INFERENCE: inference, EVALUATION: evaluation}.get(job.stage)
    if runner is None:
        print(f"error: this module has no {job.stage!r} stage", file=sys.stderr)
        return 2
    return runner(job)
