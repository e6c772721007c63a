"""Metrics, judges and configs on hand-made numbers (no model)."""

import json

import pytest

from prefsteer.errors import InputError
from prefsteer.evaluation.judge import OpenAIJudge, compare, judge_messages
from prefsteer.evaluation.metrics import (calibrated_winrate, improvement_share, margin_shift, mean_std,
                                          pairwise_accuracy, prompt_winrate, summarize, table7_summary,
                                          verdict, winrate)
from prefsteer.evaluation.protocol import available_configs, load_config
from prefsteer.types import PreferencePair


def test_pairwise_accuracy_counts_strictly_positive_margins():
    assert pairwise_accuracy([1.0, -2.0, 0.5, 0.0]) == 0.5
    assert pairwise_accuracy([3.0]) == 1.0
    with pytest.raises(ValueError):
        pairwise_accuracy([])


def test_mean_and_sample_std_over_seeds():
    m, s = mean_std([0.6, 0.7, 0.8])
    assert m == pytest.approx(0.7) and s == pytest.approx(0.1)
    assert mean_std([0.5]) == (0.5, None)


def test_table8_share_compares_with_the_plain_margin():
    assert improvement_share([1.0, -1.0, 2.0, 0.0], [0.5, -2.0, 3.0, 0.0]) == 0.5
    with pytest.raises(ValueError):
        improvement_share([1.0], [1.0, 2.0])


