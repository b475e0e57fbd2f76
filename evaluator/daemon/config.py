"""YAML -> typed config. The top key is `auto_eval:`; Data-Juicer's keys are accepted as they are.

Every error names the key path (and file:line where the YAML has one) and what was expected;
unknown keys get a "did you mean" (reading and wording: evaluator/common/yamlconf.py). The free-form mappings of a
benchmark (options, generation, backend_options, metric_options) are checked against the registries the stages
read them with, and refuse secret-named keys at any depth (evaluator/common/secrets.py): a secret is given as
`<key>_env: VARIABLE`. Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import difflib
import os
import re
import string
import typing
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator

from evaluator.benchmarks import registry as benchmark_registry  # standard library only
from evaluator.common.atomic import read_json
from evaluator.common.checks import MAX_ITERATION, MAX_SEED, folder_name_problem
from evaluator.common.contracts import COMMAND_PLACEHOLDERS, render_template
from evaluator.common.errors import EvaluatorError, UnavailableError, did_you_mean
from evaluator.common.secrets import secret_paths
from evaluator.common.yamlconf import Problem, config_error, read_yaml, validate
from evaluator.daemon import alerts
from evaluator.daemon import best as best_rule
from evaluator.daemon.stages import BENCHMARK_TYPES
from evaluator.stages.evaluation import metrics as metric_registry  # pure Python: no torch until a metric runs
from evaluator.stages.inference import backends, params  # standard library only
from recorder.sinks import SINKS

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUT_NAMES = ("megatron", "huggingface", "deepspeed", "glob")
EVAL_TYPES = ("native", "gpt", "helm")
# values of the types a stage gets, to try command templates' format specs at load time
SAMPLE_VALUES = {"checkpoint": "/ckpt/iter_0001000", "iteration": 1000, "output_dir": "/out", "run": "run",
                 "benchmark": "bench", "tokens_b": 1.0, "seed": 0, "python": "/venv/bin/python", "config_dir": "/cfg",
                 "scratch_dir": "/cache/scratch/run/iter_0001000/bench"}


class Section(BaseModel):
    # an unknown key is an error; so is .inf or .nan for a number (no setting means "never" or "undefined" that way)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info):
        """`max_attempts: true` is a slip, not 1 (pydantic would take it as 1)."""
        if isinstance(value, bool) and _number_type(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _number_type(annotation) -> bool:
    """int, float, or either of them Optional."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] \
        if typing.get_origin(annotation) is typing.Union else []
    return annotation in (int, float) or (len(args) == 1 and args[0] in (int, float))


# ---- Data-Juicer's sections, key for key --------------------------------------------------
class MegatronConfig(Section):
    process_num: int = Field(1, ge=1)
    megatron_home: Optional[str] = None
    checkpoint_path: Optional[str] = None
    tokenizer_type: Optional[Literal["gpt2", "sentencepiece"]] = None
    vocab_path: Optional[str] = None
    merge_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    max_tokens: int = Field(512, ge=1)
    token_per_iteration: float = Field(0.0, ge=0, description="billions of tokens per iteration")
    log_path: Optional[str] = None
    port: int = 5000


class HelmConfig(Section):
    helm_spec_template_path: Optional[str] = None
    helm_output_path: Optional[str] = None
    helm_env_name: str = "crfm-helm"
    eval_instances: int = Field(100, ge=1)
    benchmarks: Optional[list[Any]] = None


class GptEvaluationConfig(Section):
    openai_api_key: Optional[SecretStr] = None
    openai_organization: Optional[str] = None
    question_file: Optional[str] = None
    baseline_file: Optional[str] = None
    prompt_file: Optional[str] = None
    reviewer_file: Optional[str] = None
    answer_file: Optional[str] = None
    result_file: Optional[str] = None
    # Data-Juicer's gpt_evaluator flags (--worker-num, --max-retry), and ours: the judge's OpenAI-compatible endpoint
    worker_num: int = Field(4, ge=1)
    max_retry: int = Field(5, ge=0)
    base_url: Optional[str] = None


