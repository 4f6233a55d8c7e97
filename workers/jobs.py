"""The rq side of a worker: the job function, a worker class that keeps the policy in
process (rq's ``SimpleWorker``: no fork per job, so the model is loaded once) and may hold
several jobs at once (``JobSlots``: docs/design.md §15.50 Many groups in flight per
worker), and its warm shutdown.

rq imports a job's function by name and passes only JSON arguments, so the function
finds the process's ``WorkerRuntime`` through a ContextVar that the worker binds around
each job (the one piece of per-process context; it never outlives ``execute_job``), and the
job's run in the worker's ``JobSlots`` through another (per run, not per job id: one id may run
twice at once).
"""
from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from typing import Any

import redis
from rq import SimpleWorker
from rq.exceptions import DequeueTimeout, InvalidJobOperation
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import WorkerStatus

from rlstream.core.jobs import carried, prune_dead_executions
from rlstream.core.messages import GroupJob, RolloutJob

log = logging.getLogger(__name__)
_runtime: contextvars.ContextVar = contextvars.ContextVar("rlstream_worker_runtime")
_slot: contextvars.ContextVar = contextvars.ContextVar("rlstream_worker_slot", default=None)  # JobSlots run token
MAX_HEARTBEAT_TTL_S, MIN_HEARTBEAT_TTL_S = 15, 3
HUNG_GRACE_S = 10.0
PUBSUB_WAKE_S = 1.0  # rq's command-channel thread: how often it wakes (its stop waits for that)


