import itertools

import pytest

from prefsteer.attributes import inject, load_library
from prefsteer.backends import ScoreRequest, user_turn
from prefsteer.methods.exact.select import (exhaustive_select, greedy_select, lazy_greedy_select, make_objective,
                                      pair_requests, screened_greedy_select)


def additive(weights, interaction=None):
    """F(A) = sum of per-attribute weights (+ pairwise interactions): greedy's answer is known."""
    calls = []

    def f(sets):
        calls.append(len(sets))
        out = []
        for s in sets:
            v = sum(weights[a] for a in s)
            if interaction:
                v += sum(interaction.get(frozenset(p), 0.0) for p in itertools.combinations(s, 2))
            out.append(v)
        return out
    f.calls = calls
    return f


def test_greedy_picks_the_largest_weights_in_order_and_keeps_gains():
    f = additive({"A": 1.0, "B": 3.0, "C": -2.0, "D": 2.0})
    sel = greedy_select(f, ["A", "B", "C", "D"], k=3)
    assert sel.attributes == ("B", "D", "A")
    assert sel.gains == [3.0, 2.0, 1.0]
    assert sel.objective == 6.0 and sel.base_objective == 0.0
    # F(∅) + 4 singletons in one call, then 3 and 2 candidates: the paper's K + (K-1) + (K-2)
    assert f.calls == [5, 3, 2]
    assert sel.evaluations == 1 + 4 + 3 + 2


def test_greedy_stop_when_no_gain_stops_before_a_harmful_attribute():
    f = additive({"A": 1.0, "B": -1.0, "C": -2.0})
    assert greedy_select(f, ["A", "B", "C"], k=3, stop_when_no_gain=True).attributes == ("A",)
    assert greedy_select(f, ["A", "B", "C"], k=3).attributes == ("A", "B", "C")


def test_exhaustive_finds_an_interaction_greedy_misses():
    # A alone is best, but B and C together are better than anything with A
    f = additive({"A": 2.0, "B": 1.0, "C": 1.0}, {frozenset("BC"): 3.0})
    g = greedy_select(f, "ABC", k=2)
    e = exhaustive_select(f, "ABC", k=2)
    assert g.attributes[0] == "A" and g.objective == 3.0
    assert e.attributes == ("B", "C") and e.objective == 5.0
    assert e.gains == [1.0, 4.0]  # along the subset's own order
    assert e.evaluations == 1 + 3 + 1


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="`k` \\(=0\\)"):
        greedy_select(additive({"A": 1}), ["A"], k=0)


def test_objective_is_the_chosen_minus_rejected_gap_under_injected_attributes(fake_backend):
    lib = load_library()
    prompt, chosen, rejected = "tell me about my day", "a funny humor joke", "a formal dear sir"
    f = make_objective(fake_backend, prompt, chosen, rejected, lib)
    got = f([(), ("Humor",), ("Formal", "Concise")])
    for attrs, value in zip([(), ("Humor",), ("Formal", "Concise")], got):
        msgs = user_turn(inject(prompt, attrs, lib))
        w, l = fake_backend.score([ScoreRequest.of(msgs, chosen), ScoreRequest.of(msgs, rejected)])
        assert value == pytest.approx(w.logprob - l.logprob)
    # the toy model rewards words present in the context: Humor helps "funny humor", Formal hurts
    assert got[1] > got[0] > got[2]


def test_greedy_on_the_toy_model_selects_the_attribute_named_in_the_preferred_reply(fake_backend):
    lib = load_library()
    f = make_objective(fake_backend, "tell me about my day", "humor humor humor", "formal formal formal", lib)
    sel = greedy_select(f, lib.names, k=1)
    assert sel.attributes == ("Humor",)
    assert sel.gains[0] > 0


def test_pair_requests_order_and_rendering():
    reqs = pair_requests("Q", "W", "L", [(), ("Concise",)])
    assert [r.continuation for r in reqs] == ["W", "L", "W", "L"]
    assert reqs[2].messages[-1] == ("user", "Q\nAttributes: <Concise>")
    assert reqs[0].messages[-1] == ("user", "Q")


def test_lazy_greedy_matches_greedy_on_a_submodular_objective_with_fewer_evaluations():
    # additive + negative interactions: marginal gains only shrink, so lazy must agree exactly
    weights = {a: w for a, w in zip("ABCDEFGHIJ", [1.0, 3.0, -2.0, 2.5, 0.5, 2.9, 0.1, -1.0, 0.7, 1.2])}
    inter = {frozenset("BF"): -2.5, frozenset("BD"): -0.2, frozenset("DA"): -0.4}
    g = greedy_select(additive(weights, inter), list(weights), k=3)
    f = additive(weights, inter)
    lz = lazy_greedy_select(f, list(weights), k=3, batch=2)
    assert lz.attributes == g.attributes == ("B", "D", "J")
    assert lz.gains == pytest.approx(g.gains) and lz.objective == pytest.approx(g.objective)
    assert lz.evaluations < g.evaluations
    assert lz.evaluations == 1 + 10 + sum(f.calls[1:])


def test_lazy_greedy_can_miss_greedy_when_gains_grow():
    # C is useless alone but strong with B: greedy re-scores C at step 2 and takes it; lazy stops
    # once a fresh gain beats C's stale bound, so it may pick differently (the measured caveat).
    weights = {"A": 1.0, "B": 3.0, "C": -1.0, "D": 0.9}
    inter = {frozenset("BC"): 5.0}
    assert greedy_select(additive(weights, inter), list(weights), k=2).attributes == ("B", "C")
    lz = lazy_greedy_select(additive(weights, inter), list(weights), k=2, batch=1)
    assert lz.attributes == ("B", "A") and lz.evaluations == 1 + 4 + 1  # A alone re-scored at step 2


