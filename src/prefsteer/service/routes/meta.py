"""The probes and the metrics (no key, no user data) and GET /v1/models (the one model served).

    GET /health    alive: 200 while the process answers, with what it serves
    GET /ready     200 when the model is loaded and the database answers, else 503 naming which is not
    GET /metrics   Prometheus's text format (`prefsteer.service.metrics`)
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, Response

from prefsteer.service.auth import current_tenant, engine
from prefsteer.service.errors import ApiError
from prefsteer.service.schemas import ErrorResponse, Model, ModelList, error_responses

log = logging.getLogger("prefsteer.service")
router = APIRouter()


def _pending_jobs(eng) -> int | None:
    """Jobs queued or running, all tenants together (None: the memory cannot say)."""
    try:
        return sum(eng.memory.queue_depth().values())
    except Exception as e:  # a liveness probe answers even when the database does not (/ready says so)
        log.warning("queue depth unavailable for /health: %s: %s", type(e).__name__, e)
        return None


@router.get("/health")
def health(request: Request) -> dict:
    eng = getattr(request.app.state, "engine", None)
    if eng is None:  # the model is still loading
        return {"status": "ok", "model": None, "backend": None, "worker": {"alive": False}}
    w = eng.worker
    worker = {"alive": bool(w and w.alive())}
    pending = _pending_jobs(eng)
    if pending is not None:
        worker["pending_jobs"] = pending
    return {"status": "ok", "model": eng.model_id, "backend": eng.backend.name, "worker": worker}


@router.get("/ready", responses={503: {"model": ErrorResponse, "description": "the model is not loaded yet "
                                       "(code model_not_loaded) or the database does not answer "
                                       "(code database_unavailable)"}})
def ready(request: Request) -> dict:
    eng = getattr(request.app.state, "engine", None)
    if eng is None or getattr(eng, "backend", None) is None:
        raise ApiError(503, "not ready: the model is not loaded yet", code="model_not_loaded")
    try:
        eng.memory.ping()
    except Exception as e:
        log.warning("not ready: the database does not answer: %s: %s", type(e).__name__, e)
        raise ApiError(503, f"not ready: the database does not answer ({type(e).__name__})",
                       code="database_unavailable") from None
    return {"status": "ready", "model": eng.model_id}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
def models(tenant=Depends(current_tenant), eng=Depends(engine)) -> ModelList:
    return ModelList(data=[Model(id=eng.model_id, created=eng.started)])
