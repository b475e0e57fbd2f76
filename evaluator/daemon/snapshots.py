"""Rotation-safe snapshots: pin what inference needs the moment a checkpoint is complete.

Trainers rotate checkpoints (HF `save_total_limit=2` deletes checkpoint-N as soon as the
next-but-one is saved), so an evaluation slower than two save intervals loses them. With
`watch.snapshot: hardlink` (the default where cache_dir shares the checkpoints' filesystem) or
`copy`, the files inference needs are pinned into <cache_dir>/snapshots/<run>/<iteration>/<name>/
and the stages read that copy; it is released once every benchmark of the iteration is final.

Only what inference needs is pinned: each layout excludes optimizer, scheduler and RNG state
(`DEFAULT_EXCLUDES`, overridable with `watch.snapshot_exclude`). The file list and sizes are taken
when the checkpoint is found complete (the manifest); a file that is gone or has another size
while pinning means the trainer deleted the checkpoint under us: the snapshot is discarded and the
checkpoint ends `vanished` -- never a half snapshot that gets evaluated.

Hardlinks assume checkpoint files are never rewritten in place (true for HF, Megatron, DeepSpeed:
each save writes a new folder).
"""
from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import Checkpoint, CheckpointLayout, safetensors_complete

log = logging.getLogger("evaluator")

SNAPSHOT_MODES = ("auto", "none", "hardlink", "copy")
DEFAULT_EXCLUDES: dict[str, list[str]] = {
    # HF Trainer: optimizer/scheduler/scaler/RNG state and trainer bookkeeping; DeepSpeed's
    # global_stepN/ inside an HF checkpoint holds optimizer shards too
    "huggingface": ["optimizer.*", "scheduler.*", "scaler.*", "rng_state*", "training_args.bin",
                    "trainer_state.json", "global_step*", "latest", "zero_to_fp32.py"],
    # Megatron's legacy files mix model and optimizer state; the distributed optimizer's are apart
    "megatron": ["distrib_optim.pt"],
    "deepspeed": ["*optim_states.pt"],
    "glob": [],
}
COPY_CHUNK = 64 << 20


class SnapshotVanished(Exception):
    """The checkpoint changed or disappeared while it was being pinned."""


class PinAborted(Exception):
    """The daemon is stopping; the pin is redone on the next start."""


def resolve_mode(mode: str, cache_dir: str, root: str) -> str:
    """'auto' -> 'hardlink' when cache_dir and the run folder share a filesystem, else 'copy'."""
    if mode != "auto":
        return mode
    return "hardlink" if _device(cache_dir) == _device(root) else "copy"


def _device(path: str) -> int:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.stat(path).st_dev


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.split(os.sep) for pat in patterns)


def build_manifest(source: str, excludes: list[str]) -> dict[str, int]:
    """Relative path -> size of every file to pin ('' for a checkpoint that is a single file)."""
    if not os.path.exists(source):
        raise SnapshotVanished("the checkpoint is gone")
    if os.path.isfile(source):
        return {"": os.path.getsize(source)}
    manifest = {}
    for dirpath, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not _excluded(os.path.relpath(os.path.join(dirpath, d), source), excludes)]
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, source)
            if not _excluded(rel, excludes):
                try:
                    manifest[rel] = os.path.getsize(full)
                except FileNotFoundError:
                    raise SnapshotVanished(f"{rel} disappeared while listing the checkpoint") from None
    return manifest  # may be empty: an (odd) empty checkpoint folder pins as an empty folder


def snapshot_root(cache_dir: str, run: str, iteration: int) -> str:
    return os.path.join(cache_dir, "snapshots", run, str(iteration))


