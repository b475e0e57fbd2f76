"""Local views of a run's history: curves.png (matplotlib) and summary.md (iteration x metric).

Rows are history.jsonl rows: {"iteration", "tokens_b", "benchmark", "metrics": {name: value}}, and
`revision` / `fingerprint` when known. A metric is named `<benchmark>/<metric>`, as in W&B and MLflow.
Points are drawn sorted by x, so checkpoints recorded out of order still draw a correct line. Both files
are written atomically. summary.md ends with a note on re-run results and on benchmarks whose rows were
made with more than one settings fingerprint (one curve, several settings).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Iterable, Optional

from evaluator.common.atomic import write_text_atomic
from recorder.sinks import row_revision

PANEL_W, PANEL_H, DPI = 4.2, 2.8, 80


def metric_table(rows: Iterable[dict]) -> tuple[list[int], dict[int, Optional[float]], dict[str, dict[int, float]]]:
    """(sorted iterations, iteration -> tokens_b, "<bench>/<metric>" -> {iteration: value})."""
    tokens: dict[int, Optional[float]] = {}
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        it = int(row["iteration"])
        if row.get("tokens_b") is not None:
            tokens[it] = float(row["tokens_b"])
        else:
            tokens.setdefault(it, None)
        for name, value in (row.get("metrics") or {}).items():
            series[f"{row['benchmark']}/{name}"][it] = float(value)
    return sorted(tokens), tokens, dict(sorted(series.items()))


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def summary_markdown(run: str, rows: list[dict]) -> str:
    iterations, tokens, series = metric_table(rows)
    with_tokens = any(t is not None for t in tokens.values())
    head = ["iteration"] + (["tokens (B)"] if with_tokens else []) + list(series)
    lines = [f"# {run}: results by iteration", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for it in iterations:
        cells = [str(it)] + ([_fmt(tokens[it])] if with_tokens else [])
        cells += [_fmt(values.get(it)) for values in series.values()]
        lines.append("| " + " | ".join(cells) + " |")
    notes = settings_notes(rows)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _iterations(its: list[int], limit: int = 8) -> str:
    its = sorted(its)
    shown = ", ".join(str(i) for i in its[:limit])
    return shown + (f", ... ({len(its)} in all)" if len(its) > limit else "")


def settings_notes(rows: Iterable[dict]) -> list[str]:
    """Markdown lines: the re-run results (revision > 0) and the benchmarks that mix settings fingerprints."""
    reruns: dict[str, list[int]] = defaultdict(list)
    prints: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row_revision(row) > 0:
            reruns[row["benchmark"]].append(int(row["iteration"]))
        if row.get("fingerprint"):  # rows from before fingerprints existed say nothing either way
            prints[row["benchmark"]][row["fingerprint"]].append(int(row["iteration"]))
    lines = [f"- re-run: {bench} at iteration {_iterations(its)}" for bench, its in sorted(reruns.items())]
    for bench, by_print in sorted(prints.items()):
        if len(by_print) > 1:
            parts = "; ".join(f"`{fp}` at {_iterations(its)}" for fp, its in sorted(by_print.items(),
                                                                                    key=lambda kv: min(kv[1])))
            lines.append(f"- settings differ within {bench}: {parts}")
    return lines


def write_summary_md(run: str, rows: list[dict], path: str) -> None:
    write_text_atomic(path, summary_markdown(run, rows))


def _figure(nrows: int, ncols: int):
    # Figure + Agg canvas, not pyplot: no global state, no display needed, safe in a daemon
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_W * ncols, PANEL_H * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_curves(run: str, rows: list[dict], path: str) -> None:
    """One panel per metric over iteration and, when tokens are known, one beside it over tokens (B)."""
    iterations, tokens, series = metric_table(rows)
    with_tokens = any(t is not None for t in tokens.values())
    per_metric = 2 if with_tokens else 1
    metrics_per_row = 2 if with_tokens else 3
    n = max(1, len(series))
    nrows = math.ceil(n / metrics_per_row)
    ncols = per_metric * min(n, metrics_per_row)
    fig = _figure(nrows, ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, (name, values) in enumerate(series.items()):
        r, c = divmod(i, metrics_per_row)
        its = sorted(values)
        ax = axes[r][c * per_metric]
        ax.set_visible(True)
        ax.plot(its, [values[it] for it in its], marker="o", markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if with_tokens:
            known = sorted((tokens[it], values[it]) for it in its if tokens.get(it) is not None)
            ax = axes[r][c * per_metric + 1]
            ax.set_visible(True)
            ax.plot([t for t, _ in known], [v for _, v in known], marker="o", markersize=3, linewidth=1.2,
                    color="tab:orange")
            ax.set_title(f"{name} over tokens", fontsize=9)
            ax.set_xlabel("tokens (B)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if not series:
        axes[0][0].set_visible(True)
        axes[0][0].text(0.5, 0.5, "no results yet", ha="center", va="center")
    height = PANEL_H * nrows  # inches
    fig.suptitle(f"{run} ({len(iterations)} checkpoints)", fontsize=10, y=1 - 0.08 / height)
    # fixed margins (in inches, so the title never meets the panel titles): tight_layout costs seconds on a large
    # grid, and this runs after every pass
    fig.subplots_adjust(left=0.06 if ncols > 2 else 0.12, right=0.98, bottom=0.12 / nrows + 0.04,
                        top=1 - 0.6 / height, hspace=0.55, wspace=0.3)
    _save(fig, path)


def write_leaderboard_png(entries: list, path: str, title: str = "leaderboard") -> None:
    """Horizontal bars, best on top: one bar per (model, iteration) entry with its summed score."""
    fig = _figure(1, 1)
    height = max(2.5, 0.45 * len(entries) + 1.2)
    fig.set_size_inches(8, height)
    ax = fig.subplots()
    ordered = list(reversed(entries))  # barh draws bottom-up
    ax.barh([e.label for e in ordered], [e.score for e in ordered], color="tab:blue")
    for y, e in enumerate(ordered):
        ax.text(e.score, y, f" {e.score:.3f}", va="center", fontsize=8)
    ax.set_xlabel("sum of min-max normalised metrics", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    fig.subplots_adjust(left=0.3, right=0.9, bottom=0.6 / height, top=1 - 0.35 / height)
    _save(fig, path)
