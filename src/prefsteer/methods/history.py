"""Base: the user's training pairs written into the system prompt (EXACT's in-context baseline).

The system prompt lists the user's past choices, oldest first, at most ``max_pairs`` (200) pairs and
``max_chars`` (20,000) characters; pairs that do not fit whole are left out (a single pair longer
than the budget is cut to it, so the prompt is never empty when the user has pairs). A pair's margin
is log p(chosen | system, prompt) - log p(rejected | system, prompt).

In a conversation that has a system prompt of its own, the caller's system prompt comes first and
the history follows it after a blank line, so the caller's instructions keep their place and the
user's choices are read as context for them.

    >>> base = BasePrompt(backend, memory=Memory("memory.db"), max_pairs=50)
    >>> base.fit("alice", pairs)                   # stores the system prompt for alice
    >>> base.margins("alice", test_pairs)          # > 0: chosen ranked first
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from prefsteer.backends.base import GenerationConfig, Messages, require
from prefsteer.types import PreferencePair
from prefsteer.methods.base import (Decoding, Method, NotFittedError, config_from_options, register_method,
                                    with_system)
from prefsteer.methods.plain import plain_margins

MAX_PAIRS = 200
MAX_CHARS = 20_000

HEADER = ("You are answering a user whose preferences are shown below by their past choices. Each "
          "example gives a request, the response the user preferred and the one they rejected. "
          "Answer the new request the way this user would prefer.\n")


def format_pair(pair: PreferencePair, index: int) -> str:
    return (f"\n### Example {index}\nRequest: {pair.prompt}\nPreferred response: {pair.chosen}\n"
            f"Rejected response: {pair.rejected}\n")


def build_system_prompt(pairs: Sequence[PreferencePair], max_pairs: int = MAX_PAIRS,
                        max_chars: int = MAX_CHARS, header: str = HEADER) -> tuple[str, int]:
    """The system prompt and how many pairs it holds (whole pairs only, in the given order)."""
    if max_pairs < 1:
        raise ValueError(f"`max_pairs` (={max_pairs}) has to be at least 1")
    if max_chars <= len(header):
        raise ValueError(f"`max_chars` (={max_chars}) has to exceed the header's {len(header)} characters")
    text, used = header, 0
    for i, p in enumerate(pairs[:max_pairs]):
        block = format_pair(p, i + 1)
        if len(text) + len(block) > max_chars:
            if used == 0:  # one huge pair: keep what fits rather than nothing
                text, used = (text + block)[:max_chars], 1
            break
        text, used = text + block, used + 1
    return text, used


@dataclass
class BaseConfig:
    max_pairs: int = field(default=MAX_PAIRS, metadata={"help": "past pairs in the system prompt at most"})
    max_chars: int = field(default=MAX_CHARS, metadata={"help": "characters of the system prompt at most"})

    def __post_init__(self):
        if self.max_pairs < 1:
            raise ValueError(f"`max_pairs` (={self.max_pairs}) has to be at least 1")
        if self.max_chars <= len(HEADER):
            raise ValueError(f"`max_chars` (={self.max_chars}) has to exceed the header's {len(HEADER)} characters")


@register_method("base")
class BasePrompt(Method):
    """Options: the fields of `BaseConfig`. The stored state is the system prompt itself and the
    ids of the pairs it holds."""

    config_class = BaseConfig
    resources = ("memory", "scorer")
    fits_on_demand = True

    def __init__(self, backend, memory=None, scorer=None, config: BaseConfig | None = None, **options):
        super().__init__(backend, memory=memory, **options)
        self.scorer = scorer
        self.config = config_from_options(BaseConfig, options, "base", config)
        self.max_pairs, self.max_chars = self.config.max_pairs, self.config.max_chars
        self.systems: dict[str, str] = {}   # user -> system prompt, this process's copy of the state
        self.n_pairs: dict[str, int] = {}

    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        pairs = list(pairs)
        system, n = build_system_prompt(pairs, self.max_pairs, self.max_chars)
        self.systems[user_id], self.n_pairs[user_id] = system, n
        self.save_state(user_id, {"system": system, "pairs_in_prompt": n,
                                  "pair_ids": [p.pair_id for p in pairs[:n]]}, n_pairs=len(pairs))

    def system(self, user_id: str | None) -> str:
        if user_id is None:
            raise NotFittedError(self.name, None)
        if user_id not in self.systems:
            st = self.require_state(user_id)["state"]
            self.systems[user_id], self.n_pairs[user_id] = st["system"], st["pairs_in_prompt"]
        return self.systems[user_id]

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        """The history prompt is rebuilt from every stored pair (no model call)."""
        if self.memory is None:
            return super().feedback(user_id, pairs)
        self.fit(user_id, self.memory.pairs(user_id))
        return "refit"

    def describe_state(self, state: dict) -> dict:
        return {"pairs_in_prompt": state["pairs_in_prompt"], "pair_ids": state["pair_ids"],
                "prompt_chars": len(state["system"])}

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        require(self.backend, "score", "the base method's margins")
        return plain_margins(self.scorer or self.backend, pairs, self.system(user_id))

    def decodings(self, user_id: str | None, conversations: list[Messages],
                  config: GenerationConfig) -> list[Decoding]:
        system = self.system(user_id)
        return [Decoding(with_system(c, system), extra={"pairs_in_prompt": self.n_pairs[user_id]})
                for c in conversations]
