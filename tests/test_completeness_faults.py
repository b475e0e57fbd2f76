"""Fault runs against checkpoint completeness and snapshots, on real files and real processes.

Each test builds a fault a training cluster produces (a save killed mid-way, a tracker visible before
the rank files, a checkpoint folder the daemon may not read, a resumed job re-saving an iteration in
place) and says what discovery and the snapshot keeper make of it.

Permissions: the tests run as root here, and root reads a chmod-000 folder anyway. The permission
faults therefore run in a child interpreter whose bounding set lacks CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (setpriv), so file permissions apply to it for real; no mock.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

from conftest import ROOT, megatron_checkpoint, set_tracker
from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import Checkpoint, MegatronLayout
from evaluator.daemon.snapshots import LINK_FROM_BYTES, SnapshotKeeper


def by_iteration(checkpoints) -> dict:
    return {c.iteration: c for c in checkpoints}


def as_unprivileged(code: str, *args: str) -> dict:
    """Runs `code` in a fresh interpreter that file permissions apply to; it prints one JSON line."""
    cmd = [sys.executable, "-c", code, *args]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's permission override"
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_keeper(cache: Path, layout) -> tuple[L.Ledger, SnapshotKeeper]:
    ledger = L.Ledger(str(cache))
    return ledger, SnapshotKeeper(ledger, str(cache), {layout.run: layout}, "hardlink", None, None, lambda: None)


# ---- an interrupted Megatron save ------------------------------------------------------------------------------
SLOW_SAVE = r"""
import os, sys, time
rank = os.path.join(sys.argv[1], "mp_rank_00")
os.makedirs(rank)
print("started", flush=True)
with open(os.path.join(rank, "model_optim_rng.pt.tmp"), "wb") as f:
    while True:
        f.write(b"w" * 4096); f.flush(); time.sleep(0.01)
"""


def test_a_megatron_save_killed_midway_is_reported_invalid_once_a_later_save_moves_the_tracker(tmp_path):
    root = tmp_path / "ckpt"
    megatron_checkpoint(root, 1000)
    writer = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(root / "iter_0002000")], stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == b"started"
    time.sleep(0.05)
    writer.kill()  # kill -9 of the training job in the middle of torch.save
    writer.wait()
    megatron_checkpoint(root, 3000)  # the job resumed from 1000 and saved 3000; the tracker moved past 2000
    layout = MegatronLayout("run", str(root), settle_seconds=0.1)
    first = by_iteration(layout.scan())
    assert not first[2000].complete and not first[2000].invalid
    time.sleep(max(first[2000].settle_deadline - time.monotonic(), 0) + 0.01)
    found = by_iteration(layout.scan())
    assert found[2000].invalid == "mp_rank_00/model_optim_rng.pt missing" and not found[2000].complete
    assert found[1000].complete and found[3000].complete


# ---- the tracker visible before the rank files are finished ----------------------------------------------------------
def test_a_tracker_seen_before_the_rank_files_finished_never_completes_on_a_prefix(tmp_path):
    root = tmp_path / "ckpt"
    it = root / "iter_0001000"
    for rank in ("mp_rank_00", "mp_rank_01"):
        (it / rank).mkdir(parents=True)
    set_tracker(root, 1000)  # NFS showed the tracker first
    layout = MegatronLayout("run", str(root), settle_seconds=0.1)
    rank0 = it / "mp_rank_00" / "model_optim_rng.pt"

    def finish_the_save():
        with open(rank0, "wb") as f:  # 1.5 MB arriving in 64 KiB pieces, faster than settle_seconds
            for _ in range(24):
                f.write(b"w" * 65536)
                f.flush()
                time.sleep(0.02)
        (it / "mp_rank_01" / "model_optim_rng.pt").write_bytes(b"w" * 1_572_864)  # the other rank, last

    writer = threading.Thread(target=finish_the_save)
    writer.start()
    seen_complete_while_writing = []
    while writer.is_alive():
        (c,) = layout.scan()
        if c.complete:
            seen_complete_while_writing.append(rank0.stat().st_size if rank0.exists() else 0)
        time.sleep(0.005)
    writer.join()
    assert seen_complete_while_writing == []
    deadline = time.monotonic() + 5
    while not layout.scan()[0].complete:
        assert time.monotonic() < deadline, layout.scan()[0].reason
        time.sleep(0.02)
    assert rank0.stat().st_size == 1_572_864


# ---- a checkpoint the daemon may not read -------------------------------------------------------------------------------
UNREADABLE_SCAN = r"""
import json, os, sys, time
from evaluator.daemon.checkpoints import MegatronLayout
root = sys.argv[1]
os.chmod(os.path.join(root, "iter_0001000"), 0)
layout = MegatronLayout("run", root, settle_seconds=0.05)
layout.scan(); time.sleep(0.1)
c = {x.iteration: x for x in layout.scan()}[1000]
out = {"complete": c.complete, "invalid": c.invalid, "reason": c.reason}
os.chmod(os.path.join(root, "iter_0001000"), 0o755)
layout.scan(); time.sleep(0.1)
out["complete_once_readable"] = {x.iteration: x for x in layout.scan()}[1000].complete
print(json.dumps(out))
"""


def test_a_checkpoint_folder_that_cannot_be_read_says_so_and_is_never_called_invalid(tmp_path):
    root = tmp_path / "ckpt"
    megatron_checkpoint(root, 1000)
    megatron_checkpoint(root, 2000)
    out = as_unprivileged(UNREADABLE_SCAN, str(root))
    assert out["complete"] is False and out["invalid"] == ""
    assert out["reason"] == f"cannot read {root / 'iter_0001000'}: Permission denied"
    assert out["complete_once_readable"] is True


UNREADABLE_MANIFEST = r"""
import json, os, sys
from evaluator.daemon.snapshots import CheckpointUnreadable, build_manifest
ck = sys.argv[1]
os.chmod(os.path.join(ck, "mp_rank_00"), 0)
try:
    print(json.dumps({"manifest": sorted(build_manifest(ck, []))}))
