"""The user's RolloutSample (the cookbook's plain dataclass) and its conversion to the wire's
RolloutRecord: dataclass behaviour, the cookbook's optional fields, the checks at conversion
with what to fix, and the wire bytes unchanged (docs/design.md §15.88 RolloutSample is the
user's dataclass, the wire record is the codec's)."""
from __future__ import annotations

import dataclasses
import logging
import math

import pytest

import rlstream
from rlstream.core import rollout
from rlstream.core.codec import decode, encode
from rlstream.core.messages import RolloutRecord
from rlstream.core.rollout import InvalidSample, RolloutSample, to_record

# The fields of the cookbook's RolloutSample (fw-ai/cookbook training/utils/rl/rollout/types.py).
COOKBOOK_FIELDS = {"tokens", "logprobs", "loss_mask", "reward", "prompt_model_input", "routing_matrices",
                   "finish_reason", "text", "raw_logprobs"}


def user(**over) -> RolloutSample:
    fields = dict(tokens=[1, 2, 3, 4], logprobs=[0.0, 0.0, -0.5, -0.25], loss_mask=[0, 0, 1, 1], reward=1.0)
    fields.update(over)
    return RolloutSample(**fields)


def test_the_public_name_is_the_cookbooks_dataclass():
    assert rlstream.RolloutSample is RolloutSample and dataclasses.is_dataclass(RolloutSample)
    names = [f.name for f in dataclasses.fields(RolloutSample)]
    assert names[:6] == ["tokens", "logprobs", "loss_mask", "reward", "finish_reason", "text"]  # the seed's order
    assert COOKBOOK_FIELDS <= set(names)


def test_lists_in_lists_out_replace_asdict_assignment():
    s = user(routing_matrices=["r0", "r1", "r2"], raw_logprobs=[0.0, -0.1, -0.6, -0.3])
    assert s.tokens == [1, 2, 3, 4] and s.loss_mask == [0, 0, 1, 1] and s.logprobs[2] == -0.5
    assert dataclasses.replace(s, reward=0.0).reward == 0.0 and s.reward == 1.0
    d = dataclasses.asdict(s)
    assert d["tokens"] == [1, 2, 3, 4] and d["routing_matrices"] == ["r0", "r1", "r2"]
    assert RolloutSample(**d) == s
    s.reward = 0.25
    s.tokens.append(5), s.logprobs.append(-1.0), s.loss_mask.append(1)  # built up in place, as rollouts do
    s.raw_logprobs.append(-1.1)
    assert to_record(s).tokens.tolist() == [1, 2, 3, 4, 5] and to_record(s).reward == 0.25


def test_positional_like_the_seed():
    """RolloutSample(tokens, logprobs, loss_mask, reward, finish_reason, text) positionally."""
    s = RolloutSample([1, 2, 3], [0.0, -0.5, -0.25], [0, 1, 1], 1.0, "length", "ab")
    assert (s.finish_reason, s.text) == ("length", "ab")
    rec = to_record(s)
    assert rec.tokens.tolist() == [1, 2, 3] and (rec.reward, rec.finish_reason, rec.text) == (1.0, "length", "ab")


def test_the_record_holds_the_users_fields_and_nothing_stamped():
    s = user(finish_reason="length", text="hi", metrics={"acc": 1.0}, answer_tokens=[7, 8])
    rec = to_record(s)
    assert type(rec) is RolloutRecord and rec.sample_id == "" and rec.group_size == 0
    assert (rec.tokens.tolist(), rec.loss_mask.tolist(), rec.answer_tokens.tolist()) == ([1, 2, 3, 4], [0, 0, 1, 1],
                                                                                         [7, 8])
    assert rec.logprobs.tolist() == [0.0, 0.0, -0.5, -0.25] and rec.metrics == {"acc": 1.0}
    assert decode(encode(rec)) == rec


def test_unused_cookbook_fields_change_nothing_on_the_wire_and_are_noted_once(caplog, monkeypatch):
    monkeypatch.setattr(rollout, "_unused_noted", set())
    with caplog.at_level(logging.INFO, logger="rlstream.core.rollout"):
        for _ in range(3):
            extra = to_record(user(routing_matrices=["x"] * 3, raw_logprobs=[0.0, -0.1, -0.6, -0.3]))
    assert encode(extra) == encode(to_record(user()))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "RolloutSample.routing_matrices is accepted and not used",
        "RolloutSample.raw_logprobs is accepted and not used"]


