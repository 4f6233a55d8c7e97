"""The samples' fast decode path (docs/design.md §15.55 Samples decode by a structural check, then
the invariants): it is taken for what workers write, and it gives exactly the verdict (and the
error message) of the validated path for every input, well-formed, malformed or fuzzed."""
from __future__ import annotations

import math
import random
import struct
import sys
from array import array
from pathlib import Path

import factories
import msgpack
import pytest

from rlstream.core import codec
from rlstream.core.codec import DecodeError, decode, encode
from rlstream.core.messages import RolloutSample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from fault_harness import malformed_entries  # noqa: E402  (the fuzz of the fault-injection test)


def sample(n: int = 12, **over) -> RolloutSample:
    """A stamped sample with every field set (a 4-token prompt): what the fast path decodes."""
    fields = dict(reward=0.5, group_size=4, text="ok", metrics={"len": float(n)}, submit_version=2, min_version=2,
                  max_version=3, worker_id="w")
    fields.update(over)
    return factories.sample(1, 0, tokens=range(1, n + 1), prompt=4, logprob=-0.25, **fields)


def validated_path(raw: bytes, monkeypatch) -> tuple[str, object]:
    """The verdict of decode with the fast path switched off (pydantic validation)."""
    with monkeypatch.context() as m:
        m.setattr(codec, "_canonical_sample", lambda data: False)
        return verdict(raw)


def verdict(raw: bytes) -> tuple[str, object]:
    try:
        msg = decode(raw)
    except DecodeError as exc:
        return "rejected", str(exc)
    return "accepted", (repr(msg.model_dump()), msg.model_fields_set)  # repr: a NaN field equals itself


def test_worker_written_samples_skip_pydantic_validation(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("model_validate called on the fast path")

    s = sample(sample_id="a-m1")
    monkeypatch.setattr(RolloutSample, "model_validate", refuse)
    out = decode(encode(s), expect=RolloutSample)
    assert out == s and type(out) is RolloutSample
    assert out.model_dump() == s.model_dump()
    assert out.model_copy(update={"reward": 1.0}).reward == 1.0  # the worker and trainer copy samples
    with pytest.raises(Exception):
        out.reward = 2.0  # still frozen


def test_fast_path_runs_the_invariants(monkeypatch):
    data = msgpack.unpackb(encode(sample()), raw=False)
    data["logprobs"] = struct.pack("<12f", *([0.0] * 11 + [math.nan]))
    monkeypatch.setattr(RolloutSample, "model_validate", lambda *a, **k: pytest.fail("slow path taken"))
    with pytest.raises(DecodeError, match="invalid rollout_sample: rollout_sample: Value error, logprobs must"):
        decode(msgpack.packb(data, use_bin_type=True))


def test_large_finite_logprobs_pass_and_every_non_finite_one_fails():
    big = struct.unpack("<f", struct.pack("<f", -3.0e38))[0]  # |x| >= 2**127: the exact check runs
    assert decode(encode(sample(logprobs=[0.0] * 4 + [big] * 8))).logprobs[5] == big
    for bad in (math.nan, math.inf, -math.inf):
        for pos in (0, 5, 11):
            lp = [0.0] * 4 + [-0.5] * 8
            lp[pos] = bad
            data = msgpack.unpackb(encode(sample()), raw=False)
            data["logprobs"] = array("f", lp).tobytes() if sys.byteorder == "little" else struct.pack("<12f", *lp)
            with pytest.raises(DecodeError, match="logprobs must all be finite"):
                decode(msgpack.packb(data, use_bin_type=True))


def test_fuzz_of_the_fault_test_gets_the_same_verdict_on_both_paths(monkeypatch):
    real = encode(sample(n=12))
    entries = malformed_entries(real, random.Random(5))
    assert len(entries) > 250
    for _, raw, what in entries:
        assert verdict(raw) == validated_path(raw, monkeypatch), what


def _mutations(rng: random.Random) -> list:
    return [0, 1, -1, 2**40, True, False, None, 0.5, -0.0, math.nan, math.inf, "x", "1.0", b"\x01\x00\x00\x00",
            [1, 2], {"a": 1.0}, {"a": 1}, {"a": "1"}, {1: 1.0}, {"a": True}, rng.random(), rng.randrange(-5, 5)]


def test_random_field_mutations_get_the_same_verdict_on_both_paths(monkeypatch):
    rng = random.Random(11)
    base = msgpack.unpackb(encode(sample()), raw=False)
    fields = [*base, "surprise"]
    seen = set()
    for _ in range(1500):
        data = dict(base)
        for _ in range(rng.choice((1, 1, 2))):
            name = rng.choice(fields)
            if rng.random() < 0.1:
                data.pop(name, None)
            else:
                data[name] = rng.choice(_mutations(rng))
        raw = msgpack.packb(data, use_bin_type=True)
        fast = verdict(raw)
        assert fast == validated_path(raw, monkeypatch), data
        seen.add(fast[0])
    assert seen == {"accepted", "rejected"}  # both outcomes were exercised


def test_messages_of_older_workers_decode_with_zero_timings(monkeypatch):
    """Backward compatibility of the perf fields (docs/design.md §15.56 Perf metrics from timestamps
    the processes already have): a sample without started_at/finished_at and a GroupSampled
    without tokens, as older workers wrote them."""
    from rlstream.core.messages import GroupSampled

    data = msgpack.unpackb(encode(sample()), raw=False)
    del data["started_at"], data["finished_at"]
    monkeypatch.setattr(RolloutSample, "model_validate", lambda *a, **k: pytest.fail("slow path taken"))
    old = decode(msgpack.packb(data, use_bin_type=True), expect=RolloutSample)
    assert (old.started_at, old.finished_at) == (0.0, 0.0) and old.reward == 0.5
    event = msgpack.unpackb(encode(GroupSampled(group_id="g", samples=2, tokens=7)), raw=False)
    del event["tokens"]
    assert decode(msgpack.packb(event, use_bin_type=True)).tokens == 0
