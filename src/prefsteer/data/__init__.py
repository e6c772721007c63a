"""Preference data: loaders (JSONL, TL;DR comparisons, PRISM), prompts and per-user splits.

    >>> from prefsteer.data import load_pairs, group_by_user, train_test_split
    >>> pairs = load_pairs("../shared/data/tldr/batch13.json")            # doctest: +SKIP
    >>> train, test = train_test_split(pairs, seed=0)                     # doctest: +SKIP
"""

from prefsteer.data.loaders import (FORMATS, detect_format, group_by_user, load_jsonl, load_pairs, load_prism,
                      load_tldr_comparisons)
from prefsteer.data.prompts import TLDR_REQUEST, for_display, tldr_prompt
from prefsteer.data.splits import select_users, train_test_split

__all__ = ["FORMATS", "TLDR_REQUEST", "detect_format", "for_display", "group_by_user", "load_jsonl",
           "load_pairs", "load_prism", "load_tldr_comparisons", "select_users", "tldr_prompt",
           "train_test_split"]
