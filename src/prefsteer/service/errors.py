"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, the field named."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefsteer.errors import PrefsteerError

log = logging.getLogger("prefsteer.service")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An answer other than 2xx, raised anywhere below a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found_user(user_id: str) -> ApiError:
    # the same answer whether the user never existed or belongs to another tenant
    return ApiError(404, f"user '{user_id}' not found", param="user_id", code="user_not_found")


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(e.get("loc", ())))
        if e.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {e.get('msg')}", code="invalid_json").response()
        if e.get("type") == "extra_forbidden":
            return ApiError(400, f"unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter").response()
        given = f" (={e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
        msg = f"`{param}`{given}: {e.get('msg')}" if param else str(e.get("msg"))
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return ApiError(400, msg + more, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(PrefsteerError)
    async def _prefsteer(request: Request, exc: PrefsteerError):
        from prefsteer.errors import MemoryFileError, UnknownUserError

        if isinstance(exc, UnknownUserError):  # its message lists other users: never sent
            return ApiError(404, "user not found", param="user_id", code="user_not_found").response()
        if isinstance(exc, MemoryFileError):
            log.error("memory unusable on %s %s: %s", request.method, request.url.path, exc)
            return ApiError(503, "the service's memory is unavailable; try again later",
                            code="memory_unavailable").response()
        return ApiError(400, str(exc), code="invalid_request").response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
