"""The trainer as two torchrun ranks inside real ``rlstream up`` runs of the built-in task
(docs/scaling-trainer.md; docs/design.md §15.82 Rank 0 speaks for the trainer's ranks): every step
committed and logged once, by rank 0; a rank SIGKILLed, then torchrun's agent SIGKILLed, and
each time ``up`` restarts the trainer group, which resumes exactly (``rlstream audit`` exits 0);
a run continued at another number of ranks (2 -> 1 -> 2) from the checkpoints the other size
wrote, with a crash between commit and publish replayed on both ranks, and streaming at two
ranks. Two ranks and a worker share the machine's 2 cores: the collectives' timeout is
``trainer.collective_timeout``'s 10 minutes, which no load reaches.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fault_harness import Up, assert_audit_clean, assert_steps_exactly, assert_summary, running_up, sigkill
from polling import wait_until

from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
SMALL = ["--set", "prompt_groups_per_step=8", "--set", "completions_per_prompt=4", "--set", "job_timeout=30",
         "--set", "dcp_save_interval=4"]
TWO_RANKS = ["--set", "trainer.nproc_per_node=2"]


def trainer_processes(up: Up) -> dict[str, int]:
    """The run's trainer processes: ``"agent"`` (torchrun's, the child ``up`` supervises) and
    ``"rank<N>"`` for each rank (their environment holds torchrun's ``RANK``)."""
    found = {}
    for pid in up.child_pids("trainer"):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        found[f"rank{environ['RANK']}" if "LOCAL_RANK" in environ else "agent"] = pid
    return found


def group_of(up: Up, size: int) -> dict[str, int]:
    """The trainer's agent and ``size`` ranks, once all are up."""
    def complete() -> dict[str, int] | None:
        found = trainer_processes(up)
        return found if len(found) == size + 1 else None

    return wait_until(complete, 60, f"the trainer's agent and {size} ranks", interval=0.2)


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return False


def test_two_ranks_finish_a_run_through_a_killed_rank_and_a_killed_agent(tmp_path: Path) -> None:
    with running_up(tmp_path, "ranks", *SMALL, *TWO_RANKS, "--set", "max_steps=24") as up:
        up.wait_steps(5, timeout=180)
        first = group_of(up, 2)
        sigkill(first["rank1"])  # the agent ends rank 0 (which releases the lease) and exits: up restarts it
        wait_until(lambda: not alive(first["rank0"]) and not alive(first["agent"]), 60, "the first group to end")

        up.wait_steps(13, timeout=240)
        second = group_of(up, 2)
        assert set(second.values()).isdisjoint(first.values())
        sigkill(second["agent"])  # its ranks watch it: they exit within a second, up restarts the trainer
        wait_until(lambda: not alive(second["rank0"]) and not alive(second["rank1"]), 30,
                   "the ranks of a killed agent to exit")

        code = up.wait_exit(timeout=300)
        assert code == 0, up.logs()
        assert_summary(up, 24)
        stderr = up.stderr()
        assert "trainer exited with code 1; restarting" in stderr, up.logs()  # torchrun's exit for a failed rank
        assert "trainer exited with code -9; restarting" in stderr, up.logs()
        trainer_log = (up.run_dir / "logs" / "trainer.log").read_text()
        assert trainer_log.count("trainer rank 1 of 2") == 3, up.logs()  # three groups of two ranks
    assert_steps_exactly(up.run_dir, 24)  # every step logged once, by rank 0
    assert_audit_clean(up.run_dir, tmp_path)
    final = up.run_dir / "checkpoints" / "step-24"
    assert {p.name for p in (final / "dcp").glob("__*_0.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert {p.name for p in (final / "rng").iterdir()} == {"rank-0.pt", "rank-1.pt"}


def test_a_run_continues_at_another_number_of_ranks(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "resize"
    # 2 ranks, streaming: killed right after step 5's commit, resumed at 2 ranks from step-4, step 5 replayed on
    # both ranks from the batch rank 0 reads (the weights they reach are checked against step 5's record)
    streaming = ["--set", "trainer.streaming=true", "--set", "trainer.micro_batch_tokens=24"]
    with running_up(tmp_path, "resize", *SMALL, *TWO_RANKS, *streaming, "--set", "max_steps=6",
                    env={"RLSTREAM_FAULT": "after_commit:5"}, tag="up1") as up:
        assert up.wait_exit(timeout=300) == 0, up.logs()
        assert_summary(up, 6)
        trainer_log = (run_dir / "logs" / "trainer.log").read_text()
        assert "failpoint after_commit:5: SIGKILL" in trainer_log, up.logs()
        assert re.search(r"resuming from \S*step-4 \(step 4\)", trainer_log), up.logs()
        assert "replayed to step 5" in trainer_log, up.logs()
    streamed = [m["perf/streamed_share"] for m in read_metrics(run_dir / "metrics.jsonl")]
    assert len(streamed) == 6 and all(share > 0 for share in streamed), streamed

    # 2 -> 1: the same run continued by one process, from the final checkpoint the two ranks wrote
    trainer_log = run_dir / "logs" / "trainer.log"
    before = trainer_log.stat().st_size
    with running_up(tmp_path, "resize", *SMALL, "--set", "max_steps=10", tag="up2") as up:
        assert up.wait_exit(timeout=300) == 0, up.logs()
        assert_summary(up, 10)
        log2 = trainer_log.read_text()[before:]
        assert re.search(r"resuming from \S*step-6 \(step 6\)", log2), up.logs()
        assert "trainer rank" not in log2 and "torch.distributed.run" not in log2, up.logs()  # one process
    assert_steps_exactly(run_dir, 10)
    assert_audit_clean(run_dir, tmp_path)

    # 1 -> 2: continued again by two ranks, from the checkpoint one process wrote
    before = trainer_log.stat().st_size
    with running_up(tmp_path, "resize", *SMALL, *TWO_RANKS, "--set", "max_steps=12", tag="up3") as up:
        assert up.wait_exit(timeout=300) == 0, up.logs()
        assert_summary(up, 12)
        log3 = trainer_log.read_text()[before:]
        assert re.search(r"resuming from \S*step-10 \(step 10\)", log3), up.logs()
        assert "written by fewer ranks: rank 1 starts from rank 0's RNG streams" in log3, up.logs()
    assert_steps_exactly(run_dir, 12)
    assert_audit_clean(run_dir, tmp_path)
    assert {p.name for p in (run_dir / "checkpoints" / "step-12" / "rng").iterdir()} == {"rank-0.pt", "rank-1.pt"}
