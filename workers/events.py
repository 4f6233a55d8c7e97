"""A worker process's one fold of the events stream. A daemon thread reads
``rl:{run}:events`` and folds it into a ``RunState``; everything else in the process asks
that fold: ``WorkerRuntime.sync_weights`` waits on it for a published version, and a
``RunFinished`` (still standing once a batch is folded) calls ``on_finished`` once, which
``rlstream worker`` makes a warm shutdown. One reader, so the stream is read and folded once
per process however many parts of it need the run's state."""
from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar

import redis

from rlstream.core import bus
from rlstream.core.fold_snapshot import lean
from rlstream.core.run_state import RunState

log = logging.getLogger(__name__)
T = TypeVar("T")
READ_BLOCK_MS = 1000  # how long one XREAD waits for news: also how late stop() is noticed
RETRY_S = 1.0  # pause after a failed read (Redis restarting: the client's own retries are spent)


class EventFollower:
    """The fold (``state``) behind a condition variable: ``catch_up`` reads what is new and
    applies it under the lock, then wakes every ``wait_for``. The thread started by ``start``
    calls ``catch_up`` in a loop; without it (unit tests) a caller catches up itself."""

    def __init__(self, r: redis.Redis, run_id: str, on_finished: Callable[[], None],
                 start: tuple[RunState, str] | None = None):
        self.r, self.run_id, self.on_finished = r, run_id, on_finished
        # A lean fold (no group bookkeeping), from ``start`` or the beginning (docs/design.md §15.47 Processes
        # start from the checkpoint's fold); the cursor is only touched by the reading thread.
        state, self.cursor = start or (RunState(), "0-0")
        self.state = lean(state)
        self.changed = threading.Condition()
        self.error: BaseException | None = None  # what stopped the thread, told to every waiter
        self._finish_called = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def catch_up(self, block_ms: int | None = None) -> None:
        entries, cursor = bus.read_events(self.r, self.run_id, self.cursor, block_ms=block_ms)
        with self.changed:
            for _, msg in entries:
                self.state.apply(msg)
            self.cursor = cursor
            # judged on the whole batch: a RunStarted after the RunFinished means the run goes on
            finished = self.state.finished is not None and not self._finish_called
            self._finish_called |= finished
            self.changed.notify_all()
        if finished:
            log.info("run finished (%s): stopping this worker", self.state.finished.reason)
            self.on_finished()

    def wait_for(self, predicate: Callable[[RunState], T], timeout: float) -> T:
        """``predicate(state)`` once it is truthy, or its falsy value after ``timeout`` seconds.
        Raises if the reading thread died (the fold would never change again)."""
        with self.changed:
            value = self.changed.wait_for(lambda: self.error is not None or predicate(self.state), max(0.0, timeout))
            if self.error is not None:
                raise RuntimeError(f"the events reader of this worker stopped: {self.error!r}; restart the worker")
            return value

    def start(self) -> EventFollower:
        self._thread = threading.Thread(target=self._follow, name="events-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2 * READ_BLOCK_MS / 1000) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.catch_up(block_ms=READ_BLOCK_MS)
                except redis.RedisError as exc:  # Redis restarting: keep following once it is back
                    log.debug("events follower: %s", exc)
                    self._stop.wait(RETRY_S)
        except BaseException as exc:  # a bug, not an outage: waiters must hear of it, not time out
            log.exception("events follower stopped")
            with self.changed:
                self.error = exc
                self.changed.notify_all()
            # Every later job would fail on the frozen fold and be rejected: stop the worker
            # instead (``rlstream worker`` then exits non-zero and its supervisor restarts it).
            self.on_finished()
