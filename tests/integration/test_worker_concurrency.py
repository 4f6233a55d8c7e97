"""One ``rlstream worker`` process with the openai backend holds many prompt groups at once
(docs/design.md §15.50 Many groups in flight per worker): against a stand-in server
(bench/standin_server.py, in this process) whose requests take a while, it keeps
``inference.max_concurrency`` = 64 completions in flight across groups of 4 (16 requests of
n = 4, each group's draws merged: §15.74 One request per group) with
``workers.concurrency_control = "fixed"``, never more, and every group is sampled exactly
once (a SIGTERM with groups in flight: tests/e2e/test_elastic_workers.py). Its window is one of
requests, not groups (§15.73 A request-level window): groups each waiting on one straggler do not idle the rest of it.
Real redis-server, real worker process; asserts counts, never timings."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from factories import legacy_config
from polling import wait_until
from rq.registry import StartedJobRegistry

from rlstream.builtin.task import builtin_rows
from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.jobs import job_queue
from rlstream.core.messages import GroupRejected, GroupSampled, WeightsPublished
from rlstream.producers.producer import admit

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from standin_server import StandinServer  # noqa: E402

GROUP, WINDOW, GROUPS = 4, 64, 24


def start_worker(cfg: Config, tmp_path: Path, password: str) -> tuple[subprocess.Popen, Path]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # the URL without its password, as `up` writes it
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlstream.cli", "worker", str(config)], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, PASSWORD_ENV: password})
    return proc, log


def events_of(r, run_id: str, kind: type) -> list:
    return [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, kind)]


def worker_on_admitted_groups(r, redis_server, run_id, tmp_path, server, groups: int, *, job_timeout: int,
                              inference: dict, **sections):
    """Start ``server``, admit ``groups`` built-in rows at v0 (weights v0 published), then one
    ``rlstream worker`` sampling them from the server: (its queue, its process, its log)."""
    base = server.start()
    model = save_tiny_model(tmp_path / "tiny")
    cfg = legacy_config(run_id=run_id, log_path=str(tmp_path / "runs"), base_model=str(model),
                        tokenizer_model=str(model), completions_per_prompt=GROUP, max_completion_tokens=1,
                        max_seq_len=16, job_timeout=job_timeout, redis={"url": redis_server.url},
                        inference={"backend": "openai", "base_url": f"{base}/v1", **inference}, **sections)
    bus.xadd(r, keys.events(run_id), WeightsPublished(version=0, uri="v0", sha256="0" * 64, bytes=1))
    queue = job_queue(r, cfg)
    for i, row in enumerate(builtin_rows(groups, seed=0)):
        admit(r, queue, cfg, 0, i, row, 0)
    proc, log = start_worker(cfg, tmp_path, redis_server.password)
    return queue, proc, log


def test_one_worker_keeps_max_concurrency_requests_in_flight_across_groups(r, redis_server, run_id, tmp_path):
    server = StandinServer("const:1.0", vocab_size=16)
    queue, proc, log = worker_on_admitted_groups(r, redis_server, run_id, tmp_path, server, GROUPS, job_timeout=60,
                                                 inference={"max_concurrency": WINDOW, "merge_requests": True},
                                                 # the window under test is the fixed one (the default adapts)
                                                 workers={"concurrency_control": "fixed"})
    try:
        # Many groups in flight at once, each with its own rq execution in the started registry.
        started = StartedJobRegistry(queue=queue)
        wait_until(lambda: len(started.get_job_ids()) >= WINDOW // GROUP, 90,
                   f"{WINDOW // GROUP} jobs started at once", interval=0.05)
        wait_until(lambda: server.peak_in_flight >= WINDOW, 60, f"{WINDOW} completions in flight", interval=0.05)
        wait_until(lambda: len(events_of(r, run_id, GroupSampled)) == GROUPS, 120, "every group sampled",
                   interval=0.2)
        assert server.peak_in_flight == WINDOW, server.stats  # the window is filled and never exceeded
        # one request of n = G per group (two groups of one prompt drawn together may share one)
        assert server.requests <= GROUPS, server.stats
        assert not events_of(r, run_id, GroupRejected), log.read_text()[-3000:]
        sampled = events_of(r, run_id, GroupSampled)
        assert len({g.group_id for g in sampled}) == GROUPS and all(g.samples == GROUP for g in sampled)

        proc.send_signal(signal.SIGTERM)  # idle now: rq's warm shutdown
        try:
            assert proc.wait(60) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within 60 s of its SIGTERM:\n{log.read_text()[-3000:]}")
        assert not started.get_job_ids() and not queue.job_ids  # nothing left behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


class StragglerServer(StandinServer):
    """Every ``every``-th request (in arrival order) is a straggler: it stays in flight until the
    test lets it go; the others are answered at once. With ``every`` = G, a group's worth of
    requests brings one straggler."""

    def __init__(self, every: int):
        super().__init__("const:0.0", vocab_size=16)
        self.every, self.arrivals, self.stragglers = every, 0, 0
        self.let_go = threading.Event()

    async def _complete(self, request):
        self.arrivals += 1
        if self.arrivals % self.every:
            return await super()._complete(request)
        self.requests += 1
        self.in_flight += 1
        self.stragglers += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            while not self.let_go.is_set():
                await asyncio.sleep(0.02)
            return 200, {"choices": [self._choice(i, int(request["max_tokens"])) for i in range(int(request["n"]))]}
        finally:
            self.in_flight -= 1


def test_groups_waiting_on_stragglers_do_not_idle_the_request_window(r, redis_server, run_id, tmp_path):
    """docs/design.md §15.73 A request-level window: with one straggler per G requests, each
    group held soon has one request in flight and G - 1 finished; the worker takes more groups
    until the stragglers alone fill its window of 16, so requests in flight stay at the window
    (counting groups, 16 / 4 = 4 groups would hold 4 or 5 requests and wait). The window is never
    exceeded, and once the stragglers answer every group is sampled exactly once. Each draw is
    its own request here (``merge_requests`` off): a straggler is one draw of its group."""
    window, groups = 16, 24
    server = StragglerServer(every=GROUP)
    queue, proc, log = worker_on_admitted_groups(r, redis_server, run_id, tmp_path, server, groups, job_timeout=120,
                                                 inference={"max_concurrency": window, "merge_requests": False},
                                                 workers={"concurrency_control": "fixed"})
    try:
        wait_until(lambda: server.in_flight >= window, 60,
                   f"{window} requests in flight (stragglers holding {window} groups)", interval=0.05)
        # The stragglers alone fill the window: nothing else is answered until one of them is.
        assert server.in_flight == window and server.stragglers == window, server.stats
        started = StartedJobRegistry(queue=queue)
        assert len(started.get_job_ids()) > window // GROUP  # more groups held than the window has groups of G
        server.let_go.set()
        wait_until(lambda: len(events_of(r, run_id, GroupSampled)) == groups, 120, "every group sampled",
                   interval=0.2)
        assert server.peak_in_flight == window, server.stats  # filled, never exceeded
        assert not events_of(r, run_id, GroupRejected), log.read_text()[-3000:]
        sampled = events_of(r, run_id, GroupSampled)
        assert len({g.group_id for g in sampled}) == groups and all(g.samples == GROUP for g in sampled)
        assert int(r.hget(keys.rollout_stats(run_id), "rollout_failures") or 0) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert not started.get_job_ids() and not queue.job_ids  # nothing left behind
    finally:
        server.let_go.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


@pytest.mark.slow
def test_an_adaptive_worker_backs_off_a_server_that_refuses_above_its_capacity(r, redis_server, run_id, tmp_path):
    """``workers.concurrency_control = "adaptive"`` against a server answering 429 beyond 24
    requests in flight: the worker probes past it, backs off, and every group is sampled
    (no failed draw, no rejected group). The default suite checks the same through the
    remote sampler (tests/unit/test_concurrency_control.py)."""
    capacity, groups = 24, 120
    server = StandinServer("const:0.3", capacity=capacity, vocab_size=16)
    _, proc, log = worker_on_admitted_groups(r, redis_server, run_id, tmp_path, server, groups, job_timeout=120,
                                             inference={"max_concurrency": 128},
                                             workers={"concurrency_control": "adaptive"})
    try:
        wait_until(lambda: len(events_of(r, run_id, GroupSampled)) == groups, 300, "every group sampled",
                   interval=0.2)
        assert not events_of(r, run_id, GroupRejected), log.read_text()[-3000:]
        assert server.rejected > 0, server.stats  # it did grow past the capacity ...
        assert "concurrency window" in log.read_text()  # ... and was cut back
        assert int(r.hget(keys.rollout_stats(run_id), "rollout_failures") or 0) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.stop()
