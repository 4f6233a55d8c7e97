"""The event loop a worker's concurrent jobs share (docs/design.md §15.50 Many groups in
flight per worker).

With several groups in flight, each rq job runs in a thread of its own (rq's bookkeeping:
its execution, heartbeat, success or failure) while its draws run as tasks on this one
loop, in a thread of its own too: an HTTP sampler's pooled connections and a concurrency
controller's window are then shared by every group, and the local sampler sees the draws
of several groups in one loop tick and batches them into one ``generate``.

``run`` is what a job thread calls: it waits for its coroutine with the job's deadline.
Past it the coroutine is cancelled, with every task it started (a task factory records
which job started each task), and the job fails with rq's ``JobTimeoutException``, which
rq retries like any timeout. A loop that cannot cancel it within ``grace_s`` is stuck (a
``rollout_fn`` blocking the loop in C code or a sleep): ``stuck`` is set, and the worker
stops so that its supervisor restarts it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from typing import Any, Coroutine

from rq.timeouts import JobTimeoutException

log = logging.getLogger(__name__)
_job_tasks: contextvars.ContextVar[set | None] = contextvars.ContextVar("rlstream_job_tasks", default=None)
GRACE_S = 10.0


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Coroutine, **kwargs: Any) -> asyncio.Task:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    tasks = _job_tasks.get()
    if tasks is not None:  # created (directly or not) by a job's coroutine: it ends with the job
        tasks.add(task)
    return task


class SamplingLoop:
    def __init__(self, grace_s: float = GRACE_S):
        self.loop = asyncio.new_event_loop()
        self.loop.set_task_factory(_task_factory)
        self.grace_s = grace_s
        self.stuck = False
        self._thread = threading.Thread(target=self.loop.run_forever, name="sampling-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine, timeout: float) -> Any:
        """``coro``'s result, run on the loop; ``JobTimeoutException`` after ``timeout``
        seconds. Whatever ends it, no task it started lives on into another job."""
        tasks: set[asyncio.Task] = set()
        future = asyncio.run_coroutine_threadsafe(self._tracked(coro, tasks), self.loop)
        try:
            return future.result(max(0.0, timeout))
        except concurrent.futures.TimeoutError:
            raise JobTimeoutException(f"the group's draws did not finish within the job timeout ({timeout:.0f}s "
                                      "left when they started)") from None
        finally:
            self._end(future, tasks)

    @staticmethod
    async def _tracked(coro: Coroutine, tasks: set) -> Any:
        _job_tasks.set(tasks)  # this task's own context: tasks it creates inherit the set
        return await coro

    def _end(self, future: concurrent.futures.Future, tasks: set) -> None:
        if future.done() and all(t.done() for t in list(tasks)):
            return

        async def cancel_all() -> None:
            future.cancel()
            stray = [t for t in list(tasks) if not t.done()]
            for task in stray:
                task.cancel()
            if stray:
                await asyncio.gather(*stray, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(self.grace_s)
        except concurrent.futures.TimeoutError:
            self.stuck = True
            log.error("the sampling loop did not cancel a timed-out group's draws within %.0fs: a rollout_fn blocks "
                      "the event loop (a blocking call inside an async function?); stopping this worker",
                      self.grace_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=self.grace_s)
