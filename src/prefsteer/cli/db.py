"""`prefsteer db copy SRC DST`: a whole memory from one database to another.

    prefsteer db copy memory.db postgresql://app@db-host/prefsteer     # to PostgreSQL, for replicas
    prefsteer db copy postgresql://app@db-host/prefsteer backup.db    # and back to a file

SRC and DST are each a SQLite file or a postgresql:// URL. DST must be new or empty; the copy is
one transaction, checked by the row counts of every table before it commits.
"""

from __future__ import annotations

import argparse

from prefsteer.cli.output import emit


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = "manage the memory's database: copy a whole memory between SQLite and PostgreSQL"
    p = subparsers.add_parser("db", parents=parents, help=help_, description=help_)
    sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True, help="copy")
    c = sub.add_parser("copy", parents=parents, help="copy every table of SRC into DST (new or empty)",
                       description=__doc__.split("\n\n")[2])
    c.add_argument("src", metavar="SRC", help="the memory to copy: a SQLite file or a postgresql:// URL")
    c.add_argument("dst", metavar="DST", help="where to copy it: a new SQLite file or an empty PostgreSQL database")
    c.set_defaults(func=cmd_db, writes=False)


def cmd_db(args, ctx) -> int:
    from prefsteer.storage import Memory
    from prefsteer.storage.base import copy_memory

    src = Memory(args.src, create=False)
    dst = Memory(args.dst)
    try:
        counts = copy_memory(src, dst)
    finally:
        src.close()
        dst.close()
    emit(args, {"src": src.path, "dst": dst.path, "rows": counts},
         lambda: f"copied {src.path} to {dst.path}: " + ", ".join(f"{n} {t}" for t, n in counts.items()))
    return 0
