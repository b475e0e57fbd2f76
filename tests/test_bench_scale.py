"""scripts/bench_scale.py at --quick sizes: it runs end to end and writes every figure (a smoke run, not a timing test)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import DAEMON_PY, ROOT

FIGURES = ("first_admission_s", "rescan_nothing_new_ms", "pass_ms_200k_rows", "sigterm_to_exit_during_admission_s",
           "sigterm_to_exit_busy_pass_s", "idle_cpu_percent", "rss_mb")


@pytest.mark.slow
def test_bench_scale_quick_writes_every_figure_with_its_goal(tmp_path, venvs):
    out = tmp_path / "scale.json"
    proc = subprocess.run([DAEMON_PY, os.path.join(ROOT, "scripts", "bench_scale.py"), "--quick", "--idle-seconds", "1",
                           "--pass-seconds", "1", "--output", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in FIGURES:
        assert isinstance(doc[key], (int, float)) and not isinstance(doc[key], bool), (key, doc[key], doc["notes"])
        assert isinstance(doc["goals"][key], (int, float))
        assert isinstance(doc["met"][key], bool)
    assert doc["setup"]["rows"] == 500 * 5
