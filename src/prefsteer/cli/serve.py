"""`prefsteer serve`: the OpenAI-compatible personalization service (FastAPI + uvicorn).

    prefsteer serve                                        # 127.0.0.1:8000, the embedded model, keys required
    prefsteer serve --backend fake --embedder hash --no-auth --port 8123    # a toy model, for tests
    prefsteer keys create --tenant acme                    # a key for the tenant "acme"

The model is loaded once at start; the URL is logged when the server answers. Every option can
also be set in the environment (`ENVIRONMENT`), as a container's configuration usually is:

    PREFSTEER_PORT=8123 PREFSTEER_NO_AUTH=1 PREFSTEER_LOG_FORMAT=json prefsteer serve --backend fake
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Mapping

from prefsteer.cli.options import CLI_DEFAULTS, method_options, method_parser

ENV_PREFIX = "PREFSTEER_"
ENVIRONMENT = (
    "Every option can also be set in the environment as PREFSTEER_<OPTION>: the option's long name in "
    "capitals, dashes as underscores (--max-body-bytes 4096: PREFSTEER_MAX_BODY_BYTES=4096; a flag: "
    "PREFSTEER_NO_AUTH=1, or 0; a list: words separated by spaces). The command line wins over the "
    "environment; a value that is not valid names its variable and exits with status 2. --db, --model, "
    "--backend, --dtype and --matmul-precision read theirs (PREFSTEER_DB, ...) in every command.")
# common options that are no setting of the service, and those that read the environment already
_NOT_FROM_ENV = {"help", "json", "quiet", "verbose", "db", "model", "backend", "dtype", "matmul_precision"}
_LIMITS = ("default_max_tokens", "max_tokens_limit", "max_prompt_chars", "max_pairs_per_request", "max_text_chars")
_EDGE = ("max_body_bytes", "body_read_timeout", "rate_limit", "rate_burst")
_ADMISSION = ("max_batch_rows", "max_waiting")
_QUEUE = ("job_lease_seconds",)


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from prefsteer.service.app import Settings

    help_ = "serve OpenAI-compatible personalized chat, feedback, profiles and deletion over HTTP"
    p = subparsers.add_parser("serve", parents=parents, help=help_, description=help_, epilog=ENVIRONMENT)
    shared = {id(a) for parent in parents for a in parent._actions}
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept requests without an API key (only on a loopback address); they act on "
                        "the local users, the ones the other commands see")
    p.add_argument("--model-id", default=None, help="the model name /v1/models lists (default: the model's)")
    fields = {f.name: f for f in dataclasses.fields(Settings)}

    def setting(group, name: str) -> None:
        f = fields[name]
        group.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f"{f.metadata['help']} (default: {f.default})")

    for name in _LIMITS:
        setting(p, name)
    g = p.add_argument_group(
        "admission", "Concurrent answers are decoded together, one batch row each (a Drift answer takes 1 + "
        "its branches); a request waits while the batch is full, and is refused with 503 and Retry-After "
        "when the waiting requests are at their bound too.")
    for name in _ADMISSION:
        setting(g, name)
    g = p.add_argument_group(
        "edge", "Checked before any route runs: the body's size as it is read and the time it takes, a "
        "rate limit per client (429 with Retry-After), one Authorization header, and without keys a Host "
        "that is a loopback name. GET /health (alive), /ready (model loaded, database answering) and "
        "/metrics (Prometheus) need no key and are never rate limited.")
    for name in _EDGE:
        setting(g, name)
    g = p.add_argument_group(
        "feedback queue", "Feedback is indexed by a worker in every replica, from one queue in the database: "
        "a job is leased to one replica, which renews the lease while it works; a replica that stops "
        "renewing (killed) loses the job to another once the lease runs out. Tenants take turns.")
    for name in _QUEUE:
        setting(g, name)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="log lines as text or as JSON objects (time, level, logger, message, request_id), "
                        "uvicorn's access log included (default: text)")
    # every method's options, as `index` takes them: a user indexed with --drift-beta 2 is served
    # with it; --method is the method that answers a user when a request names none
    for action in method_parser()._actions:
        p._add_action(action)
    # the environment's values are read when serving (`apply_environment`), not when parsing: an
    # option not given on the command line is left unset (serve's own options, whose defaults are
    # kept here) or None (the common ones)
    env_options = []
    for action in p._actions:
        if not action.option_strings or action.dest in _NOT_FROM_ENV:
            continue
        if id(action) in shared:
            env_options.append((action, None, True))
        else:
            env_options.append((action, action.default, False))
            action.default = argparse.SUPPRESS
    p.set_defaults(func=cmd_serve, writes=True, env_options=tuple(env_options))


def env_name(action: argparse.Action) -> str:
    """``--max-body-bytes`` -> ``PREFSTEER_MAX_BODY_BYTES`` (``--describe/--no-describe``: ``PREFSTEER_DESCRIBE``)."""
    flag = next(o for o in action.option_strings if o.startswith("--"))
    return ENV_PREFIX + flag[2:].replace("-", "_").upper()


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_KINDS = {int: "an integer", float: "a number"}


def _env_value(action: argparse.Action, var: str, text: str) -> Any:
    """The value of ``action``'s option given as ``text`` in the variable ``var``: an `InputError`
    naming the variable when it is not valid."""
    from prefsteer.errors import InputError

    flag = next(o for o in action.option_strings if o.startswith("--"))

    def bad(expected: str) -> InputError:
        return InputError(f"{text!r} is not a valid value for {flag}: expected {expected}", field=var)

    if action.nargs == 0:  # a flag (--no-auth, --describe)
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise bad("1, true, yes, on or 0, false, no, off")
        return word in _TRUE
    convert = action.type or str
    try:
        value = [convert(w) for w in text.split()] if action.nargs in ("+", "*") else convert(text)
    except argparse.ArgumentTypeError as e:
        raise bad(str(e).removeprefix("expected ")) from None
    except (ValueError, TypeError):
        raise bad(_KINDS.get(convert, getattr(convert, "__name__", "another value"))) from None
    for v in value if isinstance(value, list) else [value]:
        if action.choices is not None and v not in action.choices:
            raise bad("one of " + ", ".join(map(str, action.choices)))
    return value


def apply_environment(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fill the options not given on the command line from ``PREFSTEER_<OPTION>`` (else their
    defaults); returns {dest: variable} of those the environment set. Idempotent."""
    environ = os.environ if environ is None else environ
    from_env = dict(getattr(args, "from_env", {}))
    for action, default, shared in getattr(args, "env_options", ()):
        given = getattr(args, action.dest, None) is not None if shared else hasattr(args, action.dest)
        if given:
            continue
        var = env_name(action)
        if var in environ:
            setattr(args, action.dest, _env_value(action, var, environ[var]))
            from_env[action.dest] = var
        elif default is not argparse.SUPPRESS and not shared:
            setattr(args, action.dest, default)
    args.from_env = from_env
    return from_env


