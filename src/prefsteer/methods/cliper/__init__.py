"""CLIPer as a personalization method: classifier-guided decoding with any mix of preferences.

    >>> m = Cliper(backend, prefs="concise=1,humor=0.5", alpha=2.0, top_k=20)
    >>> m.generate("u1", ["Write a TL;DR of ..."])          # guided by the shipped classifiers
    >>> m = Cliper(backend, memory=Memory("memory.db"), alpha=2.0)
    >>> m.fit("u1", train_pairs)                             # the user's personal classifier, stored
    >>> m.margins("u1", test_pairs)                          # its pairwise scores
    >>> Cliper(backend, prefs="personal=1,concise=0.5").generate("u1", prompts)

``prefs`` names the classifiers (``concise``, ``humor``, ``formal``, ``empathetic``, ``helpful``,
any classifier trained with ``prefsteer cliper train``, and ``personal``: the user's own, once
fitted; it is stored in the memory, so any process serves it). Without a user, ``prefs`` alone
guides (the shipped classifiers); for a user whose personal classifier is stored, it joins the mix
with weight 1 unless ``prefs`` names it with another weight. With ``alpha=0`` the output is exactly
plain decoding. Guidance reads the whole conversation: the classifiers score each candidate token
on the model's hidden state over the full chat context.

``margins`` is the personal classifier's mean log-odds over the chosen answer's tokens minus the
same over the rejected answer's tokens (each read under the pair's prompt). The head is trained on
exactly that per-token evidence, and the mean keeps longer answers from winning by length alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from prefsteer.backends.base import GenerationConfig, Messages, require
from prefsteer.types import PreferencePair
from prefsteer.methods.base import Decoding, Method, NotFittedError, config_from_options, register_method

DEFAULT_ALPHA = 0.5  # `prefsteer cliper calibrate` (all five preferences) on SmolLM2-135M-Instruct: results/cliper/README.md
DEFAULT_TOP_K = 20
HEAD_FILE = "personal.safetensors"
# the options the personal classifier is trained under: a stored one serves under any prefs/alpha/top_k
FIT_OPTIONS = ("personal_rank", "personal_steps", "personal_weight_decay")


@dataclass
class CliperConfig:
    prefs: str | None = field(default=None, metadata={
        "help": "classifiers and weights, e.g. 'concise=1,humor=0.5' ('personal': the user's own; "
                "default: the personal one alone)"})
    alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "guidance strength (0: plain decoding)"})
    top_k: int = field(default=DEFAULT_TOP_K, metadata={"help": "candidate tokens re-scored per step",
                                                        "flag": "top-k-guidance"})
    personal_rank: int = field(default=4, metadata={"help": "rank of the personal classifier's bilinear term"})
    personal_steps: int = field(default=200, metadata={"help": "training steps of the personal classifier"})
    personal_weight_decay: float = field(default=0.05, metadata={
        "help": "L2 penalty of the personal classifier"})

    def __post_init__(self):
        from prefsteer.methods.cliper.guidance import check_alpha, check_top_k

        self.alpha = check_alpha(DEFAULT_ALPHA if self.alpha is None else self.alpha)
        self.top_k = check_top_k(DEFAULT_TOP_K if self.top_k is None else self.top_k)
        if self.personal_rank < 0:
            raise ValueError(f"`personal_rank` (={self.personal_rank}) has to be a non-negative integer")
        if self.personal_steps < 1:
            raise ValueError(f"`personal_steps` (={self.personal_steps}) has to be at least 1")
        if self.personal_weight_decay < 0:
            raise ValueError(f"`personal_weight_decay` (={self.personal_weight_decay}) has to be non-negative")


@register_method("cliper")
class Cliper(Method):
    """Options: the fields of `CliperConfig` (``prefs`` may also be a dict); ``classifier_dirs``
    (extra directories holding classifiers); ``memory`` (where personal classifiers are stored)."""

    config_class = CliperConfig
    resources = ("memory", "classifier_dirs")
    option_prefix = ""  # --prefs, --alpha, --top-k-guidance, --personal-rank, ...

    def __init__(self, backend, memory=None, config: CliperConfig | None = None,
                 classifier_dirs: Sequence[str] | None = None, **options: Any):
        from prefsteer.methods.cliper.prefs import parse_prefs

        super().__init__(backend, memory=memory, **options)
        self.config = config_from_options(CliperConfig, options, "cliper", config)
        self.classifier_dirs = list(classifier_dirs or [])
        extra = set(self._available())
        self.prefs = parse_prefs(self.config.prefs, known=extra)
        self.alpha, self.top_k = self.config.alpha, self.config.top_k
        self._heads: dict[str, Any] = {}     # name -> PreferenceHead, loaded once
        self._personal: dict[str, Any] = {}  # user_id -> PreferenceHead, this process's copy
        for name in self.prefs:  # fail now, with the classifier's own message, not mid-generation
            if name != "personal":
                self._head(name)

    def state_options(self) -> dict[str, Any]:
        return {k: getattr(self.config, k) for k in FIT_OPTIONS}

    def _available(self) -> list[str]:
        from prefsteer.methods.cliper.heads import available_classifiers

        try:
            return list(available_classifiers(self.backend.fingerprint, self.classifier_dirs, self._weights_id))
        except OSError:
            return []

    @property
    def _weights_id(self) -> str | None:
        """The backend's weights identity, where it has one: heads of its weights in another precision serve it."""
        return getattr(self.backend, "weights_id", None)

    def _head(self, name: str):
        from prefsteer.methods.cliper.heads import load_classifier

        if name not in self._heads:
            self._heads[name] = load_classifier(name, self.backend.fingerprint, self.classifier_dirs, self._weights_id)
        return self._heads[name]

    # -- the personal classifier ----------------------------------------------------------------
    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        from safetensors.torch import save

        from prefsteer.methods.cliper.train import TrainConfig, pair_items, train_classifier

        for op in ("hidden_states", "token_embeddings"):
            require(self.backend, op, "cliper's personal classifier")
        if not pairs:
            raise ValueError(f"user '{user_id}': no training pairs to fit the personal classifier on")
        c = self.config
        cfg = TrainConfig(rank=c.personal_rank, steps=c.personal_steps, weight_decay=c.personal_weight_decay,
                          val_fraction=0.0)
        head, _ = train_classifier(self.backend, pair_items(pairs), f"personal-{user_id}", cfg,
                                   data_description={"kind": "personal", "user_id": user_id,
                                                     "pairs": [p.pair_id for p in pairs]})
        self._personal[user_id] = head
        weights = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        self.save_state(user_id, {"hidden_size": head.hidden_size, "rank": head.rank, "meta": head.meta},
                        files={HEAD_FILE: save(weights)}, n_pairs=len(pairs))

    def _stored_head(self, user_id: str | None):
        """The user's personal classifier, from this process or the memory; None when there is none."""
        if user_id is None:
            return None
        if user_id not in self._personal:
            st = self.load_state(user_id)
            if st is None or HEAD_FILE not in st["files"]:
                return None
            from safetensors.torch import load

            from prefsteer.methods.cliper.heads import PreferenceHead

            s = st["state"]
            head = PreferenceHead(int(s["hidden_size"]), int(s["rank"]), s["meta"])
            head.load_state_dict(load(st["files"][HEAD_FILE]))
            head.eval()
            self._personal[user_id] = head
        return self._personal[user_id]

    def personal_head(self, user_id: str):
        head = self._stored_head(user_id)
        if head is None:
            raise NotFittedError(self.name, user_id)
        return head

    def describe_state(self, state: dict) -> dict:
        metrics = state["meta"].get("metrics", {}).get("final_train", {})
        return {"prefs": self.prefs or {"personal": 1.0}, "alpha": self.alpha, "top_k": self.top_k,
                "personal_accuracy": metrics.get("answer_accuracy"),
                "personal_token_accuracy": metrics.get("token_accuracy"),
                "personal_tokens": metrics.get("tokens"), "rank": state["rank"]}

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        import torch

        from prefsteer.methods.cliper.train import features, pair_items

        head = self.personal_head(user_id)
        if not pairs:
            return []
        require(self.backend, "hidden_states", "cliper's margins")
        items = pair_items(pairs)
        feats = features(self.backend, items)
        with torch.no_grad():
            z = head(feats["H"], feats["E"])                                   # (N,)
        n = len(items)
        sums = torch.zeros(n).index_add_(0, feats["item"], z)
        counts = torch.bincount(feats["item"], minlength=n).clamp_min(1).float()
        mean = (sums / counts).tolist()                                        # per answer
        return [mean[2 * i] - mean[2 * i + 1] for i in range(len(pairs))]

    # -- guided generation ------------------------------------------------------------------------
    def guide_for(self, user_id: str | None):
        """The ``CliperGuide`` for this user (None when there is nothing to guide with)."""
        from prefsteer.methods.cliper.heads import HeadBank
        from prefsteer.methods.cliper.guidance import CliperGuide

        prefs = dict(self.prefs)
        if "personal" not in prefs and self._stored_head(user_id) is not None:
            prefs["personal"] = 1.0
        if not prefs:
            return None, prefs
        require(self.backend, "token_embeddings", "cliper's guidance")
        heads = [self.personal_head(user_id) if n == "personal" else self._head(n) for n in prefs]
        guide = CliperGuide(HeadBank(heads), list(prefs.values()), self.alpha, self.top_k,
                            self.backend.token_embeddings(), self.backend.fingerprint)
        return guide, prefs

    def decodings(self, user_id: str | None, conversations: list[Messages],
                  config: GenerationConfig) -> list[Decoding]:
        guide, prefs = self.guide_for(user_id)
        if guide is None:
            raise NotFittedError(self.name, user_id, hint=(
                "cliper has no preference to guide with: pass `prefs` (e.g. 'concise=1,humor=0.5') "
                "or fit the user's personal classifier"))
        if self.alpha != 0:
            require(self.backend, "guide", "cliper's guided decoding")
        extra = {"prefs": prefs, "alpha": self.alpha, "top_k": self.top_k}
        return [Decoding(c, None if self.alpha == 0 else guide, extra=dict(extra)) for c in conversations]
