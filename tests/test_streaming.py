"""Streamed, continuously batched decoding (`Backend.stream`, `Scheduler`, `Method.stream`) and the
service's answers on it: tokens as they are decoded, the same greedy tokens alone and in a batch,
a cancelled request leaving the batch, the admission bound's 503."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from prefsteer.backends.base import GenerationConfig, user_turn
from prefsteer.backends.fake import FakeBackend
from prefsteer.backends.guides.drift import DriftGuide
from prefsteer.backends.scheduler import Scheduler, length_groups
from prefsteer.backends.streaming import EngineBusy, TextDeltas, TokenStream
from prefsteer.storage import Memory
from prefsteer.service import Settings
from prefsteer.service.serving import StopScan
from tests.test_service_helpers import thread_server

PROMPTS = ["hi", "Write a long story about a dragon who learns to cook, with many details.",
           "How do I boil an egg?", "Tell me about bicycles, gears and chains and how a rider shifts them."]


def boost(token: int, by: float = 3.0):
    """A callable guide that raises one token's logit (and records that it was called)."""
    calls = []

    def guide(hidden, logits, ids):
        calls.append(ids.shape)
        out = logits.clone()
        out[:, token] += by
        return out
    guide.calls = calls
    return guide


def drift_guide(b, prompt: str) -> DriftGuide:
    plain = b.encode_context(user_turn(prompt, "Be plain."))
    branches = [b.encode_context(user_turn(prompt, s)) for s in ("Be funny and use jokes.", "Be formal, dear sir.")]
    return DriftGuide([1.5, -0.5], 1.0, b.fingerprint, [{"plain_ids": plain, "branch_ids": branches}])


# -- the engine: fake backend ------------------------------------------------------------------

def test_stream_gives_generate_tokens_alone_together_and_joining_midway():
    b = FakeBackend()
    cfg = GenerationConfig(max_new_tokens=24)
    ref = [g.token_ids for g in b.generate([user_turn(p) for p in PROMPTS], cfg)]
    alone = [b.stream(user_turn(p), cfg).wait() for p in PROMPTS]
    assert alone == ref
    together = [b.stream(user_turn(p), cfg) for p in PROMPTS]
    assert [s.wait() for s in together] == ref

    late: list = [None] * len(PROMPTS)
    slow = FakeBackend(step_seconds=0.002)

    def join(i):  # each request joins a batch that is already decoding
        time.sleep(0.01 * i)
        late[i] = slow.stream(user_turn(PROMPTS[i]), cfg).wait()
    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(PROMPTS))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert late == ref
    assert slow.scheduler.stats()["peak_rows"] > 1  # they did share the batch


def test_a_request_that_arrives_during_a_prefill_joins_before_the_next_decode_step(monkeypatch):
    """The first of a burst finds the engine idle and is prefilled alone; one arriving meanwhile is
    prefilled and sent its first token before the decode step that follows, and both decode as
    they would alone."""
    from prefsteer.backends.fake import FakeBatch

    b = FakeBackend()
    cfg = GenerationConfig(max_new_tokens=8)
    ref = [b.generate([user_turn(p)], cfg)[0].token_ids for p in PROMPTS[:2]]
    adds, steps = [], []
    add, step = FakeBatch.add, FakeBatch.step

    def slow_add(self, prompts):
        adds.append(len(prompts))
        if len(adds) == 1:
            time.sleep(0.3)  # the second request arrives during this prefill
        return add(self, prompts)

    def timed_step(self, tokens):
        steps.append(time.perf_counter())
        return step(self, tokens)
    monkeypatch.setattr(FakeBatch, "add", slow_add)
    monkeypatch.setattr(FakeBatch, "step", timed_step)
    first = b.stream(user_turn(PROMPTS[0]), cfg)
    time.sleep(0.1)
    second = b.stream(user_turn(PROMPTS[1]), cfg)
    assert [first.wait(), second.wait()] == ref
    assert adds == [1, 1]  # each prefilled on its own, the second before any step
    assert first.first_at < second.first_at < steps[0]
    assert b.scheduler.stats()["steps"] == len(steps) == max(len(r) for r in ref) - 1


