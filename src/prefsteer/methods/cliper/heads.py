"""Preference classifier heads: p(c | y_<=i, x) from the base model's state, with no extra forward.

The state h_{i-1} (d,) that the base model predicts token i from already summarises x and y_<i;
the candidate token y_i enters through its input embedding e (d,). A head is a logistic model

    logit p(c | y_<=i, x) = u·h' + v·e' + (A^T h')·(B^T e') + b,    h', e' standardised,

with a rank-r bilinear term, so scoring k candidates costs O(k·d·r) multiply-adds per preference:
nothing next to the base model's own step. Heads are saved as safetensors plus a JSON sidecar
(name, base-model fingerprint, training data, accuracy) and refuse to load for another model.

    >>> head = load_classifier("concise", backend.fingerprint)
    >>> bank = HeadBank([head, load_classifier("humor", backend.fingerprint)])
    >>> bank.logits(hidden, cand_emb)          # (B, d), (B, k, d) -> (B, 2, k)
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

# the bank folded from the heads, which an engine runs, is the guide kind's (beside the backends)
from prefsteer.backends.guides.cliper import HeadBank  # noqa: F401  (re-exported)
from prefsteer.errors import PrefsteerError

FORMAT = "prefsteer-cliper-head-v1"


class PreferenceHead(nn.Module):
    """One preference classifier; ``meta`` is the JSON sidecar (name, fingerprint, metrics...)."""

    def __init__(self, hidden_size: int, rank: int = 16, meta: dict[str, Any] | None = None):
        super().__init__()
        if rank < 0:
            raise ValueError(f"`rank` (={rank}) has to be a non-negative integer")
        d = hidden_size
        self.hidden_size, self.rank = d, rank
        self.meta: dict[str, Any] = dict(meta or {})
        # standardisation of the inputs (set from the training features)
        self.register_buffer("mu_h", torch.zeros(d))
        self.register_buffer("sd_h", torch.ones(d))
        self.register_buffer("mu_e", torch.zeros(d))
        self.register_buffer("sd_e", torch.ones(d))
        self.u = nn.Parameter(torch.zeros(d))
        self.v = nn.Parameter(torch.zeros(d))
        self.A = nn.Parameter(torch.randn(d, rank) * 0.01)  # (d, r)
        self.B = nn.Parameter(torch.randn(d, rank) * 0.01)  # (d, r)
        self.b = nn.Parameter(torch.zeros(()))

    @property
    def name(self) -> str:
        return str(self.meta.get("name", ""))

    def set_standardisation(self, h: torch.Tensor, e: torch.Tensor) -> None:
        """h, e (N, d): training features."""
        with torch.no_grad():
            self.mu_h.copy_(h.mean(0)); self.sd_h.copy_(h.std(0).clamp_min(1e-4))
            self.mu_e.copy_(e.mean(0)); self.sd_e.copy_(e.std(0).clamp_min(1e-4))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Paired scoring for training: h (N, d), e (N, d) -> log-odds (N,)."""
        h = (h - self.mu_h) / self.sd_h
        e = (e - self.mu_e) / self.sd_e
        return h @ self.u + e @ self.v + ((h @ self.A) * (e @ self.B)).sum(-1) + self.b


# -- saving and loading -------------------------------------------------------------------------

