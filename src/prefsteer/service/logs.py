"""Request ids and the service's log lines.

Every request carries an id: the client's ``X-Request-Id`` when it is a plain token (1 to 128
characters of ``A-Z a-z 0-9 . _ -``), else a new uuid4 hex. The id is echoed in the response's
``X-Request-Id`` header, errors included, and every log line written while the request is handled
carries it (a context variable, read by `RequestIdFilter`).

    app = RequestId(app)                                   # outermost: every answer gets the header
    uvicorn.run(app, log_config=log_config("json", "info"))  # one JSON object per line
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("prefsteer_request_id", default=None)
HEADER = b"x-request-id"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id(given: bytes | None) -> str:
    """The client's id when it is acceptable, else a new one (a bad id is replaced, never refused:
    a tracing header must not make a request fail)."""
    if given is not None:
        text = given.decode("latin-1")
        if _VALID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestId:
    """Pure ASGI middleware: picks the request's id, sets `REQUEST_ID` while the request is handled
    and adds the ``X-Request-Id`` header to the answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers") or [] if k == HEADER), None)
        rid = request_id(given)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers") or [] if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode("latin-1"))]}
            await send(message)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` attribute: the id of the request being handled, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


def _access_fields(record: logging.LogRecord) -> dict:
    # uvicorn's access line: '%s - "%s %s HTTP/%s" %d' % (client, method, path, version, status)
    args = record.args
    if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        client, method, path, _, status = args
        return {"client": client, "method": method, "path": path, "status": status}
    return {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when
    there is one; uvicorn's access lines add client, method, path and status."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        out.update(_access_fields(record))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message [request_id]``, the id only when there is one."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        return f"{line} [{rid}]" if rid else line


def log_config(fmt: str, level: str, root_level: str = "WARNING") -> dict:
    """A `logging.config.dictConfig` (uvicorn's ``log_config`` too): the root logger, uvicorn's and
    its access log (at ``level``), all through one handler on stderr, as text or JSON (``fmt``),
    each record carrying its request's id; the service's own lines at INFO, other libraries' at
    ``root_level``."""
    if fmt not in ("text", "json"):
        raise ValueError(f"`log_format` (={fmt!r}) has to be 'text' or 'json'")
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"line": {"()": JsonFormatter if fmt == "json" else TextFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "line", "filters": ["request_id"]}},
        "loggers": {"uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
                    "uvicorn.error": {"level": level},
                    "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
                    "prefsteer.service": {"level": "INFO"}},
        "root": {"handlers": ["stderr"], "level": root_level.upper()},
    }
