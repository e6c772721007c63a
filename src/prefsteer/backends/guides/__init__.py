"""Guides as data: the kinds of guide an engine in another process rebuilds from a description.

A guide that has to reach logits living in another process (vLLM's engine) describes itself as plain
data (``guide.describe()``: a dict with ``format``, ``kind``, ``key``, ``fingerprint``, ...). Each kind
registers here what such an engine needs to run it, so the engine (`prefsteer.backends.vllm.side`)
imports no method:

* ``check(desc)``: raise ValueError unless ``desc`` is one request's description of this kind;
* ``build(desc, side)``: the guide, on the side model ``side`` (a `TransformersBackend` of the model
  ``desc["fingerprint"]`` names; the caller checks that);
* ``prefixes(desc, prompt_len)``: ``(plain, prefixes)``, the side rows a request keeps: each row reads
  its prefix (None: the request's own prompt) and then the request's accepted tokens; ``plain`` says
  the first row is the plain branch (else the request's own logits are);
* ``step(guide, side, hidden, logits, plain)``: the guided logits (B, V) of requests whose rows' last
  hidden states are ``hidden`` (B, S, d) and whose engine logits are ``logits`` (B, V);
* ``mismatch``: what to say when the side model is not the one the guide was made for (formatted
  with ``fingerprint``, ``side`` and ``side_fingerprint``).

Built in, loaded on first use: ``cliper`` (`prefsteer.backends.guides.cliper`: CLIPer's heads and
guidance step) and ``drift`` (`prefsteer.backends.guides.drift`: Drift's mixture). The methods build
their guides from these modules (methods import backends, never the other way round).

    >>> check_description(desc)                     # the kind's own check
    >>> kind_of(desc).build(desc, side)             # the guide, in the engine's process
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_KIND = "cliper"  # a description without ``kind`` (CLIPer's came first)


@dataclass(frozen=True)
class GuideKind:
    name: str
    check: Callable[[Any], None]
    build: Callable[[dict, Any], Any]
    prefixes: Callable[[dict, "int | None"], "tuple[bool, list[list[int] | None]]"]
    step: Callable[[Any, Any, Any, Any, bool], Any]
    mismatch: str = "the guide was made for the model {fingerprint}, but {side} is {side_fingerprint}"


_KINDS: dict[str, GuideKind] = {}
# name -> the module that registers it when imported (torch loads only then)
_BUILTIN: dict[str, str] = {"cliper": "prefsteer.backends.guides.cliper", "drift": "prefsteer.backends.guides.drift"}


def register_guide_kind(kind: GuideKind) -> GuideKind:
    """Register ``kind`` under ``kind.name`` (a later registration of the same name wins)."""
    _KINDS[kind.name] = kind
    return kind


def available_guide_kinds() -> list[str]:
    return sorted(set(_KINDS) | set(_BUILTIN))


def guide_kind(name: str) -> GuideKind:
    if name not in _KINDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _KINDS:
        raise ValueError(f"unknown guide kind {name!r}; known: {', '.join(available_guide_kinds())}")
    return _KINDS[name]


def kind_of(desc: Any) -> GuideKind:
    """The kind of the description ``desc`` (its ``kind``, by default CLIPer's)."""
    return guide_kind(desc.get("kind", DEFAULT_KIND) if isinstance(desc, dict) else DEFAULT_KIND)


def check_description(desc: Any) -> None:
    """Raise ValueError unless ``desc`` is a guide description of a registered kind, valid for it."""
    kind_of(desc).check(desc)


__all__ = ["DEFAULT_KIND", "GuideKind", "available_guide_kinds", "check_description", "guide_kind", "kind_of",
           "register_guide_kind"]
