"""Checkpoint layouts: what exists on disk, and which of it is *complete*.

Discovery only -- which checkpoints to evaluate (begin/end/interval) is `Selection`, and what
runs next is the daemon's business. Never report a half-written checkpoint as complete:
- megatron:    iter_%07d/ is complete when its iteration <= latest_checkpointed_iteration.txt
               (rank 0 writes the tracker after every rank saved); tracker 'release' -> release/.
- huggingface: checkpoint-N/ with a parseable config.json, every weight shard the index names
               (or a single weights file), each safetensors file as long as its own header says,
               and then either trainer_state.json (the Trainer writes it last) or all file sizes
               unchanged for settle_seconds (save_pretrained writes no final marker).
- deepspeed:   global_stepN/ is complete when N <= the step named by the `latest` file.
- glob:        entries matching a regex with an iteration group, complete when a done-marker
               exists or, without one configured, when their sizes are unchanged for settle_seconds.
"""
from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")


@dataclass(frozen=True)
class Checkpoint:
    run: str
    iteration: int
    path: str
    complete: bool
    reason: str = ""  # why it is not complete yet
    settle_deadline: Optional[float] = None  # when to look again if it is settling


@dataclass(frozen=True)
class Selection:
    """Data-Juicer's begin/end/interval: begin defaults to the interval; no end = watch forever."""

    begin: int
    end: Optional[int]
    interval: int

    @classmethod
    def make(cls, begin: Optional[int], end: Optional[int], interval: int) -> "Selection":
        return cls(interval if begin is None else begin, end, interval)

    def selects(self, iteration: int) -> bool:
        if iteration < self.begin or (self.end is not None and iteration > self.end):
            return False
        return (iteration - self.begin) % self.interval == 0

    def expected(self) -> Optional[list[int]]:
        """Every iteration the selection asks for, when it is finite."""
        if self.end is None:
            return None
        return list(range(self.begin, self.end + 1, self.interval))


class SettleTracker:
    """Remembers each candidate's file signature; 'settled' once unchanged for settle_seconds."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._seen: dict[str, tuple[tuple, float]] = {}

    def check(self, path: str) -> tuple[bool, Optional[float]]:
        """(settled, deadline to look again)."""
        sig = _signature(path)
        now = self.clock()
        prev = self._seen.get(path)
        if prev is None or prev[0] != sig:
            self._seen[path] = (sig, now)
            return False, now + max(self.settle_seconds, 0.05)
        if now - prev[1] >= self.settle_seconds:
            return True, None
        return False, prev[1] + self.settle_seconds

    def forget(self, path: str) -> None:
        self._seen.pop(path, None)


def _signature(path: str) -> tuple:
    """Names, sizes and mtimes of a file or of every file below a directory."""
    if os.path.isfile(path):
        st = os.stat(path)
        return (("", st.st_size, st.st_mtime_ns),)
    entries = []
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _numbered_entries(root: str, rx: re.Pattern, want_dir: bool = True) -> list[tuple[int, str]]:
    out = []
    try:
        with os.scandir(root) as it:
            for entry in it:
                m = rx.match(entry.name)
                if m and (not want_dir or entry.is_dir()):
                    out.append((int(m.group(1)), entry.path))
    except FileNotFoundError:
        pass
    return out


def _read_tracker(path: str) -> Optional[str]:
    """The tracker's text, None if there is none; damaged bytes come back as text that parses as nothing."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:  # unreadable (permissions, flaky storage): not complete, and say why
        return f"<unreadable: {e.strerror}>"


class CheckpointLayout:
    """Scans one training run's checkpoint folder."""

    name: ClassVar[str] = ""
    # True where completeness shows only inside a checkpoint dir (no tracker file beside them): only the
    # run folder is watched (a recursive watch on 10k dirs floods inotify), so incomplete ones are polled
    recheck_incomplete: ClassVar[bool] = False

    def __init__(self, run: str, root: str, settle_seconds: float = 2.0, pattern: Optional[str] = None,
                 done_marker: Optional[str] = None):
        self.run = run
        self.root = root
        self.settle = SettleTracker(settle_seconds)
        self.pattern = pattern
        self.done_marker = done_marker

    def scan(self, known_complete: frozenset = frozenset()) -> list[Checkpoint]:
        """Every checkpoint present now. Iterations in `known_complete` skip the deep checks."""
        raise NotImplementedError

    def incomplete_reason(self, path: str) -> Optional[str]:
        """What a layout can tell from the files alone (used on snapshots); None = nothing wrong."""
        return None

    def snapshot_markers(self, c: Checkpoint) -> dict[str, str]:
        """Files to write beside a snapshot so it loads like the original folder."""
        return {}


class TrackerLayout(CheckpointLayout):
    """A numbered directory is complete once a tracker file names an iteration >= its own."""

    dir_pattern: ClassVar[re.Pattern]
    tracker_name: ClassVar[str]

    def parse_tracker(self, text: str) -> Optional[int]:
        raise NotImplementedError

    def scan(self, known_complete: frozenset = frozenset()) -> list[Checkpoint]:
        entries = _numbered_entries(self.root, self.dir_pattern)
        text = _read_tracker(os.path.join(self.root, self.tracker_name))
        tracked = self.parse_tracker(text) if text else None
        out = []
        for iteration, path in sorted(entries):
            if tracked is not None and iteration <= tracked:
                out.append(Checkpoint(self.run, iteration, path, True))
            elif text is None:
                out.append(Checkpoint(self.run, iteration, path, False, f"no {self.tracker_name} yet"))
            elif tracked is None:
                out.append(Checkpoint(self.run, iteration, path, False, f"{self.tracker_name} says {text!r}"))
            else:
                out.append(Checkpoint(self.run, iteration, path, False, f"beyond {self.tracker_name} ({tracked}): still being written"))
        return out


