"""Checkpoint-format safety (issue 16 item 0): a stage reads a checkpoint only as its writer meant it: as it is, through
a translated view where the mapping is exact, or not at all (exit 2, the field and both versions named).

The rules are pure and tested here in milliseconds (daemon venv); the slow tests take the real model, saved by
transformers 5.23.0, into the evaluation venv's transformers 4.42.4 (the 4.x reader we have; the vLLM venv pins
4.57.6, which ignores rope_parameters the same way) and into a stage."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT, VENVS, bench_py, canonical_dataset

from evaluator.common.errors import EvaluatorError
from evaluator.stages.checkpoint_compat import (CheckpointFormatError, Installed, assess, checkpoint_view,
                                                reads_as_is, release_view)

REAL_MODEL = os.path.join(VENVS, "models", "smollm2-135m-instruct")
# what transformers 5.23.0 writes for SmolLM2 (the parts the rules read)
CONFIG_5 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
            "transformers_version": "5.23.0"}
TOKENIZER_CONFIG_5 = {"backend": "tokenizers", "eos_token": "<|im_end|>", "tokenizer_class": "TokenizersBackend"}
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def reader(transformers="4.42.4", tokenizers="0.19.1", reads_template_file=False,
           known=("PreTrainedTokenizerFast", "GPT2Tokenizer")) -> Installed:
    return Installed(transformers, tokenizers, reads_template_file, lambda name: name in known)


def with_rope(rope, **top) -> dict:
    return {**CONFIG_5, "rope_parameters": rope, **top}


# ---- config.json: rope ----------------------------------------------------------------------------------------
def test_default_rope_parameters_become_top_level_rope_theta_and_no_scaling_for_transformers_4():
    verdict = assess({"config.json": CONFIG_5}, reader())
    assert not verdict.problems
    config = verdict.rewrites["config.json"]
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None and "rope_parameters" not in config
    assert {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")} == \
        {k: v for k, v in CONFIG_5.items() if k != "rope_parameters"}
    assert "rope_parameters" in verdict.translated[0] and "5.23.0" in verdict.translated[0]


def test_transformers_5_reads_a_5_checkpoint_as_it_is():
    assert not assess({"config.json": CONFIG_5}, reader("5.23.0", "0.23.3", True)).needs_view


def test_a_4x_checkpoint_is_read_as_it_is_by_transformers_4_and_5():
    config = {"model_type": "llama", "rope_theta": 10000.0, "rope_scaling": None, "transformers_version": "4.42.4"}
    for installed in (reader(), reader("4.57.6", "0.22.2", True), reader("5.23.0", "0.23.3", True)):
        verdict = assess({"config.json": config}, installed)
        assert not verdict.needs_view and not verdict.problems


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
], ids=["linear", "yarn", "extra-key", "per-layer-type"])
def test_rope_parameters_without_an_exact_4x_form_are_refused_naming_the_field_and_both_versions(rope):
    verdict = assess({"config.json": with_rope(rope)}, reader("4.57.6", "0.22.2", True))
    assert not verdict.rewrites
    [problem] = verdict.problems
    assert "rope_parameters" in problem and "5.23.0" in problem and "4.57.6" in problem


def test_a_top_level_rope_theta_that_disagrees_with_rope_parameters_is_refused():
    verdict = assess({"config.json": with_rope({"rope_type": "default", "rope_theta": 1e5}, rope_theta=1e4)}, reader())
    assert verdict.problems and "disagree" in verdict.problems[0]


def test_rope_parameters_of_a_nested_text_config_are_translated_too():
    config = {"model_type": "qwen2_audio", "transformers_version": "5.23.0",
              "text_config": {"model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}}
    verdict = assess({"config.json": config}, reader())
    text = verdict.rewrites["config.json"]["text_config"]
    assert text["rope_theta"] == 1e6 and text["rope_scaling"] is None and "rope_parameters" not in text
    assert "text_config.rope_parameters" in verdict.translated[0]


def test_a_checkpoint_from_a_newer_major_without_checked_rules_is_refused():
    verdict = assess({"config.json": {**CONFIG_5, "transformers_version": "6.1.0"}}, reader("5.23.0", "0.23.3", True))
    assert verdict.problems and "6.1.0" in verdict.problems[0] and "5.23.0" in verdict.problems[0]


# ---- tokenizer files ------------------------------------------------------------------------------------------
def test_tokenizers_backend_becomes_pretrained_tokenizer_fast_where_tokenizer_json_is_there():
    verdict = assess({"config.json": CONFIG_5, "tokenizer_config.json": TOKENIZER_CONFIG_5, "tokenizer.json": True},
                     reader("4.57.6", "0.22.2", True))
    assert verdict.rewrites["tokenizer_config.json"] == {**TOKENIZER_CONFIG_5, "tokenizer_class": "PreTrainedTokenizerFast"}


def test_a_tokenizer_class_the_installed_transformers_does_not_know_is_refused():
    verdict = assess({"config.json": CONFIG_5, "tokenizer_config.json": TOKENIZER_CONFIG_5}, reader())
    assert any("TokenizersBackend" in p and "no tokenizer.json" in p for p in verdict.problems)
    verdict = assess({"config.json": CONFIG_5, "tokenizer_config.json": {"tokenizer_class": "FancyTokenizer"},
                      "tokenizer.json": True}, reader("5.23.0", "0.23.3", True))
    assert verdict.problems and "FancyTokenizer" in verdict.problems[0] and not verdict.rewrites


def test_a_remote_code_tokenizer_is_not_judged_by_its_class_name():
    tok = {"tokenizer_class": "FancyTokenizer", "auto_map": {"AutoTokenizer": ["x.FancyTokenizer", None]}}
    assert not assess({"config.json": CONFIG_5, "tokenizer_config.json": tok}, reader("5.23.0")).problems


def test_chat_template_file_is_copied_into_tokenizer_config_only_where_transformers_does_not_read_it():
    files = {"config.json": CONFIG_5, "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer"},
             "chat_template.jinja": TEMPLATE}
    assert assess(files, reader()).rewrites["tokenizer_config.json"]["chat_template"] == TEMPLATE
    assert "tokenizer_config.json" not in assess(files, reader("4.57.6", "0.22.2", True)).rewrites


def test_pair_merges_become_strings_for_tokenizers_before_0_20_unless_a_token_holds_a_space():
    tokenizer = {"model": {"type": "BPE", "merges": [["Ġ", "t"], ["h", "e"]]}, "added_tokens": []}
    verdict = assess({"config.json": CONFIG_5, "tokenizer.json": tokenizer}, reader())
    assert verdict.rewrites["tokenizer.json"] == {"model": {"type": "BPE", "merges": ["Ġ t", "h e"]}, "added_tokens": []}
    assert "tokenizer.json" not in assess({"config.json": CONFIG_5, "tokenizer.json": tokenizer},
                                          reader("4.57.6", "0.22.2", True)).rewrites
    spaced = {"model": {"type": "BPE", "merges": [["a b", "c"]]}}
    verdict = assess({"config.json": CONFIG_5, "tokenizer.json": spaced}, reader())
    assert verdict.problems and "model.merges" in verdict.problems[0] and not verdict.rewrites


# ---- the view: the user's checkpoint is never edited ---------------------------------------------------------
def checkpoint(root, config=CONFIG_5, tokenizer_config=TOKENIZER_CONFIG_5) -> str:
    os.makedirs(root)
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (root / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": [["a", "b"]]}}))
    (root / "model.safetensors").write_bytes(b"weights")
    return str(root)


def test_a_view_links_every_file_and_rewrites_only_the_translated_ones(tmp_path):
    path = checkpoint(tmp_path / "ckpt")
    before = {n: (tmp_path / "ckpt" / n).read_bytes() for n in os.listdir(path)}
    lines = []
    view = checkpoint_view(path, reader("4.57.6", "0.22.2", True), log=lines.append)
    try:
        assert view != path and sorted(os.listdir(view)) == sorted(before)
        assert os.path.islink(os.path.join(view, "model.safetensors"))
        assert os.path.realpath(os.path.join(view, "tokenizer.json")) == os.path.join(path, "tokenizer.json")
        assert json.load(open(os.path.join(view, "config.json")))["rope_theta"] == 100000.0
        assert json.load(open(os.path.join(view, "tokenizer_config.json")))["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert len(lines) == 2 and all(view in line for line in lines)
    finally:
        release_view(view)
    assert not os.path.exists(view)
    assert {n: (tmp_path / "ckpt" / n).read_bytes() for n in os.listdir(path)} == before


def test_a_checkpoint_read_as_it_is_gets_no_view(tmp_path):
    path = checkpoint(tmp_path / "ckpt", tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"})
    assert checkpoint_view(path, reader("5.23.0", "0.23.3", True)) == path
    assert reads_as_is(path, reader("5.23.0", "0.23.3", True))
    assert not reads_as_is(path, reader("4.57.6", "0.22.2", True))


def test_a_refusal_is_a_bad_spec_error_naming_the_checkpoint(tmp_path):
    path = checkpoint(tmp_path / "ckpt", config=with_rope({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(CheckpointFormatError, match=r"ckpt: config.json `rope_parameters`.*5\.23\.0.*4\.57\.6") as e:
        checkpoint_view(path, reader("4.57.6", "0.22.2", True))
    assert isinstance(e.value, EvaluatorError) and e.value.exit_code == 2


def test_a_hub_id_is_passed_through_unchecked():
    assert checkpoint_view("HuggingFaceTB/SmolLM2-135M-Instruct", reader()) == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---- the real model across venvs (slow) ------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "Question: How many legs does a spider have?\nAnswer:"]
# run in a venv: the checkpoint through checkpoint_view, its tokenizer's ids and chat rendering, and the logits
READ = r"""
import json, sys
import numpy as np
import torch
import transformers
from evaluator.stages.checkpoint_compat import CheckpointFormatError, checkpoint_view
path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
lines = []
view = checkpoint_view(path, log=lines.append)
tok = transformers.AutoTokenizer.from_pretrained(view)
kw = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
model = transformers.AutoModelForCausalLM.from_pretrained(view, **kw).eval()
ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
with torch.no_grad():
    logits = [model(torch.tensor([i])).logits[0].numpy() for i in ids]
