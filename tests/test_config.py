"""Specification of the config loader: `auto_eval:` YAML -> typed config, and every way it says no.

A user error names `file:line: key.path: what was expected` (with "did you mean" for a typo),
several problems come back in one message, and the CLI turns it into exit code 2 and one
readable `error: ...` message -- never a traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from evaluator.common.errors import EvaluatorError
from evaluator.daemon.config import COMMAND_PLACEHOLDERS, load_config

ROOT = Path(__file__).resolve().parents[1]
DAEMON_PYTHON = ROOT / ".venvs" / "daemon" / "bin" / "python"
EVALUATOR = ROOT / "tools" / "evaluator.py"

HEADER = """\
auto_eval:
  project_name: demo
  model_name: tiny
"""
COMMAND_BENCH = "{name: %s, inference: 'run {checkpoint} {output_dir}', evaluation: 'score {output_dir}'}"


def write_config(folder: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def with_header(block: str) -> str:
    """project_name and model_name, then an indented block of further `auto_eval:` keys."""
    return HEADER + textwrap.indent(textwrap.dedent(block), "  ")


def config_error(path: Path) -> str:
    """The message load_config raises for this file (fails the test when it loads)."""
    with pytest.raises(EvaluatorError) as err:
        load_config(str(path))
    return str(err.value)


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line containing `needle`."""
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not in {path}"
    return hits[nth - 1]


def run_evaluator(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(DAEMON_PYTHON), str(EVALUATOR), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


# ---- the file itself ----------------------------------------------------------------------
def test_missing_config_file_is_named_in_the_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert "no such file" in message
    assert str(missing) in message


@pytest.mark.parametrize("text, bad_line", [
    ("auto_eval:\n  project_name: demo\n\tmodel_name: tiny\n  cache_dir: c\n", 3),
    ("auto_eval:\n  project_name: demo\n  model_name: tiny: small\n  cache_dir: c\n", 3),
    ("auto_eval:\n  project_name: demo\n  model_name: tiny\n  watch:\n    settle_seconds: 2\n"
     "   order: newest-first\n  cache_dir: c\n", 6),
], ids=["tab-indent", "colon-in-value", "bad-indent"])
def test_invalid_yaml_is_reported_with_file_and_line(tmp_path, text, bad_line):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    message = config_error(path)
    assert f"{path}:{bad_line}: not valid YAML" in message


# ---- the auto_eval top key ------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n",
                                  "project_name: demo\nmodel_name: tiny\n"],
                         ids=["empty", "comment-only", "list", "scalar", "keys-without-wrapper"])
def test_config_without_auto_eval_top_key_is_rejected(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    message = config_error(path)
    assert f"{path}: expected a mapping with the top key 'auto_eval:'" in message
    assert "did you mean" not in message


@pytest.mark.parametrize("typo", ["auto_evl", "auto_evals", "autoeval"])
def test_misspelled_auto_eval_top_key_gets_did_you_mean(tmp_path, typo):
    path = write_config(tmp_path, f"{typo}:\n  project_name: demo\n  model_name: tiny\n")
    message = config_error(path)
    assert f"found '{typo}': did you mean 'auto_eval'?" in message


def test_auto_eval_that_is_not_a_mapping_is_rejected_at_its_line(tmp_path):
    path = write_config(tmp_path, "# demo\nauto_eval: tiny\n")
    message = config_error(path)
    assert f"{path}:2: auto_eval:" in message
    assert "'tiny'" in message


def test_second_top_level_key_beside_auto_eval_is_unknown(tmp_path):
    path = write_config(tmp_path, HEADER + "wandb:\n  project: demo\n")
    message = config_error(path)
    assert f"{path}:4: wandb: unknown key; known keys: auto_eval" in message


# ---- unknown keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("section, key_path, suggestion", [
    ("  cach_dir: cache\n", "auto_eval.cach_dir", "cache_dir"),
    ("  watch:\n    setle_seconds: 3\n", "auto_eval.watch.setle_seconds", "settle_seconds"),
    ("  watch:\n    paths:\n      - path: a\n      - path: b\n        layuot: megatron\n",
     "auto_eval.watch.paths[1].layuot", "layout"),
    ("  executor:\n    max_attempt: 3\n", "auto_eval.executor.max_attempt", "max_attempts"),
    ("  megatron:\n    checkpoint_pth: ckpt\n", "auto_eval.megatron.checkpoint_pth", "checkpoint_path"),
    ("  helm:\n    helm_env: crfm\n", "auto_eval.helm.helm_env", "helm_env_name"),
    ("  gpt_evaluation:\n    opanai_api_key: sk\n", "auto_eval.gpt_evaluation.opanai_api_key", "openai_api_key"),
    ("  wandb:\n    projet: demo\n", "auto_eval.wandb.projet", "project"),
    ("  benchmarks:\n    - " + COMMAND_BENCH % "a" + "\n    - name: b\n      inferenc: run\n      evaluation: score\n",
     "auto_eval.benchmarks[1].inferenc", "inference"),
], ids=["top", "watch", "watch-paths", "executor", "megatron", "helm", "gpt_evaluation", "wandb", "benchmarks"])
def test_unknown_key_is_named_with_its_line_and_a_did_you_mean(tmp_path, section, key_path, suggestion):
    path = write_config(tmp_path, HEADER + section)
    typo = key_path.rsplit(".", 1)[-1]
    message = config_error(path)
    assert f"{path}:{line_of(path, typo + ':')}: {key_path}: unknown key; did you mean '{suggestion}'?" in message


