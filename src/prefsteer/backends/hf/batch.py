"""`KVBatch`: the rows a `Scheduler` decodes together, on one key/value cache that rows join and leave.

Rows are left-padded: every row's newest key is in the cache's last column, and ``mask`` (R, K)
marks each row's real keys. Joining rows are prefilled on their own cache (left-padded among
themselves) and then laid beside the running rows, the shorter of the two caches padded on the left
with masked zero keys; leaving rows are dropped from every layer, and columns that no remaining row
uses are cut off the left. Positions are each row's own (its count of real tokens), so a row's
numbers do not depend on the rows beside it beyond the padding's masked keys.

Prefix caching, as vLLM's and SGLang's servers do it: a joining prompt that starts like a prompt
kept in the backend's memo of streamed prompts (a `PrefixMemo` apart from scoring's, so that
EXACT's scores never depend on the traffic) takes those positions' keys and values and runs only
the rest: the chat template's system turn, which every prompt shares; the earlier turns of a
conversation; Base's history in the system prompt. Every prompt is kept for the next ones (the
memo holds the last 8,192 positions). A key/value pair depends only on the tokens up to it, so the
numbers differ from a prefill from scratch only by the products' rounding, and the greedy tokens are
the same (tests/test_streaming.py); ``share_prefix=False`` turns it off with the scoring path's
sharing.

The prefill multiplies by the packed weights (`packing.decoding`), as the decode steps do: on a
CPU it is 15-30% faster than MKL's products (results/serving/README.md). `uncached` tells the
scheduler how many positions a prompt would run, so that it prefills joining prompts of very
different lengths by separate forwards (`scheduler.length_groups`, with ``PREFILL_OVERHEAD``).

Every forward holds the backend's model lock shared, so an adapter block waits between steps.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from prefsteer.backends.hf.decode import output_logits
from prefsteer.backends.hf.kvcache import growing_cache, keeps_every_key
from prefsteer.backends.hf.packing import decoding
from prefsteer.backends.hf.planner import left_pad


# what a prefill forward costs beyond its tokens, in tokens' worth (the scheduler's
# `length_groups`): on a CPU a forward of a few tokens costs about what 40-55 more tokens do, reading
# every weight once (results/serving/burst-bound.md); on an accelerator launching every layer's
# kernels costs what thousands of tokens do (a guess: not measured there yet)
PREFILL_OVERHEAD = {"cpu": 48}
PREFILL_OVERHEAD_ACCELERATOR = 2048


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with ``n`` zeros before its entries along ``dim`` (a negative dim)."""
    if n == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [n, 0]
    return F.pad(t, pad)


