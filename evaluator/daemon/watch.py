"""Where change notices come from: watchdog's inotify Observer on local disks, and an APScheduler
interval job that asks for a full rescan every poll_seconds anyway (events get lost; on NFS/Lustre
inotify never fires for writes made on another machine, so there the rescan is the only source).

Both only *notify* (`on_change(run)`); what to do about it is the daemon's business.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler
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
    """A non-recursive inotify watch on each run's folder (scheduled lazily: it may not exist yet)."""

    def __init__(self, roots: dict[str, str], on_change: Callable[[str], None]):
        self.roots = roots  # run -> folder
        self.on_change = on_change
        self.observer = Observer()
        self.scheduled: set[str] = set()

    def start(self) -> None:
        self.observer.start()
        self.ensure_watches()

    def ensure_watches(self) -> None:
        """Watch folders that exist now; called again on every rescan for folders created later."""
        for run, root in self.roots.items():
            if run in self.scheduled or not os.path.isdir(root):
                continue
            try:
                self.observer.schedule(_Notify(run, self.on_change), root, recursive=False, event_filter=EVENTS)
                self.scheduled.add(run)
                log.info("watching %s (inotify)", root)
            except OSError as e:  # e.g. inotify watch limit reached: rescans still find everything
                log.warning("cannot watch %s (%s); relying on rescans", root, e)
                self.scheduled.add(run)

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)


class Rescanner:
    """Asks for a full rescan every `seconds`."""

    def __init__(self, seconds: float, on_tick: Callable[[], None]):
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(on_tick, "interval", seconds=seconds, id="rescan", max_instances=1,
                               coalesce=True)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
