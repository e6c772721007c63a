"""`prefsteer index`: fit a method for every user of a file of preference pairs, and store what it
learned (EXACT, the default: an attribute selection per pair).

    prefsteer index --data pairs.jsonl
    prefsteer index --method drift --data pairs.jsonl --user alice --limit 20
    prefsteer index --data pairs.jsonl --executor ray --address auto      # EXACT's selections on Ray
"""

from __future__ import annotations

import argparse
import time

from prefsteer.cli.context import Context, check_lengths
from prefsteer.cli.options import method_parser, reject_other_options
from prefsteer.cli.output import emit


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = ("fit a method (default EXACT: select attributes for every preference pair) for every user of a "
             "file, and store what it learned")
    p = subparsers.add_parser("index", parents=[*parents, method_parser()], help=help_, description=help_)
    p.set_defaults(func=cmd_index, writes=True)
    p.add_argument("--data", required=True, help="preference pairs: JSONL (user_id, prompt, chosen, rejected), "
                   "raw TL;DR comparisons (batch13.json) or a PRISM directory")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "tldr", "prism"], help="input format")
    p.add_argument("--user", action="append", help="only this user (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="at most this many pairs per user (0: all)")
    p.add_argument("--replace", action="store_true", help="a user's memory becomes this file's pairs: their "
                   "other stored pairs are removed (default: the file's pairs are added)")
    p.add_argument("--executor", default="serial", choices=["serial", "ray"],
                   help="where EXACT's selections are computed: in this process, or on Ray workers that each "
                        "hold one backend (this process writes every selection as it arrives; the memory is "
                        "the serial run's)")
    p.add_argument("--address", default=None, help="ray: the cluster to join (e.g. ray://head:10001 or auto; "
                   "default: start a local Ray instance)")
    p.add_argument("--workers", type=int, default=None,
                   help="ray: how many workers (default: one per CPU of the instance)")


def cmd_index(args, ctx: Context) -> int:
    from prefsteer.data import group_by_user, load_pairs
    from prefsteer.errors import InputError
    from prefsteer.types import with_id

    reject_other_options(args, args.method)
    if args.limit < 0:
        raise InputError(f"--limit (={args.limit}) has to be 0 (all pairs) or more", field="--limit")
    pairs = load_pairs(args.data, args.format)  # validated as a whole: a bad file writes nothing
    if args.user:
        missing = sorted(set(args.user) - {p.user_id for p in pairs})
        if missing:
            raise InputError(f"no pairs of user{'s' if len(missing) > 1 else ''} {', '.join(missing)} in the "
                             "file", file=str(args.data), field="--user")
        pairs = [p for p in pairs if p.user_id in set(args.user)]
    if args.limit:
        by_user = group_by_user(pairs)
        pairs = [p for ps in by_user.values() for p in ps[: args.limit]]
    pairs = [with_id(p) for p in pairs]
    method = ctx.method(args.method)
    if args.executor == "ray" and not method.selects_per_pair:
        raise InputError(f"--executor ray computes per-pair attribute selections (--method exact), which "
                         f"'{args.method}' does not make", field="--executor")
    check_lengths(ctx, pairs, method)
    start = time.perf_counter()
    report = []
    mem = ctx.memory
    by_user = group_by_user(pairs)
    # the pairs are stored first (the caller's part); the method then learns from all the user's
    # stored pairs and stores only its own state
    for user, ps in by_user.items():
        with mem.transaction():
            mem.add_pairs(ps)
            if args.replace:
                mem.forget_pairs(user, keep={p.pair_id for p in ps})
    ray_stats = None
    if args.executor == "ray":
        ray_stats = _select_on_ray(args, ctx, method, {u: mem.pairs(u) for u in by_user})
    for user, ps in by_user.items():
        pool = mem.pairs(user)
        method.fit(user, pool)
        report.append({"user_id": user, "pairs": len(ps), "stored_pairs": len(pool), **method.summary(user)})
    secs = time.perf_counter() - start
    out = {"db": mem.path, "method": args.method, "users": report, "seconds": round(secs, 2)}
    if ray_stats is not None:
        out["executor"] = dict(ray_stats, name="ray")
    scorer = getattr(method, "scorer", None)
    if scorer is not None and hasattr(scorer, "hits"):
        out["score_cache"] = {"hits": scorer.hits, "misses": scorer.misses}

    def text() -> str:
        lines = [f"indexed {len(pairs)} pairs of {len(report)} users with {args.method} in {secs:.1f}s "
                 f"into {mem.path}"]
        for r in report:
            extra = f", {r['entries']} distinct prompts" if "entries" in r else ""
            extra += f", attributes {', '.join(r['attributes'])}" if "attributes" in r else ""
            lines.append(f"  {r['user_id']}: {r['pairs']} pairs ({r['stored_pairs']} stored){extra}")
        if "score_cache" in out:
            lines.append(f"  score cache: {out['score_cache']['hits']} hits, {out['score_cache']['misses']} model calls")
        return "\n".join(lines)

    emit(args, out, text)
    return 0


def _select_on_ray(args, ctx: Context, method, by_user: dict) -> dict:
    """`index --executor ray`: EXACT's selections computed on Ray workers (each with its own backend)
    and written by this process as they arrive; `fit` then finds them stored and builds each user's
    memory in one transaction, as a serial run does (`prefsteer.executors`)."""
    from prefsteer.executors import RayExecutor

    ex = RayExecutor(args.backend, ctx.backend_kwargs(), address=args.address, workers=args.workers)
    try:
        for user in by_user:
            ctx.memory.set_status(user, "indexing")
        stats = ex.select_missing(method, by_user, progress=not args.quiet)
    finally:
        ex.shutdown()
    return dict(stats, workers=ex.workers, address=args.address or "local")
