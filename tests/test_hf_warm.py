"""The hf backend's warm-worker hooks (LOAD_OPTIONS, reconfigure, swap, close) on real tiny checkpoints in the
inference venv: a swap gives the logits of a fresh load, refuses what it cannot load strictly, never leaves a
half-swapped model, and 20 swaps do not grow the process."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import MAKE_TINY_LM, ROOT

# Runs in the inference venv; prints one JSON object of facts the tests below check one by one.
SCRIPT = r'''
import gc, json, os, shutil, sys, weakref
import torch
from safetensors.torch import load_file, save_file
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.inference.backends import ModelLoadError
from evaluator.stages.inference.backends import hf
from evaluator.stages.inference.backends.audio import AudioRunner
from evaluator.stages.inference.params import GenerationParams

A, B, BIG_A, BIG_B, WORK = sys.argv[1:6]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 31]])
facts = {}

def loaded(path, **options):
    backend = hf.HFBackend(path, {"dtype": "float32", **options}, GenerationParams())
    backend.load()
    return backend

def logits(backend):
    with torch.inference_mode():
        return backend.runner.model(IDS).logits.float()

def variant(name, edit):
    """A copy of checkpoint B with one file edited."""
    path = os.path.join(WORK, name)
    shutil.copytree(B, path)
    edit(path)
    return path

def edit_json(file, **fields):
    def edit(path):
        with open(os.path.join(path, file)) as f:
            data = json.load(f)
        data.update(fields)
        with open(os.path.join(path, file), "w") as f:
            json.dump(data, f)
    return edit

def drop_a_tensor(path):
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd.pop(sorted(sd)[-1])
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# swap A -> B equals a fresh load of B
fresh_b = loaded(B)
warm = loaded(A)
logits_a = logits(warm)
facts["swapped"] = warm.swap(B)
facts["max_diff_vs_fresh"] = float((logits(warm) - logits(fresh_b)).abs().max())
facts["a_differs_from_b"] = float((logits_a - logits(fresh_b)).abs().max())
facts["generation_config_equal"] = (warm.runner.model.generation_config.to_dict()
                                    == fresh_b.runner.model.generation_config.to_dict())
facts["model_path_after_swap"] = warm.model_path
facts["tied"] = warm.runner.model.lm_head.weight is warm.runner.model.transformer.wte.weight

# the other weight layouts: shards with an index, and a pickled pytorch_model.bin holding both tied names
def sharded(path):
    os.remove(os.path.join(path, "model.safetensors"))
    fresh_b.runner.model.save_pretrained(path, max_shard_size="100KB")

def pickled(path):
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(fresh_b.runner.model.state_dict(), os.path.join(path, "pytorch_model.bin"))

facts["layouts"] = {}
for name, edit in (("sharded", sharded), ("bin", pickled)):
    other = loaded(A)
    path = variant(name, edit)
    files = sorted(os.listdir(path))
    facts["layouts"][name] = {"swapped": other.swap(path),
                              "max_diff_vs_fresh": float((logits(other) - logits(fresh_b)).abs().max()),
                              "files": [f for f in files if "safetensors" in f or f.endswith(".bin")]}
    other.close()

def untied_head(path):
    """The file holds lm_head apart from the embedding, with other values: a fresh load unties them."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    embedding = [k for k in sd if k.endswith("wte.weight")][0]
    sd["lm_head.weight"] = (sd[embedding] + 0.5).contiguous()
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

# refusals leave the loaded model as it was
before = logits(warm)
refusals = {
    "config": variant("config", edit_json("config.json", layer_norm_epsilon=2e-5)),
    "tokenizer": variant("tokenizer", edit_json("tokenizer_config.json", model_max_length=77)),
    "missing_tensor": variant("missing", drop_a_tensor),
    "no_weights": variant("noweights", lambda p: os.remove(os.path.join(p, "model.safetensors"))),
    "untied_head": variant("untied", untied_head),
}
facts["refused"] = {name: warm.swap(path) for name, path in refusals.items()}
facts["untouched_after_refusals"] = bool(torch.equal(before, logits(warm)))
facts["transformers_version_ignored"] = warm.swap(variant("version", edit_json("config.json",
                                                                             transformers_version="0.0.1")))

