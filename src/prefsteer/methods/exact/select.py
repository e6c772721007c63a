"""Attribute selection for one preference pair (EXACT, Algorithm 1).

The objective of an attribute set A for a pair (x, y_w, y_l) is

    F(A) = log p(y_w | x, A) - log p(y_l | x, A)

where A is appended to the user's turn as ``Attributes: <a, b, c>`` (the paper; ``style`` and
``placement`` render it otherwise: `prefsteer.attributes.attribute_messages`), and log p is summed
over the response's tokens (``objective="mean"``: divided by each response's token count, so the
length of the two responses weighs less). `greedy_select` adds, k times,
the attribute with the largest F(A ∪ {a}); `exhaustive_select` tries every k-subset. Objectives are
evaluated in batches: one call scores every candidate set of a greedy step, so the backend can share
the prompt's prefix across all of them.

    >>> objective = make_objective(backend, prompt, chosen, rejected, library)
    >>> sel = greedy_select(objective, library.names, k=3)
    >>> sel.attributes, sel.objective, sel.gains
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from prefsteer.attributes import AttributeLibrary, attribute_messages
from prefsteer.backends.base import ScoreRequest

AttrSet = tuple[str, ...]
Objective = Callable[[Sequence[AttrSet]], list[float]]


@dataclass
class Selection:
    attributes: AttrSet
    objective: float                 # F(attributes)
    base_objective: float            # F(∅): the plain prompt's margin
    gains: list[float] = field(default_factory=list)  # marginal gain of each added attribute
    evaluations: int = 0             # attribute sets scored

    def to_json(self) -> dict:
        d = asdict(self)
        d["attributes"] = list(self.attributes)
        return d


OBJECTIVES = ("sum", "mean")


def pair_requests(prompt: str, chosen: str, rejected: str, sets: Sequence[AttrSet],
                  library: AttributeLibrary | None = None, describe: bool = False,
                  system: str | None = None, *, style: str | None = None,
                  placement: str = "user") -> list[ScoreRequest]:
    """Two requests per attribute set, (chosen, rejected), in the order of ``sets``."""
    style = style or ("described" if describe else "names")
    reqs = []
    for attrs in sets:
        msgs = attribute_messages(prompt, attrs, library, style=style, placement=placement, system=system)
        reqs += [ScoreRequest.of(msgs, chosen), ScoreRequest.of(msgs, rejected)]
    return reqs


def make_objective(scorer, prompt: str, chosen: str, rejected: str,
                   library: AttributeLibrary | None = None, describe: bool = False,
                   system: str | None = None, progress: bool = False, *, style: str | None = None,
                   placement: str = "user", objective: str = "sum") -> Objective:
    """F over a batch of attribute sets; ``scorer`` is a backend or a `ScoreCache`-wrapped one.
    ``objective="sum"`` is the paper's summed log-probability gap, ``"mean"`` the gap of per-token
    means (nats per token)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` (={objective!r}) has to be one of {', '.join(OBJECTIVES)}")

    def value(s) -> float:
        return s.logprob / max(s.n_tokens, 1) if objective == "mean" else s.logprob

    def f(sets: Sequence[AttrSet]) -> list[float]:
        reqs = pair_requests(prompt, chosen, rejected, sets, library, describe, system, style=style,
                             placement=placement)
        scores = scorer.score(reqs, progress=progress)
        return [value(w) - value(l) for w, l in zip(scores[0::2], scores[1::2])]

    return f


def greedy_select(objective: Objective, candidates: Sequence[str], k: int,
                  stop_when_no_gain: bool = False, start: Selection | None = None) -> Selection:
    """Greedy maximization of F; with ``stop_when_no_gain`` it stops once no attribute helps.

    ``start`` is an earlier greedy selection of the same pair under the same objective with another
    k (no early stop). Greedy's first j picks do not depend on k, so a longer one is cut to k and a
    shorter one is continued from its last step: the result is the one a fresh search returns,
    for the steps it lacks. ``evaluations`` then counts only the sets scored here.
    """
    if k < 1:
        raise ValueError(f"`k` (={k}) has to be at least 1")
    remaining = list(dict.fromkeys(candidates))
    if start is not None and start.attributes:
        if not set(start.attributes) <= set(remaining):
            raise ValueError(f"`start` holds attributes outside the candidates: {list(start.attributes)}")
        if len(start.attributes) >= k or len(start.attributes) == len(remaining):
            if len(start.attributes) <= k:
                return Selection(tuple(start.attributes), start.objective, start.base_objective,
                                 list(start.gains), 0)
            gains = list(start.gains[:k])
            return Selection(tuple(start.attributes[:k]), start.base_objective + sum(gains),
                             start.base_objective, gains, 0)
        chosen: AttrSet = tuple(start.attributes)
        remaining = [a for a in remaining if a not in chosen]
        base, current, gains = start.base_objective, start.objective, list(start.gains)
        evaluations, first = 0, len(chosen)
    else:
        chosen, first = (), 0
        # F(∅) is scored with the first step so the backend shares the prefix across all of them.
        values = objective([()] + [(a,) for a in remaining])
        base = current = values[0]
        values = values[1:]
        gains = []
        evaluations = 1
    for step in range(first, min(k, first + len(remaining))):
        if step > 0:
            values = objective([chosen + (a,) for a in remaining])
        evaluations += len(remaining)
        best = max(range(len(remaining)), key=values.__getitem__)
        gain = values[best] - current
        if stop_when_no_gain and gain <= 0:
            break
        chosen += (remaining.pop(best),)
        gains.append(gain)
        current = values[best]
    return Selection(chosen, current, base, gains, evaluations)


def lazy_greedy_select(objective: Objective, candidates: Sequence[str], k: int,
                       stop_when_no_gain: bool = False, batch: int = 4) -> Selection:
    """Greedy with lazy evaluations (Minoux): the first step scores every candidate; later steps
    re-score candidates in order of their last known marginal gain, ``batch`` at a time, and stop
    as soon as the best fresh gain is at least every stale one.

    This returns exactly greedy's choice when marginal gains only shrink as the set grows
    (submodular F). EXACT's F is not guaranteed to be, so a stale gain may under-estimate a fresh
    one and lazy may pick differently: ``benchmarks/lazy_greedy.py`` measures how often on real
    pairs. `greedy_select` stays the paper's algorithm.
    """
    if k < 1:
        raise ValueError(f"`k` (={k}) has to be at least 1")
    if batch < 1:
        raise ValueError(f"`batch` (={batch}) has to be at least 1")
    remaining = list(dict.fromkeys(candidates))
    values = objective([()] + [(a,) for a in remaining])
    base = current = values[0]
    bounds = {a: v - base for a, v in zip(remaining, values[1:])}  # last known marginal gains
    evaluations = 1 + len(remaining)
    chosen: AttrSet = ()
    gains: list[float] = []
    for step in range(min(k, len(remaining))):
        if step == 0:
            fresh = dict(bounds)
            value = dict(zip(remaining, values[1:]))
        else:
            fresh, value = {}, {}
            stale = sorted(remaining, key=lambda a: -bounds[a])  # stable: ties keep library order
            while stale:
                take, stale = stale[:batch], stale[batch:]
                for a, v in zip(take, objective([chosen + (a,) for a in take])):
                    value[a], fresh[a] = v, v - current
                    bounds[a] = fresh[a]
                evaluations += len(take)
                if not stale or max(fresh.values()) >= bounds[stale[0]]:
                    break
        # ties go to the earlier candidate in library order, as in greedy_select
        pick = max((a for a in remaining if a in fresh), key=lambda a: (fresh[a], -remaining.index(a)))
        gain = fresh[pick]
        if stop_when_no_gain and gain <= 0:
            break
        remaining.remove(pick)
        chosen += (pick,)
        gains.append(gain)
        current = value[pick]
    return Selection(chosen, current, base, gains, evaluations)


def screened_greedy_select(objective: Objective, candidates: Sequence[str], k: int,
                           stop_when_no_gain: bool = False, screen: Objective | None = None,
                           top: int = 8) -> Selection:
    """Greedy whose every step ranks all candidates with a cheap ``screen`` (the same model in
    bfloat16) and scores only the ``top`` best of them with ``objective``, which picks among those.

    It returns greedy's choice whenever each step's best candidate is among the screen's ``top``;
    ``top >= len(candidates)`` is greedy itself. Objectives, gains and the plain prompt's F are
    ``objective``'s own. ``benchmarks/screened_greedy.py`` measures speed and agreement on real
    pairs; ``evaluations`` counts only the sets ``objective`` scored.
    """
    if k < 1:
        raise ValueError(f"`k` (={k}) has to be at least 1")
    if top < 1:
        raise ValueError(f"`top` (={top}) has to be at least 1")
    if screen is None:
        raise ValueError("screened greedy needs a `screen` objective")
    remaining = list(dict.fromkeys(candidates))
    if not remaining:
        base = objective([()])[0]
        return Selection((), base, base, [], 1)
    chosen: AttrSet = ()
    gains: list[float] = []
    base = current = None
    evaluations = 0
    for _ in range(min(k, len(remaining))):
        sets = [chosen + (a,) for a in remaining]
        rough = screen(sets)
        # the screen's best first; ties keep library order
        short = sorted(sorted(range(len(sets)), key=lambda i: -rough[i])[:top])
        values = objective(([()] if base is None else []) + [sets[i] for i in short])
        if base is None:
            base = current = values[0]
            values = values[1:]
            evaluations += 1
        evaluations += len(short)
        j = max(range(len(short)), key=values.__getitem__)
        gain = values[j] - current
        if stop_when_no_gain and gain <= 0:
            break
        chosen += (remaining.pop(short[j]),)
        gains.append(gain)
        current = values[j]
    return Selection(chosen, current, base, gains, evaluations)


def exhaustive_select(objective: Objective, candidates: Sequence[str], k: int,
                      batch: int = 256, ordered: bool = False) -> Selection:
    """The best k-subset by trying them all (each rendered in the candidates' order): for small
    searches. The injected line lists the attributes in order and the order changes F, so greedy
    (which renders them in the order it picked them) can beat this; ``ordered=True`` tries every
    ordered k-tuple instead (k! times the work), an optimum that greedy cannot exceed."""
    if k < 1:
        raise ValueError(f"`k` (={k}) has to be at least 1")
    cands = list(dict.fromkeys(candidates))
    base = objective([()])[0]
    best_set: AttrSet = ()
    best = float("-inf")
    evaluations = 1
    subsets = (itertools.permutations if ordered else itertools.combinations)(cands, min(k, len(cands)))
    while chunk := list(itertools.islice(subsets, batch)):
        for s, v in zip(chunk, objective(chunk)):
            if v > best:
                best_set, best = s, v
        evaluations += len(chunk)
    # gains along the subset's own order, for a profile comparable with greedy's
    prefixes = [best_set[: i + 1] for i in range(len(best_set) - 1)]
    values = (objective(prefixes) if prefixes else []) + [best]
    gains = [b - a for a, b in zip([base] + values[:-1], values)]
    return Selection(best_set, best, base, gains, evaluations + len(prefixes))


SELECTORS = {"greedy": greedy_select, "lazy": lazy_greedy_select, "screened": screened_greedy_select,
             "exhaustive": exhaustive_select}
