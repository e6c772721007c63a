"""The narrow contract every model backend implements.

A backend hides tokenization, chat templates and devices. It answers three questions:

* ``score``: the summed log-probability (and token count) of each continuation given its chat
  context. Requests whose contexts share a token prefix (one prompt under many attribute variants)
  should share that prefix's computation; the transformers backend does.
* ``generate``: text for each chat context, greedy or sampled.
* the next-token step of guided decoding: ``generate(..., guide=fn)`` calls ``fn`` at every step
  with the last hidden state and the next-token logits, and decodes from what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # torch stays out of `import prefsteer`
    import torch

# torch.set_float32_matmul_precision's settings, offered by `--matmul-precision` and checked by the backend
MATMUL_PRECISIONS = ("highest", "high", "medium")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Messages = Sequence[Message]


def user_turn(prompt: str, system: str | None = None) -> list[Message]:
    """The chat context for a single user prompt, with an optional system prompt."""
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    return msgs


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuation`` as the assistant's reply to the chat ``messages``."""
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...): hashable, so it can key a cache
    continuation: str

    @classmethod
    def of(cls, messages: Messages, continuation: str) -> "ScoreRequest":
        return cls(tuple((m["role"], m["content"]) for m in messages), continuation)

    def chat(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum over the continuation's tokens, in nats
    n_tokens: int


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate at most"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens when sampling (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` (={self.max_new_tokens}) has to be at least 1")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"`temperature` (={self.temperature}) has to be a strictly positive float")
        if self.top_k < 0:
            raise ValueError(f"`top_k` (={self.top_k}) has to be a non-negative integer")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` (={self.top_p}) has to be in (0, 1]")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    seconds: float = 0.0  # wall time of the whole batch this generation belongs to


# guide(hidden (B, d), logits (B, V), input_ids (B, T)) -> new logits (B, V), not modified in place
Guide = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@runtime_checkable
class Backend(Protocol):
    name: str

    @property
    def fingerprint(self) -> str:
        """A stable id of the model weights and tokenizer: results and caches are keyed by it."""

    @property
    def template_id(self) -> str:
        """A stable id of the chat template: the same messages render differently under another."""

    @property
    def max_context(self) -> int:
        """The longest context (in tokens) the model accepts."""

    def count_tokens(self, messages: Messages, continuation: str = "") -> int:
        """Tokens of the templated context plus the continuation."""

    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False) -> list[Score]:
        ...

    def generate(self, contexts: Sequence[Messages], config: GenerationConfig | None = None, *,
                 guide: Guide | None = None) -> list[Generation]:
        ...

    def hidden_states(self, requests: Sequence[ScoreRequest]) -> "list[torch.Tensor]":
        """Last-layer hidden states (T_i, d) at the continuation's positions: the state each token
        was predicted from. Classifier heads are trained on these."""

    def token_embeddings(self) -> "torch.Tensor":
        """The input embedding matrix (V, d)."""

    def info(self) -> dict[str, Any]:
        ...