def test_unknown_key_with_no_close_match_lists_the_known_keys(tmp_path):
    path = write_config(tmp_path, HEADER + "  recorder:\n    zzzzzz: 1\n")
    message = config_error(path)
    assert f"{path}:5: auto_eval.recorder.zzzzzz: unknown key; known keys: sinks" in message


# ---- wrong values ---------------------------------------------------------------------------
@pytest.mark.parametrize("section, key_path, expected", [
    ("  watch:\n    settle_seconds: abc\n", "auto_eval.watch.settle_seconds", "valid number"),
    ("  watch:\n    settle_seconds: -1\n", "auto_eval.watch.settle_seconds", "greater than or equal to 0, got -1"),
    ("  watch:\n    poll_seconds: 0\n", "auto_eval.watch.poll_seconds", "greater than 0, got 0"),
    ("  watch:\n    begin_iteration: -5\n", "auto_eval.watch.begin_iteration", "greater than or equal to 0, got -5"),
    ("  watch:\n    iteration_interval: 0\n", "auto_eval.watch.iteration_interval", "greater than or equal to 1, got 0"),
    ("  watch:\n    order: random\n", "auto_eval.watch.order", "'oldest-first' or 'newest-first', got 'random'"),
    ("  watch:\n    layout: megatronn\n", "auto_eval.watch.layout", "got 'megatronn'"),
    ("  executor:\n    max_attempts: -1\n", "auto_eval.executor.max_attempts", "greater than or equal to 1, got -1"),
    ("  executor:\n    type: kubernetes\n", "auto_eval.executor.type", "got 'kubernetes'"),
    ("  megatron:\n    process_num: 0\n", "auto_eval.megatron.process_num", "greater than or equal to 1, got 0"),
    ("  megatron:\n    tokenizer_type: bpe\n", "auto_eval.megatron.tokenizer_type", "'gpt2' or 'sentencepiece', got 'bpe'"),
    ("  megatron:\n    token_per_iteration: -0.5\n", "auto_eval.megatron.token_per_iteration", "got -0.5"),
    ("  benchmarks:\n    - " + COMMAND_BENCH % "a" + "\n    - name: b\n      inference: run\n      evaluation: score\n"
     "      seed: abc\n", "auto_eval.benchmarks[1].seed", "valid integer"),
    ("  watch: [a, b]\n", "auto_eval.watch", "got ['a', 'b']"),
    # transformers.set_seed seeds numpy, which refuses these: every hf inference stage failed at its start
    ("  seed: -1\n", "auto_eval.seed", "greater than or equal to 0, got -1"),
    ("  benchmarks:\n    - name: a\n      inference: run\n      evaluation: score\n      seed: 4294967296\n",
     "auto_eval.benchmarks[0].seed",
     "less than or equal to 4294967295"),
], ids=["settle-not-a-number", "settle-negative", "poll-zero", "begin-negative", "interval-zero", "order-enum",
        "layout-enum", "attempts-negative", "executor-type", "process-num-zero", "tokenizer-enum",
        "tokens-negative", "benchmark-seed", "watch-not-a-mapping", "seed-negative",
        "benchmark-seed-beyond-numpy"])
