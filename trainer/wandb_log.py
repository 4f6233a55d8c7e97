"""Optional Weights & Biases logging (``[wandb] project = ...``). wandb is not a
dependency: setting a project without it installed is a clear error at trainer start."""
from __future__ import annotations

from typing import Any

from rlstream.core.config import Config
from rlstream.core.errors import ConfigError


class WandbLogger:
    def __init__(self, cfg: Config):
        try:
            import wandb
        except ImportError:
            raise ConfigError("config error: wandb.project is set but wandb is not installed: "
                              "`pip install wandb`, or remove the [wandb] table") from None
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or cfg.run_id,
                              mode=cfg.wandb.mode, config=cfg.model_dump(mode="json"), id=cfg.run_id, resume="allow")

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: Config) -> WandbLogger | None:
    return WandbLogger(cfg) if cfg.wandb.project else None
