"""What the EXACT selection benchmarks share: their pair arguments, the pairs they read, and an
objective that remembers every value it computed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "data" / "fixtures" / "tldr_batch13_3users.jsonl"


def add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(FIXTURE), help="pairs file (any format `prefsteer` reads)")
    p.add_argument("--pairs", type=int, default=6, help="how many pairs, from the file's start (default 6)")
    p.add_argument("--k", type=int, default=3, help="attributes to select (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", default=None, help="also write the per-pair rows and summary here")


def read_pairs(args: argparse.Namespace):
    """The first ``--pairs`` pairs of ``--data``, or None after printing why there are none."""
    from prefsteer.data.loaders import load_pairs
    from prefsteer.errors import InputError

    try:
        pairs = load_pairs(args.data)[: args.pairs]
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not pairs:
        print(f"error: no pairs in {args.data}", file=sys.stderr)
        return None
    return pairs


def read_inputs(args: argparse.Namespace):
    """``(pairs, attribute library)`` for a selection benchmark, or None after printing why not."""
    from prefsteer.attributes import load_library

    pairs = read_pairs(args)
    return None if pairs is None else (pairs, load_library())


def recording_objective(scorer, prompt: str, chosen: str, rejected: str, library, values: dict):
    """EXACT's objective F for one pair through ``scorer``; every attribute set it evaluates is
    written into ``values`` (tuple of names -> F), so two searches can be compared set by set."""
    from prefsteer.methods.exact.select import make_objective

    inner = make_objective(scorer, prompt, chosen, rejected, library)

    def objective(sets):
        out = inner(sets)
        values.update(zip(map(tuple, sets), out))
        return out

    return objective
