"""Turning config dataclasses into command-line options, so the two never drift apart.

A field's ``metadata["help"]`` is its help text; booleans become ``--flag``/``--no-flag``, lists
take several values, dicts a JSON object. With ``prefix="drift-"`` the field ``beta`` becomes
``--drift-beta`` (stored as ``args.drift_beta``).

    >>> add_dataclass_args(parser, DriftConfig, prefix="drift-")          # doctest: +SKIP
    >>> cfg = dataclass_from_args(DriftConfig, parser.parse_args(), prefix="drift-")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from prefsteer.errors import InputError


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_dataclass_args(parser, cls: type, prefix: str = "", skip: tuple[str, ...] = (),
                       defaults: dict[str, Any] | None = None) -> None:
    """One option per field of ``cls`` on ``parser`` (a parser or an argument group); an option
    not given leaves the attribute unset, so the dataclass's default applies (or the caller's
    ``defaults``, which the help then shows)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (f.metadata.get("flag") or prefix + f.name.replace("_", "-"))
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        help_ = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        kw: dict[str, Any] = {"dest": prefix.replace("-", "_") + f.name, "default": argparse.SUPPRESS,
                              "help": help_}
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        args = typing.get_args(typ)
        base = next((a for a in args if a is not type(None)), typ) if args else typ
        origin = typing.get_origin(base) or base
        if origin in (list, tuple):
            inner = next(iter(typing.get_args(base)), str)
            parser.add_argument(flag, type=inner if inner in (int, float, str) else str, nargs="+", **kw)
        elif origin is dict:
            parser.add_argument(flag, type=_json_object, metavar="JSON", **kw)
        elif origin in (int, float, str):
            parser.add_argument(flag, type=origin, **kw)
        else:
            parser.add_argument(flag, **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **overrides: Any):
    """Build ``cls`` from the options the user gave (others keep the dataclass's defaults); a bad
    value is an `InputError` naming the option."""
    dest = prefix.replace("-", "_")
    values = {f.name: getattr(args, dest + f.name)
              for f in dataclasses.fields(cls) if hasattr(args, dest + f.name)}
    values.update(overrides)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e), field=None) from e
