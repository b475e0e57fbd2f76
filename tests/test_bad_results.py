"""What a stage reports that cannot be a result: refused where it is read, the job failed alone, the daemon and the
other benchmarks' curves going on, and no done file left in the results tree for a failed job."""
from __future__ import annotations

import json
import os

from conftest import (DAEMON_PY, ROOT, bench, history, ledger_rows, megatron_checkpoint, run_cli,  # noqa: F401
                      venvs, write_config)

HUGE = "9" * 400  # valid JSON; no float holds it


def command_eval(name: str, script: str) -> dict:
    """A command benchmark whose evaluation is `script` (braces doubled for the template)."""
    return {"name": name, "type": "command", "inference": "true", "evaluation": script}


def states(cache):
    return {(r["iteration"], r["benchmark"]): r["state"] for r in ledger_rows(cache)}


def result_files(cache, benchmark: str, iteration: int = 1000) -> list[str]:
    return sorted(os.listdir(cache / "results" / "tiny" / f"iter_{iteration:07d}" / benchmark))


def test_a_metric_no_float_holds_fails_its_job_and_the_daemon_records_the_other_benchmark(tmp_path, venvs):
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [command_eval("big", "echo '{{\"acc\": " + HUGE + "}}' > metrics.json"), bench("qa")])
    cache = tmp_path / "cache"

    proc = run_cli("--config", cfg, "--once", timeout=240)

    assert proc.returncode == 1, proc.stderr  # a job failed; before: a traceback (OverflowError) ended the daemon
    assert "Traceback" not in proc.stderr
    assert states(cache) == {(1000, "big"): "failed", (1000, "qa"): "recorded"}
    assert [h["benchmark"] for h in history(cache)] == ["qa"]
    assert (cache / "results" / "tiny" / "curves.png").stat().st_size > 0  # the local views still drawn
    shown = run_cli("status", "--config", cfg, check=0).stdout
    assert "more than a float holds" in shown, shown


def failed_once(tmp_path, name: str, script: str):
    """One checkpoint, one command benchmark whose evaluation is `script`: --once ends 1 with the job failed."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [command_eval(name, script)])
    cache = tmp_path / "cache"
    run_cli("--config", cfg, "--once", check=1, timeout=240)
    assert states(cache) == {(1000, name): "failed"}
    return cache


def test_an_evaluation_command_that_fails_after_writing_metrics_leaves_no_result_behind(tmp_path, venvs):
    cache = failed_once(tmp_path, "crashy", "echo '{{\"acc\": 0.25}}' > metrics.json; exit 3")

    files = result_files(cache, "crashy")
    assert "metrics.json" not in files and "metrics.json.refused" in files, files
    # so a dashboard rebuilt from the results tree does not show the failed job's number
    writer_cfg = tmp_path / "writer.yaml"
    writer_cfg.write_text(json.dumps({"project": "p", "mode": "offline", "dir": str(tmp_path / "wandb"),
                                      "evals": [{"eval_type": "native", "model_name": "tiny", "source": "results",
                                                 "results_dir": str(cache / "results")}]}))
    shown = run_cli_writer(writer_cfg)
    assert "crashy" not in shown.stdout + shown.stderr, shown.stdout + shown.stderr


def test_a_metrics_json_that_is_not_utf8_fails_its_job_naming_the_file(tmp_path, venvs):
    cache = failed_once(tmp_path, "latin", "printf '{{\"acc\\351\": 0.5}}' > metrics.json")

    error = [r for r in ledger_rows(cache)][0]["last_error"]
    assert "metrics.json: not UTF-8 text" in error, error
    assert "metrics.json" not in result_files(cache, "latin")


def test_a_metric_of_thousands_of_digits_fails_its_job_naming_the_file(tmp_path, venvs):
    """int() refuses over 4300 digits with a ValueError that named no file."""
    (tmp_path / "huge.json").write_text('{"acc": ' + "9" * 5000 + "}")
    cache = failed_once(tmp_path, "digits", "cp {config_dir}/huge.json metrics.json")

    error = [r for r in ledger_rows(cache)][0]["last_error"]
    assert "metrics.json: Exceeds the limit (4300 digits)" in error, error
    assert "metrics.json" not in result_files(cache, "digits")


def test_an_empty_metrics_json_is_an_attempt_not_a_bad_spec(tmp_path, venvs):
    """`json.dump(m, open('metrics.json', 'w'))` on a disk that fills exits 0 and leaves 0 bytes: it was exit 2
    (not valid JSON), failed for good at once; it is a write that did not finish, so an attempt."""
    megatron_checkpoint(tmp_path / "ckpt", 1000)
    cfg = write_config(tmp_path, [command_eval("empty", "touch metrics.json")], executor={"max_attempts": 2,
                                                                                        "backoff_seconds": 0.1})
    cache = tmp_path / "cache"
    run_cli("--config", cfg, "--once", check=1, timeout=240)
    row = ledger_rows(cache)[0]
    assert row["state"] == "failed" and row["attempts"] == 2, row  # retried, then failed after max_attempts
    assert "metrics.json is empty: a write that did not finish" in row["last_error"], row["last_error"]
    assert "metrics.json" not in result_files(cache, "empty")


def run_cli_writer(cfg):
    import subprocess

    return subprocess.run([DAEMON_PY, os.path.join(ROOT, "tools", "wandb_writer.py"), "--config", str(cfg),
                           "--print-only"], capture_output=True, text=True, timeout=120)
