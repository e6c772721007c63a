"""Many replicas, one memory: `prefsteer serve` replicas on one PostgreSQL database, under load and
when one of them is killed; the fairness of the feedback queue between tenants; the edge (huge
bodies, wrong keys).

Three parts (``--only`` runs one; the others' results in replicas.json are kept):

replicas   Two `serve` replicas (subprocesses on free 127.0.0.1 ports) share one PostgreSQL
           database. --clients asyncio/httpx clients, half per tenant (the same user ids in both),
           send a mixed load for --seconds: chat (max_tokens --chat-tokens), feedback (1-3 new pairs,
           every prompt distinct and starting with its tenant's mark "[A-" or "[B-") and profile
           reads, each request to the next replica in turn. Half way through, replica 1 is SIGKILLed
           and started again on its port: a request it refuses (connection refused) or drops (in
           flight when it died) is counted apart and sent again to the other replica. Then, once
           every job is done (at most --drain-seconds): every accepted pair is stored and indexed
           exactly once (each user's profile: `pairs` and its entries equal the pairs accepted), no
           job indexed a pair twice (the jobs table: `done` equals its pairs), the jobs the killed
           replica held were taken over, and no answer to one tenant holds the other's mark. Beside
           it, the same load with no kill on 1 replica on PostgreSQL and 1 on SQLite: the cost of
           the network database (their throughput and p50 compared).
fairness   One replica on PostgreSQL: tenant A queues --fairness-pairs pairs (requests of 100),
           then tenant B sends 1 pair, three times while A's backlog lasts; B's wait from its 202
           to its job done, and A's pairs indexed meanwhile (the claim: B waits for the pair in
           flight, not for A's backlog); A's total time.
edge       One replica (SQLite, default limits): its RSS before and after 20 chunked 200 MB bodies
           sent with no key on raw sockets (the server should answer 413 once 2 MB are read and
           close), the bytes each send got through; then 500 requests with a wrong key as fast as
           one client can: how many 401 and how many 429 (with Retry-After).

Writes results/replicas/replicas.json and README.md (the tables and their conditions; a section
"## What it means" already in README.md is kept) and the servers' logs under results/replicas/logs/.

    .venv/bin/python benchmarks/replicas.py                            # all, ~12 min on 2 cores
    .venv/bin/python benchmarks/replicas.py --only replicas --seconds 20 --clients 8   # a quick look
    .venv/bin/python benchmarks/replicas.py --only edge
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TENANTS = ("A", "B")
USERS = ("alice", "bob", "chen", "dara")  # the same ids in both tenants: a leak would show
TOPICS = ["boil an egg", "sleep better", "learn Spanish", "fix a flat tyre", "save money", "start running",
          "write a cover letter", "grow tomatoes", "clean a cast-iron pan", "prepare for an interview"]
MARK = re.compile(r"\[([AB])-\d+-\d+-\d+\]")  # a pair's mark: [tenant-client-request-pair]
KINDS = {"chat": "POST /v1/chat/completions", "feedback": "POST /v1/users/{id}/feedback",
         "profile": "GET /v1/users/{id}/profile"}
ATTEMPTS = 6  # tries of one request (alternating replicas) before it counts as failed
NOTES = "## What it means"

sys.path.insert(0, str(REPO))
from tests.test_service_helpers import free_port, stop_process, wait_http  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="duration of each load run (default: 120)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, half per tenant (default: 32)")
    p.add_argument("--only", choices=("replicas", "fairness", "edge"), help="run one part (default: all three)")
    p.add_argument("--out", default=str(REPO / "results" / "replicas"), help="where replicas.json and README.md go")
    p.add_argument("--chat-tokens", type=int, default=16, help="max_tokens of each chat request (default: 16)")
    p.add_argument("--mix", default="0.72,0.03,0.25",
                   help="chat,feedback,profile shares (default: 0.72,0.03,0.25: a worker indexes ~4-5 pairs/s of "
                        "the toy model on an idle machine and almost none under this load, so a larger feedback "
                        "share leaves a backlog that takes longer than --drain-seconds)")
    p.add_argument("--kill-at", type=float, default=0.5, help="when replica 1 is killed, a fraction of --seconds")
    p.add_argument("--drain-seconds", type=float, default=600.0, help="longest wait for the queued feedback (default: 600)")
    p.add_argument("--fairness-pairs", type=int, default=600, help="tenant A's backlog (default: 600)")
    p.add_argument("--edge-sends", type=int, default=20, help="chunked bodies sent (default: 20)")
    p.add_argument("--edge-mb", type=int, default=200, help="size of each chunked body in MB (default: 200)")
    p.add_argument("--wrong-key-requests", type=int, default=500, help="requests with a wrong key (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the request mix")
    return p


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# -- servers --------------------------------------------------------------------------------------

class Replica:
    """One `prefsteer serve` process on a fixed port; its log under ``logs`` (a new file per start)."""

    def __init__(self, name: str, db: str, logs: Path, extra: list[str]):
        self.name, self.db, self.logs, self.extra = name, db, logs, extra
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log: Path | None = None

    def start(self, timeout: float = 120.0) -> float:
        self.starts += 1
        self.log = self.logs / f"{self.name}{'' if self.starts == 1 else f'-start{self.starts}'}.log"
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefsteer.cli", "serve", "--backend", "fake", "--embedder", "hash",
             "--db", self.db, "--port", str(self.port), "--log-level", "warning", *self.extra],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
        wait_http(self.base, self.proc, self.log, timeout=timeout)
        return time.monotonic() - t0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def scrape(self, name: str) -> float | None:
        """A metric's value (summed over its labels) from /metrics; None when it does not answer.
        /metrics is rate limited like any route: after a 429 it waits its Retry-After once."""
        import httpx

        try:
            r = httpx.get(self.base + "/metrics", timeout=10)
            if r.status_code == 429:
                time.sleep(float(r.headers.get("retry-after", 1)))
                r = httpx.get(self.base + "/metrics", timeout=10)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        text = r.text
        vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"]
        return sum(vals) if vals else 0.0


class Db:
    """Reads of the service's tables, from PostgreSQL (psycopg) or SQLite, outside the service."""

    def __init__(self, url: str):
        self.pg = url.startswith("postgresql://")
        if self.pg:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
        else:
            self.conn = sqlite3.connect(url, timeout=60)

    def rows(self, sql: str) -> list[tuple]:
        return self.conn.execute(sql).fetchall()

    def jobs(self) -> list[dict]:
        cols = ("job_id", "tenant", "user_id", "status", "pair_ids", "done", "owner", "created", "started",
                "finished", "error")
        out = [dict(zip(cols, r)) for r in self.rows(f"SELECT {', '.join(cols)} FROM jobs")]
        for j in out:
            j["pair_ids"] = json.loads(j["pair_ids"])
        return out

    def pending(self) -> int:
        return self.rows("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")[0][0]

    def close(self) -> None:
        self.conn.close()


