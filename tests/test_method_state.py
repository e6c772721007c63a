"""Every method's per-user state survives the process: fit with one Method object and Memory, then
a fresh Memory over the same file and a fresh Method generate, rank and profile exactly the same.

Also: the error for an unfitted user, what ``feedback`` does per method, strict options, and the
message when the backend lacks an operation the method needs (fake backend throughout).
"""

import dataclasses

import numpy as np
import pytest

from prefsteer.backends.base import GenerationConfig, UnsupportedOperation
from prefsteer.backends.fake import FakeBackend
from prefsteer.storage import Memory
from prefsteer.methods import get_method_class
from prefsteer.methods.base import NotFittedError, OptionError, UnknownOptionError
from prefsteer.types import PreferencePair

# small settings, so each fit takes a second
OPTIONS = {
    "none": {},
    "base": {"max_pairs": 6},
    "drift": {"attributes": ("Concise", "Humor", "Formal")},
    "reward": {"r": 4, "alpha": 8, "lr": 1e-2, "epochs": 3, "batch_size": 4, "max_length": 32, "n": 3},
    "cliper": {"alpha": 3.0, "personal_rank": 2, "personal_steps": 80},
}
METHODS = list(OPTIONS)
PROMPTS = ["tell me about my dog", "a summary of the post"]
GREEDY = GenerationConfig(max_new_tokens=8)

TOPICS = "dog cat car house job friend family school".split()


def pairs(user="maya"):
    return [PreferencePair(user, f"tell me about my {t}", f"funny joke lol about the {t}",
                           f"dear sir regards about the {t}", f"p{i}") for i, t in enumerate(TOPICS)]


@pytest.fixture(autouse=True)
def isolated_classifiers(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path / "cliper"))


def build(name, db, backend=None, **extra):
    return get_method_class(name)(backend or FakeBackend(), memory=Memory(db), **{**OPTIONS[name], **extra})


def outputs(method, user="maya"):
    gens = method.generate(user, PROMPTS, GREEDY)
    return {"texts": [g.text for g in gens], "margins": method.margins(user, pairs()[:3]),
            "profile": method.profile(user)}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """name -> (db path, the outputs of the object that was fitted); each method fitted once."""
    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path_factory.mktemp("cliper")))
        for name in METHODS:
            db = tmp_path_factory.mktemp(name) / "m.db"
            Memory(db).add_pairs(pairs())
            m = build(name, db)
            m.fit("maya", pairs())
            done[name] = (db, outputs(m))
    return done


@pytest.mark.parametrize("name", METHODS)
def test_a_new_process_serves_the_fitted_user(fitted, name):
    db, first = fitted[name]
    again = outputs(build(name, db))                 # new Memory over the same file, new Method
    assert again["texts"] == first["texts"] and all(again["texts"])
    np.testing.assert_allclose(again["margins"], first["margins"], rtol=1e-6, atol=1e-6)
    assert again["profile"] == first["profile"] and again["profile"]["fitted"]


def test_what_each_profile_says(fitted):
    p = {name: fitted[name][1]["profile"] for name in METHODS}
    assert p["none"]["state"]["note"].startswith("no per-user state")
    assert p["base"]["pairs"] == len(TOPICS) and p["base"]["state"]["pairs_in_prompt"] == 6
    assert p["base"]["state"]["pair_ids"] == [f"p{i}" for i in range(6)]
    weights = p["drift"]["state"]["weights"]
    assert [w["attribute"] for w in weights] == sorted([w["attribute"] for w in weights],
                                                        key=lambda a: -abs(next(x["weight"] for x in weights
                                                                                if x["attribute"] == a)))
    assert {w["attribute"] for w in weights} == {"Concise", "Humor", "Formal"}
    assert p["drift"]["state"]["pairs"] == len(TOPICS)
    r = p["reward"]["state"]
    assert r["pairs"] == len(TOPICS) and r["steps"] == 2 * 3 and r["final_loss"] == r["epoch_losses"][-1]
    assert r["epoch_losses"][-1] < r["epoch_losses"][0]
    c = p["cliper"]["state"]
    assert c["prefs"] == {"personal": 1.0} and c["alpha"] == 3.0
    assert c["personal_accuracy"] == 1.0  # funny vs formal answers: separable, and trained on all of them


def test_fitted_margins_rank_the_users_choice(fitted):
    # every learning method ranks the chosen (funny) answers of its training pairs first
    for name in ("drift", "reward", "cliper"):
        assert all(m > 0 for m in fitted[name][1]["margins"]), name


