"""The transformers backend: any causal LM with a chat template, on CPU or GPU.

Scoring is where EXACT spends its time: one call holds one prompt rendered under many attribute
sets, each with two responses, so the rows share a long token prefix and differ only in their last
~60 tokens. `TransformersBackend.score` therefore

1. groups the contexts by their longest common token prefix (a small dynamic program over the
   sorted contexts picks the grouping that feeds the fewest tokens through the model),
2. runs each group's prefix once, at batch 1, and keeps its keys and values; the last few prefixes
   are kept between calls, so the next greedy step of the same prompt (whose prefix starts with
   the same tokens) computes only the tokens past the longest match,
3. packs each context's remainder and all its continuations into one row (a tree mask lets every
   continuation see the context but not its siblings) and runs these rows in right-padded batches
   with a cascade attention: all queries attend to the prefix's keys/values, stored once for the
   whole batch, and to their own row, the two softmaxes merged exactly by their log-sum-exps,
4. applies the output layer only at the positions that predict a continuation token, 128 positions
   at a time, each block reduced at once to its targets' log-probabilities (logit - logsumexp).

``matmul_precision="medium"`` runs the float32 model's large matrix products under torch's
"medium" float32 precision (the rows' own short attention blocks stay at "highest"). On this
project's AVX512-BF16 CPU that scores 1.6x faster and moves EXACT's objectives by under 4e-4 nats;
elsewhere "medium" may be plain bfloat16, so ``benchmarks/precision.py --low matmul-medium`` is the
check. The setting is part of the fingerprint.

``share_prefix=False, restrict_logits=False, batch_size=1`` gives the naive path (one full forward
with full logits per request), which the tests and ``benchmarks/scoring.py`` compare against.

Generation uses the backend's own decode loop (left-padded prefill, then one token per step on the
key/value cache) because guided decoding needs the last hidden state at every step. A prefix that
all prompts of a batch share (Base's serialized history) is run once and attended through the same
cascade, so its keys and values are neither recomputed nor stored, nor copied at each step, per row.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from prefsteer.errors import InputError
from prefsteer.backends.base import MATMUL_PRECISIONS, Generation, GenerationConfig, Guide, Messages, Score, ScoreRequest
from prefsteer.backends.sampling import sample_next, seeded_generator

log = logging.getLogger(__name__)

# config fields that identify an architecture; loader-specific fields (name, versions) are left out
_ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling",
                "rms_norm_eps", "tie_word_embeddings", "hidden_act", "sliding_window")
_PREFIX_OVERHEAD = 16  # tokens' worth of cost charged per shared-prefix group (one extra forward)


_BATCH_TOKENS = 4096  # token positions per scoring forward (rows x longest row), besides batch_size
_PREFIX_MEMO_TOKENS = 8192  # prefix positions whose keys/values are kept between scoring calls
_LOGIT_BLOCK = 128  # positions whose output-layer logits are computed and reduced together
_CASCADE = "prefsteer_cascade"


@contextmanager
def matmul_precision(precision: str):
    """torch's process-wide float32 matrix-product precision set to ``precision`` for the duration."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D), each key/value head serving n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _balanced_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split rows sorted by length into consecutive batches of at most ``batch_size`` rows and about
    ``max_tokens`` padded positions, as even in size as those limits allow."""
    max_tokens = max_tokens or _BATCH_TOKENS
    n = len(lengths)
    n_batches = max(-(-n // batch_size), -(-sum(lengths) // max_tokens), 1)
    while True:
        size = -(-n // n_batches)
        batches = [list(range(lo, min(lo + size, n))) for lo in range(0, n, size)]
        if n_batches >= n or all(len(b) * lengths[b[-1]] <= max_tokens or len(b) == 1 for b in batches):
            return batches
        n_batches += 1


@dataclass
class _CascadeState:
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (1, H_kv, P, D)
    mask: torch.Tensor | None  # (B, 1, S, K) additive mask of the S queries over the batch's own K keys


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
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


def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, prefsteer_cascade: _CascadeState | None = None,
                      **kwargs):
    """Attention of suffix tokens over a prefix shared by the whole batch, plus their own tokens.

    The prefix's keys and values are stored once (batch 1); all B x S queries attend to them in
    one call, the suffix part runs under the batch's tree mask, and the two softmaxes are merged
    exactly through their log-sum-exps. Nothing of the prefix is copied per row.
    """
    st = prefsteer_cascade
    if st is None:
        raise RuntimeError("cascade attention called without its state")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # the rows' own keys: short masked blocks, which "medium" matrix products only slow down (CPU)
    with matmul_precision("highest"):
        out, lse = _attend(query, key, value, st.mask, scale)
    if st.prefix is not None:
        kp, vp = st.prefix[module.layer_idx]
        B, H, S, D = query.shape
        q_all = query.transpose(0, 1).reshape(1, H, B * S, D)  # every query of the batch at once
        out_p, lse_p = _attend(q_all, kp, vp, None, scale)
        out_p = out_p.view(H, B, S, D).transpose(0, 1)
        lse_p = lse_p.view(H, B, S).transpose(0, 1)
        # softmax over [prefix; own keys] = the two partial results weighted by their shares of mass
        own_share = torch.sigmoid(lse - lse_p)[..., None].to(out.dtype)
        out = torch.lerp(out_p, out, own_share)
    return out.transpose(1, 2).contiguous(), None


def _register_cascade() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_CASCADE, cascade_attention)  # no mask function: masks are not built


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T), attention mask (B, T), left-padded so every row ends at T-1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, T - len(seq):] = torch.tensor(seq)
        mask[b, T - len(seq):] = 1
    return ids, mask


class TransformersBackend:
    name = "hf"

    def __init__(self, model: str | None = None, device: str | None = None, dtype: Any = None,
                 batch_size: int = 32, threads: int | None = None, cache_dir: str | None = None,
                 share_prefix: bool = True, restrict_logits: bool = True,
                 matmul_precision: str | None = None, **_: Any):
        from prefsteer.backends.loading import load_model

        if batch_size < 1:
            raise ValueError(f"`batch_size` (={batch_size}) has to be at least 1")
        self.matmul_precision = matmul_precision or "highest"
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise InputError(f"`matmul_precision` '{matmul_precision}' is none of {', '.join(MATMUL_PRECISIONS)}",
                             field="matmul_precision")
        if threads:
            torch.set_num_threads(int(threads))
        self.batch_size, self.share_prefix, self.restrict_logits = batch_size, share_prefix, restrict_logits
        start = time.perf_counter()
        self.model, self.tokenizer, self.source = load_model(model, device, dtype, cache_dir)
        self.load_seconds = time.perf_counter() - start
        self.device = next(self.model.parameters()).device
        self.config = self.model.config
        self.body = self.model.model           # the decoder without the output layer
        # transformers 5.x renames the decoder's `past_key_values` argument to `cache` (the old name
        # goes in 5.40): pass whichever this version takes
        params = inspect.signature(self.body.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.lm_head = self.model.get_output_embeddings()
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"the model '{self.source['model']}' has no chat template; prefsteer needs "
                             "an instruction-tuned model", field="model")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.eos_ids = self._eos_ids()
        self._ctx_cache: dict[tuple, list[int]] = {}
        self._prefix_memo: list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self._casts: dict[torch.dtype, TransformersBackend] = {}  # see `cast`
        self._fingerprint: str | None = None
        self.last_stats: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}  # cumulative over score / hidden_states calls
        _register_cascade()

    def cast(self, dtype: Any) -> "TransformersBackend":
        """The same model in another precision, as a second backend: the weights are copied and
        cast, the tokenizer is shared. Its fingerprint differs, so caches never mix the two. One
        copy per precision is made and kept, so every method that asks shares it."""
        import copy

        from prefsteer.backends.loading import _default_dtype, warn_if_emulated

        dtype = _default_dtype(str(self.device), dtype)
        if dtype == self.model.dtype:
            return self
        if dtype in self._casts:
            return self._casts[dtype]
        warn_if_emulated(self.device, dtype)
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        for p in other.model.parameters():  # buffers (rotary frequencies) stay float32, as a load in dtype has them
            p.data = p.data.to(dtype)
        other.body, other.config = other.model.model, other.model.config
        other.lm_head = other.model.get_output_embeddings()
        other.source = dict(self.source, dtype=str(dtype).replace("torch.", ""))
        other._ctx_cache, other._prefix_memo, other._fingerprint, other._casts = {}, [], None, {}
        other.last_stats, other.stats = {}, {}
        self._casts[dtype] = other
        return other

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        cands: list[Any] = [self.tokenizer.eos_token_id]
        gc = getattr(self.model, "generation_config", None)
        if gc is not None:
            cands.append(gc.eos_token_id)
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            cands.append(self.tokenizer.convert_tokens_to_ids(tok) if tok in self.tokenizer.get_vocab() else None)
        for c in cands:
            for i in (c if isinstance(c, (list, tuple)) else [c]):
                if i is not None and i != self.tokenizer.unk_token_id:
                    ids.add(int(i))
        return ids

    # -- identity ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            cfg = self.config.to_dict()
            arch = {k: cfg[k] for k in _ARCH_FIELDS if k in cfg}
            h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
            h.update(f"vocab={len(self.tokenizer)};dtype={self.model.dtype}".encode())
            with torch.no_grad():  # a sample of the weights: the first values of a few tensors and their sums
                params = dict(self.model.named_parameters())
                names = sorted(params)
                for name in sorted({names[0], names[len(names) // 2], names[-1]}):
                    t = params[name].detach().flatten()
                    h.update(name.encode())
                    h.update(t[:4096].float().cpu().numpy().tobytes())
                    h.update(f"{t.double().sum().item():.6e}".encode())
            self._fingerprint = f"hf:{h.hexdigest()[:32]}"
            if self.matmul_precision != "highest":  # other numbers, however close: caches keep them apart
                self._fingerprint += f":matmul-{self.matmul_precision}"
        return self._fingerprint

    @property
    def template_id(self) -> str:
        tmpl = self.tokenizer.chat_template
        if not isinstance(tmpl, str):
            tmpl = json.dumps(tmpl, sort_keys=True)
        return hashlib.sha256(tmpl.encode()).hexdigest()[:16]

    @property
    def max_context(self) -> int:
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if n else int(getattr(self.tokenizer, "model_max_length", 2048))

    def info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"backend": self.name, "fingerprint": self.fingerprint, "template_id": self.template_id,
                "model": self.source["model"], "path": self.source["path"], "device": str(self.device),
                "dtype": str(self.model.dtype).replace("torch.", ""), "parameters": n_params,
                "vocab_size": len(self.tokenizer), "max_context": self.max_context,
                "batch_size": self.batch_size, "threads": torch.get_num_threads(),
                "matmul_precision": self.matmul_precision,
                "load_seconds": round(self.load_seconds, 2)}

    # -- tokenization -----------------------------------------------------------------------
    def encode_context(self, messages: Messages) -> list[int]:
        """Token ids of the chat-templated context, ending with the assistant's turn header."""
        key = tuple((m["role"], m["content"]) for m in messages)
        ids = self._ctx_cache.get(key)
        if ids is None:
            text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._ctx_cache) > 4096:
                self._ctx_cache.clear()
            self._ctx_cache[key] = ids
        return list(ids)

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def count_tokens(self, messages: Messages, continuation: str = "") -> int:
        return len(self.encode_context(messages)) + len(self.encode_continuation(continuation))

    def _encode_requests(self, requests: Sequence[ScoreRequest]) -> list[tuple[list[int], list[int]]]:
        rows = []
        for i, req in enumerate(requests):
            ctx, cont = self.encode_context(req.chat()), self.encode_continuation(req.continuation)
            if len(ctx) + len(cont) > self.max_context:
                raise InputError(f"request {i} is {len(ctx) + len(cont)} tokens long (context {len(ctx)} + "
                                 f"continuation {len(cont)}), more than the model's limit of "
                                 f"{self.max_context} tokens", field="prompt")
            rows.append((ctx, cont))
        return rows

    # -- planning: which rows share which prefix -----------------------------------------------
    @staticmethod
    def _plan(ctxs: list[list[int]]) -> list[tuple[int, list[int]]]:
        """Group unique contexts into ``(prefix_len, [context index])`` groups.

        Contexts are sorted, so a group is a run of neighbours and its prefix is the smallest common
        prefix of adjacent pairs, capped so that every context keeps at least one token outside the
        prefix (the one that predicts the first continuation token). A group of m contexts saves
        ``(m - 1) * prefix`` tokens at the cost of one more forward; a dynamic program picks the runs
        that save the most. Contexts left alone get ``prefix_len`` 0.
        """
        order = sorted(range(len(ctxs)), key=lambda i: ctxs[i])
        groups: list[tuple[int, list[int]]] = []
        window = 512  # bounds the quadratic program on very large calls
        for lo in range(0, len(order), window):
            idx = order[lo: lo + window]
            m = len(idx)
            adj = []
            for a, b in zip(idx, idx[1:]):
                adj.append(len(os.path.commonprefix([ctxs[a], ctxs[b]])))
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
                    gain = (j - i - 1) * plen - _PREFIX_OVERHEAD
                    if gain > 0 and best[i] + gain > best[j]:
                        best[j], cut[j] = best[i] + gain, (i, plen)
            j, seg = m, []
            while j > 0:
                i, plen = cut[j]
                seg.append((plen, idx[i:j]))
                j = i
            groups.extend(reversed(seg))
        return groups

    def clear_prefix_memo(self) -> None:
        """Forget the prefixes kept between calls (benchmarks time each search from scratch)."""
        self._prefix_memo = []

    # -- the forward passes -------------------------------------------------------------------
    def _numerics(self):
        """The backend's float32 matrix-product precision, for the duration of a forward."""
        return matmul_precision(self.matmul_precision)

    @contextmanager
    def _cascade(self):
        """Route attention through `cascade_attention` (no mask construction) for the duration."""
        old = self.config._attn_implementation
        self.model.set_attn_implementation(_CASCADE)
        try:
            yield
        finally:
            self.model.set_attn_implementation(old)

    def extend(self, cache, **inputs):
        """The decoder (no output layer) on ``inputs``, reading and extending the KV ``cache``."""
        with self._numerics():
            return self.body(**inputs, **{self._cache_arg: cache}, use_cache=True)

    def _prefix_kv(self, prefix: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The prefix's keys and values per layer, (1, H_kv, P, D) each, and how many of its
        positions came from an earlier call.

        The keys and values of the last prefixes (up to ``_PREFIX_MEMO_TOKENS`` positions) are kept:
        a position's keys and values depend only on the tokens up to it, so the longest match with a
        kept prefix is reused (sliced, never copied) and only the tokens past it are run.
        """
        from transformers import DynamicCache

        hit, n = None, 0
        for toks, kv in self._prefix_memo:
            m = len(os.path.commonprefix([toks, prefix]))
            if m > n:
                hit, n = kv, m
        if n == len(prefix):
            kv = [(k[:, :, :n], v[:, :, :n]) for k, v in hit]
        else:
            cache = DynamicCache(config=self.config)
            for i, (k, v) in enumerate(hit or []):
                cache.update(k[:, :, :n], v[:, :, :n], i)
            self.extend(cache, input_ids=torch.tensor([prefix[n:]], device=self.device))
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        memo = [(list(prefix), kv)] + [e for e in self._prefix_memo if e[0] != prefix]
        while len(memo) > 1 and sum(len(t) for t, _ in memo) > _PREFIX_MEMO_TOKENS:
            memo.pop()
        self._prefix_memo = memo
        return kv, n

    def _run_packed(self, packed: list[tuple[list[int], list[tuple[int, list[int]]]]], prefix_len: int,
                    prefix_kv, want_hidden: bool, batch_size: int, results: dict, bar) -> int:
        """One row per context: ``(context_rest, [(request id, continuation), ...])``.

        A row is the rest of the context followed by all its continuations, each of which sees the
        prefix, the rest of the context and its own earlier tokens only (a tree mask), at the
        positions it would have alone. Returns (real tokens, padded positions) fed through the model.
        """
        fed = padded = 0
        lengths = [len(rest) + sum(len(c) for _, c in conts) for rest, conts in packed]
        order = sorted(range(len(packed)), key=lengths.__getitem__)
        for chunk_idx in _balanced_batches([lengths[i] for i in order], batch_size):
            chunk = [packed[order[i]] for i in chunk_idx]
            B, S = len(chunk), max(lengths[order[i]] for i in chunk_idx)
            ids = [[self.pad_id] * S for _ in range(B)]
            positions = [[0] * S for _ in range(B)]
            seg = [[-1] * S for _ in range(B)]  # 0: context, j: continuation j, -1: padding
            rows, pos, tgt, owners = [], [], [], []
            for b, (rest, conts) in enumerate(chunk):
                n = len(rest)
                ids[b][:n], positions[b][:n], seg[b][:n] = rest, range(n), [0] * n
                at = n
                for j, (rid, cont) in enumerate(conts, 1):
                    m = len(cont)
                    ids[b][at: at + m], positions[b][at: at + m] = cont, range(n, n + m)
                    seg[b][at: at + m] = [j] * m
                    # cont[0] is predicted from the context's last token, cont[i] from cont[i-1]
                    rows.extend([b] * m)
                    pos.append(n - 1)
                    pos.extend(range(at, at + m - 1))
                    tgt.extend(cont)
                    owners.append((rid, m))
                    at += m
                fed += at
            # a key is visible to a query when it comes no later, is not padding, and belongs to the
            # context or to the query's own continuation (padding queries see the context only)
            sg = torch.tensor(seg, device=self.device)
            sk, sq = sg[:, None, :], sg[:, :, None]
            causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
            allowed = causal & (sk >= 0) & ((sk == 0) | (sk == sq))
            mask = torch.zeros((B, 1, S, S), dtype=self.model.dtype, device=self.device)
            mask.masked_fill_(~allowed[:, None], float("-inf"))
            state = _CascadeState(prefix_kv, mask)
            ids_t = torch.tensor(ids, device=self.device)
            pos_t = torch.tensor(positions, device=self.device) + prefix_len
            with self._cascade():
                hidden = self.body(input_ids=ids_t, position_ids=pos_t, use_cache=False,
                                   prefsteer_cascade=state).last_hidden_state
            h = hidden[torch.tensor(rows, device=self.device), torch.tensor(pos, device=self.device)]
            del hidden, state, mask
            self._collect(h, tgt, owners, want_hidden, results)
            padded += B * S
            if bar is not None:
                bar.update(len(owners))
        return fed, padded

    def _collect(self, h: torch.Tensor, tgt: list[int], owners: list[tuple[int, int]], want_hidden: bool,
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
        for lo in range(0, len(tgt), _LOGIT_BLOCK):
            hi = min(lo + _LOGIT_BLOCK, len(tgt))
            block = (self.lm_head(h[lo:hi]) if logits is None else logits[lo:hi]).float()
            lp[lo:hi] = block.gather(-1, tgt_t[lo:hi, None])[:, 0] - torch.logsumexp(block, -1)
        seg = torch.repeat_interleave(torch.arange(len(owners)), torch.tensor([m for _, m in owners]))
        sums = torch.zeros(len(owners), dtype=torch.float64, device=device)
        sums.index_add_(0, seg.to(device), lp.double())
        for (rid, m), s in zip(owners, sums.tolist()):
            results[rid] = Score(s, m)

    def _run_rows(self, items: list[tuple[int, list[int], int, list[int]]], restrict: bool, want_hidden: bool,
                  batch_size: int, results: dict, bar) -> int:
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
            ids = torch.full((B, S), self.pad_id, dtype=torch.long)
            rows, pos, tgt, owners = [], [], [], []
            for b, (rid, seq, n_ctx, cont) in enumerate(chunk):
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                rows.extend([b] * len(cont))
                pos.extend(range(n_ctx - 1, n_ctx - 1 + len(cont)))
                tgt.extend(cont)
                owners.append((rid, len(cont)))
            ids = ids.to(self.device)
            rows_t, pos_t = torch.tensor(rows, device=self.device), torch.tensor(pos, device=self.device)
            if want_hidden or restrict:
                hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
                self._collect(hidden[rows_t, pos_t], tgt, owners, want_hidden, results)
            else:
                logits = self.model(input_ids=ids, use_cache=False).logits
                self._collect(None, tgt, owners, False, results, logits=logits[rows_t, pos_t])
            fed += sum(len(it[1]) for it in chunk)
            padded += B * S
            if bar is not None:
                bar.update(B)
        return fed, padded

    def _forward_requests(self, requests: Sequence[ScoreRequest], *, want_hidden: bool, progress: bool,
                          share_prefix: bool | None, restrict_logits: bool | None,
                          batch_size: int | None) -> dict:
        share = self.share_prefix if share_prefix is None else share_prefix
        restrict = self.restrict_logits if restrict_logits is None else restrict_logits
        bs = batch_size or self.batch_size
        encoded = self._encode_requests(requests)
        results: dict[int, Any] = {}
        todo = []
        for i, (ctx, cont) in enumerate(encoded):
            if not cont:  # nothing to score
                results[i] = (torch.zeros(0, self.config.hidden_size) if want_hidden else Score(0.0, 0))
            else:
                todo.append(i)
        if not todo:
            return results
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc="hidden states" if want_hidden else "scoring", unit="request",
                       leave=False)
        start, fed, padded, n_groups, reused = time.perf_counter(), 0, 0, 0, 0
        try:
            with torch.inference_mode(), self._numerics():
                if not (share and restrict):
                    items = [(i, encoded[i][0] + encoded[i][1], len(encoded[i][0]), encoded[i][1]) for i in todo]
                    fed, padded = self._run_rows(items, restrict, want_hidden, bs, results, bar)
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
                    groups = self._plan(ctxs)
                    alone = [c for p, cs in groups if p == 0 for c in cs]
                    shared = [(p, cs) for p, cs in groups if p > 0] + ([(0, alone)] if alone else [])
                    n_groups = len(shared) - bool(alone)
                    for plen, cs in shared:
                        kv, old = self._prefix_kv(ctxs[cs[0]][:plen]) if plen else (None, 0)
                        packed = [(ctxs[c][plen:], [(i, encoded[i][1]) for i in members[c]]) for c in cs]
                        n, m = self._run_packed(packed, plen, kv, want_hidden, bs, results, bar)
                        fed, padded = fed + plen - old + n, padded + plen - old + m
                        reused += old
                        del kv
        finally:
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - start
        self.last_stats = {"requests": len(todo), "prefix_groups": n_groups, "tokens_fed": fed,
                           "positions_fed": padded, "prefix_reused": reused, "seconds": secs}
        for k, v in self.last_stats.items():
            if k != "prefix_groups":
                self.stats[k] = self.stats.get(k, 0) + v
        self.stats["calls"] = self.stats.get("calls", 0) + 1
        log.debug("forward of %d requests: %d prefix groups, %d tokens fed in %.2f s",
                  len(todo), n_groups, fed, secs)
        return results

    # -- the contract -------------------------------------------------------------------------
    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False,
              share_prefix: bool | None = None, restrict_logits: bool | None = None,
              batch_size: int | None = None) -> list[Score]:
        res = self._forward_requests(requests, want_hidden=False, progress=progress, share_prefix=share_prefix,
                                     restrict_logits=restrict_logits, batch_size=batch_size)
        return [res[i] for i in range(len(requests))]

    def hidden_states(self, requests: Sequence[ScoreRequest], *, progress: bool = False) -> list[torch.Tensor]:
        res = self._forward_requests(requests, want_hidden=True, progress=progress, share_prefix=None,
                                     restrict_logits=True, batch_size=None)
        return [res[i] for i in range(len(requests))]

    def token_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def generate(self, contexts: Sequence[Messages], config: GenerationConfig | None = None, *,
                 guide: Guide | None = None) -> list[Generation]:
        """Decode each context (greedy unless ``config.do_sample``), ``batch_size`` contexts at a time.

        ``guide(hidden, logits, input_ids)`` is called at every step with the last layer's hidden
        state of the last position (B, d, float32), the next-token logits (B, V, float32) and the
        token ids so far (B, T), left-padded with the pad token; decoding uses what it returns.
        A row stops at an end-of-turn token, which is not part of the returned text.
        """
        config = config or GenerationConfig()
        gen = seeded_generator(config, self.device)
        encoded = []
        for i, msgs in enumerate(contexts):
            ids = self.encode_context(msgs)
            if len(ids) >= self.max_context:
                raise InputError(f"context {i} is {len(ids)} tokens long, more than the model's limit of "
                                 f"{self.max_context} tokens (leaving room for at least one new token)",
                                 field="prompt")
            encoded.append(ids)
        start = time.perf_counter()
        outs: list[Generation | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
        with torch.inference_mode(), self._numerics():
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo: lo + self.batch_size]
                for i, (ids, text) in zip(idx, self._decode_batch([encoded[i] for i in idx], config, guide, gen)):
                    outs[i] = Generation(text, ids)
        secs = time.perf_counter() - start
        for o in outs:
            o.seconds = secs
        return outs  # type: ignore[return-value]

    def _shared_prefix(self, prompts: list[list[int]]) -> int:
        """Length of the token prefix all prompts share, worth computing once (0 when not), capped so
        every prompt keeps at least one token of its own."""
        if not self.share_prefix or len(prompts) < 2:
            return 0
        k = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        return k if k >= _PREFIX_OVERHEAD else 0

    def _decode_step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                     state: _CascadeState | None) -> torch.Tensor:
        """Feed ``ids`` (B, q) on the cache; ``mask`` (B, K) marks the real keys among all K cached
        ones. With ``state`` the shared prefix's keys/values are attended through the cascade."""
        if state is None:
            return self.extend(cache, input_ids=ids, attention_mask=mask,
                               position_ids=positions).last_hidden_state[:, -1]
        q, K = ids.shape[1], mask.shape[1]
        causal = torch.ones(q, K, dtype=torch.bool, device=self.device).tril(K - q)
        own = torch.zeros(q, K, dtype=torch.bool, device=self.device)
        own[torch.arange(q), torch.arange(K - q, K)] = True  # a padding query sees itself: no empty softmax
        allowed = (causal & mask.bool()[:, None, :]) | own
        state.mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device)[:, None]
        state.mask.masked_fill_(~allowed[:, None], float("-inf"))
        with self._cascade():
            out = self.extend(cache, input_ids=ids, position_ids=positions, prefsteer_cascade=state)
        return out.last_hidden_state[:, -1]

    def _decode_batch(self, prompts: list[list[int]], config: GenerationConfig, guide: Guide | None,
                      gen: torch.Generator | None) -> list[tuple[list[int], str]]:
        """Left-padded prefill, then one token per step. A prefix that every prompt shares (Base's
        history in the system prompt) is run once and attended through the cascade, stored once for
        the whole batch instead of once per row and copied at every step."""
        from transformers import DynamicCache

        B, T = len(prompts), max(len(p) for p in prompts)
        P = self._shared_prefix(prompts)
        state = _CascadeState(self._prefix_kv(prompts[0][:P])[0], None) if P else None
        ids, _ = left_pad(prompts, self.pad_id)  # what the guide sees: the whole prompts
        ids = ids.to(self.device)
        feed, mask = left_pad([p[P:] for p in prompts], self.pad_id)
        feed, mask = feed.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + P
        cache = DynamicCache(config=self.config)
        hidden = self._decode_step(feed, mask, positions, cache, state)
        last_pos = positions[:, -1:]
        new = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        steps = min(config.max_new_tokens, self.max_context - T)
        for step in range(steps):
            logits = self.lm_head(hidden).float()  # (B, V)
            if guide is not None:
                logits = guide(hidden.float(), logits, ids)
            tok = sample_next(logits, config, gen).to(self.device)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            is_eos = torch.isin(tok, eos) & ~done
            for b, (t, finished) in enumerate(zip(tok.tolist(), (done | is_eos).tolist())):
                if not finished:
                    new[b].append(t)
            done = done | is_eos
            if bool(done.all()) or step == steps - 1:
                break
            ids = torch.cat([ids, tok[:, None]], 1)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], 1)
            last_pos = last_pos + 1
            hidden = self._decode_step(tok[:, None], mask, last_pos, cache, state)
        return [(n, self.tokenizer.decode(n, skip_special_tokens=True)) for n in new]
