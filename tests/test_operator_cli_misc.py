"""Small operator-facing promises: Data-Juicer's misspelt flag is accepted, and the vLLM backend's
missing-install message names the README's command."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import bench, write_config
from evaluator.daemon.cli import apply_flags, build_parser
from evaluator.daemon.config import load_config
from evaluator.stages.inference.backends import ModelLoadError
from evaluator.stages.inference.backends.vllm import VLLMBackend
from evaluator.stages.inference.params import GenerationParams


def test_data_juicers_check_iterval_spelling_sets_the_poll_interval_in_minutes(tmp_path):
    """Data-Juicer's tools/evaluator.py defines the flag as `--check-iterval` (its README says --check-interval)."""
    args = build_parser().parse_args(["--config", "cfg.yaml", "--check-iterval", "0.5"])
    assert args.check_interval == 0.5
    cfg = load_config(write_config(tmp_path, [bench("a")]))
    apply_flags(cfg, args)
    assert cfg.watch.poll_seconds == 30


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this venv")
def test_vllm_missing_message_names_the_readmes_setup_command():
    with pytest.raises(ModelLoadError) as e:
        VLLMBackend("model", {}, GenerationParams()).load()
    assert "WITH_VLLM=1 make setup" in str(e.value) and "pip install" not in str(e.value)


def test_bench_py_refuses_a_generation_typo_and_a_parameter_the_backend_does_not_take_before_any_stage(tmp_path):
    from conftest import bench_py, canonical_dataset

    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "hi"}],
                                                "target": "x"}], metrics=["exact_match"])
    out = tmp_path / "out"
    proc = bench_py("inference", data, "--model", str(tmp_path / "no-model"), "--param", "max_new_token=8",
                    "--output-root", str(out))
    assert proc.returncode == 2 and "--param max_new_token" in proc.stderr and "max_new_tokens" in proc.stderr
    proc = bench_py("inference", data, "--model", str(tmp_path / "no-model"), "--backend", "openai",
                    "--param", "repetition_penalty=1.1", "--output-root", str(out))
    assert proc.returncode == 2 and "the openai backend does not take repetition_penalty" in proc.stderr
    assert not out.exists()  # nothing started
