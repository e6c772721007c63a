"""Scoring: summed log-probabilities (or hidden states) of continuations, sharing context prefixes.

`forward_requests` groups the requests' contexts by the planner (`planner.plan_groups`), runs each
group's prefix once (`PrefixMemo` keeps the last prefixes' keys and values between calls), packs
each context's rest and all its continuations into one row under a tree mask (`run_packed`), and
reduces the output layer a block of positions at a time to the targets' log-probabilities
(`collect`). ``share_prefix=False`` or ``restrict_logits=False`` takes the plain path
(`run_rows`: one right-padded row per request), which the tests compare against.

The functions take the `TransformersBackend` ``b`` for its model parts (``body``, ``lm_head``,
``device``, ``pad_id``); they keep no state of their own except the memo, which is locked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Sequence

import torch

from prefsteer.backends.base import Score
from prefsteer.backends.hf.attention import CascadeState
from prefsteer.backends.hf.planner import balanced_batches, plan_groups

log = logging.getLogger(__name__)

PREFIX_MEMO_TOKENS = 8192  # prefix positions whose keys/values are kept between calls (scoring, streamed prompts)
LOGIT_BLOCK = 128  # positions whose output-layer logits are computed and reduced together

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, H_kv, P, D)


class PrefixMemo:
    """The keys and values of the last prefixes run (up to ``max_tokens`` positions), most recent
    first. The tensors are never written after they are stored, so a hit is handed out as slices;
    the list itself is read and replaced under a lock (several threads score at once)."""

    def __init__(self, max_tokens: int = PREFIX_MEMO_TOKENS):
        self.max_tokens = max_tokens
        self._entries: list[tuple[list[int], KV]] = []
        self._lock = threading.Lock()

    def longest_match(self, prefix: list[int]) -> tuple[KV | None, int]:
        """The kept keys/values that share the longest head with ``prefix``, and its length."""
        with self._lock:
            entries = list(self._entries)
        hit, n = None, 0
        for toks, kv in entries:
            m = len(os.path.commonprefix([toks, prefix]))
            if m > n:
                hit, n = kv, m
        return hit, n

    def put(self, prefix: list[int], kv: KV) -> None:
        with self._lock:
            memo = [(list(prefix), kv)] + [e for e in self._entries if e[0] != prefix]
            while len(memo) > 1 and sum(len(t) for t, _ in memo) > self.max_tokens:
                memo.pop()
            self._entries = memo

    def clear(self) -> None:
        with self._lock:
            self._entries = []


def prefix_kv(b, prefix: list[int]) -> tuple[KV, int]:
    """The prefix's keys and values per layer, (1, H_kv, P, D) each, and how many of its
    positions came from an earlier call.

    A position's keys and values depend only on the tokens up to it, so the longest match with a
    kept prefix is reused (sliced, never copied) and only the tokens past it are run.
    """
    from transformers import DynamicCache

    hit, n = b._prefix_memo.longest_match(prefix)
    if n == len(prefix):
        kv = [(k[:, :, :n], v[:, :, :n]) for k, v in hit]
    else:
        cache = DynamicCache(config=b.config)
        for i, (k, v) in enumerate(hit or []):
            cache.update(k[:, :, :n], v[:, :, :n], i)
        b.extend(cache, input_ids=torch.tensor([prefix[n:]], device=b.device))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
    b._prefix_memo.put(prefix, kv)
    return kv, n


def tree_mask(seg: list[list[int]], dtype: torch.dtype, device) -> torch.Tensor:
    """The additive mask (B, 1, S, S) of packed rows: ``seg`` marks each position 0 (context),
    j (continuation j) or -1 (padding). A key is visible to a query when it comes no later, is not
    padding, and belongs to the context or to the query's own continuation (padding queries see
    the context only)."""
    sg = torch.tensor(seg, device=device)
    S = sg.shape[1]
    sk, sq = sg[:, None, :], sg[:, :, None]
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    allowed = causal & (sk >= 0) & ((sk == 0) | (sk == sq))
    mask = torch.zeros((sg.shape[0], 1, S, S), dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], float("-inf"))


def run_packed(b, packed: list[tuple[list[int], list[tuple[int, list[int]]]]], prefix_len: int,
               kv: KV | None, want_hidden: bool, batch_size: int, results: dict, bar) -> tuple[int, int]:
    """One row per context: ``(context_rest, [(request id, continuation), ...])``.

    A row is the rest of the context followed by all its continuations, each of which sees the
    prefix, the rest of the context and its own earlier tokens only (a tree mask), at the
    positions it would have alone. Returns (real tokens, padded positions) fed through the model.
    """
    fed = padded = 0
    lengths = [len(rest) + sum(len(c) for _, c in conts) for rest, conts in packed]
    order = sorted(range(len(packed)), key=lengths.__getitem__)
    for chunk_idx in balanced_batches([lengths[i] for i in order], batch_size):
        chunk = [packed[order[i]] for i in chunk_idx]
        B, S = len(chunk), max(lengths[order[i]] for i in chunk_idx)
        ids = [[b.pad_id] * S for _ in range(B)]
        positions = [[0] * S for _ in range(B)]
        seg = [[-1] * S for _ in range(B)]  # 0: context, j: continuation j, -1: padding
        rows, pos, tgt, owners = [], [], [], []
        for r, (rest, conts) in enumerate(chunk):
            n = len(rest)
            ids[r][:n], positions[r][:n], seg[r][:n] = rest, range(n), [0] * n
            at = n
            for j, (rid, cont) in enumerate(conts, 1):
                m = len(cont)
                ids[r][at: at + m], positions[r][at: at + m] = cont, range(n, n + m)
                seg[r][at: at + m] = [j] * m
                # cont[0] is predicted from the context's last token, cont[i] from cont[i-1]
                rows.extend([r] * m)
                pos.append(n - 1)
                pos.extend(range(at, at + m - 1))
                tgt.extend(cont)
                owners.append((rid, m))
                at += m
            fed += at
        mask = tree_mask(seg, b.model.dtype, b.device)
        ids_t = torch.tensor(ids, device=b.device)
        pos_t = torch.tensor(positions, device=b.device) + prefix_len
        # a 4-D mask is passed through as is; the cascade attends the prefix's keys/values besides it
        hidden = b.body(input_ids=ids_t, position_ids=pos_t, attention_mask=mask, use_cache=False,
                        prefsteer_cascade=CascadeState(kv)).last_hidden_state       # (B, S, d)
        h = hidden[torch.tensor(rows, device=b.device), torch.tensor(pos, device=b.device)]
        del hidden, mask
        collect(b, h, tgt, owners, want_hidden, results)
        padded += B * S
        if bar is not None:
            bar.update(len(owners))
    return fed, padded


def collect(b, h: torch.Tensor | None, tgt: list[int], owners: list[tuple[int, int]], want_hidden: bool,
            results: dict, logits: torch.Tensor | None = None) -> None:
    """Turn the states (N, d) that predict the targets into per-request results."""
    if want_hidden:
        h = h.float().cpu()
        start = 0
        for rid, m in owners:
            results[rid] = h[start: start + m]
            start += m
        return
    device = (h if logits is None else logits).device
    tgt_t = torch.tensor(tgt, device=device)
    # log p(target) = logit[target] - logsumexp(logits), a block of positions at a time: the
    # block's logits stay in cache and no (N, vocabulary) log-softmax is ever written
    lp = torch.empty(len(tgt), dtype=torch.float32, device=device)
    for lo in range(0, len(tgt), LOGIT_BLOCK):
        hi = min(lo + LOGIT_BLOCK, len(tgt))
        block = (b.lm_head(h[lo:hi]) if logits is None else logits[lo:hi]).float()
        lp[lo:hi] = block.gather(-1, tgt_t[lo:hi, None])[:, 0] - torch.logsumexp(block, -1)
    seg = torch.repeat_interleave(torch.arange(len(owners)), torch.tensor([m for _, m in owners]))
    sums = torch.zeros(len(owners), dtype=torch.float64, device=device)
    sums.index_add_(0, seg.to(device), lp.double())
    for (rid, m), s in zip(owners, sums.tolist()):
        results[rid] = Score(s, m)


def run_rows(b, items: list[tuple[int, list[int], int, list[int]]], restrict: bool, want_hidden: bool,
             batch_size: int, results: dict, bar) -> tuple[int, int]:
    """The plain path: one right-padded row per request ``(id, context + continuation, n_ctx, cont)``.

    With causal attention no real token sees the right padding, so no attention mask is needed.
    ``restrict=False`` computes the logits at every position, as a standard forward does.
    Returns (real tokens, padded positions) fed through the model.
    """
    fed = padded = 0
    items = sorted(items, key=lambda it: len(it[1]))
    for lo in range(0, len(items), batch_size):
        chunk = items[lo: lo + batch_size]
        B, S = len(chunk), max(len(it[1]) for it in chunk)
        ids = torch.full((B, S), b.pad_id, dtype=torch.long)
        rows, pos, tgt, owners = [], [], [], []
        for r, (rid, seq, n_ctx, cont) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            rows.extend([r] * len(cont))
            pos.extend(range(n_ctx - 1, n_ctx - 1 + len(cont)))
            tgt.extend(cont)
            owners.append((rid, len(cont)))
        ids = ids.to(b.device)
        rows_t, pos_t = torch.tensor(rows, device=b.device), torch.tensor(pos, device=b.device)
        if want_hidden or restrict:
            hidden = b.body(input_ids=ids, use_cache=False).last_hidden_state
            collect(b, hidden[rows_t, pos_t], tgt, owners, want_hidden, results)
        else:
            logits = b.model(input_ids=ids, use_cache=False).logits
            collect(b, None, tgt, owners, False, results, logits=logits[rows_t, pos_t])
        fed += sum(len(it[1]) for it in chunk)
        padded += B * S
        if bar is not None:
            bar.update(B)
    return fed, padded


def forward_requests(b, encoded: Sequence[tuple[list[int], list[int]]], *, want_hidden: bool, progress: bool,
                     share: bool, restrict: bool, batch_size: int) -> tuple[dict, dict[str, Any]]:
    """Results by request index (`Score` or hidden states (T_i, d)) of the encoded requests
    ``(context ids, continuation ids)``, and the call's statistics."""
    results: dict[int, Any] = {}
    todo = []
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:  # nothing to score
            results[i] = torch.zeros(0, b.config.hidden_size) if want_hidden else Score(0.0, 0)
        else:
            todo.append(i)
    if not todo:
        return results, {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="hidden states" if want_hidden else "scoring", unit="request",
                   leave=False)
    start, fed, padded, n_groups, reused = time.perf_counter(), 0, 0, 0, 0
    try:
        with torch.inference_mode():
            if not (share and restrict):
                items = [(i, encoded[i][0] + encoded[i][1], len(encoded[i][0]), encoded[i][1]) for i in todo]
                fed, padded = run_rows(b, items, restrict, want_hidden, batch_size, results, bar)
            else:
                ctx_index: dict[tuple, int] = {}  # unique contexts and their requests
                ctxs: list[list[int]] = []
                members: list[list[int]] = []
                for i in todo:
                    key = tuple(encoded[i][0])
                    if key not in ctx_index:
                        ctx_index[key] = len(ctxs)
                        ctxs.append(encoded[i][0])
                        members.append([])
                    members[ctx_index[key]].append(i)
                groups = plan_groups(ctxs)
                alone = [c for p, cs in groups if p == 0 for c in cs]
                shared = [(p, cs) for p, cs in groups if p > 0] + ([(0, alone)] if alone else [])
                n_groups = len(shared) - bool(alone)
                for plen, cs in shared:
                    kv, old = prefix_kv(b, ctxs[cs[0]][:plen]) if plen else (None, 0)
                    packed = [(ctxs[c][plen:], [(i, encoded[i][1]) for i in members[c]]) for c in cs]
                    n, m = run_packed(b, packed, plen, kv, want_hidden, batch_size, results, bar)
                    fed, padded = fed + plen - old + n, padded + plen - old + m
                    reused += old
                    del kv
    finally:
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - start
    stats = {"requests": len(todo), "prefix_groups": n_groups, "tokens_fed": fed,
             "positions_fed": padded, "prefix_reused": reused, "seconds": secs}
    log.debug("forward of %d requests: %d prefix groups, %d tokens fed in %.2f s", len(todo), n_groups, fed, secs)
    return results, stats
