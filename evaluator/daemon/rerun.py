"""`tools/evaluator.py rerun | invalidate`: re-evaluate results with today's settings, or withdraw them.

    rerun      --config CFG [--run R] [--iterations 1000-3000,5000] [--benchmark B ...] [--dry-run]
    invalidate --config CFG [--run R] [--iterations ...] [--benchmark B ...] [--dry-run]

`rerun` puts each selected ledger row back to pending as a new *revision* (its outputs move to
`<result dir>/superseded/rev<N>/`, nothing is deleted), so the daemon -- running now, or at its next start --
evaluates it again with the current settings and records it to every sink once more; the sinks tell a re-run
from a result offered twice by the revision (docs/recording.md says what each sink shows). A row whose
checkpoint is no longer on disk (and no snapshot holds it) is not touched, and the command says so.
`invalidate` moves each selected result to `invalidated`: the local history and plots drop it, the daemon never
runs it again, and a later `rerun` brings it back. W&B and MLflow keep what they were sent (their history
cannot be edited); see docs/recording.md.

Rows that are running or being recorded right now are left alone (try again when they are done). Each row is done
whole or left as it was: its outputs are moved aside inside the ledger transaction that changes it (no daemon
starts the row meanwhile), and put back if that transaction cannot be committed.
A result folder that cannot be written (permissions, `chattr +i`, a read-only mount, a full disk) leaves its row
as it was with one line naming the folder, and the other rows go on. Both commands need a selection (at least one
of --run, --iterations, --benchmark) and exit 1 when a selected row could not be handled, 2 on a usage error or a
ledger that cannot be written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import time
from typing import Optional

from evaluator.common.contracts import OUTPUT_FILES, result_dir
from evaluator.common.errors import EvaluatorError, did_you_mean
from evaluator.daemon import ledger as L
from evaluator.daemon import policy as P
from evaluator.daemon.config import load_config

SUPERSEDED = "superseded"
# what a result folder holds that a new revision must not inherit (kept under superseded/rev<N>/)
RESULT_FILES = tuple(dict.fromkeys(f for files in OUTPUT_FILES.values() for f in files))


def build_parser(command: str) -> argparse.ArgumentParser:
    what = {"rerun": "Re-evaluate recorded results with the current settings (a new revision per result).",
            "invalidate": "Withdraw results: the local history and plots drop them and the daemon never re-runs "
                          "them (`rerun` brings them back)."}[command]
    p = argparse.ArgumentParser(prog=f"evaluator.py {command}", description=what)
    p.add_argument("--config", required=True)
    p.add_argument("--run", action="append", default=None, help="a run name (repeatable); default: every run")
    p.add_argument("--iterations", default=None,
                   help="iterations and ranges, e.g. 1000-3000,5000 (inclusive); default: every iteration")
    p.add_argument("--benchmark", action="append", default=None,
                   help="a benchmark name (repeatable); default: every benchmark")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    return p


def parse_iterations(spec: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """'1000-3000,5000' -> [(1000, 3000), (5000, 5000)]; None for no filter."""
    if spec is None:
        return None
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise EvaluatorError(f"--iterations: expected iterations and ranges like 1000-3000,5000, got {part!r}") \
                from None
        if a < 0 or b < a:
            raise EvaluatorError(f"--iterations: expected a range low-high with 0 <= low <= high, got {part!r}")
        ranges.append((a, b))
    return ranges


def _check_names(flag: str, given: Optional[list[str]], known: set[str]) -> None:
    for name in given or []:
        if name not in known:
            raise EvaluatorError(f"{flag} {name!r}: not in the config or the ledger (known: "
                                 f"{', '.join(sorted(known)) or 'none'}){did_you_mean(name, known)}")


def select(jobs: list[L.Job], runs: Optional[list[str]], iterations: Optional[list[tuple[int, int]]],
           benchmarks: Optional[list[str]]) -> list[L.Job]:
    return [j for j in jobs if (runs is None or j.run in runs) and (benchmarks is None or j.benchmark in benchmarks)
            and (iterations is None or any(a <= j.iteration <= b for a, b in iterations))]


def checkpoint_gone(led: L.Ledger, job: L.Job) -> Optional[str]:
    """Why a rerun cannot read the checkpoint any more, or None (the original or a pinned snapshot is there)."""
    snap = led.snapshot(job.run, job.iteration)
    if snap is not None and snap["state"] == L.PINNED and snap["path"] and os.path.exists(snap["path"]):
        return None
    if os.path.exists(job.path):
        return None
    return f"checkpoint no longer on disk ({job.path}) and no snapshot holds it"


class ResultFilesError(OSError):
    """A result folder's files could not be moved: the message says which folder, the error, the state the row is
    left in and what to do. An OSError, so a caller that catches those (the daemon's restart_siblings) still does."""


def set_aside(out: str, revision: int) -> list[str]:
    """Move a result folder's outputs to superseded/rev<revision>/ (a rerun or an invalidation keeps them): all of
    them or, on an OSError, none (those already moved go back, and the error is raised)."""
    moved: list[str] = []
    dest = os.path.join(out, SUPERSEDED, f"rev{revision}")
    try:
        for name in RESULT_FILES:
            src = os.path.join(out, name)
            if os.path.exists(src):
                os.makedirs(dest, exist_ok=True)
                os.replace(src, os.path.join(dest, name))
                moved.append(name)
    except OSError as e:
        try:
            restore(out, revision, moved)
        except OSError as back:
            raise ResultFilesError(
                f"cannot move its outputs to {dest} ({e}), and {', '.join(moved)} could not be put back from there "
                f"({back}): move them back into {out} by hand") from None
        raise
    return moved


def restore(out: str, revision: int, moved: list[str]) -> None:
    src = os.path.join(out, SUPERSEDED, f"rev{revision}")
    for name in moved:
        os.replace(os.path.join(src, name), os.path.join(out, name))
    for folder in (src, os.path.dirname(src)):  # made by set_aside for this revision: gone again if now empty
        try:
            os.rmdir(folder)
        except OSError:
            break


def warn_daemon_settings(cfg, jobs: list[L.Job]) -> None:
    """A running daemon re-runs with the settings it started with: say so when the config has changed since."""
    from evaluator.daemon import heartbeat as H
    from evaluator.daemon.daemon import assess

    try:
        state = H.read_state(cfg.cache_dir)
    except (OSError, ValueError):
        return  # a damaged daemon.json: nothing known about a running daemon (status says what is wrong with it)
    if H.liveness(state, time.time(), H.pid_exists(state))[0] != H.ALIVE:
        return
    running = state.get("fingerprints") or {}
    for bench in {b.name: b for b in cfg.benchmarks if b.name in {j.benchmark for j in jobs}}.values():
        now = assess(bench, cfg.seed, None).fingerprint
        if running.get(bench.name) and now and running[bench.name] != now:
            print(f"note: the running daemon (pid {state.get('pid')}) uses the settings of benchmark {bench.name} it "
                  f"started with, not the config's current ones: restart it to re-run with those")


def main(command: str, argv: list[str]) -> int:
    args = build_parser(command).parse_args(argv)
    if not (args.run or args.iterations or args.benchmark):
        raise EvaluatorError(f"{command}: say what to {command}: --run, --iterations and/or --benchmark "
                             f"(all three may be combined)")
    cfg = load_config(args.config, require_datasets=False, check_data=False)
    iterations = parse_iterations(args.iterations)
    if not os.path.exists(os.path.join(cfg.cache_dir, "ledger.sqlite3")):
        raise EvaluatorError(f"no ledger in cache_dir {cfg.cache_dir}: nothing has been evaluated with this config")
    try:
        led = L.Ledger(cfg.cache_dir, readonly=args.dry_run)
    except L.LedgerUnavailable as e:
        raise EvaluatorError(str(e)) from None
    try:
        try:
            jobs = led.jobs()
        except (L.LedgerUnavailable, sqlite3.Error) as e:
            raise EvaluatorError(f"cannot read the ledger in {cfg.cache_dir}: {e}") from None
        from evaluator.daemon.build import resolve_runs

        try:
            specs = {r.name: r for r in resolve_runs(cfg)}
        except EvaluatorError:
            specs = {}
        configured = set(specs)
        benchmarks = {b.name for b in cfg.benchmarks}
        _check_names("--run", args.run, configured | {j.run for j in jobs})
        _check_names("--benchmark", args.benchmark, {b.name for b in cfg.benchmarks} | {j.benchmark for j in jobs})
        chosen = select(jobs, args.run, iterations, args.benchmark)
        if not chosen:
            print(f"{command}: no ledger rows match (nothing evaluated there yet)")
            return 1
        done, problems, gone_rows = 0, 0, 0
        scans: dict[str, dict] = {}
        for job in chosen:
            moved_to = None
            if command == "rerun" and checkpoint_gone(led, job) and job.run in specs:
                moved_to = found_now(cfg, specs[job.run], job.iteration, scans)  # the run folder moved?
            why = refusal(command, led, job if moved_to is None else dataclasses.replace(job, path=moved_to))
            if why is None and command == "rerun" and not P.wanted(specs, benchmarks, job.run, job.benchmark):
                why = ("not configured now (the run or benchmark left the config): the daemon would never run it", True)
            if why is not None:
                problems += why[1]
                gone_rows += why[0].startswith("checkpoint no longer on disk")
                print(f"  {str(job.key):<40} {job.state:<11} {why[0]}")
                continue
            if args.dry_run:
                print(f"  {str(job.key):<40} {job.state:<11} would be {'re-run' if command == 'rerun' else 'invalidated'}")
                done += 1
                continue
            try:
                apply_one(command, cfg.cache_dir, led, job, cfg.recorder.plots, path=moved_to)
            except L.LedgerConflict:  # a running daemon moved the row since we looked: nothing was changed
                problems += 1
                print(f"  {str(job.key):<40} {'?':<11} changed state meanwhile (a running daemon): try again")
                continue
            except L.LedgerUnavailable as e:  # locked too long, disk full, read-only: this row is as it was
                raise EvaluatorError(f"{e}; {job.key} left as it was ({done} row(s) done before it): try again")
            except ResultFilesError as e:  # this row's folder refused; the other rows go on
                problems += 1
                print(f"  {str(job.key):<40} {job.state:<11} {e}")
                continue
            done += 1
            print(f"  {str(job.key):<40} {job.state:<11} -> "
                  f"{'pending (revision ' + str(job.revision + (job.state != L.PENDING)) + ')' if command == 'rerun' else 'invalidated'}")
    finally:
        led.close()
    verb = {"rerun": "queued for re-evaluation", "invalidate": "invalidated"}[command]
    print(f"{command}: {done} of {len(chosen)} row(s) {'would be ' if args.dry_run else ''}{verb}"
          + (f"; {problems} could not be (see above)" if problems else "")
          + ("; a running daemon picks them up at its next rescan, else the next start does"
             if command == "rerun" and done and not args.dry_run else ""))
    if command == "rerun" and gone_rows:
        print(f"{gone_rows} result(s) cannot be re-evaluated (their checkpoints are gone): keep them as they are by "
              f"giving the changed benchmark a new name (a new curve), or withdraw them with `tools/evaluator.py "
              f"invalidate --config {args.config} ...`")
    if command == "rerun" and done and not args.dry_run:
        warn_daemon_settings(cfg, [j for j in chosen])
    return 1 if problems else 0


def refusal(command: str, led: L.Ledger, job: L.Job) -> Optional[tuple[str, bool]]:
    """(why this row is left alone, whether that is a problem) or None to go ahead."""
    allowed = L.RERUNNABLE if command == "rerun" else L.INVALIDATABLE
    if job.state == L.INVALIDATED and command == "invalidate":
        return None  # again: finishes what an interrupted invalidate left (moving outputs, the history line)
    if job.state == L.PENDING and command == "rerun":
        return ("not evaluated yet (pending): runs anyway", False)
    if job.state not in allowed:
        return (f"{job.state} right now: try again when it is done", True)
    if command == "rerun":
        gone = checkpoint_gone(led, job)
        if gone:
            return (gone, True)
    return None


def found_now(cfg, spec, iteration: int, scans: dict) -> Optional[str]:
    """Where the configured run's layout finds the checkpoint `iteration` now (its run folder may have
    moved since the row was written: the row's path is refreshed only for rows still to run), or None. One scan
    per run (`scans`)."""
    from evaluator.daemon.build import make_layouts

    if spec.name not in scans:
        try:
            found = make_layouts(cfg, [spec])[spec.name].scan()
        except OSError:
            found = []
        # complete, or complete but for a second look at its files (one scan cannot see them unchanged): it was
        # evaluated once already; the daemon pins it before anything reads it
        scans[spec.name] = {c.iteration: c.path for c in found
                            if not c.invalid and (c.complete or c.reason == "settling")}
    return scans[spec.name].get(iteration)


def apply_one(command: str, cache_dir: str, led: L.Ledger, job: L.Job, plots: bool = True,
              path: Optional[str] = None) -> None:
    """Re-run or invalidate one row, whole or not at all; ResultFilesError (an OSError) when its files refuse.

    `path`: where the checkpoint is now, when its run folder moved since the row was written."""
    out = result_dir(cache_dir, job.run, job.iteration, job.benchmark)
    moved: list[str] = []

    def move_aside() -> None:  # inside the ledger's transaction: no daemon starts the row meanwhile
        moved.extend(set_aside(out, job.revision))

    try:
        if command == "rerun":
            # fingerprint None: the daemon stamps today's settings when the inference starts
            led.restart(job.key, f"rerun requested at {time.strftime('%Y-%m-%d %H:%M:%S')}", then=move_aside,
                        fingerprint=None, **({"path": path} if path else {}))
        elif job.state != L.INVALIDATED:
            led.transition(job.key, L.INVALIDATED, "invalidated by the operator", then=move_aside,
                           next_retry_at=None)
        else:
            move_aside()  # finishes what an interrupted invalidate left
    except ResultFilesError:
        raise
    except L.LedgerUnavailable as e:  # the commit failed after the files moved: they go back
        try:
            restore(out, job.revision, moved)
        except OSError as back:
            raise ResultFilesError(
                f"left as it was in the ledger ({e}), but its outputs could not be put back from "
                f"{os.path.join(out, SUPERSEDED, f'rev{job.revision}')} ({back}): move them back into {out} "
                f"by hand") from None
        raise
    except OSError as e:  # set_aside moved nothing (or put it back) and the transaction rolled back
        raise ResultFilesError(
            f"left as it was: cannot move its outputs to {os.path.join(out, SUPERSEDED, f'rev{job.revision}')} "
            f"({e}): make {out} writable (permissions, chattr -i, a read-only mount, a full disk) and run "
            f"`{command}` again") from None
    if command == "rerun":
        snap = led.snapshot(job.run, job.iteration)
        if snap is not None and snap["state"] in (L.RELEASED, L.VANISHED):
            led.drop_snapshot(job.run, job.iteration)  # pinned afresh, like a new checkpoint
        return
    try:
        withdraw_local(cache_dir, job, plots)
    except OSError as e:  # the ledger cannot go back from invalidated; running invalidate again finishes it
        raise ResultFilesError(
            f"invalidated in the ledger, but the local history still shows it ({e}): make "
            f"{os.path.join(cache_dir, 'results', job.run)} writable and run `invalidate` again to finish") from None


def withdraw_local(cache_dir: str, job: L.Job, plots: bool = True) -> None:
    """Drop an invalidated result from the local sink's history.jsonl (and so from curves.png / summary.md)."""
    from recorder.sinks import LocalHistorySink

    sink = LocalHistorySink(cache_dir, plots=plots)
    if sink.withdraw(job.run, job.iteration, job.benchmark):
        sink.flush()  # curves.png and summary.md without it
