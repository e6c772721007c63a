"""CLIPer's guidance step: the heads' folded bank, one pure tensor function, and a thin guide for
``Backend.generate``; registered as the guide kind ``cliper`` (`prefsteer.backends.guides`).

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
The heads themselves (training, saving, loading) are in the method (methods/cliper/heads.py); what
the engine runs, `HeadBank` folded from them, is here, so an engine needs no method.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch

from prefsteer.backends.guides import GuideKind, register_guide_kind


class HeadBank:
    """Several heads stacked so that one call scores every preference for every candidate.

    ``heads``: CLIPer's `PreferenceHead`s (methods/cliper/heads.py), or anything with their tensors."""

    def __init__(self, heads: Sequence[Any]):
        if not heads:
            raise ValueError("a HeadBank needs at least one classifier")
        d = {h.hidden_size for h in heads}
        if len(d) != 1:
            raise ValueError(f"classifiers of different hidden sizes cannot be combined: {sorted(d)}")
        r = max(h.rank for h in heads)
        self.names = [h.name for h in heads]
        self.n_heads = len(heads)
        # the models the heads were trained for (their sidecars' fingerprints; "" where none is recorded)
        self.fingerprints = sorted({str(h.meta.get("fingerprint") or "") for h in heads})

        def pad(m: torch.Tensor) -> torch.Tensor:  # (d, r_i) -> (d, r): zero columns change nothing
            return torch.nn.functional.pad(m, (0, r - m.shape[1]))
        with torch.no_grad():
            # standardisation folded into the weights: u·(h-μ)/σ = (u/σ)·h - u·μ/σ
            self.U = torch.stack([h.u / h.sd_h for h in heads])                    # (P, d)
            self.Vw = torch.stack([h.v / h.sd_e for h in heads])                   # (P, d)
            self.A = torch.stack([pad(h.A) / h.sd_h[:, None] for h in heads])      # (P, d, r)
            self.B = torch.stack([pad(h.B) / h.sd_e[:, None] for h in heads])      # (P, d, r)
            self.a0 = torch.stack([(h.mu_h / h.sd_h) @ pad(h.A) for h in heads])   # (P, r)
            self.b0 = torch.stack([(h.mu_e / h.sd_e) @ pad(h.B) for h in heads])   # (P, r)
            self.c = torch.stack([h.b - (h.u * h.mu_h / h.sd_h).sum()
                                  - (h.v * h.mu_e / h.sd_e).sum() for h in heads])  # (P,)
        # one matrix for every linear map of h, one for e: a single matmul each per step
        self.Wh = torch.cat([self.U.T, self.A.permute(1, 0, 2).reshape(self.U.shape[1], -1)], 1)
        self.We = torch.cat([self.Vw.T, self.B.permute(1, 0, 2).reshape(self.U.shape[1], -1)], 1)
        self.r = r                                    # Wh, We: (d, P + P*r)

    _TENSORS = ("Wh", "We", "a0", "b0", "c")

    def state(self) -> dict[str, Any]:
        """What `from_state` rebuilds the bank from: the folded tensors, names and fingerprints."""
        return {"tensors": {k: getattr(self, k).detach().contiguous() for k in self._TENSORS},
                "names": list(self.names), "fingerprints": list(self.fingerprints), "rank": self.r}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "HeadBank":
        """The bank `state` describes (the same `logits`, without the heads it was folded from)."""
        bank = cls.__new__(cls)
        t = state["tensors"]
        for k in cls._TENSORS:
            setattr(bank, k, t[k])
        bank.names, bank.fingerprints = list(state["names"]), list(state["fingerprints"])
        bank.n_heads, bank.r = int(t["c"].shape[0]), int(state["rank"])
        if bank.Wh.shape[1] != bank.n_heads * (1 + bank.r):
            raise ValueError(f"a head bank of {bank.n_heads} heads of rank {bank.r} needs "
                             f"{bank.n_heads * (1 + bank.r)} columns, the state has {bank.Wh.shape[1]}")
        return bank

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "HeadBank":
        """The bank with its tensors on ``device`` (its two matrices also in ``dtype``, the dtype of
        the hidden states and embeddings it will score): ``self`` when they already are."""
        dtype = dtype or self.Wh.dtype
        if self.Wh.device == torch.device(device) and self.Wh.dtype == dtype:
            return self
        bank = HeadBank.from_state({"tensors": {k: getattr(self, k) for k in self._TENSORS}, "names": self.names,
                                    "fingerprints": getattr(self, "fingerprints", []), "rank": self.r})
        for k in self._TENSORS:
            t = getattr(bank, k).to(device)
            setattr(bank, k, t.to(dtype) if k in ("Wh", "We") else t)
        return bank

    def logits(self, hidden: torch.Tensor, cand_emb: torch.Tensor) -> torch.Tensor:
        """hidden (B, d), cand_emb (B, k, d) -> log-odds (B, P, k)."""
        P, r = self.n_heads, self.r
        hw = hidden @ self.Wh                                 # (B, P + P*r)
        ew = cand_emb @ self.We                               # (B, k, P + P*r)
        hu, ha = hw[:, :P], hw[:, P:].unflatten(-1, (P, r)) - self.a0         # (B, P), (B, P, r)
        ev, eb = ew[..., :P], ew[..., P:].unflatten(-1, (P, r)) - self.b0  # (B, k, P), (B, k, P, r)
        bil = torch.einsum("bpr,bkpr->bpk", ha, eb)           # (B, P, k)
        return hu[:, :, None] + ev.transpose(1, 2) + bil + self.c[None, :, None]


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

    def __init__(self, bank: HeadBank, weights: Sequence[float], alpha: float, top_k: int,
                 embeddings: torch.Tensor, fingerprint: str | None = None):
        self.alpha, self.top_k = check_alpha(alpha), check_top_k(top_k)
        self.bank = bank.to(embeddings.device, embeddings.dtype)  # where the model's hidden states are
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

        check_description(desc)
        bank = HeadBank.from_state({"tensors": load(bytes(desc["heads"])), "names": desc["names"],
                                    "fingerprints": [desc["fingerprint"]], "rank": desc["rank"]})
        if bank.Wh.shape[0] != embeddings.shape[-1]:
            raise ValueError(f"the heads are for hidden size {bank.Wh.shape[0]}, the embeddings have "
                             f"{embeddings.shape[-1]}")
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
            return guided_logits(logits, ids, z.to(logits.device), self.weights.to(logits.device), self.alpha)


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


# -- the kind an engine in another process runs (`prefsteer.backends.guides`) --------------------

def _step(guide: CliperGuide, side: Any, hidden: torch.Tensor, logits: torch.Tensor, plain: bool) -> torch.Tensor:
    """One row per request, reading the request's own tokens: its last hidden state guides the logits."""
    return guide(hidden[:, 0].to(logits.device), logits.float(), None)


register_guide_kind(GuideKind(
    "cliper", check_description,
    build=lambda desc, side: CliperGuide.from_description(desc, side.token_embeddings()),
    prefixes=lambda desc, prompt_len: (False, [None]),
    step=_step,
    mismatch="the guide's classifier heads were trained for the model {fingerprint}, but {side} is "
             "{side_fingerprint}: train heads for it (`prefsteer cliper train`) or pass the model they "
             "were trained for as `side_model`"))
