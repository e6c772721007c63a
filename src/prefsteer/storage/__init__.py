"""Everything prefsteer keeps, behind one contract (`Memory`) with two engines.

    >>> Memory("memory.db")                        # SQLite, the embedded default (storage/sqlite.py)
    >>> Memory("postgresql://app@db-host/prefsteer")  # PostgreSQL, for several replicas (storage/postgres.py)

Only this package writes SQL; `base.py` holds the contract and the SQL both engines share.
"""

from prefsteer.storage.base import SCHEMA_VERSION, TABLES, USER_TABLES, Entry, Memory, hash_key, read_selections

__all__ = ["Memory", "Entry", "SCHEMA_VERSION", "TABLES", "USER_TABLES", "hash_key", "read_selections"]
