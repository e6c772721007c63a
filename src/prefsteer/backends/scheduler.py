"""Continuous batching for a backend that decodes in this process (transformers, fake).

A `Scheduler` owns the backend's model for streamed requests: one thread runs a loop in which
requests that arrived join the running batch at a step boundary (their prompts are prefilled
together, beside the rows already decoding), then every row of every request is decoded one token
in a single forward, and a request's rows leave the batch when it ends (end of turn,
``max_new_tokens``, or a caller that cancelled). Each request keeps its own sampling settings and
random generator, and its own guide:

* a callable guide (CLIPer's `CliperGuide`) gets that request's last hidden state, logits and token
  ids, exactly as in ``Backend.generate``;
* a `DriftGuide` with one row brings its branch contexts as extra rows of the same batch (the plain
  branch, unless it is the request's own context, and one per attribute); they are fed the tokens
  the request accepts, and the request's next token comes from `DriftGuide.combine` over its rows.

So a request's greedy tokens are the ones it would get alone: the rows of a batch are left-padded
and masked (tests/test_streaming.py checks the equality, rows of different lengths).

Requests that join at once are prefilled in groups of near lengths, shortest first, each group's
first tokens sent before the next group's prefill (`length_groups`, with the backend's
``prefill_overhead``: what a forward costs beyond its tokens, in tokens' worth). Left-padded in one
forward, a long prompt would make every short row beside it run its length, and every request wait
for the longest.

The model-specific part is a `RowBatch` (`prefsteer.backends.hf.batch.KVBatch` on a key/value
cache, `prefsteer.backends.fake.FakeBatch`): add rows (prefill), keep some rows, feed one token per
row, and give every row's last hidden state and next-token logits.

Admission: at most ``max_rows`` rows decode at once (a request needing more than that runs when the
batch is otherwise empty) and at most ``max_waiting`` requests wait for a place; past that,
``submit`` raises `EngineBusy`.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from prefsteer.backends.base import GenerationConfig, UnsupportedOperation
from prefsteer.backends.guides.drift import DriftGuide
from prefsteer.backends.sampling import hold_end, sample_next, seeded_generator
from prefsteer.backends.streaming import (DEFAULT_MAX_ROWS, DEFAULT_MAX_WAITING, ContextTooLong, EngineBusy,
                                         TokenStream)

log = logging.getLogger(__name__)


class RowBatch(Protocol):
    rows: int

    def uncached(self, prompt: Sequence[int]) -> int:
        """How many positions of ``prompt`` a prefill would run now (its length, less what the
        batch keeps of earlier prompts)."""

    def add(self, prompts: Sequence[Sequence[int]]) -> int:
        """Prefill ``prompts`` as new rows after the existing ones; returns how many of their
        positions came from keys and values kept from earlier prompts instead of being run."""

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (ascending indices), dropping the others."""

    def step(self, tokens: Sequence[int]) -> None:
        """Feed one token to every row."""

    def outputs(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden state (R, d) and next-token logits (R, V), float32, of every row from
        ``start`` on."""


@dataclass
class _Request:
    stream: TokenStream
    prompts: list[list[int]]       # its rows: its own context first, then Drift's branches
    config: GenerationConfig
    guide: Any
    plain_row: bool                # Drift: the second row is the plain branch
    steps: int                     # tokens to decode at most
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)  # its context and the tokens so far (a guide reads them)
    new: int = 0

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def next_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) logits to choose the next token from, given the request's rows' outputs."""
        own = logits[:1]
        if self.guide is None:
            return own
        if isinstance(self.guide, DriftGuide):
            plain = logits[1:2] if self.plain_row else own
            branches = logits[2:] if self.plain_row else logits[1:]
            return self.guide.combine(own, plain, branches[None])
        ids = torch.tensor([self.ids], device=logits.device)
        return self.guide(hidden[:1], own, ids)


def length_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Split rows of these lengths into groups, each prefilled by one forward left-padded to its
    longest row. A group of m rows whose longest has L tokens costs ``m * L + overhead`` token
    positions; a dynamic program over the rows sorted by length picks the groups that cost least,
    so that a long prompt does not make the short ones beside it run its length, while prompts of
    near lengths share a forward. Groups come shortest first, their rows shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the group order[i:j], whose longest is order[j - 1]
            cost = best[i] + overhead + (j - i) * lengths[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


# every scheduler with a running loop, stopped at exit: a daemon thread killed inside a torch
# kernel at interpreter shutdown aborts the process ("terminate called without an active exception")
_RUNNING: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for s in list(_RUNNING):
        s.close()


class Scheduler:
    """Decodes streamed requests of one backend together (see the module's docstring)."""

    def __init__(self, backend, make_batch, *, max_rows: int = DEFAULT_MAX_ROWS,
                 max_waiting: int = DEFAULT_MAX_WAITING, device: Any = "cpu"):
        if max_rows < 1 or max_waiting < 0:
            raise ValueError(f"`max_rows` (={max_rows}) has to be at least 1 and `max_waiting` "
                             f"(={max_waiting}) non-negative")
        self.backend, self.make_batch = backend, make_batch
        self.max_rows, self.max_waiting, self.device = max_rows, max_waiting, device
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (a step decodes one token for every row)
        self.peak_rows = 0
        self.prompt_tokens = self.reused_tokens = 0  # prompt positions prefilled; of them, taken from kept prefixes

    # -- the callers' side ------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], config: GenerationConfig, guide: Any = None) -> TokenStream:
        """Queue one request (its context's token ids); its tokens arrive on the returned stream."""
        b = self.backend
        prompts, plain_row = [list(prompt)], False
        if guide is not None and not callable(guide):
            if not isinstance(guide, DriftGuide):
                raise UnsupportedOperation(b.name, "guide_branches", "a guide given as data other than Drift's")
            if len(guide.rows) != 1:
                raise ValueError(f"a streamed request takes a Drift guide of one row, not {len(guide.rows)}")
            if guide.fingerprint != b.fingerprint:
                raise UnsupportedOperation(b.name, "guide_branches", "Drift's branches on another model")
            row = guide.rows[0]
            plain_row = row["plain_ids"] is not None
            prompts += ([row["plain_ids"]] if plain_row else []) + row["branch_ids"]
        steps = min(config.max_new_tokens, b.max_context - max(len(p) for p in prompts))
        if steps < 1:
            raise ContextTooLong(max(len(p) for p in prompts), b.max_context)
        stream = TokenStream(on_cancel=self._wake)
        req = _Request(stream, prompts, config, guide, plain_row, steps,
                       seeded_generator(config, self.device), list(prompt))
        with self._cond:
            if self._closed:
                raise EngineBusy("the engine is shutting down", retry_after=5)
            if self._queued(req) > self.max_waiting:
                raise EngineBusy(f"the engine is full: {self._rows()} rows decoding (at most {self.max_rows}) "
                                 f"and {self._queued()} requests waiting for a place (at most {self.max_waiting})")
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"prefsteer-{b.name}-scheduler",
                                                daemon=True)
                self._thread.start()
                _RUNNING.add(self)
            self._cond.notify_all()
        return stream

    def set_limits(self, max_rows: int, max_waiting: int) -> None:
        """New bounds, for the requests admitted from now on."""
        with self._cond:
            self.max_rows, self.max_waiting = max_rows, max_waiting
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"rows": self._rows(), "requests": len(self._active), "waiting": len(self._waiting),
                    "max_rows": self.max_rows, "max_waiting": self.max_waiting, "steps": self.steps,
                    "peak_rows": self.peak_rows, "prompt_tokens": self.prompt_tokens,
                    "reused_tokens": self.reused_tokens}

    def close(self) -> None:
        """Cancel everything and stop the loop."""
        with self._cond:
            self._closed = True
            for r in list(self._waiting) + self._active:
                r.stream.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _rows(self) -> int:
        return sum(r.rows for r in self._active)

    def _queued(self, newcomer: _Request | None = None) -> int:
        """Waiting requests (with ``newcomer``) that the batch has no room for now (under self._cond)."""
        rows, queued = self._rows(), 0
        for r in list(self._waiting) + ([newcomer] if newcomer else []):
            if queued or (rows + r.rows > self.max_rows and rows):
                queued += 1
            else:
                rows += r.rows
        return queued

    # -- the loop ---------------------------------------------------------------------------------
    def _admit(self) -> list[_Request]:
        """Move waiting requests into the active ones while their rows fit (under self._cond); they
        are active from here, so a prefill that fails fails them with the rest. Returns them."""
        new, rows = [], self._rows()
        while self._waiting:
            r = self._waiting[0]
            if r.stream.cancelled:
                self._waiting.popleft().stream.finish("cancelled")
                continue
            if rows + r.rows > self.max_rows and (rows or new):
                break
            new.append(self._waiting.popleft())
            rows += r.rows
        self._active = self._active + new  # a new list: `_step` holds the old one
        return new

    def _loop(self) -> None:
        batch = None
        while True:
            with self._cond:
                while not self._closed and not self._active and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    for r in list(self._waiting) + self._active:
                        r.stream.finish("cancelled")
                    return
            try:
                with torch.inference_mode():
                    if batch is None:
                        batch = self.make_batch()
                    self._step(batch)
            except Exception as e:  # the engine's failure: every request it held learns of it
                log.exception("the scheduler's step failed")
                with self._cond:
                    failed, self._active = self._active, []
                for r in failed:
                    if not r.stream.done:
                        r.stream.fail(e)
                batch = None

    def _join(self, batch: RowBatch, reqs: list[_Request]) -> None:
        """Prefill the admitted ``reqs`` as rows after the batch's."""
        prompts = [p for r in reqs for p in r.prompts]
        reused = batch.add(prompts)
        with self._cond:
            self.prompt_tokens += sum(len(p) for p in prompts)
            self.reused_tokens += reused
            self.peak_rows = max(self.peak_rows, self._rows())

    def _groups(self, batch: RowBatch, reqs: list[_Request]) -> list[list[_Request]]:
        """``reqs`` in groups of near prefill lengths, shortest first (`length_groups`); one group
        where the backend gives no ``prefill_overhead``."""
        overhead = getattr(self.backend, "prefill_overhead", None)
        if overhead is None or len(reqs) < 2:
            return [reqs] if reqs else []
        lengths = [max(batch.uncached(p) for p in r.prompts) for r in reqs]
        return [[reqs[i] for i in g] for g in length_groups(lengths, overhead)]

    def _step(self, batch: RowBatch) -> None:
        """Choose the next token of every request decoding from its rows, let the requests waiting
        join (prefilled group by group, each group's first tokens chosen and sent before the next
        group's prefill), then feed all the tokens in one forward.

        Requests that arrive while newcomers are prefilled join before that forward too (one more
        round), rather than a step later: a burst of requests, of which the first finds the engine
        idle and is prefilled alone, has the rest prefilled at once, not after a decode step for
        the first."""
        keep_rows, tokens, still = [], [], []
        if self._active:  # they have rows in the batch, whose outputs are the next tokens'
            hidden, logits = batch.outputs()
            keep_rows, tokens, still = self._choose(self._active, hidden, logits, 0)
        with self._cond:
            self._active = still
            late = self._admit()
        batch.keep(keep_rows)
        for again in (True, False):  # the waiting requests, then those that arrived meanwhile
            for group in self._groups(batch, late):
                first = batch.rows
                self._join(batch, group)
                hidden, logits = batch.outputs(first)
                rows, group_tokens, joined = self._choose(group, hidden, logits, first)
                batch.keep(list(range(first)) + rows)
                tokens += group_tokens
                still += joined
            with self._cond:
                self._active = still  # every active request has its rows in the batch, in order
                late = self._admit() if again and late else []
            if not late:
                break
        if tokens:
            batch.step(tokens)
            self.steps += 1

    def _choose(self, reqs: list[_Request], hidden: torch.Tensor, logits: torch.Tensor,
                first: int) -> tuple[list[int], list[int], list[_Request]]:
        """Each request's next token from its rows' outputs (``reqs``' rows in order, the batch's
        rows from ``first`` on), sent to its stream. Returns the batch rows to keep, the tokens to
        feed them and the requests that go on."""
        keep_rows, tokens, still = [], [], []
        eos = self.backend.eos_token_ids
        row = 0
        for r in reqs:
            rows = range(row, row + r.rows)
            row += r.rows
            if r.stream.cancelled:
                r.stream.finish("cancelled")
                continue
            try:
                scores = r.next_logits(hidden[rows.start:rows.stop], logits[rows.start:rows.stop])
                tok = int(sample_next(hold_end(scores, r.config, r.new, eos), r.config, r.generator)[0])
            except Exception as e:  # this request's guide failed: it alone ends
                r.stream.fail(e)
                continue
            if tok in eos:
                r.stream.finish("stop")
                continue
            r.stream.push([tok])
            r.ids.append(tok)
            r.new += 1
            if r.new >= r.steps:
                r.stream.finish("length")
                continue
            keep_rows.extend(first + i for i in rows)
            tokens.extend([tok] * r.rows)
            still.append(r)
        return keep_rows, tokens, still


