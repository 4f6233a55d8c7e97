"""What one worker process keeps in memory between jobs: the policy (loaded once,
updated in place), the user's rollout_fn, and its view of the events stream. None of it
is state a restart loses: it is all rebuilt from Redis and the published weights."""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import Counter
from typing import Any

import redis
from pydantic import ValidationError

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.messages import (
    GroupJob,
    GroupRejected,
    GroupSampled,
    RolloutSample,
    RunFinished,
    WeightsPublished,
    sample_id_for,
)
from rlstream.core.rollout import RolloutFnFactory, RolloutSetup
from rlstream.core.run_state import RunState
from rlstream.sampling.rollout_fn import accepted_context
from rlstream.workers.breaker import CircuitBreaker

log = logging.getLogger(__name__)


class CircuitOpen(RuntimeError):
    """Too many rollout failures: the worker stops the run (RunFinished, failed)."""


def check_sample(result: Any, vocab_size: int | None, max_seq_len: int) -> str | None:
    """Why the trainer would dead-letter this sample, or None. Caught here so that it is
    redrawn now instead of leaving its group waiting 2 x job_timeout in the trainer."""
    if not isinstance(result, RolloutSample):
        raise TypeError(f"rollout_fn must return rlstream.RolloutSample or None, got {type(result).__name__}")
    try:
        result.check_limits(vocab_size, max_seq_len)
    except ValueError as exc:
        return str(exc)
    return None


def policy_vocab_size(policy: Any) -> int:
    """The ids the policy can emit: LocalPolicy knows its embedding size; a remote
    server's model is only known through its tokenizer."""
    size = getattr(policy, "vocab_size", None)
    return size if size is not None else len(policy.tokenizer)


def job_seed(seed: int, group_id: str) -> int:
    """Torch seed for one job. Every worker starts from ``cfg.seed``, so without this two
    workers (or a restarted one) would draw the same random stream and same-prompt groups
    at one version would come out identical; keyed by the group id, draws differ across
    groups and a job that rq re-runs (same group id, same version) reproduces its draws."""
    return zlib.crc32(f"{seed}:{group_id}".encode())


def seed_torch(seed: int) -> None:
    import torch  # lazily, as the policy modules are: importing this module stays cheap

    torch.manual_seed(seed)  # CPU and every CUDA device


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'sample'}: {e['msg']}" for e in exc.errors())


def make_policy(cfg: Config, published: WeightsPublished, device: Any) -> tuple[Any, Any]:
    """(policy, sampler) for ``inference.backend``: the transformers model in this process,
    or an OpenAI-compatible server (then only the tokenizer is loaded here)."""
    if cfg.inference.backend == "openai":
        from transformers import AutoTokenizer

        from rlstream.sampling.remote import RemotePolicy, RemoteSampler

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_model or published.uri)
        policy = RemotePolicy(cfg.inference, published, tokenizer, cfg.inference.model or cfg.base_model)
        return policy, RemoteSampler(policy, cfg.sample_kwargs())
    from rlstream.sampling.local import LocalPolicy, LocalSampler

    policy = LocalPolicy(published, device)
    return policy, LocalSampler(policy, cfg.sample_kwargs())


