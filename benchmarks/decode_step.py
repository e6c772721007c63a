"""One decode step of the scheduler's batch on the CPU, by the rows in the batch: what the step's
parts cost before and after the growing cache and the packed weights (`prefsteer.backends.hf`
`kvcache` and `packing`).

Three engines, timed in turns within one run (the machine is shared, so each figure is the median
of ``--reps`` rounds):

* ``concat, MKL``: transformers' `DynamicCache` (every step concatenates the whole cache) and the
  model's own linear layers (MKL), as the scheduler ran before;
* ``grown, MKL``: the growing cache, the plain products;
* ``grown, packed``: the growing cache and oneDNN's packed weights, as the scheduler runs now.

A step is `KVBatch.outputs` (the output layer) and `KVBatch.step` (one token for every row), on
rows that have read the same 42-token chat prompt and 30 generated tokens. The last columns divide
each engine's step by its own one-row step: how much a row beside the first one costs, which
bounds what decoding requests together gains over decoding them one after another.

    .venv/bin/python benchmarks/decode_step.py            # ~8 min on 2 cores

Writes results/serving/decode-step.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from prefsteer.backends.hf import TransformersBackend
from prefsteer.backends.hf import batch as hf_batch
from prefsteer.backends.hf.batch import KVBatch
from prefsteer.backends.hf.kvcache import growing_cache

OUT = Path(__file__).resolve().parents[1] / "results" / "serving"


def concat_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def step_ms(backend, cache, prompt: list[int], rows: int, steps: int) -> float:
    hf_batch.growing_cache = cache  # the cache KVBatch builds
    try:
        kb = KVBatch(backend)
        with torch.inference_mode():
            kb.add([prompt] * rows)
            for _ in range(30):
                kb.outputs()
                kb.step([42] * rows)
            start = time.perf_counter()
            for _ in range(steps):
                kb.outputs()
                kb.step([42] * rows)
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        hf_batch.growing_cache = growing_cache


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    started = time.time()
    packed = TransformersBackend(dtype="float32")
    plain = TransformersBackend(dtype="float32", pack_weights=False)
    if not packed.packed_linears:
        raise SystemExit("this torch has no oneDNN packed linear: nothing to compare")
    prompt = packed.encode_context([{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])
    engines = {"concat, MKL": (plain, concat_cache), "grown, MKL": (plain, growing_cache),
               "grown, packed": (packed, growing_cache)}
    times: dict[str, dict[int, list[float]]] = {e: {r: [] for r in args.rows} for e in engines}
    for _ in range(args.reps):
        for r in args.rows:
            for name, (backend, cache) in engines.items():
                times[name][r].append(step_ms(backend, cache, prompt, r, args.steps))
    med = {e: {r: statistics.median(v) for r, v in by.items()} for e, by in times.items()}

    names = list(engines)
    head = ("| rows | " + " | ".join(f"{n} ms" for n in names) + " | "
            + " | ".join(f"{n}: / 1 row" for n in names) + " | packed vs concat |")
    lines = [head, "|" + "---:|" * (2 * len(names) + 2)]
    for r in args.rows:
        lines.append(f"| {r} | " + " | ".join(f"{med[n][r]:.1f}" for n in names) + " | "
                     + " | ".join(f"{med[n][r] / med[n][args.rows[0]]:.2f}" for n in names)
                     + f" | {med['concat, MKL'][r] / med['grown, packed'][r]:.2f}x |")
    table = "\n".join(lines)
    conditions = (f"Conditions: {torch.get_num_threads()} threads on {platform.processor() or platform.machine()} "
                  f"({platform.platform()}); torch {torch.__version__}; the embedded model in float32; "
                  f"median of {args.reps} rounds of {args.steps} steps after 30; "
                  f"{time.strftime('%Y-%m-%d')}; the run {(time.time() - started) / 60:.1f} min; "
                  "`python benchmarks/decode_step.py`.")
    print(table)
    print(conditions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode-step.json").write_text(json.dumps(
        {"rows": args.rows, "ms": times, "median_ms": med, "threads": torch.get_num_threads(),
         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    (args.out / "decode-step.md").write_text(
        "# One decode step of the scheduler's batch, by rows (hf, CPU)\n\n" + table + "\n\n"
        "A step: the output layer and one token fed to every row, on rows of 72 tokens. `concat, MKL` is "
        "the scheduler before `kvcache` and `packing`; `grown, packed` is the scheduler now. The `/ 1 row` "
        "columns divide by the same engine's one-row step.\n\n" + conditions + "\n")


if __name__ == "__main__":
    main()
