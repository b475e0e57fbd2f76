"""What the sinks and views show about a checkpoint beyond its metrics (issue 15): the paired comparison with the
previous and the best checkpoint (compare.json, `ResultRecord.comparison`), the run's best checkpoint
(`ResultRecord.best`) and the uncertainty of each value.

Real stores only: W&B offline runs read back with the test's own transaction-log reader (test_recorder_wandb.py),
a real MLflow SQLite store read with MLflow's client, real history.jsonl files and real matplotlib figures.
"""
from __future__ import annotations

import json
import os

import pytest

from recorder import plots
from recorder.sinks import LocalHistorySink, MlflowSettings, RecorderSettings, ResultRecord, WandbSettings
from test_recorder_local_views import png_size
from test_recorder_wandb import _records, history, wandb_runs

ALPHA = 0.05
FLIP_BROKEN = {"sample_id": "q7", "prompt": "Capital of France?", "old_prediction": "Paris", "new_prediction": "Lyon",
               "reference": "paris", "old_score": 1.0, "new_score": 0.0}
FLIP_FIXED = {"sample_id": "q9", "prompt": "2 + 2?", "old_prediction": "5", "new_prediction": "4",
              "reference": ["4", "four"], "old_score": 0.0, "new_score": 1.0}


# ---- building what the daemon hands the sinks ------------------------------------------------------------------
def line(old, new, p, significant, fixed=12, broken=62, n=500, method="mcnemar_exact"):
    return {"old": old, "new": new, "delta": round(new - old, 10), "n": n, "method": method, "p": p,
            "ci": [round(new - old - 0.04, 10), round(new - old + 0.04, 10)], "ci_level": 0.95,
            "significant": significant, "fixed": fixed, "broken": broken}


def against(it, acc_line, flips=None):
    return {"run": "tiny", "iteration": it, "result_dir": f"/r/iter_{it:07d}/qa", "n_common": 500, "only_new": 0,
            "only_old": 0, "alpha": ALPHA, "main_metric": "acc",
            "metrics": {"acc": acc_line, "f1": line(0.5, 0.5, 1.0, False, 0, 0, method="paired_bootstrap")},
            "flips": flips if flips is not None else {"fixed": [FLIP_FIXED], "broken": [FLIP_BROKEN]}}


def compare_doc(it, prev=None, best=None, revision=0):
    return {"schema_version": 1, "run": "tiny", "benchmark": "qa", "iteration": it, "revision": revision,
            "against": {"prev": prev, "best": best}}


def result(tmp_path, it, acc, comparison=None, best=None, revision=0, **extra) -> ResultRecord:
    out = tmp_path / "results" / "tiny" / f"iter_{it:07d}" / "qa"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"acc": acc, "f1": 0.5}
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return ResultRecord(run="tiny", iteration=it, benchmark="qa", metrics=metrics, tokens_b=it * 0.002, n=500,
                        stderr={"acc": 0.02}, metrics_path=str(out / "metrics.json"), comparison=comparison,
                        best=best, revision=revision, **extra)


def three_checkpoints(tmp_path):
    """1000 (first: nothing to compare), 2000 (significantly worse than 1000), 3000 (better than both, not
    significantly); the best is 1000 until 3000 arrives."""
    best_1000 = {"iteration": 1000, "score": 0.61, "rule": "max qa/acc"}
    return [
        result(tmp_path, 1000, 0.61, None, best_1000),
        result(tmp_path, 2000, 0.51, compare_doc(2000, prev=against(1000, line(0.61, 0.51, 0.0001, True)),
                                                 best=against(1000, line(0.61, 0.51, 0.0001, True))), best_1000),
        result(tmp_path, 3000, 0.63, compare_doc(3000, prev=against(2000, line(0.51, 0.63, 0.2, False, 70, 10)),
                                                 best=against(1000, line(0.61, 0.63, 0.6, False, 30, 20))),
               {"iteration": 3000, "score": 0.63, "rule": "max qa/acc"}),
    ]


