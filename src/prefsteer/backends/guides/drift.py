"""Drift's decoding step as data: the guide kind ``drift`` (`prefsteer.backends.guides`).

At every step Drift mixes the next-token log-probabilities of 1 + n branches decoded side by side
(the plain context and each active attribute's context) into the base distribution:

    logits = h_base + (1 / beta) * sum_i w_i (h_i - h_plain)        (`combine_logits`)

The method (methods/drift.py: features, the Bradley-Terry fit, lock-step decoding) uses
`combine_logits` in this process. An engine whose logits live in another process (vLLM) gets the
mixture as data instead (`DriftGuide.describe`: the weights, beta, and each prompt's branch
contexts as token ids), keeps a side-model row per branch beside each request and applies the same
`combine_logits` (`DriftGuide.combine`). torch is imported only when a step runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Sequence

from prefsteer.backends.guides import GuideKind, register_guide_kind

if TYPE_CHECKING:
    import torch


def combine_logits(base: "torch.Tensor", plain: "torch.Tensor", attrs: "torch.Tensor",
                   weights: "torch.Tensor", beta: float = 1.0) -> "torch.Tensor":
    """The Drift step: base (B, V), plain (B, V), attrs (B, n, V), weights (n,) -> (B, V).

    Each input is turned into log-probabilities; nothing is modified in place.
    """
    import torch

    lb = torch.log_softmax(base.float(), -1)
    if attrs.shape[1] == 0:
        return lb
    lp = torch.log_softmax(plain.float(), -1)                  # (B, V)
    la = torch.log_softmax(attrs.float(), -1)                  # (B, n, V)
    w = weights.to(la.dtype).to(la.device)
    return lb + torch.einsum("n,bnv->bv", w, la - lp[:, None]) / beta


DRIFT_GUIDE_FORMAT = "prefsteer-drift-guide-v1"


class DriftGuide:
    """Drift's decoding step as data, for an engine that decodes in another process.

    ``rows`` holds one entry per context given to ``Backend.generate``: ``branch_ids``, the token ids
    of each attribute branch's context, and ``plain_ids``, those of the plain branch, or None when the
    plain branch is the request itself (its logits are the engine's own). The engine keeps a row of
    the model ``fingerprint`` names for each branch, fed the tokens the request accepts, and replaces
    the request's logits by `combine`'s: ``combine_logits(engine's, plain, branches, weights, beta)``.
    """

    def __init__(self, weights: Sequence[float], beta: float, fingerprint: str, rows: Sequence[dict] = ()):
        self.weights = [float(w) for w in weights]
        self.beta = float(beta)
        if not self.beta > 0:
            raise ValueError(f"`beta` (={self.beta}) has to be a strictly positive float")
        self.fingerprint = fingerprint
        self.rows = [{"plain_ids": None if r.get("plain_ids") is None else [int(t) for t in r["plain_ids"]],
                      "branch_ids": [[int(t) for t in b] for b in r["branch_ids"]]} for r in rows]
        for i, r in enumerate(self.rows):
            if len(r["branch_ids"]) != len(self.weights):
                raise ValueError(f"row {i} has {len(r['branch_ids'])} branches for {len(self.weights)} weights")

    def describe(self) -> dict[str, Any]:
        """Plain data: the mixture (with a ``key`` identifying it) and, under ``rows``, each context's
        branches; the engine gives request i the mixture plus ``rows[i]``."""
        desc = {"format": DRIFT_GUIDE_FORMAT, "kind": "drift", "weights": self.weights, "beta": self.beta,
                "fingerprint": self.fingerprint}
        desc["key"] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
        return {**desc, "rows": [dict(r) for r in self.rows]}

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> "DriftGuide":
        """The mixture of one request's description (`check_drift_description` first)."""
        check_drift_description(desc)
        return cls(desc["weights"], desc["beta"], desc["fingerprint"])

    def combine(self, logits: "torch.Tensor", plain: "torch.Tensor", branches: "torch.Tensor") -> "torch.Tensor":
        """logits (B, V) of the requests, plain (B, V), branches (B, n, V) -> the Drift step (B, V)."""
        import torch

        return combine_logits(logits, plain, branches, torch.tensor(self.weights), self.beta)


def check_drift_description(desc: Any) -> None:
    """Raise ValueError unless ``desc`` is one request's Drift description: `DriftGuide.describe`'s
    mixture plus one of its ``rows``."""
    if not isinstance(desc, dict) or desc.get("format") != DRIFT_GUIDE_FORMAT:
        raise ValueError(f"not a prefsteer Drift description (format {DRIFT_GUIDE_FORMAT!r} expected)")
    missing = [k for k in ("weights", "beta", "fingerprint", "key", "branch_ids") if k not in desc]
    if missing:
        raise ValueError(f"the Drift description lacks {', '.join(missing)}")
    if not float(desc["beta"]) > 0:
        raise ValueError(f"`beta` (={desc['beta']}) has to be a strictly positive float")
    branches = desc["branch_ids"]
    if len(branches) != len(desc["weights"]) or not all(len(b) for b in branches):
        raise ValueError(f"the Drift description has {len(branches)} branches (each non-empty) for "
                         f"{len(desc['weights'])} weights")
    if desc.get("plain_ids") is not None and not len(desc["plain_ids"]):
        raise ValueError("the Drift description's plain branch is empty")


# -- the kind an engine in another process runs (`prefsteer.backends.guides`) --------------------

def _prefixes(desc: dict, prompt_len: int | None) -> tuple[bool, list[list[int] | None]]:
    """One row per attribute branch, and one for the plain branch when it is not the request itself;
    each reads its branch context where the request reads its prompt (``prompt_len`` tokens)."""
    if prompt_len is None:
        raise ValueError("a Drift request needs its prompt's length")
    plain = desc.get("plain_ids") is not None
    return plain, ([list(desc["plain_ids"])] if plain else []) + [list(b) for b in desc["branch_ids"]]


def _step(guide: DriftGuide, side: Any, hidden: "torch.Tensor", logits: "torch.Tensor", plain: bool) -> "torch.Tensor":
    """The branches' next-token logits from their rows' last hidden states (the side model's head),
    mixed into the engine's ``logits`` (B, V)."""
    import torch

    with torch.inference_mode():
        branch = side.lm_head(hidden.to(side.lm_head.weight.dtype)).float().to(logits.device)  # (B, S, V)
    if branch.shape[-1] != logits.shape[-1]:
        raise ValueError(f"the side model has {branch.shape[-1]} logits, the engine {logits.shape[-1]}")
    own = logits.float()
    return guide.combine(own, branch[:, 0] if plain else own, branch[:, 1:] if plain else branch)


register_guide_kind(GuideKind(
    "drift", check_drift_description,
    build=lambda desc, side: DriftGuide.from_description(desc),
    prefixes=_prefixes,
    step=_step,
    mismatch="Drift's branches are decoded by the model {fingerprint}, but {side} is {side_fingerprint}: "
             "pass that model as `side_model`"))
