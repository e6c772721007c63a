"""A key/value cache that appends into spare room instead of copying itself at every step.

transformers' `DynamicLayer` concatenates the new keys and values onto the old ones, so every
decoding step allocates and copies the whole cache of every layer: n steps copy O(n²) keys. A
growing layer keeps each layer in a buffer with room to spare, writes the new keys and values into
it, and hands out a view of the filled part; a buffer that is full is replaced by one a quarter
longer (and `SPARE` slots), so a row of n tokens is copied O(log n) times and the room left over
is at most a quarter of the cache and 64 slots. On rows of ~70 tokens the copies were a few
percent of a CPU step (results/serving/decode-step.md); they grow with the rows' length.

Anything that assigns ``layer.keys`` and ``layer.values`` itself (rows joining or leaving a
`KVBatch`) works as with a `DynamicLayer`: the next update sees that the tensors are not its own
view and moves them into a new buffer.

    >>> cache = growing_cache(model.config)   # in place of DynamicCache(config=model.config)
"""

from __future__ import annotations

import functools

SPARE = 64  # token slots a new buffer holds beyond what it is given


def growing_cache(config):
    """A `DynamicCache` for ``config`` whose full-attention layers are `GrowingLayer`s (sliding-
    window and other kinds of layer stay transformers' own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [_growing_layer()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _growing_layer():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of a buffer with room to spare."""

        _kbuf = _vbuf = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.get_seq_length(), key_states.shape[-2]
            own = self._kbuf is not None and self.keys.data_ptr() == self._kbuf.data_ptr() \
                and self.keys.shape[:2] == key_states.shape[:2]
            if not own or n + m > self._kbuf.shape[-2]:
                cap = (n + m) * 5 // 4 + SPARE
                self._kbuf = _room(self.keys, key_states, n, cap)
                self._vbuf = _room(self.values, value_states, n, cap)
            self._kbuf[..., n:n + m, :].copy_(key_states)
            self._vbuf[..., n:n + m, :].copy_(value_states)
            self.keys, self.values = self._kbuf[..., :n + m, :], self._vbuf[..., :n + m, :]
            return self.keys, self.values

        def reset(self) -> None:
            self._kbuf = self._vbuf = None
            super().reset()

    return GrowingLayer


def keeps_every_key(cache) -> bool:
    """Whether every layer of ``cache`` (from `growing_cache`) keeps all its keys: no sliding-window
    layer, which keeps only its last ones."""
    return all(isinstance(layer, _growing_layer()) for layer in cache.layers)


def _room(old, new, n: int, cap: int):
    """A buffer of ``cap`` slots along the sequence axis holding ``old``'s ``n`` entries."""
    buf = new.new_empty((*new.shape[:-2], cap, new.shape[-1]))
    if n:
        buf[..., :n, :].copy_(old)
    return buf