def history_lines(tmp_path):
    path = tmp_path / "results" / "tiny" / "history.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---- history.jsonl ------------------------------------------------------------------------------------------------
def test_history_lines_carry_the_main_metrics_comparison_with_prev_and_best_and_the_best_checkpoint(tmp_path):
    sink = LocalHistorySink(str(tmp_path), plots=False)
    for r in three_checkpoints(tmp_path):
        sink.record(r)
    first, second, third = history_lines(tmp_path)
    assert "vs_prev" not in first and "vs_best" not in first  # the first checkpoint has nothing to compare with
    assert second["vs_prev"] == {"iteration": 1000, "metric": "acc", "old": 0.61, "new": 0.51, "delta": -0.1,
                                 "ci": [-0.14, -0.06], "p": 0.0001, "method": "mcnemar_exact", "significant": True,
                                 "n": 500, "fixed": 12, "broken": 62, "alpha": ALPHA}
    assert (third["vs_prev"]["iteration"], third["vs_best"]["iteration"]) == (2000, 1000)
    assert [r["best"] for r in (first, third)] == [{"iteration": 1000, "score": 0.61, "rule": "max qa/acc"},
                                                   {"iteration": 3000, "score": 0.63, "rule": "max qa/acc"}]
    # the whole document, with prompts and predictions, stays in the result folder's compare.json
    assert all("comparison" not in r and "flips" not in json.dumps(r) for r in (first, second, third))


def test_a_history_line_without_a_comparison_or_best_has_neither_key(tmp_path):
    LocalHistorySink(str(tmp_path), plots=False).record(result(tmp_path, 1000, 0.6))
    (row,) = history_lines(tmp_path)
    assert not {"vs_prev", "vs_best", "best", "comparison"} & set(row)


def test_a_rerun_line_holds_the_rerun_comparison(tmp_path):
    sink = LocalHistorySink(str(tmp_path), plots=False)
    for r in three_checkpoints(tmp_path)[:2]:
        sink.record(r)
    again = result(tmp_path, 2000, 0.6, compare_doc(2000, prev=against(1000, line(0.61, 0.6, 0.8, False, 5, 6)),
                                                  revision=1), revision=1)
    sink.record(again)
    assert [(r["iteration"], r.get("vs_prev", {}).get("delta")) for r in history_lines(tmp_path)] == [
        (1000, None), (2000, -0.01)]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d["against"]["prev"]["metrics"]["acc"].pop("delta"), r"against\.prev\.metrics\.acc: missing delta"),
    (lambda d: d["against"]["prev"].pop("main_metric"), r"against\.prev\.main_metric: missing"),
    (lambda d: d["against"].pop("best"), r"against\.best: missing"),
    (lambda d: d.update(schema_version=2), r"schema_version: expected 1, got 2"),
])
def test_a_malformed_comparison_is_refused_naming_the_key_and_nothing_is_written(tmp_path, break_it, message):
    r = three_checkpoints(tmp_path)[1]
    break_it(r.comparison)
    with pytest.raises(ValueError, match=r"tiny@2000/qa: compare\.json: " + message):
        LocalHistorySink(str(tmp_path), plots=False).record(r)
    assert not (tmp_path / "results" / "tiny" / "history.jsonl").exists()


# ---- W&B ------------------------------------------------------------------------------------------------------------
def wandb_settings(tmp_path, summary_only=False) -> RecorderSettings:
    return RecorderSettings(cache_dir=str(tmp_path), project="proj", summary_only=summary_only,
                            wandb=WandbSettings(project="proj", mode="offline", dir=str(tmp_path / "wandb"),
                                                sample_predictions=0),
                            mlflow=MlflowSettings(tracking_uri="unused", experiment="unused"))


def summaries(wandb_dir):
    """{session log path: {summary key: value}} of the keys each session set explicitly in its run summary."""
    out = {}
    for run in wandb_runs(wandb_dir):
        found = {}
        for rec in _records(run["path"]):
            if rec.WhichOneof("record_type") == "summary":
                found.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
        out[run["path"]] = found
    return out


