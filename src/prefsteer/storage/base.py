"""The storage contract: everything prefsteer keeps, behind one class, `Memory`.

``Memory(db)`` opens the memory that ``db`` names: a file path is SQLite (`storage.sqlite`, the
embedded default), a ``postgresql://`` URL is a PostgreSQL server (`storage.postgres`, for several
replicas). Both keep the same tables and answer the same methods; the SQL below is written once in
the dialect both engines read (``?`` parameters, ``ON CONFLICT`` upserts), and each engine adds only
what is its own: connections and transactions, schema versions and migrations, file checks.

Tables
    users           user_id, status ('indexing' while an indexing run is under way, 'ready' after)
    pairs           every preference pair a user gave (the raw feedback)
    selections      one attribute selection per (user, pair, index config): the resumable work log
    entries         what online retrieval reads: per (user, prompt), the best selection and the
                    prompt's embedding
    method_states   every other method's per-user state (`Method.save_state`), with its binary
    method_files    files (Reward's adapter weights) as blobs, so any replica on any machine reads them
    scores          the score cache: log p(continuation | context) keyed by a hash of model, template,
                    messages and continuation
    api_keys        the service's keys: sha256 of the token, tenant, created, revoked
    jobs            the service's queue: one row per accepted feedback batch, claimed by one replica
                    at a time under a lease that the working replica renews
    user_leases     who selects a user's pairs now: one replica per user, whatever the process

A pair's identity is its content (`pair_key` of user, prompt, chosen, rejected) unless the data gives
an id of its own; the same pair given twice is stored once.

    >>> mem = Memory("memory.db")                       # or Memory("postgresql://user@host/db")
    >>> mem.add_pairs(pairs)
    >>> mem.entries("alice")
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from prefsteer.backends.base import Score
from prefsteer.errors import UnknownUserError
from prefsteer.types import PreferencePair, sha, with_id

SCHEMA_VERSION = 2  # 0: pairs keyed by file stem and line; 1: method files beside the database

# One schema for both engines; {blob}, {real} and {int} are each engine's names for those types.
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    status TEXT NOT NULL DEFAULT 'new'
);
CREATE TABLE IF NOT EXISTS pairs (
    user_id TEXT NOT NULL REFERENCES users(user_id),
    pair_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{{}}',
    seq {int} NOT NULL,
    PRIMARY KEY (user_id, pair_id)
);
CREATE TABLE IF NOT EXISTS selections (
    user_id TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    config_id TEXT NOT NULL,
    attributes TEXT NOT NULL,
    objective {real} NOT NULL,
    base_objective {real} NOT NULL,
    gains TEXT NOT NULL,
    PRIMARY KEY (user_id, pair_id, config_id)
);
CREATE TABLE IF NOT EXISTS entries (
    user_id TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    prompt TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    config_id TEXT NOT NULL,
    attributes TEXT NOT NULL,
    objective {real} NOT NULL,
    base_objective {real} NOT NULL,
    gains TEXT NOT NULL,
    embedder TEXT NOT NULL,
    embedding {blob} NOT NULL,
    PRIMARY KEY (user_id, prompt_hash)
);
CREATE TABLE IF NOT EXISTS method_states (
    user_id TEXT NOT NULL,
    method TEXT NOT NULL,
    state_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    files TEXT NOT NULL DEFAULT '[]',
    n_pairs {int},
    stale {int} NOT NULL DEFAULT 0,
    updated {real} NOT NULL,
    PRIMARY KEY (user_id, method, state_id)
);
CREATE TABLE IF NOT EXISTS method_files (
    user_id TEXT NOT NULL,
    method TEXT NOT NULL,
    state_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (user_id, method, state_id, name)
);
CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,
    logprob {real} NOT NULL,
    n_tokens {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    created {real} NOT NULL,
    revoked {real}
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    pair_ids TEXT NOT NULL,
    done {int} NOT NULL DEFAULT 0,
    created {real} NOT NULL,
    started {real},
    finished {real},
    error TEXT,
    result TEXT NOT NULL DEFAULT '{{}}',
    owner TEXT,
    lease_until {real},
    served {real}
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs(user_id, status);
CREATE TABLE IF NOT EXISTS user_leases (
    user_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    lease_until {real} NOT NULL
)
"""

