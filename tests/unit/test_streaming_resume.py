"""Streamed steps, a checkpoint, then a restart that replays the streamed steps whole-batch: the same weights."""
from __future__ import annotations

import logging
from functools import partial

import factories
import pytest
import torch

from rlstream.core import bus, keys
from rlstream.core.messages import GroupAdmitted, StepCommitted, group_id_for
from rlstream.trainer.trainer import Trainer

RUN = "sr"
pytestmark = pytest.mark.usefixtures("r_group")
config = partial(factories.config, run_id=RUN, max_steps=3, max_head_offpolicy_versions=2, save_final_checkpoint=False,
                 prompt_groups_per_step=2, trainer={"micro_batch_tokens": 7, "streaming": True}, kl_beta=0.05)


def add_group(r, row: int) -> None:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                group_size=2))
    for m in range(2):  # rows of different lengths and prompts
        toks = (1, 2 + m, 3, 4 + row % 3)[: 3 + (row + m) % 2]
        bus.xadd(r, keys.rollouts(RUN), factories.sample(row, m, tokens=toks, prompt=1 + (row % 2)))


@pytest.mark.parametrize("checkpoint", [0, 2])
def test_streamed_steps_replayed_after_a_restart_reproduce_the_weights(r, tmp_path, caplog, checkpoint):
    for row in range(6):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=checkpoint)
    first = Trainer(cfg, r, cfg.run_dir())
    assert first.run() == 3
    recorded = [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)]
    assert all(m.metrics["perf/streamed_share"] > 0 for m in recorded)

    again = Trainer(config(tmp_path, dcp_save_interval=checkpoint, max_steps=10), r, cfg.run_dir())
    with caplog.at_level(logging.WARNING):
        again.resume()
    assert (again.step, again.version) == (3, 3)
    assert "replay of step" not in caplog.text
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
