"""Where wandb_writer reads results from; each source returns ResultRecords, one per (iteration, benchmark).

- `helm`: HELM's summarize output, `<helm_output_dir>/runs/<suite>/groups/<scenario>.json`: a JSON list of
  tables `{"title", "header": [{"value": "EM", "metadata": {"metric": "EM", ...}}, ...],
  "rows": [[{"value": "<model>"}, {"value": 0.43, ...}, ...]]}`. The first table holding a requested
  metric is the scenario's headline (HELM puts the aggregate over all subsets first); the others are
  subsets (e.g. one per MMLU subject), recorded as `<subset>/<metric>` unless summary-only. The
  iteration is read from the model cell as Data-Juicer does: the number after the last `_` or `/`
  (`mymodel/proj-llama/2000` -> 2000), else `default_iteration`.
- `file`: `eval_result: {benchmark: {metric: value}}` given inline, at `default_iteration`.
- `results`: a results tree `<results_dir>/<model_name>/iter_%07d/<benchmark>/metrics.json`. Its top-level
  `fingerprint` (settings, a string) and `revision` (0 first evaluation, +1 per rerun) go into the record,
  never into its metrics; a file without them is revision 0 with no fingerprint.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Optional

from evaluator.common.checks import MAX_ITERATION, iteration_number
from evaluator.common.contracts import is_finite_number, read_metrics
from evaluator.common.errors import EvaluatorError
from recorder.sinks import ResultRecord

# Data-Juicer's default: HELM's 16 core scenarios with their headline metric
DEFAULT_HELM_BENCHMARKS = [
    {"name": "mmlu", "metrics": ["EM"]},
    {"name": "raft", "metrics": ["EM"]},
    {"name": "imdb", "metrics": ["EM"]},
    {"name": "truthful_qa", "metrics": ["EM"]},
    {"name": "summarization_cnndm", "metrics": ["ROUGE-2"]},
    {"name": "summarization_xsum", "metrics": ["ROUGE-2"]},
    {"name": "boolq", "metrics": ["EM"]},
    {"name": "msmarco_trec", "metrics": ["NDCG@10"]},
    {"name": "msmarco_regular", "metrics": ["RR@10"]},
    {"name": "narrative_qa", "metrics": ["F1"]},
    {"name": "natural_qa_closedbook", "metrics": ["F1"]},
    {"name": "natural_qa_openbook_longans", "metrics": ["F1"]},
    {"name": "quac", "metrics": ["F1"]},
    {"name": "civil_comments", "metrics": ["EM"]},
    {"name": "hellaswag", "metrics": ["EM"]},
    {"name": "openbookqa", "metrics": ["EM"]},
]
DEFAULT_HELM_METRICS = [f"{b['name']}.{m}" for b in DEFAULT_HELM_BENCHMARKS for m in b["metrics"]]


def tokens_for(iteration: int, token_num: Optional[float], token_per_iteration: Optional[float]) -> Optional[float]:
    """Billions of tokens seen: a fixed `token_num`, else iteration x `token_per_iteration` (Data-Juicer)."""
    if token_num is not None:
        return float(token_num)
    if token_per_iteration:
        tokens = iteration * token_per_iteration
        if not is_finite_number(tokens):  # a history of Infinity tokens no curve can draw
            raise EvaluatorError(f"token_per_iteration: {token_per_iteration} x iteration {iteration} is beyond a "
                                 f"float; expected billions of tokens per iteration")
        return tokens
    return None


# ---- helm ------------------------------------------------------------------------------------
def helm_iteration(model_cell: str, default: int) -> int:
    """The iteration after the model cell's last `_` or `/` (ASCII digits: `model_-5` names none), else `default`;
    raises EvaluatorError for digits beyond MAX_ITERATION."""
    name = re.sub(r"\s*\[.*\]\s*$", "", str(model_cell))  # HELM appends " [adapter info]" to some names
    for sep in ("_", "/"):
        digits = name.split(sep)[-1]
        iteration = iteration_number(digits)
        if iteration is not None:
            return iteration
        if digits.isascii() and digits.isdigit():
            raise EvaluatorError(f"model {model_cell!r:.80}: iteration {digits:.30} is beyond {MAX_ITERATION} (2^63-1)")
    return default


def _metric_columns(header: list, metrics: list[str]) -> dict[str, int]:
    """metric -> column index. A column matches by its text ("EM") or, in tables that combine several
    scenarios ("MMLU - EM"), by metadata.metric; perturbed variants ("EM (Robustness)") never match."""
    found: dict[str, int] = {}
    for i, cell in enumerate(header):
        if not isinstance(cell, dict):
            continue
        meta = cell.get("metadata") or {}
        for metric in metrics:
            if metric in found:
                continue
            if cell.get("value") == metric or (meta.get("metric") == metric and "perturbation" not in meta):
                found[metric] = i
    return found


def _subset_name(title: str) -> str:
    # Data-Juicer keys a subset by the title up to the first comma: "subject: anatomy, method: ..." -> "subject: anatomy"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", title.split(",")[0]).strip("_") or "subset"


def helm_scenario(helm_output_dir: str, suite: str, scenario: str, metrics: list[str],
                  default_iteration: int, summary_only: bool) -> dict[int, dict[str, float]]:
    """iteration -> {metric or <subset>/<metric>: value} for one scenario's groups/<scenario>.json."""
    path = os.path.join(helm_output_dir, "runs", suite, "groups", f"{scenario}.json")
    try:
        with open(path, encoding="utf-8") as f:
            tables = json.load(f)
    except FileNotFoundError:
        raise EvaluatorError(f"{path}: no such file (has `helm-summarize --suite {suite}` run?)") from None
    except json.JSONDecodeError as e:
        raise EvaluatorError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise EvaluatorError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EvaluatorError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(tables, list):
        raise EvaluatorError(f"{path}: expected a JSON list of tables (HELM's groups/<scenario>.json), "
                             f"got {type(tables).__name__}")
    out: dict[int, dict[str, float]] = {}
    headline_done = False
    for t, table in enumerate(tables):
        if not isinstance(table, dict) or not isinstance(table.get("header"), list):
            raise EvaluatorError(f"{path}: table {t}: expected an object with 'header' and 'rows'")
        columns = _metric_columns(table["header"], metrics)
        if not columns:
            continue
        headline = not headline_done
        headline_done = True
        if not headline and summary_only:
            break
        prefix = "" if headline else _subset_name(str(table.get("title", f"table{t}"))) + "/"
        rows_of: dict[int, int] = {}  # iteration -> the row that named it: two models of one iteration collide
        for r, row in enumerate(table.get("rows") or []):
            if not row or not isinstance(row[0], dict):
                raise EvaluatorError(f"{path}: table {t} row {r}: expected a list of cells starting with the model")
            try:
                iteration = helm_iteration(row[0].get("value", ""), default_iteration)
            except EvaluatorError as e:
                raise EvaluatorError(f"{path}: table {t} row {r}: {e}") from None
            first = rows_of.setdefault(iteration, r)
            if first != r:
                raise EvaluatorError(
                    f"{path}: table {t}: rows {first} ({table['rows'][first][0].get('value')!r}) and {r} "
                    f"({row[0].get('value')!r}) both read as iteration {iteration} (from the model name, else "
                    f"default_iteration): one model per suite, named <model>_<iteration> or <model>/<iteration>")
            for metric, i in columns.items():
                cell = row[i] if i < len(row) else {}
                value = cell.get("value") if isinstance(cell, dict) else None
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # HELM leaves out the value of a cell with no matching run
                if not is_finite_number(value):
                    raise EvaluatorError(f"{path}: table {t} row {r}: {metric}: expected a finite number, got "
                                         f"{value if isinstance(value, float) else 'an integer no float holds'}")
                out.setdefault(iteration, {})[prefix + metric] = float(value)
    if not headline_done:
        raise EvaluatorError(f"{path}: no table has a column for {metrics}")
    if not out:
        raise EvaluatorError(f"{path}: no row has a number in the {metrics} column(s)")
    return out


