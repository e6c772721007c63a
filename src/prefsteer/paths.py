"""Every path prefsteer reads or writes by default, resolved in one place.

Each root can be moved by an environment variable:

    PREFSTEER_DB          the user memory: a SQLite file, or a postgresql:// URL
                                                     default $XDG_DATA_HOME/prefsteer/memory.db
    PREFSTEER_CACHE       caches: converted models, evaluation runs, CLIPer's answers
                                                     default $XDG_CACHE_HOME/prefsteer
    PREFSTEER_CLIPER_DIR  classifiers `prefsteer cliper train` writes
                                                     default <cache>/cliper
    PREFSTEER_TLDR        the TL;DR comparisons file CLIPer trains on
                                                     default ../shared/data/tldr/batch13.json

    >>> from prefsteer import paths
    >>> paths.cache_root().name
    'prefsteer'
"""

from __future__ import annotations

import os
from pathlib import Path

# src/prefsteer/paths.py -> the repository root of a source checkout (../shared/ sits beside it)
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_ROOT = REPO_ROOT.parent / "shared"


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


def default_db_path() -> Path:
    if os.environ.get("PREFSTEER_DB"):
        return Path(os.environ["PREFSTEER_DB"])
    return _xdg("XDG_DATA_HOME", ".local/share") / "prefsteer" / "memory.db"


def cache_root() -> Path:
    env = os.environ.get("PREFSTEER_CACHE")
    return Path(env) if env else _xdg("XDG_CACHE_HOME", ".cache") / "prefsteer"


def model_cache_dir() -> Path:
    """Where GGUF models are kept once converted to safetensors."""
    return cache_root() / "models"


def eval_run_dir(config_name: str, fingerprint: str) -> Path:
    return cache_root() / "eval" / f"{config_name}-{fingerprint.replace(':', '-')[:24]}"


def cliper_answers_dir() -> Path:
    return cache_root() / "cliper-eval"


def user_classifier_dir() -> Path:
    """Where `prefsteer cliper train` writes by default."""
    env = os.environ.get("PREFSTEER_CLIPER_DIR")
    return Path(env) if env else cache_root() / "cliper"


def tldr_comparisons() -> Path:
    env = os.environ.get("PREFSTEER_TLDR")
    return Path(env) if env else SHARED_ROOT / "data" / "tldr" / "batch13.json"
