"""The documentation site builds with strict checks: `mkdocs build --strict` (MkDocs and the
Material theme pinned in the test extra) over docs/, where mkdocs.yml turns every finding into a
warning and strict mode every warning into a failure. A link to a missing page or heading, or a
page left out of the navigation, fails the suite; the second test shows that it does, on a copy."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_readme import all_fields

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # a build takes a few seconds; the bound only stops a hung one


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # the theme's end-of-life banner, not a finding
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
               "--site-dir", str(site)]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_the_site_builds_with_strict_checks(tmp_path):
    result = build(REPO, tmp_path / "site")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    missing = sorted(name for name in all_fields() if f"<td><code>{name}</code></td>" not in page)  # a row each
    assert not missing, f"the built configuration page does not list {missing}"


def test_broken_links_and_orphan_pages_fail_the_build(tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(REPO / "docs", root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    page = root / "docs" / "getting-started.md"
    broken_anchor = "design.md" + "#no-such-heading"  # in parts: tests/unit/test_docs.py checks this file's links
    page.write_text(page.read_text() + f"\n[gone](no-such-page.md) and [gone too]({broken_anchor})\n")
    (root / "docs" / "orphan.md").write_text("# Not in the nav\n")
    result = build(root, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    warnings = [line for line in output.splitlines() if line.startswith("WARNING")]
    for expected in ("contains a link 'no-such-page.md'", "does not contain an anchor '#no-such-heading'",
                     "not included in the \"nav\""):
        assert any(expected in line for line in warnings), f"no warning says {expected}:\n{output}"
    assert "  - orphan.md" in output, output
