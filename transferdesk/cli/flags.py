"""Command-line flags from the pydantic configuration: one `--section.field VALUE` flag per
setting, generated so that --help never drifts from the configuration, and `--set KEY=VALUE`
as another spelling of the same.

Not pydantic-settings' CliSettingsSource nor jsonargparse: both read structured values as JSON
only (`--data.tasks '[urgency, sentiment]'`, YAML, is refused), have no `--set`, and change the
help (aliases without their own metavar, `(default factory: list)`); jsonargparse also lets a
--config given after a flag override it.
"""

from __future__ import annotations

import argparse
import re
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from transferdesk.config import RunConfig
from transferdesk.errors import TransferDeskError

# Short flags (and their metavars) for the settings people change most; every setting also
# has a --section.field flag.
ALIASES = {
    "data.train": ("--train", "FILE"),
    "data.valid": ("--valid", "FILE"),
    "data.test": ("--test", "FILE"),
    "data.source": ("--source", "FILE"),
    "model.backbone": ("--backbone", "NAME_OR_DIR"),
    "output": ("--output", "DIR"),
    "name": ("--name", "NAME"),
    "warm_start.parent": ("--from", "MODEL"),
}
NULL_WORDS = {"none", "null", ""}
# Numbers as typed: YAML 1.1 reads 013 as octal 11, and 1e-4 (no dot) as text.
INTEGER = re.compile(r"[-+]?\d+")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Where add_config_flags leaves, on the parsed arguments, which settings it made flags for.
FIELDS_DEST = "config_fields"


def _metavar(annotation: Any) -> str:
    """INT, INT|NONE, {mean,cls}, LIST[STR], TUPLE[FLOAT,FLOAT] … from a type annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _metavar(args[0])
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (Union, UnionType):
        return "|".join(map(_metavar, args))
    if annotation is NoneType:
        return "NONE"
    name = getattr(origin or annotation, "__name__", str(annotation)).upper()
    return f"{name}[{','.join(map(_metavar, args))}]" if args else name


def _is_text(annotation: Any) -> bool:
    return annotation in (str, str | None)


def iter_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf setting as (dotted name, FieldInfo), for generating CLI flags."""
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(iter_fields(ann, f"{dotted}."))
        else:
            out.append((dotted, info))
    return out


def add_config_flags(
    parser: argparse.ArgumentParser,
    schema: type[BaseModel],
    aliases: dict[str, tuple[str, str]] | None = None,
) -> None:
    """One `--section.field VALUE` flag per setting of `schema`, grouped by section, plus
    `--set KEY=VALUE` as another spelling of the same. Read them back with
    `config_overrides(args)`."""
    aliases = ALIASES if aliases is None else aliases
    groups: dict[str, argparse._ArgumentGroup] = {}
    fields: dict[str, bool] = {}
    for dotted, info in iter_fields(schema):
        fields[dotted] = _is_text(info.annotation)
        section = dotted.rpartition(".")[0] or "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        short, metavar = aliases.get(dotted, (None, _metavar(info.annotation)))
        default = info.get_default(call_default_factory=True)
        groups[section].add_argument(
            *dict.fromkeys(f for f in (short, f"--{dotted}") if f),
            dest=dotted,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=f"{info.description} [default: {default}]".replace("%", "%%"),  # argparse formats help
        )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="set_pairs",
        metavar="KEY=VALUE",
        help="another spelling of --KEY VALUE (repeatable), e.g. --set training.epochs=5",
    )
    parser.set_defaults(**{FIELDS_DEST: fields})


def parse_value(raw: str | None, text: bool) -> Any:
    """A flag's value: null/none/empty is None; text settings as written; others as YAML, so
    4, 1e-4, true, [8, 16] and {urgency: {weight: 0.5}} work."""
    if raw is None or raw.strip().lower() in NULL_WORDS:
        return None
    if text:
        return raw
    if INTEGER.fullmatch(raw.strip()):
        return int(raw)
    if FLOAT.fullmatch(raw.strip()):
        return float(raw)
    return yaml.safe_load(raw)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted settings given on the command line, as flags or as --set pairs."""
    fields: dict[str, bool] = getattr(args, FIELDS_DEST)
    given = {key: parse_value(value, fields[key]) for key, value in vars(args).items() if key in fields}
    for pair in args.set_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TransferDeskError(f"--set {pair!r}: expected KEY=VALUE, e.g. training.epochs=5")
        if key not in fields:
            nested = [f for f in fields if f.endswith(f".{key}")]
            hint = f"did you mean {nested[0]}?" if nested else "see --help for the settings"
            raise TransferDeskError(f"--set {key}: no such setting; {hint}")
        given[key] = parse_value(value, fields[key])
    return given
