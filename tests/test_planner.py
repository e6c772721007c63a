"""The scoring planner's pure functions on hand-made token lists: exact groupings, savings, batches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from prefsteer.backends.hf.planner import (PREFIX_OVERHEAD, balanced_batches, left_pad, plan_groups,  # noqa: E402
                                           plan_savings, shared_prefix)

P20 = list(range(100, 120))  # a 20-token prefix


def test_two_contexts_sharing_more_than_the_overhead_are_grouped():
    ctxs = [P20 + [1, 2], P20 + [3], [200, 9]]
    groups = plan_groups(ctxs)
    assert groups == [(20, [0, 1]), (0, [2])]
    assert plan_savings(ctxs, groups) == 20


def test_a_prefix_that_saves_less_than_the_overhead_is_not_shared():
    p = list(range(10))  # 10 shared tokens: one more forward costs 16
    assert plan_groups([p + [1], p + [2]]) == [(0, [0]), (0, [1])]
    # three contexts save 2 * 10 = 20 > 16: worth it
    assert plan_groups([p + [1], p + [2], p + [3]]) == [(10, [0, 1, 2])]
    assert PREFIX_OVERHEAD == 16


def test_every_context_keeps_a_token_outside_the_prefix():
    # the first context is the prefix itself: the group's prefix stops one token short of it
    assert plan_groups([P20, P20 + [7]]) == [(19, [0, 1])]


def test_the_program_picks_two_long_prefixes_over_one_short_one():
    a, b = [1] * 5 + [2] * 35, [1] * 5 + [3] * 35  # the two families share 5 tokens, each family 40
    ctxs = [b + [8], a + [8], b + [9], a + [9]]
    groups = plan_groups(ctxs)
    assert groups == [(40, [1, 3]), (40, [0, 2])]  # sorted by content: the a-family first
    assert plan_savings(ctxs, groups) == 80


def test_the_program_picks_one_shared_prefix_when_it_saves_more():
    a, b = [1] * 30 + [2] * 4, [1] * 30 + [3] * 4  # families share 30 tokens, each family 34
    ctxs = [a + [8], a + [9], b + [8], b + [9]]
    groups = plan_groups(ctxs)
    assert groups == [(30, [0, 1, 2, 3])]  # 3 * 30 - 16 = 74 beats 2 * (34 - 16) = 36
    assert plan_savings(ctxs, groups) == 90


def test_the_window_bounds_each_program():
    ctxs = [P20 + [i] for i in range(3)]
    assert plan_groups(ctxs) == [(20, [0, 1, 2])]
    assert plan_groups(ctxs, window=2) == [(20, [0, 1]), (0, [2])]


def test_batches_respect_rows_and_tokens_and_keep_order():
    assert balanced_batches([1, 2, 3, 4, 5], batch_size=2) == [[0, 1], [2, 3], [4]]
    assert balanced_batches([10, 10, 10, 10], batch_size=4, max_tokens=20) == [[0, 1], [2, 3]]
    # one long row: batches shrink until each fits the token budget (or holds one row)
    assert balanced_batches([1, 1, 1, 30], batch_size=4, max_tokens=40) == [[0], [1], [2], [3]]
    assert balanced_batches([5, 5, 5], batch_size=8, max_tokens=100) == [[0, 1, 2]]


def test_shared_prefix_of_a_generation_batch():
    assert shared_prefix([P20 + [1], P20 + [2, 3]]) == 20
    assert shared_prefix([P20, P20 + [2, 3]]) == 19  # the shortest prompt keeps one token
    assert shared_prefix([list(range(10)) + [1], list(range(10)) + [2]]) == 0  # not worth one more forward
    assert shared_prefix([P20 + [1]]) == 0  # a single prompt has nothing to share


def test_left_pad_ends_every_row_at_the_last_column():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long
