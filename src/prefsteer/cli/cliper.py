"""``prefsteer cliper train | calibrate | eval``: CLIPer's offline jobs.

    prefsteer cliper train --prefs concise,humor,formal,empathetic,helpful --out DIR
    prefsteer cliper calibrate --prefs concise,humor --plot results/cliper/calibration.png
    prefsteer cliper eval --n-prompts 50 --out results/cliper

The main parser calls :func:`add_parser` (``subparsers``, and the parent parsers holding the common
options ``--json``, ``--model``, ``--backend``, ...); each command is one function
``run_<name>(args, ctx)``. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("prefsteer.cliper")


def add_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``cliper {train,calibrate,eval}`` to the main parser's ``subparsers``; ``parents`` hold
    the common options. Calibration's and evaluation's options are their config dataclasses'."""
    from prefsteer.cli.options import add_field_option
    from prefsteer.evaluation.cliper_calibrate import ALL_PREFS, CalibrationConfig
    from prefsteer.evaluation.cliper_eval import CliperEvalConfig

    top = subparsers.add_parser("cliper", help="CLIPer: train preference classifiers, calibrate alpha, evaluate",
                                description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="cliper_command", metavar="SUBCOMMAND", required=True,
                             help="train, calibrate or eval")

    p = sub.add_parser("train", parents=parents, help="generate training answers with the base model and "
                       "train one classifier per preference", description=run_train.__doc__)
    p.add_argument("--prefs", default=ALL_PREFS, help=f"preferences to train (default: {ALL_PREFS})")
    p.add_argument("--data", default=None, help="TL;DR comparisons (default: ../shared/data/tldr/batch13.json)")
    p.add_argument("--n-prompts", type=int, default=64, help="training prompts (posts of the 'train' split)")
    p.add_argument("--max-new-tokens", type=int, default=60, help="tokens per generated answer")
    p.add_argument("--batch-size", type=int, default=8, help="answers generated together")
    p.add_argument("--rank", type=int, default=16, help="rank of the bilinear term of each head")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--out", default=None, help="where to save the classifiers (default: the user "
                   "classifier directory, $PREFSTEER_CLIPER_DIR or ~/.cache/prefsteer/cliper/<model>)")
    p.add_argument("--data-file", default=None, help="JSONL cache of the generated answers (reused when "
                   "model and prompts match; default: <out>/training-answers.jsonl)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("calibrate", parents=parents, help="pick alpha on held-out prompts: the largest gain "
                       "in preference strength with perplexity within a bound of plain decoding",
                       description=run_calibrate.__doc__)
    for name in ("prefs", "alphas", "ppl_bound", "n_prompts", "max_new_tokens", "top_k", "data"):
        add_field_option(p, CalibrationConfig, name)
    add_field_option(p, CalibrationConfig, "classifiers", action="append")
    p.add_argument("--plot", default=None, help="write the curve as a PNG here")
    p.add_argument("--out", default=None, help="write the curve and the choice as JSON here")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("eval", parents=parents, help="strength, fluency and distinctness of guided "
                       "decoding against plain decoding and prompt injection", description=run_eval.__doc__)
    for name in ("n_prompts", "max_new_tokens", "alpha", "top_k", "batch_size", "data"):
        add_field_option(p, CliperEvalConfig, name)
    add_field_option(p, CliperEvalConfig, "classifiers", action="append")
    for name in ("conditions", "generate_only", "score_only", "cache"):
        add_field_option(p, CliperEvalConfig, name)
    p.add_argument("--out", default=None, help="directory for eval.json and eval.md")
    p.set_defaults(func=run_eval)


def _emit(args, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2))
    else:
        print(text)


def run_train(args, ctx) -> int:
    """Train CLIPer's preference classifiers for the model: the base model answers training prompts
    built from TL;DR posts plainly and with each preference's instruction; a head on the model's
    hidden state and the candidate token's embedding learns to tell them apart."""
    from pathlib import Path

    from prefsteer.methods.cliper.heads import fingerprint_slug, user_classifier_dir
    from prefsteer.methods.cliper.data import default_tldr_path, tldr_prompts
    from prefsteer.methods.cliper.prefs import parse_prefs
    from prefsteer.methods.cliper.train import TrainConfig, train_preferences

    prefs = list(parse_prefs(args.prefs, allow_personal=False))
    backend = ctx.backend
    out = Path(args.out) if args.out else user_classifier_dir() / fingerprint_slug(backend.fingerprint)
    data_file = Path(args.data_file) if args.data_file else out / "training-answers.jsonl"
    rows = tldr_prompts("train", args.n_prompts, args.data)
    source = f"TL;DR posts ({Path(args.data or default_tldr_path()).name}, 'train' split by post-id hash, " \
             f"{len(rows)} posts: {', '.join(r['post_id'] for r in rows)})"
    res = train_preferences(backend, [r["prompt"] for r in rows], prefs, out_dir=out, data_file=data_file,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            cfg=TrainConfig(rank=args.rank, steps=args.steps), source=source,
                            progress=True)
    lines = [f"classifiers for {backend.fingerprint} in {out}",
             "| preference | val. answer acc. | val. token acc. | train answer acc. |", "|---|---|---|---|"]
    for p, r in res.items():
        v, t = r["metrics"].get("validation", {}), r["metrics"].get("train", {})
        lines.append(f"| {p} | {v.get('answer_accuracy')} | {v.get('token_accuracy')} | {t.get('answer_accuracy')} |")
    _emit(args, {"fingerprint": backend.fingerprint, "out": str(out), "classifiers": res}, "\n".join(lines))
    return 0


def run_calibrate(args, ctx) -> int:
    """Pick CLIPer's guidance strength alpha on held-out prompts: for each alpha of the grid, guide
    each preference alone and measure its strength (the log-likelihood ratio per token of the answer
    with and without a line stating the preference, under the base model) and the base model's
    perplexity of the answer; the choice is the alpha with the largest mean gain over alpha = 0
    whose perplexity stays within --ppl-bound times plain decoding's."""
    from prefsteer.config import dataclass_from_args
    from prefsteer.evaluation.cliper_calibrate import CalibrationConfig, calibrate, format_curve, plot_curve

    backend = ctx.backend
    res = calibrate(backend, dataclass_from_args(CalibrationConfig, args))
    if args.plot:
        plot_curve(res, args.plot)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", "utf-8")
    _emit(args, res, format_curve(res))
    return 0


def run_eval(args, ctx) -> int:
    """Evaluate CLIPer on held-out TL;DR prompts: each single preference and the pairs concise+humor
    and helpful+humor, against plain decoding and prompt injection of the same attributes; strength
    by scorers that did not train the classifiers (length for conciseness; the base model's
    log-likelihood ratio with and without a line stating the preference for the others), fluency (perplexity
    under the base model) and distinctness (distinct-2, repeated 4-grams)."""
    from prefsteer.config import dataclass_from_args
    from prefsteer.evaluation.cliper_eval import CliperEvalConfig, evaluate, format_table

    backend = ctx.backend
    res = evaluate(backend, dataclass_from_args(CliperEvalConfig, args))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(res, indent=2) + "\n", "utf-8")
        (out / "eval.md").write_text(format_table(res) + "\n", "utf-8")
    _emit(args, res, format_table(res))
    return 0
