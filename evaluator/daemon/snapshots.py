"""Rotation-safe snapshots: pin what inference needs the moment a checkpoint is complete.

Trainers rotate checkpoints (HF `save_total_limit=2` deletes checkpoint-N as soon as the
next-but-one is saved), so an evaluation slower than two save intervals loses them. With
`watch.snapshot: hardlink` (the default where cache_dir shares the checkpoints' filesystem) or
`copy`, the files inference needs are pinned into <cache_dir>/snapshots/<run>/<iteration>/<name>/
and the stages read that copy; it is released once every benchmark of the iteration is final.

Only what inference needs is pinned: each layout excludes optimizer, scheduler and RNG state
(`DEFAULT_EXCLUDES`, overridable with `watch.snapshot_exclude`). The file list with each file's
size, mtime and inode is taken when the checkpoint is found complete (the manifest); a file that is
gone or has changed while pinning means the trainer deleted or rewrote the checkpoint under us: the
snapshot is discarded and the checkpoint ends `vanished` -- never a half snapshot that gets evaluated.

A hardlink shares its inode with the original, so a trainer that rewrites a file in place (a resumed
Megatron job re-saving an iteration: torch.save truncates the same inode) changes the snapshot too.
`verify` catches that after a stage: the files it read are compared with the manifest (size, mtime,
inode), and the daemon discards the result instead of recording it. Runs that are not pinned (mode
`none`, or over the budget) get a manifest too (an `unpinned` row), so the same check covers them.
A re-save that writes new files (a resumed HF Trainer: new inodes) changes neither a copy nor a hardlink,
so the snapshot alone cannot show it: a pinned row keeps the original's manifest too, and `verify`
compares the original's files that are still there with it. One that is gone is no change: rotation is
what the snapshot is for.

A checkpoint that cannot be read (permissions) is not pinned as an empty folder: `ensure` leaves it
without a row and lists it in `waiting` with the reason, and pins it once it can be read.
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
from dataclasses import asdict, dataclass
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
# in hardlink mode, files below this are copied: a trainer that re-saves an iteration (a resumed HF Trainer, a
# restarted Megatron job) rewrites config.json, the tokenizer files and trainer_state.json in place, through the
# hardlink, and the snapshot's complete checkpoint would be lost for metadata. Weights are far larger.
LINK_FROM_BYTES = 16 << 20


class SnapshotVanished(Exception):
    """The checkpoint changed or disappeared while it was being pinned."""


class CheckpointUnreadable(Exception):
    """Part of the checkpoint cannot be read (permissions, storage): no snapshot now, try again later."""


class PinAborted(Exception):
    """The daemon is stopping; the pin is redone on the next start."""


@dataclass(frozen=True)
class FileStat:
    """What the manifest remembers of a file; None where an old manifest recorded only the size."""

    size: int
    mtime_ns: Optional[int] = None
    inode: Optional[int] = None

    @classmethod
    def of(cls, st: os.stat_result) -> "FileStat":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)

    def change(self, now: "FileStat") -> Optional[str]:
        """How `now` differs from what was recorded, None when it does not."""
        if now.size != self.size:
            return f"is {now.size} bytes, {self.size} when it was found complete"
        if self.inode is not None and now.inode != self.inode:
            return "was replaced by another file"
        if self.mtime_ns is not None and now.mtime_ns != self.mtime_ns:
            return "was rewritten in place (its mtime changed)"
        return None


Manifest = dict[str, FileStat]  # relative path ('' for a checkpoint that is a single file) -> FileStat


def manifest_bytes(manifest: Manifest) -> int:
    return sum(f.size for f in manifest.values())


# a pinned row's manifest describes the snapshot; the original's, as found complete, rides along under this key,
# which no relative path can be (so rows keep one column, and rows written before it read as they did)
ORIGINAL_KEY = "/original"


def dump_manifest(manifest: Manifest, original: Optional[Manifest] = None) -> str:
    data: dict = {rel: asdict(f) for rel, f in manifest.items()}
    if original is not None:
        data[ORIGINAL_KEY] = {rel: asdict(f) for rel, f in original.items()}
    return json.dumps(data, sort_keys=True)


def _file_stats(data: dict) -> Manifest:
    return {rel: FileStat(v) if isinstance(v, int) else FileStat(**v) for rel, v in data.items()}


def load_manifest(text: str) -> Manifest:
    """Reads both forms: {rel: {size, mtime_ns, inode}} and the older {rel: size}; without the original's."""
    return _file_stats({rel: v for rel, v in json.loads(text).items() if rel != ORIGINAL_KEY})


