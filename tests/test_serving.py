"""The chat dispatch without a server: `ChatServing.answer` on the fake backend.

Each test builds the engine the service builds (settings, backend, embedder, library) and calls
the serving object directly, so what is checked is the dispatch itself: which method answers,
what the answer reports, and which HTTP error a method's exception becomes (by its type).
"""

import threading
import time

import pytest

from prefsteer.attributes import load_library
from prefsteer.backends.fake import FakeBackend
from prefsteer.storage import Memory
from prefsteer.methods import base as method_base
from prefsteer.methods.base import Method, MethodOutput, NotFittedError
from prefsteer.methods.registry import Resources, build
from prefsteer.retrieval import HashEmbedder
from prefsteer.service.app import Settings
from prefsteer.service.auth import Tenant
from prefsteer.service.engine import Engine
from prefsteer.service.errors import ApiError
from prefsteer.service.schemas import ChatCompletionRequest, PrefsteerOptions
from prefsteer.types import PreferencePair

LOCAL = Tenant(None)
PAIRS = [PreferencePair("ann", f"tell me about my {t}", f"funny joke lol about the {t}",
                        f"dear sir regards about the {t}", f"p{i}") for i, t in enumerate("dog cat car".split())]
CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "tell me about my dog"}]


@pytest.fixture
def eng(tmp_path):
    settings = Settings(db=str(tmp_path / "m.db"), backend="fake", auth=False, worker=False,
                        exact={"k": 1, "preset": "product"})
    e = Engine(settings, FakeBackend(), HashEmbedder(), load_library())
    yield e
    e.close()


def fit(eng, name, **options):
    mem = Memory(eng.settings.db)
    mem.add_pairs(PAIRS)
    res = Resources(memory=mem, embedder=eng.embedder, library=eng.library)
    build(name, eng.backend, res, {**eng.defaults(name), **options}).fit("ann", PAIRS)
    mem.close()


def ask(eng, method=None, user="ann", messages=CONV, unchecked=False, **prefsteer):
    """The request as validated by the schema (``unchecked``: a method name the schema does not list)."""
    fields = {"user_id": user, "method": method, "prefs": None, "alpha": None, **prefsteer}
    opts = PrefsteerOptions.model_construct(**fields) if unchecked else PrefsteerOptions(**fields)
    req = ChatCompletionRequest(model="fake", messages=messages, max_tokens=6)
    req.prefsteer = opts
    return eng.serving.answer(LOCAL, req)


def test_the_plain_model_answers_a_conversation(eng):
    a = ask(eng, "none", user=None)
    assert a.info.method == "none" and a.text.strip() and a.prompt_tokens == eng.backend.count_tokens(CONV)
    assert a.finish_reason in ("stop", "length") and a.completion_tokens <= 6


def test_a_user_gets_the_service_method_with_what_it_retrieved(eng):
    fit(eng, "exact")
    a = ask(eng)
    assert a.info.method == "exact" and a.info.attributes
    assert a.info.retrieved["prompt"] == "tell me about my dog" and 0 < a.info.retrieved["similarity"] <= 1
    assert set(a.info.timings) >= {"retrieval", "generation"}
    assert a.prompt_tokens > eng.backend.count_tokens(CONV)  # the injected attributes are counted


class HeldEmbedder(HashEmbedder):
    """Once ``held``, its next call waits for ``release``; it records the batches it is given."""

    def __init__(self):
        super().__init__()
        self.held, self.reached, self.release, self.batches = False, threading.Event(), threading.Event(), []

    def encode(self, texts):
        if self.held:
            self.batches.append(list(texts))
            if len(self.batches) == 1:
                self.reached.set()
                assert self.release.wait(10)
        return super().encode(texts)


def test_the_prompts_of_concurrent_requests_are_embedded_together(tmp_path):
    settings = Settings(db=str(tmp_path / "m.db"), backend="fake", auth=False, worker=False, exact={"k": 1})
    inner = HeldEmbedder()
    eng = Engine(settings, FakeBackend(), inner, load_library())
    fit(eng, "exact")
    topics = ["dog", "cat", "car", "dog again", "cat again"]
    turns = [[{"role": "user", "content": f"tell me about my {t}"}] for t in topics]
    alone = [ask(eng, "exact", messages=m).info.retrieved for m in turns]
    inner.held, answers = True, {}

    def go(i):
        answers[i] = ask(eng, "exact", messages=turns[i]).info.retrieved
    threads = [threading.Thread(target=go, args=(0,))]
    threads[0].start()
    assert inner.reached.wait(10)  # the first request's prompt is being embedded; the others arrive now
    threads += [threading.Thread(target=go, args=(i,)) for i in range(1, len(turns))]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while len(eng.embedder._waiting) < len(turns) - 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    inner.release.set()
    for t in threads:
        t.join(10)
    assert inner.batches[0] == [turns[0][0]["content"]]
    assert len(inner.batches) == 2 and sorted(inner.batches[1]) == sorted(m[0]["content"] for m in turns[1:])
    assert [answers[i] for i in range(len(turns))] == alone  # each request retrieved what it did alone
    eng.close()


def test_each_method_is_served_with_the_options_it_was_indexed_with(tmp_path):
    settings = Settings(db=str(tmp_path / "m.db"), backend="fake", auth=False, worker=False,
                        exact={"k": 1}, method_options={"drift": {"beta": 2.5}, "exact": {"k": 2}})
    e = Engine(settings, FakeBackend(), HashEmbedder(), load_library())
    assert e.method("drift").config.beta == 2.5 and e.method("exact").config.k == 2
    assert e.method("exact-global").config.k == 1  # EXACT's service options, where nothing overrides
    assert e.method("drift", {"beta": 4.0}).config.beta == 4.0  # a request's options go on top
    e.close()


