"""The real daemon CLI with ONE sink that refuses one result (a fault injection for tests/test_daemon_faults.py).

    REFUSE_SINK=<module>:<Class> REFUSE_ITERATION=N REFUSE_WHILE=<file> \
        .venvs/daemon/bin/python tests/stage_scripts/refusing_sink_daemon.py --config cfg.yaml ...

The named sink's `record` raises for results of iteration N for as long as the file REFUSE_WHILE exists (the
"operator's fix" is deleting it); every other call goes to the real sink. A result that one real sink refuses every
time cannot be produced for real here: every value a stage may report is one each sink takes (validate_metrics),
so this is the one thing injected; the daemon, the sinks and their stores are real.
"""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def install(spec: str, iteration: int, marker: str) -> None:
    module_name, cls_name = spec.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    original = cls.record

    def record(self, result):
        if result.iteration == iteration and os.path.exists(marker):
            raise ValueError(f"refusing_sink_daemon: injected refusal of iteration {iteration}")
        return original(self, result)

    cls.record = record


if __name__ == "__main__":
    install(os.environ["REFUSE_SINK"], int(os.environ["REFUSE_ITERATION"]), os.environ["REFUSE_WHILE"])
    from evaluator.daemon.cli import main

    sys.exit(main(sys.argv[1:]))
