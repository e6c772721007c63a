"""vLLM against the transformers engine on the same machine, side by side in one run.

* scoring: EXACT's greedy selection (K=42, k=3) of the benchmark TL;DR pair (pair 0 of
  ../shared/data/fixtures/tldr_batch13_3users.jsonl, as `benchmarks/scoring.py`) on the hf engine and
  on vLLM reading its prefix cache, with the maximum objective difference over every attribute set;
  and ``--step-sets`` sets of EXACT's first step on vLLM with and without reading the prefix cache.
* generation: tokens/s at batch 1, 8 and 32, vLLM plain vs vLLM with EXACT's injection (the
  prompts carry ``Attributes: <...>``, as `Exact.generate` renders them) vs CLIPer's guided decoding
  (``--prefs``, alpha ``--alpha``, top-20: vLLM's logits processor with the side
  model, here the same checkpoint as vLLM's) vs Drift's mixture (two active attribute branches,
  decoded as side rows in vLLM's engine), greedy, ``--new-tokens``.

Writes Markdown tables into ``--out`` (default results/vllm/): scoring.md, generation-<N>tok.md (N
the new tokens), and the raw numbers into bench.json (each section under its own key). Run it in
the vLLM environment:

    .venv-vllm/bin/python benchmarks/vllm_bench.py                       # both, CPU defaults
    .venv-vllm/bin/python benchmarks/vllm_bench.py --only generation --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _pairs import FIXTURE, REPO, recording_objective

PROMPTS = ["How should I prepare for a job interview?", "Write a short story about a lighthouse keeper.",
           "Explain how vaccines work.", "What are good habits for learning a language?",
           "Summarize the plot of Romeo and Juliet.", "Give me advice on saving money.",
           "Describe a good morning routine.", "Why is the sky blue?"]
ATTRS = ["Concise", "Humor", "Formal"]
DRIFT_WEIGHTS = {"Concise": 1.5, "Humor": -0.7}  # two branches beside every request


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["scoring", "generation"], default=None, help="one section only")
    p.add_argument("--data", default=str(FIXTURE), help="pairs file (JSON lines, TL;DR fields)")
    p.add_argument("--pair-index", type=int, default=0, help="which pair (default 0)")
    p.add_argument("--k", type=int, default=3, help="attributes to select (default 3)")
    p.add_argument("--step-sets", type=int, default=12,
                   help="attribute sets of EXACT's first step timed with and without the prefix cache (default 12)")
    p.add_argument("--batches", default="1,8,32", help="generation batch sizes (default 1,8,32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--prefs", default="concise=1,humor=0.5", help="CLIPer's classifiers and weights")
    p.add_argument("--alpha", type=float, default=2.0, help="CLIPer's guidance strength (default 2.0)")
    p.add_argument("--dtype", default=None, help="both engines' dtype (default float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--machine", default=None, help="how the tables name the machine (default: platform)")
    p.add_argument("--out", default=str(REPO / "results" / "vllm"), help="where the tables go")
    return p


class _Fn:
    def __init__(self, fn):
        self.score = lambda reqs, progress=False: fn(reqs)


def scoring(args, vb, hf, out: dict) -> list[str]:
    from prefsteer.attributes import load_library
    from prefsteer.data.prompts import tldr_prompt
    from prefsteer.methods.exact.select import greedy_select

    pair = [json.loads(line) for line in Path(args.data).read_text("utf-8").splitlines() if line.strip()][args.pair_index]
    prompt = tldr_prompt(pair["title"], pair["post"], pair.get("subreddit"))
    lib = load_library()
    runs = {}
    for name, fn in (("hf", hf.score), ("vllm", lambda r: vb.score(r, read_prefix_cache=True))):
        values: dict = {}
        start = time.perf_counter()
        sel = greedy_select(recording_objective(_Fn(fn), prompt, pair["chosen"], pair["rejected"], lib, values),
                            lib.names, args.k)
        runs[name] = {"seconds": time.perf_counter() - start, "selection": list(sel.attributes),
                      "objective": sel.objective, "values": values}
        print(f"{name}: {runs[name]['seconds']:.1f} s, {sel.attributes}", flush=True)
    common = set(runs["hf"]["values"]) & set(runs["vllm"]["values"])
    diff = max(abs(runs["hf"]["values"][s] - runs["vllm"]["values"][s]) for s in common)
    # the first step alone, with and without reading the prefix cache
    from prefsteer.methods.exact.select import pair_requests

    # a fresh prefix for this comparison (the selection above left the pair's prefix in vLLM's cache)
    reqs = pair_requests(prompt + "\n", pair["chosen"], pair["rejected"],
                         [()] + [(a,) for a in lib.names[: args.step_sets - 1]], lib)
    step = {}
    for read in (True, False):
        start = time.perf_counter()
        s = vb.score(reqs, read_prefix_cache=read)
        step[read] = (time.perf_counter() - start, s, dict(vb.last_stats))
    step_diff = max(abs(a.logprob - b.logprob) for a, b in zip(step[True][1], step[False][1]))
    ctx = hf.count_tokens([{"role": "user", "content": prompt}])
    out["scoring"] = {"pair": pair["pair_id"], "context_tokens": ctx,
                      **{f"{n}_seconds": r["seconds"] for n, r in runs.items()},
                      "same_selection": runs["hf"]["selection"] == runs["vllm"]["selection"],
                      "selection": runs["vllm"]["selection"], "max_abs_diff": diff, "sets": len(common),
                      "step1_read_cache_s": step[True][0], "step1_no_cache_s": step[False][0],
                      "step1_read_vs_no_cache_max_diff": step_diff, "step1_rescored": step[True][2].get("rescored")}
    sc = out["scoring"]
    return [f"## EXACT indexing of one TL;DR pair ({sc['pair']}, context {ctx} tokens, K={len(lib)}, k={args.k})", "",
            "| engine | wall s | selection | speed vs hf |", "|---|---|---|---|",
            f"| hf (transformers, prefix-sharing engine) | {sc['hf_seconds']:.1f} | {', '.join(runs['hf']['selection'])} | 1.00x |",
            f"| vllm (prompt_logprobs, prefix cache read) | {sc['vllm_seconds']:.1f} | {', '.join(sc['selection'])} | "
            f"{sc['hf_seconds'] / sc['vllm_seconds']:.2f}x |", "",
            f"Max objective difference over {sc['sets']} attribute sets: **{diff:.2e} nats**; same selection: "
            f"{sc['same_selection']}.", "",
            f"vLLM, {len(reqs) // 2} sets of EXACT's first step ({len(reqs)} requests): {sc['step1_read_cache_s']:.1f} s reading the prefix "
            f"cache vs {sc['step1_no_cache_s']:.1f} s with vLLM's default for prompt_logprobs (not reading it), "
            f"max difference {step_diff:.1e} nats ({sc['step1_rescored']} requests rescored).", ""]


def generation(args, vb, out: dict) -> list[str]:
    from prefsteer.attributes import attribute_messages, load_library
    from prefsteer.backends.base import GenerationConfig, user_turn

    from prefsteer.methods.registry import build

    lib = load_library()
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    guide = build("cliper", vb, options={"prefs": args.prefs, "alpha": args.alpha}).guide_for(None)[0]
    drift = build("drift", vb, options={"attributes": list(DRIFT_WEIGHTS)})
    drift.weights["bench"] = dict(DRIFT_WEIGHTS)  # set, not fitted: the throughput needs no user
    vb.generate([user_turn("hi")], GenerationConfig(max_new_tokens=4))  # warm-up
    vb.generate([user_turn("hi")], GenerationConfig(max_new_tokens=4), guide=guide)  # loads the side model

    def token_ids(gens):
        return [g.token_ids for g in gens]

    def drift_ids(prompts):  # Drift returns text: its tokens are the text read back
        return [vb.encode_continuation(o.text) for o in drift.generate("bench", prompts, cfg)]

    rows, lines = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i})") for i in range(b)]
        runs = {"plain": lambda: token_ids(vb.generate([user_turn(p) for p in prompts], cfg)),
                "exact": lambda: token_ids(vb.generate([attribute_messages(p, ATTRS, lib) for p in prompts], cfg)),
                "cliper": lambda: token_ids(vb.generate([user_turn(p) for p in prompts], cfg, guide=guide)),
                "drift": lambda: drift_ids(prompts)}
        res = {}
        for name, run in runs.items():
            start = time.perf_counter()
            ids = run()
            secs = time.perf_counter() - start
            toks = sum(len(i) for i in ids)
            res[name] = {"seconds": secs, "tokens": toks, "tok_s": toks / secs}
        rows.append({"batch": b, **res})
        print(f"batch {b}: " + ", ".join(f"{k} {v['tok_s']:.1f} tok/s" for k, v in res.items()), flush=True)
    sec = out.setdefault(f"generation-{args.new_tokens}tok", {})
    sec["rows"] = rows
    sec["cliper"] = {"prefs": args.prefs, "alpha": args.alpha, "top_k": guide.top_k,
                     "side_model": vb.side_spec["model"] or "the embedded default (vLLM's own checkpoint)"}
    sec["drift"] = {"weights": DRIFT_WEIGHTS, "beta": drift.config.beta}
    lines += [f"## Generation throughput (vLLM, greedy, up to {args.new_tokens} new tokens per row)", "",
              f"CLIPer: prefs {args.prefs}, alpha {args.alpha}, top-{guide.top_k}. Drift: weights "
              f"{DRIFT_WEIGHTS}, beta {drift.config.beta} (two attribute branches per request). Both on the side "
              "model = vLLM's own checkpoint (the hf backend in vLLM's engine process).", "",
              "| batch | plain tok/s | EXACT injection tok/s | EXACT / plain | CLIPer tok/s | plain / CLIPer "
              "(slowdown) | Drift tok/s | plain / Drift (slowdown) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pl = r["plain"]["tok_s"]
        lines.append(f"| {r['batch']} | {pl:.1f} | {r['exact']['tok_s']:.1f} | {r['exact']['tok_s'] / pl:.3f} | "
                     f"{r['cliper']['tok_s']:.1f} | {pl / r['cliper']['tok_s']:.2f}x | "
                     f"{r['drift']['tok_s']:.1f} | {pl / r['drift']['tok_s']:.2f}x |")
    sec["load_average_end"] = os.getloadavg()[0]
    lines += ["", "Rows stop at the end-of-turn token, so the columns may generate different numbers of "
              "tokens; tokens/s counts what was generated (Drift's: its text read back as tokens). 1-min load "
              f"average at the end of the section: {sec['load_average_end']:.1f}.", ""]
    return lines


def main(args: argparse.Namespace) -> int:
    from prefsteer.backends.vllm import VLLMBackend

    t = time.perf_counter()
    vb = VLLMBackend(dtype=args.dtype)
    startup = time.perf_counter() - t
    import vllm

    machine = args.machine or f"{platform.processor() or platform.machine()}, {vb.source['device']}"
    out: dict = {"machine": machine, "vllm": vllm.__version__, "dtype": vb.dtype, "startup_s": startup}
    out["load_average_start"] = os.getloadavg()[0]
    head = [f"# vLLM vs transformers ({time.strftime('%Y-%m-%d')}, {machine}, {vb.dtype}, vllm {vllm.__version__}, "
            f"engine start-up {startup:.0f} s, 1-min load average {out['load_average_start']:.1f} at the start)", ""]
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "scoring"):
        from prefsteer.backends.hf import TransformersBackend

        hf = TransformersBackend(dtype=vb.dtype)
        (outdir / "scoring.md").write_text("\n".join(head + scoring(args, vb, hf, out)) + "\n")
    if args.only in (None, "generation"):
        path = outdir / f"generation-{args.new_tokens}tok.md"
        path.write_text("\n".join(head + generation(args, vb, out)) + "\n")
    bench = outdir / "bench.json"  # the sections of earlier runs stay, this run's replace theirs
    earlier = json.loads(bench.read_text()) if bench.is_file() else {}
    bench.write_text(json.dumps({**earlier, **out}, indent=1, default=str) + "\n")
    print(f"tables written into {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
