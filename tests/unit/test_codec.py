"""rlstream.core.messages + rlstream.core.codec: round trips, wire layout, and every rejection."""
from __future__ import annotations

import math
import re
import struct
from array import array

import msgpack
import pytest

from rlstream.core.codec import DecodeError, decode, encode
from rlstream.core.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    DatasetExhausted,
    DeadLetter,
    Evaluated,
    GroupAdmitted,
    GroupJob,
    GroupRejected,
    GroupSampled,
    OptimStepped,
    RolloutRecord,
    RunFinished,
    RunStarted,
    SamplerSaved,
    StateLoaded,
    StateSaved,
    StepCommitted,
    WeightsPublished,
    group_id_for,
    sample_id_for,
)

RQ_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")  # rq.job.JOB_ID_PATTERN


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def big_sample(n: int = 1024) -> RolloutRecord:
    prompt = 24
    return RolloutRecord(
        tokens=[(i * 7919) % 50_000 for i in range(n)],
        logprobs=[0.0] * prompt + [-0.1 - i / 1000 for i in range(n - prompt)],
        loss_mask=[0] * prompt + [1] * (n - prompt),
        reward=0.75, finish_reason="length", text="héllo wörld", metrics={"len": float(n)},
        sample_id=sample_id_for(group_id_for(1, 2, 0), 3), group_id=group_id_for(1, 2, 0), group_size=8,
        row_index=2, epoch=1, submit_version=4, min_version=4, max_version=5, worker_id="host-1",
    )


def small_sample(**over) -> RolloutRecord:
    fields = dict(tokens=[3, 4, 5], logprobs=[0.0, -0.5, -1.5], loss_mask=[0, 1, 1], reward=1.0,
                  sample_id="e0-r0-a0-m0", group_id="e0-r0-a0", group_size=2)
    fields.update(over)
    return RolloutRecord(**fields)


EXAMPLES = {
    "rollout_sample": big_sample(),
    "group_job": GroupJob(run_id="r1", group_id="e0-r5-a1", row_index=5, epoch=0, attempt=1,
                          submit_version=3, group_size=4,
                          row={"prompt": "1+2=", "answer": "3", "nested": {"k": [1, 2]}}),
    "group_sampled": GroupSampled(group_id="e0-r5-a1", samples=4, worker_id="host-7", version=3),
    "dead_letter": DeadLetter(source_stream="rl:r1:rollouts", source_id="1-0", reason="bad",
                              raw=b"\x00\xff\xc1 bytes"),
    "run_started": RunStarted(run_id="r1", config={"seed": 0, "redis": {"url": None}}),
    "group_admitted": GroupAdmitted(group_id="e0-r5-a0", row_index=5, epoch=0, attempt=0,
                                    submit_version=2, group_size=8),
    "group_rejected": GroupRejected(group_id="e0-r5-a0", reason="rollout job failed", by="producer"),
    "step_committed": StepCommitted(step=3, version=3, entry_ids=["1-0", "1-1"],
                                    sample_ids=["a-m0", "a-m1"], group_ids=["a"],
                                    metrics={"train/loss": 0.25}),
    "weights_published": WeightsPublished(version=7, uri="file:///w/7", sha256="ab" * 32, bytes=123),
    "dataset_exhausted": DatasetExhausted(groups=42),
    "evaluated": Evaluated(step=4, version=4, metrics={"eval/accuracy": 0.5}),
    "run_finished": RunFinished(reason="max_steps", step=10, version=10, failed=True),
}
# the SDK's events (docs/design.md §15.66 The SDK's events: steps, snapshots and states in the run's log)
EXAMPLES.update({
    "optim_stepped": OptimStepped(step=2, metrics={"train/loss": 0.5, "train/datums": 8}),
    "sampler_saved": SamplerSaved(name="step-00002", step=2, version=1, sha256="cd" * 32, bytes=456),
    "state_saved": StateSaved(name="step-00002", step=2, sha256="ef" * 32, bytes=789),
    "state_loaded": StateLoaded(name="step-00002", step=2, with_optimizer=False),
})


def test_examples_cover_every_message_type():
    assert set(EXAMPLES) == set(MESSAGE_TYPES)
    for kind, msg in EXAMPLES.items():
        assert type(msg) is MESSAGE_TYPES[kind]


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip(kind):
    msg = EXAMPLES[kind]
    raw = encode(msg)
    assert isinstance(raw, bytes)
    back = decode(raw)
    assert type(back) is type(msg)
    assert back == msg
    assert back.model_dump() == msg.model_dump()
    assert decode(raw, expect=type(msg)) == msg
    assert encode(back) == raw  # deterministic


