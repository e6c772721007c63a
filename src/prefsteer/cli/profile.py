"""`prefsteer profile`: what is stored for a user: EXACT's entries (prompts, attributes, per-step
gains) and every other method's state.

    prefsteer profile --user alice
    prefsteer profile --user alice --json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from prefsteer.cli.output import emit, short


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = ("show what is stored for a user: EXACT's entries (prompts, attributes, per-step gains) and every "
             "other method's state")
    p = subparsers.add_parser("profile", parents=parents, help=help_, description=help_)
    p.set_defaults(func=cmd_profile, writes=False)
    p.add_argument("--user", required=True, help="user id")


def cmd_profile(args, ctx) -> int:
    mem = ctx.memory
    status = mem.user_status(args.user)  # an unknown user: exit 2, before anything else
    entries = mem.entries(args.user)
    states = []
    for row in mem.method_states(args.user):
        st = mem.method_state(args.user, row["method"], row["state_id"])
        states.append({**row, "state": st["state"] if st else None,
                       "files": sorted(st["files"]) if st else []})
    pairs = mem.pairs(args.user)
    emit(args, {"user_id": args.user, "status": status, "pairs": len(pairs),
                "entries": [e.to_json() for e in entries], "methods": states},
         lambda: profile_text(args.user, entries, states))
    return 0


def profile_text(user: str, entries, states: list[dict] | None = None) -> str:
    lines = [f"user {user}: {len(entries)} memory entries"]
    for e in entries:
        gains = ", ".join(f"{a} {g:+.2f}" for a, g in zip(e.attributes, e.gains))
        lines.append(f"  - {short(e.prompt)}\n    attributes: {gains or '(none)'}   "
                     f"objective {e.objective:+.2f} (plain {e.base_objective:+.2f})")
    for st in states or []:
        flag = "  STALE: newer pairs not learned, run `prefsteer index` again" if st["stale"] else ""
        lines.append(f"  method {st['method']} (options {st['state_id']}): fitted on {st['n_pairs']} pairs, "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(st['updated']))}{flag}")
        summary = _state_summary(st.get("state"))
        if summary:
            lines.append(f"    {summary}")
    return "\n".join(lines)


def _state_summary(state: Any) -> str:
    if not isinstance(state, dict):
        return ""
    parts = []
    for k, v in state.items():
        if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 60:
            parts.append(f"{k}={v}")
        elif isinstance(v, list) and len(v) <= 12 and all(isinstance(x, (str, int, float)) for x in v):
            parts.append(f"{k}=[{', '.join(f'{x:.3g}' if isinstance(x, float) else str(x) for x in v)}]")
        else:
            parts.append(f"{k}=<{type(v).__name__}>")
    return short("; ".join(parts), 160)
