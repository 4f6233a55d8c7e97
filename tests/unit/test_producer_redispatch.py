"""The producer re-dispatches an admitted group whose rq job and samples are both gone
(Redis lost its last writes), and only such a group (fakeredis + rq's JSON serializer)."""
from __future__ import annotations

from factories import legacy_config
from rq.job import Job

from rlstream.core.jobs import job_queue
from rlstream.core.messages import GroupRejected, GroupSampled, RolloutJob
from rlstream.core.run_state import RunState
from rlstream.producers.producer import admit, jobless_groups, redispatch

CFG = legacy_config(run_id="p2", completions_per_prompt=4)
ROWS = [{"prompt": f"{i}+1="} for i in range(3)]


def admitted(r) -> tuple[RunState, list[str]]:
    queue, state = job_queue(r, CFG), RunState()
    for row in range(3):
        state.apply(admit(r, queue, CFG, 0, row, ROWS[row], version=0))
    return state, [g.group_id for g in state.open_groups]


def lose(r, group_id: str) -> None:
    """What an OS crash under appendfsync everysec can do: the job vanishes, the event stays
    (e.g. the job was dequeued and its finished/deleted state survived, its samples not)."""
    job_id = f"{CFG.run_id}-{group_id}"
    job_queue(r, CFG).remove(job_id)
    r.delete(Job.key_for(job_id))


def test_only_a_group_without_job_and_samples_is_lost(r):
    state, gids = admitted(r)
    assert jobless_groups(r, CFG, state) == []
    lose(r, gids[0])
    lose(r, gids[1])
    state.apply(GroupSampled(group_id=gids[1], samples=4))  # its job succeeded: samples are written
    assert [g.group_id for g in jobless_groups(r, CFG, state)] == [gids[0]]
    state.apply(GroupRejected(group_id=gids[0], reason="x"))
    assert jobless_groups(r, CFG, state) == []  # settled groups are never re-dispatched


def test_redispatch_enqueues_the_same_job_again(r):
    state, gids = admitted(r)
    lose(r, gids[2])
    queue = job_queue(r, CFG)
    redispatch(r, queue, CFG, jobless_groups(r, CFG, state), ROWS)
    job_id = f"{CFG.run_id}-{gids[2]}"
    assert job_id in queue.job_ids
    [payload] = RolloutJob.model_validate(queue.fetch_job(job_id).args[0]).groups
    assert (payload.group_id, payload.row, payload.group_size) == (gids[2], ROWS[payload.row_index], 4)
    assert jobless_groups(r, CFG, state) == []

