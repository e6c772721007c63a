"""The FastAPI application: `create_app(settings)`; the model is loaded once, in the lifespan.

    >>> app = create_app(Settings(db="memory.db", backend="fake", embedder="hash", auth=False))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI

from prefsteer.service.errors import install

log = logging.getLogger("prefsteer.service")


@dataclass
class Settings:
    db: str = field(metadata={"help": "the user memory the service reads and writes: a SQLite file, or a "
                                      "postgresql:// URL that several replicas share"})
    backend: str = field(default="hf", metadata={"help": "model backend: hf, fake, ..."})
    model: str | None = field(default=None, metadata={"help": "model path or hub name (hf)"})
    embedder: str | None = field(default=None, metadata={"help": "prompt embedder (None: all-MiniLM-L6-v2)"})
    attributes: str | None = field(default=None, metadata={"help": "attribute library JSON"})
    host: str = field(default="127.0.0.1", metadata={"help": "the address served (for the no-auth check)"})
    auth: bool = field(default=True, metadata={"help": "require API keys (off only on loopback)"})
    model_id: str | None = field(default=None, metadata={"help": "the model name /v1/models lists"})
    exact: dict[str, Any] = field(default_factory=dict, metadata={"help": "ExactConfig options"})
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "each method's options (name -> options), as the methods were indexed with"})
    default_method: str = field(default="exact", metadata={
        "help": "the method that answers a request with a user and no `prefsteer.method`, and that "
                "learns each feedback pair as it arrives"})
    default_max_tokens: int = field(default=200, metadata={"help": "max_tokens when a request gives none"})
    max_tokens_limit: int = field(default=2048, metadata={"help": "the largest max_tokens accepted"})
    max_prompt_chars: int = field(default=32_000, metadata={"help": "characters of all messages together"})
    max_pairs_per_request: int = field(default=100, metadata={"help": "pairs in one feedback request"})
    max_text_chars: int = field(default=16_000, metadata={"help": "characters of a pair's prompt/chosen/rejected"})
    max_body_bytes: int = field(default=2 << 20, metadata={
        "help": "request body size, counted as it is read (chunked or not): past it a 413"})
    body_read_timeout: float = field(default=30.0, metadata={
        "help": "seconds a request's body may take to arrive; past them a 408"})
    rate_limit: int = field(default=600, metadata={
        "help": "requests a minute per client (an accepted API key, else the address; 0: no limit); "
                "past it a 429 with Retry-After. Each replica limits on its own"})
    rate_burst: int = field(default=120, metadata={
        "help": "requests a client may make in a burst (its bucket's size), however fast"})
    worker: bool = field(default=True, metadata={"help": "index feedback in a background thread"})
    job_lease_seconds: float = field(default=30.0, metadata={
        "help": "how long a feedback job stays a replica's without a renewal (renewed every third of it); "
                "a killed replica's job is taken over after this"})
    max_batch_rows: int = field(default=32, metadata={
        "help": "rows the engine decodes at once: concurrent answers are decoded together in one batch, "
                "each taking one row (a Drift answer 1 + its branches); a request waits for a place"})
    max_waiting: int = field(default=64, metadata={
        "help": "answers waiting for a place in the batch; past that a request gets 503 with Retry-After"})
    # how to build the model and embedder (the CLI passes its own; default: by the names above)
    make_backend: Callable[[], Any] | None = None
    make_embedder: Callable[[], Any] | None = None

    def __post_init__(self):
        from prefsteer.service.auth import is_loopback

        if not self.auth and not is_loopback(self.host):
            raise ValueError(f"--no-auth is allowed only on a loopback address (127.0.0.1, ::1, localhost), "
                             f"not on {self.host!r}: create keys with `prefsteer keys create --tenant T`")
        for name in ("default_max_tokens", "max_tokens_limit", "max_prompt_chars", "max_pairs_per_request",
                     "max_text_chars", "max_body_bytes", "max_batch_rows", "max_waiting", "rate_limit", "rate_burst"):
            least = 0 if name in ("max_waiting", "rate_limit") else 1
            if getattr(self, name) < least:
                raise ValueError(f"`{name}` (={getattr(self, name)}) has to be at least {least}")
        if not self.job_lease_seconds > 0:
            raise ValueError(f"`job_lease_seconds` (={self.job_lease_seconds}) has to be a positive number of seconds")
        if not self.body_read_timeout > 0:
            raise ValueError(f"`body_read_timeout` (={self.body_read_timeout}) has to be a positive number of seconds")


def _load(settings: Settings):
    from prefsteer.attributes import load_library
    from prefsteer.backends import load_backend
    from prefsteer.retrieval import load_embedder

    start = time.perf_counter()
    backend = settings.make_backend() if settings.make_backend else \
        load_backend(settings.backend, **({"model": settings.model} if settings.model else {}))
    embedder = settings.make_embedder() if settings.make_embedder else load_embedder(settings.embedder)
    log.info("loaded backend %s and embedder %s in %.1fs", backend.name, embedder.name,
             time.perf_counter() - start)
    return backend, embedder, load_library(settings.attributes)


class _App(FastAPI):
    """FastAPI, with the request id and the metrics outside its error handling: an unexpected
    error's 500 carries ``X-Request-Id`` and is counted too."""

    def build_middleware_stack(self):
        from prefsteer.service.logs import RequestId
        from prefsteer.service.metrics import Observe

        return RequestId(Observe(super().build_middleware_stack(), self.state.metrics, self.state.routes))


