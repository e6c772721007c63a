"""A trainable LoRA adapter injected into the backend's model for the duration of a ``with`` block.

peft's `LoraModel` wraps the target linear layers in place (the base weights frozen) and `unload`
takes the wrappers out again without merging, so the model is exactly as before the block. The
block holds the backend's model lock exclusively: it starts once running forwards have finished,
and score, generate and decoding sessions of other threads wait until it ends, so none of them ever
sees the adapter's weights.

    >>> with backend.adapter(AdapterSpec(r=8)) as ad, torch.enable_grad():
    ...     h = ad.last_hidden([ids_a, ids_b])                   # (2, d), differentiable
    ...     state = ad.state_dict()
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from prefsteer.backends.base import AdapterSpec


class LoraAdapter:
    """`base.Adapter` over a model that currently carries a LoRA (valid inside the block only)."""

    def __init__(self, b, model):
        self._b, self._model = b, model
        self.hidden_size = int(model.config.hidden_size)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self._model.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self._model.train(mode)

    def last_hidden(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """The last layer's state (B, d, float32) at each right-padded sequence's last token.
        With causal attention no real token sees the padding, so no mask is needed."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("`sequences` has to hold at least one non-empty token sequence")
        dev = self._b.device
        B, T = len(sequences), max(len(s) for s in sequences)
        ids = torch.full((B, T), self._b.pad_id, dtype=torch.long)
        for r, s in enumerate(sequences):
            ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        body = getattr(self._model, self._model.base_model_prefix, None) or self._model.model
        hidden = body(input_ids=ids.to(dev)).last_hidden_state              # (B, T, d)
        last = torch.tensor([len(s) - 1 for s in sequences], device=dev)
        return hidden[torch.arange(B, device=dev), last].float()              # (B, d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self._model).items()}


@contextmanager
def lora_block(b, spec: AdapterSpec, state: dict[str, torch.Tensor] | None = None) -> Iterator[LoraAdapter]:
    """Inject a LoRA (``state`` loaded if given) into ``b.model``; on exit remove it and restore the
    base weights' ``requires_grad`` and the model's mode, whatever happened inside."""
    from peft import LoraConfig, LoraModel, set_peft_model_state_dict

    with b._lock.exclusive():
        model = b.model
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                         target_modules=list(spec.target_modules), bias="none")
        tuner = LoraModel(model, cfg, "default")
        try:
            if state is not None:
                set_peft_model_state_dict(model, state)
            yield LoraAdapter(b, model)
        finally:
            tuner.unload()
            for n, p in model.named_parameters():
                p.requires_grad_(grads[n])
            model.train(was_training)
