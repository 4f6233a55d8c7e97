"""The trainer's step on the built-in batch against a bare torch GRPO step on the same batch,
in one process, on one model object (issue 20: "at most 1.3x a bare torch step").

    python bench/trainer_overhead.py                 # 60 rounds per thread setting (~1 min)
    python bench/trainer_overhead.py --rounds 100 --threads 1

The batch is ``examples/builtin/config.toml``'s: 32 groups x 8 one-token completions of "a+b="
prompts (5 tokens a sequence), drawn once from the model at temperature 1 and scored with the
task's exact-match reward; every round trains on that content under fresh group ids.

- **bare**: what an in-process GRPO loop must do with the batch's tensors in hand: group-normalised
  advantages from the (32, 8) rewards, one forward of the 256 sequences, log-softmax gather of the
  completion tokens, the clipped surrogate (token mean), backward, AdamW step (zero_grad first).
- **(a) optimize**: rlstream's optimize path as ``Trainer.optimize`` runs it, alone: each group's
  advantages (``advantage_fn``), ``collate`` of the 256 decoded ``RolloutSample`` objects, and
  ``policy_update``.
- **(b) whole step**: ``Trainer.gather`` from a rollouts stream pre-filled (untimed) with the
  batch's 256 samples, its 32 ``GroupAdmitted`` and ``GroupSampled`` events, as producer and
  workers write them, on the embedded redis-server (AOF, ``appendfsync everysec``) of ``rlstream up``,
  then ``Trainer.train_step`` (optimize, ``write_weights`` every step, metrics, the commit's Lua
  script, publish, metrics.jsonl; a checkpoint every ``dcp_save_interval`` steps). Waiting for
  rollouts is not in it: the stream already holds the batch. Its parts are timed by wrappers
  around the trainer's calls (a few microseconds each).

Rounds alternate bare, (a), (b) (the order reversed every other round) after warm-up ones, for
the process's default torch threads and rlstream's ``torch_threads`` (1); the table gives the
medians and each one's ratio to bare. Medians of parts do not add up to the median of the whole.
bare and rlstream use the same model object, each with its own AdamW (the trainer's
hyper-parameters): both train it, which changes values, never shapes or costs.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
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
from rlstream.core.messages import GroupAdmitted, GroupSampled, RolloutSample, group_id_for, sample_id_for
from rlstream.trainer import optimize as optimize_module
from rlstream.trainer import policy_model
from rlstream.trainer import trainer as trainer_module
from rlstream.trainer.batch import collate
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples/builtin/config.toml"


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


def stamped(batch, round_no: int, version: int, worker: str = "bench") -> list[list[RolloutSample]]:
    """The batch's samples under fresh group ids (rows of round ``round_no``), stamped as a worker stamps them."""
    P = len(batch)
    groups = []
    for g, members in enumerate(batch):
        row = round_no * P + g
        gid = group_id_for(0, row, 0)
        window = (time.time() - 0.01, time.time())  # a group's members share its sampling window
        groups.append([RolloutSample(
            tokens=tokens, logprobs=[0.0] * (len(tokens) - 1) + [lp], loss_mask=[0] * (len(tokens) - 1) + [1],
            reward=reward, text="", sample_id=sample_id_for(gid, m), group_id=gid, group_size=len(members),
            row_index=row, submit_version=version, min_version=version, max_version=version, worker_id=worker,
            started_at=window[0], finished_at=window[1]) for m, (tokens, lp, reward) in enumerate(members)])
    return groups


def prefill(r, run_id: str, groups: list[list[RolloutSample]], version: int) -> None:
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
              parts: dict[str, float]) -> float:
    """The minimum of an in-process GRPO step on tensors in hand; ``parts`` gets its phases' times."""
    t0 = time.perf_counter()
    logits_B_T_V = model(input_ids=tokens_B_N, attention_mask=attention_B_N).logits[:, :-1].float()
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
    parts.update(forward=t1 - t0, loss=t2 - t1, backward=t3 - t2, step=t4 - t3)
    return float(loss.detach())


def rlstream_optimize(t: Trainer, groups: list[list[RolloutSample]], lr: float, clock: dict) -> None:
    """``Trainer.optimize``'s work without its step count: advantages, collate, policy_update."""
    t0 = time.perf_counter()
    advantages = [t.advantage_fn(torch.tensor([s.reward for s in g], dtype=torch.float32)) for g in groups]
    t1 = time.perf_counter()
    batch = collate([s for g in groups for s in g], torch.cat(advantages), t.pad_id, t.device)
    t2 = time.perf_counter()
    policy_update(t.model, t.optimizer, batch, cfg=t.cfg, lr=lr, ref_model=t.ref_model, precision=t.precision)
    t3 = time.perf_counter()
    clock["advantages"], clock["collate"], clock["policy_update"] = t1 - t0, t2 - t1, t3 - t2


