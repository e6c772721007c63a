"""`prefsteer attributes`: the attribute library (EXACT's 42, or --attributes-file's).

    prefsteer attributes
    prefsteer attributes --json --attributes-file my-library.json
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from prefsteer.cli.output import emit


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = "list the attribute library"
    p = subparsers.add_parser("attributes", parents=parents, help=help_, description=help_)
    p.set_defaults(func=cmd_attributes, writes=False)


def cmd_attributes(args, ctx) -> int:
    lib = ctx.library()
    emit(args, {"library": lib.name, "attributes": [asdict(a) for a in lib.attributes]},
         lambda: f"{lib.name}: {len(lib)} attributes\n" +
         "\n".join(f"  {a.name:<24} {a.description}" for a in lib.attributes))
    return 0
