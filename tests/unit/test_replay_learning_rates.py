"""`rlstream replay` with the source's own config takes the learning rates the source recorded, also after
the source ended early (data exhausted) and its schedule never reached its max_steps."""
from __future__ import annotations

from functools import partial

import factories
import pytest

from rlstream.core import bus, keys
from rlstream.core.messages import DatasetExhausted, GroupAdmitted, StepCommitted, group_id_for
from rlstream.core.metrics import read_metrics
from rlstream.trainer.replay_run import replay_run
from rlstream.trainer.trainer import Trainer

RUN = "src"
pytestmark = pytest.mark.usefixtures("r_group")
config = partial(factories.config, max_steps=4, lr_schedule="linear", max_head_offpolicy_versions=3,
                 save_final_checkpoint=False)


def test_replay_with_the_sources_config_uses_the_sources_learning_rates(r, tmp_path):
    for row in range(3):  # data for 3 of the 4 steps
        gid = group_id_for(0, row, 0)
        bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0,
                                                    submit_version=0, group_size=2))
        for m in range(2):
            bus.xadd(r, keys.rollouts(RUN), factories.sample(row, m))
    bus.xadd(r, keys.events(RUN), DatasetExhausted(groups=3))
    src = config(tmp_path, run_id=RUN, prompt_groups_per_step=1, completions_per_prompt=2)
    assert Trainer(src, r, src.run_dir()).run() == 3
    recorded = [m.metrics for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)]

    same = src.model_copy(update={"run_id": "same"})  # the source's own config
    assert replay_run(same, r, RUN, src.run_dir(), src) == 3
    replayed = read_metrics(same.run_dir() / "metrics.jsonl")
    assert [m["train/lr"] for m in replayed] == [m["train/lr"] for m in recorded]
    assert [m["train/loss"] for m in replayed] == pytest.approx([m["train/loss"] for m in recorded], rel=1e-5)
