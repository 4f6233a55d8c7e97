"""The trainer's step across ranks (FSDP2, trainer/ranks.py): per-rank bytes of parameters,
gradients and AdamW state, peak memory and step time, at 1 and 2 ranks.

    python bench/trainer_ranks.py                        # 1 rank x 1 thread, 1 x 2, 2 ranks x 1 thread
    python bench/trainer_ranks.py --rounds 3 --rows 8 --tokens 128

A ~50M-parameter Qwen2 model built from a transformers config (vocabulary 32000, hidden 512,
10 layers, tied embeddings; random weights, nothing downloaded) runs ``policy_update`` (the
trainer's step: grpo, token_mean, AdamW, float32) on B rows x N tokens (a 32-token prompt, the
rest trained). A variant ``RxT`` is R ranks of T torch threads: R = 1 is one plain process
(``ranks.SINGLE``, no process group), R > 1 runs under ``torch.distributed.run --standalone``
(gloo), each rank sharding the model (``ranks.shard``) and training its share of the batch.

Each rank reports, after a warm-up step (AdamW's state exists from the first step on) and
``--steps`` timed ones: the bytes of its local parameter, gradient and optimizer-state tensors
(a DTensor's local shard: what that rank holds), its step time (the step's is the slowest
rank's), its resident set once the model is sharded and after the steps (/proc/self/status),
and ``getrusage(RUSAGE_SELF).ru_maxrss`` (the peak resident set). The model is written once as an HF
directory and loaded as the trainer loads it (``policy_model.load_base``): one process reads it
whole; across ranks rank 0 reads it onto the CPU and the other ranks build it on the meta device,
their shards filled from rank 0's (docs/design.md §15.94 Only rank 0 reads the weights; the others
build the model on the meta device). On the CPU the resident set does not tell the two loads
apart: ``from_pretrained`` maps the safetensors file, whose pages are the page cache's, shared by
the ranks, and the step's activations set the peak; on a GPU ``cuda_peak_bytes`` does (the whole
model on each device before, its shard now). The children run with ``MALLOC_MMAP_THRESHOLD_=131072``:
glibc otherwise raises its mmap threshold each time a large block is freed (up to 32 MiB),
after which FSDP's per-layer gather and reduce buffers (a few MiB each, allocated and freed
every layer) come from the heap and stay resident once freed, and the resident set measures
the allocator rather than the tensors (measured: +400 MiB on each of two ranks, 50M model).
Variants are interleaved round by round, so load on the machine hits them alike; a ratio is
only read within one run. Not a test (docs/design.md §13 Tests). On a GPU node, the same child
under torchrun (nccl, chosen from the device; each rank prints its report as a JSON line):

    torchrun --standalone --nproc-per-node 8 bench/trainer_ranks.py --child --device cuda --rows 64 --tokens 1024
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date


def child(args: argparse.Namespace) -> dict:
    import torch

    from rlstream.core.config import Config
    from rlstream.trainer.batch import Batch
    from rlstream.trainer.optimize import make_optimizer, policy_update
    from rlstream.trainer.policy_model import load_base
    from rlstream.trainer.ranks import close, init_ranks, local, shard

    torch.set_num_threads(args.threads)
    ranks = init_ranks(torch.device(args.device), timeout_s=1800)
    device = ranks.device
    model, _ = load_base(args.model, device, ranks)  # as the trainer loads it (rank 0 reads, the others: meta)
    model = model.to(device).eval() if not ranks.distributed else model.eval()
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    built = rss_kib()
    shard(model, ranks)
    sharded = rss_kib()
    cfg = Config(prompt_groups_per_step=args.rows, completions_per_prompt=2, policy_loss="grpo", kl_beta=0.0)
    optimizer = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    B, N = args.rows, args.tokens
    tokens = torch.randint(0, config.vocab_size, (B, N), generator=g)
    mask = torch.zeros(B, N - 1)
    mask[:, 31:] = 1.0
    inf = -torch.log(torch.tensor(float(config.vocab_size))) + 0.1 * torch.randn(B, N - 1, generator=g)
    batch = Batch(*(t.to(device) for t in (tokens, torch.ones_like(tokens), inf, mask, torch.randn(B, generator=g))))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, metrics = [], {}
    for _ in range(1 + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = policy_update(model, optimizer, batch, cfg=cfg, lr=1e-5, ranks=ranks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    def nbytes(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    out = {"rank": ranks.rank, "world": ranks.world, "params": params,
           "param_bytes": nbytes(model.parameters()),
           "grad_bytes": nbytes(p.grad for p in model.parameters() if p.grad is not None),
           "state_bytes": nbytes(state), "before_kib": before, "rss_built_kib": built, "rss_sharded_kib": sharded,
           "rss_end_kib": rss_kib(),
           "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "step_s": times[1:],
           "loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"]}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if args.out:
        with open(f"{args.out}.{ranks.rank}", "w") as f:
            json.dump(out, f)
    else:
        print(json.dumps(out))
    close(ranks)
    return out


def write_model(directory: str, tokens: int) -> str:
    """The benchmark's model as an HF directory (random weights, seed 0), which every variant
    loads as the trainer does."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlstream.builtin.tiny_model import build_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=tokens,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def rss_kib() -> int:
    """The resident set now (Linux's /proc/self/status VmRSS), KiB; 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def run_variant(args: argparse.Namespace, variant: str, scratch: str) -> list[dict]:
    """One variant ``RxT`` in its own process(es): each rank's report."""
    world, threads = (int(x) for x in variant.split("x"))
    child_args = ["--child", "--model", args.model, "--rows", str(args.rows), "--tokens", str(args.tokens),
                  "--steps", str(args.steps), "--threads", str(threads), "--out", scratch]
    if world == 1:
        cmd = [sys.executable, __file__, *child_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               __file__, *child_args]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # fixed: see the module's docstring
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant}: failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    reports = []
    for r in range(world):
        with open(f"{scratch}.{r}") as f:
            reports.append(json.load(f))
        os.remove(f"{scratch}.{r}")
    return reports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run, after one warm-up step")
    p.add_argument("--variants", nargs="+", default=["1x1", "1x2", "2x1"], help="RANKSxTHREADS")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help="one rank's side (under torchrun for several ranks)")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="the child's device: cpu (gloo) or cuda (nccl)")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)  # the HF directory main() writes
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        from rlstream.torchrun import end_rank

        end_rank(0)  # a rank ends without the interpreter's finalization, where gloo's threads can abort it
    import tempfile

    import torch
    import transformers

    print(f"trainer ranks benchmark  {date.today()}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {os.getloadavg()[0]:.2f} at start")
    print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"{args.rows} x {args.tokens} tokens, {args.steps} timed steps after a warm-up, {args.rounds} rounds "
          "interleaved")
    results: dict[str, list[list[dict]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as scratch:
        args.model = write_model(os.path.join(scratch, "model"), args.tokens)
        for _ in range(args.rounds):
            for v in args.variants:
                results[v].append(run_variant(args, v, os.path.join(scratch, "rank")))
    first = results[args.variants[0]][0][0]
    print(f"model: {first['params'] / 1e6:.1f}M parameters, float32; bytes are one rank's local tensors (rank 0's; "
          "every rank's within a row of the shard); RSS the largest rank's: once sharded, after the steps, and the "
          "peak; step time: median over rounds and timed steps of the slowest rank\n")
    print("| ranks x threads | parameters (MiB/rank) | gradients (MiB/rank) | AdamW state (MiB/rank) | "
          "RSS sharded (MiB) | RSS after (MiB) | peak RSS (MiB) | step time (s) | vs first | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    mib = 1 / 2 ** 20
    base = None
    for v, rounds in results.items():
        r0 = rounds[0][0]
        peak = max(r["peak_kib"] for ranks in rounds for r in ranks) / 1024
        sharded = max(r["rss_sharded_kib"] for ranks in rounds for r in ranks) / 1024
        after = max(r["rss_end_kib"] for ranks in rounds for r in ranks) / 1024
        steps = [max(r["step_s"][i] for r in ranks) for ranks in rounds for i in range(args.steps)]
        median = statistics.median(steps)
        base = base or median
        held = " | ".join(f"{r0[k] * mib:,.1f}" for k in ("param_bytes", "grad_bytes", "state_bytes"))
        spread = f"{median:.2f} ({min(steps):.2f}-{max(steps):.2f})"
        rss = f"{sharded:,.0f} | {after:,.0f} | {peak:,.0f}"
        print(f"| {v} | {held} | {rss} | {spread} | {median / base:.2f} | {r0['loss']:.6g} | {r0['grad_norm']:.6g} |")


if __name__ == "__main__":
    main()
