"""The memory on a PostgreSQL server, for several service replicas (``--db postgresql://...``).

psycopg 3 with a connection pool (``pip install 'prefsteer[postgres]'``); one object serves every
thread. Each transaction takes a connection from the pool for its length; reads outside one take a
connection for the query. The schema's version is kept in ``prefsteer_meta``, which also marks the
database as prefsteer's: a database holding tables of another application is refused untouched.
Creating or migrating the schema holds an advisory lock, so replicas that start together do it
once. The job queue claims with ``FOR UPDATE SKIP LOCKED``: two replicas never take the same job.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Sequence

from prefsteer.errors import MemoryFileError, MemoryNotFoundError
from prefsteer.storage.base import SCHEMA_VERSION, Memory, schema_statements

STATEMENTS = schema_statements(blob="BYTEA", real="DOUBLE PRECISION", integer="BIGINT")
META = "CREATE TABLE IF NOT EXISTS prefsteer_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_SCHEMA_LOCK = 0x70737472  # the advisory lock's key while the schema is made


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """The shared SQL's ``?`` parameters in psycopg's ``%s`` style."""
    return sql.replace("%", "%%").replace("?", "%s")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class _Tx:
    """A transaction's connection, with the shared SQL translated."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()):
        return self.conn.execute(_pg(sql), tuple(params))


class PostgresMemory(Memory):
    thread_safe = True
    _skip_locked = " FOR UPDATE OF j SKIP LOCKED"

    def __init__(self, url: str, *, create: bool = True, pool_size: int = 8):
        try:
            import psycopg  # noqa: F401
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise MemoryFileError(redact(str(url)), "is a PostgreSQL database, and psycopg is not installed",
                                  "pip install 'prefsteer[postgres]'") from None
        self.db, self.path = str(url), redact(str(url))
        if not self.db.startswith(("postgresql://", "postgres://")):
            scheme = self.db.split("://", 1)[0]
            raise MemoryFileError(self.path, f"is a {scheme}:// URL; the memory is a file path (SQLite) or a "
                                  "postgresql:// URL", "give --db memory.db or --db postgresql://user@host/db")
        self._local = threading.local()
        self._pool = ConnectionPool(self.db, min_size=1, max_size=pool_size, open=False,
                                    kwargs={"autocommit": True}, name="prefsteer")
        try:
            self._pool.open(wait=True, timeout=15)
        except Exception as e:
            self._pool.close()
            raise MemoryFileError(self.path, f"cannot be reached ({_reason(e)})",
                                  "check that the server runs and the URL (user, host, port, database) is right") from None
        try:
            self._open(create)
        except BaseException:
            self._pool.close()
            raise

    def _open(self, create: bool) -> None:
        with self.transaction() as t:
            t.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            tables = {r[0] for r in t.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()").fetchall()}
            version = None
            if "prefsteer_meta" in tables:
                row = t.execute("SELECT value FROM prefsteer_meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else None
            if version is None:
                foreign = sorted(tables - {"prefsteer_meta"})
                if foreign:
                    raise MemoryFileError(self.path, f"is not a prefsteer memory (it holds tables "
                                          f"{', '.join(foreign[:8])}); nothing was changed",
                                          "give a new, empty database (createdb) or one prefsteer made")
                if not create:
                    raise MemoryNotFoundError(self.path, "it holds no prefsteer memory; give the --db that holds "
                                              "the users, or index some pairs into it first")
            elif version > SCHEMA_VERSION:
                raise MemoryFileError(self.path, f"was written by a newer prefsteer (memory schema {version}; "
                                      f"this one reads up to {SCHEMA_VERSION})", "upgrade prefsteer")
            if version == SCHEMA_VERSION:
                return
            # the first schema on PostgreSQL is version 2: a later one adds its steps here
            t.execute(META)
            for stmt in STATEMENTS:
                t.execute(stmt)
            t.execute("INSERT INTO prefsteer_meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE "
                      "SET value=excluded.value", (str(SCHEMA_VERSION),))

    # -- the contract's engine part -------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return int(self._value("SELECT value FROM prefsteer_meta WHERE key='schema_version'"))

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        tx = getattr(self._local, "tx", None)
        if tx is not None:
            yield tx
            return
        with self._pool.connection() as conn, conn.transaction():
            self._local.tx = _Tx(conn)
            try:
                yield self._local.tx
            finally:
                self._local.tx = None

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        tx = getattr(self._local, "tx", None)
        if tx is not None:
            return tx.execute(sql, params).fetchall()
        with self._pool.connection() as conn:
            return conn.execute(_pg(sql), tuple(params)).fetchall()


def _reason(e: Exception) -> str:
    cause = e.__cause__ or e.__context__ or e
    return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