def test_a_user_without_feedback_gets_the_plain_model_unless_a_method_was_asked(eng):
    a = ask(eng, user="newcomer")
    assert a.info.method == "none" and "no feedback stored" in a.info.note
    with pytest.raises(ApiError) as info:
        ask(eng, "exact", user="newcomer")
    assert info.value.status == 404


def test_a_stored_but_unlearned_user_gets_plain_or_409(eng):
    fit(eng, "base")  # stored pairs, no EXACT entries
    a = ask(eng)
    assert a.info.method == "none" and "not learned yet" in a.info.note
    with pytest.raises(ApiError) as info:
        ask(eng, "drift")
    assert (info.value.status, info.value.code, info.value.param) == (409, "not_fitted", "prefsteer.method")


def test_a_method_that_needs_a_user_without_one_is_a_400(eng):
    with pytest.raises(ApiError) as info:
        ask(eng, "exact-global", user=None)
    assert (info.value.status, info.value.param) == (400, "prefsteer.user_id")


def test_an_option_of_another_method_is_named(eng):
    with pytest.raises(ApiError) as info:
        ask(eng, "exact", prefs="concise=1")
    assert (info.value.status, info.value.param) == (400, "prefsteer.prefs")


def test_base_builds_its_history_prompt_on_first_use(eng):
    Memory(eng.settings.db).add_pairs(PAIRS)  # stored by a feedback request; never fitted
    a = ask(eng, "base")
    # usage counts what the model read: the history prompt too
    assert a.info.method == "base" and a.prompt_tokens > eng.backend.count_tokens(CONV) + 20
    assert eng.method("base").profile("ann")["fitted"]


def test_errors_are_mapped_by_type_never_by_message(eng, monkeypatch):
    """A method whose NotFittedError says nothing the route could match still becomes a 409."""

    class Odd(Method):
        name = "odd"

        def fit(self, user_id, pairs):
            pass

        def margins(self, user_id, pairs):
            return []

        def generate(self, user_id, conversations, config=None):
            raise NotFittedError("odd", user_id, hint="zzz")

    class Fine(Odd):
        def generate(self, user_id, conversations, config=None):
            return [MethodOutput("fine", ["X"], {"generation": 0.5}, {"retrieved": {"prompt": "p"}})]

    monkeypatch.setitem(method_base._REGISTRY, "odd", f"{__name__}:_ODD")
    monkeypatch.setitem(method_base._REGISTRY, "fine", f"{__name__}:_FINE")
    monkeypatch.setitem(globals(), "_ODD", Odd)
    monkeypatch.setitem(globals(), "_FINE", Fine)
    Memory(eng.settings.db).add_pairs(PAIRS)
    with pytest.raises(ApiError) as info:
        ask(eng, "odd", unchecked=True)
    assert (info.value.status, info.value.code) == (409, "not_fitted")
    a = ask(eng, "fine", unchecked=True)
    assert (a.text, a.info.attributes, a.info.retrieved, a.info.timings) == ("fine", ["X"], {"prompt": "p"},
                                                                             {"generation": 0.5})


def test_serve_takes_every_methods_options_and_the_default_method(tmp_path):
    from prefsteer.cli import Context, make_parser
    from prefsteer.cli.serve import settings_from_args

    args = make_parser().parse_args(["serve", "--backend", "fake", "--embedder", "hash", "--no-auth",
                                     "--db", str(tmp_path / "m.db"), "--method", "drift", "--drift-beta", "2",
                                     "--reward-n", "3", "--k", "2"])
    s = settings_from_args(args, Context(args))
    assert s.default_method == "drift"
    assert s.method_options == {"drift": {"beta": 2.0}, "reward": {"n": 3}, "exact": {"k": 2},
                                "exact-global": {"k": 2}}
    assert (s.exact["k"], s.exact["preset"]) == (2, "product")  # the command line's preset


def _open_files(path: str) -> int:
    import os

    return sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == path)


def test_the_connections_of_finished_request_threads_are_closed(eng):
    """The server's thread pool ends idle threads and starts new ones for the next burst: each new
    thread opens its own SQLite connection, which has to go with its thread, not pile up."""
    import gc
    import os
    import weakref

    fit(eng, "exact")
    path = os.path.realpath(eng.settings.db)
    proc = os.path.isdir("/proc/self/fd")  # Linux: count the file's descriptors too
    before = _open_files(path) if proc else None
    seen: list[weakref.ref] = []
    held = []
    files = []

    def request(keep: bool):
        assert ask(eng, "exact").info.method == "exact"
        seen.append(weakref.ref(eng.memory))
        if keep:
            held.append(eng.memory)  # what an answer still streaming would hold

    for burst in range(4):
        threads = [threading.Thread(target=request, args=(burst == 0 and i == 0,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
        assert eng.open_connections() == 1  # the one still held; the other threads' are gone
        files.append(_open_files(path) if proc else 0)
    assert len(seen) == 24 and sum(r() is not None for r in seen) == 1
    # SQLite keeps a closed connection's descriptor while another connection of the process holds
    # the file (closing it would drop that one's locks) and reuses it for the next: at most one
    # burst's threads and the held one, never growing with the bursts (before: 6 more every burst)
    assert max(files) <= 6 + 1, files
    assert held[0].has_user("ann")  # a connection still held stays open and usable
    held.clear()
    gc.collect()
    assert eng.open_connections() == 0
    if proc:
        assert _open_files(path) == before
