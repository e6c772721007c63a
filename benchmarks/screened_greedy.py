"""Screened greedy against EXACT's exact greedy, on real TL;DR pairs: agreement and time.

Screened greedy (``exact/indexer.py``) ranks every candidate of a step with the model's bfloat16
copy and scores only the ``top`` best of them in float32; float32 picks among those. It returns
exact greedy's set whenever each step's best candidate is in the screen's top, and its objectives
are float32's own. Every search runs from scratch (no score cache, no kept prefix), on the same
two loaded copies, side by side per pair. ``shortfall`` is F of greedy's set minus F of the
screened set, both in float32 (0 when they agree). The last line reads
``top=<m> speedup=<greedy s / screened s> same_set=<n>/<N> mean_shortfall=<nats>`` per ``--top``.

    python benchmarks/screened_greedy.py                       # the first 6 pairs of the fixture
    python benchmarks/screened_greedy.py --pairs 12 --top 2 4 8 --threads 2 --json results/exact/screened_greedy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _pairs import add_pair_args, read_inputs


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p)
    p.add_argument("--top", type=int, nargs="+", default=[2, 4, 8],
                   help="candidates per step scored in float32 (default 2 4 8)")
    p.add_argument("--screen", default="bfloat16", choices=["bfloat16", "float16"],
                   help="the screen's precision (default bfloat16)")
    return p


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from prefsteer.backends.hf import TransformersBackend
    from prefsteer.methods.exact.select import greedy_select, make_objective, screened_greedy_select

    inputs = read_inputs(args)
    if inputs is None:
        return 2
    pairs, library = inputs
    model = TransformersBackend(model=args.model, threads=args.threads, dtype="float32")
    screen = model.cast(args.screen)
    variants = [("greedy", None)] + [(f"top{m}", m) for m in args.top]
    rows = []
    for pair in tqdm(pairs, desc="pairs", unit="pair"):
        row: dict = {"pair_id": pair.pair_id}
        for name, top in variants:
            model.clear_prefix_memo(), screen.clear_prefix_memo()
            f = make_objective(model, pair.prompt, pair.chosen, pair.rejected, library)
            start = time.perf_counter()
            if top is None:
                sel = greedy_select(f, library.names, args.k)
            else:
                rough = make_objective(screen, pair.prompt, pair.chosen, pair.rejected, library)
                sel = screened_greedy_select(f, library.names, args.k, screen=rough, top=top)
            row[name] = {"seconds": time.perf_counter() - start, "set": list(sel.attributes),
                         "objective": sel.objective, "evaluations": sel.evaluations}
        for name, _ in variants[1:]:
            row[name]["same_set"] = row[name]["set"] == row["greedy"]["set"]
            row[name]["shortfall"] = row["greedy"]["objective"] - row[name]["objective"]
        rows.append(row)

    print(f"\nK={len(library)}, k={args.k}, model {model.source['model']}, screen {args.screen}, "
          f"{model.info()['threads']} threads")
    head = " ".join(f"{n + ' s':>9}" for n, _ in variants)
    print(f"{'pair':<16} {head}  " + "  ".join(f"{n} same/short" for n, _ in variants[1:]) + "  greedy's set")
    for r in rows:
        secs = " ".join(f"{r[n]['seconds']:>9.1f}" for n, _ in variants)
        agree = "  ".join(f"{'yes' if r[n]['same_set'] else 'no':>5} {r[n]['shortfall']:>8.3f}"
                          for n, _ in variants[1:])
        print(f"{r['pair_id']:<16} {secs}  {agree}  {', '.join(r['greedy']['set'])}")
    total = {n: sum(r[n]["seconds"] for r in rows) for n, _ in variants}
    summary = {"pairs": len(rows), "k": args.k, "library": len(library), "screen": args.screen,
               "greedy_seconds": total["greedy"], "variants": {}}
    for name, top in variants[1:]:
        summary["variants"][name] = {
            "top": top, "seconds": total[name], "speedup": total["greedy"] / total[name],
            "same_set": sum(r[name]["same_set"] for r in rows),
            "mean_shortfall": statistics.fmean(r[name]["shortfall"] for r in rows),
            "evaluations": sum(r[name]["evaluations"] for r in rows)}
    print("total: " + ", ".join(f"{n} {total[n]:.1f} s" for n, _ in variants))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n", "utf-8")
    for name, v in summary["variants"].items():
        print(f"top={v['top']} speedup={v['speedup']:.2f} same_set={v['same_set']}/{len(rows)} "
              f"mean_shortfall={v['mean_shortfall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