np.savez(out, *logits)
result = {"transformers": transformers.__version__, "view": view != path, "translated": lines, "ids": ids,
          "tokenizer": type(tok).__name__,
          "chat": tok.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                          add_generation_prompt=True)}
if view != path:  # the same weights read from the checkpoint itself, as this transformers would without the check
    raw = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    with torch.no_grad():
        raw_logits = raw(torch.tensor([ids[0]])).logits[0].numpy()
    result["raw_rope_theta"] = raw.config.rope_theta
    result["raw_max_diff"] = float(np.abs(raw_logits - logits[0]).max())
print(json.dumps(result))
"""


def read_in(venv: str, path: str, out) -> tuple:
    import numpy as np
    proc = subprocess.run([os.path.join(VENVS, venv, "bin", "python"), "-c", READ, path, json.dumps(PROMPTS), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(str(out) + ("" if str(out).endswith(".npz") else ".npz"))
    return json.loads(proc.stdout.strip().splitlines()[-1]), [data[f"arr_{i}"] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def both_readers(venvs, tmp_path_factory):
    """The real model (saved by transformers 5.23.0) read in the inference venv (5.x) and the evaluation venv
    (4.42.4), each through checkpoint_view."""
    assert os.path.isfile(os.path.join(REAL_MODEL, ".complete.json")), \
        f"no converted real model at {REAL_MODEL}; run `make real-model`"
    tmp = tmp_path_factory.mktemp("readers")
    return {"5": read_in("inference", REAL_MODEL, tmp / "v5.npz"), "4": read_in("evaluation", REAL_MODEL, tmp / "v4.npz")}


@pytest.mark.slow
def test_the_real_5x_checkpoint_gives_the_same_logits_under_transformers_4_through_the_view(both_readers):
    (new, new_logits), (old, old_logits) = both_readers["5"], both_readers["4"]
    assert new["transformers"].startswith("5.") and old["transformers"].startswith("4.")
    assert not new["view"] and old["view"]
    assert old["ids"] == new["ids"] and old["chat"] == new["chat"]
    for a, b in zip(old_logits, new_logits):
        assert a.shape == b.shape and abs(a - b).max() < 1e-4


@pytest.mark.slow
def test_without_the_view_transformers_4_would_silently_use_the_wrong_rope(both_readers):
    """What the check prevents, measured: the same folder read directly by 4.42.4 loads without an error and gives
    other logits (rope_theta 10000 instead of 100000)."""
    old = both_readers["4"][0]
    assert old["raw_rope_theta"] == 10000.0 and old["raw_max_diff"] > 0.1
    assert [line.split("`")[1] for line in old["translated"]] == ["rope_parameters", "tokenizer_class", "chat_template",
                                                                   "model.merges"]


def linked_copy(src: str, dest, config: dict) -> str:
    """A checkpoint folder with `src`'s files linked and its own config.json."""
    os.makedirs(dest)
    for name in os.listdir(src):
        if name != "config.json" and not name.startswith("."):
            os.symlink(os.path.join(src, name), dest / name)
    (dest / "config.json").write_text(json.dumps(config))
    return str(dest)


