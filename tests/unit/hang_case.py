"""The 2-rank side of tests/unit/test_trainer_ranks_hang.py, run under torchrun (``python -m
torch.distributed.run --standalone --nproc-per-node 2 tests/unit/hang_case.py TIMEOUT_S``) with
``RLSTREAM_FAULT=hang_before_backward@1:2``: each rank runs the trainer's own step
(``Trainer.update``, which holds the failpoint) on a sharded built-in model, as ``rlstream
trainer`` runs it (SIGTERM unwinds, ``collectives_bounded``, an RlstreamError exits with its code).

Step 1 is a warm-up under a timeout no load reaches (start-up skew, the first collectives); then
the group's timeout becomes TIMEOUT_S, and in step 2 rank 1 sleeps for good after its forward:
rank 0's next collective must time out, log the reason and exit non-zero, and torchrun's agent
must end rank 1."""
from __future__ import annotations

import datetime
import logging
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # test_microbatch, test_streaming; factories

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from factories import legacy_config  # noqa: E402
from test_microbatch import mixed_batch  # noqa: E402
from test_streaming import groups_of  # noqa: E402

from rlstream.builtin.tiny_model import build_model  # noqa: E402
from rlstream.core.errors import RlstreamError  # noqa: E402
from rlstream.core.lifeline import raise_interrupt  # noqa: E402
from rlstream.trainer.optimize import make_optimizer  # noqa: E402
from rlstream.trainer.precision import Precision  # noqa: E402
from rlstream.trainer.ranks import collectives_bounded, init_ranks, shard  # noqa: E402
from rlstream.trainer.trainer import Trainer  # noqa: E402

WARM_UP_TIMEOUT_S = 300.0
CPU = torch.device("cpu")


def main(timeout_s: float) -> None:
    cfg = legacy_config(prompt_groups_per_step=3, completions_per_prompt=4, learning_rate=1e-2,
                        trainer={"collective_timeout": timeout_s})
    with collectives_bounded(cfg.trainer.collective_timeout):
        ranks = init_ranks(CPU, WARM_UP_TIMEOUT_S)
        torch.manual_seed(0)
        model = build_model(0)
        groups = groups_of(mixed_batch(model))  # before sharding: the same rows on both ranks
        shard(model, ranks)
        # The trainer's state that Trainer.update reads (a Trainer without its Redis protocol).
        trainer = SimpleNamespace(cfg=cfg, model=model, optimizer=make_optimizer(model, cfg), pad_id=0, device=CPU,
                                  ref_model=None, precision=Precision(), ranks=ranks, step=0, version=0)
        Trainer.update(trainer, groups, cfg.learning_rate, None)
        dist.barrier()
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s))
        logging.getLogger("hang_case").warning("rank %d: step 1 done; collectives now time out after %.0f s",
                                               ranks.rank, timeout_s)
        Trainer.update(trainer, groups, cfg.learning_rate, None)  # rank 1 hangs in it
    raise AssertionError("step 2 returned")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, raise_interrupt)  # as `rlstream trainer` does
    torch.set_num_threads(1)
    try:
        main(float(sys.argv[1]))
    except RlstreamError as exc:
        print(f"rlstream: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
