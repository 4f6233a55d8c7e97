"""What one worker process keeps in memory between jobs: the policy (loaded once,
updated in place) and the user's rollout_fn, and how a job runs on them. The run's state
comes from the process's one ``EventFollower``. None of it is state a restart loses: it is
all rebuilt from Redis and the published weights."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from rq.timeouts import JobTimeoutException

from rlstream.builtin.rollout import PromptIds
from rlstream.core import bus, keys, weights
from rlstream.core.config import Config
from rlstream.core.messages import (
    GroupJob,
    GroupRejected,
    GroupSampled,
    RolloutJob,
    RolloutRecord,
    RunFinished,
    WeightsPublished,
    sample_id_for,
)
from rlstream.core.rollout import InvalidSample, RolloutFnFactory, RolloutSetup
from rlstream.core.run_state import RunState
from rlstream.sampling.rollout_fn import accepted_context
from rlstream.sampling.stamps import VersionSpan, drawn_versions
from rlstream.workers.breaker import CircuitBreaker
from rlstream.workers.checks import DrawTally, checked_record, error_text, group_rejection, prompt_problem
from rlstream.workers.events import EventFollower
from rlstream.workers.sampling_loop import SamplingLoop
from rlstream.workers.slots import generate_rows

log = logging.getLogger(__name__)


class CircuitOpen(RuntimeError):
    """Groups of many rows lost to failed draws: the worker stopped the run (RunFinished, failed)."""


def policy_vocab_size(policy: Any) -> int:
    """The ids the policy can emit: LocalPolicy knows its embedding size; a remote
    server's model is only known through its tokenizer."""
    size = getattr(policy, "vocab_size", None)
    return size if size is not None else len(policy.tokenizer)


def job_seed(seed: int, group_id: str) -> int:
    """Torch seed for one job, keyed by the id of the group its rq job id names (its first
    group at admission). Every worker starts from ``cfg.seed``, so without this two workers
    (or a restarted one) would draw the same random stream and same-prompt groups at one
    version would come out identical; keyed so, draws differ across jobs and a job that rq
    re-runs (same job, same version) reproduces its draws."""
    return zlib.crc32(f"{seed}:{group_id}".encode())


def seed_torch(seed: int) -> None:
    import torch  # lazily, as the policy modules are: importing this module stays cheap

    torch.manual_seed(seed)  # CPU and every CUDA device


def weights_to_load(state: RunState, min_version: int, failed: WeightsPublished | None) -> WeightsPublished | None:
    """The newest published weights once they are >= ``min_version``. Not ``failed``, the
    event whose weights would not load (pruned, or replaced by a re-run of its step): a newer
    event, or the re-run's own WeightsPublished of the same version, supersedes it."""
    latest = state.latest_weights
    if latest is None or latest.version < min_version or latest is failed:
        return None
    return latest


def preferred_server(cfg: Config, r: redis.Redis) -> int:
    """The inference server this worker prefers: workers take tickets in turn (INCR), so they
    spread over the replicas; 0 with one server."""
    servers = len(cfg.inference.base_urls)
    if servers < 2:
        return 0
    return (int(r.incr(keys.server_tickets(cfg.run_id))) - 1) % servers


def make_controller(cfg: Config, prefer: int = 0) -> Any:
    """The process's concurrency controller for a remote backend (``workers.concurrency_control``)."""
    from rlstream.sampling.concurrency import (
        AdaptiveConcurrencyController,
        FixedConcurrencyController,
        MetricsPoller,
        vllm_queue_time_probe,
    )
    from rlstream.sampling.engines import server_root

    limit = cfg.inference.max_concurrency
    if cfg.workers.concurrency_control == "fixed":
        return FixedConcurrencyController(limit)
    # vLLM serves /metrics beside /v1: its queue-time histogram is the better signal, where present.
    # The preferred server's: this worker's requests go there (another only while it is down), and
    # another server's queue says nothing of the load this worker puts on its own.
    urls = cfg.inference.base_urls
    poller = MetricsPoller(f"{server_root(urls[prefer % len(urls)])}/metrics").start()
    return AdaptiveConcurrencyController(initial_window=min(16, limit), max_window=limit,
                                         queue_time_probe=vllm_queue_time_probe(lambda: poller.text))


