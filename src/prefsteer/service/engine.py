"""What every request shares: the backend (loaded once), the embedder (the prompts of concurrent
requests embedded together), the attribute library, the memory (a connection per thread on SQLite,
one pool on PostgreSQL), method objects per thread (built by the method registry), the chat serving
object, and a lock per user that deletion and the feedback worker take so that a deleted user's job
cannot write the user back.

The request threads are the server's thread pool's, which ends a thread idle for a few seconds
(anyio: 10 s) and starts new ones for the next burst; a thread's SQLite connection is closed once
nothing holds it any more (its thread gone, and no answer of that thread still streaming), so the
connections stay as many as the live threads rather than growing with every burst."""

from __future__ import annotations

import json
import threading
import weakref
from collections import defaultdict
from typing import Any, Callable

from prefsteer.storage import Memory


class Engine:
    def __init__(self, settings, backend, embedder, library):
        from prefsteer.service.serving import ChatServing

        from prefsteer.retrieval import CoalescingEmbedder

        self.settings, self.backend, self.library = settings, backend, library
        self.embedder = CoalescingEmbedder(embedder)  # a burst of requests' prompts embedded together
        self.serving = ChatServing(self)
        self._local = threading.local()
        self._user_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._shared: Memory | None = None  # PostgreSQL: one pool for every thread
        self._per_thread: "weakref.WeakSet[Memory]" = weakref.WeakSet()  # SQLite: the live threads' connections
        if "stream" in getattr(backend, "capabilities", ()):  # the engine's admission bounds (`serve --help`)
            backend.set_stream_limits(settings.max_batch_rows, settings.max_waiting)

    # -- per thread ---------------------------------------------------------------------------
    @property
    def memory(self) -> Memory:
        """The database: one connection per thread for SQLite (its connections are not shared), one
        pool for every thread for PostgreSQL."""
        m = getattr(self._local, "memory", None)
        if m is None:
            with self._locks_guard:
                m = self._shared or Memory(self.settings.db)
                if m.thread_safe:
                    self._shared = m
                else:  # held by this thread (and what it builds); closed when garbage (sqlite3's own finalizer)
                    self._per_thread.add(m)
            self._local.memory = m
        return m

    def open_connections(self) -> int:
        """The memory connections open now (one shared pool counts one)."""
        with self._locks_guard:
            return len(self._per_thread) + (self._shared is not None)

    def defaults(self, name: str) -> dict[str, Any]:
        """The service's options for method ``name``: its EXACT options (`serve --preset ...`) for
        the methods whose configuration takes them all, then the method's own
        (`Settings.method_options`); a request's options go on top."""
        import dataclasses

        from prefsteer.methods import get_method_class

        cfg = get_method_class(name).config_class
        fields = {f.name for f in dataclasses.fields(cfg)} if cfg is not None else set()
        exact = self.settings.exact if self.settings.exact and set(self.settings.exact) <= fields else {}
        return {**exact, **self.settings.method_options.get(name, {})}

    def method(self, name: str, options: dict[str, Any] | None = None, memory: Memory | None = None):
        """The registered method ``name`` with ``options`` over ``memory`` (the feedback worker's
        connection), or over this thread's connection, built once per thread and options."""
        from prefsteer.methods.registry import Resources, build

        options = dict(options or {})
        if memory is not None:
            res = Resources(memory=memory, embedder=self.embedder, library=self.library)
            return build(name, self.backend, res, options, defaults=self.defaults(name))
        cache = getattr(self._local, "methods", None)
        if cache is None:
            cache = self._local.methods = {}
        key = (name, json.dumps(options, sort_keys=True))
        if key not in cache:
            cache[key] = self.method(name, options, self.memory)
        return cache[key]

    # -- across threads -----------------------------------------------------------------------
    def user_lock(self, user_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._user_locks[user_id]

    def close(self) -> None:
        with self._locks_guard:
            memories = [*self._per_thread, *([self._shared] if self._shared is not None else [])]
            self._per_thread, self._shared = weakref.WeakSet(), None
        for m in memories:
            try:
                m.close()
            except Exception:  # a connection already closed
                pass


def call_quietly(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, "Type: message")`` when it raises: for the callers that report a
    failure (in a job's result, in the log of a /metrics scrape) and go on."""
    try:
        return fn(), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
