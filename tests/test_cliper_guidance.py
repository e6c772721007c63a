"""CLIPer's guidance step on hand-made tensors: arithmetic, purity, linearity and bad arguments."""

import math

import pytest
import torch

from prefsteer.methods.cliper.heads import HeadBank, PreferenceHead
from prefsteer.methods.cliper.guidance import CliperGuide, guided_logits, preference_logp
from prefsteer.methods.cliper.prefs import format_prefs, parse_prefs

LN = math.log
NEG = float("-inf")


def base_logits():
    # already normalised: log_softmax leaves them unchanged
    return torch.tensor([[LN(0.5), LN(0.25), LN(0.25)]])  # (B=1, V=3)


def test_single_preference_by_hand():
    # candidates 0 and 1; the classifier is undecided (log-odds 0: p(c) = 1/2) on both
    out = guided_logits(base_logits(), torch.tensor([[0, 1]]), torch.zeros(1, 1, 2), [1.0], alpha=2.0)
    # log p + 2 * log(1/2): ln(1/8), ln(1/16); token 2 was not a candidate
    expected = torch.tensor([[LN(1 / 8), LN(1 / 16), NEG]])
    assert torch.allclose(out[:, :2], expected[:, :2], atol=1e-6) and out[0, 2] == NEG


def test_two_preferences_by_hand():
    z = torch.tensor([[[LN(3), -LN(3)],    # pref 1: p(c) = 3/4, 1/4
                       [0.0, LN(3)]]])     # pref 2: p(c) = 1/2, 3/4
    out = guided_logits(base_logits(), torch.tensor([[0, 1]]), z, [1.0, 0.5], alpha=1.0)
    want0 = LN(0.5) + LN(0.75) + 0.5 * LN(0.5)
    want1 = LN(0.25) + LN(0.25) + 0.5 * LN(0.75)
    assert out[0, 0].item() == pytest.approx(want0, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(want1, abs=1e-6)
    assert out[0, 2].item() == NEG


def test_negative_weight_steers_away():
    z = torch.tensor([[[LN(3)]]])  # p(c) = 3/4, so p(not c) = 1/4
    assert preference_logp(z, torch.tensor([-2.0])).item() == pytest.approx(2 * LN(0.25), abs=1e-6)
    assert preference_logp(z, torch.tensor([2.0])).item() == pytest.approx(2 * LN(0.75), abs=1e-6)


def test_unnormalised_logits_are_normalised_first():
    logits = base_logits() + 7.0  # a constant shift changes nothing
    out = guided_logits(logits, torch.tensor([[2]]), torch.zeros(1, 1, 1), [1.0], alpha=1.0)
    assert out[0, 2].item() == pytest.approx(LN(0.25) + LN(0.5), abs=1e-6)


def test_alpha_zero_returns_logits_unchanged():
    logits = torch.randn(4, 50)
    out = guided_logits(logits, torch.topk(logits, 5).indices, torch.randn(4, 2, 5), [1.0, 3.0], 0.0)
    assert torch.equal(out, logits)


def test_inputs_not_modified_in_place():
    logits, ids, z, w = torch.randn(3, 40), torch.randint(0, 40, (3, 6)), torch.randn(3, 2, 6), torch.tensor([1.0, -0.5])
    copies = [t.clone() for t in (logits, ids, z, w)]
    out = guided_logits(logits, ids, z, w, alpha=1.5)
    for t, c in zip((logits, ids, z, w), copies):
        assert torch.equal(t, c)
    assert out.data_ptr() != logits.data_ptr()


def test_weights_combine_linearly():
    torch.manual_seed(0)
    logits, ids, z = torch.randn(2, 30), torch.topk(torch.randn(2, 30), 8).indices, torch.randn(2, 2, 8)
    base = torch.log_softmax(logits, -1).gather(1, ids)
    both = guided_logits(logits, ids, z, [0.7, 1.3], 2.0).gather(1, ids) - base
    one = guided_logits(logits, ids, z[:, :1], [1.0], 2.0).gather(1, ids) - base
    two = guided_logits(logits, ids, z[:, 1:], [1.0], 2.0).gather(1, ids) - base
    assert torch.allclose(both, 0.7 * one + 1.3 * two, atol=1e-5)


def test_a_stronger_alpha_favours_the_preferred_candidate():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    z = torch.tensor([[[-3.0, 3.0]]])  # the classifier prefers candidate 1
    ids = torch.tensor([[0, 1]])
    assert guided_logits(logits, ids, z, [1.0], 0.0).argmax().item() == 0
    assert guided_logits(logits, ids, z, [1.0], 5.0).argmax().item() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -1.0}, "`alpha` (=-1.0)"),
    ({"alpha": float("nan")}, "`alpha`"),
    ({"candidate_ids": torch.zeros(1, 0, dtype=torch.long), "class_logits": torch.zeros(1, 1, 0)}, "`top_k` (=0)"),
    ({"class_logits": torch.zeros(1, 2, 2)}, "`class_logits` has to be (B=1, P=1, k=2)"),
    ({"candidate_ids": torch.zeros(2, 2, dtype=torch.long)}, "`candidate_ids` has to be (B=1, k)"),
    ({"logits": torch.zeros(3)}, "`logits` has to be (B, V)"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(logits=base_logits(), candidate_ids=torch.tensor([[0, 1]]), class_logits=torch.zeros(1, 1, 2),
                weights=[1.0], alpha=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        guided_logits(**args)
    assert message in str(e.value)


def small_bank(P=2, d=8, seed=0):
    torch.manual_seed(seed)
    heads = []
    for p in range(P):
        h = PreferenceHead(d, rank=3, meta={"name": f"p{p}"})
        with torch.no_grad():
            for prm in h.parameters():
                prm.normal_()
            h.set_standardisation(torch.randn(20, d) * 2 + 1, torch.randn(20, d) * 0.5 - 1)
        heads.append(h)
    return heads


def test_bank_matches_the_heads_one_by_one():
    heads = small_bank()
    bank = HeadBank(heads)
    h, e = torch.randn(3, 8), torch.randn(3, 5, 8)
    z = bank.logits(h, e)                                          # (3, 2, 5)
    for p, head in enumerate(heads):
        ref = head(h[:, None].expand(3, 5, 8).reshape(-1, 8), e.reshape(-1, 8)).view(3, 5)
        assert torch.allclose(z[:, p], ref, atol=1e-4, rtol=1e-4)


def test_guide_top_k_and_validation():
    heads = small_bank()
    emb = torch.randn(30, 8)
    guide = CliperGuide(HeadBank(heads), [1.0, 0.5], alpha=1.0, top_k=4, embeddings=emb)
    logits = torch.randn(2, 30)
    out = guide(torch.randn(2, 8), logits, torch.zeros(2, 3, dtype=torch.long))
    assert torch.isfinite(out).sum(-1).tolist() == [4, 4]
    top = torch.topk(logits, 4).indices.sort(-1).values
    assert torch.equal(torch.isfinite(out).nonzero()[:, 1].view(2, 4), top)
    assert torch.equal(CliperGuide(HeadBank(heads), [1, 1], 0.0, 4, emb)(torch.randn(2, 8), logits, None), logits)
    with pytest.raises(ValueError, match="`top_k` \\(=0\\)"):
        CliperGuide(HeadBank(heads), [1.0, 1.0], 1.0, 0, emb)
    with pytest.raises(ValueError, match="`alpha` \\(=-0.5\\)"):
        CliperGuide(HeadBank(heads), [1.0, 1.0], -0.5, 3, emb)
    with pytest.raises(ValueError, match="`weights` has 1 entries for 2"):
        CliperGuide(HeadBank(heads), [1.0], 1.0, 3, emb)


def test_guide_scores_on_the_embeddings_dtype_and_device_the_bank_starts_on_cpu_float32():
    """A model in bfloat16 (a GPU's default) gives bfloat16 hidden states and embeddings: the guide
    moves the bank to them (a float32 bank on the CPU failed on CUDA) and agrees with float32."""
    heads = small_bank()
    bank = HeadBank(heads)
    emb, h, logits = torch.randn(30, 8), torch.randn(2, 8), torch.randn(2, 30)
    ref = CliperGuide(bank, [1.0, -0.5], alpha=1.0, top_k=4, embeddings=emb)(h, logits, None)
    half = CliperGuide(bank, [1.0, -0.5], alpha=1.0, top_k=4, embeddings=emb.bfloat16())
    assert half.bank.Wh.dtype == torch.bfloat16 and bank.Wh.dtype == torch.float32  # the given bank is untouched
    assert bank.to("cpu") is bank
    out = half(h.bfloat16(), logits, None)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.allclose(out[torch.isfinite(out)].float(), ref[torch.isfinite(ref)], atol=0.15)


def test_parse_prefs():
    assert parse_prefs("concise=1, humorous=0.5") == {"concise": 1.0, "humor": 0.5}
    assert parse_prefs("formal") == {"formal": 1.0}
    assert parse_prefs({"Helpful": 2}) == {"helpful": 2.0}
    assert parse_prefs("personal=1,mine=2", known={"mine"}) == {"personal": 1.0, "mine": 2.0}
    assert format_prefs({"concise": 1.0, "humor": 0.5}) == "concise=1,humor=0.5"
    for spec, message in [("sarcasm=1", "unknown preference 'sarcasm'"),
                          ("concise=abc", "weight of 'concise' (='abc') is not a number"),
                          ("concise=1,concise=2", "'concise' given twice"),
                          ("=1", "empty preference name"),
                          ("concise=inf", "finite")]:
        with pytest.raises(ValueError, match="`prefs`") as e:
            parse_prefs(spec)
        assert message in str(e.value)
