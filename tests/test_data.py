"""Loaders: hand-written fixtures, a table of bad inputs, and the real TL;DR file when present."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from prefsteer.data import (detect_format, for_display, group_by_user, load_jsonl, load_pairs,
                            load_prism, load_tldr_comparisons, tldr_prompt)
from prefsteer.errors import InputError
from prefsteer.types import pair_key
from prefsteer.types import PreferencePair

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not (SHARED / "tldr" / "batch13.json").is_file(),
                                reason="shared data (../shared/data) is absent")


# --------------------------------------------------------------------------- prompts

def test_tldr_prompt_with_and_without_subreddit():
    assert tldr_prompt("T", "P", "cats") == (
        "SUBREDDIT: r/cats\nTITLE: T\nPOST: P\n\nWrite a TL;DR summary of the post above.")
    assert tldr_prompt("T", "P") == "TITLE: T\nPOST: P\n\nWrite a TL;DR summary of the post above."
    assert tldr_prompt(" T", "P\n") == "TITLE:  T\nPOST: P\n\n\nWrite a TL;DR summary of the post above."
    assert for_display(" Was at a game. ") == "Was at a game."


# --------------------------------------------------------------------------- generic JSONL

def test_load_jsonl_fixture():
    path = FIXTURES / "pairs_small.jsonl"
    pairs = load_jsonl(path)
    sea = ("alice", "Describe the sea.", "Vast and grey-blue.", "Water.")
    colour = ("alice", "Name a colour.", " Teal", " Red")
    assert [p.pair_id for p in pairs] == [pair_key(*sea), "custom-7", pair_key(*colour)]
    assert pair_key(*sea) != pair_key("alice", "Describe the sea.", "Water.", "Vast and grey-blue.")
    assert pairs[0] == PreferencePair(*sea, pair_key(*sea))
    assert pairs[2].chosen == " Teal" and pairs[2].rejected == " Red"  # texts kept as they are
    assert pairs[2].meta == {"source": "hand-written"}
    assert pairs[0].meta == {}
    assert list(group_by_user(pairs)) == ["alice", "bob"]
    assert [p.pair_id for p in group_by_user(pairs)["alice"]] == [pairs[0].pair_id, pairs[2].pair_id]
    assert load_pairs(path) == pairs and detect_format(path) == "jsonl"


def test_load_jsonl_tldr_fixture_format(tmp_path):
    rec = {"user_id": "w9", "pair_id": "batch13:5", "post_id": "t3_x", "subreddit": "cats",
           "title": "My cat", "post": "She sleeps.", "chosen": " Cat sleeps.", "rejected": " Cat."}
    path = tmp_path / "slice.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "pair_id": "batch13:6",
                                                           "subreddit": None}) + "\n")
    a, b = load_jsonl(path)
    assert a.prompt == tldr_prompt("My cat", "She sleeps.", "cats")
    assert b.prompt == tldr_prompt("My cat", "She sleeps.")
    assert (a.pair_id, a.user_id, a.chosen, a.rejected) == ("batch13:5", "w9", " Cat sleeps.", " Cat.")
    assert a.meta == {"post_id": "t3_x", "subreddit": "cats", "title": "My cat", "post": "She sleeps."}


# --------------------------------------------------------------------------- TL;DR comparisons

def test_load_tldr_fixture(tmp_path):
    path = FIXTURES / "tldr_small.json"
    pairs = load_tldr_comparisons(path)
    # the data set has no id per comparison: a pair is its content, never the file's name and line
    assert [p.pair_id for p in pairs] == [pair_key(p.user_id, p.prompt, p.chosen, p.rejected) for p in pairs]
    assert len({p.pair_id for p in pairs}) == 3
    moved = tmp_path / "elsewhere" / "tldr_small.json"  # another folder, the same name: the same ids
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert [p.pair_id for p in load_tldr_comparisons(moved)] == [p.pair_id for p in pairs]
    first, second, _ = pairs
    assert first.user_id == "w1"
    assert first.chosen == " New cat hides and eats only at night, is this normal?"
    assert first.rejected == " I have a cat."
    assert first.prompt == tldr_prompt("New cat hides all day", "I adopted a cat last week. She hides "
                                       "under the bed all day and only eats at night.\n", "cats")
    assert second.chosen.startswith(" Roommate never") and second.rejected == " Roommate ignores dishes."
    assert first.meta == {"post_id": "t3_fake1", "subreddit": "cats", "title": "New cat hides all day",
                          "policies": {"chosen": "policy-x", "rejected": "policy-y"},
                          "confidence": 7, "split": "train", "batch": "fake"}
    assert second.meta["policies"] == {"chosen": "policy-z", "rejected": "policy-x"}
    assert "note" not in json.dumps([p.to_json() for p in pairs])  # the note can leak the label
    assert "too short" not in json.dumps([p.to_json() for p in pairs])
    assert detect_format(path) == "tldr" and load_pairs(path) == pairs
    assert [len(v) for v in group_by_user(pairs).values()] == [2, 1]


# --------------------------------------------------------------------------- PRISM (synthetic)

def test_prism_fixture_is_labelled_synthetic():
    assert "SYNTHETIC" in (FIXTURES / "prism_synthetic" / "README.md").read_text()
    rows = [json.loads(l) for l in (FIXTURES / "prism_synthetic" / "utterances.jsonl").open()]
    assert all(r["synthetic"] is True for r in rows)


def test_load_prism_synthetic():
    d = FIXTURES / "prism_synthetic"
    pairs = load_prism(d)
    assert [p.pair_id for p in pairs] == ["syn-c1:0:1>0", "syn-c1:0:1>2", "syn-c1:1:0>1",
                                          "syn-c2:0:0>2", "syn-c2:1:0>1"]
    assert {u: len(v) for u, v in group_by_user(pairs).items()} == {"syn-u1": 3, "syn-u2": 2}
    p0 = pairs[0]
    assert (p0.user_id, p0.prompt) == ("syn-u1", "What should I cook tonight?")
    assert p0.chosen == "Try a chickpea curry: 30 minutes, one pot."
    assert p0.rejected == "Pasta with tomato sauce is quick."
    assert (p0.meta["chosen_score"], p0.meta["rejected_score"]) == (85, 40)
    assert (p0.meta["chosen_model"], p0.meta["rejected_model"]) == ("model-b", "model-a")
    assert p0.meta["history"] == [] and p0.meta["turn"] == 0
    # turn 1: the conversation so far (turn 0's prompt and chosen response) is prefixed
    p2 = pairs[2]
    assert p2.prompt == ("User: What should I cook tonight?\n\n"
                         "Assistant: Try a chickpea curry: 30 minutes, one pot.\n\n"
                         "User: Something without chickpeas?")
    assert p2.meta["history"] == [
        {"role": "user", "content": "What should I cook tonight?"},
        {"role": "assistant", "content": "Try a chickpea curry: 30 minutes, one pot."}]
    assert load_prism(d, history=False)[2].prompt == "Something without chickpeas?"
    # ties (syn-c1 turn 0, id 3), equal texts (syn-c2 turn 0, id 1), no chosen (syn-c3) are skipped
    assert pairs[3].rejected == "Tides are caused by wind."
    assert not any(p.meta["conversation_id"] == "syn-c3" for p in pairs)
    assert detect_format(d) == "prism" and load_pairs(d) == pairs
    assert load_pairs(d / "utterances.jsonl") == pairs  # the file itself is detected too


def test_prism_directory_without_utterances(tmp_path):
    with pytest.raises(InputError) as ei:
        load_prism(tmp_path)
    assert ei.value.file == str(tmp_path / "utterances.jsonl")


# --------------------------------------------------------------------------- bad inputs

def _jl(**over):
    rec = {"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}
    rec.update(over)
    return json.dumps({k: v for k, v in rec.items() if v is not ...})


def _tl(**over):
    rec = {"info": {"id": "t3_a", "post": "body", "title": "title", "subreddit": "cats"},
           "summaries": [{"text": " one", "policy": "x", "note": "n"}, {"text": " two", "policy": "y"}],
           "choice": 0, "worker": "w", "split": "train", "batch": "b", "extra": {"confidence": 5}}
    for k, v in over.items():
        if "." in k:
            outer, inner = k.split(".")
            rec[outer] = dict(rec[outer])
            if v is ...:
                del rec[outer][inner]
            else:
                rec[outer][inner] = v
        elif v is ...:
            del rec[k]
        else:
            rec[k] = v
    return json.dumps(rec)


def _pr(**over):
    rec = {"user_id": "u", "conversation_id": "c", "turn": 0, "within_turn_id": 0,
           "user_prompt": "hi", "model_response": "hello", "score": 50, "if_chosen": True}
    rec.update(over)
    return json.dumps({k: v for k, v in rec.items() if v is not ...})


# (loader, bad line, expected field, expected message); the bad line is written as line 3, after
# one good record and one blank line, so the line number counts blank lines too.
BAD = [
    ("jsonl", '{"user_id": "u", "prompt": ', None, "malformed JSON"),
    ("jsonl", "[1, 2]", None, "expected a JSON object, got array"),
    ("jsonl", _jl(user_id=...), "user_id", "missing required field"),
    ("jsonl", _jl(prompt=...), "prompt", "missing required field"),
    ("jsonl", _jl(chosen=...), "chosen", "missing required field"),
    ("jsonl", _jl(rejected=...), "rejected", "missing required field"),
    ("jsonl", _jl(user_id=7), "user_id", "expected a string, got number"),
    ("jsonl", _jl(chosen=["a"]), "chosen", "expected a string, got array"),
    ("jsonl", _jl(prompt=None), "prompt", "expected a string, got null"),
    ("jsonl", _jl(pair_id=3), "pair_id", "expected a string, got number"),
    ("jsonl", _jl(prompt="  \n "), "prompt", "empty (whitespace-only) text"),
    ("jsonl", _jl(rejected=""), "rejected", "empty (whitespace-only) text"),
    ("jsonl", _jl(user_id=" "), "user_id", "empty (whitespace-only) text"),
    ("jsonl", _jl(chosen="same", rejected="same"), "rejected", "chosen and rejected are the same text"),
    ("jsonl", _jl(chosen=" same", rejected="same "), "rejected", "chosen and rejected are the same text"),
    ("jsonl", _jl(prompt=..., title="t"), "post", "missing required field"),
    ("jsonl", _jl(prompt=..., title="t", post=""), "post", "empty (whitespace-only) text"),
    ("jsonl", _jl(prompt=..., title="t", post="p", subreddit=1), "subreddit",
     "expected a string, got number"),
    ("jsonl", _jl(pair_id="g:1", chosen="other"), "pair_id", "duplicate pair_id 'g:1' with other text (first on line 1)"),
    ("jsonl", _jl(id=""), "id", "empty (whitespace-only) text"),
    ("tldr", "{not json", None, "malformed JSON"),
    ("tldr", _tl(info=...), "info", "missing required field"),
    ("tldr", _tl(info="x"), "info", "expected an object, got string"),
    ("tldr", _tl(**{"info.post": ...}), "info.post", "missing required field"),
    ("tldr", _tl(**{"info.title": 5}), "info.title", "expected a string, got number"),
    ("tldr", _tl(**{"info.post": " "}), "info.post", "empty (whitespace-only) text"),
    ("tldr", _tl(**{"info.id": ""}), "info.id", "empty (whitespace-only) text"),
    ("tldr", _tl(summaries=...), "summaries", "missing required field"),
    ("tldr", _tl(summaries={"text": "a"}), "summaries", "expected an array, got object"),
    ("tldr", _tl(summaries=[{"text": " a", "policy": "x"}]), "summaries", "expected 2 summaries, got 1"),
    ("tldr", _tl(summaries=[{"text": " a", "policy": "x"}, "b"]), "summaries[1]",
     "expected an object, got string"),
    ("tldr", _tl(summaries=[{"text": " a", "policy": "x"}, {"policy": "y"}]), "summaries[1].text",
     "missing required field"),
    ("tldr", _tl(summaries=[{"text": 1, "policy": "x"}, {"text": "b", "policy": "y"}]),
     "summaries[0].text", "expected a string, got number"),
    ("tldr", _tl(summaries=[{"text": " a", "policy": "x"}, {"text": "\n", "policy": "y"}]),
     "summaries[1].text", "empty (whitespace-only) text"),
    ("tldr", _tl(summaries=[{"text": " a", "policy": "x"}, {"text": " a", "policy": "y"}]),
     "summaries", "chosen and rejected are the same text"),
    ("tldr", _tl(choice=...), "choice", "missing required field"),
    ("tldr", _tl(choice="0"), "choice", "expected an integer, got string"),
    ("tldr", _tl(choice=True), "choice", "expected an integer, got boolean"),
    ("tldr", _tl(choice=2), "choice", "choice 2 is out of range (there are 2 summaries)"),
    ("tldr", _tl(choice=-1), "choice", "choice -1 is out of range (there are 2 summaries)"),
    ("tldr", _tl(worker=...), "worker", "missing required field"),
    ("tldr", _tl(worker=12), "worker", "expected a string, got number"),
    ("tldr", _tl(worker=""), "worker", "empty (whitespace-only) text"),
    ("tldr", _tl(**{"extra.confidence": "high"}), "extra.confidence", "expected an integer, got string"),
    ("prism", "{", None, "malformed JSON"),
    ("prism", _pr(user_id=...), "user_id", "missing required field"),
    ("prism", _pr(turn="0"), "turn", "expected an integer, got string"),
    ("prism", _pr(turn=-1), "turn", "expected a turn >= 0, got -1"),
    ("prism", _pr(within_turn_id=...), "within_turn_id", "missing required field"),
    ("prism", _pr(model_response=" "), "model_response", "empty (whitespace-only) text"),
    ("prism", _pr(user_prompt=None), "user_prompt", "expected a string, got null"),
    ("prism", _pr(if_chosen="true"), "if_chosen", "expected true or false, got string"),
    ("prism", _pr(score="high"), "score", "expected a number, got string"),
    ("prism", _pr(conversation_id="c0", within_turn_id=1, if_chosen=False), "within_turn_id",
     "duplicate within_turn_id 1 in this turn (first on line 1)"),
    ("prism", _pr(conversation_id="c0", within_turn_id=2), "if_chosen",
     "a second chosen response in this turn (first on line 1)"),
    ("prism", _pr(conversation_id="c0", within_turn_id=2, if_chosen=False, user_prompt="other"),
     "user_prompt", "differs from line 1 of the same conversation turn"),
]
GOOD_FIRST = {"jsonl": _jl(pair_id="g:1"),
              "tldr": _tl(),
              "prism": _pr(conversation_id="c0", within_turn_id=1)}
GOOD_LAST = {"jsonl": _jl(pair_id="g:4"), "tldr": _tl(worker="w4"),
             "prism": _pr(conversation_id="c0", within_turn_id=4, if_chosen=False, score=10)}
LOADERS = {"jsonl": load_jsonl, "tldr": load_tldr_comparisons, "prism": load_prism}


@pytest.mark.parametrize("fmt, bad, field, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_file_line_field(tmp_path, fmt, bad, field, message):
    path = tmp_path / f"bad_{fmt}.jsonl"
    path.write_text(GOOD_FIRST[fmt] + "\n\n" + bad + "\n" + GOOD_LAST[fmt] + "\n")
    for load in (LOADERS[fmt], lambda p: load_pairs(p, fmt)):
        with pytest.raises(InputError) as ei:
            load(path)
        e = ei.value
        assert (e.file, e.line, e.field) == (str(path), 3, field)
        if message == "malformed JSON":
            assert e.reason.startswith("malformed JSON: ")
        else:
            assert e.reason == message
        assert str(e).startswith(f"{path}:3")
        if field is not None:
            assert f"field '{field}'" in str(e)


def test_every_bad_line_is_reported_in_one_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = _jl()
    lines = [good, '{"user_id": "u", "prompt": "Hi", "chosen":', _jl(chosen="Same", rejected="Same")]
    lines += [_jl(prompt=f"p{i}", rejected=...) for i in range(25)]  # lines 4..28
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as ei:
        load_jsonl(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: 27 bad lines")
    assert f"{path}:2: malformed JSON" in msg
    assert f"{path}:3: field 'rejected': chosen and rejected are the same text" in msg
    assert [e.line for e in ei.value.errors] == [2, 3] + list(range(4, 22))  # the first 20
    assert msg.endswith("... and 7 more")


def test_ids_are_content_keys_unless_given_and_a_repeated_line_is_read_once(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([_jl(), _jl(), _jl(chosen="c"), _jl(id="mine"), _jl(pair_id="p1", chosen="d")]) + "\n")
    pairs = load_jsonl(path)
    assert [p.pair_id for p in pairs] == [pair_key("u", "p", "a", "b"), pair_key("u", "p", "c", "b"), "mine", "p1"]
    assert [p.source[1] for p in pairs] == [1, 3, 4, 5]
    # the same content in another file of the same name has the same id; an edited line another
    other = tmp_path / "sub"
    other.mkdir()
    (other / "pairs.jsonl").write_text(_jl(chosen="edited") + "\n")
    assert load_jsonl(other / "pairs.jsonl")[0].pair_id == pair_key("u", "p", "edited", "b")


def test_bad_input_in_auto_mode_is_reported_by_the_detected_loader(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(_tl() + "\n" + _tl(choice=3) + "\n")
    with pytest.raises(InputError) as ei:
        load_pairs(path)
    assert (ei.value.file, ei.value.line, ei.value.field) == (str(path), 2, "choice")


def test_missing_file_and_unknown_format(tmp_path):
    for load in (load_jsonl, load_tldr_comparisons, load_pairs):
        with pytest.raises(InputError) as ei:
            load(tmp_path / "nope.jsonl")
        assert ei.value.file == str(tmp_path / "nope.jsonl") and ei.value.line is None
    with pytest.raises(InputError) as ei:
        load_pairs(FIXTURES / "pairs_small.jsonl", format="csv")
    assert ei.value.field == "format" and "unknown format 'csv'" in str(ei.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(_jl().encode() + b"\n" + b'{"user_id": "\xff"}\n')
    with pytest.raises(InputError) as ei:
        load_jsonl(path)
    assert (ei.value.line, ei.value.field) == (2, None) and "UTF-8" in ei.value.reason


# --------------------------------------------------------------------------- real data (../shared/data)

@needs_data
@pytest.mark.data
def test_real_tldr_batch13():
    pairs = load_pairs(SHARED / "tldr" / "batch13.json")
    assert len(pairs) == 1097
    by_user = group_by_user(pairs)
    assert len(by_user) == 27
    assert sorted((len(v) for v in by_user.values()), reverse=True) == [
        114, 83, 74, 67, 60, 57, 52, 49, 47, 46, 44, 40, 40, 38, 37, 33, 32, 30, 26, 22, 20, 20, 20,
        16, 10, 10, 10]
    assert len({p.pair_id for p in pairs}) == 1097
    # one pair per (worker, post)
    assert max(Counter((p.user_id, p.meta["post_id"]) for p in pairs).values()) == 1
    assert all(p.chosen.startswith(" ") for p in pairs[:20])  # texts kept as they are


@needs_data
@pytest.mark.data
def test_real_fixture_matches_raw_file():
    fixture = load_pairs(SHARED / "fixtures" / "tldr_batch13_3users.jsonl")
    assert len(fixture) == 72 and len(group_by_user(fixture)) == 3
    assert all(len(v) == 24 for v in group_by_user(fixture).values())
    raw = {(p.user_id, p.prompt, p.chosen, p.rejected): p for p in load_tldr_comparisons(SHARED / "tldr" / "batch13.json")}
    for p in fixture:
        q = raw[(p.user_id, p.prompt, p.chosen, p.rejected)]
        assert p.meta["post_id"] == q.meta["post_id"]
    # the 3 workers with the most pairs in the raw file
    counts = Counter(q.user_id for q in raw.values())
    assert set(group_by_user(fixture)) == {u for u, _ in counts.most_common(3)}
