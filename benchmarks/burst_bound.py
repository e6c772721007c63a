"""How soon can the median request of a burst get its first token on this machine?

A request's first token needs its whole prompt read by every layer of the decoder (the last
position attends to every earlier one's keys and values at every layer), less the head that prefix
caching keeps from earlier prompts. When n requests arrive at one moment, the median one's first
token (the time-to-first-token p50 of the serving benchmark: the ``round(0.5 (n - 1)) + 1``-th
first token) comes after at least that many prompts have been prefilled, in whatever order a
scheduler takes them. So

    FLOPs >= 2 x (decoder weights x their uncached tokens + output-layer weights x their number)

summed over the prompts with the fewest uncached tokens, where a prompt's uncached tokens are
those after the longest head it shares with any other prompt of the burst or with the warm-up's
(more generous than the engine's cache, which keeps only earlier prompts). Divided by the fastest
float32 matrix product this machine runs (`selection_bound.matmul_gflops`), this is a floor on
that first token that no scheduler beats here; attention, sampling, the HTTP server and the
clients come on top. The script measures the engine's own idle first token (four requests one
after another) and its bursts (the requests handed to ``Backend.stream`` at once), on the serving
benchmark's prompts (each opened by a new number, so that the cache keeps nothing of them but the
template's head), and puts the floor beside the goal "TTFT p50 at most 2x idle".

    .venv/bin/python benchmarks/burst_bound.py                 # the embedded model, ~1 min
    .venv/bin/python benchmarks/burst_bound.py --clients 4 8 --model <path or hub name>

Writes results/serving/burst-bound.md and .json and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_cache import first_tokens  # noqa: E402
from selection_bound import matmul_gflops  # noqa: E402
from serving_speed import pct, prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[4, 8, 32], help="burst sizes (default 4 8 32)")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--goal", type=float, default=2.0, help="the goal, as a multiple of the idle first token (2)")
    p.add_argument("--rounds", type=int, default=3, help="bursts measured per size, the median kept (3)")
    p.add_argument("--out", default=str(REPO / "results" / "serving"))
    return p


def shared_head(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


_SERIAL = itertools.count(1)


def new_prompt(text: str) -> str:
    """``text`` opened by a number never used before in this process, so that it finds no more than
    the chat template's head (and a digit) in the engine's prefix cache, whatever was sent before."""
    return f"{next(_SERIAL)}. {text}"


def burst_prompts(n: int) -> list[str]:
    """The serving benchmark's ``n`` prompts, each new to the prefix cache (`new_prompt`). (A tag
    shared by a burst's prompts, as the serving benchmark has, would let them share its tokens,
    which users' prompts do not.)"""
    return [new_prompt(p) for p in prompts(n)]


