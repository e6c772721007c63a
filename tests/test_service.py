"""The service end to end on the fake backend: the official openai client, auth, tenants, feedback
jobs, profiles, deletion, limits and the OpenAI error shape. One server (uvicorn in a thread, on a
free loopback port) serves the module; each test uses its own users."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from prefsteer.storage import USER_TABLES, Memory, hash_key  # noqa: E402
from prefsteer.service import Settings, store  # noqa: E402
from tests.test_service_helpers import thread_server, wait_job  # noqa: E402

PAIRS = [{"prompt": "How do I boil an egg?", "chosen": "Boil it 9 minutes, then cool it.",
          "rejected": "Oh what a fun adventure, eggs are magical and wonderful!!"},
         {"prompt": "How can I sleep better?", "chosen": "Fixed schedule, dark room, no late caffeine.",
          "rejected": "Sleep is a magical journey to dreamland, giggle yourself to sleep!"}]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("service") / "m.db")
    mem = Memory(db)
    keys = {t: mem.create_key(t)["key"] for t in ("A", "B")}
    mem.close()
    settings = Settings(db=db, backend="fake", embedder="hash", max_pairs_per_request=5,
                        max_prompt_chars=2000, max_text_chars=500, max_body_bytes=20_000)
    with thread_server(settings) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            yield {"base": base, "db": db, "keys": keys, "http": client,
                   "A": {"Authorization": f"Bearer {keys['A']}"}, "B": {"Authorization": f"Bearer {keys['B']}"}}


def feed(svc, tenant: str, user: str, pairs=PAIRS) -> dict:
    r = svc["http"].post(f"/v1/users/{user}/feedback", json={"pairs": pairs}, headers=svc[tenant])
    assert r.status_code == 202, r.text
    job = wait_job(svc["http"], r.json()["job_id"], svc[tenant])
    assert job["status"] == "done", job
    return job


def client(svc, tenant: str):
    return openai.OpenAI(base_url=svc["base"] + "/v1", api_key=svc["keys"][tenant], max_retries=0)


def error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- the openai client ------------------------------------------------------------------------

def test_openai_client_completion_is_personalized_by_the_user(svc):
    feed(svc, "A", "oc-maya")
    c = client(svc, "A")
    model = c.models.list().data[0].id
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "How do I boil an egg fast?"}],
                                    user="oc-maya", max_tokens=12)
    assert out.object == "chat.completion" and out.model == model
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    extra = out.model_extra["prefsteer"]
    profile = svc["http"].get("/v1/users/oc-maya/profile", headers=svc["A"]).json()
    assert extra["method"] == "exact"
    # the attributes injected are those of the user's most similar past prompt
    assert extra["retrieved"]["prompt"] == "How do I boil an egg?"
    egg = next(e for e in profile["entries"] if e["prompt"] == "How do I boil an egg?")
    assert extra["attributes"] == egg["attributes"] and len(egg["attributes"]) == 3

    plain = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "How do I boil an egg fast?"}],
                                      max_tokens=12)
    assert plain.model_extra["prefsteer"]["method"] == "none" and plain.model_extra["prefsteer"]["attributes"] == []


def test_openai_client_stream_matches_the_plain_completion(svc):
    c = client(svc, "A")
    model = c.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "Any tips?"}], max_tokens=8)
    whole = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole and len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def test_stream_is_server_sent_events_ending_with_done(svc):
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with svc["http"].stream("POST", "/v1/chat/completions", json=body, headers=svc["A"]) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["prefsteer"]["method"] == "none"


def test_prefsteer_object_selects_user_and_method(svc):
    feed(svc, "A", "po-lee")
    r = svc["http"].post("/v1/chat/completions", headers=svc["A"], json={
        "model": "fake", "messages": [{"role": "user", "content": "sleep tips?"}], "max_tokens": 4,
        "prefsteer": {"user_id": "po-lee", "method": "exact"}})
    assert r.status_code == 200 and r.json()["prefsteer"]["user_id"] == "po-lee"
    assert r.json()["prefsteer"]["retrieved"]["prompt"] == "How can I sleep better?"
    r = svc["http"].post("/v1/chat/completions", headers=svc["A"], json={
        "model": "fake", "messages": [{"role": "user", "content": "sleep tips?"}], "max_tokens": 4,
        "user": "po-lee", "prefsteer": {"method": "none"}})
    assert r.json()["prefsteer"]["method"] == "none" and r.json()["prefsteer"]["attributes"] == []


def test_sampling_parameters_are_honoured(svc):
    h, base = svc["http"], {"model": "fake", "messages": [{"role": "user", "content": "tell me a story"}]}

    def text(**kw):
        r = h.post("/v1/chat/completions", json={**base, **kw}, headers=svc["A"])
        assert r.status_code == 200, r.text
        return r.json()

    greedy = text(max_tokens=10)["choices"][0]["message"]["content"]
    assert text(max_tokens=10, temperature=0)["choices"][0]["message"]["content"] == greedy
    s1 = text(max_tokens=10, temperature=1.5, seed=3)["choices"][0]["message"]["content"]
    assert text(max_tokens=10, temperature=1.5, seed=3)["choices"][0]["message"]["content"] == s1
    assert len({text(max_tokens=10, temperature=1.5, seed=s)["choices"][0]["message"]["content"]
                for s in range(4)}) > 1
    assert text(max_tokens=3)["usage"]["completion_tokens"] <= 3
    first = greedy.split()[1]
    cut = text(max_tokens=10, stop=[" " + first])
    assert cut["choices"][0]["message"]["content"] == greedy[: greedy.index(" " + first)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    egg = {**base, "messages": [{"role": "user", "content": "How do I boil an egg?"}], "max_tokens": 12}
    assert h.post("/v1/chat/completions", json=egg, headers=svc["A"]).json()["usage"]["completion_tokens"] < 5
    held = text(**{**egg, "min_tokens": 12})  # vLLM's extension: no end of turn before 12 tokens
    assert held["usage"]["completion_tokens"] == 12 and held["choices"][0]["finish_reason"] == "length"


# -- errors, in OpenAI's shape, naming the field ------------------------------------------------

@pytest.mark.parametrize("field,value,param", [
    ("temperature", -1, "temperature"), ("temperature", 3, "temperature"), ("top_p", 0, "top_p"),
    ("top_p", 1.5, "top_p"), ("max_tokens", 0, "max_tokens"), ("max_tokens", 10**6, "max_tokens"),
    ("n", 2, "n"), ("presence_penalty", 0.5, "presence_penalty"), ("logit_bias", {"1": 2}, "logit_bias"),
    ("stop", ["a", "b", "c", "d", "e"], "stop"), ("seed", "x", "seed"), ("bogus", 1, "bogus"),
    ("messages", [], "messages"), ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("prefsteer", {"method": "magic"}, "prefsteer.method"), ("min_tokens", -1, "min_tokens"),
    ("min_tokens", 10**6, "min_tokens"),
])
def test_bad_field_is_a_400_naming_it(svc, field, value, param):
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], field: value}
    r = svc["http"].post("/v1/chat/completions", json=body, headers=svc["A"])
    assert r.status_code == 400, r.text
    e = error(r)
    assert e["param"] == param and e["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in e["message"]


def test_openai_client_raises_bad_request_naming_the_field(svc):
    with pytest.raises(openai.BadRequestError) as info:
        client(svc, "A").chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                 temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"


def test_unknown_model_and_bad_json(svc):
    r = svc["http"].post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
                         headers=svc["A"])
    assert r.status_code == 404 and error(r)["code"] == "model_not_found" and error(r)["param"] == "model"
    r = svc["http"].post("/v1/chat/completions", content=b"{not json", headers={**svc["A"], "content-type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"


def test_limits_answer_413_or_422_naming_the_limit(svc):
    h, A = svc["http"], svc["A"]
    r = h.post("/v1/users/lim/feedback", json={"pairs": PAIRS * 3}, headers=A)   # 6 > 5
    assert r.status_code == 413 and error(r)["param"] == "pairs" and "max_pairs_per_request" in error(r)["message"]
    long = {**PAIRS[0], "chosen": "x " * 300}
    r = h.post("/v1/users/lim/feedback", json={"pairs": [long]}, headers=A)
    assert r.status_code == 413 and error(r)["param"] == "pairs[0].chosen" and "max_text_chars" in error(r)["message"]
    for bad in ("a/b", "-x", "x" * 65, "sp ace"):
        r = h.post(f"/v1/users/{bad}/feedback", json={"pairs": PAIRS[:1]}, headers=A)
        assert r.status_code in (404, 422), (bad, r.status_code)  # a '/' never reaches the route
        if r.status_code == 422:
            assert error(r)["code"] == "invalid_user_id" and "format" in error(r)["message"]
    r = h.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x" * 2500}]},
               headers=A)
    assert r.status_code == 413 and "max_prompt_chars" in error(r)["message"] and error(r)["param"] == "messages"
    r = h.post("/v1/chat/completions", json={"model": "fake", "user": "no way!", "messages": [{"role": "user", "content": "hi"}]},
               headers=A)
    assert r.status_code == 422 and error(r)["param"] == "user_id"
    r = h.post("/v1/chat/completions", content=b"x" * 30_000, headers={**A, "content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in error(r)["message"]
    # nothing of the refused requests was stored
    assert h.get("/v1/users/lim/profile", headers=A).status_code == 404
    r = h.post("/v1/users/lim/feedback", json={"pairs": [{**PAIRS[0], "rejected": PAIRS[0]["chosen"]}]}, headers=A)
    assert r.status_code == 400 and error(r)["param"] == "pairs[0].chosen"


# -- auth and tenants ---------------------------------------------------------------------------

def test_every_v1_route_needs_a_key(svc):
    h = svc["http"]
    calls = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}),
             ("POST", "/v1/users/x/feedback", {"pairs": PAIRS[:1]}), ("GET", "/v1/users/x/profile", None),
             ("DELETE", "/v1/users/x", None), ("GET", "/v1/jobs/job-1", None)]
    for headers in ({}, {"Authorization": "Bearer ps-wrong"}, {"Authorization": svc["keys"]["A"]}):
        for method, path, body in calls:
            r = h.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert error(r)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=svc["base"] + "/v1", api_key="ps-wrong", max_retries=0).models.list()
    assert h.get("/health").status_code == 200


def test_keys_are_stored_hashed(svc):
    mem = Memory(svc["db"])
    rows = mem.conn.execute("SELECT * FROM api_keys").fetchall()
    mem.close()
    dump = json.dumps(rows)
    assert rows and all(k not in dump for k in svc["keys"].values())
    assert {r[0] for r in rows} >= {hash_key(k) for k in svc["keys"].values()}


def test_tenant_b_cannot_see_generate_for_or_delete_tenant_a_user(svc):
    h, A, B = svc["http"], svc["A"], svc["B"]
    job = feed(svc, "A", "alice")
    before = h.get("/v1/users/alice/profile", headers=A).json()
    assert before["pairs"] == 2 and len(before["entries"]) == 2
    # read, delete, job, explicit personalization: all 404 for B, as for a user that never existed
    assert h.get("/v1/users/alice/profile", headers=B).status_code == 404
    assert h.delete("/v1/users/alice", headers=B).status_code == 404
    assert h.get(f"/v1/jobs/{job['job_id']}", headers=B).status_code == 404
    never = h.get("/v1/users/nobody-at-all/profile", headers=B)
    assert error(h.get("/v1/users/alice/profile", headers=B)) == error(never) | {"message": "user 'alice' not found"}
    body = {"model": "fake", "messages": [{"role": "user", "content": "How do I boil an egg?"}], "max_tokens": 4}
    r = h.post("/v1/chat/completions", json={**body, "prefsteer": {"user_id": "alice", "method": "exact"}}, headers=B)
    assert r.status_code == 404 and error(r)["code"] == "user_not_found"
    # implicitly (OpenAI's `user`), B's "alice" is a new user: the plain model, none of A's attributes
    r = h.post("/v1/chat/completions", json={**body, "user": "alice"}, headers=B).json()
    assert r["prefsteer"]["method"] == "none" and r["prefsteer"]["attributes"] == [] and r["prefsteer"]["retrieved"] is None
    # B's own "alice" is another user: her feedback never meets A's
    feed(svc, "B", "alice", PAIRS[:1])
    pb = h.get("/v1/users/alice/profile", headers=B).json()
    assert pb["pairs"] == 1 and [e["prompt"] for e in pb["entries"]] == [PAIRS[0]["prompt"]]
    assert h.delete("/v1/users/alice", headers=B).status_code == 200
    after = h.get("/v1/users/alice/profile", headers=A)
    assert after.status_code == 200 and after.json() == before


def test_feedback_job_reaches_done_and_profile_shows_the_entry(svc):
    h, A = svc["http"], svc["A"]
    r = h.post("/v1/users/fb-kim/feedback", json={"pairs": PAIRS[:1]}, headers=A)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["new_pairs"] == 1
    # durable before the answer: the pair is in the memory already (the job may still be queued)
    mem = Memory(svc["db"])
    assert [p.prompt for p in mem.pairs("A/fb-kim")] == [PAIRS[0]["prompt"]]
    mem.close()
    job = wait_job(h, r.json()["job_id"], A)
    assert job["status"] == "done" and job["indexed"] == 1 and job["pairs"] == 1 and job["user_id"] == "fb-kim"
    prof = h.get("/v1/users/fb-kim/profile", headers=A).json()
    (e,) = prof["entries"]
    assert e["prompt"] == PAIRS[0]["prompt"] and len(e["attributes"]) == 3 and len(e["gains"]) == 3
    assert e["objective"] == pytest.approx(e["base_objective"] + sum(e["gains"]), abs=1e-4)
    assert prof["status"] == "ready" and prof["pending_jobs"] == []
    # the same pair again is stored once
    r = h.post("/v1/users/fb-kim/feedback", json={"pairs": PAIRS[:1]}, headers=A)
    assert r.json()["new_pairs"] == 0
    wait_job(h, r.json()["job_id"], A)
    assert h.get("/v1/users/fb-kim/profile", headers=A).json()["pairs"] == 1


def _counts(db: str, users: list[str]) -> dict:
    mem = Memory(db)
    out = {u: mem.row_counts(u) for u in users}
    out["*"] = {t: mem.conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
                for (t,) in mem.conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}
    mem.close()
    return out


def test_delete_removes_every_row_and_file_of_the_user_and_nothing_else(svc):
    h, A = svc["http"], svc["A"]
    feed(svc, "A", "del-ann")
    feed(svc, "A", "del-bob")
    feed(svc, "B", "del-ann")
    mem = Memory(svc["db"])  # a method file for each A user, as Reward's adapters are
    for u in ("A/del-ann", "A/del-bob"):
        mem.put_method_state(u, "reward", "s1", "fp", {"w": 1}, files={"adapter.bin": b"weights"}, n_pairs=2)
    tables = list(USER_TABLES)
    mem.close()
    users = ["A/del-ann", "A/del-bob", "B/del-ann"]
    before = _counts(svc["db"], users)
    assert all(before["A/del-ann"][t] > 0 for t in ("users", "pairs", "selections", "entries", "method_states",
                                                   "method_files", "jobs"))
    r = h.delete("/v1/users/del-ann", headers=A)
    assert r.status_code == 200, r.text
    after = _counts(svc["db"], users)
    assert after["A/del-ann"] == {t: 0 for t in tables}
    assert after["A/del-bob"] == before["A/del-bob"] and after["B/del-ann"] == before["B/del-ann"]
    removed = sum(before["A/del-ann"].values())
    assert sum(after["*"].get(t, 0) for t in tables) == sum(before["*"][t] for t in tables) - removed
    for t in set(before["*"]) - set(tables):  # tables of no user (score cache, keys) are untouched
        assert after["*"][t] == before["*"][t], t
    assert r.json()["rows"]["pairs"] == 2
    assert Memory(svc["db"]).method_state("A/del-bob", "reward", "s1")["files"] == {"adapter.bin": b"weights"}
    assert h.get("/v1/users/del-ann/profile", headers=A).status_code == 404
    assert h.delete("/v1/users/del-ann", headers=A).status_code == 404
    assert h.get("/v1/users/del-ann/profile", headers=svc["B"]).status_code == 200


def test_no_auth_only_on_loopback(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        Settings(db=str(tmp_path / "m.db"), backend="fake", host="0.0.0.0", auth=False)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        Settings(db=str(tmp_path / "m.db"), backend="fake", host=host, auth=False)


def test_no_auth_serves_the_local_users_and_keys_still_pick_a_tenant(tmp_path):
    db = str(tmp_path / "m.db")
    mem = Memory(db)
    key = mem.create_key("T")["key"]
    mem.close()
    with thread_server(Settings(db=db, backend="fake", embedder="hash", auth=False)) as base:
        h = httpx.Client(base_url=base, timeout=60)
        r = h.post("/v1/users/local-u/feedback", json={"pairs": PAIRS[:1]})
        assert r.status_code == 202
        assert wait_job(h, r.json()["job_id"])["status"] == "done"
        assert h.get("/v1/users/local-u/profile").status_code == 200
        assert h.get("/v1/users/local-u/profile", headers={"Authorization": f"Bearer {key}"}).status_code == 404
    mem = Memory(db)
    assert "local-u" in mem.users()   # the CLI's namespace: `prefsteer profile --user local-u` sees her
    mem.close()


def test_the_service_stops_the_engine_it_loaded_but_not_one_it_was_given(tmp_path, monkeypatch):
    """At shutdown the service stops the backend it loaded (its scheduler thread here, vLLM's engine
    process there); a backend handed in through `make_backend` stays its owner's."""
    import prefsteer.backends as backends
    from prefsteer.backends.fake import FakeBackend

    loaded = []
    monkeypatch.setattr(backends, "load_backend", lambda name, **kw: loaded.append(FakeBackend()) or loaded[-1])
    db = str(tmp_path / "m.db")
    given = FakeBackend()
    for settings in (Settings(db=db, backend="fake", embedder="hash", auth=False),
                     Settings(db=db, backend="fake", embedder="hash", auth=False, make_backend=lambda: given)):
        with thread_server(settings) as base:
            r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
                "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "stream": True})
            assert r.status_code == 200 and "[DONE]" in r.text, r.text
    assert len(loaded) == 1 and loaded[0]._scheduler is None  # closed
    assert given._scheduler is not None and given._scheduler._thread.is_alive()
    given.close()


