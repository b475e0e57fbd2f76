"""Paired comparison of two results of one benchmark, from their per-sample scores (docs/insight.md).

A result folder holds scores.jsonl (one row per scored sample; the evaluation stage writes it before
metrics.json), metrics.json (the done file: benchmark, dataset_id, the metrics' order, `per_sample`) and
predictions.jsonl (the prompt each flip shows). `compare_dirs` compares two folders on the samples both scored;
`compare_document` builds the compare.json the daemon writes into a new result's folder; `render_table` prints a
comparison for a terminal (`tools/evaluator.py compare`).
"""
from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from typing import Optional

from .contracts import COMPARE_SCHEMA_VERSION, METRICS, PREDICTIONS, SCORES, SCORES_SCHEMA_VERSION, read_metrics
from .errors import EvaluatorError, did_you_mean
from .paired import BOOTSTRAP, DEFAULT_RESAMPLES, alpha_problem, compare_values
from .records import jsonl_rows, read_results

SCORE_STATUSES = ("ok", "error")


@dataclass(frozen=True)
class ScoredResult:
    """What a comparison reads from one result folder."""

    path: str
    rows: dict[str, dict]  # sample_id -> its scores.jsonl row, in file order
    metrics_doc: dict  # metrics.json
    prompts: dict[str, str]  # sample_id -> the last user message's text (predictions.jsonl); {} without it


# ---- reading a result folder ----------------------------------------------------------------------------------
def read_scores(path: str) -> dict[str, dict]:
    """scores.jsonl -> {sample_id: row}; a malformed row raises EvaluatorError naming file:line."""
    rows: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for where, lineno, row in jsonl_rows(path, EvaluatorError):
        check_score_row(row, where)
        sid = str(row["sample_id"])
        if sid in rows:
            raise EvaluatorError(f"{where}: sample_id {sid!r} again (first at line {lines[sid]}); "
                                 f"a sample has one row")
        rows[sid], lines[sid] = row, lineno
    return rows


