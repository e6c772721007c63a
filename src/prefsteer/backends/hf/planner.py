"""Which rows share which prefix, and how rows are batched: pure functions over token lists.

    >>> plan_groups([[1, 2, 3, 4], [1, 2, 3, 5], [9]])      # [(prefix_len, [context index]), ...]
    >>> balanced_batches([3, 5, 8, 9], batch_size=2)        # [[0, 1], [2, 3]]
    >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0)       # [[5, 6], [0, 7]], [[1, 1], [0, 1]]
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

PREFIX_OVERHEAD = 16  # tokens' worth of cost charged per shared-prefix group (one extra forward)
BATCH_TOKENS = 4096  # token positions per scoring forward (rows x longest row), besides batch_size
PLAN_WINDOW = 512  # contexts planned together: bounds the quadratic program on very large calls


def plan_groups(ctxs: Sequence[Sequence[int]], overhead: int = PREFIX_OVERHEAD,
                window: int = PLAN_WINDOW) -> list[tuple[int, list[int]]]:
    """Group unique contexts into ``(prefix_len, [context index])`` groups.

    Contexts are sorted, so a group is a run of neighbours and its prefix is the smallest common
    prefix of adjacent pairs, capped so that every context keeps at least one token outside the
    prefix (the one that predicts the first continuation token). A group of m contexts saves
    ``(m - 1) * prefix`` tokens at the cost of one more forward (``overhead`` tokens); a dynamic
    program picks the runs that save the most. Contexts left alone get ``prefix_len`` 0. Groups
    come in sorted order of their contexts.
    """
    order = sorted(range(len(ctxs)), key=lambda i: list(ctxs[i]))
    groups: list[tuple[int, list[int]]] = []
    for lo in range(0, len(order), window):
        idx = order[lo: lo + window]
        m = len(idx)
        adj = [len(os.path.commonprefix([list(ctxs[a]), list(ctxs[b])])) for a, b in zip(idx, idx[1:])]
        best = [0] * (m + 1)
        cut: list[tuple[int, int]] = [(0, 0)] * (m + 1)
        for j in range(1, m + 1):
            best[j], cut[j] = best[j - 1], (j - 1, 0)  # context j-1 alone, no shared prefix
            p = shortest = len(ctxs[idx[j - 1]])
            for i in range(j - 2, -1, -1):  # the run idx[i:j]
                p = min(p, adj[i])
                if p == 0:
                    break
                shortest = min(shortest, len(ctxs[idx[i]]))
                plen = min(p, shortest - 1)
                gain = (j - i - 1) * plen - overhead
                if gain > 0 and best[i] + gain > best[j]:
                    best[j], cut[j] = best[i] + gain, (i, plen)
        j, seg = m, []
        while j > 0:
            i, plen = cut[j]
            seg.append((plen, idx[i:j]))
            j = i
        groups.extend(reversed(seg))
    return groups


def plan_savings(ctxs: Sequence[Sequence[int]], groups: list[tuple[int, list[int]]]) -> int:
    """Tokens a grouping saves against feeding every context whole: ``(m - 1) * prefix`` per group."""
    return sum((len(cs) - 1) * p for p, cs in groups if p)


def balanced_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split rows sorted by length into consecutive batches of at most ``batch_size`` rows and about
    ``max_tokens`` padded positions, as even in size as those limits allow."""
    max_tokens = max_tokens or BATCH_TOKENS
    n = len(lengths)
    n_batches = max(-(-n // batch_size), -(-sum(lengths) // max_tokens), 1)
    while True:
        size = -(-n // n_batches)
        batches = [list(range(lo, min(lo + size, n))) for lo in range(0, n, size)]
        if n_batches >= n or all(len(b) * lengths[b[-1]] <= max_tokens or len(b) == 1 for b in batches):
            return batches
        n_batches += 1


def shared_prefix(prompts: Sequence[Sequence[int]], overhead: int = PREFIX_OVERHEAD) -> int:
    """Length of the token prefix all prompts share, worth computing once (0 when not), capped so
    every prompt keeps at least one token of its own."""
    if len(prompts) < 2:
        return 0
    k = min(len(os.path.commonprefix([list(p) for p in prompts])), min(len(p) for p in prompts) - 1)
    return k if k >= overhead else 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T), attention mask (B, T), left-padded so every row ends at T-1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, T - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[b, T - len(seq):] = 1
    return ids, mask