class WorkerRuntime:
    def __init__(self, cfg: Config, r: redis.Redis, worker_id: str, device: Any,
                 rollout_fn_factory: RolloutFnFactory):
        self.cfg, self.r, self.worker_id, self.device = cfg, r, worker_id, device
        self.factory = rollout_fn_factory
        self.state, self.cursor = RunState(), "0-0"
        self.policy = None
        self.rollout_fn = None
        self.context_params: frozenset[str] = frozenset()
        self.vocab_size: int | None = None  # known once the policy is loaded
        self.totals: Counter[str] = Counter()  # this process's invalid_samples / rollout_failures
        self.breaker = CircuitBreaker()
        # One loop for the process, not asyncio.run per job: an HTTP sampler's pooled
        # connections belong to the loop that opened them.
        self.loop = asyncio.new_event_loop()

    def follow_events(self, block_ms: int | None = None) -> None:
        entries, self.cursor = bus.read_events(self.r, self.cfg.run_id, self.cursor, block_ms=block_ms)
        for _, msg in entries:
            self.state.apply(msg)

    def sync_weights(self, min_version: int) -> None:
        """Load the newest published version; wait (bounded) until one >= ``min_version``
        exists: the producer admitted this group after seeing it published."""
        deadline = time.monotonic() + self.cfg.job_timeout
        self.follow_events()
        while self.state.latest_weights is None or self.state.published_version < min_version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no weights >= v{min_version} published within {self.cfg.job_timeout}s")
            self.follow_events(block_ms=500)
        published = self.state.latest_weights
        if self.policy is None:
            try:
                self.policy, sampler = make_policy(self.cfg, published, self.device)
            except (OSError, ValueError) as exc:
                # Pruned (keep_weights) while a freshly started worker loaded it: retry with
                # the newest version if there is one, as a loaded policy does below.
                self.follow_events()
                if self.state.published_version <= published.version:
                    raise
                log.warning("worker %s: could not load v%d (%s); retrying with the newest", self.worker_id,
                            published.version, exc)
                return self.sync_weights(min_version)
            self.vocab_size = policy_vocab_size(self.policy)
            # A copy: a factory that edits setup.sample_kwargs must not change the sampler's defaults.
            setup = RolloutSetup(sampler=sampler, tokenizer=self.policy.tokenizer,
                                 sample_kwargs=dict(sampler.default_kwargs),
                                 completions_per_prompt=self.cfg.completions_per_prompt, extras=dict(self.cfg.extras))
            self.rollout_fn = self.factory(setup)
            self.context_params = accepted_context(self.rollout_fn)
            log.info("worker %s: %s policy at v%d from %s", self.worker_id, self.cfg.inference.backend,
                     self.policy.version, published.uri)
        elif published.version > self.policy.version:
            try:
                self.policy.load(published)
            except (FileNotFoundError, ValueError) as exc:
                # Pruned or replaced while we looked: a newer version is already out.
                log.warning("worker %s: could not load v%d (%s); retrying with the newest", self.worker_id,
                            published.version, exc)
                self.follow_events(block_ms=200)
                return self.sync_weights(min_version)

    @property
    def invalid_samples(self) -> int:
        return self.totals["invalid_samples"]

    @property
    def rollout_failures(self) -> int:
        return self.totals["rollout_failures"]

    def _count(self, counts: Counter, field: str, error: str) -> None:
        """One failed draw: counted for this job (Redis) and the process, fed to the breaker."""
        counts[field] += 1
        self.totals[field] += 1
        self.breaker.record(False, error)
        if self.breaker.tripped:
            raise CircuitOpen(self.breaker.reason())

    async def _draw(self, row: dict[str, Any], context: dict[str, Any], counts: Counter) -> RolloutSample | None:
        """One completion. An exception (or a return that is not a RolloutSample) is
        retried, bounded; an invalid sample is dropped without a retry (the group's redraw
        rounds replace it). Both count as failures for the circuit breaker: a rollout_fn
        that only ever produces invalid samples must stop the run, not reject every group."""
        kwargs = {k: v for k, v in context.items() if k in self.context_params}
        for attempt in range(self.cfg.rollout_max_retries + 1):
            try:
                result = await self.rollout_fn(dict(row), **kwargs)
                problem = None if result is None else check_sample(result, self.vocab_size, self.cfg.max_seq_len)
            except ValidationError as exc:  # rollout_fn built (or tried to mutate) an invalid RolloutSample
                problem = validation_message(exc)
            except Exception as exc:
                log.warning("worker %s: rollout_fn failed (attempt %d): %r", self.worker_id, attempt + 1, exc)
                self._count(counts, "rollout_failures", f"{type(exc).__name__}: {exc}")
                continue
            if problem is not None:
                log.warning("worker %s: invalid sample dropped: %s", self.worker_id, problem)
                self._count(counts, "invalid_samples", f"invalid sample: {problem}")
                return None
            self.breaker.record(True)
            return result
        return None

    async def _group(self, job: GroupJob, counts: Counter | None = None) -> list[RolloutSample]:
        """G draws; missing members (None, invalid, failed) are re-drawn for up to
        ``max_incomplete_group_retries`` more rounds. Failures are tallied in ``counts``."""
        counts = Counter() if counts is None else counts
        samples: list[RolloutSample] = []
        next_index = 0
        for _ in range(self.cfg.max_incomplete_group_retries + 1):
            missing = job.group_size - len(samples)
            if missing == 0:
                break
            contexts = [dict(row_index=job.row_index, epoch=job.epoch, sample_index=next_index + i, evaluation=False)
                        for i in range(missing)]
            next_index += missing
            results = await asyncio.gather(*(self._draw(job.row, c, counts) for c in contexts))
            samples += [s for s in results if s is not None]
        return samples

    def run_group(self, job: GroupJob) -> dict[str, Any]:
        self.sync_weights(job.submit_version)
        version = self.policy.version
        seed_torch(job_seed(self.cfg.seed, job.group_id))
        counts: Counter[str] = Counter()
        try:
            samples = self._run(self._group(job, counts))
        except CircuitOpen as exc:
            with self.r.pipeline(transaction=True) as pipe:
                bus.xadd(pipe, keys.events(self.cfg.run_id), RunFinished(reason=str(exc), failed=True))
                self._add_stats(pipe, counts)
                pipe.execute()
            log.error("worker %s: %s: stopping the run", self.worker_id, exc)
            raise
        stream = keys.rollouts(self.cfg.run_id)
        with self.r.pipeline(transaction=True) as pipe:
            self._add_stats(pipe, counts)  # run-wide counters ride along: no extra round trip
            if len(samples) < self.cfg.min_group_size:  # (a single survivor has no group-relative advantage)
                bus.xadd(pipe, keys.events(self.cfg.run_id), GroupRejected(
                    group_id=job.group_id, by=self.worker_id,
                    reason=f"only {len(samples)} of {job.group_size} draws returned a valid sample"))
            else:
                bus.xadd(pipe, keys.events(self.cfg.run_id), GroupSampled(
                    group_id=job.group_id, samples=len(samples), worker_id=self.worker_id, version=version))
                for member, s in enumerate(samples):
                    bus.xadd(pipe, stream, s.model_copy(update=dict(
                        sample_id=sample_id_for(job.group_id, member), group_id=job.group_id,
                        group_size=len(samples), row_index=job.row_index, epoch=job.epoch,
                        submit_version=job.submit_version, min_version=version, max_version=version,
                        worker_id=self.worker_id)))
            pipe.set(keys.worker_heartbeat(self.cfg.run_id, self.worker_id), version, ex=60)
            pipe.execute()
        return {"group_id": job.group_id, "samples": len(samples), "version": version,
                "invalid_samples": counts["invalid_samples"], "rollout_failures": counts["rollout_failures"]}

    def _run(self, coro: Any) -> Any:
        """Run one job's coroutine on the process loop. Whatever ends it (a result, the
        circuit breaker, rq's job timeout), no draw of this job may live on into the next
        job's run: gather does not cancel its siblings, and the loop outlives the job."""
        try:
            return self.loop.run_until_complete(coro)
        finally:
            stray = asyncio.all_tasks(self.loop)
            for task in stray:
                task.cancel()
            if stray:
                self.loop.run_until_complete(asyncio.gather(*stray, return_exceptions=True))

    def _add_stats(self, pipe: Any, counts: Counter) -> None:
        """Run-wide counters the trainer reports (per-process ones die with the worker)."""
        for field in ("invalid_samples", "rollout_failures"):
            if counts[field]:
                pipe.hincrby(keys.rollout_stats(self.cfg.run_id), field, counts[field])
