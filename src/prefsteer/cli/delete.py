"""`prefsteer delete`: a user, and every row stored about them.

    prefsteer delete --user alice
"""

from __future__ import annotations

import argparse

from prefsteer.cli.output import emit


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = "delete a user: every pair, selection, entry, method state and job"
    p = subparsers.add_parser("delete", parents=parents, help=help_, description=help_)
    p.set_defaults(func=cmd_delete, writes=False)
    p.add_argument("--user", required=True, help="user id")


def cmd_delete(args, ctx) -> int:
    mem = ctx.memory
    gone = mem.delete_user(args.user)  # an unknown user: exit 2, nothing touched
    emit(args, {"user_id": args.user, "deleted": gone},
         lambda: f"deleted user {args.user}: " + ", ".join(f"{n} {k}" for k, n in gone.items()))
    return 0
