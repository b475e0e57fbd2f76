"""The daemon compares every scored result with the run's previous and best checkpoints (compare.json), keeps
the best checkpoint (best.json, its snapshot exempt from release, keep_best) and `status` shows both.

Real daemon CLI, real stage venvs: a `command` benchmark whose evaluation script writes per-sample scores
(scores.jsonl) from a table of planted 0/1 answers per iteration, so the numbers are known exactly."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3

from conftest import bench, history, ledger_rows, megatron_checkpoint, run_cli, write_config

N = 40  # samples per checkpoint
# iteration -> how many of the N samples (the first ones) the checkpoint answers right
CORRECT = {1000: 20, 2000: 32, 3000: 12}

SCORER = '''\
import json, os, sys
out, stage = sys.argv[1], sys.argv[2]
if stage == "infer":
    sys.exit(0)
iteration = int(sys.argv[3])
correct = json.load(open(sys.argv[4]))[str(iteration)]
values = [1.0 if i < correct else 0.0 for i in range(%(n)d)]
if correct < 0:  # a scores.jsonl that cannot be read (and a plausible metrics.json)
    open(os.path.join(out, "scores.jsonl"), "w").write("not json\\n")
    json.dump({"metrics": {"exact_match": 0.0}, "n": %(n)d}, open(os.path.join(out, "metrics.json"), "w"))
    sys.exit(0)
with open(os.path.join(out, "scores.jsonl"), "w") as f:
    for i, v in enumerate(values):
        f.write(json.dumps({"schema_version": 1, "sample_id": f"q{i}", "status": "ok", "category": None,
                            "prediction": "right" if v else "wrong", "target": "right",
                            "scores": {"exact_match": v}}) + "\\n")
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({"metrics": {"exact_match": sum(values) / len(values)}, "n": len(values)}, f)
''' % {"n": N}


def scored_bench(tmp_path, correct: dict) -> dict:
    """A command benchmark `qa` whose evaluation writes scores.jsonl + metrics.json from `correct`."""
    script = tmp_path / "scorer.py"
    script.write_text(SCORER)
    table = tmp_path / "correct.json"
    table.write_text(json.dumps({str(k): v for k, v in correct.items()}))
    return {"name": "qa", "type": "command", "main_metric": "exact_match",
            "inference": f"{{python}} {script} {{output_dir}} infer",
            "evaluation": f"{{python}} {script} {{output_dir}} eval {{iteration}} {table}"}


def result(cache, iteration: int, benchmark: str = "qa"):
    return cache / "results" / "tiny" / f"iter_{iteration:07d}" / benchmark


def compare_doc(cache, iteration: int) -> dict:
    return json.loads((result(cache, iteration) / "compare.json").read_text())


def best_doc(cache) -> dict:
    return json.loads((cache / "results" / "tiny" / "best.json").read_text())


def evaluated(tmp_path, correct=CORRECT, keep_best=1, extra=()):
    for it in correct:
        megatron_checkpoint(tmp_path / "ckpt", it, payload=f"weights {it}".encode())
    cfg = write_config(tmp_path, [scored_bench(tmp_path, correct), *extra], watch={"snapshot": "hardlink"},
                       best={"benchmark": "qa", "metric": "exact_match", "keep_best": keep_best})
    run_cli("--config", cfg, "--once", check=0)
    return cfg, tmp_path / "cache"


def test_each_scored_result_is_compared_with_the_previous_and_the_best_checkpoint(tmp_path, venvs):
    _, cache = evaluated(tmp_path)
    first = compare_doc(cache, 1000)
    assert first["against"] == {"prev": None, "best": None}  # nothing to compare the first checkpoint with

    second = compare_doc(cache, 2000)
    assert (second["against"]["prev"]["iteration"], second["against"]["best"]["iteration"]) == (1000, 1000)
    em = second["against"]["prev"]["metrics"]["exact_match"]
    assert (em["old"], em["new"], em["fixed"], em["broken"]) == (0.5, 0.8, 12, 0)

    third = compare_doc(cache, 3000)  # a regression: 20 samples broken against the best (= previous) one
    assert (third["run"], third["benchmark"], third["iteration"], third["revision"]) == ("tiny", "qa", 3000, 0)
    assert (third["against"]["prev"]["iteration"], third["against"]["best"]["iteration"]) == (2000, 2000)
    em = third["against"]["prev"]["metrics"]["exact_match"]
    assert em["method"] == "mcnemar_exact" and em["n"] == N
    assert (em["fixed"], em["broken"], round(em["delta"], 9)) == (0, 20, -0.5)
    assert em["significant"] and em["p"] < 1e-5
    assert {r["iteration"]: r["state"] for r in ledger_rows(cache)} == {1000: "recorded", 2000: "recorded",
                                                                      3000: "recorded"}


def test_the_sinks_get_the_comparison_and_the_runs_best_checkpoint_with_the_result(tmp_path, venvs):
    _, cache = evaluated(tmp_path)
    row = next(r for r in history(cache) if r["iteration"] == 3000)  # the local sink's history.jsonl
    assert (row["vs_prev"]["iteration"], row["vs_prev"]["metric"], round(row["vs_prev"]["delta"], 9)) == \
        (2000, "exact_match", -0.5)
    assert row["best"] == {"iteration": 2000, "score": 0.8, "rule": "max qa.exact_match"}


def test_the_best_is_the_best_other_checkpoint_not_the_result_itself(tmp_path, venvs):
    # 3000 is the best so far once it is scored; it is compared with the best *other* one (2000), not with itself
    _, cache = evaluated(tmp_path, correct={1000: 20, 2000: 32, 3000: 36})
    assert compare_doc(cache, 3000)["against"]["best"]["iteration"] == 2000
    assert best_doc(cache)["iteration"] == 3000


def test_a_result_without_per_sample_scores_is_recorded_without_a_comparison(tmp_path, venvs):
    _, cache = evaluated(tmp_path, extra=[bench("plain")])  # fake_stage.py writes no scores.jsonl
    rows = {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}
    assert all(state == "recorded" for state in rows.values()) and len(rows) == 6
    assert not (result(cache, 2000, "plain") / "compare.json").exists()
    assert (result(cache, 2000) / "compare.json").exists()


def test_a_result_found_scored_without_its_comparison_after_a_crash_gets_it_at_the_next_start(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    # what a crash between the scored transition and compare.json leaves: the row scored, no compare.json
    (result(cache, 3000) / "compare.json").unlink()
    with sqlite3.connect(cache / "ledger.sqlite3") as db:
        db.execute("UPDATE jobs SET state = 'scored' WHERE iteration = 3000")
        db.execute("DELETE FROM recordings WHERE iteration = 3000")
    run_cli("--config", cfg, "--once", check=0)
    assert compare_doc(cache, 3000)["against"]["prev"]["iteration"] == 2000
    assert {r["iteration"]: r["state"] for r in ledger_rows(cache)}[3000] == "recorded"


def test_a_comparison_that_fails_is_logged_and_the_result_recorded_all_the_same(tmp_path, venvs):
    for it in (1000, 2000):
        megatron_checkpoint(tmp_path / "ckpt", it)
    cfg = write_config(tmp_path, [scored_bench(tmp_path, {1000: 20, 2000: -1})])
    proc = run_cli("--config", cfg, "--once", check=0)
    assert {r["iteration"]: r["state"] for r in ledger_rows(tmp_path / "cache")} == {1000: "recorded",
                                                                                    2000: "recorded"}
    assert not (result(tmp_path / "cache", 2000) / "compare.json").exists()
    assert "tiny@2000/qa: not compared:" in proc.stderr and "scores.jsonl:1: not valid JSON" in proc.stderr


def test_best_json_names_the_best_checkpoint_its_rule_and_its_kept_snapshot(tmp_path, venvs):
    _, cache = evaluated(tmp_path)
    doc = best_doc(cache)
    assert (doc["iteration"], doc["score"], doc["rule"]) == (2000, 0.8, "max qa.exact_match")
    assert doc["checkpoint"] == str(tmp_path / "ckpt" / "iter_0002000")
    assert doc["metrics"] == {"qa.exact_match": 0.8} and [k["iteration"] for k in doc["kept"]] == [2000]
    assert doc["snapshot"] == str(cache / "snapshots" / "tiny" / "2000" / "iter_0002000")
    assert isinstance(doc["updated_at"], float)


def test_the_best_checkpoints_snapshot_outlives_the_trainer_deleting_it_and_a_restart(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    snapshots = cache / "snapshots" / "tiny"
    assert sorted(os.listdir(snapshots)) == ["2000"]  # the others were released once recorded
    shutil.rmtree(tmp_path / "ckpt" / "iter_0002000")  # the trainer rotates it away
    run_cli("--config", cfg, "--once", check=0)  # a restart does not release it either
    kept = snapshots / "2000" / "iter_0002000" / "mp_rank_00" / "model_optim_rng.pt"
    assert kept.read_bytes() == b"weights 2000"
    assert best_doc(cache)["snapshot"] == str(snapshots / "2000" / "iter_0002000")


def test_a_dethroned_best_checkpoint_is_released_and_the_new_one_kept(tmp_path, venvs):
    correct = {**CORRECT, 4000: 38}
    cfg, cache = evaluated(tmp_path, correct={k: v for k, v in correct.items() if k != 4000})
    megatron_checkpoint(tmp_path / "ckpt", 4000, payload=b"weights 4000")
    (tmp_path / "correct.json").write_text(json.dumps({str(k): v for k, v in correct.items()}))
    run_cli("--config", cfg, "--once", check=0)
    assert best_doc(cache)["iteration"] == 4000
    assert sorted(os.listdir(cache / "snapshots" / "tiny")) == ["4000"]


def test_keep_best_keeps_the_snapshots_of_the_n_best(tmp_path, venvs):
    _, cache = evaluated(tmp_path, keep_best=2)
    doc = best_doc(cache)
    assert [(k["iteration"], k["score"]) for k in doc["kept"]] == [(2000, 0.8), (1000, 0.5)]
    assert sorted(os.listdir(cache / "snapshots" / "tiny")) == ["1000", "2000"]


def test_status_shows_the_best_checkpoint_and_the_last_comparison(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    text = run_cli("status", "--config", cfg, check=0).stdout
    row = next(line for line in text.splitlines() if line.strip().startswith("2000"))
    assert row.endswith("<- best")
    assert (f"best: iteration 2000 (max qa.exact_match = 0.8); snapshot kept at "
            f"{cache / 'snapshots' / 'tiny' / '2000' / 'iter_0002000'}") in text
    assert "last comparison: qa 3000 vs 2000: exact_match 0.8 -> 0.3, delta -0.5 (p=" in text
    assert "mcnemar_exact, n=40), significant; 0 fixed, 20 broken" in text

    run = json.loads(run_cli("status", "--config", cfg, "--json", check=0).stdout)["runs"][0]
    assert (run["best"]["iteration"], run["best"]["rule"]) == (2000, "max qa.exact_match")
    (last,) = run["last_comparison"]
    assert (last["iteration"], last["against"], last["metric"], last["method"]) == (3000, 2000, "exact_match",
                                                                                   "mcnemar_exact")


def test_a_restart_that_finishes_recording_the_best_checkpoint_does_not_release_its_snapshot(tmp_path, venvs):
    cfg, cache = evaluated(tmp_path)
    # a kill after every sink took iteration 2000 (the best) but before its row moved to recorded: the next start
    # finishes the recording, which finalises the iteration, before it has ranked the run's checkpoints
    with sqlite3.connect(cache / "ledger.sqlite3") as db:
        db.execute("UPDATE jobs SET state = 'scored' WHERE iteration = 2000")
    run_cli("--config", cfg, "--once", check=0)
    assert {r["iteration"]: r["state"] for r in ledger_rows(cache)}[2000] == "recorded"
    kept = cache / "snapshots" / "tiny" / "2000" / "iter_0002000" / "mp_rank_00" / "model_optim_rng.pt"
    assert kept.read_bytes() == b"weights 2000"
    assert best_doc(cache)["snapshot"] == str(cache / "snapshots" / "tiny" / "2000" / "iter_0002000")
