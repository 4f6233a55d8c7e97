"""The configuration page's field reference, built from the pydantic models when the site is
built, so that it cannot drift from the code: an MkDocs hook (mkdocs.yml `hooks:`) that replaces
the placeholder in docs/configuration.md with one table per model: every field's dotted name,
type, default, bounds and description. Sub-models (`[trainer]`, `[redis]`, ...) are walked
generically, so a new section or field appears without editing this file.
"""
from __future__ import annotations

import html
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PLACEHOLDER = "<!-- config-reference -->"
PAGE = "configuration.md"


def config_model() -> type[BaseModel]:
    # Imported here, not at module level: mkdocs loads this file before the page needs it, and a
    # broken import then names the page it failed for.
    from rlstream.core.config import Config

    return Config


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds when it is a table of its own (``trainer: TrainerConfig``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def type_name(tp: Any) -> str:
    """A type as a reader writes it in TOML terms: ``int | None``, ``"grpo" | "dapo"``, ``list[str]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    return getattr(tp, "__name__", str(tp))


def constraints(field: FieldInfo) -> list[Any]:
    """The field's own metadata plus what ``Annotated`` carries inside its type (a list's length)."""
    found = list(field.metadata)

    def walk(tp: Any) -> None:
        args = typing.get_args(tp)
        if typing.get_origin(tp) is Annotated:
            for extra in args[1:]:
                found.extend(extra.metadata if isinstance(extra, FieldInfo) else [extra])
            walk(args[0])
        elif typing.get_origin(tp) in (Union, types.UnionType):
            for arg in args:
                walk(arg)

    walk(field.annotation)
    return found


def bounds(field: FieldInfo) -> str:
    words = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt"),
             annotated_types.MinLen: ("length ≥", "min_length"), annotated_types.MaxLen: ("length ≤", "max_length")}
    out = []
    for item in constraints(field):
        for kind, (sign, attr) in words.items():
            if isinstance(item, kind):
                out.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(out)


def default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return f"`{value!r}`"


def text(value: str) -> str:
    """Prose for a table cell: HTML-escaped outside code spans (``runs/<run>/`` is not a tag),
    pipes escaped everywhere (they would split the cell)."""
    parts = value.replace("``", "`").split("`")
    parts = [part if i % 2 else html.escape(part, quote=False) for i, part in enumerate(parts)]
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted name, field) for the model's plain fields, in declaration order."""
    return [(prefix + name, field) for name, field in model.model_fields.items() if not submodel(field.annotation)]


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, model) for every sub-model, depth first."""
    out = []
    for name, field in model.model_fields.items():
        sub = submodel(field.annotation)
        if sub is not None:
            out.append((prefix + name, sub))
            out.extend(sections(sub, prefix + name + "."))
    return out


def table(fields: list[tuple[str, FieldInfo]]) -> str:
    lines = ["| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, field in fields:
        cells = [f"`{name}`", text(type_name(field.annotation)), text(default(field)), bounds(field),
                 text(field.description or "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def documented_fields() -> list[str]:
    """Every dotted field name the reference lists, in page order (what the test compares)."""
    model = config_model()
    names = [name for name, _ in rows(model)]
    for prefix, sub in sections(model):
        names.extend(name for name, _ in rows(sub, prefix + "."))
    return names


def reference() -> str:
    """The Markdown that replaces the placeholder: the top-level fields, then one heading and
    table per sub-model (its docstring's first paragraph as the introduction)."""
    model = config_model()
    out = ["### Top-level fields", "", table(rows(model))]
    for prefix, sub in sections(model):
        doc = (sub.__doc__ or "").strip().split("\n\n", 1)[0]
        out += ["", f"### `[{prefix}]`", ""]
        if doc:
            out += [text(" ".join(doc.split())), ""]
        out.append(table(rows(sub, prefix + ".")))
    return "\n".join(out) + "\n"


def render(markdown: str) -> str:
    if PLACEHOLDER not in markdown:
        raise ValueError(f"{PAGE} has lost its placeholder {PLACEHOLDER}: the config reference has nowhere to go")
    return markdown.replace(PLACEHOLDER, reference())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == PAGE:
        return render(markdown)
    return markdown
