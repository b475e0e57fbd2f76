"""Hints: why a watched folder yields nothing to evaluate, in a sentence the operator can act on.

`diagnose` looks at what a scan found (`Checkpoint`s), the selection and one shallow listing of the
watched folder, and names the set-up mistakes that otherwise look like a daemon doing nothing: a path
that does not exist or is empty, a path that is itself a checkpoint, checkpoints of another layout
than the configured one, a tracker that was never written, everything outside begin/end/interval.

What each layout's entries are called, what its tracker is and what a whole save holds are defined
once, in checkpoints.py; this module only asks it. The listing is capped (`LISTING_CAP` names) and
never descends into the entries, so a folder of thousands of checkpoints on NFS stays cheap.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

from evaluator.daemon.checkpoints import LAYOUTS, Checkpoint, CheckpointLayout, Selection, TrackerLayout

LISTING_CAP = 1000  # names read from the watched folder; enough to recognise a layout, cheap on NFS
SAVE_IN_PROGRESS_SECONDS = 600.0  # a tracker-less folder younger than this is a save being written, not a mistake
EXAMPLE_ITERATION = 1000  # the iteration used to show what a layout's folders are called

WARNING = "warning"
INFO = "info"


@dataclass(frozen=True)
class Hint:
    # warning: nothing from this path is evaluated now, and the text says why; info: some of it is not, by
    # the configured selection (a healthy run can have these)
    level: Literal["warning", "info"]
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class _Listing:
    names: tuple[str, ...]  # at most LISTING_CAP, in directory order
    dirs: frozenset[str]
    capped: bool  # the folder has more entries than were read


@dataclass(frozen=True)
class _SelectionCounts:
    total: int
    selected: int
    before_begin: int
    after_end: int
    off_interval: int

    @property
    def skipped(self) -> int:
        return self.total - self.selected


def diagnose(path: str, layout: str, found: list[Checkpoint], selection: Selection,
             pattern: Optional[str] = None) -> list[Hint]:
    """One hint per problem with watching `path` with `layout`; empty when the run looks healthy.

    found: what the layout's scan of `path` reported (complete or not). pattern: the glob layout's regex.
    Warnings come first.
    """
    try:
        listing = _list(path)
    except FileNotFoundError:
        return [Hint(WARNING, f"{path} does not exist{_nearest_existing(path)}: check watch.paths "
                              "(or megatron.checkpoint_path); nothing is watched until it appears")]
    except NotADirectoryError:
        return [Hint(WARNING, f"{path} is a file, not a folder: watch the folder that holds it, {_parent(path)}")]
    except OSError as e:
        return [Hint(WARNING, f"{path} cannot be read ({e.strerror or e}): the daemon's user needs read and "
                              "execute permission on it")]
    if not listing.names:
        return [Hint(WARNING, f"{path} is empty: nothing has been saved there yet, or the trainer saves "
                              "somewhere else (its save/output dir)")]
    if not found:
        itself = _checkpoint_itself(path, listing, layout)
        if itself:
            return [itself]
        mismatch = _layout_mismatch(path, listing, layout, pattern)
        return [mismatch] if mismatch else []
    hints = [h for h in (_tracker_missing(path, layout, found) or _none_complete(path, found)
                         or _waited_on(found, selection), _selection_hint(found, selection)) if h]
    return sorted(hints, key=lambda h: h.level != WARNING)


def selection_summary(found: list[Checkpoint], selection: Selection) -> str:
    """One line for status: '8 checkpoints, 3 selected, 5 skipped (2 before begin 1000, 3 off interval 1000)'."""
    counts = _count(found, selection)
    if counts.total == 0:
        return "no checkpoints"
    if counts.skipped == 0:
        return f"{_n(counts.total, 'checkpoint')}, all selected"
    return (f"{_n(counts.total, 'checkpoint')}, {counts.selected} selected, {counts.skipped} skipped "
            f"({_breakdown(counts, selection)})")


# ---- the folder itself ----------------------------------------------------------------------------
def _list(path: str) -> _Listing:
    names, dirs, capped = [], set(), False
    with os.scandir(path) as it:
        for entry in it:
            if len(names) == LISTING_CAP:
                capped = True
                break
            names.append(entry.name)
            try:
                if entry.is_dir():
                    dirs.add(entry.name)
            except OSError:  # vanished or unreadable meanwhile: not a folder we could use
                pass
    return _Listing(tuple(names), frozenset(dirs), capped)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _nearest_existing(path: str) -> str:
    """' (the nearest existing folder above it is /x)': a typo usually shows one level up."""
    up = _parent(path)
    while not os.path.isdir(up) and os.path.dirname(up) != up:
        up = os.path.dirname(up)
    return f" (the nearest existing folder above it is {up})"


def _layout_switch(layout: str) -> str:
    return f"set watch.layout: {layout} or --model-type {layout}"


def _named_layouts() -> dict[str, type[CheckpointLayout]]:
    """The layouts whose entries have fixed names (all but glob, whose names are the user's regex)."""
    return {name: cls for name, cls in LAYOUTS.items() if getattr(cls, "dir_pattern", None) is not None}


def _example_name(layout: str) -> str:
    return LAYOUTS[layout]("", "").canonical_name(EXAMPLE_ITERATION) or layout


def _entries_of(listing: _Listing, layout: str) -> list[tuple[int, str]]:
    """(iteration, name) of the listed folders named like `layout`'s checkpoints, by iteration."""
    rx = LAYOUTS[layout].dir_pattern
    out = []
    for name in listing.names:
        m = rx.match(name)
        if m and name in listing.dirs:
            out.append((int(m.group(1)), name))
    return sorted(out)


def _checkpoint_itself(path: str, listing: _Listing, layout: str) -> Optional[Hint]:
    """The path is one checkpoint (named like one, or holding a whole save) instead of the folder of them."""
    base = os.path.basename(os.path.abspath(path))
    named = _named_layouts()
    for name, cls in named.items():
        if cls.dir_pattern.match(base):
            text = f"{path} points at a checkpoint itself ({base}, the {name} layout); watch its parent {_parent(path)}"
            if name != layout:
                text += f" with layout {name} ({_layout_switch(name)})"
            return Hint(WARNING, text)
    if any(_entries_of(listing, name) for name in named):
        return None  # a run folder with checkpoints of some layout (and maybe a final save beside them)
    for name, cls in named.items():
        try:
            whole = cls("", path).incomplete_reason(path) is None
        except OSError:
            continue
        if whole:
            tracker = f" and {cls.tracker_name}" if issubclass(cls, TrackerLayout) else ""
            return Hint(WARNING, f"{path} holds a whole {name} save itself, not checkpoint folders: watch the "
                                 f"folder the trainer writes its {_example_name(name)}-style folders{tracker} into"
                                 + ("" if name == layout else f", with layout {name} ({_layout_switch(name)})"))
    return None


def _layout_mismatch(path: str, listing: _Listing, layout: str, pattern: Optional[str]) -> Optional[Hint]:
    """Nothing found: entries of another layout, or nothing named like any checkpoint. None when the listing
    does hold the layout's folders (they appeared after the scan): the next scan finds them."""
    if layout in _named_layouts() and _entries_of(listing, layout):
        return None
    among = f" among the first {LISTING_CAP} entries" if listing.capped else ""
    others = {name: _entries_of(listing, name) for name in _named_layouts() if name != layout}
    best = max(others, key=lambda name: len(others[name]))
    if others[best]:
        entries = others[best]
        return Hint(WARNING, f"{path}: found {_n(len(entries), 'entry', 'entries')} like {entries[0][1]} "
                             f"(the {best} layout){among} but layout is {layout}: {_layout_switch(best)}")
    shown = ", ".join(sorted(listing.names)[:3]) + (", ..." if len(listing.names) > 3 else "")
    count = f"{len(listing.names)}+" if listing.capped else str(len(listing.names))
    if layout in _named_layouts():
        files = [n for n in listing.names if LAYOUTS[layout].dir_pattern.match(n) and n not in listing.dirs]
        if files:
            return Hint(WARNING, f"{path}: {_n(len(files), 'entry', 'entries')} named like {files[0]} "
                                 f"{'is a file, not a folder' if len(files) == 1 else 'are files, not folders'}: the {layout} "
                                 "layout reads checkpoint folders")
        expected = f"named like {_example_name(layout)} (the {layout} layout)"
        fix = "; for other names use layout glob with a watch.pattern regex"
    else:
        expected = f"matching watch.pattern {pattern!r}"
        fix = ": the pattern must match a whole entry name and capture its iteration"
    return Hint(WARNING, f"{path} has {count} entries ({shown}) but none {expected}{fix}")


# ---- what the scan found --------------------------------------------------------------------------
def _tracker_missing(path: str, layout: str, found: list[Checkpoint]) -> Optional[Hint]:
    cls = LAYOUTS[layout]
    if not issubclass(cls, TrackerLayout) or any(c.complete for c in found):
        return None
    tracker = os.path.join(path, cls.tracker_name)
    if os.path.lexists(tracker):
        return None
    newest = max(found, key=lambda c: c.iteration)
    content = cls("", path).snapshot_markers(newest).get(cls.tracker_name, str(newest.iteration))
    iterations = sorted({c.iteration for c in found})
    try:
        age = time.time() - max(os.stat(c.path).st_mtime for c in found)
    except OSError:
        age = 0.0
    if age < SAVE_IN_PROGRESS_SECONDS:  # most likely the first save, still being written: no advice to touch it
        return Hint(INFO, f"{path}: {_n(len(iterations), 'checkpoint folder')} ({_span(iterations)}), none with "
                          f"{cls.tracker_name} yet (written {age:.0f}s ago: a save in progress counts once the "
                          f"trainer writes it)")
    return Hint(WARNING, f"{path}: {_n(len(iterations), 'checkpoint folder')} ({_span(iterations)}) but no "
                         f"{cls.tracker_name}: the trainer writes it only once a save has finished, so none counts "
                         f"as complete. If these saves did finish (copied without it?), write it: "
                         f"echo {content} > {tracker}")


def _none_complete(path: str, found: list[Checkpoint]) -> Optional[Hint]:
    """Nothing complete and nothing about to be (settling): the scan's own reasons, most common first."""
    if any(c.complete or c.settle_deadline is not None for c in found):
        return None
    iterations = sorted({c.iteration for c in found})
    reasons = Counter(c.reason for c in found).most_common(2)
    said = "; ".join(f"{reason} ({k} of {len(found)})" for reason, k in reasons)
    return Hint(WARNING, f"{path}: {_n(len(iterations), 'checkpoint')} ({_span(iterations)}), none complete: {said}")


def _waited_on(found: list[Checkpoint], selection: Selection) -> Optional[Hint]:
    """Selected checkpoints not complete for a reason of their own (not the settle wait) and untouched for
    SAVE_IN_PROGRESS_SECONDS, beside complete ones: a crashed save waiting for its resumed re-save would otherwise
    wait without a word (--end-iteration too); a save in progress is not worth a line."""
    now = time.time()

    def stalled(c: Checkpoint) -> bool:  # nothing in it (two levels down: rank folders) written for a while
        try:
            return now - _newest_mtime(c.path, depth=2) >= SAVE_IN_PROGRESS_SECONDS
        except OSError:
            return False

    waiting = sorted({(c.iteration, c.reason) for c in found if not c.complete and not c.invalid
                      and c.settle_deadline is None and c.reason != "settling" and selection.selects(c.iteration)
                      and not c.reason.startswith("another folder names") and stalled(c)})
    if not waiting:
        return None
    reasons = Counter(reason for _, reason in waiting).most_common(2)
    said = "; ".join(f"{reason} ({_span(sorted(i for i, r in waiting if r == reason))})" for reason, _ in reasons)
    return Hint(INFO, f"{_n(len(waiting), 'checkpoint')} not complete, waited on (not evaluated until complete): "
                      f"{said}")


def _newest_mtime(path: str, depth: int) -> float:
    """The newest mtime of `path` and what lies under it, `depth` levels down (a file being written is fresh)."""
    newest = os.stat(path).st_mtime
    if depth and os.path.isdir(path):
        with os.scandir(path) as it:
            for entry in it:
                try:
                    newest = max(newest, _newest_mtime(entry.path, depth - 1) if entry.is_dir(follow_symlinks=False)
                                 else entry.stat(follow_symlinks=False).st_mtime)
                except OSError:  # gone meanwhile
                    continue
    return newest


def _count(found: list[Checkpoint], selection: Selection) -> _SelectionCounts:
    iterations = {c.iteration for c in found}
    selected = sum(selection.selects(i) for i in iterations)
    before = sum(i < selection.begin for i in iterations)
    after = sum(selection.end is not None and i > selection.end for i in iterations)
    return _SelectionCounts(len(iterations), selected, before, after, len(iterations) - selected - before - after)


def _breakdown(counts: _SelectionCounts, selection: Selection) -> str:
    parts = [(counts.before_begin, f"before begin {selection.begin}"),
             (counts.after_end, f"after end {selection.end}"),
             (counts.off_interval, f"off interval {selection.interval}")]
    return ", ".join(f"{k} {what}" for k, what in parts if k)


def _describe(selection: Selection) -> str:
    end = "none" if selection.end is None else selection.end
    return f"begin={selection.begin} interval={selection.interval} end={end}"


def _selection_hint(found: list[Checkpoint], selection: Selection) -> Optional[Hint]:
    counts = _count(found, selection)
    if counts.skipped == 0:
        return None
    if counts.selected:
        return Hint(INFO, f"{counts.skipped} of {_n(counts.total, 'checkpoint')} skipped by the selection "
                          f"({_describe(selection)}): {_breakdown(counts, selection)}")
    iterations = sorted({c.iteration for c in found})
    text = (f"{_n(counts.total, 'checkpoint')} ({_span(iterations)}) but none selected by {_describe(selection)}: "
            f"{_breakdown(counts, selection)}")
    if counts.off_interval and (selection.end is None or selection.begin <= selection.end):
        wanted = [i for i in (selection.begin, selection.begin + selection.interval)
                  if selection.end is None or i <= selection.end]
        text += (f" (selected are begin + a multiple of the interval: {', '.join(map(str, wanted))}"
                 f"{', ...' if selection.end is None or wanted[-1] + selection.interval <= selection.end else ''})")
    spacing = math.gcd(*(b - a for a, b in zip(iterations, iterations[1:]))) if len(iterations) > 1 else 0
    if spacing > 1 and counts.off_interval:
        nearby = math.ceil(selection.interval / spacing) * spacing
        text += (f"; they are {spacing} apart: --begin-iteration {iterations[0]} --iteration-interval {spacing} "
                 f"takes every one" + (f" ({nearby}: about one per {selection.interval})" if nearby != spacing else ""))
    elif counts.before_begin == counts.total:
        text += f"; lower --begin-iteration (watch.begin_iteration) to {iterations[0]} or below"
    return Hint(WARNING, text)


def _span(iterations: list[int]) -> str:
    if len(iterations) == 1:
        return f"iteration {iterations[0]}"
    return f"iterations {iterations[0]}..{iterations[-1]}"


def _n(count: int, word: str, plural: Optional[str] = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"
