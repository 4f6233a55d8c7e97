"""``rlstream up`` starts and supervises the inference engine (rlstream/engine_launch.py,
docs/design.md §15.72 `up` launches and supervises the engine): the command lines for vLLM and
SGLang, and the start / health / restart / stop cycle against a stand-in engine process
(tests/standin_engine.py), whose process group must be gone at the end. And servers that are not
ours: one that does not answer fails `up` within a bound, naming its URL."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
from factories import LEGACY_DEFAULTS
from polling import wait_until
from standin_engine import install

from rlstream import engine_launch, launcher
from rlstream import restart_policy as restarts
from rlstream.core.config import Config
from rlstream.core.errors import ConfigError, RunFailed
from rlstream.core.messages import WeightsPublished
from rlstream.core.run_state import RunState
from rlstream.engine_launch import EngineServer, engine_command, engine_env
from rlstream.sampling.engines import EngineRefused

# The flags of sglang 0.5.23 (sglang/srt/arg_groups/fields/model.py and serving.py, read from the
# wheel): model_path (alias --model), served_model_name, host, port, context_length, weight_version;
# field names become flags as "--" + name.replace("_", "-") (arg_groups/arg_utils._field_to_cli_name).
SGLANG_0_5_23_FLAGS = {"--model-path", "--served-model-name", "--host", "--port", "--context-length",
                       "--weight-version"}
VLLM_0_32_FLAGS = {"--model", "--served-model-name", "--host", "--port", "--logprobs-mode", "--max-model-len"}


def config(tmp_path: Path, **inference) -> Config:
    # builtin:tiny-h64: `up` refuses the tied builtin:tiny for vllm (rlstream.preflight)
    return Config.model_validate({**LEGACY_DEFAULTS, "log_path": str(tmp_path / "runs"), "run_id": "eng",
                                  "max_seq_len": 64, "base_model": "builtin:tiny-h64",
                                  "inference": {"backend": "vllm", "base_url": "http://127.0.0.1:8123/v1",
                                                "launch": True, **inference}})


def flags(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}


def test_vllm_command_line_and_environment(tmp_path):
    cfg = config(tmp_path, engine_python="/venvs/vllm/bin/python",
                 engine_args=["--enforce-eager", "--dtype", "float32"], engine_env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    argv = engine_command(cfg, "http://127.0.0.1:8123/v1", "/runs/eng/weights/v0")
    assert argv[:3] == ["/venvs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flags(argv) | {"--enforce-eager": "x"} == {
        "--model": "/runs/eng/weights/v0", "--served-model-name": "builtin:tiny-h64", "--host": "127.0.0.1",
        "--port": "8123", "--logprobs-mode": "processed_logprobs", "--max-model-len": "64", "--dtype": "float32",
        "--enforce-eager": "x"}
    assert argv[-3:] == ["--enforce-eager", "--dtype", "float32"]  # the user's flags come last, as given
    assert set(flags(argv)) - {"--enforce-eager", "--dtype"} <= VLLM_0_32_FLAGS
    assert engine_env(cfg) == {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}

    named = config(tmp_path, model="policy")  # the name workers send is the name it serves
    assert flags(engine_command(named, "http://localhost:9000/v1/", "/w"))["--served-model-name"] == "policy"
    unbounded = Config.model_validate({**cfg.model_dump(), "max_seq_len": None})
    assert "--max-model-len" not in engine_command(unbounded, "http://127.0.0.1:8123/v1", "/w")  # the model's own
    assert engine_command(cfg, "http://127.0.0.1:8123/v1", "/w")[0] == "/venvs/vllm/bin/python"
    assert engine_command(config(tmp_path), "http://127.0.0.1:8123/v1", "/w")[0] == sys.executable


def test_sglang_command_line_uses_its_own_flag_names(tmp_path):
    cfg = config(tmp_path, backend="sglang", engine_args=["--mem-fraction-static", "0.5"])
    argv = engine_command(cfg, "http://127.0.0.1:30000/v1", "/runs/eng/weights/v7", version=7)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert flags(argv) == {"--model-path": "/runs/eng/weights/v7", "--served-model-name": "builtin:tiny-h64",
                           "--host": "127.0.0.1", "--port": "30000", "--weight-version": "eng:7",
                           "--context-length": "64", "--mem-fraction-static": "0.5"}
    assert set(flags(argv)) - {"--mem-fraction-static"} <= SGLANG_0_5_23_FLAGS
    assert engine_env(cfg) == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "0"}  # logprobs after temperature


@pytest.mark.parametrize("backend, args, named", [
    ("vllm", ["--port", "9"], "--port"),
    ("vllm", ["--max_model_len=32"], "--max-model-len"),  # vLLM reads underscores as dashes
    ("vllm", ["--enforce-eager", "--logprobs-mode=raw_logprobs"], "--logprobs-mode"),
    ("sglang", ["--model", "/other"], "--model-path"),  # sglang's alias of --model-path
    ("sglang", ["--context-length", "9"], "--context-length"),
])
def test_engine_args_may_not_repeat_a_flag_rlstream_sets(tmp_path, backend, args, named):
    cfg = config(tmp_path, backend=backend, engine_args=args)
    with pytest.raises(ConfigError, match=f"engine_args repeats {named}, which rlstream sets"):
        engine_command(cfg, "http://127.0.0.1:8123/v1", "/w")


def test_an_unset_flag_is_the_users_and_a_required_variable_is_ours(tmp_path):
    unbounded = config(tmp_path, engine_args=["--max-model-len", "4096"])
    unbounded = Config.model_validate({**unbounded.model_dump(), "max_seq_len": None})
    assert engine_command(unbounded, "http://127.0.0.1:8123/v1", "/w")[-2:] == ["--max-model-len", "4096"]
    with pytest.raises(ConfigError, match="engine_env sets VLLM_SERVER_DEV_MODE"):
        engine_env(config(tmp_path, engine_env={"VLLM_SERVER_DEV_MODE": "0"}))
    assert engine_env(config(tmp_path, engine_env={"VLLM_SERVER_DEV_MODE": "1"}))["VLLM_SERVER_DEV_MODE"] == "1"


@pytest.mark.parametrize("url, says", [("http://127.0.0.1/v1", "names no port"),
                                       ("http://127.0.0.1:8000/api", "serves its API at /v1")])
def test_a_launched_server_needs_a_port_and_v1(tmp_path, url, says):
    with pytest.raises(ConfigError, match=says):
        engine_launch.validate(config(tmp_path, base_url=url))


# --------------------------------------------------------------------------- the cycle, with a stand-in engine
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish(run_dir: Path, *versions: int) -> None:
    for v in versions:  # a complete published directory: the manifest is written last
        (run_dir / "weights" / f"v{v}").mkdir(parents=True, exist_ok=True)
        (run_dir / "weights" / f"v{v}" / "manifest.json").write_text("{}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its parent) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """(config, record directory): backend vllm launched on a free port, running tests/standin_engine.py."""
    records = tmp_path / "records"
    records.mkdir()
    shims = install(tmp_path / "shims")
    cfg = config(tmp_path, base_url=f"http://127.0.0.1:{free_port()}/v1", start_timeout=60,
                 engine_env={"PYTHONPATH": str(shims), "STANDIN_RECORD": str(records), "VLLM_CPU_KVCACHE_SPACE": "1"})
    monkeypatch.setenv("RLSTREAM_REDIS_PASSWORD", "secret")  # must not reach the engine
    (cfg.run_dir() / "logs").mkdir(parents=True)
    return cfg, records


def starts(records: Path) -> list[dict]:
    found = [json.loads(p.read_text()) | {"pid": int(p.stem)} for p in records.glob("*.json")]
    return sorted(found, key=lambda d: os.stat(records / f"{d['pid']}.json").st_mtime_ns)


def test_engine_started_watched_restarted_on_the_newest_weights_and_stopped_with_its_group(standin):
    cfg, records = standin
    run_dir = cfg.run_dir()
    publish(run_dir, 0, 3)
    server = EngineServer(cfg, 0, cfg.inference.base_urls[0], run_dir / "logs")
    http = httpx.Client(timeout=engine_launch.HEALTH_TIMEOUT)
    try:
        server.start(0)
        engine_launch.wait_until_up([server], http, tick=lambda: time.sleep(0.05))
        first = wait_until(lambda: starts(records), 30, "the stand-in's record")[0]
        assert flags(first["argv"])["--model"] == str(run_dir / "weights" / "v0")
        assert first["env"] == {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # no Redis password
        assert server.log_path == run_dir / "logs" / "engine-0.log"

        guard = server.process.pid  # up's child: rlstream/engine_guard.py, the engine's parent
        os.kill(first["pid"], signal.SIGKILL)  # the API server dies; its EngineCore-like helper would live on
        state = RunState()
        state.apply(WeightsPublished(version=3, uri="ignored", sha256="x", bytes=0))

        def restarted_and_up() -> bool:
            launcher._check_engine(server, state, http)
            return server.process.pid != guard and not server.coming_up

        wait_until(restarted_and_up, 60, "the engine to be restarted and healthy", interval=0.1)
        assert server.policy.restarts == 1
        assert not alive(first["helper"]), "the dead server's process group must be killed before the restart"
        second = starts(records)[-1]
        assert flags(second["argv"])["--model"] == str(run_dir / "weights" / "v3")  # the newest, not a Redis path
        # told which version it serves, so workers need not reload it
        assert http.get(f"{server.root}/weight_info").json() == {"weight_version": "eng:3"}
        launcher._check_engine(server, state, http)  # healthy: nothing to do
        assert server.policy.restarts == 1 and server.restart_at is None
    finally:
        server.stop(10)
        http.close()
    for record in starts(records):
        assert not alive(record["pid"]) and not alive(record["helper"]), record
    assert not server.group_alive()
    assert "standin engine serving" in server.log_path.read_text()


def test_an_engine_that_exits_while_starting_fails_up_with_its_log(standin):
    cfg, _ = standin
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(
        update={"engine_env": {**cfg.inference.engine_env, "STANDIN_EXIT": "3"}})})
    publish(cfg.run_dir(), 0)
    server = EngineServer(cfg, 0, cfg.inference.base_urls[0], cfg.run_dir() / "logs")
    server.start(0)
    try:
        with pytest.raises(RunFailed) as err:
            with httpx.Client(timeout=engine_launch.HEALTH_TIMEOUT) as http:
                engine_launch.wait_until_up([server], http, tick=lambda: time.sleep(0.05))
    finally:
        server.stop(5)
    text = str(err.value)
    assert "engine-0 (vllm for http://127.0.0.1:" in text and "exited with code 3 while starting" in text
    assert str(server.log_path) in text and "refusing to start (STANDIN_EXIT=3)" in text


def test_an_engine_that_never_answers_health_fails_within_start_timeout(standin):
    cfg, _ = standin
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(
        update={"start_timeout": 2.0, "engine_env": {**cfg.inference.engine_env, "STANDIN_HEALTH": "503"}})})
    publish(cfg.run_dir(), 0)
    server = EngineServer(cfg, 0, cfg.inference.base_urls[0], cfg.run_dir() / "logs")
    server.start(0)
    try:
        with pytest.raises(RunFailed, match=r"did not answer http://127\.0\.0\.1:\d+/health within "
                                             r"inference.start_timeout = 2s"):
            with httpx.Client(timeout=engine_launch.HEALTH_TIMEOUT) as http:
                engine_launch.wait_until_up([server], http, tick=lambda: time.sleep(0.05))
    finally:
        server.stop(5)
    assert not server.group_alive()


def test_the_engines_whole_group_dies_with_a_sigkilled_supervisor(standin):
    """``up`` SIGKILLed: nothing of the engine may live on (vLLM's EngineCore did, before the guard)."""
    cfg, records = standin
    env = {**os.environ, **engine_launch._process_env(cfg)}
    port = urlsplit(cfg.inference.base_urls[0]).port
    supervisor = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, subprocess, sys, time
from rlstream.core.lifeline import die_with_parent
subprocess.Popen([sys.executable, "-I", {str(engine_launch.GUARD)!r}, str(os.getpid()), "--", sys.executable, "-m",
                  "vllm.entrypoints.openai.api_server", "--port", "{port}"],
                 start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
time.sleep(600)
"""], env=env)
    try:
        [record] = wait_until(lambda: starts(records), 60, "the stand-in engine to start")
        assert alive(record["pid"]) and alive(record["helper"])
        supervisor.kill()
        supervisor.wait()
        wait_until(lambda: not alive(record["pid"]) and not alive(record["helper"]), 30,
                   "the engine and its helper to die with the supervisor", interval=0.1)
    finally:
        supervisor.kill()
        for pid in [r[k] for r in starts(records) for k in ("pid", "helper")]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class Exited:
    pid = 2**22 + 7  # no such process: killpg finds nothing

    def poll(self) -> int:
        return -9


def test_an_engine_that_keeps_dying_ends_the_run_on_a_crash_loop(tmp_path):
    server = EngineServer(config(tmp_path), 0, "http://127.0.0.1:8123/v1", tmp_path)
    server.process, server.coming_up = Exited(), False
    server.policy.quick_crashes = restarts.MAX_RESTARTS
    with pytest.raises(RunFailed, match=r"engine-0 \(http://127.0.0.1:8123/v1\) exited with code -9: a crash loop"):
        launcher._check_engine(server, RunState(), httpx.Client())
    server.policy.started_at = time.monotonic() - restarts.MIN_UPTIME_S - 1  # it came up and ran a while
    launcher._check_engine(server, RunState(), httpx.Client())
    assert server.policy.quick_crashes == 0 and server.restart_at is not None


def test_an_engine_that_never_came_up_crashed_quickly_however_long_it_tried(tmp_path):
    server = EngineServer(config(tmp_path), 0, "http://127.0.0.1:8123/v1", tmp_path)
    server.process, server.coming_up = Exited(), True  # never answered /health since its start
    server.policy.started_at = time.monotonic() - 10 * restarts.MIN_UPTIME_S
    launcher._check_engine(server, RunState(), httpx.Client())
    assert server.policy.quick_crashes == 1


# --------------------------------------------------------------------------- servers that are not ours
def test_an_unreachable_external_server_fails_up_within_a_bound_naming_it(tmp_path, monkeypatch, capsys):
    port = free_port()  # nothing listens there
    monkeypatch.setattr(engine_launch, "REACH_TIMEOUT_S", 1.0)
    cfg = config(tmp_path, base_url=f"http://127.0.0.1:{port}/v1", launch=False)
    assert launcher.up(cfg) == 1
    err = capsys.readouterr().err
    assert f"inference server http://127.0.0.1:{port}/v1 is unreachable (ConnectError" in err
    assert "is the server up? is inference.base_url right?" in err
    assert not (cfg.run_dir() / "redis").exists(), "nothing may start before the servers answered"


def test_an_external_server_is_checked_and_a_refusal_names_its_url(standin, monkeypatch):
    cfg, _ = standin
    seen = []

    def check_server(client, root, *, backend, model_name, max_seq_len):
        seen.append((root, backend, model_name, max_seq_len))
        raise EngineRefused("it serves another model: start it with --served-model-name builtin:tiny-h64")

    monkeypatch.setattr(engine_launch, "check_server", check_server)
    publish(cfg.run_dir(), 0)
    server = EngineServer(cfg, 0, cfg.inference.base_urls[0], cfg.run_dir() / "logs")  # someone else's server
    server.start(0)
    external = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"launch": False})})
    try:
        with httpx.Client(timeout=engine_launch.HEALTH_TIMEOUT) as http:
            refusal = f"inference server {external.inference.base_urls[0]}: it serves another"
            with pytest.raises(RunFailed, match=refusal):
                engine_launch.check_external(external, http, bound=30)
    finally:
        server.stop(5)
    assert seen == [(server.root, "vllm", "builtin:tiny-h64", 64)]


def test_up_starts_the_engine_on_the_published_v0_and_stops_it_when_the_check_refuses(standin, monkeypatch, capsys):
    """The whole order in ``up``: trainer, its v0, the engine on that directory, health, the check;
    a refused check ends the run before any producer or worker started, and the engine's process
    group is gone."""
    cfg, records = standin

    def check_server(client, root, *, backend, model_name, max_seq_len):
        raise EngineRefused("its max_model_len 16 is below max_seq_len 64: start it with --max-model-len >= 64")

    monkeypatch.setattr(engine_launch, "check_server", check_server)
    cfg = Config.model_validate({**cfg.model_dump(), "max_steps": 1, "workers": {"count": 1}})
    assert launcher.up(cfg) == 1
    err = capsys.readouterr().err
    assert f"inference server {cfg.inference.base_urls[0]}: its max_model_len 16 is below max_seq_len 64" in err
    run_dir = cfg.run_dir()
    [record] = starts(records)
    v0 = run_dir / "weights" / "v0"
    assert flags(record["argv"])["--model"] == str(v0)
    assert (v0 / "manifest.json").stat().st_mtime_ns <= (records / f"{record['pid']}.json").stat().st_mtime_ns
    assert not alive(record["pid"]) and not alive(record["helper"])
    assert sorted(p.name for p in (run_dir / "logs").glob("*.log")) == ["engine-0.log", "trainer.log"]


def test_a_restarted_vllm_is_labelled_only_while_no_worker_reloaded_it(tmp_path, r):
    """up restarted vLLM on v5 and tells it so once it answers /health; a worker still at v3
    that found it first (label "default") reloaded its v3 and labelled it. Announcing v5 then
    would make workers at v5 adopt it and stamp v3 samples v5."""
    from engine_standins import FakeVllm

    from rlstream.core import keys
    from rlstream.sampling.remote import redis_sync_lock

    cfg = config(tmp_path)
    url = cfg.inference.base_urls[0]
    held = []

    def restarted(vllm):
        def handler(request):
            if request.url.path == "/weight_info":
                held.append(r.exists(keys.engine_sync_lock("eng", url)))
            return vllm(request)

        server = EngineServer(cfg, 0, url, tmp_path, sync_lock=redis_sync_lock(r, "eng", 30.0))
        server.version, server.coming_up = 5, True  # started on weights/v5
        with httpx.Client(transport=httpx.MockTransport(handler)) as http:
            assert server.probe(http)

    reloaded_first = FakeVllm()
    reloaded_first.weights, reloaded_first.label = "v3", "eng:3"
    restarted(reloaded_first)
    assert reloaded_first.label == "eng:3"
    untouched = FakeVllm()
    restarted(untouched)
    assert untouched.label == "eng:5" and held == [1, 1]  # read and labelled under the workers' sync lock


def test_a_slow_start_warns_that_a_restart_would_outlast_the_rollout_jobs(tmp_path, caplog):
    """vllm-cpu starts in ~100 s here; with job_timeout 20 a restart outlasts a job's 3 attempts."""
    cfg = config(tmp_path).model_copy(update={"job_timeout": 20})
    slow = [SimpleNamespace(cfg=cfg, started_at=time.monotonic() - 100)]
    with caplog.at_level("WARNING", logger="rlstream.engine_launch"):
        engine_launch.warn_if_restart_outlasts_jobs(slow)
    assert "took 100s to start" in caplog.text and "raise job_timeout to at least 67" in caplog.text
    caplog.clear()
    quick = [SimpleNamespace(cfg=cfg, started_at=time.monotonic() - 5)]
    engine_launch.warn_if_restart_outlasts_jobs(quick)
    assert caplog.text == ""