def create_app(settings: Settings) -> FastAPI:
    from prefsteer.service.edge import Edge
    from prefsteer.service.engine import Engine
    from prefsteer.service.metrics import Metrics
    from prefsteer.service.routes import chat, meta, users, web
    from prefsteer.service.schemas import EDGE_ERRORS, error_responses
    from prefsteer.service.worker import Worker
    from prefsteer.types import sha

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend, embedder, library = _load(settings)
        eng = Engine(settings, backend, embedder, library)
        eng.model_id = settings.model_id or settings.model or backend.info().get("model") or backend.name
        eng.system_fingerprint = "fp_" + sha(backend.fingerprint)[:12]
        eng.started = int(time.time())
        if settings.auth and eng.memory.count_keys() == 0:
            log.warning("no API keys in %s: every request will get 401; create one with "
                        "`prefsteer keys create --tenant T --db %s`", eng.memory.path, eng.memory.path)
        eng.worker = Worker(eng) if settings.worker else None
        if eng.worker:
            eng.worker.start()
        app.state.engine = eng
        eng.serving.metrics = app.state.metrics  # tokens generated, admission refusals
        try:
            yield
        finally:
            if eng.worker:
                eng.worker.stop()  # SIGTERM: the current pair finishes, its job is checkpointed
            eng.close()
            if not settings.make_backend:  # the one it loaded (a caller's backend is the caller's to close)
                backend.close()

    # /docs: routes/web.py serves Swagger UI from installed files (FastAPI's loads it from a CDN);
    # ReDoc would need a CDN too, so there is no /redoc
    app = _App(title="prefsteer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
               description="OpenAI-compatible chat, personalized per user from their preference feedback.")
    app.state.metrics = Metrics(lambda: getattr(app.state, "engine", None))
    install(app)
    routers = (meta.router, chat.router, users.router, web.router)
    for r in routers:
        app.include_router(r, responses=error_responses(*EDGE_ERRORS))  # what the edge answers, on any route
    # the routes whose templates label the metrics (the routers' own: how an app keeps the routes it
    # includes differs between FastAPI versions)
    app.state.routes = [r for r in app.router.routes if hasattr(r, "path")] + [x for r in routers for x in r.routes]
    app.add_middleware(Edge, settings=settings, metrics=app.state.metrics)
    return app
