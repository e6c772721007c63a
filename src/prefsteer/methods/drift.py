"""Drift (Kim et al.): per-user attribute weights fitted by Bradley-Terry, applied at decoding time.

Each attribute i of the library gives an implicit reward for a response y to prompt x:

    phi_i(x, y) = log p(y | x, system prompt of attribute i) - log p(y | x, plain context)

A user's reward is r(x, y) = sum_i w_i phi_i(x, y). The weights are fitted on the user's training
pairs with a Bradley-Terry model, P(y_w > y_l) = sigmoid(w . (phi(y_w) - phi(y_l))), with L2
regularisation and no intercept. At generation, every step combines the next-token log-probabilities
of 1 + n branches decoded side by side (the plain context and each active attribute's context):

    logits = h_base + (1 / beta) * sum_i w_i (h_i - h_plain)

    >>> drift = Drift(backend, memory=Memory("memory.db"), attributes=["Concise", "Formal", "Humor"])
    >>> drift.fit("alice", train_pairs)             # stores alice's weights in the memory
    >>> drift.profile("alice")["state"]["weights"]  # [{"attribute": "Humor", "weight": 0.8}, ...]
    >>> drift.margins("alice", test_pairs)          # w . (phi(y_w) - phi(y_l)) per pair
    >>> drift.generate("alice", ["Write a TL;DR of ..."])[0].text

Cost: scoring needs (1 + n_attributes) x 2 requests per pair. With ``placement="system"`` (the
paper's) the contexts differ from their first tokens, so the backend cannot share a prefix and every
row is a full forward; ``placement="user"`` appends the instruction to the user's turn instead,
which lets the transformers backend compute the prompt once per pair (several times faster on CPU).
Given a ``memory``, scores are cached across users and seeds (the features do not depend on the user),
and each user's weights are stored there: a new process generates from them. ``feedback`` refits.

The paper runs Drift with two models (Appendix C.1.2): a small one scores the attributes and decodes
their branches, the large one decodes the base row. ``small_backend`` / ``small_model``
(``--drift-backend`` / ``--drift-model``) load the small one (`load_small_backend`); unset, the
backend plays both parts.

Generation runs on either of two backend operations:
* ``start_decoding`` (the transformers and fake backends): the branches are rows of a lock-step
  session in this process, and `decode_branches` picks every token from their logits.
* ``guide_branches`` (vLLM, whose logits live in its engine process): `DriftGuide` describes the
  mixture as data (the weights, beta, and each prompt's branch contexts as token ids); the engine
  decodes the branches beside each request on a side model and applies the same `combine_logits`
  (`prefsteer.backends.vllm`). Both live in the guide kind `prefsteer.backends.guides.drift`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from prefsteer.attributes import Attribute, AttributeLibrary, load_library
from prefsteer.backends.base import GenerationConfig, Messages, ScoreRequest, UnsupportedOperation, require
from prefsteer.errors import PrefsteerError
from prefsteer.types import PreferencePair
# Drift's step as data (what an engine in another process runs) is the guide kind's, re-exported here
from prefsteer.backends.guides.drift import DriftGuide, check_drift_description, combine_logits  # noqa: F401
from prefsteer.methods.base import (Decoding, Method, MethodOutput, NotFittedError, OptionError, as_conversation,
                                    as_conversations, config_from_options, register_method, with_system,
                                    with_user_suffix)

PLACEMENTS = ("system", "user")


@dataclass
class DriftConfig:
    attributes: tuple[str, ...] | None = field(default=None, metadata={
        "help": "attribute names to use (default: the whole library)"})
    l2: float = field(default=0.01, metadata={
        "help": "L2 penalty on the weights, added to the mean Bradley-Terry loss"})
    beta: float = field(default=1.0, metadata={"help": "KL strength: decoding adds (1/beta) * reward"})
    system_template: str = field(default="You are an assistant. Your answers are: {description}.", metadata={
        "help": "an attribute's instruction; {name} and {description} are filled in"})
    placement: str = field(default="system", metadata={
        "help": "where the instruction goes: 'system' (the paper) or 'user' (appended to the user's "
                "turn, so the prompt is a shared prefix: faster)"})
    plain_system: str | None = field(default=None, metadata={
        "help": "system prompt of the plain branch h_plain (default: none, the template's own)"})
    include_base: bool = field(default=False, metadata={
        "help": "margins add the plain log-probability gap (the decoding distribution's preference)"})
    max_iter: int = field(default=200, metadata={"help": "LBFGS iterations of the Bradley-Terry fit"})
    threshold: float = field(default=1e-6, metadata={
        "help": "attributes with |w| at or below this get no decoding branch"})
    top_m: int = field(default=0, metadata={
        "help": "decode with at most this many attributes, the largest |w| (0: all active)"})
    # The paper's Drift (Appendix C.1.2) scores the attributes with a smaller instruction-tuned model
    # beside the large one (Llama-3.2-1B for Llama-3.1-8B, Qwen2.5-0.5B for Qwen2.5-7B). No package
    # ships a smaller model of the embedded SmolLM2-135M's tokenizer (the other causal LMs installable
    # offline are Gemma 3 270M base, without a chat template, and Qwen2.5-Coder-0.5B, larger and of
    # another vocabulary), so here these are checked with the same model in both roles.
    small_backend: str | None = field(default=None, metadata={
        "flag": "drift-backend",
        "help": "the small model's backend (hf, fake, ...), loaded beside the large one to score the "
                "attributes and decode their branches (the paper's slm_model); unset: the backend's own "
                "engine when --drift-model is given, else the large model does both"})
    small_model: str | None = field(default=None, metadata={
        "flag": "drift-model",
        "help": "the small model: a local path or hub name, loaded with --drift-backend (generation needs "
                "the large model's tokenizer; margins do not); unset: that backend's default model"})

    def __post_init__(self):
        if self.l2 < 0:
            raise ValueError(f"`l2` (={self.l2}) has to be non-negative")
        if not self.beta > 0:
            raise ValueError(f"`beta` (={self.beta}) has to be a strictly positive float")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"`placement` (={self.placement!r}) has to be one of {', '.join(PLACEMENTS)}")
        if self.top_m < 0:
            raise ValueError(f"`top_m` (={self.top_m}) has to be a non-negative integer")
        if self.attributes is not None:
            self.attributes = tuple([self.attributes] if isinstance(self.attributes, str) else self.attributes)


# -- the pure parts: features and the Bradley-Terry fit ----------------------------------------

def attribute_features(logp_attr: np.ndarray, logp_plain: np.ndarray) -> np.ndarray:
    """phi = h_i - h_plain: logp_attr (N, K) and logp_plain (N,) -> (N, K)."""
    return np.asarray(logp_attr, dtype=np.float64) - np.asarray(logp_plain, dtype=np.float64)[:, None]


def fit_bradley_terry(diffs: np.ndarray, l2: float = 0.01, max_iter: int = 200) -> np.ndarray:
    """Weights w (K,) of P(chosen > rejected) = sigmoid(w . d) for feature differences d (N, K).

    Logistic regression without intercept on the differences (label 1) and their negations
    (label 0), which is the same loss as mean(softplus(-D w)); plus ``l2 * |w|^2``. LBFGS in
    float64 from w = 0: deterministic.
    """
    import torch

    D = torch.as_tensor(np.asarray(diffs, dtype=np.float64))  # (N, K)
    if D.ndim != 2:
        raise ValueError(f"`diffs` has to be (N, K), got shape {tuple(D.shape)}")
    X = torch.cat([D, -D])                                     # (2N, K)
    y = torch.cat([torch.ones(len(D)), torch.zeros(len(D))]).double()
    w = torch.zeros(D.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    if len(D):
        opt.step(closure)
    return w.detach().numpy().copy()


def active_branches(weights: Sequence[float], threshold: float = 1e-6, top_m: int = 0) -> list[int]:
    """Indices of the attributes that get a decoding branch: |w| > threshold, the top_m largest."""
    idx = [i for i, w in enumerate(weights) if abs(w) > threshold]
    idx.sort(key=lambda i: -abs(weights[i]))
    return sorted(idx[:top_m] if top_m else idx)


# options that only shape decoding or margins, not what `fit` learns: a fitted user serves under any
DECODING_OPTIONS = ("beta", "include_base", "threshold", "top_m")


@register_method("drift")
class Drift(Method):
    """Options: the fields of `DriftConfig`; ``library`` (an AttributeLibrary or a JSON path);
    ``memory`` (a Memory: the weights are stored in it and scores cached); ``drift_backend`` (a
    separate small model for the attribute rewards, as a loaded backend; its tokenizer has to match
    the backend's for generation). Without ``drift_backend``, the config's ``small_backend`` /
    ``small_model`` (``--drift-backend`` / ``--drift-model``) name one, loaded by `load_small_backend`.

        >>> Drift(large, small_backend="hf", small_model="meta-llama/Llama-3.2-1B-Instruct")
    """

    config_class = DriftConfig
    resources = ("memory", "library", "progress")

    def __init__(self, backend, memory=None, library: AttributeLibrary | str | None = None,
                 drift_backend=None, config: DriftConfig | None = None, progress: bool = False,
                 **options: Any):
        super().__init__(backend, memory=memory, **options)
        lib = library if isinstance(library, AttributeLibrary) else load_library(library)
        self.config = config_from_options(DriftConfig, options, "drift", config)
        self.library = lib.subset(list(self.config.attributes)) if self.config.attributes else lib
        if drift_backend is None and (self.config.small_backend or self.config.small_model):
            c = self.config
            try:
                drift_backend = load_small_backend(backend, c.small_backend, c.small_model)
            except PrefsteerError as e:  # name the options that asked for it
                raise OptionError(f"method 'drift': the small model (--drift-backend {c.small_backend or '-'}, "
                                  f"--drift-model {c.small_model or '-'}): {e}") from e
        self.drift_backend = drift_backend if drift_backend is not None else backend
        if memory is not None:
            from prefsteer.backends.cache import ScoreCache
            self.scorer = ScoreCache(self.drift_backend, memory)
            self.base_scorer = self.scorer if self.drift_backend is backend else ScoreCache(backend, memory)
        else:
            self.scorer, self.base_scorer = self.drift_backend, backend
        self.progress = progress
        # this process's copy of the stored states
        self.weights: dict[str, dict[str, float]] = {}  # user -> attribute -> weight
        self.fit_info: dict[str, dict[str, Any]] = {}

    def state_options(self) -> dict[str, Any]:
        """The weights depend on the model that scored them, by its fingerprint, not on how it was
        named: a small model that is the large one (same fingerprint) keeps the id of a Drift without
        one, so the states stored before ``small_backend`` existed stay served."""
        opts = {k: v for k, v in asdict(self.config).items()
                if k not in DECODING_OPTIONS and k not in ("small_backend", "small_model")}
        opts["library"] = [(a.name, a.description) for a in self.library.attributes]
        if self.drift_backend is not self.backend and self.drift_backend.fingerprint != self.backend.fingerprint:
            opts["drift_backend"] = self.drift_backend.fingerprint
        return opts

    # -- contexts ---------------------------------------------------------------------------
    def instruction(self, attribute: Attribute) -> str:
        return self.config.system_template.format(name=attribute.name, description=attribute.description)

    def context(self, conversation: str | Messages, attribute: Attribute | None = None) -> list[dict]:
        """The chat context of the plain branch (``attribute=None``) or of one attribute's branch,
        for a prompt or a whole conversation: the attribute's instruction joins the system prompt
        (after the caller's own) or ends the last user turn, as ``placement`` says."""
        conv = as_conversation(conversation)
        if attribute is None:
            return with_system(conv, self.config.plain_system)
        if self.config.placement == "system":
            return with_system(conv, self.instruction(attribute))
        return with_system(with_user_suffix(conv, self.instruction(attribute)), self.config.plain_system)

    # -- features ---------------------------------------------------------------------------
    def features(self, pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray]:
        """(phi(y_w) - phi(y_l) (N, K), plain log-probability gap (N,)) for each pair."""
        require(self.drift_backend, "score", "drift's attribute features")
        K = len(self.library)
        reqs = []
        for p in pairs:
            for ctx in [self.context(p.prompt)] + [self.context(p.prompt, a) for a in self.library.attributes]:
                reqs += [ScoreRequest.of(ctx, p.chosen), ScoreRequest.of(ctx, p.rejected)]
        if not reqs:
            return np.zeros((0, K)), np.zeros(0)
        lp = np.array([s.logprob for s in self.scorer.score(reqs, progress=self.progress)])
        lp = lp.reshape(len(pairs), K + 1, 2)                   # (N, 1 + K, chosen/rejected)
        phi_w = attribute_features(lp[:, 1:, 0], lp[:, 0, 0])  # (N, K)
        phi_l = attribute_features(lp[:, 1:, 1], lp[:, 0, 1])
        return phi_w - phi_l, lp[:, 0, 0] - lp[:, 0, 1]

    def _weights(self, user_id: str | None) -> np.ndarray:
        if user_id is None:
            raise NotFittedError(self.name, None)
        if user_id not in self.weights:
            st = self.require_state(user_id)["state"]
            self.weights[user_id], self.fit_info[user_id] = st["weights"], st["fit"]
        w = self.weights[user_id]
        return np.array([w[n] for n in self.library.names])

    # -- the Method interface ---------------------------------------------------------------
    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        start = time.perf_counter()
        diffs, _ = self.features(pairs)
        scored = time.perf_counter()
        w = fit_bradley_terry(diffs, self.config.l2, self.config.max_iter)
        self.weights[user_id] = dict(zip(self.library.names, w.tolist()))
        self.fit_info[user_id] = {"pairs": len(pairs), "train_accuracy": float(np.mean(diffs @ w > 0))
                                  if len(pairs) else None, "scoring_seconds": scored - start,
                                  "fit_seconds": time.perf_counter() - scored}
        self.save_state(user_id, {"weights": self.weights[user_id], "fit": self.fit_info[user_id]},
                        n_pairs=len(pairs))

    def feedback(self, user_id: str, pairs: Sequence[PreferencePair]) -> str:
        """Refit the weights on all the user's stored pairs (the new ones are already among them):
        the features of the old pairs come from the score cache, so only the new pairs cost model calls."""
        if self.memory is None:
            return super().feedback(user_id, pairs)
        self.fit(user_id, self.memory.pairs(user_id))
        return "refit"

    def describe_state(self, state: dict) -> dict:
        ranked = sorted(state["weights"].items(), key=lambda kv: (-abs(kv[1]), kv[0]))
        return {"weights": [{"attribute": a, "weight": w} for a, w in ranked], **state["fit"]}

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        """w . (phi(y_w) - phi(y_l)): the paper's reward, the weighted sum of attribute
        log-ratios. ``include_base`` adds the plain log-probability gap, i.e. the preference of
        the decoding distribution p_base * exp(r / beta) (when the plain branch is the base): with a
        small model, p_base is the large model's, so the gap is the large model's."""
        w = self._weights(user_id)
        diffs, base_gap = self.features(pairs)
        m = diffs @ w
        if self.config.include_base:
            if self.drift_backend is not self.backend:
                base_gap = self._plain_gap(pairs)
            m = m / self.config.beta + base_gap
        return m.tolist()

    def _plain_gap(self, pairs: Sequence[PreferencePair]) -> np.ndarray:
        """The large model's log-probability gap (N,) of each pair under the plain context."""
        reqs = []
        for p in pairs:
            ctx = self.context(p.prompt)
            reqs += [ScoreRequest.of(ctx, p.chosen), ScoreRequest.of(ctx, p.rejected)]
        if not reqs:
            return np.zeros(0)
        lp = np.array([s.logprob for s in self.base_scorer.score(reqs)])
        return lp[0::2] - lp[1::2]

    def generate(self, user_id: str | None, conversations: Sequence[str | Messages],
                 config: GenerationConfig | None = None) -> list[MethodOutput]:
        from prefsteer.backends.sampling import seeded_generator

        config = config or GenerationConfig()
        convs = as_conversations(conversations)
        w = self._weights(user_id)
        backends = {id(self.backend): self.backend, id(self.drift_backend): self.drift_backend}.values()
        lock_step = all("start_decoding" in b.capabilities for b in backends)
        if not lock_step and "guide_branches" not in self.backend.capabilities:
            lacking = next(b for b in backends if "start_decoding" not in b.capabilities)
            raise UnsupportedOperation(lacking.name, "start_decoding", "drift generation (or, on an engine "
                                       "in another process, `guide_branches`)")
        attrs, weights = self._mixture(w)
        start = time.perf_counter()
        if lock_step:
            texts = []
            gen = seeded_generator(config)  # on the CPU: the combined logits are moved there to sample
            for conv in convs:  # one conversation at a time: its 1 + n branches are the batch
                branches = [self.context(conv)] + [self.context(conv, a) for a in attrs]
                texts.append(decode_branches(self.backend, self.drift_backend, conv, branches, weights,
                                             self.config.beta, config, gen))
        else:
            texts = self._generate_guided(convs, attrs, weights, config)
        secs = time.perf_counter() - start
        return [MethodOutput(t, [a.name for a in attrs], {"generation": secs},
                             {"weights": dict(zip([a.name for a in attrs], weights))}, conv)
                for t, conv in zip(texts, convs)]

    def decodings(self, user_id: str | None, conversations: list[Messages],
                  config: GenerationConfig) -> list[Decoding] | None:
        """Each conversation with its branches as a `DriftGuide` of one row, for an engine that
        decodes them beside the request (`Backend.stream`); None when the branches are on another
        model than the backend (`drift_backend`), which only lock-step decoding serves."""
        if self.drift_backend is not self.backend:
            return None
        attrs, weights = self._mixture(self._weights(user_id))
        names = [a.name for a in attrs]
        return [Decoding(list(conv), DriftGuide(weights, self.config.beta, self.backend.fingerprint,
                                                [self._branch_row(conv, attrs)[0]]) if attrs else None,
                         names, extra={"weights": dict(zip(names, weights))}) for conv in conversations]

    def _mixture(self, w: np.ndarray) -> tuple[list[Attribute], list[float]]:
        """The attributes that get a decoding branch, and their weights."""
        active = active_branches(w.tolist(), self.config.threshold, self.config.top_m)
        return [self.library.attributes[i] for i in active], [float(w[i]) for i in active]

    def _branch_row(self, conv: Messages, attrs: list[Attribute]) -> tuple[dict, int]:
        """The `DriftGuide` row of one conversation (its plain and attribute branches as token ids of
        the drift backend; the plain one None when it is the request's own context) and the longest
        of its contexts in tokens."""
        b, small = self.backend, self.drift_backend
        base_ids = b.encode_context(conv)
        if small is not b and small.encode_context(conv) != base_ids:
            raise OptionError("`drift_backend` has to share the backend's tokenizer for generation")
        plain_ids = small.encode_context(self.context(conv))
        branch_ids = [small.encode_context(self.context(conv, a)) for a in attrs]
        shared = small is b and plain_ids == base_ids
        longest = max(len(c) for c in [base_ids, plain_ids] + branch_ids)
        return {"plain_ids": None if shared else plain_ids, "branch_ids": branch_ids}, longest

    def _generate_guided(self, convs: Sequence[Messages], attrs: list[Attribute], weights: list[float],
                         config: GenerationConfig) -> list[str]:
        """All conversations in one `generate` call on an engine that runs the mixture itself
        (``guide_branches``), with the same contexts and step limit as `decode_branches`."""
        b, small = self.backend, self.drift_backend
        if not attrs:  # nothing to mix: the plain base distribution
            return [g.text for g in b.generate(list(convs), config)]
        rows, steps = [], []
        for conv in convs:
            row, longest = self._branch_row(conv, attrs)
            rows.append(row)
            steps.append(min(config.max_new_tokens, b.max_context - longest))
        texts: list[str | None] = [None] * len(convs)
        for n in sorted(set(steps)):  # one call per step limit (normally one call)
            idx = [i for i, s in enumerate(steps) if s == n]
            if n < 1:
                raise OptionError(f"prompt {idx[0]} leaves no room to generate in the model's "
                                  f"{b.max_context} tokens")
            guide = DriftGuide(weights, self.config.beta, small.fingerprint, [rows[i] for i in idx])
            gens = b.generate([convs[i] for i in idx], replace(config, max_new_tokens=n), guide=guide)
            for i, g in zip(idx, gens):
                texts[i] = g.text
        return texts


# engine settings a small model takes from the large one when both run on the same engine: where
# and in what precision it runs (transformers' float32 matmul precision is process-wide: a second
# setting would be refused)
_SHARED_ENGINE_SETTINGS = ("device", "dtype", "matmul_precision", "batch_size")


def load_small_backend(backend, name: str | None = None, model: str | None = None):
    """Drift's small model, loaded through `prefsteer.backends.load_backend`: engine ``name``
    (default: the large ``backend``'s) and ``model`` (a local path or hub name; default: the
    engine's default model). On the large model's engine it runs on the same device, in the same
    precision and batch size (`Backend.info`)."""
    from prefsteer.backends import load_backend

    name = name or backend.name
    kw: dict[str, Any] = {"model": model} if model else {}
    if name == backend.name:
        info = backend.info()
        kw.update({k: info[k] for k in _SHARED_ENGINE_SETTINGS if info.get(k) is not None})
    return load_backend(name, **kw)


def decode_branches(backend, small, base: Messages, branches: list[Messages], weights: list[float],
                    beta: float, config: GenerationConfig, gen) -> str:
    """Decode one prompt with all its branches in lock step (`Backend.start_decoding`).

    Rows: the base context (on ``backend``), then the plain context and each attribute's context
    (on ``small``, the drift backend). When the small model is the backend and the base context
    equals the plain one, the base row is the plain row: 1 + n rows per step.
    """
    import torch

    from prefsteer.backends.sampling import hold_end, sample_next

    base_ids = backend.encode_context(base)
    if small is not backend and small.encode_context(base) != base_ids:
        raise OptionError("`drift_backend` has to share the backend's tokenizer for generation")
    branch_ids = [small.encode_context(m) for m in branches]
    shared = small is backend and branch_ids[0] == base_ids
    steps = min(config.max_new_tokens, backend.max_context - max(len(c) for c in [base_ids] + branch_ids))
    eos = backend.eos_token_ids
    w = torch.tensor(weights)
    new: list[int] = []
    with torch.inference_mode():
        rows = small.start_decoding(branches)
        base_rows = None if shared else backend.start_decoding([base])
        for step in range(steps):
            branch_logits = rows.logits().float().cpu()                # (1 + n, V)
            base_logits = branch_logits[:1] if shared else base_rows.logits().float().cpu()
            logits = combine_logits(base_logits, branch_logits[:1], branch_logits[None, 1:], w, beta)
            tok = int(sample_next(hold_end(logits, config, step, eos), config, gen)[0])
            if tok in eos:
                break
            new.append(tok)
            if step == steps - 1:
                break
            rows.append([tok] * len(branches))
            if base_rows is not None:
                base_rows.append([tok])
    return backend.decode_tokens(new)
