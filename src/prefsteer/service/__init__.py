"""`prefsteer serve`: an OpenAI-compatible personalization service.

    >>> from prefsteer.service import Settings, create_app
    >>> app = create_app(Settings(db="memory.db", backend="fake", embedder="hash"))
    >>> # uvicorn.run(app, host="127.0.0.1", port=8000)

    POST /v1/chat/completions          OpenAI's chat API; `user` or `prefsteer.user_id` personalizes
    GET  /v1/models                    the one model served
    POST /v1/users/{user}/feedback     {"pairs": [{"prompt", "chosen", "rejected"}]} -> 202 {"job_id"}
    GET  /v1/jobs/{job_id}             {"status": queued | running | done | failed, ...}
    GET  /v1/users/{user}/profile      EXACT's entries (attributes, per-attribute gains), method states
    DELETE /v1/users/{user}            every row and file of that user, nothing of anyone else's
    GET  /health                       alive (no key needed, no user data)
    GET  /ready                        the model loaded and the database answering, else 503 (no key)
    GET  /metrics                      Prometheus's text format, `prefsteer_*` (no key)

Every /v1 request needs `Authorization: Bearer KEY` (`prefsteer keys create --tenant T`); a key
belongs to a tenant and a tenant sees only its own users, stored as ``<tenant>/<user>``. Before
any route, the edge (`prefsteer.service.edge`) limits body size, body time and request rate; every
answer carries an ``X-Request-Id``.
"""

from prefsteer.service.app import Settings, create_app

__all__ = ["Settings", "create_app"]