def test_margin_shift_is_the_mean_move_of_the_gap_in_nats():
    assert margin_shift([1.0, -1.0, 2.0], [0.5, -2.0, 3.0]) == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="plain margins"):
        margin_shift([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="undefined"):
        margin_shift([], [])


def test_summarize_reports_the_margin_shift_per_seed_then_over_seeds():
    def rec(seed, user, margins, plain):
        return {"kind": "method", "method": "exact", "seed": seed, "user": user, "accuracy": 1.0,
                "n_test": len(margins), "margins": margins, "plain_margins": plain}

    s = summarize([rec(0, "a", [2.0, 4.0], [1.0, 1.0]), rec(0, "b", [0.0], [1.0]), rec(1, "a", [3.0], [3.0]),
                   {"kind": "method", "method": "none", "seed": 0, "user": "a", "accuracy": 1.0, "n_test": 1}])
    assert s["shift"]["exact"] == pytest.approx(((2.0 + -1.0) / 2 + 0.0) / 2)  # seed 0: 0.5, seed 1: 0.0
    assert "none" not in s["shift"]


def test_winrate_both_orders_and_ties():
    assert verdict(2.0) == 1.0 and verdict(-1.0) == 0.0 and verdict(0.0) == 0.5
    assert prompt_winrate(1.0, 1.0) == 1.0           # preferred in both positions
    assert prompt_winrate(1.0, -1.0) == 0.5          # position bias: cancels to a tie
    assert prompt_winrate(0.0, 1.0) == 0.75          # a tie counts half
    assert winrate([1.0, 0.5, 0.0, 0.5]) == 0.5


def test_position_calibrated_winrate_sums_graded_preferences():
    # a judge that prefers position A by 2 nats and the method by 0.3: a split vote, but a win once summed
    assert prompt_winrate(2.3, -1.7) == 0.5 and calibrated_winrate(2.3, -1.7) == 1.0
    assert calibrated_winrate(1.7, -2.3) == 0.0 and calibrated_winrate(1.0, -1.0) == 0.5
    assert calibrated_winrate(0.0, 1.0) == 1.0                                  # a tie defers to the other order
    wins = [{"kind": "winrate", "method": "exact", "seed": 0, "user": u, "winrate": 0.5,
             "preferences": prefs} for u, prefs in (("a", [[2.3, -1.7], [2.0, -2.5]]), ("b", [[1.0, -0.5]]))]
    s = summarize([{"kind": "method", "method": "exact", "seed": 0, "user": "a", "accuracy": 1.0, "n_test": 1},
                   *wins])
    assert s["winrate"]["exact"] == 0.5 and s["winrate_calibrated"]["exact"] == pytest.approx((0.5 + 1.0) / 2)


class FirstPositionJudge:
    """Always prefers whatever is shown as A."""
    name = "first"

    def prefer_a(self, history, prompt, a, b):
        return 1.0


class LengthJudge:
    name = "len"

    def prefer_a(self, history, prompt, a, b):
        return len(a) - len(b)


def test_compare_cancels_position_bias():
    assert compare(FirstPositionJudge(), [], "p", "x", "y")[0] == 0.5
    assert compare(LengthJudge(), [], "p", "long answer", "short")[0] == 1.0
    assert compare(LengthJudge(), [], "p", "short", "long answer")[0] == 0.0
    assert compare(LengthJudge(), [], "p", "same", "same")[0] == 0.5


def test_openai_judge_request_and_parsing_through_a_fake_transport():
    calls = []

    def transport(url, payload, headers):
        calls.append((url, payload, headers))
        first_is_method = "Response A: mine" in payload["messages"][-1]["content"]
        return {"choices": [{"message": {"content": "A" if first_is_method else "B."}}]}

    judge = OpenAIJudge("http://localhost:8000/v1/", "judge-model", api_key="k", transport=transport)
    history = [PreferencePair("u", "q", "good", "bad", "1")]
    score, first, second = compare(judge, history, "prompt", "mine", "theirs")
    assert score == 1.0 and first == 1.0 and second == 1.0
    url, payload, headers = calls[0]
    assert url == "http://localhost:8000/v1/chat/completions"
    assert payload["model"] == "judge-model" and payload["max_tokens"] == 1 and payload["temperature"] == 0
    assert payload["messages"][0]["role"] == "system" and "good" in payload["messages"][0]["content"]
    assert headers == {"Authorization": "Bearer k"}
    assert OpenAIJudge.parse({"choices": [{"message": {"content": " maybe"}}]}) == 0.0
    assert OpenAIJudge.parse({"choices": [{"message": {"content": "**B**"}}]}) == -1.0
    with pytest.raises(ValueError, match="unexpected judge response"):
        OpenAIJudge.parse({"error": "x"})
    with pytest.raises(ValueError, match="judge_model"):
        OpenAIJudge("http://x", "")


def test_judge_messages_hold_the_user_history_and_both_responses():
    msgs = judge_messages([PreferencePair("u", "q1", "c1", "r1", "1")], "P", "AAA", "BBB")
    assert "c1" in msgs[0]["content"] and "r1" in msgs[0]["content"]
    assert "Response A: AAA" in msgs[1]["content"] and "Response B: BBB" in msgs[1]["content"]


def _rec(method, seed, user, acc, t8=None, n=5, registry=None, **kw):
    return {"kind": "method", "method": method, "seed": seed, "user": user, "accuracy": acc,
            "table8": t8, "n_test": n, "registry": registry or method, "kwargs": kw, "timings": {"fit": 1.0}}


def test_summarize_means_over_users_then_seeds():
    recs = [_rec("exact", 0, "a", 1.0, 0.5), _rec("exact", 0, "b", 0.5, 0.5),
            _rec("exact", 1, "a", 0.5, 1.0), _rec("exact", 1, "b", 0.5, 1.0),
            _rec("none", 0, "a", 0.0), _rec("none", 1, "a", 1.0),
            {"kind": "winrate", "method": "exact", "seed": 0, "user": "a", "winrate": 0.75},
            {"kind": "winrate", "method": "exact", "seed": 1, "user": "a", "winrate": 0.25}]
    s = summarize(recs)
    assert s["accuracy_per_seed"]["exact"] == {"0": 0.75, "1": 0.5}
    assert s["accuracy"]["exact"] == pytest.approx(0.625)
    assert s["accuracy_std"]["exact"] == pytest.approx(0.1767767, abs=1e-6)
    assert s["table8"]["exact"] == pytest.approx(0.75)
    assert "none" not in s["table8"]
    assert s["n_test_pairs"]["exact"] == 20 and s["n_users"]["none"] == 2
    assert s["winrate"]["exact"] == 0.5


def test_table7_summary():
    recs = [{"greedy": 2.0, "exhaustive": 2.0, "base": 1.0, "k": 3, "library_size": 12},
            {"greedy": 1.0, "exhaustive": 3.0, "base": -1.0, "k": 3, "library_size": 12}]
    s = table7_summary(recs)
    assert s["gap"] == 1.0 and s["greedy_optimal"] == 0.5
    assert s["improvement_ratio"] == pytest.approx((1.0 + 2.0) / (1.0 + 4.0))  # pooled over the pairs
    assert s["ratio"] == pytest.approx((1.0 + 1 / 3) / 2)
    # Eq. 12: anchored at plain, means over both pairs: F(S_k) = (1 + 2) / 2, F(S*) = (1 + 4) / 2, r = 3 / 5
    assert (s["eq12_greedy"], s["eq12_exhaustive"]) == (pytest.approx(1.5), pytest.approx(2.5))
    assert s["eq12_ratio"] == pytest.approx(0.6)
    # exhaustive barely beating plain while greedy falls below it: pooled, not a per-pair -50
    barely = {"greedy": 0.5, "exhaustive": 1.01, "base": 1.0, "k": 3, "library_size": 12}
    assert table7_summary(recs + [barely])["improvement_ratio"] == pytest.approx((1.0 + 2.0 - 0.5) / (1.0 + 4.0 + 0.01))
    # a pair where no triple beats plain does not enter the ratio
    none_better = {"greedy": -2.0, "exhaustive": 0.5, "base": 1.0, "k": 3, "library_size": 12}
    assert table7_summary(recs + [none_better])["improvement_ratio"] == pytest.approx(0.6)


def test_table7_summary_counts_a_pair_of_several_seeds_once():
    rec = {"user": "u1", "pair_id": "p1", "library": ["A", "B"], "k": 3, "library_size": 2,
           "greedy": 1.0, "exhaustive": 3.0, "base": -1.0}
    other = {**rec, "pair_id": "p2", "greedy": 2.0, "exhaustive": 2.0, "base": 1.0}
    s = table7_summary([{**rec, "seed": 0}, {**other, "seed": 0}, {**rec, "seed": 1}])
    assert s["n_pairs"] == 2 and s["greedy_optimal"] == 0.5 and s["gap"] == 1.0
    assert table7_summary([rec, {**rec, "user": "u2"}])["n_pairs"] == 2  # another user's pair is another pair


def test_named_configs_load_and_extend():
    names = available_configs()
    assert {"quick", "paper", "table2", "figure1", "table7", "table8", "ablation-describe"} <= set(names)
    from prefsteer.evaluation import known_answer

    for n in names:  # the known-answer configurations have a protocol of their own
        known_answer.load_ka_config(n) if known_answer.is_known_answer(n) else load_config(n)
    paper, fig = load_config("paper"), load_config("figure1")
    assert fig.name == "figure1" and fig.data == paper.data and fig.seeds == [0, 1, 2]
    assert [m.method for m in fig.methods] == ["exact"] * 4
    assert sorted(m.kwargs["k"] for m in fig.methods) == [1, 3, 5, 10]
    assert fig.protocol_id() == paper.protocol_id()  # they can share one run directory
    assert paper.winrate.temperature == 0.7 and paper.winrate.top_k == 50 and paper.winrate.top_p == 0.95
    assert paper.winrate.max_new_tokens == 300 and paper.winrate.n_prompts == 15
    assert load_config("table7").table7.library_size == 12
    cpu, wr = load_config("paper-cpu"), load_config("winrate-cpu")
    assert wr.protocol_id() == cpu.protocol_id() != paper.protocol_id()  # the same cut-down split
    assert wr.winrate.enabled and not cpu.winrate.enabled and wr.winrate.temperature == 0.7
    assert cpu.max_train_pairs == 8 and len(cpu.attributes) == 12
    screened = load_config("paper-screened")  # the paper's split and methods, screened greedy
    assert screened.protocol_id() == paper.protocol_id()
    assert [m.label for m in screened.methods] == ["none", "base", "exact", "exact-global"]
    assert [m.kwargs.get("mode") for m in screened.methods[2:]] == ["screened", "screened"]


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no configuration 'nope'"):
        load_config("nope")
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"data": "x.jsonl", "methods": ["none"], "seedz": [1]}))
    with pytest.raises(InputError, match="seedz"):
        load_config(str(p))
    p.write_text('{"data": "x", ')
    with pytest.raises(InputError, match="invalid JSON"):
        load_config(str(p))
    p.write_text(json.dumps({"data": "does/not/exist.jsonl", "methods": ["none"]}))
    with pytest.raises(InputError, match="evaluation data not found"):
        load_config(str(p)).data_path()


