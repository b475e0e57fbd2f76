"""The MLflow sink, read back from a real MLflow store (SQLite) with MLflow's own client."""
from __future__ import annotations

import json

import pytest

from recorder.mlflow_sink import MlflowSink
from recorder.sinks import RecorderSettings, ResultRecord, WandbSettings, mlflow_settings


def settings(tmp_path, tracking_uri=None) -> RecorderSettings:
    return RecorderSettings(cache_dir=str(tmp_path / "cache"), project="proj",
                            wandb=WandbSettings(project="proj"),
                            mlflow=mlflow_settings(str(tmp_path / "cache"), tracking_uri, "proj", str(tmp_path)),
                            run_config={"project_name": "proj", "token_per_iteration": 0.002,
                                        "benchmarks": [{"name": "qa", "type": "command"}]})


def result(tmp_path, it, bench="qa") -> ResultRecord:
    out = tmp_path / "cache" / "results" / "tiny" / f"iter_{it:07d}" / bench
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"acc": it / 10000, "f1": 0.5}
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "iteration": it}))
    return ResultRecord(run="tiny", iteration=it, benchmark=bench, metrics=metrics, tokens_b=it * 0.002,
                        metrics_path=str(out / "metrics.json"))


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def the_run(client, experiment="proj"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"one MLflow run per model, got {len(runs)}"
    return runs[0]


def test_metrics_are_logged_with_iteration_as_step_params_and_artifacts_alongside(tmp_path):
    s = settings(tmp_path)
    sink = MlflowSink(s)
    for it in (2000, 1000, 3000):  # out of order, as checkpoints may finish
        sink.record(result(tmp_path, it))
    assert s.mlflow.tracking_uri == "sqlite:///" + str(tmp_path / "cache" / "mlflow.db")
    client = client_for(s.mlflow.tracking_uri)
    run = the_run(client)
    assert run.info.run_name == "tiny"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "qa/acc"))
    assert history == [(1000, 0.1), (2000, 0.2), (3000, 0.3)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "tokens_b")) == [
        (1000, 2.0), (2000, 4.0), (3000, 6.0)]
    params = run.data.params
    assert params["model_name"] == "tiny" and params["token_per_iteration"] == "0.002"
    assert json.loads(params["benchmarks"]) == [{"name": "qa", "type": "command"}]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "iter_0002000/qa")]
    assert artifacts == ["iter_0002000/qa/metrics.json"]
    local = client.download_artifacts(run.info.run_id, "iter_0002000/qa/metrics.json", str(tmp_path / "dl"))
    assert json.load(open(local))["metrics"]["acc"] == 0.2
    assert (tmp_path / "cache" / "mlflow-artifacts").is_dir()  # artifacts stay under cache_dir, not ./mlruns


def test_a_result_offered_again_by_a_restarted_process_adds_nothing(tmp_path):
    s = settings(tmp_path)
    MlflowSink(s).record(result(tmp_path, 1000))
    # the daemon died after the sink accepted, before the ledger noted it: a fresh sink gets it again
    again = MlflowSink(s)
    again.record(result(tmp_path, 1000))
    again.record(result(tmp_path, 2000))
    client = client_for(s.mlflow.tracking_uri)
    run = the_run(client)
    for key in ("qa/acc", "qa/f1", "tokens_b"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1000, 2000], (key, steps)


def test_tracking_uri_is_configurable_and_a_bare_path_is_a_sqlite_file(tmp_path):
    s = settings(tmp_path, tracking_uri="elsewhere/store.db")
    assert s.mlflow.tracking_uri == "sqlite:///" + str(tmp_path / "elsewhere" / "store.db")
    MlflowSink(s).record(result(tmp_path, 1000))
    run = the_run(client_for(s.mlflow.tracking_uri))
    assert run.data.metrics["qa/acc"] == 0.1
    assert not (tmp_path / "cache" / "mlflow.db").exists()


