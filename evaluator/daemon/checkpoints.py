"""Checkpoint layouts: what exists on disk, and which of it is *complete*.

Discovery only -- which checkpoints to evaluate (begin/end/interval) is `Selection`, and what
runs next is the daemon's business. Never report a half-written checkpoint as complete.

Every layout has a *final marker* (Megatron's tracker, DeepSpeed's `latest`, the HF Trainer's
trainer_state.json, a glob done-marker; HF save_pretrained and a glob without marker have none).
Once it covers a checkpoint, its files must also stand still (names, sizes, mtimes) for
`settle_seconds`: on NFS the marker can become visible before another rank's file is finished.
Then the checkpoint is
- complete, when it holds what that kind of save writes, or
- invalid (`Checkpoint.invalid`), when it does not and nothing more will be written to it (a
  crashed save below the tracker, a truncated safetensors behind trainer_state.json): reported
  once, so the daemon can fail it with the reason instead of waiting for it forever.

- megatron:    iter_%07d/ at or below latest_checkpointed_iteration.txt holding every
               mp_rank_*/model_optim_rng.pt (legacy) or a .metadata (torch_dist); the one the
               tracker names is waited on, not judged invalid (its files may still show up).
               Tracker 'release' -> release/ as iteration 0.
- huggingface: checkpoint-N/ with a parseable config.json, every weight shard the index names
               (or a single weights file), each safetensors file as long as its own header says;
               then trainer_state.json (the Trainer writes it last) or, without it, settled sizes -- except
               a folder holding training_args.bin (a Trainer save: a crashed one has no trainer_state.json
               and is never taken for finished), or a completion notice (EvaluatorCallback).
- deepspeed:   global_stepN/ at or below the step named by `latest`, holding a *model_states.pt.
- glob:        entries matching a regex with an iteration group, complete when a done-marker
               exists and they settled, or, without a marker configured, once they settled.

Two folders naming one iteration (iter_0300 and iter_0000300): one is the checkpoint (the
layout's canonical name, else the first by name), the other is reported as ignored, so a scan
never yields two complete checkpoints of one iteration.

Completion notices (`<cache_dir>/notices/<run>/iter_%07d.json`, written by the training script through
evaluator.api: the Trainer callback's on_save, evaluate_checkpoint): the writer says the checkpoint at that
path is finished. It stands for the final marker and ends the settle wait (nothing more will be written, so
content that is still not whole is invalid), as long as the files are those it saw (`notice_holds`: a later save
of that iteration into the same folder makes it void). A noticed path outside the run folder's listing is part of the
run all the same (judged by the layout's `incomplete_reason`).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Optional

from evaluator.common.atomic import write_json_atomic
from evaluator.common.checks import iteration_number

MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")
# Megatron: mp_rank_{tp:02d}, + _{pp:03d} with pipeline parallelism, + _{ep:03d} with expert parallelism
MEGATRON_RANK_DIR = re.compile(r"^mp_rank_(\d+(?:_\d+)*)$")
MEGATRON_RANK_FILE = "model_optim_rng.pt"
NOTICES = "notices"  # <cache_dir>/notices/<run>/iter_%07d.json: completion notices from training scripts
NOTICE_NAME = re.compile(r"^iter_(\d+)\.json$")


@dataclass(frozen=True)
class Checkpoint:
    run: str
    iteration: int
    path: str
    complete: bool
    reason: str = ""  # why it is not complete (yet), or why it is invalid
    # when a rescan may change the verdict (files settling, on the layout's monotonic clock); None: only a
    # change on disk (a watcher event, a periodic rescan) can
    settle_deadline: Optional[float] = None
    # non-empty: the final marker is there, the content is not valid and has not changed for settle_seconds;
    # nothing will complete it, so it is reported for failing instead of waited on (complete is False)
    invalid: str = ""


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

    def expected(self) -> Optional[range]:
        """Every iteration the selection asks for, when it is finite: a range, never a list (an --end-iteration far
        away names more iterations than memory holds)."""
        if self.end is None:
            return None
        return range(self.begin, self.end + 1, self.interval)


class SettleTracker:
    """Remembers each candidate's file signature; 'settled' once unchanged for settle_seconds."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._seen: dict[str, tuple[tuple, float]] = {}
        self._checked: set[str] = set()

    def check(self, path: str) -> tuple[bool, Optional[float]]:
        """(settled, deadline to look again). Raises OSError when part of it cannot be listed."""
        sig = _signature(path)
        now = self.clock()
        self._checked.add(path)
        prev = self._seen.get(path)
        if prev is None or prev[0] != sig:
            self._seen[path] = (sig, now)
            return False, now + max(self.settle_seconds, 0.05)
        if now - prev[1] >= self.settle_seconds:
            return True, None
        return False, prev[1] + self.settle_seconds

    def forget(self, path: str) -> None:
        self._seen.pop(path, None)

    def sweep(self) -> None:
        """Forget what was not checked since the last sweep (known, deleted, or back to waiting for its
        marker), so memory stays bounded by the checkpoints still being judged."""
        self._seen = {p: v for p, v in self._seen.items() if p in self._checked}
        self._checked = set()


