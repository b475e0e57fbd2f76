"""Checkpoints from a training script (evaluator/api/training.py): completion notices end the settle wait,
evaluate_checkpoint runs the daemon's --once machinery when no daemon runs and hands off to the one that does,
and the Hugging Face Trainer callback tells the daemon each checkpoint is finished the moment on_save returns.

Every daemon here waits settle_seconds: 3600, so a checkpoint taken at all was taken because of its notice."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from conftest import bench, history, ledger_rows, run_cli, wait_until, write_config
from evaluator.api import evaluate_checkpoint, notify_checkpoint
from evaluator.daemon.checkpoints import GlobLayout, HuggingFaceLayout, notices_dir, write_notice

HOUR = 3600


def hf_checkpoint(root, step: int, weights: bool = True, trainer_state: bool = True) -> str:
    """A whole (tiny) Hugging Face checkpoint folder: config, safetensors as long as its header says, trainer_state."""
    path = os.path.join(str(root), f"checkpoint-{step}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")
    if weights:
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    if trainer_state:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step}, f)
    return path


def layout(cls, tmp_path, run_dir, **kw):
    return cls("tiny", str(run_dir), HOUR, notices=notices_dir(str(tmp_path / "cache"), "tiny"), **kw)


def by_iteration(found):
    return {c.iteration: c for c in found}


# ---- the layouts read completion notices ------------------------------------------------------------------------
def test_noticed_huggingface_checkpoint_is_complete_at_once_and_the_unnoticed_one_settles(tmp_path):
    ckpt = tmp_path / "ckpt"
    noticed, waiting = hf_checkpoint(ckpt, 10), hf_checkpoint(ckpt, 20)
    write_notice(str(tmp_path / "cache"), "tiny", 10, noticed, "test")
    found = by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())
    assert found[10].complete
    assert not found[20].complete and found[20].reason == "settling" and found[20].settle_deadline is not None
    assert found[20].path == waiting


def test_a_notice_naming_another_folder_does_not_end_the_settle_wait(tmp_path):
    ckpt = tmp_path / "ckpt"
    hf_checkpoint(ckpt, 10)
    write_notice(str(tmp_path / "cache"), "tiny", 10, str(tmp_path / "elsewhere"), "test")
    assert not by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())[10].complete


def test_noticed_huggingface_checkpoint_without_its_weights_is_invalid_not_waited_on(tmp_path):
    ckpt = tmp_path / "ckpt"
    path = hf_checkpoint(ckpt, 10, weights=False, trainer_state=False)
    write_notice(str(tmp_path / "cache"), "tiny", 10, path, "test")
    c = by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())[10]
    assert not c.complete and c.invalid.startswith("no weights")


def test_a_notice_for_an_earlier_save_of_the_iteration_does_not_finish_a_new_save_of_it(tmp_path):
    # a training restarted into the same output_dir saves checkpoint-10 again: the old notice saw other files
    ckpt = tmp_path / "ckpt"
    path = hf_checkpoint(ckpt, 10)
    write_notice(str(tmp_path / "cache"), "tiny", 10, path, "test")
    os.remove(os.path.join(path, "model.safetensors"))  # the new save has written its config, not its weights yet
    c = by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())[10]
    assert not c.complete and not c.invalid, "still being written: waited on, not failed"
    hf_checkpoint(ckpt, 10)  # the new save finished; without a new notice the settle rules decide
    c = by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())[10]
    assert not c.complete and c.reason == "settling"
    write_notice(str(tmp_path / "cache"), "tiny", 10, path, "test")
    assert by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())[10].complete


def test_a_noticed_checkpoint_outside_the_run_folder_written_again_waits_for_its_next_notice(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    outside = hf_checkpoint(tmp_path / "exported", 30)
    write_notice(str(tmp_path / "cache"), "tiny", 30, outside, "test")
    with open(os.path.join(outside, "config.json"), "w") as f:
        f.write('{"written": "again"}')
    c = by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())[30]
    assert not c.complete and not c.invalid and c.path == outside


def test_noticed_glob_checkpoint_needs_no_done_marker(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "step_5.pt").write_bytes(b"weights")
    (ckpt / "step_6.pt").write_bytes(b"weights")
    write_notice(str(tmp_path / "cache"), "tiny", 5, str(ckpt / "step_5.pt"), "test")
    found = by_iteration(layout(GlobLayout, tmp_path, ckpt, pattern=r"step_(\d+)\.pt", done_marker="{name}.done").scan())
    assert found[5].complete
    assert not found[6].complete and found[6].reason.startswith("waiting for")


def test_noticed_checkpoint_outside_the_run_folder_is_part_of_the_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    hf_checkpoint(ckpt, 10)
    outside = hf_checkpoint(tmp_path / "exported", 30)
    write_notice(str(tmp_path / "cache"), "tiny", 30, outside, "test")
    found = by_iteration(layout(HuggingFaceLayout, tmp_path, ckpt).scan())
    assert sorted(found) == [10, 30]
    assert found[30].complete and found[30].path == outside


# ---- evaluate_checkpoint ---------------------------------------------------------------------------------------
def hf_config(tmp_path, **watch):
    return write_config(tmp_path, [bench("qa")], watch={"layout": "huggingface", "iteration_interval": 10,
                                                        "settle_seconds": HOUR, **watch})


def test_once_over_one_iteration_ends_while_a_checkpoint_outside_it_settles(tmp_path, venvs):
    """--once --begin/--end-iteration 10 (what evaluate_checkpoint runs): checkpoint 10 is known complete (its
    notice), checkpoint 20 settles for an hour. 20 is outside the selection and is never evaluated, yet its
    settling counted as work in flight: --once waited the hour (evaluate_checkpoint until its timeout)."""
    ckpt = tmp_path / "ckpt"
    path = hf_checkpoint(ckpt, 10)
    hf_checkpoint(ckpt, 20)
    cfg = hf_config(tmp_path)
    write_notice(str(tmp_path / "cache"), "tiny", 10, path, "test")
    # ends by itself (a hang shows as TimeoutExpired)
    run_cli("--config", cfg, "--once", "--begin-iteration", "10", "--end-iteration", "10", check=0, timeout=90)
    assert {(r["iteration"], r["state"]) for r in ledger_rows(tmp_path / "cache")} == {(10, "recorded")}
    # --dry-run waited for it too (it sleeps until settling checkpoints settle)
    dry = run_cli("--config", cfg, "--dry-run", "--begin-iteration", "10", "--end-iteration", "10", check=0,
                  timeout=90)
    assert "waiting" not in dry.stderr, dry.stderr


def test_evaluate_checkpoint_without_a_daemon_records_that_checkpoint_into_ledger_and_history(tmp_path, venvs):
    ckpt = tmp_path / "ckpt"
    path = hf_checkpoint(ckpt, 10)
    hf_checkpoint(ckpt, 20)  # another checkpoint of the run: not this call's business
    cfg = hf_config(tmp_path)
    result = evaluate_checkpoint(path, 10, config=cfg, timeout=120)
    assert not result.handed_to_daemon and result.exit_code == 0
    assert result.states == {"qa": "recorded"}
    assert result.metrics == {"qa": {"rows": 1, "iteration_k": 0.01}}  # fake_stage's metrics of this checkpoint
    assert [(r["iteration"], r["benchmark"], r["state"]) for r in ledger_rows(tmp_path / "cache")] == \
        [(10, "qa", "recorded")]
    assert [(h["run"], h["iteration"], h["benchmark"]) for h in history(tmp_path / "cache")] == [("tiny", 10, "qa")]


def test_evaluate_checkpoint_of_a_folder_outside_the_run_records_it_under_the_run(tmp_path, venvs):
    (tmp_path / "ckpt").mkdir()
    hf_checkpoint(tmp_path / "ckpt", 10)
    exported = hf_checkpoint(tmp_path / "exported", 30)
    result = evaluate_checkpoint(exported, 30, config=hf_config(tmp_path), timeout=120)
    assert result.states == {"qa": "recorded"}
    assert [(h["run"], h["iteration"]) for h in history(tmp_path / "cache")] == [("tiny", 30)]


def test_evaluate_checkpoint_names_a_run_the_config_does_not_have(tmp_path):
    from evaluator.common.errors import EvaluatorError
    path = hf_checkpoint(tmp_path / "ckpt", 10)
    with pytest.raises(EvaluatorError, match=r"run='nope': .* no such run \(auto_eval.watch.paths runs: tiny\)"):
        evaluate_checkpoint(path, 10, config=hf_config(tmp_path), run="nope")


def test_evaluate_checkpoint_hands_off_to_the_running_daemon_which_records_it(tmp_path, venvs, daemons):
    ckpt = tmp_path / "ckpt"
    hf_checkpoint(ckpt, 10)
    cfg = hf_config(tmp_path, poll_seconds=0.5)
    d = daemons(cfg)
    wait_until(lambda: "daemon started" in d.log(), what="the daemon to start (it holds the cache_dir lock)")
    path = hf_checkpoint(ckpt, 20)
    result = evaluate_checkpoint(path, 20, config=cfg)
    assert result.handed_to_daemon and result.exit_code is None
    result.wait(timeout=60, interval=0.2)
    assert result.states == {"qa": "recorded"} and result.metrics["qa"]["iteration_k"] == 0.02
    assert d.stop() == 0
    # 20 was handed over; 10 (no notice) was still settling: the daemon took only what the notice said was done
    assert [(h["iteration"], h["benchmark"]) for h in history(tmp_path / "cache")] == [(20, "qa")]
    assert "handed" not in d.log() and os.path.exists(result.notice)


def test_notify_checkpoint_lets_a_running_daemon_take_a_checkpoint_without_settling(tmp_path, venvs, daemons):
    ckpt = tmp_path / "ckpt"
    (ckpt).mkdir()
    cfg = hf_config(tmp_path, poll_seconds=0.5)
    d = daemons(cfg)
    wait_until(lambda: "daemon started" in d.log(), what="the daemon to start")
    notify_checkpoint(hf_checkpoint(ckpt, 10), 10, config=cfg)
    hf_checkpoint(ckpt, 20)
    wait_until(lambda: [h["iteration"] for h in history(tmp_path / "cache")] == [10], what="10 recorded")
    assert d.stop() == 0
    assert [r["iteration"] for r in ledger_rows(tmp_path / "cache")] == [10]


def test_a_checkpoints_states_and_done_come_from_one_ledger_read(tmp_path):
    """The flake CI met: wait() read 'scored', the daemon recorded the row, and `done` read the ledger again and
    said final, so wait() returned {'qa': 'scored'}. `done` now sets `states` from the read it answers from."""
    from evaluator.api.training import CheckpointEvaluation
    from evaluator.daemon import ledger as L
    cache = tmp_path / "cache"
    cache.mkdir()
    led = L.Ledger(str(cache))
    led.add("tiny", 20, "qa", str(tmp_path / "ckpt"), state=L.SCORED)
    result = CheckpointEvaluation("tiny", 20, str(tmp_path / "ckpt"), str(cache), True, "notice").refresh()
    assert result.states == {"qa": "scored"}
    led.transition(("tiny", 20, "qa"), L.RECORDED)  # the daemon records it after refresh() read the ledger
    assert result.done and result.states == {"qa": "recorded"}  # `done` read them again, `states` with it
    led.close()


def test_a_checkpoints_metrics_are_those_its_result_folders_hold_at_each_refresh(tmp_path):
    """metrics were kept from an earlier refresh() after a rerun moved the result folder aside."""
    from evaluator.api.training import CheckpointEvaluation
    from evaluator.common.contracts import DONE_FILE, EVALUATION, result_dir
    from evaluator.daemon import ledger as L
    cache = tmp_path / "cache"
    cache.mkdir()
    led = L.Ledger(str(cache))
    led.add("tiny", 20, "qa", str(tmp_path / "ckpt"), state=L.SCORED)
    led.close()
    folder = result_dir(str(cache), "tiny", 20, "qa")
    os.makedirs(folder)
    with open(os.path.join(folder, DONE_FILE[EVALUATION]), "w") as f:
        json.dump({"metrics": {"em": 0.5}}, f)
    result = CheckpointEvaluation("tiny", 20, str(tmp_path / "ckpt"), str(cache), True, "notice").refresh()
    assert result.metrics == {"qa": {"em": 0.5}}
    os.rename(folder, folder + ".moved")  # `rerun` moves a result folder aside before the row starts again
    assert result.refresh().metrics == {} and result.states == {"qa": "scored"}


# ---- the Hugging Face Trainer callback (a real Trainer in the inference venv: the user's environment) --------------
TRAIN = textwrap.dedent("""
    import sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from evaluator.api import EvaluatorCallback

    model_dir, out, cfg = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(["the sky is blue"] * 8, return_tensors="pt").input_ids

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    callback = EvaluatorCallback(config=cfg)
    args = TrainingArguments(out, max_steps=4, save_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=Data(), processing_class=tok, callbacks=[callback]).train()
    print("NOTICES", len(callback.notices))
