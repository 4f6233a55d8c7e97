"""rlstream: asynchronous GRPO-family RL for language models on Redis streams.

Public API (light: no torch import here)::

    from rlstream import Config, TrainerConfig, main, RolloutSample, RolloutSetup, chat_prompt_ids

and the Fireworks cookbook's other names: DeployConfig, WandBConfig, WeightSyncConfig, InfraConfig,
build_deployment_sampler, the learning-rate schedules (ConstantSchedule, LinearSchedule,
CosineSchedule, WSDSchedule, default_constant_schedule), GradAccNormalization, WeightSyncScope.
"""
from rlstream.api import RunResult, main
from rlstream.core.config import Config, TrainerConfig, WandbConfig
from rlstream.core.cookbook_config import (
    ConstantSchedule,
    CosineSchedule,
    DeployConfig,
    GradAccNormalization,
    InfraConfig,
    LinearSchedule,
    WeightSyncConfig,
    WeightSyncScope,
    WSDSchedule,
    default_constant_schedule,
)
from rlstream.core.rollout import Completion, RolloutSample, RolloutSetup, build_deployment_sampler, chat_prompt_ids

__all__ = ["Config", "Completion", "RolloutSample", "RolloutSetup", "RunResult", "TrainerConfig", "chat_prompt_ids",
           "main"]
__all__ += ["DeployConfig", "InfraConfig", "WandBConfig", "WandbConfig", "WeightSyncConfig", "build_deployment_sampler"]
__all__ += ["ConstantSchedule", "CosineSchedule", "GradAccNormalization", "LinearSchedule", "WSDSchedule",
            "WeightSyncScope", "default_constant_schedule"]
WandBConfig = WandbConfig  # the cookbook's spelling of rlstream's [wandb] table: one class
__version__ = "0.1.0"
