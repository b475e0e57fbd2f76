"""A kill -9 chaos check of the daemon: never lose or duplicate a result, whatever is killed when.

    .venvs/daemon/bin/python scripts/chaos_kill9.py [--seed N] [--rounds N] [--rotate N] [--output chaos.json]

One run (megatron layout) with a few checkpoints x benchmarks: fast `command` benchmarks
(tests/stage_scripts/fake_stage.py) and one real `dataset` benchmark on a tiny hf model (built with
tests/stage_scripts/make_tiny_lm.py) in warm workers; sinks: local (history.jsonl) and W&B offline. Each round
starts the real daemon (`tools/evaluator.py`, continuous or --once) when none runs, waits a random time and
SIGKILLs a random target: the daemon, a warm worker, a stage process, or the daemon and then a stage's leader
while no daemon runs; sometimes a new checkpoint is added. With `--rotate N` the "trainer" keeps only its newest N
checkpoints and deletes older ones right after each new save (save_total_limit), whatever the daemon is doing.
The command benchmarks' inference reads the checkpoint's weights file and their evaluation reports whether those
were the given iteration's (`weights_ok`). After the rounds a last `--once` runs to the end and the invariants are
checked:

- every (iteration, benchmark) is `recorded` in the ledger, none left in a running state; a rotated-away
  checkpoint's may instead be `vanished` (deleted before the daemon could pin it), and then nothing of it is
  recorded anywhere;
- history.jsonl has exactly one line per (run, iteration, benchmark) holding the metrics of its metrics.json,
  and the W&B offline run holds each of them once, with the same values;
- no warm worker outlives its killed daemon, no stage process of a killed daemon is alive once the restarted
  daemon has recovered, a killed stage's process group is reaped by its daemon, and nothing is left at the end;
- no partial file (a temp name) in the result folder of a recorded job; no traceback and no ledger conflict in
  the daemons' logs.

Prints a summary, writes --output (kills, restarts, violations, rounds...) and exits 1 on any violation.
Every process the daemons start carries CHAOS_KILL9=<work dir> in its environment: that is how leftovers are
found after their daemon is gone.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from evaluator.daemon import heartbeat  # noqa: E402  (standard library + yaml: the daemon venv has it)

VENVS = os.path.join(ROOT, ".venvs")
DAEMON_PY = os.path.join(VENVS, "daemon", "bin", "python")
INFERENCE_PY = os.path.join(VENVS, "inference", "bin", "python")
EVALUATOR = os.path.join(ROOT, "tools", "evaluator.py")
FAKE_STAGE = os.path.join(ROOT, "tests", "stage_scripts", "fake_stage.py")
MAKE_TINY_LM = os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_lm.py")
MARKER = "CHAOS_KILL9"
WORKER_ENV = "CKPT_EVAL_WORKER"
TOKEN_ENV = "CKPT_EVAL_TOKEN"
RUN = "tiny"
PR_SET_CHILD_SUBREAPER = 36
KILL_GRACE = 1.0  # executor.kill_grace_seconds of the run
# after a restarted daemon's recovery, its predecessor's stages must be gone within this (they are stopped during
# recovery; `slow`'s inference sleeps longer, so one that outlives it was not stopped)
RECOVERY_GRACE = 1.5
TEMP_NAME = re.compile(r"(^\..+\.tmp(\.\d+)?$)|(\.tmp$)")  # evaluator/common/atomic.py: .<name>.tmp.<pid>
ROWS = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "target": str(2 * i)}
        for i in range(4)]


# ---- processes -------------------------------------------------------------------------------------------
def proc_stat(pid: int):
    """(ppid, pgid, start time, state) of a live pid, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[2]), fields[19], fields[0]


def environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return {}
    out = {}
    for item in raw:
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


