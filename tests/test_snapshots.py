"""Rotation safety: a real transformers.Trainer with save_total_limit=2 deletes checkpoints while a
slower evaluator is still behind; snapshots keep what was seen."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import (ROOT, VENVS, daemons, history, ledger_events, ledger_rows, megatron_checkpoint,  # noqa: F401
                      run_cli, venvs, wait_until, write_config)
from evaluator.daemon.snapshots import DEFAULT_EXCLUDES, SnapshotVanished, build_manifest, pin

LOADER = os.path.join(ROOT, "tests", "stage_scripts", "load_hf_checkpoint.py")
TRAINER = os.path.join(ROOT, "tests", "stage_scripts", "hf_rotating_trainer.py")


def loader_bench(sleep: float) -> dict:
    return {"name": "gen", "type": "command",
            "inference": f"{{python}} {LOADER} {{checkpoint}} {{output_dir}} --sleep {sleep}",
            "evaluation": "echo '{{\"loaded\": 1}}' > metrics.json"}


def run_trainer_under_daemon(tmp_path, daemons, snapshot: str, stage_sleep: float):
    run = tmp_path / "ckpt"
    run.mkdir()
    cfg = write_config(tmp_path, [loader_bench(stage_sleep)],
                       watch={"layout": "huggingface", "iteration_interval": 5, "snapshot": snapshot,
                              "mode": "inotify", "poll_seconds": 1})
    d = daemons(cfg)
    wait_until(lambda: "watching" in d.log(), what="daemon watching")
    trainer = subprocess.run([os.path.join(VENVS, "inference", "bin", "python"), TRAINER, "--out", str(run),
                              "--steps", "30", "--save-steps", "5", "--save-total-limit", "2",
                              "--step-seconds", "0.2"], capture_output=True, text=True, timeout=300)
    assert trainer.returncode == 0, trainer.stderr
    saves = json.loads((run / "saves.json").read_text())
    assert len(saves) == 6 and len(list(run.glob("checkpoint-*"))) == 2  # the Trainer rotated the rest away
    cache = tmp_path / "cache"

    def settled():
        rows = ledger_rows(cache)
        return len(rows) >= 1 and all(r["state"] in ("recorded", "vanished", "failed") for r in rows) and rows

    # every save must have been seen; wait until nothing is left to do
    wait_until(lambda: settled() and {r["iteration"] for r in ledger_rows(cache)} == set(saves), timeout=240,
               interval=0.5, what="every saved checkpoint to reach a final state")
    assert d.stop() == 0
    return cache, saves, {r["iteration"]: r for r in ledger_rows(cache)}


def test_hardlink_snapshots_evaluate_every_checkpoint_the_trainer_saved(tmp_path, venvs, daemons):
    cache, saves, rows = run_trainer_under_daemon(tmp_path, daemons, "hardlink", stage_sleep=1.0)
    recorded = sorted(it for it, r in rows.items() if r["state"] == "recorded")
    print(f"hardlink: {len(recorded)}/{len(saves)} saved checkpoints evaluated")
    assert recorded == saves
    for h in history(cache):
        assert h["metrics"]["loaded"] == 1
    for it in saves:
        pred = json.loads((cache / "results" / "tiny" / f"iter_{it:07d}" / "gen" / "predictions.jsonl").read_text())
        assert pred["checkpoint"].startswith(str(cache / "snapshots"))  # the stage read the snapshot
        assert "model.safetensors" in pred["files"] and "tokenizer.json" in pred["files"]
        assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} & set(pred["files"])
    # every snapshot released once its iteration was recorded
    assert not any((cache / "snapshots" / "tiny").iterdir())


def test_without_snapshots_rotated_checkpoints_end_vanished_without_retry_storms(tmp_path, venvs, daemons):
    cache, saves, rows = run_trainer_under_daemon(tmp_path, daemons, "none", stage_sleep=1.0)
    recorded = sorted(it for it, r in rows.items() if r["state"] == "recorded")
    vanished = sorted(it for it, r in rows.items() if r["state"] == "vanished")
    print(f"none: {len(recorded)}/{len(saves)} saved checkpoints evaluated, {len(vanished)} vanished")
    assert vanished, "rotation should overtake a stage this slow"
    assert sorted(recorded + vanished) == saves
    for it in vanished:  # each vanished job was tried at most once, never retried
        starts = [e for e in ledger_events(cache) if e["iteration"] == it and e["to_state"] == "inferring"]
        assert len(starts) <= 1 and rows[it]["attempts"] == 0
    assert not (cache / "snapshots").exists() or not any((cache / "snapshots").rglob("*.safetensors"))


def test_snapshot_budget_evaluates_the_overflow_in_place_and_says_so(tmp_path, venvs, daemons):
    from conftest import bench
    for it in (1000, 2000, 3000):
        megatron_checkpoint(tmp_path / "ckpt", it, payload=b"x" * 1_000_000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=0.5)],
                       watch={"snapshot": "hardlink", "snapshot_max_gb": 0.0025})
    proc = run_cli("--config", cfg, "--once", check=0)
    assert "snapshot budget" in proc.stderr
    cache = tmp_path / "cache"
    assert {r["state"] for r in ledger_rows(cache)} == {"recorded"}
    status = run_cli("status", "--config", cfg, "--json", check=0)
    snaps = json.loads(status.stdout)["snapshots"]
    assert [s["iteration"] for s in snaps] == [3000] and snaps[0]["state"] == "unpinned"
    assert "snapshot_max_gb" in snaps[0]["note"]
    pred = (cache / "results" / "tiny" / "iter_0003000" / "qa" / "predictions.jsonl").read_text()
    assert json.loads(pred)["checkpoint"] == str(tmp_path / "ckpt" / "iter_0003000")  # in place


def test_status_lists_pinned_snapshots_with_their_size(tmp_path, venvs, daemons):
    from conftest import bench
    megatron_checkpoint(tmp_path / "ckpt", 1000, payload=b"x" * 2_000_000)
    cfg = write_config(tmp_path, [bench("qa", infer_sleep=30)], watch={"snapshot": "hardlink"})
    d = daemons(cfg)
    wait_until(lambda: [r for r in ledger_rows(tmp_path / "cache") if r["state"] == "inferring"], what="inferring")
    out = run_cli("status", "--config", cfg, check=0).stdout
    assert "snapshots: 1 held, 2.0 MB pinned" in out and "pinned" in out
    snap = tmp_path / "cache" / "snapshots" / "tiny" / "1000"
    assert (snap / "latest_checkpointed_iteration.txt").read_text() == "1000"  # loads like the original folder
    assert (snap / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt").stat().st_size == 2_000_000
    assert d.stop() == 0


def test_copy_mode_is_chosen_automatically_for_a_cache_on_another_filesystem(tmp_path, venvs):
    from conftest import bench
    shm = "/dev/shm"
    assert os.path.isdir(shm) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "needs a tmpfs at /dev/shm"
    megatron_checkpoint(tmp_path / "ckpt", 1000, payload=b"y" * 10_000)
    cache = os.path.join(shm, f"ckpt-eval-test-{os.getpid()}-{tmp_path.name}")
    try:
        cfg = write_config(tmp_path, [bench("qa")], cache_dir=cache, watch={"snapshot": "hardlink"})
        refused = run_cli("--config", cfg, "--once")
        assert refused.returncode == 2 and "auto_eval.watch.snapshot" in refused.stderr
        cfg = write_config(tmp_path, [bench("qa")], cache_dir=cache, watch={"snapshot": "auto"})
        proc = run_cli("--config", cfg, "--once", check=0)
        assert "(copy)" in proc.stderr
        assert {r["state"] for r in ledger_rows(cache)} == {"recorded"}
    finally:
        subprocess.run(["rm", "-rf", cache])


# ---- pinning itself (deterministic faults on real files) ---------------------------------------------
def make_hf(tmp_path):
    ck = tmp_path / "checkpoint-10"
    ck.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (ck / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    for name, data in {"config.json": "{}", "tokenizer.json": "{}", "optimizer.pt": "o" * 100,
                       "rng_state.pth": "r", "trainer_state.json": "{}"}.items():
        (ck / name).write_text(data)
    return ck


def test_manifest_pins_weights_and_tokenizer_but_never_optimizer_or_rng_state(tmp_path):
    manifest = build_manifest(str(make_hf(tmp_path)), DEFAULT_EXCLUDES["huggingface"])
    assert sorted(manifest) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_a_file_deleted_after_the_completeness_check_means_vanished_and_no_half_snapshot(tmp_path, mode):
    ck = make_hf(tmp_path)
    manifest = build_manifest(str(ck), DEFAULT_EXCLUDES["huggingface"])
    (ck / "tokenizer.json").unlink()  # the trainer's rotation got there first
    root = tmp_path / "snap"
    with pytest.raises(SnapshotVanished, match="tokenizer.json was deleted"):
        pin(str(ck), str(root), manifest, mode)
    assert not root.exists()


def test_a_file_whose_size_changed_since_the_completeness_check_means_vanished(tmp_path):
    ck = make_hf(tmp_path)
    manifest = build_manifest(str(ck), DEFAULT_EXCLUDES["huggingface"])
    (ck / "config.json").write_text('{"now": "different"}')
    with pytest.raises(SnapshotVanished, match="config.json is"):
        pin(str(ck), str(tmp_path / "snap"), manifest, "copy")
    assert not (tmp_path / "snap").exists()


def test_a_hardlinked_snapshot_survives_the_deletion_of_the_original(tmp_path):
    ck = make_hf(tmp_path)
    manifest = build_manifest(str(ck), DEFAULT_EXCLUDES["huggingface"])
    path, size = pin(str(ck), str(tmp_path / "snap"), manifest, "hardlink")
    before = (ck / "model.safetensors").read_bytes()
    subprocess.run(["rm", "-rf", str(ck)], check=True)
    assert (tmp_path / "snap" / "checkpoint-10" / "model.safetensors").read_bytes() == before
    assert size == sum(manifest.values()) and path.endswith("checkpoint-10")


def test_an_empty_checkpoint_folder_pins_as_an_empty_folder_and_a_missing_one_is_vanished(tmp_path):
    (tmp_path / "iter_0001000").mkdir()
    manifest = build_manifest(str(tmp_path / "iter_0001000"), [])
    path, size = pin(str(tmp_path / "iter_0001000"), str(tmp_path / "snap"), manifest, "hardlink")
    assert manifest == {} and size == 0 and os.path.isdir(path)
    with pytest.raises(SnapshotVanished, match="gone"):
        build_manifest(str(tmp_path / "iter_0002000"), [])
