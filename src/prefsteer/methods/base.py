"""What a personalization method is: fitted on a user's pairs, it ranks responses and generates.

The evaluator, the CLI and the HTTP service see only this interface, so a new method is one class
registered by name:

    @register_method("mine")
    class Mine(Method):
        config_class = MineConfig             # a dataclass: its fields become --mine-<field> options
        def fit(self, user_id, pairs): ...    # learns, then self.save_state(user_id, {...})
        def margins(self, user_id, pairs): ...
        def decodings(self, user_id, conversations, config): ...   # context + guide per answer

A conversation is what OpenAI's chat API sends: a list of ``{"role", "content"}`` messages (system,
user, assistant) ending with the user's turn. ``generate`` answers each one; a plain string is the
one-line convenience for a single user turn (`as_conversations` turns it into one, so every method
has one path). The caller stores a user's pairs in the memory; ``fit`` learns from the pairs it is
given and stores only its own state.

A method says how it answers as data: `decodings` gives, per conversation, the context the model
reads and the guide that steers it (`Decoding`). From that one description ``generate`` decodes a
batch (blocking, for scripts and the evaluator) and ``stream`` hands one answer to the backend's
engine, which decodes it among other requests and gives its text as it comes (`AnswerStream`), so
the two give the same text. A method whose answer is not one decoding (Reward picks the best of
several samples) overrides ``generate`` instead, and its stream gives the answer whole.

Per-user state lives in the memory (`Memory.put_method_state`), keyed by user, method and
`state_id` (the model fingerprint, chat template and the method's options), so a method fitted in
one process generates for that user in any other: `load_state` reads what `save_state` wrote.
`profile` says what was learned and `feedback` takes new pairs the way the method can (EXACT
indexes them, Base and Drift refit, others mark their state stale). Serving a user with no stored
state (or, for a method that needs a user, no user) raises `NotFittedError`; an option the method
does not have raises `UnknownOptionError` (checked against ``config_class`` when the method is
built, or by `config_from_options`). Methods are built by `prefsteer.methods.registry.build`.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, ClassVar, Iterator, Sequence

from prefsteer.backends.base import Backend, GenerationConfig, Message, Messages, require
from prefsteer.errors import PrefsteerError
from prefsteer.types import PreferencePair

if TYPE_CHECKING:
    from prefsteer.backends.streaming import TokenStream
    from prefsteer.storage import Memory

# resources the evaluator hands to every method whose constructor takes ``**options``
SHARED_OPTIONS = ("scorer",)


class NotFittedError(PrefsteerError, ValueError):
    """A method was asked to serve a user it has no stored state for (``user_id`` None: it was
    asked without a user, and it needs one)."""

    def __init__(self, method: str, user_id: str | None, hint: str | None = None):
        self.method, self.user_id = method, user_id
        if user_id is None:
            what = f"method '{method}' needs a user (it serves what it learned from a user's pairs)"
        else:
            what = (f"user '{user_id}' has not been fitted with the '{method}' method (for this model and "
                    f"these options); run `prefsteer index --method {method} --data FILE` with the "
                    "user's pairs first")
        super().__init__(f"{hint + ': ' if hint else ''}{what}")


class ConversationError(PrefsteerError, ValueError):
    """A conversation a method cannot answer (names the message at fault)."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        super().__init__(f"message {index}: {message}" if index is not None else message)


ROLES = ("system", "user", "assistant")