def join_rows(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Lay ``new_cache``'s rows after ``cache``'s, in place on ``cache``: both left-padded, so the
    shorter of the two is padded on the left with masked zero keys. Returns the joined mask."""
    K_run, K_new = mask.shape[1], new_mask.shape[1]
    K = max(K_run, K_new)
    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([_pad_left(old.keys, K - K_run, -2), _pad_left(new.keys, K - K_new, -2)])
        old.values = torch.cat([_pad_left(old.values, K - K_run, -2), _pad_left(new.values, K - K_new, -2)])
    return torch.cat([_pad_left(mask, K - K_run, -1), _pad_left(new_mask, K - K_new, -1)])


def keep_rows(cache, mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep rows ``idx`` of ``cache`` (in place) and cut off the left the columns none of them uses.
    Returns their mask."""
    mask = mask[idx]
    first = int(mask.any(0).int().argmax())  # columns before it hold no remaining row's keys
    for layer in cache.layers:
        layer.keys = layer.keys[idx, :, first:]
        layer.values = layer.values[idx, :, first:]
    return mask[:, first:]


class KVBatch:
    def __init__(self, b):
        self.b = b
        self.cache = None
        self.mask: torch.Tensor | None = None    # (R, K) 1 for a real key
        self.pos: torch.Tensor | None = None     # (R, 1) position of each row's last token
        self.hidden: torch.Tensor | None = None  # (R, d) last hidden state of each row

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def uncached(self, prompt: Sequence[int]) -> int:
        """How many of ``prompt``'s positions a prefill would run now: those after the longest head
        it shares with a kept prompt (the scheduler groups joining requests by it)."""
        b = self.b
        n = b._stream_memo.longest_match(list(prompt))[1] if b.share_prefix else 0
        return len(prompt) - min(n, len(prompt) - 1)

    def add(self, prompts: Sequence[Sequence[int]]) -> int:
        b = self.b
        with b._lock.shared("a streamed request"), torch.inference_mode():
            cache, mask, positions, hidden, reused = self._prefill([list(p) for p in prompts])
        if not self.rows:
            self.cache, self.mask, self.pos, self.hidden = cache, mask, positions[:, -1:], hidden
            return reused
        self.mask = join_rows(self.cache, self.mask, cache, mask)
        self.pos = torch.cat([self.pos, positions[:, -1:]])
        self.hidden = torch.cat([self.hidden, hidden])
        return reused

    def _prefill(self, prompts: list[list[int]]):
        """The new rows' cache, mask (R, K), positions (R, K), last hidden states (R, d) and how many
        prompt positions were taken from the memo.

        A row whose prompt starts like a kept prompt takes that head's keys and values and runs only
        the rest: its row is ``[padding, kept prefix, padding, rest]``, the kept part right-aligned
        among the rows' prefixes and the rest among their rests. Every prompt is kept afterwards."""
        b = self.b
        cache = growing_cache(b.config)
        share = b.share_prefix and keeps_every_key(cache)
        heads = [b._stream_memo.longest_match(p) if share else (None, 0) for p in prompts]
        heads = [(kv, min(n, len(p) - 1)) if n else (None, 0) for (kv, n), p in zip(heads, prompts)]
        P = max(n for _, n in heads)
        ids, rest = left_pad([p[n:] for p, (_, n) in zip(prompts, heads)], b.pad_id)
        ids, rest = ids.to(b.device), rest.to(b.device)
        kept = torch.tensor([[0] * (P - n) + [1] * n for _, n in heads], dtype=rest.dtype, device=b.device)
        mask = torch.cat([kept, rest], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if P:
            for i in range(len(cache.layers)):
                like = next(hit for hit, n in heads if n)[i][0]  # (1, H_kv, *, D)
                keys = like.new_zeros((len(prompts), like.shape[1], P, like.shape[3]))
                values = torch.zeros_like(keys)
                for r, (hit, n) in enumerate(heads):
                    if n:
                        keys[r, :, P - n:] = hit[i][0][0, :, :n]
                        values[r, :, P - n:] = hit[i][1][0, :, :n]
                cache.update(keys, values, i)
        with decoding():
            out = b.extend(cache, input_ids=ids, attention_mask=mask, position_ids=positions[:, P:])
        if share:
            for r, p in enumerate(prompts):  # its keys and values, copied out of the batch's buffers
                real = mask[r].nonzero().squeeze(-1)
                b._stream_memo.put(p, [(layer.keys[r:r + 1, :, real], layer.values[r:r + 1, :, real])
                                       for layer in cache.layers])
        return cache, mask, positions, out.last_hidden_state[:, -1], sum(n for _, n in heads)

    def keep(self, rows: Sequence[int]) -> None:
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache = self.mask = self.pos = self.hidden = None
            return
        idx = torch.tensor(list(rows), device=self.mask.device)
        self.pos, self.hidden = self.pos[idx], self.hidden[idx]
        self.mask = keep_rows(self.cache, self.mask, idx)

    def step(self, tokens: Sequence[int]) -> None:
        b = self.b
        R = self.rows
        if len(tokens) != R:
            raise ValueError(f"{len(tokens)} tokens for {R} rows (one per row)")
        with b._lock.shared("a streamed request"), torch.inference_mode(), decoding():
            self.mask = torch.cat([self.mask, torch.ones((R, 1), dtype=self.mask.dtype, device=self.mask.device)], 1)
            self.pos = self.pos + 1
            ids = torch.tensor(list(tokens), dtype=torch.long, device=self.mask.device)[:, None]
            out = b.extend(self.cache, input_ids=ids, attention_mask=self.mask, position_ids=self.pos)
            self.hidden = out.last_hidden_state[:, -1]

    def outputs(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        with self.b._lock.shared("a streamed request"), torch.inference_mode():
            hidden = self.hidden[start:]
            return hidden.float(), output_logits(self.b, hidden)
