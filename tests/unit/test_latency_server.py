"""bench/latency_server.py, the benchmarks' stand-in inference server: its answers parse as
rlstream's OpenAI client reads them, its latency distributions are what they say, and the
weight-sync route records versions. (The benchmarks themselves are not run by the suite.)"""
from __future__ import annotations

import asyncio
import statistics
import sys
from pathlib import Path

import httpx
import pytest

from rlstream.sampling.remote import completion_request, parse_completions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from latency_server import LatencyServer, parse_latency  # noqa: E402


def test_latency_distributions():
    assert parse_latency("fixed:0.3")() == 0.3
    lognormal, mixed = parse_latency("lognormal:0.25,1.0", seed=1), parse_latency("mix:0.1,2.0,0.2", seed=2)
    draws = [lognormal() for _ in range(20000)]
    assert statistics.median(draws) == pytest.approx(0.25, rel=0.05)
    assert max(draws) > 2.5  # a long tail: p99 is 0.25 * e^2.33 = 2.6 s
    mix = [mixed() for _ in range(5000)]
    assert set(mix) == {0.1, 2.0} and mix.count(2.0) / len(mix) == pytest.approx(0.2, abs=0.03)
    with pytest.raises(ValueError, match="expected fixed:S"):
        parse_latency("pareto:1")


def test_answers_parse_as_the_openai_client_reads_them_and_requests_overlap():
    server = LatencyServer("fixed:0.2", vocab=16).start()
    prompt = [3, 4, 5]
    body = completion_request("m", prompt, 4, max_tokens=2, temperature=1.0)

    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(20)))
            sync = await client.post("/update_weights_from_disk", json={"model_path": "/nowhere", "version": 3})
            return replies, sync, (await client.get("/stats")).json()

    replies, sync, stats = asyncio.run(go())
    for reply in replies:
        completions = parse_completions(reply.json(), prompt, version=0)
        assert len(completions) == 4
        assert all(len(c.output_tokens) == 2 and max(c.output_tokens) < 16 for c in completions)
    assert sync.json() == {"success": True}
    assert stats["requests"] == 20 and stats["versions"] == [3]
    assert stats["max_in_flight"] > 1  # served concurrently, not one at a time