def test_wrong_value_names_key_path_line_and_what_was_expected(tmp_path, section, key_path, expected):
    path = write_config(tmp_path, HEADER + section)
    key = key_path.rsplit(".", 1)[-1]
    message = config_error(path)
    assert message.startswith(f"invalid config: {path}:{line_of(path, key + ':')}: {key_path}: ")
    assert expected in message
    assert "\n" not in message  # one problem, one line


def test_wrong_value_inside_second_benchmark_points_at_that_benchmark_line(tmp_path):
    path = write_config(tmp_path, HEADER + "  benchmarks:\n"
                        "    - name: a\n      inference: run\n      evaluation: score\n      seed: 1\n"
                        "    - name: b\n      inference: run\n      evaluation: score\n      seed: abc\n")
    message = config_error(path)
    assert message.startswith(f"invalid config: {path}:{line_of(path, 'seed: abc')}: auto_eval.benchmarks[1].seed: ")


def test_missing_required_keys_are_each_named(tmp_path):
    path = write_config(tmp_path, "auto_eval:\n  cache_dir: cache\n")
    message = config_error(path)
    assert f"{path}:1: auto_eval.project_name: required key is missing" in message
    assert f"{path}:1: auto_eval.model_name: required key is missing" in message


def test_several_schema_errors_are_reported_together_each_with_its_line(tmp_path):
    path = write_config(tmp_path, with_header("""\
      watch:
        order: random
        settle_seconds: abc
      executor:
        max_attempt: 3
    """))
    message = config_error(path)
    lines = message.splitlines()
    assert lines[0] == "invalid config:"
    assert len(lines) == 4
    assert any(line.strip().startswith(f"{path}:5: auto_eval.watch.order:") for line in lines)
    assert any(line.strip().startswith(f"{path}:6: auto_eval.watch.settle_seconds:") for line in lines)
    assert any(line.strip().startswith(f"{path}:8: auto_eval.executor.max_attempt: unknown key") for line in lines)


def test_several_semantic_errors_are_reported_together(tmp_path):
    path = write_config(tmp_path, with_header("""\
      benchmarks:
        - {name: a, inference: 'run {chekpoint}', evaluation: score}
        - {name: a, inference: run, evaluation: score}
      recorder:
        sinks: [nope]
    """))
    message = config_error(path)
    assert f"{path}:5: auto_eval.benchmarks[0].inference: unknown placeholder {{chekpoint}}" in message
    assert f"{path}:6: auto_eval.benchmarks[1].name: duplicate benchmark name 'a'" in message
    assert f"{path}:8: auto_eval.recorder.sinks[0]: unknown sink 'nope'" in message


# ---- benchmarks -----------------------------------------------------------------------------
def test_duplicate_benchmark_names_point_at_the_second_one(tmp_path):
    path = write_config(tmp_path, HEADER + "  benchmarks:\n    - " + COMMAND_BENCH % "mmlu"
                        + "\n    - " + COMMAND_BENCH % "gsm8k" + "\n    - " + COMMAND_BENCH % "mmlu" + "\n")
    message = config_error(path)
    assert f"{path}:7: auto_eval.benchmarks[2].name: duplicate benchmark name 'mmlu'" in message
    assert "benchmarks[0]" not in message


def test_benchmark_name_that_cannot_be_a_folder_is_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  benchmarks:\n    - " + COMMAND_BENCH % "'a/b'" + "\n")
    message = config_error(path)
    assert "auto_eval.benchmarks[0].name:" in message
    assert "'a/b'" in message


def test_unknown_benchmark_type_lists_known_types_and_did_you_mean(tmp_path):
    path = write_config(tmp_path, HEADER + "  benchmarks:\n    - name: a\n      type: comand\n")
    message = config_error(path)
    assert f"{path}:6: auto_eval.benchmarks[0].type: unknown benchmark type 'comand'" in message
    assert "known: command" in message
    assert "did you mean 'command'?" in message


