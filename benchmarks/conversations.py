"""One multi-turn conversation answered by every method through `prefsteer serve` and the openai client.

One user's pairs (default: the demo user maya, 5 pairs, who prefers short answers) are indexed with
each of base, exact, exact-global, cliper, drift and reward by `prefsteer index` subprocesses, on a
small attribute library (``--attributes``, six of EXACT's 42) and EXACT with ``--k 2``, so the whole
run fits in minutes on two CPU cores. `prefsteer serve --no-auth` then runs on a free loopback port
with the same library and EXACT options (a method serves the state it was fitted under), and the
openai client sends one conversation (a system prompt, three user turns, two assistant turns) with
``extra_body={"prefsteer": {"user_id": U, "method": M}}`` for each method and none, greedy, plus
CLIPer without a user (``"prefs": "concise=1"``). Drift, reward and CLIPer are indexed with their
default options (`prefsteer serve` takes the same method options as `index`; a state is served
only under the options it was fitted with).

Writes results/conversations/conversations.json (each answer, the service's prefsteer info, usage,
wall seconds, the indexing runs) and README.md (the table and the conditions), and prints the table.

    .venv/bin/python benchmarks/conversations.py                  # embedded SmolLM2-135M, ~10 min
    .venv/bin/python benchmarks/conversations.py --backend fake --embedder hash   # a quick dry run
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_service_helpers import free_port, start_process, stop_process, wait_http  # noqa: E402

DEMO = REPO / "src" / "prefsteer" / "resources" / "demo_pairs.jsonl"
FITTED = ["base", "exact", "exact-global", "cliper", "drift", "reward"]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "I want to get fit."},
    {"role": "assistant", "content": "Great goal. Do you prefer running or the gym?"},
    {"role": "user", "content": "Running. How do I start?"},
    {"role": "assistant", "content": "Start slowly, a few times a week."},
    {"role": "user", "content": "And what shoes should I buy?"},
]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backend", default="hf", help="model backend (default: hf, the embedded SmolLM2-135M)")
    p.add_argument("--embedder", default=None, help="prompt embedder (default: the CLI's, all-MiniLM-L6-v2)")
    p.add_argument("--data", default=str(DEMO), help="pairs file (default: the packaged demo pairs)")
    p.add_argument("--user", default="maya", help="the user whose pairs are indexed (default: maya)")
    p.add_argument("--attributes", nargs="+", default=["Concise", "Formal", "Humor", "Direct", "Vivid", "Easy"],
                   help="the attribute library: these of EXACT's 42 (EXACT, exact-global and drift use it)")
    p.add_argument("--k", type=int, default=2, help="EXACT's attributes per pair (default: 2)")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each answer (default: 48)")
    p.add_argument("--out", default=str(REPO / "results" / "conversations"), help="where the results go")
    p.add_argument("--keep", action="store_true", help="keep the run's memory and server log (a temporary folder)")
    return p


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | wall s | generation s | prompt tokens | completion tokens | answer (first 80 chars) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['wall_s']:.1f} | | | | error {r['error'][:75]} |")
            continue
        gen = (r["prefsteer"] or {}).get("timings", {}).get("generation")
        text = " ".join(r["text"].split())[:80].replace("|", "\\|")
        lines.append(f"| {r['method']} | {r['wall_s']:.1f} | {'' if gen is None else f'{gen:.1f}'} | "
                     f"{r['usage']['prompt_tokens']} | {r['usage']['completion_tokens']} | {text} |")
    return lines


def report(result: dict) -> str:
    """README.md of a run (its conversations.json, read back)."""
    c, indexed = result["conditions"], result["indexed"]
    idx = ", ".join(f"{m} {v['wall_s']:.0f}" for m, v in indexed.items())
    lines = ["# One conversation, every method, through `prefsteer serve` and the openai client", "",
             "A system prompt and three user turns (two assistant turns between), answered by each method for "
             f"user `{c['user']}` (`{c['data']}`), through the OpenAI-compatible service with "
             "`extra_body={\"prefsteer\": {\"user_id\": ..., \"method\": ...}}`; the last row is CLIPer without "
             "a user (`\"prefs\": \"concise=1\"`). Full answers and the service's `prefsteer` info (attributes, "
             "retrieved memory, timings) are in conversations.json.", "", *table(result["answers"]), "",
             "Prompt tokens are the service's `usage.prompt_tokens`: the context the model read, the request's "
             "messages with what the method added to them (Base's history in the system prompt, EXACT's "
             "attribute sentence); Drift's attribute branches and Reward's other candidates are extra compute "
             "beside that context, not counted.", "",
             "Conditions:", "",
             f"- model: {c['model']} (`--backend {c['backend']}`), embedder: {c['embedder']}; greedy "
             f"(temperature 0), max_tokens {c['max_tokens']}, one request at a time after one warm-up request",
             f"- attribute library: {', '.join(c['attributes'])} (EXACT, exact-global: k={c['exact_k']}; drift: all "
             "of them); base, cliper, drift and reward at their defaults",
             f"- indexing (`prefsteer index`, one process per method, model load included), wall s: {idx}",
             f"- machine: {c['machine']}",
             f"- date: {c['date']}; whole run {c['total_s'] / 60:.1f} min",
             f"- command: `{c['command'].strip()}`", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from openai import APIStatusError, OpenAI

    from prefsteer.attributes import load_library

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="prefsteer-conversations-"))
    db, lib_file = tmp / "memory.db", tmp / "attributes.json"
    lib = load_library()
    lib_file.write_text(json.dumps({"name": "conversations", "attributes": [
        {"name": a.name, "description": a.description} for a in lib.attributes if a.name in args.attributes]}))
    cli = [sys.executable, "-m", "prefsteer.cli"]
    common = ["--backend", args.backend, "--db", str(db), "--attributes-file", str(lib_file),
              *(["--embedder", args.embedder] if args.embedder else [])]
    exact_opts = ["--k", str(args.k)]

    # 1. index the user's pairs with every method that learns (each its own process, as a user would)
    indexed = {}
    for m in FITTED:
        cmd = [*cli, "index", *common, "--method", m, "--data", args.data, "--user", args.user, "--json", "--quiet",
               *(exact_opts if m.startswith("exact") else [])]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"prefsteer index --method {m} failed ({r.returncode}): {r.stderr[-2000:]}")
        indexed[m] = {"wall_s": round(time.perf_counter() - t0, 1), "report": json.loads(r.stdout)}
        print(f"indexed {m}: {indexed[m]['wall_s']:.1f}s", file=sys.stderr, flush=True)

    # 2. the service, on a free loopback port, with the same library and EXACT options
    port, log = free_port(), tmp / "serve.log"
    base = f"http://127.0.0.1:{port}"
    serve = [*cli, "serve", *common, *exact_opts, "--no-auth", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"]
    proc = start_process(serve, log)
    rows = []
    try:
        wait_http(base, proc, log, timeout=600)
        client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=900, max_retries=0)
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=CONVERSATION[-1:], max_tokens=4, temperature=0)  # warm-up

        # 3. the conversation, once per method
        asks = [("none", {"method": "none"})] + [(m, {"user_id": args.user, "method": m}) for m in FITTED]
        asks.append(("cliper (no user)", {"method": "cliper", "prefs": "concise=1"}))
        for label, extra in asks:
            t0 = time.perf_counter()
            try:
                resp = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=args.max_tokens,
                                                      temperature=0, extra_body={"prefsteer": extra})
            except APIStatusError as e:  # recorded, not fatal: the other methods still answer
                rows.append({"method": label, "request": extra, "wall_s": round(time.perf_counter() - t0, 2),
                             "error": f"{e.status_code}: {e.message}"[:300]})
                print(f"{label}: error {rows[-1]['error']}", file=sys.stderr, flush=True)
                continue
            wall = time.perf_counter() - t0
            d = resp.to_dict()
            rows.append({"method": label, "request": extra, "wall_s": round(wall, 2),
                         "text": d["choices"][0]["message"]["content"],
                         "finish_reason": d["choices"][0]["finish_reason"],
                         "usage": d["usage"], "prefsteer": d.get("prefsteer")})
            print(f"{label}: {wall:.1f}s", file=sys.stderr, flush=True)
    finally:
        stop_process(proc)
    total = time.perf_counter() - started

    # 4. the results
    cond = {"backend": args.backend, "model": model, "embedder": args.embedder or "the CLI's default",
            "user": args.user, "data": os.path.relpath(args.data, REPO), "attributes": args.attributes,
            "exact_k": args.k, "max_tokens": args.max_tokens, "greedy": True,
            "machine": f"{os.cpu_count()} shared CPU cores ({platform.platform()}), load average "
                       f"{os.getloadavg()[0]:.1f} at the end", "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/conversations.py " + " ".join(sys.argv[1:]), "total_s": round(total, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"conditions": cond, "conversation": CONVERSATION, "indexed": indexed, "answers": rows}
    (out / "conversations.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "README.md").write_text(report(result))
    print("\n".join(table(rows)))
    print(f"total {total:.0f}s; wrote {out / 'README.md'} and conversations.json")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
