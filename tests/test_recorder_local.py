"""The always-on local sink: one history line per result, never two, even after a torn write."""
from __future__ import annotations

import json

from recorder.sinks import LocalHistorySink, ResultRecord


def result(it=1000, value=0.5):
    return ResultRecord(run="tiny", iteration=it, benchmark="qa", metrics={"acc": value}, tokens_b=it * 0.001)


def lines(tmp_path):
    return (tmp_path / "results" / "tiny" / "history.jsonl").read_text().splitlines()


def test_a_result_offered_twice_is_written_once(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result())
    sink.record(result())  # e.g. offered again after a crash before the ledger noted it
    sink.record(result(2000, 0.7))
    rows = [json.loads(x) for x in lines(tmp_path)]
    assert [(r["iteration"], r["metrics"]["acc"]) for r in rows] == [(1000, 0.5), (2000, 0.7)]
    assert rows[0]["tokens_b"] == 1.0


def test_a_half_written_last_line_is_dropped_before_the_next_append(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result())
    path = tmp_path / "results" / "tiny" / "history.jsonl"
    with open(path, "a") as f:
        f.write('{"run": "tiny", "iteration": 2000, "bench')  # the process died mid-write
    sink.record(result(2000, 0.7))
    rows = [json.loads(x) for x in lines(tmp_path)]
    assert [r["iteration"] for r in rows] == [1000, 2000]


# ---- re-runs: a higher revision replaces the line of the lower one ----------------------------------
def rerun(it=2000, value=0.9, revision=1, fingerprint="cd34"):
    r = result(it, value)
    r.revision, r.fingerprint = revision, fingerprint
    return r


def test_a_rerun_replaces_the_earlier_line_so_each_iteration_keeps_one_row(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    for it, value in ((1000, 0.5), (2000, 0.7), (3000, 0.8)):
        first = result(it, value)
        first.fingerprint = "ab12"
        sink.record(first)
    sink.record(rerun(2000, 0.6))
    rows = [json.loads(x) for x in lines(tmp_path)]
    assert [(r["iteration"], r["metrics"]["acc"], r["revision"], r["fingerprint"]) for r in rows] == [
        (1000, 0.5, 0, "ab12"), (2000, 0.6, 1, "cd34"), (3000, 0.8, 0, "ab12")]


def test_the_same_or_an_older_revision_offered_again_changes_nothing(tmp_path):
    LocalHistorySink(str(tmp_path)).record(result(2000, 0.7))
    LocalHistorySink(str(tmp_path)).record(rerun(2000, 0.6))
    before = (tmp_path / "results" / "tiny" / "history.jsonl").read_bytes()
    assert [(r["metrics"]["acc"], r["revision"]) for r in map(json.loads, lines(tmp_path))] == [(0.6, 1)]
    restarted = LocalHistorySink(str(tmp_path))  # a crash before the ledger noted either: both offered again
    restarted.record(rerun(2000, 0.6))
    restarted.record(result(2000, 0.7))
    assert (tmp_path / "results" / "tiny" / "history.jsonl").read_bytes() == before


def test_rows_written_before_revisions_existed_count_as_the_first_evaluation(tmp_path):
    path = tmp_path / "results" / "tiny" / "history.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run": "tiny", "iteration": 2000, "benchmark": "qa", "metrics": {"acc": 0.7}}) + "\n"
                    + '{"run": "tiny", "iteration": 3000, "bench')  # and a torn tail the rewrite must not keep
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result(2000, 0.1))  # revision 0 again: already there
    assert json.loads(lines(tmp_path)[0])["metrics"]["acc"] == 0.7
    sink.record(rerun(2000, 0.6))
    assert [(r["iteration"], r["metrics"]["acc"], r["revision"]) for r in map(json.loads, lines(tmp_path))] == [
        (2000, 0.6, 1)]


def test_a_line_another_writer_appended_survives_a_rerun_rewrite(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result(1000))
    LocalHistorySink(str(tmp_path)).record(result(2000, 0.7))  # e.g. a wandb_writer backfill with the local sink
    sink.record(rerun(1000, 0.4))
    assert [(r["iteration"], r["metrics"]["acc"]) for r in map(json.loads, lines(tmp_path))] == [(1000, 0.4), (2000, 0.7)]
