"""The configuration page's field reference, built from the pydantic models when the site is
built, so that it cannot drift from the code: an MkDocs hook (mkdocs.yml `hooks:`) that replaces
the placeholder in docs/configuration.md with one table per model: every field's dotted name,
type, default, bounds and description. Sub-models (`[trainer]`, `[redis]`, ...) are walked
generically, so a new section or field appears without editing this file. Within a table the
cookbook's hosted-only fields (accepted and ignored) follow rlstream's own, and the tables that
only hold cookbook spellings come last, so a reader meets what rlstream does first; ``SEE``
adds a link to the page that explains a field or table (strict builds check those links).
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

# How a field's description marks a cookbook field (rlstream.core.cookbook_config, the cookbook
# sections): only used to order rows and tables, so a changed wording costs the order, not a field.
HOSTED = "hosted only"
SPELLING = "spelling of"

# dotted field or table name -> (link text, target): where the field or table is explained.
SEE: dict[str, tuple[str, str]] = {
    "max_head_offpolicy_versions": ("Asynchrony", "algorithms.md#asynchrony-how-far-sampling-runs-ahead"),
    "policy_loss": ("Losses", "algorithms.md#losses-and-the-trainers-options"),
    "lora_rank": ("LoRA", "algorithms.md#lora"),
    "dcp_save_interval": ("Long runs", "operations.md#long-runs-retention-recovery-export"),
    "tis": ("Losses and the trainer's options", "algorithms.md#losses-and-the-trainers-options"),
    "trainer": ("A trainer step that fits", "algorithms.md#a-trainer-step-that-fits-micro-batches-precision-devices"),
    "redis": ("Security and trust boundaries", "operations.md#security-and-trust-boundaries"),
    "workers": ("Throughput: many groups in flight per worker",
                "operations.md#throughput-many-groups-in-flight-per-worker"),
    "inference": ("Sampling from an inference server", "operations.md#sampling-from-an-inference-server-vllm-sglang"),
    "retention": ("Long runs", "operations.md#long-runs-retention-recovery-export"),
    "metrics": ("Operating rlstream", "operating.md#running-the-exporter"),
    "deployment": ("Porting cookbook code", "rollouts.md#porting-cookbook-code"),
    "weight_sync": ("Porting cookbook code", "rollouts.md#porting-cookbook-code"),
    "infra": ("Porting cookbook code", "rollouts.md#porting-cookbook-code"),
}


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


def constraints(field: FieldInfo) -> list[tuple[bool, Any]]:
    """(of an item?, constraint): the field's own metadata plus what ``Annotated`` carries inside
    its type (a list's length), and the constraints on a list's items (a module name's pattern)."""
    found = [(False, item) for item in field.metadata]

    def walk(tp: Any, item: bool) -> None:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            for extra in args[1:]:
                found.extend((item, m) for m in (extra.metadata if isinstance(extra, FieldInfo) else [extra]))
            walk(args[0], item)
        elif origin in (Union, types.UnionType):
            for arg in args:
                walk(arg, item)
        elif origin in (list, tuple, set, frozenset):
            for arg in args:
                walk(arg, True)

    walk(field.annotation, False)
    return found


def number(value: Any) -> str:
    """A bound as a reader compares it: ``1,000,000`` rather than ``1000000.0``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def bounds(field: FieldInfo) -> str:
    """The field's range, length and pattern, in the table's Markdown (a pattern as a code span,
    where a table pipe needs no escape)."""
    words = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt"),
             annotated_types.MinLen: ("length ≥", "min_length"), annotated_types.MaxLen: ("length ≤", "max_length")}
    out = []
    for item, constraint in constraints(field):
        prefix = "each item " if item else ""
        for kind, (sign, attr) in words.items():
            if isinstance(constraint, kind):
                out.append(f"{prefix}{sign} {number(getattr(constraint, attr))}")
        pattern = getattr(constraint, "pattern", None)
        if isinstance(pattern, str):
            out.append(f"{prefix}matches `{pattern}`")
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
    """Prose for a table cell: outside code spans HTML-escaped (``runs/<run>/`` is not a tag) and
    pipes escaped (they would split the cell); inside code spans as written, since Python-Markdown
    splits no cell inside one and would show the backslash of an escaped pipe."""
    parts = value.replace("``", "`").replace("\n", " ").split("`")
    parts = [part if i % 2 else html.escape(part, quote=False).replace("|", "\\|") for i, part in enumerate(parts)]
    return "`".join(parts)


def is_cookbook(field: FieldInfo) -> bool:
    return (field.description or "").startswith((HOSTED, SPELLING))


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted name, field) for the model's plain fields in declaration order, the hosted-only
    ones after the rest."""
    fields = [(prefix + name, field) for name, field in model.model_fields.items() if not submodel(field.annotation)]
    return sorted(fields, key=lambda item: (item[1].description or "").startswith(HOSTED))


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, model) for every sub-model, depth first; tables that only hold cookbook
    spellings and hosted-only fields last."""
    out = []
    for name, field in model.model_fields.items():
        sub = submodel(field.annotation)
        if sub is not None:
            out.append((prefix + name, sub))
            out.extend(sections(sub, prefix + name + "."))
    return sorted(out, key=lambda item: all(is_cookbook(f) for _, f in rows(item[1])))


def see(name: str) -> str:
    label, target = SEE[name]
    return f"[{label}]({target})"


def table(fields: list[tuple[str, FieldInfo]]) -> str:
    lines = ["| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, field in fields:
        meaning = text(field.description or "") + (f" ({see(name)})" if name in SEE else "")
        cells = [f"`{name}`", text(type_name(field.annotation)), text(default(field)), bounds(field), meaning]
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
    unknown = set(SEE) - set(documented_fields()) - {prefix for prefix, _ in sections(model)}
    if unknown:
        raise ValueError(f"docs/hooks/config_reference.py links fields or tables that do not exist: {sorted(unknown)}")
    out = ["### Top-level fields", "", table(rows(model))]
    for prefix, sub in sections(model):
        doc = " ".join((sub.__doc__ or "").strip().split("\n\n", 1)[0].split())
        more = f"More: {see(prefix)}." if prefix in SEE else ""
        out += ["", f"### `[{prefix}]`", ""]
        if doc or more:
            out += [" ".join(part for part in (text(doc), more) if part), ""]
        out.append(table(rows(sub, prefix + ".")))
    return "\n".join(out) + "\n"


def render(markdown: str) -> str:
    if PLACEHOLDER not in markdown:
        raise ValueError(f"{PAGE} has lost its placeholder {PLACEHOLDER}: the config reference has nowhere to go")
    # md_in_html keeps the Markdown inside the div; the class lets docs/stylesheets/extra.css keep
    # field names whole without touching the site's other tables.
    return markdown.replace(PLACEHOLDER, f'<div class="config-reference" markdown>\n\n{reference()}\n</div>')


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == PAGE:
        return render(markdown)
    return markdown
