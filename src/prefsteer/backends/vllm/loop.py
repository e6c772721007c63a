"""`EngineLoop`: one thread that owns vLLM's ``LLMEngine`` and serves every caller of the backend.

vLLM's offline ``LLM.generate`` adds its requests and steps the engine until they are all done, so two
callers (the service's threads) would be decoded one after the other, and one that steps the engine
while another's requests are in it takes their outputs. Here a single thread is the engine's only
user:

* callers, from any thread, hand it requests: `EngineLoop.run` (a blocking batch: ``generate``'s
  contexts, ``score``'s prompt log-probability requests; vLLM returns each one's final output) or
  `EngineLoop.submit_stream` (one request whose new tokens go to a `TokenStream` as they come);
* between two engine steps the loop adds what arrived (so new requests join the running ones,
  which is vLLM's continuous batching), aborts what was cancelled (``abort_request``: the request's
  place is free at the next step, and its stream ends "cancelled"), then steps the engine, if it
  has unfinished requests (``step()`` waits for the engine core), and routes each ``RequestOutput``
  to its request by id. With nothing to do it sleeps until a caller wakes it.
* Admission: at most ``max_rows`` streamed requests are in the engine at once; the others wait in
  the loop, up to ``max_waiting`` of them; past that `submit_stream` raises `EngineBusy`. Blocking
  batches are not bounded here (vLLM's own scheduler queues them, ``max_num_seqs`` at a time).
* A failure of the engine (a step, or an abort) fails every request the loop holds in the engine,
  with that error, and the loop goes on; a request the engine refuses at ``add_request`` fails
  alone (with the rest of its batch).

The engine object needs only ``add_request(id, prompt, params)``, ``step()``, ``abort_request(ids)``
and ``has_unfinished_requests()``, so the loop runs on a stub as well (tests/test_vllm.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from prefsteer.backends.streaming import EngineBusy, TokenStream

log = logging.getLogger(__name__)

# vLLM's CompletionOutput.finish_reason -> TokenStream's
_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


class _Batch:
    """The requests of one blocking call: their final outputs, in order, or the error."""

    def __init__(self, n: int):
        self.outputs: list[Any] = [None] * n
        self.left = n
        self.error: BaseException | None = None
        self.done = threading.Event()

    def put(self, index: int, output: Any) -> None:
        self.outputs[index] = output
        self.left -= 1
        if self.left == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass
class _Call:
    """One engine request: of a blocking batch (``batch``, ``index``) or streamed (``stream``)."""

    id: str
    prompt: Any
    params: Any
    stream: TokenStream | None = None
    batch: _Batch | None = None
    index: int = 0
    cancel: bool = False  # a stream cancelled, or a batch given up by its caller

    def fail(self, error: BaseException) -> None:
        if self.stream is not None:
            if not self.stream.done:
                self.stream.fail(error)
        elif self.batch is not None:
            self.batch.fail(error)


class EngineLoop:
    """The thread that owns ``engine`` (vLLM's V1 ``LLMEngine``); see the module's docstring.

    ``render`` turns a caller's prompt into what ``engine.add_request`` takes (by default the prompt
    as it is); it runs on the loop's thread. ``eos_ids``: end-of-turn tokens, never pushed to a stream.
    """

    def __init__(self, engine: Any, render: Callable[[Any], Any] | None = None, *, max_rows: int = 32,
                 max_waiting: int = 64, eos_ids: Sequence[int] = (), name: str = "prefsteer-vllm-engine"):
        self.engine = engine
        self.render = render or (lambda prompt: prompt)
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.max_rows, self.max_waiting = 1, 0
        self.set_limits(max_rows, max_waiting)
        self._cond = threading.Condition()
        self._new: deque[_Call] = deque()       # submitted, not in the engine yet
        self._aborts: list[_Call] = []          # to abort at the next step
        self._live: dict[str, _Call] = {}       # in the engine, by request id
        self._ids = itertools.count()
        self._closed = False
        # what the loop saw: steps run, requests added, the most requests in the engine at a step
        self.steps = 0
        self.added = 0
        self.peak_running = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the callers' side ------------------------------------------------------------------------
    def set_limits(self, max_rows: int | None = None, max_waiting: int | None = None) -> None:
        """Bound the streamed requests in the engine at once and those waiting for a place (applies
        to the requests submitted from now on)."""
        rows = self.max_rows if max_rows is None else int(max_rows)
        waiting = self.max_waiting if max_waiting is None else int(max_waiting)
        if rows < 1 or waiting < 0:
            raise ValueError(f"`max_rows` (={rows}) has to be at least 1 and `max_waiting` (={waiting}) "
                             "non-negative")
        self.max_rows, self.max_waiting = rows, waiting

    def _next_id(self) -> str:
        return f"prefsteer-{next(self._ids)}"

    def run(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Any]:
        """Decode ``prompts`` (each with its ``params``, whose output kind should be FINAL_ONLY) among
        every other request; their final ``RequestOutput``s, in order. Raises the engine's error."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("the engine loop cannot wait for its own requests")
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts for {len(params)} sampling parameters")
        if not prompts:
            return []
        batch = _Batch(len(prompts))
        calls = [_Call(self._next_id(), p, sp, batch=batch, index=i)
                 for i, (p, sp) in enumerate(zip(prompts, params))]
        with self._cond:
            if self._closed:
                raise RuntimeError("the vLLM engine loop is closed")
            self._new.extend(calls)
            self._cond.notify_all()
        try:
            batch.done.wait()
        except BaseException:  # the caller gave up (KeyboardInterrupt): free the engine
            with self._cond:
                for c in calls:
                    c.cancel = True
                self._aborts.extend(calls)
                self._cond.notify_all()
            raise
        if batch.error is not None:
            raise batch.error
        return batch.outputs

    def submit_stream(self, prompt: Any, params: Any) -> TokenStream:
        """Queue one streamed request (``params`` with output kind DELTA); its tokens arrive on the
        returned stream. `EngineBusy` when ``max_rows + max_waiting`` streamed requests are held."""
        holder: list[_Call] = []
        stream = TokenStream(on_cancel=lambda: self._cancel(holder[0]))
        call = _Call(self._next_id(), prompt, params, stream=stream)
        holder.append(call)
        with self._cond:
            if self._closed:
                raise EngineBusy("the vLLM engine loop is closed", retry_after=5)
            running, waiting = self._streams()
            if running + waiting >= self.max_rows + self.max_waiting:
                raise EngineBusy(f"the engine is full: {running} streamed requests decoding (at most "
                                 f"{self.max_rows}) and {waiting} waiting (at most {self.max_waiting})")
            self._new.append(call)
            self._cond.notify_all()
        return stream

    def _cancel(self, call: _Call) -> None:
        with self._cond:
            call.cancel = True
            self._aborts.append(call)
            self._cond.notify_all()

    def _streams(self) -> tuple[int, int]:
        """Streamed requests (in the engine, waiting), under self._cond."""
        running = sum(1 for c in self._live.values() if c.stream is not None)
        waiting = sum(1 for c in self._new if c.stream is not None)
        return running, waiting

    def stats(self) -> dict[str, Any]:
        with self._cond:
            streams, waiting = self._streams()
            return {"running": len(self._live), "streams": streams, "waiting": waiting,
                    "queued": len(self._new), "max_rows": self.max_rows, "max_waiting": self.max_waiting,
                    "steps": self.steps, "added": self.added, "peak_running": self.peak_running,
                    "failures": self.failures}

    def reset_peak(self) -> None:
        with self._cond:
            self.peak_running = len(self._live)

    def close(self, timeout: float = 30) -> None:
        """Cancel what waits, abort what runs, and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout)

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._new and not self._aborts and not self._live:
                    self._cond.wait()
                if self._closed:
                    self._shutdown()
                    return
            try:
                self._abort_cancelled()
                self._add_new()
                self._step()
            except Exception as e:  # the engine failed: the requests in it learn of it, the loop goes on
                self._fail_live(e)

    def _abort_cancelled(self) -> None:
        """The cancelled requests leave the engine (their places are free at the next step), then
        their streams end "cancelled"; those still queued just leave the queue."""
        with self._cond:
            if not self._aborts:
                return
            calls, self._aborts = self._aborts, []
            ids = [c.id for c in calls if self._live.get(c.id) is c]
            if ids:
                self.engine.abort_request(ids)
            for c in calls:
                self._live.pop(c.id, None)
            gone = {id(c) for c in calls}
            self._new = deque(c for c in self._new if id(c) not in gone)
            for c in calls:
                if c.stream is not None:
                    c.stream.finish("cancelled")
                elif c.batch is not None:
                    c.batch.fail(RuntimeError("the request was abandoned by its caller"))

    def _add_new(self) -> None:
        """Move what arrived into the engine: every blocking request, and streams while fewer than
        ``max_rows`` are in it (the others keep their place in the queue)."""
        with self._cond:
            streams, _ = self._streams()
            keep: deque[_Call] = deque()
            while self._new:
                c = self._new.popleft()
                if c.cancel or (c.batch is not None and c.batch.done.is_set()):
                    if c.stream is not None:
                        c.stream.finish("cancelled")
                    continue
                if c.stream is not None:
                    if streams >= self.max_rows:
                        keep.append(c)
                        continue
                    streams += 1
                try:
                    self.engine.add_request(c.id, self.render(c.prompt), c.params)
                except Exception as e:  # the engine refused this request: it fails alone (with its batch)
                    log.warning("vLLM refused a request: %s", e)
                    c.fail(e)
                    if c.batch is not None:
                        self._drop_batch(c.batch)
                    continue
                self._live[c.id] = c
                self.added += 1
            self._new = keep

    def _drop_batch(self, batch: _Batch) -> None:
        """Abort the requests of a failed batch that are in the engine (under self._cond)."""
        ids = [i for i, c in self._live.items() if c.batch is batch]
        for i in ids:
            del self._live[i]
        if ids:
            self.engine.abort_request(ids)

    def _step(self) -> None:
        with self._cond:
            if not self._live:
                return
            if not self.engine.has_unfinished_requests():  # nothing will come back for them
                error = RuntimeError("the vLLM engine dropped requests it was decoding")
                for c in self._live.values():
                    c.fail(error)
                self._live.clear()
                return
            self.peak_running = max(self.peak_running, len(self._live))
        outputs = self.engine.step()  # waits for the engine core; callers can submit meanwhile
        with self._cond:
            self.steps += 1
            for out in outputs:
                c = self._live.get(out.request_id)
                if c is not None:
                    self._route(c, out)

    def _route(self, c: _Call, out: Any) -> None:
        """One output to its request (under self._cond, so a stream's `cancel` returns only after any
        push of this step: no token is pushed once it has returned)."""
        if c.batch is not None:
            if out.finished:
                del self._live[c.id]
                c.batch.put(c.index, out)
            return
        completion = out.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        if out.finished:
            while ids and ids[-1] in self.eos_ids:
                ids.pop()
        if ids and not c.stream.cancelled:
            c.stream.push(ids)
        if out.finished:
            del self._live[c.id]
            reason = "cancelled" if c.stream.cancelled else _REASONS.get(completion.finish_reason, "stop")
            c.stream.finish(reason)

    def _fail_live(self, error: BaseException) -> None:
        log.exception("the vLLM engine loop failed; failing the %d requests in the engine", len(self._live))
        with self._cond:
            self.failures += 1
            self.last_error = error
            calls = list(self._live.values())
            self._live.clear()
        for c in calls:
            c.fail(error)
        try:
            self.engine.abort_request([c.id for c in calls])
        except Exception:  # the engine is gone: nothing to free
            pass

    def _shutdown(self) -> None:
        """Under self._cond: end every request the loop holds."""
        closed = RuntimeError("the vLLM engine loop was closed")
        calls = list(self._new) + list(self._live.values())
        ids = list(self._live)
        self._new.clear()
        self._live.clear()
        for c in calls:
            if c.stream is not None:
                c.stream.finish("cancelled")
            else:
                c.fail(closed)
        if ids:
            try:
                self.engine.abort_request(ids)
            except Exception:
                pass
