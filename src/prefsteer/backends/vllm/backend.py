"""`VLLMBackend`: the `base.Backend` contract on vLLM's offline Python API (``vllm.LLM``).

The design, its costs and what is and is not supported: the package's docstring
(`prefsteer.backends.vllm`). The checkpoint helpers (`vllm_safe_dir`, `hf_fingerprint`,
`resolve_checkpoint`) are here too.

The constructor builds vLLM's engine and starts its engine loop (`loop.EngineLoop`, one thread that
alone adds requests to ``self.llm.llm_engine``, steps it and routes its outputs): ``score``'s
prompt-log-probability requests and ``generate``'s contexts go to it as blocking batches
(`EngineLoop.run`, final outputs), ``stream``'s request as a streamed one (`EngineLoop.submit_stream`,
DELTA outputs pushed to a `TokenStream`), so requests of concurrent callers are decoded together.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

from prefsteer.backends.base import (Generation, GenerationConfig, Guide, Messages, Score, ScoreRequest,
                                     UnsupportedOperation)
from prefsteer.backends.guides import kind_of
from prefsteer.backends.streaming import DEFAULT_MAX_WAITING, ContextTooLong, TokenStream
from prefsteer.backends.tokenization import ChatTokenization, end_of_turn_ids
from prefsteer.backends.vllm.loop import EngineLoop
from prefsteer.backends.vllm.side import GUIDE_KEY
from prefsteer.errors import InputError

log = logging.getLogger(__name__)

# the same config fields as the hf backend's fingerprint (prefsteer.backends.hf.backend._ARCH_FIELDS)
_ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling",
                "rms_norm_eps", "tie_word_embeddings", "hidden_act", "sliding_window")
_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"
_EMBED_FILE = "prefsteer-embed-tokens.safetensors"


# -- the checkpoint ---------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(p for p in path.glob("*.safetensors") if p.name != _EMBED_FILE)


def _tensor_index(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                where[k] = f
    return where


def _get_tensor(where: dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as st:
        return st.get_tensor(name)


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def vllm_safe_dir(path: str | os.PathLike) -> Path:
    """A folder vLLM loads ``path``'s checkpoint from correctly.

    The safetensors cache the hf backend writes of a GGUF model stores a tied embedding matrix only
    as ``lm_head.weight``; vLLM's Llama loader skips that name when embeddings are tied and then runs
    with a zero embedding matrix, without any error (../shared/VLLM.md). Such a checkpoint gets a
    sibling folder ``<name>-vllm`` of symbolic links to its files plus one small file holding the same
    matrix as ``model.embed_tokens.weight`` (written once, atomically). Any other checkpoint is used
    as it is.
    """
    path = Path(path).resolve()
    config = json.loads((path / "config.json").read_text())
    where = _tensor_index(path)
    if not _tied(config) or _EMBED in where or _LM_HEAD not in where:
        return path
    target = path.parent / f"{path.name}-vllm"
    if (target / _EMBED_FILE).is_file():
        return target
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=path.parent))
    try:
        for f in path.iterdir():
            if f.is_file():
                (tmp / f.name).symlink_to(f)
        emb = _get_tensor(where, _LM_HEAD).contiguous()
        save_file({_EMBED: emb}, str(tmp / _EMBED_FILE), metadata={"format": "pt"})
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote it first
            if not (target / _EMBED_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %s's tied embedding matrix as %s, for vLLM", target, path.name, _EMBED)
    return target


def hf_fingerprint(path: str | os.PathLike, dtype: str = "float32", vocab_size: int | None = None) -> str:
    """The hf backend's fingerprint of the checkpoint in ``path`` loaded in ``dtype``, computed from
    the files (the same config fields, the same weight samples), without loading the model.

    The hf backend hashes the first, middle and last of its model's sorted parameter names; a tied
    output matrix is not a parameter of its own there, so ``lm_head.weight`` is left out when the
    embeddings are tied, and ``model.embed_tokens.weight`` is the matrix stored under either name.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    cfg = AutoConfig.from_pretrained(str(path)).to_dict()
    arch = {k: cfg[k] for k in _ARCH_FIELDS if k in cfg}
    if vocab_size is None:
        vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    h.update(f"vocab={vocab_size};dtype={tdtype}".encode())
    where = _tensor_index(path)
    source = dict((k, k) for k in where)
    if _tied(cfg):
        if _EMBED not in source and _LM_HEAD in source:
            source[_EMBED] = _LM_HEAD
        source.pop(_LM_HEAD, None)
    names = sorted(source)
    for name in sorted({names[0], names[len(names) // 2], names[-1]}):
        t = _get_tensor(where, source[name]).to(tdtype).flatten()
        h.update(name.encode())
        h.update(t[:4096].float().numpy().tobytes())
        h.update(f"{t.double().sum().item():.6e}".encode())
    return f"hf:{h.hexdigest()[:32]}"


def resolve_checkpoint(model: str | None, cache_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(folder or hub name, source)`` of ``model``: the embedded default (converted from GGUF into
    the shared safetensors cache, as the hf backend does), a ``.gguf`` file, a folder or a hub name."""
    from prefsteer.backends.loading import DEFAULT_MODEL, _convert_gguf, default_cache_root, gguf_identity, resolve_model

    local, gguf_file = resolve_model(model)
    source: dict[str, Any] = {"model": model or DEFAULT_MODEL, "path": local}
    if gguf_file is not None:
        ident = gguf_identity(local, gguf_file)
        target = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / ident
        if not (target / "model.safetensors").is_file():
            _convert_gguf(local, gguf_file, target)
        source.update(path=str(target), gguf_file=str(Path(local) / gguf_file), gguf_id=ident)
        local = str(target)
    return local, source


def _has_guidance(processors) -> bool:
    from prefsteer.backends.vllm.processor import NAME

    return NAME in list(processors or [])


def _in_spawned_bootstrap() -> bool:
    """True in a spawned child process that is still importing its parent's main module (a script
    that builds the backend at module level, without ``if __name__ == "__main__":``)."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


class VLLMBackend(ChatTokenization):
    name = "vllm"
    # plus "guide" and "guide_branches" with ``guidance``, the companion's operations with ``companion``
    capabilities = frozenset({"score", "generate", "stream", "token_embeddings"})

    def __init__(self, model: str | None = None, dtype: Any = None, cache_dir: str | None = None,
                 gpu_memory_utilization: float | None = None, kv_cache_gib: float | None = None,
                 max_model_len: int | None = None, enforce_eager: bool | None = None,
                 read_prefix_cache: bool = True, seed: int = 0, engine_kwargs: dict | None = None,
                 guidance: bool = True, side_model: str | None = None, companion: bool = True,
                 max_batch_rows: int | None = None, max_waiting: int | None = None, **_: Any):
        if _in_spawned_bootstrap():
            raise RuntimeError("the vLLM backend was built while a spawned process imported its parent's main "
                               "module: build it under `if __name__ == \"__main__\":` (vLLM starts its engine "
                               "in a spawned process, which imports the main module again)")
        # vLLM logs to stdout at INFO by default (in every process it starts), which would mix into
        # `--json` output: its warnings go to stderr unless the caller chose otherwise
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.dtype = str(dtype or ("float32" if on_cpu else "bfloat16")).replace("torch.", "")
        self.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(self.dtype, self.dtype)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"`dtype` '{dtype}' is none of float32, bfloat16, float16", field="dtype")
        self.read_prefix_cache = read_prefix_cache
        local, self.source = resolve_checkpoint(model, cache_dir)
        self.path = Path(local) if Path(local).is_dir() else None
        engine_path = str(vllm_safe_dir(self.path)) if self.path is not None else local
        kw: dict[str, Any] = dict(model=engine_path, dtype=self.dtype, enable_prefix_caching=True, seed=seed)
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib or 2)))
            kw.update(gpu_memory_utilization=gpu_memory_utilization or 0.4,
                      enforce_eager=True if enforce_eager is None else enforce_eager)
        else:
            if gpu_memory_utilization:
                kw["gpu_memory_utilization"] = gpu_memory_utilization
            if enforce_eager is not None:
                kw["enforce_eager"] = enforce_eager
        if max_model_len:
            kw["max_model_len"] = max_model_len
        if max_batch_rows:  # the streamed requests decoded at once bound vLLM's batch
            kw["max_num_seqs"] = int(max_batch_rows)
        # guided decoding (CLIPer): a V1-interface logits processor holding the side model; the V1
        # model runner is the one that takes it (the package docstring)
        if guidance and os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("0", "false"):
            from prefsteer.backends.vllm.processor import NAME

            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            kw["logits_processors"] = [NAME]
        elif guidance:
            log.warning("VLLM_USE_V2_MODEL_RUNNER is set: vLLM's V2 runner does not take prefsteer's "
                        "guidance processor, so guided decoding (CLIPer) is off")
        kw.update(engine_kwargs or {})
        start = time.perf_counter()
        self.llm = LLM(**kw)
        self.load_seconds = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"the model '{self.source['model']}' has no chat template; prefsteer needs "
                             "an instruction-tuned model", field="model")
        self.config = self.llm.llm_engine.model_config.hf_config
        self.source.update(engine_path=engine_path, dtype=self.dtype,
                           device="cpu" if on_cpu else str(current_platform.device_name))
        self.eos_ids = end_of_turn_ids(self.tokenizer, self._generation_eos(engine_path))
        self.guidance = "logits_processors" in kw and _has_guidance(kw["logits_processors"])
        if self.guidance:
            self.capabilities = frozenset(type(self).capabilities | {"guide", "guide_branches"})
        # the side model guidance runs beside vLLM's: by default vLLM's own checkpoint
        self._model_arg = model
        self.side_spec = {"model": side_model if side_model is not None else model, "dtype": self.dtype,
                          "cache_dir": cache_dir}
        self._side_fingerprint: str | None = None
        # hidden states, adapters and casts: the hf backend on the same checkpoint, in this process
        self.companion_enabled = companion
        if companion:
            self.capabilities = frozenset(self.capabilities | {"hidden_states", "adapter", "cast"})
        self._companion = None
        self._companion_lock = threading.Lock()
        self._init_tokenization()
        # every use of vLLM's engine goes through this thread (loop.py): nothing calls LLM.generate
        self.engine_rows = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        self.engine_loop = EngineLoop(self.llm.llm_engine, self._render, eos_ids=sorted(self.eos_ids),
                                      max_rows=max_batch_rows or self.engine_rows,
                                      max_waiting=DEFAULT_MAX_WAITING if max_waiting is None else max_waiting)
        self._fingerprint: str | None = None
        self.stats: dict[str, Any] = {}
        self.last_stats: dict[str, Any] = {}
        log.info("vLLM engine for %s (%s) started in %.1f s", engine_path, self.dtype, self.load_seconds)
        self._closed = False
        # a script that never calls `close`: stopped before vLLM's own exit handlers (registered
        # earlier, so run later) tear the engine process down under a running loop
        atexit.register(_close_at_exit, weakref.ref(self))

    def close(self) -> None:
        """Stop the engine loop (open streams end "cancelled", blocking calls fail), then vLLM's
        engine process and the companion, in that order. Left to interpreter exit, vLLM's engine
        process could be torn down while the loop's thread still waited on it, which aborted the
        process after its work was done ("terminate called without an active exception")."""
        if self._closed:
            return
        self._closed = True
        self.engine_loop.close()
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # already gone (its process died): nothing left to stop
            log.warning("vLLM's engine core did not shut down cleanly: %s", e)
        if self._companion is not None:
            self._companion.close()

    def _generation_eos(self, path: str) -> Any:
        try:
            from transformers import GenerationConfig as HFGenerationConfig

            return HFGenerationConfig.from_pretrained(path).eos_token_id
        except Exception:  # no generation_config.json: the tokenizer's tokens decide
            return None

    # -- identity ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The hf backend's fingerprint of the same weights (see `hf_fingerprint`): the two engines
        agree within 1e-3 nats, so they share score caches and classifier heads. A hub model not in a
        local folder is fingerprinted from vLLM's download."""
        if self._fingerprint is None:
            path = self.path
            if path is None:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(self.source["path"], allow_patterns=["*.json", "*.safetensors"]))
            self._fingerprint = hf_fingerprint(path, self.dtype, len(self.tokenizer))
        return self._fingerprint

    @property
    def max_context(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def info(self) -> dict[str, Any]:
        import vllm

        return {"backend": self.name, "fingerprint": self.fingerprint, "template_id": self.template_id,
                "model": self.source["model"], "path": self.source["path"], "device": self.source["device"],
                "dtype": self.dtype, "vocab_size": len(self.tokenizer), "max_context": self.max_context,
                "engine": f"vllm {vllm.__version__}", "read_prefix_cache": self.read_prefix_cache,
                "load_seconds": round(self.load_seconds, 2),
                "companion": None if self._companion is None else self._companion.source["model"]}

    # -- tokenization: `ChatTokenization`, shared with the hf backend ------------------------------

    # -- the contract -------------------------------------------------------------------------
    def _prompt_logprobs(self, rows: list[tuple[list[int], list[int]]], read_cache: bool) -> list[float | None]:
        """The summed log-probability of each row's continuation, None where a needed position came
        from the prefix cache (and so has no prompt log-probability)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # detokenize=False: the prompt log-probabilities of cached positions are uninitialized memory
        # (token ids such as -1501617728), which vLLM's detokenizer would fail on
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                            skip_reading_prefix_cache=not read_cache, output_kind=RequestOutputKind.FINAL_ONLY)
        prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in rows]
        outs = self.engine_loop.run(prompts, [sp] * len(prompts))
        sums: list[float | None] = []
        for (ctx, cont), out in zip(rows, outs):
            pl = out.prompt_logprobs or []
            # position p's entry is computed from the logits at p - 1; those of the first
            # ``num_cached_tokens`` positions were not computed (their entries are garbage, and one
            # can even carry the right token id by chance): only a continuation after them counts
            if len(ctx) < (out.num_cached_tokens or 0) + 1:
                sums.append(None)
                continue
            total, ok = 0.0, True
            for j, tok in enumerate(cont):
                pos = len(ctx) + j
                entry = pl[pos] if pos < len(pl) else None
                if not entry or tok not in entry:
                    ok = False
                    break
                total += entry[tok].logprob
            sums.append(total if ok else None)
        return sums

    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False,
              read_prefix_cache: bool | None = None, **_: Any) -> list[Score]:
        read = self.read_prefix_cache if read_prefix_cache is None else read_prefix_cache
        rows = self._encode_requests(requests)
        start = time.perf_counter()
        unique: dict[tuple, int] = {}
        todo: list[tuple[list[int], list[int]]] = []
        for ctx, cont in rows:
            key = (tuple(ctx), tuple(cont))
            if cont and key not in unique:
                unique[key] = len(todo)
                todo.append((ctx, cont))
        sums = self._prompt_logprobs(todo, read) if todo else []
        missing = [i for i, s in enumerate(sums) if s is None]
        if missing:  # a continuation's start was served from the cache: score those in full
            again = self._prompt_logprobs([todo[i] for i in missing], False)
            for i, s in zip(missing, again):
                sums[i] = s
        self.last_stats = {"requests": len(rows), "engine_requests": len(todo), "rescored": len(missing),
                           "tokens": sum(len(c) + len(x) for c, x in todo),
                           "seconds": time.perf_counter() - start}
        for k, v in self.last_stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        out = []
        for ctx, cont in rows:
            if not cont:
                out.append(Score(0.0, 0))
            else:
                out.append(Score(float(sums[unique[(tuple(ctx), tuple(cont))]]), len(cont)))
        return out

    def _sampling_params(self, config: GenerationConfig, max_tokens: int, extra_args: dict | None,
                         row: int, stream: bool = False):
        """Row ``row``'s sampling settings: greedy unless ``config.do_sample`` (seeded ``seed + row``),
        the end-of-turn tokens as stop tokens; a streamed request gets each step's new tokens (DELTA),
        a blocking one its final output."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        common = dict(max_tokens=max_tokens, min_tokens=min(config.min_new_tokens, max_tokens),
                      stop_token_ids=sorted(self.eos_ids), skip_special_tokens=True,
                      detokenize=False, extra_args=extra_args, output_kind=kind)
        if config.do_sample:
            return SamplingParams(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                  seed=None if config.seed is None else config.seed + row, **common)
        return SamplingParams(temperature=0.0, **common)

    def _render(self, prompt: Any) -> Any:
        """What ``LLMEngine.add_request`` takes for a token-id prompt, rendered as ``LLM.generate`` does
        (on the engine loop's thread); the prompt itself where this vLLM has no such step."""
        preprocess = getattr(self.llm, "_preprocess_cmpl_one", None)
        return preprocess(prompt) if callable(preprocess) else prompt

    def generate(self, contexts: Sequence[Messages], config: GenerationConfig | None = None, *,
                 guide: Guide | None = None) -> list[Generation]:
        """Decode each context (greedy unless ``config.do_sample``); all of them go to the engine loop
        together and are decoded with whatever else it runs. A row stops at an end-of-turn token, which
        is not part of the returned text or ids."""
        from vllm.inputs import TokensPrompt

        config = config or GenerationConfig()
        extras = self._guide_args(guide, len(contexts))
        encoded = self._encode_contexts(contexts)
        max_tokens = [min(config.max_new_tokens, self.max_context - len(ids)) for ids in encoded]
        params = [self._sampling_params(config, mt, extras[i], i) for i, mt in enumerate(max_tokens)]
        start = time.perf_counter()
        outs = self.engine_loop.run([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params)
        secs = time.perf_counter() - start
        gens = []
        for out in outs:
            ids = [int(t) for t in out.outputs[0].token_ids]
            while ids and ids[-1] in self.eos_ids:
                ids.pop()
            gens.append(Generation(self.decode_tokens(ids), ids, secs))
        return gens

    def stream(self, context: Messages, config: GenerationConfig | None = None, *,
               guide: Any = None) -> TokenStream:
        """Decode ``context`` among every other request of the engine loop; its new token ids arrive
        on the returned stream as vLLM decodes them (end-of-turn tokens left out). ``guide``: None,
        CLIPer's guide (anything with ``describe``) or a `DriftGuide` of one row, as in `generate`.
        `EngineBusy` when ``max_rows + max_waiting`` streamed requests are held (`set_stream_limits`)."""
        from vllm.inputs import TokensPrompt

        from prefsteer.backends.guides.drift import DriftGuide

        config = config or GenerationConfig()
        if isinstance(guide, DriftGuide) and len(guide.rows) != 1:
            raise ValueError(f"a streamed request takes a Drift guide of one row, not {len(guide.rows)}")
        extra = self._guide_args(guide, 1)[0]
        ids = self.encode_context(context)
        max_tokens = min(config.max_new_tokens, self.max_context - len(ids))
        if max_tokens < 1:
            raise ContextTooLong(len(ids), self.max_context)
        params = self._sampling_params(config, max_tokens, extra, 0, stream=True)
        return self.engine_loop.submit_stream(TokensPrompt(prompt_token_ids=ids), params)

    def stream_stats(self) -> dict[str, int]:
        """Requests in vLLM's engine (streamed or not) and waiting in the engine loop for a place."""
        s = self.engine_loop.stats()
        return {"running": s["running"], "waiting": s["queued"]}

    def set_stream_limits(self, max_rows: int | None = None, max_waiting: int | None = None) -> None:
        """Bound the streamed requests vLLM decodes at once (``max_rows``) and those waiting in the
        engine loop for a place (``max_waiting``); past both, `stream` raises `EngineBusy`. The engine
        is built by the constructor, where ``max_batch_rows`` also becomes vLLM's ``max_num_seqs``;
        here the loop enforces the bound (vLLM never runs more than its ``max_num_seqs`` anyway)."""
        self.engine_loop.set_limits(max_rows, max_waiting)
        if max_rows is not None and int(max_rows) > self.engine_rows:
            log.info("vLLM decodes at most %d requests at once (its max_num_seqs), fewer than max_rows=%d: "
                     "build the backend with max_batch_rows=%d to raise it", self.engine_rows, max_rows, max_rows)

    def engine_stats(self) -> dict[str, Any]:
        """The engine loop's counters: requests in the engine, streams waiting, steps, the most
        requests in the engine at one step (``peak_running``)."""
        return {**self.engine_loop.stats(), "engine_rows": self.engine_rows}

    # -- guided decoding ---------------------------------------------------------------------
    def _guide_args(self, guide: Any, n: int) -> list[dict | None]:
        """Each request's ``extra_args``: the guide's description, with its own entry of ``rows``
        for a guide that describes one per context (Drift's branches)."""
        if guide is None:
            return [None] * n
        desc = self.guide_description(guide)
        rows = desc.pop("rows", None)
        if rows is None:
            return [{GUIDE_KEY: desc}] * n
        if len(rows) != n:
            raise ValueError(f"the guide describes {len(rows)} rows for {n} contexts")
        return [{GUIDE_KEY: {**desc, **row}} for row in rows]

    @property
    def side_fingerprint(self) -> str:
        """The fingerprint of the side model guidance runs on (the hf backend's, from its files),
        which a guide's heads have to be trained for."""
        if self._side_fingerprint is None:
            if self.side_spec["model"] == self._model_arg:  # vLLM's own checkpoint
                self._side_fingerprint = self.fingerprint
            else:
                from transformers import AutoTokenizer

                local, _ = resolve_checkpoint(self.side_spec["model"], self.side_spec["cache_dir"])
                tok = AutoTokenizer.from_pretrained(local)
                if tok.get_vocab() != self.tokenizer.get_vocab():
                    raise InputError(f"the side model '{self.side_spec['model']}' has another tokenizer than "
                                     f"'{self.source['model']}': guidance reads vLLM's token ids, so the "
                                     "two need the same vocabulary", field="side_model")
                self._side_fingerprint = hf_fingerprint(local, self.dtype, len(tok))
        return self._side_fingerprint

    def guide_description(self, guide: Any) -> dict[str, Any]:
        """The data vLLM's engine process rebuilds ``guide`` from: its own description plus the side
        model. A guide that cannot describe itself (a Python callable: it lives in this process, the
        logits are in vLLM's) is refused, as is one whose heads were trained for another model."""
        describe = getattr(guide, "describe", None)
        if not callable(describe):
            raise UnsupportedOperation(self.name, "guide (a Python callable; only a guide that describes "
                                       "itself as data, such as CLIPer's, reaches vLLM's engine)",
                                       "guided generation")
        if "guide" not in self.capabilities:
            raise UnsupportedOperation(self.name, "guide (this engine was built with guidance off)",
                                       "guided generation")
        desc = dict(describe())
        if desc.get("fingerprint") != self.side_fingerprint:
            side = f"the side model that guides vLLM here ('{self.side_spec['model'] or self.source['model']}')"
            raise InputError(kind_of(desc).mismatch.format(fingerprint=desc.get("fingerprint"), side=side,
                                                           side_fingerprint=self.side_fingerprint), field="guide")
        desc["side"] = dict(self.side_spec)
        return desc

    def token_embeddings(self):
        """The input embedding matrix (V, d), read from the checkpoint (vLLM's copy is in its worker)."""
        import torch

        if self.path is None:
            raise UnsupportedOperation(self.name, "token_embeddings (of a model not in a local folder)")
        where = _tensor_index(self.path)
        name = _EMBED if _EMBED in where else _LM_HEAD
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        return _get_tensor(where, name).to(dt)

    # -- what vLLM's engine does not offer: the companion ----------------------------------------
    def companion(self, operation: str, needed_by: str):
        """The hf backend on vLLM's checkpoint, in this process, loaded at the first call that needs
        it (``hidden_states``, ``adapter``, ``cast``): vLLM's engine gives neither hidden states nor
        gradients. Its fingerprint is this backend's (the same weights), so classifier heads trained
        on its hidden states guide vLLM's decoding, whose side model is the same hf model."""
        if not self.companion_enabled:
            raise UnsupportedOperation(self.name, f"{operation} (this engine was built with companion=False)",
                                       needed_by)
        if self._companion is None:
            with self._companion_lock:
                if self._companion is None:
                    from prefsteer.backends.hf import TransformersBackend

                    b = TransformersBackend(model=self._model_arg, dtype=self.dtype,
                                            cache_dir=self.side_spec["cache_dir"])
                    log.info("vLLM backend: the hf companion for %s loaded in %.1f s", operation, b.load_seconds)
                    self._companion = b
        return self._companion

    def hidden_states(self, requests: Sequence[ScoreRequest], **kw: Any):
        """Last-layer hidden states at the continuation's positions, from the companion."""
        return self.companion("hidden_states", "a classifier head").hidden_states(requests, **kw)

    def start_decoding(self, contexts: Sequence[Messages]):
        raise UnsupportedOperation(self.name, "start_decoding (Drift decodes here through `guide_branches`)",
                                   "lock-step decoding")

    def adapter(self, spec=None, state=None):
        """A LoRA on the companion (Reward's per-user reward model): vLLM's engine does not train.
        vLLM's own model, and so ``score`` and ``generate``, are untouched by the block."""
        return self.companion("adapter", "a low-rank adapter").adapter(spec, state)

    def cast(self, dtype: Any):
        """This backend for its own precision; the companion in another (EXACT's screen), with that
        precision's fingerprint."""
        if str(dtype).replace("torch.", "") == self.dtype:
            return self
        return self.companion("cast", "another precision").cast(dtype)


def _close_at_exit(ref: "weakref.ref[VLLMBackend]") -> None:
    backend = ref()
    if backend is not None:
        backend.close()