def _raise(e: OSError) -> None:
    raise e


def _signature(path: str) -> tuple:
    """Names, sizes and mtimes of a file or of every file below a directory.

    A directory that cannot be listed raises OSError: os.walk would skip it silently, and a folder
    whose files we cannot see must not settle as an empty one.
    """
    if os.path.isfile(path):
        st = os.stat(path)
        return (("", st.st_size, st.st_mtime_ns),)
    entries = []
    for dirpath, _dirs, files in os.walk(path, onerror=_raise):
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
                iteration = iteration_number(m.group(1)) if m else None
                if iteration is not None and (not want_dir or entry.is_dir()):
                    out.append((iteration, entry.path))
    except FileNotFoundError:
        pass
    return out


def _read_tracker(path: str) -> Optional[str]:
    """The tracker's text, None if there is none; damaged bytes come back as text that parses as nothing.

    Tolerant of what editors and other tools add: a UTF-8 BOM, surrounding whitespace and newlines.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:  # unreadable (permissions, flaky storage): not complete, and say why
        return f"<unreadable: {e.strerror}>"
    return raw.decode("utf-8", "replace").strip().lstrip("\ufeff").strip()


class CheckpointLayout:
    """Scans one training run's checkpoint folder."""

    name: ClassVar[str] = ""
    # True where completeness shows only inside a checkpoint dir (no tracker file beside them): only the
    # run folder is watched (a recursive watch on 10k dirs floods inotify), so incomplete ones are polled
    recheck_incomplete: ClassVar[bool] = False

    def __init__(self, run: str, root: str, settle_seconds: float = 2.0, pattern: Optional[str] = None,
                 done_marker: Optional[str] = None, notices: Optional[str] = None):
        self.run = run
        self.root = root
        self.settle = SettleTracker(settle_seconds)
        self.pattern = pattern
        self.done_marker = done_marker
        self.notices = notices  # this run's completion-notice folder (None: notices are not read)

    def scan(self, known_complete: frozenset = frozenset()) -> list[Checkpoint]:
        """Every checkpoint present now, by iteration. Iterations in `known_complete` (the caller has its
        verdict already) skip every deep check, so a rescan costs O(new entries)."""
        found = self._scan(known_complete)
        extra = self._noticed_elsewhere({c.iteration for c in found}, known_complete)
        if extra:
            found = sorted(found + extra, key=lambda c: c.iteration)
        self.settle.sweep()
        return found

    # ---- completion notices (the module docstring) ------------------------------------------------------
    def _notice(self, iteration: int) -> Optional[dict]:
        if not self.notices:
            return None
        try:
            note = read_notice(os.path.join(self.notices, notice_name(iteration)))
        except (OSError, ValueError):  # none, or being replaced: the settle rules apply meanwhile
            return None
        return note if note.get("iteration") == iteration else None

    def noticed_path(self, iteration: int) -> Optional[str]:
        """The path a completion notice names for this iteration, None without a (readable) notice."""
        note = self._notice(iteration)
        return note["path"] if note else None

    def _noticed(self, iteration: int, path: str) -> bool:
        """A notice names `path` and its content is still what the notice saw (notice_holds)."""
        note = self._notice(iteration)
        return note is not None and os.path.realpath(note["path"]) == os.path.realpath(path) and notice_holds(note)

    def _noticed_elsewhere(self, listed: set, known_complete: frozenset) -> list[Checkpoint]:
        """Noticed checkpoints the folder listing does not hold (a path outside the run folder)."""
        out = []
        for iteration, _ in _numbered_entries(self.notices, NOTICE_NAME, want_dir=False) if self.notices else []:
            path = None if iteration in listed else self.noticed_path(iteration)
            if path is None or not os.path.exists(path):
                continue  # a deleted one is absent like any other (the vanish rules apply)
            if iteration in known_complete:
                out.append(Checkpoint(self.run, iteration, path, True))
                continue
            if not self._noticed(iteration, path):  # written again since its notice: the next notice says when
                out.append(Checkpoint(self.run, iteration, path, False, "changed since its completion notice"))
                continue
            try:
                problem = self.incomplete_reason(path)
            except OSError as e:
                out.append(Checkpoint(self.run, iteration, path, False, f"cannot read {e.filename or path}: "
                                                                        f"{e.strerror or e}"))
                continue
            out.append(Checkpoint(self.run, iteration, path, problem is None, problem or "",
                                  invalid=f"{problem} (its completion notice says it is finished)" if problem else ""))
        return out

    def _scan(self, known_complete: frozenset) -> list[Checkpoint]:
        raise NotImplementedError

    def canonical_name(self, iteration: int) -> Optional[str]:
        """The folder name this layout's trainer writes for an iteration (preferred among duplicates)."""
        return None

    def incomplete_reason(self, path: str) -> Optional[str]:
        """What a layout can tell from the files alone (used on snapshots); None = nothing wrong.
        Raises OSError when the files cannot be read (no verdict either way)."""
        return None

    def snapshot_markers(self, c: Checkpoint) -> dict[str, str]:
        """Files to write beside a snapshot so it loads like the original folder."""
        return {}

    def _judge_each(self, entries: Iterable[tuple[int, str]], known_complete: frozenset,
                    judge: Callable[[int, str], Checkpoint]) -> list[Checkpoint]:
        """One checkpoint per iteration, judged by `judge` unless known; other folders naming the same
        iteration are reported as ignored (evaluating both would record two results for one iteration)."""
        by_iteration: dict[int, list[str]] = {}
        for iteration, path in entries:
            by_iteration.setdefault(iteration, []).append(path)
        out = []
        for iteration in sorted(by_iteration):
            chosen, *others = by_iteration[iteration]
            if others:
                canonical = self.canonical_name(iteration)
                chosen, *others = sorted(by_iteration[iteration],
                                         key=lambda p: (os.path.basename(p) != canonical, os.path.basename(p)))
            if iteration in known_complete:
                out.append(Checkpoint(self.run, iteration, chosen, True))
            else:
                try:
                    out.append(judge(iteration, chosen))
                except OSError as e:  # permissions, flaky storage: no verdict; say why and look again later
                    out.append(Checkpoint(self.run, iteration, chosen, False,
                                          f"cannot read {e.filename or chosen}: {e.strerror or e}"))
                except (ValueError, OverflowError) as e:  # one odd file: this checkpoint waits, the others go on
                    out.append(Checkpoint(self.run, iteration, chosen, False,
                                          f"cannot make sense of its files ({type(e).__name__}: {e})"))
            for other in others:
                out.append(Checkpoint(self.run, iteration, other, False,
                                      f"another folder names iteration {iteration}: {chosen}; ignored"))
        return out

    def _settled_verdict(self, iteration: int, path: str, problem: Optional[str], final: bool) -> Checkpoint:
        """The verdict once the final marker covers a checkpoint: wait until its files stood still for
        settle_seconds (NFS may show the marker before a rank's file is finished); then complete when
        nothing is wrong; when something is, invalid if `final` (nothing more will be written to it),
        else still waited on, with no deadline (only a change on disk can help)."""
        if self._noticed(iteration, path):  # its writer said it is finished: no settle wait, nothing more will come
            return Checkpoint(self.run, iteration, path, problem is None, problem or "",
                              invalid=f"{problem} (its completion notice says it is finished)" if problem else "")
        settled, deadline = self.settle.check(path)
        if not settled:
            return Checkpoint(self.run, iteration, path, False, problem or "settling", deadline)
        if problem is None:
            return Checkpoint(self.run, iteration, path, True)
        if final:
            return Checkpoint(self.run, iteration, path, False, problem, invalid=problem)
        return Checkpoint(self.run, iteration, path, False, problem)


