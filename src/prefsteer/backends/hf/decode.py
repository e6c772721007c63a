"""Decoding: the generate loop and lock-step decoding sessions, on the backend's key/value cache.

`decode_batch` prefills left-padded prompts and then feeds one token per step; a prefix that every
prompt shares (Base's history in the system prompt) is run once and attended through the cascade
(`attention.CascadeState`), stored once for the whole batch instead of once per row and copied at
every step. `Rows` is `Backend.start_decoding`'s session: the caller picks every row's next token.

The functions take the `TransformersBackend` ``b`` for its model parts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from prefsteer.backends.base import GenerationConfig, Guide
from prefsteer.backends.hf.attention import CascadeState
from prefsteer.backends.hf.kvcache import growing_cache
from prefsteer.backends.hf.packing import PackedLinear, decoding
from prefsteer.backends.hf.planner import left_pad, shared_prefix
from prefsteer.backends.hf.scoring import prefix_kv
from prefsteer.backends.sampling import hold_end, sample_next


def output_logits(b, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on the rows being decoded, hidden (B, d) -> logits (B, V), float32.

    A packed output layer (`packing`) serves any number of rows. Without one, on a CPU, MKL's
    matrix product of a few rows (2 to 16) by the (V, d) output matrix runs at a third of the speed
    of the same product taken as W·hᵀ (SmolLM2's 49,152 x 576 head: 28 ms for 4 rows against 9 ms,
    and 12 ms for one), so a small batch of decoding rows takes it that way."""
    head = b.lm_head
    with decoding():
        if not isinstance(head, PackedLinear) and hidden.device.type == "cpu" and 1 < hidden.shape[0] <= 16 \
                and getattr(head, "bias", None) is None and isinstance(getattr(head, "weight", None), torch.Tensor):
            return (head.weight @ hidden.T).T.float().contiguous()
        return head(hidden).float()


def decode_step(b, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                state: CascadeState | None) -> torch.Tensor:
    """Feed ``ids`` (B, q) on the cache; ``mask`` (B, K) marks the real keys among all K cached
    ones. With ``state`` the shared prefix's keys/values are attended through the cascade.
    Returns the last position's hidden state (B, d)."""
    if state is None:
        return b.extend(cache, input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
    q, K = ids.shape[1], mask.shape[1]
    causal = torch.ones(q, K, dtype=torch.bool, device=b.device).tril(K - q)
    own = torch.zeros(q, K, dtype=torch.bool, device=b.device)
    own[torch.arange(q), torch.arange(K - q, K)] = True  # a padding query sees itself: no empty softmax
    allowed = (causal & mask.bool()[:, None, :]) | own
    mask4 = torch.zeros(allowed.shape, dtype=b.model.dtype, device=b.device)[:, None]   # (B, 1, q, K)
    mask4.masked_fill_(~allowed[:, None], float("-inf"))
    out = b.extend(cache, input_ids=ids, position_ids=positions, attention_mask=mask4, prefsteer_cascade=state)
    return out.last_hidden_state[:, -1]


def decode_batch(b, prompts: list[list[int]], config: GenerationConfig, guide: Guide | None,
                 gen: torch.Generator | None) -> list[tuple[list[int], str]]:
    """Left-padded prefill, then one token per step; a row stops at an end-of-turn token."""
    B, T = len(prompts), max(len(p) for p in prompts)
    P = shared_prefix(prompts) if b.share_prefix else 0
    state = CascadeState(prefix_kv(b, prompts[0][:P])[0]) if P else None
    ids, _ = left_pad(prompts, b.pad_id)  # what the guide sees: the whole prompts
    ids = ids.to(b.device)
    feed, mask = left_pad([p[P:] for p in prompts], b.pad_id)
    feed, mask = feed.to(b.device), mask.to(b.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + P
    cache = growing_cache(b.config)
    with decoding():  # the packed products (`packing`), for the prefill as for every step
        hidden = decode_step(b, feed, mask, positions, cache, state)
    last_pos = positions[:, -1:]
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=b.device)
    eos = torch.tensor(sorted(b.eos_ids), device=b.device)
    steps = min(config.max_new_tokens, b.max_context - T)
    for step in range(steps):
        logits = output_logits(b, hidden)  # (B, V)
        if guide is not None:
            logits = guide(hidden.float(), logits, ids)
        tok = sample_next(hold_end(logits, config, step, b.eos_ids), config, gen).to(b.device)
        tok = torch.where(done, torch.full_like(tok, b.pad_id), tok)
        is_eos = torch.isin(tok, eos) & ~done
        for r, (t, finished) in enumerate(zip(tok.tolist(), (done | is_eos).tolist())):
            if not finished:
                new[r].append(t)
        done = done | is_eos
        if bool(done.all()) or step == steps - 1:
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=b.device)], 1)
        last_pos = last_pos + 1
        with decoding():
            hidden = decode_step(b, tok[:, None], mask, last_pos, cache, state)
    return [(n, b.tokenizer.decode(n, skip_special_tokens=True)) for n in new]


class Rows:
    """Left-padded rows of one model decoded in lock step on a key/value cache (`DecodeSession`).

    Every forward holds the backend's model lock for its duration (an adapter block waits, and
    cannot change the weights under a session's step). Not itself shared between threads: one
    session belongs to one caller.
    """

    def __init__(self, b, contexts: Sequence[Sequence[int]]):
        self.b = b
        dev = b.device
        ids, mask = left_pad(contexts, b.pad_id)  # every row's last token at position T-1
        self.mask = mask.to(dev)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.pos = positions[:, -1:]                                    # (R, 1)
        self.length = ids.shape[1]
        self.cache = growing_cache(b.config)
        with b._lock.shared("start_decoding"), torch.inference_mode(), decoding():
            out = b.extend(self.cache, input_ids=ids.to(dev), attention_mask=self.mask, position_ids=positions)
            self.hidden = out.last_hidden_state[:, -1]                  # (R, d)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def logits(self) -> torch.Tensor:
        """Next-token logits (R, V, float32) of every row."""
        with self.b._lock.shared("a decoding session"), torch.inference_mode():
            return output_logits(self.b, self.hidden)

    def append(self, tokens: Sequence[int]) -> None:
        """Extend row r by ``tokens[r]``."""
        tokens = [int(t) for t in tokens]
        R = self.rows
        if len(tokens) != R:
            raise ValueError(f"`tokens` has {len(tokens)} entries for a session of {R} rows (one per row)")
        if self.length >= self.b.max_context:
            raise ValueError(f"the session's rows reached the model's limit of {self.b.max_context} tokens")
        dev = self.mask.device
        with self.b._lock.shared("a decoding session"), torch.inference_mode(), decoding():
            self.mask = torch.cat([self.mask, torch.ones((R, 1), dtype=self.mask.dtype, device=dev)], 1)
            self.pos = self.pos + 1
            out = self.b.extend(self.cache, input_ids=torch.tensor(tokens, dtype=torch.long, device=dev)[:, None],
                                attention_mask=self.mask, position_ids=self.pos)
            self.hidden = out.last_hidden_state[:, -1]
        self.length += 1
