"""The service's edge (`prefsteer.service.edge`) and the request checks at the boundary: body size
counted as it is read, slow bodies, the rate limit, the Host check without keys, a second
Authorization header, user ids, `seed`'s range, JSON types, and admission on the non-streamed path.

Chunked and slow bodies go to a real uvicorn server (a thread, a free loopback port) over raw
sockets, each bounded in time; the rest uses FastAPI's TestClient."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid

import httpx
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from prefsteer.storage import Memory  # noqa: E402
from prefsteer.service import Settings, create_app, store  # noqa: E402
from prefsteer.service.edge import RateLimiter, host_name  # noqa: E402
from prefsteer.service.schemas import SEED_MAX, SEED_MIN  # noqa: E402
from tests.test_service_helpers import thread_server  # noqa: E402

PAIR = {"prompt": "How do I boil an egg?", "chosen": "Boil it 9 minutes.", "rejected": "Eggs are magic!!"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
LIMIT = 20_000


def make_db(tmp_path, tenants=("A",)) -> tuple[str, dict[str, str]]:
    db = str(tmp_path / "m.db")
    mem = Memory(db)
    keys = {t: mem.create_key(t)["key"] for t in tenants}
    mem.close()
    return db, keys


def error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- raw HTTP over a socket ---------------------------------------------------------------------

def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _read_until_closed(s: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sent until it closed the connection (True) or the deadline passed (False)."""
    out = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return out, True
        if not data:
            return out, True
        out += data
    return out, False


