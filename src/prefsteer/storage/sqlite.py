"""The embedded memory: one SQLite file (the default; nothing to install or run).

The file is marked as prefsteer's by SQLite's ``application_id`` and carries its schema version in
``user_version``: an older prefsteer file is migrated in one transaction, a newer one refused, and a
file of another application (or a database with other tables) refused untouched: nothing is added to
it and its journal mode is left as it was. Every failure of the file itself (not a database,
truncated, read-only, a directory, an unwritable place) is a `MemoryFileError` naming the path and
what to do. One connection serves every thread, under a lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from prefsteer.errors import MemoryFileError, MemoryNotFoundError
from prefsteer.storage.base import SCHEMA_VERSION, TABLES, Memory, schema_statements
from prefsteer.types import pair_key, sha

APPLICATION_ID = 0x70737472  # "pstr"
STATEMENTS = schema_statements(blob="BLOB", real="REAL", integer="INTEGER")
# ids that today's loaders no longer give: "<file stem>:<line>" and "feedback:<milliseconds>"
_V0_LINE_ID = re.compile(r"^[^:\s]+:\d+$")


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


class SQLiteMemory(Memory):
    def __init__(self, path: str | Path | None = None, *, create: bool = True):
        from prefsteer.paths import default_db_path

        self.path = self.db = str(path) if path is not None else str(default_db_path())
        self._lock = threading.RLock()
        self._depth = 0
        if not self.path.strip():
            raise MemoryFileError("''", "is an empty path", "give the memory's file path, e.g. --db memory.db")
        if self.path != ":memory:":
            self._check_location(create)
        target, uri = self.path, False
        if not create and self.path != ":memory:":
            # SQLite's mode=rw never creates the file, even if it goes away after the check above
            target, uri = Path(self.path).absolute().as_uri() + "?mode=rw", True
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
        app = c.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self._refuse_foreign(app, tables)
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
        c.execute("PRAGMA secure_delete=ON")  # a deleted user's text is overwritten, not left in free pages
        if version == SCHEMA_VERSION and app == APPLICATION_ID:
            for stmt in STATEMENTS:  # tables a file of this version may lack are created; no-op otherwise
                c.execute(stmt)
            return
        moved: Path | None = None
        with self.transaction() as t:
            if version == 0 and "pairs" in tables:
                self._create(t, tables)
                self._migrate_v0(t)
            else:
                self._create(t, tables)
            if version <= 1 and tables:
                moved = self._migrate_v1(t)
            t.execute(f"PRAGMA application_id={APPLICATION_ID}")
            t.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if moved is not None:  # the files now live in the database
            shutil.rmtree(moved, ignore_errors=True)

    def _refuse_foreign(self, app: int, tables: set[str]) -> None:
        """A database that is not prefsteer's is refused before anything is written to it."""
        if app == APPLICATION_ID:
            return
        if app != 0:
            raise MemoryFileError(self.path, f"is another application's SQLite database (application_id "
                                  f"{app:#x}); nothing was changed", "give the --db of a prefsteer memory")
        foreign = sorted(tables - set(TABLES) - {"sqlite_sequence"})
        shape_ok = True
        if "pairs" in tables:
            cols = {r[1] for r in self.conn.execute("PRAGMA table_info(pairs)")}
            shape_ok = {"user_id", "pair_id", "prompt", "chosen", "rejected", "seq"} <= cols
        if foreign or not shape_ok:
            what = f"tables {', '.join(foreign)}" if foreign else "a `pairs` table of another shape"
            raise MemoryFileError(self.path, f"is not a prefsteer memory (it holds {what}); nothing was changed",
                                  "give the --db of a prefsteer memory, or a new file name")

    @staticmethod
    def _create(t, tables: set[str]) -> None:
        if "jobs" in tables:  # a schema-1 service table: the lease columns are new
            have = {r[1] for r in t.execute("PRAGMA table_info(jobs)")}
            for col, kind in (("owner", "TEXT"), ("lease_until", "REAL"), ("served", "REAL")):
                if col not in have:
                    t.execute(f"ALTER TABLE jobs ADD COLUMN {col} {kind}")
        for stmt in STATEMENTS:
            t.execute(stmt)

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

    def _migrate_v1(self, c) -> Path | None:
        """Schema 1 -> 2: method files kept beside the database (``<db>.d/<user hash>/``) move into
        ``method_files``; returns the folder to remove once the transaction is committed."""
        if self.path == ":memory:":
            return None
        folder = Path(self.path).parent / f"{Path(self.path).name}.d"
        for user, method, state_id, names in c.execute(
                "SELECT user_id, method, state_id, files FROM method_states").fetchall():
            for fname in json.loads(names):
                f = folder / sha(user)[:24] / fname
                if f.is_file():
                    c.execute("INSERT INTO method_files VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                              (user, method, state_id, fname.split("-", 2)[2], f.read_bytes()))
            c.execute("UPDATE method_states SET files=(SELECT COALESCE(json_group_array(name), '[]') FROM method_files "
                      "f WHERE f.user_id=? AND f.method=? AND f.state_id=?) WHERE user_id=? AND method=? AND state_id=?",
                      (user, method, state_id, user, method, state_id))
        return folder if folder.is_dir() else None

    # -- the contract's engine part -------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
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
                if self.conn.in_transaction:  # SQLite ends some failed transactions itself (a full disk)
                    self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
            finally:
                self._depth = 0

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, tuple(params)).fetchall()

    def _deleted(self) -> None:
        # secure_delete zeroes the freed pages; the WAL still holds the deleted rows' old pages
        # until a checkpoint copies it back and truncates it
        if self.path != ":memory:":
            with self._lock:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
