"""The SDK lifecycle end to end on the built-in model, with the run's real embedded Redis: the
seed's rl_loop (examples/sdk/rl_loop.py) learns with the sampler refreshed from
``save_weights_for_sampler(...).result().path``; reconnecting by ``trainer_job_id`` and
``load_state_with_optimizer`` restores a saved state exactly; ``close()`` leaves no process
behind, or, with ``cleanup_trainer_on_close=False``, keeps the bus up past its process's exit
for a reconnect (docs/design.md §15.68 Reconnect and close)."""
from __future__ import annotations

import copy
import json
import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from polling import wait_until

from rlstream.core import bus
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.messages import OptimStepped, RunFinished, SamplerSaved, StateLoaded

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sdk" / "rl_loop.py"
DATA_TOKENS = [[6, 13, 7, 14, 12], [3, 13, 4, 14, 9], [1, 13, 1, 14, 5]]


def processes_of(run_dir: Path) -> list[int]:
    """Live (not zombie) processes whose command line names ``run_dir`` or that run inside it: the
    run's redis-server (it chdirs to its --dir; its socket, named on its command line, is in /tmp
    when the run directory's path is too long for one, as under pytest-xdist)."""
    root, out = run_dir.resolve(), []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "stat").read_text().split()[2] == "Z":
                continue
            if str(root).encode() in (proc / "cmdline").read_bytes() or \
                    Path(os.readlink(proc / "cwd")).is_relative_to(root):
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def logged_events(run_dir: Path, run_id: str) -> list:
    """The run's events, read from its AOF (its server is not running any more)."""
    server = EmbeddedRedis(run_dir / "redis")
    r = connect(server.start())
    try:
        return [m for _, m in bus.iter_all_events(r, run_id)]
    finally:
        r.close()
        server.stop()


def one_step(policy, lr: float = 1e-2):
    from rlstream.sdk import AdamParams, Datum

    data = [Datum(tokens=t, loss_fn_inputs={"advantage": 1.0 - i}) for i, t in enumerate(DATA_TOKENS)]
    policy.forward_backward_custom(
        data, lambda d, lps: (-sum(x.loss_fn_inputs["advantage"] * lp.sum() for x, lp in zip(d, lps)), {})).result()
    policy.optim_step(AdamParams(learning_rate=lr, beta2=0.999, weight_decay=0.01)).result()


def test_the_seed_rl_loop_learns_on_the_sdk_and_leaves_nothing_running(tmp_path, monkeypatch, capsys):
    steps, sync_every = 50, 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--steps", str(steps), "--groups", "32",
                                      "--sync-every", str(sync_every), "--seed", "0"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["reward_last"] - summary["reward_first"] >= 0.3, summary
    run_dir = tmp_path / "runs" / summary["run_id"]
    assert processes_of(run_dir) == []  # close(): the embedded redis-server is gone
    events = logged_events(run_dir, summary["run_id"])
    stepped = [e for e in events if isinstance(e, OptimStepped)]
    assert [e.step for e in stepped] == list(range(1, summary["policy_steps"] + 1))
    assert len([e for e in events if isinstance(e, SamplerSaved)]) == steps // sync_every
    assert isinstance(events[-1], RunFinished)


def test_reconnect_by_trainer_job_id_restores_a_saved_state(tmp_path):
    from rlstream.sdk import ServiceClient

    # Other tests of this xdist worker may have left lease threads of their own (their trainers, in
    # this process): only the ones this test's services start must end with them.
    before = {t for t in threading.enumerate() if t.name == "trainer-lease"}
    service = ServiceClient.from_config(base_model="builtin:tiny", lora_rank=0, learning_rate=1e-2,
                                        log_path=tmp_path, torch_threads=1)
    run_id, run_dir = service.trainer_job_id, service.run_dir
    policy = service.create_training_client(base_model="builtin:tiny", lora_rank=0)
    one_step(policy)
    one_step(policy)
    policy.save_state("step-2").result()
    weights = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    optimizer = copy.deepcopy(policy.optimizer.state_dict())
    one_step(policy)
    policy.save_state("step-3").result()
    service.close()
    assert processes_of(run_dir) == []

    again = ServiceClient.from_config(base_model="builtin:tiny", lora_rank=0, log_path=tmp_path,
                                      trainer_job_id=run_id)
    try:
        restored = again.create_training_client(base_model="builtin:tiny", lora_rank=0)
        assert restored.step == 3  # a reconnect restores the newest saved state
        restored.load_state_with_optimizer("step-2").result()
        assert restored.step == 2
        for name, value in restored.model.state_dict().items():
            assert torch.equal(value, weights[name]), name
        moments = restored.optimizer.state_dict()["state"]
        for key, state in optimizer["state"].items():
            for field in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(torch.as_tensor(state[field]), torch.as_tensor(moments[key][field])), field
        one_step(restored)  # training goes on from there
        assert restored.step == 3
    finally:
        again.close()
    assert processes_of(run_dir) == []
    # A renewal in flight when the service stopped its Redis runs the client's bounded retries first
    # (8, backoff 0.05 s doubling to 2 s: ~7 s, more on a loaded machine) before the thread sees its stop.
    wait_until(lambda: not any(t.name == "trainer-lease" and t not in before for t in threading.enumerate()), 30,
               "the lease's renewal thread to end with the service")
    events = logged_events(run_dir, run_id)
    assert [e.name for e in events if isinstance(e, StateLoaded)] == ["step-3", "step-2"]
    assert [e.step for e in events if isinstance(e, OptimStepped)] == [1, 2, 3, 3]


