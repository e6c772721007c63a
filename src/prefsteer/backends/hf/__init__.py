"""The transformers backend: any causal LM with a chat template, on CPU or GPU.

Scoring is where EXACT spends its time: one call holds one prompt rendered under many attribute
sets, each with two responses, so the rows share a long token prefix and differ only in their last
~60 tokens. `TransformersBackend.score` therefore

1. groups the contexts by their longest common token prefix (a small dynamic program over the
   sorted contexts picks the grouping that feeds the fewest tokens through the model: `planner`),
2. runs each group's prefix once, at batch 1, and keeps its keys and values; the last few prefixes
   are kept between calls, so the next greedy step of the same prompt (whose prefix starts with
   the same tokens) computes only the tokens past the longest match (`scoring.PrefixMemo`),
3. packs each context's remainder and all its continuations into one row (a tree mask lets every
   continuation see the context but not its siblings) and runs these rows in right-padded batches
   with a cascade attention: all queries attend to the prefix's keys/values, stored once for the
   whole batch, and to their own row, the two softmaxes merged exactly by their log-sum-exps
   (`attention`),
4. applies the output layer only at the positions that predict a continuation token, 128 positions
   at a time, each block reduced at once to its targets' log-probabilities (logit - logsumexp).

``matmul_precision="medium"`` runs the float32 model's matrix products under torch's "medium"
float32 precision, set once for the process when the backend loads. On this project's
AVX512-BF16 CPU that scores 1.6x faster and moves EXACT's objectives by under 4e-4 nats;
elsewhere "medium" may be plain bfloat16, so ``benchmarks/precision.py --low matmul-medium`` is the
check. The setting is part of the fingerprint.

``share_prefix=False, restrict_logits=False, batch_size=1`` gives the naive path (one full forward
with full logits per request), which the tests and ``benchmarks/scoring.py`` compare against.

Generation uses the backend's own decode loop (`decode`: left-padded prefill, then one token per
step on the key/value cache) because guided decoding needs the last hidden state at every step. A
prefix that all prompts of a batch share (Base's serialized history) is run once and attended
through the same cascade, so its keys and values are neither recomputed nor stored, nor copied at
each step, per row.

Serving (``stream``) decodes concurrent requests together: the `Scheduler` of
`prefsteer.backends.scheduler` owns the model for them and `batch.KVBatch` keeps their rows on one
key/value cache that rows join (prefilled between steps, after the head they share with a prompt
kept in the prefix memo: prefix caching) and leave, each with its own guide and sampling settings;
a request's greedy tokens are those of ``generate``.

On a CPU generation (the prefill and the decode steps) multiplies by a oneDNN-packed copy of every
linear layer's weight (`packing`): a step of a few rows costs little more than a step of one, and
a prefill 15-30% less than through MKL. The decode steps run on a key/value cache that appends
into spare room (`kvcache`). Scoring keeps the plain products.
``pack_weights`` says whether to pack (default: on a CPU, for models of up to 2B parameters, as
the packed copies take the weights' memory again).

Modules: `backend` (the class, identity, tokenization, threads), `attention`, `planner`,
`scoring`, `decode`, `batch` (the streamed rows), `kvcache`, `packing`, `adapter` (LoRA), `lock`;
loading and casting helpers live in `prefsteer.backends.loading`.

    >>> from prefsteer.backends.hf import TransformersBackend
    >>> backend = TransformersBackend(dtype="float32")
"""

from prefsteer.backends.hf.attention import attend
from prefsteer.backends.hf.backend import TransformersBackend
from prefsteer.backends.hf.planner import balanced_batches, left_pad, plan_groups, shared_prefix

__all__ = ["TransformersBackend", "attend", "balanced_batches", "left_pad",
           "plan_groups", "shared_prefix"]