def test_length_groups_split_far_lengths_and_keep_near_ones_together():
    assert length_groups([400, 12, 15, 20], overhead=48) == [[1, 2, 3], [0]]  # shortest first
    assert length_groups([20, 18, 15, 12], overhead=48) == [[3, 2, 1, 0]]
    assert length_groups([20, 18, 15, 12], overhead=0) == [[3], [2], [1], [0]]  # no forward costs anything
    assert length_groups([], overhead=48) == []


def test_length_groups_cost_least_among_all_partitions():
    """Against every way of splitting a few rows into groups: a group of m rows whose longest has
    L tokens costs m * L + overhead."""
    import random

    def partitions(items):
        if not items:
            yield []
            return
        head, rest = items[0], items[1:]
        for part in partitions(rest):
            yield [[head]] + part
            for k in range(len(part)):
                yield part[:k] + [[head] + part[k]] + part[k + 1:]

    def cost(groups, lengths, overhead):
        return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.choice([3, 10, 30, 100, 300]) + rng.randrange(5) for _ in range(rng.randrange(1, 7))]
        overhead = rng.choice([0, 16, 48, 200])
        groups = length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        best = min(cost(p, lengths, overhead) for p in partitions(list(range(len(lengths)))))
        assert cost(groups, lengths, overhead) == best


def test_requests_joining_at_once_are_prefilled_shortest_group_first(monkeypatch):
    """A long prompt beside short ones: the short ones are prefilled by one forward and sent their
    first tokens, then the long one by its own; each decodes what it decodes alone. Without a
    ``prefill_overhead`` (the toy model's default) they join in one forward."""
    from prefsteer.backends.fake import FakeBatch

    cfg = GenerationConfig(max_new_tokens=6)
    prompts = [PROMPTS[0], " ".join(PROMPTS * 20), PROMPTS[1], PROMPTS[2]]
    adds, add = [], FakeBatch.add

    def counting_add(self, ps):
        adds.append(len(ps))
        return add(self, ps)
    monkeypatch.setattr(FakeBatch, "add", counting_add)
    for overhead, expected in ((40, [3, 1]), (None, [4])):
        b = FakeBackend(step_seconds=0.002)
        if overhead is not None:
            b.prefill_overhead = overhead
        ref = [b.generate([user_turn(p)], cfg)[0].token_ids for p in prompts]
        adds.clear()
        with b.scheduler._cond:  # all four wait until the loop admits them together
            streams = [b.stream(user_turn(p), cfg) for p in prompts]
        assert [s.wait() for s in streams] == ref
        assert adds == expected
        if overhead is not None:
            assert max(streams[i].first_at for i in (0, 2, 3)) < streams[1].first_at
        b.close()


def test_each_request_keeps_its_guide_its_sampling_and_its_limit():
    b = FakeBackend()
    g = boost(b._word_id("funny"), 4.0)
    greedy = GenerationConfig(max_new_tokens=12)
    sampled = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.8, seed=7)
    short = GenerationConfig(max_new_tokens=3)
    want = [b.generate([user_turn(PROMPTS[1])], greedy, guide=g)[0].token_ids,
            b.generate([user_turn(PROMPTS[2])], sampled)[0].token_ids,
            b.generate([user_turn(PROMPTS[3])], short)[0].token_ids,
            b.generate([user_turn(PROMPTS[0])], greedy)[0].token_ids]
    g.calls.clear()
    streams = [b.stream(user_turn(PROMPTS[1]), greedy, guide=g), b.stream(user_turn(PROMPTS[2]), sampled),
               b.stream(user_turn(PROMPTS[3]), short), b.stream(user_turn(PROMPTS[0]), greedy)]
    assert [s.wait() for s in streams] == want
    assert want[0] != b.generate([user_turn(PROMPTS[1])], greedy)[0].token_ids  # the guide mattered
    assert streams[2].finish_reason == "length" and len(streams[2].token_ids) == 3
    assert len(g.calls) == len(want[0]) + (streams[0].finish_reason == "stop")  # one call per step, its own row
    assert all(shape[0] == 1 for shape in g.calls)