class Proc:
    """One process of this chaos run, named by pid and kernel start time (a reused pid is another process)."""

    def __init__(self, pid: int, ppid: int, pgid: int, start: str, kind: str, cmd: str):
        self.pid, self.ppid, self.pgid, self.start, self.kind, self.cmd = pid, ppid, pgid, start, kind, cmd

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[2] == self.start and st[3] != "Z"

    def describe(self) -> dict:
        return {"pid": self.pid, "kind": self.kind, "cmd": self.cmd}


def marked_processes(marker: str) -> list[Proc]:
    """Every live process whose environment carries CHAOS_KILL9=<marker>: the daemons and all they started."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        env = environ(pid)
        if env.get(MARKER) != marker:
            continue
        st = proc_stat(pid)
        if st is None or st[3] == "Z":
            continue
        kind = "worker" if WORKER_ENV in env else "stage" if TOKEN_ENV in env else "other"
        if kind == "other" and "tools/evaluator.py" in cmdline(pid):
            kind = "daemon"
        out.append(Proc(pid, st[0], st[1], st[2], kind, cmdline(pid)))
    return out


def tree(procs: list[Proc], root: int) -> list[Proc]:
    """The processes below `root` (by parent pid)."""
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c.pid)
    return out


def wait_gone(procs: list[Proc], seconds: float) -> list[Proc]:
    """Those of `procs` still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p in procs if p.alive()]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


class Reaper:
    """Make this process the child subreaper of everything below it and reap the orphans it adopts, as init
    (systemd) does on a real machine. Without it, a stage leader killed after its daemon stays a zombie of a
    pid 1 that does not reap (a container's), its pid and start time still match the ledger, and a daemon
    restarted then finds its group by that pid: what happens when init has reaped the leader would go unseen."""

    def __init__(self):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.own: set[int] = set()  # children this script started and waits for itself (the daemons)
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def _run(self) -> None:
        me = os.getpid()
        while True:
            time.sleep(0.05)  # polled: a SIGCHLD handler could re-enter itself in a burst of exits
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) in self.own:
                    continue
                st = proc_stat(int(name))
                if st is not None and st[0] == me and st[3] == "Z":
                    try:
                        os.waitpid(int(name), os.WNOHANG)
                    except ChildProcessError:
                        pass


# ---- the run's files ---------------------------------------------------------------------------------------
WEIGHTS = os.path.join("mp_rank_00", "model_optim_rng.pt")


def fake(stage: str, sleep: float) -> str:
    """A fake stage whose inference reads the checkpoint's weights file, and whose evaluation reports whether those
    were the weights of the iteration it was given (`weights_ok`): a result taken from another checkpoint, or from
    a checkpoint deleted under it, shows."""
    return (f"{{python}} {FAKE_STAGE} {stage} --out {{output_dir}} --checkpoint {{checkpoint}} "
            f"--iteration {{iteration}} --mode ok --sleep {sleep} --weights {WEIGHTS}")


def command_bench(name: str, infer_sleep: float, eval_sleep: float) -> dict:
    return {"name": name, "type": "command", "inference": fake("infer", infer_sleep),
            "evaluation": fake("eval", eval_sleep)}


def build_model(out: str) -> str:
    if not os.path.exists(os.path.join(out, "config.json")):
        proc = subprocess.run([INFERENCE_PY, MAKE_TINY_LM, out, "--arch", "gpt2"], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"chaos: building the tiny model failed:\n{proc.stderr[-3000:]}")
    return out


