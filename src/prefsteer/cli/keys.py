"""`prefsteer keys create|list|revoke`: API keys of the service, each bound to one tenant.

    prefsteer keys create --tenant acme --json     # {"key": "ps-...", "key_id": ..., "tenant": "acme"}
    prefsteer keys list
    prefsteer keys revoke KEY_ID

The key is printed once; the database keeps only its sha256.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = "create, list and revoke the service's API keys (each bound to a tenant)"
    top = subparsers.add_parser("keys", help=help_, description=help_)
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True, help="create, list or revoke")
    p = sub.add_parser("create", parents=parents, help="create a key for a tenant (printed once)")
    p.add_argument("--tenant", required=True, help="the tenant the key acts for")
    p.set_defaults(func=cmd_keys, writes=True)
    p = sub.add_parser("list", parents=parents, help="list the keys (ids and tenants, never the keys)")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("revoke", parents=parents, help="revoke a key by its id")
    p.add_argument("key_id", help="the key's id (from `keys list`)")
    p.set_defaults(func=cmd_keys, writes=True)


def cmd_keys(args, ctx) -> int:
    from prefsteer.errors import PrefsteerError
    from prefsteer.service import store

    mem = ctx.memory
    if args.action == "create":
        try:
            out = mem.create_key(store.check_tenant(args.tenant))
        except ValueError as e:
            raise PrefsteerError(str(e)) from None
        text = (f"{out['key']}\n(key {out['key_id']} for tenant {out['tenant']}; shown once, only its hash "
                f"is stored in {mem.path})")
    elif args.action == "list":
        out = {"keys": mem.list_keys()}
        text = "\n".join(f"{k['key_id']}  tenant {k['tenant']}{'  (revoked)' if k['revoked'] else ''}"
                         for k in out["keys"]) or "no keys"
    else:
        if not mem.revoke_key(args.key_id):
            raise PrefsteerError(f"no active key with id '{args.key_id}' (see `prefsteer keys list`)")
        out = {"revoked": args.key_id}
        text = f"revoked {args.key_id}"
    print(json.dumps(out, indent=2) if args.json else text)
    return 0
