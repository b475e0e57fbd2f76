"""What the kernel says about a process (Linux /proc), for the daemon and the stage workers alike: standard library
only."""
from __future__ import annotations

import os
from typing import Optional

STATE, START_TIME = 0, 19  # indexes into the fields after the command name: stat(5) fields 3 and 22


def stat_fields(pid: int) -> Optional[list]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces and parentheses); None when there is
    no such process (or no procfs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > START_TIME else None


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of a pid, to tell a reused pid apart."""
    fields = stat_fields(pid)
    return fields[START_TIME] if fields else None


def still_runs(pid: int, start: Optional[str]) -> bool:
    """Whether `pid` is still the process that started at `start` (process_start_time) and has not exited. A zombie
    (exited, not yet reaped: the daemon's own child before wait(), or a leftover whose adopter does not reap) has."""
    fields = stat_fields(pid)
    return start is not None and fields is not None and fields[STATE] != "Z" and fields[START_TIME] == start


def exited(pid: int) -> bool:
    """Whether `pid` has exited: gone, or a zombie its parent has not reaped yet."""
    if not os.path.isdir("/proc/self"):  # no procfs: only a reaped process counts
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    fields = stat_fields(pid)
    return fields is None or fields[STATE] == "Z"