def test_drift_branches_decode_beside_their_request_as_in_lock_step():
    from prefsteer.methods.drift import decode_branches

    b = FakeBackend()
    cfg = GenerationConfig(max_new_tokens=16)
    for prompt in PROMPTS[1:3]:
        guide = drift_guide(b, prompt)
        want = (decode_branches(
            b, b, user_turn(prompt), [user_turn(prompt, "Be plain.")] + [user_turn(prompt, s) for s in (
                "Be funny and use jokes.", "Be formal, dear sir.")], [1.5, -0.5], 1.0, cfg, None))
        other = b.stream(user_turn(PROMPTS[0]), cfg)  # a plain request in the same batch
        s = b.stream(user_turn(prompt), cfg, guide=guide)
        assert b.decode_tokens(s.wait()) == want
        other.wait()
    assert b.scheduler.stats()["peak_rows"] >= 4  # 1 + plain + 2 branches (+ the plain request)


def test_min_new_tokens_holds_the_end_of_turn_back_in_every_decode_loop():
    """vLLM's ``min_tokens``: generate, the scheduler and Drift's lock step all rule the end-of-turn
    token out until that many tokens are made, and change nothing else."""
    from prefsteer.methods.drift import decode_branches

    b = FakeBackend()
    early = b.generate([user_turn(PROMPTS[2])], GenerationConfig(max_new_tokens=24))[0].token_ids
    assert 0 < len(early) < 5  # this prompt ends early on its own
    held = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    whole = b.generate([user_turn(PROMPTS[2])], held)[0].token_ids
    assert len(whole) == 24 and whole[:len(early)] == early and b.eos_id not in whole
    streams = [b.stream(user_turn(p), held) for p in PROMPTS]
    assert streams[2].wait() == whole and streams[2].finish_reason == "length"
    assert all(len(s.wait()) == 24 for s in streams)
    some = GenerationConfig(max_new_tokens=24, min_new_tokens=len(early) + 2)
    assert len(b.stream(user_turn(PROMPTS[2]), some).wait()) >= len(early) + 2
    branches = [user_turn(PROMPTS[2], "Be plain."), user_turn(PROMPTS[2], "Be funny.")]
    short, long = (decode_branches(b, b, user_turn(PROMPTS[2]), branches, [1.0], 1.0, cfg, None).split()
                   for cfg in (GenerationConfig(max_new_tokens=24), held))
    assert len(short) < 5 and len(long) == 24 and long[:len(short)] == short
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)


def test_a_cancelled_request_stops_at_the_next_step_and_frees_its_rows():
    b = FakeBackend(step_seconds=0.01)
    long = GenerationConfig(max_new_tokens=400)
    s = b.stream(user_turn(PROMPTS[1]), long)
    other = b.stream(user_turn(PROMPTS[3]), GenerationConfig(max_new_tokens=40))
    it = iter(s)
    next(it), next(it)
    s.cancel()
    rest = list(it)
    assert s.finish_reason == "cancelled" and len(s.token_ids) < 10 and len(rest) <= 2
    assert other.wait() and other.finish_reason in ("stop", "length")
    deadline = time.monotonic() + 5
    while b.scheduler.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.scheduler.stats()["rows"] == 0


def test_closing_the_backend_ends_open_streams_and_stops_its_thread_and_a_new_stream_starts_another():
    b = FakeBackend(step_seconds=0.01)
    s = b.stream(user_turn(PROMPTS[1]), GenerationConfig(max_new_tokens=400))
    it = iter(s)
    next(it)
    first = b.scheduler
    thread = first._thread
    b.close()
    rest = list(it)
    assert s.finish_reason == "cancelled" and len(s.token_ids) < 50 and len(rest) < 50
    assert not thread.is_alive() and b.stream_stats()["running"] == 0
    b.close()  # twice is harmless
    again = b.stream(user_turn(PROMPTS[0]), GenerationConfig(max_new_tokens=5))
    assert b.scheduler is not first
    assert again.wait() and again.token_ids == b.generate([user_turn(PROMPTS[0])],
                                                          GenerationConfig(max_new_tokens=5))[0].token_ids
    b.close()


