"""GET /health (no key, no user data) and GET /v1/models (the one model served)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from prefsteer.service.auth import current_tenant, engine
from prefsteer.service.schemas import Model, ModelList, error_responses

router = APIRouter()


@router.get("/health")
def health(eng=Depends(engine)) -> dict:
    w = eng.worker
    queued = sum(eng.memory.queue_depth().values())
    return {"status": "ok", "model": eng.model_id, "backend": eng.backend.name,
            "worker": {"alive": bool(w and w.alive()), "pending_jobs": queued}}


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
def models(tenant=Depends(current_tenant), eng=Depends(engine)) -> ModelList:
    return ModelList(data=[Model(id=eng.model_id, created=eng.started)])
