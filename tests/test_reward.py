"""Reward: the per-user LoRA reward model trains, separates its pairs and leaves the base untouched."""

import numpy as np
import pytest
import torch

from prefsteer.backends.base import GenerationConfig, Score, ScoreRequest
from prefsteer.backends.fake import FakeBackend
from prefsteer.methods import get_method_class
from prefsteer.methods.reward import Reward, RewardConfig, best_of, bt_loss, truncate
from prefsteer.types import PreferencePair

pytest.importorskip("peft")


class TinyHF(FakeBackend):
    """The fake backend's word tokenizer in front of a tiny random Llama: a trainable stand-in for
    the hf backend (``model``, ``device``, ``pad_id``, ``encode_context``, ``encode_continuation``)."""

    def __init__(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__(vocab_size=256)
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, vocab_size=256, max_position_embeddings=256)
        self.model = LlamaForCausalLM(cfg).eval()
        self.device, self.pad_id = torch.device("cpu"), 0

    def encode_context(self, messages):
        return self.tokenize(self.render(messages))

    def encode_continuation(self, text):
        return self.tokenize(text)

    def score(self, requests, *, progress=False):
        out = []
        with torch.inference_mode():
            for r in requests:
                ctx, cont = self.encode_context(r.chat()), self.encode_continuation(r.continuation)
                logits = self.model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1: -1]
                lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum()
                out.append(Score(float(lp), len(cont)))
        return out


def pairs(user="u1"):
    prompts = ["tell me about your dog", "summary of the post", "how was school", "help with my code",
               "my girlfriend and my job", "a story about a cat", "money and the house", "my friend"]
    return [PreferencePair(user, x, f"lol funny joke wow {x}", f"dear sir regards formal {x}", f"p{i}")
            for i, x in enumerate(prompts)]


@pytest.fixture(scope="module")
def tiny():
    return TinyHF()


def test_registered():
    assert get_method_class("reward") is Reward


def test_pure_parts():
    assert truncate([1, 2, 3, 4], [5, 6], 4) == [3, 4, 5, 6]
    assert truncate([1, 2], [5, 6], 10) == [1, 2, 5, 6]
    assert truncate([1, 2], [5, 6, 7, 8], 3) == [2, 5, 6]
    assert best_of(np.array([[0.1, 0.5, 0.5], [-1.0, -3.0, -2.0]])) == [1, 0]
    assert bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="`epochs`"):
        RewardConfig(epochs=0)


def test_fit_separates_and_leaves_base_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    req = [ScoreRequest.of([{"role": "user", "content": "tell me about your dog"}], "lol funny joke")]
    score_before = tiny.score(req)[0].logprob
    rm = Reward(tiny, r=4, alpha=8, lr=5e-3, epochs=8, batch_size=4, micro_batch=2, max_length=32)
    rm.fit("u1", pairs())
    info = rm.fit_info["u1"]
    assert info["epoch_losses"][-1] < info["epoch_losses"][0] - 0.2
    assert all(m > 0 for m in rm.margins("u1", pairs()))
    # the shared model is exactly as it was: weights, modules, requires_grad, mode, scores
    after = tiny.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in tiny.model.named_parameters()} == grads
    assert not tiny.model.training and not hasattr(tiny.model, "peft_config")
    assert tiny.score(req)[0].logprob == score_before
    # deterministic: the same options give the same model
    rm2 = Reward(tiny, r=4, alpha=8, lr=5e-3, epochs=8, batch_size=4, micro_batch=2, max_length=32)
    rm2.fit("u1", pairs())
    np.testing.assert_allclose(rm2.margins("u1", pairs()), rm.margins("u1", pairs()), rtol=1e-5, atol=1e-6)


def test_micro_batching_does_not_change_the_gradient(tiny):
    kw = dict(r=4, alpha=8, lr=3e-3, epochs=1, batch_size=4, max_length=32, dropout=0.0)
    a, b = Reward(tiny, micro_batch=1, **kw), Reward(tiny, micro_batch=4, **kw)
    a.fit("u", pairs()), b.fit("u", pairs())
    np.testing.assert_allclose(a.fit_info["u"]["losses"], b.fit_info["u"]["losses"], rtol=1e-4)


def test_max_train_pairs(tiny):
    rm = Reward(tiny, r=2, epochs=1, max_train_pairs=3, max_length=16)
    rm.fit("u1", pairs())
    assert rm.fit_info["u1"]["pairs"] == 3


def test_best_of_n_picks_the_highest_reward(fake_backend, monkeypatch):
    rm = Reward(fake_backend, n=3)
    rm.states["u1"] = {}
    seen = []

    def stub(user_id, items):  # reward = number of words: the longest candidate wins
        seen.extend(items)
        return [float(len(y.split())) for _, y in items]

    monkeypatch.setattr(rm, "rewards", stub)
    out = rm.generate("u1", ["tell me about your dog", "how was school"], GenerationConfig(max_new_tokens=6, seed=1))
    assert len(seen) == 6 and len(out) == 2
    for o in out:
        lengths = [len(c.split()) for c in o.extra["candidates"]]
        assert len(o.text.split()) == max(lengths) and o.extra["chosen_index"] == int(np.argmax(lengths))


def test_needs_a_transformers_backend(fake_backend):
    with pytest.raises(NotImplementedError, match="transformers backend"):
        Reward(fake_backend).fit("u1", pairs())


@pytest.mark.model
def test_real_model_is_unchanged_after_fit(hf_backend):
    req = [ScoreRequest.of([{"role": "user", "content": "Say hi."}], "Hi there!")]
    before = hf_backend.score(req)[0].logprob
    fp = hf_backend.fingerprint
    rm = Reward(hf_backend, epochs=1, max_length=48, batch_size=2)
    rm.fit("u1", pairs()[:2])
    assert len(rm.margins("u1", pairs()[:2])) == 2
    assert hf_backend.score(req)[0].logprob == before
    hf_backend._fingerprint = None
    assert hf_backend.fingerprint == fp
