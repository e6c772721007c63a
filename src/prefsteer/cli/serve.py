"""`prefsteer serve`: the OpenAI-compatible personalization service (FastAPI + uvicorn).

    prefsteer serve                                        # 127.0.0.1:8000, the embedded model, keys required
    prefsteer serve --backend fake --embedder hash --no-auth --port 8123    # a toy model, for tests
    prefsteer keys create --tenant acme                    # a key for the tenant "acme"

The model is loaded once at start; the URL is logged when the server answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from prefsteer.cli.options import CLI_DEFAULTS, method_options, method_parser

def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from prefsteer.service.app import Settings

    help_ = "serve OpenAI-compatible personalized chat, feedback, profiles and deletion over HTTP"
    p = subparsers.add_parser("serve", parents=parents, help=help_, description=help_)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept requests without an API key (only on a loopback address); they act on "
                        "the local users, the ones the other commands see")
    p.add_argument("--model-id", default=None, help="the model name /v1/models lists (default: the model's)")
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for name in ("default_max_tokens", "max_tokens_limit", "max_prompt_chars", "max_pairs_per_request",
                 "max_text_chars", "max_body_bytes"):
        f = next(f for f in dataclasses.fields(Settings) if f.name == name)
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name],
                       help=f"{f.metadata['help']} (default: {defaults[name]})")
    g = p.add_argument_group(
        "admission", "Concurrent answers are decoded together, one batch row each (a Drift answer takes 1 + "
        "its branches); a request waits while the batch is full, and is refused with 503 and Retry-After "
        "when the waiting requests are at their bound too.")
    for name in ("max_batch_rows", "max_waiting"):
        f = next(f for f in dataclasses.fields(Settings) if f.name == name)
        g.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name],
                       help=f"{f.metadata['help']} (default: {defaults[name]})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    # every method's options, as `index` takes them: a user indexed with --drift-beta 2 is served
    # with it; --method is the method that answers a user when a request names none
    for action in method_parser()._actions:
        p._add_action(action)
    p.set_defaults(func=cmd_serve, writes=True)


def settings_from_args(args, ctx):
    from prefsteer.methods import available_methods
    from prefsteer.methods.registry import method_config
    from prefsteer.service.app import Settings

    options = {name: method_options(args, name) for name in available_methods()}
    # EXACT's options, with the command line's default preset (the product's; --preset paper: the paper's)
    exact = dataclasses.asdict(method_config("exact", options["exact"], CLI_DEFAULTS))
    return Settings(
        db=ctx.memory.path, backend=args.backend, model=getattr(args, "model", None),
        embedder=getattr(args, "embedder", None), attributes=getattr(args, "attributes", None),
        host=args.host, auth=not args.no_auth, model_id=args.model_id, exact=exact,
        default_method=args.method, method_options={n: o for n, o in options.items() if o},
        **{n: getattr(args, n) for n in ("default_max_tokens", "max_tokens_limit", "max_prompt_chars",
                                         "max_pairs_per_request", "max_text_chars", "max_body_bytes",
                                         "max_batch_rows", "max_waiting")},
        make_backend=lambda: ctx.backend, make_embedder=lambda: ctx.embedder)


def cmd_serve(args, ctx) -> int:
    import logging

    import uvicorn

    from prefsteer.errors import PrefsteerError
    from prefsteer.service.app import create_app

    try:
        settings = settings_from_args(args, ctx)
    except ValueError as e:  # --no-auth off loopback, a bad limit
        raise PrefsteerError(str(e)) from None
    logging.getLogger("prefsteer.service").setLevel(logging.INFO)
    app = create_app(settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"prefsteer serve: loading {args.backend} model, then serving http://{host}:{args.port}/v1 "
          f"({'no auth, loopback only' if args.no_auth else 'API keys required'}; db {settings.db})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0