def make_keys(db: str) -> dict[str, str]:
    from prefsteer.storage import Memory

    mem = Memory(db)
    try:
        return {t: mem.create_key(t)["key"] for t in TENANTS}
    finally:
        mem.close()


# -- 1. replicas under load and failure ---------------------------------------------------------

class Load:
    """One load run's counts; ``replicas`` are the servers the clients take turns on."""

    def __init__(self, replicas: list[Replica], keys: dict, args, model: str, deadline: float):
        self.replicas, self.keys, self.args, self.model, self.deadline = replicas, keys, args, model, deadline
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.by_replica: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []
        self.n_errors: dict[str, int] = defaultdict(int)
        self.refused: dict[str, int] = defaultdict(int)  # connection refused by the killed replica
        self.dropped: dict[str, int] = defaultdict(int)  # in flight on it when it died
        self.failed = 0  # requests that got no answer in ATTEMPTS tries
        self.leaks: list[str] = []
        self.accepted: dict[tuple[str, str], set[str]] = defaultdict(set)  # (tenant, user) -> prompts (202)
        self.unsure: dict[tuple[str, str], set[str]] = defaultdict(set)  # sent, never answered 202
        self.killed: str | None = None
        self.kill_t: float | None = None
        self.back_t: float | None = None

    def in_kill_window(self, rep: Replica, start: float, end: float) -> bool:
        return (rep.name == self.killed and self.kill_t is not None and end >= self.kill_t - 0.05
                and (self.back_t is None or start <= self.back_t + 1.0))

    async def send(self, http, i: int, turn: list[int], kind: str, method: str, path: str, body):
        import httpx

        for _ in range(ATTEMPTS):
            rep = self.replicas[turn[0] % len(self.replicas)]
            turn[0] += 1
            start, t0 = time.monotonic(), time.perf_counter()
            try:
                r = await http.request(method, rep.base + path, json=body)
            except httpx.TransportError as e:
                if self.in_kill_window(rep, start, time.monotonic()):
                    (self.refused if isinstance(e, httpx.ConnectError) else self.dropped)[kind] += 1
                else:
                    self.n_errors[kind] += 1
                    self.errors.append(f"{kind} to {rep.name}: {type(e).__name__}: {e}")
                continue  # the next try goes to the other replica
            self.lat[kind].append(time.perf_counter() - t0)
            self.status[kind][r.status_code] += 1
            self.by_replica[rep.name] += 1
            return r
        self.failed += 1
        return None

    async def client(self, i: int) -> None:
        import httpx

        tenant, other = TENANTS[i % 2], TENANTS[1 - i % 2]
        rng = random.Random(self.args.seed * 1000 + i)
        shares = [float(x) for x in self.args.mix.split(",")]
        turn = [i]  # round robin over the replicas, clients starting on different ones
        n = 0
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {self.keys[tenant]}"}, timeout=60) as http:
            while time.monotonic() < self.deadline:
                n += 1
                user, topic = rng.choice(USERS), rng.choice(TOPICS)
                kind = rng.choices(list(KINDS), shares)[0]
                if kind == "chat":
                    method, path, body = "POST", "/v1/chat/completions", {
                        "model": self.model, "user": user, "max_tokens": self.args.chat_tokens,
                        "messages": [{"role": "user", "content": f"How do I {topic}, quickly?"}]}
                elif kind == "feedback":
                    pairs = []
                    for j in range(rng.randint(1, 3)):
                        mark = f"[{tenant}-{i}-{n}-{j}]"
                        pairs.append({"prompt": f"{mark} How do I {topic}?", "chosen": f"Short steps for {topic}. {mark}",
                                      "rejected": f"A long story about {topic}!! {mark}"})
                    method, path, body = "POST", f"/v1/users/{user}/feedback", {"pairs": pairs}
                else:
                    method, path, body = "GET", f"/v1/users/{user}/profile", None
                r = await self.send(http, i, turn, kind, method, path, body)
                prompts = [p["prompt"] for p in body["pairs"]] if kind == "feedback" else []
                if r is None:
                    self.unsure[(tenant, user)].update(prompts)
                    continue
                ok = r.status_code < 300 or (kind == "profile" and r.status_code == 404)  # no feedback yet
                if not ok:
                    self.n_errors[kind] += 1
                    self.errors.append(f"{kind} {r.status_code}: {r.text[:200]}")
                if any(m == other for m in MARK.findall(r.text)):
                    self.leaks.append(f"tenant {tenant} {kind} {path}: {r.text[:300]}")
                if kind == "feedback":
                    (self.accepted if r.status_code == 202 else self.unsure)[(tenant, user)].update(prompts)

    def summary(self, elapsed: float) -> dict:
        endpoints = {}
        for k, name in KINDS.items():
            xs = self.lat[k]
            endpoints[name] = {"requests": len(xs), "rps": len(xs) / elapsed,
                               "p50_ms": 1000 * pct(xs, 0.5) if xs else None,
                               "p99_ms": 1000 * pct(xs, 0.99) if xs else None, "errors": self.n_errors[k],
                               "refused_in_kill": self.refused[k], "dropped_in_kill": self.dropped[k],
                               "statuses": {str(s): n for s, n in sorted(self.status[k].items())}}
        total = sum(len(v) for v in self.lat.values())
        return {"seconds": elapsed, "endpoints": endpoints,
                "total": {"requests": total, "rps": total / elapsed, "errors": sum(self.n_errors.values()),
                          "refused_in_kill": sum(self.refused.values()), "dropped_in_kill": sum(self.dropped.values()),
                          "failed_after_retries": self.failed},
                "by_replica": dict(self.by_replica), "error_samples": self.errors[:20],
                "leaks": len(self.leaks), "leak_samples": self.leaks[:5],
                "accepted_pairs": sum(len(v) for v in self.accepted.values()),
                "unsure_pairs": sum(len(v - self.accepted[k]) for k, v in self.unsure.items())}


async def killer(load: Load, rep: Replica, db: Db, at: float, out: dict) -> None:
    """SIGKILL ``rep`` at ``at`` seconds into the load and start it again on its port."""
    await asyncio.sleep(at)
    out["pairs_indexed_before_kill"] = await asyncio.to_thread(rep.scrape, "prefsteer_pairs_indexed_total")
    pid = rep.pid
    load.killed = rep.name
    rep.kill()
    load.kill_t, out["killed_wall"] = time.monotonic(), time.time()
    out["killed_at_s"] = load.kill_t - (load.deadline - load.args.seconds)
    out["killed_pid"] = pid
    held = await asyncio.to_thread(db.rows, "SELECT job_id, user_id, done, pair_ids FROM jobs WHERE "
                                            f"status='running' AND owner LIKE '%:{pid}:%'")
    out["orphaned_jobs"] = [{"job_id": j, "user_id": u, "done": d, "pairs": len(json.loads(p))} for j, u, d, p in held]
    out["restart_seconds"] = await asyncio.to_thread(rep.start)
    load.back_t = time.monotonic()


async def run_load(replicas: list[Replica], keys: dict, args, db: Db | None = None, kill: bool = False):
    import httpx

    model = httpx.get(replicas[0].base + "/v1/models", headers={"Authorization": f"Bearer {keys['A']}"},
                      timeout=30).json()["data"][0]["id"]
    start = time.monotonic()
    load = Load(replicas, keys, args, model, start + args.seconds)
    kill_info: dict = {}
    tasks = [load.client(i) for i in range(args.clients)]
    if kill:
        tasks.append(killer(load, replicas[0], db, args.seconds * args.kill_at, kill_info))
    await asyncio.gather(*tasks)
    return load, time.monotonic() - start, kill_info


def drain(db: Db, timeout: float) -> tuple[float, int]:
    start = time.monotonic()
    while (left := db.pending()) and time.monotonic() - start < timeout:
        time.sleep(1)
    return time.monotonic() - start, left


def check_memory(load: Load, db: Db, base: str, keys: dict) -> dict:
    """Every accepted pair stored and indexed once (through the profiles), every job's `done` equal
    to its pairs, no entry of one tenant in the other's profiles."""
    import httpx

    problems: list[str] = []
    users = {}
    jobs = db.jobs()
    # the prompts of pairs still to index (in a job queued or running): not indexed yet, not lost
    todo = {(j["user_id"], pid) for j in jobs if j["status"] in ("queued", "running") for pid in j["pair_ids"][j["done"]:]}
    waiting = {p for u, p, pid in db.rows("SELECT user_id, prompt, pair_id FROM pairs") if (u, pid) in todo}
    not_yet = 0
    for tenant in TENANTS:
        for user in USERS:
            acc = load.accepted.get((tenant, user), set())
            unsure = load.unsure.get((tenant, user), set()) - acc
            r = httpx.get(f"{base}/v1/users/{user}/profile", headers={"Authorization": f"Bearer {keys[tenant]}"},
                          timeout=120)
            if r.status_code == 404 and not acc:
                users[f"{tenant}/{user}"] = {"accepted": 0, "pairs": 0, "entries": 0}
                continue
            if r.status_code != 200:
                problems.append(f"{tenant}/{user}: profile {r.status_code}: {r.text[:200]}")
                continue
            prof = r.json()
            prompts = [e["prompt"] for e in prof["entries"]]
            users[f"{tenant}/{user}"] = {"accepted": len(acc), "pairs": prof["pairs"], "entries": len(prompts),
                                         "unsure": len(unsure)}
            if len(prompts) != len(set(prompts)):
                problems.append(f"{tenant}/{user}: {len(prompts) - len(set(prompts))} prompt(s) with two entries")
            if missing := acc - set(prompts):
                lost = missing - waiting
                if lost:
                    problems.append(f"{tenant}/{user}: {len(lost)} accepted pair(s) without an entry and in no "
                                    f"pending job, e.g. {min(lost)!r}")
                not_yet += len(missing) - len(lost)
            if extra := set(prompts) - acc - unsure:
                problems.append(f"{tenant}/{user}: {len(extra)} entries never accepted, e.g. {min(extra)!r}")
            if prof["pairs"] != len(prompts) + len((acc & waiting) - set(prompts)):
                problems.append(f"{tenant}/{user}: profile pairs {prof['pairs']} != entries {len(prompts)}")
            if bad := [p for p in prompts if not p.startswith(f"[{tenant}-")]:
                problems.append(f"{tenant}/{user}: {len(bad)} entries of another tenant, e.g. {bad[0]!r}")
    statuses: dict[str, int] = defaultdict(int)
    for j in jobs:
        statuses[j["status"]] += 1
        if j["status"] == "done" and j["done"] != len(j["pair_ids"]):
            problems.append(f"job {j['job_id']} ({j['user_id']}): done {j['done']} of {len(j['pair_ids'])} pairs")
        if j["status"] == "failed":
            problems.append(f"job {j['job_id']} ({j['user_id']}) failed: {j['error']}")
        if j["user_id"].split("/", 1)[0] != j["tenant"]:
            problems.append(f"job {j['job_id']}: tenant {j['tenant']} but user {j['user_id']}")
    dup = db.rows("SELECT user_id, prompt, COUNT(*) FROM pairs GROUP BY user_id, prompt HAVING COUNT(*) > 1")
    problems += [f"{u}: pair {p!r} stored {n} times" for u, p, n in dup[:10]]
    return {"users": users, "jobs": dict(statuses), "job_pairs": sum(len(j["pair_ids"]) for j in jobs),
            "job_pairs_done": sum(j["done"] for j in jobs),
            "stored_pairs": db.rows("SELECT COUNT(*) FROM pairs")[0][0],
            "entries": db.rows("SELECT COUNT(*) FROM entries")[0][0], "accepted_not_indexed_yet": not_yet,
            "problems": problems[:50], "n_problems": len(problems)}


def part_replicas(args, pg, logs: Path) -> dict:
    out: dict = {}
    # (a) two replicas on one PostgreSQL database, replica 1 killed half way
    url = pg.new_database()
    keys = make_keys(url)
    reps = [Replica(f"pg-2x-replica{i}", url, logs, ["--rate-limit", "0"]) for i in (1, 2)]
    db = Db(url)
    try:
        for r in reps:
            r.start()
        print(f"replicas: 2 replicas on PostgreSQL, {args.clients} clients for {args.seconds:.0f}s, "
              f"replica 1 killed at {args.seconds * args.kill_at:.0f}s", file=sys.stderr)
        load, elapsed, kill = asyncio.run(run_load(reps, keys, args, db, kill=True))
        at_end = db.jobs()
        progress = {"pairs_queued_at_load_end": sum(len(j["pair_ids"]) for j in at_end),
                    "pairs_indexed_at_load_end": sum(j["done"] for j in at_end)}
        drained, left = drain(db, args.drain_seconds)
        progress["pairs_indexed_at_drain_end"] = sum(j["done"] for j in db.jobs())
        progress["drain_pairs_per_second"] = (progress["pairs_indexed_at_drain_end"]
                                              - progress["pairs_indexed_at_load_end"]) / max(drained, 1e-9)
        held = {j["job_id"]: j for j in db.jobs()}
        for o in kill.get("orphaned_jobs", []):
            j = held.get(o["job_id"], {})
            o.update(status=j.get("status"), done_end=j.get("done"),
                     finished_after_kill_s=j["finished"] - kill["killed_wall"] if j.get("finished") else None)
        indexed_end = [r.scrape("prefsteer_pairs_indexed_total") for r in reps]
        kill["pairs_indexed_by_worker"] = (kill.get("pairs_indexed_before_kill") or 0) + sum(x or 0 for x in indexed_end)
        run = load.summary(elapsed)
        run.update(kill=kill, drain_seconds=drained, pending_after_drain=left, indexing=progress,
                   memory=check_memory(load, db, reps[1].base, keys))
        out["two_replicas_kill"] = run
    finally:
        db.close()
        for r in reps:
            r.stop()
    # (b) the same load, no kill: one replica on PostgreSQL, then one on SQLite
    tmp = Path(tempfile.mkdtemp(prefix="prefsteer-replicas-"))
    for name, url in (("pg_one", None), ("sqlite_one", str(tmp / "memory.db"))):
        url = url or pg.new_database()
        keys = make_keys(url)
        rep = Replica(f"{name.replace('_', '-')}-replica", url, logs, ["--rate-limit", "0"])
        db = Db(url)
        try:
            rep.start()
            print(f"replicas: 1 replica on {'SQLite' if name.startswith('sqlite') else 'PostgreSQL'}, "
                  f"{args.clients} clients for {args.seconds:.0f}s", file=sys.stderr)
            load, elapsed, _ = asyncio.run(run_load([rep], keys, args))
            run = load.summary(elapsed)
            jobs = db.jobs()  # the server is stopped with what is left queued: the throughput is the point
            run["jobs_at_end"] = {"jobs": len(jobs), "pending": sum(j["status"] in ("queued", "running") for j in jobs),
                                  "pairs_indexed": sum(j["done"] for j in jobs),
                                  "pairs_queued": sum(len(j["pair_ids"]) for j in jobs)}
            out[name] = run
        finally:
            db.close()
            rep.stop()
    pg1, sq1 = out["pg_one"], out["sqlite_one"]
    out["cost"] = {"rps_pg_over_sqlite": pg1["total"]["rps"] / sq1["total"]["rps"],
                   "p50_pg_over_sqlite": {kind: (pg1["endpoints"][k]["p50_ms"] / sq1["endpoints"][k]["p50_ms"])
                                          if pg1["endpoints"][k]["p50_ms"] and sq1["endpoints"][k]["p50_ms"] else None
                                          for kind, k in KINDS.items()}}
    return out


# -- 2. fairness --------------------------------------------------------------------------------

def part_fairness(args, pg, logs: Path) -> dict:
    import httpx

    url = pg.new_database()
    keys = make_keys(url)
    hdr = {t: {"Authorization": f"Bearer {keys[t]}"} for t in TENANTS}
    rep = Replica("fairness-replica", url, logs, ["--rate-limit", "0"])
    db = Db(url)

    def state() -> tuple[int, dict]:
        jobs = db.jobs()
        return sum(j["done"] for j in jobs if j["tenant"] == "A"), {j["job_id"]: j for j in jobs}

    try:
        rep.start()
        http = httpx.Client(base_url=rep.base, timeout=120)
        n_req = -(-args.fairness_pairs // 100)
        t_a = time.time()
        a_jobs = []
        for k in range(n_req):
            n = min(100, args.fairness_pairs - 100 * k)
            pairs = [{"prompt": f"[A-0-{k}-{j}] How do I {TOPICS[j % len(TOPICS)]}? Backlog pair {k}-{j}.",
                      "chosen": f"Short steps, case {k}-{j}.", "rejected": f"A long story, case {k}-{j}!!"}
                     for j in range(n)]
            r = http.post(f"/v1/users/backlog-{k}/feedback", json={"pairs": pairs}, headers=hdr["A"])
            assert r.status_code == 202, r.text
            a_jobs.append(r.json()["job_id"])
        a_queued = time.time() - t_a
        print(f"fairness: tenant A queued {args.fairness_pairs} pairs in {a_queued:.1f}s", file=sys.stderr)
        probes = []
        for p in range(3):
            a_at_send, _ = state()
            if a_at_send >= args.fairness_pairs:
                break
            body = {"pairs": [{"prompt": f"[B-0-{p}-0] How do I boil an egg? Probe {p}.",
                               "chosen": "Boil it 9 minutes.", "rejected": "Eggs are magical, a long tale!!"}]}
            r = http.post(f"/v1/users/probe-{p}/feedback", json=body, headers=hdr["B"])
            t_202 = time.time()
            job_id = r.json()["job_id"]
            a_at_202, _ = state()
            deadline = time.monotonic() + args.drain_seconds
            while time.monotonic() < deadline:
                a_now, jobs = state()
                if jobs[job_id]["status"] in ("done", "failed"):
                    break
                time.sleep(0.01)
            t_seen = time.time()
            j = jobs[job_id]
            probes.append({"a_indexed_at_202": a_at_202, "a_indexed_at_done": a_now,
                           "a_indexed_while_b_waited": a_now - a_at_202, "status": j["status"],
                           "wait_seen_s": t_seen - t_202, "wait_server_s": (j["finished"] or t_seen) - j["created"],
                           "queued_s": (j["started"] or t_seen) - j["created"]})
            print(f"fairness: B probe {p}: done {probes[-1]['wait_server_s']:.2f}s after its 202, A indexed "
                  f"{a_at_202} -> {a_now}", file=sys.stderr)
            # the next probe once A has gone a third further (or at once if A is done)
            deadline = time.monotonic() + args.drain_seconds
            target = min(args.fairness_pairs, a_now + args.fairness_pairs // 3)
            while time.monotonic() < deadline and state()[0] < target:
                time.sleep(0.2)
        deadline = time.monotonic() + args.drain_seconds * 2
        while time.monotonic() < deadline and any(state()[1][j]["status"] not in ("done", "failed") for j in a_jobs):
            time.sleep(0.5)
        _, jobs = state()
        a = [jobs[j] for j in a_jobs]
        done = [j for j in a if j["status"] == "done"]
        a_total = max(j["finished"] for j in done) - t_a if len(done) == len(a) else None
        return {"a_pairs": args.fairness_pairs, "a_requests": n_req, "a_queue_seconds": a_queued,
                "a_total_seconds": a_total, "a_jobs": {s: sum(j["status"] == s for j in a) for s in {j["status"] for j in a}},
                "a_pairs_per_second": args.fairness_pairs / a_total if a_total else None,
                "a_indexed": sum(j["done"] for j in a), "probes": probes}
    finally:
        db.close()
        rep.stop()


# -- 3. edge ------------------------------------------------------------------------------------

def rss_kb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            fields[k] = int(v.split()[0])
    return fields


def chunked_send(port: int, total: int, chunk: int = 1 << 20) -> dict:
    """A chunked POST of ``total`` body bytes with no key; stops at the first socket error."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    block = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    sent, error = 0, None
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(head)
        while sent < total:
            s.sendall(block)
            sent += chunk
        s.sendall(b"0\r\n\r\n")
    except OSError as e:
        error = type(e).__name__
    answer = b""
    try:
        s.settimeout(10)
        while len(answer) < 65536:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    except OSError as e:
        error = error or f"reading: {type(e).__name__}"
    finally:
        s.close()
    status = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace") if answer else None
    return {"body_bytes_sent": sent, "seconds": time.perf_counter() - t0, "error": error, "status_line": status,
            "closes": b"connection: close" in answer.lower()}


def part_edge(args, logs: Path) -> dict:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="prefsteer-edge-"))
    out: dict = {}
    db = str(tmp / "memory.db")
    make_keys(db)
    rep = Replica("edge-replica", db, logs, [])  # default limits: 2 MB bodies, 600 requests/min, bursts of 120
    try:
        rep.start()
        httpx.get(rep.base + "/health", timeout=10)
        before = rss_kb(rep.pid)
        sends = []
        for _ in range(args.edge_sends):
            sends.append(chunked_send(rep.port, args.edge_mb * 1_000_000))
        after = rss_kb(rep.pid)
        time.sleep(2)
        settled = rss_kb(rep.pid)
        alive = httpx.get(rep.base + "/health", timeout=10).status_code
        out["bodies"] = {"sends": sends, "rss_before_kb": before["VmRSS"], "rss_after_kb": after["VmRSS"],
                         "rss_after_2s_kb": settled["VmRSS"], "peak_rss_kb": settled["VmHWM"],
                         "health_after": alive}
    finally:
        rep.stop()
    print(f"edge: RSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MiB over {args.edge_sends} "
          f"bodies of {args.edge_mb} MB", file=sys.stderr)
    rep = Replica("edge-ratelimit-replica", db, logs, [])  # a fresh one: a full bucket
    try:
        rep.start()
        statuses: dict[int, int] = defaultdict(int)
        retry_after: dict[str, int] = defaultdict(int)
        missing_retry = 0
        with httpx.Client(base_url=rep.base, headers={"Authorization": "Bearer ps-not-a-key"}, timeout=30) as http:
            t0 = time.perf_counter()
            for _ in range(args.wrong_key_requests):
                r = http.get("/v1/models")
                statuses[r.status_code] += 1
                if r.status_code == 429:
                    if "retry-after" in r.headers:
                        retry_after[r.headers["retry-after"]] += 1
                    else:
                        missing_retry += 1
            secs = time.perf_counter() - t0
        out["wrong_keys"] = {"requests": args.wrong_key_requests, "seconds": secs,
                             "statuses": {str(k): v for k, v in sorted(statuses.items())},
                             "retry_after_values": dict(retry_after), "429_without_retry_after": missing_retry,
                             "limit": "600/min, burst 120 (defaults)",
                             "rate_limited_metric": rep.scrape("prefsteer_rate_limited_total")}
    finally:
        rep.stop()
    return out


# -- the report ---------------------------------------------------------------------------------

def f1(x, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.1f}{unit}"


def load_table(run: dict, kill: bool) -> list[str]:
    head = "| endpoint | requests | requests/s | p50 (ms) | p99 (ms) | errors |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if kill:
        head += " refused in the kill | dropped in the kill |"
        sep += "---:|---:|"
    lines = [head, sep]
    for k, e in run["endpoints"].items():
        row = f"| {k} | {e['requests']} | {e['rps']:.1f} | {f1(e['p50_ms'])} | {f1(e['p99_ms'])} | {e['errors']} |"
        if kill:
            row += f" {e['refused_in_kill']} | {e['dropped_in_kill']} |"
        lines.append(row)
    t = run["total"]
    row = f"| **all** | {t['requests']} | {t['rps']:.1f} | | | {t['errors']} |"
    if kill:
        row += f" {t['refused_in_kill']} | {t['dropped_in_kill']} |"
    return lines + [row]


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["conditions"]
    lines = ["# Many replicas, one memory: measured", "",
             f"Conditions: {c['machine']} ({c['platform']}, Python {c['python']}), the clients, the servers and "
             f"{c['postgres']} (local, loopback, from tests/postgres_server.py: fsync off) all on it; "
             f"`prefsteer serve --backend fake --embedder hash` (a toy model: the numbers measure the service, "
             f"not a language model), uvicorn with 1 process per replica, logs at warning. Each part below says "
             "when it ran, at which commit, and the machine's load average (1 min) before and after it: other work "
             "shares these cores. "
             "Reproduce: `.venv/bin/python benchmarks/replicas.py` (`--only replicas|fairness|edge`, `--seconds`, "
             "`--clients`).", ""]
    r = result.get("replicas")
    if r:
        rc = r["conditions"]
        k = r["two_replicas_kill"]
        kill = k["kill"]
        m = k["memory"]
        lines += ["## 1. Two replicas under load, one killed", "",
                  f"{rc['clients']} asyncio/httpx clients over 2 tenants (4 users each, the same ids in both), "
                  f"{rc['seconds']:.0f} s per run, mix chat/feedback/profile {rc['mix']} (chat max_tokens "
                  f"{rc['chat_tokens']}, feedback 1-3 new pairs), rate limit off (`--rate-limit 0`). Each client "
                  "sends each request to the next replica in turn. Replica 1 was SIGKILLed "
                  f"{kill['killed_at_s']:.0f} s in and answered again {kill['restart_seconds']:.1f} s later (same "
                  "port). A request it refused or dropped then was sent again to replica 2; it is counted in the "
                  "last two columns, not as an error. Latencies are of the answered try." + part_line(r), ""]
        lines += load_table(k, kill=True)
        lines += ["", f"Answers by replica: {k['by_replica']}. Requests with no answer after {ATTEMPTS} tries: "
                  f"{k['total']['failed_after_retries']}.", "",
                  ("Checks after the run (all jobs done " f"{k['drain_seconds']:.0f} s after the load ended):"
                   if not k["pending_after_drain"] else f"Checks after the run (waited {k['drain_seconds']:.0f} s "
                   f"after the load; {k['pending_after_drain']} jobs still pending then):"), "",
                  f"- indexing: when the load ended {k['indexing']['pairs_indexed_at_load_end']} of "
                  f"{k['indexing']['pairs_queued_at_load_end']} queued pairs were indexed; after it the two workers "
                  f"indexed {k['indexing']['drain_pairs_per_second']:.1f} pairs/s",
                  f"- pairs accepted (202): {k['accepted_pairs']}; sent but never answered 202: {k['unsure_pairs']}; "
                  f"stored: {m['stored_pairs']}; memory entries: {m['entries']}; jobs: {m['jobs']}",
                  f"- accepted pairs not indexed yet (their job still pending): {m['accepted_not_indexed_yet']}",
                  f"- jobs' pairs: {m['job_pairs']}, indexed (`done` summed): {m['job_pairs_done']}; pairs the "
                  f"workers indexed (prefsteer_pairs_indexed_total, replica 1 read just before the kill): "
                  f"{kill['pairs_indexed_by_worker']:.0f}",
                  "- every user's profile: `pairs` = pairs accepted, entries = pairs accepted (less those still "
                  "queued), no prompt with two entries; every done job's `done` = its pairs; no job failed: "
                  f"**{'yes' if m['n_problems'] == 0 else 'NO (' + str(m['n_problems']) + ' problems)'}**",
                  f"- answers to one tenant holding the other tenant's mark, during the load: **{k['leaks']}** "
                  "(after it, a profile entry of the other tenant would be a problem above)",
                  f"- errors (non-2xx, or a connection error outside the kill): **{k['total']['errors']}**"]
        for o in kill["orphaned_jobs"]:
            lines.append(f"- a job held by replica 1 when it died: {o['pairs']} pair(s), {o['done']} indexed; it ended "
                         f"{o['status']} with {o['done_end']} indexed, "
                         f"{f1(o['finished_after_kill_s'])} s after the kill (lease 30 s)")
        if not kill["orphaned_jobs"]:
            lines.append("- replica 1 held no running job when it died")
        if m["problems"]:
            lines += ["", "Problems found:", ""] + [f"- {p}" for p in m["problems"]]
        if k["error_samples"]:
            lines += ["", "Errors (first ones):", ""] + [f"- `{e}`" for e in k["error_samples"][:10]]
        lines += ["", "### The cost of the network database: the same load, no kill, one replica", ""]
        lines += ["| memory | requests/s | chat p50 (ms) | feedback p50 (ms) | profile p50 (ms) | chat p99 (ms) | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, label in (("pg_one", "PostgreSQL"), ("sqlite_one", "SQLite"), ("two_replicas_kill",
                                                                                 "PostgreSQL, 2 replicas (kill run)")):
            run = r[name]
            e = run["endpoints"]
            lines.append(f"| {label} | {run['total']['rps']:.1f} | {f1(e[KINDS['chat']]['p50_ms'])} | "
                         f"{f1(e[KINDS['feedback']]['p50_ms'])} | {f1(e[KINDS['profile']]['p50_ms'])} | "
                         f"{f1(e[KINDS['chat']]['p99_ms'])} | {run['total']['errors']} |")
        cost = r["cost"]
        lines += ["", f"PostgreSQL / SQLite, one replica: throughput x{cost['rps_pg_over_sqlite']:.2f}; p50 "
                  + ", ".join(f"{kind} x{v:.2f}" for kind, v in cost["p50_pg_over_sqlite"].items() if v) + ".",
                  "Indexing under this load (those servers were stopped with their queue as it was): when the "
                  f"load ended the PostgreSQL replica had indexed {r['pg_one']['jobs_at_end']['pairs_indexed']} of "
                  f"{r['pg_one']['jobs_at_end']['pairs_queued']} queued pairs, the SQLite one "
                  f"{r['sqlite_one']['jobs_at_end']['pairs_indexed']} of {r['sqlite_one']['jobs_at_end']['pairs_queued']}."]
    fa = result.get("fairness")
    if fa:
        lines += ["", "## 2. Fairness: one tenant's backlog, another tenant's one pair", "",
                  f"One replica on PostgreSQL. Tenant A queued {fa['a_pairs']} pairs ({fa['a_requests']} requests "
                  f"of up to 100, in {fa['a_queue_seconds']:.1f} s); then tenant B sent 1 pair, three times while "
                  "A's backlog lasted (each after A had gone a third further). The jobs table was read every 10 ms."
                  + part_line(fa),
                  "", "| B's pair | A indexed at B's 202 | A indexed when B's job was done | A's pairs during "
                  "B's wait | B: 202 to done (s, server) | B: 202 to seen done (s) | B queued (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for i, p in enumerate(fa["probes"]):
            lines.append(f"| {i + 1} | {p['a_indexed_at_202']} | {p['a_indexed_at_done']} | "
                         f"{p['a_indexed_while_b_waited']} | {p['wait_server_s']:.2f} | {p['wait_seen_s']:.2f} | "
                         f"{p['queued_s']:.2f} |")
        lines += ["", f"A's {fa['a_pairs']} pairs: all indexed {f1(fa['a_total_seconds'])} s after A's first "
                  f"request ({f1(fa['a_pairs_per_second'])} pairs/s); A's jobs: {fa['a_jobs']}."]
    ed = result.get("edge")
    if ed:
        b = ed["bodies"]
        sent = [s["body_bytes_sent"] for s in b["sends"]]
        statuses = defaultdict(int)
        for s in b["sends"]:
            statuses[f"{s['status_line']} / {s['error']}"] += 1
        lines += ["", "## 3. The edge", "",
                  f"One replica on SQLite with the default limits (2 MiB bodies, 600 requests a minute, bursts of "
                  f"120). {len(b['sends'])} chunked bodies of {result['conditions'].get('edge_mb', 200)} MB, no "
                  "key, each on a raw socket in 1 MiB chunks, the sending stopped at the first socket error."
                  + part_line(ed), "",
                  "| | value |", "|---|---:|",
                  f"| server RSS before (MiB) | {b['rss_before_kb'] / 1024:.1f} |",
                  f"| server RSS after the sends (MiB) | {b['rss_after_kb'] / 1024:.1f} |",
                  f"| server RSS 2 s later (MiB) | {b['rss_after_2s_kb'] / 1024:.1f} |",
                  f"| server peak RSS (VmHWM, MiB) | {b['peak_rss_kb'] / 1024:.1f} |",
                  f"| body bytes a send got into the socket, min / median / max (MiB) | {min(sent) / 2**20:.1f} / "
                  f"{pct(sent, 0.5) / 2**20:.1f} / {max(sent) / 2**20:.1f} |",
                  f"| seconds per send, max | {max(s['seconds'] for s in b['sends']):.2f} |",
                  f"| /health after | {b['health_after']} |", "",
                  "Answers (status line / how the sending ended): "
                  + "; ".join(f"`{k}` x{v}" for k, v in statuses.items()) + ".", ""]
        w = ed["wrong_keys"]
        lines += [f"{w['requests']} requests with a wrong key (GET /v1/models) from one client, one after another "
                  f"on one connection, in {w['seconds']:.1f} s, on a fresh replica: statuses {w['statuses']}; "
                  f"Retry-After values of the 429s {w['retry_after_values']}, 429s without it: "
                  f"{w['429_without_retry_after']}; prefsteer_rate_limited_total {f1(w['rate_limited_metric'])}."]
    notes = result.get("notes")
    if notes:
        lines += ["", notes.rstrip()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + (" (src modified)" if dirty else "")
    except Exception:
        return "unknown"


def timing(t0: float, load0: tuple) -> dict:
    """A part's minutes and the machine's load average (1 min) before and after: other work on the
    shared cores shows there."""
    return {"minutes": (time.monotonic() - t0) / 60, "loadavg_before": round(load0[0], 2),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": git_rev(),
            "loadavg_after": round(os.getloadavg()[0], 2)}


def part_line(part: dict) -> str:
    m = part.get("machine")
    return "" if not m else (f" (This part: finished {m.get('date', '')} at git {m.get('git', '?')}, {m['minutes']:.1f} min; load average "
                             f"{m['loadavg_before']} before, "
                             f"{m['loadavg_after']} after.)")


def main(args: argparse.Namespace) -> int:
    from tests.postgres_server import PostgresServer, binaries

    t_start = time.monotonic()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = out / "replicas.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    old_readme = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    if NOTES in old_readme:
        result["notes"] = old_readme[old_readme.index(NOTES):]
    parts = [args.only] if args.only else ["replicas", "fairness", "edge"]
    pg = None
    try:
        if "replicas" in parts or "fairness" in parts:
            pg = PostgresServer().start()
        if "replicas" in parts:
            t0, load0 = time.monotonic(), os.getloadavg()
            result["replicas"] = part_replicas(args, pg, logs)
            result["replicas"]["machine"] = timing(t0, load0)
            result["replicas"]["conditions"] = {"clients": args.clients, "seconds": args.seconds, "mix": args.mix,
                                                "chat_tokens": args.chat_tokens, "kill_at": args.kill_at,
                                                "seed": args.seed}
        if "fairness" in parts:
            t0, load0 = time.monotonic(), os.getloadavg()
            result["fairness"] = part_fairness(args, pg, logs)
            result["fairness"]["machine"] = timing(t0, load0)
        if "edge" in parts:
            t0, load0 = time.monotonic(), os.getloadavg()
            result["edge"] = part_edge(args, logs)
            result["edge"]["machine"] = timing(t0, load0)
    finally:
        if pg is not None:
            log = pg.dir / "server.log"
            if log.exists():
                (logs / "postgres.log").write_text(log.read_text(errors="replace")[-200_000:])
            pg.stop()
    pg_bin = binaries()
    result["conditions"] = {
        "machine": f"{os.cpu_count()} CPU cores, shared", "platform": platform.platform(),
        "python": platform.python_version(), "postgres": f"PostgreSQL {pg_bin.parts[-2]}" if pg_bin else "none",
        "backend": "fake", "embedder": "hash", "git": git_rev(), "edge_mb": args.edge_mb,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run_minutes": (time.monotonic() - t_start) / 60, "parts_run": parts}
    write(out, result)
    print((out / "README.md").read_text())
    bad = False
    if "replicas" in parts:
        k = result["replicas"]["two_replicas_kill"]
        bad |= bool(k["memory"]["n_problems"] or k["leaks"] or k["total"]["errors"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
