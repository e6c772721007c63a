"""Base's generation with and without the shared-prefix cascade, side by side in one run.

Base writes a user's training pairs into the system prompt (up to 20,000 characters, ~5k tokens),
so all of that user's prompts share a long prefix. The backend runs that prefix once and attends to
it through the cascade; ``share_prefix=False`` is the per-row path that prefills the whole context
in every row and copies its keys/values at every step. Both decode the same prompts greedily for
exactly ``--tokens`` tokens (end of turn suppressed), and the table gives the seconds, the speed-up
and whether the two produced the same tokens.

    .venv/bin/python benchmarks/base_generation.py [--prompts 5] [--tokens 100] [--repeats 1]

One user of ``../shared/data/fixtures/tldr_batch13_3users.jsonl``, split 8:2 as in the evaluation:
the training pairs make the history, the test prompts are generated for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fixtures" / "tldr_batch13_3users.jsonl"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(FIXTURE), help="pairs file (any format prefsteer reads)")
    p.add_argument("--prompts", type=int, default=5, help="test prompts generated for, in one batch")
    p.add_argument("--tokens", type=int, default=100, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (the median is shown)")
    p.add_argument("--model", default=None, help="model path or hub name (default: embedded SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    return p


def main(args: argparse.Namespace) -> None:
    from prefsteer.backends import GenerationConfig, load_backend
    from prefsteer.backends.base import user_turn
    from prefsteer.data import group_by_user, load_pairs, train_test_split
    from prefsteer.methods.history import build_system_prompt

    backend = load_backend("hf", model=args.model, threads=args.threads)
    user, pairs = max(group_by_user(load_pairs(args.data)).items(), key=lambda kv: len(kv[1]))
    train, test = train_test_split(pairs, seed=0)
    system, n_pairs = build_system_prompt(train)
    prompts = list(dict.fromkeys(p.prompt for p in test + train))[: args.prompts]
    contexts = [user_turn(p, system) for p in prompts]
    encoded = [backend.encode_context(c) for c in contexts]
    lengths = [len(e) for e in encoded]
    shared = backend._shared_prefix(encoded)

    class NoEOS:  # only forbids ending, so every row generates exactly --tokens tokens
        def __call__(self, hidden, logits, ids):
            out = logits.clone()
            out[:, sorted(backend.eos_ids)] = float("-inf")
            return out

    config = GenerationConfig(max_new_tokens=args.tokens)
    backend.generate(contexts[:1], GenerationConfig(max_new_tokens=2))  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[list[int]]] = {}
    for _ in range(args.repeats):
        for share in (False, True):
            backend.share_prefix = share
            start = time.perf_counter()
            gens = backend.generate(contexts, config, guide=NoEOS())
            times[share].append(time.perf_counter() - start)
            tokens[share] = [g.token_ids for g in gens]
    backend.share_prefix = True

    print(f"\nuser {user}: {n_pairs} training pairs in the system prompt ({len(system):,} characters); "
          f"{len(prompts)} prompts of {min(lengths):,}..{max(lengths):,} tokens, {shared:,} shared; "
          f"{args.tokens} new tokens each; threads {backend.info()['threads']}, load {os.getloadavg()[0]:.2f}")
    per_row, cascade = statistics.median(times[False]), statistics.median(times[True])
    n_new = len(prompts) * args.tokens
    print(f"\n{'mode':<32} {'seconds':>8} {'new tok/s':>9} {'speed-up':>8}")
    print(f"{'per row (share_prefix=False)':<32} {per_row:>8.2f} {n_new / per_row:>9.1f} {1.0:>8.2f}")
    print(f"{'shared prefix (cascade)':<32} {cascade:>8.2f} {n_new / cascade:>9.1f} {per_row / cascade:>8.2f}")
    same = sum(a == b for a, b in zip(tokens[True], tokens[False]))
    print(f"\nidentical greedy outputs: {same} of {len(prompts)}")
    print(f"speedup={per_row / cascade:.2f}")


if __name__ == "__main__":
    main(make_parser().parse_args())
