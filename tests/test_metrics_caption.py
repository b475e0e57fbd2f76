"""Caption metrics: our registry must give coco-caption's (pycocoevalcap's) numbers on the same inputs.

The daemon venv has no aac-metrics/torch, so the metric code runs in the evaluation venv through a small
runner script (below) that writes its findings as JSON; the tests then assert on them.
"""
from __future__ import annotations


import pytest

from conftest import run_in_evaluation_venv

TOL = 1e-9

# One synthetic set: 50 candidates x 5 references with casing, punctuation, contractions, a newline,
# non-ASCII text, a punctuation-only candidate and one failed inference (ok=False, "" caption), in 3 categories.
DATA = r'''
import random

def make_set():
    rng = random.Random(1234)
    nouns = ["dog", "cat", "car", "bird", "man", "woman", "child", "train", "door", "rain", "engine", "crowd",
             "water", "bell", "wind", "machine", "baby", "horse"]
    verbs = ["barks", "meows", "passes", "sings", "talks", "laughs", "cries", "slams", "falls", "runs", "rings",
             "blows", "hums", "splashes", "whistles", "knocks"]
    extras = ["loudly", "in the distance", "nearby", "while people talk", "on a busy street", "twice",
              "and then stops", "as birds chirp", "in a large room", "outside", "near a river", "at night"]
    punct = [".", "!", ",", "...", " -", "?", ";", ""]

    def sentence():
        words = [rng.choice(["a", "the", "A", "The", "some"]), rng.choice(nouns), rng.choice(verbs)]
        words += rng.sample(extras, rng.randint(0, 2))
        s = " ".join(words)
        if rng.random() < 0.3:
            s = s.replace(" ", ", ", 1)
        if rng.random() < 0.2:
            s = s.upper() if rng.random() < 0.5 else s.title()
        if rng.random() < 0.15:
            s = s.replace(" is ", "'s ").replace("the ", "the man's ", 1)
        return s + rng.choice(punct)

    refs = [[sentence() for _ in range(5)] for _ in range(50)]
    cands = []
    for r in refs:
        x = rng.random()
        cands.append(r[rng.randrange(5)].lower() if x < 0.25 else sentence() if x < 0.8
                     else " ".join(r[0].split()[: rng.randint(1, 4)]))
    cands[7] = "A dog\nbarks  loudly, then   stops!"
    cands[11] = "Café ambience — people talk (softly)."
    cands[13] = "..."
    cands[20] = ""  # failed inference: ok=False
    refs[5][2] = "A DOG, barking; \"Loudly\"!"
    ok = [i != 20 for i in range(50)]
    cats = [["indoor", "outdoor", "vehicle"][i % 3] for i in range(50)]
    return cands, refs, ok, cats
'''

FIDELITY = DATA + r'''
import json, sys
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.caption import default_cache_dir
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

cands, refs, ok, cats = make_set()
samples = [Sample(id=f"c{i}", messages=[{"role": "user", "content": "describe"}], references=r, category=c)
           for i, (r, c) in enumerate(zip(refs, cats))]
names = ["bleu", "rouge_l", "meteor", "cider_d"]
inp = MetricInput(predictions=cands, samples=samples, ok=ok, options={}, cache_dir=default_cache_dir())
first, second = compute(names, inp).__dict__, compute(names, inp).__dict__

tok = PTBTokenizer()
gts = tok.tokenize({i: [{"caption": x} for x in r] for i, r in enumerate(refs)})
res = tok.tokenize({i: [{"caption": c if k else ""}] for i, (c, k) in enumerate(zip(cands, ok))})
meteor = Meteor()

def coco(ids):
    g, r = {i: gts[i] for i in ids}, {i: res[i] for i in ids}
    bleu, _ = Bleu(4).compute_score(g, r)
    return {**{f"bleu_{k + 1}": bleu[k] for k in range(4)}, "meteor": meteor.compute_score(g, r)[0]}

everything = list(range(len(cands)))
rouge, rouge_each = Rouge().compute_score(gts, res)
cider, cider_each = Cider().compute_score(gts, res)
bleu_each = Bleu(4).compute_score(gts, res)[1]
meteor_each = meteor.compute_score(gts, res)[1]
by_cat = {}
for c in sorted(set(cats)):
    ids = [i for i in everything if cats[i] == c]
    by_cat[c] = {**coco(ids), "n": len(ids), "rouge_l": sum(rouge_each[i] for i in ids) / len(ids),
                 "cider_d": sum(cider_each[i] for i in ids) / len(ids)}
reference = {"values": {**coco(everything), "rouge_l": rouge, "cider_d": cider},
             "per_sample": {"rouge_l": list(map(float, rouge_each)), "cider_d": list(map(float, cider_each)),
                            **{f"bleu_{k + 1}": list(map(float, bleu_each[k])) for k in range(4)},
                            "meteor": list(map(float, meteor_each))},
             "per_category": by_cat, "tokenized_candidates": [res[i][0] for i in everything],
             "tokenized_references": [gts[i] for i in everything]}
import aac_metrics
from evaluator.stages.evaluation.metrics.caption import java_version, _java
json.dump({"ours": first, "again": second, "coco": reference, "aac_version": aac_metrics.__version__,
           "java_version": java_version(_java({}))}, open(sys.argv[1], "w"))
'''