# a save below the tracker whose files are newer than the tracker is not vouched for by it (a run restarted from an
# earlier checkpoint writes iter_350 under the first attempt's tracker of 400, rank by rank): it must stand still
# this long, past any gap between ranks, unless the tracker is written after it (the writer saying it is done)
RESAVE_SETTLE_SECONDS = 60.0
MTIME_SLACK_NS = 2 * 10**9  # filesystems that keep mtimes to the second or two


class TrackerLayout(CheckpointLayout):
    """A numbered directory is complete once a tracker file names an iteration >= its own, and it holds
    the files its kind of save writes, settled."""

    dir_pattern: ClassVar[re.Pattern]
    tracker_name: ClassVar[str]

    def parse_tracker(self, text: str) -> Optional[int]:
        raise NotImplementedError

    def _written_after_tracker(self, iteration: int, path: str) -> Optional[Checkpoint]:
        """A waiting verdict for a save whose files are newer than the tracker and younger than
        RESAVE_SETTLE_SECONDS (RESAVE_SETTLE_SECONDS above), else None: judge it as the tracker says."""
        if self._noticed(iteration, path):
            return None
        try:
            tracker = os.stat(os.path.join(self.root, self.tracker_name)).st_mtime_ns
            newest = max((mtime for _, _, mtime in _signature(path)), default=0)
        except OSError:
            return None  # the usual verdict says what cannot be read
        if newest <= tracker + MTIME_SLACK_NS:
            return None
        age = time.time() - newest / 1e9
        if age >= RESAVE_SETTLE_SECONDS:
            return None
        return Checkpoint(self.run, iteration, path, False,
                          f"written after {self.tracker_name}: a save below it (a restarted run?) waits for its "
                          f"files to stand still {RESAVE_SETTLE_SECONDS:.0f}s or for {self.tracker_name} to name it",
                          self.settle.clock() + RESAVE_SETTLE_SECONDS - age)

    def files_problem(self, path: str) -> Optional[str]:
        """What a save of this kind would have written and is not there; None = all there."""
        return None

    def incomplete_reason(self, path: str) -> Optional[str]:
        return self.files_problem(path)

    def _scan(self, known_complete: frozenset) -> list[Checkpoint]:
        text = _read_tracker(os.path.join(self.root, self.tracker_name))
        tracked = self.parse_tracker(text) if text else None

        def judge(iteration: int, path: str) -> Checkpoint:
            if text is None:
                return Checkpoint(self.run, iteration, path, False, f"no {self.tracker_name} yet")
            if tracked is None:
                return Checkpoint(self.run, iteration, path, False, f"{self.tracker_name} says {text!r}")
            if iteration > tracked:
                return Checkpoint(self.run, iteration, path, False,
                                  f"beyond {self.tracker_name} ({tracked}): still being written")
            wait = self._written_after_tracker(iteration, path)
            if wait is not None:
                return wait
            # below the tracker a later save finished, so a folder still lacking files is a crashed save
            return self._settled_verdict(iteration, path, self.files_problem(path), final=iteration < tracked)

        return self._judge_each(_numbered_entries(self.root, self.dir_pattern), known_complete, judge)


