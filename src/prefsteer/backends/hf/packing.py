"""Packed weights for generation's matrix products on a CPU (oneDNN).

A decoding step multiplies every weight matrix of the model by a few rows, one per sequence being
decoded, so it is bound by reading the weights, and more rows should cost little more. On this
project's 2-core AMD machine (AVX2) MKL's products of a few rows are slow: a whole step of the
embedded model took 142 ms for 4 rows against 94 for one. oneDNN, given the weights once
reordered into its own blocked layout ("packed", as torch.compile's CPU backend and Intel's
extension do), took 89 ms for 4 rows and 86 for one (results/serving/decode-step.md).

`pack_linears` puts a `PackedLinear` in place of each of a model's `nn.Linear` layers. It is an
`nn.Linear` with the same parameters (the state dict, tied weights and peft's targeting are
unchanged) that keeps a packed copy of its weight and multiplies by it only

* inside `decoding()`, which generation enters (the decode loops, the scheduler's steps, and the
  prefill of what they decode, where oneDNN was 15-30% faster than MKL here too): scoring keeps
  MKL's products, so EXACT's scores and their prefix memo are exactly as before;
* with gradients off (a LoRA being trained goes through the plain product);
* on float32 weights that have not changed since they were packed (a changed weight is packed
  again at its next use; a copy of the module, as `TransformersBackend.cast` makes, packs anew).

A weight is packed at the first generation that needs it. The packed copies take as much memory
as the weights: the backend packs on a CPU for models of up to `AUTO_MAX_PARAMETERS` parameters
unless told otherwise (``pack_weights``).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

AUTO_MAX_PARAMETERS = 2_000_000_000  # 8 GB more in float32
_STATE = threading.local()           # .decoding: this thread is in a decode step


@contextmanager
def decoding() -> Iterator[None]:
    """Let this thread's forwards multiply by the packed weights (see the module's docstring)."""
    before = getattr(_STATE, "decoding", False)
    _STATE.decoding = True
    try:
        yield
    finally:
        _STATE.decoding = before


class _Pack:
    """A packed weight and the version of the weight it was made from; never copied, so a copy of
    the module packs its own weight at its first use."""

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.made_from: tuple | None = None
        self.failed = False  # oneDNN refused this weight: the plain product for good

    def __deepcopy__(self, memo) -> "_Pack":
        return _Pack()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _key(w: torch.Tensor) -> tuple:
    version = None if w.is_inference() else w._version  # an inference tensor keeps no version
    return w.data_ptr(), version, tuple(w.shape), w.dtype, w.device


class PackedLinear(nn.Linear):
    """An `nn.Linear` sharing ``linear``'s parameters, with a oneDNN-packed copy of the weight for
    the products of a decode step."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._pack = _Pack()

    def packed_weight(self) -> torch.Tensor | None:
        """The packed weight, packed now if it was not yet or the weight changed since; None where
        it cannot be used."""
        w, pack = self.weight, self._pack
        if w.dtype != torch.float32 or w.device.type != "cpu" or pack.failed:
            return None
        key = _key(w)
        if pack.made_from != key:
            try:
                with torch.no_grad():
                    tensor = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 4)
            except RuntimeError as e:  # an unusual shape or build
                log.warning("oneDNN could not pack a %s weight (%s); it decodes with the plain product",
                            tuple(w.shape), e)
                pack.failed = True
                return None
            pack.tensor, pack.made_from = tensor, key
        return pack.tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(_STATE, "decoding", False) and not torch.is_grad_enabled() and x.dtype == torch.float32:
            w = self.packed_weight()
            if w is not None:
                return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (a CPU build with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(model: nn.Module) -> int:
    """Put a `PackedLinear` in place of every float32 `nn.Linear` of ``model`` on a CPU; returns
    how many (0 where this torch has no oneDNN packed linear). Each packs its weight at the first
    generation that uses it, so a process that only scores never spends the memory."""
    if not available():
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(m))
    return len(targets)
