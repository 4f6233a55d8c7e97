"""The README stays true: its config reference lists every field, its quickstart holds
exactly the two commands, and .ci/run runs the second one."""
from __future__ import annotations

import re
from pathlib import Path

from rlstream.core.config import Config

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def documented_fields() -> set[str]:
    section = README.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.M))


def all_fields() -> set[str]:
    out = set()
    for name, field in Config.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out |= {f"{name}.{inner}" for inner in sub.model_fields}
        else:
            out.add(name)
    return out


def test_config_reference_lists_every_field():
    assert documented_fields() == all_fields()


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    quickstart = README.split("## Quickstart", 1)[1]
    block = quickstart.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "rlstream up examples/builtin/config.toml" in commands[0]
    assert (REPO / "examples/builtin/config.toml").is_file()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == commands[1]