def table(wandb_dir, row, key):
    session = [r for r in wandb_runs(wandb_dir) if row in r["rows"]][0]
    with open(os.path.join(os.path.dirname(session["path"]), "files", row[f"{key}/path"])) as f:
        return json.load(f)


def test_wandb_logs_delta_and_p_vs_prev_at_the_checkpoints_iteration(tmp_path):
    from recorder.wandb_sink import WandbSink

    first, second, third = three_checkpoints(tmp_path)
    sink = WandbSink(wandb_settings(tmp_path))
    sink.record_batch([third, first])  # out of order, as checkpoints may finish
    WandbSink(wandb_settings(tmp_path)).record(second)  # a restarted process
    rows = history(tmp_path / "wandb")
    assert [(r["iteration"], r.get("qa/delta_vs_prev"), r.get("qa/p_vs_prev")) for r in rows] == [
        (3000, 0.12, 0.2), (1000, None, None), (2000, -0.1, 0.0001)]
    for run in wandb_runs(tmp_path / "wandb"):  # plotted over iteration, like the metrics beside them
        assert ("qa/*", "iteration") in run["metrics"]


def test_wandb_comparison_series_are_not_read_back_as_metrics(tmp_path):
    from recorder.sources import records_from_wandb_dir
    from recorder.wandb_sink import WandbSink

    WandbSink(wandb_settings(tmp_path)).record_batch(three_checkpoints(tmp_path))
    back = records_from_wandb_dir(str(tmp_path / "wandb"), "proj")
    assert [(r.iteration, sorted(r.metrics)) for r in back] == [(it, ["acc", "f1"]) for it in (1000, 2000, 3000)]


def test_a_metric_named_like_a_comparison_series_is_refused(tmp_path):
    from recorder.wandb_sink import WandbSink

    r = result(tmp_path, 1000, 0.6)
    r.metrics["delta_vs_prev"] = 0.1
    with pytest.raises(ValueError, match=r"metric name\(s\) \['delta_vs_prev'\] are reserved"):
        WandbSink(wandb_settings(tmp_path)).record(r)


def test_wandb_flips_table_shows_both_predictions_and_the_reference_and_a_comparison_table_names_the_method(tmp_path):
    from recorder.wandb_sink import WandbSink

    first, second, _ = three_checkpoints(tmp_path)
    WandbSink(wandb_settings(tmp_path)).record_batch([first, second])
    row_1000, row_2000 = history(tmp_path / "wandb")
    assert "qa/flips/_type" not in row_1000 and "qa/comparison/_type" not in row_1000
    flips = table(tmp_path / "wandb", row_2000, "qa/flips")
    assert flips["columns"] == ["iteration", "against", "against_iteration", "change", "metric", "sample_id", "prompt",
                                "old_prediction", "new_prediction", "reference", "old_score", "new_score"]
    assert flips["data"] == [
        [2000, "prev", 1000, "fixed", "acc", "q9", "2 + 2?", "5", "4", "4 | four", 0.0, 1.0],
        [2000, "prev", 1000, "broken", "acc", "q7", "Capital of France?", "Paris", "Lyon", "paris", 1.0, 0.0],
        [2000, "best", 1000, "fixed", "acc", "q9", "2 + 2?", "5", "4", "4 | four", 0.0, 1.0],
        [2000, "best", 1000, "broken", "acc", "q7", "Capital of France?", "Paris", "Lyon", "paris", 1.0, 0.0]]
    compared = table(tmp_path / "wandb", row_2000, "qa/comparison")
    by_col = [dict(zip(compared["columns"], r)) for r in compared["data"]]
    assert [(r["against"], r["metric"], r["main"], r["method"], r["significant"]) for r in by_col] == [
        ("prev", "acc", True, "mcnemar_exact", True), ("prev", "f1", False, "paired_bootstrap", False),
        ("best", "acc", True, "mcnemar_exact", True), ("best", "f1", False, "paired_bootstrap", False)]
    assert (by_col[0]["delta"], by_col[0]["ci_low"], by_col[0]["ci_high"], by_col[0]["p"]) == (-0.1, -0.14, -0.06, 0.0001)


