"""Answers streamed as they are decoded: what ``Backend.stream`` returns, and the engine's refusal.

An engine that serves many callers (the transformers and fake backends' `Scheduler`, vLLM's
engine loop) takes one request at a time with ``backend.stream(context, config, guide=...)`` and
decodes it together with every other request it holds. The caller gets a `TokenStream` at once:

    >>> s = backend.stream(messages, GenerationConfig(max_new_tokens=64))
    >>> for ids in s:              # blocks until the engine has decoded the next token(s)
    ...     print(backend.decode_tokens(s.token_ids))
    >>> s.finish_reason            # "stop" (end of turn), "length" (max_new_tokens) or "cancelled"

``async for ids in s`` reads the same stream from an event loop without holding a thread, and
``s.cancel()`` (a client that went away) makes the engine drop the request at its next step,
freeing its place in the batch. An engine with no room left refuses a request with `EngineBusy`
(the service answers 503 with ``Retry-After``).

`TextDeltas` turns the growing token ids into text pieces, holding back a piece that ends inside
a multi-byte character.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable, Iterator, Sequence

from prefsteer.errors import PrefsteerError

FINISH_REASONS = ("stop", "length", "cancelled")
# an engine's admission bounds unless told otherwise (`serve --max-batch-rows/--max-waiting`)
DEFAULT_MAX_ROWS = 32
DEFAULT_MAX_WAITING = 64


class EngineBusy(PrefsteerError):
    """The engine holds as many requests as it is allowed to: come back after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 1.0):
        self.retry_after = retry_after
        super().__init__(message)


class ContextTooLong(PrefsteerError, ValueError):
    """A request whose context (with what a method added to it) leaves no room to generate."""

    def __init__(self, tokens: int, max_context: int):
        self.tokens, self.max_context = tokens, max_context
        super().__init__(f"the context takes {tokens} tokens, which leaves no room to generate in the "
                         f"model's {max_context}")


class TokenStream:
    """One request's tokens as the engine decodes them (end-of-turn tokens left out).

    The engine's side calls `push`, then `finish` (or `fail`); the caller's side iterates, from a
    thread or an event loop, and may `cancel`. Thread-safe. ``created``, ``first_at`` and
    ``last_at`` (``time.perf_counter()``) say when the request reached the engine and when its first
    and latest tokens were pushed: the engine's time to the first token and between tokens."""

    def __init__(self, on_cancel: Callable[[], None] | None = None):
        self._cond = threading.Condition()
        self._pending: deque[list[int]] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._on_cancel = on_cancel
        self.token_ids: list[int] = []  # every token read so far by the caller
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.pushed = 0  # tokens the engine has pushed
        self.created = time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None

    # -- the engine's side ----------------------------------------------------------------------
    def push(self, ids: Sequence[int]) -> None:
        now = time.perf_counter()
        with self._cond:
            self._pending.append([int(t) for t in ids])
            self.pushed += len(ids)
            if self.first_at is None:
                self.first_at = now
            self.last_at = now
            self._wake()

    def finish(self, reason: str) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason {reason!r} is none of {', '.join(FINISH_REASONS)}")
        with self._cond:
            if self.finish_reason is None and self.error is None:
                self.finish_reason = reason
            self._wake()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.error = error
            self._wake()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def _wake(self) -> None:  # under self._cond
        self._cond.notify_all()
        for loop, event in self._waiters:
            loop.call_soon_threadsafe(event.set)

    # -- the caller's side ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the request at the engine's next step (nothing happens to a finished one)."""
        with self._cond:
            if self.done or self.cancelled:
                return
            self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def _take(self) -> list[int] | None:
        """The next new ids, None at the end (under self._cond); raises the engine's error."""
        if self._pending:
            ids = self._pending.popleft()
            self.token_ids.extend(ids)
            return ids
        if self.error is not None:
            raise self.error
        return None

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            with self._cond:
                while not self._pending and not self.done:
                    self._cond.wait()
                ids = self._take()
            if ids is None:
                return
            yield ids

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._cond:
            self._waiters.append(waiter)
        try:
            while True:
                with self._cond:
                    event.clear()
                    ready = bool(self._pending) or self.done
                    ids = self._take() if ready else None
                if ids is not None:
                    yield ids
                elif ready:
                    return
                else:
                    await event.wait()
        finally:
            with self._cond:
                self._waiters.remove(waiter)

    def wait(self) -> list[int]:
        """Read the stream to its end; the whole answer's token ids."""
        for _ in self:
            pass
        return self.token_ids


class TextDeltas:
    """Text pieces of a growing list of token ids: each call to `feed` returns the text the new
    ids add. The whole text is decoded each time (a token's text can depend on its neighbours) and
    a piece ending in an unfinished multi-byte character waits for the next token."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""  # what has been handed out

    def feed(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        full = self._decode(self.ids)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece

    def flush(self) -> str:
        """What is left at the end (an unfinished character is decoded as it is); ``text`` becomes
        the whole decoded text (for a tokenizer whose decoding of more tokens rewrote earlier text,
        the pieces handed out can fall short of it: the whole text is the answer)."""
        full = self._decode(self.ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return piece
