"""Sinks run off the loop thread: one worker thread per sink, one call in flight per sink.

The durable outbox is the ledger (`scored` rows x sinks without a `recordings` row, with per-(result,
sink) failures, backoff and quarantine in `deliveries`); this module only carries calls to the sinks
and their answers back. The loop offers a result to a sink whose worker is idle, and collects answers
each pass. A call that runs past `timeout_s` is reported failed (the result is offered again later);
the sink gets no new call until the hung one returns, and detection, dispatch and SIGTERM never wait
on a sink. Derived views (the local sink's plots) are refreshed in the sink's own thread, at most
every `flush_seconds`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("evaluator")
FLUSH_SECONDS = 10.0


@dataclass(frozen=True)
class Reply:
    key: tuple
    sink: str
    error: Optional[str]  # None = the sink accepted the result
    late: bool = False  # the call had already been reported as timed out
    revision: int = 0  # of the result offered: a reply for an older revision than the row's (a rerun since) is stale


class _Worker:
    def __init__(self, sink, replies: "queue.Queue[Reply]", wake: Callable[[], None], flush_seconds: float):
        self.sink = sink
        self.replies = replies
        self.wake = wake
        self.flush_seconds = flush_seconds
        self.inbox: "queue.Queue" = queue.Queue()
        self.current: Optional[tuple] = None  # (key, started monotonic)
        self.timed_out = False
        # a sink with views flushes once soon after start: views a stopped daemon left older than their history
        self.dirty = hasattr(sink, "flush")
        self.last_flush = 0.0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                item = self.inbox.get(timeout=self.flush_seconds if self.dirty else None)
            except queue.Empty:
                self._flush()
                continue
            if item is None:
                break
            key, result = item
            error = None
            try:
                self.sink.record(result)
                self.dirty = True
            except Exception as e:  # any failure of a sink is that delivery's failure, never the daemon's
                error = f"{type(e).__name__}: {e}"
            late = self.timed_out
            self.current, self.timed_out = None, False
            self.replies.put(Reply(key, self.sink.name, error, late, getattr(result, "revision", 0)))
            self.wake()
            if self.dirty and time.monotonic() - self.last_flush >= self.flush_seconds:
                self._flush()
        # the views' last redraw; a stop that cannot wait for it leaves it behind (redrawn at the next start:
        # LocalHistorySink.rows sees a view older than its history)
        self._flush()

    def _flush(self) -> None:
        flush = getattr(self.sink, "flush", None)
        self.last_flush = time.monotonic()
        if flush is None or not self.dirty:
            self.dirty = False
            return
        try:
            flush()
            self.dirty = False
        except Exception as e:  # a view that cannot be drawn now loses no result; tried again later
            log.warning("recorder %s: refreshing its views failed: %s: %s", self.sink.name, type(e).__name__, e)


class Outbox:
    def __init__(self, sinks: list, timeout_s: float, wake: Callable[[], None], flush_seconds: float = FLUSH_SECONDS):
        self.timeout_s = timeout_s
        self.replies: "queue.Queue[Reply]" = queue.Queue()
        self.workers = {s.name: _Worker(s, self.replies, wake, flush_seconds) for s in sinks}

    @property
    def names(self) -> list[str]:
        return list(self.workers)

    def idle(self, sink: str) -> bool:
        return self.workers[sink].current is None

    def busy(self) -> bool:
        return any(w.current is not None and not w.timed_out for w in self.workers.values())

    def offer(self, key: tuple, sink: str, result) -> bool:
        """Hand a result to the sink's worker if it is idle; returns whether it was taken."""
        w = self.workers[sink]
        if w.current is not None:
            return False
        w.current = (tuple(key), time.monotonic(), getattr(result, "revision", 0))
        w.inbox.put((tuple(key), result))
        return True

    def collect(self, now: Optional[float] = None) -> list[Reply]:
        """Answers that arrived, plus a failure for each call that ran past the timeout."""
        out = []
        while True:
            try:
                out.append(self.replies.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic() if now is None else now
        for name, w in self.workers.items():
            current = w.current
            if current is not None and not w.timed_out and now - current[1] > self.timeout_s:
                w.timed_out = True  # still running: no new call to this sink until it returns
                out.append(Reply(current[0], name, f"TimeoutError: no answer within {self.timeout_s:g}s "
                                                   f"(recorder.timeout_seconds)", revision=current[2]))
        return out

    def next_deadline(self) -> Optional[float]:
        """Monotonic time when an in-flight call would time out (the loop wakes then)."""
        times = [w.current[1] + self.timeout_s for w in self.workers.values() if w.current and not w.timed_out]
        return min(times) if times else None

    def close(self, wait_s: float = 2.0) -> None:
        """Stop the workers (a call in flight may finish within wait_s; a hung one is left behind,
        its result unmarked and offered again at the next start) and close sinks that hold resources."""
        for w in self.workers.values():
            w.stopping = True
            w.inbox.put(None)
        deadline = time.monotonic() + wait_s
        for w in self.workers.values():
            w.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self.workers.values():
            close = getattr(w.sink, "close", None)
            if close is not None and not w.thread.is_alive():
                try:
                    close()
                except Exception as e:
                    log.warning("recorder %s: closing failed: %s: %s", w.sink.name, type(e).__name__, e)
