"""A rollout factory whose module ends a worker process as it is imported (``rlstream.cli
worker``): a worker that crashes at once after every start. Other processes (``up``'s
preflight, the trainer) import it unharmed. Named by ``--set
rollout_fn_factory="crash_at_start:factory"``."""
from __future__ import annotations

import os
import sys

from rlstream.builtin.rewards import resolve_reward
from rlstream.builtin.rollout import single_turn_factory

if sys.argv[1:2] == ["worker"]:
    os._exit(3)

factory = single_turn_factory(resolve_reward("exact_match"))
