"""Specification of the hints: what an operator is told when a watched folder yields nothing to evaluate.

Each test builds a real folder shaped like a layout (or like a set-up mistake), scans it with the real
layout, and reads what `diagnose` says about it.
"""
from __future__ import annotations

import json
import os
import time
import struct
from pathlib import Path

import pytest

from evaluator.daemon import hints
from evaluator.daemon.checkpoints import LAYOUTS, Selection
from evaluator.daemon.hints import INFO, WARNING, Hint, diagnose, selection_summary

EVERY_100 = Selection.make(None, None, 100)


# ---- folders shaped like each layout --------------------------------------------------------------
def megatron(root: Path, iterations, tracker=True) -> Path:
    for it in iterations:
        (root / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
        (root / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"weights")
    if tracker is True:
        tracker = str(max(iterations))
    if tracker:
        (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    return root


def hf_save(path: Path) -> Path:
    """What save_pretrained writes: config.json and one whole safetensors file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return path


def huggingface(root: Path, steps) -> Path:
    for step in steps:
        path = hf_save(root / f"checkpoint-{step}")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return root


def deepspeed(root: Path, steps, latest=True) -> Path:
    for step in steps:
        (root / f"global_step{step}").mkdir(parents=True)
        (root / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"w")
    if latest:
        (root / "latest").write_text(f"global_step{max(steps)}")
    return root


def glob_files(root: Path, steps) -> Path:
    root.mkdir(parents=True)
    for step in steps:
        (root / f"step_{step}.ckpt").write_bytes(b"w")
    return root


GLOB_PATTERN = r"step_(\d+)\.ckpt"


def scan(path: Path, layout: str, pattern=None):
    """What the daemon's scan reports, once the files stood still (settle_seconds=0 needs a second look)."""
    scanner = LAYOUTS[layout]("run", str(path), settle_seconds=0, pattern=pattern)
    try:
        scanner.scan()
        return scanner.scan()
    except OSError:  # not a folder: the daemon does not scan it either
        return []


def hints_for(path: Path, layout: str, selection=EVERY_100, pattern=None) -> list[Hint]:
    return diagnose(str(path), layout, scan(path, layout, pattern), selection, pattern)


def only(found: list[Hint]) -> Hint:
    assert len(found) == 1, found
    return found[0]


# ---- healthy runs say nothing ------------------------------------------------------------------------
@pytest.mark.parametrize("layout, build, pattern", [
    ("megatron", lambda root: megatron(root, [100, 200, 300]), None),
    ("huggingface", lambda root: huggingface(root, [100, 200, 300]), None),
    ("deepspeed", lambda root: deepspeed(root, [100, 200, 300]), None),
    ("glob", lambda root: glob_files(root, [100, 200, 300]), GLOB_PATTERN),
])
def test_healthy_run_gives_no_hint(tmp_path, layout, build, pattern):
    root = build(tmp_path / "run")
    assert hints_for(root, layout, pattern=pattern) == []


def test_hf_run_folder_with_a_final_save_beside_its_checkpoints_gives_no_hint(tmp_path):
    root = huggingface(tmp_path / "out", [100, 200])
    (root / "config.json").write_text("{}")  # trainer.save_model() into output_dir, beside checkpoint-N
    (root / "model.safetensors").write_bytes(b"")
    assert hints_for(root, "huggingface") == []


# ---- the path itself -----------------------------------------------------------------------------------
def test_missing_path_says_so_and_names_the_nearest_existing_folder(tmp_path):
    hint = only(hints_for(tmp_path / "runs" / "typo" / "ckpt", "megatron"))
    assert hint == Hint(WARNING, f"{tmp_path / 'runs' / 'typo' / 'ckpt'} does not exist (the nearest existing folder "
                                 f"above it is {tmp_path}): check watch.paths (or megatron.checkpoint_path); nothing "
                                 "is watched until it appears")


def test_path_that_is_a_file_says_to_watch_the_folder_holding_it(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"w")
    hint = only(hints_for(tmp_path / "model.ckpt", "glob", pattern=GLOB_PATTERN))
    assert hint.level == WARNING and "is a file, not a folder" in hint.text and hint.text.endswith(str(tmp_path))


def test_unreadable_path_says_it_cannot_be_read(tmp_path, monkeypatch):
    root = megatron(tmp_path / "run", [100])
    real_scandir = os.scandir

    def denied(path="."):
        if str(path) == str(root):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(hints.os, "scandir", denied)
    hint = only(diagnose(str(root), "megatron", [], EVERY_100))
    assert hint.text == f"{root} cannot be read (Permission denied): the daemon's user needs read and execute " \
                        "permission on it"


def test_empty_folder_says_it_is_empty(tmp_path):
    (tmp_path / "run").mkdir()
    hint = only(hints_for(tmp_path / "run", "megatron"))
    assert hint.level == WARNING and hint.text.startswith(f"{tmp_path / 'run'} is empty: nothing has been saved")


def test_checkpoints_that_appeared_after_the_scan_are_not_called_missing(tmp_path):
    root = megatron(tmp_path / "run", [100])
    assert diagnose(str(root), "megatron", [], EVERY_100) == []


# ---- a path that is one checkpoint ---------------------------------------------------------------------
def test_path_at_an_hf_checkpoint_says_to_watch_its_parent_with_the_huggingface_layout(tmp_path):
    root = huggingface(tmp_path / "out", [300])
    hint = only(hints_for(root / "checkpoint-300", "megatron"))
    assert hint.text == (f"{root / 'checkpoint-300'} points at a checkpoint itself (checkpoint-300, the huggingface "
                         f"layout); watch its parent {root} with layout huggingface (set watch.layout: huggingface "
                         "or --model-type huggingface)")


@pytest.mark.parametrize("layout, build, name", [
    ("megatron", lambda root: megatron(root, [300]), "iter_0000300"),
    ("deepspeed", lambda root: deepspeed(root, [300]), "global_step300"),
])
def test_path_at_a_checkpoint_of_the_configured_layout_says_to_watch_its_parent(tmp_path, layout, build, name):
    root = build(tmp_path / "run")
    hint = only(hints_for(root / name, layout))
    assert hint.text == f"{root / name} points at a checkpoint itself ({name}, the {layout} layout); watch its " \
                        f"parent {root}"


def test_path_at_a_saved_model_not_named_like_a_checkpoint_says_it_is_one_save(tmp_path):
    path = hf_save(tmp_path / "final_model")
    hint = only(hints_for(path, "huggingface"))
    assert hint.text == f"{path} holds a whole huggingface save itself, not checkpoint folders: watch the folder " \
                        "the trainer writes its checkpoint-1000-style folders into"


# ---- entries of another layout ---------------------------------------------------------------------------
def test_hf_checkpoints_under_megatron_layout_say_which_layout(tmp_path):
    root = huggingface(tmp_path / "out", [300, 600, 900])
    hint = only(hints_for(root, "megatron"))
    assert hint.text == f"{root}: found 3 entries like checkpoint-300 (the huggingface layout) but layout is " \
                        "megatron: set watch.layout: huggingface or --model-type huggingface"


def test_megatron_iterations_under_huggingface_layout_say_which_layout(tmp_path):
    root = megatron(tmp_path / "run", [1000, 2000])
    hint = only(hints_for(root, "huggingface"))
    assert "found 2 entries like iter_0001000 (the megatron layout) but layout is huggingface" in hint.text


def test_deepspeed_steps_under_megatron_layout_say_which_layout(tmp_path):
    root = deepspeed(tmp_path / "run", [50])
    hint = only(hints_for(root, "megatron"))
    assert "found 1 entry like global_step50 (the deepspeed layout)" in hint.text
    assert hint.text.endswith("--model-type deepspeed")


def test_named_checkpoints_under_a_glob_pattern_that_matches_nothing_say_which_layout(tmp_path):
    root = huggingface(tmp_path / "out", [10])
    hint = only(hints_for(root, "glob", pattern=GLOB_PATTERN))
    assert "like checkpoint-10 (the huggingface layout) but layout is glob" in hint.text


def test_entries_named_like_no_layout_suggest_the_glob_layout(tmp_path):
    root = glob_files(tmp_path / "run", [100, 200, 300, 400])
    hint = only(hints_for(root, "megatron"))
    assert hint.text == f"{root} has 4 entries (step_100.ckpt, step_200.ckpt, step_300.ckpt, ...) but none named " \
                        "like iter_0001000 (the megatron layout); for other names use layout glob with a " \
                        "watch.pattern regex"


def test_glob_pattern_matching_no_entry_quotes_the_pattern(tmp_path):
    root = glob_files(tmp_path / "run", [100])
    hint = only(hints_for(root, "glob", pattern=r"ckpt_(\d+)"))
    assert "none matching watch.pattern 'ckpt_(\\\\d+)'" in hint.text


def test_checkpoint_names_that_are_files_say_the_layout_reads_folders(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-100").write_bytes(b"a tarball")
    hint = only(hints_for(tmp_path / "run", "huggingface"))
    assert "1 entry named like checkpoint-100 is a file, not a folder" in hint.text


def test_a_huge_folder_is_read_only_up_to_the_listing_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(hints, "LISTING_CAP", 5)
    root = huggingface(tmp_path / "out", range(10, 90, 10))
    hint = only(hints_for(root, "megatron"))
    assert "found 5 entries like" in hint.text and "among the first 5 entries" in hint.text


# ---- found, but nothing complete ------------------------------------------------------------------------
def aged(root, seconds: float = 3600):
    """Backdate every checkpoint folder and what is in it: saves that finished long ago (a fresh one may still be
    being written)."""
    t = time.time() - seconds
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(folder, name), (t, t))
    return root


def test_megatron_iterations_without_tracker_say_nothing_counts_as_complete_and_how_to_write_it(tmp_path):
    root = aged(megatron(tmp_path / "run", [300, 600, 900], tracker=None))
    hint = only(hints_for(root, "megatron", Selection.make(300, None, 300)))
    assert hint.text == (f"{root}: 3 checkpoint folders (iterations 300..900) but no latest_checkpointed_iteration.txt: "
                         "the trainer writes it only once a save has finished, so none counts as complete. If these "
                         "saves did finish (copied without it?), write it: "
                         f"echo 900 > {root / 'latest_checkpointed_iteration.txt'}")


def test_deepspeed_steps_without_latest_file_give_the_tag_to_write(tmp_path):
    root = aged(deepspeed(tmp_path / "run", [100, 200], latest=False))
    hint = only(hints_for(root, "deepspeed"))
    assert "but no latest:" in hint.text and hint.text.endswith(f"echo global_step200 > {root / 'latest'}")


def test_megatron_tracker_naming_no_iteration_quotes_the_scans_reason(tmp_path):
    root = megatron(tmp_path / "run", [100, 200], tracker="garbage")
    hint = only(hints_for(root, "megatron"))
    assert hint.text == f"{root}: 2 checkpoints (iterations 100..200), none complete: " \
                        "latest_checkpointed_iteration.txt says 'garbage' (2 of 2)"


def test_hf_checkpoints_without_config_json_quote_the_scans_reason(tmp_path):
    for step in (100, 200):  # a PEFT adapter save: no config.json, no full weights
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "out" / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"w")
    hint = only(hints_for(tmp_path / "out", "huggingface"))
    assert hint.text.endswith("none complete: no config.json (2 of 2)")


def test_one_checkpoint_complete_is_not_a_none_complete_hint(tmp_path):
    root = megatron(tmp_path / "run", [100, 200], tracker="100")  # 200 still being written
    assert hints_for(root, "megatron") == []


# ---- found, but not selected ---------------------------------------------------------------------------
def test_checkpoints_off_the_interval_say_which_iterations_are_selected(tmp_path):
    root = megatron(tmp_path / "run", range(300, 2700, 300))
    hint = only(hints_for(root, "megatron", Selection.make(1000, None, 1000)))
    assert hint == Hint(WARNING, "8 checkpoints (iterations 300..2400) but none selected by begin=1000 interval=1000 "
                                 "end=none: 3 before begin 1000, 5 off interval 1000 (selected are begin + a multiple "
                                 "of the interval: 1000, 2000, ...); they are 300 apart: --begin-iteration 300 "
                                 "--iteration-interval 300 takes every one (1200: about one per 1000)")


def test_checkpoints_all_before_begin_say_to_lower_begin(tmp_path):
    root = megatron(tmp_path / "run", [100, 200])
    hint = only(hints_for(root, "megatron", Selection.make(5000, None, 100)))
    assert hint.text == "2 checkpoints (iterations 100..200) but none selected by begin=5000 interval=100 end=none: " \
                        "2 before begin 5000; lower --begin-iteration (watch.begin_iteration) to 100 or below"


def test_checkpoints_all_after_end_say_so(tmp_path):
    root = megatron(tmp_path / "run", [3000, 4000])
    hint = only(hints_for(root, "megatron", Selection.make(1000, 2000, 1000)))
    assert hint.text == "2 checkpoints (iterations 3000..4000) but none selected by begin=1000 interval=1000 " \
                        "end=2000: 2 after end 2000"


def test_some_checkpoints_skipped_by_the_interval_is_info_not_a_warning(tmp_path):
    root = megatron(tmp_path / "run", range(100, 900, 100))
    hint = only(hints_for(root, "megatron", Selection.make(None, None, 200)))
    assert hint == Hint(INFO, "4 of 8 checkpoints skipped by the selection (begin=200 interval=200 end=none): "
                              "1 before begin 200, 3 off interval 200")


def test_warnings_come_before_information(tmp_path):
    root = aged(megatron(tmp_path / "run", [100, 200, 300], tracker=None))
    found = hints_for(root, "megatron", Selection.make(None, None, 200))
    assert [h.level for h in found] == [WARNING, INFO]


def test_a_first_save_still_being_written_is_information_not_advice_to_write_the_tracker(tmp_path):
    root = megatron(tmp_path / "run", [100], tracker=None)  # just written
    hint = only(hints_for(root, "megatron"))
    assert hint.level == INFO and "echo" not in hint.text and "a save in progress" in hint.text


@pytest.mark.parametrize("iterations, selection, summary", [
    ([], Selection.make(None, None, 1000), "no checkpoints"),
    ([1000, 2000], Selection.make(None, None, 1000), "2 checkpoints, all selected"),
    ([500, 1000, 1500, 2000, 2500, 3000, 3500, 4000], Selection.make(1000, 3000, 1000),
     "8 checkpoints, 3 selected, 5 skipped (1 before begin 1000, 2 after end 3000, 2 off interval 1000)"),
])
def test_selection_summary_counts_what_the_selection_skips(tmp_path, iterations, selection, summary):
    root = megatron(tmp_path / "run", iterations) if iterations else tmp_path
    assert selection_summary(scan(root, "megatron"), selection) == summary


def test_a_crashed_save_beside_complete_ones_is_named_with_why_it_waits(tmp_path):
    """A Trainer killed mid-save left checkpoint-25 without trainer_state.json: it waits for the resumed run's
    re-save, which is right, but without a word in the log or status (and --end-iteration 25 waited silently)."""
    root = huggingface(tmp_path / "run", [10, 20])
    hf_save(root / "checkpoint-25")
    aged(root)
    hint = only(hints_for(root, "huggingface", Selection.make(None, None, 5)))
    assert hint == Hint(INFO, "1 checkpoint not complete, waited on (not evaluated until complete): a Trainer save "
                              "without trainer_state.json yet (the Trainer writes it last) (iteration 25)")


def test_a_save_in_progress_beside_complete_ones_gives_no_hint(tmp_path):
    root = huggingface(tmp_path / "run", [10, 20])
    hf_save(root / "checkpoint-25")  # just written
    assert hints_for(root, "huggingface", Selection.make(None, None, 5)) == []


def test_a_running_daemon_names_a_save_that_stalls_after_it_started_and_drops_the_hint_once_it_completes(
        tmp_path, daemons):
    """The hints of a run whose checkpoints were all known were looked for once: a save that stalled later (a
    Trainer killed mid-save) waited without a word, in the log and in status."""
    from conftest import ledger_rows, run_cli, wait_until, write_config

    root = huggingface(tmp_path / "ckpt", [10])
    crashed = hf_save(root / "checkpoint-20")  # the next save, being written
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": "true",
                                   "evaluation": "echo '{{\"acc\": 1}}' > metrics.json"}],
                       watch={"layout": "huggingface", "iteration_interval": 10}, recorder={"plots": False})
    d = daemons(cfg)
    wait_until(lambda: [r["state"] for r in ledger_rows(tmp_path / "cache")] == ["recorded"], what="10 recorded")
    assert "not complete, waited on" not in d.log()  # a save in progress is not worth a line
    aged(root)  # it stalls: untouched for SAVE_IN_PROGRESS_SECONDS
    wait_until(lambda: "not complete, waited on" in d.log() and "(iteration 20)" in d.log(), timeout=30,
               what="the stalled save named in the log")
    assert "(iteration 20)" in run_cli("status", "--config", cfg, check=0).stdout
    (crashed / "trainer_state.json").write_text(json.dumps({"global_step": 20}))  # the resumed run's re-save
    wait_until(lambda: len([r for r in ledger_rows(tmp_path / "cache") if r["state"] == "recorded"]) == 2,
               what="20 recorded")
    wait_until(lambda: "waited on" not in run_cli("status", "--config", cfg, check=0).stdout, timeout=30,
               what="the hint gone from status")
    assert d.stop() == 0


def test_a_checkpoint_deleted_while_it_settled_is_named_in_the_log(tmp_path, daemons):
    """A trainer rotating checkpoints away (save_total_limit) faster than settle_seconds: each was deleted before
    it counted as complete, got no row, and nothing anywhere said it had existed."""
    import shutil

    from conftest import wait_until, write_config

    root = huggingface(tmp_path / "ckpt", [10, 20])
    cfg = write_config(tmp_path, [{"name": "qa", "type": "command", "inference": "true",
                                   "evaluation": "echo '{{\"acc\": 1}}' > metrics.json"}],
                       watch={"layout": "huggingface", "iteration_interval": 10, "settle_seconds": 600},
                       recorder={"plots": False})
    d = daemons(cfg)
    wait_until(lambda: "watching" in d.log(), what="the daemon up")
    time.sleep(1.5)  # a few scans: it settles
    shutil.rmtree(root / "checkpoint-10")  # rotated away once the next-but-one is saved
    wait_until(lambda: "iteration 10 was deleted before it was complete (last seen: settling)" in d.log(),
               timeout=30, what="the deletion named")
    assert "lower it" in d.log() and "iteration 20 was deleted" not in d.log()
    assert d.stop() == 0