class ScheduledStreaming:
    """``Backend.stream`` through a `Scheduler`, built at the first streamed request.

    A backend class mixes this in and gives `_row_batch`; ``max_batch_rows`` and ``max_waiting``
    (constructor options of the backend, or `set_stream_limits` before the first request) bound it."""

    max_batch_rows: int = DEFAULT_MAX_ROWS
    max_waiting: int = DEFAULT_MAX_WAITING
    _scheduler: Scheduler | None = None
    _scheduler_guard = threading.Lock()

    def _row_batch(self) -> RowBatch:
        raise NotImplementedError

    def set_stream_limits(self, max_rows: int | None = None, max_waiting: int | None = None) -> None:
        """Bound the rows decoding at once and the requests waiting (the service's `--max-batch-rows`
        and `--max-waiting`); a running scheduler applies them to the requests that come next."""
        rows = self.max_batch_rows if max_rows is None else int(max_rows)
        waiting = self.max_waiting if max_waiting is None else int(max_waiting)
        if rows < 1 or waiting < 0:
            raise ValueError(f"`max_rows` (={rows}) has to be at least 1 and `max_waiting` (={waiting}) "
                             "non-negative")
        with self._scheduler_guard:
            self.max_batch_rows, self.max_waiting = rows, waiting
            if self._scheduler is not None:
                self._scheduler.set_limits(rows, waiting)

    def stream_stats(self) -> dict[str, int]:
        """Requests running and waiting; prompt positions prefilled and, of them, reused."""
        with self._scheduler_guard:
            s = self._scheduler.stats() if self._scheduler is not None else None
        if s is None:  # no request streamed yet
            return {"running": 0, "waiting": 0, "prompt_tokens": 0, "reused_tokens": 0}
        return {"running": s["requests"], "waiting": s["waiting"], "prompt_tokens": s["prompt_tokens"],
                "reused_tokens": s["reused_tokens"]}

    def close(self) -> None:
        """Stop the scheduler (its open streams end "cancelled"); the next `stream` starts another."""
        with self._scheduler_guard:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()

    @property
    def scheduler(self) -> Scheduler:
        with self._scheduler_guard:
            if self._scheduler is None:
                self._scheduler = Scheduler(self, self._row_batch, max_rows=self.max_batch_rows,
                                            max_waiting=self.max_waiting, device=getattr(self, "device", "cpu"))
            return self._scheduler

    def stream(self, context, config: GenerationConfig | None = None, *, guide: Any = None) -> TokenStream:
        """Decode ``context`` together with every other streamed request (see `Scheduler`)."""
        return self.scheduler.submit(self.encode_context(context), config or GenerationConfig(), guide)
