"""Scoring speed: the prefix-sharing engine against the naive path, on one real TL;DR pair.

Runs EXACT's greedy attribute selection (K=42 attributes, k=3) for one preference pair twice on the
same loaded model:

* naive: one full forward per request, logits at every position, batch 1, no sharing, no cache;
* engine: the backend's defaults (shared prefix, packed continuations, restricted logits).

It also measures the plain batched forward throughput of the model (``model(input_ids)`` with full
logits, 8 rows x 300 tokens) in the same run, and compares the two paths' objective values over
every attribute set both evaluated. The last line is ``speedup=<ratio> max_abs_diff=<nats>``.

    python benchmarks/scoring.py                 # pair 0 of the fixture, k=3
    python benchmarks/scoring.py --pair-index 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _pairs import FIXTURE, recording_objective


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair-index", type=int, default=0, help="which pair of the fixture file (default 0)")
    p.add_argument("--k", type=int, default=3, help="attributes to select greedily (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=None, help="engine batch size (default: the backend's)")
    p.add_argument("--data", default=str(FIXTURE), help="pairs file (JSON lines)")
    p.add_argument("--skip-naive", action="store_true", help="engine only (no speedup, no difference)")
    return p


class _Recorder:
    """Wraps a scorer: remembers the objective value of every attribute set it evaluated."""

    def __init__(self, score_fn):
        self.score_fn = score_fn

    def score(self, requests, progress=False):
        return self.score_fn(requests)


def _plain_throughput(backend, rows: int = 8, length: int = 300, repeats: int = 2) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(backend.tokenizer) - 1, (rows, length), generator=g).to(backend.device)
    best = float("inf")
    with torch.inference_mode():
        backend.model(input_ids=ids[:, :16])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            backend.model(input_ids=ids, use_cache=False).logits.sum().item()
            best = min(best, time.perf_counter() - start)
    return rows * length / best


def main(args: argparse.Namespace) -> int:
    import torch

    from prefsteer.attributes import load_library
    from prefsteer.backends.hf import TransformersBackend
    from prefsteer.methods.exact.select import greedy_select

    try:
        from prefsteer.data.prompts import tldr_prompt
    except ImportError:  # pragma: no cover - older trees
        def tldr_prompt(title, post, subreddit=None):
            return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\n\nWrite a TL;DR summary of the post."

    data = Path(args.data)
    if not data.is_file():
        print(f"error: {data} not found (the shared data fixture)", file=sys.stderr)
        return 2
    pairs = [json.loads(line) for line in data.read_text("utf-8").splitlines() if line.strip()]
    if not 0 <= args.pair_index < len(pairs):
        print(f"error: --pair-index {args.pair_index} is out of range (0..{len(pairs) - 1})", file=sys.stderr)
        return 2
    pair = pairs[args.pair_index]
    prompt = tldr_prompt(pair["title"], pair["post"], pair.get("subreddit"))
    library = load_library()

    t0 = time.perf_counter()
    kw = {"threads": args.threads, "model": args.model}
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    backend = TransformersBackend(**kw)
    load_s = time.perf_counter() - t0
    ctx = backend.count_tokens([{"role": "user", "content": prompt}])
    print(f"model {backend.source['model']} on {backend.device}, {torch.get_num_threads()} threads, "
          f"loaded in {load_s:.1f} s")
    print(f"pair {args.pair_index} ({pair['pair_id']}): context {ctx} tokens, chosen "
          f"{len(backend.encode_continuation(pair['chosen']))}, rejected "
          f"{len(backend.encode_continuation(pair['rejected']))} tokens; K={len(library)}, k={args.k}")

    plain_tps = _plain_throughput(backend)

    def engine_score(reqs):
        return backend.score(reqs)

    def naive_score(reqs):
        return backend.score(reqs, share_prefix=False, restrict_logits=False, batch_size=1)

    runs = {}
    for name, fn in [("engine", engine_score)] + ([] if args.skip_naive else [("naive", naive_score)]):
        values: dict = {}
        before = dict(backend.stats)
        start, cpu = time.perf_counter(), time.process_time()
        sel = greedy_select(recording_objective(_Recorder(fn), prompt, pair["chosen"], pair["rejected"],
                                                library, values),
                            library.names, args.k)
        secs, cpu = time.perf_counter() - start, time.process_time() - cpu
        delta = {k: backend.stats.get(k, 0) - before.get(k, 0) for k in backend.stats}
        runs[name] = {"seconds": secs, "cpu": cpu, "selection": sel, "values": values, **delta}
        print(f"{name}: {secs:.1f} s, {delta['requests']} requests, {delta['tokens_fed']} tokens fed, "
              f"selected {list(sel.attributes)} F={sel.objective:.4f}", flush=True)

    eng = runs["engine"]
    eng_tps = eng["tokens_fed"] / eng["seconds"]
    rows = [("engine", eng)] + ([("naive", runs["naive"])] if "naive" in runs else [])
    print()
    print(f"{'path':<8} {'wall s':>8} {'cpu s':>8} {'requests':>9} {'tokens fed':>11} {'tok/s':>8}")
    for name, r in rows:
        print(f"{name:<8} {r['seconds']:>8.1f} {r['cpu']:>8.1f} {r['requests']:>9} {r['tokens_fed']:>11} "
              f"{r['tokens_fed'] / r['seconds']:>8.0f}")
    print(f"{'plain':<8} {'':>8} {'':>8} {'':>9} {'8x300':>11} {plain_tps:>8.0f}   (batched forward, full logits)")
    print(f"engine throughput: {eng_tps / plain_tps:.0%} of the plain batched forward "
          f"({eng['positions_fed'] - eng['tokens_fed']} padding positions not counted)")
    if "naive" not in runs:
        return 0
    nai = runs["naive"]
    common = set(eng["values"]) & set(nai["values"])
    diff = max(abs(eng["values"][s] - nai["values"][s]) for s in common)
    same = eng["selection"].attributes == nai["selection"].attributes
    ratio = nai["seconds"] / eng["seconds"]
    print(f"wall-time ratio {ratio:.2f}, cpu-time ratio {nai['cpu'] / eng['cpu']:.2f}, "
          f"tokens-fed ratio {nai['tokens_fed'] / eng['tokens_fed']:.2f}")
    print(f"objective values compared over {len(common)} attribute sets "
          f"(engine {len(eng['values'])}, naive {len(nai['values'])}); same selection: {same}")
    print(f"speedup={ratio:.2f} max_abs_diff={diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
