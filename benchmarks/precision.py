"""EXACT's greedy selection in reduced precision against float32, on real TL;DR pairs: speed and agreement.

The same model is loaded twice in one process, once per precision, and each pair's greedy search
(K=42, k=3) runs on both through the scoring engine with no score cache. bfloat16 halves the bytes
and, on a CPU with AVX512-BF16 or a GPU, doubles the matrix throughput; it also rounds every
activation to 8 bits of mantissa, and EXACT ranks attributes by differences of summed
log-probabilities that are often under a nat apart. ``--low matmul-medium`` keeps float32 weights
and activations and lets only the matrix products run as torch's "medium" float32 matmul precision
(``--matmul-precision medium``), whose accuracy depends on the CPU's kernels: this is how to check
a machine before trusting it. That precision is process-wide and a backend fixes it once at load,
so the "medium" searches run in a child process of this script. The table says what each costs:

* ``|diff|``: how far bfloat16's objective F(A) = log p(y_w | x, A) - log p(y_l | x, A) lies from
  float32's, over every attribute set both searches scored;
* ``same``: whether both pick the same set;
* ``shortfall``: F of float32's set minus F of bfloat16's set, both under float32 (0 when the sets
  agree; the reference's own objective decides what "worse" means).

The last line reads ``speedup=<float32 s / reduced-precision s> same_set=<n>/<N> mean_shortfall=<nats>
mean_abs_diff=<nats>``.

    python benchmarks/precision.py                     # the first 6 pairs of the fixture
    python benchmarks/precision.py --pairs 8 --threads 2 --json results/exact/precision.json
    python benchmarks/precision.py --low matmul-medium --pairs 8 --threads 2 --json results/exact/matmul_precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _pairs import add_pair_args, read_inputs, recording_objective


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p)
    p.add_argument("--low", default="bfloat16", choices=["bfloat16", "float16", "matmul-medium"],
                   help="the reduced precision to compare with float32: a dtype, or float32 with "
                        "'medium' matrix products (default bfloat16)")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)  # the child's searches go here
    return p


def search(backend, pair, library, k, values: dict) -> dict:
    """One pair's greedy search on ``backend``, every set it scores recorded in ``values``."""
    from prefsteer.methods.exact.select import greedy_select

    objective = recording_objective(backend, pair.prompt, pair.chosen, pair.rejected, library, values)
    start = time.perf_counter()
    sel = greedy_select(objective, library.names, k)
    return {"seconds": time.perf_counter() - start, "set": list(sel.attributes), "objective": sel.objective}


def child_searches(args: argparse.Namespace) -> list[tuple[dict, dict]]:
    """Run the "medium" searches in a child process (torch's matmul precision is process-wide):
    per pair, its search row and the values of every set it scored."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "medium.json"
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child-json", str(out)], check=True)
        rows = json.loads(out.read_text("utf-8"))
    return [(r["row"], {tuple(s): v for s, v in r["values"]}) for r in rows]


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from prefsteer.backends.hf import TransformersBackend
    from prefsteer.methods.exact.select import make_objective

    inputs = read_inputs(args)
    if inputs is None:
        return 2
    pairs, library = inputs
    medium = args.low == "matmul-medium"
    if args.child_json:  # the child of a matmul-medium run: only the "medium" searches
        backend = TransformersBackend(model=args.model, threads=args.threads, dtype="float32",
                                      matmul_precision="medium")
        found = []
        for pair in tqdm(pairs, desc="pairs (medium)", unit="pair"):
            values: dict[tuple, float] = {}
            found.append({"row": search(backend, pair, library, args.k, values),
                          "values": [[list(s), v] for s, v in values.items()]})
        Path(args.child_json).write_text(json.dumps(found), "utf-8")
        return 0
    from_child = child_searches(args) if medium else None
    backends = {"float32": TransformersBackend(model=args.model, threads=args.threads, dtype="float32")}
    if not medium:
        backends[args.low] = TransformersBackend(model=args.model, threads=args.threads, dtype=args.low)
    rows = []
    for n, pair in enumerate(tqdm(pairs, desc="pairs", unit="pair")):
        row: dict = {"pair_id": pair.pair_id}
        values: dict[str, dict[tuple, float]] = {}
        for dt, backend in backends.items():
            row[dt] = search(backend, pair, library, args.k, values.setdefault(dt, {}))
        if from_child is not None:
            row[args.low], values[args.low] = from_child[n]
        ref, low = row["float32"], row[args.low]
        low_set = tuple(low["set"])
        if low_set not in values["float32"]:  # score the reduced-precision choice under float32
            values["float32"][low_set] = make_objective(backends["float32"], pair.prompt, pair.chosen,
                                                        pair.rejected, library)([low_set])[0]
        common = values["float32"].keys() & values[args.low].keys()
        diffs = [abs(values[args.low][s] - values["float32"][s]) for s in common]
        row.update(same_set=ref["set"] == low["set"],
                   shortfall=ref["objective"] - values["float32"][low_set],
                   compared=len(diffs), mean_abs_diff=statistics.fmean(diffs), max_abs_diff=max(diffs))
        rows.append(row)

    print(f"\nK={len(library)}, k={args.k}, model {backends['float32'].source['model']}, "
          f"{backends['float32'].info()['threads']} threads")
    print(f"{'pair':<16} {'fp32 s':>7} {'low s':>7} {'sets':>5} {'mean |diff|':>12} {'max |diff|':>11} "
          f"{'same':>5} {'shortfall':>10}  sets")
    for r in rows:
        ref, low = r["float32"], r[args.low]
        sets = ", ".join(ref["set"]) + ("" if r["same_set"] else f"  |  {args.low}: " + ", ".join(low["set"]))
        print(f"{r['pair_id']:<16} {ref['seconds']:>7.1f} {low['seconds']:>7.1f} {r['compared']:>5} "
              f"{r['mean_abs_diff']:>12.2e} {r['max_abs_diff']:>11.2e} {'yes' if r['same_set'] else 'no':>5} "
              f"{r['shortfall']:>10.3f}  {sets}")
    ref_s = sum(r["float32"]["seconds"] for r in rows)
    low_s = sum(r[args.low]["seconds"] for r in rows)
    summary = {"pairs": len(rows), "k": args.k, "library": len(library), "low": args.low,
               "float32_seconds": ref_s, "low_seconds": low_s, "speedup": ref_s / low_s,
               "same_set": sum(r["same_set"] for r in rows),
               "mean_shortfall": statistics.fmean(r["shortfall"] for r in rows),
               "mean_abs_diff": statistics.fmean(r["mean_abs_diff"] for r in rows),
               "max_abs_diff": max(r["max_abs_diff"] for r in rows)}
    print(f"total: float32 {ref_s:.1f} s, {args.low} {low_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n", "utf-8")
    print(f"speedup={summary['speedup']:.2f} same_set={summary['same_set']}/{len(rows)} "
          f"mean_shortfall={summary['mean_shortfall']:.3f} mean_abs_diff={summary['mean_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