def heartbeat_ttl(job_timeout: int | None) -> int:
    """Seconds a job's heartbeat outlives its worker: about half the job timeout (a dead
    worker's job is re-run well before the timeout would say so), at most 15 s, at least
    3 s (beats go every third of it, so two can be missed)."""
    if not job_timeout or job_timeout <= 0:  # rq: no timeout
        return MAX_HEARTBEAT_TTL_S
    return min(MAX_HEARTBEAT_TTL_S, max(job_timeout // 2, MIN_HEARTBEAT_TTL_S))


def still_alive(elapsed_s: float, job_timeout: int | None, grace_s: float = HUNG_GRACE_S) -> bool:
    """Whether to keep a job's heartbeat going. rq's SIGALRM normally ends a job at its
    timeout; one it cannot interrupt (rollout_fn blocked in a thread or in C code) would
    otherwise be kept alive forever by our side thread. Past timeout + grace we let the
    heartbeat lapse, and the producer's StartedJobRegistry.cleanup re-dispatches the job."""
    return not job_timeout or job_timeout <= 0 or elapsed_s <= job_timeout + grace_s


class MainThreadDeathPenalty(UnixSignalDeathPenalty):
    """rq's SIGALRM job timeout where a signal can reach the job (the main thread). A job
    run in a thread of its own is timed by the worker runtime instead (workers/sampling_loop.py)."""

    def setup_death_penalty(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super().setup_death_penalty()

    def cancel_death_penalty(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super().cancel_death_penalty()


def run_groups(payload: dict[str, Any]) -> dict[str, Any]:
    """rq job: roll out the prompt groups of one ``RolloutJob`` (``rlstream.core.jobs.JOB_FUNC``)."""
    return _bound_runtime().run_job(RolloutJob.model_validate(payload), slot=_slot.get())


def run_group(payload: dict[str, Any]) -> dict[str, Any]:
    """rq job of one ``GroupJob``: what the producer enqueued before jobs carried several groups
    (a run resumed across the upgrade may still hold some)."""
    group = GroupJob.model_validate(payload)
    return _bound_runtime().run_job(RolloutJob(run_id=group.run_id, groups=[group]), slot=_slot.get())


def _bound_runtime() -> Any:
    runtime = _runtime.get(None)
    if runtime is None:
        raise RuntimeError("rlstream's rollout jobs must run inside `rlstream worker` (RolloutWorker)")
    return runtime


def job_draws(job: Any) -> int | None:
    """The draws a job's first rounds make (its groups' sizes), read from its payload; None when
    the payload does not say (the slots then count one group)."""
    try:
        return sum(int(g["group_size"]) for g in carried(job)) or None
    except (KeyError, TypeError, ValueError):
        return None


class RolloutWorker(SimpleWorker):
    """A SimpleWorker bound to one ``WorkerRuntime``.

    SimpleWorker runs the job in this process and refreshes no heartbeat meanwhile, so rq
    would only notice a killed worker after job_timeout + 60 s. A side thread refreshes the
    job's heartbeat every few seconds with a short TTL instead (``heartbeat_ttl``): a dead
    worker's job expires from the StartedJobRegistry within that TTL and the producer's
    cleanup re-enqueues it. A hung one is stopped by rq's job timeout, or, if that cannot
    interrupt it, abandoned once it runs ``hung_grace_s`` past the timeout (``still_alive``).
    """

    hung_grace_s = HUNG_GRACE_S
    death_penalty_class = MainThreadDeathPenalty

    def __init__(self, *args: Any, runtime: Any, slots: Any = None, drain_s: float = 120.0, **kwargs: Any):
        """``slots``: a ``workers.slots.JobSlots`` to hold several jobs at once, each run in a
        thread of its own with its own rq execution and heartbeat; None = one at a time.
        ``drain_s``: how long a warm shutdown waits for the jobs in flight."""
        super().__init__(*args, **kwargs)
        self.runtime, self.slots, self.drain_s = runtime, slots, drain_s

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return heartbeat_ttl(job.timeout)

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)
        if self.slots is None:
            self._perform(job, queue, execution)
            self.set_state(WorkerStatus.IDLE)
            return
        run = self.slots.take(job.id, job_draws(job))  # released by the job's thread, whatever ends it
        threading.Thread(target=self._perform_in_thread, args=(job, queue, execution, run), name=f"job-{job.id}",
                         daemon=True).start()

    def _perform(self, job, queue, execution, run: int | None = None) -> None:
        """rq's perform_job (success or failure handling included) with the job's
        heartbeat kept by a side thread; ``run``: its token in the slots (None: one job at a time)."""
        token, slot = _runtime.set(self.runtime), _slot.set(run)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="job-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
            _slot.reset(slot)
            _runtime.reset(token)

    def _perform_in_thread(self, job, queue, execution, run: int) -> None:
        try:
            self._perform(job, queue, execution, run)
        except Exception:  # rq's perform_job handles the job's own errors: this is its bookkeeping failing
            log.exception("worker %s: job %s: rq could not record its outcome; its heartbeat stops, so the producer "
                          "re-dispatches it", self.name, job.id)
        finally:
            self.slots.release(run)
            sampling = getattr(self.runtime, "sampling", None)
            if sampling is not None and sampling.stuck:
                warm_shutdown()

    def set_state(self, state, pipeline=None):
        """Busy while any job is in flight: rq's SIGTERM handler then asks the loop to stop
        after its work (a warm shutdown) instead of raising wherever the main thread is."""
        if state == WorkerStatus.IDLE and self.slots is not None and self.slots.busy:
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """Take the next job once there is room for it. While jobs are in flight, wait in
        one-second rounds, so that a stop request is noticed (rq's own wait only ends with
        a job) and the worker key keeps beating."""
        if self.slots is None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while True:
            while not self.slots.wait_for_room(1.0):
                self.heartbeat()
                if self._stop_requested:
                    return None
            if self._stop_requested:
                return None
            if not self.slots.busy:  # idle: rq's blocking wait; a SIGTERM ends it at once (StopRequested)
                # IDLE before the last look at the stop flag: a SIGTERM that came while the last group
                # was finishing found the worker BUSY and only set the flag, and rq's wait would then
                # block for its whole timeout (seen under load as a worker that ignored its SIGTERM).
                self.set_state(WorkerStatus.IDLE)
                if self._stop_requested:
                    return None
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            result = self._dequeue_while_busy()
            if result is not None or self._stop_requested:
                return result

    def _dequeue_while_busy(self):
        """rq's dequeue without its per-call bookkeeping (state, procline, two heartbeats):
        while jobs run their heartbeat threads keep the worker key alive, and a worker
        filling a window of many groups takes them one after another on this thread."""
        try:
            result = self.queue_class.dequeue_any(self._ordered_queues, 1, connection=self.connection,
                                                  job_class=self.job_class, serializer=self.serializer,
                                                  death_penalty_class=self.death_penalty_class)
        except DequeueTimeout:
            return None
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # Redis restarting: the next round retries
            log.warning("worker %s: dequeue failed (%s); retrying", self.name, exc)
            time.sleep(1.0)
            return None
        if result is not None:
            result[0].redis_server_version = self.get_redis_server_version()
        return result

    def heartbeat(self, timeout=None, pipeline=None):
        """rq's worker heartbeat (three commands) in one round trip."""
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline=pipeline)
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            pipe.execute()

    def subscribe(self):
        """rq's command channel, its thread waking every second instead of every 60 s. rq's
        teardown stops that thread with redis-py's ``stop()``, which (redis-py 7 and later)
        joins it with no bound, and once unsubscribed the thread sleeps its whole wake-up
        interval: a warm shutdown took up to a minute (seen under load as a worker ignoring its
        SIGTERM)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=PUBSUB_WAKE_S, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    def request_force_stop(self, signum, frame):
        """rq's second stop signal (a cold shutdown: exit at once, the groups in flight and the
        sampler's connections left as they are). Once the run has finished, the first stop was
        this worker's own (``warm_shutdown``) and the second is ``rlstream up`` stopping its
        children, a second behind: keep the warm shutdown, whose drain is bounded (``drain_s``),
        so the worker still closes what it opened. Before that, a second signal is the
        operator's, and it stops the worker cold as rq does."""
        events = getattr(self.runtime, "events", None)
        if events is not None and events.state.finished is not None:
            log.info("worker %s: already stopping (the run finished); the second stop signal waits for it", self.name)
            return
        super().request_force_stop(signum, frame)

    def teardown(self):
        """A warm shutdown finishes the groups in flight first (bounded by ``drain_s``);
        any left then are handed back: their heartbeats stop with the process and the
        producer re-dispatches them."""
        if self.slots is not None and self.slots.busy:
            log.info("worker %s: finishing %d group(s) in flight before exiting", self.name, self.slots.running)
            if not self.slots.wait_idle(self.drain_s):
                log.warning("worker %s: %d group(s) still in flight after %.0fs: exiting; the producer re-dispatches "
                            "them once their heartbeats lapse", self.name, self.slots.running, self.drain_s)
        super().teardown()

    def handle_job_success(self, job, queue, started_job_registry, execution):
        """rq's success handling deletes the job (``result_ttl=0``), which raises on the dead
        executions a killed worker left in the job's registry (``core.jobs``); rq would then
        count the job as failed and re-run it. Prune them first; once more if one died
        meanwhile (nothing was written: rq raises before its MULTI executes).

        A connection cut after Redis ran that MULTI but before its reply came back makes rq
        (watching the job's dependents) run its transaction again, and the second pass finds
        the job already deleted: rq raises ``InvalidJobOperation`` and would fail a job whose
        groups are written and whose success is recorded. The job's status gone (its hash
        lives until its success, ``result_ttl=0``) is that success: nothing is left to do but
        drop what a heartbeat re-created meanwhile (rq deletes a hash its heartbeat creates, but
        not when that heartbeat's reply was lost too and its retry found the hash it had made)."""
        for attempt in range(2):
            prune_dead_executions(self.connection, job.id)
            try:
                return super().handle_job_success(job, queue, started_job_registry, execution)
            except ValueError:
                if attempt:
                    raise
            except InvalidJobOperation:
                if self.connection.hget(job.key, "status") is not None:
                    raise
                self.connection.delete(job.key)  # absent, or only a late heartbeat's last_heartbeat
                log.info("job %s: its success was recorded before the connection to Redis dropped (the reply was "
                         "lost); not failing it", job.id)
                return None

    def _beat(self, job, execution, stop: threading.Event) -> None:
        started = time.monotonic()
        while not stop.wait(heartbeat_ttl(job.timeout) / 3):
            if not still_alive(time.monotonic() - started, job.timeout, self.hung_grace_s):
                log.error("job %s still running %.0fs past its %ss timeout, which could not interrupt it: letting its "
                          "heartbeat lapse so that the producer re-dispatches it; restart this worker (%s)",
                          job.id, time.monotonic() - started - job.timeout, job.timeout, self.name)
                return
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # Redis restarting: the next beat retries
                log.debug("heartbeat failed: %s", exc)


def warm_shutdown() -> None:
    """SIGTERM to this process, which rq turns into a warm shutdown (finish the current job,
    then exit): what a worker does when the run finishes."""
    os.kill(os.getpid(), signal.SIGTERM)
