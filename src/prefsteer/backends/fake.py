"""A deterministic toy language model with the full backend contract, for fast unit tests.

Words are tokens (lower-cased, split on anything that is not a letter or digit, hashed into a fixed
vocabulary). The next-token logits are a seeded random bigram table plus a bonus for every token
already present in the context, so text mentioned in the prompt (an attribute such as "Humor")
raises the probability of the same words in the reply: enough structure for EXACT's objective,
retrieval and guidance to behave measurably.

Every operation of the protocol is here: lock-step decoding (`start_decoding`) and streamed,
continuously batched decoding (`stream`, through `FakeBatch`) over the same
next-token function, and a trainable low-rank adapter on the embedding table (`adapter`), so that
Drift and Reward run on it as they do on the transformers backend.

    >>> fake = FakeBackend()
    >>> s = fake.start_decoding([user_turn("hi"), user_turn("hi", "be funny")])
    >>> s.logits().shape                     # (2, V)
    >>> with fake.adapter(AdapterSpec(r=4)) as a:
    ...     a.last_hidden([[5, 6, 7]]).shape  # (1, d), differentiable in a.parameters()
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from prefsteer.backends.base import (OPERATIONS, AdapterSpec, Generation, GenerationConfig, Guide, Messages,
                                     Score, ScoreRequest, local_guide)
from prefsteer.backends.scheduler import ScheduledStreaming

_WORD = re.compile(r"[a-z0-9]+")
_WORDS = ("the a and to of in is it that was i you my he she we they for on with this but not so "
          "funny joke humor concise short brief formal dear sir regards sorry feel care help "
          "code python function data analysis because therefore story once upon time "
          "great awesome lol wow yes no maybe very really good bad happy sad post summary tl dr "
          "girlfriend boyfriend friend job work money school dog cat car house family").split()


class FakeBackend(ScheduledStreaming):
    name = "fake"
    capabilities: frozenset[str] = frozenset(OPERATIONS) - {"guide_branches"}

    def __init__(self, vocab_size: int = 2048, hidden_size: int = 16, context_bonus: float = 2.0,
                 seed: int = 0, max_context: int = 4096, dtype: Any = None, step_seconds: float = 0.0,
                 max_batch_rows: int | None = None, max_waiting: int | None = None, **_: Any):
        if vocab_size < len(_WORDS) + 2:
            raise ValueError(f"`vocab_size` (={vocab_size}) has to be at least {len(_WORDS) + 2}")
        self.vocab_size, self.hidden_size, self.context_bonus = vocab_size, hidden_size, context_bonus
        self.seed, self._max_context = seed, max_context
        self.eos_id = 0
        g = torch.Generator().manual_seed(seed)
        self.bigram = torch.randn(vocab_size, vocab_size, generator=g)          # (V, V)
        self.embed = torch.randn(vocab_size, hidden_size, generator=g) / hidden_size ** 0.5  # (V, d)
        # another precision rounds the weights (computing stays float32): a slightly different model
        names = {None: "float32", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                 "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}
        self.dtype = names.get(str(dtype).replace("torch.", "") if dtype is not None else None)
        if self.dtype is None:
            raise ValueError(f"unknown dtype '{dtype}'; use float32, float16 or bfloat16")
        if self.dtype != "float32":
            low = getattr(torch, self.dtype)
            self.bigram, self.embed = self.bigram.to(low).float(), self.embed.to(low).float()
        # id -> word for decoding: known words keep their own id, other ids print as "w<id>"
        self._id2word = {self._word_id(w): w for w in _WORDS}
        self._casts: dict[str, FakeBackend] = {}
        if step_seconds < 0:
            raise ValueError(f"`step_seconds` (={step_seconds}) has to be non-negative")
        self.step_seconds = float(step_seconds)  # a streamed step's simulated time (concurrency tests)
        self.set_stream_limits(max_batch_rows, max_waiting)

    # -- identity ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        fp = f"fake-v1:{self.vocab_size}:{self.hidden_size}:{self.context_bonus}:{self.seed}"
        return fp if self.dtype == "float32" else f"{fp}:{self.dtype}"

    @property
    def template_id(self) -> str:
        return "fake-chat-v1"

    @property
    def max_context(self) -> int:
        return self._max_context

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size}

    def cast(self, dtype: Any) -> "FakeBackend":
        """The same toy model with its weights rounded to ``dtype`` (one copy per precision, kept)."""
        key = str(dtype)
        if key not in self._casts:
            self._casts[key] = FakeBackend(self.vocab_size, self.hidden_size, self.context_bonus, self.seed,
                                           self._max_context, dtype)
        return self._casts[key]

    # -- tokenization -----------------------------------------------------------------------
    def _word_id(self, word: str) -> int:
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
        return 1 + h % (self.vocab_size - 1)  # 0 is end-of-sequence

    def tokenize(self, text: str) -> list[int]:
        return [self._word_id(w) for w in _WORD.findall(text.lower())]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(self._id2word.get(i, f"w{i}") for i in ids if i != self.eos_id)

    def encode_context(self, messages: Messages) -> list[int]:
        return self.tokenize(self.render(messages))

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenize(text)

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return self.detokenize(ids)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({self.eos_id})

    @property
    def eos_text(self) -> str | None:
        return None  # no word reads back as end-of-sequence

    def render(self, messages: Messages) -> str:
        return " ".join(f"{m['role']} {m['content']}" for m in messages) + " assistant"

    def count_tokens(self, messages: Messages, continuation: str = "") -> int:
        return len(self.tokenize(self.render(messages))) + len(self.tokenize(continuation))

    # -- the model --------------------------------------------------------------------------
    def next_logits(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> hidden (B, d), logits (B, V)."""
        present = torch.zeros(ids.shape[0], self.vocab_size)
        present.scatter_(1, ids, 1.0)
        present[:, self.eos_id] = 0.0
        logits = self.bigram[ids[:, -1]] + self.context_bonus * present      # (B, V)
        hidden = self.embed[ids[:, -1]] + present @ self.embed / ids.shape[1]  # (B, d)
        return hidden, logits

    def _sequence(self, req: ScoreRequest) -> tuple[list[int], list[int]]:
        ctx = self.tokenize(self.render(req.chat()))
        return ctx, self.tokenize(req.continuation)

    def score(self, requests: Sequence[ScoreRequest], *, progress: bool = False) -> list[Score]:
        out = []
        for req in requests:
            ctx, cont = self._sequence(req)
            ids = torch.tensor([ctx + cont])
            total = 0.0
            for j, tok in enumerate(cont):
                _, logits = self.next_logits(ids[:, : len(ctx) + j])
                total += torch.log_softmax(logits, -1)[0, tok].item()
            out.append(Score(total, len(cont)))
        return out

    def hidden_states(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        out = []
        for req in requests:
            ctx, cont = self._sequence(req)
            ids = torch.tensor([ctx + cont])
            out.append(torch.cat([self.next_logits(ids[:, : len(ctx) + j])[0] for j in range(len(cont))])
                       if cont else torch.zeros(0, self.hidden_size))
        return out

    def token_embeddings(self) -> torch.Tensor:
        return self.embed

    def generate(self, contexts: Sequence[Messages], config: GenerationConfig | None = None, *,
                 guide: Guide | None = None) -> list[Generation]:
        from prefsteer.backends.sampling import hold_end, sample_next, seeded_generator  # shared with the real backends

        guide = local_guide(self, guide)
        config = config or GenerationConfig()
        gen = seeded_generator(config)
        start = time.perf_counter()
        outs = []
        for msgs in contexts:  # the toy model is cheap: one row at a time keeps it simple
            ids = torch.tensor([self.tokenize(self.render(msgs))])
            new: list[int] = []
            for made in range(config.max_new_tokens):
                hidden, logits = self.next_logits(ids)
                if guide is not None:
                    logits = guide(hidden, logits, ids)
                tok = int(sample_next(hold_end(logits, config, made, {self.eos_id}), config, gen)[0])
                if tok == self.eos_id:
                    break
                new.append(tok)
                ids = torch.cat([ids, torch.tensor([[tok]])], 1)
            outs.append(Generation(self.detokenize(new), new))
        secs = time.perf_counter() - start
        for o in outs:
            o.seconds = secs
        return outs

    def _row_batch(self) -> FakeBatch:
        return FakeBatch(self)

    # -- lock-step decoding and adapters --------------------------------------------------------
    def start_decoding(self, contexts: Sequence[Messages]) -> "FakeDecodeSession":
        return FakeDecodeSession(self, [self.encode_context(m) for m in contexts])

    @contextmanager
    def adapter(self, spec: AdapterSpec, state: dict[str, torch.Tensor] | None = None
                ) -> Iterator["FakeAdapter"]:
        """A low-rank delta on the embedding table; the backend's own weights are never written,
        so score and generate are unaffected inside the block."""
        yield FakeAdapter(self, spec, state)


class FakeBatch:
    """The fake model's rows for the `Scheduler` (`Backend.stream`): no cache, each output reads its
    row whole; a step takes the backend's ``step_seconds``, as a real model's forward would."""

    def __init__(self, backend: FakeBackend):
        self.backend = backend
        self.seqs: list[list[int]] = []

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def uncached(self, prompt: Sequence[int]) -> int:
        return len(prompt)  # the toy model keeps no prefixes

    def add(self, prompts: Sequence[Sequence[int]]) -> int:
        self.seqs += [list(p) for p in prompts]
        return 0  # the toy model keeps no prefixes

    def keep(self, rows: Sequence[int]) -> None:
        self.seqs = [self.seqs[i] for i in rows]

    def step(self, tokens: Sequence[int]) -> None:
        if self.backend.step_seconds:
            time.sleep(self.backend.step_seconds)
        for seq, t in zip(self.seqs, tokens, strict=True):
            seq.append(int(t))

    def outputs(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, logits = zip(*(self.backend.next_logits(torch.tensor([s])) for s in self.seqs[start:]))
        return torch.cat(hidden), torch.cat(logits)


class FakeDecodeSession:
    """Rows of the fake model extended token by token (no cache: the toy model is cheap)."""

    def __init__(self, backend: FakeBackend, contexts: list[list[int]]):
        if not contexts:
            raise ValueError("`contexts` has to hold at least one context")
        self.backend = backend
        self.rows = [torch.tensor([ids]) for ids in contexts]      # R x (1, T_r)

    def logits(self) -> torch.Tensor:
        return torch.cat([self.backend.next_logits(ids)[1] for ids in self.rows])  # (R, V)

    def append(self, tokens: Sequence[int]) -> None:
        if len(tokens) != len(self.rows):
            raise ValueError(f"`tokens` has {len(tokens)} entries for {len(self.rows)} rows")
        self.rows = [torch.cat([ids, torch.tensor([[int(t)]])], 1) for ids, t in zip(self.rows, tokens)]


class FakeAdapter:
    """E' = E + (alpha / r) * A @ B on the embedding table (V, d): A (V, r) random, B (r, d) zero,
    so a fresh adapter leaves every hidden state as it was (LoRA's init)."""

    def __init__(self, backend: FakeBackend, spec: AdapterSpec, state: dict[str, torch.Tensor] | None):
        V, d = backend.embed.shape
        self.backend, self.hidden_size, self.scale = backend, d, spec.alpha / spec.r
        self.training = False
        self.lora_A = torch.nn.Parameter(torch.randn(V, spec.r) / spec.r ** 0.5)  # (V, r)
        self.lora_B = torch.nn.Parameter(torch.zeros(spec.r, d))                  # (r, d)
        if state is not None:
            want = {"lora_A": tuple(self.lora_A.shape), "lora_B": tuple(self.lora_B.shape)}
            got = {k: tuple(v.shape) for k, v in state.items()}
            if got != want:
                raise ValueError(f"adapter state has shapes {got}, expected {want} (another spec or model)")
            with torch.no_grad():
                self.lora_A.copy_(state["lora_A"])
                self.lora_B.copy_(state["lora_B"])

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def last_hidden(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """The fake model's hidden state (see `FakeBackend.next_logits`) under E'."""
        b = self.backend
        emb = b.embed + self.scale * (self.lora_A @ self.lora_B)                # (V, d)
        out = []
        for seq in sequences:
            ids = torch.tensor(list(seq))
            present = torch.zeros(b.vocab_size)
            present[ids] = 1.0
            present[b.eos_id] = 0.0
            out.append(emb[ids[-1]] + present @ emb / len(ids))               # (d,)
        return torch.stack(out)                                                 # (B, d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach().clone(), "lora_B": self.lora_B.detach().clone()}
