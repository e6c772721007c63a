"""`prefsteer eval`, with its subcommands `report` and `compare`.

    prefsteer eval --config quick --json                       # one JSON object; `accuracy` per method
    prefsteer eval --config paper --methods none base exact --seeds 0 --out results/paper
    prefsteer eval report results/paper                        # report.md + PNGs in the run directory
    prefsteer eval compare results/paper results/paper-screened   # how far two runs' selections agree
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """``eval`` (run a configuration), ``eval report RUN_DIR`` and ``eval compare REF OTHER``."""
    from prefsteer.evaluation.protocol import available_configs

    p = subparsers.add_parser("eval", parents=parents, help="run an evaluation configuration (EXACT §6)",
                              description=f"Run a named configuration ({', '.join(available_configs())}) or a "
                                          "JSON file; `eval report RUN_DIR` writes Markdown tables and PNG plots; "
                                          "`eval compare REF OTHER` says how far two runs' EXACT selections agree.")
    p.add_argument("--config", default="quick", help="configuration name or JSON path (default: quick)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only these method labels of the configuration (or registered method names)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="override the configuration's seeds")
    p.add_argument("--out", default=None, help="run directory (default: ~/.cache/prefsteer/eval/<config>-<model>)")
    p.add_argument("--winrate", action=argparse.BooleanOptionalAction, default=None,
                   help="generate and judge against Base (default: as the configuration says)")
    p.add_argument("--table7", action=argparse.BooleanOptionalAction, default=None,
                   help="run the greedy-vs-exhaustive study (default: as the configuration says)")
    p.add_argument("--judge", default="local", choices=["local", "openai"],
                   help="win-rate judge: the evaluation's own model, or an OpenAI-compatible endpoint")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (…/v1)")
    p.add_argument("--judge-model", default=None, help="model name at the judge endpoint")
    p.add_argument("--judge-pairs", type=int, default=None,
                   help="training pairs shown to the win-rate judge at most, 0: all (default: the "
                        "configuration's winrate.judge_pairs, 10)")
    p.add_argument("--judge-chars", type=int, default=None,
                   help="characters of history shown to the win-rate judge at most, 0: no limit (default: "
                        "the configuration's winrate.judge_chars, 6000)")
    p.add_argument("--max-records", type=int, default=None, help="stop after this many new records")
    p.add_argument("--run-db", default=None,
                   help="where the run keeps its selections, entries and score cache: a SQLite file or a "
                        "postgresql:// URL (default: memory.sqlite in the run directory)")
    p.add_argument("--report", action="store_true", help="also write the report into the run directory")
    p.add_argument("--n-prompts", type=int, default=None,
                   help="known-answer configurations: new prompts per style (default: the configuration's)")
    p.set_defaults(func=cmd_eval)
    actions = p.add_subparsers(dest="eval_command", metavar="report|compare", required=False,
                               help="instead of running: `report RUN_DIR` or `compare REF OTHER`")

    r = actions.add_parser("report", parents=parents, help="write Markdown tables and PNGs for a run",
                           description="write Markdown tables and PNGs for an evaluation run")
    r.add_argument("run_dir", help="a run directory (holding records.jsonl)")
    r.add_argument("--out", default=None, help="where to write (default: the run directory)")
    r.set_defaults(func=cmd_report)

    c = actions.add_parser("compare", parents=parents, help="how far two runs' EXACT selections agree",
                           description="compare two runs' selections (run directories or selections files) "
                                       "pair by pair")
    c.add_argument("ref", help="the reference run directory or selections file")
    c.add_argument("other", help="the other run directory or selections file")
    c.add_argument("--ref-config", default=None,
                   help="the reference's search configuration (config_id), when it holds several")
    c.add_argument("--other-config", default=None,
                   help="the other side's search configuration (config_id), when it holds several")
    c.set_defaults(func=cmd_compare)


def default_out(config_name: str, fingerprint: str) -> Path:
    from prefsteer.paths import eval_run_dir

    return eval_run_dir(config_name, fingerprint)


def cmd_report(args, ctx) -> int:
    from prefsteer.evaluation.report import write_report

    path = write_report(args.run_dir, getattr(args, "out", None))
    if args.json:
        print(json.dumps({"report": str(path), "files": sorted(str(p) for p in path.parent.glob("*.png"))}))
    else:
        print(f"wrote {path}")
    return 0


def cmd_compare(args, ctx=None) -> int:
    from prefsteer.evaluation.compare import compare_selections, format_comparison, load_side

    result = compare_selections(load_side(args.ref, args.ref_config), load_side(args.other, args.other_config))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_comparison(result, args.ref, args.other))
    return 0


def cmd_eval(args, ctx) -> int:
    from prefsteer.evaluation.judge import OpenAIJudge
    from prefsteer.evaluation.protocol import load_config
    from prefsteer.evaluation.runner import Runner
    from prefsteer.evaluation import known_answer

    if known_answer.is_known_answer(args.config):  # its own protocol: evaluation/known_answer.py
        return cmd_known_answer(args, ctx)
    config = load_config(args.config)
    caps = {k: v for k, v in (("judge_pairs", args.judge_pairs), ("judge_chars", args.judge_chars)) if v is not None}
    if caps:  # validated as the configuration's own fields are; the records' config_json carries it
        import dataclasses

        config.winrate = dataclasses.replace(config.winrate, **caps)
    for spec in config.methods:  # an unknown method or option stops the run before the model loads
        spec.check()
    judge = None
    if args.judge == "openai":
        judge = OpenAIJudge(args.judge_url or "", args.judge_model or "",
                            max_pairs=config.winrate.judge_pairs, max_chars=config.winrate.judge_chars)
    backend = ctx.backend
    out = Path(args.out) if args.out else default_out(config.name, backend.fingerprint)
    runner = Runner(config, backend, out, embedder=ctx.embedder, methods=args.methods, seeds=args.seeds,
                    judge=judge, winrate=args.winrate, table7=args.table7, progress=not args.quiet,
                    db=args.run_db)
    summary = runner.run(max_records=args.max_records)
    if args.report:
        from prefsteer.evaluation.report import write_report

        summary["report"] = str(write_report(out))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{config.name}: {summary['records']} records in {out} "
              f"({summary['new_records']} new, {summary['elapsed_seconds']:.0f}s)")
        for m in summary["methods"]:
            std = summary["accuracy_std"][m]
            line = f"  {m:<16} accuracy {100 * summary['accuracy'][m]:6.2f}" + \
                   (f" ± {100 * std:.2f}" if std is not None else "")
            if m in summary.get("winrate", {}):
                line += f"   win-rate vs {config.winrate.reference} {100 * summary['winrate'][m]:.1f}"
            print(line)
    return 0


def cmd_known_answer(args, ctx) -> int:
    """`prefsteer eval --config known-answer` (``--n-prompts`` for fewer new prompts)."""
    from prefsteer.evaluation import known_answer

    cfg = known_answer.load_ka_config(args.config)
    out = Path(args.out) if args.out else default_out(cfg["name"], ctx.backend.fingerprint)
    say = (lambda s: None) if args.json else print
    summary = known_answer.run(ctx.backend, cfg, out, embedder=ctx.embedder, n_prompts=args.n_prompts,
                               variants=args.methods, progress=not args.quiet, log=say)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print((out / known_answer.TABLE).read_text())
        for v, eff in summary["effects"].items():
            for user, e in eff.items():
                print(f"{v}: {known_answer.effect_line(user, e)}")
        for v, eff in summary["oracle"].items():
            for user, e in eff.items():
                print(f"{v}, target injected: {known_answer.effect_line(user, e)}")
    return 0
