"""rlstream: asynchronous GRPO-family RL for language models on Redis streams.

Public API (light: no torch import here)::

    from rlstream import Config, TrainerConfig, main, RolloutSample, RolloutSetup, chat_prompt_ids
"""
from rlstream.api import RunResult, main
from rlstream.core.config import Config
from rlstream.core.config_sections import TrainerConfig
from rlstream.core.messages import RolloutSample
from rlstream.core.rollout import Completion, RolloutSetup, chat_prompt_ids

__all__ = ["Config", "Completion", "RolloutSample", "RolloutSetup", "RunResult", "TrainerConfig", "chat_prompt_ids",
           "main"]
__version__ = "0.1.0"
