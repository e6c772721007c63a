"""Reward: the per-user adapter reward model trains, separates its pairs and leaves the base untouched.

On the fake backend the adapter is its low-rank delta on the embedding table (`FakeBackend.adapter`);
the real-model test runs the transformers backend's LoRA.
"""

import numpy as np
import pytest
import torch

from prefsteer.backends.base import AdapterSpec, GenerationConfig, ScoreRequest, UnsupportedOperation
from prefsteer.backends.fake import FakeBackend
from prefsteer.methods import get_method_class
from prefsteer.methods.reward import Reward, RewardConfig, best_of, bt_loss, truncate
from prefsteer.types import PreferencePair

KW = dict(r=4, alpha=8, lr=1e-2, epochs=8, batch_size=4, micro_batch=2, max_length=32)


def pairs(user="u1"):
    prompts = ["tell me about your dog", "summary of the post", "how was school", "help with my code",
               "my girlfriend and my job", "a story about a cat", "money and the house", "my friend"]
    return [PreferencePair(user, x, f"lol funny joke wow {x}", f"dear sir regards formal {x}", f"p{i}")
            for i, x in enumerate(prompts)]


@pytest.fixture(scope="module")
def tiny():
    return FakeBackend()


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
    embed, bigram = tiny.embed.clone(), tiny.bigram.clone()
    req = [ScoreRequest.of([{"role": "user", "content": "tell me about your dog"}], "lol funny joke")]
    score_before = tiny.score(req)[0].logprob
    rm = Reward(tiny, **KW)
    rm.fit("u1", pairs())
    info = rm.fit_info["u1"]
    assert info["epoch_losses"][-1] < info["epoch_losses"][0] - 0.2
    assert info["final_loss"] == info["epoch_losses"][-1] and info["steps"] == 2 * 8
    assert all(m > 0 for m in rm.margins("u1", pairs()))
    # it learned the taste, not the pairs: a new prompt with funny vs formal answers
    unseen = [PreferencePair("u1", "a new question", "wow lol funny", "regards dear sir", "t1"),
              PreferencePair("u1", "what about my car", "joke lol", "formal sir", "t2")]
    assert all(m > 0 for m in rm.margins("u1", unseen))
    # the shared model is exactly as it was
    assert torch.equal(tiny.embed, embed) and torch.equal(tiny.bigram, bigram)
    assert tiny.score(req)[0].logprob == score_before
    # deterministic: the same options give the same model
    rm2 = Reward(tiny, **KW)
    rm2.fit("u1", pairs())
    np.testing.assert_allclose(rm2.margins("u1", pairs()), rm.margins("u1", pairs()), rtol=1e-5, atol=1e-6)


def test_fake_adapter_starts_as_the_model_and_round_trips(tiny):
    seqs = [tiny.encode_context([{"role": "user", "content": "my dog"}]) + tiny.encode_continuation("lol wow")]
    ids = torch.tensor(seqs)
    plain_hidden = tiny.next_logits(ids)[0]
    with tiny.adapter(AdapterSpec(r=3, alpha=6)) as a:
        assert a.hidden_size == tiny.hidden_size
        torch.testing.assert_close(a.last_hidden(seqs), plain_hidden)   # zero-initialised B
        with torch.enable_grad():
            loss = a.last_hidden(seqs).sum()
            loss.backward()
        assert a.parameters()[1].grad.abs().sum() > 0
        with torch.no_grad():
            a.parameters()[1].add_(0.5)
        moved = a.last_hidden(seqs)
        state = a.state_dict()
    assert not torch.allclose(moved, plain_hidden)
    with tiny.adapter(AdapterSpec(r=3, alpha=6), state) as b:
        torch.testing.assert_close(b.last_hidden(seqs), moved)
    with pytest.raises(ValueError, match="shapes"):
        with tiny.adapter(AdapterSpec(r=2, alpha=6), state):
            pass


def test_micro_batching_does_not_change_the_gradient(tiny):
    kw = dict(r=4, alpha=8, lr=3e-2, epochs=1, batch_size=4, max_length=32, dropout=0.0)
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


def test_needs_the_adapter_operation():
    class NoAdapter(FakeBackend):
        capabilities = FakeBackend.capabilities - {"adapter"}

    with pytest.raises(UnsupportedOperation, match="'fake' backend does not support `adapter`, which the "
                                                   "reward method needs"):
        Reward(NoAdapter()).fit("u1", pairs())


@pytest.mark.model
def test_real_model_is_unchanged_after_fit_and_reloads(hf_backend, tmp_path):
    from prefsteer.storage import Memory

    req = [ScoreRequest.of([{"role": "user", "content": "Say hi."}], "Hi there!")]
    before = hf_backend.score(req)[0].logprob
    fp = hf_backend.fingerprint
    kw = dict(epochs=1, max_length=48, batch_size=2)
    rm = Reward(hf_backend, memory=Memory(tmp_path / "m.db"), **kw)
    rm.fit("u1", pairs()[:2])
    margins = rm.margins("u1", pairs()[:2])
    assert hf_backend.score(req)[0].logprob == before
    hf_backend._fingerprint = None
    assert hf_backend.fingerprint == fp
    # a new process: the adapter and head come back from the file beside the memory
    again = Reward(hf_backend, memory=Memory(tmp_path / "m.db"), **kw)
    np.testing.assert_allclose(again.margins("u1", pairs()[:2]), margins, rtol=1e-4, atol=1e-5)