def test_wandb_summary_only_keeps_the_comparison_series_and_drops_the_tables(tmp_path):
    from recorder.wandb_sink import WandbSink

    WandbSink(wandb_settings(tmp_path, summary_only=True)).record_batch(three_checkpoints(tmp_path)[:2])
    row = history(tmp_path / "wandb")[1]
    assert row["qa/delta_vs_prev"] == -0.1 and not [k for k in row if k.startswith(("qa/flips", "qa/comparison"))]


def test_wandb_run_summary_holds_the_best_checkpoint_and_every_later_session_repeats_it(tmp_path):
    from recorder.wandb_sink import WandbSink

    first, _, third = three_checkpoints(tmp_path)
    WandbSink(wandb_settings(tmp_path)).record(first)
    plain = result(tmp_path, 1500, 0.55)  # e.g. a wandb_writer backfill: it knows no best
    WandbSink(wandb_settings(tmp_path)).record(plain)
    WandbSink(wandb_settings(tmp_path)).record(third)
    best = [{k: s.get(f"best/{k}") for k in ("iteration", "score", "rule")} for s in summaries(tmp_path / "wandb").values()]
    # each offline session uploads its own summary: the one that knew no best repeats the last one logged
    assert best == [{"iteration": 1000, "score": 0.61, "rule": "max qa/acc"}] * 2 + [
        {"iteration": 3000, "score": 0.63, "rule": "max qa/acc"}]


def test_wandb_merged_sessions_keep_the_best_checkpoint_and_the_comparison_rows(tmp_path):
    from recorder.wandb_sink import WandbSink

    first, second, third = three_checkpoints(tmp_path)
    third.best = None  # only the first results know the best
    sink = WandbSink(wandb_settings(tmp_path), max_sessions=2)
    for r in (first, second, third):  # the third session merges the first two into itself
        sink.record(r)
    (merged,) = summaries(tmp_path / "wandb").values()
    assert (merged["best/iteration"], merged["best/score"]) == (1000, 0.61)
    rows = history(tmp_path / "wandb")
    assert [(r["iteration"], r.get("qa/delta_vs_prev")) for r in rows] == [(1000, None), (2000, -0.1), (3000, 0.12)]
    assert table(tmp_path / "wandb", rows[1], "qa/flips")["data"][0][5] == "q9"  # the table re-made from its file


def test_wandb_a_result_offered_again_logs_its_comparison_once_and_a_rerun_logs_its_own(tmp_path):
    from recorder.wandb_sink import WandbSink

    first, second, _ = three_checkpoints(tmp_path)
    WandbSink(wandb_settings(tmp_path)).record_batch([first, second])
    WandbSink(wandb_settings(tmp_path)).record(second)  # a crash before the ledger noted it: offered again
    rerun = result(tmp_path, 2000, 0.6, compare_doc(2000, prev=against(1000, line(0.61, 0.6, 0.8, False)), revision=1),
                   revision=1)
    WandbSink(wandb_settings(tmp_path)).record(rerun)
    assert [(r["iteration"], r.get("qa/revision"), r.get("qa/delta_vs_prev"), r.get("qa/p_vs_prev"))
            for r in history(tmp_path / "wandb")] == [(1000, None, None, None), (2000, None, -0.1, 0.0001),
                                                      (2000, 1, -0.01, 0.8)]


def test_wandb_a_comparison_without_a_p_value_logs_the_delta_only(tmp_path):
    from recorder.wandb_sink import WandbSink

    r = result(tmp_path, 2000, 0.5, compare_doc(2000, prev=against(1000, line(0.5, 0.5, None, False, 0, 0))))
    WandbSink(wandb_settings(tmp_path)).record(r)
    (row,) = history(tmp_path / "wandb")
    assert row["qa/delta_vs_prev"] == 0.0 and "qa/p_vs_prev" not in row


