"""rlstream: asynchronous GRPO-family RL for language models on Redis streams.

Public API (light: no torch import here)::

    from rlstream import Config, main, RolloutSample, RolloutSetup
"""
from rlstream.api import RunResult, main
from rlstream.config import Config
from rlstream.messages import RolloutSample
from rlstream.rollout import Completion, RolloutSetup

__all__ = ["Config", "Completion", "RolloutSample", "RolloutSetup", "RunResult", "main"]
__version__ = "0.1.0"
