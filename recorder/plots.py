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
from dataclasses import dataclass
from typing import Iterable, Optional

from evaluator.common.atomic import write_text_atomic
from recorder.sinks import COMPARED_AGAINST, row_revision

PANEL_W, PANEL_H, DPI = 6.0, 4.0, 100  # inches per panel: one metric reads at a glance (1200 x 440 px with tokens)
LEGEND_W = 2.2  # inches added per panel pair in a row when categories have a legend beside the pair
MAX_CATEGORIES = 6  # category lines drawn per panel; the largest categories first, the legend counts the rest
LINE_COLOR, TOKENS_COLOR, DROP = "tab:blue", "tab:orange", "tab:red"
CATEGORY_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")  # no blue/orange/red


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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Optional[float], stderr) -> str:
    return _fmt(value) + (f" ± {_fmt(float(stderr))}" if value is not None and _number(stderr) else "")


def summary_markdown(run: str, rows: list[dict]) -> str:
    """The iteration x metric table (each value `± stderr` when known, a `<benchmark> n` column when known), the
    notes on re-runs and settings, the run's best checkpoint and each benchmark's latest comparison."""
    iterations, tokens, series = metric_table(rows)
    by_key = {(int(r["iteration"]), r["benchmark"]): r for r in rows}
    with_tokens = any(t is not None for t in tokens.values())
    with_n = {r["benchmark"] for r in rows if r.get("n") is not None}
    columns: list[tuple[str, str, Optional[str]]] = []  # (header, benchmark, metric or None for its n)
    for name in series:
        bench, metric = name.split("/", 1)
        if bench in with_n and not any(c[1] == bench for c in columns):
            columns.append((f"{bench} n", bench, None))
        columns.append((name, bench, metric))
    head = ["iteration"] + (["tokens (B)"] if with_tokens else []) + [c[0] for c in columns]
    lines = [f"# {run}: results by iteration", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for it in iterations:
        cells = [str(it)] + ([_fmt(tokens[it])] if with_tokens else [])
        for _, bench, metric in columns:
            row = by_key.get((it, bench))
            if row is None:
                cells.append("")
            elif metric is None:
                cells.append("" if row.get("n") is None else str(row["n"]))
            else:
                value = (row.get("metrics") or {}).get(metric)
                cells.append(_cell(None if value is None else float(value), (row.get("stderr") or {}).get(metric)))
        lines.append("| " + " | ".join(cells) + " |")
    if any((r.get("stderr") or {}) for r in rows):
        lines += ["", "`±`: the standard error of the mean over samples (as metrics.json reports it)."]
    notes = settings_notes(rows)
    return "\n".join(lines + ([""] + notes if notes else []) + insight_lines(rows)) + "\n"


def _comparison_line(bench: str, iteration: int, against: str, c: dict) -> str:
    ci = c.get("ci")
    ci_text = f" (CI {_fmt(ci[0])} .. {_fmt(ci[1])})" if isinstance(ci, list) and len(ci) == 2 else ""
    p = "p n/a" if c.get("p") is None else f"p = {c['p']:.3g}"
    verdict = f"significant at {c['alpha']:g}" if c.get("significant") else f"not significant at {c['alpha']:g}"
    return (f"- {bench} @ {iteration} vs {against} {c['iteration']}: {c['metric']} {_fmt(c['old'])} -> "
            f"{_fmt(c['new'])}, delta {_fmt(c['delta'])}{ci_text}, {p} ({c['method']}, n = {c['n']}), {verdict}; "
            f"{c['fixed']} fixed, {c['broken']} broken")


def insight_lines(rows: list[dict]) -> list[str]:
    """Markdown: the best checkpoint (the last line that carries one) and, per benchmark, the comparison of its
    latest checkpoint that has one (`vs_prev` / `vs_best`, the main metric)."""
    out = []
    best = next((r["best"] for r in reversed(rows) if r.get("best")), None)
    if best is not None:
        out += ["", "## Best checkpoint", "",
                f"- iteration {best['iteration']} (score {_fmt(best['score'])}, rule `{best['rule']}`)"]
    latest: dict[str, dict] = {}
    for row in rows:
        if (row.get("vs_prev") or row.get("vs_best")) and (
                row["benchmark"] not in latest or int(row["iteration"]) > int(latest[row["benchmark"]]["iteration"])):
            latest[row["benchmark"]] = row
    if latest:
        out += ["", "## Last comparison", "",
                "Paired, on the samples both checkpoints scored; the benchmark's main metric (compare.json has all)."]
        out.append("")
        for bench, row in sorted(latest.items()):
            for against in COMPARED_AGAINST:
                if row.get(f"vs_{against}"):
                    out.append(_comparison_line(bench, int(row["iteration"]), against, row[f"vs_{against}"]))
    return out


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


@dataclass
class Curve:
    """What one panel pair draws for `<benchmark>/<metric>`, by iteration."""

    name: str  # <benchmark>/<metric>
    metric: str
    values: dict[int, float]
    stderr: dict[int, float]  # where known
    categories: dict[str, dict[int, float]]  # the categories drawn (at most MAX_CATEGORIES, the largest first)
    category_n: dict[str, int]  # their largest sample count over the rows (0: unknown)
    hidden: int  # categories left out
    drops: set  # iterations significantly worse than the previous checkpoint (history rows' vs_prev)


def curve_table(rows: Iterable[dict]) -> list[Curve]:
    """One Curve per `<benchmark>/<metric>`, sorted by name (the panels' order)."""
    rows = list(rows)
    _, _, series = metric_table(rows)
    out = []
    for name, values in series.items():
        bench, metric = name.split("/", 1)
        mine = [r for r in rows if r["benchmark"] == bench]
        stderr = {int(r["iteration"]): float((r.get("stderr") or {})[metric]) for r in mine
                  if _number((r.get("stderr") or {}).get(metric))}
        by_cat: dict[str, dict[int, float]] = defaultdict(dict)
        sizes: dict[str, int] = defaultdict(int)
        for r in mine:
            for cat, cat_values in (r.get("per_category") or {}).items():
                if isinstance(cat_values, dict) and _number(cat_values.get(metric)):
                    by_cat[str(cat)][int(r["iteration"])] = float(cat_values[metric])
                    n = cat_values.get("n")
                    sizes[str(cat)] = max(sizes[str(cat)], int(n) if _number(n) else 0)
        shown = sorted(by_cat, key=lambda c: (-sizes[c], c))[:MAX_CATEGORIES]
        drops = {int(r["iteration"]) for r in mine
                 if (r.get("vs_prev") or {}).get("metric") == metric and r["vs_prev"].get("significant")
                 and _number(r["vs_prev"].get("delta")) and r["vs_prev"]["delta"] < 0}
        out.append(Curve(name, metric, values, stderr, {c: by_cat[c] for c in shown}, {c: sizes[c] for c in shown},
                         len(by_cat) - len(shown), drops))
    return out


def _figure(width: float, height: float, constrained: bool = False):
    # Figure + Agg canvas, not pyplot: no global state, no display needed, safe in a daemon
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
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


# matplotlib cannot lay out an axis that reaches float's end (1e308: "arange: cannot compute length"); a finite
# metric beyond this is recorded, and left out of the picture with a note
DRAWABLE = 1e300


def _drawable(*values: Optional[float]) -> bool:
    return all(v is not None and abs(v) <= DRAWABLE for v in values)


def _draw(ax, curve: Curve, x_of: dict[int, Optional[float]], color: str, xlabel: str, title: str) -> None:
    """One panel: the curve over x (points without an x left out), its stderr band, its category lines and its
    significant drops."""
    import numpy as np

    placed = [it for it in curve.values if x_of.get(it) is not None]
    its = sorted((it for it in placed if _drawable(x_of[it], curve.values[it], curve.stderr.get(it, 0.0))),
                 key=lambda it: (x_of[it], it))
    xs = np.array([x_of[it] for it in its], dtype=float)
    ys = np.array([curve.values[it] for it in its], dtype=float)
    ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.6, color=color,
            label="all samples" if curve.categories else curve.metric, zorder=3)
    with_se = np.array([it in curve.stderr for it in its])
    if with_se.any():
        se = np.array([curve.stderr.get(it, 0.0) for it in its])
        if with_se.sum() > 1:
            ax.fill_between(xs, ys - se, ys + se, where=with_se, color=color, alpha=0.2, linewidth=0,
                            label="±1 stderr", zorder=2)
        else:  # a band needs two points: one point gets an error bar
            ax.errorbar(xs[with_se], ys[with_se], yerr=se[with_se], fmt="none", ecolor=color, capsize=3,
                        label="±1 stderr", zorder=2)
    for (cat, values), cat_color in zip(curve.categories.items(), CATEGORY_COLORS):
        cits = sorted((it for it in values if _drawable(x_of.get(it), values[it])), key=lambda it: (x_of[it], it))
        n = curve.category_n[cat]
        ax.plot([x_of[it] for it in cits], [values[it] for it in cits], linestyle="--", linewidth=1.0, marker=".",
                markersize=4, color=cat_color, label=f"{cat} (n={n})" if n else str(cat), zorder=2.5)
    if curve.hidden:
        ax.plot([], [], " ", label=f"+{curve.hidden} more categor{'y' if curve.hidden == 1 else 'ies'} not drawn")
    if len(its) < len(placed):
        ax.plot([], [], " ", label=f"{len(placed) - len(its)} point(s) beyond ±{DRAWABLE:g} not drawn")
    drops = [it for it in its if it in curve.drops]
    if drops:
        ax.scatter([x_of[it] for it in drops], [curve.values[it] for it in drops], marker="v", s=60, color=DROP,
                   zorder=4, label="significant drop vs previous")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(f"{curve.metric} (raw scale)", fontsize=9)
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)  # tick labels are the values themselves
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def _legend(ax, outside: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) < 2:
        return  # the title names the only line
    if outside:  # categories: beside the panel pair, so no line is hidden behind it
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    else:
        ax.legend(loc="best", fontsize=8)