def pin(source: str, root: str, manifest: dict[str, int], mode: str, markers: Optional[dict[str, str]] = None,
        abort: Optional[threading.Event] = None) -> tuple[str, int]:
    """Hardlink or copy the manifest's files under root/<name>; returns (snapshot path, bytes).

    Raises SnapshotVanished (and leaves nothing behind) when a file is missing or has changed size.
    `markers` are small files written beside the snapshot (e.g. Megatron's tracker, so `--load root`
    works on the snapshot as on the original folder).
    """
    if os.path.exists(root):
        shutil.rmtree(root)  # a leftover of an interrupted pin
    dest = os.path.join(root, os.path.basename(source.rstrip("/")))
    try:
        if "" not in manifest:
            os.makedirs(dest)
        for rel, size in sorted(manifest.items()):
            if abort is not None and abort.is_set():
                raise PinAborted()
            src = os.path.join(source, rel) if rel else source
            dst = os.path.join(dest, rel) if rel else dest
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                _link_or_copy(src, dst, mode, abort)
            except FileNotFoundError:
                raise SnapshotVanished(f"{rel or os.path.basename(source)} was deleted while pinning") from None
            got = os.path.getsize(dst)
            if got != size:
                raise SnapshotVanished(f"{rel or os.path.basename(source)} is {got} bytes, "
                                       f"{size} when the checkpoint was found complete")
            if dst.endswith(".safetensors") and not safetensors_complete(dst):
                raise SnapshotVanished(f"{rel} is shorter than its safetensors header says")
        for name, text in (markers or {}).items():
            with open(os.path.join(root, name), "w") as f:
                f.write(text)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return dest, sum(manifest.values())


def _link_or_copy(src: str, dst: str, mode: str, abort: Optional[threading.Event]) -> None:
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            # a bind mount or a filesystem without hardlinks: copy this file instead
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while True:
            if abort is not None and abort.is_set():
                raise PinAborted()
            chunk = fin.read(COPY_CHUNK)
            if not chunk:
                break
            fout.write(chunk)
    shutil.copymode(src, dst)


