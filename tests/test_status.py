"""`tools/evaluator.py status`: the iteration x benchmark table, daemon liveness, details, --json, --watch.

Real ledgers (Ledger.add / transition), real metrics.json / progress.json / daemon.json files and a real config
file; the command is `evaluator.daemon.cli.main` (or the real CLI in a subprocess where a pipe is the point).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import DAEMON_PY, EVALUATOR, canonical_dataset, venvs, wait_until, write_config  # noqa: F401
from evaluator.common.contracts import result_dir
from evaluator.daemon import heartbeat as H
from evaluator.daemon import status as S
from evaluator.daemon.cli import main
from evaluator.daemon.ledger import Job, Ledger

BENCHES = [{"name": "qa", "type": "command", "inference": "true", "evaluation": "true", "main_metric": "acc"},
           {"name": "mc", "type": "command", "inference": "true", "evaluation": "true"}]
ERROR_TAIL = "\n".join([
    "inference: exit 1",
    "[inference] benchmark 'qa' (dataset, 500 samples from /data/qa), backend hf, model /ckpt",
    "[inference] [######..................] 120/500 samples 3.10/s elapsed 39s eta 122s",
    "Traceback (most recent call last):",
    '  File "/repo/evaluator/stages/inference/backends/hf.py", line 150, in run',
    "    out = self.model.generate(**inputs)",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "[inference] error: model cannot run: CUDA out of memory (batch_size 64)",
])


# ---- helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture
def setup(tmp_path):
    """A config with benchmarks qa (main_metric acc) and mc (no main_metric), and its empty ledger."""
    (tmp_path / "ckpt").mkdir()
    cfg = write_config(tmp_path, BENCHES)
    cache = str(tmp_path / "cache")
    led = Ledger(cache)
    yield cfg, cache, led
    led.close()


def to_state(led: Ledger, key: tuple, state: str, **fields) -> None:
    """Walk a new row along the ledger's allowed path to `state`."""
    path = {"inferring": ["inferring"], "inferred": ["inferring", "inferred"],
            "scoring": ["inferring", "inferred", "scoring"], "scored": ["inferring", "inferred", "scoring", "scored"],
            "recorded": ["inferring", "inferred", "scoring", "scored", "recorded"], "failed": ["failed"],
            "skipped": ["skipped"], "vanished": ["vanished"]}[state]
    for i, step in enumerate(path):
        led.transition(key, step, **(fields if i == len(path) - 1 else {}))


def write_metrics(cache: str, run: str, iteration: int, bench: str, metrics: dict) -> None:
    d = result_dir(cache, run, iteration, bench)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump({"metrics": metrics, "stderr": {}}, f)


def write_progress(cache: str, key: tuple, done: int, total: int, at: float) -> None:
    d = result_dir(cache, *key)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, S.PROGRESS), "w") as f:
        json.dump({"done": done, "total": total, "updated_at": at}, f)


def heartbeat(cache: str, pid: int, beat_age: float, **extra) -> None:
    now = time.time()
    H.write_state(cache, {"pid": pid, "host": socket.gethostname(), "started_at": now - 3600,
                          "beat_at": now - beat_age, "beat_every_s": 30.0, "stopped_at": None, "unavailable": [],
                          "settings_changed": [], "hints": {}, **extra})


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def status(capsys, cfg: str, *args: str) -> tuple[int, str, str]:
    code = main(["status", "--config", cfg, *args])
    out, err = capsys.readouterr()
    return code, out, err


def table_row(out: str, iteration: int) -> list[str]:
    """The cells of the first table row for `iteration` (the line that starts with the number)."""
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == str(iteration):
            return parts[1:]
    raise AssertionError(f"no table row for {iteration} in:\n{out}")


