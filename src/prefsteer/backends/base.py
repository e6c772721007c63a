"""The contract every model backend implements: the only way from prefsteer to a model.

A backend hides tokenization, chat templates, devices and the engine's internals. Methods, the
evaluator, the CLI and the service see only the operations declared on `Backend` below; none of
them imports an engine or reaches into a backend's model object.

* ``score``: the summed log-probability (and token count) of each continuation given its chat
  context. Requests whose contexts share a token prefix (one prompt under many attribute variants)
  should share that prefix's computation; the transformers backend does.
* ``generate``: text for each chat context, greedy or sampled. Guided decoding:
  ``generate(..., guide=fn)`` calls ``fn`` at every step with the last hidden state and the
  next-token logits, and decodes from what it returns (CLIPer).
* ``stream``: one context decoded together with every other streamed request (continuous
  batching), its tokens handed out as they are decoded (`prefsteer.backends.streaming.TokenStream`,
  cancellable; `EngineBusy` when the engine is full). Its ``guide`` is a callable guide or, for the
  engines that decode branch rows beside a request, a `DriftGuide` of one row. The service answers
  through it; scripts can keep the blocking ``generate``.
* ``start_decoding``: several contexts decoded in lock step, the caller choosing every next token
  from all rows' logits (Drift mixes one plain and n attribute branches this way).
* ``guide_branches``: for an engine whose logits live in another process (vLLM), where a guide has
  to describe itself as data (``guide.describe()``): ``generate(..., guide=g)`` also takes a guide
  whose description carries, per context, branch contexts the engine decodes beside the request
  (Drift's `DriftGuide`), instead of ``start_decoding``.
* ``hidden_states`` and ``token_embeddings``: what CLIPer's classifier heads are trained on.
* ``encode_context`` / ``encode_continuation`` / ``decode_tokens`` / ``eos_token_ids`` /
  ``eos_text``: the backend's tokenization, for methods that work on token ids.
* ``adapter``: a trainable low-rank adapter on the model for the duration of a ``with`` block,
  giving differentiable last hidden states (Reward's per-user reward model).
* ``cast``: the same model in another precision, as a second backend (EXACT's screen).

A backend that cannot do an operation raises `UnsupportedOperation` naming itself and the
operation, and lists what it can do in ``capabilities``; `require` is the check a method makes
before it starts work.

One backend object serves concurrent calls from several threads: settings that are process-wide
in the engine (precision, attention implementation, thread counts) are fixed when it is loaded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

from prefsteer.errors import PrefsteerError

if TYPE_CHECKING:  # torch stays out of `import prefsteer`
    import torch

    from prefsteer.backends.streaming import TokenStream

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
    min_new_tokens: int = field(default=0, metadata={
        "help": "tokens to generate before an end-of-turn token may be chosen (vLLM's min_tokens)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens when sampling (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` (={self.max_new_tokens}) has to be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"`min_new_tokens` (={self.min_new_tokens}) has to be between 0 and `max_new_tokens` "
                             f"(={self.max_new_tokens})")
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


# the optional operations a backend may lack; the rest of the protocol is required
OPERATIONS = ("score", "generate", "stream", "guide", "guide_branches", "start_decoding", "hidden_states",
              "token_embeddings", "adapter", "cast")


class UnsupportedOperation(PrefsteerError):
    """A backend cannot do what a method asked of it (exit status 2 in the CLI)."""

    def __init__(self, backend: str, operation: str, needed_by: str | None = None):
        self.backend, self.operation = backend, operation
        who = f"{needed_by} needs" if needed_by else "needs"
        super().__init__(f"the '{backend}' backend does not support `{operation}`, which {who}; "
                         f"use a backend that does (e.g. --backend hf)")


def require(backend: "Backend", operation: str, needed_by: str | None = None) -> None:
    """Raise `UnsupportedOperation` unless ``backend`` lists ``operation`` among its capabilities."""
    if operation not in backend.capabilities:
        raise UnsupportedOperation(backend.name, operation, needed_by)


def local_guide(backend: "Backend", guide: Any) -> "Guide | None":
    """The guide of a backend that decodes in this process, which calls it at every step: a guide
    that is only data (Drift's `DriftGuide`, for an engine with ``guide_branches``) is refused."""
    if guide is not None and not callable(guide):
        raise UnsupportedOperation(backend.name, "guide_branches", "a guide given as data")
    return guide


@dataclass(frozen=True)
class AdapterSpec:
    """A low-rank adapter (LoRA) on the backend's model."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


class Adapter(Protocol):
    """A model with a trainable adapter, valid inside the ``with backend.adapter(...)`` block."""

    hidden_size: int

    def parameters(self) -> "list[torch.nn.Parameter]":
        """The adapter's trainable parameters (the base weights stay frozen)."""

    def train(self, mode: bool = True) -> None:
        """Training mode (dropout on) or evaluation mode."""

    def last_hidden(self, sequences: Sequence[Sequence[int]]) -> "torch.Tensor":
        """The last layer's hidden state (B, d, float32) at each token sequence's last position,
        differentiable with respect to `parameters` (under ``torch.enable_grad``)."""

    def state_dict(self) -> "dict[str, torch.Tensor]":
        """The adapter's weights (on the CPU), what ``backend.adapter(spec, state)`` loads back."""


class DecodeSession(Protocol):
    """Rows decoded in lock step on the backend's cache (see `Backend.start_decoding`)."""

    def logits(self) -> "torch.Tensor":
        """Next-token logits (R, V, float32) of every row."""

    def append(self, tokens: Sequence[int]) -> None:
        """Extend row r by ``tokens[r]`` (one token per row)."""


@runtime_checkable
class Backend(Protocol):
    name: str
    capabilities: frozenset[str]  # the operations of `OPERATIONS` this backend supports

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

    @property
    def hidden_size(self) -> int:
        """d, the width of the last hidden state."""

    def stream(self, context: Messages, config: GenerationConfig | None = None, *,
               guide: Any = None) -> "TokenStream":
        """Decode ``context`` among the engine's other requests; its tokens arrive on the stream."""

    def set_stream_limits(self, max_rows: int | None = None, max_waiting: int | None = None) -> None:
        """Bound the rows ``stream`` decodes at once and the requests waiting for a place (with
        ``stream``; the service sets them from `serve --max-batch-rows/--max-waiting`)."""

    def stream_stats(self) -> dict[str, int]:
        """The engine's load now (with ``stream``): requests ``running`` and ``waiting`` for a place;
        where the engine counts them, ``prompt_tokens`` prefilled so far and ``reused_tokens``, those
        of them taken from kept prefixes (the service's /metrics)."""

    def close(self) -> None:
        """Stop what the backend runs beside the caller (the streaming scheduler's thread, vLLM's
        engine process), cancelling streams still open. Safe to call twice; a backend that streams
        starts a new scheduler if asked to stream again, vLLM's is unusable after."""

    # -- tokenization ---------------------------------------------------------------------------
    def encode_context(self, messages: Messages) -> list[int]:
        """Token ids of the chat-templated context, ending with the assistant's turn header."""

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of ``text`` as the assistant's reply (no special tokens added)."""

    def decode_tokens(self, ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens left out."""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end the assistant's turn."""

    @property
    def eos_text(self) -> str | None:
        """The end-of-turn token as text that `encode_continuation` reads back as that one token,
        or None when there is no such text."""

    # -- what some methods need -----------------------------------------------------------------
    def start_decoding(self, contexts: Sequence[Messages]) -> DecodeSession:
        """Prefill ``contexts`` and return a session whose rows the caller extends token by token."""

    def adapter(self, spec: AdapterSpec, state: "dict[str, torch.Tensor] | None" = None
                ) -> AbstractContextManager[Adapter]:
        """A fresh adapter (or one loaded from ``state``) for the duration of a ``with`` block; the
        model is as it was after the block, whatever happened inside. Calls that need the plain
        model (score, generate) wait for the block to end."""

    def cast(self, dtype: str) -> "Backend":
        """The same model in another precision ("bfloat16", "float16", "float32"), as a second
        backend with its own fingerprint; one copy per precision, kept."""

    def info(self) -> dict[str, Any]:
        ...
