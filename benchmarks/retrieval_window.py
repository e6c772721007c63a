"""How much of a TL;DR prompt EXACT's retrieval reads, and whether reading all of it changes what is retrieved.

all-MiniLM-L6-v2 reads 256 tokens of a text and drops the rest; most TL;DR prompts (title, subreddit
and the whole post) are longer. For every (seed, user) of an evaluation configuration's splits this
retrieves, for each test prompt, the nearest training prompt three ways:

- ``truncated``: the packaged embedder as the methods use it by default (the first 256 tokens);
- ``chunked``: the same model reading the prompt window by window (`--embedder chunked`);
- ``reference``: TF-IDF cosine over every word of the prompt, a reader with no window at all.

and reports the share of test prompts on which each agrees with the reference (and with each other),
beside the prompts' lengths in the embedder's tokens. Embedding only: no language model is loaded.

    python benchmarks/retrieval_window.py                       # the paper-cpu splits (3 seeds x 10 users)
    python benchmarks/retrieval_window.py --config paper --out results/retrieval
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tfidf(texts: list[str]) -> np.ndarray:
    """Unit rows of TF-IDF weights (log-scaled term counts, smoothed idf) over the texts' words."""
    docs = [Counter(re.findall(r"[a-z0-9']+", t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    df = Counter(w for d in docs for w in d)
    out = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for r, d in enumerate(docs):
        for w, n in d.items():
            out[r, vocab[w]] = (1 + math.log(n)) * math.log((1 + len(texts)) / (1 + df[w]) + 1)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper-cpu", help="evaluation configuration whose splits are used")
    p.add_argument("--out", default=str(REPO / "results" / "retrieval"), help="where the tables go")
    args = p.parse_args()

    from prefsteer.data import load_pairs
    from prefsteer.evaluation.protocol import load_config, resolve_data
    from prefsteer.evaluation.runner import make_jobs
    from prefsteer.retrieval import load_embedder

    config = load_config(args.config)
    pairs = load_pairs(resolve_data(config.data))
    truncated, chunked = load_embedder(None), load_embedder("chunked")
    tok = truncated.model.tokenizer
    start = time.perf_counter()
    agree = Counter()
    n_test, lengths = 0, []
    for job in make_jobs(config, pairs, config.seeds):
        train = list(dict.fromkeys(q.prompt for q in job.train))
        test = [q.prompt for q in job.test]
        lengths += [len(tok(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in train + test]
        ref = tfidf(train + test)
        picks = {"reference": (ref[len(train):] @ ref[:len(train)].T).argmax(1)}
        for name, emb in (("truncated", truncated), ("chunked", chunked)):
            picks[name] = (emb.encode(test) @ emb.encode(train).T).argmax(1)
        for a, b in (("truncated", "reference"), ("chunked", "reference"), ("truncated", "chunked")):
            agree[a, b] += int((picks[a] == picks[b]).sum())
        n_test += len(test)
    seconds = time.perf_counter() - start
    window = truncated.model.max_seq_length
    lengths_arr = np.array(lengths)
    rows = {f"{a} = {b}": agree[a, b] / n_test for a, b in agree}
    result = {"config": args.config, "seeds": list(config.seeds), "test_prompts": n_test,
              "prompts_read": len(lengths), "window_tokens": window,
              "median_tokens": float(np.median(lengths_arr)),
              "share_longer_than_window": float((lengths_arr > window - 2).mean()),
              "agreement": rows, "seconds": round(seconds, 1), "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_window.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| retrieved the same training prompt | share of test prompts |", "|---|---|"]
    table += [f"| {k} | {v:.1%} |" for k, v in rows.items()]
    text = (f"Configuration `{args.config}` (seeds {', '.join(map(str, config.seeds))}): {n_test} test prompts; "
            f"{len(lengths)} prompts read, median {result['median_tokens']:.0f} tokens, "
            f"{result['share_longer_than_window']:.0%} longer than the embedder's {window}-token window.\n\n"
            + "\n".join(table) + "\n")
    (out / "retrieval_window.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
