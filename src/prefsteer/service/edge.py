"""The service's edge: what a request must pass before any route sees it (pure ASGI middleware).

In order, every HTTP request is refused when

1. the server runs without keys (``--no-auth``) and its ``Host`` is not a loopback name
   (localhost, 127.0.0.1, [::1], any port): a web page from elsewhere that re-binds its own name
   to 127.0.0.1 (DNS rebinding) cannot drive the local service -- 400 ``invalid_host``;
2. it has two ``Authorization`` headers -- 400 ``duplicate_header``;
3. its client is over the rate limit -- 429 ``rate_limit_exceeded`` with ``Retry-After``;
4. its body is larger than ``max_body_bytes``: by its ``Content-Length`` before anything is read,
   or, chunked or not, as soon as the bytes read pass the limit -- 413 ``body_too_large``;
5. its body does not arrive within ``body_read_timeout`` seconds -- 408 ``body_timeout``.

The body is read here, whole, before the app runs (at most ``max_body_bytes`` of it, which the app
would hold anyway to parse it), and handed to the app unchanged. A 413 or 408 closes the
connection (``Connection: close``): the rest of the body is never read.

Rate limit: a token bucket per client (``rate_limit`` requests a minute, bursts of ``rate_burst``;
0 turns it off). A client is its API key once a route has accepted that key, else its address, so
wrong keys, however many and however varied, all draw on their address's bucket (the address
uvicorn reports: behind a proxy it trusts, the one the proxy forwards). /health, /ready and
/metrics are not limited (probes, and a Prometheus scraper sharing an address with a noisy client). The buckets live in this process: each replica limits on its own, so N replicas
behind a balancer let a client make up to N times ``rate_limit``.

    app.add_middleware(Edge, settings=settings, metrics=metrics)
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict

import anyio

from prefsteer.service.auth import is_loopback
from prefsteer.service.errors import ApiError

EXEMPT = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: never rate limited
MAX_CLIENTS = 65_536  # buckets kept (least recently used dropped: a dropped bucket is a full one again)
MAX_KEYS = 16_384  # accepted keys remembered
KEY_ACCEPTED = "api_key_accepted"  # set in the request's state by the auth dependency


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` tokens a second; a request takes one."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float):
        self.tokens, self.stamp = burst, now


class RateLimiter:
    """Token buckets by client, in this process's memory (no lock: used from the event loop only).

    >>> limiter = RateLimiter(per_minute=60, burst=2)
    >>> [limiter.take("10.0.0.1", now=0.0) for _ in range(3)]
    [0.0, 0.0, 1.0]
    """

    def __init__(self, per_minute: float, burst: int, max_clients: int = MAX_CLIENTS):
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"`rate_limit` (={per_minute}) has to be positive and `rate_burst` (={burst}) "
                             "at least 1")
        self.rate, self.burst, self.max_clients = per_minute / 60.0, float(burst), max_clients
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> float:
        """0 when ``client`` may go on (a token is taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        b = self.buckets.pop(client, None) or TokenBucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
        b.stamp = now
        self.buckets[client] = b  # most recently used last
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        if b.tokens >= 1:
            b.tokens -= 1
            return 0.0
        return (1 - b.tokens) / self.rate


def host_name(host: str) -> str:
    """The name of a ``Host`` header value, its port left out (``[::1]:8000`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _close(err: ApiError) -> ApiError:
    # the body was not read to its end: the connection cannot carry another request
    err.headers = {**(err.headers or {}), "Connection": "close"}
    return err


class Edge:
    """Pure ASGI middleware that refuses what the module's docstring lists, then runs the app with
    the body it read."""

    def __init__(self, app, settings, metrics=None):
        self.app, self.metrics = app, metrics
        self.limit, self.timeout = settings.max_body_bytes, settings.body_read_timeout
        self.loopback_only = not settings.auth
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
        self.accepted: OrderedDict[bytes, None] = OrderedDict()  # hashes of keys a route accepted

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        err = self._check_headers(headers)
        credential = _credential(headers)
        if err is None and self.limiter is not None and scope["path"] not in EXEMPT:
            err = self._rate(scope, credential)
        if err is None:
            length = next((v for k, v in headers if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > self.limit:
                err = _close(ApiError(413, f"the request body has {int(length)} bytes, more than the limit of "
                                           f"{self.limit} (max_body_bytes)", code="body_too_large"))
        if err is not None:
            return await err.response()(scope, receive, send)
        body, err = await self._read_body(receive)
        if err is not None:
            return await err.response()(scope, receive, send)
        if body is None:  # the client left while sending
            return
        await self.app(scope, _replay(body, receive), self._watch(scope, credential, send))

    # -- headers ----------------------------------------------------------------------------
    def _check_headers(self, headers) -> ApiError | None:
        if self.loopback_only:
            host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1")
            if not is_loopback(host_name(host).lower()):
                return ApiError(400, f"Host {host!r} is not a loopback name: a server without keys (--no-auth) "
                                     "answers only requests to localhost, 127.0.0.1 or [::1]",
                                param="Host", code="invalid_host")
        if sum(1 for k, _ in headers if k == b"authorization") > 1:
            return ApiError(400, "two Authorization headers: send one, `Authorization: Bearer KEY`",
                            param="Authorization", code="duplicate_header")
        return None

    # -- rate limit -------------------------------------------------------------------------
    def _rate(self, scope, credential: bytes | None) -> ApiError | None:
        if credential is not None and credential in self.accepted:
            client = "key:" + credential.hex()
        else:
            client = "addr:" + (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.take(client)
        if not wait:
            return None
        if self.metrics is not None:
            self.metrics.rate_limited.inc()
        retry = max(1, math.ceil(wait))
        return ApiError(429, f"Rate limit reached: at most {self.limiter.rate * 60:g} requests a minute "
                             f"(bursts of {self.limiter.burst:g}); retry after {retry} s",
                        code="rate_limit_exceeded", headers={"Retry-After": str(retry)})

    def _watch(self, scope, credential: bytes | None, send):
        """``send``, noting whether the route accepted the request's key (a key it refused is
        forgotten: revoked keys go back to their address's bucket)."""
        if credential is None or self.limiter is None:
            return send
        state = scope.setdefault("state", {})

        async def watched(message):
            if message["type"] == "http.response.start":
                if state.get(KEY_ACCEPTED):
                    self.accepted[credential] = None
                    self.accepted.move_to_end(credential)
                    while len(self.accepted) > MAX_KEYS:
                        self.accepted.popitem(last=False)
                elif message["status"] == 401:
                    self.accepted.pop(credential, None)
            await send(message)
        return watched

    # -- body -------------------------------------------------------------------------------
    async def _read_body(self, receive) -> tuple[bytes | None, ApiError | None]:
        """The whole body (None: the client left), or the 413/408 that refuses it."""
        chunks, size = [], 0
        try:
            with anyio.fail_after(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        return None, _close(ApiError(
                            413, f"the request body is more than the limit of {self.limit} bytes (max_body_bytes)",
                            code="body_too_large"))
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks), None
        except TimeoutError:
            return None, _close(ApiError(408, f"the request body did not arrive within {self.timeout:g} s "
                                              "(body_read_timeout)", code="body_timeout"))


def _credential(headers) -> bytes | None:
    """A digest of the request's Authorization header (the key itself is never kept)."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    return hashlib.sha256(value).digest()[:16] if value else None


def _replay(body: bytes, receive):
    """``receive`` that gives the body read already, then the server's messages (a disconnect)."""
    given = False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
