"""The time to the first token with and without prefix caching, in the hf engine's scheduler.

A streamed prompt that starts like a kept one (the chat template's system turn, which every prompt
shares; opening words shared with an earlier prompt) takes those positions' keys and values from
the backend's prefix memo and prefills only the rest (`prefsteer.backends.hf.batch`). This run
times, in turns within one process (the machine is shared, so each figure is a median over
``--reps`` rounds), for the backend with ``share_prefix`` on and off:

* idle: one streamed request alone, its time to the first token;
* burst: ``--clients`` requests handed to the engine at once, the median of their times to the
  first token (prefilling the burst is what they wait for).

Every round uses prompts no earlier round has sent (distinct topics, tagged with the round), so a
hit is only the template and the opening words prompts share, never a whole repeated prompt.

    .venv/bin/python benchmarks/prefix_cache.py            # ~20 s on 2 cores

Writes results/serving/prefix-cache.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from serving_speed import prompts  # noqa: E402

OUT = REPO / "results" / "serving"


def first_tokens(backend, texts: list[str], config) -> list[float]:
    """Stream ``texts`` at once; each one's seconds to its first token."""
    from prefsteer.backends.base import user_turn

    firsts = [0.0] * len(texts)

    def read(i: int, stream, t0: float) -> None:
        for _ in stream:
            firsts[i] = time.perf_counter() - t0
            break
        stream.wait()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=read, args=(i, backend.stream(user_turn(t), config), t0))
               for i, t in enumerate(texts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return firsts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="requests in a burst")
    ap.add_argument("--reps", type=int, default=4, help="rounds per setting")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    from prefsteer.backends import load_backend
    from prefsteer.backends.base import GenerationConfig, user_turn

    b = load_backend("hf")
    config = GenerationConfig(max_new_tokens=4)
    b.stream(user_turn("Say hello."), config).wait()  # warm-up: the packed weights, first-call costs
    times: dict[bool, dict[str, list[float]]] = {s: {"idle": [], "burst": []} for s in (True, False)}
    reused: dict[bool, int] = {True: 0, False: 0}
    started = time.perf_counter()
    for rep in range(args.reps):
        for share in (True, False):
            b.share_prefix = share
            b.clear_prefix_memo()
            tag = f"{rep} {share}"
            before = b.scheduler.stats()["reused_tokens"]
            b.stream(user_turn("Say hello."), config).wait()  # what any earlier request leaves: the template
            for text in prompts(3, f"{tag} idle"):
                times[share]["idle"].append(first_tokens(b, [text], config)[0])
            burst = first_tokens(b, prompts(args.clients, f"{tag} burst"), config)
            times[share]["burst"].append(statistics.median(burst))
            reused[share] += b.scheduler.stats()["reused_tokens"] - before
    rows = []
    for share in (True, False):
        idle, burst = statistics.median(times[share]["idle"]), statistics.median(times[share]["burst"])
        rows.append({"prefix_cache": share, "idle_ttft_ms": 1000 * idle, "burst_ttft_p50_ms": 1000 * burst,
                     "burst_over_idle": burst / idle, "reused_positions": reused[share]})
    lines = [f"| prefix cache | idle TTFT ms | {args.clients} at once: TTFT p50 ms | burst / idle | "
             "prompt positions reused |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['prefix_cache'] else 'off'} | {r['idle_ttft_ms']:.0f} | "
                     f"{r['burst_ttft_p50_ms']:.0f} | {r['burst_over_idle']:.2f} | {r['reused_positions']} |")
    cond = {"model": b.info().get("model"), "clients": args.clients, "reps": args.reps,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            "date": time.strftime("%Y-%m-%d"), "total_s": round(time.perf_counter() - started, 1),
            "command": "python benchmarks/prefix_cache.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix-cache.json").write_text(json.dumps({"conditions": cond, "rows": rows}, indent=2) + "\n")
    (args.out / "prefix-cache.md").write_text("\n".join([
        "# Prefix caching in the hf scheduler: time to the first token", "", *lines, "",
        "idle: one streamed request alone (median of 3 per round); burst: that many requests handed to the "
        "engine at once, the median of their first-token times (median over rounds). Engine only, no HTTP; "
        "every round's prompts are new (tagged), so the cache holds only the chat template and the openings "
        "prompts share; the rounds alternate the setting.", "",
        f"Conditions: {cond['model']}; {cond['machine']}; {cond['reps']} rounds; {cond['date']}; "
        f"{cond['total_s'] / 60:.1f} min; `{cond['command'].strip()}`.", ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
