"""How fast can EXACT's exact greedy select a whole evaluation configuration on this machine?

Exact greedy scores every candidate set of every step: for K attributes and k steps that is
1 + K + (K - 1) + ... + (K - k + 1) attribute sets per pair, each with both responses. Each
response token must run through every layer of the decoder and the output layer under each set's
context (the set changes what the token attends to), whatever the engine shares of the prompt. So

    FLOPs >= sets x (response tokens of the pair) x 2 x (decoder weights + output-layer weights)

less the decoder's pass over each response's last token (it predicts nothing), summed over the
distinct (prompt, response) of the configuration's training pairs: the score cache serves a pair
that recurs across seeds, or a response that two annotators judged, once. Divided by the fastest
float32 matrix product this machine runs (a 4096 x hidden x intermediate product, best of several
tries), this gives a lower bound on the selection's wall time that no exact float32 implementation
beats here: attention, the prompts and exact-global's own searches all come on top.
``--time-pairs N`` also times the engine on N of the pairs and projects it over all of them.

    python benchmarks/selection_bound.py                          # the `paper` configuration
    python benchmarks/selection_bound.py --config paper --time-pairs 2 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", help="evaluation configuration, a name or a JSON file (default paper)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the configuration's)")
    p.add_argument("--k", type=int, default=3, help="attributes selected per pair (default 3)")
    p.add_argument("--goal-hours", type=float, default=2.0, help="the goal to compare against (default 2)")
    p.add_argument("--time-pairs", type=int, default=0,
                   help="also time exact greedy on this many of the pairs and project it (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def matmul_gflops(hidden: int, inner: int, rows: int = 4096, repeats: int = 20, dtype=None) -> float:
    """The best rate of a (rows x hidden) @ (hidden x inner) product (float32 unless ``dtype``), in GFLOP/s."""
    import torch

    a, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(inner, hidden, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            best = min(best, time.perf_counter() - start)
    return 2 * rows * hidden * inner / best / 1e9


def main(args: argparse.Namespace) -> int:
    import torch

    from prefsteer.attributes import load_library
    from prefsteer.backends.hf import TransformersBackend
    from prefsteer.data.loaders import load_pairs
    from prefsteer.errors import InputError
    from prefsteer.evaluation.protocol import load_config
    from prefsteer.evaluation.runner import make_jobs
    from prefsteer.methods.exact.select import greedy_select, make_objective

    try:
        config = load_config(args.config)
        pairs = load_pairs(str(config.data_path()))
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = args.seeds if args.seeds is not None else config.seeds
    distinct = {}
    for job in make_jobs(config, pairs, seeds):
        for p in job.train:
            distinct.setdefault((p.prompt, p.chosen, p.rejected), p)
    library = load_library()
    K = len(config.attributes or library.names)
    sets = 1 + sum(K - i for i in range(min(args.k, K)))

    backend = TransformersBackend(model=args.model, threads=args.threads, dtype="float32")
    cfg = backend.config
    embed = backend.model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in backend.body.parameters()) - embed.numel()
    head = backend.lm_head.weight.numel()
    # a response shared by two pairs of one prompt (two annotators judged the same summary) is
    # scored once per attribute set if both searches take the same path: count it once
    length = {(p.prompt, text): len(backend.encode_continuation(text))
              for p in distinct.values() for text in (p.chosen, p.rejected)}
    responses = set(length)
    response_tokens = sum(length.values())
    prompts = len({prompt for prompt, _ in responses})
    tokens = sets * response_tokens
    # each response token is a target (output layer); the decoder runs the tokens that predict
    # them: a response's own tokens but its last, and the context's last token, once per prompt
    decoder_tokens = sets * (response_tokens - len(responses) + prompts)
    flops = 2 * (decoder_tokens * decoder + tokens * head)
    inner = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    gflops = max(matmul_gflops(cfg.hidden_size, inner) for _ in range(3))
    out = {"config": config.name, "seeds": seeds, "distinct_pairs": len(distinct), "K": K, "k": args.k,
           "sets_per_pair": sets, "distinct_responses": len(responses), "response_tokens": response_tokens,
           "scored_response_tokens": tokens, "decoder_tokens": decoder_tokens, "decoder_weights": decoder, "output_layer_weights": head,
           "pflop": flops / 1e15, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "goal_hours": args.goal_hours}

    if args.time_pairs:
        timed = list(distinct.values())[: args.time_pairs]
        names = config.attributes or library.names
        start = time.perf_counter()
        for p in timed:
            backend.clear_prefix_memo()
            greedy_select(make_objective(backend, p.prompt, p.chosen, p.rejected, library), names, args.k)
        elapsed = time.perf_counter() - start
        timed_tokens = sum(length[p.prompt, p.chosen] + length[p.prompt, p.rejected] for p in timed)
        # pairs differ in length: project by response tokens, which the work is proportional to
        out.update(timed_pairs=len(timed), seconds_per_pair=elapsed / len(timed),
                   projected_hours=elapsed * response_tokens / timed_tokens / 3600)
        # the rate moves with the load of the host: the best of both measurements lowers the bound
        gflops = max(gflops, *(matmul_gflops(cfg.hidden_size, inner) for _ in range(3)))
    bound_h = flops / (gflops * 1e9) / 3600
    # lower precision would cut the work only where the CPU has kernels for it
    bf16 = matmul_gflops(cfg.hidden_size, inner, repeats=5, dtype=torch.bfloat16)
    out.update(matmul_gflops=gflops, bound_hours=bound_h, bfloat16_matmul_gflops=bf16)

    print(f"configuration {config.name}, seeds {seeds}: {len(distinct)} distinct training pairs, "
          f"K={K}, k={args.k}: {sets} attribute sets per pair")
    print(f"model {backend.source['model']}: {decoder / 1e6:.1f}M decoder and {head / 1e6:.1f}M output-layer "
          f"weights, {2 * (decoder + head) / 1e6:.0f} MFLOP per scored token")
    print(f"CPU capability {out['cpu_capability']}, {out['threads']} threads\n")
    print(f"{'what':<52} {'figure':>14}")
    print(f"{'distinct responses (prompt, summary)':<52} {len(responses):>14,}")
    print(f"{'their tokens':<52} {response_tokens:>14,}")
    print(f"{'scored response tokens (x sets per pair)':<52} {tokens:>14,}")
    print(f"{'float32 work, PFLOP':<52} {flops / 1e15:>14.3f}")
    print(f"{'best float32 matrix product, GFLOP/s':<52} {gflops:>14.1f}")
    print(f"{'the same product in bfloat16, GFLOP/s':<52} {bf16:>14.1f}")
    print(f"{'lower bound on exact greedy selection, hours':<52} {bound_h:>14.2f}")
    if args.time_pairs:
        print(f"{f'engine, measured on {len(timed)} pairs, s per pair':<52} {out['seconds_per_pair']:>14.1f}")
        print(f"{'engine, projected over all pairs, hours':<52} {out['projected_hours']:>14.2f}")
    print(f"{'goal for the whole configuration, hours':<52} {args.goal_hours:>14.2f}")
    verdict = "out of reach" if bound_h > args.goal_hours else "not excluded"
    print(f"\nbound={bound_h:.2f}h goal={args.goal_hours:.2f}h: the goal is {verdict} for exact greedy in float32 here")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
