"""`TransformersBackend`: the `base.Backend` contract on any causal LM with a chat template.

It ties the package's parts together: loading and casting (`prefsteer.backends.loading`), identity
and tokenization (here), the scoring engine (`scoring`, planned by `planner`, attending through
`attention`'s cascade), the decode loop and lock-step sessions (`decode`) and the LoRA adapter
(`adapter`).

Threads: one backend serves concurrent calls. What is process-wide in torch or transformers is
set once, when the backend loads: the float32 matrix-product precision (``matmul_precision``: a
second backend in the same process that asks for another precision is refused, as its numbers
would silently change the first one's), the thread count (``threads``), and the attention
implementation (the cascade, registered once, which falls back to the model's own sdpa attention
when a forward passes no cascade state). Per-call members are safe under threads: ``last_stats``
is per thread, the cumulative ``stats``, the prefix memo, the context cache and the cast copies are
locked. An adapter block changes the shared model, so it holds the model lock exclusively while
every call that runs the model holds it shared (`lock.ModelLock`): no call of another thread ever
sees the adapter's weights, and an adapter waits for running calls to finish.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import Any, Sequence

import torch

from prefsteer.backends.base import (MATMUL_PRECISIONS, OPERATIONS, AdapterSpec, Generation, GenerationConfig,
                                     Guide, Messages, Score, ScoreRequest, local_guide)
from prefsteer.backends.hf import attention, decode, packing, planner, scoring
from prefsteer.backends.hf.batch import PREFILL_OVERHEAD, PREFILL_OVERHEAD_ACCELERATOR, KVBatch
from prefsteer.backends.hf.lock import ModelLock
from prefsteer.backends.scheduler import ScheduledStreaming
from prefsteer.backends.sampling import seeded_generator
from prefsteer.backends.tokenization import ChatTokenization, end_of_turn_ids
from prefsteer.errors import InputError

log = logging.getLogger(__name__)

# config fields that identify an architecture; loader-specific fields (name, versions) are left out
_ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling",
                "rms_norm_eps", "tie_word_embeddings", "hidden_act", "sliding_window")

_PROCESS_LOCK = threading.Lock()
_PROCESS_PRECISION: list[str] = []  # the matmul precision this process's backends fixed at load


def fix_matmul_precision(precision: str) -> None:
    """Set torch's process-wide float32 matrix-product precision once for all of this process's
    backends; a later backend asking for another one is refused (a clear error, not a silent change
    of the first backend's numbers)."""
    with _PROCESS_LOCK:
        if not _PROCESS_PRECISION:
            torch.set_float32_matmul_precision(precision)
            _PROCESS_PRECISION.append(precision)
        elif _PROCESS_PRECISION[0] != precision:
            raise InputError(f"`matmul_precision` '{precision}' differs from the '{_PROCESS_PRECISION[0]}' this "
                             f"process's backends were loaded with: torch's setting is process-wide, so run a "
                             f"backend in another precision in another process", field="matmul_precision")
        elif torch.get_float32_matmul_precision() != precision:  # changed behind our back
            log.warning("torch's float32 matmul precision was changed to '%s' outside prefsteer; "
                        "setting it back to '%s'", torch.get_float32_matmul_precision(), precision)
            torch.set_float32_matmul_precision(precision)


class TransformersBackend(ScheduledStreaming, ChatTokenization):
    name = "hf"
    capabilities = frozenset(OPERATIONS) - {"guide_branches"}  # Drift decodes through start_decoding

    def __init__(self, model: str | None = None, device: str | None = None, dtype: Any = None,
                 batch_size: int = 32, threads: int | None = None, cache_dir: str | None = None,
                 share_prefix: bool = True, restrict_logits: bool = True,
                 matmul_precision: str | None = None, max_batch_rows: int | None = None,
                 max_waiting: int | None = None, pack_weights: bool | None = None, **_: Any):
        from prefsteer.backends.loading import load_model

        if batch_size < 1:
            raise ValueError(f"`batch_size` (={batch_size}) has to be at least 1")
        self.matmul_precision = matmul_precision or "highest"
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise InputError(f"`matmul_precision` '{matmul_precision}' is none of {', '.join(MATMUL_PRECISIONS)}",
                             field="matmul_precision")
        fix_matmul_precision(self.matmul_precision)
        if threads:
            torch.set_num_threads(int(threads))  # process-wide: at load, never per call
        self.batch_size, self.share_prefix, self.restrict_logits = batch_size, share_prefix, restrict_logits
        start = time.perf_counter()
        self.model, self.tokenizer, self.source = load_model(model, device, dtype, cache_dir)
        self.load_seconds = time.perf_counter() - start
        self.device = next(self.model.parameters()).device
        # what a prefill forward costs beyond its tokens, in tokens' worth: the scheduler prefills
        # joining prompts whose lengths differ by more apart (`scheduler.length_groups`)
        self.prefill_overhead = PREFILL_OVERHEAD.get(self.device.type, PREFILL_OVERHEAD_ACCELERATOR)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"the model '{self.source['model']}' has no chat template; prefsteer needs "
                             "an instruction-tuned model", field="model")
        self.attn_implementation = attention.install(self.model)
        if pack_weights is None:  # packed copies double the weights' memory: by default for small models on a CPU
            pack_weights = self.device.type == "cpu" and \
                sum(p.numel() for p in self.model.parameters()) <= packing.AUTO_MAX_PARAMETERS
        self.packed_linears = packing.pack_linears(self.model) if pack_weights else 0
        self._bind_model()
        # transformers 5.x renames the decoder's `past_key_values` argument to `cache` (the old name
        # goes in 5.40): pass whichever this version takes
        params = inspect.signature(self.body.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        gc = getattr(self.model, "generation_config", None)
        self.eos_ids = end_of_turn_ids(self.tokenizer, gc.eos_token_id if gc is not None else None)
        self._init_state()
        self.set_stream_limits(max_batch_rows, max_waiting)

    def _bind_model(self) -> None:
        self.config = self.model.config
        self.body = self.model.model           # the decoder without the output layer
        self.lm_head = self.model.get_output_embeddings()

    def _init_state(self) -> None:
        """The per-backend mutable state, each part with its lock (a cast copy gets its own)."""
        self._lock = ModelLock()
        self._scheduler = None  # `stream`'s, built at its first request (a cast copy has its own)
        self._init_tokenization()
        self._prefix_memo = scoring.PrefixMemo()  # scoring's prefixes
        # streamed prompts' (`batch.KVBatch`): their own, so that scores never depend on the traffic
        self._stream_memo = scoring.PrefixMemo()
        self._casts: dict[torch.dtype, TransformersBackend] = {}  # see `cast`
        self._casts_lock = threading.Lock()
        self._fingerprint: str | None = None
        self._weights_id: str | None = None
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        self.stats: dict[str, Any] = {}  # cumulative over score / hidden_states calls, all threads

    @property
    def last_stats(self) -> dict[str, Any]:
        """The statistics of this thread's last score / hidden_states call."""
        return getattr(self._local, "last_stats", {})

    @last_stats.setter
    def last_stats(self, value: dict[str, Any]) -> None:
        self._local.last_stats = value

    def cast(self, dtype: Any) -> "TransformersBackend":
        """The same model in another precision, as a second backend: the weights are copied and
        cast, the tokenizer is shared. Its fingerprint differs, so caches never mix the two. One
        copy per precision is made and kept, so every method that asks shares it."""
        import copy

        from prefsteer.backends.loading import _default_dtype, warn_if_emulated

        dtype = _default_dtype(str(self.device), dtype)
        if dtype == self.model.dtype:
            return self
        with self._casts_lock:
            if dtype in self._casts:
                return self._casts[dtype]
            warn_if_emulated(self.device, dtype)
            other = copy.copy(self)
            with self._lock.shared("cast"):  # never copy a model that carries an adapter
                other.model = copy.deepcopy(self.model)
            for p in other.model.parameters():  # buffers (rotary frequencies) stay float32, as a load in dtype has them
                p.data = p.data.to(dtype)
            other._bind_model()
            other.source = dict(self.source, dtype=str(dtype).replace("torch.", ""))
            other._init_state()
            self._casts[dtype] = other
            return other

    # -- identity ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            cfg = self.config.to_dict()
            arch = {k: cfg[k] for k in _ARCH_FIELDS if k in cfg}
            h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
            h.update(f"vocab={len(self.tokenizer)};dtype={self.model.dtype}".encode())
            with torch.no_grad(), self._lock.shared("fingerprint"):
                # a sample of the weights: the first values of a few tensors and their sums
                for name, t in self._weight_samples():
                    t = t.detach().flatten()
                    h.update(name.encode())
                    h.update(t[:4096].float().cpu().numpy().tobytes())
                    h.update(f"{t.double().sum().item():.6e}".encode())
            fp = f"hf:{h.hexdigest()[:32]}"
            if self.matmul_precision != "highest":  # other numbers, however close: caches keep them apart
                fp += f":matmul-{self.matmul_precision}"
            self._fingerprint = fp
        return self._fingerprint

    def _weight_samples(self) -> list[tuple[str, torch.Tensor]]:
        """The first, middle and last of the model's parameters by name: what identities sample."""
        params = dict(self.model.named_parameters())
        names = sorted(params)
        return [(name, params[name]) for name in sorted({names[0], names[len(names) // 2], names[-1]})]

    @property
    def weights_id(self) -> str:
        """The weights' identity whatever their precision (`prefsteer.backends.loading.weights_identity`):
        the same for this model in float32 and in bfloat16, where the fingerprints differ."""
        if self._weights_id is None:
            from prefsteer.backends.loading import weights_identity

            cfg = self.config.to_dict()
            with torch.no_grad(), self._lock.shared("fingerprint"):
                self._weights_id = weights_identity({k: cfg[k] for k in _ARCH_FIELDS if k in cfg}, len(self.tokenizer),
                                                    self._weight_samples())
        return self._weights_id

    @property
    def max_context(self) -> int:
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if n else int(getattr(self.tokenizer, "model_max_length", 2048))

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"backend": self.name, "fingerprint": self.fingerprint, "template_id": self.template_id,
                "model": self.source["model"], "path": self.source["path"], "device": str(self.device),
                "dtype": str(self.model.dtype).replace("torch.", ""), "parameters": n_params,
                "vocab_size": len(self.tokenizer), "max_context": self.max_context,
                "batch_size": self.batch_size, "threads": torch.get_num_threads(),
                "matmul_precision": self.matmul_precision, "packed_linears": self.packed_linears,
                "load_seconds": round(self.load_seconds, 2)}

    # -- tokenization: `ChatTokenization` (encode_context, encode_continuation, decode_tokens,
    # eos_token_ids, eos_text, count_tokens), shared with the vLLM backend -----------------------
    # -- the model's parts, for the package's engine modules --------------------------------------
    def extend(self, cache, **inputs):
        """The decoder (no output layer) on ``inputs``, reading and extending the KV ``cache``."""
        return self.body(**inputs, **{self._cache_arg: cache}, use_cache=True)

    def clear_prefix_memo(self) -> None:
        """Forget the prefixes kept between calls, scoring's and streamed prompts' (benchmarks time
        each search from scratch)."""
        self._prefix_memo.clear()
        self._stream_memo.clear()

    def _shared_prefix(self, prompts: list[list[int]]) -> int:
        return planner.shared_prefix(prompts) if self.share_prefix else 0

    # -- the contract -------------------------------------------------------------------------
    def _forward(self, requests, *, want_hidden, progress, share_prefix, restrict_logits, batch_size) -> dict:
        share = self.share_prefix if share_prefix is None else share_prefix
        restrict = self.restrict_logits if restrict_logits is None else restrict_logits
        encoded = self._encode_requests(requests)
        with self._lock.shared("hidden_states" if want_hidden else "score"):
            results, stats = scoring.forward_requests(self, encoded, want_hidden=want_hidden, progress=progress,
                                                      share=share, restrict=restrict,
                                                      batch_size=batch_size or self.batch_size)
        if stats:
            self.last_stats = stats
            with self._stats_lock:
                for k, v in stats.items():
                    if k != "prefix_groups":
                        self.stats[k] = self.stats.get(k, 0) + v
                self.stats["calls"] = self.stats.get("calls", 0) + 1
        return results

    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False,
              share_prefix: bool | None = None, restrict_logits: bool | None = None,
              batch_size: int | None = None) -> list[Score]:
        res = self._forward(requests, want_hidden=False, progress=progress, share_prefix=share_prefix,
                            restrict_logits=restrict_logits, batch_size=batch_size)
        return [res[i] for i in range(len(requests))]

    def hidden_states(self, requests: Sequence[ScoreRequest], *, progress: bool = False) -> list[torch.Tensor]:
        res = self._forward(requests, want_hidden=True, progress=progress, share_prefix=None,
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
        guide = local_guide(self, guide)
        config = config or GenerationConfig()
        gen = seeded_generator(config, self.device)
        encoded = self._encode_contexts(contexts)
        start = time.perf_counter()
        outs: list[Generation | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
        with self._lock.shared("generate"), torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo: lo + self.batch_size]
                for i, (ids, text) in zip(idx, decode.decode_batch(self, [encoded[i] for i in idx], config, guide, gen)):
                    outs[i] = Generation(text, ids)
        secs = time.perf_counter() - start
        for o in outs:
            o.seconds = secs
        return outs  # type: ignore[return-value]

    def _row_batch(self) -> KVBatch:
        return KVBatch(self)

    def start_decoding(self, contexts: Sequence[Messages]) -> decode.Rows:
        """Prefill ``contexts`` left-padded on one key/value cache; the session's ``logits()`` are
        every row's next-token logits (R, V, float32) and ``append(tokens)`` feeds one token per row."""
        if not contexts:
            raise ValueError("`contexts` has to hold at least one chat context")
        return decode.Rows(self, self._encode_contexts(contexts))

    def adapter(self, spec: AdapterSpec | None = None, state: dict[str, torch.Tensor] | None = None
                ) -> AbstractContextManager:
        """A LoRA on the model for the duration of the ``with`` block (see `adapter.lora_block`);
        holds the model lock exclusively, so other threads' calls wait for the block to end."""
        from prefsteer.backends.hf.adapter import lora_block

        return lora_block(self, spec or AdapterSpec(), state)