def test_admission_bounds_rows_and_waiting_requests():
    b = FakeBackend(step_seconds=0.01, max_batch_rows=2, max_waiting=1)
    cfg = GenerationConfig(max_new_tokens=300)
    running = [b.stream(user_turn(p), cfg) for p in PROMPTS[:2]]
    waiting = b.stream(user_turn(PROMPTS[2]), cfg)
    deadline = time.monotonic() + 5
    while b.scheduler.stats()["rows"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.scheduler.stats()["rows"] == 2 and b.scheduler.stats()["waiting"] == 1
    with pytest.raises(EngineBusy) as e:
        b.stream(user_turn(PROMPTS[3]), cfg)
    assert e.value.retry_after > 0 and "at most 2" in str(e.value)
    for s in running + [waiting]:
        s.cancel()
    with pytest.raises(ValueError):
        Scheduler(b, lambda: None, max_rows=0)
    with pytest.raises(ValueError):
        b.set_stream_limits(max_rows=0)
    b.set_stream_limits(max_rows=3, max_waiting=0)  # a running scheduler takes new bounds
    assert b.scheduler.stats()["max_rows"] == 3 and b.scheduler.stats()["max_waiting"] == 0


def test_a_context_with_no_room_left_is_refused_naming_its_length():
    from prefsteer.backends.streaming import ContextTooLong

    b = FakeBackend(max_context=8)
    with pytest.raises(ContextTooLong) as e:
        b.stream(user_turn("one two three four five six seven eight nine"), GenerationConfig(max_new_tokens=4))
    assert e.value.max_context == 8 and e.value.tokens > 8


def test_an_engine_failure_reaches_every_request_and_the_engine_goes_on():
    b = FakeBackend()
    cfg = GenerationConfig(max_new_tokens=8)

    def broken(hidden, logits, ids):
        raise RuntimeError("guide exploded")
    bad = b.stream(user_turn(PROMPTS[1]), cfg, guide=broken)
    good = b.stream(user_turn(PROMPTS[2]), cfg)
    with pytest.raises(RuntimeError, match="guide exploded"):
        bad.wait()
    assert good.wait() == b.generate([user_turn(PROMPTS[2])], cfg)[0].token_ids


def test_token_stream_reads_from_an_event_loop_and_text_deltas_wait_for_whole_characters():
    s = TokenStream()

    async def read():
        got = []
        async for ids in s:
            got.append(ids)
        return got

    def produce():
        for i in range(3):
            time.sleep(0.01)
            s.push([i])
        s.finish("length")
    threading.Thread(target=produce).start()
    assert asyncio.run(read()) == [[0], [1], [2]] and s.finish_reason == "length"

    data = "né🙂!".encode()  # a 2-byte and a 4-byte character, one byte per token
    d = TextDeltas(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [d.feed([byte]) for byte in data]
    assert "".join(pieces) + d.flush() == "né🙂!"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_sequences_are_found_across_pieces():
    scan = StopScan(["END", "\n\n"])
    out = [scan.feed(p) for p in ("one E", "N", "D two")]
    assert "".join(out) == "one " and scan.hit
    scan = StopScan(["END"])
    assert scan.feed("the E") == "the " and scan.feed("nd") == "End" and not scan.hit
    assert scan.flush() == "" and scan.text == "the End"


# -- the service on the streaming engine --------------------------------------------------------

def _sse(base: str, body: dict, headers=None) -> tuple[str, list[dict], httpx.Headers]:
    chunks = []
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r.text, [], r.headers
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks, r.headers


def test_the_service_streams_while_decoding_and_a_disconnect_frees_the_row(slow_service):
    base, backend = slow_service
    body = {"model": "fake", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first words, long before 200 steps: the client goes away now
        decoded = backend.scheduler.steps
        assert backend.scheduler.stats()["rows"] == 1 and decoded < 100
    deadline = time.monotonic() + 5
    while backend.scheduler.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.scheduler.stats()["rows"] == 0  # its row was freed ...
    assert backend.scheduler.steps < 100           # ... at the next steps, not after 200
    r2 = httpx.post(base + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=60)
    assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] <= 5


def test_a_client_that_leaves_before_its_whole_answer_frees_the_row_too(slow_service):
    base, backend = slow_service
    body = {"model": "fake", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 200,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
        httpx.post(base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 5
    while backend.scheduler.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.scheduler.stats()["rows"] == 0 and backend.scheduler.steps < 100


def test_past_the_admission_bound_the_service_answers_503_with_retry_after(slow_service):
    base, _ = slow_service
    body = {"model": "fake", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 150,
            "temperature": 0}
    results = {}

    def hold(i):
        results[i] = _sse(base, body)
    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]  # one decoding, one waiting
    for t in threads:
        t.start()
        time.sleep(0.3)
    text, chunks, headers = _sse(base, body)
    err = json.loads(text)["error"]
    assert err["code"] == "overloaded" and int(headers["retry-after"]) >= 1
    for t in threads:
        t.join()
    assert results[0][0] == results[1][0] and results[0][0]  # both held requests were answered in full


def test_streamed_and_whole_answers_agree_with_stop_sequences(tmp_path):
    db = str(tmp_path / "m.db")
    Memory(db).close()
    with thread_server(Settings(db=db, backend="fake", embedder="hash", auth=False)) as base:
        body = {"model": "fake", "messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 30,
                "temperature": 0}
        whole = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
        text, chunks, _ = _sse(base, {**body, "stream_options": {"include_usage": True}})
        assert text == whole["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"] == whole["usage"]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == \
            whole["choices"][0]["finish_reason"]
        assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 3
        words = text.split()
        stop = words[3]
        cut = text[: text.index(stop)]
        whole = httpx.post(base + "/v1/chat/completions", json={**body, "stop": [stop]}, timeout=60).json()
        streamed, chunks, _ = _sse(base, {**body, "stop": [stop]})
        assert whole["choices"][0]["message"]["content"] == streamed == cut
        assert whole["choices"][0]["finish_reason"] == "stop"


# -- the embedded model ------------------------------------------------------------------------

def test_real_model_greedy_tokens_are_the_same_alone_and_in_a_batch(hf_backend):
    """Rows of different lengths, left-padded in one cache; one joins while the others decode."""
    b = hf_backend
    cfg = GenerationConfig(max_new_tokens=24)
    ref = [g.token_ids for g in b.generate([user_turn(p) for p in PROMPTS], cfg)]
    streams = [b.stream(user_turn(p), cfg) for p in PROMPTS[:3]]
    next(iter(streams[0]))
    streams.append(b.stream(user_turn(PROMPTS[3]), cfg))  # joins a running batch
    assert [s.wait() for s in streams] == ref
    assert b.scheduler.stats()["peak_rows"] >= 3


def test_real_model_min_new_tokens_decodes_past_the_end_of_turn_alone_and_streamed(hf_backend):
    b = hf_backend
    prompt = user_turn("Say only the word yes.")
    short = b.generate([prompt], GenerationConfig(max_new_tokens=12))[0].token_ids
    assert 0 < len(short) < 6  # the model ends this answer early on its own
    held = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    whole = b.generate([prompt], held)[0].token_ids
    assert len(whole) == 12 and whole[:len(short)] == short and not set(whole) & b.eos_token_ids
    assert b.stream(prompt, held).wait() == whole


def test_real_model_prompts_reuse_kept_prefixes_and_decode_the_same_tokens(hf_backend):
    """A streamed prompt takes the keys and values of the longest head it shares with a kept prompt
    (the chat template's opening for any two; nearly all of it for a repeated one) and decodes the
    greedy tokens of a prefill from scratch."""
    import os

    b = hf_backend
    cfg = GenerationConfig(max_new_tokens=24)
    ids = [b.encode_context(user_turn(p)) for p in PROMPTS]
    opening = len(os.path.commonprefix(ids))
    assert opening >= 5  # every prompt starts with the template's system turn
    b.share_prefix = False
    try:
        ref = [b.generate([user_turn(p)], cfg)[0].token_ids for p in PROMPTS]
        b.clear_prefix_memo()
        before = b.scheduler.stats()
        assert b.stream(user_turn(PROMPTS[0]), cfg).wait() == ref[0]
        assert b.scheduler.stats()["reused_tokens"] == before["reused_tokens"]
        assert b._stream_memo.longest_match(ids[0])[1] == 0  # without sharing, nothing is kept either
    finally:
        b.share_prefix = True
    b.clear_prefix_memo()
    assert b.stream(user_turn(PROMPTS[0]), cfg).wait() == ref[0]
    before = b.scheduler.stats()
    streams = [b.stream(user_turn(p), cfg) for p in PROMPTS]
    assert [s.wait() for s in streams] == ref
    after = b.scheduler.stats()
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(len(i) for i in ids)
    assert after["reused_tokens"] - before["reused_tokens"] >= len(ids[0]) - 1 + 3 * opening
    assert b._prefix_memo.longest_match(ids[0])[1] == 0  # scoring's memo: never filled by the traffic


def test_real_model_a_long_prompt_is_prefilled_apart_from_short_ones_beside_it(hf_backend):
    """Requests joining at once whose prompts differ in length by far more than a forward's own
    cost: the short ones are prefilled together and sent their first tokens before the long one's
    forward, which runs alone, so no short row runs the long one's length; every request decodes
    the greedy tokens it decodes alone."""
    b = hf_backend
    cfg = GenerationConfig(max_new_tokens=6)
    story = " ".join(["The committee met on a rainy Tuesday to discuss the budget of the new library."] * 12)
    prompts = [PROMPTS[0], "Summarize: " + story, PROMPTS[1], PROMPTS[2]]  # the long one second
    ref = [b.generate([user_turn(p)], cfg)[0].token_ids for p in prompts]
    ids = [b.encode_context(user_turn(p)) for p in prompts]
    assert len(ids[1]) > 4 * max(len(ids[i]) for i in (0, 2, 3))
    b.clear_prefix_memo()  # no prompt of an earlier test kept: each is prefilled whole
    prefills, streams = [], []
    extend = b.extend

    def spy(cache, **inputs):
        rows, n = inputs["input_ids"].shape
        if n > 1:  # a prefill (a decode step feeds one token per row)
            prefills.append((rows, n, [s.first_at is not None for s in streams]))
        return extend(cache, **inputs)
    b.extend = spy
    try:
        with b.scheduler._cond:  # all four wait until the loop admits them together
            streams += [b.stream(user_turn(p), cfg) for p in prompts]
        got = [s.wait() for s in streams]
    finally:
        del b.extend
    assert got == ref
    (short_rows, short_len, _), (long_rows, long_len, sent) = prefills[:2]
    assert (short_rows, long_rows) == (3, 1) and short_len < len(ids[1]) / 4 < long_len
    assert sent == [True, False, True, True]  # the short ones had their first tokens before it ran


def test_real_model_guided_and_drift_requests_in_one_batch_match_their_own_decoding(hf_backend):
    from prefsteer.methods.drift import decode_branches

    b = hf_backend
    cfg = GenerationConfig(max_new_tokens=16)
    g = boost(b.encode_continuation(" Yes")[0], 6.0)
    guided_ref = b.generate([user_turn(PROMPTS[2])], cfg, guide=g)[0].token_ids
    dg = drift_guide(b, PROMPTS[1])
    drift_ref = (decode_branches(
        b, b, user_turn(PROMPTS[1]), [user_turn(PROMPTS[1], "Be plain.")] + [user_turn(PROMPTS[1], s) for s in (
            "Be funny and use jokes.", "Be formal, dear sir.")], [1.5, -0.5], 1.0, cfg, None))
    s = [b.stream(user_turn(PROMPTS[2]), cfg, guide=g), b.stream(user_turn(PROMPTS[1]), cfg, guide=dg),
         b.stream(user_turn(PROMPTS[0]), cfg)]
    assert s[0].wait() == guided_ref
    assert b.decode_tokens(s[1].wait()) == drift_ref
    assert s[2].wait() == b.generate([user_turn(PROMPTS[0])], cfg)[0].token_ids
    assert torch.is_tensor(b.token_embeddings())


def test_real_model_service_streams_the_text_it_answers_whole(hf_backend, tmp_path):
    """Through the service on the embedded model: plain and CLIPer (shipped head, no user), streamed
    while another request decodes beside them, give the non-streamed text."""
    db = str(tmp_path / "m.db")
    Memory(db).close()
    settings = Settings(db=db, backend="hf", embedder="hash", auth=False, make_backend=lambda: hf_backend)
    with thread_server(settings, timeout=120) as base:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 20,
                "temperature": 0}
        for extra in ({"method": "none"}, {"method": "cliper", "prefs": "concise=1", "alpha": 2.0}):
            whole = httpx.post(base + "/v1/chat/completions", json={**body, "prefsteer": extra}, timeout=300).json()
            beside = threading.Thread(target=_sse, args=(base, {**body, "messages": [
                {"role": "user", "content": PROMPTS[1]}]}))
            beside.start()
            text, chunks, _ = _sse(base, {**body, "prefsteer": extra})
            beside.join()
            assert text == whole["choices"][0]["message"]["content"] and text.strip(), extra
            assert chunks[0]["prefsteer"]["method"] == extra["method"]