except CheckpointUnreadable as e:
    print(json.dumps({"error": str(e)}))
"""


def test_an_unreadable_rank_folder_is_an_error_not_an_empty_manifest(tmp_path):
    ck = megatron_checkpoint(tmp_path / "ckpt", 1000)
    out = as_unprivileged(UNREADABLE_MANIFEST, ck)
    assert out == {"error": f"cannot read {ck}/mp_rank_00: permission denied"}


UNREADABLE_KEEPER = r"""
import json, os, sys
from concurrent.futures import wait
from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import Checkpoint, MegatronLayout
from evaluator.daemon.snapshots import SnapshotKeeper
root, cache = sys.argv[1], sys.argv[2]
ck = os.path.join(root, "iter_0001000")
ledger = L.Ledger(cache)
keeper = SnapshotKeeper(ledger, cache, {"run": MegatronLayout("run", root)}, "hardlink", None, None, lambda: None)
c = Checkpoint("run", 1000, ck, True)
os.chmod(ck, 0)
out = {"vanished": keeper.ensure([c]), "waiting": keeper.waiting.get(("run", 1000)),
       "row": ledger.snapshot("run", 1000), "checkpoint_for": keeper.checkpoint_for("run", 1000, ck)}
os.chmod(ck, 0o755)  # the operator fixed the permissions
keeper.ensure([c])
wait(list(keeper.futures.values()), timeout=30)
keeper.collect()
row = ledger.snapshot("run", 1000)
out.update(state=row["state"], still_waiting=("run", 1000) in keeper.waiting,
           pinned=sorted(os.listdir(os.path.join(row["path"], "mp_rank_00"))))