OFFLINE = r'''
import json, os, sys
cache, fense_data = sys.argv[2], sys.argv[3]
os.environ["FENSE_DATA"] = fense_data  # an empty folder: no FENSE checker, whatever this machine has
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.caption import prepare_cache, PTB_JAR, METEOR_JAR, METEOR_PARAPHRASE

samples = [Sample(id=f"c{i}", messages=[{"role": "user", "content": "describe"}], references=r)
           for i, r in enumerate([["a dog barks", "a dog is barking loudly"], ["rain falls on a roof", "heavy rain"]])]
inp = MetricInput(predictions=["a dog barking", "rain"], samples=samples, ok=[True, True], options={},
                  cache_dir=cache)
heavy = compute(["spice", "spider", "spider_fl", "fense"], inp).__dict__
files = [os.path.join(cache, p) for p in (PTB_JAR, METEOR_JAR, METEOR_PARAPHRASE)]
before = [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files]
prepare_cache(cache)  # a second set-up changes nothing
after = [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files]
sbert = compute(["sbert_sim"], inp).__dict__
json.dump({"heavy": heavy, "sbert": sbert, "setup_idempotent": before == after}, open(sys.argv[1], "w"))
'''


@pytest.fixture(scope="module")
def fidelity(venvs, tmp_path_factory):
    return run_in_evaluation_venv(venvs, tmp_path_factory.mktemp("fidelity"), FIDELITY)


