"""Drift: features, the Bradley-Terry fit, the margin rule and multi-branch decoding."""

import numpy as np
import pytest
import torch

from prefsteer.backends.base import GenerationConfig, ScoreRequest, user_turn
from prefsteer.methods import get_method_class
from prefsteer.methods.drift import (Drift, DriftConfig, active_branches, attribute_features,
                                     combine_logits, fit_bradley_terry)
from prefsteer.types import PreferencePair

ATTRS = ["Concise", "Humor", "Formal"]


def pairs(user="u1"):
    return [
        PreferencePair(user, "tell me about your dog", "funny joke lol", "dear sir regards", "p1"),
        PreferencePair(user, "summary of the post", "short brief summary", "the post was about my job", "p2"),
        PreferencePair(user, "how was school", "lol wow funny", "formal regards sir", "p3"),
        PreferencePair(user, "help with my code", "python function", "sorry feel bad", "p4"),
    ]


def test_registered():
    assert get_method_class("drift") is Drift


def test_features_are_log_ratios():
    lp_attr = np.array([[-3.0, -5.0], [-1.0, -2.0]])
    lp_plain = np.array([-4.0, -1.5])
    np.testing.assert_allclose(attribute_features(lp_attr, lp_plain), [[1.0, -1.0], [0.5, -0.5]])


def test_features_match_backend_scores(fake_backend):
    d = Drift(fake_backend, attributes=ATTRS)
    p = pairs()[0]
    diffs, gap = d.features([p])

    def lp(ctx, y):
        return fake_backend.score([ScoreRequest.of(ctx, y)])[0].logprob

    plain = d.context(p.prompt)
    for i, a in enumerate(d.library.attributes):
        ctx = d.context(p.prompt, a)
        want = (lp(ctx, p.chosen) - lp(plain, p.chosen)) - (lp(ctx, p.rejected) - lp(plain, p.rejected))
        assert diffs[0, i] == pytest.approx(want, abs=1e-9)
    assert gap[0] == pytest.approx(lp(plain, p.chosen) - lp(plain, p.rejected))
    assert d.context(p.prompt, d.library.get("Humor"))[0]["role"] == "system"
    user = Drift(fake_backend, attributes=ATTRS, placement="user").context(p.prompt, d.library.get("Humor"))
    assert len(user) == 1 and user[0]["content"].startswith(p.prompt + "\n")


def test_bradley_terry_recovers_known_weights():
    rng = np.random.default_rng(0)
    w_true = np.array([2.0, -1.0, 0.0])
    X = rng.normal(size=(3000, 3))
    # sample which of the two responses was preferred from the BT model, orient d as chosen - rejected
    y = rng.random(3000) < 1 / (1 + np.exp(-X @ w_true))
    D = np.where(y[:, None], X, -X)
    w = fit_bradley_terry(D, l2=0.0)
    np.testing.assert_allclose(w, w_true, atol=0.15)
    assert np.array_equal(w, fit_bradley_terry(D, l2=0.0))  # deterministic


def test_bradley_terry_hand_made_and_l2():
    # one feature, always in favour of the chosen: the unregularised optimum runs away, L2 bounds it
    D = np.array([[1.0], [2.0]])
    w = fit_bradley_terry(D, l2=0.1)[0]
    # stationary point of mean(softplus(-d w)) + 0.1 w^2: mean(-d * sigmoid(-d w)) + 0.2 w = 0
    s = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert np.mean(-D[:, 0] * s(-D[:, 0] * w)) + 0.2 * w == pytest.approx(0, abs=1e-8)
    assert w > 0
    assert fit_bradley_terry(np.zeros((0, 2))).tolist() == [0.0, 0.0]