""")


@pytest.mark.slow
def test_trainer_callback_notices_let_the_daemon_take_each_checkpoint_without_waiting_to_settle(
        tmp_path, venvs, tiny_lm):
    ckpt = tmp_path / "ckpt"
    cfg = hf_config(tmp_path, iteration_interval=2)
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    proc = subprocess.run([venvs["inference"], str(script), tiny_lm("gpt2"), str(ckpt), cfg],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "NOTICES 2" in proc.stdout
    # --once waits for every settling checkpoint: with settle_seconds an hour, it ends now only because each
    # checkpoint's notice said it was finished
    run = run_cli("--config", cfg, "--once", timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert sorted((h["iteration"], h["benchmark"]) for h in history(tmp_path / "cache")) == [(2, "qa"), (4, "qa")]
    notice = json.loads((tmp_path / "cache" / "notices" / "tiny" / "iter_0000004.json").read_text())
    assert notice["path"] == str(ckpt / "checkpoint-4") and notice["by"] == "EvaluatorCallback"


# ---- examples/train_and_evaluate.py ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_training_example_evaluates_in_the_loop_and_records_its_last_checkpoint(tmp_path, venvs):
    import re

    from conftest import ROOT
    out = tmp_path / "example"
    proc = subprocess.run([venvs["inference"], os.path.join(ROOT, "examples", "train_and_evaluate.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    quick = {int(s): float(v) for s, v in re.findall(r"step (\d+): quick eval in the loop: exact_match ([\d.]+)",
                                                      proc.stdout)}
    assert sorted(quick) == [100, 200, 300]
    assert "completion notices written: 3" in proc.stdout
    assert "step 300: evaluate_checkpoint: ran here, states {'sums': 'recorded'}" in proc.stdout
    recorded = history(out / "cache", run="toy-sums")
    assert [(h["iteration"], h["benchmark"]) for h in recorded] == [(300, "sums")]
    # the loop's quick eval and the daemon's stages (another venv, the hf backend) agree on the same checkpoint
    assert recorded[0]["metrics"]["exact_match"] == pytest.approx(quick[300], abs=1e-3)
