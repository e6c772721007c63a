"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from prefsteer.backends.base import GenerationConfig


def seeded_generator(config: GenerationConfig, device: str | torch.device = "cpu") -> torch.Generator | None:
    """The random generator for ``config``'s sampling, on the device the logits live on (a CPU
    generator cannot sample CUDA logits); None when decoding is greedy or unseeded."""
    if not (config.do_sample and config.seed is not None):
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def hold_end(logits: torch.Tensor, config: GenerationConfig, made: int, eos_ids) -> torch.Tensor:
    """``logits`` (B, V) with the end-of-turn tokens ruled out while fewer than
    ``config.min_new_tokens`` tokens are ``made``; the same tensor otherwise (never modified)."""
    if made >= config.min_new_tokens or not eos_ids:
        return logits
    held = logits.clone()
    held[:, sorted(eos_ids)] = float("-inf")
    return held


def sample_next(logits: torch.Tensor, config: GenerationConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Does not modify ``logits``."""
    if not config.do_sample:
        return logits.argmax(-1)
    scores = logits / config.temperature
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= config.top_p  # keep the token that crosses top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
