"""Rotation safety: a real transformers.Trainer with save_total_limit=2 deletes checkpoints while a
slower evaluator is still behind; snapshots keep what was seen."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import shutil
import subprocess
from concurrent.futures import wait

import pytest

from conftest import (ROOT, VENVS, daemons, history, ledger_events, ledger_rows, megatron_checkpoint,  # noqa: F401
                      run_cli, venvs, wait_until, write_config)
from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import Checkpoint, HuggingFaceLayout, MegatronLayout
from evaluator.daemon.snapshots import (DEFAULT_EXCLUDES, FileStat, SnapshotKeeper, SnapshotVanished, build_manifest,
                                        dump_manifest, load_manifest, manifest_bytes, pin)

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
                              "mode": "inotify", "poll_seconds": 1,
                              # files settle after trainer_state.json; this trainer saves every second and
                              # keeps two, so the settle time must stay well below a save interval
                              "settle_seconds": 0.2})
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
    # once recorded, nothing is held any more; the ledger keeps why 3000 was read in place
    status = run_cli("status", "--config", cfg, "--json", check=0)
    assert json.loads(status.stdout)["snapshots"] == []
    with sqlite3.connect(cache / "ledger.sqlite3") as db:
        rows = dict(db.execute("SELECT iteration, note FROM snapshots WHERE note LIKE '%snapshot_max_gb%'"))
    assert list(rows) == [3000]
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
    assert size == manifest_bytes(manifest) and path.endswith("checkpoint-10")


def test_an_empty_checkpoint_folder_pins_as_an_empty_folder_and_a_missing_one_is_vanished(tmp_path):
    (tmp_path / "iter_0001000").mkdir()
    manifest = build_manifest(str(tmp_path / "iter_0001000"), [])
    path, size = pin(str(tmp_path / "iter_0001000"), str(tmp_path / "snap"), manifest, "hardlink")
    assert manifest == {} and size == 0 and os.path.isdir(path)
    with pytest.raises(SnapshotVanished, match="gone"):
        build_manifest(str(tmp_path / "iter_0002000"), [])


def test_manifest_records_size_mtime_and_inode_of_each_file(tmp_path):
    ck = make_hf(tmp_path)
    manifest = build_manifest(str(ck), DEFAULT_EXCLUDES["huggingface"])
    st = os.stat(ck / "model.safetensors")
    assert manifest["model.safetensors"] == FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def test_a_manifest_written_by_an_older_version_with_sizes_only_is_still_read():
    assert load_manifest('{"config.json": 2, "model.safetensors": 48}') == {
        "config.json": FileStat(2), "model.safetensors": FileStat(48)}


def test_a_file_rewritten_in_place_with_the_same_size_since_the_manifest_means_vanished(tmp_path):
    ck = make_hf(tmp_path)
    manifest = build_manifest(str(ck), DEFAULT_EXCLUDES["huggingface"])
    (ck / "tokenizer.json").write_text("[]")  # same size, other bytes, same inode
    later = manifest["tokenizer.json"].mtime_ns + 1_000_000_000
    os.utime(ck / "tokenizer.json", ns=(later, later))  # as a re-save a while later would stamp it
    with pytest.raises(SnapshotVanished, match="tokenizer.json was rewritten in place"):
        pin(str(ck), str(tmp_path / "snap"), manifest, "hardlink")
    assert not (tmp_path / "snap").exists()


# ---- SnapshotKeeper on a real ledger -------------------------------------------------------------------------
def make_keeper(tmp_path, layouts, mode="hardlink", max_gb=None) -> tuple[L.Ledger, SnapshotKeeper]:
    cache = str(tmp_path / "cache")
    ledger = L.Ledger(cache)
    return ledger, SnapshotKeeper(ledger, cache, layouts, mode, max_gb, None, on_done=lambda: None)


def finish_pins(keeper: SnapshotKeeper) -> list:
    wait(list(keeper.futures.values()), timeout=30)
    return keeper.collect()


def megatron_run(tmp_path, iterations, payload=b"weights") -> tuple[MegatronLayout, list[Checkpoint]]:
    root = tmp_path / "ckpt"
    paths = [megatron_checkpoint(root, it, payload=payload) for it in iterations]
    return MegatronLayout("run", str(root)), [Checkpoint("run", it, p, True) for it, p in zip(iterations, paths)]


def test_a_run_no_longer_configured_is_simply_not_active(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    ledger.put_snapshot("renamed-away", 1000, L.PINNING, c.path, manifest="{}")  # a row of a run since removed
    assert keeper.active("renamed-away") is False
    assert keeper.checkpoint_for("renamed-away", 1000, c.path) == c.path
    assert keeper.protects("renamed-away", 1000) is False
    keeper.recover()  # skips it: nothing is pinned for a run the configuration does not name
    assert not keeper.futures and ledger.snapshot("renamed-away", 1000)["state"] == L.PINNING
    assert keeper.ensure([Checkpoint("renamed-away", 2000, c.path, True)]) == []
    keeper.shutdown()


def test_ensure_reads_the_pinned_total_once_per_call_not_once_per_checkpoint(tmp_path):
    layout, checkpoints = megatron_run(tmp_path, range(1000, 21000, 1000))
    ledger, keeper = make_keeper(tmp_path, {"run": layout}, max_gb=1.0)
    statements = []
    ledger.db.set_trace_callback(statements.append)
    keeper.ensure(checkpoints)
    ledger.db.set_trace_callback(None)
    whole_table = [s for s in statements if "FROM snapshots WHERE state IN" in s]
    assert len(whole_table) == 1 and "SUM(bytes)" in whole_table[0]
    finish_pins(keeper)
    assert {r["state"] for r in ledger.snapshots()} == {L.PINNED}
    keeper.shutdown()


def test_the_budget_counts_the_pins_started_earlier_in_the_same_call(tmp_path):
    layout, checkpoints = megatron_run(tmp_path, [1000, 2000, 3000], payload=b"x" * 1_000_000)
    ledger, keeper = make_keeper(tmp_path, {"run": layout}, max_gb=0.0025)
    keeper.ensure(checkpoints)
    finish_pins(keeper)
    assert [r["state"] for r in ledger.snapshots()] == [L.PINNED, L.PINNED, L.UNPINNED]
    assert "snapshot_max_gb" in ledger.snapshot("run", 3000)["note"]
    keeper.shutdown()


def test_verify_finds_nothing_changed_in_an_untouched_snapshot(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    keeper.ensure([c])
    finish_pins(keeper)
    assert ledger.snapshot("run", 1000)["state"] == L.PINNED
    assert keeper.verify("run", 1000) is None


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_verify_catches_a_pinned_file_that_changed(tmp_path, mode):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout}, mode=mode)
    keeper.ensure([c])
    finish_pins(keeper)
    snap = ledger.snapshot("run", 1000)["path"]
    with open(os.path.join(snap, "mp_rank_00", "model_optim_rng.pt"), "r+b") as f:
        f.truncate(3)
    assert keeper.verify("run", 1000).startswith("mp_rank_00/model_optim_rng.pt is 3 bytes")
    keeper.shutdown()


def test_a_run_without_snapshots_gets_a_manifest_so_verify_checks_the_original(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout}, mode="none")
    assert keeper.ensure([c]) == [] and not keeper.futures
    row = ledger.snapshot("run", 1000)
    assert row["state"] == L.UNPINNED and row["source"] == c.path
    assert keeper.checkpoint_for("run", 1000, c.path) == c.path  # read in place
    assert keeper.verify("run", 1000) is None
    with open(os.path.join(c.path, "mp_rank_00", "model_optim_rng.pt"), "ab") as f:
        f.write(b" and more")
    assert "mp_rank_00/model_optim_rng.pt is 16 bytes, 7 when it was found complete" in keeper.verify("run", 1000)


def test_a_checkpoint_over_the_budget_is_verified_in_place(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000], payload=b"x" * 1_000_000)
    ledger, keeper = make_keeper(tmp_path, {"run": layout}, max_gb=0.0005)
    keeper.ensure([c])
    assert ledger.snapshot("run", 1000)["state"] == L.UNPINNED
    os.remove(os.path.join(c.path, "mp_rank_00", "model_optim_rng.pt"))
    assert keeper.verify("run", 1000).startswith("mp_rank_00/model_optim_rng.pt is gone")


def test_discard_drops_files_and_row_so_the_next_ensure_pins_again(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    keeper.ensure([c])
    finish_pins(keeper)
    old = ledger.snapshot("run", 1000)["path"]
    keeper.discard("run", 1000)
    assert ledger.snapshot("run", 1000) is None and not os.path.exists(old)
    assert keeper.checkpoint_for("run", 1000, c.path) is None  # stages wait for the new pin
    keeper.ensure([c])
    finish_pins(keeper)
    assert ledger.snapshot("run", 1000)["state"] == L.PINNED and keeper.verify("run", 1000) is None
    keeper.shutdown()


def test_release_removes_one_iterations_snapshot_and_keeps_the_others(tmp_path):
    layout, checkpoints = megatron_run(tmp_path, [1000, 2000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    keeper.ensure(checkpoints)
    finish_pins(keeper)
    paths = {it: ledger.snapshot("run", it)["path"] for it in (1000, 2000)}
    keeper.release("run", 1000)
    assert ledger.snapshot("run", 1000)["state"] == L.RELEASED and not os.path.exists(paths[1000])
    assert ledger.snapshot("run", 2000)["state"] == L.PINNED and os.path.exists(paths[2000])
    keeper.shutdown()


def test_a_snapshot_that_cannot_be_deleted_at_release_is_named_in_a_warning(tmp_path, caplog):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    keeper.ensure([c])
    finish_pins(keeper)
    locked = os.path.join(ledger.snapshot("run", 1000)["path"], "mp_rank_00")
    # root ignores permissions, so the folder is made immutable; chattr needs root and ext4/xfs/btrfs
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", locked], capture_output=True).returncode:
        pytest.skip("chattr +i does not work here: no folder can be made undeletable")
    try:
        with caplog.at_level(logging.INFO, logger="evaluator"):
            keeper.release("run", 1000)  # does not raise
    finally:
        subprocess.run(["chattr", "-i", locked], check=True)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{locked}/model_optim_rng.pt: Operation not permitted" in warning and "delete them by hand" in warning
    assert "snapshot released" not in caplog.text
    assert os.path.exists(os.path.join(locked, "model_optim_rng.pt"))
    assert ledger.snapshot("run", 1000)["state"] == L.RELEASED
    keeper.shutdown()


def test_release_closes_a_row_read_in_place(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout}, mode="none")
    keeper.ensure([c])
    keeper.release("run", 1000)
    assert ledger.snapshot("run", 1000)["state"] == L.RELEASED and os.path.exists(c.path)


def test_recover_redoes_an_interrupted_pin_from_a_manifest_with_sizes_only(tmp_path):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    ledger.put_snapshot("run", 1000, L.PINNING, c.path, bytes=7, manifest='{"mp_rank_00/model_optim_rng.pt": 7}')
    keeper.recover()
    finish_pins(keeper)
    assert ledger.snapshot("run", 1000)["state"] == L.PINNED
    keeper.shutdown()


def test_hf_checkpoint_pinned_and_verified_without_its_optimizer_state(tmp_path):
    ck = make_hf(tmp_path)
    ledger, keeper = make_keeper(tmp_path, {"run": HuggingFaceLayout("run", str(tmp_path))})
    keeper.ensure([Checkpoint("run", 10, str(ck), True)])
    finish_pins(keeper)
    (ck / "optimizer.pt").write_text("the trainer may touch what is not pinned")
    assert keeper.verify("run", 10) is None
    keeper.shutdown()


def save_again(path, data: bytes) -> None:
    """What a resumed Trainer does to a file of an iteration it saves again: a new file in its place (new inode)."""
    with open(f"{path}.tmp", "wb") as f:
        f.write(data)
    os.replace(f"{path}.tmp", path)


def pinned_hf(tmp_path, mode) -> tuple:
    ck = make_hf(tmp_path)
    ledger, keeper = make_keeper(tmp_path, {"run": HuggingFaceLayout("run", str(tmp_path))}, mode=mode)
    keeper.ensure([Checkpoint("run", 10, str(ck), True)])
    finish_pins(keeper)
    assert ledger.snapshot("run", 10)["state"] == L.PINNED and keeper.verify("run", 10) is None
    return ck, ledger, keeper


def test_verify_catches_the_original_saved_again_after_a_copy_was_pinned(tmp_path):
    ck, ledger, keeper = pinned_hf(tmp_path, "copy")
    weights = ck / "model.safetensors"
    save_again(weights, weights.read_bytes()[:-1] + b"\1")  # other weights, same size: only the inode tells
    assert keeper.verify("run", 10) == (f"the original {ck} was saved again after the pin "
                                        f"(model.safetensors was replaced by another file)")
    keeper.shutdown()


def test_verify_catches_the_original_saved_again_where_a_hardlink_snapshot_copied_a_small_file(tmp_path):
    ck, ledger, keeper = pinned_hf(tmp_path, "hardlink")
    save_again(ck / "tokenizer.json", b'{"vocab": "another"}')  # under LINK_FROM_BYTES: the snapshot has a copy
    assert keeper.verify("run", 10).startswith(f"the original {ck} was saved again after the pin (tokenizer.json is ")
    keeper.shutdown()


def test_an_original_that_cannot_be_checked_leaves_the_result_standing_with_a_warning(tmp_path, caplog):
    """The trainer's storage failing a stat of the original (ESTALE mid-rotation on NFS, EIO) escaped verify: the
    stage's end was dropped (its row left inferring) and a restarting daemon crashed in recovery. The fault is
    real: the original's file is replaced by a symbolic link to itself, whose stat fails with ELOOP."""
    import errno
    import logging

    ck, ledger, keeper = pinned_hf(tmp_path, "copy")
    weights = ck / "model.safetensors"
    weights.unlink()
    os.symlink(weights, weights)
    with pytest.raises(OSError) as e:
        os.stat(weights)
    assert e.value.errno == errno.ELOOP
    with caplog.at_level(logging.WARNING, logger="evaluator"):
        assert keeper.verify("run", 10) is None  # the snapshot, what the stage read, is whole
    assert f"could not check whether {ck} was saved again" in caplog.text
    keeper.shutdown()


