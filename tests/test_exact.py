import json
import sqlite3

import pytest

from prefsteer.retrieval import HashEmbedder, nearest, normalize
from prefsteer.errors import UnknownUserError
from prefsteer.backends.cache import ScoreCache
from prefsteer.storage import Memory
from prefsteer.methods.exact import Exact, ExactConfig, ExactGlobal
from prefsteer.types import PreferencePair
import numpy as np


def pairs_for(user):
    # "humor" replies win on jokes, "formal" replies win on letters: retrieval must tell them apart
    return [
        PreferencePair(user, "tell me a joke about cats", "funny humor joke", "formal dear sir", f"{user}:0"),
        PreferencePair(user, "write a letter to my landlord", "formal dear sir regards", "lol wow", f"{user}:1"),
        PreferencePair(user, "tell me a joke about dogs", "humor funny lol", "dear sir regards", f"{user}:2"),
    ]


@pytest.fixture
def exact(fake_backend, tmp_path):
    return Exact(fake_backend, memory=Memory(tmp_path / "m.db"), embedder=HashEmbedder(),
                 config=ExactConfig(k=1))


def test_nearest_is_cosine_on_unit_rows():
    corpus = normalize(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
    assert nearest(normalize(np.array([0.1, 1.0])), corpus)[0] == 2
    i, sim = nearest(np.array([1.0, 0.0], dtype=np.float32), corpus)
    assert i == 0 and sim == pytest.approx(1.0)
    with pytest.raises(ValueError):
        nearest(np.ones(2), np.zeros((0, 2)))


def test_fit_selects_per_pair_and_retrieval_uses_the_nearest_prompt(exact):
    exact.memory.add_pairs(pairs_for("u"))  # the caller stores the pairs; fit indexes them
    exact.fit("u", pairs_for("u"))
    entries = {e.prompt: e for e in exact.memory.entries("u")}
    assert entries["tell me a joke about cats"].attributes == ["Humor"]
    assert entries["write a letter to my landlord"].attributes == ["Formal"]
    assert exact.memory.user_status("u") == "ready"
    assert exact.attributes_for("u", ["a joke about cats please", "a letter to the landlord"]) == \
        [["Humor"], ["Formal"]]
    # injected attributes raise the preferred reply on held-out pairs of the same kinds
    test = [PreferencePair("u", "another joke about cats", "humor funny", "formal sir", "t0")]
    assert exact.margins("u", test)[0] > 0


def test_duplicate_prompts_keep_the_best_objective(exact, fake_backend):
    ps = pairs_for("u")
    dup = PreferencePair("u", ps[0].prompt, "humor humor humor humor", "formal formal", "u:3")
    exact.memory.add_pairs(ps + [dup])
    exact.fit("u", ps + [dup])
    entries = [e for e in exact.memory.entries("u") if e.prompt == ps[0].prompt]
    assert len(entries) == 1
    sels = [exact.memory.selection("u", pid, exact.config_id)["objective"] for pid in ("u:0", "u:3")]
    assert entries[0].objective == max(sels)


def test_index_resumes_and_rescoring_hits_the_cache(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    calls = []

    class Counting:
        fingerprint, template_id = fake_backend.fingerprint, fake_backend.template_id

        def score(self, reqs, progress=False):
            calls.append(len(reqs))
            return fake_backend.score(reqs)

    ex = Exact(Counting(), memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=2))

    class Boom(Exception):
        pass

    ps = pairs_for("u")
    real_select, seen = ex.select, []

    def crashing(p):
        if len(seen) == 2:
            raise Boom()
        seen.append(p.pair_id)
        return real_select(p)

    mem.add_pairs(ps)
    ex.select = crashing
    with pytest.raises(Boom):
        ex.fit("u", ps)
    # the crash left two selections saved, no published entries, and the user marked 'indexing'
    assert mem.user_status("u") == "indexing"
    assert mem.entries("u") == []
    assert [mem.selection("u", p.pair_id, ex.config_id) is not None for p in ps] == [True, True, False]
    ex.select = real_select
    before = len(calls)
    ex.fit("u", ps)
    assert len(calls) - before == 2  # only the third pair is searched again: two greedy steps
    assert mem.user_status("u") == "ready" and len(mem.entries("u")) == 3
    # a second user with the same pairs costs no model call at all: the score cache answers
    ps2 = [PreferencePair("v", p.prompt, p.chosen, p.rejected, p.pair_id) for p in ps]
    mem.add_pairs(ps2)
    before = len(calls)
    ex.fit("v", ps2)
    assert len(calls) == before and ex.scorer.hits > 0


def test_feedback_adds_one_entry_without_reindexing(exact):
    exact.memory.add_pairs(pairs_for("u"))
    exact.fit("u", pairs_for("u"))
    before = {e.pair_id: e.attributes for e in exact.memory.entries("u")}
    new = PreferencePair("u", "explain my code bug", "python code function", "lol", "u:9")
    exact.memory.add_pairs([new])  # the caller stores the pair, then the method indexes it
    stored = exact.memory.pairs("u")
    e = exact.add_feedback(new)
    after = {x.pair_id: x.attributes for x in exact.memory.entries("u")}
    assert e.attributes == ["Code"] and after.pop("u:9") == ["Code"] and after == before
    assert exact.memory.pairs("u") == stored  # the method stores its entry, not the pair


def test_unknown_user_and_unindexed_user(exact):
    with pytest.raises(UnknownUserError, match="unknown user 'nobody'"):
        exact.generate("nobody", ["hi"])


def test_memory_transaction_rolls_back(tmp_path):
    mem = Memory(tmp_path / "m.db")
    with pytest.raises(RuntimeError):
        with mem.transaction():
            mem.add_pairs([PreferencePair("u", "p", "a", "b", "1")])
            raise RuntimeError("crash")
    assert mem.users() == []
    assert sqlite3.connect(tmp_path / "m.db").execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 0


def test_score_cache_keys_on_model_and_text(fake_backend, tmp_path):
    from prefsteer.backends import ScoreRequest, load_backend, user_turn

    mem = Memory(tmp_path / "m.db")
    r = ScoreRequest.of(user_turn("q"), "a reply")
    a = ScoreCache(fake_backend, mem)
    b = ScoreCache(load_backend("fake", seed=1), mem)
    assert a.key(r) != b.key(r)
    assert a.score([r])[0] == fake_backend.score([r])[0]
    assert a.score([r, r]) and a.hits == 2 and a.misses == 1


def test_exact_global_uses_one_set_for_every_prompt(fake_backend):
    g = ExactGlobal(fake_backend, embedder=HashEmbedder(), config=ExactConfig(k=1))
    ps = [PreferencePair("u", f"prompt {i}", "humor funny", "formal sir", str(i)) for i in range(3)]
    g.fit("u", ps)
    assert g.attributes_for("u", ["x", "y"]) == [["Humor"], ["Humor"]]


def test_selections_export_and_import_round_trip_and_bad_lines_name_their_field(tmp_path):
    from prefsteer.errors import InputError

    src = Memory(tmp_path / "a.db")
    src.put_selection("u1", "p2", "cfg", ["Humor", "Concise"], -1.5, -4.0, [2.0, 0.5])
    src.put_selection("u1", "p1", "cfg", ["Formal"], 3.0, 2.0, [1.0])
    path = tmp_path / "sel.jsonl"
    assert src.export_selections(path) == 2
    assert not list(tmp_path.glob(".sel.jsonl.tmp"))  # written aside, then renamed
    assert [json.loads(x)["pair_id"] for x in path.read_text().splitlines()] == ["p1", "p2"]

    dst = Memory(tmp_path / "b.db")
    dst.put_selection("u1", "p1", "cfg", ["Kept"], 9.0, 0.0, [9.0])  # already there: kept
    assert dst.import_selections(path) == 1
    assert dst.selection("u1", "p2", "cfg") == {"attributes": ["Humor", "Concise"], "objective": -1.5,
                                                "base_objective": -4.0, "gains": [2.0, 0.5]}
    assert dst.selection("u1", "p1", "cfg")["attributes"] == ["Kept"]
    assert dst.import_selections(path) == 0
    assert dst.selections_of("u1", "p2", ["cfg", "other"]) == {"cfg": dst.selection("u1", "p2", "cfg")}
    assert dst.selections_of("u1", "p2", []) == {}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"user_id": "u2", "pair_id": "p", "config_id": "c", '
                   '"attributes": "Humor", "objective": 1, "base_objective": 0, "gains": [1]}\n')
    fresh = Memory(tmp_path / "c.db")
    with pytest.raises(InputError, match=r"bad\.jsonl:3: field 'attributes'"):
        fresh.import_selections(bad)
    assert fresh.selection("u1", "p1", "cfg") is None  # all or none


