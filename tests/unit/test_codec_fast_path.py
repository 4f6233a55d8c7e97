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
from rlstream.core.messages import RolloutRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from fault_harness import malformed_entries  # noqa: E402  (the fuzz of the fault-injection test)


def sample(n: int = 12, **over) -> RolloutRecord:
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
    monkeypatch.setattr(RolloutRecord, "model_validate", refuse)
    out = decode(encode(s), expect=RolloutRecord)
    assert out == s and type(out) is RolloutRecord
    assert out.model_dump() == s.model_dump()
    assert out.model_copy(update={"reward": 1.0}).reward == 1.0  # the worker and trainer copy samples
    with pytest.raises(Exception):
        out.reward = 2.0  # still frozen


def test_fast_path_runs_the_invariants(monkeypatch):
    data = msgpack.unpackb(encode(sample()), raw=False)
    data["logprobs"] = struct.pack("<12f", *([0.0] * 11 + [math.nan]))
    monkeypatch.setattr(RolloutRecord, "model_validate", lambda *a, **k: pytest.fail("slow path taken"))
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
    monkeypatch.setattr(RolloutRecord, "model_validate", lambda *a, **k: pytest.fail("slow path taken"))
    old = decode(msgpack.packb(data, use_bin_type=True), expect=RolloutRecord)
    assert (old.started_at, old.finished_at) == (0.0, 0.0) and old.reward == 0.5
    event = msgpack.unpackb(encode(GroupSampled(group_id="g", samples=2, tokens=7)), raw=False)
    del event["tokens"]
    assert decode(msgpack.packb(event, use_bin_type=True)).tokens == 0


# --------------------------------------------------------------------------- a batch of samples
def batch_verdicts(raws: list) -> list[tuple[str, object]]:
    """``decode_samples``' verdict on each entry, in ``verdict``'s terms."""
    out = []
    for got in codec.decode_samples(raws):
        if isinstance(got, DecodeError):
            out.append(("rejected", str(got)))
        else:
            out.append(("accepted", (repr(got.model_dump()), got.model_fields_set)))
    return out


def mutated_maps(rng: random.Random, n: int) -> list[bytes]:
    """``n`` encoded maps of a sample with one or two fields changed, dropped or added (see ``_mutations``)."""
    base = msgpack.unpackb(encode(sample()), raw=False)
    fields, out = [*base, "surprise"], []
    for _ in range(n):
        data = dict(base)
        for _ in range(rng.choice((1, 1, 2))):
            name = rng.choice(fields)
            if rng.random() < 0.1:
                data.pop(name, None)
            else:
                data[name] = rng.choice(_mutations(rng))
        out.append(msgpack.packb(data, use_bin_type=True))
    return out


def test_batch_decode_gives_every_entry_the_verdict_of_decode(monkeypatch):
    """docs/design.md §15.85 Samples decode by the batch: the fault test's fuzz and random field mutations,
    mixed with good samples in one batch, get entry by entry what ``decode`` (fast path and validated
    path alike) says of each, message included; so does each one alone."""
    rng = random.Random(7)
    good = [encode(sample(n=6 + i % 5, sample_id=f"s{i}")) for i in range(40)]
    hostile = [raw for _, raw, _ in malformed_entries(encode(sample()), random.Random(5))] + mutated_maps(rng, 600)
    hostile += [None, "text", 3, encode(sample()).decode("latin-1")]  # not bytes at all (a damaged entry)
    raws = good + hostile
    rng.shuffle(raws)
    expected = [verdict(raw) for raw in raws]
    assert batch_verdicts(raws) == expected
    assert expected == [validated_path(raw, monkeypatch) for raw in raws]
    assert [batch_verdicts([raw])[0] for raw in raws] == expected
    assert {v for v, _ in expected} == {"accepted", "rejected"}