def test_margins_rule(fake_backend):
    d = Drift(fake_backend, attributes=ATTRS)
    ps = pairs()
    d.fit("u1", ps)
    w = np.array([d.weights["u1"][n] for n in ATTRS])
    diffs, gap = d.features(ps)
    np.testing.assert_allclose(d.margins("u1", ps), diffs @ w)
    assert d.fit_info["u1"]["train_accuracy"] == np.mean(diffs @ w > 0)
    d2 = Drift(fake_backend, attributes=ATTRS, include_base=True, beta=2.0)
    d2.weights["u1"] = d.weights["u1"]
    np.testing.assert_allclose(d2.margins("u1", ps), diffs @ w / 2.0 + gap)
    with pytest.raises(ValueError, match="not been fitted"):
        d.margins("nobody", ps)


def test_score_cache_is_used(fake_backend):
    from prefsteer.storage import Memory

    d = Drift(fake_backend, attributes=ATTRS, memory=Memory(":memory:"))
    d.fit("u1", pairs())
    misses = d.scorer.misses
    d.fit("u2", pairs("u2"))  # the same texts: no new model call
    assert d.scorer.misses == misses and d.scorer.hits > 0


def test_combine_logits_and_active_branches():
    base = torch.tensor([[0.0, 1.0, 2.0]])
    plain = torch.tensor([[0.0, 0.0, 0.0]])
    attrs = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    before = attrs.clone()
    out = combine_logits(base, plain, attrs, torch.tensor([1.0, 0.0]), beta=0.5)
    lsm = lambda t: torch.log_softmax(t, -1)  # noqa: E731
    torch.testing.assert_close(out, lsm(base) + 2.0 * (lsm(attrs[:, 0]) - lsm(plain)))
    assert torch.equal(attrs, before)
    assert active_branches([0.5, 0.0, -2.0, 1.0]) == [0, 2, 3]
    assert active_branches([0.5, 0.0, -2.0, 1.0], top_m=2) == [2, 3]


def test_zero_weights_is_plain_greedy(fake_backend):
    d = Drift(fake_backend, attributes=ATTRS, threshold=-1.0)  # every branch decoded, all weights 0
    d.weights["u1"] = {n: 0.0 for n in ATTRS}
    prompts = ["tell me about your dog", "summary of the post"]
    cfg = GenerationConfig(max_new_tokens=12)
    out = d.generate("u1", prompts, cfg)
    plain = fake_backend.generate([user_turn(p) for p in prompts], cfg)
    assert [o.text for o in out] == [g.text for g in plain]
    assert out[0].attributes == ATTRS


def test_weight_one_decodes_the_attribute_branch(fake_backend):
    """With base = plain, w = beta: log p_plain + (w / beta)(log p_attr - log p_plain) = log p_attr,
    so greedy Drift is plain greedy decoding under the attribute's context, token for token."""
    d = Drift(fake_backend, attributes=ATTRS, beta=2.0)
    d.weights["u1"] = {"Concise": 0.0, "Humor": 2.0, "Formal": 0.0}
    cfg = GenerationConfig(max_new_tokens=12)
    prompt = "tell me about your dog"
    out = d.generate("u1", [prompt], cfg)[0]
    assert out.attributes == ["Humor"]
    humor = fake_backend.generate([d.context(prompt, d.library.get("Humor"))], cfg)[0].text
    plain = fake_backend.generate([user_turn(prompt)], cfg)[0].text
    assert out.text == humor and humor != plain


def test_weights_steer_generation(fake_backend):
    # a larger humor weight puts the humor instruction's words into the answer (none in the plain one)
    d = Drift(fake_backend, attributes=ATTRS)
    words = set(d.instruction(d.library.get("Humor")).lower().replace(",", " ").replace(".", " ").split())
    words -= {"you", "are", "an", "assistant", "your", "answers", "with", "or"}
    cfg = GenerationConfig(max_new_tokens=12)
    prompt = "tell me about your dog"

    def count(text):
        return sum(w in words for w in text.split())

    d.weights["u1"] = {"Concise": 0.0, "Humor": 3.0, "Formal": 0.0}
    steered = d.generate("u1", [prompt], cfg)[0].text
    plain = fake_backend.generate([user_turn(prompt)], cfg)[0].text
    assert count(plain) == 0 and count(steered) >= 1