# ---- the table ------------------------------------------------------------------------------------------------------
def test_each_cell_shows_the_headline_metric_main_metric_first_else_the_first_in_metrics_json(setup, capsys):
    cfg, cache, led = setup
    for it in (1000, 2000):
        for b in ("qa", "mc"):
            led.add("tiny", it, b, f"/ckpt/iter_{it:07d}")
    to_state(led, ("tiny", 1000, "qa"), "recorded")
    to_state(led, ("tiny", 1000, "mc"), "scored")
    write_metrics(cache, "tiny", 1000, "qa", {"f1": 0.3, "acc": 0.51234})  # main_metric acc, not the first
    write_metrics(cache, "tiny", 1000, "mc", {"exact_match": 0.25, "n_error": 0})

    code, out, _ = status(capsys, cfg)

    assert code == 0
    assert table_row(out, 1000) == ["0.5123", "0.25"], out
    assert table_row(out, 2000) == [".", "."], out
    header = [ln.split() for ln in out.splitlines() if ln.split()[:1] == ["iteration"]][0]
    assert header == ["iteration", "qa", "mc"]
    assert "acc" in out and "exact_match" in out  # which metric each column shows


def test_a_result_without_a_readable_headline_shows_a_question_mark_not_another_number(setup, capsys):
    cfg, cache, led = setup
    for it in (1000, 2000, 3000):
        led.add("tiny", it, "qa", f"/ckpt/iter_{it:07d}")
        to_state(led, ("tiny", it, "qa"), "recorded")
    write_metrics(cache, "tiny", 1000, "qa", {"f1": 0.3})  # main_metric acc is not there
    write_metrics(cache, "tiny", 2000, "qa", {"acc": int("1" + "0" * 400)})  # JSON allows it, a float does not
    # 3000: no metrics.json at all

    code, out, _ = status(capsys, cfg)
    notes = {c["iteration"]: c["cells"]["qa"]["note"] for c in json.loads(status(capsys, cfg, "--json")[1])["runs"][0]["rows"]}

    assert code == 0 and [table_row(out, it) for it in (1000, 2000, 3000)] == [["?"], ["?"], ["?"]], out
    assert "has no 'acc'" in notes[1000] and "more than a float holds" in notes[2000] and "missing" in notes[3000], notes


@pytest.mark.parametrize("state, fields, symbol", [
    ("pending", {}, "."),
    ("inferring", {}, ">"),
    ("inferred", {}, "~"),
    ("scoring", {}, "~"),
    ("failed", {"next_retry_at": None}, "x"),
    ("failed", {"next_retry_at": 1e10}, "!"),
    ("skipped", {}, "-"),
    ("vanished", {}, "v"),
    ("invalidated", {}, "i"),
])
def test_a_cell_without_a_result_shows_its_state_symbol(state, fields, symbol):
    job = Job("tiny", 1000, "qa", "/ckpt", state, **fields)
    assert S.cell(job, None, None, daemon_up=True).symbol == symbol


def test_an_inferring_cell_shows_its_progress_and_a_running_cell_is_marked_when_the_daemon_is_down():
    job = Job("tiny", 1000, "qa", "/ckpt", "inferring")
    progress = S.Progress(120, 500, time.time())
    assert S.cell(job, None, progress, daemon_up=True).symbol == ">24%"
    assert S.cell(job, None, progress, daemon_up=False).symbol == ">?"
    assert S.cell(Job("tiny", 1000, "qa", "/ckpt", "scoring"), None, None, daemon_up=False).symbol == "~?"
    assert S.cell(Job("tiny", 1000, "qa", "/ckpt", "inferred"), None, None, daemon_up=False).symbol == "~"


def test_the_table_shows_the_newest_iterations_and_says_how_many_are_hidden(setup, capsys):
    cfg, cache, led = setup
    led.add_many([("tiny", it, "qa", "/ckpt", "pending", None) for it in range(1000, 41000, 1000)])

    _, out, _ = status(capsys, cfg)
    rows = [ln.split()[0] for ln in out.splitlines() if ln.split()[:1] and ln.split()[0].isdigit()]

    assert rows[0] == "11000" and rows[-1] == "40000" and len(rows) == 30
    assert "10 older iteration(s) not shown" in out
    _, everything, _ = status(capsys, cfg, "--last", "0")
    assert table_row(everything, 1000) == ["."]
    run = json.loads(status(capsys, cfg, "--json")[1])["runs"][0]
    assert (run["iterations"], run["shown"], run["rows"][0]["iteration"]) == (40, 30, 11000)


