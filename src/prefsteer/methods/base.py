"""What a personalization method is: fitted on a user's pairs, it ranks responses and generates.

The evaluator, the CLI and the HTTP service see only this interface, so a new method is one class
registered by name:

    @register_method("mine")
    class Mine(Method):
        config_class = MineConfig             # a dataclass: its fields become --mine-<field> options
        def fit(self, user_id, pairs): ...    # learns, then self.save_state(user_id, {...})
        def margins(self, user_id, pairs): ...
        def generate(self, user_id, prompts, config=None): ...

Per-user state lives in the memory (`Memory.put_method_state`), keyed by user, method and
`state_id` (the model fingerprint, chat template and the method's options), so a method fitted in
one process generates for that user in any other: `load_state` reads what `save_state` wrote.
`profile` says what was learned and `feedback` takes new pairs the way the method can (EXACT
indexes them, Drift refits, others mark their state stale). Serving a user with no stored state
raises `NotFittedError`; an option the method does not have raises `UnknownOptionError` (checked
against ``config_class`` when the method is built, or by `config_from_options`).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from prefsteer.backends.base import Backend, GenerationConfig
from prefsteer.errors import PrefsteerError
from prefsteer.types import PreferencePair

if TYPE_CHECKING:
    from prefsteer.memory import Memory

# resources the evaluator hands to every method whose constructor takes ``**options``
SHARED_OPTIONS = ("scorer",)


class NotFittedError(PrefsteerError, ValueError):
    """A method was asked to serve a user it has no stored state for."""

    def __init__(self, method: str, user_id: str | None, hint: str | None = None):
        self.method, self.user_id = method, user_id
        super().__init__(f"{hint + ': ' if hint else ''}user '{user_id}' has not been fitted with the "
                         f"'{method}' method (for this model and these options); run "
                         f"`prefsteer index --method {method} --data FILE` with the user's pairs first")


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


class Method(ABC):
    name: str = ""
    # the method's options as a dataclass whose fields carry their help text (None: no options)
    config_class: ClassVar[type | None] = None
    # keyword options taken besides the config's fields (read from ``self.options``)
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
        from prefsteer.memory import sha

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
            if files and getattr(memory, "path", None) == ":memory:":
                files = None  # an in-memory database keeps no files: this process's copy serves
            memory.put_method_state(user_id, self.name, self.state_id, self.backend.fingerprint, state,
                                    files=files, n_pairs=n_pairs)

    def load_state(self, user_id: str) -> dict[str, Any] | None:
        """The stored state of the user under this `state_id` (with ``"files"``: name -> path, and
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

    def describe_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The part of a stored state that `profile` shows (default: all of it)."""
        return state

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        """Take new pairs (already stored in the memory) into account; returns what was done:
        ``"indexed"``, ``"refit"``, ``"stale"`` (the state no longer covers every pair: fit again)
        or ``"unchanged"`` (a method with no per-user state)."""
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.mark_stale(user_id, self.name)
        return "stale"

    @abstractmethod
    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        """Learn the user's taste from training pairs (offline; may be incremental)."""

    @abstractmethod
    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        """For each pair, score(chosen) - score(rejected) under this method: > 0 ranks chosen first."""

    @abstractmethod
    def generate(self, user_id: str, prompts: Sequence[str],
                 config: GenerationConfig | None = None) -> list[MethodOutput]:
        ...


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


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; available: {', '.join(available_methods())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
