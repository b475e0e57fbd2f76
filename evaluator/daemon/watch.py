"""Where change notices come from: watchdog's inotify Observer on local disks. The daemon loop also
rescans every poll_seconds on the monotonic clock (policy.rescan_due): events get lost, and on
NFS/Lustre inotify never fires for writes made on another machine, so there the rescan is the only
source. A wall-clock scheduler would stop rescanning after a clock step back; the loop's deadline cannot.

The watcher only *notifies* (`on_change(run)`); what to do about it is the daemon's business.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileMovedEvent, FileSystemEventHandler)
from watchdog.observers import Observer

log = logging.getLogger(__name__)

# filesystems where inotify does not see writes made by other machines
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
              "9p", "afs", "panfs", "wekafs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs"}


def filesystem_type(path: str) -> str:
    """The type of the mount holding `path` (longest mount-point prefix in /proc/mounts)."""
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def choose_mode(mode: str, paths: list[str]) -> str:
    """'inotify' or 'polling'; 'auto' polls when any watched path is on a network filesystem."""
    if mode != "auto":
        return mode
    for p in paths:
        if filesystem_type(p) in NETWORK_FS:
            return "polling"
    return "inotify"


# What can change completeness in a run folder: entries appearing, going, renamed, or a file closed
# after writing (a tracker rewritten in place). Not every write(): that would rescan per chunk.
EVENTS = [DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent,
          FileClosedEvent]


class _Notify(FileSystemEventHandler):
    def __init__(self, run: str, on_change: Callable[[str], None]):
        self.run = run
        self.on_change = on_change

    def on_any_event(self, event):
        self.on_change(self.run)


class CheckpointWatcher:
    """A non-recursive inotify watch on each run's folder (scheduled lazily: it may not exist yet).

    A run folder deleted and created again is another directory: its old watch sees nothing. Each call
    of `ensure_watches` compares the folder's (device, inode) with the watched one and watches anew."""

    def __init__(self, roots: dict[str, str], on_change: Callable[[str], None]):
        self.roots = roots  # run -> folder
        self.on_change = on_change
        self.observer = Observer()
        self.watches: dict[str, tuple] = {}  # run -> ((st_dev, st_ino), watch or None when the limit was hit)

    @property
    def scheduled(self) -> set[str]:
        return set(self.watches)

    def start(self) -> None:
        self.observer.start()
        self.ensure_watches()

    def ensure_watches(self) -> None:
        """Watch folders that exist now (and again when one was replaced); called after every rescan."""
        for run, root in self.roots.items():
            try:
                st = os.stat(root)
                ident = (st.st_dev, st.st_ino)
            except OSError:
                ident = None
            current = self.watches.get(run)
            if current is not None and current[0] == ident:
                continue
            if current is not None:
                self._unwatch(run, current[1])
            if ident is None or not os.path.isdir(root):
                continue
            try:
                watch = self.observer.schedule(_Notify(run, self.on_change), root, recursive=False, event_filter=EVENTS)
                self.watches[run] = (ident, watch)
                log.info("watching %s (inotify)", root)
                self.on_change(run)  # what appeared before the watch existed
            except OSError as e:  # e.g. inotify watch limit reached: rescans still find everything
                log.warning("cannot watch %s (%s); relying on rescans", root, e)
                self.watches[run] = (ident, None)

    def _unwatch(self, run: str, watch) -> None:
        del self.watches[run]
        if watch is None:
            return
        try:
            self.observer.unschedule(watch)
        except (KeyError, ValueError, OSError):
            pass  # the emitter already stopped with its deleted folder

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