def test_decoding_uses_only_the_protocol(fake_backend):
    """A backend with neither `start_decoding` nor `guide_branches` makes generation fail naming
    the backend and both operations."""
    from prefsteer.backends.base import UnsupportedOperation
    from prefsteer.backends.fake import FakeBackend

    class NoSteps(FakeBackend):
        capabilities = FakeBackend.capabilities - {"start_decoding"}

    d = Drift(NoSteps(), attributes=ATTRS)
    d.weights["u1"] = {n: 1.0 for n in ATTRS}
    with pytest.raises(UnsupportedOperation, match="'fake' backend does not support `start_decoding`.*"
                                                   "`guide_branches`"):
        d.generate("u1", ["hi"])


def test_unknown_option_is_named(fake_backend):
    from prefsteer.methods.base import UnknownOptionError

    with pytest.raises(UnknownOptionError, match="unknown option 'bta' for method 'drift'"):
        Drift(fake_backend, bta=2.0)


def test_config_validation():
    with pytest.raises(ValueError, match="`placement`"):
        DriftConfig(placement="middle")
    with pytest.raises(ValueError, match="`beta`"):
        DriftConfig(beta=0)


@pytest.mark.model
def test_real_model_zero_weights_is_plain_greedy(hf_backend):
    d = Drift(hf_backend, attributes=ATTRS[:2], threshold=-1.0)
    d.weights["u1"] = {n: 0.0 for n in ATTRS[:2]}
    cfg = GenerationConfig(max_new_tokens=6)
    prompt = "Write one sentence about cats."
    out = d.generate("u1", [prompt], cfg)[0]
    plain = hf_backend.generate([user_turn(prompt)], cfg)[0]
    assert out.text == plain.text
    # w = beta on one attribute: decoding follows that attribute's branch exactly
    d.weights["u1"] = {"Concise": 0.0, "Humor": 1.0}
    humor = hf_backend.generate([d.context(prompt, d.library.get("Humor"))], cfg)[0]
    assert d.generate("u1", [prompt], cfg)[0].text == humor.text


@pytest.mark.model
def test_real_model_seeded_sampling_repeats(hf_backend):
    """Seeded sampling draws on the backend's device: a CPU generator failed on CUDA logits
    (seen on an H100), so on a GPU machine this is the regression test."""
    d = Drift(hf_backend, attributes=ATTRS[:2], threshold=-1.0)
    d.weights["u1"] = {"Concise": 1.0, "Humor": 2.0}
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=50, top_p=0.95, seed=3)
    prompt = "Write one sentence about cats."
    first = d.generate("u1", [prompt], cfg)[0].text
    assert first and d.generate("u1", [prompt], cfg)[0].text == first


# -- a small model beside the large one (the paper's slm_model, Appendix C.1.2) -----------------

from prefsteer.backends.fake import FakeBackend  # noqa: E402


