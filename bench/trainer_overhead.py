"""The trainer's step on the built-in batch against a bare torch GRPO step on the same batch,
in one process, on one model object (issue 20: "at most 1.3x a bare torch step").

    python bench/trainer_overhead.py                 # 30 rounds of 8 steps per thread setting (~4 min)
    python bench/trainer_overhead.py --rounds 100 --threads 1
    python bench/trainer_overhead.py --baseline ../old-tree --threads 1   # this code vs another tree's

The batch is ``examples/builtin/config.toml``'s: 32 groups x 8 one-token completions of "a+b="
prompts (5 tokens a sequence), drawn once from the model at temperature 1 and scored with the
task's exact-match reward; every round trains on that content under fresh group ids.

- **bare**: what an in-process GRPO loop must do with the batch's tensors in hand: group-normalised
  advantages from the (32, 8) rewards, one forward of the 256 sequences, log-softmax gather of the
  completion tokens, the clipped surrogate (token mean), backward, AdamW step (zero_grad first).
  The model's default KV cache is built in its forward, as a call without ``use_cache=False`` builds it;
  rlstream's scoring forwards pass ``use_cache=False`` (docs/design.md §15.92 Scoring forwards build no KV
  cache), so the table also gives a bare step without the cache and the whole step's ratio to it.
- **bare with each prompt once**: the same step with each of the 32 prompts through the model
  once and its 8 one-token answers scored from its last position's logits, which is what
  ``trainer.shared_prefix`` (on in the built-in config since docs/design.md §15.100 A group's
  prompt is computed once) does on this batch: the step's own cost over a bare step that saves
  the same work, beside its cost over the plain one.
- **(a) optimize**: rlstream's optimize path as ``Trainer.optimize`` runs it, alone: each group's
  advantages (``advantage_fn``), ``collate`` of the 256 decoded ``RolloutRecord`` objects, and
  ``policy_update``.
- **(b) whole step**: ``Trainer.gather`` from a rollouts stream pre-filled (untimed) with the
  batches' samples, their ``GroupAdmitted`` and ``GroupSampled`` events, as producer and workers
  write them, on the embedded redis-server (AOF, ``appendfsync everysec``) of ``rlstream up``,
  then ``Trainer.train_step`` (optimize, the weights of every step written, metrics, the commit's
  Lua script, publish, metrics.jsonl; a checkpoint every ``dcp_save_interval`` steps). Waiting for
  rollouts is not in it: the stream already holds the batches. Its parts are timed by wrappers
  around the trainer's calls (a few microseconds each).
- **(c) = (b) without its gather**: ``train_step`` alone, the step once its batch is in hand. A
  run's metrics count the gather (the read, the decode, the groups' assembly and scoring) as
  waiting for rollouts (``perf/trainer_wait_for_sampler_time``), the rest as the step.

Each variant runs ``--block`` steps in a row (8), and its time is the block's divided by them:
the trainer writes a version's weights beside the next step (docs/design.md §15.79 Weights are
written beside the next step), so a step's cost is what it takes in a sequence of steps, the
previous version's write running beside it. The row below (b) adds the wait for the block's last
version to be written and published (``WeightSync.wait``), which no step overlaps: once per run
for a trainer, here once per block. ``--block 1`` is a lone step. Rounds alternate bare, (a),
(b) (the order reversed every other round) after warm-up ones, for the process's default torch
threads and rlstream's ``torch_threads`` (1); the table gives the medians and each one's ratio to
bare. Medians of parts do not add up to the median of the whole. The rows "the mean of every
round" count the rounds that a full garbage collection of the process's heap fell into (~190 ms
each on the built-in task unless the heap is frozen, as ``Trainer.train_run`` does since design
§15.89 Weights link their unchanged files; the steps run on a frozen heap, and this script does
the same way): what a run of many steps pays, which the medians leave out. The weight writer's
thread gets the CPU time it spends per version (``time.thread_time``) beside its parts' wall
times; with ``trainer.weight_writer = "process"`` (the built-in config's since docs/design.md
§15.99 The weights are written by a process of their own) the files are the child's, and the
thread's write, seal and prune rows read 0. Each tree runs its own built-in config. On a
machine whose load drifts
(other processes on the same cores), the medians of each round's own ratio (bare and (b) measured
moments apart) and the CPU time of the step's thread (``time.thread_time``: not the weight
writer's, not redis-server's; against the bare step's) are the steadier figures. bare and rlstream use the same
model object, each with its own AdamW (the trainer's hyper-parameters): both train it, which
changes values, never shapes or costs.

``--baseline DIR`` measures another tree (an older commit, with its own ``DIR/.venv``) with this
script, in chunks of rounds alternating with this tree's, each chunk a process of its own; the
table puts both side by side. This script runs against trees from before the background weight
write too (the parts they lack read 0).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import defaultdict
from pathlib import Path

import torch
import transformers

from rlstream.builtin.task import builtin_rows, exact_match_reward
from rlstream.core import bus, keys, weights
from rlstream.core.codec import decode, encode
from rlstream.core.config import load_config
from rlstream.core.connection import client
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.messages import GroupAdmitted, GroupSampled, RolloutRecord, group_id_for, sample_id_for
from rlstream.trainer import optimize as optimize_module
from rlstream.trainer import policy_model
from rlstream.trainer import trainer as trainer_module
from rlstream.trainer.batch import collate
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples/builtin/config.toml"


def builtin_config() -> Path:
    """The built-in task's config of the tree measured: the working directory's (``--baseline``
    runs each tree's chunks there, so each tree runs its own settings), else this tree's."""
    here = Path.cwd() / "examples/builtin/config.toml"
    return here if here.is_file() else CONFIG


# ----------------------------------------------------------------- the batch
def draw_batch(t: Trainer, seed: int) -> list[list[tuple[list[int], float, float]]]:
    """(P, G) completions of the config's prompts: (tokens, completion logprob, reward) each, drawn
    from the model at the config's temperature, as a worker would."""
    cfg, tok = t.cfg, t.tokenizer
    rows = list(builtin_rows(cfg.prompt_groups_per_step, seed))
    prompts = [tok(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits_P_V = t.model(input_ids=torch.tensor(prompts)).logits[:, -1].float() / cfg.temperature
    logp_P_V = torch.log_softmax(logits_P_V, -1)
    draws_P_G = torch.multinomial(logp_P_V.exp(), cfg.completions_per_prompt, replacement=True, generator=gen)
    batch = []
    for row, prompt, logp_V, draws_G in zip(rows, prompts, logp_P_V, draws_P_G):
        batch.append([(prompt + [int(d)], float(logp_V[d]), exact_match_reward(tok.decode([int(d)]), row["answer"]))
                      for d in draws_G])
    return batch


def stamped(batch, round_no: int, version: int, worker: str = "bench") -> list[list[RolloutRecord]]:
    """The batch's samples under fresh group ids (rows of round ``round_no``), stamped as a worker stamps them."""
    P = len(batch)
    groups = []
    for g, members in enumerate(batch):
        row = round_no * P + g
        gid = group_id_for(0, row, 0)
        window = (time.time() - 0.01, time.time())  # a group's members share its sampling window
        groups.append([RolloutRecord(
            tokens=tokens, logprobs=[0.0] * (len(tokens) - 1) + [lp], loss_mask=[0] * (len(tokens) - 1) + [1],
            reward=reward, text="", sample_id=sample_id_for(gid, m), group_id=gid, group_size=len(members),
            row_index=row, submit_version=version, min_version=version, max_version=version, worker_id=worker,
            started_at=window[0], finished_at=window[1]) for m, (tokens, lp, reward) in enumerate(members)])
    return groups


def prefill(r, run_id: str, groups: list[list[RolloutRecord]], version: int) -> None:
    """What the producer (``GroupAdmitted``) and the workers (``GroupSampled`` + samples, one MULTI
    per group) write for the batch: the trainer's gather then reads it without waiting."""
    with r.pipeline(transaction=True) as pipe:
        for samples in groups:
            s = samples[0]
            bus.xadd(pipe, keys.events(run_id), GroupAdmitted(group_id=s.group_id, row_index=s.row_index, epoch=0,
                                                              attempt=0, submit_version=version,
                                                              group_size=len(samples)))
        pipe.execute()
    for samples in groups:
        with r.pipeline(transaction=True) as pipe:
            bus.xadd(pipe, keys.events(run_id), GroupSampled(group_id=samples[0].group_id, samples=len(samples),
                                                             worker_id="bench", version=version, tokens=len(samples)))
            for s in samples:
                bus.xadd(pipe, keys.rollouts(run_id), s)
            pipe.execute()


# ----------------------------------------------------------------- the three steps
def bare_step(model, optimizer, tokens_B_N, attention_B_N, mask_B_T, rewards_P_G, eps: float,
              parts: dict[str, float], use_cache: bool | None = None, shared: bool = False) -> float:
    """The minimum of an in-process GRPO step on tensors in hand; ``parts`` adds up its phases' times.
    ``use_cache``: None is the model's config (a KV cache built and thrown away), False none.
    ``shared``: each prompt through the model once (its G rows share it), the one-token answers
    scored from its last position's logits: what ``trainer.shared_prefix`` does on this batch."""
    t0 = time.perf_counter()
    if shared:
        P, G = rewards_P_G.shape
        prompts_P_N = tokens_B_N[::G, :-1]
        logits_P_V = model(input_ids=prompts_P_N, attention_mask=attention_B_N[::G, :-1], use_cache=False,
                           logits_to_keep=1).logits[:, -1].float()
        logprobs_B_T = torch.log_softmax(logits_P_V, -1).repeat_interleave(G, 0).gather(-1, tokens_B_N[:, -1:])
        logprobs_B_T = torch.cat([torch.zeros(P * G, tokens_B_N.shape[1] - 2), logprobs_B_T], 1)  # (B, T)
    else:
        cache = {} if use_cache is None else {"use_cache": use_cache}
        logits_B_T_V = model(input_ids=tokens_B_N, attention_mask=attention_B_N, **cache).logits[:, :-1].float()
        logprobs_B_T = torch.log_softmax(logits_B_T_V, -1).gather(-1, tokens_B_N[:, 1:, None])[..., 0]
    t1 = time.perf_counter()
    advantages_P_G = (rewards_P_G - rewards_P_G.mean(-1, keepdim=True)) / (
        rewards_P_G.std(-1, correction=0, keepdim=True) + 1e-8)
    adv_B_T = advantages_P_G.reshape(-1)[:, None]
    ratio_B_T = torch.exp(logprobs_B_T - logprobs_B_T.detach())
    loss_B_T = -torch.min(ratio_B_T * adv_B_T, ratio_B_T.clamp(1 - eps, 1 + eps) * adv_B_T)
    loss = (loss_B_T * mask_B_T).sum() / mask_B_T.sum()
    t2 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    optimizer.step()
    t4 = time.perf_counter()
    for name, seconds in (("forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2), ("step", t4 - t3)):
        parts[name] = parts.get(name, 0.0) + seconds
    return float(loss.detach())


def rlstream_optimize(t: Trainer, groups: list[list[RolloutRecord]], lr: float, clock: dict) -> None:
    """``Trainer.optimize``'s work without its step count: advantages, collate, policy_update (``clock``
    adds up their times)."""
    t0 = time.perf_counter()
    advantages = [t.advantage_fn(torch.tensor([s.reward for s in g], dtype=torch.float32)) for g in groups]
    t1 = time.perf_counter()
    batch = collate([s for g in groups for s in g], torch.cat(advantages), t.pad_id, t.device)
    t2 = time.perf_counter()
    policy_update(t.model, t.optimizer, batch, cfg=t.cfg, lr=lr, ref_model=t.ref_model, precision=t.precision)
    t3 = time.perf_counter()
    for name, seconds in (("advantages", t1 - t0), ("collate", t2 - t1), ("policy_update", t3 - t2)):
        clock[name] = clock.get(name, 0.0) + seconds


class PartClock:
    """Times the trainer's calls by name: wrappers installed on the trainer's module names and
    bound methods (the same objects ``train_step`` calls), on the step's thread and on the weight
    writer's. Names a tree does not have are skipped (its rows read 0)."""

    def __init__(self, t: Trainer):
        self.times: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()  # the weight writer's thread adds to the same table
        self.install(trainer_module, "collate", "policy_update", "commit_step", "publish", "step_metrics",
                     "step_record")
        self.install(t, "gather", "optimize", "sync_weights", "write_weights", "live_run", "log_metrics", "checkpoint",
                     "evaluate")
        self.install(t.retention, "pressed")
        # policy_update's parts, as minibatch_step and update_report call them
        self.install(optimize_module, "token_logprobs", "compute_loss", "clip_and_step", "all_finite")
        weight_sync = getattr(t, "weight_sync", None)
        if weight_sync is not None:  # the weights written beside the next step
            from rlstream.trainer import weight_sync as weight_sync_module

            self.install(weight_sync, "wait")
            self.install(weight_sync_module.DirTemplate, "snapshot")
            self.install(weight_sync_module, "publish", prefix="bg.")
            self.install(weight_sync_module, "prune_weights", prefix="bg.")
            self.install(weight_sync_module.DirTemplate, "write", prefix="bg.")
            # the template's files as links (design §15.89 Weights link their unchanged files; the steps run on a frozen
            # heap): the weights file, and the linked directory's seal
            self.install(weight_sync_module.DirTemplate, "write_weights", prefix="bg.")
            self.install(weights, "write_linked_dir", prefix="bg.")
            self.install(weight_sync_module.Pending, "run", prefix="bg.cpu.", clock=time.thread_time)
        else:  # the weights written on the step's thread: save_pretrained x2 + seal, sealed, pruned
            weights.write_model_dir = self.wrap("write_model_dir", weights.write_model_dir)
            policy_model.shutil = types.SimpleNamespace(rmtree=self.wrap("prune", shutil.rmtree))  # its one use
        weights.seal = self.wrap("seal", weights.seal)

    def install(self, owner, *names: str, prefix: str = "", clock=time.perf_counter) -> None:
        for name in names:
            if hasattr(owner, name):
                setattr(owner, name, self.wrap(prefix + name, getattr(owner, name), clock))

    def wrap(self, name, fn, clock=time.perf_counter):
        """``fn`` timed by ``clock`` (``time.thread_time``: the CPU time of the thread that calls it)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - t0
                with self.lock:
                    self.times[name] += elapsed
        return timed

    def take(self) -> dict[str, float]:
        with self.lock:
            times, self.times = dict(self.times), defaultdict(float)
        return times


def drain(t: Trainer) -> None:
    """Wait until the last version is written and published (nothing to wait for in a tree that
    writes on the step's thread)."""
    if hasattr(t, "weight_sync"):
        type(t.weight_sync).wait(t.weight_sync)  # not PartClock's wrapper: the table times this wait as "drain"


def whole_steps(t: Trainer, clock: PartClock, block: int) -> dict[str, float]:
    """``block`` whole steps in a row, then the wait for the last version's publish: per step."""
    drain(t)
    clock.take()  # drop what (a)'s policy_update left in the wrapped optimize functions
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(block):
        groups, streamed = t.gather(t.cfg.prompt_groups_per_step)
        assert len(groups) == t.cfg.prompt_groups_per_step and streamed is None, (len(groups), streamed)
        t.train_step(groups, wait_time=0.0)
    t1, c1 = time.perf_counter(), time.thread_time()
    drain(t)
    total = time.perf_counter() - t0
    parts = clock.take()
    seal = parts.pop("seal", 0.0)
    if "write_model_dir" in parts:  # written on the step's thread
        parts["save"] = parts["write_model_dir"] - seal
        parts["seal"] = seal
    else:
        parts["bg.seal"] = seal
    if "bg.write_linked_dir" in parts:  # the weights file written inside the linked directory's write
        inside = parts.pop("bg.write_weights", 0.0)
        parts["bg.write"] = parts.get("bg.write", 0.0) + inside
        parts["bg.seal"] += parts.pop("bg.write_linked_dir") - inside
    parts["weights_main"] = parts.get("sync_weights", 0.0) + parts.get("write_weights", 0.0)
    parts["total"] = t1 - t0
    parts["cpu"] = c1 - c0  # the step's thread only: not the weight writer's, not redis-server's
    parts["rest"] = parts["total"] - sum(parts.get(k, 0.0) for k in (
        "gather", "optimize", "weights_main", "live_run", "step_metrics", "step_record", "commit_step", "publish",
        "log_metrics", "checkpoint", "evaluate", "pressed"))
    parts["drained"] = total
    parts["backward_rest"] = parts["policy_update"] - sum(
        parts.get(k, 0.0) for k in ("token_logprobs", "compute_loss", "clip_and_step", "all_finite"))
    parts["step_metrics_record"] = parts.get("step_metrics", 0.0) + parts.get("step_record", 0.0)
    return {k: v / block for k, v in parts.items()}


# ----------------------------------------------------------------- rounds
def run_setting(t: Trainer, r, batch, clock: PartClock, threads: int, rounds: int, warmup: int, block: int,
                round_base: int) -> dict:
    torch.set_num_threads(threads)
    cfg = t.cfg
    flat = [m for g in batch for m in g]
    tokens_B_N = torch.tensor([tokens for tokens, _, _ in flat])
    attention_B_N = torch.ones_like(tokens_B_N)
    mask_B_T = torch.zeros(tokens_B_N.shape[0], tokens_B_N.shape[1] - 1)
    mask_B_T[:, -1] = 1.0  # the completion token
    rewards_P_G = torch.tensor([[reward for _, _, reward in g] for g in batch])
    bare_opt = make_optimizer(t.model, cfg)  # the trainer's AdamW hyper-parameters, its own state
    for group in bare_opt.param_groups:
        group["lr"] = cfg.learning_rate
    samples: dict[str, list] = defaultdict(list)
    for i in range(warmup + rounds):
        n = (round_base + i) * block
        # (a) trains on decoded samples, as the trainer gets them from the stream.
        decoded = [[decode(encode(s), expect=RolloutRecord) for s in g] for g in stamped(batch, n, t.version, "a")]
        for k in range(block):  # the block's batches, in the stream before it starts, each sampled by the
            v = t.version + k      # version that trains it (the staleness bound drops older ones)
            prefill(r, cfg.run_id, stamped(batch, n + k, v), v)
        order = ("bare", "bare_nc", "bare_sp", "optimize", "step") if i % 2 == 0 else (
            "step", "optimize", "bare_sp", "bare_nc", "bare")
        row: dict[str, float] = {}
        for which in order:
            if which in ("bare", "bare_nc", "bare_sp"):
                part: dict[str, float] = defaultdict(float)
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(block):
                    bare_step(t.model, bare_opt, tokens_B_N, attention_B_N, mask_B_T, rewards_P_G, cfg.eps_clip,
                              part, use_cache=None if which == "bare" else False, shared=which == "bare_sp")
                row[which], row[f"{which}.cpu"] = (time.perf_counter() - t0) / block, (time.thread_time() - c0) / block
                row.update({f"{which}.{k}": v / block for k, v in part.items()})
            elif which == "optimize":
                part = defaultdict(float)
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(block):
                    rlstream_optimize(t, decoded, cfg.learning_rate, part)
                row["optimize"], row["optimize.cpu"] = (time.perf_counter() - t0) / block, \
                    (time.thread_time() - c0) / block
                row.update({f"optimize.{k}": v / block for k, v in part.items()})
            else:
                row.update({f"step.{k}": v for k, v in whole_steps(t, clock, block).items()})
        # Each round's own ratios: their medians hold up when the machine's load drifts between rounds
        # (the medians of the parts, each over every round, do not).
        row["ratio.optimize"], row["ratio.step"] = row["optimize"] / row["bare"], row["step.total"] / row["bare"]
        row["ratio.step_cpu"] = row["step.cpu"] / row["bare.cpu"]
        row["ratio.step_nc"] = row["step.total"] / row["bare_nc"]
        row["ratio.step_sp"] = row["step.total"] / row["bare_sp"]
        # (c): what the trainer does once the batch is in hand; its run counts the read as waiting for
        # rollouts (perf/trainer_wait_for_sampler_time starts before gather)
        row["step.train_step"] = row["step.total"] - row.get("step.gather", 0.0)
        row["ratio.train_step"] = row["step.train_step"] / row["bare"]
        row["ratio.train_step_sp"] = row["step.train_step"] / row["bare_sp"]
        if i >= warmup:
            for key, value in row.items():
                samples[key].append(value)
    return samples


def environment(r, threads_default: int, cfg, block: int) -> str:
    info = r.info("server")
    return (f"{datetime.date.today()}  {platform.machine()} {platform.processor() or ''}  "
            f"cpus {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})  "
            f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start\n"
            f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
            f"redis-server {info['redis_version']} (embedded, AOF everysec)\n"
            f"torch threads: process default {threads_default}, rlstream torch_threads {cfg.torch_threads}\n"
            f"config {builtin_config()}: {cfg.base_model}, {cfg.prompt_groups_per_step} groups x "
            f"{cfg.completions_per_prompt}, {cfg.max_completion_tokens}-token completions, {cfg.policy_loss}, "
            f"kl_beta {cfg.kl_beta}, lr {cfg.learning_rate:g}, weight_sync_interval {cfg.weight_sync_interval}, "
            f"dcp_save_interval {cfg.dcp_save_interval}; blocks of {block} steps")


ROWS = [  # (label, key)
    ("bare torch step", "bare"),
    ("  forward + log-softmax gather", "bare.forward"),
    ("  advantages + clipped surrogate", "bare.loss"),
    ("  zero_grad + backward", "bare.backward"),
    ("  AdamW step", "bare.step"),
    ("(a) optimize: advantages + collate + policy_update", "optimize"),
    ("  advantages (per group)", "optimize.advantages"),
    ("  collate", "optimize.collate"),
    ("  policy_update", "optimize.policy_update"),
    ("(b) whole step, no waiting: gather + train_step", "step.total"),
    ("(b) + the block's last version written and published", "step.drained"),
    ("(a) / bare, the median of each round's ratio", "ratio.optimize"),
    ("(b) / bare, the median of each round's ratio", "ratio.step"),
    ("(c) = (b) without gather: train_step, the step once its batch is in hand", "step.train_step"),
    ("(c) / bare, the median of each round's ratio", "ratio.train_step"),
    ("bare torch step without the KV cache (use_cache=False, as rlstream's forwards)", "bare_nc"),
    ("(b) / bare without the KV cache, the median of each round's ratio", "ratio.step_nc"),
    ("bare torch step with each prompt's forward once (what trainer.shared_prefix does here)", "bare_sp"),
    ("(b) / bare with each prompt once, the median of each round's ratio", "ratio.step_sp"),
    ("(c) / bare with each prompt once, the median of each round's ratio", "ratio.train_step_sp"),
    ("bare, CPU of its thread", "bare.cpu"),
    ("(b), CPU of the step's thread (not the writer's, not redis-server's)", "step.cpu"),
    ("(b) / bare in CPU of their thread, the median of each round's ratio", "ratio.step_cpu"),
    ("bare, the mean of every round", "mean:bare"),
    ("(b), the mean of every round (a full garbage collection counts where it falls)", "mean:step.total"),
    ("bare, CPU of its thread, the mean of every round", "mean:bare.cpu"),
    ("(b), CPU of the step's thread, the mean of every round", "mean:step.cpu"),
    ("  gather (XREADGROUP, decode, groups, advantages, events fold)", "step.gather"),
    ("  optimize (collate + policy_update)", "step.optimize"),
    ("    collate", "step.collate"),
    ("    policy_update", "step.policy_update"),
    ("      token_logprobs (forward)", "step.token_logprobs"),
    ("      compute_loss (loss + 9 metrics)", "step.compute_loss"),
    ("      zero_grad + backward + the rest", "step.backward_rest"),
    ("      clip_and_step (grad norm + AdamW)", "step.clip_and_step"),
    ("      all_finite (every weight checked)", "step.all_finite"),
    ("  weights, on the step's thread", "step.weights_main"),
    ("    wait for the previous version's write", "step.wait"),
    ("    snapshot (CPU copy of the weights file's tensors)", "step.snapshot"),
    ("    save_pretrained x2 (old: every step; new: the first write)", "step.save"),
    ("    seal (fsync x8, sha256, manifest, rename, fsync dir)", "step.seal"),
    ("    prune the version past keep_weights (rmtree)", "step.prune"),
    ("  live_run (rollout stats, perf line)", "step.live_run"),
    ("  step_metrics + step_record", "step.step_metrics_record"),
    ("  commit_step (Lua: XADD, XACK x256, record)", "step.commit_step"),
    ("  publish (XADD WeightsPublished), on the step's thread", "step.publish"),
    ("  log_metrics (metrics.jsonl)", "step.log_metrics"),
    ("  Redis memory check (retention: INFO memory)", "step.pressed"),
    ("  the rest (checkpoints when due, failpoints, the loop, the timers)", "step.rest"),
    ("weight writer's thread, beside the next step (per version)", None),
    ("  write the snapshot (safetensors) (before the links: and the template's files)", "step.bg.write"),
    ("  seal (before: fsync x7, sha256 of each file; links: fsync x2, one sha256), manifest, rename",
     "step.bg.seal"),
    ("  publish (XADD WeightsPublished)", "step.bg.publish"),
    ("  prune the version past keep_weights (rmtree)", "step.bg.prune_weights"),
    ("  the writer thread's CPU per version (time.thread_time)", "step.bg.cpu.run"),
]


def med_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else 0.0


def table(columns: dict[str, dict], rounds: int, block: int) -> str:
    """One ms + ratio column pair per (name -> samples) in ``columns``."""
    head = "| part | " + " | ".join(f"{name}: ms | ratio to bare" for name in columns) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(columns)]
    for label, key in ROWS:
        if key is None:
            lines.append(f"| *{label}* |" + " | |" * len(columns))
            continue
        cells = []
        for s in columns.values():
            if key.startswith("mean:"):  # against the bare step's mean (CPU: its CPU's)
                base = "bare.cpu" if key.endswith(".cpu") else "bare"
                ms, bare_ms = (1000 * statistics.mean(s.get(k) or [0.0]) for k in (key[5:], base))
                cells.append(f"{ms:.2f} | {ms / bare_ms:.2f}x")
                continue
            ms = med_ms(s.get(key, []))
            if key.startswith("ratio."):  # a ratio per round: its median, no time
                cells.append(f"| {ms / 1000:.2f}x")
            elif key.endswith(".cpu"):  # CPU against the bare step's CPU
                cells.append(f"{ms:.2f} | {ms / med_ms(s['bare.cpu']):.2f}x")
            else:
                cells.append(f"{ms:.2f} | {ms / med_ms(s['bare']):.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nmedians of {rounds} rounds per column, each round's time per step of a block of {block}; "
                 "ratio = the part's median / the bare step's median (CPU rows: / the bare step's CPU); the rows "
                 "'the median of each round's ratio' take each round's ratio first (robust to load drifting "
                 "between rounds)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30, help="measured rounds per thread setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=8, help="steps in a row per variant and round")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread settings (default: the process's default and rlstream's torch_threads)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override (field=value)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another tree (with DIR/.venv) to measure side by side, in alternating chunks of rounds")
    p.add_argument("--chunks", type=int, default=4, help="with --baseline: chunks per tree (rounds split among them)")
    p.add_argument("--json", action="store_true", help="print the raw samples as one JSON line at the end")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[dict[int, dict], str]:
    """The rounds of every thread setting in this process: (thread setting -> samples, the notes)."""
    threads_default = torch.get_num_threads()  # before the Trainer sets its own
    load_start = os.getloadavg()
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        try:
            settings_n = len(args.threads or [1, 2])
            total_steps = (args.warmup + args.rounds) * args.block * settings_n + 1
            cfg = load_config(builtin_config(), [f'log_path="{tmp}/runs"', 'run_id="overhead"', f'redis.url="{url}"',
                                       f"max_steps={max(total_steps + 1, 300)}", *args.extra])
            r = client(url)
            t = Trainer(cfg, r, cfg.run_dir())
            bus.ensure_group(r, keys.rollouts(cfg.run_id))
            t.resume()  # takes the trainer lease, as Trainer.run does
            t.perf.restart(t.state, bus.rollout_stats(r, cfg.run_id))
            print(environment(r, threads_default, cfg, args.block), flush=True)
            batch = draw_batch(t, cfg.seed)
            print(f"batch: {sum(len(g) for g in batch)} sequences of {len(batch[0][0][0])} tokens, reward mean "
                  f"{statistics.mean(x[2] for g in batch for x in g):.3f}", flush=True)
            settings = args.threads or list(dict.fromkeys([threads_default, cfg.torch_threads]))
            results, base, clock = {}, 0, PartClock(t)
            # as Trainer.train_run steps: the heap alive before the steps out of the collector's scans (design §15.89
            # Weights link their unchanged files; the steps run on a frozen heap)
            with getattr(trainer_module, "frozen_heap", contextlib.nullcontext)():
                for n in settings:
                    results[n] = run_setting(t, r, batch, clock, n, args.rounds, args.warmup, args.block, base)
                    base += args.rounds + args.warmup
            checkpoints = [v * args.block for s in results.values() for v in s.get("step.checkpoint", []) if v > 0]
            if checkpoints:
                notes.append(f"checkpoints (every {cfg.dcp_save_interval} steps, inside the whole step's rounds): "
                             + ", ".join(f"{1000 * v:.0f} ms" for v in checkpoints))
            notes.append(f"trainer reached step {t.step}; load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
                         f"at end ({load_start[0]:.2f} at start)")
            drain(t)
            t.lease.release()
            r.close()
        finally:
            server.stop()
    return results, "\n".join(notes)


def compare(args: argparse.Namespace, argv: list[str]) -> int:
    """This tree and ``args.baseline`` in alternating chunks, each a process of its own."""
    trees = {"this tree": (REPO, Path(sys.executable)), "baseline": (args.baseline.resolve(),
                                                                      args.baseline.resolve() / ".venv/bin/python")}
    passed, skip = [], False
    for a in argv:  # the same options for each chunk, but its share of rounds and no --baseline
        if skip:
            skip = False
        elif a in ("--baseline", "--chunks", "--rounds"):
            skip = True
        elif not a.startswith(("--baseline=", "--chunks=", "--rounds=")):
            passed.append(a)
    per_chunk = max(1, args.rounds // args.chunks)
    samples: dict[str, dict[int, dict[str, list]]] = {name: {} for name in trees}
    print(f"{datetime.date.today()}: this tree ({REPO}) vs baseline ({trees['baseline'][0]}), {args.chunks} chunks "
          f"of {per_chunk} rounds each, alternating; load avg {os.getloadavg()[0]:.2f} at start", flush=True)
    for c in range(args.chunks):
        for name in (list(trees) if c % 2 == 0 else list(trees)[::-1]):
            root, python = trees[name]
            cmd = [str(python), str(Path(__file__).resolve()), *passed, "--rounds", str(per_chunk), "--json"]
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
            lines = out.strip().splitlines()
            if c < 2:
                print(f"\n[{name}]\n" + "\n".join(lines[:-1]), flush=True)
            for n, keyed in json.loads(lines[-1]).items():
                for key, values in keyed.items():
                    samples[name].setdefault(int(n), defaultdict(list))[key].extend(values)
    for n in samples["this tree"]:
        print(f"\n### {n} thread{'s' if n > 1 else ''}\n")
        print(table({f"{name} ({n}t)": samples[name][n] for name in trees}, per_chunk * args.chunks, args.block))
    print(f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.baseline is not None:
        return compare(args, argv)
    results, notes = measure(args)
    print()
    print("\n\n".join(table({f"{n} thread{'s' if n > 1 else ''}": s}, args.rounds, args.block)
                      for n, s in results.items()) if args.json else
          table({f"{n} thread{'s' if n > 1 else ''}": s for n, s in results.items()}, args.rounds, args.block))
    print(notes)
    if args.json:
        print(json.dumps({n: dict(s) for n, s in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