def megatron_files_problem(path: str) -> Optional[str]:
    """What a Megatron save would have written and is not in `path` (None = a whole save).

    torch_dist: `.metadata` (torch.distributed.checkpoint writes it last). Legacy: every mp_rank_* folder
    holds a non-empty model_optim_rng.pt, and the rank folders form a full grid (mp_rank_00, mp_rank_01, ...;
    with pipeline parallelism mp_rank_00_000, mp_rank_00_001, ...), so a rank folder missing in the middle
    shows. Raises OSError when the folder cannot be read.
    """
    names = os.listdir(path)
    if ".metadata" in names:
        return None if os.path.getsize(os.path.join(path, ".metadata")) > 0 else ".metadata is empty"
    ranks = {}
    for name in names:
        m = MEGATRON_RANK_DIR.match(name)
        if m and os.path.isdir(os.path.join(path, name)):
            ranks[tuple(int(i) for i in m.group(1).split("_"))] = name
    if not ranks:
        return f"no mp_rank_*/{MEGATRON_RANK_FILE} and no .metadata (not a finished Megatron save)"
    dims = {len(k) for k in ranks}
    if len(dims) > 1:
        return f"rank folders of different parallel layouts: {', '.join(sorted(ranks.values()))}"
    grid = itertools.product(*(range(max(k[d] for k in ranks) + 1) for d in range(dims.pop())))
    missing = [k for k in grid if k not in ranks]
    if missing:
        return "rank folder " + "_".join(["mp_rank", f"{missing[0][0]:02d}", *(f"{i:03d}" for i in missing[0][1:])]) \
            + " missing"
    for name in sorted(ranks.values()):
        try:
            size = os.path.getsize(os.path.join(path, name, MEGATRON_RANK_FILE))
        except FileNotFoundError:
            return f"{name}/{MEGATRON_RANK_FILE} missing"
        if size == 0:
            return f"{name}/{MEGATRON_RANK_FILE} is empty"
    return None


