"""Ray indexing of 8 users: 1 worker vs 2 workers (and the serial run), with identical results.

The users are made from the shared TL;DR fixture (pair i goes to user ``u{i % 8}``); EXACT selects
k attributes of a small library for each pair on the transformers backend (one torch thread per Ray
worker, Ray's default for a one-CPU actor). Every run writes its own SQLite memory; the table says
whether the users' entries and selections are identical to the serial run's.

    python benchmarks/ray_index.py                       # 16 pairs, 8 attributes, k=2
    python benchmarks/ray_index.py --address auto        # an existing Ray cluster
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _pairs import FIXTURE, REPO

ATTRS = ["Concise", "Humor", "Formal", "Detailed", "Casual", "Polite", "Analytic", "Direct"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(FIXTURE))
    p.add_argument("--pairs", type=int, default=16, help="pairs in all, spread over 8 users (default 16)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--backend", default="hf")
    p.add_argument("--address", default=None, help="Ray cluster (default: a local instance)")
    p.add_argument("--out", default=str(REPO / "results" / "ray"))
    return p


def main(args: argparse.Namespace) -> int:
    import ray

    from prefsteer.attributes import load_library
    from prefsteer.backends import load_backend
    from prefsteer.data import load_pairs
    from prefsteer.executors import RayExecutor
    from prefsteer.storage import Memory
    from prefsteer.methods.exact import ExactConfig
    from prefsteer.methods.registry import Resources, build
    from prefsteer.types import PreferencePair, with_id

    src = load_pairs(args.data)[: args.pairs]
    pairs = [with_id(PreferencePair(f"u{i % 8}", p.prompt, p.chosen, p.rejected)) for i, p in enumerate(src)]
    by_user: dict = {}
    for p in pairs:
        by_user.setdefault(p.user_id, []).append(p)
    lib = load_library()
    lib = lib.subset([a for a in ATTRS if a in lib.names])
    cfg = ExactConfig(k=args.k)
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    kw = {"threads": 1} if args.backend == "hf" else {}
    driver = load_backend(args.backend, **kw)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)

    def memory_of(db):
        mem = Memory(str(db))
        return {u: sorted((e.prompt, tuple(e.attributes), round(e.objective, 6)) for e in mem.entries(u))
                for u in mem.users()}

    runs = {}
    for workers in (0, 1, 2):
        db = tmp / f"w{workers}.db"
        mem = Memory(str(db))
        method = build("exact", driver, Resources(memory=mem, library=lib, embedder="hash"), cfg)
        if workers:
            ex = RayExecutor(args.backend, kw, workers=workers)
            ex._start_actors(method)  # the workers' model loads are not indexing time
        start = time.perf_counter()
        mem.add_pairs(pairs)  # the caller stores the pairs; fit learns from them (`prefsteer index`)
        pools = {u: mem.pairs(u) for u in by_user}
        if workers:
            ex.select_missing(method, pools)
        for u, pool in pools.items():
            method.fit(u, pool)
        secs = time.perf_counter() - start
        if workers:
            ex.shutdown()
        runs[workers] = {"seconds": secs, "memory": memory_of(db)}
        print(f"{workers or 'serial'} workers: {secs:.1f} s", flush=True)
    ray.shutdown()
    same = {w: runs[w]["memory"] == runs[0]["memory"] for w in (1, 2)}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    lines = [f"# Ray indexing of 8 users ({time.strftime('%Y-%m-%d')}, {machine}, backend {args.backend})", "",
             f"{len(pairs)} TL;DR pairs spread over 8 users, EXACT greedy k={args.k} of {len(lib)} attributes; "
             "one torch thread per worker (and in the serial run); workers' model loads not counted.", "",
             "| run | wall s | speed-up vs 1 worker | memory identical to serial |", "|---|---|---|---|",
             f"| serial (this process, 1 thread) | {runs[0]['seconds']:.1f} | – | – |"]
    for w in (1, 2):
        lines.append(f"| ray, {w} worker{'s' if w > 1 else ''} | {runs[w]['seconds']:.1f} | "
                     f"{runs[1]['seconds'] / runs[w]['seconds']:.2f}x | {same[w]} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index_8_users.md").write_text("\n".join(lines) + "\n")
    (out / "index_8_users.json").write_text(json.dumps({str(w): r["seconds"] for w, r in runs.items()} | {"same": same}) + "\n")
    print("\n".join(lines))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