def fingerprint_slug(fingerprint: str) -> str:
    """A short, file-system-safe id of a model fingerprint (directory names)."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", fingerprint.split(":")[0])[:24].strip("-") or "model"
    return f"{stem}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:10]}"


def user_classifier_dir() -> Path:
    """Where `prefsteer cliper train` writes by default: $PREFSTEER_CLIPER_DIR or the user cache."""
    from prefsteer import paths

    return paths.user_classifier_dir()


def packaged_classifier_dir() -> Path:
    return Path(str(resources.files("prefsteer.resources").joinpath("cliper")))


def save_classifier(head: PreferenceHead, directory: str | Path) -> Path:
    """Write ``<dir>/<name>.safetensors`` and ``<dir>/<name>.json``; returns the weights path."""
    from safetensors.torch import save_file

    for key in ("name", "fingerprint"):
        if not head.meta.get(key):
            raise ValueError(f"the classifier's meta needs a '{key}' before it can be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{head.name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))
    meta = dict(head.meta, format=FORMAT, hidden_size=head.hidden_size, rank=head.rank)
    (directory / f"{head.name}.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    return path


def read_classifier(path: str | Path) -> PreferenceHead:
    """Load one head from its ``.safetensors`` (or ``.json``) path, whatever its fingerprint."""
    from safetensors.torch import load_file

    path = Path(path)
    weights, sidecar = path.with_suffix(".safetensors"), path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text("utf-8"))
    except OSError as e:
        raise FileNotFoundError(f"{sidecar}: cannot read the classifier's sidecar: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{sidecar}:{e.lineno}: malformed JSON: {e.msg}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{sidecar}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    head = PreferenceHead(int(meta["hidden_size"]), int(meta["rank"]), meta)
    head.load_state_dict(load_file(str(weights)))
    head.eval()
    return head


def _for_model(meta: dict, fingerprint: str, weights_id: str | None) -> bool:
    """Whether a head's sidecar is for this model: its fingerprint, or the same weights in another
    precision (``weights_id``, recorded by heads trained since it exists)."""
    return meta.get("fingerprint") == fingerprint or bool(weights_id and meta.get("weights_id") == weights_id)


def _head_dirs(dirs: Iterable[str | Path] | None, fingerprint: str, weights_id: str | None) -> list[Path]:
    """Where heads are looked for, in order: in each search root, the model's own sub-directory,
    the root itself and, given a weights id, every other sub-directory (the model's other precisions)."""
    out = []
    for root in _search_roots(dirs):
        subdirs = sorted(p for p in root.glob("*") if p.is_dir()) if weights_id and root.is_dir() else []
        out += [root / fingerprint_slug(fingerprint), root, *subdirs]
    return out


def _candidates(name: str, fingerprint: str, dirs: Iterable[str | Path] | None,
                weights_id: str | None = None) -> list[Path]:
    out = []
    for d in _head_dirs(dirs, fingerprint, weights_id):
        p = d / f"{name}.json"
        if p.is_file() and p not in out:
            out.append(p)
    return out


def load_classifier(name: str, fingerprint: str, dirs: Iterable[str | Path] | None = None,
                    weights_id: str | None = None) -> PreferenceHead:
    """Find the classifier ``name`` trained for the model ``fingerprint`` (or, given the model's
    ``weights_id``, for the same weights in another precision: a head trained on the float32 model
    serves it in bfloat16).

    Looks in ``dirs``, then the user's classifier directory, then the classifiers shipped with
    prefsteer (each directory and its ``<fingerprint-slug>/`` sub-directory). A classifier of that
    name trained for another model is refused with a message saying how to train one."""
    found = _candidates(name, fingerprint, dirs, weights_id)
    others, same_weights = [], None
    for sidecar in found:
        meta = json.loads(sidecar.read_text("utf-8"))
        if meta.get("fingerprint") == fingerprint:
            return read_classifier(sidecar)
        if same_weights is None and _for_model(meta, fingerprint, weights_id):
            same_weights = sidecar
        others.append(f"{sidecar} (for {meta.get('fingerprint')})")
    if same_weights is not None:
        return read_classifier(same_weights)
    if others:
        problem = (f"the classifier '{name}' was trained for another model: {'; '.join(others)}; "
                   f"this backend's fingerprint is {fingerprint}")
    else:
        problem = (f"no classifier '{name}' for model {fingerprint} (looked in "
                   f"{', '.join(str(p) for p in _search_roots(dirs))})")
    raise ClassifierNotFoundError(name, fingerprint, problem, sorted(_available_or_none(fingerprint, dirs, weights_id)))


class ClassifierNotFoundError(PrefsteerError, FileNotFoundError, ValueError):
    """No classifier of that name for this model (none at all, or only for other models). The
    message lists the heads this model has (``available``) and how to train the missing one."""

    def __init__(self, name: str, fingerprint: str, problem: str, available: Sequence[str]):
        from prefsteer.methods.cliper.prefs import PREFERENCES

        self.name, self.fingerprint, self.available = name, fingerprint, list(available)
        have = ", ".join(self.available) or "none"
        if name in PREFERENCES:
            todo = (f"train one for it with `prefsteer cliper train --prefs {name}` and the same --backend "
                    f"and --model (it is saved to {user_classifier_dir() / fingerprint_slug(fingerprint)}, "
                    "where CLIPer looks)")
        else:
            todo = (f"put a classifier trained for this model in {user_classifier_dir()} ($PREFSTEER_CLIPER_DIR) "
                    f"or pass its folder in `classifier_dirs` (`prefsteer cliper train` trains the built-in "
                    f"preferences: {', '.join(PREFERENCES)})")
        super().__init__(f"{problem}. Classifiers for this model: {have}. To use '{name}', {todo}")

    def __str__(self) -> str:  # OSError's own str would do, but be explicit: the message alone
        return str(self.args[0])


def _available_or_none(fingerprint: str, dirs: Iterable[str | Path] | None, weights_id: str | None = None) -> list[str]:
    try:
        return list(available_classifiers(fingerprint, dirs, weights_id))
    except OSError:
        return []


def _search_roots(dirs: Iterable[str | Path] | None) -> list[Path]:
    return [Path(d) for d in (dirs or [])] + [user_classifier_dir(), packaged_classifier_dir()]


def available_classifiers(fingerprint: str, dirs: Iterable[str | Path] | None = None,
                          weights_id: str | None = None) -> dict[str, Path]:
    """name -> sidecar path of every classifier trained for ``fingerprint`` or, given ``weights_id``,
    for the same weights in another precision (first found wins, the exact fingerprint first)."""
    exact: dict[str, Path] = {}
    same: dict[str, Path] = {}
    for d in _head_dirs(dirs, fingerprint, weights_id):
        if not d.is_dir():
            continue
        for sidecar in sorted(d.glob("*.json")):
            try:
                meta = json.loads(sidecar.read_text("utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if meta.get("format") != FORMAT:
                continue
            if meta.get("fingerprint") == fingerprint:
                exact.setdefault(str(meta.get("name")), sidecar)
            elif _for_model(meta, fingerprint, weights_id):
                same.setdefault(str(meta.get("name")), sidecar)
    return {**same, **exact}
