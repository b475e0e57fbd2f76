"""The W&B sink, read back from the real offline run files wandb 0.31 writes (no mocks, no network).

`wandb_runs()` below is the test's own reader of the transaction log (LevelDB-style blocks of CRC-checked
chunks holding protobuf Records, see ../shared/notes/wandb-offline.md), written independently of the
sink's reader, so the sink cannot agree with itself by accident.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import zlib

import pytest

from recorder.sinks import MlflowSettings, RecorderSettings, ResultRecord, WandbSettings
from recorder.wandb_sink import WandbSink, resolve_mode, run_id


# ---- the test's reader -----------------------------------------------------------------------
def _records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad chunk at {pos}"
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def wandb_runs(wandb_dir):
    """Every local session under <wandb_dir>/wandb: {"id", "project", "name", "rows", "metrics", "config"}."""
    out = []
    for path in sorted(glob.glob(os.path.join(str(wandb_dir), "wandb", "*run-*", "run-*.wandb"))):
        if os.path.islink(os.path.dirname(path)):
            continue
        run = {"path": path, "rows": [], "metrics": [], "config": {}}
        for rec in _records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.update(id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name,
                           start=rec.run.start_time.ToMicroseconds())
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                run["rows"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                    for i in rec.history.item})
            elif kind == "metric":
                run["metrics"].append((rec.metric.name or rec.metric.glob_name, rec.metric.step_metric))
        out.append(run)
    return sorted(out, key=lambda r: r.get("start", 0))  # session order (folder names tie within a second)


def history(wandb_dir, run_id_=None):
    """(iteration, {key: value}) of every history row, in the order the sessions wrote them."""
    return [r for run in wandb_runs(wandb_dir) if run_id_ in (None, run["id"]) for r in run["rows"]]


# ---- helpers ---------------------------------------------------------------------------------
def settings(tmp_path, **wandb) -> RecorderSettings:
    w = WandbSettings(project="proj", mode="offline", dir=str(tmp_path / "wandb"), **wandb)
    return RecorderSettings(cache_dir=str(tmp_path), project="proj", wandb=w,
                            mlflow=MlflowSettings(tracking_uri="unused", experiment="unused"),
                            run_config={"model_name": "tiny", "token_per_iteration": 0.002})


def result(tmp_path, it, bench="qa", value=None, predictions=None) -> ResultRecord:
    out = tmp_path / "results" / "tiny" / f"iter_{it:07d}" / bench
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"acc": it / 10000 if value is None else value, "f1": 0.5}
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    if predictions is not None:
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return ResultRecord(run="tiny", iteration=it, benchmark=bench, metrics=metrics, tokens_b=it * 0.002,
                        stderr={"acc": 0.01}, metrics_path=str(out / "metrics.json"), versions={"aac": "1.0"})


# ---- tests -----------------------------------------------------------------------------------
def test_out_of_order_checkpoints_and_a_restarted_sink_append_to_one_run(tmp_path):
    WandbSink(settings(tmp_path)).record(result(tmp_path, 2000))
    # a new sink instance knows only what is on disk, like a restarted daemon
    restarted = WandbSink(settings(tmp_path))
    restarted.record(result(tmp_path, 1000))
    restarted.record(result(tmp_path, 3000))
    runs = wandb_runs(tmp_path / "wandb")
    assert {r["id"] for r in runs} == {run_id("proj", "tiny")}, "one deterministic run id for every session"
    assert {r["project"] for r in runs} == {"proj"} and {r["name"] for r in runs} == {"tiny"}
    rows = history(tmp_path / "wandb")
    assert [(r["iteration"], r["qa/acc"], r["tokens_b"]) for r in rows] == [
        (2000, 0.2, 4.0), (1000, 0.1, 2.0), (3000, 0.3, 6.0)]
    # offline segments get steps that continue each other, so `wandb sync` can append them in order
    assert [r["_step"] for r in rows] == [0, 1, 2]
    for run in runs:  # every session declares iteration as the x axis of the benchmark's metrics
        assert ("iteration", "") in run["metrics"] and ("tokens_b", "") in run["metrics"]
        assert ("qa/*", "iteration") in run["metrics"]


def test_a_result_offered_again_after_a_crash_is_not_logged_twice(tmp_path):
    WandbSink(settings(tmp_path)).record(result(tmp_path, 1000))
    # the daemon died after the sink accepted but before the ledger noted it: a new process offers it again
    WandbSink(settings(tmp_path)).record(result(tmp_path, 1000))
    sink = WandbSink(settings(tmp_path))
    sink.record(result(tmp_path, 1000, bench="mc"))  # same iteration, other benchmark: a different result
    sink.record(result(tmp_path, 1000, bench="mc"))
    rows = history(tmp_path / "wandb")
    assert [(r["iteration"], "qa/acc" in r, "mc/acc" in r) for r in rows] == [(1000, True, False), (1000, False, True)]


def test_each_checkpoint_gets_a_summary_table_and_sample_predictions(tmp_path):
    preds = [{"sample_id": f"s{i}", "request_messages": [{"role": "user", "content": [
        {"type": "text", "text": f"question {i}"}, {"type": "audio", "path": "a.wav"}]}],
        "response": {"text": f"answer {i}"}, "status": "ok"} for i in range(8)]
    WandbSink(settings(tmp_path, sample_predictions=3)).record(result(tmp_path, 1000, predictions=preds))
    row = history(tmp_path / "wandb")[0]
    assert row["qa/summary_table/_type"] == "table-file" and row["qa/samples/_type"] == "table-file"
    run_dir = os.path.dirname(wandb_runs(tmp_path / "wandb")[0]["path"])
    summary = json.loads(open(os.path.join(run_dir, "files", row["qa/summary_table/path"])).read())
    assert summary["columns"][:6] == ["iteration", "tokens_b", "category", "metric", "value", "stderr"]
    assert [r[3:6] for r in summary["data"]] == [["acc", 0.1, 0.01], ["f1", 0.5, None]]
    samples = json.loads(open(os.path.join(run_dir, "files", row["qa/samples/path"])).read())
    assert samples["columns"] == ["iteration", "sample_id", "input", "prediction", "status"]
    assert samples["data"] == [[1000, f"s{i}", f"question {i}", f"answer {i}", "ok"] for i in range(3)]


def test_summary_only_logs_the_metrics_without_tables(tmp_path):
    s = settings(tmp_path)
    s.summary_only = True
    WandbSink(s).record(result(tmp_path, 1000, predictions=[{"sample_id": "x", "response": {"text": "y"}}]))
    row = history(tmp_path / "wandb")[0]
    assert row["qa/acc"] == 0.1 and not [k for k in row if "table" in k or "samples" in k]


def test_run_config_from_a_daemon_config_names_the_model_and_holds_no_secrets(tmp_path):
    from evaluator.daemon.config import AutoEvalConfig
    from evaluator.daemon.sink_setup import settings_from_config

    cfg = AutoEvalConfig.model_validate({
        "project_name": "proj", "model_name": "tiny", "cache_dir": str(tmp_path),
        "megatron": {"token_per_iteration": 0.002},
        "wandb": {"mode": "offline", "dir": str(tmp_path / "wandb")},
        "benchmarks": [{"name": "judge", "type": "command",
                        "inference": "OPENAI_API_KEY=sk-live1234567890 {python} judge.py --api-key=abc123 --tokens {tokens_b}",
                        "evaluation": "curl -H 'Authorization: Bearer tok987' x"}],
        "gpt_evaluation": {"openai_api_key": "sk-secret000000"}})
    WandbSink(settings_from_config(cfg)).record(result(tmp_path, 1000))
    config = wandb_runs(tmp_path / "wandb")[0]["config"]
    assert config["model_name"] == "tiny" and config["token_per_iteration"] == 0.002
    assert config["benchmarks"][0]["name"] == "judge" and "--tokens {tokens_b}" in config["benchmarks"][0]["inference"]
    assert config["versions"]["wandb"] and config["versions"]["python"]
    written = b"".join(open(p, "rb").read() for p in glob.glob(str(tmp_path / "wandb" / "**" / "*"), recursive=True)
                       if os.path.isfile(p))
    for secret in (b"sk-live1234567890", b"abc123", b"tok987", b"sk-secret000000"):
        assert secret not in written, secret


def test_auto_mode_is_offline_without_an_api_key_and_online_with_one():
    assert resolve_mode("auto", {}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_mode("offline", {"WANDB_API_KEY": "x" * 40}) == "offline"


def test_run_ids_are_deterministic_and_differ_per_project_and_model():
    assert run_id("proj", "llama-1b") == run_id("proj", "llama-1b")
    assert len({run_id("proj", "llama-1b"), run_id("proj2", "llama-1b"), run_id("proj", "llama-7b")}) == 3


def test_an_unwritable_wandb_folder_fails_the_record_until_it_is_fixed(tmp_path):
    """Fault injected for real: the W&B folder path is a regular file, so nothing can be written there
    (W&B itself would silently fall back to /tmp; the sink must refuse instead)."""
    s = settings(tmp_path)
    (tmp_path / "wandb").write_text("in the way")
    sink = WandbSink(s)
    for _ in range(2):
        with pytest.raises(OSError):
            sink.record(result(tmp_path, 1000))
    (tmp_path / "wandb").unlink()
    sink.record(result(tmp_path, 1000))
    assert [r["iteration"] for r in history(tmp_path / "wandb")] == [1000]
    assert not glob.glob("/tmp/wandb/*" + run_id("proj", "tiny") + "*")


def test_a_torn_tail_of_the_log_is_ignored_and_the_rows_before_it_still_count(tmp_path):
    from recorder.wandb_sink import read_run_log

    WandbSink(settings(tmp_path)).record(result(tmp_path, 1000))
    torn = wandb_runs(tmp_path / "wandb")[0]["path"]
    with open(torn, "ab") as f:  # a crash mid-append: a chunk header promising more bytes than follow
        f.write(struct.pack("<IHB", 0, 500, 1) + b"partial")
    assert [r["iteration"] for r in read_run_log(torn).rows] == [1000]
    restarted = WandbSink(settings(tmp_path))
    restarted.record(result(tmp_path, 1000))  # still known as logged: skipped
    restarted.record(result(tmp_path, 2000))
    os.remove(torn)  # the test's strict reader refuses torn files; what is left is what the restart wrote
    assert [(r["iteration"], r["_step"]) for r in history(tmp_path / "wandb")] == [(2000, 1)]


# ---- several writers, bounded sessions, no leftovers ------------------------------------------
def sessions(wandb_dir):
    """The session folders W&B left under <wandb_dir>/wandb (the latest-run link skipped)."""
    return sorted(p for p in glob.glob(os.path.join(str(wandb_dir), "wandb", "*run-*")) if not os.path.islink(p))


def unique_rows(wandb_dir):
    """(iteration, benchmark, _step) of every history row, as `wandb sync` would upload them."""
    return sorted((r["iteration"], next(k for k in r if "/" in k).split("/")[0], r["_step"]) for r in history(wandb_dir))


RECORDER_SCRIPT = """
import json, os, sys, signal, pathlib
sys.path[:0] = [{root!r}, {tests!r}]
from test_recorder_wandb import settings, result
from recorder.wandb_sink import WandbSink
tmp = pathlib.Path({tmp!r})
sink = WandbSink(settings(tmp))
for it, bench, *revision in json.loads(sys.argv[1]):
    r = result(tmp, it, bench)
    if revision:  # a rerun: new values, a new revision
        r.metrics, r.revision, r.fingerprint = {{"acc": 0.25, "f1": 0.5}}, revision[0], "cd34"
    sink.record(r)
