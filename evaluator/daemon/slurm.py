"""Slurm executor: each stage is one sbatch job, and a checkpoint's evaluation job is submitted together
with its inference job (`--dependency=afterok`), so a pipeline proceeds without the daemon.

It implements the Executor protocol of executors.py. What differs from the local executor:
- the intent token is in the job name, `eval-<run>-<iteration>-<benchmark>-<token>-<infer|evalu>`, so
  `recover` finds a previous daemon's jobs with one `squeue` and one `sacct` call, even when the daemon
  was killed before the ledger learned the job id;
- stopping the daemon leaves jobs running (Slurm runs them without us);
- `poll` asks one `squeue` for everything tracked and one `sacct` for what squeue no longer lists
  (`scontrol -o show job` where no accounting database answers), backing off from 1 s to
  `executor.slurm_poll_max_seconds` while nothing changes;
- `max_in_flight` counts pipelines (checkpoint x benchmark with a job not finished), chained
  evaluations and lone re-scores included.
A job's batch script is kept next to its log in the results tree.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from evaluator.common.atomic import write_text_atomic
from evaluator.common.contracts import EVALUATION, INFERENCE
from evaluator.common.errors import EvaluatorError
from evaluator.daemon.executors import Exit, Intent, Launch, Started, SubmitError

log = logging.getLogger("evaluator")

FINISHED_OK = {"COMPLETED"}
FINISHED_BAD = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "CANCELLED", "BOOT_FAIL",
                "DEADLINE", "REVOKED"}
# every state sacct accepts (not CG), so that `sacct -S` also lists jobs that never became eligible (an
# evaluation cancelled while it waited on its inference); without `-s` sacct leaves those out of a window
ALL_STATES = "PD,R,S,CD,CA,F,TO,OOM,NF,PR,BF,DL,RQ,RS,RV"
SCRIPT_FILE = {INFERENCE: "infer.sbatch", EVALUATION: "eval.sbatch"}
POLL_MIN = 1.0
PURGED_AFTER_S = 60.0  # unknown to squeue and sacct this long: the job is gone (not just accounting lag)
RECOVER_WINDOW = "now-30days"  # how far back recover looks for jobs that finished while no daemon ran
NAMES_PER_CALL = 500  # one argument holds at most 128 KiB (MAX_ARG_STRLEN)
# what sbatch/scancel print when the controller did not answer (down, restarting, hung): the request may or may
# not have been queued, and the job is not at fault
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out on send/recv operation",
               "Slurm temporarily unavailable")
CONTROLLER_DOWN = "the Slurm controller could not be reached"
STRAY_WATCH_S = 900.0  # how long a poll still cancels a job whose sbatch failed but that the controller may queue


@dataclass(frozen=True)
class JobState:
    """What Slurm says of one job."""

    state: str  # first word of the state ("CANCELLED by 0" -> CANCELLED)
    exit_code: str = ""  # "code:signal"
    reason: str = ""
    elapsed_s: Optional[float] = None


@dataclass
class SlurmJob:
    key: tuple
    stage: str
    token: str
    job_id: str
    started: float  # monotonic; for Exit.seconds when Slurm does not say
    unknown_since: Optional[float] = None  # monotonic; first poll that found it neither queued nor accounted


def job_name(key: tuple, stage: str, token: str) -> str:
    """The job name: readable, and unique per intent token (what `recover` looks jobs up by).

    Characters other than [A-Za-z0-9._-] become `_`, so the name survives sacct's comma-separated
    `--name` list, `|`-separated output and shell quoting unchanged."""
    run, iteration, bench = key
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"eval-{run}-{iteration}-{bench}-{token}-{stage[:5]}")


def exit_of(job_id: str, st: JobState) -> Optional[tuple[int, bool, str]]:
    """(returncode, timed_out, reason) of a finished job; None while it is not finished.

    A failure keeps the job's own exit code (2 and 75 mean something to the daemon); killed by a signal
    is minus that signal, as for a local process; a failed state with exit 0:0 is 1."""
    if st.state in FINISHED_OK:
        return 0, False, ""
    if st.state not in FINISHED_BAD:
        return None
    m = re.match(r"(\d+):(\d+)", st.exit_code)
    code, sig = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    returncode = code or (-sig if sig else 1)
    detail = f" ({st.reason})" if st.reason and st.reason != "None" else ""
    return returncode, st.state == "TIMEOUT", f"Slurm job {job_id} {st.state}{detail}"


def parse_sacct(text: str) -> dict[str, JobState]:
    """`sacct -n -X -P -o JobID,State,ExitCode,Reason,ElapsedRaw` -> {job id: JobState}; a later line wins."""
    out = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 5 or not parts[0]:
            continue
        elapsed = float(parts[4]) if parts[4].isdigit() else None
        words = parts[1].split() or ["UNKNOWN"]
        reason = parts[3]
        if words[1:2] == ["by"] and len(words) == 3 and elapsed:
            # cancelled after it ran: Reason still holds why it once waited (Dependency), not why it ended
            reason = f"by uid {words[2]}"
        out[parts[0]] = JobState(words[0], parts[2], reason, elapsed)
    return out


def parse_scontrol(text: str) -> dict[str, tuple[str, JobState]]:
    """`scontrol -o show job` (one line per job the controller still holds) -> {job id: (name, JobState)}."""
    out = {}
    for line in text.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            out[fields["JobId"]] = (fields.get("JobName", ""), JobState(
                fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""), fields.get("Reason", "")))
    return out


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a Slurm client; a missing client or a hung controller is a failed call, never an exception."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"`{argv[0]}` not found; is this a Slurm submit host?")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} timed out after {timeout:.0f} s")


def _message(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]


def _chunks(items: list[str], n: int = NAMES_PER_CALL):
    return [items[i:i + n] for i in range(0, len(items), n)]


def _minutes(m: float) -> str:
    total = max(1, int(round(m)))
    return f"{total // 60}:{total % 60:02d}:00"


def _unreachable(proc: subprocess.CompletedProcess) -> bool:
    """The Slurm client failed because the controller did not answer (or our own timeout cut it off)."""
    return proc.returncode == 124 or any(m in proc.stderr + proc.stdout for m in UNREACHABLE)


def _scancel(job_ids: list[str]) -> Optional[str]:
    """scancel these jobs (a finished one is ignored by Slurm); None, or what went wrong."""
    for chunk in _chunks(job_ids):
        proc = _run(["scancel", *chunk])
        if proc.returncode != 0:
            return f"scancel {' '.join(chunk)} failed: {_message(proc)}"
    return None


def queued_named(names: set[str]) -> list[str]:
    """Ids of this user's queued or running jobs whose name is in `names` (one squeue call); EvaluatorError when
    squeue does not answer."""
    proc = _run(["squeue", "-h", "--me", "-o", "%i|%j"])
    if proc.returncode != 0:
        raise EvaluatorError(f"--cancel-jobs: squeue failed ({_message(proc)}); cannot tell which jobs run")
    return [i for i, _, name in (line.strip().partition("|") for line in proc.stdout.splitlines())
            if name in names and i.isdigit()]


def cancel(job_ids: list[str]) -> None:
    """scancel these jobs (`status --cancel-jobs`); EvaluatorError when scancel is missing or fails."""
    problem = _scancel(job_ids)
    if problem:
        raise EvaluatorError(f"--cancel-jobs: {problem}")


class SlurmExecutor:
    def __init__(self, ex, timeouts: dict[str, float]):
        self.ex = ex  # ExecutorConfig
        self.timeouts = timeouts  # stage -> seconds; the --time of a launch that gives none
        self.jobs: dict[str, SlurmJob] = {}  # job id -> every job whose end poll has not reported yet
        self.next_poll = 0.0
        self.interval = POLL_MIN
        # job name -> monotonic deadline: jobs that must not run but could not be cancelled when that was decided
        # (an sbatch that failed ambiguously, a scancel the controller did not answer); poll cancels them
        self.strays: dict[str, float] = {}

    # ---- capacity --------------------------------------------------------------------------------
    def _keys(self) -> set:
        return {j.key for j in self.jobs.values()}

    def free_slots(self, stage: str) -> int:
        """max_in_flight bounds pipelines of both stages: a chained pair is one, a lone re-score is one."""
        return self.ex.max_in_flight - len(self._keys())

    def busy(self) -> bool:
        return bool(self.jobs)

    def running(self) -> list[tuple]:
        """(key, stage) as the ledger sees it: a key whose inference is tracked is inferring, even
        while its chained evaluation job already waits in the queue."""
        infer = {j.key for j in self.jobs.values() if j.stage == INFERENCE}
        return [(k, INFERENCE if k in infer else EVALUATION) for k in self._keys()]

    # ---- submission ------------------------------------------------------------------------------
    def _script(self, launch: Launch) -> str:
        ex = self.ex
        seconds = launch.timeout_s or self.timeouts[launch.stage]
        lines = ["#!/bin/bash",
                 f"#SBATCH --output={launch.log_path}", f"#SBATCH --error={launch.log_path}",
                 "#SBATCH --open-mode=append", f"#SBATCH --chdir={launch.cwd}",
                 f"#SBATCH --time={ex.time or _minutes(seconds / 60)}"]
        for flag, value in (("partition", ex.partition), ("account", ex.account), ("qos", ex.qos),
                            ("cpus-per-task", ex.cpus_per_task), ("mem", ex.mem)):
            if value:
                lines.append(f"#SBATCH --{flag}={value}")
        if launch.stage == INFERENCE:
            if ex.gres:
                lines.append(f"#SBATCH --gres={ex.gres}")
            elif ex.gpus_per_job:
                lines.append(f"#SBATCH --gpus={ex.gpus_per_job}")
        lines += [f"#SBATCH {a}" for a in ex.extra_sbatch_args]
        lines += ["set -e", *ex.env_setup, "set +e", f"exec {' '.join(shlex.quote(a) for a in launch.argv)}", ""]
        os.makedirs(launch.cwd, exist_ok=True)
        path = os.path.join(launch.cwd, SCRIPT_FILE[launch.stage])
        write_text_atomic(path, "\n".join(lines))
        return path

    def _sbatch(self, launch: Launch, token: str, script: str, after: Optional[str] = None) -> str:
        # the name goes on the command line, not in the script: no #SBATCH quoting to get wrong
        argv = ["sbatch", "--parsable", f"--job-name={job_name(launch.key, launch.stage, token)}"]
        if after:
            argv += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
        proc = _run(argv + [script])
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode == 0 and job_id.isdigit():
            return job_id
        unreachable = _unreachable(proc)
        if unreachable or proc.returncode == 0 or proc.returncode < 0:
            # not a refusal: the controller may queue it all the same (a hung one does, once it resumes), and
            # the next attempt's job would write the same results folder
            self._cancel_by_name(job_name(launch.key, launch.stage, token), "its sbatch failed without a refusal")
        raise SubmitError(f"sbatch of the {launch.stage} stage failed: {_message(proc)}",
                          outside_cause=CONTROLLER_DOWN if unreachable else None)

    def _cancel_by_name(self, name: str, why: str) -> None:
        """Cancel any job of this name now, and in later polls for a while: the controller may queue it later,
        or may not answer now."""
        self.strays[name] = time.monotonic() + STRAY_WATCH_S
        proc = _run(["scancel", "--me", f"--name={name}"])
        if proc.returncode != 0:
            log.warning("could not cancel Slurm jobs named %s (%s; %s); polls cancel one if it shows up in the next "
                        "%.0f min", name, why, _message(proc), STRAY_WATCH_S / 60)

    def _cancel_jobs(self, jobs: list[tuple[str, str]], why: str) -> None:
        """scancel (job id, name) pairs the daemon no longer wants; a failed scancel is a warning and the names
        are cancelled by a later poll (the controller may be down for a moment: the daemon goes on)."""
        problem = _scancel([job_id for job_id, _ in jobs])
        if problem:
            log.warning("could not cancel Slurm job(s) %s (%s): %s; a later poll cancels them",
                        ", ".join(i for i, _ in jobs), why, problem)
            deadline = time.monotonic() + STRAY_WATCH_S
            self.strays.update({name: deadline for _, name in jobs})

    def submit(self, launch: Launch) -> Started:
        """sbatch the stage and its chained `then`; tracks nothing unless every sbatch succeeded.

        Both jobs carry `launch.token` (the one the ledger row holds), so `recover` finds the pair."""
        then = launch.then
        try:
            scripts = [self._script(launch)] + ([self._script(then)] if then else [])
        except OSError as e:
            raise SubmitError(f"cannot write the batch script: {e}") from None
        first = self._sbatch(launch, launch.token, scripts[0])
        second = None
        if then is not None:
            try:
                second = self._sbatch(then, launch.token, scripts[1], after=first)
            except SubmitError as e:
                # a lone inference would finish into a pipeline nobody follows
                self._cancel_jobs([(first, job_name(launch.key, launch.stage, launch.token))],
                                  "the inference of an evaluation that could not be submitted")
                raise SubmitError(f"{e} (its inference, Slurm job {first}, was cancelled)",
                                  outside_cause=e.outside_cause) from None
        now = time.monotonic()
        self.jobs[first] = SlurmJob(launch.key, launch.stage, launch.token, first, now)
        if second is not None:
            self.jobs[second] = SlurmJob(launch.key, EVALUATION, launch.token, second, now)
        self._poll_soon()
        return Started(launch.key, launch.stage, first, f"Slurm job {first}", then_handle=second)

    # ---- recovery --------------------------------------------------------------------------------
    def _find(self, names: set[str]) -> dict[str, str]:
        """{job name: newest job id} among `names`: one squeue and one sacct call.

        `squeue -t all` lists what the controller still holds: queued and running jobs, and finished ones
        for MinJobAge (300 s by default), which covers the seconds before sacct's time window shows a new
        job; sacct covers jobs that finished longer ago while no daemon ran."""
        found: dict[str, int] = {}

        def keep(lines: str) -> None:
            for line in lines.splitlines():
                job_id, _, name = line.partition("|")
                if name in names and job_id.isdigit():
                    found[name] = max(found.get(name, 0), int(job_id))

        q = _run(["squeue", "-h", "--me", "-t", "all", "-o", "%i|%j"])
        if q.returncode != 0:  # guessing "nothing runs" would submit every pipeline a second time
            raise EvaluatorError(f"executor.type slurm: squeue failed ({_message(q)}); cannot tell which jobs "
                                 f"of the previous daemon still run")
        keep(q.stdout)
        for chunk in _chunks(sorted(names)):
            a = _run(["sacct", "-n", "-X", "-P", "--name=" + ",".join(chunk), "-S", RECOVER_WINDOW, "-E", "now",
                      "-s", ALL_STATES, "-o", "JobID,JobName"])
            if a.returncode != 0:
                log.warning("sacct failed (%s); only jobs the controller still holds are recovered", _message(a))
                break
            keep(a.stdout)
        return {name: str(job_id) for name, job_id in found.items()}

    def recover(self, intents: list[Intent]) -> dict[tuple, Started]:
        """Track again the jobs a previous daemon submitted under these intents' tokens.

        An inference whose chained evaluation was never submitted (killed between the two sbatch calls)
        is cancelled and not returned: the daemon starts that pipeline again. Jobs that finished while
        no daemon ran are tracked too; the next poll reports them with their real exit code."""
        if not intents:
            return {}
        names = {job_name(i.key, s, i.token) for i in intents if i.token for s in (INFERENCE, EVALUATION)}
        found = self._find(names)
        out: dict[tuple, Started] = {}
        now = time.monotonic()
        for intent in intents:
            if not intent.token:
                continue
            infer = found.get(job_name(intent.key, INFERENCE, intent.token))
            evalu = found.get(job_name(intent.key, EVALUATION, intent.token))
            if intent.stage == INFERENCE and infer and not evalu:
                log.warning("%s: Slurm job %s has no chained evaluation job (the daemon stopped between the two "
                            "sbatch calls); cancelled, the pipeline starts again", intent.key, infer)
                self._cancel_jobs([(infer, job_name(intent.key, INFERENCE, intent.token))],
                                  "an inference without its chained evaluation")
            elif intent.stage == INFERENCE and infer:
                self.jobs[infer] = SlurmJob(intent.key, INFERENCE, intent.token, infer, now)
                self.jobs[evalu] = SlurmJob(intent.key, EVALUATION, intent.token, evalu, now)
                log.info("%s: re-attached to Slurm job %s (evaluation job %s chained)", intent.key, infer, evalu)
                out[(intent.key, INFERENCE)] = Started(intent.key, INFERENCE, infer, f"Slurm job {infer}",
                                                       then_handle=evalu)
            elif intent.stage == EVALUATION and evalu:
                self.jobs[evalu] = SlurmJob(intent.key, EVALUATION, intent.token, evalu, now)
                log.info("%s: re-attached to Slurm job %s (evaluation)", intent.key, evalu)
                out[(intent.key, EVALUATION)] = Started(intent.key, EVALUATION, evalu, f"Slurm job {evalu}")
        self._poll_soon()
        return out

    # ---- state tracking --------------------------------------------------------------------------
    def _poll_soon(self) -> None:
        self.next_poll = 0.0
        self.interval = POLL_MIN

    def _queued(self) -> Optional[dict[str, str]]:
        """{id: name} of this user's jobs Slurm still holds as queued/running; None if squeue did not answer."""
        proc = _run(["squeue", "-h", "--me", "-o", "%i|%j"])
        if proc.returncode != 0:
            log.warning("squeue failed (%s); trying again later", _message(proc))
            return None
        return dict(line.strip().partition("|")[::2] for line in proc.stdout.splitlines() if line.strip())

    def _cancel_strays(self, queued: dict[str, str], now: float) -> None:
        self.strays = {name: until for name, until in self.strays.items() if until > now}
        found = [(job_id, name) for job_id, name in queued.items() if name in self.strays]
        if not found:
            return
        problem = _scancel([job_id for job_id, _ in found])
        if problem:
            log.warning("could not cancel Slurm job(s) %s, which must not run: %s; trying again next poll",
                        ", ".join(i for i, _ in found), problem)
            return
        for job_id, name in found:
            log.warning("cancelled Slurm job %s (%s): its submission failed or it was abandoned, yet the "
                        "controller holds it", job_id, name)
            del self.strays[name]

    def _finished(self, job_ids: list[str]) -> dict[str, JobState]:
        """States of jobs squeue no longer lists: one sacct call; the controller's memory for what
        accounting does not know (no slurmdbd, or a record not written yet)."""
        states: dict[str, JobState] = {}
        for chunk in _chunks(job_ids):
            proc = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(chunk),
                         "-o", "JobID,State,ExitCode,Reason,ElapsedRaw"])
            if proc.returncode == 0:
                states.update(parse_sacct(proc.stdout))
        missing = [i for i in job_ids if i not in states]
        if missing:
            # `scontrol show job` takes one id only (22.05 refuses "1,2"); without an id it prints every
            # job the controller still holds, i.e. for MinJobAge (300 s by default) after its end
            held = parse_scontrol(_run(["scontrol", "-o", "show", "job"]).stdout)
            states.update({i: held[i][1] for i in missing if i in held})
        return states

    def poll(self) -> list[Exit]:
        """Jobs that ended since the last call. A failed inference takes its chained evaluation with it;
        a succeeded one hands it over as `then_started`, and that evaluation's end comes in a later poll."""
        now = time.monotonic()
        if not (self.jobs or self.strays) or now < self.next_poll:
            return []
        queued = self._queued()
        if queued is None:
            self._back_off(now, changed=False)
            return []
        if self.strays:
            self._cancel_strays(queued, now)
        gone = [i for i in self.jobs if i not in queued]
        states = self._finished(gone) if gone else {}
        inferring = {j.key for j in self.jobs.values() if j.stage == INFERENCE}
        exits = []
        for job in sorted(self.jobs.values(), key=lambda j: j.stage != INFERENCE):
            if job.job_id not in self.jobs:
                continue  # cancelled with its inference above
            if job.job_id in queued:
                job.unknown_since = None
                continue
            if job.stage == EVALUATION and job.key in inferring:
                continue  # reported after its inference's end, never before
            st = states.get(job.job_id)
            outcome = exit_of(job.job_id, st) if st else None
            if st is None:
                job.unknown_since = job.unknown_since or now
                if now - job.unknown_since < PURGED_AFTER_S:
                    continue
                outcome = (1, False, f"Slurm job {job.job_id} is unknown to squeue and sacct (purged before its "
                                     f"end was seen)")
            if outcome is None:
                continue  # accounting still says RUNNING for a moment after squeue dropped it
            returncode, timed_out, reason = outcome
            del self.jobs[job.job_id]
            seconds = st.elapsed_s if st and st.elapsed_s is not None else now - job.started
            exits.append(Exit(job.key, job.stage, job.token, returncode, seconds, timed_out, reason,
                              then_started=self._hand_over(job, returncode, now)))
        self._back_off(now, changed=bool(exits))
        return exits

    def _hand_over(self, infer: SlurmJob, returncode: int, now: float) -> Optional[Started]:
        """The chained evaluation of an inference that ended: Started if it succeeded, else cancelled."""
        if infer.stage != INFERENCE:
            return None
        evalu = next((j for j in self.jobs.values() if j.key == infer.key and j.stage == EVALUATION), None)
        if evalu is None:
            return None
        if returncode != 0:
            # its dependency can never be satisfied: Slurm removes it anyway (--kill-on-invalid-dep=yes)
            self._cancel_jobs([(evalu.job_id, job_name(evalu.key, EVALUATION, evalu.token))],
                              f"the evaluation chained to failed Slurm job {infer.job_id}")
            del self.jobs[evalu.job_id]
            return None
        evalu.started = now
        return Started(evalu.key, EVALUATION, evalu.job_id, f"Slurm job {evalu.job_id}")

    def _back_off(self, now: float, changed: bool) -> None:
        # look again soon after a change; slower and slower while nothing happens
        self.interval = POLL_MIN if changed else min(self.ex.slurm_poll_max_seconds, self.interval * 1.5)
        self.next_poll = now + min(self.interval, self.ex.slurm_poll_max_seconds)

    # ---- stop / cancel ---------------------------------------------------------------------------
    def stop(self) -> list[tuple]:
        """Jobs are independent of the daemon: leave them running; the next start recovers them."""
        if self.jobs:
            log.info("%d Slurm pipeline(s) left running (%d job(s)); the next start finds them by token",
                     len(self._keys()), len(self.jobs))
        return []

    def wake_fds(self) -> list[int]:
        return []  # a Slurm job's end is seen by polling squeue/sacct

    def cancel(self, key: tuple) -> None:
        """scancel and forget every job of this key."""
        jobs = [(i, job_name(j.key, j.stage, j.token)) for i, j in self.jobs.items() if j.key == key]
        if jobs:
            self._cancel_jobs(jobs, f"the jobs of {key}")
        for i, _ in jobs:
            del self.jobs[i]
