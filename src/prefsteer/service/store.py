"""The service's own tables, in the same SQLite file as the user memory.

    api_keys  key_hash (sha256 of the token: the token itself is never stored), tenant, created, revoked
    jobs      one row per accepted feedback batch: the pairs to index, status, progress

Both go through a `Memory`'s connection and transaction, so a feedback batch's pairs and its job are
committed together: once the 202 is sent, a crash loses neither.

    >>> mem = Memory("memory.db"); ensure_schema(mem)
    >>> key = create_key(mem, "acme")          # "ps-..." shown once
    >>> tenant_of(mem, key)
    'acme'
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
import uuid
from typing import Any

from prefsteer.memory import Memory

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    pair_ids TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    result TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
"""

# tenants and user ids: no '/', so "<tenant>/<user>" never collides with another tenant's user
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 . _ @ -, starting with a letter or digit"


def ensure_schema(memory: Memory) -> None:
    with memory.transaction() as c:
        for stmt in filter(str.strip, SCHEMA.split(";")):
            c.execute(stmt)


def internal_user(tenant: str | None, user_id: str) -> str:
    """The memory's id of a tenant's user; ``tenant=None`` (no-auth on loopback) is the local
    namespace that the `prefsteer` CLI uses too."""
    return user_id if tenant is None else f"{tenant}/{user_id}"


# -- API keys --------------------------------------------------------------------------------

def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(memory: Memory, tenant: str) -> dict[str, Any]:
    """A new key for ``tenant``: ``{"key", "key_id", "tenant", "created"}``; only its hash is kept."""
    if not NAME.match(tenant or ""):
        raise ValueError(f"tenant {tenant!r}: use {NAME_RULE}")
    ensure_schema(memory)
    key = "ps-" + secrets.token_urlsafe(32)
    key_id = "key-" + secrets.token_hex(6)
    now = time.time()
    with memory.transaction() as c:
        c.execute("INSERT INTO api_keys VALUES (?,?,?,?,NULL)", (hash_key(key), tenant, key_id, now))
    return {"key": key, "key_id": key_id, "tenant": tenant, "created": now}


def list_keys(memory: Memory) -> list[dict[str, Any]]:
    ensure_schema(memory)
    rows = memory.conn.execute("SELECT key_id, tenant, created, revoked FROM api_keys ORDER BY created")
    return [{"key_id": k, "tenant": t, "created": c, "revoked": r} for k, t, c, r in rows]


def revoke_key(memory: Memory, key_id: str) -> bool:
    ensure_schema(memory)
    with memory.transaction() as c:
        return c.execute("UPDATE api_keys SET revoked=? WHERE key_id=? AND revoked IS NULL",
                         (time.time(), key_id)).rowcount > 0


def tenant_of(memory: Memory, key: str) -> str | None:
    """The tenant of a valid, unrevoked key, else None. The lookup is by hash: the time it takes
    says nothing about the key."""
    row = memory.conn.execute("SELECT tenant FROM api_keys WHERE key_hash=? AND revoked IS NULL",
                              (hash_key(key),)).fetchone()
    return row[0] if row else None


def count_keys(memory: Memory) -> int:
    return memory.conn.execute("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL").fetchone()[0]


# -- jobs ------------------------------------------------------------------------------------

def add_job(memory: Memory, tenant: str | None, user_id: str, pair_ids: list[str]) -> str:
    """Queue a job (inside the caller's transaction when there is one)."""
    job_id = "job-" + uuid.uuid4().hex
    with memory.transaction() as c:
        c.execute("INSERT INTO jobs(job_id, tenant, user_id, status, pair_ids, created) VALUES (?,?,?,?,?,?)",
                  (job_id, tenant or "", user_id, "queued", json.dumps(pair_ids), time.time()))
    return job_id


def get_job(memory: Memory, job_id: str) -> dict[str, Any] | None:
    row = memory.conn.execute("SELECT job_id, tenant, user_id, status, pair_ids, done, created, started, "
                              "finished, error, result FROM jobs WHERE job_id=?", (job_id,)).fetchone()
    if row is None:
        return None
    j, t, u, s, p, d, c, st, f, e, r = row
    return {"job_id": j, "tenant": t or None, "user_id": u, "status": s, "pair_ids": json.loads(p),
            "done": d, "created": c, "started": st, "finished": f, "error": e, "result": json.loads(r)}


def next_queued(memory: Memory) -> dict[str, Any] | None:
    row = memory.conn.execute("SELECT job_id FROM jobs WHERE status='queued' ORDER BY created LIMIT 1").fetchone()
    return get_job(memory, row[0]) if row else None


def update_job(memory: Memory, job_id: str, **fields: Any) -> bool:
    """Set columns of a job; False when the job is gone (its user was deleted)."""
    if "result" in fields:
        fields["result"] = json.dumps(fields["result"])
    cols = ", ".join(f"{k}=?" for k in fields)
    with memory.transaction() as c:
        return c.execute(f"UPDATE jobs SET {cols} WHERE job_id=?", (*fields.values(), job_id)).rowcount > 0


def requeue_running(memory: Memory) -> int:
    """After a crash or a stop: jobs left running go back to the queue (their finished pairs are
    saved selections, so the rerun skips them)."""
    with memory.transaction() as c:
        return c.execute("UPDATE jobs SET status='queued' WHERE status='running'").rowcount


def pending_jobs(memory: Memory, user_id: str) -> list[str]:
    return [r[0] for r in memory.conn.execute(
        "SELECT job_id FROM jobs WHERE user_id=? AND status IN ('queued','running') ORDER BY created", (user_id,))]


# -- deleting a user -------------------------------------------------------------------------

def user_tables(memory: Memory) -> list[str]:
    """Every table with a ``user_id`` column: what a user's deletion has to empty."""
    names = [r[0] for r in memory.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return [n for n in names
            if any(col[1] == "user_id" for col in memory.conn.execute(f'PRAGMA table_info("{n}")'))]


def row_counts(memory: Memory, user_id: str) -> dict[str, int]:
    return {t: memory.conn.execute(f'SELECT COUNT(*) FROM "{t}" WHERE user_id=?', (user_id,)).fetchone()[0]
            for t in user_tables(memory)}


def delete_user(memory: Memory, user_id: str) -> dict[str, int]:
    """Remove every row of ``user_id`` from every table (the memory's and the service's) in one
    transaction, then the user's method files. Rows of other users are not touched: every
    statement is keyed by the exact id. Returns the rows removed per table."""
    removed: dict[str, int] = {}
    with memory.transaction() as c:
        if hasattr(memory, "delete_user"):  # the memory's own deletion, when it has one
            removed.update(memory.delete_user(user_id) or {})
        for t in user_tables(memory):
            n = c.execute(f'DELETE FROM "{t}" WHERE user_id=?', (user_id,)).rowcount
            removed[t] = removed.get(t, 0) + n
    if memory.path != ":memory:":
        d = memory.state_dir(user_id)
        if d.exists():
            shutil.rmtree(d)
            removed["files"] = 1
    return removed
