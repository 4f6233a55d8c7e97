"""rlstream: asynchronous GRPO-family RL for language models on Redis streams.

Public API (light: no torch import here)::

    from rlstream import Config, main, RolloutSample, RolloutSetup, chat_prompt_ids
"""
from rlstream.api import RunResult, main
from rlstream.core.config import Config
from rlstream.core.messages import RolloutSample
from rlstream.core.rollout import Completion, RolloutSetup, chat_prompt_ids

__all__ = ["Config", "Completion", "RolloutSample", "RolloutSetup", "RunResult", "chat_prompt_ids", "main"]
__version__ = "0.1.0"
