"""Specification of checkpoint discovery: which checkpoints exist, and which are *complete*.

The daemon must never evaluate a half-written checkpoint; these tests build each layout's
in-between states on disk (tracker missing or being written, shards missing, a torn
safetensors file, files still growing) and say what a scan reports for each.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from evaluator.daemon.checkpoints import (
    DeepSpeedLayout, GlobLayout, HuggingFaceLayout, MegatronLayout, Selection, SettleTracker, safetensors_complete,
)

ROOT = Path(__file__).resolve().parents[1]
DAEMON_PYTHON = ROOT / ".venvs" / "daemon" / "bin" / "python"
EVALUATOR = ROOT / "tools" / "evaluator.py"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settled_scan(layout, known_complete=frozenset()):
    """What a scan reports once the files stood still for settle_seconds: two scans on a fake clock."""
    clock = FakeClock()
    layout.settle = SettleTracker(layout.settle.settle_seconds, clock=clock)
    layout.scan(known_complete)
    clock.advance(layout.settle.settle_seconds)
    return layout.scan(known_complete)


def by_iteration(checkpoints) -> dict:
    return {c.iteration: c for c in checkpoints}


def complete_iterations(checkpoints) -> list[int]:
    return [c.iteration for c in checkpoints if c.complete]


# ---- writing layouts by hand ------------------------------------------------------------------
def make_megatron(root: Path, iterations, tracker=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for it in iterations:
        (root / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
        (root / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"weights")
    if tracker is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    return root


def safetensors_bytes(tensors: dict[str, int]) -> bytes:
    """A real safetensors file: 8-byte little-endian header length, JSON header with data_offsets, data.

    `tensors` maps a tensor name to its number of float32 values.
    """
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, count in tensors.items():
        payload = struct.pack(f"<{count}f", *(float(i) for i in range(count)))
        header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads its header to a multiple of 8 bytes
    return struct.pack("<Q", len(raw)) + raw + data


def make_hf_checkpoint(root: Path, step: int, *, shards: int = 1, trainer_state: bool = True) -> Path:
    """A whole `checkpoint-N/` as transformers' Trainer writes it (config, weights, trainer_state last).

    shards=1: one model.safetensors; shards>1: an index and its shards; shards=0: no weights.
    """
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    if shards == 1:
        (path / "model.safetensors").write_bytes(safetensors_bytes({"embed": 16, "head": 8}))
    elif shards > 1:
        weight_map = {}
        for i in range(1, shards + 1):
            name = f"model-{i:05d}-of-{shards:05d}.safetensors"
            (path / name).write_bytes(safetensors_bytes({f"layer{i}": 16}))
            weight_map[f"layer{i}"] = name
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 64 * shards}, "weight_map": weight_map}))
    if trainer_state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


# ---- Megatron -------------------------------------------------------------------------------------
def test_megatron_iterations_up_to_the_tracker_are_complete(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000, 3000], tracker="3000")
    found = settled_scan(MegatronLayout("run", str(root)))
    assert [(c.iteration, c.complete) for c in found] == [(1000, True), (2000, True), (3000, True)]
    assert found[0].path == str(root / "iter_0001000")
    assert all(c.run == "run" for c in found)


def test_megatron_iteration_beyond_tracker_is_not_complete(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000, 3000], tracker="2000")
    found = by_iteration(settled_scan(MegatronLayout("run", str(root))))
    assert complete_iterations(found.values()) == [1000, 2000]
    assert not found[3000].complete
    assert "still being written" in found[3000].reason


def test_megatron_tracker_with_trailing_newline_is_read(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000], tracker="1000\n")
    assert complete_iterations(settled_scan(MegatronLayout("run", str(root)))) == [1000]


def test_megatron_without_tracker_nothing_is_complete(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000], tracker=None)
    found = MegatronLayout("run", str(root)).scan()
    assert [c.iteration for c in found] == [1000, 2000]
    assert complete_iterations(found) == []
    assert all("latest_checkpointed_iteration.txt" in c.reason for c in found)


def test_megatron_empty_tracker_being_written_completes_nothing(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="")
    found = MegatronLayout("run", str(root)).scan()
    assert [c.iteration for c in found] == [1000]
    assert complete_iterations(found) == []


@pytest.mark.parametrize("garbage", ["two thousand", "2000.5", "-1000", "iter_0002000"])
def test_megatron_unparseable_tracker_completes_nothing(tmp_path, garbage):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000], tracker=garbage)
    found = MegatronLayout("run", str(root)).scan()
    assert [c.iteration for c in found] == [1000, 2000]
    assert complete_iterations(found) == []


def test_megatron_release_tracker_reports_release_dir_as_iteration_0(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000], tracker="release")
    (root / "release" / "mp_rank_00").mkdir(parents=True)
    (root / "release" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"converted weights")
    found = settled_scan(MegatronLayout("run", str(root)))
    assert [(c.iteration, c.complete) for c in found] == [(0, True), (1000, False), (2000, False)]
    assert found[0].path == str(root / "release")
    assert "release" in found[1].reason


def test_megatron_release_tracker_without_release_dir_completes_nothing(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="release")
    found = MegatronLayout("run", str(root)).scan()
    assert [(c.iteration, c.complete) for c in found] == [(1000, False)]


def test_megatron_release_dir_is_ignored_while_tracker_names_an_iteration(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="1000")
    (root / "release").mkdir()
    assert [(c.iteration, c.complete) for c in settled_scan(MegatronLayout("run", str(root)))] == [(1000, True)]


def test_megatron_entries_that_are_not_iteration_dirs_are_ignored(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="9000")
    for name in ("iter_abc", "iter_", "iter_0003000.tmp", "old_iter_0004000", "tensorboard", "logs"):
        (root / name).mkdir()
    (root / "iter_0002000").write_text("a file, not a checkpoint dir")
    found = settled_scan(MegatronLayout("run", str(root)))
    assert [(c.iteration, c.complete) for c in found] == [(1000, True)]


def test_megatron_folder_not_created_yet_has_no_checkpoints(tmp_path):
    assert MegatronLayout("run", str(tmp_path / "not-yet")).scan() == []


# ---- DeepSpeed ------------------------------------------------------------------------------------
def make_deepspeed(root: Path, steps, latest=None) -> Path:
    for step in steps:
        (root / f"global_step{step}").mkdir(parents=True)
        (root / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"w")
    if latest is not None:
        (root / "latest").write_text(latest)
    return root


def test_deepspeed_steps_up_to_the_latest_file_are_complete(tmp_path):
    root = make_deepspeed(tmp_path / "ds", [100, 200, 300], latest="global_step200")
    found = by_iteration(settled_scan(DeepSpeedLayout("run", str(root))))
    assert complete_iterations(found.values()) == [100, 200]
    assert not found[300].complete
    assert found[200].path == str(root / "global_step200")


def test_deepspeed_without_latest_file_completes_nothing(tmp_path):
    root = make_deepspeed(tmp_path / "ds", [100, 200])
    found = DeepSpeedLayout("run", str(root)).scan()
    assert [c.iteration for c in found] == [100, 200]
    assert complete_iterations(found) == []


@pytest.mark.parametrize("latest", ["", "200", "global_step", "global_stepXYZ"])
def test_deepspeed_latest_file_not_naming_a_step_completes_nothing(tmp_path, latest):
    root = make_deepspeed(tmp_path / "ds", [100, 200], latest=latest)
    assert complete_iterations(DeepSpeedLayout("run", str(root)).scan()) == []


# ---- safetensors -------------------------------------------------------------------------------------
def test_safetensors_file_as_long_as_its_header_says_is_complete(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"embed": 16, "head": 8}))
    assert safetensors_complete(str(path))


@pytest.mark.parametrize("keep", [0, 4, 8, 20, -1], ids=["empty", "half-length-field", "no-header", "torn-header",
                                                        "one-byte-short"])
def test_truncated_safetensors_file_is_not_complete(tmp_path, keep):
    whole = safetensors_bytes({"embed": 16, "head": 8})
    path = tmp_path / "model.safetensors"
    path.write_bytes(whole[:keep])
    assert not safetensors_complete(str(path))


def test_preallocated_zero_filled_safetensors_file_is_not_complete(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * len(safetensors_bytes({"embed": 16})))
    assert not safetensors_complete(str(path))


def test_missing_safetensors_file_is_not_complete(tmp_path):
    assert not safetensors_complete(str(tmp_path / "gone.safetensors"))


# ---- Hugging Face -------------------------------------------------------------------------------------
def test_huggingface_checkpoint_with_trainer_state_is_complete_once_its_files_settled(tmp_path):
    make_hf_checkpoint(tmp_path, 500)
    make_hf_checkpoint(tmp_path, 1000, shards=3)
    found = settled_scan(HuggingFaceLayout("run", str(tmp_path), settle_seconds=30))
    assert [(c.iteration, c.complete) for c in found] == [(500, True), (1000, True)]
    assert found[1].path == str(tmp_path / "checkpoint-1000")


def test_huggingface_trainer_state_seen_before_the_files_settled_is_not_complete_yet(tmp_path):
    make_hf_checkpoint(tmp_path, 500)
    clock = FakeClock()
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=30)
    layout.settle = SettleTracker(30, clock=clock)
    (first,) = layout.scan()
    assert not first.complete and first.reason == "settling" and first.settle_deadline == clock.now + 30
    clock.advance(29)
    assert not layout.scan()[0].complete
    clock.advance(1)
    assert layout.scan()[0].complete


def test_huggingface_checkpoint_without_config_json_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "config.json").unlink()
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "config.json" in found.reason


def test_huggingface_half_written_config_json_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "config.json").write_text('{"model_type": "llama", "hidden_')
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "config.json not parseable" in found.reason


def test_huggingface_index_naming_a_shard_not_present_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "shard model-00002-of-00003.safetensors named by model.safetensors.index.json not present" in found.reason


def test_huggingface_bin_index_naming_a_shard_not_present_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, shards=0)
    shards = [f"pytorch_model-{i:05d}-of-00002.bin" for i in (1, 2)]
    (path / shards[0]).write_bytes(b"pickled tensors")
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}))
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0)
    (found,) = layout.scan()
    assert not found.complete
    assert shards[1] in found.reason
    (path / shards[1]).write_bytes(b"pickled tensors")
    assert settled_scan(layout)[0].complete


def test_huggingface_half_written_index_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {"layer1": "model-0')
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "index" in found.reason


def test_huggingface_shards_without_their_index_are_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, shards=2)
    (path / "model.safetensors.index.json").unlink()
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "without their index" in found.reason


def test_huggingface_checkpoint_without_weights_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "model.safetensors").unlink()
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "no weights" in found.reason


def test_huggingface_truncated_safetensors_is_not_complete_even_with_trainer_state(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    whole = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(whole[:-10])
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "model.safetensors" in found.reason


def test_huggingface_truncated_shard_named_by_the_index_is_not_complete(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, shards=3)
    shard = path / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0).scan()
    assert not found.complete
    assert "model-00003-of-00003.safetensors" in found.reason


def test_huggingface_dirs_that_are_not_checkpoints_are_ignored(tmp_path):
    make_hf_checkpoint(tmp_path, 500)
    (tmp_path / "runs").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-700").write_text("a file")
    assert [c.iteration for c in HuggingFaceLayout("run", str(tmp_path)).scan()] == [500]


def test_huggingface_without_trainer_state_completes_only_after_settling(tmp_path):
    make_hf_checkpoint(tmp_path, 500, trainer_state=False)  # save_pretrained writes no final marker
    clock = FakeClock()
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=30)
    layout.settle = SettleTracker(30, clock=clock)

    (first,) = layout.scan()
    assert not first.complete and first.reason == "settling"
    assert first.settle_deadline == clock.now + 30
    clock.advance(29)
    (still,) = layout.scan()
    assert not still.complete
    clock.advance(1)
    (settled,) = layout.scan()
    assert settled.complete


def test_huggingface_weights_still_growing_restart_the_settle_wait(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, trainer_state=False)
    (path / "optimizer.pt").write_bytes(b"x" * 10)
    clock = FakeClock()
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=30)
    layout.settle = SettleTracker(30, clock=clock)

    layout.scan()
    clock.advance(20)
    with open(path / "optimizer.pt", "ab") as f:
        f.write(b"more")
    clock.advance(20)  # 40 s since first sight, but only 20 s since the last change
    (growing,) = layout.scan()
    assert not growing.complete
    clock.advance(30)
    (settled,) = layout.scan()
    assert settled.complete


def test_huggingface_half_written_trainer_state_falls_back_to_settling(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "trainer_state.json").write_text('{"global_st')
    (found,) = HuggingFaceLayout("run", str(tmp_path), settle_seconds=3600).scan()
    assert not found.complete
    assert found.reason == "settling"


def test_huggingface_settles_for_real_with_short_settle_seconds(tmp_path):
    make_hf_checkpoint(tmp_path, 500, trainer_state=False)
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0.2)
    (first,) = layout.scan()
    assert not first.complete
    assert first.settle_deadline is not None
    time.sleep(max(first.settle_deadline - time.monotonic(), 0) + 0.01)
    (settled,) = layout.scan()
    assert settled.complete


def test_huggingface_iteration_known_complete_skips_the_deep_checks(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "config.json").unlink()  # e.g. cleaned up after it was evaluated
    (found,) = HuggingFaceLayout("run", str(tmp_path)).scan(known_complete=frozenset({500}))
    assert found.complete


# ---- SettleTracker ---------------------------------------------------------------------------------
def test_settle_tracker_first_sight_is_not_settled_and_says_when_to_look_again(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    clock = FakeClock(50.0)
    settled, deadline = SettleTracker(5, clock=clock).check(str(tmp_path / "f"))
    assert (settled, deadline) == (False, 55.0)


def test_settle_tracker_settles_once_unchanged_for_settle_seconds(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    clock = FakeClock()
    tracker = SettleTracker(5, clock=clock)
    tracker.check(str(tmp_path / "f"))
    clock.advance(4.9)
    assert tracker.check(str(tmp_path / "f"))[0] is False
    clock.advance(0.1)
    assert tracker.check(str(tmp_path / "f")) == (True, None)


def test_settle_tracker_change_restarts_the_wait(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    clock = FakeClock(0.0)
    tracker = SettleTracker(5, clock=clock)
    tracker.check(str(f))
    clock.advance(4)
    f.write_bytes(b"abcdef")
    assert tracker.check(str(f)) == (False, 9.0)
    clock.advance(4)
    assert tracker.check(str(f))[0] is False
    clock.advance(1)
    assert tracker.check(str(f))[0] is True


def test_settle_tracker_sees_a_new_file_inside_a_directory_as_a_change(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a.bin").write_bytes(b"a")
    clock = FakeClock(0.0)
    tracker = SettleTracker(5, clock=clock)
    tracker.check(str(d))
    clock.advance(6)
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"b")
    assert tracker.check(str(d))[0] is False


def test_settle_tracker_with_zero_seconds_still_needs_a_second_look(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    tracker = SettleTracker(0, clock=FakeClock())
    assert tracker.check(str(tmp_path / "f"))[0] is False
    assert tracker.check(str(tmp_path / "f"))[0] is True


def test_settle_tracker_forget_starts_over(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    clock = FakeClock()
    tracker = SettleTracker(5, clock=clock)
    tracker.check(str(tmp_path / "f"))
    clock.advance(10)
    tracker.forget(str(tmp_path / "f"))
    assert tracker.check(str(tmp_path / "f"))[0] is False


# ---- Glob ------------------------------------------------------------------------------------------
STEP_FILES = r"step_(?P<iteration>\d+)\.ckpt"


def test_glob_entry_is_complete_only_once_its_done_marker_exists(tmp_path):
    for step in (100, 200):
        (tmp_path / f"step_{step}.ckpt").write_bytes(b"weights")
    (tmp_path / "step_100.ckpt.done").touch()
    found = by_iteration(settled_scan(GlobLayout("run", str(tmp_path), pattern=STEP_FILES, done_marker="{name}.done")))
    assert sorted(found) == [100, 200]
    assert found[100].complete
    assert not found[200].complete
    assert "step_200.ckpt.done" in found[200].reason
    assert found[100].path == str(tmp_path / "step_100.ckpt")


def test_glob_done_marker_inside_the_checkpoint_directory(tmp_path):
    for step in (100, 200):
        (tmp_path / f"ckpt-{step}").mkdir()
    (tmp_path / "ckpt-200" / "DONE").touch()
    layout = GlobLayout("run", str(tmp_path), pattern=r"ckpt-(\d+)", done_marker="{name}/DONE")
    assert complete_iterations(settled_scan(layout)) == [200]


def test_glob_done_marker_named_by_iteration(tmp_path):
    (tmp_path / "step_7.ckpt").write_bytes(b"w")
    (tmp_path / "step_8.ckpt").write_bytes(b"w")
    (tmp_path / "saved-8").touch()
    layout = GlobLayout("run", str(tmp_path), pattern=STEP_FILES, done_marker="saved-{iteration}")
    assert complete_iterations(settled_scan(layout)) == [8]


def test_glob_entries_must_match_the_whole_pattern(tmp_path):
    for name in ("step_100.ckpt", "step_100.ckpt.tmp", "old_step_200.ckpt", "step_x.ckpt"):
        (tmp_path / name).write_bytes(b"w")
    layout = GlobLayout("run", str(tmp_path), pattern=STEP_FILES, done_marker="{name}.done")
    assert [c.iteration for c in layout.scan()] == [100]


def test_glob_uses_the_named_iteration_group_over_the_first_group(tmp_path):
    (tmp_path / "epoch3_step1500.pt").write_bytes(b"w")
    layout = GlobLayout("run", str(tmp_path), pattern=r"epoch(\d+)_step(?P<iteration>\d+)\.pt", settle_seconds=0)
    assert [c.iteration for c in layout.scan()] == [1500]


def test_glob_checkpoints_are_sorted_by_iteration_not_name(tmp_path):
    for step in (900, 10000, 50):
        (tmp_path / f"step_{step}.ckpt").write_bytes(b"w")
    layout = GlobLayout("run", str(tmp_path), pattern=STEP_FILES, done_marker="{name}.done")
    assert [c.iteration for c in layout.scan()] == [50, 900, 10000]


def test_glob_without_done_marker_completes_after_settling(tmp_path):
    ckpt = tmp_path / "step_100.ckpt"
    ckpt.write_bytes(b"w" * 10)
    clock = FakeClock()
    layout = GlobLayout("run", str(tmp_path), settle_seconds=10, pattern=STEP_FILES)
    layout.settle = SettleTracker(10, clock=clock)

    (first,) = layout.scan()
    assert not first.complete and first.settle_deadline == clock.now + 10
    clock.advance(5)
    with open(ckpt, "ab") as f:
        f.write(b"still writing")
    clock.advance(5)
    (growing,) = layout.scan()
    assert not growing.complete
    clock.advance(10)
    (settled,) = layout.scan()
    assert settled.complete


def test_glob_settles_for_real_with_short_settle_seconds(tmp_path):
    (tmp_path / "step_100.ckpt").write_bytes(b"w")
    layout = GlobLayout("run", str(tmp_path), settle_seconds=0.2, pattern=STEP_FILES)
    (first,) = layout.scan()
    assert not first.complete
    time.sleep(max(first.settle_deadline - time.monotonic(), 0) + 0.01)
    (settled,) = layout.scan()
    assert settled.complete


# ---- Selection (Data-Juicer's begin / end / interval) ---------------------------------------------------
def test_selection_begin_defaults_to_the_interval():
    sel = Selection.make(None, None, 1000)
    assert sel.begin == 1000
    assert not sel.selects(0)
    assert sel.selects(1000)


def test_selection_explicit_begin_zero_is_kept():
    sel = Selection.make(0, None, 1000)
    assert sel.selects(0)
    assert sel.selects(1000)


def test_selection_without_end_selects_forever():
    sel = Selection.make(2000, None, 1000)
    assert sel.expected() is None
    assert sel.selects(10_000_000_000)


def test_selection_steps_by_the_interval_from_begin():
    sel = Selection.make(1500, None, 1000)
    assert [it for it in range(0, 5001, 500) if sel.selects(it)] == [1500, 2500, 3500, 4500]


def test_selection_end_is_inclusive():
    sel = Selection.make(2000, 5000, 1000)
    assert sel.selects(5000)
    assert not sel.selects(6000)
    assert list(sel.expected()) == [2000, 3000, 4000, 5000]


def test_selection_end_off_the_grid_stops_at_the_last_step_before_it():
    sel = Selection.make(2000, 4500, 1000)
    assert list(sel.expected()) == [2000, 3000, 4000]
    assert not sel.selects(4500)


def test_selection_ignores_iterations_before_begin():
    sel = Selection.make(2000, None, 1000)
    assert not sel.selects(1000)
    assert not sel.selects(0)


# ---- acceptance: the CLI plans exactly the selected, complete Megatron iterations ----------------------
def test_dry_run_plans_selected_complete_megatron_iterations_only(tmp_path):
    make_megatron(tmp_path / "ckpts", [1000, 2000, 3000, 4000, 5000], tracker="4000")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("auto_eval:\n  project_name: demo\n  model_name: tiny\n  cache_dir: cache\n"
                   "  megatron:\n    checkpoint_path: ckpts\n")
    result = subprocess.run(
        [str(DAEMON_PYTHON), str(EVALUATOR), "--config", str(cfg), "--begin-iteration", "2000",
         "--iteration-interval", "1000", "--dry-run", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [job["iteration"] for job in plan] == [2000, 3000, 4000]
    for job in plan:
        assert type(job["iteration"]) is int
        assert job["path"] == str(tmp_path / "ckpts" / f"iter_{job['iteration']:07d}")
        assert job["benchmark"] is None


# ---- damaged or unusual input never crashes a scan ---------------------------------------------------
def test_glob_entries_whose_iteration_group_is_not_a_number_are_not_checkpoints(tmp_path):
    for name in ("ckpt_100", "ckpt_final", "ckpt_100.done", "ckpt_final.done"):
        (tmp_path / name).write_text("x")
    found = settled_scan(GlobLayout("run", str(tmp_path), pattern=r"ckpt_(.+)", done_marker="{name}.done"))
    assert [(c.iteration, c.complete) for c in found] == [(100, True)]


def test_glob_optional_iteration_group_that_did_not_match_is_skipped(tmp_path):
    (tmp_path / "step_.ckpt").write_text("x")
    (tmp_path / "step_7.ckpt").write_text("x")
    found = GlobLayout("run", str(tmp_path), pattern=r"step_(\d+)?\.ckpt", done_marker="{name}").scan()
    assert [c.iteration for c in found] == [7]


def test_megatron_tracker_with_damaged_bytes_completes_nothing(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000])
    (root / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe1000")
    found = MegatronLayout("run", str(root)).scan()
    assert complete_iterations(found) == [] and "says" in found[0].reason


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2]}},       # a tensor without data_offsets
    ["not", "a", "mapping"],                      # valid JSON of the wrong shape
    {"w": {"dtype": "F32", "data_offsets": "0-8"}},
])
def test_safetensors_header_of_the_wrong_shape_is_not_complete(tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    assert safetensors_complete(str(path)) is False


# ---- Megatron: at or below the tracker, the files a save writes must be there ---------------------------
def layout_on_a_fake_clock(cls, root: Path, settle_seconds: float = 10):
    """A layout whose settle checks read `clock` (advance it instead of sleeping)."""
    clock = FakeClock()
    layout = cls("run", str(root), settle_seconds=settle_seconds)
    layout.settle = SettleTracker(settle_seconds, clock=clock)
    return layout, clock


def megatron_layout(root: Path, settle_seconds: float = 10) -> tuple[MegatronLayout, FakeClock]:
    return layout_on_a_fake_clock(MegatronLayout, root, settle_seconds)


def test_megatron_iteration_at_the_tracker_is_complete_only_after_its_files_settled(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="1000")
    layout, clock = megatron_layout(root)
    (first,) = layout.scan()
    assert not first.complete and first.reason == "settling"
    assert first.settle_deadline == clock.now + 10
    clock.advance(10)
    (settled,) = layout.scan()
    assert settled.complete and settled.settle_deadline is None


def test_megatron_rank_file_still_growing_after_the_tracker_restarts_the_settle_wait(tmp_path):
    # NFS reordering: the tracker is visible while a rank's file is a 64 KiB prefix of its 1.5 MB
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="1000")
    rank_file = root / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.write_bytes(b"w" * 65536)
    layout, clock = megatron_layout(root)
    layout.scan()
    clock.advance(6)
    with open(rank_file, "ab") as f:
        f.write(b"w" * (1_500_000 - 65536))
    clock.advance(6)  # 12 s since the first look, 6 s since the file last grew
    assert not layout.scan()[0].complete
    clock.advance(10)
    assert layout.scan()[0].complete


def test_megatron_tracker_naming_an_iteration_whose_rank_file_is_missing_waits_for_it(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000], tracker="1000")
    (root / "iter_0001000" / "mp_rank_01").mkdir()  # the other rank's file is not visible yet
    layout, clock = megatron_layout(root)
    layout.scan()
    clock.advance(3600)
    (waiting,) = layout.scan()
    assert not waiting.complete and not waiting.invalid  # the tracker names it: its file may still show up
    assert waiting.reason == "mp_rank_01/model_optim_rng.pt missing"
    assert waiting.settle_deadline is None  # no rescan storm: only a change on disk can help
    (root / "iter_0001000" / "mp_rank_01" / "model_optim_rng.pt").write_bytes(b"weights")
    layout.scan()
    clock.advance(10)
    assert layout.scan()[0].complete


def test_megatron_iteration_with_empty_rank_dir_below_tracker_is_invalid(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [2000], tracker="2000")
    (root / "iter_0001000" / "mp_rank_00").mkdir(parents=True)  # a save that crashed; training went on
    layout, clock = megatron_layout(root)
    first = by_iteration(layout.scan())[1000]
    assert not first.complete and not first.invalid  # not judged before it stood still for settle_seconds
    assert first.settle_deadline == clock.now + 10
    clock.advance(10)
    crashed = by_iteration(layout.scan())[1000]
    assert not crashed.complete
    assert crashed.invalid == "mp_rank_00/model_optim_rng.pt missing" == crashed.reason
    assert crashed.settle_deadline is None


def test_megatron_empty_iteration_dir_below_tracker_is_invalid(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [2000], tracker="2000")
    (root / "iter_0001000").mkdir()
    crashed = by_iteration(settled_scan(MegatronLayout("run", str(root))))[1000]
    assert not crashed.complete
    assert "no mp_rank_*/model_optim_rng.pt and no .metadata" in crashed.invalid


def test_megatron_empty_rank_file_below_tracker_is_invalid(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000], tracker="2000")
    (root / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    crashed = by_iteration(settled_scan(MegatronLayout("run", str(root))))[1000]
    assert crashed.invalid == "mp_rank_00/model_optim_rng.pt is empty"


def make_ranks(iter_dir: Path, names, with_file=True) -> None:
    for name in names:
        (iter_dir / name).mkdir(parents=True)
        if with_file:
            (iter_dir / name / "model_optim_rng.pt").write_bytes(b"weights")


def test_megatron_pipeline_parallel_checkpoint_with_every_rank_is_complete(tmp_path):
    root = tmp_path / "ckpt"
    make_ranks(root / "iter_0001000", ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"])
    (root / "latest_checkpointed_iteration.txt").write_text("1000")
    assert complete_iterations(settled_scan(MegatronLayout("run", str(root)))) == [1000]


def test_megatron_pipeline_parallel_rank_dir_missing_from_the_grid_is_not_complete(tmp_path):
    root = tmp_path / "ckpt"
    make_ranks(root / "iter_0001000", ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000"])
    make_ranks(root / "iter_0002000", ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"])
    (root / "latest_checkpointed_iteration.txt").write_text("2000")
    found = by_iteration(settled_scan(MegatronLayout("run", str(root))))
    assert found[1000].invalid == "rank folder mp_rank_01_001 missing"
    assert found[2000].complete


def test_megatron_rank_dir_missing_in_the_middle_is_not_complete(tmp_path):
    root = tmp_path / "ckpt"
    make_ranks(root / "iter_0001000", ["mp_rank_00", "mp_rank_02"])
    (root / "latest_checkpointed_iteration.txt").write_text("1000")
    (found,) = settled_scan(MegatronLayout("run", str(root)))
    assert not found.complete and found.reason == "rank folder mp_rank_01 missing"


def test_megatron_torch_dist_checkpoint_with_metadata_is_complete(tmp_path):
    root = tmp_path / "ckpt"
    (root / "iter_0001000").mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json", ".metadata"):
        (root / "iter_0001000" / name).write_bytes(b"x")
    (root / "latest_checkpointed_iteration.txt").write_text("1000")
    assert complete_iterations(settled_scan(MegatronLayout("run", str(root)))) == [1000]


def test_megatron_torch_dist_checkpoint_without_metadata_below_tracker_is_invalid(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [2000], tracker="2000")
    (root / "iter_0001000").mkdir()
    (root / "iter_0001000" / "__0_0.distcp").write_bytes(b"half a save")
    crashed = by_iteration(settled_scan(MegatronLayout("run", str(root))))[1000]
    assert not crashed.complete and "no .metadata" in crashed.invalid


def test_megatron_release_dir_without_rank_files_is_waited_on_not_invalid(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [], tracker="release")
    (root / "release" / "mp_rank_00").mkdir(parents=True)
    (found,) = settled_scan(MegatronLayout("run", str(root)))
    assert (found.iteration, found.complete, found.invalid) == (0, False, "")
    assert "model_optim_rng.pt missing" in found.reason


def test_megatron_known_iteration_skips_every_deep_check(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [2000], tracker="2000")
    (root / "iter_0001000").mkdir()  # e.g. weights cleaned up after it was evaluated
    layout, _clock = megatron_layout(root)
    found = layout.scan(known_complete=frozenset({1000, 2000}))  # first look: no settle wait either
    assert [(c.iteration, c.complete) for c in found] == [(1000, True), (2000, True)]


def test_megatron_crashed_save_turns_invalid_for_real_with_short_settle_seconds(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [2000], tracker="2000")
    (root / "iter_0001000" / "mp_rank_00").mkdir(parents=True)
    layout = MegatronLayout("run", str(root), settle_seconds=0.1)
    first = by_iteration(layout.scan())[1000]
    assert not first.invalid and first.settle_deadline is not None
    time.sleep(max(first.settle_deadline - time.monotonic(), 0) + 0.01)
    assert by_iteration(layout.scan())[1000].invalid


# ---- DeepSpeed: the same rules -----------------------------------------------------------------------
def test_deepspeed_step_below_latest_without_model_states_is_invalid(tmp_path):
    root = make_deepspeed(tmp_path / "ds", [200], latest="global_step200")
    (root / "global_step100").mkdir()
    found = by_iteration(settled_scan(DeepSpeedLayout("run", str(root))))
    assert "model_states.pt" in found[100].invalid
    assert found[200].complete


# ---- trackers are read tolerantly ----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["\ufeff2000", "\ufeff2000\n", "  2000  ", "\n2000\r\n\n", "\ufeff 2000\t\n"],
                         ids=["bom", "bom-newline", "spaces", "blank-lines-crlf", "bom-space-tab"])
def test_megatron_tracker_with_bom_or_whitespace_is_read(tmp_path, text):
    root = make_megatron(tmp_path / "ckpt", [1000, 2000, 3000])
    (root / "latest_checkpointed_iteration.txt").write_text(text, encoding="utf-8")
    assert complete_iterations(settled_scan(MegatronLayout("run", str(root)))) == [1000, 2000]


def test_megatron_release_tracker_with_bom_is_read(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [], tracker=None)
    make_ranks(root / "release", ["mp_rank_00"])
    (root / "latest_checkpointed_iteration.txt").write_text("\ufeffrelease\n", encoding="utf-8")
    assert complete_iterations(settled_scan(MegatronLayout("run", str(root)))) == [0]


@pytest.mark.parametrize("text", ["\ufeffglobal_step200", "global_step200\n", " global_step200 \r\n"])
def test_deepspeed_latest_with_bom_or_whitespace_is_read(tmp_path, text):
    root = make_deepspeed(tmp_path / "ds", [100, 200, 300])
    (root / "latest").write_text(text, encoding="utf-8")
    assert complete_iterations(settled_scan(DeepSpeedLayout("run", str(root)))) == [100, 200]


# ---- two folders naming one iteration --------------------------------------------------------------------
def test_megatron_two_folders_naming_one_iteration_report_the_canonical_one(tmp_path):
    root = make_megatron(tmp_path / "ckpt", [300], tracker="300")
    make_ranks(root / "iter_0300", ["mp_rank_00"])
    found = settled_scan(MegatronLayout("run", str(root)))
    assert [(c.path, c.complete) for c in found] == [(str(root / "iter_0000300"), True),
                                                     (str(root / "iter_0300"), False)]
    assert found[1].reason == f"another folder names iteration 300: {root / 'iter_0000300'}; ignored"


def test_megatron_duplicate_folders_without_the_canonical_name_choose_the_first_by_name(tmp_path):
    root = tmp_path / "ckpt"
    make_ranks(root / "iter_300", ["mp_rank_00"])
    make_ranks(root / "iter_00300", ["mp_rank_00"])
    (root / "latest_checkpointed_iteration.txt").write_text("300")
    found = settled_scan(MegatronLayout("run", str(root)))
    assert [(os.path.basename(c.path), c.complete) for c in found] == [("iter_00300", True), ("iter_300", False)]


def test_huggingface_two_folders_naming_one_iteration_report_the_canonical_one(tmp_path):
    make_hf_checkpoint(tmp_path, 300)
    twin = tmp_path / "checkpoint-0300"
    shutil.copytree(tmp_path / "checkpoint-300", twin)
    found = settled_scan(HuggingFaceLayout("run", str(tmp_path), settle_seconds=1))
    assert [(c.path, c.complete) for c in found] == [(str(tmp_path / "checkpoint-300"), True), (str(twin), False)]
    assert "another folder names iteration 300" in found[1].reason and found[1].reason.endswith("; ignored")


def test_glob_two_entries_naming_one_iteration_choose_the_first_by_name(tmp_path):
    for name in ("step_300.ckpt", "step_0300.ckpt"):
        (tmp_path / name).write_bytes(b"w")
    found = settled_scan(GlobLayout("run", str(tmp_path), pattern=STEP_FILES, settle_seconds=1))
    assert [(os.path.basename(c.path), c.complete) for c in found] == [("step_0300.ckpt", True),
                                                                        ("step_300.ckpt", False)]


@pytest.mark.parametrize("known", [frozenset(), frozenset({300})], ids=["new", "known"])
def test_a_scan_never_yields_two_complete_checkpoints_of_one_iteration(tmp_path, known):
    root = tmp_path / "ckpt"
    for name in ("iter_300", "iter_0300", "iter_0000300", "iter_00000300"):
        make_ranks(root / name, ["mp_rank_00"])
    (root / "latest_checkpointed_iteration.txt").write_text("300")
    found = settled_scan(MegatronLayout("run", str(root)), known)
    assert [c.path for c in found if c.complete] == [str(root / "iter_0000300")]
    assert len(found) == 4


# ---- Hugging Face: a marker in front of bad content ----------------------------------------------------------
def hf_layout(root: Path, settle_seconds: float = 10) -> tuple[HuggingFaceLayout, FakeClock]:
    return layout_on_a_fake_clock(HuggingFaceLayout, root, settle_seconds)


def test_huggingface_truncated_safetensors_behind_trainer_state_is_invalid_once_settled(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-10])
    layout, clock = hf_layout(tmp_path)
    (first,) = layout.scan()
    assert not first.complete and not first.invalid and first.settle_deadline == clock.now + 10
    assert "model.safetensors" in first.reason
    clock.advance(10)
    (bad,) = layout.scan()
    assert not bad.complete and bad.settle_deadline is None
    assert bad.invalid.startswith("model.safetensors is not whole")


def test_huggingface_garbage_config_behind_trainer_state_is_invalid_once_settled(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "config.json").write_bytes(b"\x00\x13garbage{")
    (bad,) = settled_scan(HuggingFaceLayout("run", str(tmp_path), settle_seconds=10))
    assert not bad.complete and bad.invalid.startswith("config.json not parseable")


def test_huggingface_truncated_safetensors_without_trainer_state_is_waited_on_not_invalid(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500, trainer_state=False)  # still being written: no marker yet
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-10])
    (found,) = settled_scan(HuggingFaceLayout("run", str(tmp_path), settle_seconds=10))
    assert not found.complete and not found.invalid and "model.safetensors" in found.reason


def test_huggingface_bad_checkpoint_that_keeps_changing_is_not_judged_yet(tmp_path):
    path = make_hf_checkpoint(tmp_path, 500)
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    layout, clock = hf_layout(tmp_path)
    layout.scan()
    clock.advance(8)
    (path / "model.safetensors").write_bytes(b"\0" * 16)  # the writer is still busy
    clock.advance(8)
    (found,) = layout.scan()
    assert not found.invalid and found.settle_deadline == clock.now + 10


def test_glob_done_marker_needs_the_entry_to_settle_too(tmp_path):
    (tmp_path / "step_100.ckpt").write_bytes(b"weights")
    (tmp_path / "step_100.ckpt.done").touch()
    layout = GlobLayout("run", str(tmp_path), pattern=STEP_FILES, done_marker="{name}.done", settle_seconds=10)
    clock = FakeClock()
    layout.settle = SettleTracker(10, clock=clock)
    assert not layout.scan()[0].complete
    clock.advance(10)
    assert layout.scan()[0].complete


def test_settle_tracker_sweep_forgets_what_was_not_checked_since_the_last_sweep(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x")
    clock = FakeClock()
    tracker = SettleTracker(5, clock=clock)
    tracker.check(str(tmp_path / "a"))
    tracker.check(str(tmp_path / "b"))
    tracker.sweep()
    clock.advance(5)
    tracker.check(str(tmp_path / "a"))
    tracker.sweep()  # 'b' was not looked at in this round (known now, or deleted): forgotten
    assert tracker.check(str(tmp_path / "a"))[0] is True
    assert tracker.check(str(tmp_path / "b"))[0] is False


# ---- a run restarted from an earlier checkpoint saves below the first attempt's tracker -------------------------
def backdate(path: Path, seconds: float) -> None:
    """Every file below `path` (and `path`) written `seconds` earlier than now."""
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when))


@pytest.mark.parametrize("kind", ["megatron", "deepspeed"])
def test_a_save_below_the_tracker_written_after_it_waits_until_it_stood_still_or_the_tracker_names_it(tmp_path,
                                                                                                      kind):
    if kind == "megatron":
        root = make_megatron(tmp_path / "ckpt", [300, 400], tracker="400")
        tracker, new, layout = root / "latest_checkpointed_iteration.txt", root / "iter_0000350", MegatronLayout
        make_megatron(root, [350])  # rank 0 of the restarted run's save; rank 1, on another node, not yet
    else:
        root = make_deepspeed(tmp_path / "ckpt", [300, 400], latest="global_step400")
        tracker, new, layout = root / "latest", root / "global_step350", DeepSpeedLayout
        make_deepspeed(root, [350])
    backdate(root / new.name.replace("350", "300"), 600)
    backdate(root / new.name.replace("350", "400"), 600)
    backdate(tracker, 600)
    found = by_iteration(settled_scan(layout("run", str(root))))
    # before: 350 complete (at or below the tracker, its files there and settled for 2 s): half a save evaluated
    assert not found[350].complete and "written after" in found[350].reason and found[350].settle_deadline
    assert found[300].complete and found[400].complete
    tracker.write_text("350" if kind == "megatron" else "global_step350")  # the save finished: the tracker says so
    assert by_iteration(settled_scan(layout("run", str(root))))[350].complete
    tracker.write_text("400" if kind == "megatron" else "global_step400")
    backdate(tracker, 600)
    backdate(new, 120)  # no tracker ever named it, but it stood still past any gap between ranks
    assert by_iteration(settled_scan(layout("run", str(root))))[350].complete


def test_huggingface_save_crashed_before_training_args_in_a_trainer_run_is_not_complete(tmp_path):
    """transformers 5 writes training_args.bin after the weights and the tokenizer: a Trainer killed in between
    left a folder like a save_pretrained one, which was taken as complete once settled and evaluated (its weights
    were not those the resumed run saved under the same name). In a run whose other checkpoints carry
    trainer_state.json, one without it is a Trainer save not finished, however long it stands still."""
    make_hf_checkpoint(tmp_path, 20)
    crashed = make_hf_checkpoint(tmp_path, 25, trainer_state=False)
    assert not (crashed / "training_args.bin").exists()
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0)
    layout.scan()  # the first look starts the settle wait
    for _ in range(2):  # settled, and long after
        found = {c.iteration: c for c in layout.scan()}
        assert found[20].complete
        assert not found[25].complete and "Trainer save without trainer_state.json" in found[25].reason
    (crashed / "trainer_state.json").write_text(json.dumps({"global_step": 25}))  # the resumed run's re-save
    layout.scan()  # its files changed: settled again
    assert {c.iteration: c.complete for c in layout.scan()} == {20: True, 25: True}


def test_huggingface_trainer_run_is_known_from_checkpoints_already_evaluated(tmp_path):
    """After a restart the run's finished checkpoints are known (not judged again): they still say it is a
    Trainer run, so a crashed newest save waits."""
    make_hf_checkpoint(tmp_path, 20)
    make_hf_checkpoint(tmp_path, 25, trainer_state=False)
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0)
    layout.scan(frozenset({20}))
    found = {c.iteration: c for c in layout.scan(frozenset({20}))}
    assert not found[25].complete and "Trainer save" in found[25].reason


def test_huggingface_run_of_save_pretrained_folders_completes_by_settling(tmp_path):
    make_hf_checkpoint(tmp_path, 20, trainer_state=False)
    make_hf_checkpoint(tmp_path, 25, trainer_state=False)
    layout = HuggingFaceLayout("run", str(tmp_path), settle_seconds=0)
    layout.scan()
    assert {c.iteration: c.complete for c in layout.scan()} == {20: True, 25: True}