def make_policy(cfg: Config, published: WeightsPublished, device: Any, controller: Any = None, prefer: int = 0,
                sync_lock: Any = None) -> tuple[Any, Any]:
    """(policy, sampler) for ``inference.backend``: the transformers model in this process,
    or inference servers (then only the tokenizer is loaded here). Weights are read from this
    run's ``weights/v<N>``, never from the path the event names. ``prefer``, ``sync_lock``: see
    ``RemotePolicy``."""
    root = cfg.run_dir() / "weights"
    if cfg.inference.remote:
        from transformers import AutoTokenizer

        from rlstream.sampling.remote import RemotePolicy, RemoteSampler, no_lock

        tokenizer_dir = cfg.tokenizer_model or str(weights.version_dir(root, published.version))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # A server rlstream launched got --logprobs-mode processed_logprobs; an external one is probed once.
        probe = cfg.inference.backend == "vllm" and not cfg.inference.launch
        policy = RemotePolicy(cfg.inference, published, tokenizer, cfg.inference.model or cfg.base_model, root,
                              controller=controller, prefer=prefer, sync_lock=sync_lock or no_lock,
                              namespace=cfg.run_id, check_logprobs=probe)
        return policy, RemoteSampler(policy, cfg.sample_kwargs())
    from rlstream.sampling.local import LocalPolicy, LocalSampler

    policy = LocalPolicy(published, device, root, shared_prefix=cfg.workers.shared_prefix)
    return policy, LocalSampler(policy, cfg.sample_kwargs(), max_batch_rows=generate_rows(cfg))


@dataclass
class Drawn:
    """One group of a job as it is drawn: its samples, failures, server versions and window,
    or why it is rejected."""

    rejection: str | None = None
    samples: list[RolloutRecord] = field(default_factory=list)
    tally: DrawTally = field(default_factory=DrawTally)
    span: VersionSpan = field(default_factory=VersionSpan)
    version: int | None = None  # its samples' min_version (set once drawn)
    end_version: int | None = None  # ... and max_version
    started_at: float = 0.0
    finished_at: float = 0.0


