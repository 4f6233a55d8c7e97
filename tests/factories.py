"""Test factories, one place for what many tests build: a ``RolloutRecord`` of a group as a
worker stamps it (``sample``), a ``RolloutSample`` as a user's rollout returns it
(``user_sample``), a trainer ``Config`` for the tiny model (``config``) or any ``Config`` with
the defaults the tests were written against (``legacy_config``), and the ``rlstream`` command
line run as a subprocess (``rlstream``). Each takes keyword overrides of its defaults; a module
that always overrides the same ones binds them once (``functools.partial``). Importable as
``factories`` from every test folder, like ``polling``. The fixtures built on them are in
tests/conftest.py (``builtin_run`` in tests/e2e/conftest.py) and tests/unit/conftest.py
(``r_group``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from rlstream.core.config import Config
from rlstream.core.messages import RolloutRecord, group_id_for, sample_id_for
from rlstream.core.rollout import RolloutSample


def sample(row: int = 0, member: int = 0, *, tokens: Sequence[int] | None = None, prompt: int = 1,
           logprob: float = -1.0, reward: float | None = None, group_size: int = 2, **over) -> RolloutRecord:
    """Member ``member`` of row ``row``'s group (epoch 0, attempt 0), stamped as a worker
    stamps it: ``tokens`` (default ``1, 2 + member, 3``: the members differ) whose first
    ``prompt`` are the prompt (mask 0, logprob 0.0) and the rest generated (mask 1,
    ``logprob``); the reward is the member's index unless given (two members: a nonzero
    advantage). ``over`` sets any other field (``group_id``: the member's ``sample_id`` follows
    it)."""
    gid = over.pop("group_id", group_id_for(0, row, 0))
    tokens = (1, 2 + member, 3) if tokens is None else tokens
    n = len(tokens)
    fields = dict(tokens=list(tokens), logprobs=[0.0] * prompt + [logprob] * (n - prompt),
                  loss_mask=[0] * prompt + [1] * (n - prompt), reward=float(member) if reward is None else reward,
                  sample_id=sample_id_for(gid, member), group_id=gid, group_size=group_size, row_index=row)
    fields.update(over)
    return RolloutRecord(**fields)


def user_sample(tokens: Sequence[int] = (1, 2), reward: float = 1.0, **over) -> RolloutSample:
    """A sample as a user's rollout function returns it, unstamped: one prompt token, the rest
    generated (logprob -0.5)."""
    n = len(tokens)
    fields = dict(tokens=list(tokens), logprobs=[0.0] + [-0.5] * (n - 1), loss_mask=[0] + [1] * (n - 1), reward=reward)
    fields.update(over)
    return RolloutSample(**fields)


# rlstream's own defaults, before 0.2.0 took the cookbook recipe's for these fields (issue 22): the
# values the tests were written against, given explicitly wherever a test's meaning depends on them.
LEGACY_DEFAULTS = dict(learning_rate=1e-3, completions_per_prompt=8, prompt_groups_per_step=32,
                       max_completion_tokens=16, kl_beta=0.0, max_rows=10_000)


def legacy_config(**over) -> Config:
    """``Config(**over)`` with ``LEGACY_DEFAULTS`` for the fields ``over`` leaves out."""
    return Config(**{**LEGACY_DEFAULTS, **over})


def config(tmp_path: Path | None = None, **over) -> Config:
    """A trainer config for the built-in tiny model: one group of two per step, no periodic
    checkpoint, a constant learning rate large enough to move the weights in one step, and
    ``LEGACY_DEFAULTS`` otherwise (no reference model, 16-token completions); logs under
    ``tmp_path`` when given."""
    fields = dict(LEGACY_DEFAULTS, run_id="t", prompt_groups_per_step=1, completions_per_prompt=2, dcp_save_interval=0,
                  lr_schedule="constant", learning_rate=1e-2)
    if tmp_path is not None:
        fields["log_path"] = str(tmp_path)
    fields.update(over)
    return Config(**fields)


def rlstream(*args: str, cwd: Path | None = None, timeout: float = 240, env: dict[str, str] | None = None,
             unset: tuple[str, ...] = (), check: bool = False) -> subprocess.CompletedProcess:
    """``rlstream ARGS`` in ``cwd`` with this interpreter, output captured; ``env`` is added to
    this process's environment, and the variables ``unset`` names are removed from it.
    ``check``: assert it exited 0, showing its output's tail."""
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run([sys.executable, "-m", "rlstream.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc
