"""Load and correctness under concurrency for `prefsteer serve`: a bounded asyncio + httpx load test
on loopback.

Starts `prefsteer serve` (a subprocess on a free 127.0.0.1 port, stopped at the end) with two
tenants' keys, then runs --clients concurrent clients for --seconds, half per tenant. Both tenants
have users with the *same* ids, so a leak would show. Each client loops, drawing a request:
chat (personalized by its user, --chat-tokens tokens), feedback (one new pair, sometimes re-sending
a pair it sent before), or a profile read. Every pair's text carries a marker naming its tenant.

Reported: requests/s, p50/p99 latency per endpoint, errors. Then checked, after the queued feedback
is indexed: every accepted pair is in the memory exactly once (pairs table) with exactly one memory
entry, no pair is there that was not accepted, and no response to tenant A contains a marker of
tenant B (or the reverse). Writes results/service/load.md and load.json.

    .venv/bin/python benchmarks/service_load.py                          # 32 clients, 2 minutes, fake model
    .venv/bin/python benchmarks/service_load.py --seconds 20 --clients 8 # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TENANTS = ("A", "B")
USERS = ("alice", "bob", "chen", "dara")  # the same ids in both tenants
TOPICS = ["boil an egg", "sleep better", "learn Spanish", "fix a flat tyre", "save money", "start running",
          "write a cover letter", "grow tomatoes", "clean a cast-iron pan", "prepare for an interview"]
MARK = re.compile(r"\[ref ([AB])-")

sys.path.insert(0, str(REPO))
from tests.test_service_helpers import free_port, start_process, stop_process, wait_http  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="how long the load runs (default: 120)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, half per tenant (default: 32)")
    p.add_argument("--backend", default="fake", help="the server's backend (default: fake)")
    p.add_argument("--embedder", default="hash", help="the server's embedder (default: hash)")
    p.add_argument("--chat-tokens", type=int, default=16, help="max_tokens of each chat request (default: 16)")
    p.add_argument("--mix", default="0.5,0.25,0.25", help="chat,feedback,profile shares (default: 0.5,0.25,0.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the request mix")
    p.add_argument("--out", default=str(REPO / "results" / "service"), help="where load.md and load.json go")
    p.add_argument("--drain-seconds", type=float, default=300.0, help="longest wait for the queued feedback")
    return p


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


class Stats:
    def __init__(self):
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.errors: list[str] = []
        self.leaks: list[str] = []
        self.accepted: dict[tuple[str, str], set[tuple[str, str, str]]] = defaultdict(set)  # (tenant, user) -> pairs
        self.sent_twice = 0


async def client(i: int, base: str, keys: dict, stats: Stats, deadline: float, args, rng: random.Random):
    import httpx

    tenant = TENANTS[i % 2]
    other = TENANTS[1 - i % 2]
    headers = {"Authorization": f"Bearer {keys[tenant]}"}
    shares = [float(x) for x in args.mix.split(",")]
    mine: list[dict] = []
    n = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as http:
        while time.monotonic() < deadline:
            user = rng.choice(USERS)
            kind = rng.choices(("chat", "feedback", "profile"), shares)[0]
            n += 1
            topic = rng.choice(TOPICS)
            if kind == "chat":
                path, body = "/v1/chat/completions", {
                    "model": args.model_id, "user": user, "max_tokens": args.chat_tokens,
                    "messages": [{"role": "user", "content": f"How do I {topic}, quickly?"}]}
            elif kind == "feedback":
                if mine and rng.random() < 0.1:  # a retry of a pair already sent: must be stored once
                    pair = rng.choice(mine)
                    stats.sent_twice += 1
                else:
                    tag = f"[ref {tenant}-{i}-{n}]"
                    pair = {"user": user, "prompt": f"How do I {topic}? {tag}",
                            "chosen": f"Short steps for {topic}. {tag}", "rejected": f"A long story about {topic}!! {tag}"}
                    mine.append(pair)
                user = pair["user"]
                path, body = f"/v1/users/{user}/feedback", {"pairs": [{k: pair[k] for k in ("prompt", "chosen", "rejected")}]}
            else:
                path, body = f"/v1/users/{user}/profile", None
            start = time.perf_counter()
            try:
                r = await (http.post(path, json=body) if body is not None else http.get(path))
            except Exception as e:  # a dropped connection or a timeout counts as an error
                stats.errors.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            stats.lat[kind].append(time.perf_counter() - start)
            stats.status[kind][r.status_code] += 1
            ok = r.status_code < 300 or (kind == "profile" and r.status_code == 404)  # no feedback yet
            if not ok:
                stats.errors.append(f"{kind} {r.status_code}: {r.text[:200]}")
            if any(m == other for m in MARK.findall(r.text)):
                stats.leaks.append(f"tenant {tenant} {kind} {path}: {r.text[:300]}")
            if kind == "feedback" and r.status_code == 202:
                stats.accepted[(tenant, user)].add((body["pairs"][0]["prompt"], body["pairs"][0]["chosen"],
                                                    body["pairs"][0]["rejected"]))


async def run_load(base: str, keys: dict, args) -> tuple[Stats, float]:
    stats = Stats()
    start = time.monotonic()
    deadline = start + args.seconds
    await asyncio.gather(*(client(i, base, keys, stats, deadline, args, random.Random(args.seed * 1000 + i))
                           for i in range(args.clients)))
    return stats, time.monotonic() - start


def check_memory(db: str, stats: Stats) -> dict:
    """Every accepted pair exactly once, with one entry; nothing else stored; jobs all done."""
    c = sqlite3.connect(db)
    problems: list[str] = []
    stored = defaultdict(list)
    for uid, prompt, chosen, rejected in c.execute("SELECT user_id, prompt, chosen, rejected FROM pairs"):
        stored[uid].append((prompt, chosen, rejected))
    accepted = {f"{t}/{u}": pairs for (t, u), pairs in stats.accepted.items()}
    n_acc = sum(len(v) for v in accepted.values())
    for uid, pairs in accepted.items():
        rows = stored.get(uid, [])
        for p in pairs:
            k = rows.count(p)
            if k != 1:
                problems.append(f"{uid}: pair {p[0]!r} stored {k} times")
        extra = set(rows) - pairs
        if extra:
            problems.append(f"{uid}: {len(extra)} stored pair(s) never accepted")
        tenant = uid.split("/", 1)[0]
        if any(m != tenant for row in rows for m in MARK.findall(" ".join(row))):
            problems.append(f"{uid}: holds another tenant's pair")
    for uid in set(stored) - set(accepted):
        problems.append(f"{uid}: pairs stored for a user that accepted none")
    entries = defaultdict(int)
    for uid, prompt in c.execute("SELECT user_id, prompt FROM entries"):
        entries[(uid, prompt)] += 1
    for uid, pairs in accepted.items():
        for p in pairs:
            if entries.get((uid, p[0]), 0) != 1:
                problems.append(f"{uid}: pair {p[0]!r} has {entries.get((uid, p[0]), 0)} entries")
    jobs = dict(c.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    c.close()
    return {"accepted_pairs": n_acc, "stored_pairs": sum(len(v) for v in stored.values()),
            "entries": sum(entries.values()), "jobs": jobs, "problems": problems[:50], "n_problems": len(problems)}


def wait_drained(base: str, timeout: float) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if httpx.get(base + "/health", timeout=10).json()["worker"]["pending_jobs"] == 0:
            break
        time.sleep(1)
    return time.monotonic() - start


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    r, cond = result, result["conditions"]
    lines = ["# prefsteer serve under load", "",
             f"Conditions: {cond['clients']} concurrent asyncio/httpx clients over 2 tenants (4 users each, the same "
             f"ids in both) for {cond['seconds']:.0f} s on loopback, one `prefsteer serve` process (uvicorn, 1 worker "
             f"process) with the **{cond['backend']}** backend and **{cond['embedder']}** embedder, chat max_tokens "
             f"{cond['chat_tokens']}, mix chat/feedback/profile {cond['mix']}; {cond['cpus']} CPU cores shared "
             f"with the clients ({cond['platform']}, Python {cond['python']}). With the fake model the numbers measure "
             "the service (HTTP, auth, SQLite, the feedback worker), not a language model.", "",
             "| endpoint | requests | requests/s | p50 (ms) | p99 (ms) | errors |", "|---|---:|---:|---:|---:|---:|"]
    for k, e in r["endpoints"].items():
        lines.append(f"| {k} | {e['requests']} | {e['rps']:.1f} | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} | {e['errors']} |")
    t = r["total"]
    lines.append(f"| **all** | {t['requests']} | {t['rps']:.1f} | | | {t['errors']} |")
    m = r["memory"]
    lines += ["", "Checks after the run (the queued feedback indexed in "
              f"{r['drain_seconds']:.1f} s):", "",
              f"- accepted feedback pairs: {m['accepted_pairs']} ({r['resent_pairs']} re-sent on purpose); "
              f"stored: {m['stored_pairs']}; memory entries: {m['entries']}; jobs: {m['jobs']}",
              f"- every accepted pair in the memory exactly once, with one entry, nothing else stored: "
              f"**{'yes' if m['n_problems'] == 0 else 'NO (' + str(m['n_problems']) + ' problems)'}**",
              f"- responses of one tenant holding the other tenant's data: **{r['leaks']}**",
              f"- errors (transport errors or unexpected statuses): **{t['errors']}**", "",
              "Reproduce: `.venv/bin/python benchmarks/service_load.py` (`--seconds`, `--clients` to shorten)."]
    (out / "load.md").write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    import httpx

    from prefsteer.storage import Memory
    from prefsteer.service import store

    tmp = Path(tempfile.mkdtemp(prefix="prefsteer-load-"))
    db = str(tmp / "memory.db")
    mem = Memory(db)
    keys = {t: mem.create_key(t)["key"] for t in TENANTS}
    mem.close()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "serve.log"
    proc = start_process([sys.executable, "-m", "prefsteer.cli", "serve", "--backend", args.backend,
                          "--embedder", args.embedder, "--db", db, "--port", str(port), "--log-level", "warning"],
                         log)
    try:
        wait_http(base, proc, log, timeout=300)
        args.model_id = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {keys['A']}"}).json()["data"][0]["id"]
        print(f"load: {args.clients} clients for {args.seconds:.0f}s against {base} ({args.backend})", file=sys.stderr)
        stats, elapsed = asyncio.run(run_load(base, keys, args))
        drain = wait_drained(base, args.drain_seconds)
    finally:
        stop_process(proc)
    memory = check_memory(db, stats)
    endpoints = {}
    names = {"chat": "POST /v1/chat/completions", "feedback": "POST /v1/users/{id}/feedback",
             "profile": "GET /v1/users/{id}/profile"}
    n_err = defaultdict(int)
    for e in stats.errors:
        n_err[e.split(" ", 1)[0].rstrip(":")] += 1
    for k, name in names.items():
        xs = stats.lat[k]
        endpoints[name] = {"requests": len(xs), "rps": len(xs) / elapsed, "p50_ms": 1000 * pct(xs, 0.5),
                           "p99_ms": 1000 * pct(xs, 0.99), "errors": n_err[k],
                           "statuses": {str(s): n for s, n in sorted(stats.status[k].items())}}
    total = sum(len(v) for v in stats.lat.values())
    result = {
        "conditions": {"clients": args.clients, "seconds": elapsed, "backend": args.backend, "embedder": args.embedder,
                       "chat_tokens": args.chat_tokens, "mix": args.mix, "cpus": os.cpu_count(),
                       "platform": platform.platform(), "python": platform.python_version(), "seed": args.seed},
        "endpoints": endpoints,
        "total": {"requests": total, "rps": total / elapsed, "errors": len(stats.errors)},
        "error_samples": stats.errors[:20], "leaks": len(stats.leaks), "leak_samples": stats.leaks[:5],
        "resent_pairs": stats.sent_twice, "drain_seconds": drain, "memory": memory,
    }
    write(Path(args.out), result)
    print((Path(args.out) / "load.md").read_text())
    ok = not stats.leaks and memory["n_problems"] == 0 and not stats.errors
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
