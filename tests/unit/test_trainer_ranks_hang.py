"""A rank that hangs in a collective is bounded by ``trainer.collective_timeout`` (docs/design.md
§15.82 Rank 0 speaks for the trainer's ranks; docs/scaling-trainer.md): two torchrun ranks run
the trainer's step (tests/unit/hang_case.py), rank 1 sleeps for good after its forward in step 2
(the ``hang_before_backward`` failpoint), and the group ends: rank 0's collective times out (gloo
honours the process group's timeout on CPU), it logs the reason and what to do and exits
non-zero, torchrun's agent ends rank 1 and exits non-zero. Without the bound the group would
wait forever; the subprocess's own timeout (minutes) is only this test's safety net."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlstream.core.errors import RlstreamError
from rlstream.trainer.ranks import collectives_bounded

HERE = Path(__file__).resolve().parent
COLLECTIVE_TIMEOUT_S = 20  # short, but only step 2 has it (hang_case.py warms up under minutes)
SAFETY_NET_S = 600  # start-up (~15 s) + step 1 + the timeout, on a loaded machine; never reached when it works


def test_a_rank_hung_in_a_step_ends_the_group_with_the_reason():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(RLSTREAM_FAULT="hang_before_backward@1:2", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "0", str(HERE / "hang_case.py"), str(COLLECTIVE_TIMEOUT_S)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=SAFETY_NET_S, env=env,
                          cwd=HERE.parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-6000:]
    assert "failpoint hang_before_backward@1:2: this rank sleeps for good" in out, out[-6000:]
    assert "step 2 returned" not in out
    reason = [line for line in out.splitlines() if "rlstream: trainer rank 0: a collective of the step waited "
              f"trainer.collective_timeout ({COLLECTIVE_TIMEOUT_S} s)" in line]
    assert reason, out[-6000:]
    assert "raise trainer.collective_timeout" in reason[0] and "`rlstream up` starts a new group" in reason[0]
    assert "Timed out waiting" in reason[0]  # gloo's own error, named in the reason
    assert "Sending process" in out and "SIGTERM" in out  # torchrun's agent ended the hung rank


def test_only_a_timed_out_collective_is_turned_into_the_reason():
    with pytest.raises(RlstreamError, match=r"waited trainer.collective_timeout \(30 s\).*Timed out waiting 30000ms"):
        with collectives_bounded(30):
            raise RuntimeError("[unbound_buffer.cc:136] Timed out waiting 30000ms for recv operation")
    with pytest.raises(RuntimeError, match="Connection closed by peer") as raised:
        with collectives_bounded(30):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert not isinstance(raised.value, RlstreamError)
