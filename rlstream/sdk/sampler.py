"""The service's deployment and the samplers over it (docs/design.md §15.67 One deployment per
service, synced to a snapshot identity), and the seed's ``DeploymentSampler(inference_url=,
model=, api_key=, tokenizer=, concurrency_controller=)``, a sampler built from a URL.

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
import weakref
from typing import Any

from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import SamplerSaved, WeightsPublished
from rlstream.core.rollout import Completion
from rlstream.sdk.ledger import identity, parse_identity
from rlstream.sdk.session import Session
from rlstream.sdk.types import Done, ModelInput, SampledSequence, SampleResponse, SamplingParams

log = logging.getLogger(__name__)
# service.inference_url of a service whose deployment is a local model (no server, so no URL):
# "rlstream-local://<run id>" names it, and DeploymentSampler(inference_url=...) finds it here.
LOCAL_URL = "rlstream-local://"
LOCAL_SERVICES: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()  # run id -> ServiceClient
# What a URL-built sampler's calls use unless they say otherwise (the cookbook recipe's max_completion_tokens).
URL_SAMPLER_DEFAULTS = {"max_tokens": 1024, "temperature": 1.0}


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
    flight to an inference server; a local deployment ignores it.

    Built as the seed builds it, from a URL: ``DeploymentSampler(inference_url=, model=,
    api_key=, tokenizer=, concurrency_controller=)``. ``inference_url`` is an OpenAI-compatible
    server's API root (``http://host:8000/v1``, which serves ``POST /completions`` with token-id
    prompts: vLLM, SGLang), ``model`` the name it serves, ``api_key`` a bearer token (None: no
    header), ``tokenizer`` the one prompts are tokenized with (required: tokenization is
    client-side). Or ``service.inference_url``: the service's own deployment (a local model has
    the URL ``rlstream-local://<run id>``). Either way, ``WeightSyncer.save_and_hotload`` (or
    ``create_deployment_sampler(model_path=...)``) moves the service's deployment to new weights;
    a URL sampler samples whatever its server serves. ``**sample_defaults`` (max_tokens,
    temperature, top_p, top_k, max_seq_len) apply to every call; a URL sampler's start from
    max_tokens 1024, temperature 1. ``close()`` a URL sampler when done (its HTTP clients).

    ``service.create_deployment_sampler`` builds it over the service's deployment
    (``DeploymentSampler(deployment=, tokenizer=, concurrency_controller=, defaults=)``; the
    positional form ``DeploymentSampler(deployment, tokenizer, controller, defaults)`` of
    earlier releases is still accepted)."""

    def __init__(self, inference_url: Any = None, model: Any = None, api_key: Any = None, tokenizer: Any = None,
                 concurrency_controller: Any = None, *, deployment: Deployment | None = None,
                 defaults: dict[str, Any] | None = None, transport: Any = None, **sample_defaults: Any):
        """``transport``: an httpx async transport for a URL sampler's requests (tests)."""
        if isinstance(inference_url, Deployment):  # the earlier positional form: (deployment, tokenizer, ctl, defaults)
            deployment, tokenizer, concurrency_controller, defaults = inference_url, model, api_key, tokenizer
            inference_url = model = api_key = None
        self.concurrency_controller = concurrency_controller
        self._inner, self._inner_policy, self._url_policy = None, None, None
        if deployment is None and isinstance(inference_url, str) and inference_url.startswith(LOCAL_URL):
            service = LOCAL_SERVICES.get(inference_url.removeprefix(LOCAL_URL))
            if service is None:
                raise RlstreamError(f"inference_url {inference_url!r} names no open service of this process: pass "
                                    "service.inference_url of a service that is still open")
            tokenizer = tokenizer or service.tokenizer()
            deployment = service.deployment(tokenizer)
            defaults = {**service.sample_defaults(), **(defaults or {})}
        if deployment is not None:
            self.deployment, self.tokenizer = deployment, tokenizer
            self.defaults = {**(defaults or {}), **sample_defaults}
            self.model_path, self.model = deployment.model_path, model
            return
        if not inference_url:
            raise TypeError("DeploymentSampler needs inference_url= (an OpenAI-compatible server's API root, or "
                            "service.inference_url), or use service.create_deployment_sampler(...)")
        if tokenizer is None:
            raise TypeError("DeploymentSampler(inference_url=...) needs tokenizer=: prompts are tokenized here, "
                            "and the server is sent token ids")
        if not model:
            raise TypeError("DeploymentSampler(inference_url=...) needs model=: the model name the server serves")
        self.deployment, self.tokenizer, self.model, self.model_path = None, tokenizer, model, None
        self.defaults = {**URL_SAMPLER_DEFAULTS, **(defaults or {}), **sample_defaults}
        self._url_policy = url_policy(inference_url, model, api_key, tokenizer, transport)

    def _sampler(self):
        """The workers' sampler over the deployment's current policy (kept, so concurrent
        calls in one event-loop tick share one batched ``generate``)."""
        from rlstream.sampling.local import LocalSampler
        from rlstream.sampling.remote import RemoteSampler

        if self._url_policy is not None:
            if self._inner is None:
                self._inner = RemoteSampler(self._url_policy, self.defaults,
                                            concurrency_controller=self.concurrency_controller)
            return self._inner
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

    def close(self) -> None:
        """A URL sampler's HTTP clients; a service's sampler leaves its deployment to the service."""
        if self._url_policy is not None:
            self._url_policy.close()


def url_policy(inference_url: str, model: str, api_key: str | None, tokenizer: Any, transport: Any = None):
    """The workers' server client (``RemotePolicy``) for one OpenAI-compatible server that this
    sampler only samples from: it never syncs it (whoever serves it does)."""
    from pydantic import ValidationError

    from rlstream.core.config import InferenceConfig
    from rlstream.sampling.remote import RemotePolicy

    try:
        cfg = InferenceConfig(backend="openai", base_url=inference_url, model=model)
    except ValidationError as exc:
        raise ConfigError(f"DeploymentSampler: inference_url {inference_url!r}: "
                          f"{exc.errors()[0]['msg']} (an http(s):// API root such as http://127.0.0.1:8000/v1)"
                          ) from None
    base = WeightsPublished(version=0, uri="", sha256="", bytes=0)
    return RemotePolicy(cfg, base, tokenizer, model, ".", transport, api_key=api_key)


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
