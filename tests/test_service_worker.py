"""The feedback worker's durability: jobs resume after a restart, a SIGKILL mid-job loses no
accepted pair and leaves no half-written index, SIGTERM checkpoints the job. Server processes on
free loopback ports, fake backend; every wait is bounded."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from prefsteer.service import Settings, store  # noqa: E402
from prefsteer.storage import Memory  # noqa: E402
from prefsteer.types import PreferencePair, with_id  # noqa: E402
from tests.test_service_helpers import (free_port, serve_script, start_process, stop_process,  # noqa: E402
                                   thread_server, wait_http, wait_job)

TOPICS = ["an egg", "rice", "pasta", "a steak", "tea", "bread", "soup", "beans", "coffee", "a cake"]
PAIRS = [{"prompt": f"How do I cook {t}?", "chosen": f"Cook {t} for ten minutes, then rest it.",
          "rejected": f"Cooking {t} is a magical journey of wonder and giggles!!"} for t in TOPICS]


def test_a_job_of_a_dead_replica_is_taken_over_when_its_lease_runs_out(tmp_path):
    db = str(tmp_path / "m.db")
    mem = Memory(db)
    pairs = [with_id(PreferencePair("u1", p["prompt"], p["chosen"], p["rejected"])) for p in PAIRS[:2]]
    with mem.transaction():
        mem.add_pairs(pairs)
        jid = mem.add_job(None, "u1", [p.pair_id for p in pairs])
    # as a replica that died leaves it: running, under a lease that has run out
    mem.update_job(jid, status="running", started=time.time(), owner="dead-replica", lease_until=time.time() - 1)
    mem.close()
    with thread_server(Settings(db=db, backend="fake", embedder="hash", auth=False)) as base:
        h = httpx.Client(base_url=base, timeout=60)
        job = wait_job(h, jid)
        assert job["status"] == "done" and job["indexed"] == 2
        assert len(h.get("/v1/users/u1/profile").json()["entries"]) == 2


def _db_state(db: str, user: str) -> dict:
    mem = Memory(db)
    c = mem.conn
    out = {"pairs": c.execute("SELECT COUNT(*), COUNT(DISTINCT pair_id) FROM pairs WHERE user_id=?", (user,)).fetchone(),
           "entries": c.execute("SELECT COUNT(*) FROM entries WHERE user_id=?", (user,)).fetchone()[0],
           # an entry without its selection, or a selection without its entry, is a half-written index
           "orphans": c.execute("SELECT COUNT(*) FROM entries e LEFT JOIN selections s USING (user_id, pair_id) "
                                "WHERE e.user_id=? AND s.pair_id IS NULL", (user,)).fetchone()[0]
                      + c.execute("SELECT COUNT(*) FROM selections s LEFT JOIN entries e USING (user_id, pair_id) "
                                  "WHERE s.user_id=? AND e.pair_id IS NULL", (user,)).fetchone()[0],
           "jobs": c.execute("SELECT status, done FROM jobs WHERE user_id=?", (user,)).fetchall()}
    mem.close()
    return out


def _start(db: str, tmp_path, name: str):
    port = free_port()
    log = tmp_path / f"{name}.log"
    proc = start_process(serve_script(db, port, auth=False, job_lease_seconds=2.0), log)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, proc, log)
    return proc, base


def _wait_indexed(h: httpx.Client, jid: str, at_least: int, timeout: float = 60.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = h.get(f"/v1/jobs/{jid}", headers=headers).json()
        if j["indexed"] >= at_least or j["status"] in ("done", "failed"):
            return j
        time.sleep(0.02)
    raise AssertionError(f"job {jid} indexed nothing in {timeout}s")


def test_sigkill_mid_job_loses_no_pair_and_the_restart_finishes_it(tmp_path):
    db = str(tmp_path / "m.db")
    proc, base = _start(db, tmp_path, "first")
    try:
        h = httpx.Client(base_url=base, timeout=60)
        r = h.post("/v1/users/kill-u/feedback", json={"pairs": PAIRS})
        assert r.status_code == 202
        jid = r.json()["job_id"]
        j = _wait_indexed(h, jid, 1)
        assert j["status"] == "running" and j["indexed"] < len(PAIRS), "the job finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        stop_process(proc)
    mid = _db_state(db, "kill-u")
    assert mid["pairs"] == (len(PAIRS), len(PAIRS))             # every accepted pair, once
    assert mid["orphans"] == 0 and 1 <= mid["entries"] < len(PAIRS)
    assert mid["jobs"][0][0] == "running"

    proc, base = _start(db, tmp_path, "second")
    try:
        h = httpx.Client(base_url=base, timeout=60)
        job = wait_job(h, jid, timeout=120)
        assert job["status"] == "done" and job["indexed"] == len(PAIRS)
        prof = h.get("/v1/users/kill-u/profile").json()
        assert sorted(e["prompt"] for e in prof["entries"]) == sorted(p["prompt"] for p in PAIRS)
    finally:
        stop_process(proc)
    end = _db_state(db, "kill-u")
    assert end["pairs"] == (len(PAIRS), len(PAIRS)) and end["entries"] == len(PAIRS) and end["orphans"] == 0


def test_sigterm_checkpoints_the_running_job(tmp_path):
    db = str(tmp_path / "m.db")
    proc, base = _start(db, tmp_path, "first")
    try:
        h = httpx.Client(base_url=base, timeout=60)
        jid = h.post("/v1/users/term-u/feedback", json={"pairs": PAIRS}).json()["job_id"]
        _wait_indexed(h, jid, 1)
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal: -15 is a clean exit here
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        stop_process(proc)
    state = _db_state(db, "term-u")
    (status, done), = state["jobs"]
    assert state["orphans"] == 0 and state["entries"] == done
    assert status == "queued" and 1 <= done < len(PAIRS) or status == "done" and done == len(PAIRS)


def test_delete_during_a_job_leaves_nothing_of_the_user(tmp_path):
    db = str(tmp_path / "m.db")
    with thread_server(Settings(db=db, backend="fake", embedder="hash", auth=False)) as base:
        h = httpx.Client(base_url=base, timeout=60)
        h.post("/v1/users/other/feedback", json={"pairs": PAIRS[:1]})
        jid = h.post("/v1/users/gone-u/feedback", json={"pairs": PAIRS}).json()["job_id"]
        _wait_indexed(h, jid, 1)
        assert h.delete("/v1/users/gone-u").status_code == 200
        assert h.get(f"/v1/jobs/{jid}").status_code == 404
        time.sleep(1.0)  # the worker would have indexed another pair by now
        assert h.get("/v1/users/gone-u/profile").status_code == 404
    mem = Memory(db)
    assert set(mem.row_counts("gone-u").values()) == {0}
    assert mem.row_counts("other")["pairs"] == 1
    mem.close()


def test_concurrent_duplicate_feedback_is_stored_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    db = str(tmp_path / "m.db")
    with thread_server(Settings(db=db, backend="fake", embedder="hash", auth=False)) as base:
        def post(_):
            with httpx.Client(base_url=base, timeout=60) as c:
                return c.post("/v1/users/dup-u/feedback", json={"pairs": PAIRS[:2]}).status_code
        with ThreadPoolExecutor(8) as ex:
            assert set(ex.map(post, range(8))) == {202}
        h = httpx.Client(base_url=base, timeout=60)
        deadline = time.monotonic() + 60
        while h.get("/v1/users/dup-u/profile").json()["pending_jobs"] and time.monotonic() < deadline:
            time.sleep(0.1)
        prof = h.get("/v1/users/dup-u/profile").json()
        assert prof["pairs"] == 2 and len(prof["entries"]) == 2 and prof["pending_jobs"] == []


# -- several replicas on one PostgreSQL database ------------------------------------------------------

def test_two_replicas_on_postgresql_share_the_queue_and_take_over_a_killed_ones_job(tmp_path, postgres):
    url = postgres.new_database()
    first, base1 = _start(url, tmp_path, "r1")
    second, base2 = _start(url, tmp_path, "r2")
    try:
        h1, h2 = httpx.Client(base_url=base1, timeout=60), httpx.Client(base_url=base2, timeout=60)
        jobs = [h.post(f"/v1/users/rep-{i}/feedback", json={"pairs": PAIRS}).json()["job_id"]
                for i, h in enumerate((h1, h2, h1, h2))]
        _wait_indexed(h2, jobs[0], 1)
        os.kill(first.pid, signal.SIGKILL)  # with jobs running and queued
        first.wait(10)
        for jid in jobs:  # the survivor takes the dead replica's job once its lease (2 s) runs out
            job = wait_job(h2, jid, timeout=120)
            assert job["status"] == "done" and job["indexed"] == len(PAIRS)
        for i in range(4):
            prof = h2.get(f"/v1/users/rep-{i}/profile").json()
            assert prof["pairs"] == len(PAIRS) and len(prof["entries"]) == len(PAIRS)
        assert h2.get("/ready").status_code == 200
    finally:
        stop_process(first)
        stop_process(second)
    import psycopg

    with psycopg.connect(url) as conn:  # every job done once: its count of pairs, no more
        rows = conn.execute("SELECT status, done, pair_ids, owner FROM jobs").fetchall()
    assert [(s, d, o) for s, d, _, o in rows] == [("done", len(PAIRS), None)] * 4


def test_one_tenants_backlog_does_not_hold_up_anothers_first_pair(tmp_path):
    from prefsteer.backends.fake import FakeBackend

    class Slow(FakeBackend):  # a pair's selection takes a while, as on a real model
        def score(self, requests, *, progress=False):
            time.sleep(0.0004 * len(requests))
            return super().score(requests, progress=progress)

    db = str(tmp_path / "m.db")
    mem = Memory(db)
    keys = {t: {"Authorization": f"Bearer {mem.create_key(t)['key']}"} for t in ("big", "small")}
    mem.close()
    backlog = [{"prompt": f"Question {i}: how long do I cook {TOPICS[i % 10]}?", "chosen": "Ten minutes.",
                "rejected": "A magical journey of wonder!!"} for i in range(30)]
    with thread_server(Settings(db=db, backend="fake", embedder="hash", make_backend=Slow)) as base:
        h = httpx.Client(base_url=base, timeout=60)
        big = h.post("/v1/users/b/feedback", json={"pairs": backlog}, headers=keys["big"]).json()["job_id"]
        _wait_indexed(h, big, 1, headers=keys["big"])
        small = h.post("/v1/users/s/feedback", json={"pairs": PAIRS[:1]}, headers=keys["small"]).json()["job_id"]
        done = wait_job(h, small, keys["small"], timeout=60)
        at_that_time = h.get(f"/v1/jobs/{big}", headers=keys["big"]).json()
        assert done["status"] == "done"
        # the small tenant waited for the pair in flight (and the one claimed with it), not the backlog
        assert at_that_time["status"] == "running" and at_that_time["indexed"] <= 5, at_that_time
        assert wait_job(h, big, keys["big"], timeout=120)["indexed"] == len(backlog)
