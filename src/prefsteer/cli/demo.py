"""`prefsteer demo`: the main job on the embedded default model: index a small demo set of users,
show what was learned about each and a personalized answer beside the plain one.

    prefsteer demo
    prefsteer demo --prompt "How do I learn to cook?" --preset paper --json
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from prefsteer.cli.context import Context
from prefsteer.cli.options import method_parser
from prefsteer.cli.output import emit
from prefsteer.cli.profile import profile_text
from prefsteer.errors import PrefsteerError


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    help_ = "the main job: index a small demo set, show profiles and a personalized answer beside the plain one"
    p = subparsers.add_parser("demo", parents=[*parents, method_parser()], help=help_, description=help_)
    p.set_defaults(func=cmd_demo, writes=True)
    p.add_argument("--prompt", default="How do I cook pasta?",
                   help="the new prompt answered for each demo user (EXACT injects the attributes of the "
                        "user's most similar past prompt: the default resembles one of the demo's)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens generated per answer")
    p.add_argument("--measure-prompts", type=int, default=6,
                   help="prompts the effect on each user is measured on: the demo's and the known-answer "
                        "suite's first new ones (default 6)")


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
