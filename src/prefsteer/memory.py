"""The user memory: one SQLite file holding users, their pairs, EXACT's index and the score cache.

Tables
    users       user_id, status ('indexing' while an indexing run is under way, 'ready' after)
    pairs       every preference pair a user gave (the raw feedback)
    selections  one attribute selection per (user, pair, index config): the resumable work log
    entries     what online retrieval reads: per (user, prompt), the best selection and the
                prompt's embedding. Published for a user in one transaction when all their pairs
                are selected, so a crash never leaves a half-written user.
    scores      the score cache: log p(continuation | context) keyed by model fingerprint, chat
                template, messages (prompt + attribute line) and continuation

    >>> mem = Memory("memory.db")
    >>> mem.add_pairs(pairs)
    >>> mem.entries("alice")
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from prefsteer.backends.base import Score, ScoreRequest
from prefsteer.errors import UnknownUserError
from prefsteer.paths import default_db_path
from prefsteer.types import PreferencePair

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
    meta TEXT NOT NULL DEFAULT '{}',
    seq INTEGER NOT NULL,
    PRIMARY KEY (user_id, pair_id)
);
CREATE TABLE IF NOT EXISTS selections (
    user_id TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    config_id TEXT NOT NULL,
    attributes TEXT NOT NULL,
    objective REAL NOT NULL,
    base_objective REAL NOT NULL,
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
    objective REAL NOT NULL,
    base_objective REAL NOT NULL,
    gains TEXT NOT NULL,
    embedder TEXT NOT NULL,
    embedding BLOB NOT NULL,
    PRIMARY KEY (user_id, prompt_hash)
);
CREATE TABLE IF NOT EXISTS method_states (
    user_id TEXT NOT NULL,
    method TEXT NOT NULL,
    state_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    files TEXT NOT NULL DEFAULT '[]',
    n_pairs INTEGER,
    stale INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (user_id, method, state_id)
);
CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,
    logprob REAL NOT NULL,
    n_tokens INTEGER NOT NULL
);
"""


def sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


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




