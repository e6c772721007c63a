"""Prometheus metrics, served at ``GET /metrics`` (text format, no key needed).

Each app has its own registry (`Metrics.registry`, never prometheus-client's global one), so that
the many apps a test run builds in one process count apart. The feedback worker's metrics are the
process's (`JOB_SECONDS`, `PAIRS_INDEXED`): every app's registry serves them too.

    prefsteer_requests_total{route,method,status}   answers, by route template (never the raw path)
    prefsteer_request_seconds{route}                time from the request to the end of its answer
    prefsteer_generation_tokens_total{method}       tokens generated, by personalization method
    prefsteer_time_to_first_token_seconds{method}   from a request reaching the engine to its first token
    prefsteer_time_per_output_token_seconds{method} an answer's mean gap between tokens after the first
    prefsteer_engine_requests{state}                requests running / waiting in the engine (read at scrape)
    prefsteer_engine_prompt_tokens_total            prompt positions the engine prefilled or reused
    prefsteer_engine_prefix_cache_hit_tokens_total  of them, taken from kept prefixes (hf)
    prefsteer_memory_connections                    database connections open (SQLite: one per live request
                                                    thread; PostgreSQL: its pool counts one) (read at scrape)
    prefsteer_queue_depth{tenant}                   feedback jobs queued or running (read at scrape)
    prefsteer_job_seconds                           a feedback job's duration (the worker observes it)
    prefsteer_pairs_indexed_total                   pairs the worker indexed
    prefsteer_rate_limited_total                    requests refused with 429 (rate limit)
    prefsteer_admission_refused_total               answers refused with 503 (the engine is full)

    m = Metrics(lambda: app.state.engine)
    app = Observe(app, m, routes)     # counts and times every answer, errors included
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefsteer.service.engine import call_quietly

log = logging.getLogger("prefsteer.service")

# -- the process's: the feedback worker's metrics --------------------------------------------
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
JOB_SECONDS = Histogram("prefsteer_job_seconds", "Duration of a feedback job, from its start to done or failed",
                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
                        registry=PROCESS_REGISTRY)
PAIRS_INDEXED = Counter("prefsteer_pairs_indexed", "Preference pairs the feedback worker indexed",
                        registry=PROCESS_REGISTRY)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
UNMATCHED = "unmatched"  # the route label of a path no route serves (the raw path would be unbounded)
GONE = "499"  # the status label of a request whose client left before any answer (nginx's code)


def scraped(what: str, read: Callable[[], Any]) -> Any:
    """``read()``, or None with a warning naming ``what`` when it fails: a scrape never fails for
    the engine or the database behind it."""
    value, error = call_quietly(read)
    if error is not None:
        log.warning("%s unavailable for /metrics: %s", what, error)
    return value


def _ask(obj: Any, operation: str) -> Any:
    """``obj.operation()``, or None where ``obj`` has no such operation."""
    fn = getattr(obj, operation, None)
    return fn() if callable(fn) else None


class _Process:
    """Serves the process's metrics from an app's registry."""

    def collect(self):
        yield from PROCESS_REGISTRY.collect()

    def describe(self):
        return list(PROCESS_REGISTRY.collect())


class QueueDepth:
    """``prefsteer_queue_depth{tenant}``, read when scraped from ``memory.queue_depth()`` (tenant ->
    jobs queued or running; the local namespace is the empty tenant). A database that fails gives no
    samples: a scrape never fails for it."""

    def __init__(self, engine: Callable[[], Any]):
        self.engine = engine

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("prefsteer_queue_depth", "Feedback jobs queued or running, by tenant",
                                 labels=["tenant"])

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        eng = self.engine()
        # the database is down: /ready says so; the scrape still answers
        depth = scraped("queue depth", lambda: eng.memory.queue_depth() if eng is not None else {})
        for tenant, n in sorted((depth or {}).items()):
            family.add_metric([tenant or ""], float(n))
        yield family


class EngineLoad:
    """The engine's load, read when scraped from ``backend.stream_stats()``: requests running and
    waiting, and the prompt positions it prefilled and reused where it counts them; and the memory
    connections the service holds. A backend without the operation, or one that fails, gives no
    samples."""

    def __init__(self, engine: Callable[[], Any]):
        self.engine = engine

    def describe(self):
        return list(self._families({}, None))

    def _families(self, stats: dict, connections: int | None):
        requests = GaugeMetricFamily("prefsteer_engine_requests", "Requests in the engine, running or waiting "
                                     "for a place", labels=["state"])
        for state in ("running", "waiting"):
            if state in stats:
                requests.add_metric([state], float(stats[state]))
        yield requests
        for name, key, doc in (
                ("prefsteer_engine_prompt_tokens", "prompt_tokens", "Prompt positions the engine prefilled or reused"),
                ("prefsteer_engine_prefix_cache_hit_tokens", "reused_tokens",
                 "Prompt positions taken from kept prefixes instead of being prefilled")):
            yield CounterMetricFamily(name, doc, value=float(stats[key]) if key in stats else None)
        yield GaugeMetricFamily("prefsteer_memory_connections", "Database connections the service holds open "
                                "(SQLite: one per live request thread; PostgreSQL: its pool counts one)",
                                value=None if connections is None else float(connections))

    def collect(self):
        eng = self.engine()
        stats = scraped("engine load", lambda: _ask(getattr(eng, "backend", None), "stream_stats"))
        connections = scraped("memory connections", lambda: _ask(eng, "open_connections"))
        yield from self._families(stats or {}, connections)


class Metrics:
    """One app's metrics and its registry (see the module's docstring for the names)."""

    def __init__(self, engine: Callable[[], Any] = lambda: None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("prefsteer_requests", "HTTP answers, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("prefsteer_request_seconds", "Time from a request to the end of its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("prefsteer_generation_tokens", "Tokens generated, by personalization method",
                              ["method"], registry=r)
        self.rate_limited = Counter("prefsteer_rate_limited", "Requests refused with 429 by the rate limit",
                                    registry=r)
        self.admission_refused = Counter("prefsteer_admission_refused",
                                         "Answers refused with 503 because the engine was full", registry=r)
        self.first_token = Histogram("prefsteer_time_to_first_token_seconds",
                                     "Time from a request reaching the engine to its first token", ["method"],
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.per_token = Histogram("prefsteer_time_per_output_token_seconds",
                                   "An answer's mean time between tokens after its first", ["method"],
                                   buckets=TOKEN_BUCKETS, registry=r)
        r.register(_Process())
        r.register(QueueDepth(engine))
        r.register(EngineLoad(engine))

    def render(self) -> tuple[bytes, str]:
        """The exposition (body, content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # what the serving object reports
    def generated(self, method: str, tokens: int, stream: Any = None) -> None:
        """An answer ended: its tokens, and from its engine's `TokenStream` (when it was decoded as one)
        the time to its first token and between its tokens."""
        if tokens > 0:
            self.tokens.labels(method).inc(tokens)
        if stream is not None and stream.first_at is not None:
            self.first_token.labels(method).observe(stream.first_at - stream.created)
            if stream.pushed > 1:
                self.per_token.labels(method).observe((stream.last_at - stream.first_at) / (stream.pushed - 1))

    def refused_busy(self) -> None:
        self.admission_refused.inc()


def route_template(routes, scope) -> str:
    """The template of the route that serves ``scope`` (``/v1/users/{user_id}/feedback``), found
    before the app runs so that a request refused at the edge is labelled too; a path served by a
    route under another method gets that route's template."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial is None:
            partial = route.path
    return partial or UNMATCHED


class Observe:
    """Pure ASGI middleware: counts and times every HTTP answer by route template and status. Put
    outside the app's error handling so that a 500 is counted too."""

    def __init__(self, app, metrics: Metrics, routes: list):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_template(self.routes, scope)
        status = GONE
        start = time.perf_counter()

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.metrics.requests.labels(route, scope["method"], status).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
