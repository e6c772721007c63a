"""Cascade attention: queries attend to a prefix shared by the whole batch, stored once, plus their own row.

The backend registers `cascade_attention` with transformers once, when a model is loaded
(`install`), and sets it as that model's attention implementation for good. A forward that passes
no cascade state (``prefsteer_cascade=None``: plain scoring, prefill, Drift's rows, Reward's
adapter) runs the implementation the model was loaded with (sdpa), with the masks that
implementation builds, so its numbers are the standard ones. A forward that passes a state
(packed scoring, decoding past a shared prefix) hands its own 4-D additive mask as
``attention_mask``, which transformers passes through untouched. Nothing is switched per call, so
concurrent forwards on one model never see each other's routing.

    >>> install(model)                      # once per loaded model
    >>> body(input_ids=ids, attention_mask=tree_mask, prefsteer_cascade=CascadeState(prefix_kv))
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

ATTENTION = "prefsteer_cascade"  # the name registered with transformers, suffixed with the fallback's
_REGISTERED: set[str] = set()
_REGISTER_LOCK = threading.Lock()


@dataclass
class CascadeState:
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (1, H_kv, P, D), shared by the batch


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D), each key/value head serving n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H, L, D) and its log-sum-exp (B, H, L, float32).

    ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query attention: query head h uses
    key/value head h // (H / H_kv)).
    """
    if fused if fused is not None else q.device.type == "cpu":  # the fused kernel handles grouped heads and returns the log-sum-exp
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse.float()
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, n_rep), _repeat_heads(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, -1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v)
    return out, lse


def _cascade(module, query, key, value, mask, scaling, st: CascadeState):
    """Attention of suffix tokens over the batch's shared prefix plus their own tokens.

    The prefix's keys and values are stored once (batch 1); all B x S queries attend to them in
    one call, the suffix part runs under the batch's own ``mask`` (B, 1, S, K), and the two
    softmaxes are merged exactly through their log-sum-exps. Nothing of the prefix is copied per row.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, lse = attend(query, key, value, mask, scale)
    if st.prefix is not None:
        kp, vp = st.prefix[module.layer_idx]
        B, H, S, D = query.shape
        q_all = query.transpose(0, 1).reshape(1, H, B * S, D)  # every query of the batch at once
        out_p, lse_p = attend(q_all, kp, vp, None, scale)
        out_p = out_p.view(H, B, S, D).transpose(0, 1)
        lse_p = lse_p.view(H, B, S).transpose(0, 1)
        # softmax over [prefix; own keys] = the two partial results weighted by their shares of mass
        own_share = torch.sigmoid(lse - lse_p)[..., None].to(out.dtype)
        out = torch.lerp(out_p, out, own_share)
    return out.transpose(1, 2).contiguous(), None


def _make(fallback):
    def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, prefsteer_cascade: CascadeState | None = None,
                          **kwargs):
        if prefsteer_cascade is None:  # a plain forward: the model's own attention, untouched
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return _cascade(module, query, key, value, attention_mask, scaling, prefsteer_cascade)

    return cascade_attention


def install(model) -> str:
    """Route ``model``'s attention through the cascade, falling back to its current implementation
    when a forward passes no cascade state. Registers the function (and the fallback's mask
    builder) with transformers once per fallback; returns the implementation's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = model.config._attn_implementation
    if current.startswith(ATTENTION):
        return current  # a copy of an installed model (`cast`)
    if current not in ALL_ATTENTION_FUNCTIONS or current not in ALL_MASK_ATTENTION_FUNCTIONS:
        model.set_attn_implementation("sdpa")  # eager has no registered function to fall back to
        current = "sdpa"
    name = f"{ATTENTION}_{current}"
    with _REGISTER_LOCK:
        if name not in _REGISTERED:
            AttentionInterface.register(name, _make(ALL_ATTENTION_FUNCTIONS[current]))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
            _REGISTERED.add(name)
    model.set_attn_implementation(name)
    return name
