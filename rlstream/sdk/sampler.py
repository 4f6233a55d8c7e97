"""The service's deployment and the samplers over it (docs/design.md §15.67 One deployment per
service, synced to a snapshot identity).

The deployment is what the workers use (``rlstream.sampling``): a local model in the caller's
process (``inference.backend = "local"``: a second copy, apart from the policy, that holds the
snapshot it was synced to) or the configured inference server: ``"vllm"`` and ``"sglang"`` are
told to load the snapshot's directory through their own routes, ``"openai"`` by a POST to
``inference.weight_sync_url``, as the workers do. Syncing
resolves a snapshot identity through the run's log and verifies its directory's digest before
anything loads it. Every sampler of a service shares its one deployment, as the seed's samplers
share one deployment: a sync moves them all.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import SamplerSaved, WeightsPublished
from rlstream.core.rollout import Completion
from rlstream.sdk.ledger import identity, parse_identity
from rlstream.sdk.session import Session
from rlstream.sdk.types import Done, ModelInput, SampledSequence, SampleResponse, SamplingParams

log = logging.getLogger(__name__)


def published(saved: SamplerSaved) -> WeightsPublished:
    """A snapshot as the samplers' loaders take it (they derive the directory from the version)."""
    return WeightsPublished(version=saved.version, uri="", sha256=saved.sha256, bytes=saved.bytes)


class Deployment:
    """The one deployment of a service: ``sync(model_path)`` makes it serve that snapshot
    (None: the newest snapshot, else the base model)."""

    def __init__(self, session: Session, tokenizer, transports: tuple[Any, Any] = (None, None)):
        """``transports``: httpx transports of the server's (completions, weight sync) clients (tests)."""
        self.session, self.tokenizer, self.transports = session, tokenizer, transports
        self.backend = session.cfg.inference.backend
        self.policy = None
        self.model_path: str | None = None  # the identity it serves; None = the base model

    def sync(self, model_path: str | None) -> None:
        s = self.session
        ledger = s.ledger.follow(s.r, s.run_id)
        saved = None
        if model_path is not None:
            saved = ledger.sampler(parse_identity(model_path, s.run_id, "sampler_weights"), s.run_id)
        elif ledger.samplers:  # a reconnected service serves what it last saved
            saved = max(ledger.samplers.values(), key=lambda m: m.version)
        if self.policy is None:
            self.policy = self._local(saved) if self.backend == "local" else self._remote(saved)
        elif saved is None:
            if self.backend == "local":
                self.policy = self._local(None)  # back to the base: reload it
            else:
                raise ConfigError("the inference server cannot be told to go back to the base model; sync it to a "
                                  "snapshot (model_path=...) or restart it")
        else:
            self._load(saved)
        self.model_path = None if saved is None else identity(s.run_id, "sampler_weights", saved.name)
        log.info("deployment of run %s serves %s", s.run_id, self.model_path or "the base model")

    def _local(self, saved: SamplerSaved | None):
        from rlstream.sampling.local import LocalPolicy
        from rlstream.sampling.torch_setup import load_model_and_tokenizer

        s = self.session
        if saved is not None:
            return LocalPolicy(published(saved), s.device, s.run_dir / "weights")
        model, _ = load_model_and_tokenizer(str(s.base_path()), s.device)
        policy = LocalPolicy.from_model(model.eval().requires_grad_(False), self.tokenizer, s.device, version=0)
        policy.weights_root = s.run_dir / "weights"  # where later snapshots are read from
        return policy

    def _remote(self, saved: SamplerSaved | None):
        from rlstream.sampling.remote import RemotePolicy

        s, inference = self.session, self.session.cfg.inference
        base = WeightsPublished(version=0, uri="", sha256="", bytes=0)  # what the server serves at start
        # exact: a sync may go back to an older snapshot, which a newer version on the server is not
        policy = RemotePolicy(inference, base, self.tokenizer, inference.model or s.cfg.base_model,
                              s.run_dir / "weights", *self.transports, namespace=s.run_id, exact=True)
        if saved is not None:
            self._load(saved, policy)
        return policy

    def _load(self, saved: SamplerSaved, policy=None) -> None:
        policy = policy or self.policy
        try:
            if self.backend == "openai":
                if self.session.cfg.inference.weight_sync_url is None:
                    raise ConfigError(f"cannot sync the inference server to {saved.name!r}: inference.weight_sync_url "
                                      "is unset, so the server cannot be told to load it. Set it (SGLang: "
                                      "<server>/update_weights_from_disk) and give the server the run's weights/")
                policy.version = -1  # RemotePolicy syncs only forward; a snapshot may be an older one
            policy.load(published(saved))  # verifies the directory's digest first
        except ValueError as exc:
            raise RlstreamError(f"sampler snapshot {saved.name!r} cannot be loaded: {exc}") from None

    def close(self) -> None:
        close = getattr(self.policy, "close", None)
        if self.backend != "local" and close is not None:
            close()
        self.policy = None


