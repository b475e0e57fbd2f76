"""The real pretrained model made by `make real-model` is a working LLM, not a garbled conversion."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import VENVS

REAL_MODEL = os.path.join(VENVS, "models", "smollm2-135m-instruct")
PROMPT = "The capital of France is"
# log P(" Paris" | PROMPT) of the GGUF as transformers 5.23 dequantises it (float32, CPU). fetch_real_model.py
# checks the saved logits equal the GGUF-loaded model's; this pins the number across reloads and venvs. Subtle
# breakage still answers "Paris" greedily but moves it: rope_theta 10000 instead of 100000 (what transformers 4.x
# makes of this config) gives -0.2833, a q/k projection left in llama.cpp's row order -0.3272.
PARIS_LOGPROB = -0.25807

PROBE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt")
paris = tok(" Paris")["input_ids"]
with torch.no_grad():
    logprobs = torch.log_softmax(model(**ids).logits[0, -1], dim=-1)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"continuation": tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True),
                  "paris_ids": paris, "paris_logprob": logprobs[paris[0]].item()}))
"""


@pytest.fixture(scope="module")
def probe(venvs):
    """Greedy continuation of PROMPT and log P(" Paris") from the converted model, in the inference venv."""
    # `make test` makes it (make real-model); missing is a failure, not a skip, like the venvs
    assert os.path.isfile(os.path.join(REAL_MODEL, ".complete.json")), \
        f"no converted real model at {REAL_MODEL}; run `make real-model`"
    proc = subprocess.run([venvs["inference"], "-c", PROBE, REAL_MODEL, PROMPT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_real_model_continues_capital_of_france_with_paris(probe):
    assert "Paris" in probe["continuation"], f"greedy continuation {probe['continuation']!r}"


@pytest.mark.slow
def test_real_model_paris_logprob_matches_the_gguf_reference(probe):
    assert len(probe["paris_ids"]) == 1, f"' Paris' is {probe['paris_ids']}, one token in this tokenizer"
    assert probe["paris_logprob"] == pytest.approx(PARIS_LOGPROB, abs=1e-3)


# ---- loglikelihood multiple choice vs lm-evaluation-harness on the real model (issue 16 item 0) ------------------
# 30 four-choice questions a 135M instruct model gets partly right; stems with and without a trailing space
# (lm-eval moves it to the continuation)
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"]),
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "yellow"]),
    ("How many legs does a spider have?", ["eight", "six", "four", "ten"]),
    ("What is 2 + 3?", ["5", "6", "4", "23"]),
    ("Which planet is closest to the sun?", ["Mercury", "Venus", "Earth", "Mars"]),
    ("What do bees make?", ["honey", "milk", "silk", "wax paper"]),
    ("What is frozen water called?", ["ice", "steam", "fog", "dew"]),
    ("Which animal barks?", ["a dog", "a cat", "a fish", "a bird"]),
    ("What is the largest ocean on Earth?", ["the Pacific Ocean", "the Atlantic Ocean", "the Indian Ocean",
                                             "the Arctic Ocean"]),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "oxygen", "helium", "nitrogen"]),
    ("How many days are in a week?", ["seven", "five", "ten", "twelve"]),
    ("What is the boiling point of water at sea level in Celsius?", ["100 degrees", "50 degrees", "0 degrees",
                                                                     "212 degrees"]),
    ("Which organ pumps blood through the body?", ["the heart", "the liver", "the lungs", "the brain"]),
    ("What is the opposite of hot?", ["cold", "warm", "big", "fast"]),
    ("Which season comes after winter?", ["spring", "summer", "autumn", "winter"]),
    ("What is the capital of Japan?", ["Tokyo", "Beijing", "Seoul", "Bangkok"]),
    ("How many continents are there?", ["seven", "three", "nine", "twelve"]),
    ("What do cows drink?", ["water", "milk", "juice", "coffee"]),
    ("Which is a fruit?", ["an apple", "a carrot", "a potato", "an onion"]),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Gd", "Go"]),
    ("What shape has three sides?", ["a triangle", "a square", "a circle", "a hexagon"]),
    ("Which language is spoken in Brazil?", ["Portuguese", "Spanish", "French", "English"]),
    ("What is 10 times 10?", ["100", "20", "1000", "110"]),
    ("Which bird cannot fly?", ["the penguin", "the eagle", "the sparrow", "the pigeon"]),
    ("What does a thermometer measure?", ["temperature", "weight", "distance", "time"]),
    ("Where does the sun rise?", ["in the east", "in the west", "in the north", "in the south"]),
    ("What is the main ingredient of bread?", ["flour", "sugar", "salt", "butter"]),
    ("Which metal is liquid at room temperature?", ["mercury", "iron", "copper", "aluminium"]),
    ("What is the tallest animal?", ["the giraffe", "the elephant", "the horse", "the camel"]),
]
STEMS = ("Question: {q}\nAnswer:", "Question: {q}\nAnswer: ", "{q}")