def load_original_manifest(text: str) -> Optional[Manifest]:
    """The original's manifest kept in a pinned row's; None in rows written before it was kept."""
    original = json.loads(text).get(ORIGINAL_KEY)
    return None if original is None else _file_stats(original)


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


def _unreadable(e: OSError, source: str) -> CheckpointUnreadable:
    where = e.filename or source
    return CheckpointUnreadable(f"cannot read {where}: {(e.strerror or str(e)).lower()}")


def build_manifest(source: str, excludes: list[str]) -> Manifest:
    """Relative path -> FileStat of every file to pin ('' for a checkpoint that is a single file).

    Raises SnapshotVanished when the checkpoint is gone, CheckpointUnreadable when a folder or file of
    it cannot be read (os.walk alone would skip such a folder and pin the checkpoint as empty).
    """
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise SnapshotVanished("the checkpoint is gone") from None
    except OSError as e:
        raise _unreadable(e, source) from None
    if not os.path.isdir(source):
        if not os.access(source, os.R_OK):
            raise _unreadable(PermissionError(errno.EACCES, os.strerror(errno.EACCES), source), source)
        return {"": FileStat.of(st)}

    def walk_error(e: OSError) -> None:
        if isinstance(e, FileNotFoundError):
            raise SnapshotVanished(f"{os.path.relpath(e.filename, source)} disappeared while listing") from None
        raise _unreadable(e, source) from None

    manifest = {}
    for dirpath, dirs, files in os.walk(source, onerror=walk_error):
        dirs[:] = [d for d in dirs if not _excluded(os.path.relpath(os.path.join(dirpath, d), source), excludes)]
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, source)
            if _excluded(rel, excludes):
                continue
            try:
                manifest[rel] = FileStat.of(os.stat(full))
            except FileNotFoundError:
                if os.path.islink(full):  # a link whose target is missing: the checkpoint is there, that file is not
                    raise CheckpointUnreadable(f"cannot read {full}: a symbolic link to {os.readlink(full)}, which "
                                               f"does not exist") from None
                raise SnapshotVanished(f"{rel} disappeared while listing the checkpoint") from None
            except OSError as e:
                raise _unreadable(e, source) from None
            if not os.access(full, os.R_OK):
                raise _unreadable(PermissionError(errno.EACCES, os.strerror(errno.EACCES), full), source)
    return manifest  # may be empty: an (odd) empty checkpoint folder pins as an empty folder


def manifest_changes(base: str, manifest: Manifest, gone_is_change: bool = True) -> Optional[str]:
    """What differs between the files under `base` and the manifest (the first difference), None if nothing.
    gone_is_change=False compares only the files still there."""
    for rel, recorded in sorted(manifest.items()):
        path = os.path.join(base, rel) if rel else base
        try:
            now = FileStat.of(os.stat(path))
        except FileNotFoundError:
            if not gone_is_change:
                continue
            return f"{rel or os.path.basename(base)} is gone"
        change = recorded.change(now)
        if change:
            return f"{rel or os.path.basename(base)} {change}"
    return None


def snapshot_root(cache_dir: str, run: str, iteration: int) -> str:
    return os.path.join(cache_dir, "snapshots", run, str(iteration))


