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
    method_states  every other method's per-user state (see `Method.save_state`)

A pair's identity is its content: `pair_key` of (user, prompt, chosen, rejected), unless the data
gives an explicit id; the same pair given twice is stored once, and a pair stored under an explicit
id whose text changed is updated and selected again. The file carries its schema version in
``PRAGMA user_version``: an older file is migrated in one transaction, a newer one refused. Every
failure of the file itself (not a database, truncated, read-only, a directory, an unwritable
place) is a `MemoryFileError` naming the path and what to do.

    >>> mem = Memory("memory.db")
    >>> mem.add_pairs(pairs)
    >>> mem.entries("alice")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from prefsteer.backends.base import Score
from prefsteer.errors import MemoryFileError, MemoryNotFoundError, StateFileError, UnknownUserError
from prefsteer.paths import default_db_path
from prefsteer.types import PreferencePair

SCHEMA_VERSION = 1  # 0: before versioning (pairs keyed by file stem and line)

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


def pair_key(user_id: str, prompt: str, chosen: str, rejected: str) -> str:
    """A pair's identity by content: the same four texts give the same key, any change another."""
    return "c" + sha("pair", user_id, prompt, chosen, rejected)[:23]


def with_id(p: PreferencePair) -> PreferencePair:
    """``p`` with its content key as ``pair_id`` when it has no id of its own."""
    if p.pair_id:
        return p
    return dataclasses.replace(p, pair_id=pair_key(p.user_id, p.prompt, p.chosen, p.rejected))


# ids that today's loaders no longer give: "<file stem>:<line>" and "feedback:<milliseconds>"
_V0_LINE_ID = re.compile(r"^[^:\s]+:\d+$")


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




class _Conn:
    """The connection, with SQLite's failures of the file itself turned into `MemoryFileError`."""

    def __init__(self, conn: sqlite3.Connection, path: str):
        self._conn, self._path = conn, path

    def _wrap(self, fn, *a):
        try:
            return fn(*a)
        except sqlite3.DatabaseError as e:
            raise _file_error(self._path, e) from e

    def execute(self, *a):
        return self._wrap(self._conn.execute, *a)

    def executemany(self, *a):
        return self._wrap(self._conn.executemany, *a)

    def executescript(self, *a):
        return self._wrap(self._conn.executescript, *a)

    def close(self) -> None:
        self._conn.close()

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction


def _file_error(path: str, e: sqlite3.DatabaseError) -> Exception:
    """What to tell the user about an SQLite error; errors of prefsteer's own SQL stay bugs."""
    msg = str(e)
    low = msg.lower()
    if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return e
    if "readonly" in low or "read-only" in low:
        return MemoryFileError(path, "is read-only", "make it writable (chmod u+w) or give another --db")
    if "locked" in low or "busy" in low:
        return MemoryFileError(path, "is locked by another process", "wait for it to finish, or give another --db")
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return MemoryFileError(path, f"is not a readable prefsteer memory ({msg}): the file is corrupt or "
                               "truncated", "move it away (a new one is made) or give another --db")
    if "unable to open" in low or "disk i/o" in low or "full" in low:
        return MemoryFileError(path, f"cannot be opened or written ({msg})",
                               "check the location is writable and has space, or give another --db")
    if type(e) is sqlite3.DatabaseError:
        return MemoryFileError(path, f"is unusable ({msg})", "move it away or give another --db")
    return e