# What the user must fix, said at conversion (the worker drops the draw with this text).
REJECTS = {
    "unequal_lengths": (dict(logprobs=[0.0, -1.0]), "tokens, logprobs and loss_mask must have equal lengths"),
    "unequal_mask": (dict(loss_mask=[0, 1]), "equal lengths, got 4, 4, 2"),
    "one_token": (dict(tokens=[1], logprobs=[0.0], loss_mask=[1]), "at least 2 tokens"),
    "no_mask_bit": (dict(loss_mask=[0, 0, 0, 0]), "loss_mask has no 1"),
    "mask_2": (dict(loss_mask=[0, 0, 2, 1]), "loss_mask values must be 0 or 1"),
    "nan_reward": (dict(reward=math.nan), "reward must be finite, got nan"),
    "text_reward": (dict(reward="1.0"), "reward: expected a number, got str"),
    "bool_reward": (dict(reward=True), "reward: expected a number, got bool"),
    "nan_logprob": (dict(logprobs=[0.0, 0.0, math.nan, -1.0]), "logprobs must all be finite"),
    "negative_token": (dict(tokens=[1, -2, 3, 4]), "token ids must be >= 0"),
    "float_token": (dict(tokens=[1, 2.5, 3, 4]), "tokens: expected int32 token ids"),
    "tokens_str": (dict(tokens="abcd"), "tokens: expected a list of numbers, got str"),
    "metric_str": (dict(metrics={"acc": "high"}), "metrics.acc"),
    # text that would parse as a number is refused too, as a reward given as text is
    "metric_numeric_str": (dict(metrics={"acc": "0.5"}), "metrics.acc: expected a number, got str '0.5'"),
    "metric_bytes": (dict(metrics={"acc": b"1"}), "metrics.acc: expected a number, got bytes"),
    "multimodal": (dict(prompt_model_input=object()), "prompt_model_input is set, but rlstream trains text-only"),
    "raw_logprobs_length": (dict(raw_logprobs=[0.0]), "raw_logprobs has 1 values for 4 tokens"),
    # a bad field beside raw_logprobs is named, not a TypeError from len() (the worker would retry the draw)
    "raw_logprobs_tokens_none": (dict(tokens=None, raw_logprobs=[0.0] * 4), "tokens: expected int32 token ids"),
    "raw_logprobs_unsized": (dict(raw_logprobs=(0.0 for _ in range(4))), "raw_logprobs must be a list of floats"),
    # the cookbook's own positional order puts prompt_model_input fifth
    "cookbook_positional": (dict(finish_reason=None, text="stop"), "finish_reason must be a str, got NoneType; "
                            "RolloutSample's 5th and 6th positional arguments are finish_reason and text"),
}


def test_a_bool_metric_is_a_number():
    assert to_record(user(metrics={"correct": True, "wrong": False})).metrics == {"correct": 1.0, "wrong": 0.0}


@pytest.mark.parametrize("case", sorted(REJECTS))
def test_conversion_says_what_to_fix(case):
    over, needle = REJECTS[case]
    s = user(**over)  # building it never raises: the checks run at conversion
    with pytest.raises(InvalidSample) as info:
        to_record(s)
    assert needle in str(info.value)


def test_model_copy_still_works_for_a_release():
    with pytest.warns(DeprecationWarning, match="dataclasses.replace"):
        copy = user().model_copy(update={"reward": 0.5})
    assert copy == user(reward=0.5)


# A stamped sample as the build before the dataclass (RolloutSample was the wire message) encoded
# it: old streams and archives must decode, and the same record must encode to the same bytes.
OLD_BYTES = bytes.fromhex(
    "de0015ae736368656d615f76657273696f6e01a46b696e64ae726f6c6c6f75745f73616d706c65a6746f6b656e73c410010000"
    "00050000000700000002000000a86c6f6770726f6273c41000000000000080be0000c0bf000000bea96c6f73735f6d61736bc4"
    "0400010101a6726577617264cb3fe0000000000000ad66696e6973685f726561736f6ea66c656e677468a474657874a26162a7"
    "6d65747269637381a3616363cb3ff0000000000000ad616e737765725f746f6b656e73c40407000000a973616d706c655f6964"
    "ab65302d72332d61302d6d31a867726f75705f6964a865302d72332d6130aa67726f75705f73697a6502a9726f775f696e6465"
    "7803a565706f636800ae7375626d69745f76657273696f6e04ab6d696e5f76657273696f6e04ab6d61785f76657273696f6e05"
    "a9776f726b65725f6964a27731aa737461727465645f6174cb3ff8000000000000ab66696e69736865645f6174cb4004000000"
    "000000")


def test_the_wire_bytes_are_unchanged():
    s = RolloutSample([1, 5, 7, 2], [0.0, -0.25, -1.5, -0.125], [0, 1, 1, 1], 0.5, "length", "ab",
                      metrics={"acc": 1.0}, answer_tokens=[7])
    rec = to_record(s).model_copy(update=dict(
        sample_id="e0-r3-a0-m1", group_id="e0-r3-a0", group_size=2, row_index=3, epoch=0, submit_version=4,
        min_version=4, max_version=5, worker_id="w1", started_at=1.5, finished_at=2.5))  # as the worker stamps it
    assert encode(rec) == OLD_BYTES
    old = decode(OLD_BYTES, expect=RolloutRecord)
    assert old == rec and old.kind == "rollout_sample"


def test_a_porters_own_rolloutsample_class_is_named_as_such():
    """A porter who kept the cookbook's class in their own module is told which one to import."""
    from rlstream.workers.checks import checked_record

    @dataclasses.dataclass
    class RolloutSample:  # the cookbook's, copied into the user's module
        tokens: list

    with pytest.raises(TypeError, match=r"got .*RolloutSample \(another class of that name: import RolloutSample "
                                        r"from rlstream\)"):
        checked_record(RolloutSample([1, 2]), None, 128)
