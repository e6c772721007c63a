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
    proc = start_process(serve_script(db, port, auth=False), log)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, proc, log)
    return proc, base


def _wait_indexed(h: httpx.Client, jid: str, at_least: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = h.get(f"/v1/jobs/{jid}").json()
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
