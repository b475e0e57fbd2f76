"""The hf backend runs the prompt prefix a batch shares (chat template, system prompt, few-shot examples) once per
batch and copies its key/value cache to every row (backends/hf.py `batch_layout`, option `shared_prefix`): the same
texts and choice log-likelihoods as running every row whole, for fewer tokens through the model (issue 13)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import MAKE_TINY_LM, ROOT
from evaluator.stages.inference.backends.hf import shared_prefix_length, use_shared_prefix


@pytest.mark.parametrize("rows, expected", [
    ([[1, 2, 3, 4], [1, 2, 3, 5]], 3),
    ([[1, 2, 3], [1, 2, 3, 4, 5]], 2),  # a row that is the others' prefix keeps one token of its own
    ([[1, 2, 3], [1, 2, 3]], 2),
    ([[7, 2], [1, 2]], 0),
    ([[1, 2, 3, 4]], 0),  # one row: nothing is shared
    ([(5, 6, 7), (5, 6, 8), (5, 9, 9)], 1),  # every row, not just two
], ids=["common-3", "prefix-row", "equal-rows", "none", "one-row", "three-rows"])
def test_shared_prefix_length_leaves_every_row_a_token_of_its_own(rows, expected):
    assert shared_prefix_length(rows) == expected


@pytest.mark.parametrize("value, on", [(None, True), (True, True), (False, False), ("false", False), ("no", False),
                                       (0, False)])
def test_shared_prefix_is_on_unless_turned_off(value, on):
    assert use_shared_prefix({} if value is None else {"shared_prefix": value}) is on


SHARING = r"""
import json, sys
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.inference.backends.hf import HFBackend
from evaluator.stages.inference.params import GenerationParams, Progress

path, mode = sys.argv[1], sys.argv[2]
system = "You are a careful assistant. Answer with one word. " * 3
questions = ["What colour is the sea?", "Grass is", "Is the sky blue or green today?", "Name a dog",
             "two plus two", "The cat sat on the", "Hi"]
samples = [Sample(id=f"s{i}", messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
                  choices=["blue", "green.", "a dog barks"]) for i, q in enumerate(questions)]
options = {"batch_size": 4, "dtype": "float32"}
if mode == "mc":  # batch_size counts choices: 4 questions of 3 choices share a batch
    options.update(choice_scoring="loglikelihood", batch_size=12)
params = GenerationParams.from_dict({"max_new_tokens": 6, "min_new_tokens": 6, **json.loads(sys.argv[3])},
                                    "generation", backend="hf")
backend = HFBackend(path, {**options, "shared_prefix": False}, params)
backend.load()
tokens = []  # tokens the model reads, counted at its input embedding
backend.runner.model.get_input_embeddings().register_forward_hook(lambda m, args, out: tokens.append(args[0].numel()))
out = {}
for share in (False, True):
    backend.reconfigure(params, {**options, "shared_prefix": share})
    tokens.clear()
    rows = backend.run(samples, "d", Progress(len(samples)))
    out[str(share)] = {"rows": [r.to_dict() for r in rows], "tokens": sum(tokens)}
print(json.dumps(out))
"""


def run_sharing(venvs, model: str, mode: str, generation: dict = None) -> tuple:
    proc = subprocess.run([venvs["inference"], "-c", SHARING, model, mode, json.dumps(generation or {})],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["False"], out["True"]


@pytest.fixture(scope="module")
def chat_llama(tiny_lm) -> str:
    return tiny_lm("llama", chat=True)


@pytest.mark.slow
def test_generation_with_a_shared_prefix_gives_the_same_texts_for_fewer_tokens(venvs, chat_llama):
    whole, shared = run_sharing(venvs, chat_llama, "generate")
    assert all(r["status"] == "ok" for r in whole["rows"] + shared["rows"])
    assert [r["response"] for r in shared["rows"]] == [r["response"] for r in whole["rows"]]  # texts and usage
    assert shared["tokens"] < whole["tokens"] * 0.8, (shared["tokens"], whole["tokens"])


@pytest.mark.slow
def test_choice_loglikelihoods_with_a_shared_prefix_equal_whole_rows(venvs, chat_llama):
    whole, shared = run_sharing(venvs, chat_llama, "mc")
    for a, b in zip(whole["rows"], shared["rows"], strict=True):
        assert a["status"] == b["status"] == "ok"
        assert b["response"]["choice_logprobs"] == pytest.approx(a["response"]["choice_logprobs"], abs=1e-5)
        assert b["response"]["text"] == a["response"]["text"]
    assert shared["tokens"] < whole["tokens"] * 0.8, (shared["tokens"], whole["tokens"])


@pytest.mark.slow
def test_beam_search_runs_every_row_whole(venvs, chat_llama):
    """generate() expands a batch for beams; a prebuilt prefix cache would not follow, so sharing stays off."""
    whole, shared = run_sharing(venvs, chat_llama, "generate", {"num_beams": 2})
    assert all(r["status"] == "ok" for r in shared["rows"])
    assert [r["response"]["text"] for r in shared["rows"]] == [r["response"]["text"] for r in whole["rows"]]
    assert shared["tokens"] == whole["tokens"]


MEMO = r"""
import json, sys
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.inference.backends.hf import HFBackend
from evaluator.stages.inference.params import GenerationParams, Progress

A, B = sys.argv[1], sys.argv[2]
system = "Read the question, think, then answer with the best choice. " * 2

def questions(words):
    return [Sample(id=f"s{i}", messages=[{"role": "system", "content": system}, {"role": "user", "content": w}],
                   choices=["blue", "green.", "a dog barks"]) for i, w in enumerate(words)]

x = questions(["What colour is the sea?", "What colour is grass?", "What barks?", "Name a colour", "Which one?"])
y = questions(["Pick one", "Pick another one", "What is green?", "The sky is"])
options = {"choice_scoring": "loglikelihood", "batch_size": 6, "dtype": "float32"}

def scores(backend, samples):
    return [r.response["choice_logprobs"] for r in backend.run(samples, "d", Progress(len(samples)))]

warm = HFBackend(A, options, GenerationParams())
warm.load()
first_x = scores(warm, x)
scores(warm, y)
again_x = scores(warm, x)           # after another benchmark in the same process
assert warm.swap(B)
swapped_x = scores(warm, x)          # the prefix cache was made with A's weights
fresh = HFBackend(B, options, GenerationParams())
fresh.load()
print(json.dumps({"first_x": first_x, "again_x": again_x, "swapped_x": swapped_x, "fresh_x": scores(fresh, x)}))
"""


@pytest.fixture(scope="module")
def memo_facts(venvs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("memo")
    for name, seed in (("a", "0"), ("b", "1")):  # same tokenizer and config, other weights
        proc = subprocess.run([venvs["inference"], MAKE_TINY_LM, str(root / name), "--arch", "gpt2", "--seed", seed],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([venvs["inference"], "-c", MEMO, str(root / "a"), str(root / "b")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_benchmarks_numbers_do_not_depend_on_what_ran_before_it_in_the_process(memo_facts):
    assert memo_facts["again_x"] == memo_facts["first_x"]  # bit for bit


@pytest.mark.slow
def test_after_a_weight_swap_no_prefix_cache_of_the_old_weights_is_used(memo_facts):
    def flat(rows):
        return [v for row in rows for v in row]
    assert flat(memo_facts["swapped_x"]) == pytest.approx(flat(memo_facts["fresh_x"]), abs=1e-6)
    assert flat(memo_facts["swapped_x"]) != pytest.approx(flat(memo_facts["first_x"]), abs=1e-3)  # weights differ