def records_from_helm(model_name: str, helm_output_dir: str, suite: str, benchmarks: Optional[list[dict]],
                      default_iteration: int = 0, token_num: Optional[float] = None,
                      token_per_iteration: Optional[float] = None,
                      summary_only: bool = False) -> tuple[list[ResultRecord], list[str]]:
    """Records of every scenario that parses, and a note for each one that does not (as Data-Juicer, one
    missing scenario does not stop the others; none at all is an error)."""
    records, problems = [], []
    for bench in benchmarks or DEFAULT_HELM_BENCHMARKS:
        try:
            per_iteration = helm_scenario(helm_output_dir, suite, bench["name"], list(bench["metrics"]),
                                          default_iteration, summary_only)
        except EvaluatorError as e:
            problems.append(f"skipped HELM scenario {bench['name']}: {e}")
            continue
        for iteration, metrics in sorted(per_iteration.items()):
            records.append(ResultRecord(run=model_name, iteration=iteration, benchmark=bench["name"], metrics=metrics,
                                        tokens_b=tokens_for(iteration, token_num, token_per_iteration)))
    if not records:
        raise EvaluatorError(f"HELM suite {suite} in {helm_output_dir}: no results parsed:\n  " + "\n  ".join(problems))
    return records, problems


# ---- file ------------------------------------------------------------------------------------
def records_from_file(model_name: str, eval_result: dict, default_iteration: int = 0,
                      token_num: Optional[float] = None, token_per_iteration: Optional[float] = None) -> list[ResultRecord]:
    tokens_b = tokens_for(default_iteration, token_num, token_per_iteration)
    return [ResultRecord(run=model_name, iteration=default_iteration, benchmark=bench,
                         metrics={k: float(v) for k, v in metrics.items()}, tokens_b=tokens_b)
            for bench, metrics in eval_result.items()]


