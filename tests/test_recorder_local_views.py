"""The local sink's views: curves.png (one panel per metric over iteration, and over tokens when known)
and summary.md (iteration x metric), refreshed after every new result."""
from __future__ import annotations

import struct

import pytest

from recorder.sinks import LocalHistorySink, ResultRecord

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (over iteration), tab:orange (over tokens)


def result(it, bench="qa", tokens=True, **metrics):
    return ResultRecord(run="tiny", iteration=it, benchmark=bench, metrics=metrics or {"acc": it / 10000},
                        tokens_b=it * 0.002 if tokens else None)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def pixels_near(path, rgb, tol=30):
    from matplotlib.image import imread

    img = (imread(str(path))[:, :, :3] * 255).astype(int)
    return int((abs(img - rgb).sum(axis=2) < tol).sum())


def run_dir(tmp_path):
    return tmp_path / "results" / "tiny"


def test_curves_have_a_panel_over_iteration_and_one_over_tokens_per_metric(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    for it in (2000, 1000, 3000):
        sink.record(result(it))
    sink.flush()
    png = run_dir(tmp_path) / "curves.png"
    assert png.stat().st_size > 5000
    assert png_size(png) == (1200, 440)  # one metric: two 6.0 x 4.0 in panels at 100 dpi, plus 0.4 in for the title
    assert pixels_near(png, BLUE) > 50 and pixels_near(png, ORANGE) > 50  # both curves were drawn


def test_without_tokens_there_is_no_tokens_panel_and_metrics_wrap_into_a_grid(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    for it in (1000, 2000):
        sink.record(result(it, tokens=False, acc=it / 1e4, f1=0.5))
        sink.record(result(it, bench="mc", tokens=False, acc=0.25))
    sink.flush()
    png = run_dir(tmp_path) / "curves.png"
    assert png_size(png) == (1800, 440)  # three metrics, three panels in one row, none over tokens
    assert pixels_near(png, BLUE) > 50 and pixels_near(png, ORANGE) == 0


def test_summary_md_is_an_iteration_by_metric_table_refreshed_after_each_result(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result(2000, acc=0.2))
    sink.record(result(2000, bench="mc", acc=0.7))
    sink.flush()
    summary = run_dir(tmp_path) / "summary.md"
    assert summary.read_text().splitlines()[2:] == [
        "| iteration | tokens (B) | mc/acc | qa/acc |", "|---:|---:|---:|---:|", "| 2000 | 4 | 0.7 | 0.2 |"]
    sink.record(result(1000, acc=0.1))  # an older checkpoint finishing late
    sink.flush()
    assert summary.read_text().splitlines()[4:] == ["| 1000 | 2 |  | 0.1 |", "| 2000 | 4 | 0.7 | 0.2 |"]


def test_views_lost_to_a_crash_before_the_redraw_are_drawn_by_the_next_process(tmp_path):
    LocalHistorySink(str(tmp_path)).record(result(1000))  # the process dies before its flush
    assert not (run_dir(tmp_path) / "curves.png").exists()
    again = LocalHistorySink(str(tmp_path))
    again.record(result(1000))  # offered again: not appended twice, but its views are stale
    again.flush()
    assert (run_dir(tmp_path) / "curves.png").exists()
    assert "| 1000 | 2 | 0.1 |" in (run_dir(tmp_path) / "summary.md").read_text()
    assert len((run_dir(tmp_path) / "history.jsonl").read_text().splitlines()) == 1


def test_plots_can_be_switched_off(tmp_path):
    sink = LocalHistorySink(str(tmp_path), plots=False)
    sink.record(result(1000))
    sink.flush()
    assert sorted(p.name for p in run_dir(tmp_path).iterdir()) == ["history.jsonl"]


def test_a_redraw_that_fails_keeps_the_result_and_is_tried_again(tmp_path):
    """Fault injected for real: curves.png's path is a directory, so the image cannot replace it."""
    sink = LocalHistorySink(str(tmp_path))
    sink.record(result(1000))
    (run_dir(tmp_path) / "curves.png").mkdir()
    with pytest.raises(OSError):
        sink.flush()
    assert len((run_dir(tmp_path) / "history.jsonl").read_text().splitlines()) == 1
    (run_dir(tmp_path) / "curves.png").rmdir()
    sink._retry_flush_at = 0  # skip the one-minute pause the daemon would wait
    sink.flush()
    assert png_size(run_dir(tmp_path) / "curves.png") == (1200, 440)


def test_summary_md_shows_the_rerun_value_once_and_names_reruns_and_mixed_settings(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    for it in (1000, 2000, 3000):
        r = result(it, acc=it / 10000)
        r.fingerprint = "ab12" if it < 3000 else "cd34"  # the settings changed before 3000 was evaluated
        sink.record(r)
    again = result(1000, acc=0.15)
    again.revision, again.fingerprint = 1, "cd34"
    sink.record(again)
    sink.flush()
    text = (run_dir(tmp_path) / "summary.md").read_text().splitlines()
    assert text[4:7] == ["| 1000 | 2 | 0.15 |", "| 2000 | 4 | 0.2 |", "| 3000 | 6 | 0.3 |"]
    assert text[8:] == ["- re-run: qa at iteration 1000",
                        "- settings differ within qa: `cd34` at 1000, 3000; `ab12` at 2000"]