def test_other_k_reuses_stored_greedy_selections(fake_backend, tmp_path):
    """k=1 is cut from k=3's selections (nothing scored); k=5 continues them from step 4; both
    equal what a fresh index of the same k selects."""
    pairs = [PreferencePair("u", f"write a {t} about {i}", f"a {t} with humor {i}", f"a formal {t} {i}", f"p{i}")
             for i, t in enumerate(["joke", "letter", "story", "poem"])]
    mem = Memory(tmp_path / "m.db")
    mem.add_pairs(pairs)
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.fingerprint, self.template_id = inner, inner.fingerprint, inner.template_id

        def score(self, requests, **kw):
            calls.append(len(requests))
            return self.inner.score(requests, **kw)

    counted = Counting(fake_backend)

    def make(k, memory):
        return Exact(counted, memory=memory, embedder=HashEmbedder(), config=ExactConfig(k=k))

    make(3, mem).fit("u", pairs)
    calls.clear()
    k1 = make(1, mem)
    k1.fit("u", pairs)
    assert calls == []
    calls.clear()
    k5 = make(5, mem)
    k5.fit("u", pairs)
    n = len(k5.library)
    assert sum(calls) == 2 * len(pairs) * ((n - 3) + (n - 4))  # steps 4 and 5 only, two requests per set
    for k, reused in ((1, k1), (5, k5)):
        fresh = make(k, Memory(tmp_path / f"fresh{k}.db"))
        fresh.memory.add_pairs(pairs)
        fresh.fit("u", pairs)
        for p in pairs:
            a, b = mem.selection("u", p.pair_id, reused.config_id), fresh.memory.selection("u", p.pair_id, fresh.config_id)
            assert a["attributes"] == b["attributes"] and a["gains"] == pytest.approx(b["gains"])
            assert a["objective"] == pytest.approx(b["objective"])
    # a search that stops early is never continued
    stop = Exact(counted, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=5, stop_when_no_gain=True))
    assert stop._greedy_start(pairs[0]) is None