def as_conversation(conversation: "str | Messages") -> list[Message]:
    """A validated copy of ``conversation``: a string is a single user turn; a list of messages
    has roles among system / user / assistant, a system prompt only first, string contents, and
    ends with the user's turn."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    msgs: list[Message] = []
    for i, m in enumerate(conversation):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES:
            raise ConversationError(f"role {role!r} is not one of {', '.join(ROLES)}", i)
        if not isinstance(content, str):
            raise ConversationError(f"content has to be a string, not {type(content).__name__}", i)
        if role == "system" and i > 0:
            raise ConversationError("a system prompt has to be the first message", i)
        msgs.append({"role": role, "content": content})
    if not msgs or msgs[-1]["role"] != "user":
        raise ConversationError("the conversation has to end with the user's turn")
    return msgs


def as_conversations(conversations: "str | Sequence[str | Messages]") -> list[list[Message]]:
    """`as_conversation` of each; a lone string is one conversation of one user turn."""
    if isinstance(conversations, str):
        conversations = [conversations]
    return [as_conversation(c) for c in conversations]


def last_user_turn(conversation: Messages) -> str:
    """The content of the conversation's last message (the user's turn it answers)."""
    return conversation[-1]["content"]


def with_system(conversation: Messages, system: str | None) -> list[Message]:
    """The conversation with ``system`` added to its system prompt: the caller's own system prompt
    comes first and ``system`` follows it after a blank line; without one, ``system`` becomes it."""
    msgs = [dict(m) for m in conversation]
    if not system:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        head = msgs[0]["content"]
        msgs[0]["content"] = f"{head}\n\n{system}" if head else system
    else:
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def with_user_suffix(conversation: Messages, text: str) -> list[Message]:
    """The conversation with ``text`` on a new line at the end of its last user turn."""
    msgs = [dict(m) for m in conversation]
    msgs[-1]["content"] = f"{msgs[-1]['content']}\n{text}"
    return msgs


class UnknownOptionError(PrefsteerError, ValueError):
    """A method was given an option it does not have (names the option and the known ones)."""

    def __init__(self, method: str, option: str, known: Sequence[str]):
        self.method, self.option = method, option
        hint = f"; known: {', '.join(sorted(known))}" if known else "; it takes no options"
        super().__init__(f"unknown option '{option}' for method '{method}'{hint}")


class OptionError(PrefsteerError, ValueError):
    """A method option has a bad value (the config's own message, with the method named)."""


def option_names(method_cls: type) -> list[str]:
    """The keyword options a method accepts besides its constructor's named parameters."""
    cfg = getattr(method_cls, "config_class", None)
    names = [f.name for f in dataclasses.fields(cfg)] if cfg is not None else []
    return names + list(getattr(method_cls, "extra_options", ()))


def check_options(method_cls: type, options: dict[str, Any]) -> None:
    """Raise `UnknownOptionError` for the first key of ``options`` that ``method_cls`` does not know."""
    known = option_names(method_cls)
    for key in options:
        if key not in known and key not in SHARED_OPTIONS:
            raise UnknownOptionError(getattr(method_cls, "name", "") or method_cls.__name__, key, known)


def config_from_options(config_class: type, options: dict[str, Any], method_name: str,
                        config: Any = None, extra: Sequence[str] = ()) -> Any:
    """The method's config from its keyword options: ``config`` (or the defaults) with the options
    that are fields of ``config_class`` set. A key that is neither a field, one of ``extra`` nor a
    shared resource raises `UnknownOptionError` naming it; a bad value raises `OptionError`."""
    fields = [f.name for f in dataclasses.fields(config_class)]
    for key in options:
        if key not in fields and key not in extra and key not in SHARED_OPTIONS:
            raise UnknownOptionError(method_name, key, fields + list(extra))
    given = {k: v for k, v in options.items() if k in fields}
    try:
        if config is None:
            return config_class(**given)
        return dataclasses.replace(config, **given) if given else config
    except (TypeError, ValueError) as e:
        if isinstance(e, PrefsteerError):
            raise
        raise OptionError(f"method '{method_name}': {e}") from e


@dataclass
class MethodOutput:
    text: str
    attributes: list[str] = field(default_factory=list)  # what was injected, where that applies
    timings: dict[str, float] = field(default_factory=dict)  # seconds: e.g. retrieval, generation
    extra: dict[str, Any] = field(default_factory=dict)
    # the chat context the answer was generated from (the caller's conversation with what the
    # method added: a history prompt, attributes): what `usage.prompt_tokens` counts
    context: list[Message] | None = None


@dataclass
class Decoding:
    """An answer that is one decoding of the backend: the chat context the model reads, the guide
    that steers it (None, a callable guide, or a `DriftGuide` of one row), and what the method
    reports beside the text. `Method.generate` decodes a batch of these, `Method.stream` one."""
    context: list[Message]
    guide: Any = None
    attributes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def output(self, text: str = "") -> MethodOutput:
        return MethodOutput(text, list(self.attributes), dict(self.timings), dict(self.extra), self.context)


class AnswerStream:
    """A method's answer as the backend decodes it (`Method.stream`).

    ``output`` (the attributes, the context, the timings so far) is known before the first token.
    Iterating (``for piece in s`` from a thread, ``async for`` from an event loop) gives the text
    piece by piece; at the end ``output.text`` is the whole text, ``token_ids`` its tokens and
    ``finish_reason`` "stop", "length" or "cancelled". ``cancel()`` stops the decoding at the
    engine's next step. An answer that is not one decoding (`Method.decodings` gives None) comes
    whole, as one piece, with ``finish_reason`` and ``token_ids`` None."""

    def __init__(self, output: MethodOutput, backend: Backend, tokens: "TokenStream | None" = None):
        from prefsteer.backends.streaming import TextDeltas

        self.output, self.backend, self.tokens = output, backend, tokens
        self._text = TextDeltas(backend.decode_tokens)

    @property
    def finish_reason(self) -> str | None:
        return None if self.tokens is None else self.tokens.finish_reason

    @property
    def token_ids(self) -> list[int] | None:
        return None if self.tokens is None else self.tokens.token_ids

    def cancel(self) -> None:
        if self.tokens is not None:
            self.tokens.cancel()

    def _pieces(self, ids: list[int] | None) -> str:
        if ids is None:  # the end
            piece = self._text.flush()
            self.output.text = self._text.text
            return piece
        return self._text.feed(ids)

    def __iter__(self) -> Iterator[str]:
        if self.tokens is None:
            yield self.output.text
            return
        for ids in self.tokens:
            if piece := self._pieces(ids):
                yield piece
        if piece := self._pieces(None):
            yield piece

    async def __aiter__(self) -> AsyncIterator[str]:
        if self.tokens is None:
            yield self.output.text
            return
        async for ids in self.tokens:
            if piece := self._pieces(ids):
                yield piece
        if piece := self._pieces(None):
            yield piece


class Method(ABC):
    name: str = ""
    # the shared resources (fields of `prefsteer.methods.registry.Resources`) the constructor takes
    resources: ClassVar[tuple[str, ...]] = ("memory",)
    # whether the method keeps anything per user (`none` does not: it serves anyone, fitted or not)
    per_user: ClassVar[bool] = True
    # whether its state is built from the stored pairs alone, without the model (cheap enough to
    # build when a user is first served: Base's history prompt)
    fits_on_demand: ClassVar[bool] = False
    # whether it selects per pair, independently (EXACT: what `index --executor ray` spreads)
    selects_per_pair: ClassVar[bool] = False
    # the command line's spelling of its options: --<prefix><field> (None: --<name>-<field>)
    option_prefix: ClassVar[str | None] = None
    # the method's options as a dataclass whose fields carry their help text (None: no options)
    config_class: ClassVar[type | None] = None
    # keyword options taken besides the config's fields, passed to the constructor (Reward's ``system``)
    extra_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backend: Backend, memory: "Memory | None" = None, **options: Any):
        if type(self).config_class is not None:  # a method without a config checks its own options
            check_options(type(self), options)
        self.backend = backend
        self.memory = memory
        self.options = options

    # -- persisted per-user state ----------------------------------------------------------
    @property
    def state_id(self) -> str:
        """What a stored state was learned under: model, chat template and the method's options.
        A state is served only to a method built the same way."""
        from prefsteer.types import sha

        return sha(self.name, self.backend.fingerprint, self.backend.template_id, self.state_options())[:16]

    def state_options(self) -> dict[str, Any]:
        """The options a stored state depends on (default: the whole config). A method whose
        decoding-time options do not change what `fit` learns leaves them out, so a user fitted
        once can be served with another ``beta`` or ``alpha``."""
        cfg = getattr(self, "config", None)
        return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}

    def save_state(self, user_id: str, state: dict[str, Any], files: dict[str, bytes] | None = None,
                   n_pairs: int | None = None) -> None:
        """Store ``state`` (JSON-able) and ``files`` (name -> bytes) for the user, all or nothing."""
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.put_method_state(user_id, self.name, self.state_id, self.backend.fingerprint, state,
                                    files=files, n_pairs=n_pairs)

    def load_state(self, user_id: str) -> dict[str, Any] | None:
        """The stored state of the user under this `state_id` (with ``"files"``: name -> bytes, and
        ``"stale"``), or None when there is none."""
        memory = getattr(self, "memory", None)
        return None if memory is None else memory.method_state(user_id, self.name, self.state_id)

    def require_state(self, user_id: str) -> dict[str, Any]:
        """`load_state`, or `NotFittedError` when the user has no state under this method."""
        st = self.load_state(user_id)
        if st is None:
            raise NotFittedError(self.name, user_id)
        return st

    def profile(self, user_id: str) -> dict[str, Any]:
        """What the method learned about the user, JSON-able (``{"fitted": False}`` when nothing)."""
        st = self.load_state(user_id)
        if st is None:
            return {"method": self.name, "fitted": False}
        return {"method": self.name, "fitted": True, "stale": st["stale"], "pairs": st["n_pairs"],
                "updated": st["updated"], "state": self.describe_state(st["state"])}

    def length_contexts(self, pair: PreferencePair) -> list[list[Message]]:
        """The longest chat contexts the method builds for ``pair``'s prompt (the CLI refuses a pair
        that cannot fit the model with its longer answer)."""
        return [[{"role": "user", "content": pair.prompt}]]

    def learned(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
        """What the method learned from each of ``pairs``, pair by pair, where it learns per pair."""
        return []

    def summary(self, user_id: str) -> dict[str, Any]:
        """A few counts of what the method holds for the user, for `prefsteer index`'s report."""
        return {}

    def warm_up(self) -> None:
        """Load what the first request would otherwise wait for (so that timings are per request)."""

    def describe_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The part of a stored state that `profile` shows (default: all of it)."""
        return state

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        """Take new pairs (the caller has stored them in the memory) into account; returns what was done:
        ``"indexed"``, ``"refit"``, ``"stale"`` (the state no longer covers every pair: fit again)
        or ``"unchanged"`` (a method with no per-user state)."""
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.mark_stale(user_id, self.name)
        return "stale"

    @abstractmethod
    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        """Learn the user's taste from ``pairs`` (offline) and store the method's state; the pairs
        themselves are the caller's to store."""

    @abstractmethod
    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        """For each pair, score(chosen) - score(rejected) under this method: > 0 ranks chosen first."""

    def decodings(self, user_id: str | None, conversations: list[list[Message]],
                  config: GenerationConfig) -> list[Decoding] | None:
        """Each answer as one decoding of the backend (`Decoding`), for conversations already read by
        `as_conversations`; None for a method whose answer is not one decoding (Reward picks the
        best of several samples), which then overrides `generate` and streams its answer whole."""
        return None

    def generate(self, user_id: str | None, conversations: "Sequence[str | Messages]",
                 config: GenerationConfig | None = None) -> list[MethodOutput]:
        """The answer to each conversation for the user (`as_conversations` reads them): the
        method's `decodings`, decoded by the backend in one call per guide."""
        require(self.backend, "generate", f"the {self.name} method")
        config = config or GenerationConfig()
        plans = self.decodings(user_id, as_conversations(conversations), config)
        if plans is None:
            raise NotImplementedError(f"method '{self.name}' gives no decodings: it has to override generate")
        outs: list[MethodOutput | None] = [None] * len(plans)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(plans):
            groups.setdefault(id(p.guide), []).append(i)
        for idx in groups.values():
            start = time.perf_counter()
            gens = self.backend.generate([plans[i].context for i in idx], config, guide=plans[idx[0]].guide)
            secs = time.perf_counter() - start
            for i, g in zip(idx, gens):
                outs[i] = plans[i].output(g.text)
                outs[i].timings["generation"] = secs
        return outs  # type: ignore[return-value]

    def stream(self, user_id: str | None, conversation: "str | Messages",
               config: GenerationConfig | None = None) -> AnswerStream:
        """The answer to one conversation as the backend decodes it, among the engine's other
        requests (`Backend.stream`); the same text as `generate`'s. On a backend without ``stream``,
        or for a method whose answer is not one decoding, the answer is generated and comes whole."""
        config = config or GenerationConfig()
        conv = as_conversation(conversation)
        plans = self.decodings(user_id, [conv], config) if "stream" in self.backend.capabilities else None
        if plans is None:
            return AnswerStream(self.generate(user_id, [conv], config)[0], self.backend)
        plan = plans[0]
        return AnswerStream(plan.output(), self.backend, self.backend.stream(plan.context, config, guide=plan.guide))


_REGISTRY: dict[str, str] = {}


def register_method(name: str, target: str | None = None):
    """Register a Method subclass by name; as a decorator, or with ``"module:Class"`` for lazy import."""
    if target is not None:
        _REGISTRY[name] = target
        return None

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = f"{cls.__module__}:{cls.__qualname__}"
        return cls
    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


class UnknownMethodError(PrefsteerError, ValueError):
    def __init__(self, name: str):
        self.method = name
        super().__init__(f"unknown method '{name}'; available: {', '.join(available_methods())}")


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise UnknownMethodError(name)
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