# ---- daemon liveness --------------------------------------------------------------------------------------------------
NOW = 1_800_000_000.0
BEAT = {"pid": 4242, "host": "gpu-box", "started_at": NOW - 3600, "beat_at": NOW - 5, "beat_every_s": 30.0,
        "stopped_at": None}


@pytest.mark.parametrize("state, pid_alive, verdict, words", [
    (None, False, "never", "no heartbeat"),
    (BEAT, True, "alive", "alive (pid 4242 on gpu-box, heartbeat 5s ago)"),
    ({**BEAT, "beat_at": NOW + 20}, True, "alive", "heartbeat 0s ago"),  # another host's clock runs ahead
    ({**BEAT, "beat_at": NOW - 89}, True, "alive", "heartbeat 1m29s ago"),  # within 3 intervals
    (BEAT, False, "dead", "NOT RUNNING — last heartbeat 5s ago, pid 4242 gone (killed?)"),
    ({**BEAT, "beat_at": NOW - 180}, True, "dead", "NOT RUNNING — last heartbeat 3m00s ago"),  # pid reused / hung
    ({**BEAT, "beat_every_s": 120.0, "beat_at": NOW - 300}, True, "alive", "heartbeat 5m00s ago"),
    ({**BEAT, "stopped_at": NOW - 60}, False, "stopped", "stopped cleanly at"),
    ({**BEAT, "beat_at": None}, True, "dead", "no heartbeat time"),
])
def test_liveness(state, pid_alive, verdict, words):
    got, text = H.liveness(state, NOW, pid_alive)
    assert got == verdict and words in text, text


def test_a_daemon_whose_beat_stopped_but_whose_pid_lives_on_this_host_is_stalled_not_reported_dead():
    """Paused on a full disk it cannot even write daemon.json to: before, `status` said NOT RUNNING and invited
    a restart of a healthy, waiting daemon."""
    old_beat = {**BEAT, "beat_at": NOW - 180}
    got, text = H.liveness(old_beat, NOW, True, lock_held=True)  # its pid holds the cache_dir's daemon lock
    assert got == "stalled" and "NO HEARTBEAT for 3m00s" in text and "do not start another" in text, text
    assert H.liveness(old_beat, NOW, True, lock_held=False)[0] == "dead"  # a reused pid holds no lock
    assert H.liveness(old_beat, NOW, True, lock_held=None)[0] == "dead"  # unknown (another host): as before


def test_the_lock_holder_is_read_from_proc_locks_without_taking_the_lock(tmp_path):
    from filelock import FileLock

    state = {"pid": os.getpid(), "host": socket.gethostname()}
    lock = FileLock(str(tmp_path / "daemon.lock"))
    with lock:
        assert H.holds_lock(str(tmp_path), state) is True
        assert H.holds_lock(str(tmp_path), {**state, "pid": gone_pid()}) is False
    assert H.holds_lock(str(tmp_path), state) is False
    assert H.holds_lock(str(tmp_path), {**state, "host": "elsewhere"}) is None


def test_a_paused_daemon_that_can_still_write_its_heartbeat_says_why_it_waits():
    got, text = H.liveness({**BEAT, "paused": "cannot write the ledger: database is locked"}, NOW, True)
    assert got == "alive" and "alive but PAUSED" in text and "database is locked" in text, text