@pytest.mark.slow
def test_transformers_4_refuses_scaled_rope_it_cannot_read_with_the_field_and_versions(tmp_path, venvs):
    config = json.load(open(os.path.join(REAL_MODEL, "config.json")))
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0}
    path = linked_copy(REAL_MODEL, tmp_path / "scaled", config)
    code = ("import sys\nfrom evaluator.stages.checkpoint_compat import checkpoint_view\n"
            "try:\n    checkpoint_view(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([venvs["evaluation"], "-c", code, path], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.startswith("CheckpointFormatError"), proc.stdout + proc.stderr[-2000:]
    assert "rope_parameters" in proc.stdout and "5.23.0" in proc.stdout and "4.42.4" in proc.stdout


@pytest.mark.slow
def test_an_inference_stage_refuses_a_checkpoint_its_transformers_cannot_read_with_exit_2(tmp_path):
    """Through tools/bench.py: the hf backend (transformers 5.x) and a checkpoint written by a 6.x: exit 2, one line
    naming both versions, no predictions."""
    config = {**json.load(open(os.path.join(REAL_MODEL, "config.json"))), "transformers_version": "6.0.0"}
    path = linked_copy(REAL_MODEL, tmp_path / "future", config)
    data = canonical_dataset(tmp_path / "qa", [{"id": "1", "messages": [{"role": "user", "content": "hi"}],
                                                "target": "x"}], metrics=["exact_match"])
    proc = bench_py("inference", data, "--model", path, "--output-root", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "6.0.0" in proc.stderr and "5.23.0" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("predictions.jsonl"))


HELM_RUN = """#!{python}
import os, runpy, sys
path = sys.argv[sys.argv.index("--enable-local-huggingface-models") + 1]
out = sys.argv[sys.argv.index("-o") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "seen_config.json"), "w") as f:  # what HELM's transformers would be given
    f.write(open(os.path.join(path, "config.json")).read())
sys.argv = [{fake!r}, "run", *sys.argv[1:]]
runpy.run_path({fake!r}, run_name="__main__")
"""


def helm_env_with_transformers_4(tmp_path) -> str:
    """A HELM environment stand-in whose helm-run runs under the evaluation venv's python (transformers 4.42.4)."""
    bin_dir = tmp_path / "helm-env" / "bin"
    bin_dir.mkdir(parents=True)
    fake = os.path.join(ROOT, "tests", "stage_scripts", "fake_helm.py")
    (bin_dir / "helm-run").write_text(HELM_RUN.format(python=os.path.join(VENVS, "evaluation", "bin", "python"),
                                                      fake=fake))
    (bin_dir / "helm-summarize").write_text(f"#!/bin/sh\nexec {VENVS}/evaluation/bin/python {fake} summarize \"$@\"\n")
    for tool in ("helm-run", "helm-summarize"):
        os.chmod(bin_dir / tool, 0o755)
    return str(tmp_path / "helm-env")


def run_helm_stage(tmp_path, checkpoint: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "spec.conf").write_text('entries: [\n  {description: "boolq:model=<model>", priority: 1}\n]\n')
    job = {"stage": "inference", "run": "tiny", "iteration": 1000, "checkpoint": checkpoint, "output_dir": str(out),
           "seed": 0, "extra": {}, "benchmark": {"name": "helm", "type": "helm", "options": {
               "spec_template": str(tmp_path / "spec.conf"), "env": helm_env_with_transformers_4(tmp_path),
               "output_path": str(out / "helm_out")}}}
    (out / "infer.job.json").write_text(json.dumps(job))
    return subprocess.run([os.path.join(VENVS, "daemon", "bin", "python"), "-m", "evaluator.stages.helm", "--job",
                           str(out / "infer.job.json")], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_helm_gets_a_translated_view_when_its_environment_has_transformers_4(tmp_path):
    proc = run_helm_stage(tmp_path, REAL_MODEL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "out" / "helm_out" / "seen_config.json").read_text())
    assert seen["rope_theta"] == 100000.0 and seen["rope_scaling"] is None and "rope_parameters" not in seen
    assert "rope_parameters" in json.load(open(os.path.join(REAL_MODEL, "config.json")))  # untouched
    assert "translated for this venv" in proc.stderr


@pytest.mark.slow
def test_helm_refuses_a_checkpoint_its_transformers_4_would_misread_with_exit_2(tmp_path):
    config = json.load(open(os.path.join(REAL_MODEL, "config.json")))
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    proc = run_helm_stage(tmp_path, linked_copy(REAL_MODEL, tmp_path / "llama3", config))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rope_parameters" in proc.stderr and "4.42.4" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "helm_out" / "seen_config.json").exists()
