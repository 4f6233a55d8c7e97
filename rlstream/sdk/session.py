"""What every SDK client of one service shares: the run's config and directory, its Redis client,
the trainer lease the service holds, the ledger (the SDK's fold of the events) and the device;
and the one way the SDK writes to the log, ``record`` (a fenced XADD: only while the lease is
this service's, so a second trainer of the run can never fork its history).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import redis

from rlstream.core import keys
from rlstream.core.config import Config
from rlstream.core.messages import Message
from rlstream.sdk.ledger import Ledger
from rlstream.trainer.lease import TrainerLease, fenced_write

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: Config
    run_dir: Path
    r: redis.Redis
    lease: TrainerLease
    ledger: Ledger
    device: Any  # torch.device
    # the service's "sync my deployment to this snapshot identity" (WeightSyncer.save_and_hotload)
    hotload: Callable[[str], None] | None = None

    @property
    def run_id(self) -> str:
        return self.cfg.run_id

    def record(self, msg: Message) -> str:
        """Append ``msg`` to the run's events (fenced by the lease) and fold it; its entry id."""
        entry_id = fenced_write(self.r, self.lease, add=(keys.events(self.run_id), msg))
        self.ledger.follow(self.r, self.run_id)
        return entry_id

    def base_path(self) -> Path:
        """The base model's HF directory (a built-in model is built into the run directory)."""
        from rlstream.trainer.policy_model import base_model_path

        return base_model_path(self.cfg, self.run_dir)