if sys.argv[2:] == ["kill"]:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def recorder_process(tmp_path, pairs, *extra, env=None):
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = RECORDER_SCRIPT.format(root=os.path.dirname(here), tests=here, tmp=str(tmp_path))
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(pairs), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_writing_one_run_never_log_a_result_twice_or_reuse_a_step(tmp_path):
    """The daemon and a `wandb_writer` backfill beside it, both offered the same results at once."""
    pairs = [[it, bench] for it in (1000, 2000, 3000) for bench in ("qa", "mc")]
    procs = [recorder_process(tmp_path, pairs), recorder_process(tmp_path, pairs[::-1])]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rows = unique_rows(tmp_path / "wandb")
    assert sorted((it, b) for it, b, _ in rows) == sorted(tuple(p) for p in pairs), "each result exactly once"
    assert sorted(step for _, _, step in rows) == list(range(6)), "no step used twice"


def test_offline_sessions_of_a_run_are_bounded_and_a_merge_keeps_every_row_step_and_table(tmp_path):
    sink = WandbSink(settings(tmp_path), max_sessions=3)
    for i, it in enumerate((5000, 1000, 4000, 2000, 3000, 6000, 7000)):
        sink.record(result(tmp_path, it))
        assert len(sessions(tmp_path / "wandb")) <= 3, f"after {i + 1} results: {sessions(tmp_path / 'wandb')}"
    rows = unique_rows(tmp_path / "wandb")
    assert rows == sorted([(5000, "qa", 0), (1000, "qa", 1), (4000, "qa", 2), (2000, "qa", 3), (3000, "qa", 4),
                           (6000, "qa", 5), (7000, "qa", 6)]), "every row once, with the step it first got"
    for run in wandb_runs(tmp_path / "wandb"):  # a carried-over table is a real table file in its new session
        for row in run["rows"]:
            table = json.load(open(os.path.join(os.path.dirname(run["path"]), "files", row["qa/summary_table/path"])))
            assert [r[3:5] for r in table["data"]][0] == ["acc", row["iteration"] / 10000]
    restarted = WandbSink(settings(tmp_path), max_sessions=3)
    restarted.record(result(tmp_path, 1000))  # known after the merge too
    assert len(unique_rows(tmp_path / "wandb")) == 7