def check_score_row(row, where: str) -> None:
    """One scores.jsonl row against the contract (docs/insight.md); raises EvaluatorError naming where."""
    if not isinstance(row, dict):
        raise EvaluatorError(f"{where}: expected a JSON object, got {type(row).__name__}")
    version = row.get("schema_version")
    if version != SCORES_SCHEMA_VERSION:
        raise EvaluatorError(f"{where}: schema_version: expected {SCORES_SCHEMA_VERSION} (what this version "
                             f"reads), got {version!r}")
    sid = row.get("sample_id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or sid == "":
        raise EvaluatorError(f"{where}: sample_id: expected a non-empty string, got {sid!r}")
    if row.get("status") not in SCORE_STATUSES:
        raise EvaluatorError(f"{where}: status: expected 'ok' or 'error', got {row.get('status')!r}")
    scores = row.get("scores")
    if not isinstance(scores, dict):
        raise EvaluatorError(f"{where}: scores: expected an object of metric -> number or null, got {scores!r}")
    for name, value in scores.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvaluatorError(f"{where}: scores.{name}: expected a finite number or null, got {value!r}")
    if not isinstance(row.get("prediction", ""), str):
        raise EvaluatorError(f"{where}: prediction: expected a string, got {row.get('prediction')!r}")
    compared = row.get("compared")
    if compared is not None and not (isinstance(compared, dict) and all(isinstance(v, dict) for v in
                                                                        compared.values())):
        raise EvaluatorError(f"{where}: compared: expected an object of metric -> {{prediction, reference}}")


def prompt_text(messages) -> Optional[str]:
    """The text parts of the last user message of a request (what a flip shows as the prompt)."""
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(p["text"] for p in content
                             if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        return None
    return None


def read_scored_result(path: str) -> ScoredResult:
    """A result folder's scores.jsonl, metrics.json and prompts; raises EvaluatorError saying what is missing."""
    if not os.path.isdir(path):
        raise EvaluatorError(f"{path}: no such result folder")
    scores_path = os.path.join(path, SCORES)
    if not os.path.exists(scores_path):
        raise EvaluatorError(f"{scores_path}: missing: this result has no per-sample scores (results made before "
                             f"per-sample scores existed cannot be compared; `tools/evaluator.py rerun` "
                             f"re-evaluates one while its checkpoint is on disk)")
    metrics_path = os.path.join(path, METRICS)
    if not os.path.exists(metrics_path):
        raise EvaluatorError(f"{metrics_path}: missing: the evaluation of this result has not finished")
    try:
        doc = read_metrics(metrics_path)
    except ValueError as e:
        raise EvaluatorError(str(e)) from None
    rows = read_scores(scores_path)
    if not rows:
        raise EvaluatorError(f"{scores_path}: no rows")
    prompts: dict[str, str] = {}
    predictions = os.path.join(path, PREDICTIONS)
    if os.path.exists(predictions):  # only the flips' prompts come from it; the numbers do not
        try:
            results = read_results(predictions)
        except ValueError as e:
            raise EvaluatorError(str(e)) from None
        for r in results:
            text = prompt_text(r.request_messages)
            if text is not None:
                prompts[r.sample_id] = text
    return ScoredResult(path, rows, doc, prompts)


# ---- the comparison -----------------------------------------------------------------------------------------
def check_same_benchmark(new: ScoredResult, old: ScoredResult) -> None:
    for key in ("benchmark", "dataset_id"):
        a, b = new.metrics_doc.get(key), old.metrics_doc.get(key)
        if a is not None and b is not None and a != b:
            raise EvaluatorError(f"{os.path.join(new.path, METRICS)}: {key} {a!r}, but "
                                 f"{os.path.join(old.path, METRICS)}: {key} {b!r}: results of different "
                                 f"{'benchmarks' if key == 'benchmark' else 'datasets'} cannot be compared")


def reference_of(row: dict, metric: str) -> Optional[str]:
    """The reference a flip shows: what the metric compared against, else the target, else the references."""
    compared = (row.get("compared") or {}).get(metric) or {}
    if isinstance(compared.get("reference"), str):
        return compared["reference"]
    if isinstance(row.get("target"), str):
        return row["target"]
    refs = row.get("references")
    if isinstance(refs, list) and refs:
        return " | ".join(str(r) for r in refs)
    return None


def pick_main_metric(requested: Optional[str], compared: list[str], new: ScoredResult, strict: bool = True) -> str:
    """`requested` when it was compared; else (strict: an error) the headline metric with per-sample values."""
    if requested is not None and (strict or requested in compared):
        if requested not in compared:
            raise EvaluatorError(f"main metric {requested!r}: no per-sample values on both sides; compared "
                                 f"metrics: {', '.join(compared)}{did_you_mean(requested, compared)}")
        return requested
    # the headline `status` shows (metrics.json's first metric) when it has per-sample values
    for name in new.metrics_doc.get("metrics") or {}:
        if name in compared:
            return name
    return compared[0]


def flips(new: ScoredResult, old: ScoredResult, common: list[str], metric: str, max_flips: int,
          lower_is_better: bool = False) -> dict:
    """The samples whose `metric` got better (fixed: rose, or fell where lower is better) or worse (broken), largest
    change first, then in prediction order."""
    out: dict[str, list] = {"fixed": [], "broken": []}
    changed = []
    for index, sid in enumerate(common):
        a, b = old.rows[sid]["scores"].get(metric), new.rows[sid]["scores"].get(metric)
        if a is not None and b is not None and a != b:
            changed.append((-abs(b - a), index, sid, a, b))
    for _, _, sid, a, b in sorted(changed):
        side = out["fixed" if (b < a if lower_is_better else b > a) else "broken"]
        if len(side) >= max_flips:
            continue
        o, w = old.rows[sid], new.rows[sid]
        side.append({"sample_id": sid, "prompt": new.prompts.get(sid, old.prompts.get(sid)),
                     "old_prediction": o.get("prediction", ""), "new_prediction": w.get("prediction", ""),
                     "reference": reference_of(w, metric) or reference_of(o, metric),
                     "old_score": a, "new_score": b})
    return out


def compare_results(new: ScoredResult, old: ScoredResult, *, main_metric: Optional[str] = None, seed: int = 0,
                    resamples: int = DEFAULT_RESAMPLES, alpha: float = 0.05, max_flips: int = 20,
                    strict_main_metric: bool = True, lower_is_better: frozenset = frozenset()) -> dict:
    """One <comparison> (docs/insight.md) of two read results. strict_main_metric False: a main_metric without
    per-sample values (a corpus-level one, e.g. the benchmark's configured main_metric) is a preference only.
    lower_is_better: metrics for which a fall is the better side (their fixed/broken counts and flips say so)."""
    if alpha_problem(alpha):
        raise EvaluatorError(f"alpha: {alpha_problem(alpha)}")
    if max_flips < 0:
        raise EvaluatorError(f"max_flips: expected a count >= 0, got {max_flips!r}")
    if resamples < 1:
        raise EvaluatorError(f"resamples: expected a count >= 1, got {resamples!r}")
    check_same_benchmark(new, old)
    common = [sid for sid in new.rows if sid in old.rows]
    if not common:
        raise EvaluatorError(f"{os.path.join(new.path, SCORES)} and {os.path.join(old.path, SCORES)}: no sample in "
                             f"common (different datasets or sample subsets?)")
    names = list(dict.fromkeys(name for sid in common for name in new.rows[sid]["scores"]))
    names += [name for name in dict.fromkeys(n for sid in common for n in old.rows[sid]["scores"])
              if name not in names]
    kinds = new.metrics_doc.get("per_sample") if isinstance(new.metrics_doc.get("per_sample"), dict) else {}
    metrics: dict[str, dict] = {}
    not_compared: dict[str, str] = {}
    for name in names:
        pairs = [(a, b) for sid in common
                 for a, b in [(old.rows[sid]["scores"].get(name), new.rows[sid]["scores"].get(name))]
                 if a is not None and b is not None]
        if not pairs:
            in_old = any(name in old.rows[sid]["scores"] for sid in common)
            in_new = any(name in new.rows[sid]["scores"] for sid in common)
            not_compared[name] = ("only in the new result" if not in_old else "only in the old result"
                                  if not in_new else "no sample has a value on both sides")
            continue
        entry = compare_values([a for a, _ in pairs], [b for _, b in pairs], alpha=alpha, seed=seed,
                               resamples=resamples)
        if kinds.get(name):
            entry["per_sample"] = kinds[name]  # "sentence": old/new are means of sentence-level values
        if name in lower_is_better:  # compare_values counts rises as fixed
            entry["fixed"], entry["broken"] = entry["broken"], entry["fixed"]
            entry["lower_is_better"] = True
        metrics[name] = entry
    if not metrics:
        raise EvaluatorError(f"{os.path.join(new.path, SCORES)} and {os.path.join(old.path, SCORES)}: no metric has "
                             f"per-sample values on both sides ({'; '.join(f'{k}: {v}' for k, v in not_compared.items()) or 'no scores'})")
    main = pick_main_metric(main_metric, list(metrics), new, strict_main_metric)
    out = {"run": old.metrics_doc.get("run"), "iteration": old.metrics_doc.get("iteration"),
           "result_dir": old.path, "n_common": len(common), "only_new": len(new.rows) - len(common),
           "only_old": len(old.rows) - len(common), "alpha": alpha, "metrics": metrics, "main_metric": main,
           "flips": flips(new, old, common, main, max_flips, main in lower_is_better)}
    if not_compared:
        out["not_compared"] = not_compared
    return out


def compare_dirs(new_dir: str, old_dir: str, *, main_metric: Optional[str] = None, seed: int = 0,
                 resamples: int = DEFAULT_RESAMPLES, alpha: float = 0.05, max_flips: int = 20,
                 strict_main_metric: bool = True, lower_is_better: frozenset = frozenset()) -> dict:
    """One <comparison> of the result in new_dir against the one in old_dir (delta = new - old)."""
    return compare_results(read_scored_result(new_dir), read_scored_result(old_dir), main_metric=main_metric,
                           seed=seed, resamples=resamples, alpha=alpha, max_flips=max_flips,
                           strict_main_metric=strict_main_metric, lower_is_better=lower_is_better)


def compare_document(run: str, benchmark: str, iteration: int, revision: int, new_dir: str,
                     prev: Optional[tuple] = None, best: Optional[tuple] = None, **kw) -> dict:
    """The compare.json document of the new result in new_dir against the run's previous and best checkpoints.

    prev / best: (run, iteration, result_dir) or None; kw: compare_dirs' options (main_metric, seed, resamples,
    alpha, max_flips); main_metric is the benchmark's configured one, a preference (without per-sample values the
    comparison is headed by the first metric that has them). Raises EvaluatorError when a folder cannot be compared
    (no scores.jsonl, a malformed row, another benchmark)."""
    kw.setdefault("strict_main_metric", False)
    new = read_scored_result(new_dir)
    named = new.metrics_doc.get("benchmark")
    if named is not None and named != benchmark:
        raise EvaluatorError(f"{os.path.join(new_dir, METRICS)}: benchmark {named!r}, expected {benchmark!r}")
    against: dict[str, Optional[dict]] = {"prev": None, "best": None}
    done: dict[str, dict] = {}
    for which, ref in (("prev", prev), ("best", best)):
        if ref is None:
            continue
        old_run, old_iteration, old_dir = ref
        if old_dir not in done:  # the previous checkpoint is often the best one: compare once
            done[old_dir] = compare_results(new, read_scored_result(old_dir), **kw)
        against[which] = {**done[old_dir], "run": old_run, "iteration": old_iteration, "result_dir": old_dir}
    return {"schema_version": COMPARE_SCHEMA_VERSION, "run": run, "benchmark": benchmark, "iteration": iteration,
            "revision": revision, "against": against}


# ---- the table ---------------------------------------------------------------------------------------------
def format_p(p: float) -> str:
    return f"{p:.4f}" if p >= 0.001 else f"{p:.1e}"


def render_table(comparison: dict, width: int = 100, lower_is_better: frozenset = frozenset()) -> str:
    """The paired table (metric | old | new | delta | CI | p | method | n | fixed | broken) and the main
    metric's flips, old and new prediction side by side."""
    main = comparison["main_metric"]
    alpha = comparison["alpha"]
    level = next(iter(comparison["metrics"].values()))["ci_level"]  # 1 - alpha: one level per comparison
    header = ("metric", "old", "new", "delta", f"{level:.0%} CI", "p", "method", "n", "fixed", "broken")
    rows = []
    for name, m in comparison["metrics"].items():
        rows.append((("* " if name == main else "  ") + name + (" (sentence)" if m.get("per_sample") == "sentence"
                                                               else ""),
                     f"{m['old']:.4f}", f"{m['new']:.4f}", f"{m['delta']:+.4f}",
                     f"[{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}]",
                     format_p(m["p"]) + (" !" if m["significant"] else "  "), m["method"], str(m["n"]),
                     str(m["fixed"]), str(m["broken"])))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             .rstrip() for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += textwrap.wrap(f"* main metric   ! significant at alpha={alpha:g} (p < alpha)   delta = new - old   "
                           f"n: samples both results scored ({comparison['n_common']} in common, "
                           f"{comparison['only_new']} only in new, {comparison['only_old']} only in old)",
                           max(width, 40), subsequent_indent="  ")
    notes = sorted({f"{m['method']}: CI {m['ci_method']}" + (f", seed {m['seed']}, {m['resamples']} resamples"
                                                            if m["method"] == BOOTSTRAP else "")
                    for m in comparison["metrics"].values()})
    lines += textwrap.wrap("methods: " + "; ".join(notes), max(width, 40), subsequent_indent="  ")
    if any(m.get("per_sample") == "sentence" for m in comparison["metrics"].values()):
        lines.append("(sentence): old/new are means of sentence-level values, not the corpus-level score in "
                     "metrics.json")
    for name, why in (comparison.get("not_compared") or {}).items():
        lines.append(f"not compared: {name}: {why}")
    if lower_is_better & set(comparison["metrics"]):
        lines.append(f"lower is better: {', '.join(sorted(lower_is_better & set(comparison['metrics'])))}")
    lines += render_flips(comparison, width)
    return "\n".join(lines) + "\n"


def render_flips(comparison: dict, width: int = 100) -> list[str]:
    main = comparison["main_metric"]
    entry = comparison["metrics"][main]
    flipped = comparison["flips"]
    col = max(20, (width - 7) // 2)
    out = ["", f"flips of {main}: {entry['fixed']} fixed, {entry['broken']} broken"
           + (f" (showing up to {max(len(flipped['fixed']), len(flipped['broken']))} of each)"
              if len(flipped["fixed"]) < entry["fixed"] or len(flipped["broken"]) < entry["broken"] else "")]
    for side in ("broken", "fixed"):
        if not flipped[side]:
            continue
        higher = (side == "fixed") != bool(entry.get("lower_is_better"))
        out += ["", f"{side} ({'new scores higher' if higher else 'new scores lower'}):"]
        for f in flipped[side]:
            out.append(f"  {f['sample_id']}  reference: {one_line(f['reference'], width - 16 - len(str(f['sample_id'])))}")
            if f.get("prompt"):
                out.append(f"    prompt: {one_line(f['prompt'], width - 12)}")
            left = wrap_block(f"old ({f['old_score']:g}): {f['old_prediction']}", col)
            right = wrap_block(f"new ({f['new_score']:g}): {f['new_prediction']}", col)
            for i in range(max(len(left), len(right))):
                a = left[i] if i < len(left) else ""
                b = right[i] if i < len(right) else ""
                out.append(f"    {a.ljust(col)} | {b}".rstrip())
    return out


def one_line(text: Optional[str], width: int) -> str:
    if text is None:
        return "-"
    flat = " ".join(str(text).split())
    width = max(width, 10)
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def wrap_block(text: str, width: int, max_lines: int = 4) -> list[str]:
    lines = textwrap.wrap(text.replace("\n", " \\n "), width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:width - 3] + "..."
    return lines