def test_compare_selections_on_hand_made_runs(tmp_path, capsys):
    from prefsteer.cli import main
    from prefsteer.evaluation.compare import compare_selections, load_side

    def row(pair, attrs, obj, base=-1.0, cfg="g", user="u"):
        return {"user_id": user, "pair_id": pair, "config_id": cfg, "attributes": attrs, "objective": obj,
                "base_objective": base, "gains": [0.0] * len(attrs)}

    ref = [row("p1", ["A", "B"], 2.0), row("p2", ["A", "B"], 3.0), row("p3", ["C", "D"], 1.0),
           row("p4", ["A", "C"], 0.5)]
    other = [row("p1", ["A", "B"], 2.0, -1.0001, "s"), row("p2", ["B", "A"], 2.5, cfg="s"),
             row("p3", ["D", "A"], 1.5, cfg="s"), row("p5", ["A"], 9.0, cfg="s")]
    s = compare_selections(ref, other)["summary"]
    assert s["compared"] == 3 and (s["ref_pairs"], s["other_pairs"]) == (4, 4)
    assert (s["same_list"], s["same_set"], s["same_first"], s["other_better"]) == (1, 2, 1, 1)
    assert s["mean_shortfall"] == pytest.approx((0.0 + 0.5 - 0.5) / 3) and s["median_shortfall"] == 0.0
    assert s["max_base_diff"] == pytest.approx(1e-4)

    run = tmp_path / "run"
    run.mkdir()
    (run / "selections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref + [row("p1", ["A"], 1.0, cfg="k1")]))
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    with pytest.raises(InputError, match="2 search configurations .*g \\(4 pairs\\)"):
        load_side(run)
    assert len(load_side(run, "g")) == 4
    assert main(["eval", "compare", str(run), str(tmp_path / "other.jsonl"), "--ref-config", "g", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["same_set"] == 2
    assert main(["eval", "compare", str(run), str(tmp_path / "other.jsonl"), "--ref-config", "g"]) == 0
    assert "| same set, any order | 2 / 3 (66.7%) |" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text(json.dumps(row("p1", ["A"], 1.0)) + "\n" + '{"user_id": "u"}\n')
    assert main(["eval", "compare", str(tmp_path / "bad.jsonl"), str(tmp_path / "other.jsonl")]) == 2
    assert "bad.jsonl:2: field 'pair_id'" in capsys.readouterr().err
