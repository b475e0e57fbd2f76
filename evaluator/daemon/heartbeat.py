"""The daemon's heartbeat: `<cache_dir>/daemon.json`, so `status` can tell a running daemon from a stopped
or a killed one (after a kill -9 the ledger still says "inferring"; only a beat that stopped says why).

The daemon writes it atomically every `beat_every_s` seconds and whenever what it reports changes:

    {"schema_version": 1, "pid": int, "host": str,
     "started_at": wall, "beat_at": wall, "beat_every_s": float,
     "stopped_at": wall | null,                       # set on a clean shutdown only
     "unavailable": [{"benchmark": str | null, "run": str | null, "reason": str}],
     "settings_changed": [{"benchmark": str, "results": int, "changes": [str]}],
     "hints": {run: [str]}}

`liveness()` is the one decision "is the daemon alive", pure over that document, the clock and whether
its pid exists (`pid_exists`, asked only on the daemon's own host).
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import time
from typing import Optional

from evaluator.common.atomic import read_json, write_json_atomic

STATE_FILE = "daemon.json"
SCHEMA_VERSION = 1
BEAT_EVERY_S = 30.0  # the default the daemon beats at; a document's own beat_every_s wins
STALE_BEATS = 3  # a beat older than this many intervals is a dead daemon even if its pid exists (pid reuse)

ALIVE, STOPPED, DEAD, NEVER = "alive", "stopped", "dead", "never"
STALLED = "stalled"  # no beat for a while, its pid holding the cache_dir lock: paused on its ledger, or hung
LOCK_FILE = "daemon.lock"  # <cache_dir>/daemon.lock: held (flock) by the running daemon
LOW_DISK_BYTES = 1 << 20  # below this much free space under cache_dir, its disk counts as full


def disk_full(cache_dir: str) -> Optional[str]:
    """What to say when the disk of cache_dir has less than LOW_DISK_BYTES free, else None (also when unknown)."""
    try:
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        return None
    return f"the disk of cache_dir {cache_dir} is full ({free // 1024} KiB free)" if free < LOW_DISK_BYTES else None


def state_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, STATE_FILE)


def write_state(cache_dir: str, state: dict) -> None:
    """Write daemon.json atomically (a reader sees the old document or the new one, never a torn one)."""
    write_json_atomic(state_path(cache_dir), {**state, "schema_version": SCHEMA_VERSION})


# daemon.json's fields that status reads: the type each must have (a hand-edited or damaged file says so)
STATE_TYPES = {"runs": (dict, dict), "hints": (dict, list), "unavailable": (list, dict), "settings_changed": (list, None),
               "fingerprints": (dict, None), "stop_reason": (str, None), "host": (str, None), "paused": (str, None)}
KIND_NAMES = {dict: "an object", list: "a list", str: "a string"}


def read_state(cache_dir: str) -> Optional[dict]:
    """The last document the daemon wrote; None if it never wrote one. Raises ValueError naming the file
    when it is not a JSON object (status says so instead of guessing)."""
    path = state_path(cache_dir)
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, (kind, inner) in STATE_TYPES.items():  # what status reads, as the daemon writes it
        value = data.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{path}: {key}: expected {KIND_NAMES[kind]}, got {type(value).__name__}")
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        if inner is not None and any(not isinstance(v, inner) for v in items):
            raise ValueError(f"{path}: {key}: expected {KIND_NAMES[kind]} whose items are each {KIND_NAMES[inner]}")
    for entry in data.get("unavailable") or []:
        if any(entry.get(k) is not None and not isinstance(entry[k], str) for k in ("benchmark", "run", "reason")):
            raise ValueError(f"{path}: unavailable: expected entries of strings (benchmark, run, reason), "
                             f"got {entry!r}"[:300])
    for key in ("started_at", "beat_at", "stopped_at", "beat_every_s"):
        if data.get(key) is not None and not (isinstance(data[key], (int, float)) and math.isfinite(data[key])
                                              and abs(data[key]) < 1e11):  # seconds since 1970, or an interval
            raise ValueError(f"{path}: {key}: expected a time in seconds, got {data[key]!r}")
    return data


def pid_exists(state: Optional[dict]) -> bool:
    """Whether the daemon's pid exists. On another host the pid says nothing: True, and the beat's age decides."""
    if not state or state.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(state.get("pid")), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user (the service account)
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def duration(seconds: float) -> str:
    """A short human duration: 45s, 3m12s, 2h05m, 3d04h."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clock(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def holds_lock(cache_dir: str, state: Optional[dict]) -> Optional[bool]:
    """Whether the document's pid holds <cache_dir>/daemon.lock (a flock), read from /proc/locks without taking
    the lock; None where that cannot be known (not Linux, another host, no such file)."""
    if not state or state.get("host") != socket.gethostname():
        return None
    try:
        st = os.stat(os.path.join(cache_dir, LOCK_FILE))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # by inode and pid: the device /proc/locks prints is the superblock's, which stat() does not give on btrfs
    # subvolumes or some overlayfs mounts; a flock by that pid on another device's file of the same inode is moot
    holders = {parts[4] for parts in (line.split() for line in lines)
               if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(st.st_ino)}
    return str(state.get("pid")) in holders