class WandbConfig(Section):
    project: Optional[str] = None  # default: project_name
    base_url: Optional[str] = None  # self-hosted W&B
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = []
    # ours: auto = online when WANDB_API_KEY is set, else offline (upload later with `wandb sync`)
    mode: Literal["auto", "online", "offline"] = "auto"
    dir: Optional[str] = None  # local W&B folder; default <cache_dir>/wandb
    sample_predictions: int = Field(5, ge=0)  # rows of predictions.jsonl in each checkpoint's samples table
    init_timeout: float = Field(60.0, gt=0)  # seconds an online init may take before the result is retried


# ---- ours ----------------------------------------------------------------------------------
class BestTerm(Section):
    """One benchmark/metric pair of a weighted `best:` rule."""

    benchmark: str
    metric: Optional[str] = None  # default: the benchmark's main_metric
    weight: float = 1.0


class BestConfig(Section):
    """How a run's best checkpoint is chosen (evaluator/daemon/best.py; docs/insight.md "The best checkpoint"):
    one benchmark's metric, or a weighted sum of several (`weights:`), maximised or minimised."""

    benchmark: Optional[str] = None
    metric: Optional[str] = None  # default: the benchmark's main_metric
    weights: Optional[list[BestTerm]] = None  # a weighted sum instead of benchmark/metric
    mode: Literal["max", "min"] = "max"
    keep_best: int = Field(1, ge=1)  # the snapshots of this many best checkpoints are kept (exempt from release)


class WatchPath(Section):
    path: str
    name: Optional[str] = None  # run name in the results tree; default model_name (or folder name)
    layout: Optional[Literal["megatron", "huggingface", "deepspeed", "glob"]] = None
    benchmarks: Optional[list[str]] = None  # names of the benchmarks to run on this run's checkpoints; default all
    best: Optional[BestConfig] = None  # this run's best-checkpoint rule; default: auto_eval.best


class WatchConfig(Section):
    paths: list[WatchPath] = []
    layout: Optional[Literal["megatron", "huggingface", "deepspeed", "glob"]] = None
    pattern: Optional[str] = None  # glob layout: regex over entry names, with an iteration group
    done_marker: Optional[str] = None  # glob layout: e.g. "{name}.done" or "{name}/DONE"
    settle_seconds: float = Field(2.0, ge=0)
    poll_seconds: float = Field(10.0, gt=0)
    mode: Literal["auto", "inotify", "polling"] = "auto"
    order: Literal["oldest-first", "newest-first"] = "oldest-first"
    begin_iteration: Optional[int] = Field(None, ge=0, le=MAX_ITERATION)
    end_iteration: Optional[int] = Field(None, ge=0, le=MAX_ITERATION)
    iteration_interval: int = Field(1000, ge=1, le=MAX_ITERATION)
    # rotation safety (evaluator/daemon/snapshots.py): pin what inference needs as soon as complete
    snapshot: Literal["auto", "none", "hardlink", "copy"] = "auto"
    snapshot_max_gb: Optional[float] = Field(None, gt=0)  # budget for pinned snapshots; None = no limit
    snapshot_exclude: Optional[list[str]] = None  # file-name patterns not pinned; default: the layout's
    # a checkpoint is called vanished only after consecutive scans spanning this long missed it (an NFS
    # mount that drops for a moment must not end every pending job); default: a few poll intervals
    vanish_grace_seconds: Optional[float] = Field(None, ge=0)

    @field_validator("paths", mode="before")
    @classmethod
    def _strings_are_paths(cls, v):
        if isinstance(v, list):
            return [{"path": p} if isinstance(p, str) else p for p in v]
        return v


class EnvsConfig(Section):
    inference: str = os.path.join(PROJECT_ROOT, ".venvs", "inference")
    evaluation: str = os.path.join(PROJECT_ROOT, ".venvs", "evaluation")


