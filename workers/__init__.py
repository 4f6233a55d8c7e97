"""Rollout workers: rq workers that keep the policy in process, run rollout_fn, XADD samples."""