def test_an_unreachable_store_fails_the_record_until_it_is_fixed(tmp_path):
    """Fault injected for real: the folder of the SQLite store is a regular file, so the store cannot open."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "mlstore").write_text("in the way")
    s = settings(tmp_path, tracking_uri=str(tmp_path / "cache" / "mlstore" / "mlflow.db"))
    with pytest.raises(OSError):
        MlflowSink(s).record(result(tmp_path, 1000))
    (tmp_path / "cache" / "mlstore").unlink()
    MlflowSink(s).record(result(tmp_path, 1000))
    run = the_run(client_for(s.mlflow.tracking_uri))
    assert [m.step for m in client_for(s.mlflow.tracking_uri).get_metric_history(run.info.run_id, "qa/acc")] == [1000]


def test_metric_names_mlflow_refuses_are_renamed_by_the_documented_rule_and_recorded(tmp_path):
    from recorder.mlflow_sink import metric_key

    s = settings(tmp_path)
    rec = result(tmp_path, 1000)
    rec.metrics = {"pass@1": 0.25, "pass_1": 0.5, "pass#1": 0.75, "acc": 0.1, "x" * 300: 0.3}
    MlflowSink(s).record(rec)
    run = the_run(client_for(s.mlflow.tracking_uri))
    keys = metric_key(["qa/" + k for k in rec.metrics])
    assert keys["qa/pass_1"] == "qa/pass_1" and keys["qa/acc"] == "qa/acc", "accepted names are kept"
    assert keys["qa/pass@1"].startswith("qa/pass_1-") and keys["qa/pass#1"].startswith("qa/pass_1-")
    assert len({keys["qa/pass@1"], keys["qa/pass#1"], keys["qa/pass_1"]}) == 3, "no two metrics share a curve"
    assert len(keys["qa/" + "x" * 300]) == 250
    got = run.data.metrics
    assert [got[keys["qa/" + k]] for k in rec.metrics] == [0.25, 0.5, 0.75, 0.1, 0.3]
    assert metric_key(["qa/pass@1"]) == {"qa/pass@1": "qa/pass_1"}, "alone, a cleaned name needs no suffix"
    assert metric_key(["a//b/./c"]) == {"a//b/./c": "a/_/b/_/c"}


def test_the_run_is_left_finished_after_each_record_and_still_takes_results(tmp_path):
    s = settings(tmp_path)
    sink = MlflowSink(s)
    sink.record(result(tmp_path, 1000))
    client = client_for(s.mlflow.tracking_uri)
    assert the_run(client).info.status == "FINISHED"
    sink.record(result(tmp_path, 2000))
    run = the_run(client)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "qa/acc")) == [1000, 2000]


def test_a_tracking_server_nobody_answers_fails_the_record_within_the_bound(tmp_path):
    """Fault injected for real: a port where nothing listens (MLflow's own retries would take ~4 minutes)."""
    import socket
    import threading
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    sink = MlflowSink(settings(tmp_path, tracking_uri=f"http://127.0.0.1:{port}"), request_timeout=9)
    outcome = {}

    def call():
        started = time.monotonic()
        try:
            sink.record(result(tmp_path, 1000))
        except Exception as e:  # the outcome under test
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "record() still inside MLflow's retries after 60 s"
    assert "error" in outcome and outcome["seconds"] < 15, outcome


# ---- re-runs: a new revision of a logged (iteration, benchmark) ---------------------------------------
def rerun_of(tmp_path, it, value=0.25, revision=1, fingerprint="cd34") -> ResultRecord:
    r = result(tmp_path, it)
    r.metrics = {"acc": value, "f1": 0.5}
    r.revision, r.fingerprint = revision, fingerprint
    return r


def points(client, run, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_a_rerun_is_logged_once_at_the_same_step_with_its_revision_and_fingerprint(tmp_path):
    s = settings(tmp_path)
    sink = MlflowSink(s)
    for it in (1000, 2000):
        first = result(tmp_path, it)
        first.fingerprint = "ab12"
        sink.record(first)
    sink.record(rerun_of(tmp_path, 2000))
    client = client_for(s.mlflow.tracking_uri)
    run = the_run(client)
    assert points(client, run, "qa/acc") == [(1000, 0.1), (2000, 0.2), (2000, 0.25)]
    assert points(client, run, "qa/f1") == [(1000, 0.5), (2000, 0.5), (2000, 0.5)]
    assert points(client, run, "qa/revision") == [(2000, 1.0)], "the marker names the re-run iteration"
    assert points(client, run, "tokens_b") == [(1000, 2.0), (2000, 4.0)], "tokens seen did not change"
    assert run.data.tags["fingerprints/qa"] == "ab12 cd34"
    assert run.info.status == "FINISHED"


def test_a_rerun_offered_again_by_a_restarted_process_or_an_older_revision_offered_late_adds_nothing(tmp_path):
    s = settings(tmp_path)
    MlflowSink(s).record(result(tmp_path, 2000))
    MlflowSink(s).record(rerun_of(tmp_path, 2000))
    # the daemon died after the sink accepted the rerun, before the ledger noted it: a fresh sink gets it again
    restarted = MlflowSink(s)
    restarted.record(rerun_of(tmp_path, 2000))
    restarted.record(result(tmp_path, 2000))  # revision 0, offered late
    client = client_for(s.mlflow.tracking_uri)
    run = the_run(client)
    assert points(client, run, "qa/acc") == [(2000, 0.2), (2000, 0.25)]
    assert points(client, run, "qa/revision") == [(2000, 1.0)]
    MlflowSink(s).record(rerun_of(tmp_path, 2000, value=0.3, revision=2))  # a second rerun: new again
    assert points(client, run, "qa/acc") == [(2000, 0.2), (2000, 0.25), (2000, 0.3)]
    assert points(client, run, "qa/revision") == [(2000, 1.0), (2000, 2.0)]


@pytest.mark.slow
def test_a_tracking_server_back_with_another_store_is_recorded_to_without_a_restart(tmp_path):
    """The sink kept the experiment id it had looked up: against a server restarted on a fresh store every later
    record failed ('No Experiment with id=1 exists') until the daemon restarted. Real `mlflow server` processes
    on 127.0.0.1, stopped by PID."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")

    def serve(store):
        proc = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{tmp_path / store}.db",
                                 "--artifacts-destination", str(tmp_path / f"{store}-artifacts")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return proc
            except OSError:
                time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("mlflow server did not start")

    def stop(proc):
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    uri = f"http://127.0.0.1:{port}"
    s = settings(tmp_path, tracking_uri=uri)
    sink = MlflowSink(s)
    first = serve("a")
    try:
        sink.record(result(tmp_path, 1000))
    finally:
        stop(first)
    second = serve("b")  # the same address, a fresh store: the experiment and run the sink knew are gone
    try:
        for attempt in range(3):  # the daemon offers it again after each failure
            try:
                sink.record(result(tmp_path, 2000))
                break
            except Exception:
                if attempt == 2:
                    raise
        run = the_run(client_for(uri))
        assert [m.step for m in client_for(uri).get_metric_history(run.info.run_id, "qa/acc")] == [2000]
    finally:
        stop(second)
