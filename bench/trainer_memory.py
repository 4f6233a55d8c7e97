"""Peak memory and time of one trainer step, whole batch against micro-batches.

    python bench/trainer_memory.py                       # 32 x 400 tokens: whole batch vs budget 2048
    python bench/trainer_memory.py --variants whole 4096 2048 1024 2048:bfloat16 2048:checkpointing --rounds 3
    python bench/trainer_memory.py --prompt 300 --vocab 32768 --baseline ../old-tree   # this code vs another tree's

A ~10M-parameter Qwen2 model built from a transformers config (vocabulary 8192 unless
``--vocab``, hidden 256, 8 layers; random weights, nothing downloaded) runs ``policy_update``
(the trainer's own step: grpo, token_mean, AdamW) on a batch of B rows x N tokens (a
``--prompt``-token prompt, 100 unless given, the rest trained), once per variant: ``whole``
(one forward), or a ``micro_batch_tokens`` budget, optionally with ``:bfloat16`` /
``:float16`` (``trainer.dtype``) and ``:checkpointing`` (``trainer.gradient_checkpointing``).

``--baseline DIR`` runs every variant also with another tree's code (DIR/.venv's Python, in
which that tree is installed, running this script's child), round by round beside this
tree's: how a change to the step moves its memory and time on the same machine at the same
moment.

Each variant is a child process of its own (``--child``), so that its peak resident set is
its own: the child reports ``getrusage(RUSAGE_SELF).ru_maxrss`` once the step is done
(RUSAGE_CHILDREN in the parent would give the largest child so far, and tracemalloc does not
see torch's CPU tensors), and also its peak just before the step (Python, torch, the model;
AdamW's state is allocated by the step itself), so the step's own increment is shown. Variants are
interleaved round by round, so load on the machine hits them alike. Not a test: nothing under
tests/ runs it, and timings are never asserted (docs/design.md §13 Tests).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlstream.core.config import Config
    from rlstream.trainer.batch import Batch
    from rlstream.trainer.optimize import make_optimizer, policy_update
    from rlstream.trainer.precision import prepare

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.tokens,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).train()
    params = sum(p.numel() for p in model.parameters())
    cfg = Config(prompt_groups_per_step=args.rows, completions_per_prompt=2, policy_loss="grpo", kl_beta=0.0,
                 trainer={"micro_batch_tokens": args.budget, "dtype": args.dtype})
    precision = prepare(model, args.dtype, torch.device("cpu"), gradient_checkpointing=args.checkpointing)
    optimizer = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    B, N = args.rows, args.tokens
    tokens = torch.randint(0, config.vocab_size, (B, N), generator=g)
    mask = torch.zeros(B, N - 1)
    mask[:, args.prompt - 1:] = 1.0  # the prompt's tokens, then the generated ones (trained)
    # Behaviour logprobs near the random model's own (about -log V), so the TIS weights are about 1.
    inf = -math.log(config.vocab_size) + 0.1 * torch.randn(B, N - 1, generator=g)
    batch = Batch(tokens, torch.ones_like(tokens), inf, mask, torch.randn(B, generator=g))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    metrics = policy_update(model, optimizer, batch, cfg=cfg, lr=1e-5, precision=precision)
    step_s = time.perf_counter() - t0
    return {"params": params, "before_kib": before, "step_s": step_s, "micro_batches": metrics["train/micro_batches"],
            "loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"],
            "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run_variant(args: argparse.Namespace, variant: str, python: str = sys.executable) -> dict:
    budget, *options = variant.split(":")
    dtype = next((o for o in options if o in ("bfloat16", "float16")), "float32")
    cmd = [python, __file__, "--child", "--rows", str(args.rows), "--tokens", str(args.tokens),
           "--prompt", str(args.prompt), "--vocab", str(args.vocab), "--threads", str(args.threads), "--dtype", dtype]
    cmd += [] if budget == "whole" else ["--budget", str(int(budget))]
    cmd += ["--checkpointing"] if "checkpointing" in options else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant}: child failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--prompt", type=int, default=100, help="prompt tokens of each row (the rest are trained)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--baseline", type=Path, default=None,
                   help="another tree (with DIR/.venv) whose code runs every variant too, round by round")
    p.add_argument("--variants", nargs="+", default=["whole", "2048"],
                   help="whole | BUDGET[:bfloat16|:float16][:checkpointing]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if not 1 <= args.prompt < args.tokens:
        raise SystemExit(f"--prompt {args.prompt}: between 1 and --tokens - 1 ({args.tokens - 1})")
    trees = {"": sys.executable}
    if args.baseline is not None:
        python = args.baseline.resolve() / ".venv/bin/python"
        if not python.exists():
            raise SystemExit(f"--baseline {args.baseline}: no {python}; install that tree first "
                             "(python3 -m venv .venv && .venv/bin/pip install -e .)")
        trees = {"this tree: ": sys.executable, "baseline: ": str(python)}
    variants = [tree + v for v in args.variants for tree in trees]
    print(f"trainer memory benchmark  {date.today()}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {os.getloadavg()[0]:.2f} at start")
    import torch
    import transformers

    print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"{args.rows} x {args.tokens} tokens ({args.prompt}-token prompts), vocabulary {args.vocab}, "
          f"{args.threads} torch thread(s), {args.rounds} rounds interleaved"
          + (f"; baseline {args.baseline}" if args.baseline else ""))
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for tree_variant in variants:
            tree = next(t for t in trees if tree_variant.startswith(t))
            results[tree_variant].append(run_variant(args, tree_variant[len(tree):], trees[tree]))
    first = results[variants[0]][0]
    print(f"model: {first['params'] / 1e6:.1f}M parameters; peak RSS is the process's (Python, torch and the "
          "model included), 'the step' its growth during the step; step time: mean (min-max)\n")
    print("| variant | forwards | peak RSS (MiB) | the step (MiB) | vs first | step time (s) | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|")
    base = max(r["peak_kib"] - r["before_kib"] for r in results[variants[0]])
    for v, runs in results.items():
        peak = max(r["peak_kib"] for r in runs) / 1024
        step = max(r["peak_kib"] - r["before_kib"] for r in runs)
        times = [r["step_s"] for r in runs]
        print(f"| {v} | {runs[0]['micro_batches']} | {peak:,.0f} | {step / 1024:,.0f} | {step / base:.0%} | "
              f"{sum(times) / len(times):.1f} ({min(times):.1f}-{max(times):.1f}) | {runs[0]['loss']:.6g} | "
              f"{runs[0]['grad_norm']:.6g} |")


if __name__ == "__main__":
    main()
