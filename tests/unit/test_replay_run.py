"""``rlstream replay``'s refusals, before any model is built."""
from __future__ import annotations

import pytest
from factories import legacy_config

from rlstream.core.errors import ConfigError
from rlstream.trainer.replay_run import replay_run


def test_replay_needs_a_new_run_id_and_a_source_with_steps(tmp_path, r):
    with pytest.raises(ConfigError, match="needs a new run id"):
        replay_run(legacy_config(run_id="src", log_path=str(tmp_path)), r, "src")
    with pytest.raises(ConfigError, match="run src has no committed step to replay"):
        replay_run(legacy_config(run_id="new", log_path=str(tmp_path)), r, "src")
    assert list(tmp_path.iterdir()) == []  # nothing was written
