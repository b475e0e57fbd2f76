"""Serve a local checkpoint behind an OpenAI-compatible endpoint for the `openai` backend.

`vllm serve` when vLLM and a CUDA GPU are present, else `transformers serve`, on a free 127.0.0.1 port.
The server runs in its own process group (so stopping it also stops the workers vLLM forks) and is told by the
kernel to exit when the stage process dies (PR_SET_PDEATHSIG), so a stage killed by the daemon's timeout does
not leave a server holding the GPU. Its stdout/stderr go to a log file; when it dies or never gets healthy, the
error shows the log's tail.

The model name requests must carry is the checkpoint path as given: `transformers serve PATH` pins the server
to PATH (any other name is a 400) and `vllm serve PATH` lists PATH in /v1/models.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from evaluator.stages.checkpoint_compat import checkpoint_view, release_view

SERVERS = ("auto", "vllm", "transformers")
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1


class ServerError(Exception):
    """The server could not be started or did not become healthy; the message carries its log's tail."""


@dataclass
class ModelServer:
    kind: str  # "vllm" | "transformers"
    command: list
    base_url: str  # http://127.0.0.1:PORT/v1
    model_name: str
    log_path: str
    keep_log: bool
    proc: subprocess.Popen
    view: Optional[str] = None  # the translated checkpoint view the server reads (checkpoint_compat), removed by stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError as e:
            return f"(log {self.log_path} unreadable: {e})"

    def stop(self, grace: float = 10.0) -> Optional[int]:
        """SIGTERM the server's process group, SIGKILL it after `grace` seconds; returns the exit code."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # workers the server forked may outlive it; the group still names them
        _signal_group(self.proc.pid, signal.SIGKILL)
        if not self.keep_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        if self.view:
            release_view(self.view)
        return self.proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_server(server: str = "auto") -> str:
    if server not in SERVERS:
        raise ServerError(f"backend_options.server: expected one of {', '.join(SERVERS)}, got {server!r}")
    if server != "auto":
        return server
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    from .backends.vllm import vllm_device  # the vllm backend's rule: the device vLLM itself finds
    return "vllm" if vllm_device() == "cuda" else "transformers"


def _executable(name: str) -> str:
    """The console script installed beside this interpreter (the inference venv's), else one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else name


def server_command(kind: str, model: str, host: str, port: int, seed: int, options: dict) -> list:
    """The command line for `kind`; `options` may carry device, dtype and extra `serve_args`."""
    extra = options.get("serve_args") or []
    extra = extra.split() if isinstance(extra, str) else [str(a) for a in extra]
    if kind == "vllm":
        cmd = [_executable("vllm"), "serve", model, "--host", host, "--port", str(port), "--seed", str(seed)]
        if options.get("dtype"):
            cmd += ["--dtype", str(options["dtype"])]
    else:
        cmd = [_executable("transformers"), "serve", "--host", host, "--port", str(port),
               "--default-seed", str(seed), "--device", str(options.get("device") or "auto")]
        if options.get("dtype"):
            cmd += ["--dtype", str(options["dtype"])]
        cmd.append(model)  # the forced model: preloaded before the port opens, the only one it answers for
    return cmd + extra


def _die_with_parent(parent_pid: int):
    def preexec():
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
    return preexec


def start_server(model: str, server: str = "auto", seed: int = 0, options: Optional[dict] = None,
                 host: str = "127.0.0.1", health_timeout: float = 600.0, log=None) -> ModelServer:
    """Start a server for `model` and wait until it answers /health; raises ServerError with the log's tail."""
    options = dict(options or {})
    kind = pick_server(server)
    port = int(options.get("serve_port") or free_port(host))
    # the server is this venv's (vllm's pins transformers 4.x): it reads the checkpoint or a translated view of it,
    # never misreads it (CheckpointFormatError otherwise, exit 2)
    source = checkpoint_view(model, log=log)
    cmd = server_command(kind, source, host, port, seed, options)
    if source != model and kind == "vllm":
        cmd[3:3] = ["--served-model-name", model]  # requests keep naming the checkpoint as given
    keep_log = bool(options.get("serve_log"))
    if keep_log:
        log_path = os.path.abspath(str(options["serve_log"]))
    else:
        fd, log_path = tempfile.mkstemp(prefix=f"evaluator-{kind}-serve-", suffix=".log")
        os.close(fd)
    if log:
        log(f"starting {kind} serve on {host}:{port} (log {log_path}): {' '.join(cmd)}")
    with open(log_path, "ab") as logf:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        except OSError as e:
            raise ServerError(f"cannot start {kind} serve ({cmd[0]}): {e}") from None
    # transformers serve answers only for the folder it was given
    served = ModelServer(kind=kind, command=cmd, base_url=f"http://{host}:{port}/v1",
                         model_name=model if kind == "vllm" else source, log_path=log_path, keep_log=keep_log,
                         proc=proc, view=source if source != model else None)
    try:
        wait_healthy(served, health_timeout)
    except BaseException:
        served.keep_log = True  # the evidence stays for whoever reads the error
        served.stop()
        raise
    return served


def wait_healthy(served: ModelServer, timeout: float) -> None:
    root = served.base_url[: -len("/v1")]
    deadline = time.monotonic() + timeout
    while True:
        code = served.proc.poll()
        if code is not None:
            raise ServerError(f"{served.kind} serve exited with code {code} before it was healthy; "
                              f"last lines of {served.log_path}:\n{served.log_tail()}")
        try:
            with urllib.request.urlopen(root + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet (or loading)
        if time.monotonic() > deadline:
            raise ServerError(f"{served.kind} serve was not healthy after {timeout:.0f}s (serve_timeout); "
                              f"last lines of {served.log_path}:\n{served.log_tail()}")
        time.sleep(0.5)
