"""What happens after a result is scored (docs/insight.md): its comparison, the run's best checkpoint, alerts.

`Insight` is the daemon's part for a scored result: it ranks the run's checkpoints by its `best:` rule (best.py:
the kept snapshots, best.json), writes the result's compare.json on a comparison thread (files only, no ledger),
checks the alert rules (alerts.py decides; the ledger remembers) and carries fired alerts to their channels
(notify.py) through its own `Outbox`. The daemon calls it at fixed points of its loop: `scored` on the move to
`scored`, `check_failure_alerts` on every move to `failed`, `collect` and `deliver_alerts` each pass, and the
recovery hooks at start. Every failure here is logged and never keeps a result from its sinks; an unwritable
ledger (`LedgerUnavailable`) propagates, as everywhere in the loop.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from evaluator.common.atomic import read_json, write_json_atomic
from evaluator.common.compare import compare_document
from evaluator.common.contracts import COMPARE, DONE_FILE, EVALUATION, METRICS_LOST, SCORES, read_metrics
from evaluator.common.errors import EvaluatorError
from evaluator.daemon import alerts as A
from evaluator.daemon import best as B
from evaluator.daemon import ledger as L
from evaluator.daemon import policy as P
from evaluator.daemon.config import AutoEvalConfig
from evaluator.daemon.notify import Notice
from evaluator.daemon.outbox import Outbox
from evaluator.daemon.snapshots import SnapshotKeeper

log = logging.getLogger("evaluator")


def write_comparison(run: str, benchmark: str, iteration: int, revision: int, out: str, prev: Optional[tuple],
                     best: Optional[tuple], main_metric: Optional[str]) -> dict:
    """compare.json of the result in `out` against prev / best ((run, iteration, result folder) or None), written
    atomically; returns the document. Files only (no ledger): it runs on the daemon's comparison thread."""
    doc = compare_document(run, benchmark, iteration, revision, out, prev=prev, best=best, main_metric=main_metric)
    write_json_atomic(os.path.join(out, COMPARE), doc)
    return doc