def test_lazy_greedy_stops_without_gain_and_rejects_bad_arguments():
    f = additive({"A": 1.0, "B": -3.0})
    assert lazy_greedy_select(f, ["A", "B"], k=2, stop_when_no_gain=True).attributes == ("A",)
    with pytest.raises(ValueError, match="`k`"):
        lazy_greedy_select(f, ["A"], k=0)
    with pytest.raises(ValueError, match="`batch`"):
        lazy_greedy_select(f, ["A"], k=1, batch=0)


def test_ordered_exhaustive_never_loses_to_greedy_when_order_matters():
    # F depends on the order the attributes are listed in: a bonus when B comes before A
    def f(sets):
        return [sum({"A": 1.0, "B": 2.0, "C": 0.5}[a] for a in s) +
                (1.5 if "A" in s and "B" in s and s.index("B") < s.index("A") else 0.0) for s in sets]

    g = greedy_select(f, ["A", "B", "C"], k=2)  # picks B, then A: F = 4.5
    subsets = exhaustive_select(f, ["A", "B", "C"], k=2)  # (A, B) in library order: F = 3.0
    ordered = exhaustive_select(f, ["A", "B", "C"], k=2, ordered=True)
    assert g.attributes == ("B", "A") and g.objective == 4.5
    assert subsets.attributes == ("A", "B") and subsets.objective == 3.0
    assert ordered.attributes == ("B", "A") and ordered.objective == 4.5
    assert ordered.evaluations == 1 + 6 + 1  # plain, 3P2 tuples, the one-attribute prefix


def test_greedy_continues_or_cuts_an_earlier_selection_and_returns_what_a_fresh_search_does():
    weights = {"A": 1.0, "B": 3.0, "C": -2.0, "D": 2.0, "E": 0.5, "F": -0.5}
    inter = {frozenset("BE"): 2.5, frozenset("AD"): -1.5, frozenset("CF"): 4.0}
    names = list(weights)
    fresh = {k: greedy_select(additive(weights, inter), names, k) for k in (1, 2, 5)}
    short = fresh[2]
    f = additive(weights, inter)
    longer = greedy_select(f, names, 5, start=short)
    assert (longer.attributes, longer.gains) == (fresh[5].attributes, fresh[5].gains)
    assert longer.objective == pytest.approx(fresh[5].objective)
    assert longer.base_objective == fresh[5].base_objective
    assert f.calls == [4, 3, 2] and longer.evaluations == 9  # steps 3..5 only
    g = additive(weights, inter)
    cut = greedy_select(g, names, 1, start=fresh[5])
    assert g.calls == [] and cut.evaluations == 0  # nothing scored
    assert (cut.attributes, cut.gains) == (fresh[1].attributes, fresh[1].gains)
    assert cut.objective == pytest.approx(fresh[1].objective)
    with pytest.raises(ValueError, match="outside the candidates"):
        greedy_select(additive(weights), ["A", "C"], 2, start=short)


def test_screened_greedy_with_every_candidate_is_greedy():
    weights = {"A": 1.0, "B": 3.0, "C": -2.0, "D": 2.0}
    f = additive(weights)
    sel = screened_greedy_select(f, list(weights), k=3, screen=additive({a: -w for a, w in weights.items()}),
                                 top=4)
    g = greedy_select(additive(weights), list(weights), k=3)
    assert (sel.attributes, sel.objective, sel.base_objective, sel.gains) == \
        (g.attributes, g.objective, g.base_objective, g.gains)
    assert f.calls == [1 + 4, 3, 2]  # F(∅) rides with the first step's short list


def test_screened_greedy_picks_by_the_objective_among_the_screens_best():
    # the screen swaps B and D: with top=1 it follows the screen, with top=2 the objective decides
    weights = {"A": 1.0, "B": 3.0, "C": -2.0, "D": 2.0}
    rough = additive({"A": 1.0, "B": 2.0, "C": -2.0, "D": 3.0})
    one = screened_greedy_select(additive(weights), list(weights), k=2, screen=rough, top=1)
    assert one.attributes == ("D", "B") and one.gains == [2.0, 3.0] and one.evaluations == 1 + 1 + 1
    f = additive(weights)
    two = screened_greedy_select(f, list(weights), k=2, screen=rough, top=2)
    assert two.attributes == ("B", "D") and two.objective == 5.0 and two.gains == [3.0, 2.0]
    assert f.calls == [1 + 2, 2] and two.evaluations == 1 + 2 + 2
    # objectives are the objective's own, never the screen's
    scaled = screened_greedy_select(additive(weights), list(weights), k=2,
                                    screen=additive({a: 10 * w + 5 for a, w in weights.items()}), top=1)
    assert scaled.attributes == ("B", "D") and scaled.objective == 5.0 and scaled.base_objective == 0.0


def test_screened_greedy_stops_without_gain_and_rejects_bad_arguments():
    f = additive({"A": 1.0, "B": -1.0})
    assert screened_greedy_select(f, ["A", "B"], k=2, stop_when_no_gain=True, screen=f, top=1).attributes == ("A",)
    empty = screened_greedy_select(additive({}), [], k=2, screen=f)
    assert empty.attributes == () and empty.objective == 0.0 and empty.evaluations == 1
    with pytest.raises(ValueError, match="`top` \\(=0\\)"):
        screened_greedy_select(f, ["A"], k=1, screen=f, top=0)
    with pytest.raises(ValueError, match="needs a `screen`"):
        screened_greedy_select(f, ["A"], k=1)