class MegatronLayout(TrackerLayout):
    name = "megatron"
    dir_pattern = re.compile(r"^iter_(\d+)$")
    tracker_name = MEGATRON_TRACKER

    def parse_tracker(self, text: str) -> Optional[int]:
        return iteration_number(text)

    def canonical_name(self, iteration: int) -> Optional[str]:
        return f"iter_{iteration:07d}"

    def files_problem(self, path: str) -> Optional[str]:
        return megatron_files_problem(path)

    def snapshot_markers(self, c: Checkpoint) -> dict[str, str]:
        name = os.path.basename(c.path)
        return {MEGATRON_TRACKER: "release" if name == "release" else str(c.iteration)}

    def _scan(self, known_complete: frozenset) -> list[Checkpoint]:
        out = super()._scan(known_complete)
        release = os.path.join(self.root, "release")
        # 'release' marks a final/converted checkpoint with no iteration: reported as iteration 0, judged as
        # the checkpoint the tracker names (waited on while files are missing, never invalid)
        if _read_tracker(os.path.join(self.root, self.tracker_name)) == "release" and os.path.isdir(release):
            if 0 in known_complete:
                found = Checkpoint(self.run, 0, release, True)
            else:
                found = self._judge_each([(0, release)], frozenset(),
                                         lambda it, p: self._settled_verdict(it, p, self.files_problem(p), False))[0]
            out.insert(0, found)
        return out


class DeepSpeedLayout(TrackerLayout):
    name = "deepspeed"
    dir_pattern = re.compile(r"^global_step(\d+)$")
    tracker_name = DEEPSPEED_TRACKER

    def parse_tracker(self, text: str) -> Optional[int]:
        m = self.dir_pattern.match(text)
        return iteration_number(m.group(1)) if m else None

    def canonical_name(self, iteration: int) -> Optional[str]:
        return f"global_step{iteration}"

    def files_problem(self, path: str) -> Optional[str]:
        # every DeepSpeed save writes model states (mp_rank_00_model_states.pt, layer_*-model_states.pt, ...)
        if any(n.endswith("model_states.pt") for n in os.listdir(path)):
            return None
        return "no *model_states.pt (not a finished DeepSpeed save)"

    def snapshot_markers(self, c: Checkpoint) -> dict[str, str]:
        return {DEEPSPEED_TRACKER: os.path.basename(c.path)}


