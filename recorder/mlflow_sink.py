"""MLflow sink: one MLflow run per (experiment, run name); metrics `<benchmark>/<metric>` with
step=iteration, `tokens_b` with step=iteration, the run config as params, metrics.json as an artifact
under `iter_%07d/<benchmark>/`.

Default store: SQLite at <cache_dir>/mlflow.db with artifacts in <cache_dir>/mlflow-artifacts (MLflow 3
keeps its plain-file store read-only); `recorder.mlflow.tracking_uri` (or MLFLOW_TRACKING_URI) points
it elsewhere, e.g. a tracking server.

Metric names MLflow refuses (`pass@1`) are renamed by `metric_key` (docs/recording.md), so a result
never fails for its names. After each record() the run is left FINISHED: a daemon killed at any
moment leaves no run RUNNING forever (MLflow's client logs to a finished run as to a running one).

A tracking server that does not answer costs at most about `request_timeout` seconds per record()
(default 30), not the ~4 minutes of MLflow's own retries: see `bound_http_retries`.

Exactly once: the run is found again by a tag holding a hash of its name, and a first evaluation's
metric is logged only when the run's history of that metric has no point at this iteration yet (read
once per process, then kept). A result offered again after a crash therefore adds nothing; the
artifact is re-copied to the same path, which replaces it with the same file.

Re-runs: MLflow keeps every value logged at a step, so a rerun (revision r >= 1) logs its values at the
same step, beside the first ones, together with `<benchmark>/revision` = r at that step, all in one
`log_batch` (one transaction in MLflow's SQL store). That marker is the idempotence check: a revision at
or below the highest marker at the step (0 where the step has values but no marker) is not logged again.
The run tag `fingerprints/<benchmark>` lists the settings fingerprints the benchmark was recorded with
(several: one curve mixes settings); metrics.json, the artifact, holds the result's own.

Comparison: `<benchmark>/delta_vs_prev` and `<benchmark>/p_vs_prev` (the main metric against the previous
checkpoint) are logged at step=iteration with the metrics, in the same batch and under the same revision rule;
the compare.json document (every metric, against prev and best, with the flips) is the artifact
`iter_%07d/<benchmark>/compare.json`. The run's best checkpoint is the tags `best/iteration`, `best/score`,
`best/rule`, set by each result that carries one (the last result recorded sets them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time

from typing import Optional

from evaluator.common.contracts import COMPARE
from recorder.sinks import (BEST_KEYS, RecorderSettings, ResultRecord, best_of, check_metric_names, comparison_summary,
                            supersedes)

log = logging.getLogger("evaluator")
RUN_TAG = "ckpt_evaluator.run_key"
REQUEST_TIMEOUT_SECONDS = 30.0
MAX_KEY_LENGTH = 250  # MLflow's limit for a metric name
MAX_TAG_VALUE = 8000  # MLflow's limit for a tag value
FINGERPRINTS_TAG = "fingerprints/"  # + benchmark: the settings fingerprints it was recorded with, first seen first
BEST_TAG = "best/"  # + iteration, score, rule: the run's best checkpoint, as the last recorded result saw it
_DISALLOWED = re.compile(r"[^A-Za-z0-9_\-. /]")


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:6]


def _clean(name: str) -> str:
    """ASCII letters, digits, `_ - . space /` kept, any other character -> `_`; an empty, `.` or `..`
    path segment -> `_` (MLflow refuses names that a path normalisation would change)."""
    name = _DISALLOWED.sub("_", name)
    return "/".join(seg if seg not in ("", ".", "..") else "_" for seg in name.split("/"))


def metric_key(names: list[str]) -> dict[str, str]:
    """MLflow metric name for each of `names` (the `<benchmark>/<metric>` keys of one result).

    Deterministic: a name MLflow accepts is kept; another is cleaned (`_clean`). A cleaned name that
    equals another name of the set, or a name longer than 250 characters, gets `-` + the first 6 hex
    digits of the sha256 of its original name (cut to fit 250), so two metrics never share a curve."""
    cleaned = {n: _clean(n) for n in names}
    count: dict[str, int] = {}
    for c in cleaned.values():
        count[c] = count.get(c, 0) + 1
    out = {}
    for name, c in cleaned.items():
        if (c != name and count[c] > 1) or len(c) > MAX_KEY_LENGTH:
            c = c[:MAX_KEY_LENGTH - 7] + "-" + _hash(name)
        out[name] = c
    return out


def bound_http_retries(total_seconds: float) -> None:
    """Make an MLflow HTTP call give up within about `total_seconds`: one attempt of a third of it, one
    retry after a 1 s backoff. MLflow reads these variables on every request (its defaults: 120 s per
    attempt, 7 retries with backoff, ~4 minutes against a dead server); they are process-wide."""
    per_try = max(1, int(total_seconds // 3))
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(per_try)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0"


def _flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_params(value, name + "."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = text[:6000]  # MLflow's limit for a param value
    return out


class MlflowSink:
    name = "mlflow"

    def __init__(self, settings: RecorderSettings, request_timeout: float = None):
        self.settings = settings
        self.ms = settings.mlflow
        self.request_timeout = (request_timeout or getattr(self.ms, "request_timeout", None)
                                or REQUEST_TIMEOUT_SECONDS)
        self._client = None
        self._experiment_id = None
        self._run_ids: dict[str, str] = {}
        self._steps: dict[tuple[str, str], dict[int, float]] = {}  # (run id, metric) -> step -> largest value there
        self._tags: dict[str, dict[str, str]] = {}  # run id -> its tags

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.ms.tracking_uri.startswith(("http://", "https://")):
                bound_http_retries(self.request_timeout)
            if self.ms.tracking_uri.startswith("sqlite:///"):
                os.makedirs(os.path.dirname(self.ms.tracking_uri[len("sqlite:///"):]) or ".", exist_ok=True)
            client = MlflowClient(tracking_uri=self.ms.tracking_uri)
            exp = client.get_experiment_by_name(self.ms.experiment)
            if exp is None:
                self._experiment_id = client.create_experiment(self.ms.experiment,
                                                               artifact_location=self.ms.artifact_location)
            else:
                self._experiment_id = exp.experiment_id
            self._client = client
        return self._client

    def run_id(self, run: str) -> str:
        """The MLflow run of this training run, created (with its params) on first use."""
        if run in self._run_ids:
            return self._run_ids[run]
        client = self.client()
        key = hashlib.sha256(run.encode()).hexdigest()[:32]
        found = client.search_runs([self._experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'",
                                   max_results=2)
        if found:
            rid = found[0].info.run_id
            have = found[0].data.params
            self._tags[rid] = dict(found[0].data.tags)
        else:
            rid = client.create_run(self._experiment_id, run_name=run, tags={RUN_TAG: key}).info.run_id
            have = {}
            self._tags[rid] = {RUN_TAG: key}
        params = _flat_params(dict(self.settings.run_config, model_name=run))
        new = {k: v for k, v in params.items() if k not in have}
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        if changed:  # params are immutable in MLflow: keep the first value, say so
            log.warning("mlflow: run %s keeps its first value of params %s (the config changed since)", run, changed)
        if new:
            from mlflow.entities import Param

            client.log_batch(rid, params=[Param(k, v) for k, v in sorted(new.items())])
        self._run_ids[run] = rid
        return rid

    def _logged(self, rid: str, key: str) -> dict[int, float]:
        """step -> the largest value of metric `key` logged at that step (read once per process, then kept)."""
        if (rid, key) not in self._steps:
            logged: dict[int, float] = {}
            for m in self.client().get_metric_history(rid, key):
                logged[m.step] = max(m.value, logged.get(m.step, m.value))
            self._steps[(rid, key)] = logged
        return self._steps[(rid, key)]

    def _held_revision(self, rid: str, result: ResultRecord, keys: list[str]) -> Optional[int]:
        """The highest revision of this result the run holds: its `<benchmark>/revision` marker at the step, 0 if
        the step has values of the benchmark but no marker, None if it has none."""
        marker = self._logged(rid, self._revision_key(result)).get(result.iteration)
        if marker is not None:
            return int(marker)
        return 0 if any(result.iteration in self._logged(rid, key) for key in keys) else None

    @staticmethod
    def _revision_key(result: ResultRecord) -> str:
        return _clean(f"{result.benchmark}/revision")

    def record(self, result: ResultRecord) -> None:
        try:
            self._record(result)
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        """After any failure, look everything up again at the next call: the server may have come back with
        another store (the experiment and runs this sink knew are gone), or the experiment was recreated."""
        self._client = None
        self._experiment_id = None
        self._run_ids.clear()
        self._steps.clear()
        self._tags.clear()

    def _record(self, result: ResultRecord) -> None:
        from mlflow.entities import Metric, RunTag

        check_metric_names(result)
        client = self.client()
        rid = self.run_id(result.run)
        now = int(time.time() * 1000)
        raw = {f"{result.benchmark}/{name}": float(value) for name, value in result.metrics.items()}
        raw.update(comparison_metrics(result))
        keys = metric_key(list(raw) + (["tokens_b"] if result.tokens_b is not None else []))
        values = {keys[name]: value for name, value in raw.items()}
        held = self._held_revision(rid, result, sorted(values))
        if held is not None and held > result.revision:
            client.set_terminated(rid, "FINISHED")
            return  # an older revision offered late: the run holds a newer one
        if supersedes(result.revision, held):
            todo = dict(values)
            if result.revision:
                todo[self._revision_key(result)] = float(result.revision)
        else:  # this revision is there; a first evaluation may still lack a metric (logged before a crash)
            todo = {key: value for key, value in values.items() if result.iteration not in self._logged(rid, key)}
        if result.tokens_b is not None and result.iteration not in self._logged(rid, keys["tokens_b"]):
            todo[keys["tokens_b"]] = float(result.tokens_b)  # once per iteration: a rerun does not change it
        tags = self._fingerprint_tag(rid, result)
        tags.update(self._best_tags(rid, result))
        if todo or tags:
            batch = [Metric(key, value, now, result.iteration) for key, value in sorted(todo.items())]
            try:
                client.log_batch(rid, metrics=batch, tags=[RunTag(k, v) for k, v in tags.items()])
            except BaseException:
                for m in batch:  # unsure what was stored: read the history again next time
                    self._steps.pop((rid, m.key), None)
                self._run_ids.pop(result.run, None)  # and the run with its tags
                raise
            for m in batch:
                logged = self._logged(rid, m.key)
                logged[m.step] = max(m.value, logged.get(m.step, m.value))
            self._tags[rid].update(tags)
        folder = f"iter_{result.iteration:07d}/{_clean(result.benchmark)}"
        if result.metrics_path and os.path.exists(result.metrics_path):
            client.log_artifact(rid, result.metrics_path, artifact_path=folder)
        if result.comparison is not None:  # with its flips; a re-offer writes the same file again
            client.log_dict(rid, result.comparison, f"{folder}/{COMPARE}")
        client.set_terminated(rid, "FINISHED")

    def _best_tags(self, rid: str, result: ResultRecord) -> dict[str, str]:
        """{tag: value} to set so the `best/*` tags hold the result's `best` ({} if they do, or it has none)."""
        best = best_of(result)
        if best is None:
            return {}
        wanted = {BEST_TAG + k: str(best[k]) for k in BEST_KEYS}
        return {k: v for k, v in wanted.items() if self._tags[rid].get(k) != v}

    def _fingerprint_tag(self, rid: str, result: ResultRecord) -> dict[str, str]:
        """{tag: value} to set so `fingerprints/<benchmark>` lists this result's fingerprint ({} if it does)."""
        if not result.fingerprint:
            return {}
        tag = _clean(FINGERPRINTS_TAG + result.benchmark)[:MAX_KEY_LENGTH]
        seen = self._tags[rid].get(tag, "").split()
        if result.fingerprint in seen:
            return {}
        value = " ".join(seen + [result.fingerprint])
        while len(value) > MAX_TAG_VALUE:  # hundreds of settings changes: keep the newest that fit
            value = value.split(" ", 1)[1]
        return {tag: value}


def comparison_metrics(result: ResultRecord) -> dict[str, float]:
    """`<benchmark>/delta_vs_prev` and `<benchmark>/p_vs_prev` of the result's main metric (each only when it is a
    finite number: a comparison without a p-value logs no p)."""
    vs_prev = comparison_summary(result, "prev")
    out = {}
    for name, key in (("delta_vs_prev", "delta"), ("p_vs_prev", "p")):
        value = None if vs_prev is None else vs_prev[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{result.benchmark}/{name}"] = float(value)
    return out