def settings_from_args(args, ctx):
    from prefsteer.methods import available_methods
    from prefsteer.methods.registry import method_config
    from prefsteer.service.app import Settings

    apply_environment(args)
    options = {name: method_options(args, name) for name in available_methods()}
    # EXACT's options, with the command line's default preset (the product's; --preset paper: the paper's)
    exact = dataclasses.asdict(method_config("exact", options["exact"], CLI_DEFAULTS))
    return Settings(
        db=ctx.memory.db, backend=args.backend, model=getattr(args, "model", None),
        embedder=getattr(args, "embedder", None), attributes=getattr(args, "attributes", None),
        host=args.host, auth=not args.no_auth, model_id=args.model_id, exact=exact,
        default_method=args.method, method_options={n: o for n, o in options.items() if o},
        **{n: getattr(args, n) for n in (*_LIMITS, *_ADMISSION, *_EDGE, *_QUEUE)},
        make_backend=lambda: ctx.backend, make_embedder=lambda: ctx.embedder)


def cmd_serve(args, ctx) -> int:
    import logging.config

    import uvicorn

    from prefsteer.errors import PrefsteerError
    from prefsteer.service.app import create_app
    from prefsteer.service.logs import log_config

    try:
        settings = settings_from_args(args, ctx)
    except PrefsteerError:  # a bad value in the environment, named
        raise
    except ValueError as e:  # --no-auth off loopback, a bad limit: the variable named when it came from there
        given = [f"${var}" for dest, var in args.from_env.items() if f"`{dest}`" in str(e) or
                 (dest in ("no_auth", "host") and "loopback" in str(e))]
        raise PrefsteerError(str(e) + (f" (set by {', '.join(given)})" if given else "")) from None
    if "embedder" in args.from_env:
        from prefsteer.retrieval import check_embedder

        check_embedder(args.embedder)  # as the command line's is, before the model loads
    app = create_app(settings)
    # one configuration for our lines, uvicorn's and its access log: text or JSON, with request ids
    logging.config.dictConfig(log_config(args.log_format, args.log_level, "INFO" if args.verbose else "WARNING"))
    host = f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger("prefsteer.service").info(
        "loading the %s model, then serving http://%s:%s/v1 (%s; db %s)", args.backend, host, args.port,
        "no auth, loopback only" if args.no_auth else "API keys required", ctx.memory.path)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30,
                log_config=None)
    return 0
