"""Time per user of the Drift and Reward baselines on the embedded model (fit, margins, generate).

    .venv/bin/python benchmarks/baselines.py [--methods drift reward] [--train 19] [--test 5]
        [--attributes 42] [--placement system|user] [--epochs 3] [--max-train-pairs 0]
        [--max-length 1024] [--tokens 60] [--json]

One user of ``../shared/data/fixtures/tldr_batch13_3users.jsonl`` (24 TL;DR pairs), split 8:2;
``--train`` / ``--test`` cut the split further. Drift scores every pair under 1 + K contexts, twice;
Reward trains a LoRA reward model (3 epochs by default) and samples best-of-n candidates. The
machine is often shared: the load average is printed beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fixtures" / "tldr_batch13_3users.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["drift", "reward"], choices=["drift", "reward"])
    ap.add_argument("--data", default=str(FIXTURE), help="pairs file (any format prefsteer reads)")
    ap.add_argument("--train", type=int, default=0, help="training pairs at most (0: the whole 80%%)")
    ap.add_argument("--test", type=int, default=0, help="test pairs at most (0: the whole 20%%)")
    ap.add_argument("--attributes", type=int, default=42, help="drift: the library's first N attributes")
    ap.add_argument("--placement", default="system", help="drift: system (the paper) or user")
    ap.add_argument("--epochs", type=int, default=3, help="reward: epochs")
    ap.add_argument("--max-train-pairs", type=int, default=0, help="reward: training pairs at most")
    ap.add_argument("--max-length", type=int, default=1024, help="reward: tokens per sequence")
    ap.add_argument("--n", type=int, default=4, help="reward: best-of-n")
    ap.add_argument("--tokens", type=int, default=60, help="new tokens for the one generated prompt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    from prefsteer.attributes import load_library
    from prefsteer.backends import GenerationConfig, load_backend
    from prefsteer.data.loaders import group_by_user, load_pairs
    from prefsteer.storage import Memory
    from prefsteer.methods.registry import Resources, build

    backend = load_backend("hf", threads=args.threads or None)
    users = group_by_user(load_pairs(args.data))
    user, pairs = next(iter(users.items()))
    cut = int(round(0.8 * len(pairs)))
    train, test = pairs[:cut], pairs[cut:]
    train, test = train[: args.train or None], test[: args.test or None]
    gen_cfg = GenerationConfig(max_new_tokens=args.tokens, seed=0)
    names = list(load_library().names[: args.attributes])
    options = {"drift": {"attributes": names, "placement": args.placement},
               "reward": {"epochs": args.epochs, "max_train_pairs": args.max_train_pairs,
                          "max_length": args.max_length, "n": args.n}}
    rows = []
    for name in args.methods:
        memory = Memory(":memory:")  # a fresh one per method: nothing cached between them
        memory.add_pairs(train)  # the caller stores the pairs, then the method learns from them
        method = build(name, backend, Resources(memory=memory), options[name])
        t0 = time.perf_counter()
        method.fit(user, train)
        t1 = time.perf_counter()
        margins = method.margins(user, test)
        t2 = time.perf_counter()
        out = method.generate(user, [test[0].prompt], gen_cfg)[0]
        t3 = time.perf_counter()
        info = method.fit_info[user]
        rows.append({"method": name, "options": options[name], "train_pairs": len(train),
                     "test_pairs": len(test), "fit_s": round(t1 - t0, 1), "margins_s": round(t2 - t1, 1),
                     "generate_s": round(t3 - t2, 1), "generate_tokens": args.tokens,
                     "test_accuracy": sum(m > 0 for m in margins) / len(margins),
                     "fit_info": {k: v for k, v in info.items() if k != "losses"},
                     "load_average": os.getloadavg()[0], "text": out.text[:200]})
    if args.json:
        print(json.dumps({"backend": backend.info(), "user": user, "rows": rows}))
        return
    print(f"user {user}: {len(train)} train / {len(test)} test pairs, threads={backend.info()['threads']}")
    print(f"{'method':8} {'fit s':>8} {'margins s':>10} {'generate s':>11} {'acc':>5} {'load':>5}")
    for r in rows:
        print(f"{r['method']:8} {r['fit_s']:8.1f} {r['margins_s']:10.1f} {r['generate_s']:11.1f} "
              f"{r['test_accuracy']:5.2f} {r['load_average']:5.1f}")
    for r in rows:
        print(r["method"], json.dumps(r["fit_info"]), "|", r["text"][:120].replace("\n", " "))


if __name__ == "__main__":
    main()
