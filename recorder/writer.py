"""`python tools/wandb_writer.py --config recorder.yaml [--print-only] [--summary-only]`.

Rebuilds dashboards from results that already exist and builds leaderboards. The config is
Data-Juicer's recorder config (`project`, `base_url`, `evals: [{eval_type, model_name, source, ...}]`,
`leaderboard`, `leaderboard_metrics`, `excluded_models`) plus ours (`source: results`, `mode`, `dir`,
`output_dir`, `sinks`, `entity`, `group`, `tags`). Each model's results go through the same sinks as
the daemon's, to the same W&B run id (deterministic per project and model), so a backfill next to a
running daemon adds only what is missing, and running the writer twice logs nothing twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from evaluator.common.atomic import write_json_atomic, write_text_atomic
from evaluator.common.errors import EvaluatorError
from evaluator.common.checks import MAX_ITERATION, folder_name_problem, run_name_problem
from evaluator.common.contracts import validate_metrics
# the YAML loader and error wording the daemon config uses too, so both tools report problems the same way
from evaluator.common.yamlconf import config_error, read_yaml, validate
from recorder import leaderboard, plots, sources
from recorder.sinks import SINKS, RecorderSettings, ResultRecord, WandbSettings, mlflow_settings, versions


class Section(BaseModel):
    # an unknown key is an error ("did you mean"), never ignored; so is .inf or .nan for a number
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HelmBenchmarkSpec(Section):
    name: str = Field(min_length=1)
    metrics: list[str] = Field(min_length=1)


class MlflowSpec(Section):
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None


class EvalSpec(Section):
    eval_type: str = "helm"  # Data-Juicer's label; kept as a W&B tag
    model_name: str = Field(min_length=1)
    source: Literal["helm", "file", "results"] = "helm"
    helm_output_dir: Optional[str] = None
    helm_suite_name: Optional[str] = None
    benchmarks: Optional[list[HelmBenchmarkSpec]] = None  # default: HELM's 16 core scenarios
    # values as written (validate_metrics checks them, as a stage's metrics.json): pydantic's float would read
    # `true` as 1.0 and "0.5" as 0.5
    eval_result: Optional[dict[str, dict[str, Any]]] = None
    results_dir: Optional[str] = None  # a results tree: <results_dir>/<model_name>/iter_%07d/<bench>/metrics.json
    default_iteration: int = Field(0, ge=0, le=MAX_ITERATION)
    # billions; 1e15 (a million times any training run) keeps every curve's axis drawable
    token_num: Optional[float] = Field(None, ge=0, le=1e15, description="billions of tokens seen (a fixed number)")
    token_per_iteration: Optional[float] = Field(None, ge=0, le=1e15, description="billions of tokens per iteration")


class WriterConfig(Section):
    project: str = Field(min_length=1)
    base_url: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = []
    mode: Literal["auto", "online", "offline"] = "auto"
    dir: Optional[str] = None  # W&B local folder; default <results_dir>/../wandb for `results`, else ./wandb
    output_dir: Optional[str] = None  # leaderboard.{md,json,png} and the local sink; default: the config's folder
    sinks: list[str] = ["wandb"]
    mlflow: MlflowSpec = MlflowSpec()
    sample_predictions: int = Field(5, ge=0)
    evals: list[EvalSpec] = []
    leaderboard: bool = False
    leaderboard_metrics: Optional[list[str]] = Field(None, min_length=1)  # default: HELM's 16 core metrics (Data-Juicer)
    excluded_models: list[str] = []
    excluded_runs: list[str] = []  # the spelling in Data-Juicer's leaderboard example; same meaning
    scale: Literal[1, 100] = 1  # printed leaderboard values x100 as papers do (evaluator/common/scale.py)


def load_writer_config(path: str) -> WriterConfig:
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise EvaluatorError(f"invalid config: {path}: expected a mapping with `project:` and `evals:` or `leaderboard:`")
    if "auto_eval" in data:
        raise EvaluatorError(f"invalid config: {path}: this is a daemon config (auto_eval:); wandb_writer takes a "
                             f"recorder config: project, evals: [...] (see config/recorder/)")
    cfg = validate(WriterConfig, data, path, lines)
    problems = []
    need = {"helm": ("helm_output_dir", "helm_suite_name"), "file": ("eval_result",), "results": ("results_dir",)}
    for i, ev in enumerate(cfg.evals):
        for key in need[ev.source]:
            if getattr(ev, key) in (None, {}):
                problems.append((("evals", i, key), f"source: {ev.source} needs `{key}`"))
        if run_name_problem(ev.model_name):
            problems.append((("evals", i, "model_name"), run_name_problem(ev.model_name)))
        for j, bench in enumerate(ev.benchmarks or []):  # it names the benchmark in every sink, as a folder does
            if folder_name_problem(bench.name):
                problems.append((("evals", i, "benchmarks", j, "name"), folder_name_problem(bench.name)))
        for bench, metrics in (ev.eval_result or {}).items():  # as a stage's metrics.json is checked
            if folder_name_problem(bench):
                problems.append((("evals", i, "eval_result", bench), folder_name_problem(bench)))
            try:
                validate_metrics({"metrics": metrics}, bench)
            except ValueError as e:
                problems.append((("evals", i, "eval_result", bench), str(e).removeprefix(f"{bench}: ")))
    for i, name in enumerate(cfg.sinks):
        if name not in SINKS:
            problems.append((("sinks", i), f"unknown sink {name!r} (known: {', '.join(SINKS)})"))
        elif name in cfg.sinks[:i]:
            problems.append((("sinks", i), f"{name!r} is listed twice"))
    if cfg.evals and not cfg.sinks:
        problems.append((("sinks",), f"no sink to write the evals to: give one or more of {', '.join(SINKS)} "
                                     f"(--print-only prints them and writes nothing)"))
    if not cfg.evals and not cfg.leaderboard:
        problems.append(((), "nothing to do: give `evals:` and/or `leaderboard: true`"))
    if problems:
        raise config_error(path, lines, problems)
    base = os.path.dirname(os.path.abspath(path))

    def absolute(p: Optional[str]) -> Optional[str]:
        return None if p is None else os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    cfg.dir, cfg.output_dir = absolute(cfg.dir), absolute(cfg.output_dir) or base
    for ev in cfg.evals:
        ev.helm_output_dir, ev.results_dir = absolute(ev.helm_output_dir), absolute(ev.results_dir)
    return cfg


def wandb_dir(cfg: WriterConfig, ev: Optional[EvalSpec]) -> str:
    if cfg.dir:
        return cfg.dir
    if ev is not None and ev.source == "results":
        return os.path.join(os.path.dirname(ev.results_dir.rstrip("/")), "wandb")  # the daemon's <cache_dir>/wandb
    return os.path.join(cfg.output_dir, "wandb")


def settings_for(cfg: WriterConfig, ev: Optional[EvalSpec], summary_only: bool) -> RecorderSettings:
    run_config = {"project": cfg.project, "versions": versions()}
    tags = list(cfg.tags)
    if ev is not None:
        run_config.update(model_name=ev.model_name, eval_type=ev.eval_type, source=ev.source,
                          token_num=ev.token_num, token_per_iteration=ev.token_per_iteration,
                          helm_suite_name=ev.helm_suite_name)
        tags = tags + [ev.eval_type, "summary"]  # Data-Juicer tags the runs its leaderboard reads `summary`
    w = WandbSettings(project=cfg.project, mode=cfg.mode, dir=wandb_dir(cfg, ev), base_url=cfg.base_url,
                      entity=cfg.entity, group=cfg.group or (ev.model_name if ev else None), tags=tags,
                      sample_predictions=cfg.sample_predictions)
    m = mlflow_settings(cfg.output_dir, cfg.mlflow.tracking_uri, cfg.mlflow.experiment or cfg.project, cfg.output_dir)
    return RecorderSettings(cache_dir=cfg.output_dir, project=cfg.project, wandb=w, mlflow=m,
                            run_config={k: v for k, v in run_config.items() if v is not None},
                            summary_only=summary_only)


def collect(ev: EvalSpec, summary_only: bool) -> tuple[list[ResultRecord], list[str]]:
    if ev.source == "helm":
        benchmarks = [b.model_dump() for b in ev.benchmarks] if ev.benchmarks else None
        return sources.records_from_helm(ev.model_name, ev.helm_output_dir, ev.helm_suite_name, benchmarks,
                                         ev.default_iteration, ev.token_num, ev.token_per_iteration, summary_only)
    if ev.source == "file":
        return sources.records_from_file(ev.model_name, ev.eval_result, ev.default_iteration, ev.token_num,
                                         ev.token_per_iteration), []
    return sources.records_from_results(ev.model_name, ev.results_dir, ev.token_per_iteration, ev.token_num)


def write_records(settings: RecorderSettings, names: list[str], records: list[ResultRecord]) -> None:
    sinks = [SINKS[name](settings) for name in names]
    for sink in sinks:
        if hasattr(sink, "record_batch") and records:  # W&B: one session for the whole backfill, under the run's lock
            try:
                sink.record_batch(records)
            except Exception as e:
                raise SinkFailed(f"{sink.name} sink failed on {len(records)} results of {records[0].run}: "
                                 f"{type(e).__name__}: {e}") from e
            continue
        for rec in records:
            try:
                sink.record(rec)
            except Exception as e:  # report which result and sink, then stop: nothing is marked done anyway
                raise SinkFailed(f"{sink.name} sink failed on {rec.run}@{rec.iteration}/{rec.benchmark}: "
                                 f"{type(e).__name__}: {e}") from e
    for sink in sinks:
        if hasattr(sink, "flush"):
            try:
                sink.flush()
            except Exception as e:  # the results are written; a view (curves.png, summary.md) could not be drawn
                raise SinkFailed(f"{sink.name} sink: results recorded, but its curves/summary could not be "
                                 f"written: {type(e).__name__}: {e}") from e


class SinkFailed(RuntimeError):
    pass


def run(cfg: WriterConfig, print_only: bool = False, summary_only: bool = False, out=sys.stdout) -> int:
    """Read every eval and build the leaderboard first, then write: an eval or leaderboard that cannot be read or
    built stops the writer before any sink has been written to."""
    collected = []
    for ev in cfg.evals:
        records, problems = collect(ev, summary_only)
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        collected.append((ev, records))
    refuse_collisions(collected)
    every = [r for _, records in collected for r in records]
    board = leaderboard_of(cfg, every) if cfg.leaderboard else None
    for ev, records in collected:
        rows = [dataclasses.asdict(r) for r in records]
        print(plots.summary_markdown(f"{ev.model_name} ({ev.source}, {len(records)} results)", rows), file=out)
        if print_only:
            continue
        settings = settings_for(cfg, ev, summary_only)
        write_records(settings, cfg.sinks, records)
        if "wandb" in cfg.sinks:
            from recorder.wandb_sink import resolve_mode, run_id

            mode = resolve_mode(cfg.mode)
            print(f"W&B ({mode}): run {run_id(cfg.project, ev.model_name)} in project {cfg.project}, "
                  f"local logs in {settings.wandb.dir}"
                  + (f"; upload with: wandb sync {os.path.join(settings.wandb.dir, 'wandb')}" if mode == "offline" else ""),
                  file=out)
    if board is not None:
        write_leaderboard(cfg, *board, print_only, out)
    return 0


def refuse_collisions(collected: list) -> None:
    """Two records of one (model, iteration, benchmark) would each be 'the' result: the sinks keep the first, a
    leaderboard the last. Raised before anything is written, naming both sources."""
    seen: dict[tuple, str] = {}
    for i, (ev, records) in enumerate(collected):
        for rec in records:
            where = f"evals[{i}] ({ev.source}{': ' + rec.metrics_path if rec.metrics_path else ''})"
            first = seen.setdefault(rec.key, where)
            if first != where:
                raise EvaluatorError(f"two results for model {rec.run!r} iteration {rec.iteration} benchmark "
                                     f"{rec.benchmark!r}: {first} and {where}; keep one")


def leaderboard_of(cfg: WriterConfig, records: list[ResultRecord]) -> tuple[list, list[str]]:
    """(entries, the metrics shown); raises EvaluatorError when no model has any of the metrics."""
    metrics = cfg.leaderboard_metrics or sources.DEFAULT_HELM_METRICS
    if not cfg.evals:  # Data-Juicer reads the project's runs from W&B; offline-first, we read the local logs
        records = sources.records_from_wandb_dir(wandb_dir(cfg, None), cfg.project)
        if not records:
            raise EvaluatorError(f"leaderboard: no runs of project {cfg.project!r} in the W&B logs under "
                                 f"{wandb_dir(cfg, None)} (give `evals:`, or `dir:` where the runs were logged)")
    excluded = cfg.excluded_models + cfg.excluded_runs
    unknown = sorted(set(excluded) - {r.run for r in records})
    if unknown:
        print(f"warning: excluded models {unknown} have no results (misspelt?)", file=sys.stderr)
    entries, missing = leaderboard.build(records, metrics, excluded)
    if missing:
        print(f"warning: no results for leaderboard metrics {missing}", file=sys.stderr)
    if not entries:
        raise EvaluatorError(f"leaderboard: no model has any of the metrics {metrics}")
    return entries, [m for m in metrics if m not in missing]


def write_leaderboard(cfg: WriterConfig, entries: list, shown: list[str], print_only: bool, out) -> None:
    table = leaderboard.markdown(entries, shown, cfg.scale)
    print(f"# leaderboard ({cfg.project})\n\n{table}", file=out)
    if print_only:
        return
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_text_atomic(os.path.join(cfg.output_dir, "leaderboard.md"), f"# leaderboard ({cfg.project})\n\n{table}")
    write_json_atomic(os.path.join(cfg.output_dir, "leaderboard.json"),
                      [dataclasses.asdict(e) for e in entries])
    plots.write_leaderboard_png(entries, os.path.join(cfg.output_dir, "leaderboard.png"), f"leaderboard ({cfg.project})")
    print(f"leaderboard: {os.path.join(cfg.output_dir, 'leaderboard.png')}", file=out)
    if "wandb" in cfg.sinks:
        from recorder.wandb_sink import WandbSink

        columns, rows = leaderboard.as_rows(entries, shown)
        rid = WandbSink(settings_for(cfg, None, False)).log_leaderboard(columns, rows, f"leaderboard ({cfg.project})")
        print(f"W&B leaderboard run: {rid}", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wandb_writer.py",
                                description="Write existing evaluation results (HELM output, inline results, a results "
                                            "tree) to W&B and build a leaderboard.")
    p.add_argument("--config", required=True, help="recorder YAML: project, evals: [...], leaderboard: true")
    p.add_argument("--print-only", action="store_true", help="print the results as tables; write nothing")
    p.add_argument("--summary-only", action="store_true",
                   help="log only the headline metrics (no HELM subsets, no W&B tables)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_writer_config(args.config)
        return run(cfg, args.print_only, args.summary_only)
    except EvaluatorError as e:
        print(f"wandb_writer: {e}", file=sys.stderr)
        return 2
    except SinkFailed as e:
        print(f"wandb_writer: {e}", file=sys.stderr)
        return 1
