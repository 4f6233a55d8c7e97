"""Every Redis key rlstream uses, built in one place (like rq's ``key_for``).

Runs are namespaced by run id and nothing ever flushes Redis, so two runs can share a
server. rq prefixes its own keys (``rq:queue:<name>``); we only choose the queue *name*.
"""
from __future__ import annotations

import hashlib
import re

PREFIX = "rl"
TRAINER_GROUP = "trainer"  # the rollouts stream's one consumer group
# rq job ids (which embed the run id) allow only these characters.
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe inside keys and paths, else raise ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-64 characters of letters, digits, '_' or '-'"
        )
    return run_id


def key_for(run_id: str, name: str) -> str:
    """``rl:{run}:{name}``: the single rule every key below follows."""
    return f"{PREFIX}:{check_run_id(run_id)}:{name}"


def rollouts(run_id: str) -> str:
    """Stream of encoded ``RolloutRecord`` entries (workers XADD, trainer XREADGROUP)."""
    return key_for(run_id, "rollouts")


def events(run_id: str) -> str:
    """Stream of run events; every process folds it to rebuild its state."""
    return key_for(run_id, "events")


def dead(run_id: str) -> str:
    """Dead-letter stream: undecodable or invalid entries plus the reason."""
    return key_for(run_id, "dead")


def job_queue_name(run_id: str) -> str:
    """rq queue *name* for prompt-group jobs (rq stores it at ``rq:queue:rl:{run}:jobs``)."""
    return key_for(run_id, "jobs")


def job_id(run_id: str, group_id: str) -> str:
    """rq job id of a prompt group's job (rq keeps the job at ``rq:job:<id>``); derived from
    the group id, so a re-dispatch is the same job."""
    return f"{check_run_id(run_id)}-{group_id}"


def group_of_job(run_id: str, job_id_: str) -> str:
    """The group id inside a job id built by ``job_id``."""
    return job_id_.removeprefix(f"{run_id}-")


def worker_heartbeat(run_id: str, worker_id: str) -> str:
    """Short-TTL key a live rollout worker refreshes; ``rlstream status`` counts them."""
    return key_for(run_id, f"worker:{worker_id}")


def worker_heartbeat_pattern(run_id: str) -> str:
    return key_for(run_id, "worker:*")


def rollout_stats(run_id: str) -> str:
    """Hash of run-wide rollout counters, HINCRBY'd: the workers' ``WORKER_STATS``, the producer's
    ``GATE_CLOSED_MS``; the trainer logs them, ``rlstream status`` shows them."""
    return key_for(run_id, "rollout_stats")


# The fields of the ``rollout_stats`` hash, named once for the roles that write and read them.
INVALID_SAMPLES = "invalid_samples"  # workers: samples that failed the checks (docs/design.md §10 Failure semantics)
ROLLOUT_FAILURES = "rollout_failures"  # workers: rollout_fn draws that raised
WORKER_STATS = (INVALID_SAMPLES, ROLLOUT_FAILURES)
GATE_CLOSED_MS = "gate_closed_ms"  # the producer: milliseconds the staleness gate kept it from admitting


def restarts(run_id: str) -> str:
    """Hash role -> restarts `rlstream up` made of that role's processes (HINCRBY'd by its
    supervisor, ``rlstream.ops.restarts``); the metrics exporter serves it."""
    return key_for(run_id, "restarts")


def committed_step(run_id: str) -> str:
    """Hash ``{step, event_id, digest}`` of the newest ``StepCommitted``: the trainer's
    commit script checks it so a retried commit is written once and a stale or second
    trainer is refused."""
    return key_for(run_id, "committed_step")


def trainer_lease(run_id: str) -> str:
    """String holding the token of the one trainer allowed to write for the run, with a TTL
    its holder keeps renewing (``SET NX PX``); every trainer write checks it atomically, so
    a second trainer stands by instead of forking the run (docs/design.md §7 Commit protocol)."""
    return key_for(run_id, "trainer_lease")


def engine_sync_lock(run_id: str, server_url: str) -> str:
    """Lock held by the worker that reads an inference server's version and reloads it, so
    workers sharing the server reload it once per version (docs/design.md §15.71 Engines sync
    through their own routes). The URL is hashed: it never goes into a key as written."""
    digest = hashlib.sha256(server_url.encode()).hexdigest()[:16]
    return key_for(run_id, f"engine_sync:{digest}")


def server_tickets(run_id: str) -> str:
    """Counter each starting worker INCRs: ticket modulo the number of inference servers is the
    server it prefers, so workers spread over the replicas in turn."""
    return key_for(run_id, "server_tickets")
