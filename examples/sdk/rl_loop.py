"""The seed's rl_loop training loop on ``rlstream.sdk``, runnable on the built-in model:
sample a group of completions per prompt through the deployment sampler, score them, skip
groups whose rewards are all equal, build GRPO datums, take reference logprobs, run a custom
objective with ``forward_backward_custom``, ``optim_step`` with ``AdamParams``, and every
``--sync-every`` steps save sampler weights and hotload them into the deployment.

    python examples/sdk/rl_loop.py --steps 60

Compared with the seed's loop: the imports and the model names; ``--groups`` prompts per step
(the seed takes one row per step), so that the tiny model learns in seconds; and, since the
sampler is synced only every ``--sync-every`` steps, a PPO-clipped objective against the
sampling logprobs (``build_clipped_datums`` / ``make_clipped_grpo_loss_fn`` below) where the
seed's on-policy loop uses ``rlstream.sdk.build_grpo_datums`` / ``make_grpo_loss_fn``. The
seed's ``WeightSyncer(...).save_and_hotload(name)`` syncs the deployment, so the sampler made
once samples the new weights. The last line printed is a JSON summary (first and last rewards,
the run id).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics

import torch

from rlstream.builtin.task import builtin_rows, exact_match_reward
from rlstream.sdk import AdamParams, AdaptiveConcurrencyController, Datum, ServiceClient, WeightSyncer

BASE_MODEL = "builtin:tiny"  # the seed: "accounts/fireworks/models/qwen3-8b"


def build_clipped_datums(completions, rewards: list[float]) -> list[Datum]:
    """One datum per completion: its tokens, its group-relative advantage, where the
    completion starts, and the logprobs it was sampled with (for the importance ratio)."""
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    return [Datum(tokens=c.full_tokens, loss_fn_inputs={
        "advantage": (r - mean) / (std + 1e-6), "prompt_len": c.prompt_len,
        "inference_logprobs": list(c.inference_logprobs)}) for c, r in zip(completions, rewards)]


def make_clipped_grpo_loss_fn(ref_logprobs: list[list[float]], kl_beta: float, clip: float = 0.2):
    """PPO-clipped GRPO on the completion tokens (the ratio against the sampling logprobs
    corrects a sampler that is a few steps behind), plus a k3 KL to the reference."""

    def loss_fn(data: list[Datum], logprobs_list: list[torch.Tensor]):
        losses, kls = [], []
        for d, lp, ref in zip(data, logprobs_list, ref_logprobs):
            start = d.loss_fn_inputs["prompt_len"] - 1  # logprob t is of token t + 1
            new_T = lp[start:]
            old_T = torch.tensor(d.loss_fn_inputs["inference_logprobs"], dtype=new_T.dtype)
            ratio_T = torch.exp(new_T - old_T)
            adv = d.loss_fn_inputs["advantage"]
            surrogate_T = torch.minimum(ratio_T * adv, ratio_T.clamp(1 - clip, 1 + clip) * adv)
            log_r_T = torch.tensor(ref[start:], dtype=new_T.dtype) - new_T
            kl_T = torch.exp(log_r_T) - log_r_T - 1
            losses.append(-(surrogate_T - kl_beta * kl_T).mean())
            kls.append(float(kl_T.detach().mean()))
        loss = torch.stack(losses).mean()
        return loss, {"loss": float(loss.detach()), "kl": statistics.fmean(kls)}

    return loss_fn


async def sample_groups(sampler, rows, group_size: int):
    """Every prompt's group at once: the local deployment batches them into one generate."""
    calls = [sampler.sample_with_tokens(messages=row["messages"], n=group_size, max_tokens=1) for row in rows]
    return await asyncio.gather(*calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--groups", type=int, default=16, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--kl-beta", type=float, default=0.001)
    ap.add_argument("--sync-every", type=int, default=2, help="save sampler weights and hotload every N steps")
    ap.add_argument("--log-path", default="runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    service = ServiceClient.from_config(base_model=BASE_MODEL, lora_rank=0, learning_rate=args.lr,
                                        replica_count=1, log_path=args.log_path, seed=args.seed)
    try:
        policy = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        reference = service.create_reference_client(BASE_MODEL, lora_rank=0)
        tokenizer = policy.get_tokenizer()
        # As the seed: the controller bounds the requests in flight to an inference server (a local
        # deployment, as here by default, samples in one generate and does not need it).
        controller = AdaptiveConcurrencyController(initial_window=16)
        sampler = service.create_deployment_sampler(tokenizer=tokenizer, concurrency_controller=controller)
        tracker = WeightSyncer(policy_client=policy, deploy_mgr=service, base_model=BASE_MODEL)
        rows = [{"messages": [{"role": "user", "content": r["prompt"].removesuffix("=")}], "answer": r["answer"]}
                for r in builtin_rows(args.steps * args.groups, args.seed)]
        step_rewards = []
        for step in range(args.steps):
            batch = rows[step * args.groups:(step + 1) * args.groups]
            groups = asyncio.run(sample_groups(sampler, batch, args.group_size))
            datums, all_rewards = [], []
            for row, completions in zip(batch, groups):
                rewards = [exact_match_reward(c.text, row["answer"]) for c in completions]
                all_rewards += rewards
                if len(set(rewards)) == 1:
                    continue  # no learning signal
                datums += build_clipped_datums(completions, rewards)
            step_rewards.append(statistics.fmean(all_rewards))
            if datums:
                ref_fwd = reference.forward(datums, "cross_entropy")
                ref_logprobs = [list(x["logprobs"].data) for x in ref_fwd.loss_fn_outputs]
                policy.forward_backward_custom(datums, make_clipped_grpo_loss_fn(ref_logprobs, args.kl_beta)).result()
                policy.optim_step(AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.999, eps=1e-8,
                                             weight_decay=0.01, grad_clip_norm=1.0)).result()
            if (step + 1) % args.sync_every == 0:  # the sampler above samples the synced weights from now on
                tracker.save_and_hotload(f"step-{step + 1:05d}")
            print(f"step {step + 1} reward {step_rewards[-1]:.3f} datums {len(datums)}", flush=True)
        k = max(1, min(10, len(step_rewards) // 3))
        print(json.dumps({"run_id": service.trainer_job_id, "steps": args.steps, "policy_steps": policy.step,
                          "reward_first": statistics.fmean(step_rewards[:k]),
                          "reward_last": statistics.fmean(step_rewards[-k:])}))
    finally:
        service.close()


if __name__ == "__main__":
    main()
