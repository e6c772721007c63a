"""Reward: a per-user LoRA reward model on the backend's own causal LM, best-of-n at generation.

The reward of response y to prompt x is a linear value head on the last hidden state of the last
token of the chat-templated ``x`` + ``y``, read from the base model with LoRA adapters (r=16,
alpha=32, dropout 0.05 on q/k/v/o projections). Per user, adapters and head are trained with the
Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)): AdamW, lr 1e-4, batch 8 pairs, 3 epochs,
sequences at most 1024 tokens (the prompt is cut from the left).

The backend's model is shared with the other methods, so the adapters live only for the duration
of a call (``with backend.adapter(spec, state) as a:``, the backend's business: peft on the
transformers backend); the base weights are never written. Each user's adapter and head weights
(~2 M numbers) are stored as one safetensors file beside the memory and loaded back by any process.

    >>> rm = Reward(backend, memory=Memory("memory.db"), epochs=3, max_train_pairs=40)
    >>> rm.fit("alice", train_pairs)               # stores alice's adapter and head
    >>> rm.margins("alice", test_pairs)            # r(x, y_w) - r(x, y_l)
    >>> rm.generate("alice", ["Write a TL;DR of ..."], GenerationConfig(max_new_tokens=300))

Needs a backend with the ``adapter`` operation (the ``hf`` and ``fake`` backends have it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from prefsteer.backends.base import AdapterSpec, GenerationConfig, Messages, require
from prefsteer.errors import PrefsteerError
from prefsteer.types import PreferencePair
from prefsteer.methods.base import (Method, MethodOutput, NotFittedError, as_conversation, as_conversations,
                                    config_from_options, register_method, with_system)

if TYPE_CHECKING:
    import torch


@dataclass
class RewardConfig:
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={
        "help": "modules that get adapters"})
    epochs: int = field(default=3, metadata={"help": "passes over the user's training pairs"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (adapters and head)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per optimizer step"})
    micro_batch: int = field(default=2, metadata={
        "help": "pairs per forward pass (gradients are accumulated up to batch_size): bounds memory"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens per sequence at most; the prompt is cut from the left"})
    max_train_pairs: int = field(default=0, metadata={
        "help": "train on at most this many of the user's pairs, a seeded sample (0: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the adapters' and head's init and the shuffling"})
    n: int = field(default=4, metadata={"help": "best-of-n: candidates sampled per prompt"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the candidates"})
    top_k: int = field(default=50, metadata={"help": "top-k of the candidates' sampling"})
    top_p: float = field(default=0.95, metadata={"help": "top-p of the candidates' sampling"})
    score_batch: int = field(default=8, metadata={"help": "sequences per forward when computing rewards"})

    def __post_init__(self):
        for name in ("r", "alpha", "epochs", "batch_size", "micro_batch", "n", "score_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` (={getattr(self, name)}) has to be at least 1")
        if self.max_length < 2:
            raise ValueError(f"`max_length` (={self.max_length}) has to be at least 2")
        if not self.lr > 0:
            raise ValueError(f"`lr` (={self.lr}) has to be a strictly positive float")
        if self.max_train_pairs < 0:
            raise ValueError(f"`max_train_pairs` (={self.max_train_pairs}) has to be non-negative")
        self.target_modules = tuple([self.target_modules] if isinstance(self.target_modules, str)
                                    else self.target_modules)


def bt_loss(r_chosen: "torch.Tensor", r_rejected: "torch.Tensor") -> "torch.Tensor":
    """Bradley-Terry loss, mean of -log sigmoid(r_w - r_l)."""
    import torch

    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()


def best_of(rewards: np.ndarray) -> list[int]:
    """For each prompt's candidates' rewards (P, n), the index of the best (the first on ties)."""
    return [int(i) for i in np.argmax(np.asarray(rewards), axis=1)]


def truncate(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """context + continuation in at most ``max_length`` tokens: the context loses its first tokens;
    a continuation that alone is too long keeps its first tokens behind one context token."""
    keep = max_length - len(continuation)
    if keep < 1:
        return context[-1:] + continuation[: max_length - 1]
    return context[-keep:] + continuation


# options that only shape best-of-n generation and scoring, not what `fit` learns
GENERATION_OPTIONS = ("n", "temperature", "top_k", "top_p", "score_batch")
WEIGHTS_FILE = "reward.safetensors"


@register_method("reward")
class Reward(Method):
    """Options: the fields of `RewardConfig`; ``system`` (system prompt of the contexts); ``memory``
    (where each user's adapter and head are stored, as one safetensors file)."""

    config_class = RewardConfig
    resources = ("memory", "progress")
    extra_options = ("system",)

    def __init__(self, backend, memory=None, config: RewardConfig | None = None, system: str | None = None,
                 progress: bool = False, **options: Any):
        super().__init__(backend, memory=memory, **options)
        self.config = config_from_options(RewardConfig, options, "reward", config)
        self.system, self.progress = system, progress
        # this process's copy of the stored states: user -> {"lora": state dict, "head": state dict}
        self.states: dict[str, dict[str, Any]] = {}
        self.fit_info: dict[str, dict[str, Any]] = {}

    def state_options(self) -> dict[str, Any]:
        opts = {k: v for k, v in asdict(self.config).items() if k not in GENERATION_OPTIONS}
        opts["system"] = self.system
        return opts

    @property
    def spec(self) -> AdapterSpec:
        c = self.config
        return AdapterSpec(r=c.r, alpha=c.alpha, dropout=c.dropout, target_modules=tuple(c.target_modules))

    def _sequence(self, conversation: str | Messages, response: str) -> list[int]:
        ctx = self.backend.encode_context(with_system(as_conversation(conversation), self.system))
        return truncate(ctx, self.backend.encode_continuation(response), self.config.max_length)

    @staticmethod
    def _forward(adapter, head, seqs: list[list[int]]) -> "torch.Tensor":
        """Rewards (B,): the head on each sequence's last hidden state (moved to the CPU, where
        the head lives: d numbers per sequence)."""
        return head(adapter.last_hidden(seqs).float().cpu()).squeeze(-1)      # (B,)

    @staticmethod
    def _new_head(hidden_size: int) -> "torch.nn.Linear":
        import torch

        head = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.normal_(head.weight, std=hidden_size ** -0.5)  # SmolLM2's initializer_range
        return head

    # -- persisted state --------------------------------------------------------------------
    def _state(self, user_id: str) -> dict[str, Any]:
        """The user's adapter and head weights, from this process or the memory."""
        if user_id not in self.states:
            from safetensors import SafetensorError
            from safetensors.torch import load

            st = self.require_state(user_id)
            data = st["files"].get(WEIGHTS_FILE)
            if data is None:
                raise NotFittedError(self.name, user_id)
            try:
                tensors = load(data)
            except SafetensorError as e:
                raise PrefsteerError(f"the stored reward weights of user '{user_id}' cannot be read ({e}); "
                                     "fit again with `prefsteer index --method reward`") from e
            self.states[user_id] = {"lora": {k[len("adapter."):]: v for k, v in tensors.items()
                                             if k.startswith("adapter.")},
                                    "head": {"weight": tensors["head.weight"]}}
            self.fit_info.setdefault(user_id, st["state"])
        return self.states[user_id]

    def describe_state(self, state: dict) -> dict:
        return {k: state.get(k) for k in ("pairs", "steps", "final_loss", "epoch_losses", "seconds")}

    # -- the Method interface ---------------------------------------------------------------
    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        import torch
        from safetensors.torch import save

        require(self.backend, "adapter", "the reward method")
        c = self.config
        pairs = list(pairs)
        if c.max_train_pairs and len(pairs) > c.max_train_pairs:
            pick = np.random.default_rng(c.seed).choice(len(pairs), c.max_train_pairs, replace=False)
            pairs = [pairs[i] for i in sorted(pick)]
        if not pairs:
            raise ValueError(f"the reward method needs at least one training pair for user '{user_id}'")
        seqs = [(self._sequence(p.prompt, p.chosen), self._sequence(p.prompt, p.rejected)) for p in pairs]
        start = time.perf_counter()
        losses: list[float] = []
        epoch_losses: list[float] = []
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(c.seed)  # the adapters' and head's init, dropout
            with self.backend.adapter(self.spec) as adapter:
                head = self._new_head(adapter.hidden_size)
                opt = torch.optim.AdamW(list(adapter.parameters()) + list(head.parameters()),
                                        lr=c.lr, weight_decay=0.0)
                adapter.train(True)
                order_rng = np.random.default_rng(c.seed)
                steps = -(-len(pairs) // c.batch_size) * c.epochs
                bar = None
                if self.progress:
                    from tqdm.auto import tqdm
                    bar = tqdm(total=steps, desc=f"reward {user_id}", unit="step", leave=False)
                for _ in range(c.epochs):
                    order = order_rng.permutation(len(pairs))
                    epoch = []
                    for lo in range(0, len(order), c.batch_size):
                        batch = order[lo: lo + c.batch_size]
                        opt.zero_grad()
                        total = 0.0
                        for mlo in range(0, len(batch), c.micro_batch):
                            micro = batch[mlo: mlo + c.micro_batch]
                            r = self._forward(adapter, head, [seqs[i][0] for i in micro] + [seqs[i][1] for i in micro])
                            loss = bt_loss(r[: len(micro)], r[len(micro):])
                            (loss * len(micro) / len(batch)).backward()
                            total += loss.item() * len(micro) / len(batch)
                        opt.step()
                        losses.append(total)
                        epoch.append(total)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{total:.3f}")
                    epoch_losses.append(float(np.mean(epoch)))
                if bar is not None:
                    bar.close()
                adapter.train(False)
                lora = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
        state = {"lora": lora, "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
        self.states[user_id] = state
        info = {"pairs": len(pairs), "steps": len(losses), "losses": losses, "epoch_losses": epoch_losses,
                "final_loss": epoch_losses[-1], "seconds": time.perf_counter() - start,
                "tokens": sum(len(a) + len(b) for a, b in seqs) * c.epochs}
        self.fit_info[user_id] = info
        tensors = {**{f"adapter.{k}": v.contiguous() for k, v in lora.items()},
                   "head.weight": state["head"]["weight"].contiguous()}
        self.save_state(user_id, info, files={WEIGHTS_FILE: save(tensors)}, n_pairs=len(pairs))

    def rewards(self, user_id: str | None, items: Sequence[tuple[str | Messages, str]]) -> list[float]:
        """r(x, y) of each (prompt or conversation, response) under the user's reward model."""
        import torch

        state = self._state(user_id)
        if not items:
            return []
        require(self.backend, "adapter", "the reward method")
        seqs = [self._sequence(x, y) for x, y in items]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad less
        out = [0.0] * len(seqs)
        with self.backend.adapter(self.spec, state["lora"]) as adapter, torch.inference_mode():
            adapter.train(False)
            head = self._new_head(adapter.hidden_size)
            head.load_state_dict(state["head"])
            bs = self.config.score_batch
            for lo in range(0, len(order), bs):
                idx = order[lo: lo + bs]
                for i, r in zip(idx, self._forward(adapter, head, [seqs[i] for i in idx]).tolist()):
                    out[i] = r
        return out

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        r = self.rewards(user_id, [(p.prompt, y) for p in pairs for y in (p.chosen, p.rejected)])
        return [w - l for w, l in zip(r[0::2], r[1::2])]

    def generate(self, user_id: str | None, conversations: Sequence[str | Messages],
                 config: GenerationConfig | None = None) -> list[MethodOutput]:
        """Best-of-n: n candidates sampled from the base model for each conversation (temperature,
        top-k and top-p from the method's options; length and seed from ``config``), the highest
        reward over the whole conversation wins."""
        c = self.config
        prompts = as_conversations(conversations)
        self._state(user_id)  # not fitted: fail before sampling
        require(self.backend, "generate", "the reward method's candidates")
        config = config or GenerationConfig()
        sample = GenerationConfig(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                                  do_sample=True,
                                  temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                  seed=config.seed if config.seed is not None else c.seed)
        start = time.perf_counter()
        gens = self.backend.generate([with_system(p, self.system) for p in prompts for _ in range(c.n)], sample)
        gen_secs = time.perf_counter() - start
        items = [(p, gens[i * c.n + j].text) for i, p in enumerate(prompts) for j in range(c.n)]
        r = np.array(self.rewards(user_id, items)).reshape(len(prompts), c.n)
        rank_secs = time.perf_counter() - start - gen_secs
        picks = best_of(r)
        return [MethodOutput(gens[i * c.n + j].text, [], {"generation": gen_secs, "reward": rank_secs},
                             {"rewards": r[i].tolist(), "chosen_index": j,
                              "candidates": [g.text for g in gens[i * c.n: (i + 1) * c.n]]},
                             with_system(prompts[i], self.system))
                for i, j in enumerate(picks)]