# no generation_config.json: the generation fields of config.json itself count, as in a fresh load
def legacy_generation(path):
    os.remove(os.path.join(path, "generation_config.json"))
    edit_json("config.json", repetition_penalty=3.0)(path)

legacy_a = os.path.join(WORK, "legacy-a")
shutil.copytree(A, legacy_a)
legacy_generation(legacy_a)
legacy_b = variant("legacy-b", legacy_generation)
legacy = loaded(legacy_a)
legacy.runner.model.generation_config.repetition_penalty = 1.0  # what a swap must not keep from before
facts["legacy_swapped"] = legacy.swap(legacy_b)
fresh_legacy = loaded(legacy_b)
facts["legacy_generation_config"] = [legacy.runner.model.generation_config.repetition_penalty,
                                     fresh_legacy.runner.model.generation_config.repetition_penalty]
legacy.close(); fresh_legacy.close()

# a copy that fails midway closes the model and raises
broken = loaded(A)
real_read = hf.CheckpointTensors.read
def failing_read(self, keys):
    for n, item in enumerate(real_read(self, keys)):
        if n == 3:
            raise OSError("disk read error")
        yield item
hf.CheckpointTensors.read = failing_read
try:
    broken.swap(B)
    facts["midway"] = "no error"
except ModelLoadError as e:
    facts["midway"] = str(e)
hf.CheckpointTensors.read = real_read
facts["runner_after_midway"] = repr(broken.runner)

# an audio runner is never swapped
audio = hf.HFBackend(A, {}, GenerationParams())
audio.runner, audio.loaded_config = AudioRunner.__new__(AudioRunner), {}
facts["audio_swap"] = audio.swap(B)

# reconfigure: the next benchmark's parameters and options, no reload
model_id = id(warm.runner.model)
warm.reconfigure(GenerationParams(max_new_tokens=3), {"dtype": "float32", "batch_size": 3,
                                                      "choice_scoring": "loglikelihood"})
facts["reconfigured"] = {"max_new_tokens": warm.runner.params.max_new_tokens, "batch_size": warm.batch_size,
                         "same_model": id(warm.runner.model) == model_id,
                         "scoring": warm.options.get("choice_scoring")}
chat = loaded(os.path.join(WORK, "..", "llama-chat"))
sample = Sample(id="s", messages=[{"role": "user", "content": "Hi"}])
with_template = chat.runner.prompt(sample)
chat.reconfigure(GenerationParams(), {"dtype": "float32", "chat_template": False})
facts["prompts"] = [with_template, chat.runner.prompt(sample)]
try:
    warm.reconfigure(GenerationParams(), {"dtype": "bfloat16"})
    facts["load_option_change"] = "accepted"
except ValueError as e:
    facts["load_option_change"] = str(e)
facts["load_options"] = list(hf.HFBackend.LOAD_OPTIONS)

# close frees the model
ref = weakref.ref(warm.runner.model)
warm.close()
facts["model_alive_after_close"] = ref() is not None

# 20 swaps between two bigger checkpoints: the process does not grow
big = loaded(BIG_A)
state_bytes = sum(t.numel() * t.element_size() for t in big.runner.model.state_dict().values())
samples = [rss()]
for n in range(20):
    assert big.swap(BIG_B if n % 2 == 0 else BIG_A)
    gc.collect()
    samples.append(rss())