class PartClock:
    """Times the trainer's calls by name while ``active``: wrappers installed on the trainer's
    module names and bound methods (the same objects ``train_step`` calls)."""

    def __init__(self, t: Trainer):
        self.times: dict[str, float] = defaultdict(float)
        for name in ("collate", "policy_update", "commit_step", "publish", "step_metrics", "step_record"):
            setattr(trainer_module, name, self.wrap(name, getattr(trainer_module, name)))
        for name in ("gather", "optimize", "write_weights", "live_run", "log_metrics", "checkpoint"):
            setattr(t, name, self.wrap(name, getattr(t, name)))
        # policy_update's parts, as minibatch_step and update_report call them
        for name in ("token_logprobs", "compute_loss", "clip_and_step", "all_finite"):
            setattr(optimize_module, name, self.wrap(name, getattr(optimize_module, name)))
        # write_weights' parts: the directory written (save_pretrained x2 + seal), sealed, old versions pruned
        weights.write_model_dir = self.wrap("write_model_dir", weights.write_model_dir)
        weights.seal = self.wrap("seal", weights.seal)
        policy_model.shutil = types.SimpleNamespace(rmtree=self.wrap("prune", shutil.rmtree))  # its one use

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[name] += time.perf_counter() - t0
        return timed

    def take(self) -> dict[str, float]:
        times, self.times = dict(self.times), defaultdict(float)
        return times


def whole_step(t: Trainer, clock: PartClock) -> dict[str, float]:
    clock.take()  # drop what (a)'s policy_update left in the wrapped optimize functions
    t0 = time.perf_counter()
    groups, streamed = t.gather(t.cfg.prompt_groups_per_step)
    assert len(groups) == t.cfg.prompt_groups_per_step and streamed is None, (len(groups), streamed)
    t.train_step(groups, wait_time=0.0)
    total = time.perf_counter() - t0
    parts = clock.take()
    parts["total"] = total
    parts["backward_rest"] = parts["policy_update"] - sum(
        parts.get(k, 0.0) for k in ("token_logprobs", "compute_loss", "clip_and_step", "all_finite"))
    parts["save"] = parts.get("write_model_dir", 0.0) - parts.get("seal", 0.0)
    return parts