class WorkerRuntime:
    """``concurrent``: jobs run in threads of their own, several at a time, their draws on
    one ``SamplingLoop`` (docs/design.md §15.50 Many groups in flight per worker); else one
    job at a time on the calling thread, as rq's SimpleWorker runs it."""

    def __init__(self, cfg: Config, r: redis.Redis, worker_id: str, device: Any,
                 rollout_fn_factory: RolloutFnFactory, events: EventFollower, concurrent: bool = False):
        self.cfg, self.r, self.worker_id, self.device = cfg, r, worker_id, device
        self.factory, self.events = rollout_fn_factory, events
        self.policy = None
        self.rollout_fn = None
        self.context_params: frozenset[str] = frozenset()
        self.vocab_size: int | None = None  # known once the policy is loaded
        self.prompt_ids: Any = None  # the built-in rollout's tokenization of a row: checked before drawing
        self.totals: Counter[str] = Counter()  # this process's invalid_samples / rollout_failures
        self.breaker = CircuitBreaker()
        self.remote: dict[str, Any] = {}  # make_policy's arguments for a remote backend
        self.controller = None
        if cfg.inference.remote:
            from rlstream.sampling.remote import redis_sync_lock

            prefer = preferred_server(cfg, r)
            self.controller = make_controller(cfg, prefer)
            self.remote = {"controller": self.controller, "prefer": prefer,
                           "sync_lock": redis_sync_lock(r, cfg.run_id, cfg.inference.weight_sync_timeout)}
        # One loop for the process, not asyncio.run per job: an HTTP sampler's pooled
        # connections belong to the loop that opened them.
        self.sampling = SamplingLoop() if concurrent else None
        self.loop = self.sampling.loop if concurrent else asyncio.new_event_loop()
        self._weights_lock = threading.Lock()  # one job at a time builds or updates the policy
        self._breaker_lock = threading.Lock()
        # The worker's JobSlots (workers/slots.py), told of each group's draws by the job's run (its token,
        # ``run_job``'s ``slot``): how many a round starts, each one finished, all done. None: one job at a time.
        self.slots: Any = None

    def sync_weights(self, min_version: int, deadline: float | None = None) -> None:
        """Load the newest published version; wait (bounded by job_timeout) until one >=
        ``min_version`` exists: the producer admitted this group after seeing it published."""
        deadline = time.monotonic() + self.cfg.job_timeout if deadline is None else deadline
        failed: WeightsPublished | None = None
        while True:
            published = self.events.wait_for(lambda state, failed=failed: weights_to_load(state, min_version, failed),
                                             deadline - time.monotonic())
            if published is None:
                unloadable = f" (v{failed.version} at {failed.uri} could not be loaded)" if failed else ""
                raise TimeoutError(f"no weights >= v{min_version} published within {self.cfg.job_timeout}s{unloadable}")
            with self._weights_lock:
                loaded = self._load_weights(published)
            if loaded:
                return
            failed = published

    def _load_weights(self, published: WeightsPublished) -> bool:
        """Build the policy at ``published`` or update it to there; False if those weights
        are gone or unreadable."""
        if self.policy is None:
            try:
                self.policy, sampler = make_policy(self.cfg, published, self.device, **self.remote)
            except (OSError, ValueError) as exc:
                # Pruned (keep_weights) while a freshly started worker loaded it: wait for the
                # next weights published, as a loaded policy does below (bounded by sync_weights).
                self._unloadable(published, exc)
                return False
            self.vocab_size = policy_vocab_size(self.policy)
            # A copy: a factory that edits setup.sample_kwargs must not change the sampler's defaults.
            setup = RolloutSetup(sampler=sampler, tokenizer=self.policy.tokenizer,
                                 sample_kwargs=dict(sampler.default_kwargs),
                                 completions_per_prompt=self.cfg.completions_per_prompt, extras=dict(self.cfg.extras))
            self.rollout_fn = self.factory(setup)
            if self.cfg.rollout_fn_factory is None:  # a user's rollout_fn builds its prompt its own way
                self.prompt_ids = PromptIds(self.policy.tokenizer)
            self.context_params = accepted_context(self.rollout_fn)
            log.info("worker %s: %s policy at v%d from %s", self.worker_id, self.cfg.inference.backend,
                     self.policy.version, weights.version_dir(self.cfg.run_dir() / "weights", published.version))
        elif published.version > self.policy.version:
            try:
                self.policy.load(published)
            except (FileNotFoundError, ValueError) as exc:
                self._unloadable(published, exc)
                return False
        return True

    def _unloadable(self, published: WeightsPublished, exc: Exception) -> None:
        """Say why ``published`` would not load. A directory that is gone was pruned
        (``keep_weights``) before this worker got to it: say so, not the error its load raised
        (for a missing local path transformers reports a malformed hub repo id)."""
        root = self.cfg.run_dir() / "weights"
        if (weights.version_dir(root, published.version) / weights.MANIFEST).is_file():
            log.warning("worker %s: could not load v%d (%s); waiting for the next weights published",
                        self.worker_id, published.version, exc)
            return
        on_disk = weights.complete_versions(root)
        log.warning("worker %s: v%d was pruned before this worker loaded it (keep_weights = %d keeps the newest "
                    "versions; %s); it loads the next version published instead", self.worker_id,
                    published.version, self.cfg.keep_weights,
                    f"the newest on disk is v{on_disk[-1]}" if on_disk else f"none is left in {root}")

    def _count(self, tally: DrawTally, field: str, error: str) -> None:
        """One failed draw: counted for this job (Redis) and the process."""
        tally.fail(field, error)
        self.totals[field] += 1

    async def _draw(self, row: dict[str, Any], context: dict[str, Any], tally: DrawTally) -> RolloutRecord | None:
        """One completion, as its wire record (not stamped yet). An exception (or a return that
        is not a RolloutSample) is retried, bounded; an invalid sample is dropped without a retry
        (the group's redraw rounds replace it). Both are failures: a group left without enough
        samples by them is rejected with the last one's text and counts for the circuit breaker."""
        kwargs = {k: v for k, v in context.items() if k in self.context_params}
        for attempt in range(self.cfg.rollout_max_retries + 1):
            problem = None
            try:
                result = await self.rollout_fn(dict(row), **kwargs)
                if result is not None:
                    result = checked_record(result, self.vocab_size, self.cfg.max_seq_len)
            except InvalidSample as exc:  # rollout_fn returned a sample the trainer could not train on
                problem = str(exc)
            except JobTimeoutException:  # rq's SIGALRM landed inside the draw: it ends the job, it is no draw failure
                raise
            except Exception as exc:
                log.warning("worker %s: rollout_fn failed (attempt %d): %r", self.worker_id, attempt + 1, exc)
                self._count(tally, keys.ROLLOUT_FAILURES, error_text(exc))
                continue
            if problem is not None:
                log.warning("worker %s: invalid sample dropped: %s", self.worker_id, problem)
                self._count(tally, keys.INVALID_SAMPLES, f"invalid sample: {problem}")
                return None
            return result
        return None

    async def _group(self, job: GroupJob, tally: DrawTally | None = None, span: VersionSpan | None = None,
                     slot: int | None = None) -> list[RolloutRecord]:
        """G draws; missing members (None, invalid, failed) are re-drawn for up to
        ``max_incomplete_group_retries`` more rounds. Failures are tallied in ``tally``; the
        versions the servers drew them with, in ``span`` (every draw task inherits it). The
        first round's draws were counted in the slots when the job's run (``slot``) was taken."""
        tally = DrawTally() if tally is None else tally
        drawn_versions.set(span)
        samples: list[RolloutRecord] = []
        next_index = 0
        for round_ in range(self.cfg.max_incomplete_group_retries + 1):
            missing = job.group_size - len(samples)
            if missing == 0:
                break
            contexts = [dict(row_index=job.row_index, epoch=job.epoch, sample_index=next_index + i, evaluation=False)
                        for i in range(missing)]
            next_index += missing
            if slot is not None and round_:
                self.slots.more(slot, missing)
            results = await asyncio.gather(*(self._counted(slot, self._draw(job.row, c, tally)) for c in contexts))
            samples += [s for s in results if s is not None]
        return samples

    async def _groups(self, jobs: list[GroupJob], drawn: list[Drawn], slot: int | None) -> None:
        """Every group of a job at once: their draws meet in one pass of the loop (the local
        backend answers them with one ``generate``), each group's end time its own."""
        async def one(group: GroupJob, out: Drawn) -> None:
            out.samples = await self._group(group, out.tally, out.span, slot)
            out.finished_at = time.time()

        await asyncio.gather(*(one(g, d) for g, d in zip(jobs, drawn)))

    async def _counted(self, slot: int | None, draw: Any) -> RolloutRecord | None:
        """``draw``, whose end (whatever it is) frees its request of the window for the next group."""
        try:
            return await draw
        finally:
            if slot is not None:
                self.slots.draw_done(slot)

    def run_group(self, job: GroupJob) -> dict[str, Any]:
        """``run_job`` of a job carrying this one group; its outcome."""
        return self.run_job(RolloutJob(run_id=job.run_id, groups=[job]))["groups"][0]

    def run_job(self, job: RolloutJob, slot: int | None = None) -> dict[str, Any]:
        """Sample a job's groups together and write their outcomes in one MULTI: each group's
        samples and ``GroupSampled``, or ``GroupRejected`` with the reason. A bad row costs its
        group, not the job or the run; the circuit breaker ends the run (``RunFinished{failed}``,
        in the same MULTI) only when groups of many rows fail (workers/breaker.py). ``slot``: this
        run's token in ``self.slots`` (``JobSlots.take``), told of its draws; None: nothing to tell."""
        deadline = time.monotonic() + self.cfg.job_timeout
        job_id = job.job_id or keys.job_id(self.cfg.run_id, job.groups[0].group_id)  # (older jobs name none)
        self.sync_weights(max(g.submit_version for g in job.groups), deadline)
        # Another job of this worker may load newer weights while these groups are drawn: their
        # samples are stamped with the versions at their start and end (equal when one job runs),
        # the start lowered to the oldest version a server reported for one of a group's completions.
        version = self.policy.version
        drawn = [Drawn(rejection=self._row_problem(g)) for g in job.groups]
        to_draw = [(g, d) for g, d in zip(job.groups, drawn) if d.rejection is None]
        if slot is not None:  # a row no draw can use gives its room back at once
            self.slots.draw_done(slot, sum(g.group_size for g, d in zip(job.groups, drawn) if d.rejection))
        if to_draw:  # a row no draw can use is not a rollout failure: the breaker never hears of it
            if self.sampling is None:  # with several jobs in flight the torch RNG is shared by all of them
                seed_torch(job_seed(self.cfg.seed, keys.group_of_job(self.cfg.run_id, job_id)))
            started_at = time.time()  # wall clock: the trainer compares it with its own (perf/overlap_ratio)
            self._run(self._groups([g for g, _ in to_draw], [d for _, d in to_draw], slot), deadline)
            if slot is not None:  # its room goes to the next job while this one is written
                self.slots.drawn(slot)
            for group, d in to_draw:
                d.started_at = started_at
                # The versions the servers reported, which may differ from the policy's (a restarted or
                # shared server): stamp what they served (rlstream/sampling/stamps.py).
                d.version, d.end_version = d.span.bounds(version, max(version, self.policy.version))
                d.rejection = group_rejection(len(d.samples), group.group_size, self.cfg.min_group_size,
                                              d.tally.last_error)
                with self._breaker_lock:
                    if d.rejection is None or d.tally.failed:  # (a group lost to draws returning None: the user's)
                        self.breaker.record(d.rejection is None, group.row_index, d.tally.last_error)
        with self._breaker_lock:
            tripped = self.breaker.tripped
        end_version = max(version, self.policy.version)
        with self.r.pipeline(transaction=True) as pipe:
            self._add_stats(pipe, sum((d.tally.counts for d in drawn), Counter()))  # no extra round trip
            for group, d in zip(job.groups, drawn):
                if d.rejection is not None:
                    log.warning("worker %s: group %s rejected: %s", self.worker_id, group.group_id, d.rejection)
                    bus.xadd(pipe, keys.events(self.cfg.run_id),
                             GroupRejected(group_id=group.group_id, by=self.worker_id, reason=d.rejection))
                else:
                    self._add_samples(pipe, group, d.samples, d.version if d.version is not None else version,
                                      d.end_version if d.end_version is not None else end_version,
                                      (d.started_at, d.finished_at))
            if tripped:
                bus.xadd(pipe, keys.events(self.cfg.run_id), RunFinished(reason=self.breaker.reason(), failed=True))
            pipe.set(keys.worker_heartbeat(self.cfg.run_id, self.worker_id), end_version, ex=60)
            pipe.execute()
        if tripped:
            log.error("worker %s: %s: stopping the run", self.worker_id, self.breaker.reason())
            raise CircuitOpen(self.breaker.reason())
        return {"job_id": job_id, "groups": [
            {"group_id": g.group_id, "samples": len(d.samples),
             "version": d.version if d.version is not None else version, "rejected": d.rejection,
             **{name: d.tally.counts[name] for name in keys.WORKER_STATS}}
            for g, d in zip(job.groups, drawn)]}

    def _row_problem(self, job: GroupJob) -> str | None:
        """Why the built-in rollout cannot sample this row at all (None: draw). A user's
        rollout_fn builds its own prompt, so only its samples can be checked."""
        if self.prompt_ids is None:
            return None
        try:
            problem = prompt_problem(self.prompt_ids(job.row), self.vocab_size, self.cfg.max_seq_len)
        except JobTimeoutException:  # rq's SIGALRM landed in the check: it ends the job, the row is fine
            raise
        except Exception as exc:  # e.g. a chat template that rejects the row's messages
            problem = f"the prompt could not be tokenized: {error_text(exc)}"
        return f"row {job.row_index}: {problem}" if problem else None

    def _add_samples(self, pipe: Any, job: GroupJob, samples: list[RolloutRecord], version: int,
                     end_version: int | None = None, window: tuple[float, float] = (0.0, 0.0)) -> None:
        """The group's samples, stamped with their provenance, and its ``GroupSampled``."""
        bus.xadd(pipe, keys.events(self.cfg.run_id), GroupSampled(
            group_id=job.group_id, samples=len(samples), worker_id=self.worker_id, version=version,
            tokens=sum(s.loss_mask.count(1) for s in samples)))
        for member, s in enumerate(samples):
            bus.xadd(pipe, keys.rollouts(self.cfg.run_id), s.model_copy(update=dict(
                sample_id=sample_id_for(job.group_id, member), group_id=job.group_id,
                group_size=len(samples), row_index=job.row_index, epoch=job.epoch,
                submit_version=job.submit_version, min_version=version,
                max_version=version if end_version is None else end_version,
                worker_id=self.worker_id, started_at=window[0], finished_at=window[1])))

    def _run(self, coro: Any, deadline: float | None = None) -> Any:
        """Run one job's coroutine on the process loop. Whatever ends it (a result, rq's
        job timeout), no draw of this job may live on into the next job's run: gather does
        not cancel its siblings, and the loop outlives the job. With concurrent jobs the
        loop runs in its own thread and the job's deadline is enforced here."""
        if self.sampling is not None:
            left = self.cfg.job_timeout if deadline is None else deadline - time.monotonic()
            return self.sampling.run(coro, left)
        try:
            return self.loop.run_until_complete(coro)
        finally:
            stray = asyncio.all_tasks(self.loop)
            for task in stray:
                task.cancel()
            if stray:
                self.loop.run_until_complete(asyncio.gather(*stray, return_exceptions=True))

    def close(self) -> None:
        """At the worker's exit: a remote policy's HTTP clients closed on the loop that used them
        (an aiohttp session left open is reported as unclosed), then the sampling loop stopped."""
        if self.remote and self.policy is not None:
            self.policy.close()
        if self.sampling is not None and not self.sampling.stuck:
            self.sampling.close()

    def _add_stats(self, pipe: Any, counts: Counter) -> None:
        """Run-wide counters the trainer reports (per-process ones die with the worker)."""
        for name in keys.WORKER_STATS:
            if counts[name]:
                pipe.hincrby(keys.rollout_stats(self.cfg.run_id), name, counts[name])
