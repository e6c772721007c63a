"""`ScoreCache`: a backend wrapper that answers repeated score requests from a store's cache.

    >>> scorer = ScoreCache(backend, memory)     # memory: anything with cached_scores / put_scores
    >>> scorer.score(requests)                   # only the misses reach the backend, in one call

A score is keyed by what determines it: the model's fingerprint, its chat template, the request's
messages and continuation (`score_key`); the store (the user memory, `prefsteer.storage.Memory`)
keeps them across processes, users and seeds. The store is given, never imported here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol, Sequence

from prefsteer.backends.base import Score, ScoreRequest


class ScoreStore(Protocol):
    """What `ScoreCache` needs of a store: scores by key, read in bulk and written in bulk."""

    def cached_scores(self, keys: Sequence[str]) -> dict[str, Score]: ...

    def put_scores(self, items: dict[str, Score]) -> None: ...


def score_key(fingerprint: str, template_id: str, messages: object, continuation: str) -> str:
    """The cache key of one score (the same hash the memory's other keys use)."""
    parts = (fingerprint, template_id, messages, continuation)
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


class ScoreCache:
    """A backend wrapper that answers repeated score requests from the memory's cache.

    Only the misses reach the backend, in one call, so they still share their prefix."""

    def __init__(self, backend, memory: ScoreStore):
        self.backend, self.memory = backend, memory
        self.hits = self.misses = 0

    def key(self, req: ScoreRequest) -> str:
        return score_key(self.backend.fingerprint, self.backend.template_id, req.messages, req.continuation)

    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False) -> list[Score]:
        keys = [self.key(r) for r in requests]
        found = self.memory.cached_scores(list(dict.fromkeys(keys)))
        todo = {k: r for k, r in zip(keys, requests) if k not in found}
        self.hits += len(requests) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = dict(zip(todo, self.backend.score(list(todo.values()), progress=progress)))
            self.memory.put_scores(fresh)
            found.update(fresh)
        return [found[k] for k in keys]


__all__ = ["ScoreCache", "ScoreStore", "score_key"]
