"""Caption scoring pitfalls (issue 16 item 3): chatty multi-line captions, the Java in use, CIDEr-D on a subset.

The pure rules run in the daemon venv; what needs aac-metrics and Java runs in the evaluation venv through runner
scripts (as tests/test_metrics_caption.py does), and the stage runs as `python -m evaluator.stages.evaluation`.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import ROOT, run_in_evaluation_venv
from evaluator.benchmarks.dataset import Sample, write_dataset
from evaluator.common.contracts import StageJob
from evaluator.common.records import RunResult, write_results
from evaluator.stages.evaluation.metrics.caption import java_major, one_line, probes_for, subset_note


@pytest.mark.parametrize("text, expected", [
    ("A dog barks.", "A dog barks."),
    ("A dog\nbarks.", "A dog barks."),
    ("A dog\r\nbarks.", "A dog  barks."),
    ("A dog\tbarks\rloudly", "A dog barks loudly"),
    ("one\u2028two\x85three\x0bfour\x0cfive", "one two three four five"),
])
def test_one_line_turns_every_line_break_and_tab_into_a_space(text, expected):
    assert one_line(text) == expected
    assert one_line(text).splitlines() == [one_line(text)]


@pytest.mark.parametrize("version, major", [("17.0.15", 17), ("1.8.0_392", 8), ("11.0.13", 11), ("21", 21),
                                            ("25-ea", 25)])
def test_java_major_reads_both_numbering_schemes(version, major):
    assert java_major(version) == major


@pytest.mark.parametrize("names, probes", [
    (["cider_d", "bleu_4"], ["ptb"]),
    (["meteor", "rouge_l"], ["ptb", "meteor"]),
    (["spider"], ["ptb", "spice"]),
    (["meteor", "spider_fl", "sbert_sim"], ["ptb", "meteor", "spice"]),
])
def test_the_preflight_probes_the_java_tools_the_requested_metrics_run(names, probes):
    assert probes_for(names) == probes


def test_the_whole_set_gets_no_subset_note():
    assert subset_note(["cider_d"], 10, 10) == {}


def test_a_subset_is_flagged_with_the_full_sets_size_and_a_warning_for_idf_metrics():
    note = subset_note(["bleu_4", "cider_d", "spider"], 4, 10)
    assert note["subset"] is True and note["n_full"] == 10
    assert len(note["warnings"]) == 1 and "cider_d, spider" in note["warnings"][0]
    assert "4 of 10" in note["warnings"][0]


def test_a_subset_without_idf_metrics_is_flagged_without_a_warning():
    assert subset_note(["bleu_4", "accuracy"], 4, 10) == {"subset": True, "n_full": 10}


# A caption with line breaks and tabs against its one-line form, through compute(); and aac-metrics' own
# evaluate() on the same input, which is what the normalisation protects against.
NEWLINES = r'''
import json, sys
from evaluator.benchmarks.dataset import Sample
from evaluator.stages.evaluation.metrics import MetricInput, compute
from evaluator.stages.evaluation.metrics.caption import default_cache_dir, prepare_cache, _java

refs = [["a dog barks loudly", "a dog is barking"], ["rain falls on a tin roof", "heavy rain"],
        ["people talk in a large room", "a crowd chatters"]]
chatty = ["Sure! Here is the caption:\n\nA dog barks\tloudly.", "Rain\r\nfalls on\u2028a roof.", "people talk"]
flat = ["Sure! Here is the caption:  A dog barks loudly.", "Rain  falls on a roof.", "people talk"]
samples = [Sample(id=f"c{i}", messages=[{"role": "user", "content": "describe"}], references=r)
           for i, r in enumerate(refs)]
names = ["bleu", "meteor", "rouge_l", "cider_d"]
cache = default_cache_dir()

def run(preds):
    return compute(names, MetricInput(predictions=preds, samples=samples, ok=[True] * 3, options={},
                                      cache_dir=cache)).__dict__

out = {"chatty": run(chatty), "flat": run(flat)}
prepare_cache(cache)
from aac_metrics.utils import checks
checks.MAX_JAVA_MAJOR_VERSION = 99  # the Java check is not what this shows
from aac_metrics import evaluate
try:
    evaluate(chatty, refs, metrics=["cider_d"], cache_path=cache, java_path=_java({}))
    out["aac_metrics_raw"] = "scored"
except Exception as e:  # what aac-metrics does with the raw captions, whatever it is
    out["aac_metrics_raw"] = f"{type(e).__name__}: {e}"
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.fixture(scope="module")
def newlines(venvs, tmp_path_factory):
    return run_in_evaluation_venv(venvs, tmp_path_factory.mktemp("newlines"), NEWLINES)


@pytest.mark.slow
def test_a_caption_with_line_breaks_scores_exactly_as_its_one_line_form(newlines):
    chatty, flat = newlines["chatty"], newlines["flat"]
    for key in ("values", "per_sample", "stderr", "compared"):
        assert chatty[key] == flat[key], key
    assert chatty["values"]["cider_d"] > 0
    assert chatty["notes"] == {"caption_predictions_made_one_line": 2}
    assert flat["notes"] == {"caption_predictions_made_one_line": 0}


@pytest.mark.slow
def test_aac_metrics_alone_refuses_the_same_captions(newlines):
    # the pitfall is real: without the normalisation the library stops at its __debug__ newline check
    assert newlines["aac_metrics_raw"].startswith("ValueError"), newlines["aac_metrics_raw"]
    assert "newline" in newlines["aac_metrics_raw"]


# The Java preflight, on real Javas: the one on PATH (proven for PTB and METEOR), an executable that is not a
# Java, and SPICE 1.0 on the Java here. SPICE's CoreNLP 3.6.0 jars ship with nothing reachable, so CoreNLP 3.4.1
# stands in under their names: SPICE 1.0 fails on Java >= 16 before it loads any CoreNLP model (fst's
# reflection into java.lang.String), which is the failure shown here.
PREFLIGHT = r'''
import json, os, shutil, sys
from evaluator.common.errors import EvaluatorError
from evaluator.stages.evaluation.metrics import caption
from evaluator.stages.evaluation.metrics.caption import (PTB_JAR, SPICE_DIR, SPICE_LIB_CORENLP, _java,
                                                         default_cache_dir, java_preflight, java_version, prepare_cache)
out = {}
cache = default_cache_dir()
prepare_cache(cache)
java = _java({})
out["java"], out["version"] = java, java_version(java)

calls = []
for name, probe in list(caption.PROBES.items()):
    caption.PROBES[name] = lambda j, c, probe=probe, name=name: calls.append(name) or probe(j, c)
out["first"] = java_preflight(java, cache, ["ptb", "meteor"])
out["second"] = java_preflight(java, cache, ["ptb", "meteor"])
out["probe_calls"] = list(calls)  # a copy: the SPICE case below probes another cache

def error(java, cache, probes):
    try:
        java_preflight(java, cache, probes)
        return None
    except EvaluatorError as e:
        return str(e)

out["not_java"] = error(shutil.which("true"), cache, ["ptb"])

spice_cache = sys.argv[2]
prepare_cache(spice_cache)
for jar in SPICE_LIB_CORENLP:  # stand-ins: see the test module
    shutil.copyfile(os.path.join(spice_cache, PTB_JAR), os.path.join(spice_cache, SPICE_DIR, "lib", jar))
out["spice"] = error(java, spice_cache, ["ptb", "spice"])
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.fixture(scope="module")
def preflight(venvs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    return run_in_evaluation_venv(venvs, tmp, PREFLIGHT, str(tmp / "spice-cache"))


@pytest.mark.slow
def test_the_java_here_passes_the_ptb_and_meteor_probes_once_per_process(preflight):
    assert preflight["first"] == preflight["second"] == preflight["version"]
    assert preflight["probe_calls"] == ["ptb", "meteor"]  # the second preflight reused the verdicts


@pytest.mark.slow
def test_an_executable_that_is_not_java_is_a_clear_error_naming_it(preflight):
    message = preflight["not_java"]
    assert message is not None and "-version" in message and "without a version" in message
    assert shutil.which("true") in message


@pytest.mark.slow
def test_spice_on_a_java_it_cannot_run_on_is_a_clear_error_naming_the_java_and_its_version(preflight):
    if java_major(preflight["version"]) < 16:
        pytest.skip(f"Java {preflight['version']} here: SPICE 1.0's failure needs Java >= 16")
    message = preflight["spice"]
    assert message is not None, "SPICE 1.0 ran on Java >= 16"
    assert f"Java {preflight['java']} (version {preflight['version']}) fails the spice probe" in message
    assert "InaccessibleObjectException" in message
    assert "java_path" in message


# The evaluation stage on a caption benchmark: 4 of its 6 clips have predictions, as after `sample_size: 4`.
def _dataset(tmp) -> str:
    refs = [["a dog barks loudly", "a dog is barking"], ["rain falls on a tin roof", "heavy rain"],
            ["people talk in a large room", "a crowd chatters"], ["a car passes by", "a vehicle drives past"],
            ["birds sing in the morning", "birds chirp"], ["a door slams shut", "a door closes loudly"]]
    root = tmp / "clips"
    write_dataset(str(root), {"dataset_id": "clips"},
                  [Sample(id=f"clip{i}", messages=[{"role": "user", "content": "Describe the sound."}], references=r)
                   for i, r in enumerate(refs)])
    return str(root)


def _stage(venvs, tmp, name: str, dataset: str, captions: list[str]) -> tuple[dict, list[dict], str]:
    folder = tmp / name
    folder.mkdir()
    preds = folder / "predictions.jsonl"
    write_results(str(preds), [RunResult(sample_id=f"clip{i}", dataset_id="clips", backend="hf", run_config={},
                                         request_messages=[], response={"text": c, "usage": {}})
                               for i, c in enumerate(captions)])
    job = StageJob(stage="evaluation", run="pitfalls", iteration=100, checkpoint="/ckpt/iter_0000100",
                   benchmark={"name": "clips", "type": "dataset", "dataset": dataset,
                              "metrics": ["bleu_4", "meteor", "cider_d"]},
                   output_dir=str(folder), extra={"predictions": str(preds)})
    job.write(str(folder / "job.json"))
    proc = subprocess.run([venvs["evaluation"], "-m", "evaluator.stages.evaluation", "--job", str(folder / "job.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    return json.loads((folder / "metrics.json").read_text()), rows, proc.stderr


CAPTIONS = ["A dog\nbarks.", "rain on a roof", "people talking", "a car drives by", "birds chirping", "a door"]


@pytest.fixture(scope="module")
def stage_runs(venvs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage")
    dataset = _dataset(tmp)
    return _stage(venvs, tmp, "subset", dataset, CAPTIONS[:4]), _stage(venvs, tmp, "full", dataset, CAPTIONS)


@pytest.mark.slow
def test_cider_d_on_a_subset_is_flagged_and_warned_about_in_metrics_json(stage_runs):
    (doc, _, log), _ = stage_runs
    assert doc["n"] == 4 and doc["subset"] is True and doc["n_full"] == 6
    assert len(doc["warnings"]) == 1 and doc["warnings"][0].startswith("cider_d computed on 4 of 6 samples")
    assert "warning: cider_d computed on 4 of 6" in log


@pytest.mark.slow
def test_the_full_set_carries_no_subset_flag(stage_runs):
    _, (doc, _, _) = stage_runs
    assert doc["n"] == 6 and "subset" not in doc and "n_full" not in doc and "warnings" not in doc


@pytest.mark.slow
def test_metrics_json_labels_each_caption_metric_and_counts_one_lined_captions(stage_runs):
    _, (doc, _, _) = stage_runs
    assert doc["notes"] == {"caption_predictions_made_one_line": 1}
    assert sorted(doc["methods"]) == ["bleu_4", "cider_d", "meteor"]
    assert all(m.startswith(f"aac-metrics {doc['versions']['aac-metrics']} ") for m in doc["methods"].values())
    assert doc["per_sample"] == {"bleu_4": "sentence", "meteor": "sentence", "cider_d": "mean"}


@pytest.mark.slow
def test_scores_jsonl_shows_each_captions_sentence_scores_and_the_tokens_compared(stage_runs):
    _, (_, rows, _) = stage_runs
    first = rows[0]
    assert first["prediction"] == "A dog\nbarks."  # the model's text as it was
    assert first["compared"]["cider_d"] == {"prediction": "a dog barks",
                                            "reference": ["a dog barks loudly", "a dog is barking"]}
    assert sorted(first["scores"]) == ["bleu_4", "cider_d", "meteor"]
    assert all(isinstance(v, float) for v in first["scores"].values())

