"""The protocol's numbers, as pure functions over margins and records.

A margin is log p(chosen | prompt) - log p(rejected | prompt) under a method's prompt; the plain
prompt's margin is the same gap with nothing added to the prompt.

* pairwise accuracy (margin > 0) of a user: share of test pairs whose margin is > 0 (chosen ranked
  first), EXACT §6.2;
* a method's accuracy for a seed: the mean over that seed's users; reported as the mean and the
  sample standard deviation (ddof=1) over seeds (None with a single seed);
* obj_match > 0 (EXACT Appendix C.5.2, Table 8, and the paper's EXACT row of Table 2): share of test
  pairs whose margin under the method exceeds an anchor's margin on the same pair. The paper's
  anchor, "the Base prompt", is read two ways, so both are computed: the plain prompt (Eq. 12's
  anchor: record key ``table8``) and the `base` method's history prompt (``table8_base``, from the
  `base` record of the same seed, user and test pairs, see `anchor_to`);
* Table 7 (Eq. 12): F(A) = mean over the studied pairs of (margin with A - plain margin), and
  r = F(S_k) / F(S*), a ratio of those means (`table7_summary`);
* win-rate: per prompt the mean of the two orders' verdicts (1 win, 0 loss, 0.5 tie), so a judge
  that always picks the first position scores 0.5; the mean over prompts.

    >>> pairwise_accuracy([1.0, -2.0, 0.5, 0.0])
    0.5
    >>> mean_std([0.6, 0.7, 0.8])
    (0.7, 0.1)
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence


def pairwise_accuracy(margins: Sequence[float]) -> float:
    if not margins:
        raise ValueError("no test pairs: accuracy is undefined")
    return sum(m > 0 for m in margins) / len(margins)


def anchored_objective(margins: Sequence[float], anchor: Sequence[float]) -> list[float]:
    """obj_match per pair (EXACT Appendix C.5.2): the method's margin minus the anchor's margin on
    the same pair; with the plain prompt as the anchor, Eq. 12's term for that pair."""
    if len(margins) != len(anchor):
        raise ValueError(f"{len(margins)} margins but {len(anchor)} anchor margins")
    return [m - a for m, a in zip(margins, anchor)]


def improvement_share(margins: Sequence[float], plain: Sequence[float]) -> float:
    """Table 8 (obj_match > 0): share of pairs where the method's chosen-minus-rejected gap beats the
    anchor's (the plain prompt's unless another anchor's margins are given)."""
    if len(margins) != len(plain):
        raise ValueError(f"{len(margins)} margins but {len(plain)} plain margins")
    if not margins:
        raise ValueError("no test pairs: the share is undefined")
    return sum(g > 0 for g in anchored_objective(margins, plain)) / len(margins)


BASE_ANCHOR = "base"


def anchor_to(records: Iterable[dict], anchor: str = BASE_ANCHOR, key: str = "table8_base") -> list[dict]:
    """Method records with ``key``: their obj_match > 0 share against the ``anchor`` method's margins
    on the same test pairs (the record of the same seed and user whose ``test_ids`` are the same).
    A record without such a partner, or without margins, is returned as it is; so is the anchor's
    own record, and one that already holds ``key``. Other records pass through unchanged."""
    records = list(records)
    partner = {(r["seed"], r["user"]): r for r in records
               if r.get("kind") == "method" and r.get("method") == anchor and r.get("margins") is not None}
    out = []
    for r in records:
        a = partner.get((r.get("seed"), r.get("user"))) if r.get("kind") == "method" else None
        if (a is not None and r.get("method") != anchor and r.get(key) is None and r.get("margins")
                and r.get("test_ids") is not None and r.get("test_ids") == a.get("test_ids")):
            r = {**r, key: improvement_share(r["margins"], a["margins"])}
        out.append(r)
    return out


