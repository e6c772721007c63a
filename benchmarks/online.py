"""EXACT's online overhead: embedding + retrieval + injection against a 200-token generation.

Indexes the packaged demo users, then for each of a few new prompts times (a) the retrieval step
(embed the prompt, cosine search over the user's memory, render the injected prompt) and (b) the
generation of exactly --tokens tokens (end-of-sequence suppressed so every run does the same work),
and prints a table; the last line reads `overhead_pct=<mean retrieval / mean generation * 100>`.
Goal: under 3% (the EXACT paper reports 5.27%).

    .venv/bin/python benchmarks/online.py [--tokens 200] [--prompts 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Give me some advice for my first job interview.",
    "How do I make my houseplants grow faster?",
    "What should I pack for a weekend hiking trip?",
    "How can I stop procrastinating on my thesis?",
    "Explain how a credit score works.",
    "What is a healthy breakfast I can make in five minutes?",
]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=200, help="tokens generated per prompt")
    p.add_argument("--prompts", type=int, default=5, help="prompts timed (at most %d)" % len(PROMPTS))
    p.add_argument("--model", default=None, help="model path or hub name (default: embedded SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    return p


def main(args: argparse.Namespace) -> None:
    from importlib import resources

    from prefsteer.backends import GenerationConfig, load_backend
    from prefsteer.data import group_by_user, load_pairs
    from prefsteer.storage import Memory
    from prefsteer.methods.registry import Resources, build

    backend = load_backend("hf", model=args.model, threads=args.threads)
    mem = Memory(Path(tempfile.mkdtemp()) / "bench.db")
    exact = build("exact", backend, Resources(memory=mem))
    with resources.as_file(resources.files("prefsteer.resources").joinpath("demo_pairs.jsonl")) as f:
        for user, ps in group_by_user(load_pairs(f)).items():
            mem.add_pairs(ps)  # the caller stores the pairs, then the method learns from them
            exact.fit(user, ps)
    exact.embedder.encode(["warm-up"])  # model load is start-up, not per-request cost

    class NoEOS:  # a guide that only forbids ending, so each generation is exactly --tokens long
        def __call__(self, hidden, logits, ids):
            out = logits.clone()
            out[:, sorted(backend.eos_ids)] = float("-inf")
            return out

    config = GenerationConfig(max_new_tokens=args.tokens)
    rows = []
    for prompt in PROMPTS[: args.prompts]:
        start = time.perf_counter()
        attrs = exact.attributes_for("maya", [prompt])[0]
        context = exact.attribute_messages(prompt, attrs)
        retrieval = time.perf_counter() - start
        start = time.perf_counter()
        gen = backend.generate([context], config, guide=NoEOS())[0]
        generation = time.perf_counter() - start
        rows.append((prompt, attrs, retrieval, generation, len(gen.token_ids)))

    print(f"\n{'prompt':<48} {'retrieval ms':>12} {'generation s':>12} {'tokens':>6} {'overhead %':>10}")
    for prompt, attrs, r, g, n in rows:
        print(f"{prompt[:48]:<48} {1000 * r:>12.2f} {g:>12.2f} {n:>6} {100 * r / g:>10.3f}")
    r = statistics.mean(x[2] for x in rows)
    g = statistics.mean(x[3] for x in rows)
    print(f"{'mean':<48} {1000 * r:>12.2f} {g:>12.2f} {'':>6} {100 * r / g:>10.3f}")
    print(f"overhead_pct={100 * r / g:.3f}")


if __name__ == "__main__":
    main(make_parser().parse_args())