@pytest.mark.parametrize("present, missing", [("inference", "evaluation"), ("evaluation", "inference")])
def test_command_benchmark_without_a_stage_template_is_rejected(tmp_path, present, missing):
    path = write_config(tmp_path, HEADER + f"  benchmarks:\n    - name: a\n      {present}: run {{checkpoint}}\n")
    message = config_error(path)
    assert f"auto_eval.benchmarks[0].{missing}: a command benchmark needs a command template" in message
    assert f"benchmarks[0].{present}:" not in message


def test_unknown_placeholder_in_command_template_gets_did_you_mean(tmp_path):
    path = write_config(tmp_path, with_header("""\
      benchmarks:
        - name: a
          inference: run {chekpoint} --out {output_dir}
          evaluation: score {output_dir}
    """))
    message = config_error(path)
    assert message.startswith(
        f"invalid config: {path}:{line_of(path, 'inference:')}: auto_eval.benchmarks[0].inference: "
        "unknown placeholder {chekpoint}")
    assert message.endswith("did you mean '{checkpoint}'?")
    assert "\n" not in message  # {output_dir} in both templates is fine


def test_every_documented_placeholder_is_accepted_in_a_command_template(tmp_path):
    template = " ".join("{%s}" % name for name in COMMAND_PLACEHOLDERS)
    path = write_config(tmp_path, HEADER + f"  benchmarks:\n    - name: a\n      inference: '{template}'\n"
                        f"      evaluation: 'score {{{{literal}}}} {template}'\n")
    cfg = load_config(str(path))
    assert cfg.benchmarks[0].inference == template


def test_unbalanced_brace_in_command_template_is_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  benchmarks:\n    - {name: a, inference: 'awk {print', evaluation: score}\n")
    message = config_error(path)
    assert "auto_eval.benchmarks[0].inference: bad command template" in message


# ---- recorder ---------------------------------------------------------------------------------
def test_unknown_recorder_sink_is_named_with_its_index(tmp_path):
    path = write_config(tmp_path, HEADER + "  recorder:\n    sinks: [local, wandbb]\n")
    message = config_error(path)
    assert f"{path}:5: auto_eval.recorder.sinks[1]: unknown sink 'wandbb' (known: local" in message
    assert "sinks[0]" not in message


# ---- watch: glob layout and the iteration window -----------------------------------------------
@pytest.mark.parametrize("watch", [
    "  watch:\n    layout: glob\n    paths: [ckpts]\n",
    "  watch:\n    paths:\n      - {path: ckpts, layout: glob}\n",
], ids=["watch-layout", "per-path-layout"])
def test_glob_layout_without_pattern_is_rejected(tmp_path, watch):
    path = write_config(tmp_path, HEADER + watch)
    message = config_error(path)
    assert f"{path}:4: auto_eval.watch.pattern: the glob layout needs a regex with an iteration group" in message


def test_glob_pattern_that_is_not_a_regex_is_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    layout: glob\n    pattern: 'step_(\\d+'\n    paths: [c]\n")
    message = config_error(path)
    assert f"{path}:6: auto_eval.watch.pattern: not a valid regex" in message


def test_glob_pattern_without_a_group_is_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    layout: glob\n    pattern: 'step_\\d+'\n    paths: [c]\n")
    message = config_error(path)
    assert f"{path}:6: auto_eval.watch.pattern: expected a regex with an iteration group" in message


def test_glob_layout_with_an_iteration_group_is_accepted(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    layout: glob\n"
                        "    pattern: 'step_(?P<iteration>\\d+)\\.ckpt'\n    done_marker: '{name}.done'\n    paths: [c]\n")
    cfg = load_config(str(path))
    assert cfg.watch.pattern == r"step_(?P<iteration>\d+)\.ckpt"
    assert cfg.watch.done_marker == "{name}.done"


def test_done_marker_with_unknown_placeholder_is_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    done_marker: '{nam}.done'\n")
    message = config_error(path)
    assert f"{path}:5: auto_eval.watch.done_marker: expected placeholders {{name}} or {{iteration}} only" in message


def test_end_iteration_before_begin_iteration_is_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    begin_iteration: 5000\n    end_iteration: 2000\n")
    message = config_error(path)
    assert f"{path}:6: auto_eval.watch.end_iteration: expected >= begin_iteration (5000), got 2000" in message


