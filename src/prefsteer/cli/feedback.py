"""`prefsteer feedback`: add preference pairs to a user's memory; every method fitted for the user
takes them the way it can (EXACT indexes them, others may mark their state stale).

    prefsteer feedback --user alice --prompt P --chosen A --rejected B
    prefsteer feedback --file more-pairs.jsonl
"""

from __future__ import annotations

import argparse

from prefsteer.cli.context import Context, check_lengths
from prefsteer.cli.options import method_parser
from prefsteer.cli.output import emit, short

# the method that learns a new user's first pairs, and that `feedback` always tells of new pairs
FEEDBACK_METHOD = "exact"


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = ("add preference pairs to a user's memory; every method fitted for the user takes them the way it "
             "can (EXACT indexes them)")
    p = subparsers.add_parser("feedback", parents=[*parents, method_parser()], help=help_, description=help_)
    p.set_defaults(func=cmd_feedback, writes=True)
    p.add_argument("--user", help="user id")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--chosen", help="the preferred answer")
    p.add_argument("--rejected", help="the dispreferred answer")
    p.add_argument("--pair-id", default=None, help="an id for the pair (default: its content)")
    p.add_argument("--file", default=None, help="or: a JSONL file of pairs")


def fitted_methods(mem, user: str) -> list[str]:
    """The methods to tell of a user's new pairs: the feedback method (EXACT, which indexes them)
    for a new user or one it has indexed, and every method the user has a state for."""
    from prefsteer.methods import available_methods

    known = mem.has_user(user)
    names = [FEEDBACK_METHOD] if not known or mem.entries(user) else []
    if known:
        names += [r["method"] for r in mem.method_states(user) if r["method"] not in names]
    return [n for n in names if n in available_methods()]


def cmd_feedback(args, ctx: Context) -> int:
    from prefsteer.data import group_by_user, load_pairs
    from prefsteer.errors import InputError
    from prefsteer.types import with_id
    from prefsteer.types import PreferencePair

    if args.file:
        pairs = load_pairs(args.file)
    else:
        for name in ("user", "prompt", "chosen", "rejected"):
            if not (getattr(args, name) or "").strip():
                raise InputError("missing or empty (give --file, or all of --user, --prompt, --chosen, "
                                 "--rejected)", field=f"--{name}")
        if args.chosen.strip() == args.rejected.strip():
            raise InputError("chosen and rejected are the same text", field="--chosen")
        pairs = [PreferencePair(args.user, args.prompt, args.chosen, args.rejected, args.pair_id or "")]
    pairs = [with_id(p) for p in pairs]  # the id is the content unless one was given
    mem = ctx.memory
    check_lengths(ctx, pairs, ctx.method(FEEDBACK_METHOD))
    report: list[dict] = []
    added: list[dict] = []
    # all or nothing: the pairs, EXACT's selections and every method's update commit together
    with mem.transaction():
        for user, ps in group_by_user(pairs).items():
            methods = fitted_methods(mem, user)
            counts = mem.add_pairs(ps)
            for name in methods:
                m = ctx.method(name)
                did = m.feedback(user, ps)
                report.append({"user_id": user, "method": name, "action": did})
                added += m.learned(user, ps)
            report.append({"user_id": user, "method": None, "action": "stored", **counts})
    emit(args, {"added": added, "methods": [r for r in report if r["method"]],
                "stored": [r for r in report if not r["method"]]}, lambda: "\n".join(
        [f"added to {e['user_id']}: {short(e['prompt'])} -> {', '.join(e['attributes'])}" for e in added] +
        [f"{r['user_id']}: {r['method']} {r['action']}" + (" (run `prefsteer index` to refit)"
                                                           if r["action"] == "stale" else "")
         for r in report if r["method"]]))
    return 0
