"""Observability: /metrics (Prometheus, route templates as labels), /health and /ready, request ids
in headers and log lines, JSON logs, and `serve`'s settings from the environment."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from prefsteer.storage import Memory  # noqa: E402
from prefsteer.service import Settings, create_app, store  # noqa: E402
from prefsteer.service.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter, log_config  # noqa: E402
from prefsteer.service.metrics import JOB_SECONDS, PAIRS_INDEXED, Metrics, QueueDepth  # noqa: E402
from tests.test_service_helpers import free_port, start_process, stop_process, wait_http  # noqa: E402

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "tell me something"}], "max_tokens": 6}
HEX32 = re.compile(r"[0-9a-f]{32}")


def scrape(client) -> dict[tuple[str, tuple], float]:
    """/metrics (no key) as {(sample name, sorted labels): value}."""
    r = client.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("metrics") / "m.db")
    mem = Memory(db)
    key = mem.create_key("A")["key"]
    mem.close()
    app = create_app(Settings(db=db, backend="fake", embedder="hash", rate_limit=0))
    with TestClient(app) as c:
        yield {"app": app, "c": c, "H": {"Authorization": f"Bearer {key}"}}


# -- /metrics ----------------------------------------------------------------------------------

def test_metrics_need_no_key_and_name_every_series(svc):
    samples = scrape(svc["c"])
    names = {n for n, _ in samples}
    assert {"prefsteer_job_seconds_count", "prefsteer_pairs_indexed_total", "prefsteer_rate_limited_total",
            "prefsteer_admission_refused_total"} <= names
    assert all(n.startswith("prefsteer_") for n in names), sorted(n for n in names if not n.startswith("prefsteer_"))


def test_requests_are_labelled_by_route_template_never_by_path(svc):
    c, H = svc["c"], svc["H"]
    route = "/v1/users/{user_id}/profile"
    before = scrape(c)
    for _ in range(2):
        assert c.get("/v1/users/someone-7f3a/profile", headers=H).status_code == 404
    assert c.get("/v1/users/someone-7f3a/profile").status_code == 401
    assert c.get("/no/such/path/9d2c").status_code == 404
    after = scrape(c)
    assert value(after, "prefsteer_requests_total", route=route, method="GET", status="404") - \
        value(before, "prefsteer_requests_total", route=route, method="GET", status="404") == 2
    assert value(after, "prefsteer_requests_total", route=route, method="GET", status="401") - \
        value(before, "prefsteer_requests_total", route=route, method="GET", status="401") == 1
    assert value(after, "prefsteer_request_seconds_count", route=route) - \
        value(before, "prefsteer_request_seconds_count", route=route) == 3
    assert value(after, "prefsteer_requests_total", route="unmatched", method="GET", status="404") - \
        value(before, "prefsteer_requests_total", route="unmatched", method="GET", status="404") == 1
    labels = {v for _, ls in after for _, v in ls}
    assert not any("someone-7f3a" in v or "9d2c" in v for v in labels)


def test_a_request_refused_at_the_edge_is_counted_under_its_route(svc):
    c, H = svc["c"], svc["H"]
    route = "/v1/users/{user_id}/feedback"
    before = value(scrape(c), "prefsteer_requests_total", route=route, method="POST", status="413")
    r = c.post("/v1/users/u/feedback", content=b"x" * (3 << 20), headers={**H, "content-type": "application/json"})
    assert r.status_code == 413
    assert value(scrape(c), "prefsteer_requests_total", route=route, method="POST", status="413") - before == 1


def test_generated_tokens_are_counted_by_method_whole_and_streamed(svc):
    c, H = svc["c"], svc["H"]
    before = value(scrape(c), "prefsteer_generation_tokens_total", method="none")
    whole = c.post("/v1/chat/completions", json=CHAT, headers=H).json()
    n = whole["usage"]["completion_tokens"]
    assert n > 0
    with c.stream("POST", "/v1/chat/completions", headers=H,
                  json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    m = events[-1]["usage"]["completion_tokens"]
    assert value(scrape(c), "prefsteer_generation_tokens_total", method="none") - before == n + m


def test_first_token_and_per_token_times_are_observed_for_every_decoded_answer(svc):
    c, H = svc["c"], svc["H"]
    names = ("prefsteer_time_to_first_token_seconds_count", "prefsteer_time_per_output_token_seconds_count",
             "prefsteer_time_to_first_token_seconds_sum")
    before = [value(scrape(c), n, method="none") for n in names]
    assert c.post("/v1/chat/completions", json=CHAT, headers=H).json()["usage"]["completion_tokens"] > 1
    with c.stream("POST", "/v1/chat/completions", headers=H, json={**CHAT, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    after = [value(scrape(c), n, method="none") for n in names]
    assert after[0] - before[0] == 2 and after[1] - before[1] == 2  # one of each per answer
    assert after[2] > before[2]


def test_engine_load_and_prompt_positions_are_read_at_scrape_time(svc):
    from prefsteer.backends.base import GenerationConfig, user_turn
    from prefsteer.service.metrics import EngineLoad

    c, H = svc["c"], svc["H"]
    b = svc["app"].state.engine.backend
    before = value(scrape(c), "prefsteer_engine_prompt_tokens_total")
    prompt = c.post("/v1/chat/completions", json=CHAT, headers=H).json()["usage"]["prompt_tokens"]
    samples = scrape(c)
    assert value(samples, "prefsteer_engine_prompt_tokens_total") - before == prompt
    assert value(samples, "prefsteer_engine_prefix_cache_hit_tokens_total") == 0  # the toy model keeps none
    b.step_seconds = 0.05
    try:
        s = b.stream(user_turn("a long one"), GenerationConfig(max_new_tokens=200, min_new_tokens=200))
        next(iter(s))
        assert value(scrape(c), "prefsteer_engine_requests", state="running") == 1
        s.cancel()
        s.wait()
    finally:
        b.step_seconds = 0.0
    deadline = time.monotonic() + 5  # the stream ends before the scheduler's list of requests drops it
    while value(scrape(c), "prefsteer_engine_requests", state="running") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert value(scrape(c), "prefsteer_engine_requests", state="running") == 0

    class Broken:
        def stream_stats(self):
            raise RuntimeError("engine gone")
    for backend in (object(), Broken()):  # no such operation, or a failing one: no samples, no error
        eng = type("E", (), {"backend": backend})()
        assert [fam.samples for fam in EngineLoad(lambda: eng).collect()] == [[], [], [], []]


def test_memory_connections_are_read_at_scrape_time(svc):
    c, H = svc["c"], svc["H"]
    assert c.post("/v1/chat/completions", json=CHAT, headers=H).status_code == 200
    n = value(scrape(c), "prefsteer_memory_connections")
    assert 1 <= n <= threading.active_count() + 1  # SQLite: one per live thread, at most


def test_the_workers_metrics_are_served_by_every_app(svc):
    c = svc["c"]
    before = scrape(c)
    JOB_SECONDS.observe(2.0)
    PAIRS_INDEXED.inc(3)
    after = scrape(c)
    assert value(after, "prefsteer_job_seconds_count") - value(before, "prefsteer_job_seconds_count") == 1
    assert value(after, "prefsteer_job_seconds_sum") - value(before, "prefsteer_job_seconds_sum") == 2.0
    assert value(after, "prefsteer_pairs_indexed_total") - value(before, "prefsteer_pairs_indexed_total") == 3


class _Mem:
    def __init__(self, depth=None, fail=False):
        self.queue_depth = (lambda: 1 / 0) if fail else (lambda: depth or {})


class _Eng:
    def __init__(self, memory):
        self.memory = memory


def _depth(collector) -> dict[str, float]:
    (fam,) = list(collector.collect())
    assert fam.name == "prefsteer_queue_depth"
    return {s.labels["tenant"]: s.value for s in fam.samples}


def test_queue_depth_is_read_at_scrape_time_and_never_breaks_a_scrape():
    assert _depth(QueueDepth(lambda: _Eng(_Mem({"acme": 2, "": 1})))) == {"acme": 2.0, "": 1.0}
    assert _depth(QueueDepth(lambda: _Eng(_Mem(fail=True)))) == {}   # a database that fails
    assert _depth(QueueDepth(lambda: None)) == {}                    # before the model is loaded
    m = Metrics(lambda: _Eng(_Mem({"acme": 4})))
    assert m.registry.get_sample_value("prefsteer_queue_depth", {"tenant": "acme"}) == 4.0


def test_queue_depth_of_the_memory_reaches_metrics_and_health(svc, monkeypatch):
    c = svc["c"]
    mem_class = type(svc["app"].state.engine.memory)
    monkeypatch.setattr(mem_class, "queue_depth", lambda self: {"A": 2, "": 1})
    assert value(scrape(c), "prefsteer_queue_depth", tenant="A") == 2
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["worker"]["pending_jobs"] == 3 and h["model"] == "fake"


# -- /health and /ready ------------------------------------------------------------------------

def test_ready_says_which_part_is_not_ready(tmp_path, monkeypatch):
    app = create_app(Settings(db=str(tmp_path / "m.db"), backend="fake", embedder="hash"))
    c = TestClient(app)  # no lifespan yet: the model is not loaded
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
    assert c.get("/health").status_code == 200
    with TestClient(app) as c:
        assert c.get("/ready").json() == {"status": "ready", "model": "fake"}
        mem_class = type(app.state.engine.memory)
        calls = []
        monkeypatch.setattr(mem_class, "ping", lambda self: calls.append(1), raising=False)
        assert c.get("/ready").status_code == 200 and calls == [1]

        def gone(self):
            raise OSError("database is gone")
        monkeypatch.setattr(mem_class, "ping", gone, raising=False)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
        assert "database" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200  # alive all the same
        monkeypatch.delattr(mem_class, "ping", raising=False)
        if not hasattr(mem_class, "ping"):  # the fallback while memories have no ping(): users()
            monkeypatch.setattr(mem_class, "users", gone)
            assert c.get("/ready").status_code == 503


# -- request ids -------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_request_id_is_echoed_or_made_on_every_answer(svc):
    c, H = svc["c"], svc["H"]
    assert c.get("/health", headers={"X-Request-Id": "abc.DEF_1-2"}).headers["x-request-id"] == "abc.DEF_1-2"
    assert c.get("/health", headers={"X-Request-Id": "x" * 128}).headers["x-request-id"] == "x" * 128
    for bad in ("x" * 129, "has space", "semi;colon", "", "ünï"):
        rid = c.get("/health", headers={"X-Request-Id": bad.encode("utf-8")}).headers["x-request-id"]
        assert HEX32.fullmatch(rid), (bad, rid)
    answers = [c.get("/v1/models"),                                                  # 401
               c.get("/v1/users/nobody-here/profile", headers=H),                   # 404
               c.post("/v1/chat/completions", json={**CHAT, "max_tokens": "x"}, headers=H),  # 400
               c.post("/v1/users/u/feedback", content=b"{}", headers={**H, "content-length": str(10 ** 8)}),  # 413
               c.get("/v1/models", headers=[("authorization", "Bearer a"), ("authorization", "Bearer b")])]
    assert [r.status_code for r in answers] == [401, 404, 400, 413, 400]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(HEX32.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


def test_an_unexpected_error_is_a_500_with_the_id_counted_and_logged_with_it(tmp_path, monkeypatch):
    db = str(tmp_path / "m.db")
    app = create_app(Settings(db=db, backend="fake", embedder="hash", auth=False))
    handler = _Records()
    logger = logging.getLogger("prefsteer.service")
    logger.addHandler(handler)
    try:
        with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as c:
            def broken(*a, **k):
                raise RuntimeError("a bug")
            monkeypatch.setattr(app.state.engine.serving, "start", broken)
            r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-500"})
            assert r.status_code == 500 and r.headers["x-request-id"] == "trace-500"
            assert r.json()["error"]["code"] == "internal_error"
            assert value(scrape(c), "prefsteer_requests_total", route="/v1/chat/completions", method="POST",
                         status="500") == 1
    finally:
        logger.removeHandler(handler)
    logged = [rec for rec in handler.records if "unexpected error" in rec.getMessage()]
    assert logged and all(rec.request_id == "trace-500" for rec in logged)
    assert all(rec.request_id is None for rec in handler.records if "loaded backend" in rec.getMessage())


def test_log_lines_carry_the_request_id_as_text_or_json():
    record = logging.LogRecord("prefsteer.service", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    token = REQUEST_ID.set("rid-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you" and line["request_id"] == "rid-1"
    assert (line["level"], line["logger"]) == ("INFO", "prefsteer.service") and line["time"].endswith("Z")
    assert TextFormatter().format(record).endswith("hello you [rid-1]")
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/health", "1.1", 200), None)
    RequestIdFilter().filter(access)
    line = json.loads(JsonFormatter().format(access))
    assert "request_id" not in line and (line["path"], line["status"]) == ("/health", 200)
    assert log_config("json", "info")["handlers"]["stderr"]["filters"] == ["request_id"]
    with pytest.raises(ValueError, match="log_format"):
        log_config("xml", "info")


# -- serve's settings from the environment -----------------------------------------------------

def _serve_args(tmp_path, *extra):
    from prefsteer.cli import Context, make_parser
    from prefsteer.cli.serve import settings_from_args

    args = make_parser().parse_args(["serve", "--backend", "fake", "--embedder", "hash",
                                     "--db", str(tmp_path / "m.db"), *extra])
    return args, settings_from_args(args, Context(args))


def test_serve_settings_come_from_the_environment_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTEER_PORT", "9123")
    monkeypatch.setenv("PREFSTEER_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("PREFSTEER_NO_AUTH", "1")
    monkeypatch.setenv("PREFSTEER_LOG_FORMAT", "json")
    monkeypatch.setenv("PREFSTEER_RATE_LIMIT", "30")
    monkeypatch.setenv("PREFSTEER_BODY_READ_TIMEOUT", "2.5")
    monkeypatch.setenv("PREFSTEER_DRIFT_BETA", "2")
    monkeypatch.setenv("PREFSTEER_DRIFT_ATTRIBUTES", "concise formal")
    args, s = _serve_args(tmp_path, "--rate-limit", "90")
    assert (args.port, args.log_format) == (9123, "json")
    assert (s.max_body_bytes, s.auth, s.rate_limit, s.body_read_timeout) == (4096, False, 90, 2.5)
    assert s.method_options["drift"] == {"beta": 2.0, "attributes": ["concise", "formal"]}
    monkeypatch.setenv("PREFSTEER_NO_AUTH", "0")
    args, s = _serve_args(tmp_path)
    assert s.auth is True and s.rate_burst == 120 and args.log_level == "info"  # the defaults


@pytest.mark.parametrize("var,text", [("PREFSTEER_PORT", "eighty"), ("PREFSTEER_NO_AUTH", "maybe"),
                                      ("PREFSTEER_LOG_FORMAT", "xml"), ("PREFSTEER_BODY_READ_TIMEOUT", "soon"),
                                      ("PREFSTEER_MAX_BODY_BYTES", "0")])
def test_a_bad_value_in_the_environment_names_the_variable_and_exits_2(tmp_path, monkeypatch, capsys, var, text):
    from prefsteer.cli import main

    monkeypatch.setenv(var, text)
    code = main(["serve", "--backend", "fake", "--embedder", "hash", "--db", str(tmp_path / "m.db")])
    err = capsys.readouterr().err
    assert code == 2 and var in err and "Traceback" not in err, err


def test_serve_help_says_how_the_environment_is_read(capsys, monkeypatch):
    from prefsteer.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "PREFSTEER_<OPTION>" in out and "PREFSTEER_MAX_BODY_BYTES" in out and "--log-format" in out


def test_serve_from_the_environment_logs_json_with_request_ids(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {"PREFSTEER_PORT": str(port), "PREFSTEER_NO_AUTH": "1", "PREFSTEER_LOG_FORMAT": "json",
           "PREFSTEER_MAX_BODY_BYTES": "1000", "PREFSTEER_DB": str(tmp_path / "m.db"), "PREFSTEER_EMBEDDER": "hash"}
    proc = start_process([sys.executable, "-m", "prefsteer.cli", "serve", "--backend", "fake"], log, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base, proc, log)
        r = httpx.get(base + "/health", headers={"X-Request-Id": "e2e-health"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-health"
        r = httpx.post(base + "/v1/users/u/feedback", content=b"x" * 2000, timeout=10,
                       headers={"content-type": "application/json", "X-Request-Id": "e2e-big"})
        assert r.status_code == 413  # PREFSTEER_MAX_BODY_BYTES applied
    finally:
        stop_process(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("serving http://127.0.0.1:%d/v1" % port in x["message"] for x in lines)
    access = {x.get("request_id"): x for x in lines if x["logger"] == "uvicorn.access"}
    assert access["e2e-health"]["path"] == "/health" and access["e2e-health"]["status"] == 200
    assert access["e2e-big"]["status"] == 413
    assert any(x["logger"] == "uvicorn.error" for x in lines)  # uvicorn's own lines are JSON too
    assert not [line for line in log.read_text().splitlines() if line.startswith(("INFO:", "WARNING:"))]
