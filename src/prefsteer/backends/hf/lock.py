"""A readers-writer lock over one model: many forwards at once, or one adapter block alone.

score, generate, hidden_states, decoding sessions and cast read the model (shared: concurrent
threads run at once); an adapter block changes it (exclusive: it waits for running readers to
finish, and readers that arrive meanwhile wait for the block to end, so no reader ever sees the
adapter's weights). A thread may nest reads. A read from the thread that holds the adapter block
would deadlock, so it raises instead.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class ModelLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None  # thread id holding the exclusive side
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def shared(self, what: str = "this call"):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                if self._writer == threading.get_ident():
                    raise RuntimeError(f"{what} needs the plain model, but this thread is inside an "
                                       "adapter block of the same backend: call it after the block")
                while self._writer is not None or self._writers_waiting:  # a waiting adapter goes first
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer == me or getattr(self._local, "depth", 0):
                raise RuntimeError("an adapter block cannot start inside another adapter block or inside "
                                   "a call of the same backend on this thread")
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
