"""Prompts for CLIPer's training, calibration and evaluation, built from TL;DR posts.

Posts are read in place from ``../shared/data`` (never copied into the repository) and split by a
hash of the post id into disjoint parts, so classifiers, alpha and the evaluation never share a
prompt: 60% ``train``, 20% ``calibration``, 20% ``eval``. Short posts are preferred (CPU time).

    >>> prompts = tldr_prompts("train", n=64)                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SPLITS = {"train": range(0, 6), "calibration": range(6, 8), "eval": range(8, 10)}


def default_tldr_path() -> Path:
    """``../shared/data/tldr/batch13.json`` next to the repository (or $PREFSTEER_TLDR)."""
    from prefsteer import paths

    return paths.tldr_comparisons()


def split_of(post_id: str) -> str:
    bucket = int(hashlib.sha256(post_id.encode()).hexdigest(), 16) % 10
    return next(name for name, r in SPLITS.items() if bucket in r)


def tldr_prompts(split: str, n: int | None = None, path: str | Path | None = None,
                 max_chars: int = 1400) -> list[dict]:
    """``[{"post_id", "prompt"}]``: unique posts of ``split`` whose prompt has at most
    ``max_chars`` characters, in file order, the first ``n``."""
    from prefsteer.data import load_pairs

    if split not in SPLITS:
        raise ValueError(f"`split` (={split!r}) has to be one of {', '.join(SPLITS)}")
    path = Path(path) if path else default_tldr_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the TL;DR comparisons are not there; pass --data")
    seen, out = set(), []
    for p in load_pairs(path):
        pid = str(p.meta.get("post_id") or p.prompt)
        if pid in seen or len(p.prompt) > max_chars or split_of(pid) != split:
            continue
        seen.add(pid)
        out.append({"post_id": pid, "prompt": p.prompt})
    return out[:n] if n else out
