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
indexes them, Drift refits, others mark their state stale).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from prefsteer.backends.base import Backend, GenerationConfig
from prefsteer.types import PreferencePair


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

    def __init__(self, backend: Backend, **options: Any):
        self.backend = backend
        self.options = options

    # -- persisted per-user state ----------------------------------------------------------
    @property
    def state_id(self) -> str:
        """What a stored state was learned under: model, chat template and the method's options.
        A state is served only to a method built the same way."""
        from prefsteer.memory import sha

        cfg = getattr(self, "config", None)
        opts = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
        return sha(self.name, self.backend.fingerprint, self.backend.template_id, opts)[:16]

    def save_state(self, user_id: str, state: dict[str, Any], files: dict[str, bytes] | None = None,
                   n_pairs: int | None = None) -> None:
        """Store ``state`` (JSON-able) and ``files`` (name -> bytes) for the user, all or nothing."""
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.put_method_state(user_id, self.name, self.state_id, self.backend.fingerprint, state,
                                    files=files, n_pairs=n_pairs)

    def load_state(self, user_id: str) -> dict[str, Any] | None:
        """The stored state of the user under this `state_id` (with ``"files"``: name -> path, and
        ``"stale"``), or None when there is none."""
        memory = getattr(self, "memory", None)
        return None if memory is None else memory.method_state(user_id, self.name, self.state_id)

    def profile(self, user_id: str) -> dict[str, Any]:
        """What the method learned about the user, JSON-able (``{"fitted": False}`` when nothing)."""
        st = self.load_state(user_id)
        if st is None:
            return {"method": self.name, "fitted": False}
        return {"method": self.name, "fitted": True, "stale": st["stale"], "pairs": st["n_pairs"],
                "updated": st["updated"], "state": st["state"]}

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        """Take new pairs (already stored in the memory) into account; returns what was done:
        ``"indexed"``, ``"refit"`` or ``"stale"`` (the state no longer covers every pair: fit again)."""
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