# ---- MLflow ----------------------------------------------------------------------------------------------------------
def mlflow_settings(tmp_path) -> RecorderSettings:
    from recorder.sinks import mlflow_settings as made

    cache = str(tmp_path / "cache")
    return RecorderSettings(cache_dir=cache, project="proj", wandb=WandbSettings(project="proj"),
                            mlflow=made(cache, None, "proj", str(tmp_path)))


def test_mlflow_logs_delta_and_p_at_step_iteration_the_comparison_as_an_artifact_and_the_best_as_tags(tmp_path):
    from mlflow.tracking import MlflowClient

    from recorder.mlflow_sink import MlflowSink

    s = mlflow_settings(tmp_path)
    first, second, third = three_checkpoints(tmp_path)
    MlflowSink(s).record(second)
    again = MlflowSink(s)  # a restarted process: the same result offered again, then the others
    for r in (second, third, first):
        again.record(r)
    client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    rid = run.info.run_id
    steps = {key: sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
             for key in ("qa/delta_vs_prev", "qa/p_vs_prev")}
    assert steps == {"qa/delta_vs_prev": [(2000, -0.1), (3000, 0.12)], "qa/p_vs_prev": [(2000, 0.0001), (3000, 0.2)]}
    local = client.download_artifacts(rid, "iter_0002000/qa/compare.json", str(tmp_path / "dl"))
    with open(local) as f:
        assert json.load(f)["against"]["prev"]["flips"]["broken"] == [FLIP_BROKEN]
    assert [a.path for a in client.list_artifacts(rid, "iter_0001000/qa")] == ["iter_0001000/qa/metrics.json"]
    # the last result recorded (1000) carries the best as it stood then
    assert {k: v for k, v in run.data.tags.items() if k.startswith("best/")} == {
        "best/iteration": "1000", "best/score": "0.61", "best/rule": "max qa/acc"}


def test_mlflow_a_rerun_logs_its_comparison_at_the_same_step(tmp_path):
    from mlflow.tracking import MlflowClient

    from recorder.mlflow_sink import MlflowSink

    s = mlflow_settings(tmp_path)
    sink = MlflowSink(s)
    for r in three_checkpoints(tmp_path)[:2]:
        sink.record(r)
    sink.record(result(tmp_path, 2000, 0.6, compare_doc(2000, prev=against(1000, line(0.61, 0.6, 0.8, False)),
                                                        revision=1), revision=1))
    client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "qa/delta_vs_prev")) == [
        (2000, -0.1), (2000, -0.01)]


# ---- curves.png and summary.md -----------------------------------------------------------------------------------
def rows_with_categories(n_categories=9, tokens=True):
    """History lines of 4 checkpoints with stderr and per-category values; 3000 is a significant drop."""
    out = []
    for it, acc in ((1000, 0.4), (2000, 0.5), (3000, 0.3), (4000, 0.6)):
        row = {"run": "tiny", "iteration": it, "benchmark": "qa", "metrics": {"acc": acc, "f1": 0.5},
               "tokens_b": it * 0.002 if tokens else None, "n": 500, "stderr": {"acc": 0.02},
               "per_category": {f"c{i}": {"acc": acc + i / 100, "n": 10 + i} for i in range(n_categories)}}
        if it == 3000:
            row["vs_prev"] = {"iteration": 2000, "metric": "acc", "old": 0.5, "new": 0.3, "delta": -0.2,
                              "ci": [-0.25, -0.15], "p": 0.001, "method": "mcnemar_exact", "significant": True,
                              "n": 500, "fixed": 3, "broken": 103, "alpha": ALPHA}
        if it == 4000:  # a significant rise: not a regression
            row["vs_prev"] = dict(out[-1]["vs_prev"], iteration=3000, old=0.3, new=0.6, delta=0.3)
        out.append(row)
    return out