class Memory:
    def __init__(self, path: str | Path | None = None, *, create: bool = True):
        """Open (and with ``create``, make if missing) the memory at ``path`` (default: `default_db_path`).

        ``create=False`` is for queries: a missing file is `MemoryNotFoundError` and nothing is
        created, neither the file nor its folder."""
        self.path = str(path) if path is not None else str(default_db_path())
        self._lock = threading.RLock()
        self._depth = 0
        if not self.path.strip():
            raise MemoryFileError("''", "is an empty path",
                                  "give the memory's file path, e.g. --db memory.db")
        if self.path != ":memory:":
            self._check_location(create)
        target, uri = self.path, False
        if not create and self.path != ":memory:":
            # SQLite's mode=rw never creates the file, even if it goes away after the check above
            target, uri = Path(self.path).absolute().as_uri() + "?mode=rw", True
        # one connection, used from the thread that made it or under the lock (HTTP service)
        try:
            raw = sqlite3.connect(target, check_same_thread=False, isolation_level=None, uri=uri)
        except sqlite3.Error as e:
            raise _file_error(self.path, e) from e
        self.conn = _Conn(raw, self.path)
        try:
            self._open()
        except BaseException:
            raw.close()
            raise

    def _check_location(self, create: bool = True) -> None:
        """Refuse, before SQLite creates or touches anything, a path that cannot hold the memory."""
        p = Path(self.path)
        if p.is_dir():
            raise MemoryFileError(self.path, "is a directory", f"give a file path, e.g. --db {p / 'memory.db'}")
        if not create and not p.exists():
            raise MemoryNotFoundError(self.path, "nothing was created; give the --db that holds the users "
                                      "(or PREFSTEER_DB), or index some pairs into it first (prefsteer index)")
        if p.exists():
            st = p.stat()
            if not os.access(p, os.W_OK) or not st.st_mode & 0o222:
                raise MemoryFileError(self.path, "is read-only",
                                      "make it writable (chmod u+w) or copy it and give the copy as --db")
            if st.st_size and st.st_size < 100:  # shorter than SQLite's header
                raise MemoryFileError(self.path, f"is not a prefsteer memory ({st.st_size} bytes: truncated or "
                                      "another kind of file)", "move it away (a new one is made) or give another --db")
            if not os.access(p.parent, os.W_OK):
                raise MemoryFileError(self.path, f"sits in a folder that is not writable ({p.parent}), where "
                                      "SQLite keeps its journal", "make the folder writable or give another --db")
            return
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemoryFileError(self.path, f"cannot be created ({e.strerror}: {e.filename})",
                                  "give a --db in a writable location") from None
        if not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
            raise MemoryFileError(self.path, f"cannot be created: {p.parent} is not a writable folder",
                                  "give a --db in a writable location")

    def _open(self) -> None:
        c = self.conn
        # reading the header first: a file that is not a database fails here, before anything is written
        version = c.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if self.path != ":memory:" and Path(self.path).exists():
            size = os.path.getsize(self.path)
            page_size = c.execute("PRAGMA page_size").fetchone()[0]
            pages = c.execute("PRAGMA page_count").fetchone()[0]
            if not Path(self.path + "-wal").exists() and size < page_size * pages:
                raise MemoryFileError(self.path, f"is truncated ({size} of {page_size * pages} bytes)",
                                      "restore it from a copy, or move it away (a new one is made)")
        if version > SCHEMA_VERSION:
            raise MemoryFileError(self.path, f"was written by a newer prefsteer (memory schema {version}; this "
                                  f"one reads up to {SCHEMA_VERSION})", "upgrade prefsteer, or give another --db")
        c.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        c.execute("PRAGMA synchronous=NORMAL")
        if version == SCHEMA_VERSION:
            c.executescript(SCHEMA)  # tables a file of this version may lack are created; no-op otherwise
            return
        with self.transaction() as t:
            if version == 0 and "pairs" in tables:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        t.execute(stmt)
                self._migrate_v0(t)
            else:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        t.execute(stmt)
            t.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _migrate_v0(c) -> None:
        """Schema 0 -> 1: pairs keyed "<file stem>:<line>" (or "feedback:<ms>") are re-keyed by their
        content, with their selections and entries; two such rows of the same content become one."""
        rows = c.execute("SELECT user_id, pair_id, prompt, chosen, rejected, seq FROM pairs ORDER BY user_id, seq"
                         ).fetchall()
        for user, old, prompt, chosen, rejected, _seq in rows:
            if not _V0_LINE_ID.match(old):
                continue  # an id the user gave
            new = pair_key(user, prompt, chosen, rejected)
            args = (new, user, old)
            c.execute("UPDATE OR IGNORE pairs SET pair_id=? WHERE user_id=? AND pair_id=?", args)
            c.execute("DELETE FROM pairs WHERE user_id=? AND pair_id=?", (user, old))
            c.execute("UPDATE OR IGNORE selections SET pair_id=? WHERE user_id=? AND pair_id=?", args)
            c.execute("DELETE FROM selections WHERE user_id=? AND pair_id=?", (user, old))
            c.execute("UPDATE entries SET pair_id=? WHERE user_id=? AND pair_id=?", args)

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

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

    def has_user(self, user_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM users WHERE user_id=?", (user_id,)).fetchone() is not None

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

    def add_pairs(self, pairs: Sequence[PreferencePair]) -> dict[str, int]:
        """Store pairs, all or none: ``{"added", "kept", "updated"}``. A pair is keyed by its id
        (`with_id`: its content when it has no id of its own); one already stored with the same text
        is kept as it is, so the same pair given twice is stored once. One stored under the same
        explicit id with other text is updated, and its selections dropped: it is selected again."""
        counts = {"added": 0, "kept": 0, "updated": 0}
        with self.transaction() as c:
            for p in map(with_id, pairs):
                c.execute("INSERT OR IGNORE INTO users(user_id) VALUES (?)", (p.user_id,))
                old = c.execute("SELECT prompt, chosen, rejected FROM pairs WHERE user_id=? AND pair_id=?",
                                (p.user_id, p.pair_id)).fetchone()
                if old is not None:
                    if tuple(old) == (p.prompt, p.chosen, p.rejected):
                        counts["kept"] += 1
                        continue
                    c.execute("UPDATE pairs SET prompt=?, chosen=?, rejected=?, meta=? WHERE user_id=? AND pair_id=?",
                              (p.prompt, p.chosen, p.rejected, json.dumps(p.meta), p.user_id, p.pair_id))
                    c.execute("DELETE FROM selections WHERE user_id=? AND pair_id=?", (p.user_id, p.pair_id))
                    c.execute("DELETE FROM entries WHERE user_id=? AND pair_id=?", (p.user_id, p.pair_id))
                    counts["updated"] += 1
                    continue
                seq = c.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM pairs WHERE user_id=?",
                                (p.user_id,)).fetchone()[0]
                c.execute("INSERT INTO pairs(user_id, pair_id, prompt, chosen, rejected, meta, seq) "
                          "VALUES (?,?,?,?,?,?,?)",
                          (p.user_id, p.pair_id, p.prompt, p.chosen, p.rejected, json.dumps(p.meta), seq))
                counts["added"] += 1
        return counts

    def pairs(self, user_id: str) -> list[PreferencePair]:
        self.require_user(user_id)
        rows = self.conn.execute("SELECT pair_id, prompt, chosen, rejected, meta FROM pairs "
                                 "WHERE user_id=? ORDER BY seq", (user_id,))
        return [PreferencePair(user_id, pr, ch, rj, pid, json.loads(meta)) for pid, pr, ch, rj, meta in rows]

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
        """Remove everything stored about the user: rows per table, and ``"files"``: the method
        files of their state folder. Unknown users raise `UnknownUserError`."""
        self.require_user(user_id)
        out: dict[str, int] = {}
        with self.transaction() as c:
            for table in ("pairs", "selections", "entries", "method_states", "users"):
                out[table] = c.execute(f"DELETE FROM {table} WHERE user_id=?", (user_id,)).rowcount
        out["files"] = 0
        if self.path != ":memory:":
            d = self.state_dir(user_id)
            if d.is_dir():
                out["files"] = sum(1 for f in d.rglob("*") if f.is_file())
                shutil.rmtree(d)
        return out

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
        names unique to this state, so the row never points at a half-written file.

        All or nothing: every file goes to a temporary name first and is renamed into place only
        when all of them are written; a failure (a full disk) removes the temporary files, keeps the
        previous state (files and row) and raises `StateFileError` naming the file and the OS error."""
        import time

        names = []
        if files:
            d = self.state_dir(user_id)
            written: list[tuple[Path, Path]] = []  # (temporary, final)
            target = d
            try:
                d.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    fname = f"{method}-{state_id}-{name}"
                    target, tmp = d / fname, d / f".{fname}.tmp"
                    written.append((tmp, target))
                    with tmp.open("wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    names.append(fname)
            except OSError as e:
                for tmp, _ in written:
                    try:
                        tmp.unlink(missing_ok=True)
                    except OSError:
                        pass
                raise StateFileError(str(target), e) from e
            for tmp, final in written:
                os.replace(tmp, final)
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