keeper.shutdown()
print(json.dumps(out))
"""


def test_an_unreadable_checkpoint_waits_without_a_snapshot_and_is_pinned_once_readable(tmp_path):
    root = tmp_path / "ckpt"
    ck = megatron_checkpoint(root, 1000)
    out = as_unprivileged(UNREADABLE_KEEPER, str(root), str(tmp_path / "cache"))
    assert out["vanished"] == [] and out["row"] is None and out["checkpoint_for"] is None
    assert out["waiting"] == f"cannot read {ck}: permission denied"
    assert out["state"] == L.PINNED and out["still_waiting"] is False
    assert out["pinned"] == ["model_optim_rng.pt"]


def pinned(tmp_path, root, ck):
    """A keeper that has pinned iteration 1000 of a Megatron run (the pin thread finished)."""
    ledger, keeper = make_keeper(tmp_path / "cache", MegatronLayout("run", str(root)))
    keeper.ensure([Checkpoint("run", 1000, ck, True)])
    wait(list(keeper.futures.values()), timeout=30)
    keeper.collect()
    return ledger, keeper


# ---- a resumed job re-saving an iteration in place -----------------------------------------------------------------------
def test_an_in_place_resave_under_a_hardlink_snapshot_is_caught_by_verify(tmp_path):
    root = tmp_path / "ckpt"
    ck = megatron_checkpoint(root, 1000, payload=b"w" * LINK_FROM_BYTES)  # weights: hardlinked
    ledger, keeper = pinned(tmp_path, root, ck)
    assert ledger.snapshot("run", 1000)["state"] == L.PINNED and keeper.verify("run", 1000) is None
    # torch.save opens the same path with "wb": the same inode, truncated, then written again
    with open(os.path.join(ck, "mp_rank_00", "model_optim_rng.pt"), "wb") as f:
        f.write(b"w" * 65536)
    change = keeper.verify("run", 1000)
    assert change.startswith(f"mp_rank_00/model_optim_rng.pt is 65536 bytes, {LINK_FROM_BYTES} when it was found "
                             f"complete")
    keeper.discard("run", 1000)  # the daemon drops the result and the snapshot, and pins the new save later
    assert ledger.snapshot("run", 1000) is None
    keeper.shutdown()


def test_an_in_place_resave_of_the_same_size_is_caught_by_its_mtime(tmp_path):
    root = tmp_path / "ckpt"
    ck = megatron_checkpoint(root, 1000, payload=b"a" * LINK_FROM_BYTES)
    ledger, keeper = pinned(tmp_path, root, ck)
    rank_file = os.path.join(ck, "mp_rank_00", "model_optim_rng.pt")
    before = os.stat(rank_file).st_mtime_ns
    with open(rank_file, "wb") as f:
        f.write(b"b" * LINK_FROM_BYTES)
    os.utime(rank_file, ns=(before + 10**9, before + 10**9))  # the re-save happens later than the first save
    assert keeper.verify("run", 1000).startswith("mp_rank_00/model_optim_rng.pt was rewritten in place")
    keeper.shutdown()


def test_small_files_a_resumed_trainer_rewrites_in_place_are_copied_so_the_snapshot_stays_whole(tmp_path):
    root = tmp_path / "ckpt"
    ck = megatron_checkpoint(root, 1000, payload=b"w" * LINK_FROM_BYTES)
    with open(os.path.join(ck, "config.json"), "w") as f:
        f.write('{"hidden_size": 8}')
    ledger, keeper = pinned(tmp_path, root, ck)
    with open(os.path.join(ck, "config.json"), "w") as f:  # a re-save of the iteration, in place
        f.write('{"hidden_size": 16}')
    # the snapshot itself stays whole (the hardlinked config.json would have changed too); the original, still
    # there, was saved again after the pin: verify says so, so the new save is what gets evaluated
    assert keeper.verify("run", 1000).startswith(f"the original {ck} was saved again after the pin (config.json is "
                                                 "19 bytes")
    snap = ledger.snapshot("run", 1000)["path"]
    with open(os.path.join(snap, "config.json")) as f:
        assert f.read() == '{"hidden_size": 8}'
    weights = os.path.join(snap, "mp_rank_00", "model_optim_rng.pt")
    assert os.stat(weights).st_ino == os.stat(os.path.join(ck, "mp_rank_00", "model_optim_rng.pt")).st_ino
    keeper.shutdown()