def main(args: argparse.Namespace) -> int:
    import torch

    from prefsteer.backends.base import GenerationConfig, user_turn
    from prefsteer.backends.hf import TransformersBackend

    backend = TransformersBackend(model=args.model, dtype="float32")
    cfg = backend.config
    decoder = sum(p.numel() for p in backend.body.parameters()) - backend.model.get_input_embeddings().weight.numel()
    head = backend.lm_head.weight.numel()
    inner = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    gen = GenerationConfig(max_new_tokens=4, min_new_tokens=4)  # a first token is what is timed
    warm = "Say hello."
    backend.generate([user_turn(warm)], gen)
    first_tokens(backend, ["Say hi."], gen)

    lone = burst_prompts(4)
    idle = [first_tokens(backend, [t], gen)[0] for t in lone]
    idle_p50 = pct(idle, 0.5)
    gflops = max(matmul_gflops(cfg.hidden_size, inner) for _ in range(3))
    # what a lone request's first token costs beyond its own prefill's work at that rate (a forward
    # reads every weight, whatever its tokens; the scheduler's turn; Python): a burst's median pays
    # it at least once too, since at least one forward runs before its first token
    lone_ids = [backend.encode_context(user_turn(t)) for t in [warm, *lone]]
    lone_work = [2 * (decoder * (len(x) - shared_head(x, lone_ids[0])) + head) for x in lone_ids[1:]]
    fixed_s = max(0.0, idle_p50 - pct(lone_work, 0.5) / (gflops * 1e9))
    rows = []
    for n in args.clients:
        texts = burst_prompts(n)
        ids = [backend.encode_context(user_turn(t)) for t in [warm, *texts]]
        uncached = sorted(len(x) - max(shared_head(x, y) for j, y in enumerate(ids) if j != i)
                          for i, x in enumerate(ids) if i > 0)
        m = round(0.5 * (n - 1)) + 1  # the median's rank, as the serving benchmark's p50
        flop = 2 * (decoder * sum(uncached[:m]) + head * m)
        floor_ms = flop / (gflops * 1e9) * 1e3
        measured = sorted(pct(first_tokens(backend, burst_prompts(n), gen), 0.5)
                          for _ in range(args.rounds))[args.rounds // 2]
        all_s = 2 * (decoder * sum(uncached) + head * n) / (gflops * 1e9)  # the whole burst in one go
        rows.append({"clients": n, "median_rank": m, "prompt_tokens": [len(x) for x in ids[1:]],
                     "uncached_tokens_median_needs": sum(uncached[:m]), "gflop": flop / 1e9, "floor_ms": floor_ms,
                     "floor_x_idle": floor_ms / 1e3 / idle_p50,
                     "floor_with_fixed_x_idle": (floor_ms / 1e3 + fixed_s) / idle_p50,
                     "all_in_one_go_x_idle": (all_s + fixed_s) / idle_p50, "measured_ms": measured * 1e3,
                     "measured_x_idle": measured / idle_p50})
    backend.close()

    out = {"model": backend.source["model"], "decoder_weights": decoder, "output_layer_weights": head,
           "matmul_gflops": gflops, "idle_ttft_ms": idle_p50 * 1e3, "idle_fixed_ms": fixed_s * 1e3,
           "idle_runs_ms": [x * 1e3 for x in idle],
           "goal_x_idle": args.goal, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d"),
           "rows": rows}
    head_lines = [f"model {out['model']}: {decoder / 1e6:.1f}M decoder and {head / 1e6:.1f}M output-layer weights; "
                  f"best float32 product {gflops:.1f} GFLOP/s ({out['threads']} threads, {out['cpu_capability']}); "
                  f"idle first token in the engine {idle_p50 * 1e3:.0f} ms (p50 of 4), goal {args.goal:g}x = "
                  f"{args.goal * idle_p50 * 1e3:.0f} ms; of the idle first token, {fixed_s * 1e3:.0f} ms are not its "
                  "prefill's work at that rate", ""]
    table = ["| burst | the median waits for | their uncached tokens | GFLOP | floor ms | floor x idle | "
             "floor + a lone request's fixed cost, x idle | the whole burst in one go, x idle | measured p50 ms | "
             "measured x idle |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['clients']} | {r['median_rank']} prompts | {r['uncached_tokens_median_needs']} | "
                     f"{r['gflop']:.1f} | {r['floor_ms']:.0f} | {r['floor_x_idle']:.2f} | "
                     f"{r['floor_with_fixed_x_idle']:.2f} | {r['all_in_one_go_x_idle']:.2f} | "
                     f"{r['measured_ms']:.0f} | {r['measured_x_idle']:.2f} |")
    print("\n".join(head_lines + table))
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "burst-bound.json").write_text(json.dumps(out, indent=2) + "\n")
    (dest / "burst-bound.md").write_text("\n".join([
        "# A burst's first token: the floor on this machine", "", *head_lines, *table, "",
        "`floor`: the float32 work of prefilling the prompts the median request waits for (the ones with the "
        "fewest tokens not shared with another prompt's head), at the best matrix-product rate measured in the "
        "same run; no scheduler gets the median first token sooner on this machine (each prompt opens with a new "
        "number, so that they share only the chat template's head). `floor + a lone request's fixed cost`: the floor plus what a "
        "lone request's first token takes beyond its own prefill's work (paid at least once by the median of "
        "a burst too, if all the prompts it waits for are prefilled in one go). `the whole burst in one go`: the "
        "same for a scheduler that prefills every prompt of the burst before any first token, as this one does. "
        "`measured`: the engine's "
        f"own p50 (no HTTP), the median of {args.rounds} bursts. Prompts: the serving benchmark's "
        "(`benchmarks/serving_speed.py`), with the chat template. "
        f"{out['date']}; `{' '.join(['python benchmarks/burst_bound.py', *sys.argv[1:]])}`.", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