def liveness(state: Optional[dict], now: float, pid_alive: bool, lock_held: Optional[bool] = None) -> tuple[str, str]:
    """("alive" | "stalled" | "stopped" | "dead" | "never", what to tell the operator) for a daemon.json document.

    `pid_alive`: whether the document's pid exists (pass True when it cannot be checked, e.g. another host).
    `lock_held`: whether that pid holds the cache_dir's daemon lock (`holds_lock`; None: unknown). A stale beat
    from a pid that holds it is a daemon paused or hung ("stalled"), not a pid reused by another process.
    A beat older than STALE_BEATS x beat_every_s is dead even if the pid exists: the pid may have been reused,
    or the daemon hangs."""
    if state is None:
        return NEVER, "no heartbeat: never started on this cache_dir, or by a version that writes no daemon.json"
    pid, host = state.get("pid"), state.get("host") or "?"
    stopped_at = _number(state.get("stopped_at"))
    if stopped_at is not None:
        how = state.get("stop_reason") or "stopped cleanly"
        return STOPPED, f"{how} at {clock(stopped_at)} ({duration(now - stopped_at)} ago, pid {pid} on {host})"
    beat_at = _number(state.get("beat_at"))
    every = _number(state.get("beat_every_s")) or BEAT_EVERY_S
    resumed = "jobs shown as running are resumed at the next start"
    if beat_at is None:
        return DEAD, f"NOT RUNNING? daemon.json has no heartbeat time (pid {pid} on {host}); {resumed}"
    age = max(now - beat_at, 0.0)  # a beat "in the future" is another host's clock; it is fresh
    if not pid_alive:
        return DEAD, f"NOT RUNNING — last heartbeat {duration(age)} ago, pid {pid} gone (killed?); {resumed}"
    if age > STALE_BEATS * every and lock_held:
        return STALLED, (f"NO HEARTBEAT for {duration(age)} (expected every {duration(every)}), but pid {pid} is alive "
                         f"on this host: paused on a ledger it cannot write (a full disk? its log says) or hung; "
                         f"do not start another, it resumes by itself once the ledger can be written")
    if age > STALE_BEATS * every:
        return DEAD, (f"NOT RUNNING — last heartbeat {duration(age)} ago, expected every {duration(every)} "
                      f"(pid {pid} on {host}: hung, killed, or its host is down); {resumed}")
    if state.get("paused"):
        return ALIVE, (f"alive but PAUSED (pid {pid} on {host}, heartbeat {duration(age)} ago): {state['paused']}; "
                       f"nothing is lost, it resumes by itself once the ledger can be written")
    return ALIVE, f"alive (pid {pid} on {host}, heartbeat {duration(age)} ago)"