def panel(fig, title):
    (ax,) = [a for a in fig.axes if a.get_visible() and a.get_title() == title]
    return ax


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []


def test_curves_draw_the_stderr_band_category_lines_and_the_significant_drops(tmp_path):
    from matplotlib.collections import PathCollection, PolyCollection

    fig = plots.curves_figure("tiny", rows_with_categories())
    ax = panel(fig, "qa/acc")
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [b.get_label() for b in bands] == ["±1 stderr"]
    lo, hi = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    assert (round(lo, 6), round(hi, 6)) == (0.28, 0.62)  # lowest value 0.3 - 0.02, highest 0.6 + 0.02
    lines = {line.get_label(): line for line in ax.get_lines()}
    # the six largest categories are drawn (n = 18 down to 13); the three smallest are counted, not drawn
    assert [name for name in lines if name.startswith("c")] == [f"c{i} (n={10 + i})" for i in (8, 7, 6, 5, 4, 3)]
    assert list(lines["c8 (n=18)"].get_ydata()) == pytest.approx([0.48, 0.58, 0.38, 0.68])
    drops = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [(d.get_label(), d.get_offsets().tolist()) for d in drops] == [("significant drop vs previous", [[3000, 0.3]])]
    assert ax.get_ylabel() == "acc (raw scale)"
    # one legend per metric (beside the tokens panel), naming everything drawn
    assert legend_texts(panel(fig, "qa/acc over tokens")) == ["all samples", "±1 stderr"] + list(
        lines)[1:7] + ["+3 more categories not drawn", "significant drop vs previous"]
    assert ax.get_legend() is None
    f1 = panel(fig, "qa/f1")  # no stderr, no categories, no comparison: a plain line, as before
    assert not f1.collections and [line.get_label() for line in f1.get_lines()] == ["f1"]


def test_curves_without_the_new_fields_draw_one_plain_line_per_panel(tmp_path):
    rows = [{"run": "tiny", "iteration": it, "benchmark": "qa", "metrics": {"acc": it / 1e4}, "tokens_b": None}
            for it in (2000, 1000)]
    fig = plots.curves_figure("tiny", rows)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert not ax.collections and ax.get_legend() is None
    (curve,) = ax.get_lines()
    assert list(curve.get_xdata()) == [1000, 2000] and list(curve.get_ydata()) == [0.1, 0.2]


@pytest.mark.parametrize("n_metrics, tokens", [(1, True), (2, False), (4, True), (5, False)])
def test_no_tick_label_title_or_legend_is_cut_off_or_hidden_under_a_neighbour(n_metrics, tokens):
    rows = rows_with_categories(tokens=tokens)
    for row in rows:  # long metric names and large values: the widest tick labels
        row["metrics"].update({f"a_rather_long_metric_name_{i}": 12345.678 * (i + 1) for i in range(n_metrics - 1)})
    fig = plots.curves_figure("tiny", rows)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # the layout is computed at draw time
    page = fig.bbox
    boxes = {ax.get_title(): ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()}  # with the legend
    for title, box in boxes.items():
        assert (box.x0 >= page.x0 - 1 and box.y0 >= page.y0 - 1 and box.x1 <= page.x1 + 1
                and box.y1 <= page.y1 + 1), (title, box, page)
        for other, other_box in boxes.items():  # nor hidden under a neighbour (a legend over the next panel)
            assert other == title or not box.shrunk(0.99, 0.99).overlaps(other_box), (title, other)
    assert fig.get_size_inches()[0] >= 6 and fig.get_size_inches()[1] >= 4  # readable with one metric


