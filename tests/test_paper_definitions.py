"""The paper's definitions (issue 30) on hand-made numbers: every expected value is worked out by hand
in the comment beside it, never by calling the code under test.

* obj_match > 0 (Appendix C.5.2) anchored at the plain prompt and at the `base` method's margin;
* Table 7 as Eq. 12 defines it: F anchored at the plain prompt, means over all pairs, r a ratio of
  means, beside the project's improvement share and raw ratio;
* the win-rate judge's history cap: configurable, validated, 0 lifts it, the report states it.
"""

import json

import pytest

from prefsteer.errors import InputError
from prefsteer.evaluation.judge import LocalJudge, OpenAIJudge, cap_text, judge_messages
from prefsteer.evaluation.metrics import (anchor_to, anchored_objective, improvement_share, pairwise_accuracy,
                                          summarize, table7_summary)
from prefsteer.evaluation.protocol import config_from_dict, load_config
from prefsteer.evaluation.report import write_report
from prefsteer.types import PreferencePair

# one user's four test pairs: margins under EXACT, the plain prompt and the Base method's history prompt
EXACT = [2.0, -1.0, 0.5, -3.0]
PLAIN = [1.0, -2.0, 0.5, -1.0]
BASE = [3.0, -4.0, 0.0, -5.0]


def test_obj_match_against_either_anchor():
    # EXACT - plain = [1.0, 1.0, 0.0, -2.0]
    assert anchored_objective(EXACT, PLAIN) == [1.0, 1.0, 0.0, -2.0]
    # > 0 on pairs 1 and 2 of 4 (a tie is not an improvement): 2/4
    assert improvement_share(EXACT, PLAIN) == 0.5
    # EXACT - base = [-1.0, 3.0, 0.5, 2.0]: > 0 on pairs 2, 3, 4: 3/4
    assert anchored_objective(EXACT, BASE) == [-1.0, 3.0, 0.5, 2.0]
    assert improvement_share(EXACT, BASE) == 0.75
    # the project's pairwise accuracy: margins 2.0 and 0.5 are > 0: 2/4
    assert pairwise_accuracy(EXACT) == 0.5
    with pytest.raises(ValueError, match="anchor margins"):
        anchored_objective([1.0], [1.0, 2.0])


def _m(method, seed, user, margins, test_ids, **kw):
    return {"kind": "method", "method": method, "registry": method, "seed": seed, "user": user,
            "margins": margins, "test_ids": test_ids, "n_test": len(margins), **kw}


def test_base_anchor_joins_the_same_seed_user_and_test_pairs():
    recs = [_m("base", 0, "a", BASE, ["t1", "t2", "t3", "t4"]),
            _m("exact", 0, "a", EXACT, ["t1", "t2", "t3", "t4"]),
            # another user's test pairs: base holds t5, t6, exact t5, t7: not the same pairs, no share
            _m("base", 0, "b", [2.0, 0.0], ["t5", "t6"]),
            _m("exact", 0, "b", [1.0, 1.0], ["t5", "t7"]),
            # a seed without a base record
            _m("exact", 1, "a", [1.0], ["t1"]),
            {"kind": "winrate", "method": "exact", "seed": 0, "user": "a", "winrate": 0.5}]
    out = anchor_to(recs)
    assert out[1]["table8_base"] == 0.75                   # EXACT vs BASE, worked out above
    assert "table8_base" not in out[0]                      # the anchor itself
    assert "table8_base" not in out[3] and "table8_base" not in out[4]
    assert out[5] == recs[5]
    assert "table8_base" not in recs[1]                     # the input is left as it was
    # a share already on the record stands
    assert anchor_to([recs[0], {**recs[1], "table8_base": 0.1}])[1]["table8_base"] == 0.1