class SpyBackend(FakeBackend):
    """The fake model, recording what it is asked to score and to decode."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.scored: list[ScoreRequest] = []
        self.decoded: list[list] = []

    def score(self, requests, *, progress=False):
        self.scored += list(requests)
        return super().score(requests, progress=progress)

    def start_decoding(self, contexts):
        self.decoded.append([list(c) for c in contexts])
        return super().start_decoding(contexts)


def _lp(backend, ctx, y):
    return backend.score([ScoreRequest.of(ctx, y)])[0].logprob


def test_the_small_model_scores_the_attributes_and_the_large_one_does_not():
    large, small = SpyBackend(), SpyBackend(seed=1)
    d = Drift(large, attributes=ATTRS, drift_backend=small)
    ps = pairs()
    d.fit("u1", ps)
    # (1 plain + 3 attribute contexts) x (chosen, rejected) per pair, all on the small model
    assert len(small.scored) == len(ps) * 4 * 2 and large.scored == []
    # its features are the small model's log-ratios, hand-computed from its own scores
    diffs, gap = d.features(ps[:1])
    p, plain = ps[0], d.context(ps[0].prompt)
    for i, a in enumerate(d.library.attributes):
        ctx = d.context(p.prompt, a)
        want = (_lp(small, ctx, p.chosen) - _lp(small, plain, p.chosen)) - \
               (_lp(small, ctx, p.rejected) - _lp(small, plain, p.rejected))
        assert diffs[0, i] == pytest.approx(want, abs=1e-9)
    assert large.scored == []
    # another model, other features: not the large model's numbers
    assert not np.allclose(diffs, Drift(large, attributes=ATTRS).features(ps[:1])[0])
    # include_base adds the decoding distribution's base: the large model's plain gap
    w = np.array([d.weights["u1"][n] for n in ATTRS])
    d2 = Drift(large, attributes=ATTRS, drift_backend=small, include_base=True, beta=2.0)
    d2.weights["u1"] = d.weights["u1"]
    large_gap = _lp(large, plain, p.chosen) - _lp(large, plain, p.rejected)
    assert d2.margins("u1", ps[:1])[0] == pytest.approx(diffs[0] @ w / 2.0 + large_gap, abs=1e-9)
    assert large_gap != pytest.approx(gap[0])  # the small model's gap would be another number


def test_the_small_model_decodes_the_branches_and_the_large_one_the_base_row():
    large, small = SpyBackend(), SpyBackend(seed=1)
    d = Drift(large, attributes=ATTRS, drift_backend=small)
    d.weights["u1"] = {"Concise": 0.0, "Humor": 1.5, "Formal": 0.0}
    prompt = "tell me about your dog"
    d.generate("u1", [prompt], GenerationConfig(max_new_tokens=4))
    humor = d.library.get("Humor")
    assert small.decoded == [[d.context(prompt), d.context(prompt, humor)]]  # plain + the active branch
    assert large.decoded == [[user_turn(prompt)]]


def test_a_small_model_that_is_the_large_one_gives_todays_numbers_and_state(fake_backend, tmp_path):
    """The same model loaded a second time in the small model's role: the same weights, margins and
    text as Drift without a small model, and the same stored state (id included)."""
    from prefsteer.storage import Memory

    ps = pairs()
    today = Drift(fake_backend, attributes=ATTRS, memory=Memory(tmp_path / "a.db"))
    today.fit("u1", ps)
    small = SpyBackend()
    d = Drift(fake_backend, attributes=ATTRS, memory=Memory(tmp_path / "b.db"), drift_backend=small)
    d.fit("u1", ps)
    assert small.scored and d.drift_backend is not d.backend
    assert d.weights["u1"] == today.weights["u1"]
    assert d.margins("u1", ps) == today.margins("u1", ps)
    cfg = GenerationConfig(max_new_tokens=10)
    assert [o.text for o in d.generate("u1", ["tell me about your dog"], cfg)] == \
        [o.text for o in today.generate("u1", ["tell me about your dog"], cfg)]
    assert d.state_id == today.state_id
    # another small model is another state
    assert Drift(fake_backend, attributes=ATTRS, drift_backend=SpyBackend(seed=1)).state_id != today.state_id


def test_small_backend_and_model_options_load_the_small_model(fake_backend, monkeypatch):
    """``small_backend`` / ``small_model`` (--drift-backend / --drift-model) load it through the
    backend registry; the loaded model is the one that scores."""
    from prefsteer import backends

    monkeypatch.setitem(backends._REGISTRY, "spy", "tests.test_drift:SpyBackend")
    d = Drift(fake_backend, attributes=ATTRS, small_backend="spy")
    assert isinstance(d.drift_backend, SpyBackend) and d.drift_backend is not fake_backend
    ps = pairs()
    d.fit("u1", ps)
    assert len(d.drift_backend.scored) == len(ps) * 4 * 2
    today = Drift(fake_backend, attributes=ATTRS)
    today.fit("u1", ps)
    assert d.margins("u1", ps) == today.margins("u1", ps)  # the same toy model: today's numbers
    # --drift-model alone: the large model's engine
    m = Drift(fake_backend, attributes=ATTRS, small_model="anything")
    assert type(m.drift_backend) is FakeBackend and m.drift_backend is not fake_backend
    assert Drift(fake_backend, attributes=ATTRS).drift_backend is fake_backend  # neither: the large model


def test_load_small_backend_takes_the_large_models_engine_settings(monkeypatch):
    from prefsteer import backends
    from prefsteer.methods.drift import load_small_backend

    calls = []
    monkeypatch.setattr(backends, "load_backend", lambda name, **kw: calls.append((name, kw)) or name)

    class Large:
        name = "hf"

        def info(self):
            return {"backend": "hf", "device": "cuda:0", "dtype": "bfloat16", "matmul_precision": "medium",
                    "batch_size": 4, "model": "big", "threads": 2}

    load_small_backend(Large(), None, "small-1b")
    load_small_backend(Large(), "fake", None)
    assert calls == [("hf", {"model": "small-1b", "device": "cuda:0", "dtype": "bfloat16",
                             "matmul_precision": "medium", "batch_size": 4}),
                     ("fake", {})]


@pytest.mark.model
def test_real_model_in_both_roles_gives_todays_margins_and_text(hf_backend):
    """The embedded model as the small model too (no smaller one of its tokenizer is installed):
    loaded a second time through --drift-model, it does the scoring (spied), and the margins and
    the greedy text are those of Drift without a small model."""
    d = Drift(hf_backend, attributes=ATTRS[:2], small_model="smollm2-135m")
    small = d.drift_backend
    assert small is not hf_backend and small.fingerprint == hf_backend.fingerprint
    assert small.info()["dtype"] == hf_backend.info()["dtype"] and small.batch_size == hf_backend.batch_size
    asked = {"small": 0, "large": 0}
    for key, b in (("small", small), ("large", hf_backend)):
        def spy(requests, *, progress=False, _score=b.score, _key=key):
            asked[_key] += len(requests)
            return _score(requests, progress=progress)
        b.score = spy
    try:
        ps = [PreferencePair("u1", "Write one sentence about cats.", "Cats nap all day in the sun.",
                             "CATS!!! lol cats r the best", "c1"),
              PreferencePair("u1", "Describe your weekend.", "I read a book and walked in the park.",
                             "it was fine i guess", "c2")]
        d.fit("u1", ps)
        assert asked == {"small": len(ps) * 3 * 2, "large": 0}
        today = Drift(hf_backend, attributes=ATTRS[:2])
        today.fit("u1", ps)
        assert asked["large"] == len(ps) * 3 * 2  # today's Drift scores on the large model
        np.testing.assert_allclose(d.margins("u1", ps), today.margins("u1", ps), atol=1e-4)
        np.testing.assert_allclose([d.weights["u1"][n] for n in ATTRS[:2]],
                                   [today.weights["u1"][n] for n in ATTRS[:2]], atol=1e-4)
        d.weights["u1"] = today.weights["u1"] = {"Concise": 0.5, "Humor": 1.0}
        cfg = GenerationConfig(max_new_tokens=6)
        assert d.generate("u1", ["Write one sentence about cats."], cfg)[0].text == \
            today.generate("u1", ["Write one sentence about cats."], cfg)[0].text
        assert d.state_id == today.state_id
    finally:
        del small.score, hf_backend.score


def test_a_small_model_that_cannot_be_loaded_is_an_error_naming_the_options(fake_backend):
    from prefsteer.methods.base import OptionError

    with pytest.raises(OptionError, match=r"method 'drift': the small model \(--drift-backend nope, "
                                          r"--drift-model -\): unknown backend 'nope'"):
        Drift(fake_backend, small_backend="nope")
