"""The README stays a true front page: its quickstart is its first block and holds exactly the
two commands, .ci/run runs the second one, it stays short, and every page or heading it links
exists. The configuration reference it points to is generated from the pydantic models
(docs/hooks/config_reference.py, run by the site build) and lists every field."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from test_docs import anchors

from rlstream.core.config import Config

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
MAX_README_LINES = 260
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def config_reference_hook():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_fields(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every leaf field's dotted name, walked independently of the hook."""
    out = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out |= all_fields(sub, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def listed_fields(markdown: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", markdown, flags=re.M))


def test_the_generated_config_reference_lists_every_field():
    hook = config_reference_hook()
    page = hook.render((REPO / "docs" / "configuration.md").read_text())
    assert listed_fields(page) == all_fields()
    assert sorted(hook.documented_fields()) == sorted(all_fields())  # no field listed twice either


def test_a_field_missing_from_the_reference_would_be_seen():
    page = config_reference_hook().render((REPO / "docs" / "configuration.md").read_text())
    shortened = page.replace("| `trainer.dtype` |", "| trainer.dtype |")
    assert all_fields() - listed_fields(shortened) == {"trainer.dtype"}


def test_the_reference_shows_bounds_and_patterns_and_puts_hosted_fields_last():
    from typing import Annotated

    from pydantic import Field

    hook = config_reference_hook()
    Name = Annotated[str, Field(pattern=r"^[a-z]+$")]

    class Section(BaseModel):
        region: str | None = Field(None, description="hosted only, accepted and ignored: nothing to provision")
        device: str = Field("cpu", pattern=r"^(cpu|cuda)$", description="the `a|b` device | or another")
        names: Annotated[list[Name], Field(min_length=1, max_length=4)] = Field(default_factory=lambda: ["q"])
        budget: float = Field(1.0, gt=0, le=1_000_000.0, description="runs/<run>/ budget")

    lines = {row.split(" | ")[0]: row for row in hook.table(hook.rows(Section, "s.")).splitlines()[2:]}
    assert list(lines) == ["| `s.device`", "| `s.names`", "| `s.budget`", "| `s.region`"]
    # a pattern and a code span keep their pipes (Python-Markdown splits no cell inside code), prose escapes them
    assert "| matches `^(cpu|cuda)$` | the `a|b` device \\| or another |" in lines["| `s.device`"]
    assert "length ≥ 1, length ≤ 4, each item matches `^[a-z]+$`" in lines["| `s.names`"]
    assert "| > 0, ≤ 1,000,000 | runs/&lt;run&gt;/ budget |" in lines["| `s.budget`"]


def test_the_reference_needs_its_placeholder():
    with pytest.raises(ValueError, match="placeholder"):
        config_reference_hook().render("# Configuration\n")


def test_quickstart_is_the_first_block_has_two_commands_and_ci_runs_the_second():
    assert "## Quickstart" in README
    before, quickstart = README.split("## Quickstart", 1)
    assert "```" not in before, "the quickstart's commands must be the README's first code block"
    block = quickstart.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "```" not in quickstart.split("```bash\n", 1)[0], "the quickstart's first block must be its commands"
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "rlstream up examples/builtin/config.toml" in commands[0]
    assert (REPO / "examples/builtin/config.toml").is_file()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == commands[1]
    assert re.search(r"^summary: steps=\d+ final_version=\d+ reward_first10=", quickstart, flags=re.M), (
        "the quickstart shows the summary line the first command ends on")


def test_readme_is_a_front_page():
    lines = README.count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}); docs/ is the manual"


def link_errors(markdown: str, base: Path) -> list[str]:
    """What is wrong with the relative links of a Markdown file at ``base``: a file that does not
    exist, or a heading anchor that the linked Markdown file does not have."""
    errors = []
    for target in _LINK.findall(markdown):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve()
        if not file.exists():
            errors.append(f"links {target}, which does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            errors.append(f"links {target}, whose page has no such heading")
    return errors


def test_readme_links_only_to_pages_that_exist():
    assert _LINK.search(README)
    assert link_errors(README, REPO) == []
    linked = {target.partition("#")[0] for target in _LINK.findall(README)}
    assert {"docs/getting-started.md", "docs/configuration.md", "docs/design.md"} <= linked


def test_a_broken_readme_link_is_seen(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A heading\n")
    good = "[a](docs/page.md) [b](docs/page.md#a-heading) [c](https://example.org/x)"
    assert link_errors(good, tmp_path) == []
    assert link_errors("[a](docs/gone.md)", tmp_path) == ["links docs/gone.md, which does not exist"]
    assert link_errors("[a](docs/page.md#nope)", tmp_path) == [
        "links docs/page.md#nope, whose page has no such heading"]
