"""The preference dimensions CLIPer knows, and parsing of ``--prefs concise=1,humor=0.5``.

Each preference has an *instruction* (used to produce its training data: the base model answers
with and without it) and an *attribute* line for EXACT-style prompt injection (used by the
evaluation as the baseline and, in a different wording from the instruction, as the strength
scorer), so the classifier and the scorer do not share a prompt.

    >>> parse_prefs("concise=1, humorous=0.5")
    {'concise': 1.0, 'humor': 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

PERSONAL = "personal"  # the user's own classifier, trained on their preference pairs by `fit`


@dataclass(frozen=True)
class Preference:
    name: str
    instruction: str  # appended to the user's turn to produce the positive training responses
    attribute: str    # the EXACT attribute (library name) or a free "Name (description)" line
    description: str  # one line for help texts


PREFERENCES: dict[str, Preference] = {p.name: p for p in (
    Preference("concise", "Answer in one short sentence.", "Concise",
               "short and to the point"),
    Preference("humor", "Make your answer funny: add a joke or a witty remark.", "Humor",
               "funny, playful, witty"),
    Preference("formal", "Write in a formal, professional register, as in an official report.",
               "Formal", "formal, professional register"),
    Preference("empathetic", "Show warmth and empathy for the person who wrote the post.",
               "Empathetic", "understanding and caring about the writer's feelings"),
    Preference("helpful", "Be as helpful as possible: end with practical, actionable advice.",
               "Helpful (practical, useful and actionable for the reader)",
               "practical, useful and actionable"),
)}

ALIASES = {"humorous": "humor", "funny": "humor", "empathy": "empathetic", "brief": "concise",
           "short": "concise", "user": PERSONAL}


def canonical_name(name: str) -> str:
    """The canonical preference name; the user's personal classifier is ``personal``."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


def _bad(message: str) -> ValueError:
    """`InputError` (a `PrefsteerError` and a ValueError) about the ``prefs`` option."""
    from prefsteer.errors import InputError

    err = InputError(message)
    err.field = "prefs"
    return err


def parse_prefs(spec: str | Mapping[str, float] | None, *, known: set[str] | None = None,
                allow_personal: bool = True) -> dict[str, float]:
    """``"concise=1,humor=0.5"`` or ``{"concise": 1}`` -> ``{name: weight}``, validated.

    A bare name means weight 1. A negative weight steers *away* from the preference (the guide
    then uses log(1 - p(c)) in its place). ``known`` are the names that may be used besides the
    built-in ones (classifiers trained by the user)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        items: list[tuple[str, float]] = []
        for part in spec.split(","):
            if not part.strip():
                continue
            name, _, w = part.partition("=")
            try:
                weight = float(w) if w.strip() else 1.0
            except ValueError:
                raise _bad(f"`prefs`: weight of '{name.strip()}' (={w.strip()!r}) is not a "
                                 "number; expected e.g. 'concise=1,humor=0.5'") from None
            items.append((name, weight))
    elif isinstance(spec, Mapping):
        items = [(str(k), float(v)) for k, v in spec.items()]
    else:
        raise _bad(f"`prefs` has to be a string like 'concise=1,humor=0.5' or a dict, "
                         f"not {type(spec).__name__}")
    allowed = set(PREFERENCES) | set(known or ()) | ({PERSONAL} if allow_personal else set())
    out: dict[str, float] = {}
    for name, weight in items:
        key = canonical_name(name)
        if not key:
            raise _bad("`prefs`: empty preference name; expected e.g. 'concise=1,humor=0.5'")
        if key not in allowed:
            raise _bad(f"`prefs`: unknown preference '{name.strip()}'; known: "
                             f"{', '.join(sorted(allowed))}")
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise _bad(f"`prefs`: weight of '{key}' (={weight}) has to be a finite number")
        if key in out:
            raise _bad(f"`prefs`: preference '{key}' given twice")
        out[key] = weight
    return out


def format_prefs(prefs: Mapping[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in prefs.items())
