"""API keys and tenants: `current_tenant` is the dependency every /v1 route takes.

A key is ``ps-`` + 32 random bytes (url-safe base64), made by `prefsteer keys create --tenant T`;
the database keeps only its sha256 (`prefsteer.storage.hash_key`). A request without a valid key is a 401.
With ``--no-auth`` (allowed only on a loopback address) a request without a key acts in the local
namespace, the one the `prefsteer` CLI uses; a valid key still selects its tenant.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastapi import Depends, Request

from prefsteer.service import store
from prefsteer.service.errors import ApiError, not_found_user


@dataclass(frozen=True)
class Tenant:
    name: str | None  # None: the local namespace (no-auth)

    def user(self, user_id: str) -> str:
        """The memory's id of this tenant's ``user_id``, after checking the id's format (422)."""
        check_user_id(user_id)
        return store.internal_user(self.name, user_id)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_user_id(user_id: str) -> None:
    # fullmatch: `$` in the pattern also matches before a final newline ("nl\n" would pass .match)
    if not isinstance(user_id, str) or not store.NAME.fullmatch(user_id):
        raise ApiError(422, f"user id {user_id!r} does not match the user id format: {store.NAME_RULE}",
                       param="user_id", code="invalid_user_id")


def engine(request: Request):
    return request.app.state.engine


def current_tenant(request: Request, eng=Depends(engine)) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if token:
        name = eng.memory.tenant_of(token)
        if name is not None:
            request.state.api_key_accepted = True  # the edge's rate limit: this key gets its own bucket
            return Tenant(name)
    if not eng.settings.auth:
        return Tenant(None)
    raise ApiError(401, "Incorrect API key provided. Send `Authorization: Bearer KEY` with a key from "
                        "`prefsteer keys create --tenant T`." if token else
                   "Missing API key: send `Authorization: Bearer KEY` (`prefsteer keys create --tenant T`).",
                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def known_user(eng, tenant: Tenant, user_id: str) -> str:
    """The internal id of the tenant's existing user, else the 404 that says nothing about others."""
    uid = tenant.user(user_id)
    if not eng.memory.has_user(uid):
        raise not_found_user(user_id)
    return uid