class SnapshotKeeper:
    """Pins checkpoints for the daemon. One worker thread does the file I/O (a copy can take
    minutes); the daemon loop starts pins, collects their outcomes and releases finished ones."""

    def __init__(self, ledger: L.Ledger, cache_dir: str, layouts: dict[str, CheckpointLayout], mode: str,
                 max_gb: Optional[float], exclude: Optional[list[str]], on_done: Callable[[], None]):
        self.ledger = ledger
        self.cache_dir = cache_dir
        self.layouts = layouts
        self.modes = {run: resolve_mode(mode, cache_dir, lay.root) for run, lay in layouts.items()}
        self.budget = None if max_gb is None else int(max_gb * 1e9)
        self.exclude = exclude
        self.on_done = on_done
        self.abort = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pin")
        self.futures: dict[tuple, Future] = {}

    def active(self, run: str) -> bool:
        return self.modes[run] != "none"

    def busy(self) -> bool:
        return bool(self.futures)

    def checkpoint_for(self, run: str, iteration: int, original: str) -> Optional[str]:
        """The path stages should read, or None while its snapshot is not ready yet."""
        if not self.active(run):
            return original
        row = self.ledger.snapshot(run, iteration)
        if row is None or row["state"] == L.PINNING:
            return None
        return row["path"] if row["state"] == L.PINNED else original

    def protects(self, run: str, iteration: int) -> bool:
        """Whether a pinned (or pinning) snapshot makes the original checkpoint unnecessary."""
        row = self.ledger.snapshot(run, iteration) if self.active(run) else None
        return row is not None and row["state"] in (L.PINNING, L.PINNED)

    def ensure(self, checkpoints: list[Checkpoint]) -> list[tuple[str, int, str]]:
        """Start pinning each checkpoint that has no snapshot row yet; returns those found vanished."""
        vanished = []
        for c in checkpoints:
            if not self.active(c.run) or self.ledger.snapshot(c.run, c.iteration) is not None:
                continue
            layout = self.layouts[c.run]
            excludes = self.exclude if self.exclude is not None else DEFAULT_EXCLUDES.get(layout.name, [])
            try:
                manifest = build_manifest(c.path, excludes)
                reason = layout.incomplete_reason(c.path)
                if reason:  # complete at the scan, not any more: it is being deleted
                    raise SnapshotVanished(reason)
            except (SnapshotVanished, FileNotFoundError) as e:
                vanished.append((c.run, c.iteration, f"checkpoint deleted before it could be pinned ({e})"))
                continue
            size = sum(manifest.values())
            used = sum(r["bytes"] for r in self.ledger.snapshots([L.PINNING, L.PINNED]))
            if self.budget is not None and used + size > self.budget:
                note = (f"snapshot budget: {used / 1e9:.3f} GB pinned + {size / 1e9:.3f} GB > snapshot_max_gb "
                        f"{self.budget / 1e9:g}: evaluated in place (it may be rotated away first)")
                self.ledger.put_snapshot(c.run, c.iteration, L.UNPINNED, c.path, bytes=size, note=note)
                log.warning("%s iteration %d: %s", c.run, c.iteration, note)
                continue
            self.ledger.put_snapshot(c.run, c.iteration, L.PINNING, c.path, bytes=size,
                                     manifest=json.dumps(manifest, sort_keys=True))
            self._submit(c.run, c.iteration, c.path, manifest, layout.snapshot_markers(c))
        return vanished

    def _submit(self, run, iteration, source, manifest, markers) -> None:
        root = snapshot_root(self.cache_dir, run, iteration)
        future = self.pool.submit(pin, source, root, manifest, self.modes[run], markers, self.abort)
        future.add_done_callback(lambda _f: self.on_done())
        self.futures[(run, iteration)] = future

    def collect(self) -> list[tuple[str, int, str]]:
        """Record finished pins; returns the (run, iteration, why) whose checkpoint vanished mid-pin."""
        vanished = []
        for key, future in list(self.futures.items()):
            if not future.done():
                continue
            del self.futures[key]
            run, iteration = key
            try:
                path, size = future.result()
            except PinAborted:
                continue  # stays 'pinning': redone on the next start
            except SnapshotVanished as e:
                self.ledger.set_snapshot(run, iteration, L.VANISHED, note=str(e))
                vanished.append((run, iteration, f"checkpoint deleted while pinning ({e})"))
                continue
            except OSError as e:  # disk full, permissions: evaluate in place, loudly
                note = f"pinning failed ({e}): evaluated in place"
                self.ledger.set_snapshot(run, iteration, L.UNPINNED, note=note)
                log.error("%s iteration %d: %s", run, iteration, note)
                continue
            self.ledger.set_snapshot(run, iteration, L.PINNED, path=path, bytes=size)
            log.info("%s iteration %d: pinned %.1f MB (%s) at %s", run, iteration, size / 1e6,
                     self.modes[run], path)
        return vanished

    def release_finished(self, is_final: Callable[[L.Job], bool]) -> None:
        """Drop snapshots whose every benchmark is recorded or failed for good."""
        for row in self.ledger.snapshots([L.PINNED]):
            jobs = self.ledger.jobs(run=row["run"], iteration=row["iteration"])
            if jobs and all(is_final(j) for j in jobs):
                release(snapshot_root(self.cache_dir, row["run"], row["iteration"]))
                self.ledger.set_snapshot(row["run"], row["iteration"], L.RELEASED)
                log.info("%s iteration %d: snapshot released", row["run"], row["iteration"])

    def recover(self) -> None:
        """Pins interrupted by a stop or a crash are redone from their manifest."""
        for row in self.ledger.snapshots([L.PINNING]):
            run, iteration = row["run"], row["iteration"]
            if run not in self.layouts or not self.active(run):
                continue
            c = Checkpoint(run, iteration, row["source"], True)
            self._submit(run, iteration, row["source"], json.loads(row["manifest"]),
                         self.layouts[run].snapshot_markers(c))

    def shutdown(self) -> None:
        self.abort.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def release(root: str) -> None:
    shutil.rmtree(root, ignore_errors=True)