PARITY = r"""
import json, sys
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from evaluator.benchmarks.registry import load_benchmark
from evaluator.stages.inference.backends.hf import HFBackend
from evaluator.stages.inference.params import GenerationParams, Progress

model, tasks = sys.argv[1], sys.argv[2]
data = load_benchmark("text-mc", tasks + "/data.jsonl", {"prompt": "{stem}"})
out = {}
backend = HFBackend(model, {"choice_scoring": "loglikelihood", "device": "cpu", "dtype": "float32", "batch_size": 32},
                    GenerationParams())
backend.load()
lm = HFLM(pretrained=backend.runner.model, tokenizer=backend.runner.tokenizer, batch_size=32, device="cpu")
for chat in (False, True):
    backend.reconfigure(GenerationParams(), {**backend.options, "chat_template": chat})
    rows = backend.run(data.samples, data.dataset_id, Progress(len(data.samples)))
    ours = {r.sample_id.split("/")[-1]: r.to_dict() for r in rows}
    res = simple_evaluate(model=lm, tasks=["real_mc"], task_manager=TaskManager(include_path=tasks),
                          apply_chat_template=chat, log_samples=True, bootstrap_iters=0)
    theirs = {s["doc"]["id"]: {"logprobs": [ll for ll, _ in s["filtered_resps"]],
                               "requests": [list(a) for a in s["arguments"]], "acc": s["acc"]}
              for s in res["samples"]["real_mc"]}
    out["chat" if chat else "plain"] = {"ours": ours, "theirs": theirs, "acc": res["results"]["real_mc"]["acc,none"],
                                        "context": backend.runner.prompt(data.samples[0])}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parity(venvs, tmp_path_factory):
    """QUESTIONS scored on the real model by our hf backend (choice_scoring: loglikelihood) and by
    lm-evaluation-harness's own task pipeline (simple_evaluate on a local YAML task, the same model object), with the
    chat template off and on (lm-eval: --apply_chat_template); inference venv."""
    import yaml
    assert os.path.isfile(os.path.join(REAL_MODEL, ".complete.json")), \
        f"no converted real model at {REAL_MODEL}; run `make real-model`"
    tasks = tmp_path_factory.mktemp("real-mc")
    rows = [{"id": f"q{i}", "question": q, "stem": STEMS[i % len(STEMS)].format(q=q), "choices": choices,
             "answer": 0}
            for i, (q, choices) in enumerate(QUESTIONS)]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "real_mc.yaml").write_text(yaml.safe_dump({
        "task": "real_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "data.jsonl")}}, "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{stem}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}, sort_keys=False))
    from conftest import ROOT
    proc = subprocess.run([venvs["inference"], "-c", PARITY, REAL_MODEL, str(tasks)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"rows": rows, **json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_loglikelihood_choice_scoring_picks_what_lm_eval_picks_on_the_real_model(parity, mode):
    ours, theirs = parity[mode]["ours"], parity[mode]["theirs"]
    assert set(ours) == set(theirs) == {r["id"] for r in parity["rows"]}
    for row in parity["rows"]:
        o, t = ours[row["id"]], theirs[row["id"]]
        assert o["status"] == "ok", o["error"]
        assert o["response"]["choice_logprobs"] == pytest.approx(t["logprobs"], abs=1e-4), row["id"]
        best = max(range(len(t["logprobs"])), key=t["logprobs"].__getitem__)
        assert o["response"]["text"] == row["choices"][best], row["id"]
    accuracy = sum(o["response"]["text"] == r["choices"][0] for o, r in zip(
        (ours[r["id"]] for r in parity["rows"]), parity["rows"])) / len(parity["rows"])
    assert accuracy == parity[mode]["acc"]


@pytest.mark.slow
def test_under_the_chat_template_the_choice_follows_the_generation_prompt_without_a_space(parity):
    """What lm-eval asks for in chat mode (its requests, read back from its samples): the rendered chat ending in the
    assistant header as the context, the bare choice as the continuation; without the template, " <choice>"."""
    chat, plain = parity["chat"]["theirs"]["q0"]["requests"], parity["plain"]["theirs"]["q0"]["requests"]
    assert [cont for _, cont in chat] == QUESTIONS[0][1]
    assert [cont for _, cont in plain] == [" " + c for c in QUESTIONS[0][1]]
    assert chat[0][0] == parity["chat"]["context"] and chat[0][0].rstrip().endswith("assistant")


FLOAT64 = r"""
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.inference.backends.hf import HFBackend
from evaluator.stages.inference.params import GenerationParams, Progress