def test_web_page_and_the_calls_it_makes(svc):
    """No browser here: the page is served, and the calls its script makes give what it shows."""
    h, A = svc["http"], svc["A"]
    page = h.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="prompt"', 'id="pick0"', 'id="pick1"', 'id="profile"', "/v1/chat/completions",
                   "/feedback", "/profile", '"fake"'):
        assert needle in page.text, needle
    prompt = "Give me some advice for my first job interview."
    base = {"model": "fake", "max_tokens": 20, "messages": [{"role": "user", "content": prompt}]}
    mine = h.post("/v1/chat/completions", json={**base, "user": "web-u"}, headers=A).json()
    plain = h.post("/v1/chat/completions", json={**base, "user": "web-u", "temperature": 1.0, "seed": 7,
                                                  "prefsteer": {"method": "none"}}, headers=A).json()
    a, b = mine["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"]
    assert a != b
    job = h.post("/v1/users/web-u/feedback", json={"pairs": [{"prompt": prompt, "chosen": b, "rejected": a}]},
                 headers=A).json()
    assert wait_job(h, job["job_id"], A)["status"] == "done"
    prof = h.get("/v1/users/web-u/profile", headers=A).json()
    assert prof["entries"][0]["prompt"] == prompt and len(prof["entries"][0]["gains"]) == 3
    again = h.post("/v1/chat/completions", json={**base, "user": "web-u"}, headers=A).json()
    assert again["prefsteer"]["method"] == "exact" and again["prefsteer"]["attributes"] == prof["entries"][0]["attributes"]