def test_screened_mode_ranks_with_a_cast_copy_and_keeps_the_models_objectives(fake_backend, tmp_path):
    from prefsteer.methods.exact.select import make_objective

    mem = Memory(tmp_path / "m.db")
    ps = pairs_for("u")
    mem.add_pairs(ps)

    def make(**kw):
        return Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=2, **kw))

    screened = make(mode="screened", screen_top=3)
    screened.fit("u", ps)
    assert screened.screen.backend.fingerprint == fake_backend.fingerprint + ":bfloat16"
    greedy = make()
    greedy.fit("u", ps)
    # the screen's settings enter the id of screened selections only
    assert make(screen_top=7).config_id == greedy.config_id != screened.config_id
    assert make(mode="screened", screen_top=7).config_id != screened.config_id
    lib = screened.library
    for p in ps:
        s = mem.selection("u", p.pair_id, screened.config_id)
        f = make_objective(fake_backend, p.prompt, p.chosen, p.rejected, lib)
        assert s["objective"] == pytest.approx(f([tuple(s["attributes"])])[0])  # float32's own F
        assert s["base_objective"] == pytest.approx(f([()])[0])
    # every candidate scored by the model: the screen cannot change greedy's answer
    everything = Exact(fake_backend, memory=Memory(tmp_path / "all.db"), embedder=HashEmbedder(),
                       config=ExactConfig(k=2, mode="screened", screen_top=len(lib)))
    everything.memory.add_pairs(ps)
    everything.fit("u", ps)
    for p in ps:
        a = everything.memory.selection("u", p.pair_id, everything.config_id)
        assert a["attributes"] == mem.selection("u", p.pair_id, greedy.config_id)["attributes"]
    g = ExactGlobal(fake_backend, embedder=HashEmbedder(), config=ExactConfig(k=1, mode="screened", screen_top=3))
    g.fit("u", ps)
    assert g.selection.evaluations == 1 + 3
    with pytest.raises(ValueError, match="`screen_top` \\(=0\\)"):
        ExactConfig(mode="screened", screen_top=0)