def test_a_session_wandb_sync_already_uploaded_is_never_merged(tmp_path):
    sink = WandbSink(settings(tmp_path), max_sessions=2)
    sink.record(result(tmp_path, 1000))
    synced = wandb_runs(tmp_path / "wandb")[0]["path"]
    open(synced + ".synced", "w").close()  # what `wandb sync` leaves beside a log it uploaded
    for it in (2000, 3000, 4000):
        sink.record(result(tmp_path, it))
    assert os.path.exists(synced), "an uploaded session stays as it is"
    assert [r["iteration"] for r in wandb_runs(tmp_path / "wandb")[0]["rows"]] == [1000]
    assert 1000 not in [r["iteration"] for run in wandb_runs(tmp_path / "wandb")[1:] for r in run["rows"]], \
        "an uploaded row is never carried into a new session (sync would upload it twice)"
    assert [s for _, _, s in unique_rows(tmp_path / "wandb")] == [0, 1, 2, 3]


def merge_two_sessions_keeping_copies(tmp_path) -> tuple[dict, str]:
    """Two sessions, copied aside ({session: copy}), then merged into a third by the next record."""
    import shutil

    sink = WandbSink(settings(tmp_path), max_sessions=2)
    sink.record(result(tmp_path, 1000))
    sink.record(result(tmp_path, 2000))
    saved = {s: str(tmp_path / "saved" / os.path.basename(s)) for s in sessions(tmp_path / "wandb")}
    for s, copy in saved.items():
        shutil.copytree(s, copy)
    sink.record(result(tmp_path, 3000))  # merges the two sessions into a third
    (merged,) = sessions(tmp_path / "wandb")
    return saved, merged


