"""What every request shares: the backend (loaded once), the embedder, the attribute library, a
memory connection per thread, method objects per thread, and a lock per user that deletion and the
feedback worker take so that a deleted user's job cannot write the user back."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Any, Callable

from prefsteer.memory import Memory


class Engine:
    def __init__(self, settings, backend, embedder, library):
        self.settings, self.backend, self.embedder, self.library = settings, backend, embedder, library
        self._local = threading.local()
        self._user_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._memories: list[Memory] = []

    # -- per thread ---------------------------------------------------------------------------
    @property
    def memory(self) -> Memory:
        """This thread's connection to the database (SQLite connections are not shared)."""
        m = getattr(self._local, "memory", None)
        if m is None:
            m = self._local.memory = Memory(self.settings.db)
            with self._locks_guard:
                self._memories.append(m)
        return m

    def exact(self, memory: Memory | None = None):
        """EXACT over ``memory`` (default: this thread's), built once per thread."""
        from prefsteer.methods.exact import Exact, ExactConfig

        if memory is not None:
            return Exact(self.backend, memory=memory, embedder=self.embedder, library=self.library,
                         config=ExactConfig(**self.settings.exact))
        e = getattr(self._local, "exact", None)
        if e is None:
            e = self._local.exact = self.exact(self.memory)
        return e

    def method(self, name: str, options: dict[str, Any]):
        """A registered method with ``options``, built once per thread and options."""
        from prefsteer.methods import get_method_class

        cache = getattr(self._local, "methods", None)
        if cache is None:
            cache = self._local.methods = {}
        key = (name, json.dumps(options, sort_keys=True))
        if key not in cache:
            kw: dict[str, Any] = dict(options)
            if name in ("drift",):
                kw["library"] = self.library
            cache[key] = get_method_class(name)(self.backend, memory=self.memory, **kw)
        return cache[key]

    # -- across threads -----------------------------------------------------------------------
    def user_lock(self, user_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._user_locks[user_id]

    def close(self) -> None:
        with self._locks_guard:
            for m in self._memories:
                try:
                    m.close()
                except Exception:  # a connection of a thread that is gone
                    pass
            self._memories.clear()


def call_quietly(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as e:  # reported in the job's result, never fatal to the job
        return None, f"{type(e).__name__}: {e}"
