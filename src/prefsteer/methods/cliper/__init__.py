"""CLIPer as a personalization method: classifier-guided decoding with any mix of preferences.

    >>> m = Cliper(backend, prefs="concise=1,humor=0.5", alpha=2.0, top_k=20)
    >>> m.generate("u1", ["Write a TL;DR of ..."])          # guided by the shipped classifiers
    >>> m.fit("u1", train_pairs)                             # the user's personal classifier
    >>> m.margins("u1", test_pairs)                          # its pairwise scores
    >>> Cliper(backend, prefs="personal=1,concise=0.5").generate("u1", prompts)

``prefs`` names the classifiers (``concise``, ``humor``, ``formal``, ``empathetic``, ``helpful``,
any classifier trained with ``prefsteer cliper train``, and ``personal``: the user's own, once
fitted). Without ``prefs``, a fitted user is guided by their personal classifier alone; with
``alpha=0`` the output is exactly plain decoding.

``margins`` is the personal classifier's mean log-odds over the chosen answer's tokens minus the
same over the rejected answer's tokens (each read under the pair's prompt). The head is trained on
exactly that per-token evidence, and the mean keeps longer answers from winning by length alone.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from prefsteer.backends.base import GenerationConfig, user_turn
from prefsteer.types import PreferencePair
from prefsteer.methods.base import Method, MethodOutput, register_method

DEFAULT_ALPHA = 0.5  # `prefsteer cliper calibrate` (all five preferences) on SmolLM2-135M-Instruct: results/cliper/README.md
DEFAULT_TOP_K = 20


@register_method("cliper")
class Cliper(Method):
    """Options: ``prefs`` (str or dict), ``alpha`` (>= 0), ``top_k`` (>= 1), ``classifier_dirs``
    (extra directories holding classifiers), ``personal_rank`` / ``personal_steps`` (the personal
    head's size and training steps)."""

    def __init__(self, backend, prefs: str | dict[str, float] | None = None, alpha: float | None = None,
                 top_k: int | None = None, classifier_dirs: Sequence[str] | None = None, **options: Any):
        from prefsteer.methods.cliper.guidance import check_alpha, check_top_k
        from prefsteer.methods.cliper.prefs import parse_prefs

        super().__init__(backend, **options)
        self.classifier_dirs = list(classifier_dirs or [])
        extra = set(self._available())
        self.prefs = parse_prefs(prefs, known=extra)
        self.alpha = check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
        self.top_k = check_top_k(DEFAULT_TOP_K if top_k is None else top_k)
        self._heads: dict[str, Any] = {}     # name -> PreferenceHead, loaded once
        self._personal: dict[str, Any] = {}  # user_id -> PreferenceHead
        for name in self.prefs:  # fail now, with the classifier's own message, not mid-generation
            if name != "personal":
                self._head(name)

    def _available(self) -> list[str]:
        from prefsteer.methods.cliper.heads import available_classifiers

        try:
            return list(available_classifiers(self.backend.fingerprint, self.classifier_dirs))
        except OSError:
            return []

    def _head(self, name: str):
        from prefsteer.methods.cliper.heads import load_classifier

        if name not in self._heads:
            self._heads[name] = load_classifier(name, self.backend.fingerprint, self.classifier_dirs)
        return self._heads[name]

    # -- the personal classifier ----------------------------------------------------------------
    def fit(self, user_id: str, pairs: Sequence[PreferencePair]) -> None:
        from prefsteer.methods.cliper.train import TrainConfig, pair_items, train_classifier

        if not pairs:
            raise ValueError(f"user '{user_id}': no training pairs to fit the personal classifier on")
        cfg = TrainConfig(rank=int(self.options.get("personal_rank", 4)),
                          steps=int(self.options.get("personal_steps", 200)),
                          weight_decay=float(self.options.get("personal_weight_decay", 0.05)),
                          val_fraction=0.0)
        head, _ = train_classifier(self.backend, pair_items(pairs), f"personal-{user_id}", cfg,
                                   data_description={"kind": "personal", "user_id": user_id,
                                                     "pairs": [p.pair_id for p in pairs]})
        self._personal[user_id] = head

    def personal_head(self, user_id: str):
        from prefsteer.errors import UnknownUserError

        if user_id not in self._personal:
            raise UnknownUserError(user_id, sorted(self._personal))
        return self._personal[user_id]

    def margins(self, user_id: str, pairs: Sequence[PreferencePair]) -> list[float]:
        import torch

        from prefsteer.methods.cliper.train import features, pair_items

        head = self.personal_head(user_id)
        if not pairs:
            return []
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
        if not prefs and user_id in self._personal:
            prefs = {"personal": 1.0}
        if not prefs:
            return None, prefs
        heads = [self.personal_head(user_id) if n == "personal" else self._head(n) for n in prefs]
        guide = CliperGuide(HeadBank(heads), list(prefs.values()), self.alpha, self.top_k,
                            self.backend.token_embeddings())
        return guide, prefs

    def generate(self, user_id: str, prompts: Sequence[str],
                 config: GenerationConfig | None = None) -> list[MethodOutput]:
        guide, prefs = self.guide_for(user_id)
        if guide is None:
            raise ValueError("cliper: no preference to guide with: pass `prefs` (e.g. "
                             "'concise=1,humor=0.5') or fit the user's personal classifier first")
        start = time.perf_counter()
        gens = self.backend.generate([user_turn(p) for p in prompts], config,
                                     guide=None if self.alpha == 0 else guide)
        secs = time.perf_counter() - start
        extra = {"prefs": prefs, "alpha": self.alpha, "top_k": self.top_k}
        return [MethodOutput(g.text, [], {"generation": secs}, dict(extra)) for g in gens]
