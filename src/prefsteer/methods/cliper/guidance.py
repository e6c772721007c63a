"""CLIPer's guidance step: one pure tensor function, and a thin guide for ``Backend.generate``.

    p(y_i | y_<i, x, c) ∝ p(y_i | y_<i, x) · p(c | y_<=i, x)^α

Several preferences combine linearly in log space with per-preference weights w_j:
``log p(y_i) + α Σ_j w_j log p(c_j | y_<=i, x)``. As in FUDGE, only the ``top_k`` most likely
next tokens are re-scored (the others get -inf), so the classifiers see k candidates per step.
The classifier heads score a candidate from the base model's own last hidden state and the
candidate's input embedding, so guidance needs no extra forward pass of the base model.

    >>> guide = CliperGuide(bank, weights=[1.0, 0.5], alpha=2.0, top_k=20, embeddings=emb)
    >>> backend.generate(contexts, config, guide=guide)   # the backend keeps its KV cache

A guide also describes itself as plain data (`CliperGuide.describe`: the heads' folded weights as
safetensors bytes, the weights, alpha, top_k and the fingerprint of the model the heads were trained
for), so that an engine running in another process (vLLM's logits processor) rebuilds the same
guide there (`CliperGuide.from_description`) around its own copy of that model's embeddings.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from prefsteer.methods.cliper.heads import HeadBank


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not alpha >= 0 or alpha == float("inf"):  # also rejects NaN
        raise ValueError(f"`alpha` (={alpha}) has to be a finite non-negative float")
    return alpha


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"`top_k` (={top_k}) has to be a positive integer")
    return int(top_k)


def preference_logp(class_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j log p(c_j | ...) for classifier log-odds ``class_logits`` (B, P, k) -> (B, k).

    A negative weight steers away from the preference: |w_j| log(1 - p(c_j)) = |w_j| logσ(-z_j)."""
    w = weights.to(class_logits.dtype).view(1, -1, 1)                   # (1, P, 1)
    logp = torch.nn.functional.logsigmoid(torch.sign(w) * class_logits)  # (B, P, k)
    return (w.abs() * logp).sum(1)                                      # (B, k)


def guided_logits(logits: torch.Tensor, candidate_ids: torch.Tensor, class_logits: torch.Tensor,
                  weights: torch.Tensor | Sequence[float], alpha: float) -> torch.Tensor:
    """Re-score the candidate next tokens with the preference classifiers.

    logits (B, V): the base model's next-token logits.
    candidate_ids (B, k): the tokens to re-score (usually the top-k of ``logits``).
    class_logits (B, P, k): each preference classifier's log-odds for each candidate,
        i.e. logit p(c_j | y_<i, candidate, x).
    weights (P,): per-preference weights; alpha: the guidance strength (>= 0).

    Returns new logits (B, V): ``log_softmax(logits) + alpha * Σ_j w_j log p(c_j)`` at the
    candidates, -inf elsewhere. With ``alpha == 0`` the input ``logits`` come back unchanged, so
    plain decoding (greedy or sampled) is reproduced exactly. No input is modified in place.
    """
    alpha = check_alpha(alpha)
    if logits.dim() != 2:
        raise ValueError(f"`logits` has to be (B, V), got shape {tuple(logits.shape)}")
    weights = torch.as_tensor(weights, dtype=torch.float32, device=logits.device).reshape(-1)  # (P,)
    B, V = logits.shape
    if candidate_ids.dim() != 2 or candidate_ids.shape[0] != B:
        raise ValueError(f"`candidate_ids` has to be (B={B}, k), got shape {tuple(candidate_ids.shape)}")
    k = candidate_ids.shape[1]
    check_top_k(k)
    if class_logits.shape != (B, weights.numel(), k):
        raise ValueError(f"`class_logits` has to be (B={B}, P={weights.numel()}, k={k}), "
                         f"got shape {tuple(class_logits.shape)}")
    if alpha == 0.0:
        return logits
    # log p(candidate | prefix): only k values are needed, so no full (B, V) log_softmax
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)           # (B, 1)
    cand = logits.gather(1, candidate_ids).float() - lse                  # (B, k)
    cand = cand + alpha * preference_logp(class_logits.float(), weights)  # (B, k)
    out = torch.full((B, V), float("-inf"), device=logits.device)        # (B, V), a new tensor
    return out.scatter(1, candidate_ids, cand).to(logits.dtype)


GUIDE_FORMAT = "prefsteer-cliper-guide-v1"


