"""``docs/params.md``, the params reference, generated from the typed config's field documentation.

``python -m consissr.docs_params`` writes the page; ``--check`` exits 1 when it is stale or a field is
undocumented. ``missing_docs`` walks a params file's keys; ``undocumented`` walks the schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from consissr.config import STAGE_PARAMS, Params, load_params
from consissr.errors import ParamsError
from consissr.io import write_bytes

TITLE = "Params reference"
_INTRO = """\
Every key of `params.yaml`, one table per section. The page is generated from the typed config,
`consissr/config.py`, by `python -m consissr.docs_params`: change a key's documentation there.

**default** is the embedded tiny profile that `params.yaml` spells out; **paper** is the value in
`configs/paper.yaml` (the paper's §4.1 setup) where it differs. A key left out of a params file takes
its default. Loading fails, naming the key, on an unknown key, a wrong type or a value out of
**range**, except where the range says "not checked on load". Change a key for one run with
`consissr <stage> --set key=value` or `dvc exp run --set-param key=value`."""


# --------------------------------------------------------------------------------------------
# the documentation of one field
# --------------------------------------------------------------------------------------------
def _item_class(tp: Any) -> type | None:
    """The dataclass a field holds: itself (a subsection) or the items of a ``tuple[X, ...]`` (a list of them)."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _allowed_values(tp: Any) -> list[Any] | None:
    """The values a bool, Literal or Literal-or-null type allows; None when the type does not list them."""
    if tp is bool:
        return [True, False]
    if tp is type(None):
        return [None]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed_values(a) for a in typing.get_args(tp)]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    return None


def _class_doc(cls: type) -> str:
    """A dataclass's own docstring, first paragraph; empty when it has none (dataclass writes its signature)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split("\n\n")[0].split())


def meaning(f: dataclasses.Field, tp: Any) -> str:
    sub = _item_class(tp)
    return f.metadata.get("meaning", "") or (_class_doc(sub) if sub is not None and sub is tp else "")


def value_range(f: dataclasses.Field, tp: Any) -> str:
    """The documented range, or the values a bool / Literal type lists."""
    if f.metadata.get("range"):
        return f.metadata["range"]
    values = _allowed_values(tp)
    return " | ".join(_fmt(v) for v in values) if values else ""


def _problems(f: dataclasses.Field, tp: Any) -> str:
    missing = [what for what, text in (("meaning", meaning(f, tp)), ("range", value_range(f, tp)))
               if not text and not (what == "range" and _item_class(tp) is not None)]
    return " and ".join(missing)


def undocumented(cls: type = Params, prefix: str = "") -> list[str]:
    """``"<dotted key>: no <what>"`` for every field of the schema under ``cls`` that lacks a meaning or a range
    (a subsection or list of mappings needs only a meaning: its keys carry the rest)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if problem := _problems(f, tp):
            out.append(f"{prefix}{f.name}: no {problem}")
        sub = _item_class(tp)
        if sub is not None:
            out += undocumented(sub, f"{prefix}{f.name}{'.' if sub is tp else '[].'}")
    return out


def missing_docs(raw: Any, cls: type = Params, prefix: str = "") -> list[str]:
    """The keys of a params file's YAML (nested mappings and list items too) that the schema does not document:
    ``"<dotted key>: <why>"``."""
    if not isinstance(raw, dict):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in raw.items():
        if key not in fields:
            out.append(f"{prefix}{key}: not a field of {cls.__name__}")
            continue
        tp = hints[key]
        if problem := _problems(fields[key], tp):
            out.append(f"{prefix}{key}: no {problem}")
        sub = _item_class(tp)
        if sub is tp:
            out += missing_docs(value, sub, f"{prefix}{key}.")
        elif sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                out += missing_docs(item, sub, f"{prefix}{key}[{i}].")
    return out


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """YAML-ready value; a mapping in a list keeps only its keys that differ from their default."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    """A value as one would write it in params.yaml (YAML flow style)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30, allow_unicode=True,
                          sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _code(value: Any) -> str:
    return f"`{_cell(_fmt(value))}`"


_HEADER = ["| key | meaning | unit | range | default | paper |", "| --- | --- | --- | --- | --- | --- |"]


def _section(dotted: str, cls: type, default: Any, paper: Any, intro: str, level: int) -> list[str]:
    """The heading, intro and table of one (sub)section; ``default``/``paper``: its instances (None: a list item's
    schema, whose defaults are the fields' own)."""
    lines = ["#" * level + f" {dotted}", "", intro]
    if level == 2:
        stages = [s for s, keys in STAGE_PARAMS.items() if any(k == dotted or k.startswith(dotted + ".") for k in keys)]
        if stages:
            lines[-1] += " Read by the DVC stage" + ("s " if len(stages) > 1 else " ") + \
                ", ".join(f"`{s}`" for s in stages) + "."
    lines += ["", *_HEADER]
    subsections: list[list[str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = _item_class(tp)
        if default is None:
            value, other = f.default, dataclasses.MISSING
        else:
            value, other = getattr(default, f.name), getattr(paper, f.name)
        if sub is tp:  # a subsection: its own table below
            subsections.append(_section(f"{dotted}.{f.name}", sub, value, other, meaning(f, tp), level + 1))
            continue
        if sub is not None:
            subsections.append(_section(f"{dotted}.{f.name}[]", sub, None, None,
                                        f"The keys of each `{f.name}` entry.", level + 1))
        shown = "required" if value is dataclasses.MISSING else _code(value)
        differs = _code(other) if other is not dataclasses.MISSING and other != value else ""
        unit = f.metadata.get("unit", "")
        lines.append(f"| `{f.name}` | {_cell(meaning(f, tp))} | {_cell(unit)} | {_cell(value_range(f, tp))} "
                     f"| {shown} | {differs} |")
    for sub_lines in subsections:
        lines += ["", *sub_lines]
    return lines


def render(paper: Params) -> str:
    """The whole page; raises ValueError naming the undocumented fields."""
    problems = undocumented(Params)
    if problems:
        raise ValueError("undocumented params in consissr/config.py: " + "; ".join(problems))
    default = Params()
    hints = typing.get_type_hints(Params)
    lines = [f"# {TITLE}", "", _INTRO]
    for f in dataclasses.fields(Params):
        lines += ["", *_section(f.name, hints[f.name], getattr(default, f.name), getattr(paper, f.name),
                                meaning(f, hints[f.name]), 2)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consissr.docs_params", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/params.md"), help="default: docs/params.md")
    parser.add_argument("--paper", type=Path, default=Path("configs/paper.yaml"),
                        help="the params file of the paper column (default: configs/paper.yaml)")
    parser.add_argument("--check", action="store_true", help="exit 1 when --output differs from the generated page")
    args = parser.parse_args(argv)
    try:
        text = render(load_params(args.paper))
    except (ParamsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            print(f"{args.output} is stale: run python -m consissr.docs_params", file=sys.stderr)
            return 1
        return 0
    write_bytes(args.output, text.encode())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
