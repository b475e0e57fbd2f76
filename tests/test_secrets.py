"""The one secret policy (evaluator/common/secrets.py) and every place that applies it: the config check, the
run_metadata.json of the inference stage, and what the W&B and MLflow sinks publish as run config."""
from __future__ import annotations

import pytest

from evaluator.common.secrets import is_secret, redact, redact_obj, secret_paths


@pytest.mark.parametrize("key", ["api_key", "openai_api_key", "hf_token", "token", "password", "secret",
                                 "access_key_id", "AWS_SECRET_ACCESS_KEY", "Authorization", "x-api-key", "apiKey",
                                 "HF_TOKEN", "client_secret"])
def test_keys_that_name_credentials_are_secrets(key):
    assert is_secret(key)


@pytest.mark.parametrize("key", ["api_key_env", "hf_token_env", "max_tokens", "max_new_tokens", "token_per_iteration",
                                 "tokenizer", "tokenizer_path", "tokens_b", "pad_token", "stop_token", "max_new_token",
                                 "keyword", "batch_size"])
def test_token_counts_tokenizers_and_env_variable_names_are_not_secrets(key):
    assert not is_secret(key)


def test_command_lines_lose_the_values_of_secret_flags_and_assignments_only():
    line = ("OPENAI_API_KEY=sk-live1234567890 python judge.py --api-key=abc123 --token xyz --max-tokens 5 "
            "--tokens {tokens_b} -H 'Authorization: Bearer tok987'")
    assert redact(line) == ("OPENAI_API_KEY=*** python judge.py --api-key=*** --token *** --max-tokens 5 "
                            "--tokens {tokens_b} -H 'Authorization: Bearer ***")


def test_an_openai_style_key_is_redacted_wherever_it_stands():
    assert redact("curl -d key:sk-abcdefgh12345678") == "curl -d key:***"


def test_secret_named_values_are_masked_at_any_depth_and_env_names_kept():
    masked = redact_obj({"api_key": "sk-1", "api_key_env": "MY_KEY", "batch_size": 4,
                         "request_defaults": {"extra_headers": {"Authorization": "Bearer x"}, "top_k": 1},
                         "engines": [{"hf_token": "hf_abc"}, {"hf_token": ""}]})
    assert masked == {"api_key": "***", "api_key_env": "MY_KEY", "batch_size": 4,
                      "request_defaults": {"extra_headers": {"Authorization": "***"}, "top_k": 1},
                      "engines": [{"hf_token": "***"}, {"hf_token": ""}]}


def test_secret_paths_name_every_secret_key_at_any_depth():
    assert secret_paths({"request_defaults": {"api_key": "x"}, "engine_args": [{"hf_token": "y"}], "device": "cpu"}) \
        == [("request_defaults", "api_key"), ("engine_args", 0, "hf_token")]


# ---- the config refuses them ----------------------------------------------------------------
@pytest.mark.parametrize("block, value, where", [
    ("backend_options", {"openai_api_key": "sk-123456789"}, "backend_options.openai_api_key"),
    ("backend_options", {"request_defaults": {"api_key": "sk-123456789"}}, "backend_options.request_defaults.api_key"),
    ("backend_options", {"hf_token": "hf_123456789"}, "backend_options.hf_token"),
    ("options", {"hf_token": "hf_123456789"}, "options.hf_token"),
    ("metric_options", {"llm_judge": {"extra": {"password": "hunter2hunter2"}}},
     "metric_options.llm_judge.extra.password"),
])
def test_the_config_refuses_secret_named_keys_at_any_depth(tmp_path, block, value, where):
    from conftest import write_config

    from evaluator.common.errors import EvaluatorError
    from evaluator.daemon.config import load_config
    (tmp_path / "d").mkdir()
    bench = {"name": "qa", "type": "dataset", "dataset": str(tmp_path / "d"), "backend": "openai", "metrics": ["exact_match"], block: value}
    if block == "metric_options":
        bench["metrics"] = ["llm_judge"]
    with pytest.raises(EvaluatorError) as err:
        load_config(write_config(tmp_path, [bench]))
    message = str(err.value)
    assert f"benchmarks[0].{where}: a secret does not belong in the config" in message
    assert f"{where.rsplit('.', 1)[-1]}_env: VARIABLE_NAME" in message
    assert "123456789" not in message and "hunter2" not in message


def test_the_config_accepts_a_secret_given_by_environment_variable_name(tmp_path):
    from conftest import write_config

    from evaluator.daemon.config import load_config
    (tmp_path / "d").mkdir()
    bench = {"name": "qa", "type": "dataset", "dataset": str(tmp_path / "d"), "backend": "openai", "metrics": ["exact_match"],
             "backend_options": {"api_key_env": "MY_KEY", "base_url": "http://127.0.0.1:9/v1"}}
    assert load_config(write_config(tmp_path, [bench])).benchmarks[0].backend_options["api_key_env"] == "MY_KEY"


# ---- the sinks never publish them -------------------------------------------------------------
def test_run_config_handed_to_the_sinks_holds_no_secret_at_any_depth(tmp_path):
    """W&B config and MLflow params are RecorderSettings.run_config; a nested hf_token once reached W&B as is."""
    from evaluator.daemon.config import AutoEvalConfig
    from evaluator.daemon.sink_setup import settings_from_config
    cfg = AutoEvalConfig.model_validate({
        "project_name": "p", "model_name": "m", "cache_dir": str(tmp_path),
        "benchmarks": [{"name": "b", "type": "dataset", "dataset": "d",
                        "backend_options": {"engine_args": {"hf_token": "hf_live_123"}, "device": "cpu"}}]})
    run_config = settings_from_config(cfg).run_config
    assert run_config["benchmarks"][0]["backend_options"] == {"engine_args": {"hf_token": "***"}, "device": "cpu"}


def test_recorder_settings_mask_whatever_run_config_a_caller_builds(tmp_path):
    from recorder.sinks import MlflowSettings, RecorderSettings, WandbSettings
    settings = RecorderSettings(cache_dir=str(tmp_path), project="p", wandb=WandbSettings(project="p"),
                                mlflow=MlflowSettings(tracking_uri="sqlite:///x", experiment="p"),
                                run_config={"source": "helm", "extra": {"api_key": "sk-abcdefgh12345678"}})
    assert settings.run_config == {"source": "helm", "extra": {"api_key": "***"}}


def test_bench_py_refuses_a_secret_backend_option_and_writes_it_nowhere(tmp_path):
    from conftest import bench_py, canonical_dataset

    data = canonical_dataset(tmp_path / "ds", [{"id": "1", "messages": [{"role": "user", "content": "hi"}],
                                                "target": "x"}], metrics=["exact_match"])
    proc = bench_py("inference", data, "--model", str(tmp_path / "model"), "--backend-opt", "hf_token=sekrit-123",
                    "--output-root", str(tmp_path / "out"))
    assert proc.returncode == 2 and "hf_token_env=VARIABLE_NAME" in proc.stderr and "Traceback" not in proc.stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and "sekrit-123" in p.read_text(errors="replace")]
    assert written == []
