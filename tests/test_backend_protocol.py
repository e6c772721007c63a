"""Every backend against the `Backend` protocol: each declared operation, with behaviour asserts.

The fake backend always; the transformers backend on the embedded model (marker ``model``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from prefsteer.backends.base import (OPERATIONS, AdapterSpec, Backend, GenerationConfig,  # noqa: E402
                                     ScoreRequest, UnsupportedOperation, require, user_turn)
from prefsteer.methods.drift import DriftGuide  # noqa: E402

PROMPTS = ["Give me a short tip for staying focused.", "Tell me about the dog and the cat."]
REPLY = "the dog and the cat is very happy"  # words the fake backend knows by name


@pytest.fixture(params=["fake", pytest.param("hf", marks=pytest.mark.model)])
def backend(request):
    return request.getfixturevalue("fake_backend" if request.param == "fake" else "hf_backend")


def _calls(b):
    """One call per optional operation, for the operations a backend says it lacks."""
    req = [ScoreRequest.of(user_turn(PROMPTS[0]), REPLY)]
    return {"score": lambda: b.score(req), "generate": lambda: b.generate([user_turn(PROMPTS[0])]),
            "guide": lambda: b.generate([user_turn(PROMPTS[0])], guide=lambda h, lg, ids: lg),
            "guide_branches": lambda: b.generate([user_turn(PROMPTS[0])], guide=DriftGuide(
                [1.0], 1.0, b.fingerprint, [{"branch_ids": [b.encode_context(user_turn(PROMPTS[1]))]}])),
            "start_decoding": lambda: b.start_decoding([user_turn(PROMPTS[0])]),
            "hidden_states": lambda: b.hidden_states(req), "token_embeddings": lambda: b.token_embeddings(),
            "adapter": lambda: b.adapter(AdapterSpec()).__enter__(), "cast": lambda: b.cast("bfloat16")}


def test_is_a_backend_and_names_its_capabilities(backend):
    assert isinstance(backend, Backend)
    assert isinstance(backend.capabilities, frozenset) and backend.capabilities <= set(OPERATIONS)
    for op in set(OPERATIONS) - backend.capabilities:  # what it lacks, it says so through the protocol
        with pytest.raises(UnsupportedOperation, match=op):
            _calls(backend)[op]()
        with pytest.raises(UnsupportedOperation, match=backend.name):
            require(backend, op, needed_by="the test")


def test_require_names_the_backend_and_the_operation():
    class Tiny:
        name, capabilities = "tiny", frozenset({"score"})

    require(Tiny(), "score")
    with pytest.raises(UnsupportedOperation, match="'tiny' backend does not support `adapter`, which drift needs"):
        require(Tiny(), "adapter", needed_by="drift")


def test_tokenization_roundtrips(backend):
    ids = backend.encode_continuation(REPLY)
    assert ids and all(isinstance(i, int) for i in ids)
    assert backend.decode_tokens(ids) == REPLY
    assert backend.encode_continuation("") == []
    msgs = user_turn(PROMPTS[0])
    ctx = backend.encode_context(msgs)
    assert ctx and backend.count_tokens(msgs, REPLY) == len(ctx) + len(ids)
    eos = backend.eos_token_ids
    assert isinstance(eos, frozenset) and eos
    assert backend.decode_tokens(ids + [min(eos)]) == REPLY  # end-of-turn tokens are left out of text
    if backend.eos_text is not None:  # the end-of-turn text reads back as one end-of-turn token
        (tok,) = backend.encode_continuation(backend.eos_text)
        assert tok in eos


def test_score_hidden_states_and_embeddings_agree(backend):
    reqs = [ScoreRequest.of(user_turn(p), REPLY) for p in PROMPTS]
    scores = backend.score(reqs)
    states = backend.hidden_states(reqs)
    ids = backend.encode_continuation(REPLY)
    emb = backend.token_embeddings()
    assert emb.shape[1] == backend.hidden_size
    for s, h in zip(scores, states):
        assert s.n_tokens == len(ids) and s.logprob < 0
        assert h.shape == (len(ids), backend.hidden_size) and h.dtype == torch.float32
    assert scores[0].logprob != scores[1].logprob  # the context matters


def _first_logits(backend, msgs):
    seen = []

    def record(hidden, logits, input_ids):
        seen.append(logits.clone())
        return logits

    backend.generate([msgs], GenerationConfig(max_new_tokens=1), guide=record)
    return seen[0][0]


def test_a_decoding_session_steps_like_generate(backend):
    contexts = [user_turn(p) for p in PROMPTS]
    session = backend.start_decoding(contexts)
    logits = session.logits()
    assert logits.dtype == torch.float32 and logits.shape[0] == 2
    for r, msgs in enumerate(contexts):
        assert torch.allclose(logits[r], _first_logits(backend, msgs), atol=1e-4)
    # greedy through the session, each row its own token, equals generate's greedy tokens
    steps = 8
    expected = [g.token_ids for g in backend.generate(contexts, GenerationConfig(max_new_tokens=steps))]
    got, done = [[], []], [False, False]
    for _ in range(steps):
        tok = session.logits().argmax(-1).tolist()
        for r, t in enumerate(tok):
            done[r] = done[r] or t in backend.eos_token_ids
            if not done[r]:
                got[r].append(t)
        if all(done):
            break
        session.append(tok)
    assert got == expected
    with pytest.raises(ValueError, match="rows"):
        session.append([1])


def test_a_fresh_adapter_changes_nothing_and_is_removed_after_the_block(backend):
    req = ScoreRequest.of(user_turn(PROMPTS[0]), REPLY)
    before = backend.score([req])[0].logprob
    (states,) = backend.hidden_states([req])
    seq = backend.encode_context(req.chat()) + backend.encode_continuation(REPLY)[:-1]
    with torch.enable_grad():
        with backend.adapter(AdapterSpec(r=4)) as ad:
            assert ad.hidden_size == backend.hidden_size
            params = ad.parameters()
            assert params and all(p.requires_grad for p in params)
            h = ad.last_hidden([seq, seq[:-3]])                    # (2, d)
            assert h.shape == (2, backend.hidden_size) and h.dtype == torch.float32
            # a fresh LoRA adds zero: the hidden state is the plain model's, where it predicts the last token
            assert torch.allclose(h[0].detach(), states[-1], atol=1e-4)
            ad.train(True)
            h.pow(2).sum().backward()
            with torch.no_grad():
                for p in params:
                    p -= 0.5 * p.grad
            ad.train(False)
            trained = ad.last_hidden([seq]).detach()
            assert not torch.allclose(trained, states[-1:], atol=1e-4)  # the adapter acts
            saved = ad.state_dict()
        assert saved and all(t.device.type == "cpu" for t in saved.values())
        with backend.adapter(AdapterSpec(r=4), saved) as ad:  # loaded back: the same adapted model
            assert torch.allclose(ad.last_hidden([seq]).detach(), trained, atol=1e-5)
    assert backend.score([req])[0].logprob == before  # the model is as it was


def test_cast_is_another_backend(backend):
    low = backend.cast("bfloat16")
    assert isinstance(low, Backend) and low.fingerprint != backend.fingerprint
    req = ScoreRequest.of(user_turn(PROMPTS[0]), REPLY)
    (a,), (b,) = backend.score([req]), low.score([req])
    assert a.n_tokens == b.n_tokens and abs(a.logprob - b.logprob) < 2.0