class CliperGuide:
    """The ``guide`` callable for ``Backend.generate``: top-k, classifier heads, ``guided_logits``.

    ``bank`` scores all preferences at once; ``embeddings`` is the backend's (V, d) input
    embedding matrix. ``calls`` and ``seconds`` count the guide's own work (for the benchmark)."""

    def __init__(self, bank: "HeadBank", weights: Sequence[float], alpha: float, top_k: int,
                 embeddings: torch.Tensor, fingerprint: str | None = None):
        self.alpha, self.top_k = check_alpha(alpha), check_top_k(top_k)
        self.bank = bank
        self.weights = torch.as_tensor(list(weights), dtype=torch.float32)  # (P,)
        if self.weights.numel() != bank.n_heads:
            raise ValueError(f"`weights` has {self.weights.numel()} entries for {bank.n_heads} "
                             "classifiers")
        self.embeddings = embeddings                                    # (V, d)
        self.calls = 0
        # the model the heads were trained for: given, or the one all the bank's heads record
        fps = [f for f in getattr(bank, "fingerprints", []) if f]
        self.fingerprint = fingerprint or (fps[0] if len(fps) == 1 else None)

    def describe(self) -> dict[str, Any]:
        """The guide as plain data (bytes, numbers, strings): what `from_description` rebuilds it
        from in another process. ``key`` identifies the description (heads and settings)."""
        from safetensors.torch import save

        if not self.fingerprint:
            raise ValueError("the guide's heads record no single model fingerprint "
                             f"({getattr(self.bank, 'fingerprints', [])}); pass `fingerprint`")
        st = self.bank.state()
        heads = save(st["tensors"])
        desc = {"format": GUIDE_FORMAT, "kind": "cliper", "heads": heads, "names": st["names"],
                "rank": st["rank"], "weights": [float(w) for w in self.weights.tolist()],
                "alpha": self.alpha, "top_k": self.top_k, "fingerprint": self.fingerprint}
        h = hashlib.sha256(heads)
        h.update(json.dumps({k: v for k, v in desc.items() if k != "heads"}, sort_keys=True).encode())
        desc["key"] = h.hexdigest()[:32]
        return desc

    @classmethod
    def from_description(cls, desc: dict[str, Any], embeddings: torch.Tensor) -> "CliperGuide":
        """The guide `describe` wrote, on ``embeddings`` (V, d) of the model ``desc["fingerprint"]``
        names (the caller checks that its model is that one)."""
        from safetensors.torch import load

        from prefsteer.methods.cliper.heads import HeadBank

        check_description(desc)
        bank = HeadBank.from_state({"tensors": load(bytes(desc["heads"])), "names": desc["names"],
                                    "fingerprints": [desc["fingerprint"]], "rank": desc["rank"]})
        if bank.Wh.shape[0] != embeddings.shape[-1]:
            raise ValueError(f"the heads are for hidden size {bank.Wh.shape[0]}, the embeddings have "
                             f"{embeddings.shape[-1]}")
        bank.Wh, bank.We = bank.Wh.to(embeddings.dtype), bank.We.to(embeddings.dtype)
        return cls(bank, desc["weights"], desc["alpha"], desc["top_k"], embeddings, desc["fingerprint"])

    def __call__(self, hidden: torch.Tensor, logits: torch.Tensor,
                 input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.alpha == 0.0:  # exactly plain decoding, and free
            return logits
        k = min(self.top_k, logits.shape[-1])
        with torch.no_grad():
            ids = torch.topk(logits, k, dim=-1).indices                 # (B, k)
            emb = self.embeddings[ids.to(self.embeddings.device)]       # (B, k, d)
            z = self.bank.logits(hidden.to(emb.dtype), emb)             # (B, P, k)
            return guided_logits(logits, ids, z.to(logits.device), self.weights, self.alpha)


def check_description(desc: Any) -> None:
    """Raise ValueError unless ``desc`` is a guide description `CliperGuide.describe` writes."""
    if not isinstance(desc, dict) or desc.get("format") != GUIDE_FORMAT:
        raise ValueError(f"not a prefsteer guide description (format {GUIDE_FORMAT!r} expected)")
    missing = [k for k in ("heads", "names", "rank", "weights", "alpha", "top_k", "fingerprint", "key")
               if k not in desc]
    if missing:
        raise ValueError(f"the guide description lacks {', '.join(missing)}")
    check_alpha(desc["alpha"])
    check_top_k(desc["top_k"])
    if len(desc["weights"]) != len(desc["names"]):
        raise ValueError(f"the guide description has {len(desc['weights'])} weights for "
                         f"{len(desc['names'])} classifiers")