def pin(source: str, root: str, manifest: Manifest, mode: str, markers: Optional[dict[str, str]] = None,
        abort: Optional[threading.Event] = None) -> tuple[str, int]:
    """Hardlink or copy the manifest's files under root/<name>; returns (snapshot path, bytes).

    Raises SnapshotVanished (and leaves nothing behind) when a file is missing or has changed since the
    manifest was taken. `markers` are small files written beside the snapshot (e.g. Megatron's tracker,
    so `--load root` works on the snapshot as on the original folder).
    """
    if os.path.exists(root):
        shutil.rmtree(root)  # a leftover of an interrupted pin
    dest = os.path.join(root, os.path.basename(source.rstrip("/")))
    try:
        if "" not in manifest:
            os.makedirs(dest)
        for rel, recorded in sorted(manifest.items()):
            if abort is not None and abort.is_set():
                raise PinAborted()
            src = os.path.join(source, rel) if rel else source
            dst = os.path.join(dest, rel) if rel else dest
            name = rel or os.path.basename(source)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                _link_or_copy(src, dst, mode, abort)
                # the source after linking/copying: the file found complete, untouched meanwhile
                change = recorded.change(FileStat.of(os.stat(src)))
            except FileNotFoundError:
                raise SnapshotVanished(f"{name} was deleted while pinning") from None
            if change:
                raise SnapshotVanished(f"{name} {change}")
            got = os.path.getsize(dst)
            if got != recorded.size:
                raise SnapshotVanished(f"{name} is {got} bytes, {recorded.size} when the checkpoint was found complete")
            if dst.endswith(".safetensors") and not safetensors_complete(dst):
                raise SnapshotVanished(f"{rel} is shorter than its safetensors header says")
        for name, text in (markers or {}).items():
            with open(os.path.join(root, name), "w") as f:
                f.write(text)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return dest, manifest_bytes(manifest)


def _link_or_copy(src: str, dst: str, mode: str, abort: Optional[threading.Event]) -> None:
    if mode == "hardlink" and os.path.getsize(src) >= LINK_FROM_BYTES:
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


def _pin_and_stat(source, root, manifest, mode, markers, abort) -> tuple[str, int, str]:
    """pin(), plus the pinned row's manifest: the snapshot's own, what verify() compares the stage's input with
    (a copy has its own inodes and mtimes; a hardlink shares the original's), and the original's."""
    path, size = pin(source, root, manifest, mode, markers, abort)
    return path, size, dump_manifest(build_manifest(path, []), original=manifest)