def test_other_methods_through_the_service(svc):
    feed(svc, "A", "mt-rae", PAIRS[:1])
    c = client(svc, "A")
    msgs = [{"role": "user", "content": "eggs?"}]
    # Base builds its history prompt from the stored pairs; its answer differs from the plain one
    base = c.chat.completions.create(model="fake", messages=msgs, max_tokens=6,
                                     extra_body={"prefsteer": {"user_id": "mt-rae", "method": "base"}})
    plain = c.chat.completions.create(model="fake", messages=msgs, max_tokens=6)
    assert base.model_extra["prefsteer"]["method"] == "base"
    assert base.choices[0].message.content != plain.choices[0].message.content
    # a method never fitted for the user is a 409 naming it, not a plain answer in disguise
    with pytest.raises(openai.ConflictError) as info:
        c.chat.completions.create(model="fake", messages=msgs, max_tokens=6,
                                  extra_body={"prefsteer": {"user_id": "mt-rae", "method": "drift"}})
    assert info.value.code == "not_fitted" and "drift" in info.value.message
    # a conversation with a system prompt: the caller's system prompt first, then the history
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}] + msgs
    multi = c.chat.completions.create(model="fake", messages=talk, max_tokens=6,
                                      extra_body={"prefsteer": {"user_id": "mt-rae", "method": "base"}})
    assert multi.model_extra["prefsteer"]["method"] == "base" and multi.choices[0].message.content.strip()
    assert multi.usage.prompt_tokens > base.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="fake", messages=msgs,
                                  extra_body={"prefsteer": {"user_id": "mt-nobody", "method": "exact"}})