def test_summarize_averages_both_anchors_over_users_then_seeds():
    ids_a, ids_b = ["t1", "t2", "t3", "t4"], ["t5", "t6"]
    recs = [
        # seed 0, user a: vs plain 0.5, vs base 0.75 (see test_obj_match_against_either_anchor)
        _m("exact", 0, "a", EXACT, ids_a, plain_margins=PLAIN, table8=0.5, accuracy=0.5),
        _m("base", 0, "a", BASE, ids_a, plain_margins=PLAIN, table8=0.25, accuracy=0.25),
        # seed 0, user b: exact [1, 1], plain [0, 2], base [2, 0]
        #   vs plain: 1 > 0 yes, 1 > 2 no -> 0.5; vs base: 1 > 2 no, 1 > 0 yes -> 0.5
        _m("exact", 0, "b", [1.0, 1.0], ids_b, plain_margins=[0.0, 2.0], table8=0.5, accuracy=1.0),
        _m("base", 0, "b", [2.0, 0.0], ids_b, plain_margins=[0.0, 2.0], table8=0.5, accuracy=0.5),
        # seed 1, user a: exact [-1], plain [-2], base [-0.5]: vs plain 1.0, vs base 0.0
        _m("exact", 1, "a", [-1.0], ["t1"], plain_margins=[-2.0], table8=1.0, accuracy=0.0),
        _m("base", 1, "a", [-0.5], ["t1"], plain_margins=[-2.0], table8=1.0, accuracy=0.0),
    ]
    s = summarize(recs)
    # vs plain: seed 0 (0.5 + 0.5) / 2 = 0.5, seed 1 1.0 -> mean 0.75, std sqrt(2 * 0.25^2 / 1) = 0.353553
    assert s["table8"]["exact"] == pytest.approx(0.75)
    assert s["table8_std"]["exact"] == pytest.approx(0.353553, abs=1e-6)
    # vs base: seed 0 (0.75 + 0.5) / 2 = 0.625, seed 1 0.0 -> mean 0.3125, std sqrt(2 * 0.3125^2) = 0.441942
    assert s["table8_base"]["exact"] == pytest.approx(0.3125)
    assert s["table8_base_std"]["exact"] == pytest.approx(0.441942, abs=1e-6)
    assert "base" not in s["table8_base"]
    # pairwise accuracy: seed 0 (0.5 + 1.0) / 2 = 0.75, seed 1 0.0 -> 0.375
    assert s["accuracy"]["exact"] == pytest.approx(0.375)


# Table 7: three training pairs (raw objectives: greedy's set, the best set, no attributes)
T7 = [{"user": "u", "pair_id": "p1", "k": 3, "library_size": 8, "base": -1.0, "greedy": 2.0, "exhaustive": 3.0},
      {"user": "u", "pair_id": "p2", "k": 3, "library_size": 8, "base": 1.0, "greedy": 0.5, "exhaustive": 1.0},
      {"user": "u", "pair_id": "p3", "k": 3, "library_size": 8, "base": 2.0, "greedy": 0.0, "exhaustive": 0.5}]


def test_table7_under_eq12_and_the_projects_own_ratios():
    s = table7_summary(T7)
    # anchored per pair: greedy - plain = 3.0, -0.5, -2.0; exhaustive - plain = 4.0, 0.0, -1.5
    # F(S_k) = (3.0 - 0.5 - 2.0) / 3 = 0.5 / 3; F(S*) = (4.0 + 0.0 - 1.5) / 3 = 2.5 / 3
    assert s["eq12_greedy"] == pytest.approx(0.5 / 3)
    assert s["eq12_exhaustive"] == pytest.approx(2.5 / 3)
    # r = (0.5 / 3) / (2.5 / 3) = 0.2, over all three pairs
    assert s["eq12_ratio"] == pytest.approx(0.2)
    # Δ = mean(exhaustive - greedy) = (1.0 + 0.5 + 0.5) / 3 = 2 / 3
    assert s["gap"] == pytest.approx(2 / 3)
    # the project's improvement share: only p1 has exhaustive > plain: 3.0 / 4.0
    assert s["improvement_ratio"] == pytest.approx(0.75) and s["n_improving"] == 1
    # the raw ratio: pairs where both raw objectives are > 0: p1 2/3, p2 0.5/1.0 -> (2/3 + 1/2) / 2 = 7/12
    assert s["ratio"] == pytest.approx(7 / 12) and s["n_raw_ratio"] == 2
    # raw means: greedy (2 + 0.5 + 0) / 3, exhaustive (3 + 1 + 0.5) / 3 = 1.5, plain (-1 + 1 + 2) / 3
    assert s["greedy"] == pytest.approx(2.5 / 3) and s["exhaustive"] == pytest.approx(1.5)
    assert s["plain"] == pytest.approx(2 / 3)


def test_table7_ratio_is_undefined_when_no_set_beats_plain_on_average():
    # one pair: greedy - plain = 0 - 1 = -1, exhaustive - plain = 0.5 - 1 = -0.5: F(S*) < 0, no ratio
    s = table7_summary([{"k": 3, "library_size": 8, "base": 1.0, "greedy": 0.0, "exhaustive": 0.5}])
    assert s["eq12_greedy"] == pytest.approx(-1.0) and s["eq12_exhaustive"] == pytest.approx(-0.5)
    assert s["eq12_ratio"] is None
    with pytest.raises(ValueError, match="no Table 7 records"):
        table7_summary([])


def _history(n, text="x"):
    return [PreferencePair("u", f"q{i}", f"{text}{i}", f"r{i}", str(i)) for i in range(1, n + 1)]


