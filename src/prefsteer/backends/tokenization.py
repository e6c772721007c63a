"""`ChatTokenization`: the chat-template tokenization that the hf and vLLM backends share.

Both backends hold a Hugging Face tokenizer (vLLM's ``LLM.get_tokenizer()`` is one) and must turn
chat messages into exactly the same token ids, so that scores, fingerprints and classifier heads
carry over between them. The mixin needs ``self.tokenizer`` and ``self.eos_ids`` (the end-of-turn
token ids) and ``self.max_context``, and `_init_tokenization` to be called once the tokenizer is set (a backend's copy calls
it again to get its own cache and lock).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, Sequence

from prefsteer.backends.base import Messages, ScoreRequest
from prefsteer.errors import InputError

CTX_CACHE_SIZE = 4096  # contexts kept; the cache is emptied when it grows past this
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def end_of_turn_ids(tokenizer: Any, generation_eos: Any = None) -> set[int]:
    """The token ids that end an assistant's turn: the tokenizer's end-of-sequence token, the model's
    generation config's (``generation_eos``: an id, a list of ids or None), and the usual chat
    templates' end-of-turn tokens where the vocabulary has them; never the unknown token."""
    vocab = tokenizer.get_vocab()
    cands: list[Any] = [tokenizer.eos_token_id, generation_eos]
    cands += [tokenizer.convert_tokens_to_ids(tok) for tok in END_OF_TURN_TOKENS if tok in vocab]
    ids: set[int] = set()
    for c in cands:
        for i in (c if isinstance(c, (list, tuple)) else [c]):
            if i is not None and i != tokenizer.unk_token_id:
                ids.add(int(i))
    return ids


class ChatTokenization:
    tokenizer: Any
    eos_ids: set[int]

    @property
    def template_id(self) -> str:
        """A short hash of the chat template: part of every score cache key."""
        tmpl = self.tokenizer.chat_template
        if not isinstance(tmpl, str):
            tmpl = json.dumps(tmpl, sort_keys=True)
        return hashlib.sha256(tmpl.encode()).hexdigest()[:16]

    def _init_tokenization(self) -> None:
        self._ctx_cache: dict[tuple, list[int]] = {}
        self._ctx_lock = threading.Lock()

    def encode_context(self, messages: Messages) -> list[int]:
        """Token ids of the chat-templated context, ending with the assistant's turn header."""
        key = tuple((m["role"], m["content"]) for m in messages)
        with self._ctx_lock:
            ids = self._ctx_cache.get(key)
        if ids is None:
            text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                      add_generation_prompt=True)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            with self._ctx_lock:
                if len(self._ctx_cache) > CTX_CACHE_SIZE:
                    self._ctx_cache.clear()
                self._ctx_cache[key] = ids
        return list(ids)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of ``text`` as the assistant's reply (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def decode_tokens(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.eos_ids)

    @property
    def eos_text(self) -> str | None:
        """The tokenizer's end-of-sequence token as text, when it ends the turn and reads back as itself."""
        text = getattr(self.tokenizer, "eos_token", None)
        if isinstance(text, str) and text and self.encode_continuation(text) == [self.tokenizer.eos_token_id] \
                and self.tokenizer.eos_token_id in self.eos_ids:
            return text
        return None

    def count_tokens(self, messages: Messages, continuation: str = "") -> int:
        return len(self.encode_context(messages)) + len(self.encode_continuation(continuation))

    def _encode_requests(self, requests: Sequence[ScoreRequest]) -> list[tuple[list[int], list[int]]]:
        rows = []
        for i, req in enumerate(requests):
            ctx, cont = self.encode_context(req.chat()), self.encode_continuation(req.continuation)
            if len(ctx) + len(cont) > self.max_context:
                raise InputError(f"request {i} is {len(ctx) + len(cont)} tokens long (context {len(ctx)} + "
                                 f"continuation {len(cont)}), more than the model's limit of "
                                 f"{self.max_context} tokens", field="prompt")
            rows.append((ctx, cont))
        return rows

    def _encode_contexts(self, contexts: Sequence[Messages]) -> list[list[int]]:
        encoded = []
        for i, msgs in enumerate(contexts):
            ids = self.encode_context(msgs)
            if len(ids) >= self.max_context:
                raise InputError(f"context {i} is {len(ids)} tokens long, more than the model's limit of "
                                 f"{self.max_context} tokens (leaving room for at least one new token)",
                                 field="prompt")
            encoded.append(ids)
        return encoded