CLIENT_THAT_KEEPS_THE_SERVICE = """
import sys
from rlstream.sdk import AdamParams, Datum, ServiceClient
service = ServiceClient.from_config(base_model="builtin:tiny", log_path=sys.argv[1], cleanup_trainer_on_close=False)
policy = service.create_training_client()
policy.forward_backward_custom([Datum(tokens=[6, 13, 7, 14, 12])], lambda d, lps: (-lps[0].sum(), {})).result()
policy.optim_step(AdamParams(learning_rate=1e-2)).result()
service.close()
print(service.trainer_job_id)
"""


def test_close_without_cleanup_keeps_the_service_for_a_later_reconnect(tmp_path):
    from safetensors.torch import load_file

    from rlstream.sdk import ServiceClient

    proc = subprocess.run([sys.executable, "-c", CLIENT_THAT_KEEPS_THE_SERVICE, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    run_dir = tmp_path / run_id
    kept = processes_of(run_dir)
    try:
        assert len(kept) == 1  # its redis-server outlived the process that closed the service
        service = ServiceClient.from_config(base_model="builtin:tiny", log_path=tmp_path, trainer_job_id=run_id)
        try:
            policy = service.create_training_client()
            assert policy.step == 1
            saved = load_file(str(run_dir / "states" / "close-step-000001" / "model.safetensors"))
            live = policy.model.state_dict()
            assert all(torch.equal(value, live[name]) for name, value in saved.items())
            assert processes_of(run_dir) == kept  # it reattached to the same server
        finally:
            service.close()
        assert processes_of(run_dir) == []
    finally:
        for pid in processes_of(run_dir):  # never leave the detached server behind a failed assertion
            subprocess.run(["kill", str(pid)], check=False)


def test_the_deployment_can_be_an_inference_server_synced_to_a_snapshot(tmp_path):
    """inference.backend = "openai": the stand-in server (tests/e2e/openai_server.py) is told to
    load the snapshot's directory, and then samples with exactly the policy's logprobs."""
    import asyncio

    from rlstream.builtin.tiny_model import save_tiny_model
    from rlstream.core.config import InferenceConfig
    from rlstream.sdk import Datum, ServiceClient

    model_dir = save_tiny_model(tmp_path / "tiny")
    port_file = tmp_path / "server.port"
    server = subprocess.Popen([sys.executable, str(EXAMPLE.parents[2] / "tests/e2e/openai_server.py"), str(model_dir),
                               str(port_file)], stderr=subprocess.DEVNULL)
    try:
        def port() -> str:
            assert server.poll() is None, "the stand-in inference server exited"
            return port_file.read_text().strip() if port_file.is_file() else ""

        base = f"http://127.0.0.1:{wait_until(port, 60, 'the stand-in inference server', interval=0.1)}"
        inference = InferenceConfig(backend="openai", base_url=f"{base}/v1",
                                    weight_sync_url=f"{base}/update_weights_from_disk")
        service = ServiceClient.from_config(base_model=str(model_dir), log_path=tmp_path / "runs", inference=inference)
        try:
            policy = service.create_training_client()
            one_step(policy, lr=5e-2)
            one_step(policy, lr=5e-2)
            saved = policy.save_weights_for_sampler("remote").result()
            sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=policy.get_tokenizer())
            [c] = asyncio.run(sampler.sample_with_prompt_tokens([6, 13, 7, 14], n=1, max_tokens=1, temperature=1.0))
            mine = policy.forward([Datum(tokens=c.full_tokens)]).result().loss_fn_outputs[0]["logprobs"].data[-1]
            assert c.version == 1 and mine == pytest.approx(c.inference_logprobs[0], abs=1e-4)
            updates = [json.loads(line) for line in port_file.with_name("server.port.updates").read_text().splitlines()]
            assert updates == [{"model_path": str((service.run_dir / "weights" / "v1").resolve()), "version": 1}]
        finally:
            service.close()
    finally:
        server.kill()
        server.wait()
