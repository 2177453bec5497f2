"""The configuration reference, generated from the pydantic models so it cannot drift.

Every section of :class:`~async_ca_exec.config.Config` becomes a Markdown table: key, type,
default, the environment variable or executor argument that sets it, and its meaning (the
field's description). Secret defaults are never shown. The copy users read is the block between
:data:`START` and :data:`END` in ``docs/configuration.md`` (:data:`DOC`); a test fails while it
differs from :func:`render`.

.. code-block:: sh

    python -m async_ca_exec.configdoc                                  # print the reference
    python -m async_ca_exec.configdoc --update docs/configuration.md   # rewrite the doc's generated block
    python -m async_ca_exec.configdoc --check docs/configuration.md    # exit 1 when that block is out of date
    acx config reference                                               # the same as the first

``--update`` and ``--check`` without a file mean ``docs/configuration.md`` (from the repository root).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import config as _config

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
#: The page that holds the generated reference, relative to the repository root.
DOC = "docs/configuration.md"
#: The command that regenerates that page's block (failure messages quote it).
REGENERATE = f"python -m async_ca_exec.configdoc --update {DOC}"


@dataclass(frozen=True)
class Row:
    """One key of one section, as the reference shows it."""

    key: str
    type: str
    default: str
    set_by: str
    meaning: str


@dataclass(frozen=True)
class Section:
    """One section of the config file (a pydantic model in the tree)."""

    name: str  # dotted, e.g. "azure_containers"
    model: type[BaseModel]
    rows: tuple[Row, ...]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if inspect.isclass(annotation) and issubclass(annotation, BaseModel) else None


def _walk(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            dotted = f"{prefix}{name}"
            yield dotted, sub
            yield from _walk(sub, f"{dotted}.")


def _backend_sections(model: type[BaseModel]) -> dict[str, str]:
    """Section name -> backend, for the sections that ``section=None`` settings land in
    (the active backend's), found by asking the model which section each backend uses."""
    out: dict[str, str] = {}
    if model is not _config.Config:
        return out
    for backend in sorted(set(_config.BACKEND_ALIASES.values())):
        cfg = _config.Config.model_validate({"lithops": {"backend": backend}})
        for name in type(cfg).model_fields:
            if getattr(cfg, name) is cfg.backend_section:
                out[name] = backend
    return out


def _setters(section: str, key: str, backends: Mapping[str, str]) -> str:
    """The environment variables and executor arguments that set ``section.key``."""
    names: list[str] = []
    scoped = False
    for table, fmt in ((_config.ENV_VARS, "`{}`"), (_config.ARGUMENTS, "`{}=`")):
        for name, (k, target) in table.items():
            if k != key:
                continue
            if target == section:
                names.append(fmt.format(name))
            elif target is None and section in backends:
                names.append(fmt.format(name))
                scoped = True
    text = ", ".join(names)
    if text and scoped:
        text += f" (backend `{backends[section]}`)"
    return text


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(a) for a in typing.get_args(annotation))


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple, set, frozenset, Sequence):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is SecretStr:
        return "secret str"
    return getattr(annotation, "__name__", str(annotation))


def _number(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{v:g}"


def _constraints(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sign} {_number(value)}")
    return f" ({', '.join(parts)})" if parts else ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None or value is PydanticUndefined:
        return "unset"
    if _is_secret(field.annotation) or isinstance(value, SecretStr):
        return "*(hidden)*"  # never a secret's value, not even a default one
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"`{_number(value)}`"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, and ``<...>`` outside code spans escaped so
    Markdown does not take ``<account>`` for an HTML tag."""
    parts = " ".join(text.replace("``", "`").split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i])
    return "`".join(parts)


def collect(model: type[BaseModel] | None = None) -> list[Section]:
    """Every section of the model tree (default: :class:`Config`), in declaration order,
    with a row per key (nested sections get their own entry, not a row)."""
    root = model or _config.Config
    backends = _backend_sections(root)
    out = []
    for name, sub in _walk(root, ""):
        rows = []
        for key, field in sub.model_fields.items():
            if _submodel(field.annotation) is not None:
                continue
            key_cell = f"`{key}`" + (f" (alias `{field.alias}`)" if field.alias and field.alias != key else "")
            rows.append(
                Row(
                    key=key_cell,
                    type=_type_name(field.annotation) + _constraints(field),
                    default=_default(field),
                    set_by=_setters(name, key, backends),
                    meaning=field.description or "",
                )
            )
        out.append(Section(name, sub, tuple(rows)))
    return out


def undocumented(model: type[BaseModel] | None = None) -> list[str]:
    """``section.key`` of every field without a description."""
    return [f"{s.name}.{r.key.split('`')[1]}" for s in collect(model) for r in s.rows if not r.meaning]


def render(model: type[BaseModel] | None = None) -> str:
    """The reference as Markdown: a heading, a line and a table per section.

    >>> "| `backend` |" in render()
    True
    """
    aliases: dict[str, list[str]] = {}
    if model in (None, _config.Config):
        for alias, target in _config._SECTION_ALIASES.items():
            aliases.setdefault(target, []).append(alias)
    blocks = []
    for section in collect(model):
        level = "#" * (3 + section.name.count("."))
        also = aliases.get(section.name)
        head = f"{level} `{section.name}`" + (f" (alias {', '.join(f'`{a}`' for a in also)})" if also else "")
        lines = [head, ""]
        doc = inspect.getdoc(section.model)
        if doc and section.model.__doc__:  # the model's own docstring, not an inherited one
            lines += [_cell(doc.split("\n\n")[0]), ""]
        lines += [
            "| key | type | default | environment / argument | meaning |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.key} | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.set_by)} | {_cell(r.meaning)} |" for r in section.rows
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def extract(text: str) -> str | None:
    """The text between the markers :data:`START` and :data:`END` (None when they are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(START) : end].strip("\n") + "\n"


def replace(text: str, reference: str) -> str:
    """``text`` with the block between the markers replaced by ``reference``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {START} and {END} are missing; put them where the reference goes")
    return text[: start + len(START)] + "\n" + reference.strip("\n") + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m async_ca_exec.configdoc", description="Print the configuration reference (Markdown)."
    )
    group = p.add_mutually_exclusive_group()
    update_help = f"rewrite the block between {START} and {END} in FILE (default: {DOC})"
    group.add_argument("--update", metavar="FILE", nargs="?", const=DOC, help=update_help)
    check_help = f"exit 1 when FILE's block differs from the models (default: {DOC})"
    group.add_argument("--check", metavar="FILE", nargs="?", const=DOC, help=check_help)
    args = p.parse_args(argv)
    reference = render()
    if args.update or args.check:
        path = Path(args.update or args.check)
        text = path.read_text()
        if args.check:
            current = extract(text)
            if current is None:
                print(f"{path}: the markers {START} and {END} are missing", file=sys.stderr)
                return 1
            if current != reference:
                fix = f"python -m async_ca_exec.configdoc --update {path}"
                print(f"{path}: the configuration reference is out of date; run: {fix}", file=sys.stderr)
                return 1
            return 0
        try:
            new = replace(text, reference)
        except ValueError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        if new != text:
            path.write_text(new)
            print(f"updated the configuration reference in {path}", file=sys.stderr)
        return 0
    sys.stdout.write(reference)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