facts["rss"] = samples
facts["state_bytes"] = state_bytes
print(json.dumps(facts))
'''

BIG_CHECKPOINT = r'''
import shutil, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
tiny, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
shutil.copytree(tiny, out)
torch.manual_seed(seed)
config = GPT2Config.from_pretrained(tiny)
config.n_embd, config.n_layer, config.n_head = 256, 4, 4   # ~3.3M parameters: a leaked copy per swap shows in RSS
GPT2LMHeadModel(config).save_pretrained(out)
'''


@pytest.fixture(scope="module")
def warm_facts(venvs, tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")

    def build(name, *args):
        proc = subprocess.run([venvs["inference"], MAKE_TINY_LM, str(root / name), "--arch", "gpt2", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return str(root / name)

    a, b = build("a", "--seed", "0"), build("b", "--seed", "1")  # same tokenizer and config, other weights
    os.symlink(tiny_lm("llama", chat=True), root / "llama-chat")
    bigs = []
    for seed in (0, 1):
        out = str(root / f"big{seed}")
        proc = subprocess.run([venvs["inference"], "-c", BIG_CHECKPOINT, a, out, str(seed)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        bigs.append(out)
    (root / "work").mkdir()
    proc = subprocess.run([venvs["inference"], "-c", SCRIPT, a, b, *bigs, str(root / "work")],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_swapping_in_a_checkpoint_gives_the_logits_of_a_fresh_load_of_it(warm_facts):
    assert warm_facts["swapped"] is True
    assert warm_facts["a_differs_from_b"] > 1e-3  # the two checkpoints really differ
    assert warm_facts["max_diff_vs_fresh"] <= 1e-6
    assert warm_facts["model_path_after_swap"].endswith("/b")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_a_sharded_or_pickled_checkpoint_is_swapped_in_like_a_fresh_load(warm_facts, layout):
    facts = warm_facts["layouts"][layout]
    assert facts["swapped"] is True and facts["max_diff_vs_fresh"] <= 1e-6
    if layout == "sharded":
        assert "model.safetensors.index.json" in facts["files"] and len(facts["files"]) > 2
    else:
        assert facts["files"] == ["pytorch_model.bin"]


@pytest.mark.slow
def test_a_swap_keeps_the_tied_lm_head_and_rereads_the_generation_config(warm_facts):
    assert warm_facts["tied"] is True
    assert warm_facts["generation_config_equal"] is True


@pytest.mark.slow
def test_a_swap_takes_the_generation_fields_of_config_json_when_there_is_no_generation_config(warm_facts):
    """Without generation_config.json from_pretrained reads config.json's generation fields (a legacy
    repetition_penalty); a swap read only what the loaded model's config kept, dropping them."""
    assert warm_facts["legacy_swapped"] is True
    assert warm_facts["legacy_generation_config"] == [3.0, 3.0]


@pytest.mark.slow
def test_a_changed_config_tokenizer_or_tensor_set_is_not_swapped_and_the_model_stays_as_it_was(warm_facts):
    assert warm_facts["refused"] == {"config": False, "tokenizer": False, "missing_tensor": False,
                                     "no_weights": False, "untied_head": False}
    assert warm_facts["untouched_after_refusals"] is True


@pytest.mark.slow
def test_a_config_differing_only_in_transformers_version_is_swapped(warm_facts):
    assert warm_facts["transformers_version_ignored"] is True


@pytest.mark.slow
def test_a_swap_failing_midway_raises_model_load_error_and_closes_the_model(warm_facts):
    assert "failed midway" in warm_facts["midway"] and "disk read error" in warm_facts["midway"]
    assert warm_facts["runner_after_midway"] == "None"


@pytest.mark.slow
def test_an_audio_checkpoint_is_never_swapped(warm_facts):
    assert warm_facts["audio_swap"] is False


@pytest.mark.slow
def test_reconfigure_takes_the_next_benchmarks_parameters_and_options_without_a_reload(warm_facts):
    assert warm_facts["reconfigured"] == {"max_new_tokens": 3, "batch_size": 3, "same_model": True,
                                          "scoring": "loglikelihood"}
    with_template, plain = warm_facts["prompts"]
    assert with_template == "<|user|>Hi<|end|><|assistant|>" and plain == "Hi"


@pytest.mark.slow
def test_reconfigure_refuses_to_change_a_load_option(warm_facts):
    assert warm_facts["load_options"] == ["device", "dtype"]
    assert "cannot change dtype" in warm_facts["load_option_change"]


@pytest.mark.slow
def test_close_frees_the_model(warm_facts):
    assert warm_facts["model_alive_after_close"] is False


@pytest.mark.slow
def test_twenty_swaps_do_not_grow_the_process(warm_facts):
    """A leak of one state dict per swap would add 18 x state_bytes (~240 MB) after the first two swaps; the
    allocator's own settling stays far below two state dicts."""
    rss, state = warm_facts["rss"], warm_facts["state_bytes"]
    assert state > 10_000_000
    assert rss[-1] - rss[2] < 2 * state, [round((r - rss[0]) / 1e6, 1) for r in rss]