def margin_shift(margins: Sequence[float], plain: Sequence[float]) -> float:
    """Mean (method margin - plain margin) in nats: how far the method moves the chosen-minus-rejected
    gap, whether or not that flips a ranking."""
    if len(margins) != len(plain):
        raise ValueError(f"{len(margins)} margins but {len(plain)} plain margins")
    if not margins:
        raise ValueError("no test pairs: the shift is undefined")
    return sum(m - p for m, p in zip(margins, plain)) / len(margins)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of nothing")
    return sum(values) / len(values)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = mean(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def verdict(preference: float) -> float:
    """1 if the method's response is preferred (> 0), 0 if the reference's, 0.5 on an exact tie."""
    return 1.0 if preference > 0 else 0.0 if preference < 0 else 0.5


def prompt_winrate(method_first: float, method_second: float) -> float:
    """Both orders of one comparison: each argument is the judge's preference for the method's
    response (> 0: method) with the method shown first, then second."""
    return (verdict(method_first) + verdict(method_second)) / 2


def calibrated_winrate(method_first: float, method_second: float) -> float:
    """Balanced position calibration (Wang et al. 2023, "Large Language Models are not Fair
    Evaluators"): the judge's graded preferences of both orders are summed before the verdict, so
    an additive position bias cancels in the score rather than turning every split vote into a tie.
    For a judge that only answers +1 / -1 / 0 it agrees with `prompt_winrate` except that a tie in
    one order defers to the other."""
    return verdict(method_first + method_second)


def winrate(per_prompt: Sequence[float]) -> float:
    return mean(per_prompt)


def seed_means(records: Iterable[dict], key: str = "accuracy") -> dict[str, dict[int, float]]:
    """method label -> seed -> mean of ``key`` over that seed's users (records lacking it skipped)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get(key) is not None:
            acc[r["method"]][r["seed"]].append(r[key])
    return {m: {s: mean(v) for s, v in sorted(by_seed.items())} for m, by_seed in acc.items()}


def summarize(records: Sequence[dict]) -> dict:
    """The headline numbers of a run from its method (and winrate) records."""
    methods = [r for r in records if r.get("kind") == "method"]
    order = list(dict.fromkeys(r["method"] for r in methods))
    out: dict = {"methods": order, "accuracy": {}, "accuracy_std": {}, "accuracy_per_seed": {},
                 "table8": {}, "table8_std": {}, "table8_base": {}, "table8_base_std": {},
                 "shift": {}, "n_users": {}, "n_test_pairs": {}, "seconds": {}}
    methods = anchor_to(methods)
    per_seed = seed_means(methods, "accuracy")
    t8 = seed_means(methods, "table8")
    t8b = seed_means(methods, "table8_base")
    shifts = seed_means([{**r, "shift": margin_shift(r["margins"], r["plain_margins"])} for r in methods
                         if r.get("margins") and r.get("plain_margins")], "shift")
    for m in order:
        rs = [r for r in methods if r["method"] == m]
        vals = list(per_seed[m].values())
        out["accuracy"][m], out["accuracy_std"][m] = mean_std(vals)
        out["accuracy_per_seed"][m] = {str(s): v for s, v in per_seed[m].items()}
        if m in t8:
            out["table8"][m], out["table8_std"][m] = mean_std(list(t8[m].values()))
        if m in t8b:
            out["table8_base"][m], out["table8_base_std"][m] = mean_std(list(t8b[m].values()))
        if m in shifts:
            out["shift"][m] = mean(list(shifts[m].values()))
        out["n_users"][m] = len(rs)
        out["n_test_pairs"][m] = sum(r["n_test"] for r in rs)
        out["seconds"][m] = round(sum(sum(r.get("timings", {}).values()) for r in rs), 2)
    wins = [r for r in records if r.get("kind") == "winrate"]
    if wins:
        wr = seed_means(wins, "winrate")
        out["winrate"] = {m: mean_std(list(v.values()))[0] for m, v in wr.items()}
        out["winrate_std"] = {m: mean_std(list(v.values()))[1] for m, v in wr.items()}
        cal = seed_means([{**r, "calibrated": mean([calibrated_winrate(a, b) for a, b in r["preferences"]])}
                          for r in wins if r.get("preferences")], "calibrated")
        out["winrate_calibrated"] = {m: mean_std(list(v.values()))[0] for m, v in cal.items()}
    t7 = [r for r in records if r.get("kind") == "table7"]
    if t7:
        out["table7"] = table7_summary(t7)
    return out


def table7_summary(records: Sequence[dict]) -> dict:
    """Greedy versus exhaustive, per record: ``greedy``, ``exhaustive`` and ``base`` are the raw
    objectives of one training pair (its margin with greedy's set, with the best set, with no
    attributes: the plain prompt).

    Under the paper's definition (Eq. 12, Table 7): F(A) is anchored at the plain prompt,
    F(A) = mean over all studied pairs of (margin with A - plain margin) (``eq12_greedy``,
    ``eq12_exhaustive``), r = F(S_k) / F(S*) is the ratio of those two means (``eq12_ratio``; None
    unless F(S*) > 0), and the gap F(S*) - F(S_k) (``gap``) is the same anchored or not.

    The project's own measures, kept beside them: the raw means (``greedy``, ``exhaustive``,
    ``plain``), the share of pairs where greedy is optimal, the improvement share over the pairs
    where exhaustive beats plain, sum(F_g - F_0) / sum(F_e - F_0) over those pairs only
    (``improvement_ratio``; pooled, because a per-pair ratio explodes when exhaustive barely beats
    the plain prompt), and the raw ratio, the mean of F_g / F_e over the pairs where both raw
    objectives are > 0 (``ratio``).

    A pair studied again under another seed (a user's pair lands in several seeds' splits) counts
    once: the first record of each (user, pair, library, k) is kept (records without a pair_id are
    all kept)."""
    first: dict[object, dict] = {}
    for i, r in enumerate(records):
        key = (r.get("user"), r["pair_id"], tuple(r.get("library", ())), r["k"]) if "pair_id" in r else i
        first.setdefault(key, r)
    records = list(first.values())
    if not records:
        raise ValueError("no Table 7 records: the objectives are undefined")
    fg = [r["greedy"] for r in records]
    fe = [r["exhaustive"] for r in records]
    f0 = [r["base"] for r in records]
    eq12_g = mean(anchored_objective(fg, f0))
    eq12_e = mean(anchored_objective(fe, f0))
    improving = [(g - b, e - b) for g, e, b in zip(fg, fe, f0) if e - b > 1e-9]
    raw = [g / e for g, e in zip(fg, fe) if g > 0 and e > 0]
    unordered = [r["exhaustive_unordered"] for r in records if "exhaustive_unordered" in r]
    return {"n_pairs": len(records), "library_size": records[0]["library_size"], "k": records[0]["k"],
            "ordered": all(r.get("ordered", False) for r in records),
            "exhaustive_unordered": mean(unordered) if len(unordered) == len(records) else None,
            "eq12_greedy": eq12_g, "eq12_exhaustive": eq12_e,
            "eq12_ratio": eq12_g / eq12_e if eq12_e > 1e-12 else None,
            "greedy": mean(fg), "exhaustive": mean(fe), "plain": mean(f0),
            "gap": mean([e - g for g, e in zip(fg, fe)]),
            "greedy_optimal": mean([float(abs(e - g) < 1e-6) for g, e in zip(fg, fe)]),
            "n_improving": len(improving),
            "improvement_ratio": (sum(g for g, _ in improving) / sum(e for _, e in improving)
                                  if improving else None),
            "n_raw_ratio": len(raw),
            "ratio": mean(raw) if raw else None}
