"""The service's names: tenants, users, and how a tenant's user is kept in the memory.

Keys and jobs are kept by the storage contract (`prefsteer.storage.Memory`: ``create_key``,
``claim_job``, ...); this module holds only the rules for names.

    >>> internal_user("acme", "alice")
    'acme/alice'
"""

from __future__ import annotations

import re

# tenants and user ids: no '/', so "<tenant>/<user>" never collides with another tenant's user;
# \Z, not $: a trailing newline is not part of a valid name
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 . _ @ -, starting with a letter or digit"


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not NAME.match(tenant):
        raise ValueError(f"tenant {tenant!r}: use {NAME_RULE}")
    return tenant


def internal_user(tenant: str | None, user_id: str) -> str:
    """The memory's id of a tenant's user; ``tenant=None`` (no-auth on loopback) is the local
    namespace that the `prefsteer` CLI uses too."""
    return user_id if tenant is None else f"{tenant}/{user_id}"