def curves_figure(run: str, rows: list[dict]):
    """The matplotlib Figure of curves.png: per metric a panel over iteration and, when tokens are known, one
    beside it over tokens (B); each with its stderr band, category lines (one legend per pair) and significant
    drops vs the previous checkpoint."""
    iterations, tokens, _ = metric_table(rows)
    curves = curve_table(rows)
    with_tokens = any(t is not None for t in tokens.values())
    per_metric = 2 if with_tokens else 1
    metrics_per_row = 2 if with_tokens else 3
    n = max(1, len(curves))
    nrows = math.ceil(n / metrics_per_row)
    ncols = per_metric * min(n, metrics_per_row)
    legend_w = LEGEND_W * min(n, metrics_per_row) if any(c.categories for c in curves) else 0.0
    fig = _figure(PANEL_W * ncols + legend_w, PANEL_H * nrows + 0.4, constrained=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    by_iteration = {it: float(it) for it in iterations}
    for i, curve in enumerate(curves):
        r, c = divmod(i, metrics_per_row)
        ax = axes[r][c * per_metric]
        ax.set_visible(True)
        _draw(ax, curve, by_iteration, LINE_COLOR, "iteration", curve.name)
        if with_tokens:
            ax = axes[r][c * per_metric + 1]
            ax.set_visible(True)
            _draw(ax, curve, tokens, TOKENS_COLOR, "tokens (B)", f"{curve.name} over tokens")
        _legend(ax, outside=bool(curve.categories or curve.hidden))
    if not curves:
        axes[0][0].set_visible(True)
        axes[0][0].text(0.5, 0.5, "no results yet", ha="center", va="center")
    fig.suptitle(f"{run} ({len(iterations)} checkpoints)", fontsize=11)
    return fig


def write_curves(run: str, rows: list[dict], path: str) -> None:
    """curves.png: see `curves_figure`. Rows without stderr, categories or comparisons draw plain lines."""
    _save(curves_figure(run, rows), path)


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