SLURM_ONLY = ("partition", "account", "qos", "gpus_per_job", "gres", "cpus_per_task", "mem", "time",
              "extra_sbatch_args", "env_setup")


class ExecutorConfig(Section):
    type: Literal["local", "slurm"] = "local"
    gpus: Optional[list[str]] = None  # GPU slots for the inference lane; default: CUDA_VISIBLE_DEVICES or nvidia-smi
    inference_concurrency: Optional[int] = Field(None, ge=1)  # default: one per GPU slot (1 without GPUs)
    evaluation_concurrency: int = Field(1, ge=1)
    overlap_lanes: bool = True  # False: strictly one stage at a time (a baseline; checkpoint N+1 waits for N's scoring)
    max_attempts: int = Field(3, ge=1)
    backoff_seconds: float = Field(30.0, ge=0)
    backoff_max_seconds: float = Field(3600.0, ge=0)
    inference_timeout_minutes: float = Field(240.0, gt=0)
    evaluation_timeout_minutes: float = Field(120.0, gt=0)
    kill_grace_seconds: float = Field(5.0, ge=0, le=8)
    # exit 75 (retry later: rate limits, a server restarting) is retried with backoff on its own time
    # budget, not counted as an attempt; after this long of nothing but 75s the job fails for good
    tempfail_minutes: float = Field(120.0, gt=0)
    # type: local. Native inference/evaluation stages run in warm worker processes (evaluator/stages/worker.py):
    # `on` keeps a worker (imports, the loaded model, metric models) across jobs and checkpoints, swapping in the
    # next checkpoint's weights when its architecture is unchanged; `checkpoint` keeps it for one checkpoint's
    # benchmarks only (a session); `off` starts one process per (checkpoint x benchmark) stage, as before.
    warm_workers: Literal["on", "checkpoint", "off"] = "on"
    worker_max_jobs: int = Field(100, ge=1)  # a warm worker is replaced after this many jobs (and after any failure)

    @field_validator("warm_workers", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML 1.1 reads an unquoted on/off as true/false: `warm_workers: off` means "off"
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    # type: slurm (evaluator/daemon/slurm.py): one sbatch job per stage
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_job: Optional[int] = Field(None, ge=1)  # inference jobs: --gpus=N (or give `gres`)
    gres: Optional[str] = None  # inference jobs: --gres=..., e.g. gpu:a100:1
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem: Optional[str] = None  # e.g. 64G
    time: Optional[str] = None  # --time for every job; default: the stage's timeout
    max_in_flight: int = Field(4, ge=1)  # pipelines (checkpoint x benchmark) with a job not finished
    extra_sbatch_args: list[str] = []
    env_setup: list[str] = []  # shell lines run before the stage, e.g. "module load cuda/12.4"
    slurm_poll_max_seconds: float = Field(30.0, gt=0)  # squeue/sacct polling backs off up to this

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids_as_strings(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            return [str(i) for i in range(v)]
        if isinstance(v, list):
            return [str(x) for x in v]
        return v


class BenchmarkConfig(Section):
    """One benchmark run on every checkpoint. `type` picks the stages (evaluator/daemon/stages.py): `command`
    runs the two templates; the dataset types run evaluator.stages.inference / .evaluation (docs/benchmarks.md)."""

    name: str = Field(min_length=1)
    type: str = "command"
    inference: Optional[str] = None  # command template (type: command)
    evaluation: Optional[str] = None  # command template (type: command)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)  # the run's seed when unset
    # dataset types: where the data is and how to load it (relative paths: against the config file's folder)
    dataset: Optional[str] = None
    options: dict[str, Any] = {}  # loader options: split, prompt, ...
    sample_size: Optional[int] = Field(None, ge=1)
    # inference stage
    backend: str = "hf"  # a name in evaluator/stages/inference/backends BACKENDS
    generation: dict[str, Any] = {}  # evaluator/stages/inference/params.py GENERATION_PARAMS
    backend_options: dict[str, Any] = {}  # the backend class's OPTIONS: batch_size, device, base_url, ...
    batch_size: Optional[int] = Field(None, ge=1)
    max_error_rate: float = Field(0.1, ge=0, le=1)  # fraction of samples that may fail in inference
    # evaluation stage
    metrics: Optional[list[str]] = None  # default: the dataset's metadata.json, else the benchmark type's
    metric_options: dict[str, dict[str, Any]] = {}  # {metric name: {option: value}}
    main_metric: Optional[str] = None  # the metric `make demo` and summaries lead with


class MlflowConfig(Section):
    tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<cache_dir>/mlflow.db
    experiment: Optional[str] = None  # default: wandb.project, else project_name


class RecorderConfig(Section):
    # local is always on; unset, a `wandb:` section adds wandb (see evaluator/daemon/sink_setup.py sink_names)
    sinks: list[str] = ["local"]
    mlflow: MlflowConfig = MlflowConfig()
    plots: bool = True  # local sink: curves.png and summary.md beside history.jsonl
    # per (result, sink): a result a sink refused this many times in a row is set aside (quarantined,
    # shown by `status`, offered again by `status --retry-recording`); the other results keep flowing
    max_failures: int = Field(8, ge=1)
    timeout_seconds: float = Field(120.0, gt=0)  # one sink call; past it the call counts as failed


class AlertRuleConfig(Section):
    """One regression-alert rule (evaluator/daemon/alerts.py; docs/insight.md "Regression alerts")."""

    name: Optional[str] = Field(None, min_length=1)  # the rule's id in the ledger and messages; default: what it checks
    benchmark: Optional[str] = None  # a configured benchmark; a `failed:` rule without one watches every benchmark
    metric: Optional[str] = None  # one the benchmark reports (its metrics, expanded; or main_metric)
    # drop rules: worse than the previous checkpoint, the best so far, or a fixed threshold
    versus: Optional[Literal["prev", "best", "threshold"]] = None  # default: threshold when given, else prev
    drop: Optional[float] = Field(None, ge=0)  # absolute; default 0 (any drop)
    drop_relative: Optional[float] = Field(None, gt=0)  # a fraction of the reference value, e.g. 0.1
    threshold: Optional[float] = None
    direction: Literal["higher", "lower"] = "higher"  # which way is better
    min_n: Optional[int] = Field(None, ge=1)  # fewer (common) samples: not checked
    significant: Optional[float] = Field(None, gt=0, lt=1)  # only when the paired test's p < this
    stuck: Optional[int] = Field(None, ge=2)  # the metric is exactly 0 or 1 on this many checkpoints in a row
    failed: Optional[int] = Field(None, ge=1)  # a stage of one (checkpoint, benchmark) failed this many times


class AlertsConfig(Section):
    rules: list[AlertRuleConfig] = []
    # the webhook's URL is a secret: the name of the environment variable holding it (Slack-compatible JSON POST)
    webhook_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    wandb: bool = True  # also wandb.alert when the wandb sink runs online (offline: skipped, the log says so)
    backoff_seconds: float = Field(30.0, gt=0)  # first retry of a failed delivery; doubles up to the max
    backoff_max_seconds: float = Field(3600.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)  # one delivery attempt


class AutoEvalConfig(Section):
    project_name: str
    model_name: str
    cache_dir: str = "cache"
    megatron: Optional[MegatronConfig] = None
    helm: Optional[HelmConfig] = None
    gpt_evaluation: Optional[GptEvaluationConfig] = None
    wandb: Optional[WandbConfig] = None
    watch: WatchConfig = WatchConfig()
    envs: EnvsConfig = EnvsConfig()
    executor: ExecutorConfig = ExecutorConfig()
    benchmarks: list[BenchmarkConfig] = []
    recorder: RecorderConfig = RecorderConfig()
    alerts: AlertsConfig = AlertsConfig()
    # the best checkpoint of every run (a watch.paths entry's own `best:` replaces it); none: no best tracking
    best: Optional[BestConfig] = None
    seed: int = Field(0, ge=0, le=MAX_SEED)  # numpy's bound (transformers.set_seed): hf stages would fail
    _config_dir: str = PrivateAttr("")  # the config file's folder: base of relative paths, {config_dir}
    _config_path: str = PrivateAttr("")  # the file itself, for messages that give a command to run

    @property
    def config_path(self) -> str:
        return self._config_path

    @property
    def config_dir(self) -> str:
        return self._config_dir

    @property
    def token_per_iteration(self) -> float:
        return self.megatron.token_per_iteration if self.megatron else 0.0


class ConfigFile(Section):
    auto_eval: AutoEvalConfig


# ---- loading and checking -------------------------------------------------------------------
def load_config(path: str, require_datasets: bool = True, check_data: bool = True) -> AutoEvalConfig:
    """Read, validate and resolve a config file; raises EvaluatorError on any problem. With
    require_datasets=False (the daemon, --dry-run, status) a benchmark dataset path that does not exist yet is
    allowed (the daemon runs the others and that one once it appears); with check_data (all but status) a present
    dataset must be scorable as configured (`dataset_problem`)."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict) or "auto_eval" not in data:
        keys = list(data) if isinstance(data, dict) else []
        close = difflib.get_close_matches("auto_eval", [str(k) for k in keys], n=1)
        hint = f" (found '{close[0]}': did you mean 'auto_eval'?)" if close else ""
        raise EvaluatorError(f"invalid config: {path}: expected a mapping with the top key 'auto_eval:'{hint}")
    cfg = validate(ConfigFile, data, path, lines).auto_eval
    problems = _semantic_checks(cfg)
    if problems:
        raise config_error(path, lines, problems)
    _resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    cfg._config_path = path
    main_problems = [(("auto_eval", "benchmarks", i, "main_metric"),
                      f"benchmark {b.name!r} reports no metric {b.main_metric!r} (it reports {', '.join(names)})"
                      f"{did_you_mean(b.main_metric, names)}")
                     for i, b in enumerate(cfg.benchmarks) if b.main_metric is not None
                     and (names := reported_metrics(b)) is not None and not best_rule.reported(b.main_metric, names)
                     # a name close to one it reports is a typo; another may be one a metric invents (llm_judge's
                     # win_rate, accuracy's unparsed_rate), not known before the first result
                     and did_you_mean(b.main_metric, names)]
    if main_problems:  # a typo there would show `?` in every status cell and leave its alert rules unchecked
        raise config_error(path, lines, main_problems)
    alert_problems = [(("auto_eval", "alerts") + loc, text) for loc, text in alerts.problems(
        cfg.alerts.rules, {b.name: _with_main_metric(b, reported_metrics(b)) for b in cfg.benchmarks},
        cfg.executor.max_attempts, did_you_mean)]
    if alert_problems:
        raise config_error(path, lines, alert_problems)
    missing = [(("auto_eval", "benchmarks", i, "dataset"), f"no such file or directory: {b.dataset}")
               for i, b in enumerate(cfg.benchmarks) if b.dataset and not os.path.exists(b.dataset)]
    if missing and require_datasets:
        raise UnavailableError(str(config_error(path, lines, missing)))
    bad_data = [(("auto_eval", "benchmarks", i, "dataset"), problem) for i, b in enumerate(cfg.benchmarks)
                if check_data and (problem := dataset_problem(b)) is not None]
    if bad_data:
        raise config_error(path, lines, bad_data)
    bad_best = _best_problems(cfg)  # after the paths are resolved: a dataset's metadata.json may name its metrics
    if bad_best:
        raise config_error(path, lines, bad_best)
    return cfg


def dataset_problem(bench: BenchmarkConfig) -> Optional[str]:
    """What keeps a present dataset from being scored as configured (None: fine, or not there yet): the metrics
    must resolve -- from `metrics:`, else the dataset's metadata.json, else the type's defaults -- to known names."""
    if bench.type not in benchmark_registry.BENCHMARKS or bench.metrics or not bench.dataset \
            or not os.path.isdir(bench.dataset):
        return None
    meta_path = os.path.join(bench.dataset, "metadata.json")
    names = list(benchmark_registry.get(bench.type).metrics)
    if os.path.exists(meta_path):
        try:
            meta = read_json(meta_path)
        except (OSError, ValueError) as e:
            return f"{meta_path}: cannot be read ({e})"
        if not isinstance(meta, dict):
            return f"{meta_path}: expected a JSON object"
        listed = meta.get("metrics")
        if listed is not None and (not isinstance(listed, list) or not all(isinstance(m, str) for m in listed)):
            return f"{meta_path}: metrics: expected a list of metric names, got {listed!r}"
        names = listed or names
    if not names:
        return (f"no metrics to compute: the benchmark sets no `metrics:` and {meta_path} names none "
                f"(set `metrics: [exact_match, ...]` in the benchmark, or `metrics` in metadata.json)")
    try:
        metric_registry.expand(list(names))
    except EvaluatorError as e:
        return f"{meta_path}: {e}"
    return None


def glob_pattern_problem(pattern: Optional[str]) -> Optional[str]:
    """What keeps watch.pattern from serving the glob layout, or None."""
    if not pattern:
        return "the glob layout needs a regex with an iteration group, e.g. 'step_(?P<iteration>\\d+)\\.ckpt'"
    try:
        if re.compile(pattern).groups == 0:
            return "expected a regex with an iteration group ((?P<iteration>\\d+) or the first group)"
    except re.error as e:
        return f"not a valid regex: {e}"
    return None


def reported_metrics(bench: BenchmarkConfig) -> Optional[list[str]]:
    """The metric names a benchmark's metrics.json will carry, as far as the config tells before it runs: its
    `metrics:` (expanded), else its dataset's metadata.json, else its type's defaults; None when that cannot be
    known (a `command` or harness benchmark, a dataset not there yet or unreadable)."""
    if bench.type not in benchmark_registry.BENCHMARKS:
        return None
    names = list(bench.metrics or [])
    if not names:
        if bench.dataset and not os.path.isdir(bench.dataset):
            return None
        names = list(benchmark_registry.get(bench.type).metrics)
        meta_path = os.path.join(bench.dataset, "metadata.json") if bench.dataset else ""
        if meta_path and os.path.exists(meta_path):
            try:
                listed = read_json(meta_path).get("metrics")
            except (OSError, ValueError, AttributeError):
                return None  # dataset_problem says what is wrong with it
            if listed is not None and not (isinstance(listed, list) and all(isinstance(m, str) for m in listed)):
                return None
            names = listed or names
    try:
        return metric_registry.expand(names)
    except EvaluatorError:
        return None


def best_sections(cfg: AutoEvalConfig) -> list[tuple[tuple, BestConfig, list]]:
    """Each `best:` section in use: (its key path, the section, the watch.paths entries it applies to; [] for
    the run of megatron.checkpoint_path)."""
    base = ("auto_eval",)
    out = []
    own = [(i, p) for i, p in enumerate(cfg.watch.paths) if p.best is not None]
    for i, p in own:
        out.append((base + ("watch", "paths", i, "best"), p.best, [p]))
    if cfg.best is not None:
        out.append((base + ("best",), cfg.best, [p for p in cfg.watch.paths if p.best is None]))
    return out


def _best_problems(cfg: AutoEvalConfig) -> list[Problem]:
    benchmarks = {b.name: reported_metrics(b) for b in cfg.benchmarks}
    main = {b.name: b.main_metric for b in cfg.benchmarks}
    problems: list[Problem] = []
    for loc, section, paths in best_sections(cfg):
        runs = {p.name or os.path.basename(p.path.rstrip("/")): p.benchmarks for p in paths}
        problems += best_rule.problems(section, loc, benchmarks, main, runs)
    return problems


def _with_main_metric(bench: BenchmarkConfig, names: Optional[list[str]]) -> Optional[list[str]]:
    """The names an alert rule may give: what the benchmark reports, and its main_metric."""
    if names is None or not bench.main_metric or bench.main_metric in names:
        return names
    return names + [bench.main_metric]


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


SECRET_MESSAGE = ("a secret does not belong in the config (it would be copied into every job spec): "
                  "set `{key}_env: VARIABLE_NAME` and export the variable")


def _free_form_problems(bench: BenchmarkConfig, loc: tuple) -> list[Problem]:
    """The mappings pydantic cannot type (options, generation, backend_options, metric_options), checked against
    the registries that read them, plus secret-named keys at any depth of any of them."""
    problems: list[Problem] = []
    for block in ("options", "generation", "backend_options", "metric_options"):
        for path in secret_paths(getattr(bench, block)):
            problems.append((loc + (block,) + path, SECRET_MESSAGE.format(key=path[-1])))
    if bench.type in benchmark_registry.BENCHMARKS:
        for problem in benchmark_registry.option_problems(bench.type, bench.options):
            key, _, text = problem.partition(": ")
            problems.append((loc + tuple(key.split(".")), text))
    for key, text in params.generation_problems(bench.generation, bench.backend):
        problems.append((loc + ("generation", key), text))
    if bench.backend not in backends.BACKENDS:
        problems.append((loc + ("backend",), f"unknown backend {bench.backend!r}{did_you_mean(bench.backend, backends.BACKENDS)}"
                                             f" (known: {', '.join(backends.BACKENDS)})"))
    else:
        for key, text in backends.option_problems(bench.backend, bench.backend_options):
            problems.append((loc + ("backend_options", key), text))
    if bench.metrics:
        try:
            metric_registry.expand(list(bench.metrics))
        except EvaluatorError as e:
            problems.append((loc + ("metrics",), str(e).removeprefix("metrics: ")))
    for path, text in metric_registry.option_problems(bench.metric_options, bench.metrics):
        problems.append((loc + ("metric_options",) + path, text))
    return problems


def _semantic_checks(cfg: AutoEvalConfig) -> list[Problem]:
    base = ("auto_eval",)
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, bench in enumerate(cfg.benchmarks):
        loc = base + ("benchmarks", i)
        if bench.name in seen:
            problems.append((loc + ("name",), f"duplicate benchmark name {bench.name!r}"))
        seen.add(bench.name)
        if folder_name_problem(bench.name):
            problems.append((loc + ("name",), folder_name_problem(bench.name)))
        if bench.type not in BENCHMARK_TYPES:
            problems.append((loc + ("type",), f"unknown benchmark type {bench.type!r} (known: {', '.join(BENCHMARK_TYPES)})"
                                              f"{did_you_mean(bench.type, BENCHMARK_TYPES)}"))
            continue
        if bench.type != "command":
            kind = BENCHMARK_TYPES[bench.type]
            if kind.needs_dataset and not bench.dataset:
                problems.append((loc + ("dataset",), f"a {bench.type!r} benchmark needs `dataset:` (its file or directory)"))
            for stage in ("inference", "evaluation"):
                if getattr(bench, stage):
                    problems.append((loc + (stage,), "command templates are only used with type: command"))
        problems += _free_form_problems(bench, loc)
        if bench.type == "command":
            for stage in ("inference", "evaluation"):
                template = getattr(bench, stage)
                if not template:
                    problems.append((loc + (stage,), "a command benchmark needs a command template for this stage"))
                    continue
                try:
                    fields = _template_fields(template)
                except ValueError as e:
                    problems.append((loc + (stage,), f"bad command template ({e}); write literal braces as {{{{ }}}}"))
                    continue
                unknown = [name for name in fields if name not in COMMAND_PLACEHOLDERS]
                for name in unknown:
                    close = difflib.get_close_matches(name, COMMAND_PLACEHOLDERS, n=1)
                    hint = f"; did you mean '{{{close[0]}}}'?" if close else ""
                    problems.append((loc + (stage,), f"unknown placeholder {{{name}}} (known: {', '.join('{%s}' % p for p in COMMAND_PLACEHOLDERS)}){hint}"))
                if not unknown:
                    try:  # a format spec that cannot apply (e.g. {checkpoint:07d}) fails here, not in every stage
                        render_template(template, SAMPLE_VALUES)
                    except (ValueError, KeyError, IndexError) as e:
                        problems.append((loc + (stage,), f"bad format spec in the command template ({e})"))
    ex = cfg.executor
    if ex.type != "slurm":
        for key in SLURM_ONLY:
            if getattr(ex, key):
                problems.append((base + ("executor", key), "only used with executor.type: slurm"))
    elif ex.gres and ex.gpus_per_job:
        problems.append((base + ("executor", "gres"), "give either gres or gpus_per_job, not both"))
    if ex.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", ex.time):
        problems.append((base + ("executor", "time"), f"expected a Slurm time like 120, 2:00:00 or 1-00:00:00, got {ex.time!r}"))
    for i, sink in enumerate(cfg.recorder.sinks):
        if sink not in SINKS:
            problems.append((base + ("recorder", "sinks", i),
                             f"unknown sink {sink!r} (known: {', '.join(SINKS)}){did_you_mean(sink, SINKS)}"))
    w = cfg.watch
    if w.end_iteration is not None and w.begin_iteration is not None and w.end_iteration < w.begin_iteration:
        problems.append((base + ("watch", "end_iteration"), f"expected >= begin_iteration ({w.begin_iteration}), got {w.end_iteration}"))
    layouts = {p.layout or w.layout for p in w.paths}
    if "glob" in layouts and glob_pattern_problem(w.pattern):
        problems.append((base + ("watch", "pattern"), glob_pattern_problem(w.pattern)))
    if w.done_marker:
        try:
            bad = [f for f in _template_fields(w.done_marker) if f not in ("name", "iteration")]
        except ValueError as e:
            bad = [str(e)]
        if bad:
            problems.append((base + ("watch", "done_marker"), f"expected placeholders {{name}} or {{iteration}} only, got {bad}"))
    bench_names = [b.name for b in cfg.benchmarks]
    for i, p in enumerate(w.paths):
        for j, name in enumerate(p.benchmarks or []):
            if name not in bench_names:
                hint = did_you_mean(name, bench_names)
                problems.append((base + ("watch", "paths", i, "benchmarks", j),
                                 f"no benchmark named {name!r} (configured: {', '.join(bench_names) or 'none'}){hint}"))
    names = [p.name for p in w.paths if p.name]
    for i, p in enumerate(w.paths):
        if p.name and names.count(p.name) > 1:
            problems.append((base + ("watch", "paths", i, "name"), f"duplicate run name {p.name!r}"))
    return problems


def _resolve_paths(cfg: AutoEvalConfig, base: str) -> None:
    def absolute(p: Optional[str]) -> Optional[str]:
        return None if p is None else os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    cfg._config_dir = base
    cfg.cache_dir = absolute(cfg.cache_dir)
    for p in cfg.watch.paths:
        p.path = absolute(p.path)
    if cfg.megatron and cfg.megatron.checkpoint_path:
        cfg.megatron.checkpoint_path = absolute(cfg.megatron.checkpoint_path)
    cfg.envs.inference = absolute(cfg.envs.inference)
    cfg.envs.evaluation = absolute(cfg.envs.evaluation)
    for bench in cfg.benchmarks:
        bench.dataset = absolute(bench.dataset)
