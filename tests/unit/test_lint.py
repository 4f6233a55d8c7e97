"""Lint is part of the suite: ``ruff check`` over the repository with the rules and line length
that pyproject.toml names ([tool.ruff]), at the version the test extra pins. A finding fails the
test with ruff's own report, which names file, line and rule."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ruff(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    done = ruff("check", "--output-format", "concise", ".")
    assert done.returncode == 0, (f"ruff check found problems (fix them, or `ruff check --fix` the fixable ones):\n"
                                  f"{done.stdout}{done.stderr}")


def test_the_rules_catch_a_long_line_and_an_unused_import(tmp_path):
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("import os\n\nx = '" + "a" * 130 + "'\n")
    done = ruff("check", "--output-format", "concise", "--no-cache", ".", cwd=tmp_path)
    assert done.returncode == 1
    assert "E501" in done.stdout and "F401" in done.stdout, done.stdout