@pytest.mark.parametrize("rotated", ["the whole checkpoint", "one file, the rest still being deleted"])
def test_an_original_rotated_away_after_the_pin_is_not_a_change(tmp_path, rotated):
    ck, ledger, keeper = pinned_hf(tmp_path, "copy")
    if rotated == "the whole checkpoint":
        shutil.rmtree(ck)
    else:
        (ck / "config.json").unlink()
    assert keeper.verify("run", 10) is None
    keeper.shutdown()


def test_a_pinned_row_written_before_the_originals_manifest_was_kept_checks_only_the_snapshot(tmp_path):
    ck, ledger, keeper = pinned_hf(tmp_path, "copy")
    row = ledger.snapshot("run", 10)
    ledger.set_snapshot("run", 10, L.PINNED, manifest=dump_manifest(load_manifest(row["manifest"])))  # the old form
    save_again(ck / "model.safetensors", (ck / "model.safetensors").read_bytes())
    assert keeper.verify("run", 10) is None  # nothing to compare the original with
    with open(os.path.join(row["path"], "model.safetensors"), "r+b") as f:
        f.truncate(3)
    assert keeper.verify("run", 10).startswith("model.safetensors is 3 bytes")
    keeper.shutdown()


def fail_next_ledger_write(ledger: L.Ledger, monkeypatch, after: int = 0) -> None:
    """set_snapshot raises LedgerUnavailable once, after `after` writes: a full disk at the commit cannot be timed
    for real, so the fault is injected."""
    real, calls = ledger.set_snapshot, []

    def write(*args, **kwargs):
        calls.append(args)
        if len(calls) == after + 1:
            raise L.LedgerUnavailable(f"cannot write the ledger {ledger.path}: database or disk is full")
        real(*args, **kwargs)

    monkeypatch.setattr(ledger, "set_snapshot", write)