# every table, in the order a copy writes them (users before the pairs that refer to them)
TABLES = ("users", "pairs", "selections", "entries", "method_states", "method_files", "scores", "api_keys",
          "jobs", "user_leases")
# the tables a user's deletion empties
USER_TABLES = ("pairs", "selections", "entries", "method_states", "method_files", "jobs", "user_leases", "users")
_PRIMARY_KEYS = {"users": ("user_id",), "pairs": ("user_id", "pair_id"),
                 "selections": ("user_id", "pair_id", "config_id"), "entries": ("user_id", "prompt_hash"),
                 "method_states": ("user_id", "method", "state_id"),
                 "method_files": ("user_id", "method", "state_id", "name"), "scores": ("key",),
                 "api_keys": ("key_hash",), "jobs": ("job_id",), "user_leases": ("user_id",)}
_JOB_COLUMNS = ("job_id", "tenant", "user_id", "status", "pair_ids", "done", "created", "started", "finished",
                "error", "result", "owner", "lease_until", "served")


def schema_statements(blob: str, real: str, integer: str) -> list[str]:
    """The schema's statements in one engine's type names."""
    text = SCHEMA.format(blob=blob, real=real, int=integer)
    return [s.strip() for s in text.split(";") if s.strip()]


def is_database_url(db: str) -> bool:
    return "://" in db


