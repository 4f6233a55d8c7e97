"""``ServiceClient``: the SDK's service for one model on this machine (docs/design.md §15.65 The
SDK trains in the caller's process, §15.68 Reconnect and close).

The service is a run: its directory (``<log_path>/<run id>``: config, weights, states), its
Redis (an embedded redis-server under the run directory, or ``redis.url``) holding the events
stream, and the run's trainer lease, which the service holds so that no other trainer writes
for the run meanwhile. ``trainer_job_id`` is the run id: ``from_config(trainer_job_id=...)``
reconnects to the run's bus and restores the newest saved state. The training client, the
reference and a local deployment live in the caller's process.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rlstream.core.config import Config, new_run_id, validate_config
from rlstream.core.credentials import private_dir
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import RunFinished, RunStarted
from rlstream.sdk.bus_server import open_bus, stop_bus
from rlstream.sdk.ledger import Ledger
from rlstream.sdk.sampler import LOCAL_SERVICES, LOCAL_URL, Deployment, DeploymentSampler, SamplingClient
from rlstream.sdk.session import Session
from rlstream.sdk.training import ReferenceClient, TrainingClient, frozen_base
from rlstream.trainer.lease import LEASE_TTL_S, TrainerLease

log = logging.getLogger(__name__)
# Arguments of the hosted SDK that name hosted resources: accepted so that seed code runs, and
# reported once, since nothing here can honour them.
HOSTED_ONLY = {
    "api_key": "no API: the service runs on this machine", "base_url": "no API: the service runs on this machine",
    "training_shape_id": "no training shapes: the model trains in this process",
    "reference_training_shape_id": "the reference runs in this process",
    "cleanup_deployment_on_close": "a local deployment ends with the service; an inference server is yours",
    "hotload_timeout": "syncs are bounded by inference.timeout",
}
RECONNECT_OPTIONS = ("redis", "inference", "device", "torch_threads", "trainer")  # may differ on a reconnect
CLOSE_STATE = "close-step-{step:06d}"  # what close() saves when the service stays up for a reconnect


def _options(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` minus the hosted-only arguments (logged once as ignored); the rest must be
    Config fields (``seed``, ``device``, ``redis``, ``inference``, ``trainer``, ``lora_alpha``...)."""
    ignored = sorted(k for k in given if k in HOSTED_ONLY)
    if ignored:
        log.warning("ServiceClient: ignoring %s", "; ".join(f"{k} ({HOSTED_ONLY[k]})" for k in ignored))
    unknown = sorted(k for k in given if k not in HOSTED_ONLY and k not in Config.model_fields)
    if unknown:
        raise TypeError(f"ServiceClient.from_config: unknown argument(s) {', '.join(unknown)}; it takes the SDK's "
                        "arguments and rlstream Config fields (seed, device, redis, inference, trainer, ...)")
    return {k: v for k, v in given.items() if k not in HOSTED_ONLY}


def _dumped(value: Any) -> Any:
    return value.model_dump(mode="json", context={"secrets": True}) if hasattr(value, "model_dump") else value