class Memory:
    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path is not None else str(default_db_path())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # one connection, used from the thread that made it or under the lock (HTTP service)
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: nested uses join the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
            finally:
                self._depth = 0

    # -- users and pairs ------------------------------------------------------------------
    def users(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT user_id FROM users ORDER BY user_id")]

    def user_status(self, user_id: str) -> str:
        row = self.conn.execute("SELECT status FROM users WHERE user_id=?", (user_id,)).fetchone()
        if row is None:
            raise UnknownUserError(user_id, self.users())
        return row[0]

    def require_user(self, user_id: str) -> None:
        self.user_status(user_id)

    def set_status(self, user_id: str, status: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE users SET status=? WHERE user_id=?", (status, user_id))

    def add_pairs(self, pairs: Sequence[PreferencePair]) -> int:
        """Store pairs (all or none); a pair already stored under the same id is left as it is.
        Returns how many were new."""
        new = 0
        with self.transaction() as c:
            for p in pairs:
                c.execute("INSERT OR IGNORE INTO users(user_id) VALUES (?)", (p.user_id,))
                seq = c.execute("SELECT COUNT(*) FROM pairs WHERE user_id=?", (p.user_id,)).fetchone()[0]
                cur = c.execute(
                    "INSERT OR IGNORE INTO pairs(user_id, pair_id, prompt, chosen, rejected, meta, seq) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (p.user_id, p.pair_id, p.prompt, p.chosen, p.rejected, json.dumps(p.meta), seq))
                new += cur.rowcount
        return new

    def pairs(self, user_id: str) -> list[PreferencePair]:
        self.require_user(user_id)
        rows = self.conn.execute("SELECT pair_id, prompt, chosen, rejected, meta FROM pairs "
                                 "WHERE user_id=? ORDER BY seq", (user_id,))
        return [PreferencePair(user_id, pr, ch, rj, pid, json.loads(meta)) for pid, pr, ch, rj, meta in rows]

    # -- EXACT's selections and entries ---------------------------------------------------
    def selection(self, user_id: str, pair_id: str, config_id: str) -> dict | None:
        row = self.conn.execute("SELECT attributes, objective, base_objective, gains FROM selections "
                                "WHERE user_id=? AND pair_id=? AND config_id=?",
                                (user_id, pair_id, config_id)).fetchone()
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
                for c, a, o, b, g in self.conn.execute(q, (user_id, pair_id, *config_ids))}

    def put_selection(self, user_id: str, pair_id: str, config_id: str, attributes: Sequence[str],
                      objective: float, base_objective: float, gains: Sequence[float]) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO selections VALUES (?,?,?,?,?,?,?)",
                      (user_id, pair_id, config_id, json.dumps(list(attributes)), objective,
                       base_objective, json.dumps(list(gains))))

    def export_selections(self, path: str | Path) -> int:
        """Write every selection as one JSON line each, sorted, into ``path``; returns how many.

        The file is written beside ``path`` and renamed into place, so a crash leaves the old file
        whole. With `import_selections` it carries indexing work to another machine: the selections
        are a few hundred bytes per pair, where the score cache behind them is megabytes.
        """
        path = Path(path)
        rows = self.conn.execute("SELECT user_id, pair_id, config_id, attributes, objective, base_objective, "
                                 "gains FROM selections ORDER BY user_id, pair_id, config_id").fetchall()
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for user, pair, cfg, attrs, obj, base, gains in rows:
                fh.write(json.dumps({"user_id": user, "pair_id": pair, "config_id": cfg,
                                     "attributes": json.loads(attrs), "objective": obj,
                                     "base_objective": base, "gains": json.loads(gains)},
                                    ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return len(rows)

    def import_selections(self, path: str | Path) -> int:
        """Add the selections of a file written by `export_selections`, all or none; a selection
        already stored is kept. Returns how many were new. A bad line raises `InputError` naming
        the file, the line and the field."""
        rows = [(o["user_id"], o["pair_id"], o["config_id"], json.dumps(o["attributes"]), o["objective"],
                 o["base_objective"], json.dumps(o["gains"])) for o in read_selections(path)]
        with self.transaction() as c:
            before = c.execute("SELECT COUNT(*) FROM selections").fetchone()[0]
            c.executemany("INSERT OR IGNORE INTO selections VALUES (?,?,?,?,?,?,?)", rows)
            return c.execute("SELECT COUNT(*) FROM selections").fetchone()[0] - before

    def put_entries(self, user_id: str, entries: Sequence[Entry], replace_all: bool = False) -> None:
        """Write entries for a user; an entry replaces the one of the same prompt only when its
        objective is larger (EXACT keeps the best attribute set per distinct prompt)."""
        with self.transaction() as c:
            if replace_all:
                c.execute("DELETE FROM entries WHERE user_id=?", (user_id,))
            for e in entries:
                h = sha(e.prompt)
                old = c.execute("SELECT objective FROM entries WHERE user_id=? AND prompt_hash=?",
                                (user_id, h)).fetchone()
                if old is not None and old[0] >= e.objective:
                    continue
                emb = np.asarray(e.embedding, dtype=np.float32)
                c.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (user_id, h, e.prompt, e.pair_id, e.config_id, json.dumps(e.attributes),
                           e.objective, e.base_objective, json.dumps(e.gains), e.embedder, emb.tobytes()))

    def entries(self, user_id: str) -> list[Entry]:
        self.require_user(user_id)
        rows = self.conn.execute(
            "SELECT e.prompt, e.pair_id, e.attributes, e.objective, e.base_objective, e.gains, e.embedder, "
            "e.embedding, e.config_id FROM entries e JOIN pairs p USING (user_id, pair_id) "
            "WHERE e.user_id=? ORDER BY p.seq",
            (user_id,))
        return [Entry(user_id, pr, pid, json.loads(a), obj, base, json.loads(g), emb_name,
                      np.frombuffer(blob, dtype=np.float32), cfg)
                for pr, pid, a, obj, base, g, emb_name, blob, cfg in rows]

    # -- other methods' per-user state ------------------------------------------------------
    def state_dir(self, user_id: str) -> Path:
        """Where a user's method files (Reward's adapter weights) live: beside the database, in a
        folder per user named by a hash of the id (any id is a safe name)."""
        if self.path == ":memory:":
            raise ValueError("an in-memory database keeps no method files")
        return Path(self.path).parent / f"{Path(self.path).name}.d" / sha(user_id)[:24]

    def put_method_state(self, user_id: str, method: str, state_id: str, fingerprint: str, state: dict,
                         files: dict[str, bytes] | None = None, n_pairs: int | None = None) -> None:
        """Store a method's state for the user; its files are written (and fsynced) first, under
        names unique to this state, so the row never points at a half-written file."""
        import time

        names = []
        if files:
            d = self.state_dir(user_id)
            d.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                fname = f"{method}-{state_id}-{name}"
                tmp = d / f".{fname}.tmp"
                with tmp.open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, d / fname)
                names.append(fname)
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO users(user_id) VALUES (?)", (user_id,))
            c.execute("INSERT OR REPLACE INTO method_states VALUES (?,?,?,?,?,?,?,0,?)",
                      (user_id, method, state_id, fingerprint, json.dumps(state), json.dumps(names),
                       n_pairs, time.time()))

    def method_state(self, user_id: str, method: str, state_id: str) -> dict | None:
        row = self.conn.execute("SELECT state, files, n_pairs, stale, updated FROM method_states "
                                "WHERE user_id=? AND method=? AND state_id=?",
                                (user_id, method, state_id)).fetchone()
        if row is None:
            return None
        d = self.state_dir(user_id) if self.path != ":memory:" else None
        files = {n.split("-", 2)[2]: str(d / n) for n in json.loads(row[1])} if d else {}
        return {"state": json.loads(row[0]), "files": files, "n_pairs": row[2], "stale": bool(row[3]),
                "updated": row[4]}

    def method_states(self, user_id: str) -> list[dict]:
        """Every stored method state of the user (any state id), newest first."""
        rows = self.conn.execute("SELECT method, state_id, fingerprint, n_pairs, stale, updated FROM "
                                 "method_states WHERE user_id=? ORDER BY updated DESC", (user_id,))
        return [{"method": m, "state_id": s, "fingerprint": f, "n_pairs": n, "stale": bool(st), "updated": u}
                for m, s, f, n, st, u in rows]

    def mark_stale(self, user_id: str, method: str | None = None) -> int:
        """Mark the user's stored states (of ``method``, or all) as not covering every pair."""
        with self.transaction() as c:
            q = "UPDATE method_states SET stale=1 WHERE user_id=?" + (" AND method=?" if method else "")
            return c.execute(q, (user_id, method) if method else (user_id,)).rowcount

    # -- score cache ----------------------------------------------------------------------
    def cached_scores(self, keys: Sequence[str]) -> dict[str, Score]:
        out: dict[str, Score] = {}
        for i in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[i:i + 500]
            q = f"SELECT key, logprob, n_tokens FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
            out.update({k: Score(lp, n) for k, lp, n in self.conn.execute(q, chunk)})
        return out

    def put_scores(self, items: dict[str, Score]) -> None:
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?)",
                          [(k, s.logprob, s.n_tokens) for k, s in items.items()])


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


class ScoreCache:
    """A backend wrapper that answers repeated score requests from the memory's cache.

    Only the misses reach the backend, in one call, so they still share their prefix."""

    def __init__(self, backend, memory: Memory):
        self.backend, self.memory = backend, memory
        self.hits = self.misses = 0

    def key(self, req: ScoreRequest) -> str:
        return sha(self.backend.fingerprint, self.backend.template_id, req.messages, req.continuation)

    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False) -> list[Score]:
        keys = [self.key(r) for r in requests]
        found = self.memory.cached_scores(list(dict.fromkeys(keys)))
        todo = {k: r for k, r in zip(keys, requests) if k not in found}
        self.hits += len(requests) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = dict(zip(todo, self.backend.score(list(todo.values()), progress=progress)))
            self.memory.put_scores(fresh)
            found.update(fresh)
        return [found[k] for k in keys]