# ----------------------------------------------------------------- rounds
def run_setting(t: Trainer, r, batch, clock: PartClock, threads: int, rounds: int, warmup: int,
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
        n = round_base + i
        # (a) trains on decoded samples, as the trainer gets them from the stream.
        decoded = [[decode(encode(s), expect=RolloutSample) for s in g] for g in stamped(batch, n, t.version, "a")]
        prefill(r, cfg.run_id, stamped(batch, n, t.version), t.version)
        order = ("bare", "optimize", "step") if i % 2 == 0 else ("step", "optimize", "bare")
        row: dict[str, float] = {}
        for which in order:
            if which == "bare":
                part = {}
                t0 = time.perf_counter()
                bare_step(t.model, bare_opt, tokens_B_N, attention_B_N, mask_B_T, rewards_P_G, cfg.eps_clip, part)
                row["bare"] = time.perf_counter() - t0
                row.update({f"bare.{k}": v for k, v in part.items()})
            elif which == "optimize":
                part: dict[str, float] = {}
                t0 = time.perf_counter()
                rlstream_optimize(t, decoded, cfg.learning_rate, part)
                row["optimize"] = time.perf_counter() - t0
                row.update({f"optimize.{k}": v for k, v in part.items()})
            else:
                row.update({f"step.{k}": v for k, v in whole_step(t, clock).items()})
        if i >= warmup:
            for key, value in row.items():
                samples[key].append(value)
    return samples


def environment(r, threads_default: int, cfg) -> str:
    info = r.info("server")
    return (f"{datetime.date.today()}  {platform.machine()} {platform.processor() or ''}  "
            f"cpus {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})  "
            f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start\n"
            f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
            f"redis-server {info['redis_version']} (embedded, AOF everysec)\n"
            f"torch threads: process default {threads_default}, rlstream torch_threads {cfg.torch_threads}\n"
            f"config {CONFIG.relative_to(REPO)}: {cfg.base_model}, {cfg.prompt_groups_per_step} groups x "
            f"{cfg.completions_per_prompt}, {cfg.max_completion_tokens}-token completions, {cfg.policy_loss}, "
            f"kl_beta {cfg.kl_beta}, lr {cfg.learning_rate:g}, weight_sync_interval {cfg.weight_sync_interval}, "
            f"dcp_save_interval {cfg.dcp_save_interval}")


ROWS = [  # (label, key): None key = a section line
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
    ("  gather (XREADGROUP, decode, groups, advantages, events fold)", "step.gather"),
    ("  optimize (collate + policy_update)", "step.optimize"),
    ("    collate", "step.collate"),
    ("    policy_update", "step.policy_update"),
    ("      token_logprobs (forward, eval/train switch)", "step.token_logprobs"),
    ("      compute_loss (loss + 9 metrics)", "step.compute_loss"),
    ("      zero_grad + backward + the rest", "step.backward_rest"),
    ("      clip_and_step (grad norm + AdamW)", "step.clip_and_step"),
    ("      all_finite (every weight checked)", "step.all_finite"),
    ("  write_weights (save_pretrained, fsync, sha256, rename)", "step.write_weights"),
    ("    model + tokenizer save_pretrained", "step.save"),
    ("    seal (fsync x8, sha256, manifest, rename, fsync dir)", "step.seal"),
    ("    prune the version past keep_weights (rmtree)", "step.prune"),
    ("  live_run (rollout stats, perf line)", "step.live_run"),
    ("  step_metrics + step_record", None),
    ("  commit_step (Lua: XADD, XACK x256, record)", "step.commit_step"),
    ("  publish (XADD WeightsPublished)", "step.publish"),
    ("  log_metrics (metrics.jsonl)", "step.log_metrics"),
]


def med_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else 0.0


def table(results: dict[int, dict], rounds: int) -> str:
    settings = list(results)
    head = "| part | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}: ms | ratio to bare" for n in settings) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(settings)]
    for label, key in ROWS:
        cells = []
        for n in settings:
            s = results[n]
            if key is None:
                ms = med_ms([a + b for a, b in zip(s.get("step.step_metrics", []), s.get("step.step_record", []))])
            else:
                ms = med_ms(s.get(key, []))
            cells.append(f"{ms:.2f} | {ms / med_ms(s['bare']):.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nmedians of {rounds} rounds per setting; ratio = the part's median / the bare step's median")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=60, help="measured rounds per thread setting")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread settings (default: the process's default and rlstream's torch_threads)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override (field=value)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_default = torch.get_num_threads()  # before the Trainer sets its own
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        try:
            cfg = load_config(CONFIG, [f'log_path="{tmp}/runs"', 'run_id="overhead"', f'redis.url="{url}"',
                                       *args.extra])
            total_steps = (args.warmup + args.rounds) * len(args.threads or [1, 2])
            if cfg.max_steps is not None and total_steps >= cfg.max_steps:
                raise SystemExit(f"{total_steps} steps would reach max_steps {cfg.max_steps}: fewer rounds")
            r = client(url)
            t = Trainer(cfg, r, cfg.run_dir())
            bus.ensure_group(r, keys.rollouts(cfg.run_id))
            t.resume()  # takes the trainer lease, as Trainer.run does
            t.perf.restart(t.state, bus.rollout_stats(r, cfg.run_id))
            print(environment(r, threads_default, cfg), flush=True)
            batch = draw_batch(t, cfg.seed)
            print(f"batch: {sum(len(g) for g in batch)} sequences of {len(batch[0][0][0])} tokens, reward mean "
                  f"{statistics.mean(x[2] for g in batch for x in g):.3f}", flush=True)
            settings = args.threads or list(dict.fromkeys([threads_default, cfg.torch_threads]))
            results, base, clock = {}, 0, PartClock(t)
            for n in settings:
                results[n] = run_setting(t, r, batch, clock, n, args.rounds, args.warmup, base)
                base += args.rounds + args.warmup
            checkpoints = [v for s in results.values() for v in s.get("step.checkpoint", []) if v > 0]
            print()
            print(table(results, args.rounds))
            if checkpoints:
                print(f"checkpoints (every {cfg.dcp_save_interval} steps, inside the whole step's rounds): "
                      + ", ".join(f"{1000 * v:.0f} ms" for v in checkpoints))
            print(f"trainer reached step {t.step}; load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end "
                  f"({load_start[0]:.2f} at start)")
            t.lease.release()
            r.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
