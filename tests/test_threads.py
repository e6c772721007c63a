"""One transformers backend serving four threads at once: the results equal the single-threaded ones.

Scoring (with its shared-prefix engine and the prefix memo) and greedy generation (with and without
a shared system prompt, so the cascade runs too) are started from 4 threads together; an adapter
block keeps every other thread's calls off the adapted model.
"""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")

from prefsteer.attributes import inject  # noqa: E402
from prefsteer.backends.base import AdapterSpec, GenerationConfig, ScoreRequest, user_turn  # noqa: E402

POST = ("SUBREDDIT: r/tifu\nTITLE: I broke my phone\nPOST: I dropped my phone in the toilet this morning "
        "and now it won't turn on.\n\nWrite a TL;DR summary of the post.")
HISTORY = " ".join(f"Example {i}: the user preferred the shorter, plainer answer." for i in range(8))


def _work(i: int):
    """Thread i's score requests and generation contexts (different per thread)."""
    attrs = [["Concise"], ["Humor"], ["Formal", "Polite"], ["Casual"]][i:] or [["Concise"]]
    reqs = [ScoreRequest.of(user_turn(inject(POST, a)), r) for a in attrs
            for r in (" Dropped my phone in the toilet.", " phone went swimming lol")]
    contexts = [[user_turn("Give me a short tip for staying focused.")],
                [user_turn(q, system=f"You write for one user. {HISTORY}") for q in ("Say hi.", "Name a color.")],
                [user_turn("Name three fruits.")],
                [user_turn("What is 2 + 2?"), user_turn("Say hello in French.")]][i]
    return reqs, contexts


CFG = GenerationConfig(max_new_tokens=8)


def _run(backend, i):
    reqs, contexts = _work(i)
    scores = [(s.logprob, s.n_tokens) for s in backend.score(reqs)]
    requests_seen = backend.last_stats["requests"]  # this thread's own call
    gens = [g.token_ids for g in backend.generate(contexts, CFG)]
    return scores, requests_seen, gens


def test_four_threads_get_the_single_threaded_results(hf_backend):
    backend = hf_backend
    backend.clear_prefix_memo()
    alone = [_run(backend, i) for i in range(4)]
    for i, (_, seen, _) in enumerate(alone):
        assert seen == len(_work(i)[0])
    backend.clear_prefix_memo()
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(i):
        try:
            start.wait()
            for _ in range(2):  # the second round finds other threads' prefixes in the memo
                results[i] = _run(backend, i)
                assert results[i] == alone[i]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[0]
    assert [results[i] for i in range(4)] == alone  # exact: the same numbers and tokens


def test_an_adapter_block_keeps_other_threads_off_the_adapted_model(hf_backend):
    backend = hf_backend
    req = [ScoreRequest.of(user_turn("What is the capital of France?"), "The capital of France is Paris.")]
    plain = backend.score(req)[0].logprob
    entered, seen = threading.Event(), []

    def other():
        entered.wait()
        seen.append(backend.score(req)[0].logprob)  # waits for the block to end

    t = threading.Thread(target=other)
    t.start()
    with backend.adapter(AdapterSpec(r=4)) as ad:
        with torch.no_grad():  # a non-zero adapter: scoring under it would give other numbers
            for p in ad.parameters():
                p.add_(0.05)
        entered.set()
        t.join(timeout=2)
        assert t.is_alive() and not seen  # still waiting
        with pytest.raises(RuntimeError, match="adapter block"):  # the same thread would deadlock
            backend.score(req)
    t.join(timeout=120)
    assert seen == [plain]
