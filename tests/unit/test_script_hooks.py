"""Hooks passed to ``rlstream.main`` as the cookbook writes them (issue 14; docs/design.md
§15.61 Script hooks run in a forked trainer): a lambda or a function of the script for the
trainer's hooks is held by the calling process and the trainer is forked from it; a rollout
factory of the script is held too and the workers are forked (issue 22), unless only workers
started elsewhere would run it; ``main`` keeps ``cfg.evaluation_interval`` and applies
``RLSTREAM_<FIELD>`` overrides."""
from __future__ import annotations

import os
import signal
import time

import pytest
from factories import legacy_config

from rlstream import forked, launcher, main
from rlstream.core.errors import ConfigError
from rlstream.core.imports import hold_script_functions, import_object, script_functions


def keep_all(group):  # importable by name: passed as a spec, no fork needed
    return True


class Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """``launcher.up`` replaced: records the config and the hooks held while it runs."""
    seen = {}

    def fake_up(cfg):
        seen["cfg"], seen["held"] = cfg, script_functions()
        raise Stop

    monkeypatch.setattr(launcher, "up", fake_up)
    return seen


def test_main_keeps_the_configs_evaluation_interval(captured, tmp_path):
    with pytest.raises(Stop):
        main(legacy_config(log_path=str(tmp_path), evaluation_interval=7))
    assert captured["cfg"].evaluation_interval == 7
    with pytest.raises(Stop):
        main(legacy_config(log_path=str(tmp_path), evaluation_interval=7), evaluation_interval=3)
    assert captured["cfg"].evaluation_interval == 3


def test_main_applies_environment_overrides_over_the_scripts_config(captured, tmp_path, monkeypatch):
    monkeypatch.setenv("RLSTREAM_LEARNING_RATE", "0.002")
    monkeypatch.setenv("RLSTREAM_WORKERS_COUNT", "1")
    with pytest.raises(Stop):
        main(legacy_config(log_path=str(tmp_path), learning_rate=1.7e-5, workers={"count": 4}))
    assert (captured["cfg"].learning_rate, captured["cfg"].workers.count) == (0.002, 1)


def test_a_lambda_and_a_script_function_are_held_for_a_forked_trainer(captured, tmp_path):
    def evaluate(ctx):  # nested, like a function of the script's __main__: not importable
        return {"x": 1.0}

    filter_fn = lambda pg: len(set(pg.rewards)) > 1  # noqa: E731 (the cookbook's own spelling)
    with pytest.raises(Stop):
        main(legacy_config(log_path=str(tmp_path)), dynamic_filter_fn=filter_fn, evaluation_fn=evaluate)
    cfg = captured["cfg"]
    assert (cfg.dynamic_filter_fn, cfg.evaluation_fn) == ("__script__:dynamic_filter_fn", "__script__:evaluation_fn")
    assert captured["held"] == {"dynamic_filter_fn": filter_fn, "evaluation_fn": evaluate}
    assert script_functions() == {}  # released when the run ends, however it ends
    with pytest.raises(Stop):  # an importable function still goes by name
        main(legacy_config(log_path=str(tmp_path)), dynamic_filter_fn=keep_all)
    assert captured["cfg"].dynamic_filter_fn == f"{__name__}:keep_all" and captured["held"] == {}


def make_rollout_fn(setup):  # importable by name: passed as a spec, the workers are exec'd
    return None


def test_a_rollout_factory_of_the_script_is_held_for_forked_workers(captured, tmp_path):
    """Issue 22 item 1: a factory defined in the script (nested here, as one of __main__ or a
    notebook) is held, and the workers that run it are forked from the script."""
    def make_rollout_fn_of_the_script(setup):
        return None

    with pytest.raises(Stop):
        main(legacy_config(log_path=str(tmp_path)), rollout_fn_factory=make_rollout_fn_of_the_script)
    assert captured["cfg"].rollout_fn_factory == "__script__:rollout_fn_factory"
    assert captured["held"] == {"rollout_fn_factory": make_rollout_fn_of_the_script}
    assert script_functions() == {}
    factory = lambda setup: None  # noqa: E731
    with pytest.raises(Stop):
        main(legacy_config(log_path=str(tmp_path)), rollout_fn_factory=factory, dynamic_filter_fn=keep_all)
    assert captured["held"] == {"rollout_fn_factory": factory}
    assert captured["cfg"].dynamic_filter_fn == f"{__name__}:keep_all"
    with pytest.raises(Stop):  # an importable factory still goes by name: nothing held, nothing forked
        main(legacy_config(log_path=str(tmp_path)), rollout_fn_factory=make_rollout_fn)
    assert captured["cfg"].rollout_fn_factory == f"{__name__}:make_rollout_fn" and captured["held"] == {}


