"""The `prefsteer` command line.

    prefsteer demo                                   # the main job, on the embedded default model
    prefsteer index --data pairs.jsonl               # EXACT offline: select attributes per pair
    prefsteer index --method drift --data pairs.jsonl   # any registered method, stored per user
    prefsteer profile --user alice                   # what was learned about alice
    prefsteer generate --user alice "PROMPT"         # EXACT online: retrieve, inject, generate
    prefsteer generate --method drift --drift-beta 2 --user alice "PROMPT"
    prefsteer generate --method cliper --prefs concise=1,humor=0.5 --alpha 0.5 "PROMPT"
    prefsteer delete --user alice                    # every row stored about alice
    prefsteer feedback --user alice --prompt P --chosen A --rejected B
    prefsteer attributes                             # the attribute library
    prefsteer eval --config quick | eval report RUN | eval compare A B
    prefsteer cliper train | calibrate | eval
    prefsteer db copy memory.db postgresql://app@host/db   # the memory to PostgreSQL (and back)

Every command takes the common options (--json, --db, --backend, --model, ...). A subcommand lives
in a module of `prefsteer.cli` exposing ``add_parser(subparsers, parents)``, which sets
``func=cmd(args, ctx) -> int``. A user's mistake (bad input, a missing file, a bad option, a method
the backend cannot run) ends in one line on stderr and exit status 2; anything else is a bug and
exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from prefsteer.cli.context import Context
from prefsteer.cli.demo import DEMO_ATTRIBUTES
from prefsteer.cli.options import common_parser
from prefsteer.cli.output import report_error
from prefsteer.errors import PrefsteerError

__all__ = ["COMMAND_MODULES", "DEMO_ATTRIBUTES", "Context", "main", "make_parser"]

# One module per command, in the order `prefsteer --help` lists them; each exposes
# add_parser(subparsers, parents) and its cmd_<name>(args, ctx). Beside them: `options` (the common
# and the methods' options), `context` (Context: what the commands share), `output` (emit, errors).
COMMAND_MODULES = tuple(f"prefsteer.cli.{m}" for m in (
    "attributes", "index", "profile", "generate", "delete", "feedback", "demo", "eval", "cliper", "serve", "keys",
    "db"))


def make_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(prog="prefsteer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub, [common])
    return parser


def check_text_arguments(args) -> None:
    """Every text argument is valid UTF-8 (a byte that is not arrives as a lone surrogate, which
    would fail later, in the tokenizer or the database): an `InputError` naming the argument."""
    from prefsteer.errors import InputError

    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str):
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                flag = name if name == "prompt" else "--" + name.replace("_", "-")
                raise InputError(f"not valid UTF-8 (byte {v[e.start].encode('utf-8', 'surrogateescape')!r} at "
                                 f"character {e.start}); pass the text in UTF-8", field=flag) from None


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, its message already printed)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "quiet", False) or getattr(args, "json", False):  # no bars, the weights' loading included
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        args.quiet = True
    ctx = Context(args)
    # `kill` (SIGTERM) stops a command the way Ctrl-C does: cleanup runs, finished work is saved
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    name = " ".join(x for x in (args.command, getattr(args, "cliper_command", None)) if x)
    try:
        check_text_arguments(args)
        if getattr(args, "backend", None):
            from prefsteer.backends import check_backend

            check_backend(args.backend)  # before anything is read or written
        if getattr(args, "embedder", None) and getattr(args, "writes", False):
            from prefsteer.retrieval import check_embedder

            check_embedder(args.embedder)
        return args.func(args, ctx) or 0
    except PrefsteerError as e:  # the user's to fix: one line (a list of bad lines at most), no traceback
        report_error(args, name, e)
        return 2
    except BrokenPipeError:  # `prefsteer ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"prefsteer {name}: interrupted; finished work is saved, run again to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug: the traceback is what a report needs
        import traceback

        traceback.print_exc()
        print(f"prefsteer {name}: internal error (a bug; please report the traceback above)", file=sys.stderr)
        return 1
    finally:
        ctx.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