def test_the_judge_cap_defaults_to_10_pairs_and_0_lifts_it():
    capped = judge_messages(_history(12), "P", "A", "B")[0]["content"]
    assert "### Example 10\n" in capped and "### Example 11\n" not in capped
    free = judge_messages(_history(12), "P", "A", "B", max_pairs=0, max_chars=0)[0]["content"]
    assert "### Example 12\n" in free
    # 12 pairs of ~7,000 characters each: 6,000 characters keep one (cut), no limit keeps all 12
    long = _history(12, text="y" * 7000)
    assert "### Example 2\n" not in judge_messages(long, "P", "A", "B")[0]["content"]
    assert "### Example 12\n" in judge_messages(long, "P", "A", "B", max_pairs=0, max_chars=0)[0]["content"]
    assert "### Example 3\n" not in judge_messages(_history(12), "P", "A", "B", max_pairs=2)[0]["content"]
    assert cap_text(10, 6000) == "at most 10 of the user's training pairs and at most 6,000 characters of history"
    assert cap_text(0, 0) == "all of the user's training pairs and no limit on characters"


def test_bad_judge_caps_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="`max_pairs` \\(=-1\\)"):
        LocalJudge(object(), max_pairs=-1)
    with pytest.raises(ValueError, match="`max_chars` \\(=100\\) has to be 0 \\(no cap\\) or exceed"):
        OpenAIJudge("http://x", "m", max_chars=100)
    with pytest.raises(ValueError, match="whole number"):
        judge_messages([], "P", "A", "B", max_pairs=2.5)


def test_the_judge_cap_in_the_configuration():
    paper, quick = load_config("paper"), load_config("quick")
    assert (paper.winrate.judge_pairs, paper.winrate.judge_chars) == (10, 6000)  # today's values, the defaults
    assert (quick.winrate.judge_pairs, quick.winrate.judge_chars) == (2, 1500)
    free = config_from_dict({"name": "x", "data": "d", "winrate": {"judge_pairs": 0, "judge_chars": 0}})
    assert (free.winrate.judge_pairs, free.winrate.judge_chars) == (0, 0)
    for winrate, field in (({"judge_pairs": -1}, "winrate.judge_pairs"), ({"judge_chars": 50}, "winrate.judge_chars"),
                           ({"judge_pairs": True}, "winrate.judge_pairs"), ({"judge_chars": "6000"}, "winrate.judge_chars")):
        with pytest.raises(InputError, match=f"c.json: field '{field}'"):
            config_from_dict({"name": "x", "data": "d", "winrate": winrate}, where="c.json")