class DeploymentSampler:
    """``sample_with_tokens(messages, n, max_tokens, ...)`` and ``sample_with_prompt_tokens(ids,
    n, ...)`` (async, as in the seed: wrap them in ``asyncio.run`` in a synchronous loop), each
    returning ``n`` ``Completion``s (``full_tokens``, ``prompt_len``, ``inference_logprobs``,
    ``text``, ``finish_reason``). ``concurrency_controller`` (``AdaptiveConcurrencyController`` or
    ``FixedConcurrencyController``; None = the server sampler's default) bounds the completions in
    flight to an inference server; a local deployment ignores it."""

    def __init__(self, deployment: Deployment, tokenizer, concurrency_controller: Any, defaults: dict[str, Any]):
        self.deployment, self.tokenizer = deployment, tokenizer
        self.concurrency_controller = concurrency_controller
        self.defaults = defaults
        self.model_path = deployment.model_path
        self._inner, self._inner_policy = None, None

    def _sampler(self):
        """The workers' sampler over the deployment's current policy (kept, so concurrent
        calls in one event-loop tick share one batched ``generate``)."""
        from rlstream.sampling.local import LocalSampler
        from rlstream.sampling.remote import RemoteSampler

        policy = self.deployment.policy
        if policy is None:
            raise RlstreamError("this sampler's service was closed; create the service again to sample")
        if policy is not self._inner_policy:
            if self.deployment.backend == "local":  # one process, one generate: no request window to control
                self._inner = LocalSampler(policy, self.defaults)
            else:  # the request window to the server (docs/design.md §15.51 Adaptive concurrency, AIMD over latency)
                self._inner = RemoteSampler(policy, self.defaults, concurrency_controller=self.concurrency_controller)
            self._inner_policy = policy
        return self._inner

    async def sample_with_prompt_tokens(self, prompt_token_ids: list[int], n: int = 1,
                                        **kwargs: Any) -> list[Completion]:
        return await self._sampler().sample_with_prompt_tokens(list(prompt_token_ids), n=n, **kwargs)

    async def sample_with_tokens(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> list[Completion]:
        from rlstream.core.rollout import chat_prompt_ids

        return await self.sample_with_prompt_tokens(chat_prompt_ids(self.tokenizer, messages), n=n, **kwargs)


class SamplingClient:
    """Tinker's sampling client over the same deployment: ``sample(prompt, num_samples,
    sampling_params)`` returns a future whose result has ``sequences`` (tokens, logprobs,
    stop_reason). Synchronous: call it outside a running event loop."""

    def __init__(self, sampler: DeploymentSampler):
        self.sampler = sampler

    def sample(self, prompt: ModelInput | list[int], num_samples: int = 1,
               sampling_params: SamplingParams | None = None) -> Done[SampleResponse]:
        p = sampling_params or SamplingParams()
        ids = prompt.to_ints() if isinstance(prompt, ModelInput) else list(prompt)
        completions = asyncio.run(self.sampler.sample_with_prompt_tokens(
            ids, n=num_samples, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k))
        return Done(SampleResponse([SampledSequence(c.output_tokens, list(c.inference_logprobs), c.finish_reason)
                                    for c in completions]))
