"""The layout's rules, checked on the source (docs/design.md §11 Layout and layer rules): which layer may
import which, no import circle, no generic top-level names, a docstring for every module.
Imports are read with ``ast``, lazy (in-function) ones included.

A module's length is not checked: a module owns one thing, however long that takes. A line cap
made modules split where their meaning did not (docs/design.md §11 Layout and layer rules), so
size is a smell for review, not a test."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"rlstream": "rlstream", "producers": "rlstream.producers", "workers": "rlstream.workers",
            "trainer": "rlstream.trainer"}
ROLES = ("rlstream.producers", "rlstream.workers", "rlstream.trainer")
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "rlstream.core": set(),
    "rlstream.builtin": {"rlstream.core"},
    "rlstream.sampling": {"rlstream.core", "rlstream.builtin"},
    "rlstream.ops": {"rlstream.core"},
    "rlstream.producers": {"rlstream.core", "rlstream.builtin"},
    "rlstream.workers": {"rlstream.core", "rlstream.builtin", "rlstream.sampling"},
    "rlstream.trainer": {"rlstream.core", "rlstream.builtin", "rlstream.sampling"},
    # The SDK uses the trainer's pieces (docs/design.md §15.65 The SDK trains in the caller's process); the roles'
    # loops (workers, producers) and the face stay out of it.
    "rlstream.sdk": {"rlstream.core", "rlstream.builtin", "rlstream.sampling", "rlstream.trainer"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def imported_names(path: Path, module: str) -> set[str]:
    """Every rlstream module (or bare role package) that ``path`` imports, at any depth."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return names


def layer_of(module: str) -> str:
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return "rlstream"  # the face: cli, api, launcher, preflight


GRAPH = {m: {n for n in imported_names(p, m) if n in MODULES and n != m} for m, p in MODULES.items()}


def test_every_module_is_seen():
    assert "rlstream.trainer.trainer" in MODULES and "rlstream.core.messages" in MODULES
    assert "rlstream.core.messages" in GRAPH["rlstream.core.codec"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers(module):
    mine = layer_of(module)
    if mine == "rlstream":
        return  # the face sits on top and may import anything
    wrong = sorted(n for n in GRAPH[module] if layer_of(n) != mine and layer_of(n) not in ALLOWED[mine])
    assert not wrong, f"{module} ({mine}) imports {wrong}; it may import only {sorted(ALLOWED[mine] | {mine})}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_bare_role_imports(module):
    bare = {n for n in imported_names(MODULES[module], module)
            if n.split(".")[0] in ("producers", "workers", "trainer")}
    assert not bare, f"{module} imports {sorted(bare)}: the roles install as rlstream.producers/workers/trainer"


def test_roles_never_import_each_other(graph=GRAPH):
    for module, deps in graph.items():
        role = next((r for r in ROLES if module.startswith(r)), None)
        if role is not None:
            others = sorted(d for d in deps if any(d.startswith(o) for o in ROLES if o != role))
            assert not others, f"{module} imports another role: {others}"


def test_no_import_circle():
    """Depth-first search over the module graph; a back edge is a circle."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                circle = stack[stack.index(n):] + [n]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_role_check_can_fail():
    graph = {**GRAPH, "rlstream.trainer.trainer": GRAPH["rlstream.trainer.trainer"] | {"rlstream.workers.runtime"}}
    with pytest.raises(AssertionError, match="imports another role"):
        test_roles_never_import_each_other(graph)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == "rlstream.core"))
def test_contract_imports_no_torch(module):
    """The CLI validates configs and answers --help before any heavy import: the contract
    layer never imports torch or transformers, not even lazily."""
    heavy = {n for n in imported_names(MODULES[module], module) if n.split(".")[0] in ("torch", "transformers")}
    assert not heavy, f"{module} imports {sorted(heavy)}"


def test_the_circle_check_can_fail(monkeypatch):
    monkeypatch.setitem(GRAPH, "rlstream.core.keys", GRAPH["rlstream.core.keys"] | {"rlstream.core.bus"})
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_docstring(module):
    path = MODULES[module]
    text = path.read_text()
    if path.name == "__init__.py" and not text.strip():
        return
    assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring saying what it owns"


def test_every_package_is_installed():
    """pyproject.toml lists the packages by name: a new folder left out of it would import from
    a source checkout and be missing from an installed rlstream."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages in pyproject.toml"