model, questions = sys.argv[1], json.loads(sys.argv[2])
samples = [Sample(id=f"q{i}", messages=[{"role": "user", "content": q}], choices=c)
           for i, (q, c) in enumerate(questions)]
backend = HFBackend(model, {"choice_scoring": "loglikelihood", "device": "cpu", "dtype": "float64", "batch_size": 32,
                            "chat_template": True}, GenerationParams())
backend.load()
rows = backend.run(samples, "mc", Progress(len(samples)))
lm = HFLM(pretrained=backend.runner.model, tokenizer=backend.runner.tokenizer, batch_size=32, device="cpu")
requests = [Instance(request_type="loglikelihood", doc={},
                     arguments=(backend.runner.prompt(s), backend.runner.continuation(c)), idx=0)
            for s in samples for c in s.choices]
harness = iter(logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True))
print(json.dumps({"dtype": str(next(backend.runner.model.parameters()).dtype),
                  "ours": [r.response["choice_logprobs"] for r in rows],
                  "lm_eval": [[next(harness) for _ in s.choices] for s in samples]}))
"""


@pytest.mark.slow
def test_in_float64_batched_loglikelihoods_equal_lm_evaluation_harness_to_1e_5_on_the_real_model(venvs):
    """Issue 13's 1e-5: in float32 the sums (near -30 here, -110 in the benchmark) differ from lm-eval's in their last
    bits with the batch shape, as lm-eval differs from itself; with the model in float64 (`dtype: float64`, scored
    in float64 throughout) what is left is the computation, which must be lm-eval's: shared-prefix cache, batched
    contexts and continuations, chat template, bare choice after the generation prompt."""
    assert os.path.isfile(os.path.join(REAL_MODEL, ".complete.json")), \
        f"no converted real model at {REAL_MODEL}; run `make real-model`"
    from conftest import ROOT
    proc = subprocess.run([venvs["inference"], "-c", FLOAT64, REAL_MODEL, json.dumps(QUESTIONS)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "torch.float64"
    for (question, _), ours, theirs in zip(QUESTIONS, out["ours"], out["lm_eval"], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-5, rel=0), question
    print("max |diff|", max(abs(a - b) for o, t in zip(out["ours"], out["lm_eval"]) for a, b in zip(o, t)))
