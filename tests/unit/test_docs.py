"""The design document stays cited correctly: docs/design.md exists and the README links it;
nothing in the repository (the documentation site's pages in docs/ included) names the original
design file any more; every citation of a
section ("docs/design.md §7 Commit protocol": number and exact title, whitespace and comment
markers folded) names a heading that docs/design.md has; every link to a design.md anchor and
every in-page README anchor resolves. The checks are pure functions over text, so the
tests below also show that each one can fail."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DESIGN_PATH = REPO / "docs" / "design.md"
OLD_NAME = "DESIGN" + ".md"  # spelled in two parts so that this file does not mention it
SECTION = "\u00a7"  # the section sign, written as an escape for the same reason
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".sh", ""}
SKIP_DIRS = {"runs", "build", "dist", "node_modules", "__pycache__"}
VISIBLE_DOT_DIRS = {".ci", ".github"}

_HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.MULTILINE)
_NUMBERED = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.+?)\s*$", re.MULTILINE)
_CITATION = re.compile(SECTION + r"(\d+(?:\.\d+)?)")
_DESIGN_ANCHOR = re.compile(r"design\.md#([^)\s\"'>]+)")
_PAGE_ANCHOR = re.compile(r"\]\(#([^)\s]+)\)")
_DESIGN_LINK = re.compile(r"\]\(docs/design\.md(?:#[^)]*)?\)")


def repo_files() -> list[Path]:
    """Text files of the repository, without virtualenvs, caches, build output or runs (pruned
    while walking: a virtualenv holds tens of thousands of files)."""
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not (d in SKIP_DIRS or d.endswith(".egg-info")
                                                 or (d.startswith(".") and d not in VISIBLE_DOT_DIRS)))
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size < 1_000_000:
                out.append(path)
    return out


def read(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return ""


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def sections(design: str) -> dict[str, str]:
    """Section number -> title, from headings like "## 7. Commit protocol" or "### 15.1 Title"."""
    return {num: title for num, title in _NUMBERED.findall(design)}


def anchors(markdown: str) -> set[str]:
    return {slug(title) for title in _HEADING.findall(markdown)}


def flatten(text: str) -> str:
    """One line: newlines, the indentation and comment markers of continuation lines folded
    into single spaces, so that a citation may wrap in a docstring or a comment."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#+[ \t]*)?", " ", text)


def citation_errors(text: str, known: dict[str, str], design_anchors: set[str], *, titles: bool = True) -> list[str]:
    """What is wrong with the design citations in ``text``. ``titles``: a citation must give the
    section's exact title after its number (everywhere but inside the design document)."""
    errors = []
    flat = flatten(text)
    for m in _CITATION.finditer(flat):
        num = m.group(1)
        if num not in known:
            errors.append(f"cites {SECTION}{num}, which docs/design.md does not have")
        elif titles and not flat[m.end():].startswith(" " + known[num]):
            got = flat[m.end():m.end() + len(known[num]) + 1].strip()
            errors.append(f"cites {SECTION}{num} as {got!r}; the section is titled {known[num]!r}")
    if titles and _CITATION.search(flat) and "design.md" not in text:
        errors.append(f"uses {SECTION} without naming docs/design.md")
    for anchor in _DESIGN_ANCHOR.findall(text):
        if anchor not in design_anchors:
            errors.append(f"links docs/design.md anchor #{anchor}, which is no heading there")
    return errors


def design_text() -> str:
    assert DESIGN_PATH.is_file(), "docs/design.md is missing"
    return DESIGN_PATH.read_text()


# ----------------------------------------------------------------------------- the repository


def test_design_document_exists_and_has_numbered_sections():
    known = sections(design_text())
    assert {"5", "7", "8", "10", "11", "15"} <= set(known), sorted(known)


def test_readme_links_the_design_document():
    assert _DESIGN_LINK.search(read(REPO / "README.md")), "README.md does not link docs/design.md"


def mentions_of_old_name(paths: list[Path], root: Path = REPO) -> list[str]:
    return [str(p.relative_to(root)) for p in paths if OLD_NAME in read(p)]


def test_nothing_mentions_the_original_design_file():
    offenders = mentions_of_old_name(repo_files())
    assert not offenders, f"{OLD_NAME} is gone; cite docs/design.md instead in: {offenders}"


def test_every_design_citation_names_an_existing_section():
    design = design_text()
    known, design_anchors = sections(design), anchors(design)
    errors = []
    for path in repo_files():
        is_design = path == DESIGN_PATH
        for error in citation_errors(read(path), known, design_anchors, titles=not is_design):
            errors.append(f"{path.relative_to(REPO)}: {error}")
    assert not errors, "\n".join(errors)


def test_readme_page_anchors_resolve():
    readme = read(REPO / "README.md")
    missing = sorted(set(_PAGE_ANCHOR.findall(readme)) - anchors(readme))
    assert not missing, f"README.md links to headings it does not have: {missing}"


# ----------------------------------------------------------------------------- the checks can fail

KNOWN = {"7": "Commit protocol", "15.1": "Commit by Lua script"}
ANCHORS = {"7-commit-protocol"}


def cite(rest: str) -> str:
    return f"see docs/design.md {SECTION}{rest} for why"


def link(anchor: str) -> str:
    return "[the commit](docs/design.md" + "#" + anchor + ")"  # in parts: this file links nothing


def test_a_good_citation_passes_even_when_wrapped():
    assert citation_errors(cite("7 Commit protocol"), KNOWN, ANCHORS) == []
    assert citation_errors(f'"""docs/design.md {SECTION}15.1 Commit by\n    Lua script."""', KNOWN, ANCHORS) == []
    assert citation_errors(f"# docs/design.md {SECTION}7 Commit\n# protocol", KNOWN, ANCHORS) == []
    assert citation_errors(link("7-commit-protocol"), KNOWN, ANCHORS) == []


def test_a_missing_section_fails():
    assert citation_errors(cite("99 Commit protocol"), KNOWN, ANCHORS) == [
        f"cites {SECTION}99, which docs/design.md does not have"]


def test_a_wrong_title_fails():
    [error] = citation_errors(cite("7 Commit protocl"), KNOWN, ANCHORS)
    assert "titled 'Commit protocol'" in error
    assert citation_errors(cite("7"), KNOWN, ANCHORS)  # a bare number is not enough outside the document
    assert citation_errors(f"(docs/design.md, {SECTION}7)", KNOWN, ANCHORS, titles=False) == []


def test_a_section_sign_without_the_document_fails():
    assert citation_errors(f"{SECTION}7 Commit protocol", KNOWN, ANCHORS) == [
        f"uses {SECTION} without naming docs/design.md"]


def test_a_broken_anchor_fails():
    assert citation_errors(link("7-commit"), KNOWN, ANCHORS) == [
        "links docs/design.md anchor #7-commit, which is no heading there"]


def test_the_old_name_is_detected(tmp_path):
    (tmp_path / "a.py").write_text(f'"""The gate of {OLD_NAME} section 4."""\n')
    (tmp_path / "b.py").write_text(f'"""The gate (docs/design.md {SECTION}5 Versions and the gate)."""\n')
    assert mentions_of_old_name(sorted(tmp_path.iterdir()), tmp_path) == ["a.py"]


def test_slugs_are_githubs():
    assert slug("15.1 Commit by Lua script, not MULTI/EXEC") == "151-commit-by-lua-script-not-multiexec"
    assert slug("Fault tolerance: what is promised") == "fault-tolerance-what-is-promised"
