"""Regression alerts through the real daemon CLI: command benchmarks that score checkpoints as a plan says, a real
HTTP server on 127.0.0.1 as the Slack-compatible webhook, the ledger across restarts, and `status --check`."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, ledger_rows, megatron_checkpoint, run_cli, write_config

SCORED_STAGE = os.path.join(ROOT, "tests", "stage_scripts", "scored_stage.py")
HOOK_ENV = "EVAL_ALERT_WEBHOOK"


class Webhook:
    """A real local webhook: records every POST body; answers `statuses` first (500s), then 200."""

    def __init__(self, port: int = 0, statuses=()):
        self.bodies: list[dict] = []
        self.answered: list[int] = []
        self.statuses = list(statuses)
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = hook.statuses.pop(0) if hook.statuses else 200
                hook.answered.append(code)
                if code == 200:
                    hook.bodies.append({"content_type": self.headers.get("Content-Type"), **json.loads(body)})
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code == 200 else b"boom")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret-token"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(monkeypatch):
    started: list[Webhook] = []

    def start(port: int = 0, statuses=()) -> Webhook:
        hook = Webhook(port, statuses)
        started.append(hook)
        monkeypatch.setenv(HOOK_ENV, hook.url)  # the daemon processes inherit it
        return hook

    yield start
    for hook in started:
        hook.close()


def scored_bench(plan_path) -> dict:
    return {"name": "qa", "type": "command",
            "inference": f"{{python}} {SCORED_STAGE} infer --out {{output_dir}}",
            "evaluation": f"{{python}} {SCORED_STAGE} eval --out {{output_dir}} --iteration {{iteration}} "
                          f"--plan {plan_path}"}


def trained(tmp_path, scores: dict[int, float], rules: list, max_attempts: int = 3, **alerts) -> str:
    """Checkpoints scoring as `scores` says (exact_match per iteration), and a config with these alert rules."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({str(it): s for it, s in scores.items()}))
    for it in scores:
        megatron_checkpoint(tmp_path / "ckpt", it)
    return write_config(tmp_path, [scored_bench(plan)], executor={"max_attempts": max_attempts},
                        alerts={"rules": rules, "webhook_env": HOOK_ENV, "backoff_seconds": 0.1, **alerts})


def alert_rows(cache) -> list[dict]:
    with sqlite3.connect(os.path.join(str(cache), "ledger.sqlite3")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(
            "SELECT a.id, a.rule, a.iteration, a.closed_by, d.channel, d.delivered_at, d.failures "
            "FROM alerts a LEFT JOIN alert_deliveries d ON d.alert = a.id ORDER BY a.id")]


def status(cfg: str, *args: str, check: int = 0):
    return run_cli("status", "--config", cfg, *args, check=check)


DROP = {"benchmark": "qa", "metric": "exact_match", "versus": "prev", "drop": 0.05, "significant": 0.05}


def test_an_injected_regression_raises_exactly_one_alert_through_the_webhook(tmp_path, venvs, webhook):
    hook = webhook()
    # a run that trains (0.6 -> 0.8), then one deliberately worse checkpoint (0.8 -> 0.6: 40 of 200 samples break)
    cfg = trained(tmp_path, {1000: 0.6, 2000: 0.8, 3000: 0.6}, [DROP])
    run_cli("--config", cfg, "--once", check=0)
    (alert,) = alert_rows(tmp_path / "cache")
    assert alert["iteration"] == 3000 and alert["channel"] == "webhook" and alert["delivered_at"] is not None
    (body,) = hook.bodies
    assert body["content_type"] == "application/json"
    assert body["text"].startswith("[test] alert #1: tiny@3000/qa: exact_match 0.6, down 0.2 from 0.8 at "
                                   "iteration 2000 (prev; mcnemar_exact p=")
    assert "secret-token" not in (tmp_path / "cache").joinpath("ledger.sqlite3").read_bytes().decode("latin-1")
    assert status(cfg, "--check", check=1).stdout.count("#1 ") == 1


def test_status_check_exits_1_while_an_alert_is_open_and_0_once_it_is_acknowledged(tmp_path, venvs, webhook):
    webhook()
    cfg = trained(tmp_path, {1000: 0.9, 2000: 0.3}, [{"benchmark": "qa", "metric": "exact_match", "threshold": 0.5}])
    run_cli("--config", cfg, "--once", check=0)
    status(cfg, check=0)  # plain status only shows
    shown = status(cfg, "--check", check=1).stdout
    assert "alerts: 1 open" in shown and "tiny@2000/qa: exact_match 0.3 is below the threshold 0.5" in shown
    assert "webhook delivered" in shown
    doc = json.loads(status(cfg, "--json", "--check", check=1).stdout)
    assert [(a["iteration"], a["closed_at"]) for a in doc["alerts"]] == [(2000, None)]
    assert "--ack: no alert #7" in status(cfg, "--ack", "7", check=2).stderr  # a typo is no silent "0 closed"
    assert "1 alert(s) acknowledged" in status(cfg, "--ack", "all", check=0).stdout
    assert "alerts: none open (1 closed)" in status(cfg, "--check", check=0).stdout