def test_exact_global_persists_its_set_and_a_new_instance_generates_without_fitting(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    ps = [PreferencePair("u", f"prompt {i}", "humor funny", "formal sir", str(i)) for i in range(3)]
    mem.add_pairs(ps)
    ExactGlobal(fake_backend, memory=mem, config=ExactConfig(k=1)).fit("u", ps)
    fresh = ExactGlobal(fake_backend, memory=Memory(tmp_path / "m.db"), config=ExactConfig(k=1))
    fresh.select = None  # a refit would call it
    assert fresh.attributes_for("u", ["x"]) == [["Humor"]]
    out = fresh.generate("u", ["x"])[0]
    assert out.attributes == ["Humor"] and out.extra["prompt"] == "x\nAttributes: <Humor>"
    assert fresh.profile("u")["state"]["attributes"] == ["Humor"] and fresh.profile("u")["pairs"] == 3
    # another k is another state: not served from k=1's
    from prefsteer.methods.base import NotFittedError
    with pytest.raises(NotFittedError, match="user 'u' has not been fitted with the 'exact-global' method"):
        ExactGlobal(fake_backend, memory=mem, config=ExactConfig(k=2)).attributes_for("u", ["x"])
    with pytest.raises(UnknownUserError, match="unknown user 'nobody'"):
        fresh.attributes_for("nobody", ["x"])


def test_an_unknown_or_bad_option_is_an_error_naming_it(fake_backend):
    from prefsteer.errors import PrefsteerError
    with pytest.raises(PrefsteerError, match="unknown option 'kk' for method 'exact'"):
        Exact(fake_backend, kk=3)
    with pytest.raises(PrefsteerError, match=r"`k` \(=0\) has to be at least 1"):
        Exact(fake_backend, k=0)
    assert Exact(fake_backend, k=2, mode="lazy").config == ExactConfig(k=2, mode="lazy")
    assert Exact.config_class is ExactConfig and ExactGlobal.config_class is ExactConfig


def test_fit_builds_the_users_entries_from_exactly_the_given_pairs_and_stores_no_pairs(fake_backend, tmp_path):
    ps = pairs_for("u")
    first, second = ps[:2], ps[2:]
    mem = Memory(tmp_path / "m.db")
    mem.add_pairs(ps)
    ex = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))

    def indexed():
        return sorted(e.pair_id for e in mem.entries("u"))

    ex.fit("u", first)
    assert indexed() == ["u:0", "u:1"]
    ex.fit("u", second)  # the entries are rebuilt from these pairs only: the first two's go
    assert indexed() == ["u:2"]
    assert mem.selection("u", "u:0", ex.config_id) is not None  # their selections stay for a refit
    ex.fit("u", ps)  # what `prefsteer index` does: all the user's stored pairs
    assert indexed() == ["u:0", "u:1", "u:2"]
    assert [p.pair_id for p in mem.pairs("u")] == ["u:0", "u:1", "u:2"]  # fit stored no pair, dropped none
    # --replace: the caller forgets the other pairs, then fits the ones it keeps
    assert mem.forget_pairs("u", [p.pair_id for p in second]) == 2
    ex.fit("u", second)
    assert indexed() == ["u:2"] and [p.pair_id for p in mem.pairs("u")] == ["u:2"]


def test_levers_keep_the_paper_config_id_and_change_it_only_when_set(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    ids = {}
    for name, kw in {"paper": {}, "explicit": {"render": "names", "placement": "user", "objective": "sum"},
                     "describe": {"describe": True}, "described": {"render": "described"},
                     "instruction": {"render": "instruction"}, "system": {"placement": "system"},
                     "mean": {"objective": "mean"}}.items():
        ids[name] = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=2, **kw)).config_id
    assert ids["paper"] == ids["explicit"]
    assert ids["describe"] == ids["described"]  # the same rendering shares its stored selections
    assert len({ids[n] for n in ("paper", "describe", "instruction", "system", "mean")}) == 5
    # the id of the paper's settings is the one computed before the levers existed
    from dataclasses import asdict
    from prefsteer.types import sha

    e = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=2))
    c = asdict(e.config)
    for key in ("global_pairs", "global_mode", "screen_top", "screen_dtype", "preset", "render", "placement",
                "objective"):
        c.pop(key)
    assert ids["paper"] == sha(fake_backend.fingerprint, fake_backend.template_id, e.library.name,
                               [(a.name, a.description) for a in e.library.attributes], c)[:16]


@pytest.mark.parametrize("kw, bad", [({"render": "loud"}, "render"), ({"placement": "assistant"}, "placement"),
                                     ({"objective": "max"}, "objective"),
                                     ({"describe": True, "render": "instruction"}, "describe")])