def test_rollout_sample_1024_tokens_round_trip_and_float32_logprobs():
    s = big_sample(1024)
    back = decode(encode(s), expect=RolloutRecord)
    assert len(back.tokens) == 1024
    assert back.tokens.tolist() == [(i * 7919) % 50_000 for i in range(1024)]
    assert back.loss_mask.tolist() == s.loss_mask.tolist()
    expected = [0.0] * 24 + [f32(-0.1 - i / 1000) for i in range(1000)]
    assert back.logprobs.tolist() == expected  # exactly float32-rounded, no further loss
    assert back.logprobs[24] != -0.1 and back.logprobs[24] == pytest.approx(-0.1, abs=1e-7)
    assert back.reward == 0.75 and back.text == "héllo wörld" and back.metrics == {"len": 1024.0}
    assert (back.tokens.typecode, back.logprobs.typecode, back.loss_mask.typecode) == ("i", "f", "B")


def test_packed_arrays_are_bytes_inside_the_msgpack_map():
    s = big_sample(1024)
    raw = encode(s)
    data = msgpack.unpackb(raw, raw=False)
    assert isinstance(data, dict)
    assert data["kind"] == "rollout_sample" and data["schema_version"] == SCHEMA_VERSION
    assert isinstance(data["tokens"], bytes) and len(data["tokens"]) == 4 * 1024
    assert isinstance(data["logprobs"], bytes) and len(data["logprobs"]) == 4 * 1024
    assert isinstance(data["loss_mask"], bytes) and len(data["loss_mask"]) == 1024
    # little-endian int32 / float32 / uint8
    assert struct.unpack("<1024i", data["tokens"]) == tuple(s.tokens)
    assert struct.unpack("<f", data["logprobs"][4 * 30:4 * 31])[0] == s.logprobs[30]
    assert data["loss_mask"] == bytes(s.loss_mask)
    assert isinstance(data["reward"], float) and isinstance(data["metrics"], dict)
    # packed, not a msgpack list: ~9 bytes per token plus a small envelope
    assert len(raw) < 9 * 1024 + 512


def test_non_packed_messages_have_no_bytes_except_declared_ones():
    data = msgpack.unpackb(encode(EXAMPLES["step_committed"]), raw=False)
    assert data["entry_ids"] == ["1-0", "1-1"]
    dl = msgpack.unpackb(encode(EXAMPLES["dead_letter"]), raw=False)
    assert dl["raw"] == b"\x00\xff\xc1 bytes"


# --------------------------------------------------------------------------- rejections


def sample_map(**over) -> dict:
    data = msgpack.unpackb(encode(small_sample()), raw=False)
    data.update(over)
    return data


def packed(data: dict) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def i32(*v):
    return struct.pack(f"<{len(v)}i", *v)


def fl(*v):
    return struct.pack(f"<{len(v)}f", *v)


