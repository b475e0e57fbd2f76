"""The shipped examples stay valid: every config in config/ loads, and the systemd unit is sane."""
from __future__ import annotations

import configparser
import glob
import os

import pytest

from conftest import ROOT, run_cli
from evaluator.daemon.config import load_config

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "*.yaml")))


def test_there_are_example_configs():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"megatron.yaml", "huggingface.yaml", "data_juicer_minimal.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_loads_and_dry_runs(path):
    load_config(path, require_datasets=False)  # examples name datasets of the user's machine
    run_cli("--config", path, "--dry-run", check=0)


def test_systemd_unit_restarts_on_failure_and_reads_secrets_from_an_environment_file():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(os.path.join(ROOT, "config", "evaluator.service"))
    svc = unit["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["EnvironmentFile"].lstrip("-").startswith("/")
    assert "tools/evaluator.py --config" in svc["ExecStart"]
    assert svc["RestartPreventExitStatus"] == "2"  # a config error is not retried in a loop
    assert int(svc["TimeoutStopSec"]) > 10  # the daemon needs at most 10 s to stop