def test_a_webhook_answering_500_twice_is_retried_with_backoff_and_delivers_once(tmp_path, venvs, webhook):
    hook = webhook(statuses=[500, 500])
    cfg = trained(tmp_path, {1000: 0.9, 2000: 0.3}, [{"benchmark": "qa", "metric": "exact_match", "threshold": 0.5}])
    proc = run_cli("--config", cfg, "--once", check=0)
    assert hook.answered == [500, 500, 200] and len(hook.bodies) == 1
    (alert,) = alert_rows(tmp_path / "cache")
    assert alert["failures"] == 2 and alert["delivered_at"] is not None
    assert "webhook answered HTTP 500" in proc.stderr and "secret-token" not in proc.stderr
    # the results were recorded all the same: delivery never holds recording
    assert {r["state"] for r in ledger_rows(tmp_path / "cache")} == {"recorded"}


def test_an_alert_stays_pending_while_the_webhook_is_down_and_is_delivered_by_the_next_start(tmp_path, venvs,
                                                                                              webhook, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(HOOK_ENV, f"http://127.0.0.1:{port}/services/secret-token")
    cfg = trained(tmp_path, {1000: 0.9, 2000: 0.3}, [{"benchmark": "qa", "metric": "exact_match", "threshold": 0.5}],
                  max_attempts=2)
    proc = run_cli("--config", cfg, "--once", check=0)
    assert "webhook unreachable" in proc.stderr and "secret-token" not in proc.stderr
    (alert,) = alert_rows(tmp_path / "cache")
    assert alert["delivered_at"] is None and alert["failures"] >= 2  # --once stops waiting after max_attempts
    assert f"webhook pending ({alert['failures']} failure(s)" in status(cfg, "--check", check=1).stdout
    hook = webhook(port=port)
    run_cli("--config", cfg, "--once", check=0)
    assert len(hook.bodies) == 1 and "tiny@2000/qa" in hook.bodies[0]["text"]
    assert alert_rows(tmp_path / "cache")[0]["delivered_at"] is not None


def test_a_rerun_of_the_checkpoint_does_not_fire_again_and_a_passing_one_closes_it(tmp_path, venvs, webhook):
    hook = webhook()
    cfg = trained(tmp_path, {1000: 0.9, 2000: 0.3}, [{"benchmark": "qa", "metric": "exact_match", "threshold": 0.5}])
    run_cli("--config", cfg, "--once", check=0)
    run_cli("rerun", "--config", cfg, "--iterations", "2000", check=0)
    run_cli("--config", cfg, "--once", check=0)  # a new daemon scores 2000 again: the same (rule, checkpoint)
    assert len(alert_rows(tmp_path / "cache")) == 1 and len(hook.bodies) == 1
    # the trainer recovers: iteration 3000 keeps the rule and closes the open alert
    (tmp_path / "plan.json").write_text(json.dumps({"1000": 0.9, "2000": 0.3, "3000": 0.7}))
    megatron_checkpoint(tmp_path / "ckpt", 3000)
    proc = run_cli("--config", cfg, "--once", check=0)
    assert "alert #1 closed" in proc.stderr
    assert alert_rows(tmp_path / "cache")[0]["closed_by"] == "iteration 3000 passes"
    status(cfg, "--check", check=0)


def test_a_stage_that_failed_k_times_raises_one_alert(tmp_path, venvs, webhook):
    hook = webhook()
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    crash = "{python} -c 'import sys; sys.exit(3)'"
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": crash, "evaluation": crash}],
                       alerts={"rules": [{"failed": 2}], "webhook_env": HOOK_ENV, "backoff_seconds": 0.1})
    run_cli("--config", cfg, "--once", check=1)  # max_attempts 2: failed for good
    (alert,) = alert_rows(tmp_path / "cache")
    assert alert["rule"] == "* failed>=2" and alert["iteration"] == 1000
    assert len(hook.bodies) == 1 and "tiny@1000/qa: failed 2 time(s): inference: exit 3" in hook.bodies[0]["text"]