def _status(raw: bytes) -> int | None:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def post_chunked(port: int, path: str, total: int, key: str | None = None, chunk: int = 64 * 1024,
                 timeout: float = 20.0) -> dict:
    """POST ``total`` bytes as chunks, stopping as soon as the server answers or closes: how much
    was sent, and the answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               "Transfer-Encoding: chunked\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") +
               "\r\n").encode())
    data, sent, refused = b"x" * chunk, 0, False
    deadline = time.monotonic() + timeout
    try:
        while sent < total and time.monotonic() < deadline:
            if select.select([s], [], [], 0)[0]:
                break  # the server answered (or closed) before taking the whole body
            s.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            sent += len(data)
    except OSError:  # the server closed the connection while we were still sending
        refused = True
    raw, closed = _read_until_closed(s, deadline)
    s.close()
    return {"sent": sent, "raw": raw, "status": _status(raw), "closed": closed or refused}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db, keys = make_db(tmp_path_factory.mktemp("edge"))
    settings = Settings(db=db, backend="fake", embedder="hash", max_body_bytes=LIMIT, body_read_timeout=1.0,
                        rate_limit=100_000, rate_burst=10_000)
    with thread_server(settings) as base:
        yield {"base": base, "port": _port(base), "key": keys["A"], "H": {"Authorization": f"Bearer {keys['A']}"}}


def test_a_chunked_body_past_the_limit_is_a_413_and_the_server_stops_reading(server):
    total = 32 << 20  # far more than the socket buffers hold: sending it all means the server read it
    out = post_chunked(server["port"], "/v1/users/u0/feedback", total, key=server["key"])
    assert out["status"] == 413 and out["closed"], out["raw"][:300]
    assert out["sent"] < total // 2, out["sent"]
    head = out["raw"].split(b"\r\n\r\n", 1)[0].lower()
    assert b"connection: close" in head and b"x-request-id: " in head
    e = _json_body(out["raw"])["error"]
    assert e["code"] == "body_too_large" and "max_body_bytes" in e["message"]


def test_a_chunked_body_without_a_key_is_not_read_past_the_limit_either(server):
    total = 32 << 20
    out = post_chunked(server["port"], "/v1/users/u0/feedback", total)
    assert out["status"] == 413 and out["closed"] and out["sent"] < total // 2


def test_a_chunked_body_under_the_limit_reaches_the_route(server):
    body = json.dumps({"pairs": [PAIR]}).encode()
    s = socket.create_connection(("127.0.0.1", server["port"]), timeout=20)
    s.sendall((f"POST /v1/users/chunky/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {server['key']}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())
    for i in range(0, len(body), 7):  # many small chunks
        part = body[i:i + 7]
        s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    s.sendall(b"0\r\n\r\n")
    raw, _ = _read_until_closed(s, time.monotonic() + 20)
    s.close()
    assert _status(raw) == 202 and _json_body(raw)["pairs"] == 1


def test_a_declared_length_past_the_limit_is_refused_before_any_byte_is_sent(server):
    s = socket.create_connection(("127.0.0.1", server["port"]), timeout=10)
    s.sendall((f"POST /v1/users/u0/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {server['key']}\r\nContent-Length: {10 ** 9}\r\n\r\n").encode())
    raw, closed = _read_until_closed(s, time.monotonic() + 5)
    s.close()
    assert _status(raw) == 413 and closed and _json_body(raw)["error"]["code"] == "body_too_large"
    assert str(10 ** 9) in _json_body(raw)["error"]["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_that_does_not_arrive_in_time_is_a_408(server, chunked):
    s = socket.create_connection(("127.0.0.1", server["port"]), timeout=10)
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 100"
    s.sendall((f"POST /v1/users/u0/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {server['key']}\r\n{framing}\r\n\r\n").encode())
    s.sendall(b"a\r\n{\"pairs\": \r\n" if chunked else b'{"pairs": ')  # a start, then nothing
    start = time.monotonic()
    raw, closed = _read_until_closed(s, start + 8)
    s.close()
    waited = time.monotonic() - start
    assert _status(raw) == 408 and closed, raw[:200]
    assert 0.8 <= waited < 5, waited  # body_read_timeout is 1 s
    e = _json_body(raw)["error"]
    assert e["code"] == "body_timeout" and "body_read_timeout" in e["message"]


# -- the rate limit ----------------------------------------------------------------------------

def test_the_token_bucket_refills_at_its_rate():
    lim = RateLimiter(per_minute=60, burst=3)  # one a second
    assert [lim.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.take("a", now=0.0) == pytest.approx(1.0)
    assert lim.take("b", now=0.0) == 0.0  # another client has its own bucket
    assert lim.take("a", now=0.5) == pytest.approx(0.5)  # half a token back
    assert lim.take("a", now=1.0) == 0.0
    assert lim.take("a", now=100.0) == 0.0 and lim.buckets["a"].tokens == pytest.approx(2.0)  # never past burst
    small = RateLimiter(per_minute=60, burst=1, max_clients=2)
    for c in "xyz":
        small.take(c, now=0.0)
    assert list(small.buckets) == ["y", "z"]  # the least recently used was dropped
    with pytest.raises(ValueError, match="rate_burst"):
        RateLimiter(per_minute=60, burst=0)


def _metric(client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_a_key_over_its_rate_gets_429_with_retry_after(tmp_path):
    db, keys = make_db(tmp_path)
    app = create_app(Settings(db=db, backend="fake", embedder="hash", rate_limit=6, rate_burst=3))
    H = {"Authorization": f"Bearer {keys['A']}"}
    limited = lambda: app.state.metrics.registry.get_sample_value("prefsteer_rate_limited_total")  # noqa: E731
    with TestClient(app) as c:
        before = limited()
        # the key's first request draws on its address's bucket; accepted, the key has its own (3)
        codes = [c.get("/v1/models", headers=H).status_code for _ in range(9)]
        assert codes[:4] == [200] * 4 and set(codes[4:]) == {429}, codes
        r = c.get("/v1/models", headers=H)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10
        e = error(r)
        assert (e["code"], e["type"]) == ("rate_limit_exceeded", "rate_limit_error") and "a minute" in e["message"]
        assert r.headers["x-request-id"]
        for probe in ("/health", "/ready", "/metrics"):  # probes and scrapes: never limited
            assert c.get(probe).status_code == 200, probe
        assert limited() - before == 6


def test_wrong_keys_flood_their_address_bucket_but_a_known_key_keeps_its_own(tmp_path):
    db, keys = make_db(tmp_path)
    app = create_app(Settings(db=db, backend="fake", embedder="hash", rate_limit=600, rate_burst=50))
    good = {"Authorization": f"Bearer {keys['A']}"}
    with TestClient(app) as c:
        assert c.get("/v1/models", headers=good).status_code == 200  # the key is now known: its own bucket
        codes = [c.get("/v1/models", headers={"Authorization": f"Bearer ps-{uuid.uuid4().hex}"}).status_code
                 for _ in range(250)]
        codes += [c.get("/v1/models", headers={"Authorization": "Bearer ps-the-same-wrong-key"}).status_code
                  for _ in range(250)]
        assert set(codes) == {401, 429} and codes.count(429) >= 400, (codes.count(401), codes.count(429))
        assert c.get("/v1/models").status_code == 429  # no key at all: the same address
        assert c.get("/v1/models", headers=good).status_code == 200


def test_rate_limit_zero_turns_it_off(tmp_path):
    db, keys = make_db(tmp_path)
    app = create_app(Settings(db=db, backend="fake", embedder="hash", rate_limit=0, rate_burst=1))
    with TestClient(app) as c:
        assert {c.get("/v1/models", headers={"Authorization": "Bearer ps-wrong"}).status_code
                for _ in range(30)} == {401}


# -- headers -----------------------------------------------------------------------------------

def test_host_name_strips_the_port():
    assert [host_name(h) for h in ("localhost:8000", "127.0.0.1", "[::1]:80", "[::1]", "example.com:1")] == \
        ["localhost", "127.0.0.1", "::1", "::1", "example.com"]


def test_without_keys_only_loopback_host_names_are_served(tmp_path):
    db = str(tmp_path / "m.db")
    app = create_app(Settings(db=db, backend="fake", embedder="hash", auth=False))
    with TestClient(app, base_url="http://localhost") as c:
        for host in ("localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "0.0.0.0:8000", ""):
            r = c.get("/v1/models", headers={"Host": host})
            assert r.status_code == 400 and error(r)["code"] == "invalid_host", host
            assert r.headers["x-request-id"]
    # with keys, the Host is not checked (a server behind a proxy has any name)
    (tmp_path / "keys").mkdir()
    db2, keys = make_db(tmp_path / "keys")
    with TestClient(create_app(Settings(db=db2, backend="fake", embedder="hash")), base_url="http://api.example") as c:
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {keys['A']}"}).status_code == 200


def test_two_authorization_headers_are_a_400_naming_the_header(tmp_path):
    db, keys = make_db(tmp_path)
    with TestClient(create_app(Settings(db=db, backend="fake", embedder="hash"))) as c:
        r = c.get("/v1/models", headers=[("authorization", f"Bearer {keys['A']}"), ("authorization", "Bearer ps-x")])
        e = error(r)
        assert r.status_code == 400 and e["code"] == "duplicate_header" and e["param"] == "Authorization"
        assert "Authorization" in e["message"]


# -- the request's content ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db, keys = make_db(tmp_path_factory.mktemp("content"))
    with TestClient(create_app(Settings(db=db, backend="fake", embedder="hash", rate_limit=0))) as c:
        c.headers["Authorization"] = f"Bearer {keys['A']}"
        yield c


def test_a_user_id_with_a_trailing_newline_is_a_422(client):
    assert client.post("/v1/users/nl/feedback", json={"pairs": [PAIR]}).status_code == 202
    for path in ("/v1/users/nl%0A/profile", "/v1/users/nl%0A"):
        r = client.request("GET" if path.endswith("profile") else "DELETE", path)
        assert r.status_code == 422 and error(r)["code"] == "invalid_user_id", path
    r = client.post("/v1/chat/completions", json={**CHAT, "user": "nl\n"})
    assert r.status_code == 422 and error(r)["param"] == "user_id"


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2 ** 64, 10 ** 30])
def test_a_seed_outside_64_bits_is_a_400_naming_seed(client, seed):
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "seed": seed})
    assert r.status_code == 400 and error(r)["param"] == "seed" and "seed" in error(r)["message"]


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, SEED_MAX])
def test_a_seed_in_range_samples(client, seed):
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "seed": seed})
    assert r.status_code == 200, r.text
    again = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "seed": seed})
    assert again.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field,value,param", [
    ("max_tokens", "10", "max_tokens"), ("max_tokens", True, "max_tokens"), ("max_tokens", 10.0, "max_tokens"),
    ("max_completion_tokens", "3", "max_completion_tokens"), ("temperature", "1", "temperature"),
    ("temperature", True, "temperature"), ("top_p", False, "top_p"), ("seed", "7", "seed"), ("seed", True, "seed"),
    ("n", "1", "n"), ("stream", "true", "stream"), ("stream", 1, "stream"), ("logprobs", 0, "logprobs"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ("prefsteer", {"alpha": True}, "prefsteer.alpha"),
])
def test_numbers_and_booleans_must_be_json_numbers_and_booleans(client, field, value, param):
    r = client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert r.status_code == 400, r.text
    e = error(r)
    assert e["param"] == param and e["code"] == "invalid_value" and param.split(".")[0] in e["message"]


def test_an_integer_is_a_number(client):
    for body in ({"temperature": 1, "seed": 3}, {"temperature": 0}, {"top_p": 1}, {"stream": False}):
        r = client.post("/v1/chat/completions", json={**CHAT, **body})
        assert r.status_code == 200, (body, r.text)


# -- admission, the non-streamed path ----------------------------------------------------------

def test_past_the_admission_bound_a_whole_answer_is_a_503_too(slow_service):
    base, backend = slow_service
    body = {"model": "fake", "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 100, "temperature": 0}
    results: dict[int, httpx.Response] = {}

    def hold(i):
        results[i] = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]  # one decoding, one waiting
    for n, t in enumerate(threads, 1):
        t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = backend.scheduler.stats() if backend.scheduler is not None else {}
            if stats.get("requests", 0) + stats.get("waiting", 0) >= n:
                break
            time.sleep(0.01)
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    with httpx.Client(base_url=base) as c:
        refused = _metric(c, "prefsteer_admission_refused_total")
    for t in threads:
        t.join(60)
    assert r.status_code == 503 and error(r)["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    assert refused == 1
    assert [results[i].status_code for i in range(2)] == [200, 200]  # the held answers were given in full
    assert results[0].json()["choices"][0]["message"]["content"] == results[1].json()["choices"][0]["message"]["content"]