def test_report_sets_each_paper_figure_beside_the_same_definition(tmp_path):
    # seed 0; user a: test pairs t1..t4, user b: t5, t6 (plain = the `none` method's margins)
    plain = {"a": PLAIN, "b": [0.0, 2.0]}
    margins = {"none": plain,
               "base": {"a": BASE, "b": [2.0, 0.0]},
               "exact": {"a": EXACT, "b": [1.0, 1.0]},
               "exact-global": {"a": [0.5, -1.5, 1.0, -0.5], "b": [-1.0, -1.0]},
               "drift": {"a": [1.0, 1.0, -1.0, 1.0], "b": [-1.0, -1.0]}}
    # pairwise accuracy (margin > 0), per user a / b:
    #   none 2/4, 1/2; base 1/4, 1/2; exact 2/4, 2/2; exact-global 2/4, 0/2; drift 3/4, 0/2
    accuracy = {"none": (0.5, 0.5), "base": (0.25, 0.5), "exact": (0.5, 1.0), "exact-global": (0.5, 0.0),
                "drift": (0.75, 0.0)}
    # obj_match > 0 vs plain, a / b (the runner's `table8` field):
    #   base: 3>1, -4>-2 no, 0>0.5 no, -5>-1 no -> 1/4; 2>0, 0>2 no -> 1/2
    #   exact: 2/4 (above); 1>0, 1>2 no -> 1/2
    #   exact-global: 0.5>1 no, -1.5>-2, 1>0.5, -0.5>-1 -> 3/4; -1>0 no, -1>2 no -> 0
    #   drift: 1>1 no, 1>-2, -1>0.5 no, 1>-1 -> 2/4; 0/2
    table8 = {"none": (0.0, 0.0), "base": (0.25, 0.5), "exact": (0.5, 0.5), "exact-global": (0.75, 0.0),
              "drift": (0.5, 0.0)}
    ids = {"a": ["t1", "t2", "t3", "t4"], "b": ["t5", "t6"]}
    recs = []
    for m in margins:
        for i, u in enumerate(("a", "b")):
            recs.append({**_m(m, 0, u, margins[m][u], ids[u], plain_margins=plain[u], accuracy=accuracy[m][i],
                              table8=table8[m][i], kwargs={"k": 3} if m.startswith("exact") else {},
                              timings={"fit": 1.0}, model="m", backend="fake", git="abc", config="hand"),
                         "registry": m})
    recs += [{**r, "kind": "table7", "seed": 0, "method": "greedy-vs-exhaustive"} for r in T7]
    wr = {"enabled": True, "judge_pairs": 4, "judge_chars": 2500}
    recs += [{"kind": "winrate", "seed": 0, "user": u, "method": "exact", "winrate": 0.5, "judge": "local:m",
              "preferences": [[1.0, -1.0]], "config_json": {"winrate": wr}} for u in ("a", "b")]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = write_report(tmp_path).read_text()

    # the column headers name their definitions
    assert ("| method | pairwise accuracy (%, margin > 0) | seed 0 | users | test pairs | obj_match > 0 vs the "
            "plain prompt (%) | obj_match > 0 vs `base` (%) |") in md
    # exact: accuracy (0.5 + 1.0) / 2 = 75; vs plain (0.5 + 0.5) / 2 = 50;
    #   vs base: a 0.75 (above), b: 1>2 no, 1>0 -> 0.5 => (0.75 + 0.5) / 2 = 62.5
    #   margin shift: a (1 + 1 + 0 - 2) / 4 = 0, b (1 - 1) / 2 = 0
    assert "| exact | 75.00 | 75.00 | 2 | 6 | 50.00 | 62.50 | +0.00 |" in md
    # none vs base: a 1>3 no, -2>-4, 0.5>0, -1>-5 -> 3/4; b 0>2 no, 2>0 -> 1/2 => 62.5; none vs plain: not shown
    assert "| none | 50.00 | 50.00 | 2 | 6 | – | 62.50 | – |" in md
    # base vs plain (0.25 + 0.5) / 2 = 37.5; drift: neither obj_match column (its margin is another score)
    assert "| base | 37.50 | 37.50 | 2 | 6 | 37.50 | – | – |" in md
    assert "| drift | 37.50 | 37.50 | 2 | 6 | – | – | – |" in md

    # beside the paper's Table 2: the bold cell is the paper's definition for that row
    assert "| Base | 57.54 / 63.58 / 54.04 | pairwise accuracy, margin > 0 (§6.2) | base | **37.50** | 37.50 | – |" in md
    assert "| Drift | 58.68 / 58.21 / 55.63 | pairwise accuracy, margin > 0 (§6.2) | drift | **37.50** | – | – |" in md
    assert "| exact | 75.00 | **50.00** | **62.50** |" in md and "| EXACT | 65.12 / 66.01 / 60.28 |" in md
    # beside Table 8: exact-global vs plain (0.75 + 0) / 2 = 37.5; vs base: a 0.5>3 no, -1.5>-4, 1>0,
    #   -0.5>-5 -> 3/4; b -1>2 no, -1>0 no -> 0 => 37.5; accuracy (0.5 + 0) / 2 = 25
    assert "| EXACT (with Retrieval) | 65.12 / 66.01 / 60.75 | exact | 50.00 | 62.50 | 75.00 | 2 |" in md
    assert "| EXACT (without Retrieval) | 57.43 / 57.21 / 54.23 | exact-global | 37.50 | 37.50 | 25.00 | 2 |" in md
    assert "| none | 50.00 | – | 62.50 | 2 |" in md                      # Table 8's own comparison

    # Table 7: Eq. 12 first (values of test_table7_under_eq12_and_the_projects_own_ratios), then the
    # project's raw measures: plain 2/3, greedy 2.5/3, exhaustive 1.5, raw ratio 7/12, share 0.75, gap 2/3
    assert "| this run (3 pairs) | 0.167 | 0.833 | 0.200 | 0.667 |" in md
    assert "| paper, Llama-3.1-8B | 30.34 | 33.38 | 0.90 | 3.04 |" in md
    assert "| 3 | 0.667 | 0.833 | 1.500 | – | 0.583 (2 pairs) | 0.750 (1 pair) | 0.667 | 0 |" in md

    # the judge's cap, as configured
    assert ("Win-rate judge's history cap: at most 4 of the user's training pairs and at most 2,500 "
            "characters of history (judge `local:m`)") in md


def test_each_global_variant_stands_beside_the_papers_no_retrieval_row():
    from prefsteer.evaluation.report import paper_table8

    ids = ["t1", "t2", "t3", "t4"]
    recs = [_m("exact", 0, "a", EXACT, ids, table8=0.5, accuracy=0.5),
            {**_m("exact-global-paper", 0, "a", [0.0, 0.0, 0.0, 0.0], ids, table8=0.25, accuracy=0.0),
             "registry": "exact-global"}]
    md = paper_table8(recs)
    # no `base` records: the base-anchored column says nothing
    assert "| EXACT (with Retrieval) | 65.12 / 66.01 / 60.75 | exact | 50.00 | – | 50.00 | 1 |" in md
    assert "| EXACT (without Retrieval) | 57.43 / 57.21 / 54.23 | exact-global-paper | 25.00 | – | 0.00 | 1 |" in md
