"""Evaluation of CLIPer against plain decoding and prompt injection, with scorers it was not trained on.

For each preference alone and for the pairs concise+humor and helpful+humor, on held-out TL;DR
prompts ('eval' split), three ways of answering: ``plain`` decoding, ``inject`` (EXACT-style: the
attributes with their descriptions appended to the user's turn) and ``cliper`` (guided decoding).

* strength of conciseness: the answer's length in tokens (lower is more concise);
* strength of the other preferences: the base model's log-likelihood ratio per token of the answer
  with and without a line stating the preference after the prompt ("(Your answer should be
  <description>.)") — a wording used neither by the classifiers' training data (an imperative
  instruction) nor by the injection baseline (an ``Attributes: <...>`` line). After the prompt, not
  in a system prompt, so every context of one prompt shares the prompt's computation;
* fluency: the base model's perplexity of the answer under the plain prompt;
* distinctness: distinct-2 (unique token bigrams / bigrams) and the share of repeated 4-grams.

Generated answers are cached in ``<cache>/answers.jsonl`` keyed by condition, so the job can run in
pieces (``--conditions``) and resume.

    >>> res = evaluate(backend, CliperEvalConfig(n_prompts=8, conditions="plain,cliper:concise"))  # doctest: +SKIP
    >>> print(format_table(res))                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prefsteer.paths import cliper_answers_dir

log = logging.getLogger(__name__)


@dataclass
class CliperEvalConfig:
    """What `evaluate` runs (``prefsteer cliper eval``'s options)."""
    n_prompts: int = field(default=50, metadata={"help": "prompts ('eval' split of the TL;DR posts)"})
    max_new_tokens: int = field(default=60, metadata={"help": "tokens per answer"})
    alpha: float | None = field(default=None, metadata={
        "help": "guidance strength (default: the calibrated one)"})
    top_k: int = field(default=20, metadata={"help": "candidates re-scored per step"})
    batch_size: int = field(default=8, metadata={"help": "answers generated together"})
    data: str | None = field(default=None, metadata={
        "help": "TL;DR comparisons (default: ../shared/data/tldr/batch13.json)"})
    classifiers: list[str] | None = field(default=None, metadata={"help": "extra classifier directory"})
    conditions: str | None = field(default=None, metadata={
        "help": "only generate these conditions (comma-separated keys such as plain, inject, cliper, "
                "cliper:concise+humor); the answers are cached"})
    generate_only: bool = field(default=False, metadata={"help": "generate (and cache) answers, no scoring"})
    score_only: bool = field(default=False, metadata={"help": "score the cached answers, generate nothing"})
    cache: str | None = field(default=None, metadata={
        "help": "answer cache directory (default ~/.cache/prefsteer/cliper-eval)"})

SINGLES = ["concise", "humor", "formal", "empathetic", "helpful"]
PAIRS = ["concise+humor", "helpful+humor"]


def attribute_line(prefs: Sequence[str]) -> str:
    """``Attributes: <Concise (short and to the point, no filler), ...>`` as ``inject(describe=True)``
    renders it, with the library's descriptions where the library has the attribute."""
    from prefsteer.attributes import load_library
    from prefsteer.methods.cliper.prefs import PREFERENCES

    lib = load_library()
    items = []
    for p in prefs:
        attr = PREFERENCES[p].attribute
        if "(" in attr:
            items.append(attr)
        else:
            a = lib.get(attr)
            items.append(f"{a.name} ({a.description})")
    return f"Attributes: <{', '.join(items)}>"


def scorer_line(pref: str) -> str:
    from prefsteer.methods.cliper.prefs import PREFERENCES

    return f"(Your answer should be {PREFERENCES[pref].description}.)"


def conditions() -> list[tuple[str, str, list[str]]]:
    """(key, method, prefs) of every condition."""
    out = [("plain", "plain", [])]
    for spec in SINGLES + PAIRS:
        prefs = spec.split("+")
        out += [(f"inject:{spec}", "inject", prefs), (f"cliper:{spec}", "cliper", prefs)]
    return out


def distinct2(ids: Sequence[int]) -> float:
    bigrams = list(zip(ids, ids[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def repeated4(ids: Sequence[int]) -> float:
    grams = list(zip(ids, ids[1:], ids[2:], ids[3:]))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _load_cache(path: Path) -> dict[str, dict]:
    out = {}
    if path.is_file():
        for line in path.read_text("utf-8").splitlines():
            row = json.loads(line)
            out[row["key"]] = row
    return out


def generate_condition(backend, key: str, method: str, prefs: list[str], prompts: list[str], *,
                       max_new_tokens: int, alpha: float, top_k: int, batch_size: int,
                       classifier_dirs=None) -> dict[str, Any]:
    from prefsteer.backends.base import GenerationConfig, user_turn

    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    guide = None
    if method == "inject":
        line = attribute_line(prefs)
        ctx = [user_turn(f"{p}\n{line}") for p in prompts]
    else:
        ctx = [user_turn(p) for p in prompts]
    if method == "cliper":
        from prefsteer.methods.registry import Resources, build

        cliper = build("cliper", backend, Resources(classifier_dirs=list(classifier_dirs or [])),
                       {"prefs": {p: 1.0 for p in prefs}, "alpha": alpha, "top_k": top_k})
        guide, _ = cliper.guide_for(None)
    t0 = time.perf_counter()
    answers = []
    for s in range(0, len(ctx), batch_size):
        answers += backend.generate(ctx[s:s + batch_size], cfg, guide=guide)
    secs = time.perf_counter() - t0
    return {"key": key, "method": method, "prefs": prefs, "seconds": round(secs, 2),
            "alpha": alpha if method == "cliper" else None, "top_k": top_k if method == "cliper" else None,
            "max_new_tokens": max_new_tokens, "fingerprint": backend.fingerprint,
            "texts": [a.text for a in answers], "token_ids": [a.token_ids for a in answers]}


def score_condition(backend, row: dict, prompts: list[str], prefs_to_score: Sequence[str]) -> dict[str, Any]:
    """Per-answer metrics of one condition's answers."""
    from prefsteer.backends.base import ScoreRequest, user_turn

    texts = row["texts"]
    reqs = [ScoreRequest.of(user_turn(p), t) for p, t in zip(prompts, texts)]
    for pref in prefs_to_score:
        reqs += [ScoreRequest.of(user_turn(f"{p}\n{scorer_line(pref)}"), t) for p, t in zip(prompts, texts)]
    scores = backend.score(reqs)
    n = len(texts)
    base = scores[:n]
    out: dict[str, Any] = {
        "length": [len(ids) for ids in row["token_ids"]],
        "ppl": [math.exp(-s.logprob / s.n_tokens) if s.n_tokens else float("nan") for s in base],
        "distinct2": [distinct2(ids) for ids in row["token_ids"]],
        "repeat4": [repeated4(ids) for ids in row["token_ids"]],
    }
    for j, pref in enumerate(prefs_to_score):
        with_sys = scores[n * (j + 1): n * (j + 2)]
        out[f"llr:{pref}"] = [(w.logprob - b.logprob) / b.n_tokens if b.n_tokens else 0.0
                              for w, b in zip(with_sys, base)]
    return out


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs):
    xs = sorted(x for x in xs if x == x)
    return xs[len(xs) // 2] if xs else float("nan")


def evaluate(backend, config: CliperEvalConfig) -> dict[str, Any]:
    """Generate (or take from the cache) and score the conditions ``config`` asks for on ``backend``."""
    from prefsteer.methods.cliper import DEFAULT_ALPHA
    from prefsteer.methods.cliper.data import tldr_prompts

    alpha = DEFAULT_ALPHA if config.alpha is None else config.alpha
    rows = tldr_prompts("eval", config.n_prompts, config.data)
    prompts = [r["prompt"] for r in rows]
    cache_dir = Path(config.cache or cliper_answers_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    answers_file = cache_dir / "answers.jsonl"
    cache = _load_cache(answers_file)
    wanted = [c for c in conditions() if not config.conditions
              or any(c[0] == k or c[1] == k for k in config.conditions.split(","))]
    for key, method, prefs in wanted:
        row = cache.get(key)
        fresh = (row is not None and row["fingerprint"] == backend.fingerprint and row["max_new_tokens"]
                 == config.max_new_tokens and len(row["texts"]) == len(prompts)
                 and (method != "cliper" or (row["alpha"] == alpha and row["top_k"] == config.top_k)))
        if not fresh and config.score_only:
            cache.pop(key, None)
            continue
        if not fresh:
            log.info("generating %s", key)
            row = generate_condition(backend, key, method, prefs, prompts, max_new_tokens=config.max_new_tokens,
                                     alpha=alpha, top_k=config.top_k, batch_size=config.batch_size,
                                     classifier_dirs=config.classifiers)
            cache[key] = row
            with answers_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            log.info("%s: %.0fs", key, row["seconds"])
    if config.generate_only:
        return {"generated": [c[0] for c in wanted]}
    if config.conditions:  # score only what was asked for
        cache = {k: v for k, v in cache.items() if k in {c[0] for c in wanted}}
    # scoring: every condition under the plain prompt; strength for the preferences it concerns
    import hashlib

    scores_file = cache_dir / "scores.jsonl"
    scored = {}
    if scores_file.is_file():
        for line in scores_file.read_text("utf-8").splitlines():
            r = json.loads(line)
            scored[r["id"]] = r["metrics"]
    metrics: dict[str, dict] = {}
    for key, method, prefs in conditions():
        if key not in cache:
            continue
        to_score = [p for p in (SINGLES if method == "plain" else prefs) if p != "concise"]
        sid = hashlib.sha256(json.dumps([backend.fingerprint, key, to_score, prompts, cache[key]["texts"]])
                             .encode()).hexdigest()[:24]
        if sid not in scored:
            m = score_condition(backend, cache[key], prompts, to_score)
            scored[sid] = m
            with scores_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"id": sid, "key": key, "metrics": m}) + "\n")
            log.info("scored %s", key)
        m = scored[sid]
        metrics[key] = {k: {"mean": round(_mean(v), 4), "median": round(_median(v), 4)} for k, v in m.items()}
    table = []
    for spec in SINGLES + PAIRS:
        prefs = spec.split("+")
        for method in ("plain", "inject", "cliper"):
            key = "plain" if method == "plain" else f"{method}:{spec}"
            if key not in metrics:
                continue
            m = metrics[key]
            entry = {"preferences": spec, "method": method, "ppl": m["ppl"]["mean"],
                     "ppl_median": m["ppl"]["median"], "distinct2": m["distinct2"]["mean"],
                     "repeat4": m["repeat4"]["mean"], "length": m["length"]["mean"]}
            for p in prefs:
                if p != "concise":
                    entry[f"llr:{p}"] = m[f"llr:{p}"]["mean"]
            table.append(entry)
    return {"settings": {"prompts": len(prompts), "split": "eval (post-id hash buckets 8-9)",
                         "post_ids": [r["post_id"] for r in rows], "max_new_tokens": config.max_new_tokens,
                         "decoding": "greedy", "alpha": alpha, "top_k": config.top_k,
                         "fingerprint": backend.fingerprint,
                         "scorer": "base model; strength = LLR/token with vs without the line "
                                   "'(Your answer should be <description>.)' after the prompt; concise: "
                                   "length in tokens",
                         "seconds": {k: cache[k]["seconds"] for k in cache}},
            "table": table, "metrics": metrics}


def format_table(res: dict[str, Any]) -> str:
    if "table" not in res:
        return json.dumps(res)
    s = res["settings"]
    lines = [f"CLIPer evaluation: {s['prompts']} TL;DR prompts ({s['split']}), {s['max_new_tokens']} new "
             f"tokens, {s['decoding']}, alpha {s['alpha']}, top-k {s['top_k']}, model {s['fingerprint']}.",
             "Strength: length in tokens for concise (lower = more concise); for the others the base "
             "model's log-likelihood ratio per token with vs without the line '(Your answer should be "
             "<description>.)' after the prompt (higher = stronger). Fluency: perplexity under the plain prompt. "
             "Distinctness: distinct-2, share of repeated 4-grams.", "",
             "| preferences | method | strength | perplexity | distinct-2 | repeated 4-grams |",
             "|---|---|---|---|---|---|"]
    for e in res["table"]:
        parts = []
        for p in e["preferences"].split("+"):
            parts.append(f"length {e['length']:.1f}" if p == "concise" else f"{p} {e[f'llr:{p}']:+.3f}")
        lines.append(f"| {e['preferences']} | {e['method']} | {'; '.join(parts)} | {e['ppl']:.2f} | "
                     f"{e['distinct2']:.3f} | {e['repeat4']:.3f} |")
    return "\n".join(lines)