def add_checkpoint(root: str, iteration: int, model: str) -> None:
    """A Megatron save (mp_rank_00/model_optim_rng.pt) that also holds the tiny hf model's files (what the
    dataset benchmark loads), made complete by the tracker last."""
    path = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(os.path.join(path, "mp_rank_00"), exist_ok=True)
    for name in os.listdir(model):
        src = os.path.join(model, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(path, name))
    with open(os.path.join(path, WEIGHTS), "wb") as f:
        f.write(f"weights {iteration}".encode())
    tmp = os.path.join(root, ".tracker.tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, os.path.join(root, "latest_checkpointed_iteration.txt"))


def write_config(work: str, benchmarks: list, use_wandb: bool) -> str:
    cache = os.path.join(work, "cache")
    cfg = {"project_name": "chaos", "model_name": RUN, "cache_dir": cache,
           "watch": {"paths": [os.path.join(work, "ckpt")], "layout": "megatron", "iteration_interval": 1000,
                     "poll_seconds": 0.5, "settle_seconds": 0.3},
           # kills of stages and workers are attempts: enough of them that no job fails for good
           "executor": {"backoff_seconds": 0.2, "backoff_max_seconds": 2.0, "max_attempts": 100,
                        "kill_grace_seconds": KILL_GRACE, "gpus": [], "warm_workers": "on"},
           "recorder": {"sinks": ["local", "wandb"] if use_wandb else ["local"], "plots": False},
           "benchmarks": benchmarks}
    if use_wandb:
        cfg["wandb"] = {"mode": "offline", "dir": os.path.join(cache, "wandb")}
    path = os.path.join(work, "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"auto_eval": cfg}, f)
    return path


# ---- the daemon ------------------------------------------------------------------------------------------------
class Daemon:
    reaper: "Reaper | None" = None

    def __init__(self, cfg: str, work: str, n: int, once: bool):
        self.log_path = os.path.join(work, "logs", f"daemon-{n:03d}{'-once' if once else ''}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.once = once
        env = dict(os.environ, **{MARKER: work})
        env.pop(WORKER_ENV, None)
        env.pop(TOKEN_ENV, None)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([DAEMON_PY, EVALUATOR, "--config", cfg] + (["--once"] if once else []),
                                         stdout=logf, stderr=subprocess.STDOUT, env=env)
        if Daemon.reaper is not None:
            Daemon.reaper.own.add(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_recovered(self, cache: str, timeout: float = 60.0) -> bool:
        """Until this daemon has recovered what its predecessor left (it writes daemon.json with its pid right
        after `Daemon.recover`), or it ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = heartbeat.read_state(cache)
            except (OSError, ValueError):
                state = None
            if (state or {}).get("pid") == self.pid or not self.running():
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()


# ---- the chaos -------------------------------------------------------------------------------------------------
class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix=f"chaos-kill9-{args.seed}-"))
        os.makedirs(self.work, exist_ok=True)
        self.cache = os.path.join(self.work, "cache")
        self.ckpt = os.path.join(self.work, "ckpt")
        self.kills = {"daemon": 0, "daemon_starting": 0, "worker": 0, "stage": 0, "daemon+stage": 0}
        self.restarts = 0
        self.starts = 0
        self.violations: list[dict] = []
        self.events: list[dict] = []
        self.iterations: list[int] = []
        self.deleted: list[int] = []  # checkpoints the "trainer" rotated away (--rotate)
        self.vanished: list = []  # (iteration, benchmark) found vanished at the end
        self.daemon = None
        self.t0 = time.monotonic()

    def violation(self, kind: str, **detail) -> None:
        v = {"kind": kind, "at_s": round(time.monotonic() - self.t0, 2), **detail}
        self.violations.append(v)
        print(f"chaos: VIOLATION {kind}: {json.dumps(detail)[:600]}", flush=True)

    def event(self, **e) -> None:
        e["at_s"] = round(time.monotonic() - self.t0, 2)
        self.events.append(e)
        if self.args.verbose:
            print(f"chaos: {json.dumps(e)}", flush=True)

    # ---- set-up
    def setup(self) -> None:
        model = self.args.model or build_model(os.path.join(self.work, "model"))
        self.model = model
        data = os.path.join(self.work, "qa")
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, "test.jsonl"), "w") as f:
            for row in ROWS:
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(data, "metadata.json"), "w") as f:
            json.dump({"dataset_id": "chaos-qa"}, f)
        self.benchmarks = [command_bench("qa", 0.4, 0.2), command_bench("mc", 0.2, 0.1),
                           command_bench("slow", 6.0, 0.5)]
        if not self.args.no_dataset:
            self.benchmarks.append({"name": "lm", "type": "dataset", "dataset": data,
                                    "metrics": ["exact_match", "token_f1"], "generation": {"max_new_tokens": 4}})
        self.cfg = write_config(self.work, self.benchmarks, not self.args.no_wandb)
        os.makedirs(self.ckpt, exist_ok=True)
        for _ in range(self.args.checkpoints):
            self.new_checkpoint()

    def new_checkpoint(self) -> None:
        iteration = 1000 * (len(self.iterations) + 1)
        add_checkpoint(self.ckpt, iteration, self.model)
        self.iterations.append(iteration)
        if self.args.rotate:  # as a trainer's save_total_limit does: the oldest go right after a new save
            for old in self.iterations[:-self.args.rotate]:
                if old not in self.deleted:
                    shutil.rmtree(os.path.join(self.ckpt, f"iter_{old:07d}"))
                    self.deleted.append(old)
                    self.event(deleted_checkpoint=old)

    # ---- the daemon and its processes
    def start(self, once: bool) -> None:
        self.daemon = Daemon(self.cfg, self.work, self.starts, once)
        self.starts += 1

    def live(self) -> list[Proc]:
        return marked_processes(self.work)

    def orphans(self) -> list[Proc]:
        """Marked processes that are neither the live daemon nor below it."""
        procs = self.live()
        keep = set()
        if self.daemon is not None and self.daemon.running():
            keep = {self.daemon.pid} | {p.pid for p in tree(procs, self.daemon.pid)}
        return [p for p in procs if p.pid not in keep]

    def check_no_orphans(self, when: str, grace: float) -> None:
        left = wait_gone(self.orphans(), grace)
        stages = [p.describe() for p in left if p.kind in ("stage", "worker", "daemon")]
        others = [p.describe() for p in left if p.kind == "other"]
        if stages:
            self.violation("orphan_stage_or_worker", when=when, processes=stages)
        if others:
            self.violation("orphan_process", when=when, processes=others)

    # ---- one round
    def round(self, n: int) -> None:
        if self.daemon is None or not self.daemon.running():
            if self.daemon is not None:
                self.ended_by_itself()
            self.start(once=self.rng.random() < self.args.once_share)
            if n > 0:
                self.restarts += 1
            self.daemon.wait_recovered(self.cache)
        time.sleep(self.rng.uniform(0.1, self.args.max_wait))  # from a recovered daemon: it gets work done
        if len(self.iterations) < self.args.max_checkpoints and self.rng.random() < self.args.add_share:
            self.new_checkpoint()
            self.event(round=n, added_checkpoint=self.iterations[-1])
        if not self.daemon.running():
            self.ended_by_itself()
            self.daemon = None
            return
        target = self.rng.choices(["daemon", "worker", "stage", "daemon+stage"], weights=[45, 15, 25, 15])[0]
        below = tree(self.live(), self.daemon.pid)
        workers = [p for p in below if p.kind == "worker"]
        stages = [p for p in below if p.kind == "stage"]
        if target == "worker" and workers:
            self.kill_child(n, "worker", self.rng.choice(workers), below)
        elif target == "stage" and stages:
            self.kill_child(n, "stage", self.rng.choice(stages), below)
        else:
            self.kill_daemon(n, target if target == "daemon+stage" and stages else "daemon")

    def ended_by_itself(self) -> None:
        code = self.daemon.proc.wait()
        self.event(daemon_exited=code, once=self.daemon.once)
        if code not in (0, -signal.SIGKILL):
            self.violation("daemon_exit", code=code, once=self.daemon.once, log_tail=self.daemon.log()[-2000:])

    def kill_child(self, n: int, kind: str, victim: Proc, below: list[Proc]) -> None:
        """SIGKILL one worker or stage process; its daemon must reap the rest of its process group."""
        group = [p for p in below if p.pgid == victim.pgid and p.pid != victim.pid]
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills[kind] += 1
        self.event(round=n, killed=kind, process=victim.describe(), group=len(group))
        left = wait_gone(group, KILL_GRACE + 5.0)
        if left and self.daemon.running():
            self.violation("group_not_reaped", killed=victim.describe(), left=[p.describe() for p in left])

    def kill_daemon(self, n: int, kind: str) -> None:
        below = tree(self.live(), self.daemon.pid)
        self.daemon.kill()
        self.kills[kind] += 1
        extra = {}
        if kind == "daemon+stage":  # e.g. the OOM killer takes a stage's leader too, while no daemon runs
            leaders = [p for p in below if p.kind == "stage" and p.pid == p.pgid and p.alive()]
            victim = self.rng.choice(leaders) if leaders else None
            if victim is not None:
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                    extra["stage"] = victim.describe()
                except ProcessLookupError:
                    pass
        self.event(round=n, killed=kind, below=len(below), **extra)
        self.check_workers_died(below)
        while True:
            self.start(once=self.rng.random() < self.args.once_share)
            self.restarts += 1
            if self.rng.random() >= self.args.early_share:
                break
            time.sleep(self.rng.uniform(0.0, 2.0))  # and kill it again while it starts or recovers
            if not self.daemon.running():
                self.ended_by_itself()
                continue
            below = tree(self.live(), self.daemon.pid)
            self.daemon.kill()
            self.kills["daemon_starting"] += 1
            self.event(round=n, killed="daemon_starting", below=len(below))
            self.check_workers_died(below)
        if not self.daemon.wait_recovered(self.cache):
            self.violation("daemon_not_started", log_tail=self.daemon.log()[-2000:])
        self.check_no_orphans(f"round {n}: once the daemon restarted after a kill of the {kind} has recovered",
                              RECOVERY_GRACE)

    def check_workers_died(self, below: list[Proc]) -> None:
        """A killed daemon's warm workers die with it (PR_SET_PDEATHSIG), before any restart."""
        left = wait_gone([p for p in below if p.kind == "worker"], 3.0)
        if left:
            self.violation("worker_outlived_daemon", workers=[p.describe() for p in left])

    # ---- the end
    def finish(self) -> int:
        if self.daemon is not None and self.daemon.running():
            self.kill_daemon(self.args.rounds, "daemon")
        if self.daemon is not None and self.daemon.running():
            self.daemon.proc.send_signal(signal.SIGTERM)  # a clean stop: its stages are stopped, rows re-queued
            try:
                code = self.daemon.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                code = "no exit within 60s of SIGTERM"
            # a forever daemon stops with 0; a --once daemon stopped before its work was done says so: 128 + SIGTERM
            if code not in (0, 128 + signal.SIGTERM if self.daemon.once else 0):
                self.violation("sigterm_stop", code=code, log_tail=self.daemon.log()[-2000:])
        self.daemon = None
        self.check_no_orphans("after a SIGTERM stop, before the final --once", KILL_GRACE + 5.0)
        final = Daemon(self.cfg, self.work, self.starts, once=True)
        self.starts += 1
        try:
            code = final.proc.wait(timeout=self.args.final_timeout)
        except subprocess.TimeoutExpired:
            final.kill()
            code = None
        if code != 0:
            self.violation("final_once", code=code, log_tail=final.log()[-3000:])
        self.daemon = None
        self.check_no_orphans("after the final --once", 5.0)
        return code

    def check(self) -> None:
        expected = {(it, b["name"]) for it in self.iterations for b in self.benchmarks}
        rows = ledger_rows(self.cache)
        states = {(r["iteration"], r["benchmark"]): r["state"] for r in rows if r["run"] == RUN}
        # a rotated-away checkpoint may have gone before the daemon saw it (no rows) or could pin it (`vanished`):
        # then nothing of it is recorded anywhere; every other row is recorded
        unseen = {(it, b) for it, b in expected - set(states) if it in self.deleted}
        if set(states) != expected - unseen:
            self.violation("ledger_keys", missing=sorted(expected - unseen - set(states)),
                           extra=sorted(set(states) - expected))
        bad = {f"{it}/{b}": s for (it, b), s in states.items()
               if s != "recorded" and not (s == "vanished" and it in self.deleted)}
        if bad:
            self.violation("ledger_not_recorded", rows=bad,
                           errors={f"{r['iteration']}/{r['benchmark']}": (r["last_error"] or "")[-300:]
                                   for r in rows if r["state"] != "recorded"})
        self.vanished = sorted(unseen | {key for key, s in states.items() if s == "vanished"})
        expected -= set(self.vanished)
        metrics = {}
        for it, b in sorted(expected):
            out = os.path.join(self.cache, "results", RUN, f"iter_{it:07d}", b)
            try:
                with open(os.path.join(out, "metrics.json")) as f:
                    metrics[(it, b)] = json.load(f)["metrics"]
            except (OSError, ValueError, KeyError) as e:
                self.violation("metrics_unreadable", key=f"{it}/{b}", error=str(e))
                continue
            bench = next(x for x in self.benchmarks if x["name"] == b)
            if bench["type"] == "command" and metrics[(it, b)] != {"rows": 1, "iteration_k": it / 1000,
                                                                     "weights_ok": 1}:
                self.violation("metrics_mixed_up", key=f"{it}/{b}", metrics=metrics[(it, b)])
            if states.get((it, b)) == "recorded":
                temps = [os.path.relpath(os.path.join(d, name), out) for d, _, names in os.walk(out) for name in names
                         if TEMP_NAME.search(name)]
                if temps:
                    self.violation("partial_files", key=f"{it}/{b}", files=temps)
        self.check_history(expected, metrics)
        if not self.args.no_wandb:
            self.check_wandb(expected, metrics)
        for name in sorted(os.listdir(os.path.join(self.work, "logs"))):
            with open(os.path.join(self.work, "logs", name), errors="replace") as f:
                text = f.read()
            for pattern, kind in (("Traceback (most recent call last)", "traceback_in_log"),
                                  ("(ignored: ", "ledger_conflict_in_log")):
                at = text.find(pattern)
                if at >= 0:
                    self.violation(kind, log=name, excerpt=text[max(0, at - 1500):at + 1500])

    def check_history(self, expected: set, metrics: dict) -> None:
        path = os.path.join(self.cache, "results", RUN, "history.jsonl")
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        counts: dict = {}
        for row in lines:
            key = (row["iteration"], row["benchmark"])
            counts[key] = counts.get(key, 0) + 1
            if key in metrics and row["metrics"] != metrics[key]:
                self.violation("history_metrics", key=f"{key[0]}/{key[1]}", history=row["metrics"],
                               metrics_json=metrics[key])
        wrong = {f"{it}/{b}": counts.get((it, b), 0) for it, b in expected | set(counts)
                 if counts.get((it, b), 0) != ((it, b) in expected)}  # once each; a vanished one never
        if wrong:
            self.violation("history_count", counts=wrong)

    def check_wandb(self, expected: set, metrics: dict) -> None:
        from recorder.wandb_sink import read_run_log, run_id, run_logs

        counts: dict = {}
        wandb_dir = os.path.join(self.cache, "wandb")
        for path in run_logs(wandb_dir, run_id("chaos", RUN)):
            for row in read_run_log(path).rows:
                if "iteration" not in row:
                    continue
                for bench in {k.split("/", 1)[0] for k in row if "/" in k and not k.startswith("_")}:
                    key = (int(row["iteration"]), bench)
                    counts[key] = counts.get(key, 0) + 1
                    got = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(bench + "/")}
                    want = metrics.get(key, {})
                    if any(got.get(m) != v for m, v in want.items()):
                        self.violation("wandb_metrics", key=f"{key[0]}/{bench}", wandb={m: got.get(m) for m in want},
                                       metrics_json=want)
        wrong = {f"{it}/{b}": counts.get((it, b), 0) for it, b in expected | set(counts)
                 if counts.get((it, b), 0) != ((it, b) in expected)}  # once each; a vanished one never
        if wrong:
            self.violation("wandb_count", counts=wrong)

    def run(self) -> dict:
        self.setup()
        Daemon.reaper = Reaper()
        for n in range(self.args.rounds):
            self.round(n)
        code = self.finish()
        self.check()
        report = {"seed": self.args.seed, "rounds": self.args.rounds, "workdir": self.work,
                  "kills": dict(self.kills, total=sum(self.kills.values())), "restarts": self.restarts,
                  "daemon_starts": self.starts, "checkpoints": self.iterations,
                  "benchmarks": [b["name"] for b in self.benchmarks], "wandb": not self.args.no_wandb,
                  "deleted_checkpoints": self.deleted, "vanished": [f"{it}/{b}" for it, b in self.vanished],
                  "final_once_exit": code, "wall_s": round(time.monotonic() - self.t0, 1),
                  "violations": self.violations, "ok": not self.violations, "events": self.events}
        return report


def ledger_rows(cache: str) -> list[dict]:
    """The ledger's rows through its own read-only view (evaluator.daemon.ledger.Ledger(readonly=True))."""
    if not os.path.exists(os.path.join(cache, "ledger.sqlite3")):
        return []
    from dataclasses import asdict

    from evaluator.daemon.ledger import Ledger

    ledger = Ledger(cache, readonly=True)
    try:
        return [asdict(job) for job in ledger.jobs()]
    except sqlite3.OperationalError:  # no schema yet: the daemon was killed before it made one
        return []
    finally:
        ledger.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--output", default=None, help="write the report (JSON) here")
    p.add_argument("--workdir", default=None, help="default: a new temporary folder (kept, named in the report)")
    p.add_argument("--model", default=None, help="a tiny hf model folder to reuse (default: built in the work dir)")
    p.add_argument("--checkpoints", type=int, default=2, help="checkpoints at the start")
    p.add_argument("--max-checkpoints", type=int, default=4, help="checkpoints added mid-run up to this many")
    p.add_argument("--add-share", type=float, default=0.3, help="share of rounds that add a checkpoint")
    p.add_argument("--max-wait", type=float, default=5.0,
                   help="longest random wait before a kill, from a recovered daemon (seconds)")
    p.add_argument("--early-share", type=float, default=0.2,
                   help="share of restarts killed again while starting or recovering")
    p.add_argument("--once-share", type=float, default=0.3, help="share of daemon starts that use --once")
    p.add_argument("--final-timeout", type=float, default=600.0)
    p.add_argument("--no-wandb", action="store_true", help="local sink only")
    p.add_argument("--no-dataset", action="store_true", help="command benchmarks only (no hf model)")
    p.add_argument("--rotate", type=int, default=0,
                   help="keep only the newest N checkpoints, deleting older ones as each new one is saved (a trainer's "
                        "save_total_limit); 0: keep all")
    p.add_argument("--keep", action="store_true", help="keep the work dir even when every check passed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    chaos = Chaos(args)
    report = chaos.run()
    k = report["kills"]
    rotated = (f"{len(report['deleted_checkpoints'])} rotated away ({len(report['vanished'])} jobs vanished), "
               if args.rotate else "")
    print(f"chaos seed {args.seed}: {args.rounds} rounds, {k['total']} kills (daemon {k['daemon']}, starting daemon "
          f"{k['daemon_starting']}, daemon+stage {k['daemon+stage']}, worker {k['worker']}, stage {k['stage']}), "
          f"{report['restarts']} restarts, {len(report['checkpoints'])} checkpoints x {len(report['benchmarks'])} "
          f"benchmarks, {rotated}{report['wall_s']}s: "
          + ("OK" if report["ok"] else f"{len(report['violations'])} VIOLATION(S)"))
    for v in report["violations"]:
        print(f"  - {v['kind']}: {json.dumps({x: y for x, y in v.items() if x != 'kind'})[:1000]}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    if report["ok"] and not args.keep and not args.workdir:
        shutil.rmtree(chaos.work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