class ServiceClient:
    """One model's service: ``create_training_client``, ``create_deployment_sampler``,
    ``create_sampling_client``, ``create_reference_client``, ``close``."""

    def __init__(self, session: Session, embedded: EmbeddedRedis | None, attached_embedded: bool,
                 cleanup_trainer_on_close: bool, replica_count: int, deployment_id: str | None = None):
        self.session, self._embedded, self._attached = session, embedded, attached_embedded
        self.cleanup_trainer_on_close, self.replica_count = cleanup_trainer_on_close, replica_count
        self._deployment_id = deployment_id
        self.training_client: TrainingClient | None = None
        self._deployment: Deployment | None = None
        self._tokenizer = None
        self.closed = False
        session.hotload = self.hotload
        LOCAL_SERVICES[session.run_id] = self  # DeploymentSampler(inference_url=service.inference_url) finds it

    # ----------------------------------------------------------------- start / reconnect
    @classmethod
    def from_config(cls, *, base_model: str, tokenizer_model: str | None = None, lora_rank: int | None = None,
                    learning_rate: float = 1e-5, replica_count: int = 1, log_path: str | Path = "runs",
                    trainer_job_id: str | None = None, cleanup_trainer_on_close: bool = True,
                    deployment_id: str | None = None, **options: Any) -> ServiceClient:
        """Start a service for ``base_model`` (a new run), or reconnect to the run
        ``trainer_job_id``: its Redis, its lease, and (at ``create_training_client``) its
        newest saved state (``lora_rank`` None: 0 for a new run, the run's own on a reconnect).
        ``replica_count`` > 1 is noted and served by one deployment. ``deployment_id`` names the
        service's deployment (``service.deployment_id``); nothing is provisioned for it."""
        options = _options(options)
        if replica_count > 1:
            log.warning("ServiceClient: replica_count=%d: the deployment is one local model or your inference "
                        "server (scale that server yourself); rollout workers scale with `rlstream worker`",
                        replica_count)
        run_id = trainer_job_id or new_run_id()
        run_dir = Path(log_path) / run_id
        given = {"base_model": str(base_model), "tokenizer_model": tokenizer_model, "lora_rank": lora_rank}
        if trainer_job_id is not None:
            overrides = {k: _dumped(v) for k, v in options.items() if k in RECONNECT_OPTIONS}
            cfg = cls._saved_config(run_dir, given, overrides)
        else:
            fields = {**{k: _dumped(v) for k, v in options.items()}, **given, "lora_rank": lora_rank or 0,
                      "learning_rate": learning_rate, "log_path": str(log_path), "run_id": run_id}
            cfg = validate_config(fields)
        private_dir(run_dir)
        r, embedded, attached = open_bus(cfg, run_dir, keep_running=not cleanup_trainer_on_close)
        lease = TrainerLease(r, run_id)
        try:  # a service that fails to start leaves nothing running
            if cfg.redis.url is None:  # record where the bus is, for a reconnect and for `rlstream status`
                cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"url": embedded.url})})
            (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
            deadline = time.monotonic() + LEASE_TTL_S + 1.0  # a crashed client's lease lapses within one TTL
            while not lease.try_take() and time.monotonic() < deadline:
                time.sleep(0.2)
            lease.hold()
            from rlstream.sampling.torch_setup import setup_torch

            device = setup_torch(cfg.trainer_device, cfg.torch_threads, cfg.seed)
            session = Session(cfg, run_dir, r, lease, Ledger(), device)
            session.ledger.follow(r, run_id)
            session.record(RunStarted(run_id=run_id, config=cfg.model_dump(mode="json")))
        except BaseException:
            lease.release()
            r.close()
            if embedded is not None:
                embedded.stop()
            raise
        log.info("SDK service %s run %s in %s", "reconnected to" if trainer_job_id else "started", run_id, run_dir)
        return cls(session, embedded, attached, cleanup_trainer_on_close, replica_count, deployment_id)

    from_firetitan_config = from_config  # the seed's name

    @staticmethod
    def _saved_config(run_dir: Path, given: dict[str, Any], overrides: dict[str, Any]) -> Config:
        """The run's config; ``overrides`` (where the bus and the deployment are, the devices) win,
        since a saved config holds no password and a reconnect may come from another machine."""
        path = run_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"no run {run_dir.name!r} under {run_dir.parent}: reconnect with the log_path it was "
                              "started with (trainer_job_id is its run id, service.trainer_job_id)")
        cfg = validate_config({**json.loads(path.read_text()), **overrides})
        differs = {k: (getattr(cfg, k), v) for k, v in given.items() if v is not None and getattr(cfg, k) != v}
        if differs:
            raise ConfigError(f"run {cfg.run_id} was started with " + ", ".join(
                f"{k}={old!r} (not {new!r})" for k, (old, new) in differs.items()) + ": reconnect with the same")
        return cfg

    # ----------------------------------------------------------------- the seed's surface
    @property
    def trainer_job_id(self) -> str:
        return self.session.run_id

    @property
    def deployment_id(self) -> str:
        """The ``deployment_id`` the service was given; unset: ``"local"`` (a local model) or the
        inference server's URL."""
        if self._deployment_id is not None:
            return self._deployment_id
        inference = self.session.cfg.inference
        return "local" if inference.backend == "local" else str(inference.base_url)

    @property
    def inference_url(self) -> str:
        """Where the deployment serves, for ``DeploymentSampler(inference_url=...)`` (the seed's
        ``deploy_mgr.inference_url``): the inference server's API root (the first of several
        replicas), or ``rlstream-local://<run id>`` for a local model, which only this process
        can sample."""
        urls = self.session.cfg.inference.base_urls
        return urls[0] if urls else f"{LOCAL_URL}{self.trainer_job_id}"

    @property
    def run_dir(self) -> Path:
        return self.session.run_dir

    def tokenizer(self):
        """The service's tokenizer (``tokenizer_model``, else the base model's)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            cfg = self.session.cfg
            self._tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_model or str(self.session.base_path()))
        return self._tokenizer

    def create_training_client(self, base_model: str | None = None, lora_rank: int | None = None) -> TrainingClient:
        """The policy, in this process; a reconnected service's restores the newest saved state."""
        self._check_open()
        self._same_model(base_model, lora_rank)
        if self.training_client is not None:
            return self.training_client  # one policy per service, as one trainer per run
        client = TrainingClient(self.session, self.tokenizer())
        ledger = self.session.ledger
        if ledger.state_order:
            client.load_state_with_optimizer(ledger.state_order[-1])
        elif ledger.steps_logged:
            log.warning("run %s logged %d step(s) but saved no state: the training client starts from the base "
                        "model (save_state(name) makes steps survive a reconnect)", self.trainer_job_id,
                        ledger.steps_logged)
        self.training_client = client
        return client

    def create_deployment_sampler(self, tokenizer=None, concurrency_controller: Any = None,
                                  model_path: str | None = None, **sample_defaults: Any) -> DeploymentSampler:
        """A sampler over the service's deployment, synced to ``model_path`` (a
        ``save_weights_for_sampler`` identity; None: as it is, and at first the run's newest
        snapshot, else the base model).
        ``sample_defaults`` (max_tokens, temperature, top_p, top_k, max_seq_len) apply to every call."""
        self._check_open()
        tokenizer = tokenizer or self.tokenizer()
        deployment = self.deployment(tokenizer, model_path)
        return DeploymentSampler(model=self.deployment_id, tokenizer=tokenizer,
                                 concurrency_controller=concurrency_controller, deployment=deployment,
                                 defaults={**self.sample_defaults(), **sample_defaults})

    def deployment(self, tokenizer=None, model_path: str | None = None) -> Deployment:
        """The service's one deployment, made on first use, synced to ``model_path`` (None: as it
        is, and at first the run's newest snapshot, else the base model)."""
        self._check_open()
        if self._deployment is None:
            self._deployment = Deployment(self.session, tokenizer or self.tokenizer())
        if model_path is not None or self._deployment.policy is None:
            self._deployment.sync(model_path)
        return self._deployment

    def hotload(self, model_path: str) -> None:
        """Sync the deployment to the snapshot ``model_path``: every sampler over it (and a server
        that URL samplers reach) serves it from now on."""
        self.deployment(model_path=model_path)

    def sample_defaults(self) -> dict[str, Any]:
        """What a sampler over the deployment uses when a call does not say: the run's settings."""
        cfg = self.session.cfg
        return {"max_tokens": cfg.max_completion_tokens, "temperature": cfg.temperature, "max_seq_len": cfg.max_seq_len}

    def create_sampling_client(self, model_path: str | None = None, **sample_defaults: Any) -> SamplingClient:
        return SamplingClient(self.create_deployment_sampler(model_path=model_path, **sample_defaults))

    def create_reference_client(self, base_model: str | None = None, lora_rank: int = 0) -> ReferenceClient:
        """Frozen reference logprobs: a LoRA policy's base with adapters disabled, else a copy
        of the base model."""
        self._check_open()
        from rlstream.trainer import lora
        from rlstream.trainer.precision import Precision

        policy = self.training_client
        if policy is not None and lora.is_lora(policy.model) and base_model in (None, self.session.cfg.base_model):
            return ReferenceClient(lora.AdapterDisabled(policy.model), policy.pad_id, policy.precision, policy.device)
        tokenizer = self.tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return ReferenceClient(frozen_base(self.session, base_model, tokenizer), pad_id,
                               policy.precision if policy is not None else Precision(), self.session.device)

    def _same_model(self, base_model: str | None, lora_rank: int | None) -> None:
        cfg = self.session.cfg
        if base_model not in (None, cfg.base_model) or lora_rank not in (None, cfg.lora_rank):
            raise ConfigError(f"this service trains base_model={cfg.base_model!r} with lora_rank={cfg.lora_rank}; "
                              "create another service (ServiceClient.from_config) for another model")

    def _check_open(self) -> None:
        if self.closed:
            raise RlstreamError(f"service {self.trainer_job_id} is closed; reconnect with "
                                f"ServiceClient.from_config(..., trainer_job_id={self.trainer_job_id!r})")

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """``cleanup_trainer_on_close=True``: the run is finished in its log, the lease released,
        the embedded redis-server stopped: nothing of the service keeps running (its directory
        and log stay, and a reconnect restarts from them). ``False``: the live train state is
        saved (``close-step-<N>``) and the embedded redis-server keeps running for a reconnect."""
        if self.closed:
            return
        s, self.closed = self.session, True
        try:
            if not self.cleanup_trainer_on_close and self.training_client is not None:
                self.training_client.save_state(CLOSE_STATE.format(step=self.training_client.step))
            if self.cleanup_trainer_on_close:
                step = self.training_client.step if self.training_client is not None else s.ledger.step
                s.record(RunFinished(reason="SDK service closed", step=step))
        finally:
            s.lease.release()
            LOCAL_SERVICES.pop(s.run_id, None)
            if self._deployment is not None:
                self._deployment.close()
            self.training_client = self._deployment = None
            if self.cleanup_trainer_on_close:
                stop_bus(s.r, s.run_dir, self._embedded, self._attached)
            s.r.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

