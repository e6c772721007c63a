"""Per-user train/test splits and user selection for the evaluation protocol (EXACT §6).

Every random choice is seeded by a string (``random.Random(f"{seed}:{user_id}")``), which Python
hashes with SHA-512: results depend only on the seed and the data, not on ``PYTHONHASHSEED``, and
one user's split does not change when other users are added or removed.

    >>> from prefsteer.types import PreferencePair
    >>> pairs = [PreferencePair("u", f"p{i}", "a", "b", f"id{i}") for i in range(10)]
    >>> train, test = train_test_split(pairs, seed=0)
    >>> len(train), len(test)
    (8, 2)
"""

from __future__ import annotations

import logging
import random
from typing import Iterable, Mapping, Sequence

from prefsteer.errors import InputError
from prefsteer.types import PreferencePair

log = logging.getLogger(__name__)


def _by_user(pairs: Iterable[PreferencePair]) -> dict[str, list[PreferencePair]]:
    by_user: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        by_user.setdefault(p.user_id, []).append(p)
    return by_user


def _test_size(n: int, test_fraction: float) -> int:
    """max(1, round(n * f)), leaving at least one training pair when the user has two or more."""
    k = max(1, round(n * test_fraction))
    return min(k, n - 1) if n >= 2 else k


def train_test_split(pairs: Sequence[PreferencePair], seed: int, test_fraction: float = 0.2,
                     group_by_prompt: bool = False) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split every user's pairs after a seeded shuffle; test size = ``max(1, round(n * f))``.

    With ``group_by_prompt=True`` a user's pairs that share a prompt stay on one side (whole prompt
    groups are drawn for the test set until it reaches the target size, so sizes are approximate).
    Grouping is per user: the same prompt may fall on different sides for two different users.
    Both lists keep the input order (users in order of first appearance, pairs in file order).
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 < test_fraction < 1:
        raise InputError(f"`test_fraction` (={test_fraction!r}) has to be a number in (0, 1)",
                         field="test_fraction")
    test_ids: set[int] = set()  # id() of the test pairs: PreferencePair equality ignores meta
    for user_id, user_pairs in _by_user(pairs).items():
        rng = random.Random(f"{seed}:{user_id}")
        n = len(user_pairs)
        target = _test_size(n, test_fraction)
        if not group_by_prompt:
            order = list(range(n))
            rng.shuffle(order)
            test_ids.update(id(user_pairs[i]) for i in order[:target])
            continue
        groups: dict[str, list[PreferencePair]] = {}
        for p in user_pairs:
            groups.setdefault(p.prompt, []).append(p)
        members = list(groups.values())
        rng.shuffle(members)
        taken = 0
        for i, group in enumerate(members):
            if taken >= target or (i == len(members) - 1 and taken > 0):
                break  # the last group stays in train unless the test set is still empty
            test_ids.update(id(p) for p in group)
            taken += len(group)
    train = [p for p in pairs if id(p) not in test_ids]
    test = [p for p in pairs if id(p) in test_ids]
    return train, test


def select_users(pairs_by_user: Mapping[str, Sequence[PreferencePair]] | Iterable[PreferencePair],
                 n_users: int = 10, min_pairs: int = 20, max_pairs: int = 100,
                 seed: int = 0) -> list[str]:
    """Users with ``min_pairs..max_pairs`` pairs (inclusive), ``n_users`` of them sampled by seed.

    Eligible ids are sorted, then ``random.Random(f"select_users:{seed}").sample`` draws from them;
    the result is returned sorted. With fewer eligible users than ``n_users`` all of them are
    returned and a warning is logged.
    """
    if not isinstance(pairs_by_user, Mapping):
        pairs_by_user = _by_user(pairs_by_user)
    if n_users < 1:
        raise InputError(f"`n_users` (={n_users}) has to be at least 1", field="n_users")
    if min_pairs > max_pairs:
        raise InputError(f"`min_pairs` (={min_pairs}) is larger than `max_pairs` (={max_pairs})",
                         field="min_pairs")
    eligible = sorted(u for u, ps in pairs_by_user.items() if min_pairs <= len(ps) <= max_pairs)
    if len(eligible) <= n_users:
        if len(eligible) < n_users:
            log.warning("only %d of %d users have %d..%d pairs (asked for %d); taking all of them",
                        len(eligible), len(pairs_by_user), min_pairs, max_pairs, n_users)
        return eligible
    return sorted(random.Random(f"select_users:{seed}").sample(eligible, n_users))