@pytest.mark.parametrize("outcome", [L.PINNED, L.VANISHED, L.UNPINNED])
def test_a_pin_outcome_the_ledger_could_not_record_is_recorded_by_the_next_collect(tmp_path, monkeypatch, outcome):
    layout, (c,) = megatron_run(tmp_path, [1000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    if outcome == L.VANISHED:  # the manifest says 8 bytes, the file has 7: rewritten since it was found complete
        ledger.put_snapshot("run", 1000, L.PINNING, c.path, manifest='{"mp_rank_00/model_optim_rng.pt": 8}')
        keeper.recover()
    else:
        if outcome == L.UNPINNED:  # a file where the snapshot folder goes: pinning fails with an OSError
            (tmp_path / "cache" / "snapshots").mkdir()
            (tmp_path / "cache" / "snapshots" / "run").write_text("in the way")
        keeper.ensure([c])
    wait(list(keeper.futures.values()), timeout=30)
    fail_next_ledger_write(ledger, monkeypatch)
    with pytest.raises(L.LedgerUnavailable):
        keeper.collect()  # the daemon pauses
    assert ledger.snapshot("run", 1000)["state"] == L.PINNING and keeper.busy()
    vanished = keeper.collect()  # the ledger can be written again
    row = ledger.snapshot("run", 1000)
    assert row["state"] == outcome and not keeper.busy()
    assert [v[:2] for v in vanished] == ([("run", 1000)] if outcome == L.VANISHED else [])
    assert keeper.checkpoint_for("run", 1000, c.path) == (row["path"] if outcome == L.PINNED else c.path)
    keeper.shutdown()


def test_a_vanished_pin_recorded_before_a_failed_ledger_write_is_still_returned(tmp_path, monkeypatch):
    layout, checkpoints = megatron_run(tmp_path, [1000, 2000])
    ledger, keeper = make_keeper(tmp_path, {"run": layout})
    for c, size in zip(checkpoints, (8, 7)):  # 1000's manifest does not match its file: vanished mid-pin
        manifest = json.dumps({"mp_rank_00/model_optim_rng.pt": size})
        ledger.put_snapshot("run", c.iteration, L.PINNING, c.path, manifest=manifest)
    keeper.recover()
    wait(list(keeper.futures.values()), timeout=30)
    fail_next_ledger_write(ledger, monkeypatch, after=1)  # 1000 is recorded vanished, 2000's write fails
    with pytest.raises(L.LedgerUnavailable):
        keeper.collect()
    assert [v[:2] for v in keeper.collect()] == [("run", 1000)]
    assert [r["state"] for r in ledger.snapshots()] == [L.VANISHED, L.PINNED]
    keeper.shutdown()
