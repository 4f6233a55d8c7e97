"""The SDK service on an external Redis (the session's real redis-server): one training client
per run (a second service is refused while the first holds the run's lease, and leaves nothing
behind), a reconnect that names the bus again, and the events a service writes
(docs/design.md §15.68 Reconnect and close)."""
from __future__ import annotations

import pytest

from rlstream.core import bus
from rlstream.core.config import RedisConfig
from rlstream.core.credentials import url_password
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import RunFinished, RunStarted
from rlstream.sdk import service as service_module
from rlstream.sdk.service import ServiceClient


def test_one_service_per_run_and_a_reconnect_that_names_its_bus(tmp_path, redis_url, r, monkeypatch):
    first = ServiceClient.from_config(base_model="builtin:tiny", log_path=tmp_path, redis=RedisConfig(url=redis_url))
    run_id = first.trainer_job_id
    assert url_password(redis_url) not in (tmp_path / run_id / "config.json").read_text()  # so a reconnect names it
    monkeypatch.setattr(service_module, "LEASE_TTL_S", 0.2)  # how long a reconnect waits for a crashed client
    try:
        with pytest.raises(RlstreamError, match="already has a trainer"):
            ServiceClient.from_config(base_model="builtin:tiny", log_path=tmp_path, trainer_job_id=run_id,
                                      redis=RedisConfig(url=redis_url))
        with pytest.raises(ConfigError, match="lora_rank=0 \\(not 4\\)"):
            ServiceClient.from_config(base_model="builtin:tiny", lora_rank=4, log_path=tmp_path, trainer_job_id=run_id,
                                      redis=RedisConfig(url=redis_url))
    finally:
        first.close()
    with pytest.raises(RlstreamError, match="is closed"):
        first.create_training_client()
    again = ServiceClient.from_config(base_model="builtin:tiny", log_path=tmp_path, trainer_job_id=run_id,
                                      redis=RedisConfig(url=redis_url))
    again.close()
    kinds = [type(m) for _, m in bus.iter_all_events(r, run_id)]
    assert kinds == [RunStarted, RunFinished, RunStarted, RunFinished]
    with pytest.raises(ConfigError, match="no run 'nope'"):
        ServiceClient.from_config(base_model="builtin:tiny", log_path=tmp_path, trainer_job_id="nope")


def test_a_lora_service_trains_adapters_samples_merged_weights_and_references_its_base(tmp_path, redis_url):
    import torch

    from rlstream.sdk import AdamParams, Datum, SamplingParams
    from rlstream.trainer import lora

    service = ServiceClient.from_config(base_model="builtin:tiny", lora_rank=4, log_path=tmp_path,
                                        redis=RedisConfig(url=redis_url))
    try:
        policy = service.create_training_client(base_model="builtin:tiny", lora_rank=4)
        reference = service.create_reference_client("builtin:tiny", lora_rank=0)
        assert isinstance(reference.model, lora.AdapterDisabled)  # the policy's own base: no second copy
        data = [Datum(tokens=[6, 13, 7, 14, 12]), Datum(tokens=[3, 13, 4, 14, 7])]
        before = [o["logprobs"].data for o in reference.forward(data).loss_fn_outputs]
        for _ in range(2):
            policy.forward_backward(data, "cross_entropy").result()
            policy.optim_step(AdamParams(learning_rate=5e-2)).result()
        after = [o["logprobs"].data for o in policy.forward(data).loss_fn_outputs]
        assert after != before  # the adapters moved the policy...
        assert [o["logprobs"].data for o in reference.forward(data).loss_fn_outputs] == before  # ...not its base
        saved = policy.save_weights_for_sampler("lora-2").result()
        client = service.create_sampling_client(model_path=saved.path)
        merged = lora.merged_state_dict(policy.model)
        served = service._deployment.policy.model.state_dict()
        assert all(torch.allclose(served[k], v, atol=1e-6) for k, v in merged.items() if k in served)
        response = client.sample([6, 13, 7, 14], num_samples=2, sampling_params=SamplingParams(max_tokens=1)).result()
        assert len(response.sequences) == 2 and all(len(s.tokens) == len(s.logprobs) == 1 for s in response.sequences)
    finally:
        service.close()
