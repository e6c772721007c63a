"""No personalization: the base model as it is (the reference every method is compared with).

It learns nothing, so it stores nothing: `generate` works for any user, fitted or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from prefsteer.backends.base import GenerationConfig, Messages, ScoreRequest, require, user_turn
from prefsteer.types import PreferencePair
from prefsteer.methods.base import Decoding, Method, register_method


def plain_margins(scorer, pairs: Sequence[PreferencePair], system: str | None = None) -> list[float]:
    reqs = []
    for p in pairs:
        msgs = user_turn(p.prompt, system)
        reqs += [ScoreRequest.of(msgs, p.chosen), ScoreRequest.of(msgs, p.rejected)]
    s = scorer.score(reqs)
    return [w.logprob - l.logprob for w, l in zip(s[0::2], s[1::2])]


@dataclass
class PlainConfig:
    """`none` has no options."""


@register_method("none")
class Plain(Method):
    config_class = PlainConfig
    resources = ("memory", "scorer")
    per_user = False

    def __init__(self, backend, memory=None, scorer=None, config: PlainConfig | None = None, **options: Any):
        super().__init__(backend, memory=memory, **options)
        self.scorer = scorer
        self.config = config or PlainConfig()

    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        pass  # nothing to learn, nothing to store

    def profile(self, user_id: str) -> dict[str, Any]:
        return {"method": self.name, "fitted": True, "stale": False, "pairs": None, "updated": None,
                "state": {"note": "no per-user state: the base model as it is"}}

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        return "unchanged"

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        require(self.backend, "score", "the none method's margins")
        return plain_margins(self.scorer or self.backend, pairs)

    def decodings(self, user_id: str | None, conversations: list[Messages],
                  config: GenerationConfig) -> list[Decoding]:
        return [Decoding(list(c)) for c in conversations]
