"""The trainer's ranks without a process group (trainer/ranks.py; docs/design.md §15.81 Exact
steps across trainer ranks): the shares of a batch's rows, deterministic and balanced by Σ L²;
the micro-batch counts evened out; one process is the identity, with no collective at all."""
from __future__ import annotations

import pytest
import torch

from rlstream.trainer.ranks import SINGLE, Ranks, assign, backend_for, even_out, init_ranks, shard, shares_of


def test_shares_cover_every_row_once_and_balance_the_squared_lengths():
    lengths = torch.tensor([30, 5, 9, 9, 2, 17, 3, 8])
    shares = shares_of(lengths, 2)
    assert sorted(torch.cat(shares).tolist()) == list(range(8))
    assert [s.tolist() for s in shares] == [[0], [1, 2, 3, 4, 5, 6, 7]]  # 900 against 81+81+289+64+25+9+4 = 553
    assert all(s.tolist() == sorted(s.tolist()) for s in shares)  # row order within a share
    even = torch.tensor([10, 10, 10, 10, 7, 7, 3, 3])
    loads = [int((even[s] ** 2).sum()) for s in shares_of(even, 2)]
    assert loads[0] == loads[1]


def test_shares_are_a_function_of_the_lengths_alone():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 50, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        for world in (1, 2, 3, 8):
            a, b = shares_of(lengths, world), shares_of(lengths.clone(), world)
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
            assert sorted(torch.cat(a).tolist()) == list(range(len(lengths)))
            if len(lengths) >= world:  # every rank has a row when there are enough rows
                assert all(len(s) for s in a)


def test_fewer_rows_than_ranks_leaves_ranks_empty():
    shares = shares_of(torch.tensor([4, 6]), 3)
    assert [s.tolist() for s in shares] == [[1], [0], []]


def test_assign_continues_from_the_loads_so_far():
    shares, loads = assign(torch.tensor([3, 3]), [100, 0])
    assert [s.tolist() for s in shares] == [[], [0, 1]] and loads == [100, 18]
    shares, loads = assign(torch.tensor([4]), loads)
    assert [s.tolist() for s in shares] == [[], [0]] and loads == [100, 34]


def test_even_out_splits_the_fullest_micro_batch_then_pads_with_placeholders():
    lengths = torch.tensor([8, 8, 4, 4, 4, 2])
    micro = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5])]
    three = even_out(micro, lengths, 3)
    assert [m.tolist() for m in three] == [[0, 1], [2, 3, 4], [5]]
    four = even_out(micro, lengths, 4)
    assert [m.tolist() for m in four] == [[0], [1], [2, 3, 4], [5]]  # 16 padded tokens split before 12
    seven = even_out(micro, lengths, 7)
    assert [m.tolist() for m in seven] == [[0], [1], [2], [3], [4], [5], []]  # one placeholder: 6 rows, 7 forwards
    assert [m.tolist() for m in even_out([], lengths, 2)] == [[], []]


def test_one_process_is_the_identity_without_a_process_group():
    assert not torch.distributed.is_initialized()
    rows = torch.tensor([3, 1, 2])
    assert SINGLE.share(torch.tensor([5, 6, 7, 8]), rows) is rows
    assert SINGLE.all_sum([1.5, 2]) == [1.5, 2] and SINGLE.all_max([3]) == [3] and SINGLE.all_min(4) == 4
    assert SINGLE.all_agree(False) is False and SINGLE.all_agree(True) is True
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    assert SINGLE.denominator(mask, "token_mean") == 4.0 and SINGLE.denominator(mask, "sequence_mean") == 2.0
    model = torch.nn.Linear(2, 2)
    assert shard(model, SINGLE) is model
    SINGLE.sync_gradients(model, False)  # a no-op: a plain module has no such method


@pytest.mark.parametrize("world", [None, "1"])
def test_outside_torchrun_the_trainer_is_one_process(monkeypatch, world):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    assert init_ranks(torch.device("cpu")) == Ranks()
    assert not torch.distributed.is_initialized()


def test_the_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