def test_every_method_answers_a_multi_turn_conversation_through_the_openai_client(svc, monkeypatch, tmp_path):
    """A system prompt and three user turns, answered by each registered method for a user fitted
    with it (fitted here on the service's database, as `prefsteer index` does)."""
    from prefsteer.backends.fake import FakeBackend
    from prefsteer.methods import available_methods
    from prefsteer.methods.registry import Resources, build
    from prefsteer.retrieval import HashEmbedder
    from prefsteer.types import PreferencePair

    monkeypatch.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path / "cliper"))
    uid = store.internal_user("A", "mt-all")
    pairs = [PreferencePair(uid, p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS]
    mem = Memory(svc["db"])
    mem.add_pairs(pairs)
    res = Resources(memory=mem, embedder=HashEmbedder())
    for name in available_methods():
        build(name, FakeBackend(), res, {}).fit(uid, pairs)  # the service's options: every default
    mem.close()
    conv = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "I want to get fit."},
            {"role": "assistant", "content": "Great goal. Running or the gym?"},
            {"role": "user", "content": "Running. How do I start?"},
            {"role": "assistant", "content": "Slowly, a few times a week."},
            {"role": "user", "content": "And how can I sleep better after a run?"}]
    c = client(svc, "A")
    plain = c.chat.completions.create(model="fake", messages=conv, max_tokens=8)
    answers = {}
    for name in available_methods():
        out = c.chat.completions.create(model="fake", messages=conv, max_tokens=8,
                                        extra_body={"prefsteer": {"user_id": "mt-all", "method": name}})
        info = out.model_extra["prefsteer"]
        assert info["method"] == name and out.choices[0].message.content.strip(), name
        answers[name] = out
        # streamed as it is decoded: the same text, the same usage
        chunks = list(c.chat.completions.create(
            model="fake", messages=conv, max_tokens=8, stream=True, stream_options={"include_usage": True},
            extra_body={"prefsteer": {"user_id": "mt-all", "method": name}}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == out.choices[0].message.content and chunks[-1].usage == out.usage, name
    assert answers["none"].choices[0].message.content == plain.choices[0].message.content
    # EXACT retrieves on the last user turn: the sleep question, not the first turn
    assert answers["exact"].model_extra["prefsteer"]["retrieved"]["prompt"] == "How can I sleep better?"
    # what a method adds to the context is counted in the usage
    for name in ("base", "exact", "exact-global"):
        assert answers[name].usage.prompt_tokens > plain.usage.prompt_tokens, name