def test_lever_values_are_checked(kw, bad):
    with pytest.raises(ValueError, match=bad):
        ExactConfig(**kw)


class _Recorder:
    """A scorer that records what it is asked and scores by the context's length and a token count
    of 1 for the chosen reply, 4 for the rejected one."""

    def __init__(self):
        self.requests = []

    def score(self, requests, progress=False):
        from prefsteer.backends.base import Score

        self.requests += list(requests)
        out = []
        for r in requests:
            n = 1 if r.continuation == "W" else 4
            out.append(Score(-2.0 * n - 0.01 * len(r.messages[-1][1]), n))
        return out


def test_render_and_placement_change_what_is_scored():
    from prefsteer.attributes import load_library
    from prefsteer.methods.exact.select import make_objective

    lib = load_library()
    for kw, want in [({}, [("user", "Q\nAttributes: <Concise>")]),
                     ({"style": "instruction"}, [("user", "Q\nAnswer in a way that is: concise.")]),
                     ({"style": "described", "placement": "system"},
                      [("system", "Attributes: <Concise (short and to the point, no filler)>"), ("user", "Q")])]:
        rec = _Recorder()
        make_objective(rec, "Q", "W", "L", lib, **kw)([(), ("Concise",)])
        assert [r.messages for r in rec.requests] == [(("user", "Q"),)] * 2 + [tuple(want)] * 2
        assert [r.continuation for r in rec.requests] == ["W", "L", "W", "L"]


def test_mean_objective_divides_by_token_counts():
    from prefsteer.methods.exact.select import make_objective

    rec = _Recorder()
    summed = make_objective(rec, "Q", "W", "L")([()])[0]
    mean = make_objective(rec, "Q", "W", "L", objective="mean")([()])[0]
    w, l = -2.0 - 0.01, -8.0 - 0.01
    assert summed == pytest.approx(w - l)
    assert mean == pytest.approx(w / 1 - l / 4)


def test_exact_scores_and_generates_with_its_levers(fake_backend, tmp_path):
    ex = Exact(fake_backend, memory=Memory(tmp_path / "m.db"), embedder=HashEmbedder(),
               config=ExactConfig(k=1, render="instruction", placement="system"))
    ex.memory.add_pairs(pairs_for("u"))
    ex.fit("u", pairs_for("u"))
    assert ex.attribute_messages("Q", ["Humor"]) == [
        {"role": "system", "content": "Answer in a way that is: humor."}, {"role": "user", "content": "Q"}]
    from prefsteer.backends.base import GenerationConfig

    out = ex.generate("u", ["a joke about cats please"], GenerationConfig(max_new_tokens=3))[0]
    assert out.extra == {"prompt": "a joke about cats please",
                         "system": f"Answer in a way that is: {out.attributes[0].lower()}.",
                         "retrieved": {"prompt": "tell me a joke about cats",
                                       "similarity": pytest.approx(0.7303, abs=1e-4)}}
    # the non-negativity filter keeps only attributes that raise F
    f = Exact(fake_backend, memory=Memory(tmp_path / "f.db"), embedder=HashEmbedder(),
              config=ExactConfig(k=3, stop_when_no_gain=True))
    s = f.select(pairs_for("u")[0])
    assert all(g > 0 for g in s.gains)


def test_entries_selected_under_other_settings_are_served_with_one_warning(fake_backend, tmp_path, caplog):
    """A memory indexed under one configuration and served under another (a changed preset, another
    k) still answers, and the log says once per user and process which settings its entries came from."""
    from prefsteer.backends.base import GenerationConfig

    mem = Memory(tmp_path / "m.db")
    pairs = [PreferencePair("u", "a joke", "funny humor joke", "formal dear sir", "p1")]
    old = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))
    mem.add_pairs(pairs)
    old.fit("u", pairs)
    with caplog.at_level("WARNING", logger="prefsteer.methods.exact"):
        old.generate("u", ["another joke"], GenerationConfig(max_new_tokens=2))
        assert not caplog.records  # the same settings: nothing to say
        for _ in range(2):  # two method objects, as two of the service's request threads build them
            new = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig.of_preset("product", k=1))
            for _ in range(2):
                out = new.generate("u", ["another joke"], GenerationConfig(max_new_tokens=2))
    assert out[0].attributes == mem.entries("u")[0].attributes
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and old.config_id in warned[0] and new.config_id in warned[0] and "1 of 1" in warned[0]