@pytest.fixture(scope="module")
def offline(venvs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    (tmp / "fense_data").mkdir()
    return run_in_evaluation_venv(venvs, tmp, OFFLINE, str(tmp / "cache"), str(tmp / "fense_data"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor", "cider_d"])
def test_caption_metric_equals_pycocoevalcap_on_ptb_tokens(fidelity, name):
    ours, coco = fidelity["ours"]["values"][name], fidelity["coco"]["values"][name]
    assert abs(ours - coco) <= TOL, (name, ours, coco)
    assert 0 < coco  # the synthetic set is not degenerate


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rouge_l", "cider_d"])
def test_per_sample_scores_equal_pycocoevalcap_and_average_to_the_value(fidelity, name):
    ours, coco = fidelity["ours"]["per_sample"][name], fidelity["coco"]["per_sample"][name]
    assert len(ours) == 50 and max(abs(a - b) for a, b in zip(ours, coco)) <= TOL
    assert abs(sum(ours) / len(ours) - fidelity["ours"]["values"][name]) <= TOL
    assert ours[20] == 0.0  # the failed inference scored as an empty caption


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor"])
def test_corpus_metrics_have_pycocoevalcaps_sentence_scores_per_sample_not_averaging_to_the_value(fidelity, name):
    ours, coco = fidelity["ours"]["per_sample"][name], fidelity["coco"]["per_sample"][name]
    assert len(ours) == 50 and max(abs(a - b) for a, b in zip(ours, coco)) <= TOL
    assert fidelity["ours"]["per_sample_kind"][name] == "sentence"
    assert name not in fidelity["ours"]["stderr"]
    assert abs(sum(ours) / len(ours) - fidelity["ours"]["values"][name]) > 1e-6  # the corpus score is reported


@pytest.mark.slow
def test_every_per_sample_caption_score_records_the_ptb_tokens_it_compared(fidelity):
    ours, coco = fidelity["ours"], fidelity["coco"]
    assert sorted(ours["compared"]) == sorted(ours["per_sample"])
    for name, rows in ours["compared"].items():
        assert [r["prediction"] for r in rows] == coco["tokenized_candidates"], name
        assert [r["reference"] for r in rows] == coco["tokenized_references"], name
    assert ours["compared"]["cider_d"][7]["prediction"] == "a dog barks loudly then stops"  # had a line break


@pytest.mark.slow
def test_caption_methods_name_the_aac_metrics_version_and_the_java(fidelity):
    methods = fidelity["ours"]["methods"]
    assert sorted(methods) == sorted(fidelity["ours"]["values"])
    for name, method in methods.items():
        assert method.startswith(f"aac-metrics {fidelity['aac_version']} "), (name, method)
        assert f"; Java {fidelity['java_version']}" in method, (name, method)


@pytest.mark.slow
def test_predictions_made_one_line_are_counted_in_the_result(fidelity):
    assert fidelity["ours"]["notes"] == {"caption_predictions_made_one_line": 1}  # cands[7]


@pytest.mark.slow
def test_per_category_corpus_metrics_are_recomputed_on_the_category(fidelity):
    ours, coco = fidelity["ours"]["per_category"], fidelity["coco"]["per_category"]
    assert sorted(ours) == ["indoor", "outdoor", "vehicle"]
    for category, expected in coco.items():
        assert ours[category]["n"] == expected["n"]
        for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"):
            assert abs(ours[category][name] - expected[name]) <= TOL, (category, name)


@pytest.mark.slow
def test_stderr_is_given_for_mean_metrics_only(fidelity):
    ours = fidelity["ours"]
    assert sorted(ours["stderr"]) == ["cider_d", "rouge_l"]
    scores = ours["per_sample"]["cider_d"]
    m = sum(scores) / len(scores)
    expected = (sum((x - m) ** 2 for x in scores) / (len(scores) - 1)) ** 0.5 / len(scores) ** 0.5
    assert abs(ours["stderr"]["cider_d"] - expected) <= 1e-12


@pytest.mark.slow
def test_same_inputs_twice_give_identical_output(fidelity):
    assert fidelity["ours"] == fidelity["again"]


@pytest.mark.slow
def test_spice_spider_and_fense_are_unavailable_offline_never_a_number(offline):
    heavy = offline["heavy"]
    assert heavy["values"] == {} and heavy["per_sample"] == {} and heavy["per_category"] == {}
    assert sorted(heavy["unavailable"]) == ["fense", "spice", "spider", "spider_fl"]
    for name, why in heavy["unavailable"].items():
        assert why.startswith("unavailable: missing "), why
    assert "stanford-corenlp-3.6.0.jar" in heavy["unavailable"]["spice"]
    assert "stanford-corenlp-3.6.0-models.jar" in heavy["unavailable"]["spider"]
    assert "echecker_clotho_audiocaps_base.ckpt" in heavy["unavailable"]["fense"]
    assert "paraphrase-TinyBERT-L6-v2" in heavy["unavailable"]["fense"]
    assert "echecker_clotho_audiocaps_base.ckpt" in heavy["unavailable"]["spider_fl"]


@pytest.mark.slow
def test_jar_setup_is_automatic_and_idempotent(offline):
    assert offline["setup_idempotent"]


@pytest.mark.slow
def test_sbert_similarity_is_reported_under_the_models_name(offline):
    sbert = offline["sbert"]
    assert list(sbert["values"]) == ["sbert_sim_minilm_l6"] and "sbert_sim" not in sbert["values"]
    assert 0.3 < sbert["values"]["sbert_sim_minilm_l6"] <= 1.0
    assert "sbert_sim_minilm_l6" in sbert["stderr"]


# With the files present (faked: empty CoreNLP 3.6.0 jars, an echecker file, a cached SBERT entry) the
# heavy metrics are computed, and combined from aac-metrics' per-sample outputs the published way. The
# Java/model parts are replaced by fixed scores, so this checks our plumbing, not SPICE or FENSE themselves.
PLUMBING = r'''
import json, os, sys
tmp = sys.argv[2]
os.environ["FENSE_DATA"] = os.path.join(tmp, "fense_data")
os.environ["HF_HUB_CACHE"] = os.path.join(tmp, "hf")
snapshot = os.path.join(tmp, "hf", "models--sentence-transformers--paraphrase-TinyBERT-L6-v2")
os.makedirs(os.path.join(snapshot, "snapshots", "0" * 40))
os.makedirs(os.path.join(snapshot, "refs"))
open(os.path.join(snapshot, "refs", "main"), "w").write("0" * 40)
open(os.path.join(snapshot, "snapshots", "0" * 40, "modules.json"), "w").write("[]")
os.makedirs(os.environ["FENSE_DATA"])
open(os.path.join(os.environ["FENSE_DATA"], "echecker_clotho_audiocaps_base.ckpt"), "wb").close()
cache = os.path.join(tmp, "cache")

import importlib
import torch
# the modules, not the same-named functions aac_metrics.functional re-exports over them
fer_mod, sbert_mod, spice_mod = (importlib.import_module(f"aac_metrics.functional.{m}") for m in ("fer", "sbert_sim", "spice"))
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.caption import SPICE_DIR, SPICE_LIB_CORENLP, prepare_cache

prepare_cache(cache)
for jar in SPICE_LIB_CORENLP:
    open(os.path.join(cache, SPICE_DIR, "lib", jar), "wb").close()

SPICE = torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=torch.float64)
FER = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
SIM = torch.tensor([0.9, 0.5, 0.7, 0.6], dtype=torch.float64)
spice_mod.spice = lambda c, r, **kw: ({"spice": SPICE.mean()}, {"spice": SPICE})
fer_mod._load_echecker_and_tokenizer = lambda *a, **kw: ("echecker", "tokenizer")
fer_mod.fer = lambda c, **kw: ({"fer": FER.mean()}, {"fer": FER})
sbert_mod._load_sbert = lambda *a, **kw: "sbert"
sbert_mod.sbert_sim = lambda c, r, **kw: ({"sbert_sim": SIM.mean()}, {"sbert_sim": SIM})
from evaluator.stages.evaluation.metrics import caption
caption.PROBES["spice"] = lambda java, cache: ""  # the empty stand-in jars cannot run SPICE's Java probe

refs = [["a dog barks", "a dog is barking"], ["rain falls", "heavy rain on a roof"], ["a cat meows", "cats"],
        ["people talk", "a crowd chatters"]]
samples = [Sample(id=f"c{i}", messages=[{"role": "user", "content": "describe"}], references=r,
                  category="ab"[i % 2]) for i, r in enumerate(refs)]
inp = MetricInput(predictions=["a dog barking", "rain", "a cat", "people talking"], samples=samples,
                  ok=[True] * 4, options={}, cache_dir=cache)
json.dump(compute(["cider_d", "spice", "spider", "spider_fl", "fense"], inp).__dict__, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_with_their_files_present_spice_spider_fense_are_combined_per_sample(venvs, tmp_path):
    r = run_in_evaluation_venv(venvs, tmp_path, PLUMBING, str(tmp_path))
    assert r["unavailable"] == {}
    cider, spice = r["per_sample"]["cider_d"], [0.2, 0.4, 0.1, 0.3]
    fer, sim = [0.0, 1.0, 0.0, 1.0], [0.9, 0.5, 0.7, 0.6]
    spider = [(c + s) / 2 for c, s in zip(cider, spice)]
    expected = {"spice": spice, "spider": spider, "spider_fl": [x * (1 - 0.9 * f) for x, f in zip(spider, fer)],
                "fense": [x * (1 - 0.9 * f) for x, f in zip(sim, fer)]}
    for name, scores in expected.items():
        assert r["per_sample"][name] == pytest.approx(scores, abs=1e-12), name
        assert r["values"][name] == pytest.approx(sum(scores) / 4, abs=1e-12), name
        assert r["per_category"]["a"][name] == pytest.approx((scores[0] + scores[2]) / 2, abs=1e-12), name
        assert name in r["stderr"]


def test_metric_options_nested_under_a_metric_name_reach_the_caption_metrics():
    """Config `metric_options: {sbert_sim: {sbert_model: ...}}` is what the stage passes on."""
    from evaluator.stages.evaluation.metrics.caption import merged_options
    options = {"sbert_sim": {"sbert_model": "/m/x"}, "meteor": {"java_path": "/j/java"}, "llm_judge": {"model": "j"},
               "device": "cpu"}
    assert merged_options(options, ["sbert_sim", "meteor", "cider_d"]) == {
        "sbert_model": "/m/x", "java_path": "/j/java", "device": "cpu"}