def test_end_iteration_equal_to_begin_iteration_is_accepted(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    begin_iteration: 3000\n    end_iteration: 3000\n")
    cfg = load_config(str(path))
    assert (cfg.watch.begin_iteration, cfg.watch.end_iteration) == (3000, 3000)


def test_duplicate_watch_run_names_are_rejected(tmp_path):
    path = write_config(tmp_path, HEADER + "  watch:\n    paths:\n      - {path: a, name: r}\n      - {path: b, name: r}\n")
    message = config_error(path)
    assert "auto_eval.watch.paths[1].name: duplicate run name 'r'" in message


# ---- Data-Juicer's config, paths, secrets ---------------------------------------------------------
DATA_JUICER_CONFIG = """\
auto_eval:
  project_name: dj-eval
  model_name: llama-1b
  cache_dir: /tmp/dj-cache
  megatron:
    process_num: 4
    megatron_home: /opt/Megatron-LM
    checkpoint_path: /mnt/shared/checkpoints/llama-1b
    tokenizer_type: gpt2
    vocab_path: /mnt/shared/tokenizer/vocab.json
    merge_path: /mnt/shared/tokenizer/merges.txt
    tokenizer_path: /mnt/shared/tokenizer
    max_tokens: 1024
    token_per_iteration: 0.004
  helm:
    helm_spec_template_path: tools/evaluator/config/helm_spec_template.conf
    helm_output_path: /mnt/shared/helm_output
    helm_env_name: crfm-helm
  gpt_evaluation:
    # openai config
    openai_api_key: sk-test-do-not-print-0123456789
    openai_organization: org-demo
    # files config
    question_file: ./tools/eval/gpt_eval/config/question.jsonl
    answer_file: ./answers/llama-1b.jsonl
    baseline_file: ./tools/eval/gpt_eval/answer/openai/chatgpt.jsonl
    prompt_file: ./tools/eval/gpt_eval/config/prompt.jsonl
    reviewer_file: ./tools/eval/gpt_eval/config/reviewer.jsonl
    result_file: ./review/llama-1b.jsonl
  wandb:
    project: dj-eval
    base_url: https://wandb.example.org
"""
API_KEY = "sk-test-do-not-print-0123456789"


def test_data_juicer_full_config_is_accepted_as_is(tmp_path):
    cfg = load_config(str(write_config(tmp_path, DATA_JUICER_CONFIG)))
    assert (cfg.project_name, cfg.model_name, cfg.cache_dir) == ("dj-eval", "llama-1b", "/tmp/dj-cache")
    m = cfg.megatron
    assert (m.process_num, m.megatron_home, m.checkpoint_path) == (4, "/opt/Megatron-LM", "/mnt/shared/checkpoints/llama-1b")
    assert (m.tokenizer_type, m.vocab_path, m.merge_path) == ("gpt2", "/mnt/shared/tokenizer/vocab.json",
                                                              "/mnt/shared/tokenizer/merges.txt")
    assert (m.tokenizer_path, m.max_tokens) == ("/mnt/shared/tokenizer", 1024)
    assert cfg.token_per_iteration == pytest.approx(0.004)
    assert (cfg.helm.helm_spec_template_path, cfg.helm.helm_output_path, cfg.helm.helm_env_name) == (
        "tools/evaluator/config/helm_spec_template.conf", "/mnt/shared/helm_output", "crfm-helm")
    g = cfg.gpt_evaluation
    assert g.openai_api_key.get_secret_value() == API_KEY
    assert g.openai_organization == "org-demo"
    assert (g.question_file, g.answer_file, g.result_file) == (
        "./tools/eval/gpt_eval/config/question.jsonl", "./answers/llama-1b.jsonl", "./review/llama-1b.jsonl")
    assert (g.baseline_file, g.prompt_file, g.reviewer_file) == (
        "./tools/eval/gpt_eval/answer/openai/chatgpt.jsonl", "./tools/eval/gpt_eval/config/prompt.jsonl",
        "./tools/eval/gpt_eval/config/reviewer.jsonl")
    assert (cfg.wandb.project, cfg.wandb.base_url) == ("dj-eval", "https://wandb.example.org")


def test_openai_api_key_is_hidden_when_the_config_is_printed(tmp_path):
    cfg = load_config(str(write_config(tmp_path, DATA_JUICER_CONFIG)))
    assert API_KEY not in repr(cfg)
    assert API_KEY not in str(cfg)
    assert API_KEY not in cfg.model_dump_json()


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs" / "exp1"
    path = write_config(cfg_dir, with_header("""\
      cache_dir: ../cache
      megatron:
        checkpoint_path: ckpts/megatron
      watch:
        paths:
          - runs/a
          - {path: ./runs/b, name: b}
      envs:
        inference: venvs/inference
        evaluation: /opt/venvs/evaluation
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(path, elsewhere))
    assert cfg.cache_dir == str(tmp_path / "configs" / "cache")
    assert cfg.megatron.checkpoint_path == str(cfg_dir / "ckpts" / "megatron")
    assert [p.path for p in cfg.watch.paths] == [str(cfg_dir / "runs" / "a"), str(cfg_dir / "runs" / "b")]
    assert cfg.envs.inference == str(cfg_dir / "venvs" / "inference")
    assert cfg.envs.evaluation == "/opt/venvs/evaluation"


def test_default_cache_dir_lives_beside_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "cfgs", HEADER)
    assert load_config(str(path)).cache_dir == str(tmp_path / "cfgs" / "cache")


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_config(tmp_path, HEADER + "  cache_dir: ~/eval-cache\n")
    assert load_config(str(path)).cache_dir == str(tmp_path / "home" / "eval-cache")


# ---- the CLI: exit code 2, one readable message, no traceback --------------------------------------
@pytest.mark.parametrize("text, named", [
    (HEADER + "  watch:\n    setle_seconds: 3\n", "auto_eval.watch.setle_seconds"),
    (HEADER + "  watch:\n    settle_seconds: abc\n", "auto_eval.watch.settle_seconds"),
    (HEADER + "  benchmarks:\n    - {name: a, inference: 'run {chekpoint}', evaluation: score}\n",
     "auto_eval.benchmarks[0].inference"),
    ("auto_evl:\n  project_name: demo\n", "auto_eval"),
    ("auto_eval:\n  project_name: [demo\n", "not valid YAML"),
], ids=["unknown-key", "wrong-type", "unknown-placeholder", "no-top-key", "invalid-yaml"])
def test_cli_bad_config_exits_2_with_one_readable_error(tmp_path, text, named):
    path = write_config(tmp_path, text)
    result = run_evaluator("--config", str(path), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: invalid config")
    assert result.stderr.count("error:") == 1
    assert named in result.stderr
    assert str(path) in result.stderr
    assert result.stdout == ""


def test_cli_missing_config_file_exits_2_without_traceback(tmp_path):
    result = run_evaluator("--config", str(tmp_path / "nope.yaml"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --config: no such file")


def test_cli_dry_run_never_prints_the_openai_api_key(tmp_path):
    from conftest import megatron_checkpoint
    ckpts = tmp_path / "ckpts"
    megatron_checkpoint(ckpts, 1000)  # the files a Megatron save writes, so the checkpoint is complete
    text = DATA_JUICER_CONFIG.replace("/mnt/shared/checkpoints/llama-1b", str(ckpts)).replace(
        "/tmp/dj-cache", str(tmp_path / "cache"))
    path = write_config(tmp_path, text)
    as_json = run_evaluator("--config", str(path), "--dry-run", "--json", cwd=tmp_path)
    as_text = run_evaluator("--config", str(path), "--dry-run", "-v", cwd=tmp_path)
    for result in (as_json, as_text):
        assert result.returncode == 0, result.stderr
        assert API_KEY not in result.stdout + result.stderr
    # the dry run did read this config: it planned the one checkpoint
    assert [job["iteration"] for job in json.loads(as_json.stdout)] == [1000]
    assert "iter_0001000" in as_text.stdout


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("auto_eval:\n  project_name: a\n  model_name: b\n  megatron: {checkpoint_path: x}\n"
                    "  megatron: {checkpoint_path: y}\n")
    with pytest.raises(EvaluatorError) as e:
        load_config(str(path))
    assert f"{path}:5" in str(e.value) and "'megatron' given twice (first on line 4)" in str(e.value)


def test_unknown_sink_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("auto_eval:\n  project_name: a\n  model_name: b\n  recorder:\n    sinks: [locl]\n")
    with pytest.raises(EvaluatorError) as e:
        load_config(str(path))
    assert "auto_eval.recorder.sinks[0]" in str(e.value) and "did you mean 'local'" in str(e.value)


def test_a_format_spec_that_cannot_apply_is_caught_when_the_config_loads(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("auto_eval:\n  project_name: a\n  model_name: b\n  benchmarks:\n    - name: x\n"
                    "      inference: 'run {checkpoint:07d}'\n      evaluation: 'score iter_{iteration:07d}'\n")
    with pytest.raises(EvaluatorError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert "benchmarks[0].inference" in msg and "bad format spec" in msg
    assert "evaluation" not in msg  # {iteration:07d} is fine


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"auto_eval:\n  project_name: \xff\xfe\n")
    with pytest.raises(EvaluatorError, match="not UTF-8"):
        load_config(str(path))


@pytest.mark.parametrize("watch,expected", [
    ({"paths": ["/x/exp1/ckpt", "/x/exp2/ckpt"]}, "two runs are named 'ckpt'"),
    ({"paths": [{"path": "/x/a", "name": "../escape"}, "/x/b"]}, "without '..'"),
])
def test_run_names_must_be_distinct_and_stay_inside_the_results_tree(tmp_path, watch, expected):
    import yaml as _yaml
    from evaluator.daemon.build import resolve_runs
    path = tmp_path / "cfg.yaml"
    path.write_text(_yaml.safe_dump({"auto_eval": {"project_name": "a", "model_name": "b", "watch": watch}}))
    with pytest.raises(EvaluatorError, match=expected):
        resolve_runs(load_config(str(path)))


def test_a_watch_path_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "not_a_dir").write_text("x")
    path = tmp_path / "cfg.yaml"
    path.write_text(f"auto_eval:\n  project_name: a\n  model_name: b\n  watch:\n    paths: [{tmp_path / 'not_a_dir'}]\n")
    proc = subprocess.run([str(DAEMON_PYTHON), str(EVALUATOR), "--config", str(path), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_per_run_benchmarks_limit_what_runs_where(tmp_path):
    from conftest import megatron_checkpoint, run_cli, write_config
    megatron_checkpoint(tmp_path / "a", 1000)
    megatron_checkpoint(tmp_path / "b", 1000)
    b1 = {"name": "one", "type": "command", "inference": "true", "evaluation": "true"}
    b2 = {**b1, "name": "two"}
    watch = {"paths": [{"path": str(tmp_path / "a"), "name": "ra", "benchmarks": ["one"]},
                       {"path": str(tmp_path / "b"), "name": "rb"}]}
    cfg = write_config(tmp_path, [b1, b2], watch=watch)
    jobs = json.loads(run_cli("--config", cfg, "--dry-run", "--json", check=0).stdout)
    assert sorted((j["run"], j["benchmark"]) for j in jobs) == [("ra", "one"), ("rb", "one"), ("rb", "two")]
    watch["paths"][0]["benchmarks"] = ["tow"]
    cfg = write_config(tmp_path, [b1, b2], watch=watch)
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "watch.paths[0].benchmarks[0]" in r.stderr and "did you mean 'two'" in r.stderr


def test_secrets_in_benchmark_options_are_refused(tmp_path):
    from conftest import run_cli, write_config
    (tmp_path / "d").mkdir()
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": str(tmp_path / "d"), "backend": "openai",
                                   "backend_options": {"api_key": "sk-123"},
                                   "metric_options": {"llm_judge": {"api_key": "sk-456"}}}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2
    assert "benchmarks[0].backend_options.api_key" in r.stderr and "api_key_env" in r.stderr
    assert "benchmarks[0].metric_options.llm_judge.api_key" in r.stderr
    assert "sk-123" not in r.stderr and "sk-456" not in r.stderr


def test_unknown_metric_names_fail_at_config_load_not_after_inference(tmp_path):
    from conftest import run_cli, write_config
    (tmp_path / "d").mkdir()
    cfg = write_config(tmp_path, [{"name": "qa", "type": "dataset", "dataset": str(tmp_path / "d"),
                                   "metrics": ["exact_match", "cider"]}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "benchmarks[0].metrics: unknown metric 'cider'" in r.stderr and "cider_d" in r.stderr


def test_loader_option_typos_fail_at_config_load(tmp_path):
    from conftest import run_cli, write_config
    (tmp_path / "d").mkdir()
    cfg = write_config(tmp_path, [{"name": "c", "type": "clotho", "dataset": str(tmp_path / "d"),
                                   "options": {"spilt": "development"}}])
    r = run_cli("--config", cfg, "--dry-run")
    assert r.returncode == 2 and "benchmarks[0].options.spilt" in r.stderr and "did you mean 'split'" in r.stderr


# ---- the free-form blocks of a benchmark: checked against what the stages read ---------------
DATASET_BENCH = "  benchmarks:\n    - name: qa\n      type: dataset\n      dataset: d\n"


@pytest.mark.parametrize("block, key_path, expected", [
    ("      generation: {max_new_token: 4}\n", "generation.max_new_token",
     "unknown generation parameter; did you mean 'max_new_tokens'?"),
    ("      generation: {max_new_tokens: -3}\n", "generation.max_new_tokens", "expected an integer >= 1, got -3"),
    ("      generation: {temperature: -1}\n", "generation.temperature", "expected a number >= 0, got -1"),
    ("      generation: {top_p: 2}\n", "generation.top_p", "expected a number <= 1, got 2"),
    ("      generation: {stop: 5}\n", "generation.stop", "expected a string or a list of strings"),
    ("      backend: openai\n      backend_options: {max_concurency: 4}\n", "backend_options.max_concurency",
     "not an option of the openai backend; did you mean 'max_concurrency'?"),
    ("      backend_options: {max_concurency: 4}\n", "backend_options.max_concurency", "not an option of the hf backend"),
    ("      backend: vllm\n      backend_options: {tensor_parallel: 2}\n", "backend_options.tensor_parallel",
     "did you mean 'tensor_parallel_size'?"),
    ("      backend: vlm\n", "backend", "unknown backend 'vlm'; did you mean 'vllm'?"),
    ("      metrics: [exact_match, token_f1]\n      metric_options: {exact_matc: {x: 1}}\n",
     "metric_options.exact_matc", "did you mean 'exact_match'?"),
    ("      metric_options: {sbert_simm: {sbert_model: m}}\n", "metric_options.sbert_simm",
     "unknown metric 'sbert_simm'; did you mean 'sbert_sim'?"),
    ("      metrics: [exact_match]\n      metric_options: {sbert_sim: {sbert_model: m}}\n", "metric_options.sbert_sim",
     "'sbert_sim' is not one of this benchmark's metrics (exact_match)"),
], ids=["generation-typo", "max-new-tokens-negative", "temperature-negative", "top-p-above-1", "stop-not-strings",
        "openai-option-typo", "hf-option-unknown", "vllm-option-typo", "backend-typo", "metric-options-typo",
        "metric-options-unknown-metric", "metric-options-not-a-benchmark-metric"])
def test_free_form_block_mistakes_fail_at_config_load_with_file_line_and_key(tmp_path, block, key_path, expected):
    (tmp_path / "d").mkdir()
    path = write_config(tmp_path, HEADER + DATASET_BENCH + block)
    needle = key_path.split(".")[0] + ":"
    message = config_error(path)
    assert message.startswith(f"invalid config: {path}:{line_of(path, needle)}: auto_eval.benchmarks[0].{key_path}: ")
    assert expected in message
    assert "\n" not in message  # one problem, one line


def test_valid_generation_backend_and_metric_options_load(tmp_path):
    (tmp_path / "d").mkdir()
    path = write_config(tmp_path, HEADER + DATASET_BENCH + (
        "      backend: openai\n"
        "      generation: {max_new_tokens: 8, temperature: 0, top_p: 0.9, stop: ['\\n'], presence_penalty: 0.1}\n"
        "      backend_options: {base_url: 'http://127.0.0.1:9/v1', max_concurrency: 2, api_key_env: K}\n"
        "      metrics: [bleu, exact_match]\n"
        "      metric_options: {bleu_4: {}, exact_match: {}}\n"))
    bench = load_config(str(path)).benchmarks[0]
    assert bench.generation["max_new_tokens"] == 8 and bench.backend_options["max_concurrency"] == 2
