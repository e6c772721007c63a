"""The decode step's parts of the hf backend on a tiny random Llama: the growing key/value cache
(`kvcache`) and the oneDNN-packed linear layers (`packing`)."""

from __future__ import annotations

import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from prefsteer.backends.hf import kvcache, packing  # noqa: E402
from prefsteer.backends.hf.kvcache import growing_cache  # noqa: E402
from prefsteer.backends.hf.packing import PackedLinear, decoding, pack_linears  # noqa: E402

needs_onednn = pytest.mark.skipif(not packing.available(), reason="this torch has no oneDNN packed linear")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _decode(model, cache, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy decoding on ``cache``: the logits of every step."""
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.inference_mode():
        r = model(input_ids=prompt, use_cache=True, **{arg: cache})
        for _ in range(steps):
            logits = r.logits[:, -1]
            out.append(logits)
            r = model(input_ids=logits.argmax(-1, keepdim=True), use_cache=True, **{arg: cache})
    return out


# -- the growing cache ---------------------------------------------------------------------------
def test_only_a_cache_of_full_attention_layers_keeps_every_key(tiny):
    """Prefix caching (`KVBatch`) keeps a prompt's keys only where no layer drops the old ones."""
    from transformers import MistralConfig

    assert kvcache.keeps_every_key(growing_cache(tiny.config))
    windowed = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    assert not kvcache.keeps_every_key(growing_cache(windowed))


def test_growing_cache_decodes_as_the_dynamic_cache_and_rarely_copies(tiny):
    prompt = torch.randint(0, 96, (3, 7))
    cache = growing_cache(tiny.config)
    buffers = set()
    layer = cache.layers[0]
    orig_update = type(layer).update

    def spy(self, *a, **k):
        result = orig_update(self, *a, **k)
        if self is layer:
            buffers.add(self._kbuf.data_ptr())
        return result

    type(layer).update = spy
    try:
        grown = _decode(tiny, cache, prompt, 150)
    finally:
        type(layer).update = orig_update
    plain = _decode(tiny, DynamicCache(config=tiny.config), prompt, 150)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grown, plain))
    assert [a.argmax(-1).tolist() for a in grown] == [b.argmax(-1).tolist() for b in plain]
    assert layer.get_seq_length() == 7 + 150
    # 157 tokens: buffers of 72, 155 and 259 slots, never one per step
    assert len(buffers) == 3, buffers


def test_growing_layer_takes_in_keys_assigned_from_outside(tiny):
    """Rows leaving a KVBatch assign a smaller tensor: the next update copies it into a new buffer."""
    cache = growing_cache(tiny.config)
    layer = cache.layers[0]
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    layer.update(k, v)
    layer.keys, layer.values = layer.keys[1:].clone(), layer.values[1:].clone()  # drop row 0
    k2, v2 = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k[1:], k2], -2)) and torch.equal(values, torch.cat([v[1:], v2], -2))
    assert layer._kbuf.shape[-2] >= 6 + kvcache.SPARE - 1


# -- packed linear layers ------------------------------------------------------------------------
@needs_onednn
def test_packed_linear_is_used_only_while_decoding_without_gradients():
    torch.manual_seed(1)
    lin = nn.Linear(48, 40, bias=True)
    packed = PackedLinear(lin)
    x = torch.randn(4, 1, 48)
    with torch.no_grad():
        want = lin(x)
        outside = packed(x)
        with decoding():
            inside = packed(x)
    assert torch.equal(outside, want)                       # not decoding: the plain product
    assert torch.allclose(inside, want, atol=1e-5)
    assert packed._pack.tensor is not None and packed._pack.tensor.is_mkldnn
    with decoding():
        y = packed(x.requires_grad_())                      # gradients on: the plain product
        y.sum().backward()
    assert torch.equal(y.detach(), want) and x.grad is not None and lin.weight.grad is not None


@needs_onednn
def test_packed_linear_follows_a_changed_weight_and_copies_pack_anew():
    torch.manual_seed(2)
    packed = PackedLinear(nn.Linear(16, 8, bias=False))
    x = torch.randn(3, 16)
    with torch.no_grad(), decoding():
        packed(x)
        packed.weight.mul_(-2)                              # in place: the version changes
        assert torch.allclose(packed(x), x @ packed.weight.T, atol=1e-5)
        twin = copy.deepcopy(packed)                        # the pack is not copied, the weight is
        assert twin._pack.tensor is None
        twin.weight.data = twin.weight.data.to(torch.bfloat16)   # as `cast` does: the plain product
        assert torch.equal(twin(x.bfloat16()), nn.functional.linear(x.bfloat16(), twin.weight))
        assert twin._pack.tensor is None


@needs_onednn
def test_pack_linears_keeps_the_model_and_its_greedy_tokens(tiny):
    names = {n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)}
    state = {k: v.data_ptr() for k, v in tiny.state_dict().items()}
    prompt = torch.randint(0, 96, (2, 6))
    before = _decode(tiny, DynamicCache(config=tiny.config), prompt, 20)

    assert pack_linears(tiny) == len(names)
    assert all(m._pack.tensor is None for m in tiny.modules() if isinstance(m, PackedLinear))  # packed when used
    assert {n for n, m in tiny.named_modules() if isinstance(m, PackedLinear)} == names
    assert {k: v.data_ptr() for k, v in tiny.state_dict().items()} == state       # the same parameters
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight                   # still tied
    with decoding():
        after = _decode(tiny, DynamicCache(config=tiny.config), prompt, 20)
    assert [a.argmax(-1).tolist() for a in after] == [b.argmax(-1).tolist() for b in before]
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) > 0      # the packed path ran
    assert all(m._pack.tensor is not None for m in tiny.modules() if isinstance(m, PackedLinear))


@needs_onednn
def test_a_weight_onednn_refuses_decodes_with_the_plain_product(monkeypatch, caplog):
    def refuse(*_):
        raise RuntimeError("no such layout")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    packed = PackedLinear(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.no_grad(), decoding(), caplog.at_level("WARNING"):
        assert torch.equal(packed(x), nn.functional.linear(x, packed.weight, packed.bias))
        assert torch.equal(packed(x), nn.functional.linear(x, packed.weight, packed.bias))
    assert packed._pack.failed
    assert [r.getMessage() for r in caplog.records] == [
        "oneDNN could not pack a (8, 16) weight (no such layout); it decodes with the plain product"]