def test_a_script_factory_with_only_workers_started_elsewhere_is_refused(captured, tmp_path):
    with pytest.raises(ConfigError, match=r"workers.count = 0: the workers `rlstream worker` starts \(here or on "
                       r"another machine\) import the factory by name"):
        main(legacy_config(log_path=str(tmp_path), workers={"count": 0}), rollout_fn_factory=lambda setup: None)
    assert "cfg" not in captured and script_functions() == {}


def test_a_worker_started_by_hand_for_a_script_factory_says_to_make_it_importable():
    from rlstream.sampling.rollout_fn import resolve_factory

    cfg = legacy_config(rollout_fn_factory="__script__:rollout_fn_factory")
    with pytest.raises(ValueError, match=r"a process started by hand \(`rlstream worker`, a worker on another "
                       r"machine, `rlstream up config.json`\) cannot import it. Move the function into an importable "
                       "module"):
        resolve_factory(cfg)
    factory = lambda setup: None  # noqa: E731
    hold_script_functions({"rollout_fn_factory": factory})
    try:
        assert resolve_factory(cfg) is factory
    finally:
        hold_script_functions({})


def test_the_trainer_resolves_held_hooks_and_a_process_without_them_says_why():
    from rlstream.trainer.hooks import load_filter

    cfg = legacy_config(dynamic_filter_fn="__script__:dynamic_filter_fn")
    with pytest.raises(ValueError, match="a process started by hand cannot"):
        load_filter(cfg)
    fn = lambda pg: True  # noqa: E731
    hold_script_functions({"dynamic_filter_fn": fn})
    try:
        assert load_filter(cfg) is fn and import_object("__script__:dynamic_filter_fn") is fn
    finally:
        hold_script_functions({})


def test_a_forked_role_inherits_the_held_hooks_and_behaves_like_popen(tmp_path, monkeypatch):
    def child_main(role, config_path, env):
        hook = script_functions()["dynamic_filter_fn"]  # inherited memory: no import
        print(f"{role} {config_path.name} {env['MARK']} keep={hook(None)} pid={os.getpid()}", flush=True)
        if role == "sleeper":
            time.sleep(60)
        return 3

    monkeypatch.setattr(forked, "_child_main", child_main)
    hold_script_functions({"dynamic_filter_fn": lambda group: "kept"})
    try:
        log = tmp_path / "trainer.log"
        proc = forked.fork_role("trainer", tmp_path / "config.json", log, {"MARK": "m1"}, None)
        assert proc.wait(timeout=60) == 3 and proc.poll() == 3
        assert f"trainer config.json m1 keep=kept pid={proc.pid}" in log.read_text()
        sleeper = forked.fork_role("sleeper", tmp_path / "config.json", log, {"MARK": "m2"}, None)
        assert sleeper.poll() is None
        with pytest.raises(forked.subprocess.TimeoutExpired):
            sleeper.wait(timeout=0.2)
        sleeper.terminate()
        assert sleeper.wait(timeout=60) == -signal.SIGTERM
        sleeper.kill()  # no-op once it exited
    finally:
        hold_script_functions({})


def test_the_launcher_forks_the_trainer_only_while_hooks_are_held(tmp_path, monkeypatch):
    forks, popens = [], []
    monkeypatch.setattr(launcher, "fork_role", lambda *args: forks.append(args) or "forked")
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: popens.append(a) or "popen")
    hold_script_functions({"dynamic_filter_fn": lambda g: True})
    try:
        assert launcher._spawn("trainer", "trainer", tmp_path / "c.json", tmp_path, None).process == "forked"
        assert launcher._spawn("worker-0", "worker", tmp_path / "c.json", tmp_path, None).process == "popen"
    finally:
        hold_script_functions({})
    assert launcher._spawn("trainer", "trainer", tmp_path / "c.json", tmp_path, None).process == "popen"
    assert len(forks) == 1 and forks[0][0] == "trainer" and len(popens) == 2


def test_the_launcher_forks_the_workers_and_the_trainer_while_a_factory_is_held(tmp_path, monkeypatch):
    forks, popens = [], []
    monkeypatch.setattr(launcher, "fork_role", lambda *args: forks.append(args[0]) or "forked")
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: popens.append(a[0][4]) or "popen")
    hold_script_functions({"rollout_fn_factory": lambda setup: None})
    try:
        for name, role in (("trainer", "trainer"), ("producer", "producer"), ("worker-0", "worker"),
                           ("worker-1", "worker")):
            launcher._spawn(name, role, tmp_path / "c.json", tmp_path, None)
    finally:
        hold_script_functions({})
    assert forks == ["trainer", "worker", "worker"] and popens == ["producer"]
