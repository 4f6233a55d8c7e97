"""The stand-in inference server the benchmarks and the concurrency tests use
(bench/standin_server.py): its latency specs, its vLLM-shaped answers that rlstream's remote
sampler parses, its 429 above a capacity, and its counters."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import httpx
import pytest

from rlstream.sampling.remote import parse_completions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from standin_server import StandinServer, latency_sampler  # noqa: E402


def test_latency_specs():
    rng = random.Random(0)
    assert latency_sampler("const:0.2")(rng) == 0.2
    assert all(0.1 <= latency_sampler("uniform:0.1:0.3")(rng) <= 0.3 for _ in range(100))
    assert {latency_sampler("bimodal:0.1:3.0:0.5")(rng) for _ in range(100)} == {0.1, 3.0}
    assert latency_sampler("lognormal:0.2:1.0")(rng) > 0
    for bad in ("const", "gauss:1:2", "uniform:1"):
        with pytest.raises(ValueError, match="latency spec"):
            latency_sampler(bad)


def test_answers_like_vllm_and_refuses_above_its_capacity():
    server = StandinServer("const:0.0", capacity=1, vocab_size=16)
    base = server.start()
    try:
        with httpx.Client(base_url=base) as client:
            body = {"prompt": [1, 2], "n": 3, "max_tokens": 4}
            answer = client.post("/v1/completions", json=body).json()
            completions = parse_completions(answer, [1, 2], version=0)
            assert len(completions) == 3 and all(1 <= len(c.inference_logprobs) <= 4 for c in completions)
            assert all(3 <= t < 16 for c in completions for t in c.full_tokens[2:])
            server.in_flight = 1  # as if one completion were being served: the next 3 do not fit
            assert client.post("/v1/completions", json=body).status_code == 429
            server.in_flight = 0
            synced = client.post("/update_weights_from_disk", json={"model_path": "/w/v1", "version": 1})
            assert synced.status_code == 200
            stats = client.get("/stats").json()
        # a request of n = 3 larger than the capacity of 1 is served alone (in flight counts completions)
        assert stats == {"requests": 2, "in_flight": 0, "peak_in_flight": 3, "rejected": 1, "weight_updates": 1}
        assert json.dumps(server.weight_updates) == '[{"model_path": "/w/v1", "version": 1}]'
    finally:
        server.stop()
