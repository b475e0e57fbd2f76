"""The one Executor protocol the daemon talks to: local lanes (local.py) and Slurm (slurm.py).

The daemon never calls anything that exists for one executor only. A stage start is two-phase:
the daemon makes an intent *token* durable in the ledger first, then calls `submit`; the executor
marks what it starts with that token (local: `CKPT_EVAL_TOKEN` in the process environment; Slurm:
the job name), so after a kill -9 anywhere in between `recover` finds it again -- nothing is started
twice and nothing is orphaned.

An executor that can chain (Slurm) submits `launch.then` (the evaluation) together with the inference,
with a dependency, and registers nothing until every submission succeeded. When the daemon later
submits that evaluation (same key, same token) the executor hands back the job it already has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from evaluator.common.contracts import TOKEN_ENV  # noqa: F401  (re-exported: local.py, slurm.py, tests)


class SubmitError(RuntimeError):
    """The executor could not start the work; nothing it started is left running.

    `outside_cause` says, in words, when the failure is not the work's fault (the Slurm controller could not be
    reached): the daemon then retries on the tempfail budget instead of counting an attempt."""

    def __init__(self, message: str, outside_cause: Optional[str] = None):
        super().__init__(message)
        self.outside_cause = outside_cause


@dataclass(frozen=True)
class Launch:
    """One stage to start. `token` is already durable in the ledger row of `key`."""

    key: tuple  # ledger.JobKey (run, iteration, benchmark)
    stage: str  # contracts.INFERENCE | contracts.EVALUATION
    token: str
    argv: tuple
    cwd: str  # the result folder
    log_path: str
    timeout_s: float
    then: Optional["Launch"] = None  # the evaluation to chain after this inference (executors that chain)
    session: str = ""  # the checkpoint it reads: a warm worker that has it loaded is preferred (local.py)
    fresh_session: bool = False  # a warm worker that read another checkpoint is not reused (the backend's choice)
    engine: bool = False  # its backend holds an engine a process may not get back once closed (vllm): local.py


@dataclass(frozen=True)
class Started:
    """What the ledger keeps of a started stage, so it can be found again after a restart."""

    key: tuple
    stage: str
    handle: str  # local: the pid; Slurm: the job id
    where: str  # for the log: "pid 123, GPU 0" / "Slurm job 45"
    pid_start: Optional[str] = None  # local: the kernel start time of the pid (tells a reused pid apart)
    then_handle: Optional[str] = None  # Slurm: the chained evaluation job id


@dataclass(frozen=True)
class Exit:
    """A stage that ended (poll)."""

    key: tuple
    stage: str
    token: str
    returncode: int  # 0 ok, 75 retry later, other = failure; negative = killed by that signal
    seconds: float
    timed_out: bool = False
    reason: str = ""  # what the executor knows beyond the code (e.g. "Slurm job 45 CANCELLED")
    # an inference that succeeded and whose evaluation the executor had chained: it runs already as this
    then_started: Optional[Started] = None


@dataclass(frozen=True)
class Intent:
    """A ledger row that may have work running under `token` (recover)."""

    key: tuple
    stage: str
    token: str
    handle: Optional[str] = None  # what the ledger recorded, if it got that far
    pid_start: Optional[str] = None


class Executor(Protocol):
    def free_slots(self, stage: str) -> int:
        """How many more stages of this kind may be submitted now."""

    def busy(self) -> bool:
        """Whether anything submitted has not been reported by poll yet."""

    def submit(self, launch: Launch) -> Started:
        """Start the stage (and its `then`, if this executor chains); raises SubmitError."""

    def poll(self) -> list[Exit]:
        """Stages that ended since the last call; enforces timeouts. Never blocks for long."""

    def recover(self, intents: list[Intent]) -> dict[tuple, Started]:
        """Find the work a previous daemon started under these tokens.

        Returns {(key, stage): Started} for work that is now tracked again (poll reports its end);
        anything not returned is not running any more (local: leftovers are killed, since a restarted
        daemon cannot collect a child it did not start)."""

    def running(self) -> list[tuple]:
        """The (key, stage) of everything tracked (status, the heartbeat)."""

    def stop(self) -> list[tuple]:
        """The daemon is stopping: returns the (key, stage) it stopped (local kills its stages;
        Slurm leaves jobs running and returns none)."""

    def cancel(self, key: tuple) -> None:
        """Stop and forget any work of this key (e.g. a chained evaluation that can never run)."""

    def wake_fds(self) -> list[int]:
        """File descriptors that become readable when work ends without a SIGCHLD (local warm workers)."""


def _local(ex, timeouts, kill_grace, marker=""):
    from evaluator.daemon.local import LocalExecutor

    return LocalExecutor.from_config(ex, timeouts, marker)


def _slurm(ex, timeouts, kill_grace, marker=""):
    from evaluator.daemon.slurm import SlurmExecutor

    return SlurmExecutor(ex, timeouts)


# executor.type -> factory(ExecutorConfig, {stage: timeout seconds}, kill grace seconds, marker: whose work it is
# (the cache_dir: one daemon per cache_dir, so what carries it after a restart is a predecessor's))
EXECUTORS: dict[str, Callable] = {"local": _local, "slurm": _slurm}
