"""compose.yaml: valid under the Compose Specification's JSON schema (a copy in
tests/data/compose-spec/, its source and commit in the README there), and its rlstream services
start the same role commands `rlstream up` starts (rlstream/launcher.py ``_spawn``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from rlstream import cli, launcher

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "tests" / "data" / "compose-spec" / "compose-spec.json"
ROLES = ("trainer", "producer", "worker")  # the children `rlstream up` starts


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())  # (PyYAML resolves the `<<:` merge keys)


def test_compose_yaml_is_valid_under_the_compose_spec_schema(compose):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_copy_is_the_one_its_readme_names():
    readme = (SCHEMA.parent / "README.md").read_text()
    blob = subprocess.run(["git", "hash-object", str(SCHEMA)], capture_output=True, text=True, check=True).stdout
    assert f"Blob: {blob.strip()}" in readme


def test_the_schema_catches_a_broken_service(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["command"] = {"not": "a command"}
    broken["services"]["trainer"]["no_such_key"] = 1
    assert len(list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))) >= 2


def up_argv(role: str, config_path: str, logs: Path, monkeypatch) -> list[str]:
    """The argv `rlstream up`'s ``_spawn`` gives a child of ``role`` (Popen captured, nothing started)."""
    captured = {}

    def popen(args, **kw):
        captured["args"] = args
        raise RuntimeError("captured")

    monkeypatch.setattr(launcher, "script_functions", lambda: {})  # a CLI run: children are exec'd, not forked
    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match="captured"):
        launcher._spawn(role, role, Path(config_path), logs, None)
    return captured["args"]


def test_compose_services_start_the_commands_up_starts(compose, monkeypatch, tmp_path):
    services = compose["services"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'rlstream = "rlstream.cli:entrypoint"' in pyproject  # compose's `rlstream X` is `python -m rlstream.cli X`
    by_role = {}
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] == ["rlstream"] and len(command) > 1 and command[1] in ROLES:
            by_role.setdefault(command[1], []).append(command)
    assert set(by_role) == set(ROLES), by_role  # one service per role up starts, no role missing
    for role, commands in by_role.items():
        (command,) = commands
        config = command[2]
        assert (REPO / config).is_file(), config  # the image copies the repository to /app (its WORKDIR)
        argv = up_argv(role, config, tmp_path, monkeypatch)
        assert argv[:4] == [sys.executable, "-P", "-m", "rlstream.cli"], argv
        assert argv[4:] == command[1:], (argv, command)  # same subcommand, same arguments
        parsed_up, parsed_compose = cli.build_parser().parse_args(argv[4:]), cli.build_parser().parse_args(command[1:])
        assert vars(parsed_up) == vars(parsed_compose)
    # the exporter `up` runs in-process (metrics.port) is a service of its own here
    metrics = services["metrics"]["command"]
    assert cli.build_parser().parse_args(metrics[1:]).command == "metrics"
    env = compose["x-rlstream"]["environment"]
    assert env["RLSTREAM_REDIS_URL"].startswith("redis://") and "RLSTREAM_REDIS_PASSWORD" in env
