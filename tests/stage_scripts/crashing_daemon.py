"""The real daemon CLI with ONE injected crash point (a fault injection for tests/test_daemon_faults.py).

    CRASH_AT=<module>:<Class.method>:<before|after> [CRASH_ON_CALL=N] \
        .venvs/daemon/bin/python tests/stage_scripts/crashing_daemon.py --config cfg.yaml ...

It imports the real daemon, wraps the one named method so that the process SIGKILLs itself right
before (or right after) the N-th call of it (default: the first), and then runs the real
`evaluator.daemon.cli.main` with the given arguments. Nothing else is changed: this is the
"kill -9 at a chosen line of the daemon" that a test cannot time from outside the process.

Examples:
    evaluator.daemon.local:LocalExecutor.submit:before   intent durable in the ledger, nothing started
    evaluator.daemon.daemon:Daemon.record_started:before stage started, its pid not yet in the ledger
    evaluator.daemon.ledger:Ledger.mark_recorded:before  a sink accepted a result, the ledger does not know
"""
import importlib
import os
import signal
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def install(spec: str, on_call: int) -> None:
    module_name, qualname, when = spec.split(":")
    if when not in ("before", "after"):
        raise SystemExit(f"crashing_daemon: CRASH_AT must end in :before or :after, got {spec!r}")
    cls_name, method_name = qualname.split(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    original = getattr(cls, method_name)
    calls = [0]
    lock = threading.Lock()

    def crash() -> None:
        sys.stderr.write(f"crashing_daemon: injected crash point reached: {when} call {on_call} of {qualname}; "
                         f"SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapped(*args, **kwargs):
        with lock:
            calls[0] += 1
            hit = calls[0] == on_call
        if hit and when == "before":
            crash()
        result = original(*args, **kwargs)
        if hit and when == "after":
            crash()
        return result

    setattr(cls, method_name, wrapped)


if __name__ == "__main__":
    install(os.environ["CRASH_AT"], int(os.environ.get("CRASH_ON_CALL", "1")))
    from evaluator.daemon.cli import main

    sys.exit(main(sys.argv[1:]))
