"""`prefsteer generate`: a personalized answer for a user, from any registered method.

    prefsteer generate --user alice "PROMPT"                   # EXACT: retrieve, inject, generate
    prefsteer generate --method drift --drift-beta 2 --user alice "PROMPT"
    prefsteer generate --method cliper --prefs concise=1,humor=0.5 --alpha 0.5 "PROMPT"
    prefsteer generate --attributes Concise,Humor "PROMPT"     # these attributes, as EXACT injects them
"""

from __future__ import annotations

import argparse
import time

from prefsteer.cli.context import Context
from prefsteer.cli.options import method_parser, reject_other_options
from prefsteer.cli.output import emit
from prefsteer.errors import PrefsteerError


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    from prefsteer.backends.base import GenerationConfig
    from prefsteer.config import add_dataclass_args

    help_ = "generate a personalized answer for a user"
    p = subparsers.add_parser("generate", parents=[*parents, method_parser()], help=help_, description=help_)
    p.set_defaults(func=cmd_generate, writes=False)
    p.add_argument("prompt", help="the user's prompt")
    p.add_argument("--user", help="user id (needed by every method but 'none', and 'cliper' with --prefs)")
    p.add_argument("--attributes", dest="attributes_given", default=None,
                   help="inject these attributes (comma-separated) instead of retrieving them")
    add_dataclass_args(p.add_argument_group("generation"), GenerationConfig)


def cmd_generate(args, ctx: Context) -> int:
    res = run_generate(args, ctx, args.prompt)
    t = res["timings"]
    overhead = t.get("retrieval", 0.0)
    res["timings"]["overhead_pct"] = round(100 * overhead / max(t.get("generation", 0.0), 1e-9), 3)
    emit(args, res, lambda: (f"attributes: {', '.join(res['attributes']) or '(none)'}\n\n{res['text']}\n\n"
                             f"[retrieval + injection {1000 * overhead:.1f} ms, generation "
                             f"{t.get('generation', 0.0):.2f} s, overhead {t['overhead_pct']:.2f}%]"))
    return 0


def generation_config(args):
    from prefsteer.backends.base import GenerationConfig
    from prefsteer.config import dataclass_from_args

    return dataclass_from_args(GenerationConfig, args)


def check_prompt_length(ctx: Context, conversation, config) -> None:
    """Refuse a conversation that leaves the model no room for ``max_new_tokens``."""
    from prefsteer.errors import InputError

    n, limit = ctx.backend.count_tokens(conversation), ctx.backend.max_context
    if n + config.max_new_tokens > limit:
        raise InputError(f"the prompt takes {n} tokens and --max-new-tokens asks for {config.max_new_tokens}: "
                         f"more than the model's context of {limit} tokens", field="prompt")


def run_generate(args, ctx: Context, prompt: str) -> dict:
    from prefsteer.methods.base import NotFittedError

    config = generation_config(args)
    conversation = [{"role": "user", "content": prompt}]
    if args.attributes_given:  # injected as EXACT renders and places them: EXACT's options apply
        reject_other_options(args, "exact")
        exact = ctx.method("exact")  # rendered and placed as EXACT's options say (--render, --placement, ...)
        attrs = list(exact.library.canonical(a for a in args.attributes_given.split(",") if a.strip()))
        msgs = exact.attribute_messages(conversation, attrs)
        check_prompt_length(ctx, msgs, config)
        start = time.perf_counter()
        g = ctx.backend.generate([msgs], config)[0]
        return {"method": "attributes", "user_id": args.user, "attributes": attrs, "text": g.text,
                "timings": {"retrieval": 0.0, "generation": time.perf_counter() - start},
                **exact.context_info(msgs)}
    reject_other_options(args, args.method)
    check_prompt_length(ctx, conversation, config)
    method = ctx.method(args.method)
    if args.user and method.per_user:
        ctx.memory.require_user(args.user)
    method.warm_up()  # load once: per-request overhead is what is timed
    try:
        out = method.generate(args.user, [conversation], config)[0]
    except NotFittedError as e:
        if e.user_id is None:
            raise PrefsteerError(f"--method {args.method} needs --user (or, for cliper, --prefs)") from None
        raise
    return {"method": args.method, "user_id": args.user, "attributes": out.attributes, "text": out.text,
            "timings": out.timings, **out.extra}