class MegatronLayout(TrackerLayout):
    name = "megatron"
    dir_pattern = re.compile(r"^iter_(\d+)$")
    tracker_name = MEGATRON_TRACKER

    def parse_tracker(self, text: str) -> Optional[int]:
        return int(text) if text.isdigit() else None

    def snapshot_markers(self, c: Checkpoint) -> dict[str, str]:
        name = os.path.basename(c.path)
        return {MEGATRON_TRACKER: "release" if name == "release" else str(c.iteration)}

    def scan(self, known_complete: frozenset = frozenset()) -> list[Checkpoint]:
        out = super().scan(known_complete)
        release = os.path.join(self.root, "release")
        # 'release' marks a final/converted checkpoint with no iteration: reported as iteration 0
        if _read_tracker(os.path.join(self.root, self.tracker_name)) == "release" and os.path.isdir(release):
            out.insert(0, Checkpoint(self.run, 0, release, True))
        return out


class DeepSpeedLayout(TrackerLayout):
    name = "deepspeed"
    dir_pattern = re.compile(r"^global_step(\d+)$")
    tracker_name = DEEPSPEED_TRACKER

    def parse_tracker(self, text: str) -> Optional[int]:
        m = self.dir_pattern.match(text)
        return int(m.group(1)) if m else None

    def snapshot_markers(self, c: Checkpoint) -> dict[str, str]:
        return {DEEPSPEED_TRACKER: os.path.basename(c.path)}


def safetensors_complete(path: str) -> bool:
    """True when the file is as long as its header says (a torn or growing file is shorter)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return False
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 100_000_000:
                return False
            header = json.loads(f.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return False  # unreadable or a header of the wrong shape: not (yet) a whole file
    return size == 8 + header_len + end


def huggingface_incomplete_reason(path: str) -> Optional[str]:
    """Why an HF checkpoint dir is not complete (ignoring settling), or None if its files are whole."""
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return "deleted"
    if "config.json" not in names:
        return "no config.json yet"
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "config.json not parseable yet"
    index_name = next((n for n in WEIGHT_INDEXES if n in names), None)
    if index_name:
        try:
            with open(os.path.join(path, index_name), encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return f"{index_name} not parseable yet"
        missing = sorted(shards - names)
        if missing:
            return f"shard {missing[0]} named by {index_name} not present yet"
        weights = sorted(shards)
    else:
        shard_names = [n for n in names if SHARD_NAME.match(n)]
        if shard_names:
            return "sharded weights without their index yet"
        weights = [n for n in SINGLE_WEIGHTS if n in names]
        if not weights:
            return "no weights yet"
    for w in weights:
        if w.endswith(".safetensors") and not safetensors_complete(os.path.join(path, w)):
            return f"{w} shorter than its header says (still being written)"
    return None


class HuggingFaceLayout(CheckpointLayout):
    name = "huggingface"
    recheck_incomplete = True
    dir_pattern = re.compile(r"^checkpoint-(\d+)$")

    def incomplete_reason(self, path: str) -> Optional[str]:
        return huggingface_incomplete_reason(path)

    def scan(self, known_complete: frozenset = frozenset()) -> list[Checkpoint]:
        out = []
        for iteration, path in sorted(_numbered_entries(self.root, self.dir_pattern)):
            if iteration in known_complete:
                out.append(Checkpoint(self.run, iteration, path, True))
                continue
            reason = huggingface_incomplete_reason(path)
            if reason:
                self.settle.forget(path)
                out.append(Checkpoint(self.run, iteration, path, False, reason))
                continue
            if _trainer_state_written(path):
                out.append(Checkpoint(self.run, iteration, path, True))
                continue
            settled, deadline = self.settle.check(path)
            out.append(Checkpoint(self.run, iteration, path, settled, "" if settled else "settling", deadline))
        return out


def _trainer_state_written(path: str) -> bool:
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


class GlobLayout(CheckpointLayout):
    name = "glob"
    recheck_incomplete = True

    def scan(self, known_complete: frozenset = frozenset()) -> list[Checkpoint]:
        rx = re.compile(self.pattern or "")
        group = "iteration" if "iteration" in rx.groupindex else 1
        out = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return out
        for entry in entries:
            m = rx.fullmatch(entry.name)
            if not m or not (m.group(group) or "").isdigit():
                continue  # not a checkpoint name (e.g. 'ckpt_final' for a pattern 'ckpt_(.+)')
            iteration = int(m.group(group))
            if iteration in known_complete:
                out.append(Checkpoint(self.run, iteration, entry.path, True))
            elif self.done_marker:
                marker = os.path.join(self.root, self.done_marker.format(name=entry.name, iteration=iteration))
                done = os.path.exists(marker)
                out.append(Checkpoint(self.run, iteration, entry.path, done, "" if done else f"waiting for {marker}"))
            else:
                settled, deadline = self.settle.check(entry.path)
                out.append(Checkpoint(self.run, iteration, entry.path, settled, "" if settled else "settling", deadline))
        return sorted(out, key=lambda c: c.iteration)


LAYOUTS: dict[str, type[CheckpointLayout]] = {
    cls.name: cls for cls in (MegatronLayout, HuggingFaceLayout, DeepSpeedLayout, GlobLayout)
}
