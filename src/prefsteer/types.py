"""The records every part of prefsteer passes around."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def sha(*parts: object) -> str:
    """A stable hex digest of JSON-able parts (ids of configurations, prompts, states)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class PreferencePair:
    """One "I prefer this answer to that one" choice of one user."""
    user_id: str
    prompt: str
    chosen: str
    rejected: str
    pair_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # (file, 1-based line) the pair was read from, so later checks can point at it
    source: tuple[str, int] | None = field(default=None, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        d = {"user_id": self.user_id, "pair_id": self.pair_id, "prompt": self.prompt,
             "chosen": self.chosen, "rejected": self.rejected}
        if self.meta:
            d["meta"] = self.meta
        return d


def pair_key(user_id: str, prompt: str, chosen: str, rejected: str) -> str:
    """A pair's identity by content: the same four texts give the same key, any change another."""
    return "c" + sha("pair", user_id, prompt, chosen, rejected)[:23]


def with_id(p: PreferencePair) -> PreferencePair:
    """``p`` with its content key as ``pair_id`` when it has no id of its own."""
    if p.pair_id:
        return p
    return dataclasses.replace(p, pair_id=pair_key(p.user_id, p.prompt, p.chosen, p.rejected))