def test_the_local_sink_draws_curves_png_for_rows_with_stderr_categories_and_flags(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    for r in three_checkpoints(tmp_path):
        r.per_category = {"music": {"acc": r.metrics["acc"] - 0.05, "n": 200}, "speech": {"acc": 0.7, "n": 300}}
        sink.record(r)
    sink.flush()

    png = tmp_path / "results" / "tiny" / "curves.png"
    width, height = png_size(png)
    assert width >= 1200 and height >= 400 and png.stat().st_size > 20000
    fig = plots.curves_figure("tiny", sink.rows("tiny"))
    ax = panel(fig, "qa/acc")
    assert {line.get_label() for line in ax.get_lines()} >= {"music (n=200)", "speech (n=300)"}
    assert [c.get_offsets().tolist() for c in ax.collections if c.get_label().startswith("significant")] == [
        [[2000, 0.51]]]


def test_summary_md_shows_n_and_stderr_per_value_the_best_checkpoint_and_the_last_comparison(tmp_path):
    sink = LocalHistorySink(str(tmp_path))
    for r in three_checkpoints(tmp_path):
        sink.record(r)
    sink.flush()
    text = (tmp_path / "results" / "tiny" / "summary.md").read_text().splitlines()
    assert text[2:7] == ["| iteration | tokens (B) | qa n | qa/acc | qa/f1 |", "|---:|---:|---:|---:|---:|",
                         "| 1000 | 2 | 500 | 0.61 ± 0.02 | 0.5 |", "| 2000 | 4 | 500 | 0.51 ± 0.02 | 0.5 |",
                         "| 3000 | 6 | 500 | 0.63 ± 0.02 | 0.5 |"]
    assert "- iteration 3000 (score 0.63, rule `max qa/acc`)" in text
    assert text[-2:] == [
        "- qa @ 3000 vs prev 2000: acc 0.51 -> 0.63, delta 0.12 (CI 0.08 .. 0.16), p = 0.2 (mcnemar_exact, n = 500), "
        "not significant at 0.05; 70 fixed, 10 broken",
        "- qa @ 3000 vs best 1000: acc 0.61 -> 0.63, delta 0.02 (CI -0.02 .. 0.06), p = 0.6 (mcnemar_exact, n = 500), "
        "not significant at 0.05; 30 fixed, 20 broken"]


# ---- the document the daemon really writes -----------------------------------------------------------------------
def test_a_compare_json_made_by_the_comparison_code_is_summarised_tabled_and_marked(tmp_path):
    """Not a hand-written document: evaluator.common.compare on a planted 10-point drop over 500 samples."""
    from evaluator.common.compare import compare_document
    from recorder.wandb_sink import flips_table
    from test_compare import planted_pair

    old_dir, new_dir, _, _ = planted_pair(tmp_path)
    doc = compare_document("tiny", "qa", 2000, 0, new_dir, prev=("tiny", 1000, old_dir), best=("tiny", 1000, old_dir))
    sink = LocalHistorySink(str(tmp_path / "cache"))
    sink.record(ResultRecord(run="tiny", iteration=1000, benchmark="qa", metrics={"exact_match": 0.6}))
    sink.record(ResultRecord(run="tiny", iteration=2000, benchmark="qa", metrics={"exact_match": 0.5},
                             comparison=doc))
    row = sink.rows("tiny")[1]
    assert {k: row["vs_prev"][k] for k in ("iteration", "metric", "method", "significant", "n")} == {
        "iteration": 1000, "metric": "exact_match", "method": "mcnemar_exact", "significant": True, "n": 500}
    assert row["vs_prev"]["delta"] == pytest.approx(-0.1)
    columns, data = flips_table(ResultRecord("tiny", 2000, "qa", {}, comparison=doc))
    flips = [dict(zip(columns, r)) for r in data]
    broken = [f for f in flips if f["against"] == "prev" and f["change"] == "broken"]
    assert broken and all(f["old_prediction"].startswith("right") and f["new_prediction"].startswith("wrong")
                          and f["prompt"] == f"question {f['sample_id']}?" for f in broken)
    ax = panel(plots.curves_figure("tiny", sink.rows("tiny")), "qa/exact_match")
    assert [c.get_offsets().tolist() for c in ax.collections if c.get_label().startswith("significant")] == [
        [[2000, 0.5]]]
