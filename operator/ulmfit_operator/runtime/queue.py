"""`WorkQueue`: client-go's work queue for job keys.

A key is queued once however often it is added, and handed to one worker at a time; a key added
while it is being processed comes back once that worker is done. Keys can wait (`add_after`) and
back off per key on failures (`add_rate_limited`, doubling up to a cap, reset by `forget`).

Two lanes: keys a watch event (or a due timer) adds are handed out before the keys a periodic
resync adds (`add(key, resync=True)`), so a burst of new jobs does not wait behind a re-look at
every job the operator already has; a resync key that an event adds moves to the event lane.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque

from ulmfit_operator.runtime.cache import Key


class WorkQueue:
    """client-go's work queue: a key is queued once, and processed by one worker at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Key] = deque()
        """The event lane."""
        self._resync: deque[Key] = deque()
        """The resync lane (may hold keys since moved to the event lane: skipped)."""
        self._dirty: dict[Key, bool] = {}
        """Keys waiting to be handed out -> whether they wait in the resync lane."""
        self._processing: set[Key] = set()
        self._delayed: list[tuple[float, int, Key]] = []
        self._counter = 0
        self._failures: dict[Key, int] = {}
        self._closed = False
        self._timer = threading.Thread(target=self._release_delayed, daemon=True, name="requeue")
        self._timer.start()

    def add(self, key: Key, resync: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            waiting = self._dirty.get(key)
            if waiting is not None:
                if waiting and not resync:  # an event for a key waiting for the resync lane
                    self._dirty[key] = False
                    if key not in self._processing:
                        self._queue.append(key)
                        self._cond.notify_all()
                return
            self._dirty[key] = resync
            if key not in self._processing:
                (self._resync if resync else self._queue).append(key)
                self._cond.notify_all()

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            self._counter += 1
            heapq.heappush(self._delayed, (time.monotonic() + delay, self._counter, key))
            self._cond.notify_all()

    def add_rate_limited(self, key: Key, base: float = 0.5, cap: float = 60.0) -> float:
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(cap, base * 2**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def get(self) -> Key | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                key = self._next()
                if key is not None:
                    self._processing.add(key)
                    del self._dirty[key]
                    return key
                self._cond.wait()

    def _next(self) -> Key | None:
        """The next key to hand out, event lane first (under the lock)."""
        while self._queue:
            key = self._queue.popleft()
            if self._dirty.get(key) is False and key not in self._processing:
                return key
        while self._resync:
            key = self._resync.popleft()
            if self._dirty.get(key) is True and key not in self._processing:
                return key
        return None

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            resync = self._dirty.get(key)
            if resync is not None:
                (self._resync if resync else self._queue).append(key)
                self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._dirty) - sum(1 for key in self._processing if key in self._dirty)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _release_delayed(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = []
                while self._delayed and self._delayed[0][0] <= now:
                    due.append(heapq.heappop(self._delayed)[2])
                wait = self._delayed[0][0] - now if self._delayed else None
                if not due:
                    self._cond.wait(timeout=wait)
                    continue
            for key in due:
                self.add(key)