def test_a_webhook_variable_that_is_not_set_is_a_config_error(tmp_path, venvs, monkeypatch):
    monkeypatch.delenv(HOOK_ENV, raising=False)
    cfg = trained(tmp_path, {1000: 0.9}, [{"benchmark": "qa", "metric": "exact_match", "threshold": 0.5}])
    proc = run_cli("--config", cfg, "--once", check=2)
    assert f"auto_eval.alerts.webhook_env: the environment variable {HOOK_ENV} is not set" in proc.stderr


def test_an_alert_rule_naming_an_unknown_benchmark_exits_2_with_the_key(tmp_path, venvs, monkeypatch):
    monkeypatch.setenv(HOOK_ENV, "http://127.0.0.1:9/x")
    cfg = trained(tmp_path, {1000: 0.9}, [{"benchmark": "qaa", "metric": "exact_match", "threshold": 0.5}])
    proc = run_cli("--config", cfg, "--once", check=2)
    assert "auto_eval.alerts.rules[0].benchmark: no benchmark named 'qaa'" in proc.stderr
    assert "did you mean 'qa'?" in proc.stderr


def test_a_crash_after_compare_json_but_before_the_rules_were_checked_fires_the_alert_at_the_next_start(
        tmp_path, venvs, webhook):
    hook = webhook()
    cfg = trained(tmp_path, {1000: 0.6, 2000: 0.8, 3000: 0.6}, [DROP])
    run_cli("--config", cfg, "--once", check=0)
    # what a kill between the comparison thread writing compare.json and check_alerts leaves: the row scored,
    # compare.json of its revision in place, no alert stored, nothing recorded yet
    cache = tmp_path / "cache"
    assert (cache / "results" / "tiny" / "iter_0003000" / "qa" / "compare.json").exists()
    with sqlite3.connect(cache / "ledger.sqlite3") as db:
        db.execute("DELETE FROM alert_deliveries")
        db.execute("DELETE FROM alerts")
        db.execute("UPDATE jobs SET state = 'scored' WHERE iteration = 3000")
        db.execute("DELETE FROM recordings WHERE iteration = 3000")
    hook.bodies.clear()
    run_cli("--config", cfg, "--once", check=0)
    (alert,) = alert_rows(cache)
    assert alert["iteration"] == 3000 and alert["delivered_at"] is not None
    assert len(hook.bodies) == 1


def test_a_crash_between_the_last_failure_and_its_alert_fires_the_alert_at_the_next_start(tmp_path, venvs, webhook):
    hook = webhook()
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    crash = "{python} -c 'import sys; sys.exit(3)'"
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": crash, "evaluation": crash}],
                       alerts={"rules": [{"failed": 2}], "webhook_env": HOOK_ENV, "backoff_seconds": 0.1})
    run_cli("--config", cfg, "--once", check=1)
    # what a kill between the failed transition (committed) and storing its alert leaves: no alert
    with sqlite3.connect(tmp_path / "cache" / "ledger.sqlite3") as db:
        db.execute("DELETE FROM alert_deliveries")
        db.execute("DELETE FROM alerts")
    hook.bodies.clear()
    run_cli("--config", cfg, "--once", check=1)
    (alert,) = alert_rows(tmp_path / "cache")
    assert alert["rule"] == "* failed>=2" and alert["delivered_at"] is not None
    assert len(hook.bodies) == 1


def test_a_checkpoint_that_arrives_late_becomes_the_previous_one_of_the_next_and_its_regression_alerts(
        tmp_path, venvs, webhook):
    hook = webhook()
    # 2000 is evaluated after 3000 (newest-first backfill, or a late copy): 3000 was compared with 1000 (no drop)
    cfg = trained(tmp_path, {1000: 0.6, 3000: 0.6}, [DROP])
    run_cli("--config", cfg, "--once", check=0)
    assert alert_rows(tmp_path / "cache") == []
    (tmp_path / "plan.json").write_text(json.dumps({"1000": 0.6, "2000": 0.8, "3000": 0.6}))
    megatron_checkpoint(tmp_path / "ckpt", 2000, tracker=False)
    run_cli("--config", cfg, "--once", check=0)
    doc = json.loads((tmp_path / "cache" / "results" / "tiny" / "iter_0003000" / "qa" / "compare.json").read_text())
    assert doc["against"]["prev"]["iteration"] == 2000  # 3000's previous checkpoint is 2000 now
    (alert,) = alert_rows(tmp_path / "cache")
    assert alert["iteration"] == 3000 and alert["delivered_at"] is not None
    assert len(hook.bodies) == 1 and "from 0.8 at iteration 2000" in hook.bodies[0]["text"]