@pytest.mark.parametrize("name", [n for n in METHODS if n != "none"])
def test_unfitted_user_gets_a_clear_error(fitted, name):
    db, _ = fitted[name]
    m = build(name, db)
    with pytest.raises(NotFittedError) as e:
        m.generate("nobody", PROMPTS[:1], GREEDY)
    assert f"'nobody' has not been fitted with the '{name}' method" in str(e.value)
    assert f"prefsteer index --method {name}" in str(e.value)
    assert m.profile("nobody") == {"method": name, "fitted": False}


def test_none_needs_no_fit(tmp_path):
    out = build("none", tmp_path / "m.db").generate("anyone", PROMPTS, GREEDY)
    assert [o.text for o in out] == [g.text for g in FakeBackend().generate(
        [[{"role": "user", "content": p}] for p in PROMPTS], GREEDY)]


def test_fit_options_key_the_state_decoding_options_do_not(fitted):
    db, first = fitted["drift"]
    # beta and top_m change decoding only: the stored weights serve
    assert build("drift", db, beta=3.0).profile("maya")["state"] == first["profile"]["state"]
    # another l2 would have learned other weights: not fitted under it
    with pytest.raises(NotFittedError):
        build("drift", db, l2=0.5).generate("maya", PROMPTS[:1], GREEDY)
    db, first = fitted["cliper"]
    assert build("cliper", db, alpha=1.0).profile("maya")["fitted"]
    assert not build("cliper", db, personal_steps=5).profile("maya")["fitted"]


def test_feedback(tmp_path):
    new = PreferencePair("maya", "what about my boss", "lol funny wow", "formal regards sir", "p-new")
    for name in METHODS:
        db = tmp_path / f"{name}.db"
        Memory(db).add_pairs(pairs())
        build(name, db).fit("maya", pairs())
        mem = Memory(db)
        mem.add_pairs([new])
        m = get_method_class(name)(FakeBackend(), memory=mem, **OPTIONS[name])
        done = m.feedback("maya", [new])
        prof = build(name, db).profile("maya")
        if name == "none":
            assert done == "unchanged"
        elif name == "base":
            # the history prompt is rebuilt from every stored pair (no model call)
            assert done == "refit" and not prof["stale"] and prof["pairs"] == len(TOPICS) + 1
            assert prof["state"]["pairs_in_prompt"] == min(OPTIONS["base"]["max_pairs"], len(TOPICS) + 1)
        elif name == "drift":
            # refit on all nine stored pairs: the same weights as a fresh fit on them
            assert done == "refit" and not prof["stale"] and prof["pairs"] == len(TOPICS) + 1
            ref = build("drift", tmp_path / "ref.db")
            ref.fit("maya", pairs() + [new])
            assert prof["state"] == ref.profile("maya")["state"] | {
                k: prof["state"][k] for k in ("scoring_seconds", "fit_seconds")}
        else:
            assert done == "stale" and prof["stale"], name
            assert prof["pairs"] == len(TOPICS)


@pytest.mark.parametrize("name, missing, when", [
    ("drift", "start_decoding", "generate"),
    ("drift", "score", "fit"),
    ("reward", "adapter", "fit"),
    ("cliper", "hidden_states", "fit"),
    ("base", "generate", "generate"),
    ("none", "score", "margins"),
])
def test_missing_operation_names_backend_and_operation(tmp_path, name, missing, when):
    class Lacking(FakeBackend):
        capabilities = FakeBackend.capabilities - {missing}

    db = tmp_path / "m.db"
    m = build(name, db, backend=Lacking())
    if when != "fit" and name != "none":
        m.fit("maya", pairs())  # fitting needs other operations only
    with pytest.raises(UnsupportedOperation) as e:
        {"fit": lambda: m.fit("maya", pairs()),
         "generate": lambda: m.generate("maya", PROMPTS[:1], GREEDY),
         "margins": lambda: m.margins("maya", pairs()[:1])}[when]()
    assert e.value.backend == "fake" and e.value.operation == missing
    assert f"'fake' backend does not support `{missing}`" in str(e.value)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_an_error_naming_it(name):
    with pytest.raises(UnknownOptionError) as e:
        get_method_class(name)(FakeBackend(), kk=3)
    assert "'kk'" in str(e.value) and f"method '{name}'" in str(e.value)


def test_bad_option_value_names_method_and_option():
    with pytest.raises(OptionError, match="method 'reward': `epochs` \\(=0\\)"):
        get_method_class("reward")(FakeBackend(), epochs=0)
    with pytest.raises(OptionError, match="method 'base': `max_pairs` \\(=0\\)"):
        get_method_class("base")(FakeBackend(), max_pairs=0)
    with pytest.raises(OptionError, match="method 'cliper': `alpha` \\(=-1.0\\)"):
        get_method_class("cliper")(FakeBackend(), alpha=-1)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_declares_its_options(name):
    cls = get_method_class(name)
    assert dataclasses.is_dataclass(cls.config_class)
    for f in dataclasses.fields(cls.config_class):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
