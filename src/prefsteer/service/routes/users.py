"""Feedback, jobs, profiles and deletion of a tenant's users.

A user exists once they have given feedback; another tenant's user and a user that never existed
get the same 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from prefsteer.service.auth import Tenant, current_tenant, engine, known_user
from prefsteer.service.errors import ApiError
from prefsteer.service.schemas import (Deleted, FeedbackAccepted, FeedbackRequest, Job, Profile, ProfileEntry,
                                       error_responses)
from prefsteer.types import PreferencePair, with_id

router = APIRouter(prefix="/v1")


def _check_pairs(body: FeedbackRequest, limits) -> None:
    if len(body.pairs) > limits.max_pairs_per_request:
        raise ApiError(413, f"{len(body.pairs)} pairs in one request, more than the limit of "
                            f"{limits.max_pairs_per_request} (max_pairs_per_request): send them in batches",
                       param="pairs", code="too_many_pairs")
    for i, p in enumerate(body.pairs):
        for name in ("prompt", "chosen", "rejected"):
            text = getattr(p, name)
            if not text.strip():
                raise ApiError(400, f"pairs[{i}].{name} is empty", param=f"pairs[{i}].{name}", code="empty_field")
            if len(text) > limits.max_text_chars:
                raise ApiError(413, f"pairs[{i}].{name} has {len(text)} characters, more than the limit of "
                                    f"{limits.max_text_chars} (max_text_chars)",
                               param=f"pairs[{i}].{name}", code="text_too_long")
        if p.chosen.strip() == p.rejected.strip():
            raise ApiError(400, f"pairs[{i}]: chosen and rejected are the same text",
                           param=f"pairs[{i}].chosen", code="same_text")


@router.post("/users/{user_id}/feedback", status_code=202, response_model=FeedbackAccepted,
             responses=error_responses(400, 401, 413, 422))
def feedback(user_id: str, body: FeedbackRequest, tenant: Tenant = Depends(current_tenant),
             eng=Depends(engine)):
    uid = tenant.user(user_id)
    _check_pairs(body, eng.settings)
    mem = eng.memory
    # a pair's id is its content (`with_id`): the same pair sent twice is stored once
    pairs = [with_id(PreferencePair(uid, p.prompt, p.chosen, p.rejected)) for p in body.pairs]
    with mem.transaction():  # pairs and their job: durable together, before the 202
        counts = mem.add_pairs(pairs)
        job_id = mem.add_job(tenant.name, uid, list(dict.fromkeys(p.pair_id for p in pairs)))
    if eng.worker is not None:
        eng.worker.notify()
    return FeedbackAccepted(job_id=job_id, status="queued", user_id=user_id, pairs=len(pairs), new_pairs=counts["added"])


@router.get("/jobs/{job_id}", response_model=Job, responses=error_responses(401, 404))
def job(job_id: str, tenant: Tenant = Depends(current_tenant), eng=Depends(engine)):
    j = eng.memory.job(job_id)
    if j is None or j["tenant"] != tenant.name:
        raise ApiError(404, f"job '{job_id}' not found", param="job_id", code="job_not_found")
    ext = j["user_id"] if tenant.name is None else j["user_id"].split("/", 1)[1]
    return Job(job_id=j["job_id"], status=j["status"], user_id=ext, pairs=len(j["pair_ids"]),
               indexed=j["done"], created=j["created"], started=j["started"], finished=j["finished"],
               error=j["error"], result=j["result"])


@router.get("/users/{user_id}/profile", response_model=Profile, responses=error_responses(401, 404, 422))
def profile(user_id: str, tenant: Tenant = Depends(current_tenant), eng=Depends(engine)):
    uid = known_user(eng, tenant, user_id)
    mem = eng.memory
    entries = [ProfileEntry(prompt=e.prompt, pair_id=e.pair_id, attributes=e.attributes, gains=e.gains,
                            objective=e.objective, base_objective=e.base_objective) for e in mem.entries(uid)]
    methods = [{k: v for k, v in s.items()} for s in mem.method_states(uid)]
    return Profile(user_id=user_id, status=mem.user_status(uid), pairs=mem.pair_count(uid), entries=entries,
                   methods=methods, pending_jobs=mem.pending_jobs(uid))


@router.delete("/users/{user_id}", response_model=Deleted, responses=error_responses(401, 404, 422))
def delete(user_id: str, tenant: Tenant = Depends(current_tenant), eng=Depends(engine)):
    uid = known_user(eng, tenant, user_id)
    with eng.user_lock(uid):  # the worker cannot be half way through one of this user's pairs
        rows = eng.memory.delete_user(uid)
    return Deleted(user_id=user_id, rows=rows)