REJECTS = {
    "garbage": (b"\xc1\xc1\xc1", "not msgpack"),
    "garbage_text": (b"hello world", "not msgpack"),
    "empty": (b"", "not msgpack"),
    "truncated": (encode(big_sample(64))[:-17], "not msgpack"),
    "non_str_key": (msgpack.packb({1: 2}), "not msgpack"),
    "list_envelope": (msgpack.packb([1, 2, 3]), "envelope must be a map, got list"),
    "int_envelope": (msgpack.packb(7), "envelope must be a map, got int"),
    "unknown_kind": (packed(sample_map(kind="rollout_sampel")), "unknown message kind 'rollout_sampel'"),
    "missing_kind": (packed({k: v for k, v in sample_map().items() if k != "kind"}), "unknown message kind None"),
    "kind_not_str": (packed(sample_map(kind=3)), "unknown message kind 3"),
    "schema_version": (packed(sample_map(schema_version=2)), "schema_version 2 not supported"),
    "schema_missing": (packed({k: v for k, v in sample_map().items() if k != "schema_version"}),
                       "schema_version None not supported"),
    "unequal_lengths": (packed(sample_map(logprobs=fl(0.0, -1.0))), "equal lengths, got 3, 2, 3"),
    "one_token": (packed(sample_map(tokens=i32(1), logprobs=fl(0.0), loss_mask=b"\x01")), "at least 2 tokens"),
    "zero_tokens": (packed(sample_map(tokens=b"", logprobs=b"", loss_mask=b"")), "at least 2 tokens"),
    "no_mask_bit": (packed(sample_map(loss_mask=b"\x00\x00\x00")), "loss_mask has no 1"),
    "mask_value_2": (packed(sample_map(loss_mask=b"\x00\x02\x01")), "loss_mask values must be 0 or 1"),
    "nan_reward": (packed(sample_map(reward=math.nan)), "reward must be finite"),
    "inf_reward": (packed(sample_map(reward=math.inf)), "reward must be finite"),
    "neg_inf_reward": (packed(sample_map(reward=-math.inf)), "reward must be finite"),
    "nan_logprob": (packed(sample_map(logprobs=fl(0.0, math.nan, -1.0))), "logprobs must all be finite"),
    "inf_logprob": (packed(sample_map(logprobs=fl(0.0, -math.inf, -1.0))), "logprobs must all be finite"),
    "pos_inf_logprob": (packed(sample_map(logprobs=fl(0.0, math.inf, -1.0))), "logprobs must all be finite"),
    "negative_token": (packed(sample_map(tokens=i32(3, -1, 5))), "token ids must be >= 0"),
    # uint32 2**31 on the wire is int32 -2**31: a token id >= 2**31 cannot pass
    "token_2_31": (packed(sample_map(tokens=i32(3, 4, 5)[:4] + b"\x00\x00\x00\x80" + i32(5))),
                   "token ids must be >= 0"),
    "tokens_bad_length": (packed(sample_map(tokens=i32(3, 4, 5)[:-1])), "'tokens' has 11 bytes"),
    "logprobs_bad_length": (packed(sample_map(logprobs=fl(0.0, -1.0, -2.0) + b"\x00")),
                            "'logprobs' has 13 bytes"),
    "tokens_as_list": (packed(sample_map(tokens=[3, 4, 5])), "'tokens' must be packed bytes, got list"),
    "extra_field": (packed(sample_map(surprise=1)), "surprise: Extra inputs are not permitted"),
    "missing_reward": (packed({k: v for k, v in sample_map().items() if k != "reward"}), "reward: Field required"),
    "reward_str": (packed(sample_map(reward="high")), "reward"),
    "reward_numeric_str": (packed(sample_map(reward="1.0")), "reward: Value error, expected a number"),
    "reward_bool": (packed(sample_map(reward=True)), "reward: Value error, expected a number"),
    "group_size_bool": (packed(sample_map(group_size=True)), "group_size: Value error, expected a number"),
    "versions": (packed(sample_map(min_version=3, max_version=2)), "max_version < min_version"),
    "negative_group_size": (packed(sample_map(group_size=-1)), "group_size"),
    "event_missing_field": (packed({"kind": "weights_published", "schema_version": SCHEMA_VERSION,
                                    "version": 1, "uri": "x", "sha256": "y"}), "bytes: Field required"),
    "event_bad_range": (packed({"kind": "step_committed", "schema_version": SCHEMA_VERSION, "step": 0,
                                "version": 1, "entry_ids": [], "sample_ids": [], "group_ids": []}),
                        "step: Input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("case", sorted(REJECTS))
def test_decode_rejects(case):
    raw, needle = REJECTS[case]
    with pytest.raises(DecodeError) as info:
        decode(raw)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg  # one line, fit for the dead-letter stream
    assert isinstance(info.value, ValueError)


def test_valid_mutation_baseline_decodes():
    """The helpers above produce a valid sample when nothing is broken."""
    assert decode(packed(sample_map())) == small_sample()


def test_expect_mismatch():
    raw = encode(EXAMPLES["group_rejected"])
    with pytest.raises(DecodeError, match="expected rollout_sample, got group_rejected"):
        decode(raw, expect=RolloutRecord)
    with pytest.raises(DecodeError, match="expected group_admitted, got rollout_sample"):
        decode(encode(small_sample()), expect=GroupAdmitted)


def test_check_vocab():
    s = small_sample(tokens=[0, 4, 7])
    s.check_vocab(8)  # max id 7 < 8
    with pytest.raises(ValueError, match=r"token id 7 outside the vocabulary \(size 7\)"):
        s.check_vocab(7)
    with pytest.raises(ValueError, match="token id 7 outside"):
        s.check_vocab(1)


# --------------------------------------------------------------------------- a record built from fields
# (what to_record does with a user's RolloutSample: tests/unit/test_rollout_sample.py)


def record(**over):
    fields = dict(tokens=[1, 2, 3, 4], logprobs=[0.0, 0.0, -0.3, -0.2], loss_mask=[0, 0, 1, 1], reward=1.0)
    fields.update(over)
    return RolloutRecord(**fields)


def test_record_construction_defaults():
    s = record()
    assert s.finish_reason == "stop" and s.text == "" and s.metrics == {}
    assert s.sample_id == "" and s.group_id == "" and s.group_size == 0
    assert s.tokens.tolist() == [1, 2, 3, 4]
    assert s.logprobs.tolist() == [0.0, 0.0, f32(-0.3), f32(-0.2)]
    # the worker stamps provenance with model_copy; the result still round-trips
    stamped = s.model_copy(update={"sample_id": "e0-r0-a0-m0", "group_id": "e0-r0-a0", "group_size": 2})
    assert decode(encode(stamped)) == stamped
    # frozen
    with pytest.raises(Exception):
        s.reward = 0.0  # type: ignore[misc]


USER_REJECTS = {
    "unequal_lengths": (dict(logprobs=[0.0, -1.0]), "equal lengths"),
    "unequal_mask": (dict(loss_mask=[0, 1]), "equal lengths"),
    "one_token": (dict(tokens=[1], logprobs=[0.0], loss_mask=[1]), "at least 2 tokens"),
    "no_mask_bit": (dict(loss_mask=[0, 0, 0, 0]), "loss_mask has no 1"),
    "mask_2": (dict(loss_mask=[0, 0, 2, 1]), "0 or 1"),
    "mask_256": (dict(loss_mask=[0, 0, 256, 1]), "0/1 mask values"),
    "mask_negative": (dict(loss_mask=[0, 0, -1, 1]), "0/1 mask values"),
    "nan_reward": (dict(reward=math.nan), "reward must be finite"),
    "inf_reward": (dict(reward=math.inf), "reward must be finite"),
    "nan_logprob": (dict(logprobs=[0.0, 0.0, math.nan, -1.0]), "logprobs must all be finite"),
    "inf_logprob": (dict(logprobs=[0.0, 0.0, -math.inf, -1.0]), "logprobs must all be finite"),
    "huge_logprob": (dict(logprobs=[0.0, 0.0, -1e39, -1.0]), "logprobs must all be finite"),  # float32 overflow
    "negative_token": (dict(tokens=[1, -2, 3, 4]), "token ids must be >= 0"),
    "token_2_31": (dict(tokens=[1, 2**31, 3, 4]), "int32 token ids"),
    "float_token": (dict(tokens=[1, 2.5, 3, 4]), "int32 token ids"),
    "tokens_str": (dict(tokens="abcd"), "expected a list of numbers"),
    "tokens_bytes": (dict(tokens=b"abcd"), "expected a list of numbers"),
    "logprob_str": (dict(logprobs=[0.0, 0.0, "x", -1.0]), "float logprobs"),
    "extra_field": (dict(advantage=1.0), "Extra inputs are not permitted"),
    "versions": (dict(min_version=2, max_version=1), "max_version < min_version"),
}


@pytest.mark.parametrize("case", sorted(USER_REJECTS))
def test_record_construction_rejects(case):
    over, needle = USER_REJECTS[case]
    with pytest.raises(ValueError) as info:
        record(**over)
    assert needle in str(info.value)


def test_token_ids_up_to_int32_max_are_fine():
    s = record(tokens=[0, 2**31 - 1, 3, 4])
    assert decode(encode(s)).tokens[1] == 2**31 - 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.check_vocab(2**31 - 1)


def test_arrays_are_accepted_as_is():
    toks = array("i", [1, 2, 3])
    s = RolloutRecord(tokens=toks, logprobs=array("f", [0, -1, -1]), loss_mask=array("B", [0, 1, 1]), reward=0.0)
    assert s.tokens is toks


# --------------------------------------------------------------------------- ids


def test_ids_match_rq_job_id_pattern_and_are_unique():
    seen = set()
    for epoch in (0, 1, 11, 123):
        for row in (0, 1, 11, 99_999):
            for attempt in (0, 1, 2, 11):
                gid = group_id_for(epoch, row, attempt)
                assert RQ_JOB_ID.fullmatch(gid), gid
                assert gid == group_id_for(epoch, row, attempt)  # deterministic
                assert gid not in seen
                seen.add(gid)
                for member in (0, 1, 15):
                    sid = sample_id_for(gid, member)
                    assert RQ_JOB_ID.fullmatch(sid), sid
                    assert sid.startswith(gid) and sid != gid
                    assert sid == sample_id_for(gid, member)
    assert sample_id_for(group_id_for(0, 1, 0), 1) != sample_id_for(group_id_for(0, 1, 0), 11)


def test_ids_agree_with_rq_validation():
    from rq.job import validate_job_id

    validate_job_id("run-1-" + sample_id_for(group_id_for(3, 14, 1), 7))