def test_a_merge_cut_short_by_a_crash_is_finished_before_the_next_write(tmp_path):
    """Crash injected for real: the sessions a merge replaced are put back, with the merge's manifest,
    as a kill -9 between "merged session read back" and "old sessions deleted" leaves them."""
    import shutil

    from recorder.wandb_sink import MERGE_MANIFEST

    saved, merged = merge_two_sessions_keeping_copies(tmp_path)
    manifest = {"replaces": list(saved), "rows": 3}
    for s, copy in saved.items():
        shutil.copytree(copy, s)
    with open(os.path.join(merged, MERGE_MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert len(unique_rows(tmp_path / "wandb")) == 5, "the crash left rows twice on disk"
    WandbSink(settings(tmp_path), max_sessions=2).record(result(tmp_path, 4000))
    assert [(it, s) for it, _, s in unique_rows(tmp_path / "wandb")] == [(1000, 0), (2000, 1), (3000, 2), (4000, 3)]


def test_a_header_only_log_left_by_a_kill_is_removed_so_wandb_sync_can_run(tmp_path):
    """wandb-core writes the 7-byte header first; killed before its first block, a session holds only that,
    and one such file stops `wandb sync` of every run."""
    WandbSink(settings(tmp_path)).record(result(tmp_path, 1000))
    rid = run_id("proj", "tiny")
    dead = tmp_path / "wandb" / "wandb" / f"offline-run-20200101_000000-{rid}"
    dead.mkdir()
    (dead / f"run-{rid}.wandb").write_bytes(open(wandb_runs(tmp_path / "wandb")[0]["path"], "rb").read(7))
    WandbSink(settings(tmp_path)).record(result(tmp_path, 2000))
    assert not dead.exists()
    assert [(it, s) for it, _, s in unique_rows(tmp_path / "wandb")] == [(1000, 0), (2000, 1)]


def test_a_batch_of_ready_results_is_one_session(tmp_path):
    sink = WandbSink(settings(tmp_path))
    sink.record_batch([result(tmp_path, 1000), result(tmp_path, 1000, "mc"), result(tmp_path, 2000)])
    sink.record_batch([result(tmp_path, 2000), result(tmp_path, 3000)])  # 2000 is there: only 3000 is new
    assert len(sessions(tmp_path / "wandb")) == 2
    assert unique_rows(tmp_path / "wandb") == [(1000, "mc", 1), (1000, "qa", 0), (2000, "qa", 2), (3000, "qa", 3)]


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_recording_leaves_nothing_in_tmpdir_or_the_users_wandb_folders(tmp_path, end):
    """W&B stages every logged table in a temp folder (kept until exit, forever after kill -9) and copies it
    to ~/.local/share/wandb: both belong under the sink's own W&B folder."""
    tmpdir, home = tmp_path / "tmpdir", tmp_path / "home"
    tmpdir.mkdir()
    home.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), HOME=str(home), XDG_DATA_HOME=str(home / "data"))
    env = {k: v for k, v in env.items() if k not in ("WANDB_DATA_DIR", "WANDB_DIR")}
    proc = recorder_process(tmp_path, [[1000, "qa"], [2000, "qa"]], *([end] if end == "kill" else []), env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == (0 if end == "exit" else -9), err
    import time

    deadline = time.monotonic() + 10  # wandb-core notices its parent is gone and removes its socket folder
    while os.listdir(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.listdir(tmpdir) == []
    assert not (home / "data" / "wandb").exists() and not (home / ".local" / "share" / "wandb").exists()
    assert [r["iteration"] for r in history(tmp_path / "wandb")] == [1000, 2000]
    WandbSink(settings(tmp_path)).record(result(tmp_path, 3000))  # a later process removes a killed one's scratch
    assert os.listdir(tmp_path / "wandb" / "wandb" / ".tmp") == [str(os.getpid())]


def test_a_sink_called_from_a_worker_thread_records_and_installs_no_signal_handlers(tmp_path):
    import signal
    import threading

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH)}
    sink, errors = WandbSink(settings(tmp_path)), []

    def work():
        try:
            sink.record(result(tmp_path, 1000))
            sink.record(result(tmp_path, 2000))
        except BaseException as e:  # reported to the test below
            errors.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=120)
    assert not errors and not worker.is_alive()
    assert [r["iteration"] for r in history(tmp_path / "wandb")] == [1000, 2000]
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    sink.close()
    assert not os.path.exists(tmp_path / "wandb" / "wandb" / ".tmp" / str(os.getpid()))


