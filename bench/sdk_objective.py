"""What running a custom objective in the trainer's process saves (docs/design.md §15.65 The SDK
trains in the caller's process): one ``forward_backward_custom`` as rlstream.sdk runs it (one
forward with a graph, the objective on its logprobs, one backward) next to the hosted SDK's
two-pass scheme (a forward without a graph returns logprobs; the client makes them leaf
tensors, runs the objective, and sends dloss/dlogprobs back; the server runs a forward with a
graph and backpropagates the per-token weighted logprobs), both in this process, so the
hosted scheme's network round trips are *not* counted: its ratio is a lower bound.

Both produce the same gradients (checked, max difference printed). Variants are interleaved
round by round; the medians and their ratio are printed.

    python bench/sdk_objective.py                       # 1M-parameter Qwen2, 8 x 128 tokens, 9 rounds (~25 s)
    python bench/sdk_objective.py --hidden 256 --layers 4 --vocab 8192 --batch 16 --tokens 256 --rounds 5 --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from rlstream.sdk.training import datum_logprobs
from rlstream.sdk.types import Datum
from rlstream.trainer.precision import Precision


def objective(data, logprobs_list):
    """A GRPO-like objective: advantage-weighted mean logprob of each sequence's second half."""
    losses = [-d.loss_fn_inputs["advantage"] * lp[len(lp) // 2:].mean() for d, lp in zip(data, logprobs_list)]
    return torch.stack(losses).mean(), {}


def in_process(model, data, device) -> None:
    loss, _ = objective(data, datum_logprobs(model, data, 0, Precision(), device))
    loss.backward()


def two_pass(model, data, device) -> None:
    with torch.no_grad():  # the server's forward: logprobs only
        served = datum_logprobs(model, data, 0, Precision(), device)
    leaves = [lp.clone().requires_grad_(True) for lp in served]  # the client's leaf tensors
    loss, _ = objective(data, leaves)
    weights = torch.autograd.grad(loss, leaves)  # dloss/dlogprobs, sent back as per-token weights
    logprobs_list = datum_logprobs(model, data, 0, Precision(), device)  # the server's second forward
    torch.stack([(w * lp).sum() for w, lp in zip(weights, logprobs_list)]).sum().backward()


def timed(fn, model, data, device) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    fn(model, data, device)
    elapsed = time.perf_counter() - t0
    return elapsed, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.tokens, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    device = torch.device("cpu")
    data = [Datum(tokens=torch.randint(3, args.vocab, (args.tokens,)).tolist(),
                  loss_fn_inputs={"advantage": float(torch.randn(()))}) for _ in range(args.batch)]
    print(f"rlstream.sdk objective benchmark  {datetime.date.today()}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {os.getloadavg()[0]:.2f} at start  torch {torch.__version__}  {args.threads} threads")
    print(f"Qwen2 {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.batch} x {args.tokens} "
          f"tokens, {args.rounds} rounds, variants interleaved")
    times: dict[str, list[float]] = {"in-process": [], "two-pass": []}
    timed(in_process, model, data, device)  # warm-up
    max_diff = 0.0
    for _ in range(args.rounds):
        t_in, g_in = timed(in_process, model, data, device)
        t_two, g_two = timed(two_pass, model, data, device)
        times["in-process"].append(t_in)
        times["two-pass"].append(t_two)
        max_diff = max(max_diff, max(float((g_in[n] - g_two[n]).abs().max()) for n in g_in))
    print(f"gradients equal: max |difference| {max_diff:.2e}")
    for name, values in times.items():
        print(f"{name:<11} median {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    ratio = statistics.median(times["two-pass"]) / statistics.median(times["in-process"])
    print(f"ratio two-pass / in-process (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