def safetensors_problem(path: str) -> Optional[str]:
    """Why a safetensors file is not whole (a torn or growing file is shorter than its header says);
    None = it is. Raises OSError when it cannot be read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"{size} bytes: shorter than its header length field"
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            return f"{size} bytes: shorter than its header"
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError):
            return "header not parseable"
    if size != 8 + header_len + end:
        return f"{size} bytes, its header says {8 + header_len + end}"
    return None


def safetensors_complete(path: str) -> bool:
    """True when the file is as long as its header says (a torn or growing file is shorter)."""
    try:
        return safetensors_problem(path) is None
    except OSError:
        return False


def _load_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read())


def huggingface_incomplete_reason(path: str) -> Optional[str]:
    """Why an HF checkpoint dir is not complete (ignoring settling), or None if its files are whole.

    Raises OSError (other than a missing file) when something cannot be read: no verdict either way.
    """
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return "deleted"
    if "config.json" not in names:
        return "no config.json"
    try:
        _load_json(os.path.join(path, "config.json"))
    except FileNotFoundError:
        return "no config.json"
    except ValueError as e:
        return f"config.json not parseable ({e})"
    index_name = next((n for n in WEIGHT_INDEXES if n in names), None)
    if index_name:
        try:
            shards = set(_load_json(os.path.join(path, index_name))["weight_map"].values())
        except FileNotFoundError:
            return f"no {index_name}"
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index_name} not parseable"
        missing = sorted(shards - names)
        if missing:
            return f"shard {missing[0]} named by {index_name} not present"
        weights = sorted(shards)
    else:
        if any(SHARD_NAME.match(n) for n in names):
            return "sharded weights without their index"
        weights = [n for n in SINGLE_WEIGHTS if n in names]
        if not weights:
            return "no weights"
    for w in weights:
        if w.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(path, w))
            if problem:
                return f"{w} is not whole: {problem}"
    return None


class HuggingFaceLayout(CheckpointLayout):
    name = "huggingface"
    recheck_incomplete = True
    dir_pattern = re.compile(r"^checkpoint-(\d+)$")

    def canonical_name(self, iteration: int) -> Optional[str]:
        return f"checkpoint-{iteration}"

    def incomplete_reason(self, path: str) -> Optional[str]:
        return huggingface_incomplete_reason(path)

    # whether a checkpoint of this run has trainer_state.json: then every one is a Trainer save (None: not looked yet)
    trainer_run: Optional[bool] = None

    def _scan(self, known_complete: frozenset) -> list[Checkpoint]:
        entries = _numbered_entries(self.root, self.dir_pattern)
        if self.trainer_run is None:  # once: the folders there (known ones too), up to the first found
            self.trainer_run = any(_trainer_state_written(path) for _, path in entries)

        def judge(iteration: int, path: str) -> Checkpoint:
            problem = huggingface_incomplete_reason(path)
            trainer_saved = _trainer_state_written(path)
            self.trainer_run = self.trainer_run or trainer_saved
            marker = trainer_saved or self._noticed(iteration, path)
            if problem and not marker:
                return Checkpoint(self.run, iteration, path, False, problem)  # still being written
            if not marker and (self.trainer_run or os.path.exists(os.path.join(path, "training_args.bin"))):
                # a Trainer save (its run's other checkpoints have trainer_state.json, or training_args.bin is
                # here): the Trainer writes trainer_state.json last, after the weights, the tokenizer,
                # training_args.bin and the optimizer; one without it is still being written, or crashed (its
                # weights may be whole), and the resumed run's re-save completes it
                return Checkpoint(self.run, iteration, path, False,
                                  "a Trainer save without trainer_state.json yet (the Trainer writes it last)")
            # trainer_state.json is written last, so a problem behind it stays; without it (save_pretrained)
            # settled sizes are the only completion signal
            return self._settled_verdict(iteration, path, problem, final=marker)

        return self._judge_each(entries, known_complete, judge)


def _trainer_state_written(path: str) -> bool:
    try:
        _load_json(os.path.join(path, "trainer_state.json"))
        return True
    except (OSError, ValueError):
        return False


class GlobLayout(CheckpointLayout):
    name = "glob"
    recheck_incomplete = True

    def _scan(self, known_complete: frozenset) -> list[Checkpoint]:
        rx = re.compile(self.pattern or "")
        group = "iteration" if "iteration" in rx.groupindex else 1
        entries = []
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    m = rx.fullmatch(entry.name)
                    # not 'ckpt_final' (or '²') for a pattern 'ckpt_(.+)'
                    iteration = iteration_number(m.group(group) or "") if m else None
                    if iteration is not None:
                        entries.append((iteration, entry.path))
        except FileNotFoundError:
            return []

        def judge(iteration: int, path: str) -> Checkpoint:
            if self.done_marker and not self._noticed(iteration, path):
                name = os.path.basename(path)
                marker = os.path.join(self.root, self.done_marker.format(name=name, iteration=iteration))
                if not os.path.exists(marker):
                    return Checkpoint(self.run, iteration, path, False, f"waiting for {marker}")
            return self._settled_verdict(iteration, path, None, final=True)

        return self._judge_each(entries, known_complete, judge)


def notice_name(iteration: int) -> str:
    return f"iter_{iteration:07d}.json"


def notices_dir(cache_dir: str, run: str) -> str:
    """A run's completion-notice folder (the module docstring)."""
    return os.path.join(cache_dir, NOTICES, run)