def test_a_merge_that_raced_wandb_sync_is_undone_and_the_result_offered_again(tmp_path):
    """`wandb sync` marked a replaced session synced while the merge ran (its marker put back as it leaves it)."""
    import shutil

    from recorder.wandb_sink import MERGE_MANIFEST, finish_merges

    saved, merged = merge_two_sessions_keeping_copies(tmp_path)
    for s, copy in saved.items():
        shutil.copytree(copy, s)
    first = min(saved)
    open(os.path.join(first, f"run-{run_id('proj', 'tiny')}.wandb.synced"), "w").close()
    with open(os.path.join(merged, MERGE_MANIFEST), "w") as f:
        json.dump({"replaces": list(saved), "rows": 3}, f)
    finish_merges(str(tmp_path / "wandb"), run_id("proj", "tiny"))
    assert sessions(tmp_path / "wandb") == sorted(saved), "the merged copy is gone, the synced session stays"
    assert [it for it, _, _ in unique_rows(tmp_path / "wandb")] == [1000, 2000]


# ---- re-runs: a new revision of a logged (iteration, benchmark) ---------------------------------------
def rerun_of(tmp_path, it, value=0.25, revision=1, fingerprint="cd34") -> ResultRecord:
    r = result(tmp_path, it, value=value)
    r.revision, r.fingerprint = revision, fingerprint
    return r