def test_a_daemon_whose_pid_is_gone_is_reported_not_running_and_its_running_rows_marked(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    to_state(led, ("tiny", 1000, "qa"), "inferring", started_at=time.time() - 60)
    heartbeat(cache, gone_pid(), beat_age=5)

    _, out, _ = status(capsys, cfg)

    assert out.splitlines()[0].startswith("daemon: NOT RUNNING — last heartbeat"), out
    assert "gone (killed?)" in out.splitlines()[0]
    assert table_row(out, 1000) == [">?"]
    assert "resumed at its next start" in out


def test_a_daemon_with_an_old_heartbeat_is_not_running_even_if_its_pid_exists(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    heartbeat(cache, os.getpid(), beat_age=600)  # this pid exists: a reused pid must not look alive

    _, out, _ = status(capsys, cfg)

    assert out.splitlines()[0].startswith("daemon: NOT RUNNING — last heartbeat 10m00s ago"), out


def test_a_live_daemon_is_reported_alive_with_its_heartbeat_age(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    heartbeat(cache, os.getpid(), beat_age=2)

    _, out, _ = status(capsys, cfg)

    assert out.splitlines()[0] == f"daemon: alive (pid {os.getpid()} on {socket.gethostname()}, heartbeat 2s ago)"


def test_what_the_daemon_reported_is_shown_with_the_operators_choices(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    heartbeat(cache, os.getpid(), beat_age=1,
              unavailable=[{"benchmark": "mc", "run": None, "reason": "dataset /data/mc does not exist"},
                           {"benchmark": "qa", "run": None, "reason": "settings changed since 12 result(s) ..."}],
              settings_changed=[{"benchmark": "qa", "results": 12, "changes": ["generation.max_new_tokens: 8 -> 2"]}],
              hints={"tiny": ["3 entries look like huggingface checkpoints (checkpoint-300): set watch.layout"]})

    _, out, _ = status(capsys, cfg)

    assert "held: nothing of these starts" in out and "benchmark mc: dataset /data/mc does not exist" in out
    assert "settings changed since 12" not in out  # said once, in its own section with the choices
    assert "benchmark qa is held: 12 result(s) were made with other settings (generation.max_new_tokens: 8 -> 2)" \
        in out
    assert f"tools/evaluator.py rerun --config {cfg} --benchmark qa" in out and "new benchmark name" in out
    assert f"tools/evaluator.py invalidate --config {cfg} --benchmark qa" in out
    assert "hints for run tiny:" in out and "set watch.layout" in out


# ---- details --------------------------------------------------------------------------------------------------------
def test_a_failed_job_shows_the_stages_own_message_not_only_the_exit_code(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    to_state(led, ("tiny", 1000, "qa"), "failed", attempts=2, next_retry_at=None, last_error=ERROR_TAIL)

    _, out, _ = status(capsys, cfg)
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip().startswith("tiny@1000/qa"))

    assert "failed for good after 2 attempt(s): inference: exit 1" in lines[at]
    assert lines[at + 1].strip() == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert lines[at + 2].strip() == "[inference] error: model cannot run: CUDA out of memory (batch_size 64)"
    assert "[######" not in out and "Traceback" not in out  # the summary, not the whole tail
    assert lines[at + 3].strip().endswith(os.path.join("iter_0001000", "qa", "infer.stderr.log"))


@pytest.mark.parametrize("last_error, expected", [
    (None, []),
    ("checkpoint invalid: no model_optim_rng.pt", ["checkpoint invalid: no model_optim_rng.pt"]),
    (ERROR_TAIL, ["inference: exit 1", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                  "[inference] error: model cannot run: CUDA out of memory (batch_size 64)"]),
    ("inference: exit 3\nloading\nfake stage: crashing on purpose",
     ["inference: exit 3", "fake stage: crashing on purpose"]),  # no error line: the last line
    ("inference: exit 1\n[inference] [####....] 4/8 samples 1.00/s elapsed 4s eta 4s",
     ["inference: exit 1", "[inference] [####....] 4/8 samples 1.00/s elapsed 4s eta 4s"]),
    ("evaluation: exit 1\nsbatch: error: Batch job submission failed: Invalid qos\nmore",
     ["evaluation: exit 1", "sbatch: error: Batch job submission failed: Invalid qos"]),
    ("evaluation: exit 1\nKeyError: 'answer'\nwhile scoring", ["evaluation: exit 1", "KeyError: 'answer'"]),
    ("inference: exit 2: bad job spec or data (not retried)\n"  # a command benchmark's log, as local.py appends it
     "==== 2026-11-30 11:23:54 /venv/python -m evaluator.stages.command --job /c/infer.job.json\n"
     "command stage (inference, iteration 1000): echo 'bad spec' >&2; exit 2\n"
     "bad spec: options.split must be one of test, dev\n"
     "command stage: command exited 2",
     ["inference: exit 2: bad job spec or data (not retried)", "bad spec: options.split must be one of test, dev"]),
    ("inference: exit 3\n==== t1 cmd\nRuntimeError: first attempt\n==== t2 cmd\nsecond attempt died\n"
     "command stage: command exited 3", ["inference: exit 3", "second attempt died"]),  # the last attempt's words
    ("evaluation: exit 1\n==== t cmd\ncommand stage: the evaluation command exited 0 but wrote no metrics.json",
     ["evaluation: exit 1", "command stage: the evaluation command exited 0 but wrote no metrics.json"]),
])
def test_error_summary(last_error, expected):
    assert S.error_summary(last_error) == expected


def test_a_job_in_flight_shows_its_progress_and_elapsed_time_from_progress_json(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    led.add("tiny", 1000, "mc", "/ckpt/iter_0001000")
    to_state(led, ("tiny", 1000, "qa"), "inferring", started_at=time.time() - 192)
    to_state(led, ("tiny", 1000, "mc"), "inferring", started_at=time.time() - 30)
    write_progress(cache, ("tiny", 1000, "qa"), 120, 500, time.time() - 1)
    write_progress(cache, ("tiny", 1000, "mc"), 7, 8, time.time() - 300)  # an earlier attempt's report
    heartbeat(cache, os.getpid(), beat_age=1)

    _, out, _ = status(capsys, cfg)
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("tiny@1000/qa"))
    other = next(ln for ln in out.splitlines() if ln.strip().startswith("tiny@1000/mc"))

    assert "inferring 120/500 (24%), 3m1" in line, line
    assert table_row(out, 1000) == [">24%", ">"]
    assert "7/8" not in other and "inferring, 30s" in other, other


def test_details_show_attempts_next_retry_and_the_revision_of_a_rerun(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    retry_at = time.time() + 90
    to_state(led, ("tiny", 1000, "qa"), "failed", attempts=1, next_retry_at=retry_at,
             last_error="evaluation: exit 3\nfake stage: crashing on purpose")
    report = S.gather(S.load_config(cfg, require_datasets=False), cfg, None, None, time.time())
    report.jobs[0].revision = 2  # a ledger with the revision column (rerun.py)

    text = S.render_text(report)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("tiny@1000/qa"))

    assert f"attempt 1 of 2 failed, retry at {H.clock(retry_at)} (in 1m2" in line, line
    assert "rev 2" in line and "evaluation: exit 3" in line
    assert "fake stage: crashing on purpose" in text


def test_a_run_the_config_no_longer_names_is_listed_as_not_configured(setup, capsys):
    cfg, cache, led = setup
    led.add("old", 1000, "qa", "/elsewhere/iter_0001000")

    _, out, _ = status(capsys, cfg)

    assert "run tiny" in out and "no jobs yet" in out
    assert "run old: not configured now (1 job(s) left as they are" in out


def test_retry_recording_offers_a_set_aside_result_again(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    to_state(led, ("tiny", 1000, "qa"), "scored")
    write_metrics(cache, "tiny", 1000, "qa", {"acc": 0.5})
    led.delivery_failed(("tiny", 1000, "qa"), "mlflow", 8, None, "OverflowError: int too large")

    _, shown, _ = status(capsys, cfg)
    _, retried, _ = status(capsys, cfg, "--retry-recording")

    assert "recording set aside: 1 result(s)" in shown and "OverflowError" in shown
    assert "1 result(s) offered to their sinks again" in retried and "recording set aside" not in retried


# ---- --run, --json, pipes, --watch -----------------------------------------------------------------------------------
def test_an_unknown_run_is_an_error_naming_the_known_runs(setup, capsys):
    cfg, cache, led = setup
    led.add("old", 1000, "qa", "/elsewhere/iter_0001000")

    code, out, err = status(capsys, cfg, "--run", "tinny")

    assert code == 2 and out == ""
    assert err.strip() == "error: --run 'tinny': no such run in the config or the ledger; known runs: old, tiny; " \
                          "did you mean 'tiny'?"


def test_a_configured_run_without_jobs_is_not_an_error(setup, capsys):
    cfg, cache, led = setup
    code, out, _ = status(capsys, cfg, "--run", "tiny")
    assert code == 0 and "run tiny" in out and "no jobs yet" in out


JSON_KEYS = {"schema_version", "now", "daemon", "runs", "jobs", "unavailable", "settings_changed", "hints",
             "snapshots", "set_aside", "not_configured", "actions", "alerts"}


def test_json_is_one_object_with_the_documented_keys(setup, capsys):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    led.add("tiny", 1000, "mc", "/ckpt/iter_0001000")
    to_state(led, ("tiny", 1000, "qa"), "recorded")
    write_metrics(cache, "tiny", 1000, "qa", {"acc": 0.75})
    to_state(led, ("tiny", 1000, "mc"), "inferring", started_at=time.time() - 10)
    write_progress(cache, ("tiny", 1000, "mc"), 3, 4, time.time())
    heartbeat(cache, gone_pid(), beat_age=5, hints={"tiny": ["a hint"]})

    code, out, _ = status(capsys, cfg, "--json")
    doc = json.loads(out)

    assert code == 0 and set(doc) == JSON_KEYS
    assert doc["schema_version"] == 1
    assert doc["daemon"]["state"] == "dead" and set(doc["daemon"]) == {"state", "text", "pid", "host", "started_at",
                                                                      "beat_at", "stopped_at"}
    run = doc["runs"][0]
    assert set(run) == {"run", "configured", "root", "layout", "benchmarks", "metrics", "counts", "iterations",
                        "shown", "rows", "best", "last_comparison"}
    assert (run["best"], run["last_comparison"]) == (None, [])  # no best: rule, no compare.json
    assert run["run"] == "tiny" and run["benchmarks"] == ["qa", "mc"] and run["metrics"]["qa"] == "acc"
    cells = run["rows"][0]["cells"]
    assert run["rows"][0]["iteration"] == 1000
    assert cells["qa"] == {"state": "recorded", "symbol": "0.75", "value": 0.75, "metric": "acc", "note": None,
                           "progress": None}
    assert cells["mc"]["progress"]["done"] == 3 and cells["mc"]["symbol"] == ">?"
    job = next(j for j in doc["jobs"] if j["benchmark"] == "mc")
    assert {"run", "iteration", "benchmark", "state", "attempts", "last_error", "started_at", "updated_at",
            "revision", "fingerprint", "elapsed_s", "progress", "error"} <= set(job)
    assert doc["hints"] == {"tiny": ["a hint"]} and doc["snapshots"] == [] and doc["set_aside"] == []


def pipe(cfg: str, *args: str, reader: str = "head -1", timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI with its stdout into `reader`; returns the CLI's stderr and exit code."""
    cmd = " ".join([DAEMON_PY, EVALUATOR, "status", "--config", cfg, *args])
    return subprocess.run(["bash", "-c", f"{cmd} | {reader}; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                          text=True, timeout=timeout)


def test_status_into_a_closed_pipe_prints_no_traceback(setup):
    cfg, cache, led = setup
    led.add_many([("tiny", it, b, "/ckpt", "failed", ERROR_TAIL) for it in range(1000, 3001000, 1000)
                  for b in ("qa", "mc")])  # far more than a pipe buffer of output

    for args in ((), ("--json",), ("--watch", "0.2")):
        proc = pipe(cfg, "--last", "0", *args)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr[-2000:])


def test_watch_redraws_until_interrupted(setup):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    out_path = os.path.join(os.path.dirname(cfg), "watch.out")
    with open(out_path, "w") as out:
        proc = subprocess.Popen([DAEMON_PY, EVALUATOR, "status", "--config", cfg, "--watch", "0.2"], stdout=out,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: open(out_path).read().count("daemon: ") >= 3, timeout=30, what="three frames")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)  # a loaded 2-core CI machine is slow to exit
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", err
    assert "\x1b[" not in open(out_path).read()  # not a terminal: no screen clearing


def test_watch_and_an_action_together_are_refused(setup, capsys):
    cfg, _, _ = setup
    code, _, err = status(capsys, cfg, "--watch", "--retry-recording")
    assert code == 2 and "--watch only shows" in err


# ---- the inference stage reports its progress --------------------------------------------------------------------------
def test_the_inference_stage_writes_progress_json_while_it_generates(tmp_path, venvs):
    from test_openai_backend import FaultServer, run_openai, user

    server = FaultServer(tmp_path, {"*": ["slow:0.3"]})  # 24 samples one at a time: about 7 s of generation
    dataset = canonical_dataset(tmp_path / "toy", [{"id": f"s{i}", "messages": user(f"question {i}")}
                                                   for i in range(24)])
    out = tmp_path / "out" / "fault-model" / "toy"
    seen = []

    def watch_progress():
        try:
            doc = json.loads((out / S.PROGRESS).read_text())
        except (OSError, ValueError):
            return
        if not seen or seen[-1] != doc:
            seen.append(doc)

    import threading
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            watch_progress()
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        proc, out_dir = run_openai(dataset, tmp_path / "out", options={"base_url": server.base_url,
                                                                         "max_concurrency": 1})
    finally:
        stop.set()
        poller.join()
        server.stop()

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out_dir == str(out)
    assert seen and seen[0]["done"] == 0 and seen[0]["total"] == 24, seen
    assert any(0 < d["done"] < 24 for d in seen), seen  # a report while generating, not only at the start
    assert len(seen) <= 4, seen  # at most every ~5 s
    assert all(isinstance(d["updated_at"], float) for d in seen)


@pytest.mark.parametrize("damage, said", [
    ({"runs": {"tiny": 5}}, "runs: expected an object whose items are each an object"),
    ({"hints": {"tiny": 5}}, "hints: expected an object whose items are each a list"),
    ({"unavailable": 5}, "unavailable: expected a list"),
    ({"unavailable": [{"benchmark": [], "run": None, "reason": "x"}]}, "unavailable: expected entries of strings"),
    ({"beat_at": 1e308}, "beat_at: expected a time in seconds"),
])
def test_a_daemon_json_with_a_field_of_the_wrong_type_is_named_not_a_traceback(setup, capsys, damage, said):
    cfg, cache, led = setup
    led.add("tiny", 1000, "qa", "/ckpt/iter_0001000")
    with open(os.path.join(cache, "daemon.json"), "w") as f:
        json.dump({"pid": 1, "host": "h", "beat_at": time.time(), "runs": {}, **damage}, f)
    code, out, _ = status(capsys, cfg)
    assert code == 0 and f"daemon: unknown: {os.path.join(cache, 'daemon.json')}: {said}" in out, out


def test_a_daemon_that_stops_cleanly_while_status_reads_it_shows_as_stopped_not_killed(tmp_path, monkeypatch):
    """status read daemon.json (running), the daemon then stopped cleanly and exited, and the pid check found it
    gone: "NOT RUNNING ... (killed?)" for a clean stop. The interleaving cannot be timed for real, so the pid
    check is wrapped to make the stop happen exactly there (the daemon's last write, then its exit)."""
    cache = str(tmp_path)
    pid = gone_pid()
    heartbeat(cache, pid, beat_age=1)
    real = H.pid_exists

    def stop_in_between(doc):
        if doc and doc.get("stopped_at") is None:
            H.write_state(cache, {**doc, "stopped_at": time.time(), "stop_reason": "stopped by SIGTERM"})
        return real(doc)

    monkeypatch.setattr(H, "pid_exists", stop_in_between)
    doc, state, text = S.daemon_liveness(cache, time.time())
    assert state == H.STOPPED and "stopped by SIGTERM" in text and doc["stopped_at"]