class SnapshotKeeper:
    """Pins checkpoints for the daemon. One worker thread does the file I/O (a copy can take
    minutes); the daemon loop starts pins, collects their outcomes and releases finished ones.

    Runs that are in the ledger but not configured any more (renamed, removed) are not active: their
    rows are left as they are, never pinned, recovered or looked up in the configuration.
    """

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
        # vanished pins already in the ledger, not yet returned by collect (a later write of it failed)
        self.vanished: list[tuple[str, int, str]] = []
        # (run, iteration) -> why it has no snapshot row yet (unreadable); retried by every ensure()
        self.waiting: dict[tuple[str, int], str] = {}
        # run -> {iteration: why}: snapshots exempt from release (the run's best checkpoints, keep_best); set by the
        # daemon from the results at every start and after every scoring, so nothing needs storing apart
        self.kept: dict[str, dict[int, str]] = {}

    def active(self, run: str) -> bool:
        """Whether the run's checkpoints are pinned (False for mode none and for runs not configured)."""
        return self.modes.get(run, "none") != "none"

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

    def pinned_bytes(self) -> int:
        """Bytes held by pinning and pinned snapshots: one SQL SUM, not a Python loop over every row."""
        return self.ledger.pinned_bytes()

    def ensure(self, checkpoints: list[Checkpoint]) -> list[tuple[str, int, str]]:
        """Give each checkpoint of a configured run without a snapshot row one: start pinning it, or record
        its manifest in place (`unpinned`: mode none, over budget). Returns the (run, iteration, why) found
        vanished; those that cannot be read get no row and are listed in `self.waiting` with the reason."""
        vanished = []
        used = None  # the pinned total, summed once per call and kept up to date below
        for c in checkpoints:
            if c.run not in self.layouts or self.ledger.snapshot(c.run, c.iteration) is not None:
                continue
            layout = self.layouts[c.run]
            excludes = self.exclude if self.exclude is not None else DEFAULT_EXCLUDES.get(layout.name, [])
            try:
                manifest = build_manifest(c.path, excludes)
                reason = layout.incomplete_reason(c.path)
                if reason and os.path.exists(c.path):  # complete at the scan, not now: rewritten in place
                    raise CheckpointUnreadable(f"{c.path} is not complete any more ({reason})")
                if reason:  # and gone: it is being deleted
                    raise SnapshotVanished(reason)
            except (SnapshotVanished, FileNotFoundError) as e:
                self.waiting.pop((c.run, c.iteration), None)
                vanished.append((c.run, c.iteration, f"checkpoint deleted before it could be pinned ({e})"))
                continue
            except (CheckpointUnreadable, OSError) as e:
                why = str(e) if isinstance(e, CheckpointUnreadable) else str(_unreadable(e, c.path))
                if self.waiting.get((c.run, c.iteration)) != why:
                    log.warning("%s iteration %d: %s; not pinned, tried again later", c.run, c.iteration, why)
                self.waiting[(c.run, c.iteration)] = why
                continue
            self.waiting.pop((c.run, c.iteration), None)
            size = manifest_bytes(manifest)
            if not self.active(c.run):
                self.ledger.put_snapshot(c.run, c.iteration, L.UNPINNED, c.path, bytes=size,
                                         manifest=dump_manifest(manifest), note="snapshot: none (read in place)")
                continue
            used = self.pinned_bytes() if used is None else used
            if self.budget is not None and used + size > self.budget:
                note = (f"snapshot budget: {used / 1e9:.3f} GB pinned + {size / 1e9:.3f} GB > snapshot_max_gb "
                        f"{self.budget / 1e9:g}: evaluated in place (it may be rotated away first)")
                self.ledger.put_snapshot(c.run, c.iteration, L.UNPINNED, c.path, bytes=size,
                                         manifest=dump_manifest(manifest), note=note)
                log.warning("%s iteration %d: %s", c.run, c.iteration, note)
                continue
            self.ledger.put_snapshot(c.run, c.iteration, L.PINNING, c.path, bytes=size,
                                     manifest=dump_manifest(manifest))
            used += size
            self._submit(c.run, c.iteration, c.path, manifest, layout.snapshot_markers(c))
        return vanished

    def _submit(self, run, iteration, source, manifest, markers) -> None:
        root = snapshot_root(self.cache_dir, run, iteration)
        future = self.pool.submit(_pin_and_stat, source, root, manifest, self.modes[run], markers, self.abort)
        future.add_done_callback(lambda _f: self.on_done())
        self.futures[(run, iteration)] = future

    def collect(self) -> list[tuple[str, int, str]]:
        """Record finished pins; returns the (run, iteration, why) whose checkpoint vanished mid-pin.

        A pin's future is dropped only once its outcome is in the ledger: when the write fails (LedgerUnavailable,
        the daemon pauses), the next collect applies it again."""
        for key, future in list(self.futures.items()):
            if not future.done():
                continue
            run, iteration = key
            try:
                path, size, pinned = future.result()
            except PinAborted:
                pass  # stays 'pinning': redone on the next start
            except SnapshotVanished as e:
                self.ledger.set_snapshot(run, iteration, L.VANISHED, note=str(e))
                self.vanished.append((run, iteration, f"checkpoint deleted while pinning ({e})"))
            except (OSError, CheckpointUnreadable) as e:  # disk full, permissions: evaluate in place, loudly
                note = f"pinning failed ({e}): evaluated in place"
                self.ledger.set_snapshot(run, iteration, L.UNPINNED, note=note)
                log.error("%s iteration %d: %s", run, iteration, note)
            else:
                # from now on the manifest describes the snapshot, the files the stages read (the original's kept in it)
                self.ledger.set_snapshot(run, iteration, L.PINNED, path=path, bytes=size, manifest=pinned)
                log.info("%s iteration %d: pinned %.1f MB (%s) at %s", run, iteration, size / 1e6,
                         self.modes[run], path)
            del self.futures[key]
        vanished, self.vanished = self.vanished, []
        return vanished

    def verify(self, run: str, iteration: int) -> Optional[str]:
        """What changed in the files the stage read (the snapshot when pinned, else the original in place)
        since their manifest was taken, or, behind a snapshot, in the original's files still there (the
        iteration saved again after the pin); None when nothing did. Call it when a stage ends: a change
        means its result describes other bytes than the checkpoint found complete, or than the iteration's
        latest save. A row without a manifest (made by an older version) cannot be checked and reads as
        unchanged; a pinned row without the original's (older too) is checked on the snapshot only."""
        row = self.ledger.snapshot(run, iteration)
        if row is None or not row["manifest"] or row["state"] not in (L.PINNED, L.UNPINNED):
            return None
        base = row["path"] if row["state"] == L.PINNED else row["source"]
        change = manifest_changes(base, load_manifest(row["manifest"]))
        if change is not None:
            return f"{change} (while it was being evaluated)"
        original = load_original_manifest(row["manifest"]) if row["state"] == L.PINNED else None
        # an original file that is gone was rotated away (or is being deleted): the snapshot stands in for it
        try:
            change = None if original is None else manifest_changes(row["source"], original, gone_is_change=False)
        except OSError as e:  # the trainer's storage (ESTALE mid-rotation, EIO): cannot tell; the snapshot was read
            log.warning("%s iteration %d: could not check whether %s was saved again (%s); its result stands",
                        run, iteration, row["source"], e)
            return None
        return None if change is None else f"the original {row['source']} was saved again after the pin ({change})"

    def discard(self, run: str, iteration: int) -> None:
        """Drop the snapshot of an iteration, files and row, so the next ensure() pins it again (e.g. after
        verify() found it rewritten). A pin still in flight for it is forgotten; the next pin starts clean."""
        self.futures.pop((run, iteration), None)
        self.waiting.pop((run, iteration), None)
        release(snapshot_root(self.cache_dir, run, iteration))
        self.ledger.drop_snapshot(run, iteration)

    def keep(self, run: str, kept: dict[int, str]) -> list[int]:
        """Exempt these iterations' snapshots of a run from release ({iteration: why}, e.g. "best checkpoint");
        returns the iterations kept before and not now (the caller releases them when their jobs are final).
        A kept snapshot's row says why in its note (status lists it)."""
        before = self.kept.get(run, {})
        self.kept[run] = dict(kept)
        for iteration, why in kept.items():
            row = self.ledger.snapshot(run, iteration)
            if row is not None and row["state"] == L.PINNED and row["note"] != f"kept: {why}":
                self.ledger.set_snapshot(run, iteration, L.PINNED, note=f"kept: {why}")
        dropped = sorted(set(before) - set(kept))
        for iteration in dropped:
            row = self.ledger.snapshot(run, iteration)
            if row is not None and row["state"] == L.PINNED and (row["note"] or "").startswith("kept: "):
                self.ledger.set_snapshot(run, iteration, L.PINNED, note=None)
        return dropped

    def is_kept(self, run: str, iteration: int) -> bool:
        return iteration in self.kept.get(run, {})

    def release(self, run: str, iteration: int) -> None:
        """Release one iteration's snapshot once its last job is final: the pinned files are removed; a row
        read in place (unpinned) is closed too, so status lists only what is still held. A kept snapshot (the
        run's best, `keep`) stays."""
        row = self.ledger.snapshot(run, iteration)
        if row is None or row["state"] not in (L.PINNED, L.UNPINNED):
            return
        if row["state"] == L.PINNED and self.is_kept(run, iteration):
            return  # an unpinned one has nothing to keep: closed as usual
        if row["state"] == L.PINNED and release(snapshot_root(self.cache_dir, run, iteration)):
            log.info("%s iteration %d: snapshot released", run, iteration)
        self.ledger.set_snapshot(run, iteration, L.RELEASED)

    def recover(self) -> None:
        """Pins interrupted by a stop or a crash are redone from their manifest (runs still configured)."""
        for row in self.ledger.snapshots([L.PINNING]):
            run, iteration = row["run"], row["iteration"]
            if run not in self.layouts or not self.active(run):
                continue
            c = Checkpoint(run, iteration, row["source"], True)
            self._submit(run, iteration, row["source"], load_manifest(row["manifest"]),
                         self.layouts[run].snapshot_markers(c))

    def shutdown(self) -> None:
        self.abort.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def release(root: str) -> bool:
    """Delete a snapshot's files; what cannot be deleted (EPERM, EROFS, EIO) is named in a warning, not raised.
    Returns whether nothing is left."""
    errors = []

    def failed(_func, path, exc_info) -> None:
        if not issubclass(exc_info[0], FileNotFoundError):
            errors.append(f"{path}: {exc_info[1].strerror or exc_info[1]}")

    shutil.rmtree(root, onerror=failed)  # goes on past a failure: frees what it can
    if errors:
        log.warning("could not delete the snapshot %s (%s%s); its files stay on disk: delete them by hand", root,
                    errors[0], f", and {len(errors) - 1} more" if len(errors) > 1 else "")
    return not errors
