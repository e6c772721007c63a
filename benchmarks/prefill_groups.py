"""A burst that mixes one long prompt with short ones: prefilled in one forward, or grouped by length.

Left-padded in one forward, the prompts that join the hf engine's batch together all run the
longest one's length: when one is a long conversation and the others one-line chats, every short
row runs the long one's length as padding, and every request waits for the long one. The scheduler
splits such a join into forwards of near lengths, shortest first, each group's first tokens sent
before the next group's prefill (`scheduler.length_groups`: a forward's own cost, the backend's
``prefill_overhead``, weighed against the padding it saves). This script times, in the engine's
own process (no HTTP), the first tokens of 8 requests handed to the engine at once, 7 short
prompts (the serving benchmark's) and one long one (about 450 tokens, sent last), and of 8 short
ones, with the grouping on (the backend's default) and off (one forward for every join), in turns,
every prompt new to the prefix cache (`burst_bound.new_prompt`).

    .venv/bin/python benchmarks/prefill_groups.py                # ~1 min on 2 cores

Writes results/serving/prefill-groups.md and .json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from burst_bound import burst_prompts, new_prompt  # noqa: E402
from prefix_cache import first_tokens  # noqa: E402
from serving_speed import pct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STORY = " ".join(["The committee met on a rainy Tuesday to discuss the budget for the new library wing."] * 25)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=3, help="bursts per row, in turns (default 3)")
    p.add_argument("--out", default=str(REPO / "results" / "serving"))
    return p


def main(args: argparse.Namespace) -> int:
    import torch

    from prefsteer.backends.base import GenerationConfig, user_turn
    from prefsteer.backends.hf import TransformersBackend

    backend = TransformersBackend(model=args.model, dtype="float32")
    grouped = backend.prefill_overhead
    gen = GenerationConfig(max_new_tokens=4, min_new_tokens=4)
    backend.generate([user_turn("Say hello.")], gen)
    first_tokens(backend, ["Say hi."], gen)
    long_tokens = len(backend.encode_context(user_turn(STORY)))
    runs: dict[tuple[str, str], list[list[float]]] = {}
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            backend.prefill_overhead = grouped if mode == "on" else 10 ** 9
            runs.setdefault(("7 short + 1 long", mode), []).append(
                first_tokens(backend, burst_prompts(7) + [new_prompt("Summarize: " + STORY)], gen))
            runs.setdefault(("8 short", mode), []).append(first_tokens(backend, burst_prompts(8), gen))
    backend.prefill_overhead = grouped
    backend.close()

    rows = []
    for (burst, mode), bursts in runs.items():
        shorts = [t for ts in bursts for t in (ts[:7] if burst.endswith("long") else ts)]
        rows.append({"burst": burst, "grouping": mode,
                     "short_ttft_p50_ms": pct(shorts, 0.5) * 1e3,
                     "long_ttft_ms": pct([ts[7] for ts in bursts], 0.5) * 1e3 if burst.endswith("long") else None,
                     "last_first_token_ms": pct([max(ts) for ts in bursts], 0.5) * 1e3})
    rows.sort(key=lambda x: (x["burst"], x["grouping"] != "off"))
    out = {"model": backend.source["model"], "long_prompt_tokens": long_tokens, "prefill_overhead": grouped,
           "rounds": args.rounds, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d"),
           "rows": rows}
    table = ["| burst | grouping by length | short prompts' first token p50 | the long one's | the last first token |",
             "|---|---|---:|---:|---:|"]
    for x in rows:
        long_ms = f"{x['long_ttft_ms']:.0f} ms" if x["long_ttft_ms"] is not None else ""
        table.append(f"| {x['burst']} | {x['grouping']} | {x['short_ttft_p50_ms']:.0f} ms | {long_ms} | "
                     f"{x['last_first_token_ms']:.0f} ms |")
    print("\n".join(table))
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "prefill-groups.json").write_text(json.dumps(out, indent=2) + "\n")
    (dest / "prefill-groups.md").write_text("\n".join([
        "# A burst mixing one long prompt with short ones: one prefill, or grouped by length", "", *table, "",
        f"8 requests handed to the hf engine at once (no HTTP), greedy, 4 new tokens: 7 of the serving benchmark's "
        f"one-line prompts and one of {long_tokens} tokens sent last, or 8 one-line prompts; each row the median "
        f"over {args.rounds} bursts, on and off in turns, every prompt new to the prefix cache. `on`: "
        f"joining requests split by `scheduler.length_groups` (prefill_overhead {grouped} tokens), shortest "
        "group first; `off`: every join one forward, left-padded to its longest prompt. The engine admits the first request of a burst alone "
        "(it finds the engine idle) and the others together as they arrive during its prefill. "
        f"{out['model']}, float32, {out['threads']} threads ({out['cpu_capability']}), {out['date']}; "
        f"`{' '.join(['python benchmarks/prefill_groups.py', *sys.argv[1:]])}`.", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
