"""Serving at speed: streamed answers from `prefsteer serve` with 1 to 32 concurrent clients.

For each number of concurrent clients and each method (none, exact, cliper), the clients each send
one streamed chat request at the same moment (greedy, ``max_tokens`` 128 and ``min_tokens`` 128, so
that every answer, personalized or not, is 128 tokens long; distinct prompts) and the run records,
per request, the time to the first text chunk and the gaps between chunks, and over the run the
tokens made per second (``usage.completion_tokens`` summed over the wall time). At each number of
clients the methods take turns, ``--rounds`` times (2), in the reverse order every other round,
and each row pools its rounds: the comparison of the methods is not at the mercy of the machine's
speed drifting over the minutes of the run. Then, for ``--spread-clients`` (8), the same clients with
their arrivals spread over one answer's time (two requests each, one after the other): requests
that meet a batch already decoding, the steady state of a busy service, where a burst measures the
moment every client clicks at once.
The 1-client row sends 4 requests one at a time: the figure the others are compared with (the same
requests decoded one after another). Then, in a process of the engine's own, without HTTP:
1 (four one after another), 4, 8, 32 requests handed to the engine at once and read as they
decode (the time to the first token, what prefilling a burst together costs, and the gaps between
tokens: the scheduler without the server's work), and the 32 clients' requests given to one blocking
``Backend.generate`` call (the engine's own batch, for vLLM ``LLM``'s: the ceiling a server on it
can approach). EXACT answers as the demo user (indexed first, on a
six-attribute library with k=2, so the run fits on a CPU); CLIPer needs no user (``prefs``
concise=1, the shipped head).

    .venv/bin/python benchmarks/serving_speed.py                                  # hf, ~10 min on 2 cores
    .venv/bin/python benchmarks/serving_speed.py --backend vllm --python .venv-vllm/bin/python
    .venv/bin/python benchmarks/serving_speed.py --backend fake --embedder hash --clients 1 4   # a dry run

Writes results/serving/<backend>.json and <backend>.md (the table and its conditions) and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_service_helpers import free_port, start_process, stop_process, wait_http  # noqa: E402

DEMO = REPO / "src" / "prefsteer" / "resources" / "demo_pairs.jsonl"
TOPICS = ["a dragon who learns to cook", "planning a vegetable garden", "how a bicycle works", "a lighthouse keeper",
          "the history of the printing press", "learning to play the violin", "a trip to the mountains",
          "how bread rises", "a robot that paints", "saving money for a house", "the water cycle",
          "training for a marathon", "a city under the sea", "how vaccines work", "starting a small bakery",
          "a detective in Venice", "the life of a honeybee", "building a treehouse", "how airplanes fly",
          "a friendship between a cat and a crow", "moving to a new country", "how volcanoes form",
          "writing a first novel", "a lost map", "caring for houseplants", "how the internet works",
          "an old clockmaker", "learning a new language", "a storm at sea", "how solar panels work",
          "a school science fair", "the first day at a new job"]
FORMS = ["Write a long story about {}.", "Explain in detail, step by step: {}.", "Tell me everything about {}."]


def prompts(n: int, batch: str = "") -> list[str]:
    """``n`` distinct prompts. The engines keep prompts' keys and values for the prompts that start
    alike (prefix caching): ``batch`` opens every prompt of one row of the table, so that no row
    finds its prompts kept by an earlier one and each shares with the others only the template and
    the opening words a real client's prompts would share too."""
    tag = f"[{batch}] " if batch else ""
    return [tag + FORMS[i % len(FORMS)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def stream_one(client: httpx.Client, model: str, prompt: str, extra: dict, max_tokens: int,
               min_tokens: int = 0) -> dict:
    """One streamed request through ``client`` (the run's one client: its connections are kept and
    reused, as a load generator's are, so no request pays for setting a client up on the cores the
    server runs on)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            **({"min_tokens": min_tokens} if min_tokens else {}),
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "prefsteer": extra}
    t0 = time.perf_counter()
    arrivals, n, text = [], 0, ""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"{r.status_code}: {r.text[:300]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            n = (ch.get("usage") or {}).get("completion_tokens") or n
            d = (ch.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
            if d:
                arrivals.append(time.perf_counter() - t0)
                text += d
    total = time.perf_counter() - t0
    return {"ttft": arrivals[0] if arrivals else None, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tokens": n, "seconds": total, "text": text}


def run_level(client: httpx.Client, model: str, extra: dict, clients: int, max_tokens: int, min_tokens: int,
              batch: str) -> dict:
    """``clients`` requests at once (1: four requests one after another): each request's record and
    the wall time."""
    ps = prompts(max(clients, 4), batch)
    results: list[dict] = []
    t0 = time.perf_counter()
    if clients == 1:
        for p in ps[:4]:
            results.append(stream_one(client, model, p, extra, max_tokens, min_tokens))
    else:
        lock = threading.Lock()

        def go(p):
            r = stream_one(client, model, p, extra, max_tokens, min_tokens)
            with lock:
                results.append(r)
        threads = [threading.Thread(target=go, args=(p,)) for p in ps[:clients]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"results": results, "wall_s": time.perf_counter() - t0}


def run_spread(client: httpx.Client, model: str, extra: dict, clients: int, max_tokens: int, min_tokens: int,
               batch: str, period: float, per_client: int = 2) -> dict:
    """``clients`` clients whose arrivals are spread out, as a steady flow of users makes them: client
    i starts at i/clients of ``period`` (one request's time alone) and sends ``per_client`` requests
    one after another. Each request meets a batch already decoding and joins it at a step boundary,
    rather than all of them arriving at one moment and sharing one prefill."""
    ps = prompts(clients * per_client, batch)
    results: list[dict] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def go(i: int) -> None:
        time.sleep(max(0.0, t0 + i * period / clients - time.perf_counter()))
        for p in ps[i * per_client:(i + 1) * per_client]:
            r = stream_one(client, model, p, extra, max_tokens, min_tokens)
            with lock:
                results.append(r)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "wall_s": time.perf_counter() - t0}


def summarize(clients: int, runs: list[dict]) -> dict:
    """One row of the table from one or more runs of a level (their requests pooled)."""
    results = [r for run in runs for r in run["results"]]
    wall = sum(run["wall_s"] for run in runs)
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "arrivals": "at once", "requests": len(results), "errors": errors, "tokens": tokens,
            "wall_s": wall,
            "tok_s": tokens / wall if wall else 0.0, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99)}


def costs(runs: dict[tuple[str, int], list[dict]], methods: list[str]) -> list[dict]:
    """Each personalized method against ``none`` at each number of clients sent at once: the ratio of
    their tokens/s pooled over the rounds, and the ratio within each round (the methods take turns in
    it, so a machine whose speed drifts from round to round moves them alike); ITL p50 too."""
    out = []
    for (m, c), mine in sorted(runs.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
        plain = runs.get(("none", c))
        if m == "none" or c < 2 or not plain:
            continue
        pooled_m, pooled_n = summarize(c, mine), summarize(c, plain)
        if not pooled_m["tokens"] or not pooled_n["tokens"] or pooled_m["errors"] or pooled_n["errors"]:
            continue  # a failed run: the main table counts its errors
        per_round = [summarize(c, [a])["tok_s"] / summarize(c, [b])["tok_s"] for a, b in zip(mine, plain)]
        itl = (pooled_m["itl_p50"] / pooled_n["itl_p50"]) if pooled_m["itl_p50"] and pooled_n["itl_p50"] else None
        out.append({"method": m, "clients": c, "tok_s": pooled_m["tok_s"], "none_tok_s": pooled_n["tok_s"],
                    "ratio": pooled_m["tok_s"] / pooled_n["tok_s"], "per_round": per_round, "itl_ratio": itl})
    return out


def cost_table(rows: list[dict]) -> list[str]:
    lines = ["| method | clients | tokens/s | none's | against none, pooled | each round | ITL p50 against none |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        rounds = ", ".join(f"{x - 1:+.1%}" for x in r["per_round"])
        itl = "" if r["itl_ratio"] is None else f"{r['itl_ratio']:.3f}x"
        lines.append(f"| {r['method']} | {r['clients']} | {r['tok_s']:.1f} | {r['none_tok_s']:.1f} | "
                     f"{r['ratio'] - 1:+.1%} | {rounds} | {itl} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    ms = lambda x: "" if x is None else f"{1000 * x:.0f}"  # noqa: E731
    num = lambda x, f: "" if x != x else format(x, f)  # noqa: E731  (NaN: not measured)
    lines = ["| method | clients | arrivals | tokens | wall s | tokens/s | x one at a time | TTFT p50 ms | "
             "TTFT p50 x idle | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['clients']} | {r.get('arrivals', 'at once')} | {r['tokens']} | "
                     f"{r['wall_s']:.1f} | {num(r['tok_s'], '.1f')} | {num(r['speedup'], '.2f')} | "
                     f"{ms(r['ttft_p50'])} | {num(r.get('ttft_x_idle', float('nan')), '.2f')} | {ms(r['ttft_p99'])} | "
                     f"{ms(r['itl_p50'])} | {ms(r['itl_p99'])} | {len(r['errors'])} |")
    return lines


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backend", default="hf", help="model backend of the server (default: hf, the embedded model)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter that runs prefsteer's commands (vLLM: .venv-vllm/bin/python)")
    p.add_argument("--embedder", default=None, help="prompt embedder (default: the CLI's)")
    p.add_argument("--model", default=os.environ.get("PREFSTEER_MODEL"),
                   help="model: a local path or hub name (default: $PREFSTEER_MODEL, else the embedded one)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the CLI's: float32 on a "
                   "CPU, bfloat16 on a GPU)")
    p.add_argument("--methods", nargs="+", default=["none", "exact", "cliper"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 32])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=None,
                   help="no end of turn before this many tokens (the requests' `min_tokens`; default: --max-tokens, "
                        "so that every answer has the same length, as vLLM's benchmarks' --ignore-eos; 0: answers "
                        "end where the model ends them)")
    p.add_argument("--spread-clients", nargs="*", type=int, default=[8],
                   help="numbers of clients also run with their arrivals spread over one answer's time, "
                        "two requests each (default: 8; none: leave out)")
    p.add_argument("--max-batch-rows", type=int, default=32, help="the server's --max-batch-rows")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of every (clients, method) row, pooled; the methods take turns at each number of "
                        "clients, in the reverse order every other round, so that a machine whose speed drifts "
                        "weighs on them alike")
    p.add_argument("--out", default=str(REPO / "results" / "serving"))
    p.add_argument("--offline-only", action="store_true",
                   help="only the offline batch: print its JSON (what the main run starts in a subprocess)")
    return p


def offline(args: argparse.Namespace) -> list[dict]:
    """In the engine's own process, without HTTP: for each client count, that many requests handed to
    ``Backend.stream`` at once (1: four requests one after another, as the server's 1-client row),
    each read by a thread of its own (the time to its first token and the gaps between tokens: the
    scheduler alone, with the server's work taken away); then the largest count's requests in one
    blocking generate call (the engine's own batch), last. Both paths are warmed up first, so that
    no row pays for the scheduler's start."""
    from prefsteer.backends import load_backend
    from prefsteer.backends.base import GenerationConfig, user_turn

    opts = {k: v for k, v in (("model", args.model), ("dtype", args.dtype)) if v}
    backend = load_backend(args.backend, **opts)
    warm = GenerationConfig(max_new_tokens=8)
    backend.generate([user_turn("Say hello.")], warm)  # warm-up: the blocking path, then the scheduler
    list(backend.stream(user_turn("Say hi."), warm))
    cfg = GenerationConfig(max_new_tokens=args.max_tokens, min_new_tokens=args.min_tokens)
    rows = []

    def read(arrivals: list[float], stream, t0: float) -> None:
        for _ in stream:
            arrivals.append(time.perf_counter() - t0)
    for n in args.clients:
        # n requests at once; 1 client: 4 requests one after another, as the server's 1-client row
        waves = [[p] for p in prompts(4, "engine 1")] if n == 1 else [prompts(n, f"engine {n}")]
        arrivals: list[list[float]] = []
        wall = 0.0
        for wave in waves:
            got: list[list[float]] = [[] for _ in wave]
            t0 = time.perf_counter()
            threads = [threading.Thread(target=read, args=(got[i], backend.stream(user_turn(p), cfg), t0))
                       for i, p in enumerate(wave)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall += time.perf_counter() - t0
            arrivals += got
        tokens = sum(len(a) for a in arrivals)
        gaps = [b - a for xs in arrivals for a, b in zip(xs, xs[1:])]
        firsts = [a[0] for a in arrivals if a]
        rows.append({"method": "none (engine, no HTTP)", "clients": n, "requests": len(arrivals), "errors": [],
                     "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": pct(firsts, 0.5),
                     "ttft_p99": pct(firsts, 0.99), "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99)})
    n = max(args.clients)
    t0 = time.perf_counter()
    gens = backend.generate([user_turn(p) for p in prompts(n, "batch")], cfg)
    wall = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    rows.append({"method": "none (offline batch)", "clients": n, "requests": n, "errors": [], "tokens": tokens,
                 "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": None, "ttft_p99": None, "itl_p50": None,
                 "itl_p99": None})
    backend.close()
    return rows


def machine() -> str:
    """The machine in words: its GPU where the engine has one, its CPU cores, their vector
    instructions (torch's kernels: AVX2, AVX512) and the load."""
    import torch

    gpu = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; " if torch.cuda.is_available() else ""
    return (f"{gpu}{os.cpu_count()} CPU cores, {torch.backends.cpu.get_cpu_capability()} "
            f"({platform.platform()}); load average {os.getloadavg()[0]:.1f} at the end")


def main(args: argparse.Namespace) -> int:
    if args.offline_only:
        for row in offline(args):  # one JSON object per line, the offline batch last
            print(json.dumps(row))
        return 0
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="prefsteer-serving-"))
    db, lib_file = tmp / "memory.db", tmp / "attributes.json"
    from prefsteer.attributes import load_library

    names = ["Concise", "Formal", "Humor", "Direct", "Vivid", "Easy"]
    lib_file.write_text(json.dumps({"name": "serving", "attributes": [
        {"name": a.name, "description": a.description} for a in load_library().attributes if a.name in names]}))
    cli = [args.python, "-m", "prefsteer.cli"]
    common = ["--backend", args.backend, "--db", str(db), "--attributes-file", str(lib_file),
              *(["--embedder", args.embedder] if args.embedder else []),
              *(["--model", args.model] if args.model else []), *(["--dtype", args.dtype] if args.dtype else [])]
    if "exact" in args.methods:
        r = subprocess.run([*cli, "index", *common, "--method", "exact", "--k", "2", "--data", str(DEMO),
                            "--user", "maya", "--json", "--quiet"], cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"prefsteer index failed ({r.returncode}): {r.stderr[-2000:]}")
    port, log = free_port(), tmp / "serve.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_process([*cli, "serve", *common, "--k", "2", "--no-auth", "--host", "127.0.0.1", "--port", str(port),
                          "--max-batch-rows", str(args.max_batch_rows), "--log-level", "warning"], log)
    extras = {"none": {"method": "none"}, "exact": {"method": "exact", "user_id": "maya"},
              "cliper": {"method": "cliper", "prefs": "concise=1"}}
    rows: list[dict] = []
    runs: dict[tuple[str, int], list[dict]] = {}
    n_max = max([*args.clients, *args.spread_clients])
    client = httpx.Client(base_url=base, timeout=1800,
                          limits=httpx.Limits(max_connections=n_max, max_keepalive_connections=n_max))
    try:
        wait_http(base, proc, log, timeout=900)
        model = client.get("/v1/models").json()["data"][0]["id"]
        for m in args.methods:
            stream_one(client, model, "Say hello.", extras[m], 8)  # warm-up (loads, first-call costs)
        for c in args.clients:
            for rnd in range(args.rounds):
                for m in (args.methods if rnd % 2 == 0 else args.methods[::-1]):
                    runs.setdefault((m, c), []).append(run_level(client, model, extras[m], c, args.max_tokens,
                                                                 args.min_tokens, f"{m} {c} {rnd}"))
        # arrivals spread over one answer's time (each method's own, from its 1-client row)
        alone = {m: sum(r["seconds"] for run in runs[(m, 1)] for r in run["results"] if "seconds" in r)
                 / max(1, sum(len(run["results"]) for run in runs[(m, 1)])) for m in args.methods if (m, 1) in runs}
        for c in args.spread_clients if alone else []:
            for rnd in range(args.rounds):
                for m in (args.methods if rnd % 2 == 0 else args.methods[::-1]):
                    runs.setdefault((m, -c), []).append(run_spread(client, model, extras[m], c, args.max_tokens,
                                                                   args.min_tokens, f"{m} {c} spread {rnd}", alone[m]))
        for m in args.methods:
            one = idle = None
            for c in [*args.clients, *(-c for c in args.spread_clients if (m, -c) in runs)]:
                row = {"method": m, **summarize(abs(c), runs[(m, c)])}
                if c < 0:
                    row["arrivals"] = "spread"
                one = one or (row["tok_s"] if c == 1 else None)
                idle = idle or (row["ttft_p50"] if c == 1 else None)
                row["speedup"] = row["tok_s"] / one if one else float("nan")
                row["ttft_x_idle"] = row["ttft_p50"] / idle if idle and row["ttft_p50"] else float("nan")
                rows.append(row)
                print(table([row])[-1], file=sys.stderr, flush=True)
    finally:
        client.close()
        stop_process(proc)
    if "none" in args.methods:  # the engine's own batch, with the server gone
        r = subprocess.run([args.python, __file__, "--offline-only", "--backend", args.backend, "--clients",
                            *map(str, args.clients), "--max-tokens", str(args.max_tokens),
                            "--min-tokens", str(args.min_tokens),
                            *(["--model", args.model] if args.model else []),
                            *(["--dtype", args.dtype] if args.dtype else [])],
                           cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the offline batch failed ({r.returncode}): {r.stderr[-2000:]}")
        one = next(x["tok_s"] for x in rows if x["method"] == "none" and x["clients"] == 1)
        engine = [json.loads(line) for line in r.stdout.strip().splitlines() if line.startswith("{")]
        idle = next((x["ttft_p50"] for x in engine if x["clients"] == 1 and x["ttft_p50"]), None)
        for row in engine:  # the engine's own rows: TTFT against the engine's own idle figure
            rows.append({**row, "speedup": row["tok_s"] / one,
                         "ttft_x_idle": row["ttft_p50"] / idle if idle and row["ttft_p50"] else float("nan")})
    cond = {"backend": args.backend, "model": model, "max_tokens": args.max_tokens,
            "min_tokens": args.min_tokens, "rounds": args.rounds, "greedy": True,
            "max_batch_rows": args.max_batch_rows, "methods": args.methods, "clients": args.clients,
            "machine": machine(), "dtype": args.dtype or "the CLI's default", "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/serving_speed.py " + " ".join(sys.argv[1:]),
            "total_s": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paired = costs(runs, args.methods)
    (out / f"{args.backend}.json").write_text(json.dumps({"conditions": cond, "rows": rows, "costs": paired},
                                                         indent=2) + "\n")
    md = [f"# Streamed serving, `--backend {args.backend}` ({model})", "", *table(rows), "",
          "Each row: that many clients send one streamed request each at the same moment (distinct prompts, "
          f"greedy, max_tokens {args.max_tokens}, min_tokens {args.min_tokens}); the 1-client row sends 4 "
          f"requests one after another, the figure `x one at a time` divides by. Each row pools {args.rounds} "
          "runs; at each number of clients the methods take turns (reversed every other round). tokens/s: "
          "`usage.completion_tokens` summed over the wall time. TTFT: time to the first text chunk; ITL: the gap "
          "between text chunks (one token each, except where a piece waits for the rest of a character). "
          "`TTFT p50 x idle`: against the method's 1-client row (the engine's rows: against the engine's own). "
          "The clients are threads of the benchmark's process sharing one HTTP client, whose connections are "
          "kept and reused: no request pays for setting up a client (about 20 ms of this CPU for httpx's TLS "
          "context) on the cores the server runs on.", "",
          "Arrivals `spread`: the clients do not all send at one moment; client i starts at i/n of the time one "
          "request takes alone (the method's 1-client row) and sends two requests one after the other, so "
          "requests arrive one by one into a batch that is already decoding, as a steady flow of users makes "
          "them. Its wall time includes that ramp, so its tokens/s is not comparable with the `at once` rows.", "",
          *(["## What personalization costs", "", *cost_table(paired), "",
             "Each method's tokens/s against `none`'s at the same number of clients: pooled over the rounds, "
             "and within each round, where the methods took turns (a drift of the machine's speed from round "
             "to round moves them alike; what is left of the spread is the noise of one run).", ""]
            if paired else []),
          f"Conditions: {cond['machine']}; dtype {cond['dtype']}; {cond['date']}; the whole run {cond['total_s'] / 60:.1f} min; "
          f"`{cond['command'].strip()}`.", ""]
    (out / f"{args.backend}.md").write_text("\n".join(md))
    print("\n".join(table(rows)))
    if paired:
        print("\n".join(["", *cost_table(paired)]))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    args = make_parser().parse_args()
    args.min_tokens = args.max_tokens if args.min_tokens is None else args.min_tokens
    sys.exit(main(args))