class Insight:
    """A scored result's comparison, its run's best checkpoints and the alert rules, with their state."""

    def __init__(self, cfg: AutoEvalConfig, runs: list[str], benchmarks: dict, ledger: L.Ledger,
                 keeper: SnapshotKeeper, alert_channels: list, outdir: Callable[[L.Job], str],
                 release_if_finished: Callable[[str, int], None], poke: Callable[[], None]):
        """`outdir`: a job's result folder; `release_if_finished`: the daemon's snapshot release (a dethroned best
        checkpoint's snapshot goes once its jobs are final); `poke`: wakes the loop (a comparison or an alert
        delivery finished)."""
        self.cfg = cfg
        self.benchmarks = benchmarks
        self.ledger = ledger
        self.keeper = keeper
        self.outdir = outdir
        self.release_if_finished = release_if_finished
        self.poke = poke
        # regression alerts (alerts.py): the rules, and the channels besides the log (notify.py), carried like sinks
        self.alert_rules = A.build_rules(cfg.alerts.rules)
        self.alerts_out = Outbox(alert_channels, 2 * cfg.alerts.timeout_seconds, poke)
        self.alert_policy = P.RetryPolicy(backoff_seconds=cfg.alerts.backoff_seconds,
                                          backoff_max_seconds=cfg.alerts.backoff_max_seconds)
        # the best checkpoints (best.py): run -> its rule; run -> the kept ones, best first (set by update_best)
        self.best_rules = B.rules_by_run(cfg, runs)
        self.best: dict[str, list[B.Ranked]] = {}
        self.metrics_seen: dict[L.JobKey, tuple[int, Optional[dict]]] = {}  # key -> (revision, metrics.json metrics)
        self.missed_now = False  # a metrics_of since update_best began could not read a file that is there
        # compare.json is written off the loop (a bootstrap over 10k samples takes seconds): key -> (revision, future)
        self.compare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compare")
        self.comparing: dict[L.JobKey, tuple[int, Future]] = {}
        self.comparing_inputs: dict[L.JobKey, tuple] = {}  # what each comparison in flight was asked

    # ---- comparison and the best checkpoint (docs/insight.md) ---------------------------------------------------
    def scored(self, key: L.JobKey) -> None:
        """A result became scored: update the run's best checkpoint, and compare it with the run's previous and
        best checkpoints (compare.json) on the comparison thread; `collect_comparisons` then checks the alert
        rules. Until its comparison is written the result is not offered to the sinks (they carry it); a failure
        is logged and never keeps the result from being recorded."""
        job = self.ledger.get(key)
        if job is None or job.state != L.SCORED:
            return
        rows = self.results_by_iteration(job.run)
        try:
            self.update_best(job.run, rows)
        except L.LedgerUnavailable:
            raise
        except Exception:
            log.exception("run %s: updating the best checkpoint failed", job.run)
        try:
            inputs = self.comparison_inputs(job, rows)
        except L.LedgerUnavailable:
            raise
        except Exception:  # a bug here must not keep the result from its sinks
            log.exception("%s: preparing the comparison failed", key)
            inputs = None
        if inputs is None:
            self.check_alerts(job, None)
            return
        self.submit_comparison(job, inputs)
        try:
            self.recompare_next(job, rows)
        except L.LedgerUnavailable:
            raise
        except Exception:
            log.exception("%s: comparing the next checkpoint again failed", key)

    def submit_comparison(self, job: L.Job, inputs: tuple) -> None:
        pending = self.comparing.get(job.key)
        if pending is not None and not pending[1].done() and self.comparing_inputs.get(job.key) == inputs:
            return  # the same comparison is in flight (recovery and the scored transition can both ask)
        self.comparing_inputs[job.key] = inputs
        future = self.compare_pool.submit(write_comparison, *inputs)
        future.add_done_callback(lambda _f: self.poke())
        self.comparing[job.key] = (job.revision, future)

    def recompare_next(self, job: L.Job, rows: dict) -> None:
        """A checkpoint scored after a later one (newest-first backfill, a late copy) is that later one's previous
        checkpoint now: compare the next result above it again (its compare.json and alert rules)."""
        later = [j for it, benches in rows.items() if it > job.iteration
                 for j in [benches.get(job.benchmark)] if j is not None and j.fingerprint == job.fingerprint]
        if not later:
            return
        nxt = min(later, key=lambda j: j.iteration)
        inputs = self.comparison_inputs(nxt, rows)
        if inputs is None:
            return
        prev = ((self.comparison_of(nxt) or {}).get("against") or {}).get("prev")
        if nxt.key not in self.comparing and isinstance(prev, dict) and prev.get("iteration") == job.iteration:
            return  # already compared with this one
        log.info("%s: compared again: %s is its previous checkpoint now", nxt.key, job.key)
        self.submit_comparison(nxt, inputs)

    def collect_comparisons(self) -> None:
        """Comparisons the thread finished: log a failure, check the alert rules with the document."""
        for key, (revision, future) in list(self.comparing.items()):
            if not future.done():
                continue
            del self.comparing[key]
            self.comparing_inputs.pop(key, None)
            doc = None
            try:
                doc = future.result()
            except EvaluatorError as e:  # a malformed scores.jsonl: the stage's output, not the daemon's fault
                log.warning("%s: not compared: %s", key, e)
            except OSError as e:
                log.warning("%s: compare.json could not be written: %s", key, e)
            except Exception:  # a bug in the comparison must not keep the result from its sinks
                log.exception("%s: comparing the result failed", key)
            job = self.ledger.get(key)
            if job is not None and job.revision == revision and job.state in (L.SCORED, L.RECORDED):
                self.check_alerts(job, doc)

    def compare(self, job: L.Job, rows: Optional[dict] = None) -> Optional[dict]:
        """Write compare.json into the result's folder now (what the comparison thread does for `scored`) and
        return it; None, and no file, when the result has no per-sample scores."""
        inputs = self.comparison_inputs(job, self.results_by_iteration(job.run) if rows is None else rows)
        return None if inputs is None else write_comparison(*inputs)

    def comparison_inputs(self, job: L.Job, rows: dict) -> Optional[tuple]:
        """write_comparison's arguments: this result against the previous checkpoint of its run and benchmark (the
        highest scored/recorded iteration below it, same settings fingerprint) and the best other checkpoint (the
        run's `best:` rule when it covers this benchmark, else the benchmark's main metric, maximised). None when
        the result has no per-sample scores (command benchmarks, old results); a side without them is null."""
        out = self.outdir(job)
        if not os.path.exists(os.path.join(out, SCORES)):
            return None
        earlier = [j for it, benches in rows.items() if it < job.iteration
                   for j in [benches.get(job.benchmark)] if j is not None and j.fingerprint == job.fingerprint]
        prev = max(earlier, key=lambda j: j.iteration) if earlier else None
        best = self.best_other(job, rows)
        bench = self.benchmarks.get(job.benchmark)
        return (job.run, job.benchmark, job.iteration, job.revision, out, self.comparable(prev),
                self.comparable(best), bench.main_metric if bench is not None else None)

    def comparable(self, job: Optional[L.Job]) -> Optional[tuple]:
        """(run, iteration, result folder) of a result with per-sample scores, else None."""
        if job is None or not os.path.exists(os.path.join(self.outdir(job), SCORES)):
            return None
        return (job.run, job.iteration, self.outdir(job))

    def best_other(self, job: L.Job, rows: dict) -> Optional[L.Job]:
        """The best checkpoint of the run other than this one, by the run's rule when it covers this benchmark,
        else by the benchmark's main metric (max; main_metric unset: the first metric of this result)."""
        rule = self.best_rules.get(job.run)
        if rule is None or job.benchmark not in rule.benchmarks:
            metrics = self.metrics_of(job) or {}
            bench = self.benchmarks.get(job.benchmark)
            metric = (bench.main_metric if bench is not None else None) or next(iter(metrics), None)
            if metric is None:
                return None
            rule = B.BestRule((B.Term(job.benchmark, metric),))
        ranked = B.choose(rule, self.scores(rows, rule.benchmarks), exclude=[job.iteration])
        return rows[ranked[0].iteration][job.benchmark] if ranked else None

    def results_by_iteration(self, run: str) -> dict[int, dict[str, L.Job]]:
        """The run's scored and recorded rows: {iteration: {benchmark: Job}} (one SQL query)."""
        out: dict[int, dict[str, L.Job]] = {}
        for j in self.ledger.jobs([L.SCORED, L.RECORDED], run=run):
            out.setdefault(j.iteration, {})[j.benchmark] = j
        return out

    def metrics_of(self, job: L.Job) -> Optional[dict]:
        """A result's metrics.json `metrics`, read once per revision; None when unreadable."""
        seen = self.metrics_seen.get(job.key)
        if seen is not None and seen[0] == job.revision:
            return seen[1]
        try:
            metrics = read_metrics(os.path.join(self.outdir(job), DONE_FILE[EVALUATION]))["metrics"]
        except METRICS_LOST as e:
            log.warning("%s: metrics unreadable, not a best-checkpoint candidate: %s", job.key, e)
            metrics = None
        except OSError as e:  # there but unreadable now (EIO, EACCES): left out this time, read again next time
            log.warning("%s: metrics cannot be read now, not a best-checkpoint candidate this time: %s", job.key, e)
            self.missed_now = True
            return None
        self.metrics_seen[job.key] = (job.revision, metrics)
        return metrics

    def scores(self, rows: dict, benchmarks) -> dict[int, dict[str, dict]]:
        """best.choose's input: {iteration: {benchmark: metrics}} for these benchmarks."""
        out: dict[int, dict[str, dict]] = {}
        for it, benches in rows.items():
            for b in benchmarks:
                m = self.metrics_of(benches[b]) if b in benches else None
                if m is not None:
                    out.setdefault(it, {})[b] = m
        return out

    def update_best(self, run: str, rows: Optional[dict] = None) -> None:
        """Rank the run's checkpoints by its `best:` rule: keep the keep_best best snapshots (a dethroned one is
        released once its jobs are final) and rewrite results/<run>/best.json when the best changed."""
        rule = self.best_rules.get(run)
        if rule is None:
            return
        rows = self.results_by_iteration(run) if rows is None else rows
        self.missed_now = False
        kept = B.kept(rule, self.scores(rows, rule.benchmarks))
        if self.missed_now:  # a ranking without a candidate that is only unreadable for now could release the best
            log.warning("run %s: best checkpoint not ranked again now (a result could not be read); kept as it was",
                        run)
            return
        before = [r.iteration for r in self.best.get(run, [])]
        self.best[run] = kept
        if [r.iteration for r in kept] != before and kept:
            log.info("run %s: best checkpoint %d (%s = %.4g)%s", run, kept[0].iteration, rule.describe(),
                     kept[0].score, f"; keeping {', '.join(str(r.iteration) for r in kept)}" if rule.keep > 1 else "")
        why = {r.iteration: "best checkpoint" if i == 0 else f"keep_best #{i + 1}" for i, r in enumerate(kept)}
        for iteration in self.keeper.keep(run, why):
            self.release_if_finished(run, iteration)
        try:
            self.write_best(run, rule, kept, rows)
        except OSError as e:  # a full disk: the snapshots are kept all the same; written at the next ranking
            log.warning("run %s: could not write best.json: %s", run, e)

    def write_best(self, run: str, rule: B.BestRule, kept: list, rows: dict) -> None:
        """<cache_dir>/results/<run>/best.json, atomically, when its content changes (removed when no checkpoint
        is a candidate any more, e.g. after `invalidate`)."""
        path = os.path.join(self.cfg.cache_dir, "results", run, B.BEST_FILE)
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if not kept:
            if old is not None:
                os.remove(path)
            return

        def entry(r: B.Ranked) -> dict:
            job = next(iter(rows[r.iteration].values()))
            snap = self.ledger.snapshot(run, r.iteration)
            pinned = snap["path"] if snap is not None and snap["state"] == L.PINNED else None
            return {"iteration": r.iteration, "score": r.score, "metrics": r.metrics, "checkpoint": job.path,
                    "snapshot": pinned}

        entries = [entry(r) for r in kept]
        doc = {"schema_version": B.BEST_SCHEMA_VERSION, "run": run, "rule": rule.describe(), "mode": rule.mode,
               "keep_best": rule.keep, **entries[0], "kept": entries}
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "updated_at"} == doc:
            return
        doc["updated_at"] = time.time()
        write_json_atomic(path, doc)

    def best_summary(self, run: str) -> Optional[dict]:
        """ResultRecord.best: the run's best checkpoint now, {"iteration", "score", "rule"}; None without one."""
        kept = self.best.get(run)
        return B.summary(self.best_rules[run], kept[0]) if kept else None

    def comparison_of(self, job: L.Job) -> Optional[dict]:
        """ResultRecord.comparison: the result's compare.json, None when it has none (or it is unreadable)."""
        path = os.path.join(self.outdir(job), COMPARE)
        if not os.path.exists(path):
            return None
        try:
            doc = read_json(path)
        except (OSError, ValueError) as e:
            log.warning("%s: %s unreadable, recorded without its comparison: %s", job.key, path, e)
            return None
        return doc if isinstance(doc, dict) and doc.get("revision", job.revision) == job.revision else None

    # ---- regression alerts (alerts.py decides; the ledger remembers; notify.py's channels deliver) --------------
    def check_alerts(self, job: L.Job, comparison: Optional[dict]) -> None:
        """Check the alert rules of a scored result (`comparison`: its compare.json document, None when none was
        made). A rule broken fires once per (rule, checkpoint); a rule the result keeps closes that rule's open
        alerts of this run and benchmark up to this iteration. Never raises (but for an unwritable ledger)."""
        rules = [r for r in self.alert_rules if r.applies_to(job.benchmark)]
        if not rules:
            return
        try:
            m = read_metrics(os.path.join(self.outdir(job), DONE_FILE[EVALUATION]))
            result = A.Result(job.run, job.iteration, job.benchmark, m["metrics"], m.get("n"))
            checks = A.evaluate(rules, result, comparison, self.alert_history(job, rules))
            self.apply_alert_checks(job.key, checks + A.evaluate_success(rules, job.benchmark))
        except L.LedgerUnavailable:
            raise
        except (OSError, ValueError) as e:
            log.warning("%s: alert rules not checked: %s", job.key, e)
        except Exception:  # a bug in a rule must not keep the result from its sinks
            log.exception("%s: checking the alert rules failed", job.key)

    def alert_history(self, job: L.Job, rules: list) -> list[tuple[int, dict]]:
        """(iteration, metrics) of the run+benchmark's results before this one, as many as a stuck rule looks at."""
        k = max((r.count for r in rules if r.kind == A.STUCK), default=0)
        out = []
        for j in self.ledger.results_before(job.run, job.benchmark, job.iteration, max(0, k - 1)):
            try:
                out.append((j.iteration, read_metrics(os.path.join(self.outdir(j), DONE_FILE[EVALUATION]))["metrics"]))
            except (OSError, ValueError):
                out.append((j.iteration, {}))  # unreadable: counts as not stuck, never as a value
        return out

    def check_failure_alerts(self, key: L.JobKey) -> None:
        rules = [r for r in self.alert_rules if r.kind == A.FAILED and r.applies_to(key.benchmark)]
        job = self.ledger.get(key) if rules else None
        if job is not None:
            self.apply_alert_checks(key, A.evaluate_failure(rules, *key, job.attempts, job.last_error))

    def apply_alert_checks(self, key: L.JobKey, checks: list) -> None:
        for c in checks:
            if c.outcome == A.FIRE:
                alert = self.ledger.add_alert(c.rule.id, key, c.text, self.alerts_out.names)
                if alert is not None:
                    log.warning("ALERT #%d %s", alert, c.text)
            elif c.outcome == A.PASS:
                for alert in self.ledger.close_alerts(c.rule.id, key.run, key.benchmark, key.iteration,
                                                      f"iteration {key.iteration} passes"):
                    log.info("alert #%d closed: %s at iteration %d keeps rule %s (%s)", alert, key.run,
                             key.iteration, c.rule.id, c.text)

    def deliver_alerts(self) -> None:
        """Carry pending alerts to their channels; a failed delivery is retried with backoff, never given up."""
        for reply in self.alerts_out.collect():
            alert = reply.key[0]
            if reply.error is None:
                self.ledger.alert_delivered(alert, reply.sink)
                log.info("alert #%d: delivered to %s", alert, reply.sink)
                continue
            if reply.late:
                continue  # counted as failed when it ran past the timeout
            failures = self.ledger.alert_failures(alert, reply.sink) + 1
            delay = self.alert_policy.delay(failures)
            self.ledger.alert_delivery_failed(alert, reply.sink, time.time() + delay, reply.error)
            log.warning("alert #%d: %s: %s (failure %d); tried again in %gs", alert, reply.sink, reply.error,
                        failures, delay)
        idle = [c for c in self.alerts_out.names if self.alerts_out.idle(c)]
        offered: set[str] = set()
        for row, channel in self.ledger.alert_deliveries_due(idle, time.time(), limit=len(idle) * 4):
            if channel not in offered and self.alerts_out.offer((row["id"],), channel,
                                                                Notice.from_row(row, self.cfg.project_name)):
                offered.add(channel)

    # ---- restart recovery and shutdown (the daemon's recover / shutdown call these at their places) ---------------
    def rank_best(self) -> None:
        """Rank every run's checkpoints by its `best:` rule (update_best), at start."""
        for run in self.best_rules:
            try:
                self.update_best(run)
            except L.LedgerUnavailable:
                raise
            except Exception:  # a bug here must not keep the daemon from starting
                log.exception("run %s: ranking the best checkpoint failed", run)

    def recover_failure_alerts(self, wanted: Callable[[L.Job], bool]) -> None:
        """At start: failure alerts of `failed` rows the daemon wants (`wanted`) that a kill left unchecked."""
        if any(r.kind == A.FAILED for r in self.alert_rules):
            # a kill between a failure and its alert (add_alert fires once per rule and checkpoint; a failed row
            # of a run or benchmark not configured now is left alone)
            for j in self.ledger.jobs([L.FAILED]):
                if wanted(j):
                    self.check_failure_alerts(j.key)

    def stop_comparisons(self) -> None:
        self.compare_pool.shutdown(wait=False, cancel_futures=True)  # one not written is redone at the next start

    def close_alerts(self) -> None:
        self.alerts_out.close(wait_s=2.0)  # an alert not delivered yet stays pending in the ledger
