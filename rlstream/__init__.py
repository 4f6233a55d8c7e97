"""rlstream: asynchronous GRPO-family RL for language models on Redis streams.

Public API (light: no torch import here)::

    from rlstream import Config, RolloutSample, RolloutSetup
"""
from rlstream.config import Config
from rlstream.messages import RolloutSample
from rlstream.rollout import Completion, RolloutSetup

__all__ = ["Config", "Completion", "RolloutSample", "RolloutSetup"]
__version__ = "0.1.0"
