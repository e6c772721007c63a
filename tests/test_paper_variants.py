"""The paper's variants beside the project's own: Table 8's no-retrieval row (exact-global's
``global_mode``), its evaluation entries, and Drift's small model on the command line."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from prefsteer.attributes import attribute_messages
from prefsteer.backends.base import ScoreRequest
from prefsteer.methods.exact import Exact, ExactConfig, ExactGlobal
from prefsteer.retrieval import HashEmbedder
from prefsteer.storage import Memory
from prefsteer.types import PreferencePair, sha

PAIRS = [PreferencePair("u", "tell me a joke about cats", "funny humor joke", "formal dear sir", "u:0"),
         PreferencePair("u", "write a letter to my landlord", "formal dear sir regards", "lol wow", "u:1"),
         PreferencePair("u", "tell me a joke about dogs", "humor funny lol", "dear sir regards", "u:2")]


def _global(backend, memory, **kw):
    return ExactGlobal(backend, memory=memory, embedder=HashEmbedder(), config=ExactConfig(**kw))


def _store(memory, cid, rows):
    """Stored selections: pair id -> (attributes, objective, base objective)."""
    for pid, (attrs, obj, base) in rows.items():
        memory.put_selection("u", pid, cid, attrs, obj, base, [obj - base])


def _no_selection(*_):
    raise AssertionError("a stored selection was selected again")


def test_best_entry_keeps_the_set_with_the_highest_objective_on_its_own_pair(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    g = _global(fake_backend, mem, k=1, global_mode="best-entry")
    # u:1's set has the highest F on its own pair (5.0), though u:0's gains more over the plain prompt
    _store(mem, g.config_id, {"u:0": (["Humor"], 4.0, -3.0), "u:1": (["Formal"], 5.0, 4.5),
                              "u:2": (["Concise"], 1.0, 0.0)})
    g.select = _no_selection
    g.fit("u", PAIRS)
    assert g.attributes_for("u", ["anything", "else"]) == [["Formal"], ["Formal"]]
    st = g.load_state("u")["state"]
    assert (st["attributes"], st["objective"], st["base_objective"], st["pair"]) == (["Formal"], 5.0, 4.5, "u:1")
    assert st["global_mode"] == "best-entry" and st["pairs"] == ["u:0", "u:1", "u:2"]
    assert g.selection.evaluations == 0  # nothing scored: the stored selections decide


def test_best_entry_ties_go_to_the_earliest_pair_and_duplicate_prompts_keep_their_best(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    g = _global(fake_backend, mem, k=1, global_mode="best-entry")
    dup = PreferencePair("u", PAIRS[0].prompt, "humor humor", "formal", "u:3")
    _store(mem, g.config_id, {"u:0": (["Humor"], 2.0, 0.0), "u:1": (["Formal"], 2.0, 0.0),
                              "u:2": (["Concise"], 1.0, 0.0), "u:3": (["Vivid"], 2.0, 0.0)})
    g.select = _no_selection
    g.fit("u", PAIRS + [dup])
    assert g.attributes_for("u", ["x"]) == [["Humor"]]  # u:0, u:1, u:3 tie at 2.0: the first pair's


def test_best_mean_scores_each_selected_set_on_every_training_pair(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    g = _global(fake_backend, mem, k=1, global_mode="best-mean")
    _store(mem, g.config_id, {"u:0": (["Humor"], 5.0, 1.0), "u:1": (["Formal"], 2.0, -1.0),
                              "u:2": (["Concise"], 1.5, 0.5)})
    g.select = _no_selection
    # F of each candidate set on each pair, by hand
    table = {"u:0": {("Humor",): 5.0, ("Formal",): 1.0, ("Concise",): 0.0},
             "u:1": {("Humor",): -4.0, ("Formal",): 2.0, ("Concise",): 1.0},
             "u:2": {("Humor",): 0.0, ("Formal",): 2.0, ("Concise",): 1.5}}
    g._objectives = lambda p: ((lambda sets: [table[p.pair_id][tuple(s)] for s in sets]), None)
    g.fit("u", PAIRS)
    # means: Humor 1/3, Formal 5/3, Concise 2.5/3 -> Formal (best-entry would take Humor: 5.0)
    assert g.attributes_for("u", ["x"]) == [["Formal"]]
    st = g.load_state("u")["state"]
    assert st["objective"] == pytest.approx(5 / 3) and st["base_objective"] == pytest.approx(0.5 / 3)
    assert [(c["attributes"], round(c["objective"], 6)) for c in st["candidates"]] == \
        [(["Humor"], round(1 / 3, 6)), (["Formal"], round(5 / 3, 6)), (["Concise"], round(2.5 / 3, 6))]
    assert g.selection.evaluations == 9


def test_best_mean_on_the_fake_model_is_the_mean_of_its_scores(fake_backend, tmp_path):
    """Selections made by `exact`, then best-mean's objective recomputed from the model's scores."""
    mem = Memory(tmp_path / "m.db")
    mem.add_pairs(PAIRS)
    ex = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=2))
    ex.fit("u", PAIRS)
    g = _global(fake_backend, mem, k=2, global_mode="best-mean")
    assert g.config_id == ex.config_id
    g.select = _no_selection
    g.fit("u", PAIRS)
    sets = list(dict.fromkeys(tuple(mem.selection("u", p.pair_id, ex.config_id)["attributes"]) for p in PAIRS))

    def F(p, attrs):
        msgs = attribute_messages(p.prompt, attrs, g.library)
        w, l = fake_backend.score([ScoreRequest.of(msgs, p.chosen), ScoreRequest.of(msgs, p.rejected)])
        return w.logprob - l.logprob

    means = [np.mean([F(p, s) for p in PAIRS]) for s in sets]
    st = g.load_state("u")["state"]
    assert st["attributes"] == list(sets[int(np.argmax(means))])
    assert st["objective"] == pytest.approx(max(means), abs=1e-9)
    assert [c["objective"] for c in st["candidates"]] == pytest.approx(means, abs=1e-9)


def test_the_paper_variant_selects_what_exact_would_and_stores_it_for_exact(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    mem.add_pairs(PAIRS)
    g = _global(fake_backend, mem, k=1, global_mode="best-entry")
    g.fit("u", PAIRS)
    ex = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))
    ex.select = _no_selection  # every pair was selected, and stored, by exact-global
    ex.fit("u", PAIRS)
    sels = {p.pair_id: mem.selection("u", p.pair_id, ex.config_id) for p in PAIRS}
    best = max(sels, key=lambda pid: sels[pid]["objective"])
    assert g.attributes_for("u", ["x"]) == [sels[best]["attributes"]]
    # against a fresh selection on the model: the same sets
    fresh = Exact(fake_backend, memory=Memory(tmp_path / "fresh.db"), embedder=HashEmbedder(),
                  config=ExactConfig(k=1))
    assert [list(fresh.select(p).attributes) for p in PAIRS] == [sels[p.pair_id]["attributes"] for p in PAIRS]


def test_global_mode_leaves_todays_ids_and_stored_states(fake_backend, tmp_path):
    mem = Memory(tmp_path / "m.db")
    today = _global(fake_backend, mem, k=1)
    c = asdict(today.config)
    c.pop("global_mode")  # the options before global_mode existed
    assert today.state_id == sha("exact-global", fake_backend.fingerprint, fake_backend.template_id, c)[:16]
    # a state stored under that id (before the option) is served
    mem.put_method_state("u", "exact-global", today.state_id, fake_backend.fingerprint,
                         {"attributes": ["Vivid"], "objective": 1.0, "base_objective": 0.0, "gains": [1.0],
                          "pairs": []}, n_pairs=3)
    assert _global(fake_backend, Memory(tmp_path / "m.db"), k=1).attributes_for("u", ["x"]) == [["Vivid"]]
    # the paper's variants are other states, but share EXACT's selections (one config id)
    entry, mean = (_global(fake_backend, mem, k=1, global_mode=m) for m in ("best-entry", "best-mean"))
    assert len({today.state_id, entry.state_id, mean.state_id}) == 3
    assert today.config_id == entry.config_id == mean.config_id == \
        Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1)).config_id


def test_global_mode_is_checked():
    with pytest.raises(ValueError, match=r"`global_mode` \(='best'\) has to be one of greedy, best-entry, best-mean"):
        ExactConfig(global_mode="best")
    with pytest.raises(ValueError, match=r"`global_pairs` \(=8\) applies to `global_mode` 'greedy' only"):
        ExactConfig(global_mode="best-entry", global_pairs=8)
    with pytest.raises(ValueError, match=r"`global_pairs` \(=-1\)"):
        ExactConfig(global_pairs=-1)


def test_no_pairs_is_an_error_naming_the_user(fake_backend):
    with pytest.raises(ValueError, match="needs at least one training pair for user 'u'"):
        _global(fake_backend, Memory(":memory:"), global_mode="best-entry").fit("u", [])


# -- the evaluation configurations --------------------------------------------------------------

@pytest.mark.parametrize("name", ["paper", "paper-cpu", "table8"])
def test_the_paper_configs_measure_the_no_retrieval_readings_beside_todays(name):
    from prefsteer.evaluation.protocol import load_config

    cfg = load_config(name)
    by = {m.label: m for m in cfg.methods}
    assert by["exact-global"].kwargs == {"k": 3, "global_pairs": 8}
    assert (by["exact-global-paper"].method, by["exact-global-paper"].kwargs) == \
        ("exact-global", {"k": 3, "global_mode": "best-entry"})
    assert (by["exact-global-mean"].method, by["exact-global-mean"].kwargs) == \
        ("exact-global", {"k": 3, "global_mode": "best-mean"})
    for m in cfg.methods:
        m.check()


def test_the_drift_small_config_builds_a_second_model_that_gives_drifts_numbers(fake_backend):
    from prefsteer.evaluation.protocol import load_config
    from prefsteer.methods.registry import Resources, build

    cfg = load_config("drift-small-cpu")
    assert cfg.protocol_id() == load_config("paper-cpu").protocol_id()  # one run directory serves both
    specs = {m.label: m for m in cfg.methods}
    assert specs["drift-small"].kwargs == {"small_model": "smollm2-135m"}
    res = Resources(memory=Memory(":memory:"), library=None)
    small = build("drift", fake_backend, res, specs["drift-small"].kwargs)
    plain = build("drift", fake_backend, res, specs["drift"].kwargs)
    assert small.drift_backend is not fake_backend and plain.drift_backend is fake_backend
    small.fit("u", PAIRS)
    plain.fit("u", PAIRS)
    assert small.margins("u", PAIRS) == plain.margins("u", PAIRS)


# -- the command line --------------------------------------------------------------------------

FAST = ["--backend", "fake", "--embedder", "hash", "--quiet"]


def _write(path):
    path.write_text("\n".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                          "rejected": p.rejected}) for p in PAIRS) + "\n")
    return path


def test_cli_drift_backend_and_model_build_the_small_model():
    from prefsteer.cli import make_parser
    from prefsteer.cli.context import Context

    ctx = Context(make_parser().parse_args(["generate", "--method", "drift", "--drift-backend", "fake",
                                            "--drift-model", "toy", "hi", *FAST]))
    d = ctx.method("drift")
    assert (d.config.small_backend, d.config.small_model) == ("fake", "toy")
    assert d.drift_backend is not ctx.backend and d.drift_backend.name == "fake"
    plain = Context(make_parser().parse_args(["generate", "--method", "drift", "hi", *FAST]))
    assert plain.method("drift").drift_backend is plain.backend


def test_cli_refuses_drift_model_for_another_method(tmp_path, capsys):
    from prefsteer.cli import main

    code = main(["index", "--method", "exact", "--drift-model", "x", "--data", str(_write(tmp_path / "p.jsonl")),
                 "--db", str(tmp_path / "m.db"), *FAST])
    assert code == 2 and "--drift-model is an option of method 'drift', not of 'exact'" in capsys.readouterr().err


def test_cli_global_mode_indexes_the_papers_set(tmp_path, capsys):
    from prefsteer.cli import main

    data, db = _write(tmp_path / "p.jsonl"), str(tmp_path / "m.db")
    assert main(["index", "--method", "exact", "--k", "1", "--data", str(data), "--db", db, "--json", *FAST]) == 0
    capsys.readouterr()
    assert main(["index", "--method", "exact-global", "--global-mode", "best-entry", "--k", "1", "--data",
                 str(data), "--db", db, "--json", *FAST]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["score_cache"]["misses"] == 0  # exact's stored selections decide: no model call
    got = rep["users"][0]["attributes"]
    mem = Memory(db)  # the command line's preset is the product one
    ex = Exact(load_fake(), memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1, preset="product"))
    sels = [mem.selection("u", p.pair_id, ex.config_id) for p in mem.pairs("u")]
    assert got == max(sels, key=lambda s: s["objective"])["attributes"]


def load_fake():
    from prefsteer.backends import load_backend

    return load_backend("fake")
