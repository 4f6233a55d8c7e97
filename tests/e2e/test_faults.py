"""Fault injection end to end (docs/operations.md "Fault tolerance", docs/design.md §10 Failure semantics): real
``rlstream up`` runs whose worker, redis-server and trainer are SIGKILLed mid-run, whose
rollouts stream is fed a few hundred malformed entries, and whose trainer crashes between
commit and publish; every run must finish its steps with ``rlstream audit`` exiting 0.
The harness (finding and killing a run's own processes, the malformed entries) is in
``fault_harness.py``.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from fault_harness import (
    assert_audit_clean,
    assert_steps_exactly,
    assert_summary,
    busy_worker,
    malformed_entries,
    rlstream,
    running_up,
    sigkill,
)

from rlstream.core import bus, keys
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis, stored_password
from rlstream.core.messages import WeightsPublished
from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
SMALL = ["--set", "max_steps=40", "--set", "prompt_groups_per_step=8", "--set", "completions_per_prompt=4",
         "--set", "workers.count=2", "--set", "job_timeout=20", "--set", "dcp_save_interval=5"]


def test_kill_worker_redis_trainer_and_fuzz(tmp_path: Path) -> None:
    # the weights written by a process of their own (docs/design.md §15.99 The weights are written by a process
    # of their own): it outlives neither the SIGKILLed trainer nor the redis-server's death (every other run
    # here writes them on the trainer's thread, the default)
    with running_up(tmp_path, "faults", *SMALL, "--set", 'output_model_id="promoted"',
                    "--set", 'trainer.weight_writer="process"') as up:
        run_dir = up.run_dir
        up.wait_steps(3, timeout=120)

        url = (run_dir / "redis" / "url").read_text().strip()  # without the password: that is in its own file
        r = connect(url, password=stored_password(run_dir / "redis"))
        try:
            # 1. SIGKILL a worker mid-job: one rq reports busy when there is one (jobs take tens
            #    of ms and run back to back, so one nearly always is), else the first.
            workers = up.child_pids("worker")
            assert len(workers) == 2, (workers, up.logs())
            victim, killed_job = busy_worker(r, "faults", workers)
            sigkill(victim)

            # 2. Inject malformed entries into the rollouts stream, all at once.
            stream = keys.rollouts("faults")
            real_raw = next(f[b"m"] for _, f in r.xrange(stream, count=50) if b"m" in f)
            bad = malformed_entries(real_raw, random.Random(1234))
            with r.pipeline(transaction=False) as pipe:
                for field, value, _ in bad:
                    pipe.xadd(stream, {field: value})
                injected = [e.decode() for e in pipe.execute()]
        finally:
            r.close()
        assert len(injected) == len(bad) >= 280

        # 3. SIGKILL the embedded redis-server mid-run.
        up.wait_steps(12, timeout=120)
        redis_pid = up.redis_pid()
        assert redis_pid is not None, up.logs()
        sigkill(redis_pid)

        # 4. SIGKILL the trainer mid-run.
        up.wait_steps(20, timeout=150)
        trainers = up.child_pids("trainer")
        assert len(trainers) == 1, (trainers, up.logs())
        sigkill(trainers[0])

        code = up.wait_exit(timeout=240)
        assert code == 0, up.logs()
        assert_summary(up, 40)
        stderr = up.stderr()
        assert re.search(r"worker-\d exited with code -9; restarting", stderr), up.logs()
        assert "embedded redis-server died; restarting it from its AOF" in stderr, up.logs()
        assert "trainer exited with code -9; restarting" in stderr, up.logs()

    assert_audit_clean(run_dir, tmp_path, f"killed worker {victim} running job {killed_job}\n")

    dead = rlstream("dead", "runs/faults", cwd=tmp_path)
    assert dead.returncode == 0, dead.stderr
    rows = [line.split(None, 2) for line in dead.stdout.splitlines() if not line.startswith("dead_letters:")]
    assert all(len(row) == 3 and row[2].strip() for row in rows), dead.stdout[-3000:]
    assert len(rows) >= len(injected)
    dead_sources = {row[1] for row in rows}
    missing = [(e, what) for e, (_, _, what) in zip(injected, bad) if e not in dead_sources]
    assert not missing, f"{len(missing)} malformed entries were not dead-lettered, e.g. {missing[:10]}"

    assert_steps_exactly(run_dir, 40)
    assert (run_dir / "checkpoints" / "step-40").is_dir()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run_dir / "models" / "promoted"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("1+2=", return_tensors="pt")
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                         min_new_tokens=2, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert isinstance(tokenizer.decode(out[0]), str)


def test_crash_between_commit_and_publish_then_continue(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "resume"
    small = [*SMALL, "--set", "max_steps=8"]
    # The first part streams (docs/design.md §15.70 Streaming accumulation divides last): the kill,
    # the replay of streamed steps and the streamed steps after it (a trainer killed with a batch half
    # accumulated is tests/unit/test_streaming.py's).
    streaming = ["--set", "trainer.streaming=true", "--set", "trainer.micro_batch_tokens=24"]
    with running_up(tmp_path, "resume", *small, *streaming, env={"RLSTREAM_FAULT": "after_commit:4"},
                    tag="up1") as up:
        code = up.wait_exit(timeout=240)
        assert code == 0, up.logs()
        assert_summary(up, 8)
        trainer_log = (run_dir / "logs" / "trainer.log").read_text()
        assert "failpoint after_commit:4: SIGKILL" in trainer_log, up.logs()
        assert "trainer exited with code -9; restarting" in up.stderr(), up.logs()
        assert "replayed to step 4" in trainer_log, up.logs()
    assert_steps_exactly(run_dir, 8)
    assert_audit_clean(run_dir, tmp_path)
    assert (run_dir / "checkpoints" / "step-8").is_dir()
    streamed = [m["perf/streamed_share"] for m in read_metrics(run_dir / "metrics.jsonl") if m["step"] > 4]
    assert len(streamed) == 4 and all(share > 0 for share in streamed), streamed

    # The crash fell between commit and publish: the restarted trainer published v4, once.
    server = EmbeddedRedis(run_dir / "redis")
    r = connect(server.start())
    try:
        published = [m.version for _, m in bus.iter_all_events(r, "resume") if isinstance(m, WeightsPublished)]
    finally:
        r.close()
        server.stop()
    assert published == list(range(0, 9)), published

    # Continue the finished run: from the final checkpoint (step 8) to step 12.
    with running_up(tmp_path, "resume", *small, "--set", "max_steps=12", tag="up2") as up:
        code = up.wait_exit(timeout=240)
        assert code == 0, up.logs()
        assert_summary(up, 12)
        trainer_log = (run_dir / "logs" / "trainer.log").read_text()
        assert re.search(r"resuming from \S*step-8 \(step 8\)", trainer_log), up.logs()
    assert_steps_exactly(run_dir, 12)
    assert_audit_clean(run_dir, tmp_path)
