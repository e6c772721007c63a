"""`GuidanceLogitsProcessor`: prefsteer's guided decoding inside vLLM's engine (V1 interface).

vLLM builds one instance per engine, in its engine process, from the name
``prefsteer.backends.vllm.processor:GuidanceLogitsProcessor`` given to ``LLM(logits_processors=...)``.
A request is guided when its ``SamplingParams.extra_args["prefsteer_guide"]`` holds a guide
description (`CliperGuide.describe`, or one row of `DriftGuide.describe`, plus the side model's
``{"model", "dtype"}``); the others pass through untouched. The work is `side.GuidedRequests`'; this class only follows vLLM's persistent
batch (requests added, removed and moved between rows; each added request comes with its prompt ids
and a live reference to its output ids) and loads the side model, once, the first time a guided
request arrives.

This is the interface of vLLM's V1 model runner (``vllm.v1.sample.logits_processor``), the one the
CPU build runs (its V2 runner needs Triton's CPU backend); `VLLMBackend` selects the V1 runner when
it registers this processor (``VLLM_USE_V2_MODEL_RUNNER=0``), as V2 takes processors of another
interface.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from prefsteer.backends.vllm.side import GUIDE_KEY, GuidedRequests, check_description

log = logging.getLogger(__name__)

NAME = "prefsteer.backends.vllm.processor:GuidanceLogitsProcessor"
_ids = itertools.count()


def load_side_model(spec: dict) -> Any:
    """The hf backend on the side model ``spec`` names (``model`` None: the embedded default)."""
    from prefsteer.backends.hf import TransformersBackend

    b = TransformersBackend(model=spec.get("model"), dtype=spec.get("dtype"), cache_dir=spec.get("cache_dir"),
                            batch_size=1)
    log.info("prefsteer guidance: side model %s (%s) loaded in %.1f s", b.source["model"],
             spec.get("dtype"), b.load_seconds)
    return b


class _Request:
    __slots__ = ("key", "prompt", "output")

    def __init__(self, prompt: list[int], output: list[int]):
        self.key, self.prompt, self.output = next(_ids), list(prompt), output  # output: vLLM's live list


class GuidanceLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.core = GuidedRequests(load_side_model)
        self.rows: dict[int, _Request] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        desc = (sampling_params.extra_args or {}).get(GUIDE_KEY)
        if desc is not None:
            check_description(desc)
            if not isinstance(desc.get("side"), dict):
                raise ValueError("the guide description names no side model (`side`)")

    def is_argmax_invariant(self) -> bool:
        return False  # guidance changes the greedy token

    def _new(self, params, prompt_ids: list[int] | None, output_ids: list[int]) -> _Request | None:
        desc = (params.extra_args or {}).get(GUIDE_KEY)
        if desc is None or float(desc.get("alpha", 1.0)) == 0.0:  # CLIPer's alpha 0: plain decoding, free
            return None
        if prompt_ids is None:
            raise ValueError("prefsteer guidance needs the request's prompt token ids")
        req = _Request(prompt_ids, output_ids)
        self.core.add(req.key, desc, len(req.prompt))
        return req

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.rows, batch_update, self._new):
            self.core.retain(r.key for r in self.rows.values())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch = []
        for i, r in sorted(self.rows.items()):
            if i >= logits.shape[0]:
                continue
            out = r.output
            if out and out[-1] < 0:  # an unresolved placeholder (async scheduling): nothing to read yet
                raise RuntimeError("prefsteer guidance met a placeholder output token; it needs "
                                   "async scheduling off (`async_scheduling=False`)")
            batch.append((i, r.key, r.prompt + list(out)))
        return self.core.apply(logits, batch)