# ---- results tree ----------------------------------------------------------------------------
def revision_fields(data: dict, where: str) -> tuple[int, str]:
    """(revision, fingerprint) of a metrics.json document: absent or null -> (0, ""); raises ValueError naming
    the key when one has the wrong type."""
    revision, fingerprint = data.get("revision"), data.get("fingerprint")
    if revision is None:
        revision = 0
    elif isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ValueError(f"{where}: revision: expected a whole number >= 0 (0: first evaluation), got {revision!r}")
    if fingerprint is None:
        fingerprint = ""
    elif not isinstance(fingerprint, str):
        raise ValueError(f"{where}: fingerprint: expected a string (the settings hash), got {fingerprint!r}")
    return revision, fingerprint


def records_from_results(model_name: str, results_dir: str, token_per_iteration: Optional[float] = None,
                         token_num: Optional[float] = None) -> tuple[list[ResultRecord], list[str]]:
    """Every metrics.json of the model, in iteration order, and a note for each one that is unreadable."""
    root = os.path.join(results_dir, model_name)
    if not os.path.isdir(root):
        hint = ""
        if os.path.isdir(os.path.join(results_dir, "results", model_name)):
            hint = f" (did you mean results_dir: {os.path.join(results_dir, 'results')}?)"
        raise EvaluatorError(f"results_dir: no folder {root} for model {model_name!r}{hint}")
    records, problems = [], []
    for path in sorted(glob.glob(os.path.join(root, "iter_*", "*", "metrics.json"))):
        bench_dir = os.path.dirname(path)
        match = re.fullmatch(r"iter_(\d+)", os.path.basename(os.path.dirname(bench_dir)))
        if not match:
            continue
        iteration = iteration_number(match.group(1))
        if iteration is None:
            problems.append(f"skipped {path}: iteration {match.group(1)} is not one (ASCII digits up to 2^63-1)")
            continue
        try:
            data = read_metrics(path)
            revision, fingerprint = revision_fields(data, path)
        except (OSError, ValueError) as e:
            problems.append(f"skipped {path}: {e}")
            continue
        tokens_b = data.get("tokens_b")
        if tokens_b is None:
            tokens_b = tokens_for(iteration, token_num, token_per_iteration)
        records.append(ResultRecord(
            run=model_name, iteration=iteration, benchmark=os.path.basename(bench_dir), metrics=data["metrics"],
            tokens_b=tokens_b, n=data.get("n"), stderr=data.get("stderr") or {},
            per_category=data.get("per_category") or {}, metrics_path=path, versions=data.get("versions") or {},
            revision=revision, fingerprint=fingerprint))
    if not records:
        raise EvaluatorError(f"results_dir: no readable metrics.json under {root}/iter_*/<benchmark>/"
                             + "".join(f"\n  {p}" for p in problems))
    records.sort(key=lambda r: (r.iteration, r.benchmark))
    return records, problems


# ---- local W&B logs (for a leaderboard without evals in the config) ----------------------------
def records_from_wandb_dir(wandb_dir: str, project: str) -> list[ResultRecord]:
    """Every (run, iteration, benchmark) logged in the local W&B transaction logs of `project`, at its highest
    revision (a rerun's row is logged beside the first one; the first one's values are not the result's)."""
    from recorder.wandb_sink import metrics_of, read_run_log, row_revision, run_logs

    merged: dict[tuple, ResultRecord] = {}
    for path in run_logs(wandb_dir):
        try:
            run_log = read_run_log(path)
        except (ValueError, OSError) as e:  # e.g. a session killed before wandb wrote its header (0 bytes)
            logging.getLogger("recorder").warning("%s: not read for the leaderboard: %s", path, e)
            continue
        if run_log.project != project or run_log.name == "leaderboard":
            continue
        for row in run_log.rows:
            if "iteration" not in row:
                continue
            for bench, metrics in metrics_of(row).items():
                key = (run_log.name, int(row["iteration"]), bench)
                revision = row_revision(row, bench)
                fingerprint = row.get(f"{bench}/fingerprint")
                rec = merged.get(key)
                if rec is None or revision > rec.revision:
                    rec = merged[key] = ResultRecord(
                        run=run_log.name, iteration=key[1], benchmark=bench, metrics={}, tokens_b=row.get("tokens_b"),
                        revision=revision, fingerprint=fingerprint if isinstance(fingerprint, str) else "")
                elif revision < rec.revision:
                    continue
                rec.metrics.update(metrics)
    return sorted(merged.values(), key=lambda r: (r.run, r.iteration, r.benchmark))