def first_of(tmp_path, it, fingerprint="ab12") -> ResultRecord:
    r = result(tmp_path, it)
    r.fingerprint = fingerprint
    return r


def test_a_rerun_is_logged_once_at_its_iteration_with_its_revision_and_fingerprint(tmp_path):
    sink = WandbSink(settings(tmp_path))
    sink.record(first_of(tmp_path, 1000))
    sink.record(first_of(tmp_path, 2000))
    sink.record(rerun_of(tmp_path, 2000))
    rows = history(tmp_path / "wandb")
    assert [(r["iteration"], r["qa/acc"], r.get("qa/revision"), r["qa/fingerprint"], r["_step"]) for r in rows] == [
        (1000, 0.1, None, "ab12", 0), (2000, 0.2, None, "ab12", 1), (2000, 0.25, 1, "cd34", 2)]
    run_dir = os.path.dirname(wandb_runs(tmp_path / "wandb")[-1]["path"])
    table = json.load(open(os.path.join(run_dir, "files", rows[-1]["qa/summary_table/path"])))
    assert table["columns"][-2:] == ["revision", "fingerprint"]
    assert [r[3:5] + r[-2:] for r in table["data"]] == [["acc", 0.25, 1, "cd34"], ["f1", 0.5, 1, "cd34"]]


def test_a_rerun_offered_again_after_a_kill_or_an_older_revision_offered_late_logs_nothing(tmp_path):
    """Crash injected for real: a process records the first evaluation and its rerun, then is killed with
    SIGKILL before anything else (the ledger never noted the rerun as recorded)."""
    proc = recorder_process(tmp_path, [[2000, "qa"], [2000, "qa", 1]], "kill")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err
    restarted = WandbSink(settings(tmp_path))
    restarted.record(rerun_of(tmp_path, 2000))  # the same revision again
    restarted.record(result(tmp_path, 2000))  # revision 0, offered late
    assert [(r["iteration"], r["qa/acc"], r.get("qa/revision")) for r in history(tmp_path / "wandb")] == [
        (2000, 0.2, None), (2000, 0.25, 1)]
    restarted.record(rerun_of(tmp_path, 2000, value=0.3, revision=2))  # a second rerun is a new result again
    assert [r.get("qa/revision") for r in history(tmp_path / "wandb")] == [None, 1, 2]


def test_a_merge_carries_the_revision_so_a_rerun_is_still_known_afterwards(tmp_path):
    sink = WandbSink(settings(tmp_path), max_sessions=2)
    sink.record(result(tmp_path, 1000))
    sink.record(rerun_of(tmp_path, 1000))
    sink.record(result(tmp_path, 2000))  # merges the first two sessions into this one
    assert len(sessions(tmp_path / "wandb")) == 1
    WandbSink(settings(tmp_path), max_sessions=2).record(rerun_of(tmp_path, 1000))
    assert [(r["iteration"], r.get("qa/revision"), r["_step"]) for r in history(tmp_path / "wandb")] == [
        (1000, None, 0), (1000, 1, 1), (2000, None, 2)]


def test_a_metric_named_like_the_revision_series_is_refused_with_a_reason(tmp_path):
    r = result(tmp_path, 1000)
    r.metrics = {"acc": 0.1, "revision": 3.0}
    with pytest.raises(ValueError, match=r"metric name\(s\) \['revision'\] are reserved"):
        WandbSink(settings(tmp_path)).record(r)
    assert history(tmp_path / "wandb") == []