def test_batch_decode_builds_worker_samples_without_decode(monkeypatch):
    """What workers write takes neither ``decode`` nor pydantic's validation."""
    samples = [sample(sample_id=f"s{i}", metrics={"len": float(i)}) for i in range(8)]
    monkeypatch.setattr(codec, "decode", lambda *a, **k: pytest.fail("decode called for a worker's sample"))
    monkeypatch.setattr(RolloutRecord, "model_validate", lambda *a, **k: pytest.fail("model_validate called"))
    out = codec.decode_samples([encode(s) for s in samples])
    assert out == samples and all(type(s) is RolloutRecord for s in out)
    assert [s.model_fields_set for s in out] == [set(RolloutRecord.model_fields)] * 8
    with pytest.raises(Exception):
        out[0].reward = 2.0  # still frozen


def test_one_bad_sample_fails_the_batch_check_and_only_itself():
    """A batch whose joined check fails is checked sample by sample: the bad one gets the invariants'
    message, every other one is accepted (each failure of ``_check_invariants``, one at a time)."""
    lp_nan = [0.0] * 11 + [math.nan]
    bad = {"loss mask value 2": dict(loss_mask=[0] * 4 + [1] * 7 + [2]),
           "no 1 in the mask": dict(loss_mask=[0] * 12),
           "negative token": dict(tokens=[-3] + list(range(2, 13))),
           "NaN logprob": dict(logprobs=lp_nan),
           "inf reward": dict(reward=math.inf),
           "versions": dict(min_version=3, max_version=2)}
    for what, over in bad.items():
        data = msgpack.unpackb(encode(sample()), raw=False)
        for name, value in over.items():  # past the model's own checks: as a hostile writer would send it
            typecode = RolloutRecord.PACKED.get(name)
            data[name] = array(typecode, value).tobytes() if typecode else value
        raws = [encode(sample(sample_id=f"s{i}")) for i in range(5)]
        raws.insert(2, msgpack.packb(data, use_bin_type=True))
        got = batch_verdicts(raws)
        assert [v for v, _ in got] == ["accepted"] * 2 + ["rejected"] + ["accepted"] * 3, what
        assert got[2] == verdict(raws[2]) and "Value error" in got[2][1], what


def test_batch_invariants_hold_only_when_each_sample_passes():
    """``RolloutRecord.invariants_hold`` is never True for a batch with a sample ``_check_invariants``
    refuses (it may be False for a good batch: the exact logprob check then decides)."""
    rng = random.Random(3)
    good = [codec._built_sample(codec._exact_map(encode(sample(sample_id=f"s{i}")))) for i in range(4)]
    assert RolloutRecord.invariants_hold(good) and RolloutRecord.invariants_hold([])
    for _ in range(400):
        n = rng.randrange(0, 6)
        fields = dict(tokens=array("i", [rng.choice((0, 1, 7, -1, 2**31 - 1)) for _ in range(n)]),
                      logprobs=array("f", [rng.choice((0.0, -1.0, math.nan, math.inf, -3e38)) for _ in
                                           range(n + rng.choice((0, 0, 1)))]),
                      loss_mask=array("B", [rng.choice((0, 1, 1, 2)) for _ in range(n + rng.choice((0, 0, -1)))]),
                      reward=rng.choice((0.0, 1.0, math.nan)), min_version=rng.choice((0, 1)),
                      max_version=rng.choice((0, 1)))
        odd = codec._built_sample({**msgpack.unpackb(encode(sample()), raw=False), **fields})
        try:
            odd._check_invariants()
            passes = True
        except ValueError:
            passes = False
        batch = good[:2] + [odd] + good[2:]
        assert not RolloutRecord.invariants_hold(batch) or passes, fields
        assert not RolloutRecord.invariants_hold([odd]) or passes, fields


def test_batch_limits_hold_only_when_each_sample_is_within_them():
    samples = [sample(n=n, sample_id=f"s{n}") for n in (6, 9, 12)]
    assert RolloutRecord.within_limits(samples, 13, 12) and RolloutRecord.within_limits([], 1, 1)
    assert RolloutRecord.within_limits(samples, None, None)
    assert not RolloutRecord.within_limits(samples, 12, 12)  # token id 12 (the 12-token sample's last)
    assert not RolloutRecord.within_limits(samples, 13, 11)
