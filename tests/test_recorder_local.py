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
