"""How commands print: a result as text or, with --json, as JSON; a user's mistake as one line.

    emit(args, {"user_id": u}, lambda: f"user {u}")   # JSON with --json, else the text
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable


def emit(args: argparse.Namespace, obj: Any, text: str | Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, ensure_ascii=False))
    else:
        print(text() if callable(text) else text)


def report_error(args, command: str, e: Exception) -> None:
    """One line on stderr; with --json, the service's error object on stdout instead."""
    if getattr(args, "json", False):
        param = getattr(e, "field", None) or getattr(e, "option", None)
        print(json.dumps({"error": {"message": str(e), "type": type(e).__name__, "param": param}},
                         ensure_ascii=False))
    else:
        print(f"prefsteer {command}: error: {e}", file=sys.stderr)


def short(text: str, n: int = 70) -> str:
    """``text`` on one line, cut to ``n`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
