"""Specification of what config load checks inside `generation:` and `metric_options:`: a parameter the chosen
backend would refuse or ignore, a metric option no computed metric reads and a value a metric cannot convert fail
before any work starts, naming the key path; what the backends and metrics really take still loads."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from evaluator.common.errors import EvaluatorError
from evaluator.daemon.config import load_config
from evaluator.stages.evaluation import metrics as metric_registry
from evaluator.stages.inference import backends, params

ROOT = Path(__file__).resolve().parents[1]
HEADER = "auto_eval:\n  project_name: demo\n  model_name: tiny\n  benchmarks:\n    - name: qa\n      type: dataset\n" \
         "      dataset: d\n"


def write_config(tmp_path: Path, block: str) -> Path:
    (tmp_path / "d").mkdir(exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(HEADER + block, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(EvaluatorError) as err:
        load_config(str(path))
    return str(err.value)


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# ---- generation: against the chosen backend ---------------------------------------------------------------------
def test_misspelled_generation_parameter_is_refused_with_did_you_mean(tmp_path):
    path = write_config(tmp_path, "      generation: {max_new_token: 8}\n")
    message = config_error(path)
    assert f"{path}:{line_of(path, 'generation:')}: auto_eval.benchmarks[0].generation.max_new_token: " \
           "unknown generation parameter; did you mean 'max_new_tokens'?" in message


@pytest.mark.parametrize("backend, key, value, taken_by", [
    ("openai", "stop_token_ids", "[2]", "the vllm backend does"),  # OpenAI answers 400, transformers serve 422
    ("openai", "top_k", "20", "the hf and vllm backends do"),
    ("openai", "language", "en", "the hf backend does"),  # an hf-only generate() kwarg sent to a server
    ("hf", "presence_penalty", "0.5", "the vllm and openai backends do"),  # generate(): "model_kwargs not used"
    ("hf", "stop_token_ids", "[2]", "the vllm backend does"),
    ("vllm", "num_beams", "4", "the hf backend does"),  # SamplingParams: unexpected keyword argument
    ("vllm", "min_new_tokens", "2", "the hf backend does"),
], ids=lambda v: str(v))
def test_generation_parameter_the_backend_does_not_take_is_refused_naming_the_backend(tmp_path, backend, key, value,
                                                                                     taken_by):
    generation = f"{{max_new_tokens: 8, {key}: {value}}}"
    path = write_config(tmp_path, f"      backend: {backend}\n      generation: {generation}\n")
    message = config_error(path)
    assert f"{path}:{line_of(path, 'generation:')}: auto_eval.benchmarks[0].generation.{key}: the {backend} backend " \
           f"does not take {key} ({taken_by})" in message
    assert "it takes max_new_tokens, max_tokens, temperature, top_p, stop" in message


def test_a_server_only_field_for_the_openai_backend_is_pointed_to_request_defaults(tmp_path):
    message = config_error(write_config(tmp_path, "      backend: openai\n      generation: {repetition_penalty: 1.1}\n"))
    assert "backend_options.request_defaults" in message


def test_max_tokens_beside_max_new_tokens_is_refused_since_one_would_be_dropped(tmp_path):
    path = write_config(tmp_path, "      generation: {max_new_tokens: 8, max_tokens: 16}\n")
    assert "auto_eval.benchmarks[0].generation.max_tokens: another name of max_new_tokens, which is given too" \
           in config_error(path)


@pytest.mark.parametrize("backend, generation", [
    ("hf", "{max_new_tokens: 8, top_k: 5, min_new_tokens: 1, num_beams: 2, repetition_penalty: 1.1, "
           "no_repeat_ngram_size: 3, length_penalty: 1.0, num_return_sequences: 1}"),
    ("hf", "{max_new_tokens: 32, language: en, task: transcribe}"),  # Whisper-style checkpoints
    ("vllm", "{max_tokens: 8, top_k: -1, min_p: 0.1, presence_penalty: 0.5, frequency_penalty: 0.5, "
             "stop_token_ids: [2], ignore_eos: false, n: 1}"),
    ("openai", "{max_new_tokens: 8, temperature: 0.7, top_p: 0.9, stop: ['\\n'], presence_penalty: 0.1, n: 1}"),
], ids=["hf", "hf-whisper", "vllm", "openai"])
def test_generation_parameters_a_backend_takes_load(tmp_path, backend, generation):
    path = write_config(tmp_path, f"      backend: {backend}\n      generation: {generation}\n"
                                  "      metrics: [exact_match]\n")
    assert load_config(str(path)).benchmarks[0].backend == backend


def test_the_inference_stage_refuses_what_the_backend_does_not_take_when_told_the_backend():
    with pytest.raises(EvaluatorError, match=r"generation\.stop_token_ids: the openai backend does not take"):
        params.GenerationParams.from_dict({"stop_token_ids": [2]}, "generation", backend="openai")
    assert params.GenerationParams.from_dict({"stop_token_ids": [2]}, backend="vllm").extra == {"stop_token_ids": [2]}


def test_every_generation_parameter_is_taken_by_some_backend_and_every_backend_name_is_in_the_table():
    taken = {key: [name for name in backends.BACKENDS if key in backends.backend_class(name).GENERATION]
             for key in params.GENERATION_PARAMS}
    assert [key for key, names in taken.items() if not names] == []
    for name in backends.BACKENDS:
        generation = backends.backend_class(name).GENERATION
        assert set(generation) <= set(params.GENERATION_PARAMS), name
        assert generation[:len(params.COMMON_GENERATION)] == params.COMMON_GENERATION, name


# ---- metric_options: option names and values ------------------------------------------------------------------
def test_misspelled_metric_option_is_refused_with_did_you_mean(tmp_path):
    path = write_config(tmp_path, "      metrics: [sbert_sim]\n      metric_options: {sbert_sim: {sbert_modle: x}}\n")
    message = config_error(path)
    assert f"{path}:{line_of(path, 'metric_options:')}: auto_eval.benchmarks[0].metric_options.sbert_sim.sbert_modle: " \
           "not an option of sbert_sim; did you mean 'sbert_model'?" in message


@pytest.mark.parametrize("option, expected", [
    ("timeout: soon", "timeout: expected a number, got 'soon'"),
    ("timeout: 0", "timeout: expected a number > 0, got 0"),
    ("max_concurrency: 2.5", "max_concurrency: expected an integer, got 2.5"),  # int() would make it 2
    ("max_retries: yes", "max_retries: expected an integer, got True"),
    ("max_failure_rate: 2", "max_failure_rate: expected a number <= 1, got 2"),
], ids=["timeout-word", "timeout-zero", "concurrency-fraction", "retries-bool", "failure-rate-above-1"])
def test_judge_option_value_the_judge_cannot_convert_is_refused(tmp_path, option, expected):
    path = write_config(tmp_path, f"      metrics: [llm_judge]\n      metric_options:\n        llm_judge:\n"
                                  f"          {option}\n")
    assert f"auto_eval.benchmarks[0].metric_options.llm_judge.{expected}" in config_error(path)


def test_caption_option_value_that_is_not_a_number_is_refused(tmp_path):
    path = write_config(tmp_path, "      metrics: [fense]\n      metric_options: {fense: {batch_size: many}}\n")
    assert "metric_options.fense.batch_size: expected an integer, got 'many'" in config_error(path)


def test_metric_that_reads_no_options_refuses_any(tmp_path):
    path = write_config(tmp_path, "      metrics: [exact_match]\n      metric_options: {exact_match: {ignore_case: true}}\n")
    assert "metric_options.exact_match.ignore_case: exact_match takes no options" in config_error(path)


def test_caption_option_whose_only_reader_is_not_computed_is_refused(tmp_path):
    path = write_config(tmp_path, "      metrics: [bleu, cider_d]\n      metric_options: {bleu_4: {sbert_model: m}}\n")
    assert "metric_options.bleu_4.sbert_model: sbert_model is read by sbert_sim only, which this benchmark does " \
           "not compute" in config_error(path)


def test_caption_options_under_any_computed_caption_metric_load_since_they_share_one_run(tmp_path):
    path = write_config(tmp_path, "      metrics: [bleu, sbert_sim, spice]\n      metric_options:\n"
                                  "        bleu_4: {sbert_model: m, device: cuda, spice_timeout: [60, 600]}\n"
                                  "        sbert_sim: {batch_size: '64', java_path: /usr/bin/java}\n")
    assert load_config(str(path)).benchmarks[0].metric_options["bleu_4"]["device"] == "cuda"


def test_judge_reads_its_options_from_the_registry():
    from evaluator.stages.evaluation.metrics import judge
    assert judge.OPTIONS == metric_registry.METRICS["llm_judge"].options


METRIC_MODULES: dict[str, list] = {}  # metrics/<module>.py -> the metrics whose function lives there
for _name, _spec in metric_registry.METRICS.items():
    METRIC_MODULES.setdefault(_spec.func.split(":")[0].rsplit(".", 1)[1], []).append(_name)


@pytest.mark.parametrize("module", sorted(METRIC_MODULES))
def test_the_registry_lists_exactly_the_options_a_metric_module_reads(module):
    source = (ROOT / "evaluator" / "stages" / "evaluation" / "metrics" / f"{module}.py").read_text()
    read = set(re.findall(r"options(?:\.get\(|\[)\"(\w+)\"", source)) - set(metric_registry.METRICS)
    if module != "judge" and "JudgeSettings.from_options(" in source:  # judge options, read by judge.py for it
        read |= {o for m in METRIC_MODULES[module] for o in metric_registry.METRICS[m].options
                 if o in metric_registry.JUDGE_OPTIONS}
    assert read == {o for m in METRIC_MODULES[module] for o in metric_registry.METRICS[m].options}


# ---- the documented examples still load -------------------------------------------------------------------------
def doc_benchmark_blocks():
    """Every ```yaml block of docs/*.md and README.md that lists `benchmarks:` or gives `metric_options:`."""
    out = []
    for doc in sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]):
        for n, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)):
            if re.search(r"^\s*(benchmarks|metric_options):", block, re.M):
                out.append(pytest.param(block, id=f"{doc.name}#{n}"))
    return out


@pytest.mark.parametrize("block", doc_benchmark_blocks())
def test_documented_benchmark_examples_pass_the_generation_and_metric_option_checks(tmp_path, block):
    import yaml
    data = yaml.safe_load(block)
    data = data.get("auto_eval", data)
    if "benchmarks" in data:
        benchmarks = data["benchmarks"]
    else:  # a metric_options fragment: under a benchmark computing the metrics it names
        benchmarks = [{"name": "doc", "type": "dataset", "dataset": "d", "metrics": sorted(data["metric_options"]),
                       "metric_options": data["metric_options"]}]
    (tmp_path / "d").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"auto_eval": {"project_name": "demo", "model_name": "tiny",
                                                  "benchmarks": benchmarks}}))
    try:
        load_config(str(path), require_datasets=False)
    except EvaluatorError as e:  # only what this file specifies: other keys of an excerpt may need its context
        assert not re.search(r"\.(generation|metric_options)\.", str(e)), str(e)



def test_a_generation_number_no_float_holds_is_a_config_error_not_a_traceback(tmp_path):
    path = write_config(tmp_path, f"      generation: {{max_new_tokens: {'9' * 400}}}\n")
    message = config_error(path)  # number_problem raised OverflowError: --dry-run exited 1 with a traceback
    assert f"{path}:{line_of(path, 'generation:')}: auto_eval.benchmarks[0].generation.max_new_tokens: expected an " \
           "integer a float can hold, got an integer of 400 digits" in message


def test_a_config_number_in_exponent_form_is_a_number_as_yaml_1_2_reads_it(tmp_path):
    from evaluator.common.yamlconf import read_yaml
    path = tmp_path / "n.yaml"
    path.write_text("a: 1e-3\nb: 1.5e3\nc: '1e3'\nd: 12\n")
    assert read_yaml(str(path))[0] == {"a": 0.001, "b": 1500.0, "c": "1e3", "d": 12}  # PyYAML alone: "1e-3", "1.5e3"


def test_an_integer_of_thousands_of_digits_is_a_config_error_at_its_line_not_a_traceback(tmp_path):
    """int() refuses a string of over 4300 digits with a ValueError that escaped the YAML reader."""
    from evaluator.common.yamlconf import read_yaml
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: " + "9" * 5000 + "\n")
    with pytest.raises(EvaluatorError, match=rf"{path}:2: not valid YAML \(an integer of 5000 digits, beyond"):
        read_yaml(str(path))
    path.write_text("a: 1\nb: " + "9" * 4000 + "\n")  # within int()'s limit: a number, checked by the setting
    assert read_yaml(str(path))[0]["b"] == int("9" * 4000)