@dataclass
class Entry:
    """One memory entry of a user: a past prompt, its attributes and why they were chosen."""
    user_id: str
    prompt: str
    pair_id: str
    attributes: list[str]
    objective: float
    base_objective: float
    gains: list[float]
    embedder: str = ""
    embedding: np.ndarray | None = field(default=None, repr=False)
    config_id: str = ""

    def to_json(self) -> dict:
        return {"user_id": self.user_id, "prompt": self.prompt, "pair_id": self.pair_id,
                "attributes": self.attributes, "objective": self.objective,
                "base_objective": self.base_objective, "gains": self.gains}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Memory:
    """The contract. ``Memory(db)`` returns the engine ``db`` names (see the module's docstring).

    ``create=False`` is for queries: a memory that does not exist is `MemoryNotFoundError` and
    nothing is created."""

    path: str          # what to show the user: the file path, or the URL without its password
    db: str            # what `Memory(db)` opens again (the URL with its password)
    thread_safe = False  # one object may serve every thread (a pool) rather than one per thread

    def __new__(cls, db: str | Path | None = None, *, create: bool = True):
        if cls is Memory:
            from prefsteer.paths import default_db_path

            target = str(db) if db is not None else str(default_db_path())
            if is_database_url(target):
                from prefsteer.storage.postgres import PostgresMemory as cls
            else:
                from prefsteer.storage.sqlite import SQLiteMemory as cls
        return super().__new__(cls)

    # -- what each engine provides ------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """All or nothing; yields an object with ``execute(sql, params) -> cursor``. Nested uses
        (in the same thread) join the outer transaction."""
        raise NotImplementedError

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run a query and fetch every row (inside this thread's transaction when there is one)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def schema_version(self) -> int:
        raise NotImplementedError

    def _deleted(self) -> None:
        """After a user's deletion: make the deleted text unreadable in the engine's files."""

    # -- small helpers --------------------------------------------------------------------------
    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self._one(sql, params)
        return None if row is None else row[0]

    def ping(self) -> None:
        """Raise when the database does not answer (the service's /ready)."""
        self._rows("SELECT 1")

    # -- users and pairs ------------------------------------------------------------------------
    def users(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT user_id FROM users ORDER BY user_id")]

    def has_user(self, user_id: str) -> bool:
        return self._one("SELECT 1 FROM users WHERE user_id=?", (user_id,)) is not None

    def user_status(self, user_id: str) -> str:
        status = self._value("SELECT status FROM users WHERE user_id=?", (user_id,))
        if status is None:
            raise UnknownUserError(user_id, self.users())
        return status

    def require_user(self, user_id: str) -> None:
        self.user_status(user_id)

    def set_status(self, user_id: str, status: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE users SET status=? WHERE user_id=?", (status, user_id))

    def add_pairs(self, pairs: Sequence[PreferencePair]) -> dict[str, int]:
        """Store pairs, all or none: ``{"added", "kept", "updated"}``. A pair is keyed by its id
        (`with_id`: its content when it has no id of its own); one already stored with the same text
        is kept as it is, so the same pair given twice is stored once. One stored under the same
        explicit id with other text is updated, and its selections dropped: it is selected again."""
        counts = {"added": 0, "kept": 0, "updated": 0}
        with self.transaction() as c:
            for p in map(with_id, pairs):
                c.execute("INSERT INTO users(user_id) VALUES (?) ON CONFLICT DO NOTHING", (p.user_id,))
                seq = c.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM pairs WHERE user_id=?",
                                (p.user_id,)).fetchone()[0]
                added = c.execute("INSERT INTO pairs(user_id, pair_id, prompt, chosen, rejected, meta, seq) "
                                  "VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                                  (p.user_id, p.pair_id, p.prompt, p.chosen, p.rejected, json.dumps(p.meta),
                                   seq)).rowcount
                if added:
                    counts["added"] += 1
                    continue
                old = c.execute("SELECT prompt, chosen, rejected FROM pairs WHERE user_id=? AND pair_id=?",
                                (p.user_id, p.pair_id)).fetchone()
                if tuple(old) == (p.prompt, p.chosen, p.rejected):
                    counts["kept"] += 1
                    continue
                c.execute("UPDATE pairs SET prompt=?, chosen=?, rejected=?, meta=? WHERE user_id=? AND pair_id=?",
                          (p.prompt, p.chosen, p.rejected, json.dumps(p.meta), p.user_id, p.pair_id))
                c.execute("DELETE FROM selections WHERE user_id=? AND pair_id=?", (p.user_id, p.pair_id))
                c.execute("DELETE FROM entries WHERE user_id=? AND pair_id=?", (p.user_id, p.pair_id))
                counts["updated"] += 1
        return counts

    def pairs(self, user_id: str) -> list[PreferencePair]:
        self.require_user(user_id)
        rows = self._rows("SELECT pair_id, prompt, chosen, rejected, meta FROM pairs WHERE user_id=? ORDER BY seq",
                          (user_id,))
        return [PreferencePair(user_id, pr, ch, rj, pid, json.loads(meta)) for pid, pr, ch, rj, meta in rows]

    def pair_count(self, user_id: str) -> int:
        return self._value("SELECT COUNT(*) FROM pairs WHERE user_id=?", (user_id,))

    def forget_pairs(self, user_id: str, keep: Sequence[str]) -> int:
        """Remove the user's pairs whose ids are not in ``keep``, with their selections and entries
        (`prefsteer index --replace`). Returns how many pairs went."""
        keep = set(keep)
        with self.transaction() as c:
            gone = [pid for (pid,) in c.execute("SELECT pair_id FROM pairs WHERE user_id=?", (user_id,)).fetchall()
                    if pid not in keep]
            for pid in gone:
                for table in ("pairs", "selections", "entries"):
                    c.execute(f"DELETE FROM {table} WHERE user_id=? AND pair_id=?", (user_id, pid))
        return len(gone)

    def delete_user(self, user_id: str) -> dict[str, int]:
        """Remove every row of the user from every table (the memory's and the service's) in one
        transaction: rows removed per table. Rows of other users are not touched: every statement
        is keyed by the exact id. Unknown users raise `UnknownUserError`."""
        self.require_user(user_id)
        with self.transaction() as c:
            out = {t: c.execute(f"DELETE FROM {t} WHERE user_id=?", (user_id,)).rowcount for t in USER_TABLES}
        self._deleted()
        return out

    def row_counts(self, user_id: str) -> dict[str, int]:
        """The user's rows per table (what `delete_user` removes)."""
        return {t: self._value(f"SELECT COUNT(*) FROM {t} WHERE user_id=?", (user_id,)) for t in USER_TABLES}

    def table_counts(self) -> dict[str, int]:
        """Rows per table: what `prefsteer db copy` checks."""
        return {t: self._value(f"SELECT COUNT(*) FROM {t}") for t in TABLES}

    # -- EXACT's selections and entries ---------------------------------------------------------
    def selection(self, user_id: str, pair_id: str, config_id: str) -> dict | None:
        row = self._one("SELECT attributes, objective, base_objective, gains FROM selections "
                        "WHERE user_id=? AND pair_id=? AND config_id=?", (user_id, pair_id, config_id))
        if row is None:
            return None
        return {"attributes": json.loads(row[0]), "objective": row[1], "base_objective": row[2],
                "gains": json.loads(row[3])}

    def selections_of(self, user_id: str, pair_id: str, config_ids: Sequence[str]) -> dict[str, dict]:
        """The pair's stored selections under any of ``config_ids``, by config id."""
        if not config_ids:
            return {}
        q = ("SELECT config_id, attributes, objective, base_objective, gains FROM selections "
             f"WHERE user_id=? AND pair_id=? AND config_id IN ({','.join('?' * len(config_ids))})")
        return {c: {"attributes": json.loads(a), "objective": o, "base_objective": b, "gains": json.loads(g)}
                for c, a, o, b, g in self._rows(q, (user_id, pair_id, *config_ids))}

    def put_selection(self, user_id: str, pair_id: str, config_id: str, attributes: Sequence[str],
                      objective: float, base_objective: float, gains: Sequence[float]) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO selections VALUES (?,?,?,?,?,?,?) ON CONFLICT (user_id, pair_id, config_id) "
                      "DO UPDATE SET attributes=excluded.attributes, objective=excluded.objective, "
                      "base_objective=excluded.base_objective, gains=excluded.gains",
                      (user_id, pair_id, config_id, json.dumps(list(attributes)), objective, base_objective,
                       json.dumps(list(gains))))

    def all_selections(self) -> list[dict]:
        rows = self._rows("SELECT user_id, pair_id, config_id, attributes, objective, base_objective, gains "
                          "FROM selections ORDER BY user_id, pair_id, config_id")
        return [{"user_id": u, "pair_id": p, "config_id": c, "attributes": json.loads(a), "objective": o,
                 "base_objective": b, "gains": json.loads(g)} for u, p, c, a, o, b, g in rows]

    def export_selections(self, path: str | Path) -> int:
        """Write every selection as one JSON line each, sorted, into ``path``; returns how many.

        The file is written beside ``path`` and renamed into place, so a crash leaves the old file
        whole. With `import_selections` it carries indexing work to another machine: the selections
        are a few hundred bytes per pair, where the score cache behind them is megabytes.
        """
        import os

        path = Path(path)
        rows = self.all_selections()
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return len(rows)

    def import_selections(self, path: str | Path) -> int:
        """Add the selections of a file written by `export_selections`, all or none; a selection
        already stored is kept. Returns how many were new. A bad line raises `InputError` naming
        the file, the line and the field."""
        rows = read_selections(path)
        new = 0
        with self.transaction() as c:
            for o in rows:
                new += c.execute("INSERT INTO selections VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                                 (o["user_id"], o["pair_id"], o["config_id"], json.dumps(o["attributes"]),
                                  o["objective"], o["base_objective"], json.dumps(o["gains"]))).rowcount
        return new

    def pair_mark(self, user_id: str) -> int:
        """The user's newest pair so far (-1: none): give it to `put_entries` as ``keep_after``."""
        return self._value("SELECT COALESCE(MAX(seq), -1) FROM pairs WHERE user_id=?", (user_id,))

    def put_entries(self, user_id: str, entries: Sequence[Entry], replace_all: bool = False,
                    keep_after: int | None = None) -> None:
        """Write entries for a user; an entry replaces the one of the same prompt only when its
        objective is larger (EXACT keeps the best attribute set per distinct prompt).

        ``replace_all`` publishes a whole index of the user: the user's other entries go, except
        those of pairs stored after ``keep_after`` (a `pair_mark` taken when the index read its
        pairs): feedback given while an index ran keeps its entry."""
        with self.transaction() as c:
            if replace_all:
                c.execute("DELETE FROM entries WHERE user_id=? AND pair_id NOT IN "
                          "(SELECT pair_id FROM pairs WHERE user_id=? AND seq > ?)",
                          (user_id, user_id, keep_after if keep_after is not None else 1 << 62))
            for e in entries:
                h = sha(e.prompt)
                old = c.execute("SELECT objective FROM entries WHERE user_id=? AND prompt_hash=?",
                                (user_id, h)).fetchone()
                if old is not None and old[0] >= e.objective:
                    continue
                emb = np.asarray(e.embedding, dtype=np.float32)
                c.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (user_id, prompt_hash) "
                          "DO UPDATE SET prompt=excluded.prompt, pair_id=excluded.pair_id, "
                          "config_id=excluded.config_id, attributes=excluded.attributes, "
                          "objective=excluded.objective, base_objective=excluded.base_objective, "
                          "gains=excluded.gains, embedder=excluded.embedder, embedding=excluded.embedding",
                          (user_id, h, e.prompt, e.pair_id, e.config_id, json.dumps(e.attributes), e.objective,
                           e.base_objective, json.dumps(e.gains), e.embedder, emb.tobytes()))

    def entries(self, user_id: str) -> list[Entry]:
        self.require_user(user_id)
        rows = self._rows(
            "SELECT e.prompt, e.pair_id, e.attributes, e.objective, e.base_objective, e.gains, e.embedder, "
            "e.embedding, e.config_id FROM entries e JOIN pairs p ON p.user_id = e.user_id AND p.pair_id = e.pair_id "
            "WHERE e.user_id=? ORDER BY p.seq", (user_id,))
        return [Entry(user_id, pr, pid, json.loads(a), obj, base, json.loads(g), emb_name,
                      np.frombuffer(bytes(blob), dtype=np.float32), cfg)
                for pr, pid, a, obj, base, g, emb_name, blob, cfg in rows]

    # -- other methods' per-user state ------------------------------------------------------------
    def put_method_state(self, user_id: str, method: str, state_id: str, fingerprint: str, state: dict,
                         files: dict[str, bytes] | None = None, n_pairs: int | None = None) -> None:
        """Store a method's state for the user with its files (name -> bytes), all or nothing: a
        failure keeps the previous state and its files."""
        names = sorted(files or {})
        with self.transaction() as c:
            c.execute("INSERT INTO users(user_id) VALUES (?) ON CONFLICT DO NOTHING", (user_id,))
            c.execute("DELETE FROM method_files WHERE user_id=? AND method=? AND state_id=?",
                      (user_id, method, state_id))
            for name in names:
                c.execute("INSERT INTO method_files VALUES (?,?,?,?,?)",
                          (user_id, method, state_id, name, bytes(files[name])))
            c.execute("INSERT INTO method_states VALUES (?,?,?,?,?,?,?,0,?) ON CONFLICT (user_id, method, state_id) "
                      "DO UPDATE SET fingerprint=excluded.fingerprint, state=excluded.state, files=excluded.files, "
                      "n_pairs=excluded.n_pairs, stale=0, updated=excluded.updated",
                      (user_id, method, state_id, fingerprint, json.dumps(state), json.dumps(names), n_pairs,
                       time.time()))

    def method_state(self, user_id: str, method: str, state_id: str) -> dict | None:
        """The state, with ``"files"``: name -> bytes."""
        row = self._one("SELECT state, n_pairs, stale, updated FROM method_states "
                        "WHERE user_id=? AND method=? AND state_id=?", (user_id, method, state_id))
        if row is None:
            return None
        files = {n: bytes(d) for n, d in self._rows(
            "SELECT name, data FROM method_files WHERE user_id=? AND method=? AND state_id=?",
            (user_id, method, state_id))}
        return {"state": json.loads(row[0]), "files": files, "n_pairs": row[1], "stale": bool(row[2]),
                "updated": row[3]}

    def method_states(self, user_id: str) -> list[dict]:
        """Every stored method state of the user (any state id), newest first."""
        rows = self._rows("SELECT method, state_id, fingerprint, n_pairs, stale, updated FROM method_states "
                          "WHERE user_id=? ORDER BY updated DESC", (user_id,))
        return [{"method": m, "state_id": s, "fingerprint": f, "n_pairs": n, "stale": bool(st), "updated": u}
                for m, s, f, n, st, u in rows]

    def mark_stale(self, user_id: str, method: str | None = None) -> int:
        """Mark the user's stored states (of ``method``, or all) as not covering every pair."""
        with self.transaction() as c:
            q = "UPDATE method_states SET stale=1 WHERE user_id=?" + (" AND method=?" if method else "")
            return c.execute(q, (user_id, method) if method else (user_id,)).rowcount

    # -- score cache ------------------------------------------------------------------------------
    def cached_scores(self, keys: Sequence[str]) -> dict[str, Score]:
        out: dict[str, Score] = {}
        for i in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = list(keys[i:i + 500])
            q = f"SELECT key, logprob, n_tokens FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
            out.update({k: Score(lp, n) for k, lp, n in self._rows(q, chunk)})
        return out

    def put_scores(self, items: dict[str, Score]) -> None:
        with self.transaction() as c:
            for k, s in items.items():
                c.execute("INSERT INTO scores VALUES (?,?,?) ON CONFLICT (key) DO UPDATE SET "
                          "logprob=excluded.logprob, n_tokens=excluded.n_tokens", (k, s.logprob, s.n_tokens))

    # -- API keys ---------------------------------------------------------------------------------
    def create_key(self, tenant: str) -> dict[str, Any]:
        """A new key for ``tenant``: ``{"key", "key_id", "tenant", "created"}``; only its hash is kept."""
        key = "ps-" + secrets.token_urlsafe(32)
        key_id = "key-" + secrets.token_hex(6)
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT INTO api_keys VALUES (?,?,?,?,NULL)", (hash_key(key), tenant, key_id, now))
        return {"key": key, "key_id": key_id, "tenant": tenant, "created": now}

    def list_keys(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT key_id, tenant, created, revoked FROM api_keys ORDER BY created")
        return [{"key_id": k, "tenant": t, "created": c, "revoked": r} for k, t, c, r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self.transaction() as c:
            return c.execute("UPDATE api_keys SET revoked=? WHERE key_id=? AND revoked IS NULL",
                             (time.time(), key_id)).rowcount > 0

    def tenant_of(self, key: str) -> str | None:
        """The tenant of a valid, unrevoked key, else None. The lookup is by hash: the time it takes
        says nothing about the key."""
        return self._value("SELECT tenant FROM api_keys WHERE key_hash=? AND revoked IS NULL", (hash_key(key),))

    def count_keys(self) -> int:
        return self._value("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL")

    # -- the job queue ------------------------------------------------------------------------------
    def add_job(self, tenant: str | None, user_id: str, pair_ids: list[str]) -> str:
        """Queue a job (inside the caller's transaction when there is one)."""
        job_id = "job-" + uuid.uuid4().hex
        with self.transaction() as c:
            c.execute("INSERT INTO jobs(job_id, tenant, user_id, status, pair_ids, created) VALUES (?,?,?,?,?,?)",
                      (job_id, tenant or "", user_id, "queued", json.dumps(pair_ids), time.time()))
        return job_id

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self._one(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE job_id=?", (job_id,))
        if row is None:
            return None
        job = dict(zip(_JOB_COLUMNS, row))
        job.update(tenant=job["tenant"] or None, pair_ids=json.loads(job["pair_ids"]), result=json.loads(job["result"]))
        return job

    def _claimable(self, c, now: float) -> list[tuple[str, str, str]]:
        """Jobs that may be claimed now, the fairest first: the tenant served longest ago, then the
        oldest job. (PostgreSQL locks the rows it returns and skips those locked by others.)"""
        return c.execute(
            "SELECT j.job_id, j.tenant, j.user_id FROM jobs j LEFT JOIN "
            "(SELECT tenant, MAX(served) AS last FROM jobs GROUP BY tenant) t ON t.tenant = j.tenant "
            "WHERE j.status='queued' OR (j.status='running' AND (j.lease_until IS NULL OR j.lease_until < ?)) "
            "ORDER BY COALESCE(t.last, 0), j.created LIMIT 32" + self._skip_locked, (now,)).fetchall()

    _skip_locked = ""  # PostgreSQL: " FOR UPDATE OF j SKIP LOCKED"

    def claim_job(self, owner: str, lease_seconds: float) -> dict[str, Any] | None:
        """Take the next job for ``owner`` (a replica's worker), atomically: the job and its user are
        leased to ``owner`` until ``lease_seconds`` from now. A job whose lease ran out (its replica
        died) is claimable again; a job of a user whose pairs another live worker is selecting is
        not. None when there is nothing to do."""
        now = time.time()
        until = now + lease_seconds
        with self.transaction() as c:
            for job_id, _tenant, user_id in self._claimable(c, now):
                if not self._lease_user(c, user_id, owner, now, until):
                    continue
                c.execute("UPDATE jobs SET status='running', owner=?, lease_until=?, served=?, "
                          "started=COALESCE(started, ?) WHERE job_id=?", (owner, until, now, now, job_id))
                break
            else:
                return None
        return self.job(job_id)

    @staticmethod
    def _lease_user(c, user_id: str, owner: str, now: float, until: float) -> bool:
        return c.execute("INSERT INTO user_leases VALUES (?,?,?) ON CONFLICT (user_id) DO UPDATE SET "
                         "owner=excluded.owner, lease_until=excluded.lease_until "
                         "WHERE user_leases.lease_until < ? OR user_leases.owner = excluded.owner",
                         (user_id, owner, until, now)).rowcount > 0

    def renew_lease(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease on the job and its user; False when the lease was lost (the job
        was taken over, or its user deleted): the worker then stops working on it."""
        now = time.time()
        until = now + lease_seconds
        with self.transaction() as c:
            n = c.execute("UPDATE jobs SET lease_until=?, served=? WHERE job_id=? AND owner=? AND status='running'",
                          (until, now, job_id, owner)).rowcount
            if n:
                c.execute("UPDATE user_leases SET lease_until=? WHERE owner=? AND user_id="
                          "(SELECT user_id FROM jobs WHERE job_id=?)", (until, owner, job_id))
        return n > 0

    def update_job(self, job_id: str, *, holder: str | None = None, **fields: Any) -> bool:
        """Set columns of a job (only while ``holder`` holds its lease, when given); False when the
        job is gone (its user was deleted) or no longer ``holder``'s."""
        if "result" in fields:
            fields["result"] = json.dumps(fields["result"])
        cols = ", ".join(f"{k}=?" for k in fields)
        q, args = f"UPDATE jobs SET {cols} WHERE job_id=?", [*fields.values(), job_id]
        if holder is not None:
            q, args = q + " AND owner=?", args + [holder]
        with self.transaction() as c:
            return c.execute(q, args).rowcount > 0

    def release_job(self, job_id: str, owner: str, **fields: Any) -> bool:
        """``owner`` lets the job go (finished, failed, or back to the queue with ``status='queued'``):
        the job's and its user's leases end with it."""
        with self.transaction() as c:
            ok = self.update_job(job_id, holder=owner, owner=None, lease_until=None, **fields)
            c.execute("DELETE FROM user_leases WHERE owner=? AND user_id=(SELECT user_id FROM jobs WHERE job_id=?)",
                      (owner, job_id))
        return ok

    def others_waiting(self, tenant: str | None) -> bool:
        """Whether another tenant has a job waiting (the worker then yields between pairs)."""
        return self._one("SELECT 1 FROM jobs WHERE tenant<>? AND (status='queued' OR (status='running' AND "
                         "(lease_until IS NULL OR lease_until < ?))) LIMIT 1", (tenant or "", time.time())) is not None

    def pending_jobs(self, user_id: str) -> list[str]:
        return [r[0] for r in self._rows("SELECT job_id FROM jobs WHERE user_id=? AND status IN ('queued','running') "
                                         "ORDER BY created", (user_id,))]

    def queue_depth(self) -> dict[str, int]:
        """Jobs queued or running, by tenant ("" for the local namespace)."""
        return dict(self._rows("SELECT tenant, COUNT(*) FROM jobs WHERE status IN ('queued','running') "
                               "GROUP BY tenant ORDER BY tenant"))

    # -- copying a whole memory (`prefsteer db copy`) -----------------------------------------------
    def columns(self, table: str) -> list[str]:
        with self.transaction() as c:
            return [d[0] for d in c.execute(f"SELECT * FROM {table} LIMIT 0").description]

    def dump(self, table: str, batch: int = 500) -> Iterator[list[tuple]]:
        """Every row of ``table`` (in primary-key order), ``batch`` rows at a time."""
        cols, key = self.columns(table), ", ".join(_PRIMARY_KEYS[table])
        offset = 0
        while True:
            rows = self._rows(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {key} LIMIT ? OFFSET ?",
                              (batch, offset))
            if not rows:
                return
            yield [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]
            offset += len(rows)

    def load(self, table: str, columns: Sequence[str], rows: Sequence[tuple]) -> None:
        marks = ",".join("?" * len(columns))
        with self.transaction() as c:
            for r in rows:
                c.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", r)


def read_selections(path: str | Path) -> list[dict]:
    """The selections of a file written by `Memory.export_selections` (a run's ``selections.jsonl``),
    checked line by line: a bad line raises `InputError` naming the file, the line and the field."""
    from prefsteer.errors import InputError

    rows = []
    text = Path(path).read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", file=str(path), line=i) from None
        if not isinstance(obj, dict):
            raise InputError("expected a JSON object", file=str(path), line=i)
        for name, kind in (("user_id", str), ("pair_id", str), ("config_id", str), ("attributes", list),
                           ("objective", (int, float)), ("base_objective", (int, float)), ("gains", list)):
            if not isinstance(obj.get(name), kind):
                raise InputError("missing or of the wrong type", file=str(path), line=i, field=name)
        obj["objective"], obj["base_objective"] = float(obj["objective"]), float(obj["base_objective"])
        rows.append(obj)
    return rows


def copy_memory(src: Memory, dst: Memory, batch: int = 500) -> dict[str, int]:
    """Copy every row of ``src`` into ``dst``, which must be empty, in one transaction of ``dst``;
    the row counts of both are compared before it commits. Returns the rows copied per table."""
    from prefsteer.errors import PrefsteerError

    held = {t: n for t, n in dst.table_counts().items() if n}
    if held:
        raise PrefsteerError(f"{dst.path} is not empty ({', '.join(f'{n} {t}' for t, n in held.items())}): "
                             "copy into a new database")
    want = src.table_counts()
    with dst.transaction():
        for table in TABLES:
            cols = src.columns(table)
            for rows in src.dump(table, batch):
                dst.load(table, cols, rows)
        got = dst.table_counts()
        if got != want:
            diff = ", ".join(f"{t}: {want[t]} -> {got[t]}" for t in TABLES if want[t] != got[t])
            raise PrefsteerError(f"the copy's row counts differ ({diff}); nothing was written to {dst.path}")
    return got