def content_signature(path: str) -> dict:
    """{relative file name: [size, mtime_ns]} of every file at `path` (a file: the key ""); raises OSError."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return {"": [st.st_size, st.st_mtime_ns]}
    out = {}
    for folder, _, names in os.walk(path):
        for name in names:
            file = os.path.join(folder, name)
            try:
                st = os.stat(file)
            except FileNotFoundError:  # removed meanwhile: not part of what the notice sees
                continue
            out[os.path.relpath(file, path)] = [st.st_size, st.st_mtime_ns]
    return out


def notice_holds(note: dict) -> bool:
    """Whether the checkpoint a notice names still holds what it held when the notice was written: a trainer that
    saves that iteration again (a resumed or restarted training into the same folder) writes it anew, and an old
    notice must not end the new save's settle wait or call it finished. A notice without `files` (written by
    other tools) is taken as is."""
    if "files" not in note:
        return True
    try:
        return content_signature(note["path"]) == note["files"]
    except OSError:
        return False


def write_notice(cache_dir: str, run: str, iteration: int, path: str, by: str) -> str:
    """Say that the checkpoint at `path` is finished (atomically: a present notice is a whole one), with the
    signature of its files then (notice_holds); returns the notice's path."""
    target = os.path.join(notices_dir(cache_dir, run), notice_name(iteration))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    write_json_atomic(target, {"schema_version": 1, "run": run, "iteration": iteration,
                               "path": os.path.abspath(path), "by": by, "written_at": time.time(),
                               "files": content_signature(path) if os.path.exists(path) else {}})
    return target


def read_notice(path: str) -> dict:
    """A completion notice; raises OSError (none) or ValueError (not one)."""
    with open(path, "rb") as f:
        note = json.loads(f.read())
    if not isinstance(note, dict) or not isinstance(note.get("path"), str) or not isinstance(note.get("iteration"), int):
        raise ValueError(f"{path}: not a completion notice (expected path and iteration)")
    return note


LAYOUTS: dict[str, type[CheckpointLayout]] = {
    cls.name: cls for cls in (MegatronLayout, HuggingFaceLayout, DeepSpeedLayout, GlobLayout)
}
