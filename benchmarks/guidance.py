"""CLIPer's overhead: the same 200 tokens decoded plainly and with guidance, in one run.

    .venv/bin/python benchmarks/guidance.py [--threads 1] [--repeats 2]

Decodes exactly ``--tokens`` new tokens for the same prompt(s) on the embedded model
(``load_backend("hf")``): plain, guided by one preference (concise) and by three (concise, humor,
formal), top-k 20, at batch 1 and batch 8. End-of-sequence is suppressed outside the guide (the
backend's output layer is wrapped to give it -inf), so every run does the same amount of work and
the plain run has no guide at all. Each configuration runs ``--repeats`` times, interleaved, and the
fastest run counts (the machine is shared). The last line reads ``ratio_batch1=<guided/plain with
three preferences>``; the goal is <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPT = ("SUBREDDIT: r/relationships\nTITLE: My roommate keeps eating my food\nPOST: We have shared "
          "a flat for a year. Lately my groceries disappear and she says she forgot they were mine. "
          "I like her otherwise and do not want a fight.\n\nWrite a TL;DR summary of the post above.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per answer")
    ap.add_argument("--top-k", type=int, default=20, help="candidates re-scored per step")
    ap.add_argument("--alpha", type=float, default=2.0, help="guidance strength")
    ap.add_argument("--batches", default="1,8", help="batch sizes")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (fastest counts)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from prefsteer.backends import GenerationConfig, load_backend, user_turn
    from prefsteer.methods.cliper.heads import HeadBank, PreferenceHead, load_classifier
    from prefsteer.methods.cliper.guidance import CliperGuide

    backend = load_backend("hf", threads=args.threads, batch_size=max(int(b) for b in args.batches.split(",")))
    fp = backend.fingerprint
    heads, shipped = [], True
    for name in ("concise", "humor", "formal"):
        try:
            heads.append(load_classifier(name, fp))
        except (FileNotFoundError, ValueError):  # same cost with untrained weights
            shipped = False
            heads.append(PreferenceHead(backend.config.hidden_size, 16, {"name": name}))
    emb = backend.token_embeddings()

    # suppress end-of-sequence in the output layer itself: no guide in the plain run
    lm_head, eos = backend.lm_head, torch.tensor(sorted(backend.eos_ids))

    def no_eos_head(h):
        return lm_head(h).index_fill(-1, eos.to(h.device), float("-inf"))
    backend.lm_head = no_eos_head

    class Timed:
        def __init__(self, guide):
            self.guide, self.seconds = guide, 0.0

        def __call__(self, *a):
            t = time.perf_counter()
            out = self.guide(*a)
            self.seconds += time.perf_counter() - t
            return out

    cfg = GenerationConfig(max_new_tokens=args.tokens)
    modes = {"plain": None, "guided, 1 pref": [heads[0]], "guided, 3 prefs": heads}
    rows = []
    backend.generate([user_turn(PROMPT)], GenerationConfig(max_new_tokens=8))  # warm-up
    for B in (int(b) for b in args.batches.split(",")):
        ctx = [user_turn(PROMPT)] * B
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for mode, hs in modes.items():
                guide = None if hs is None else Timed(CliperGuide(HeadBank(hs), [1.0] * len(hs), args.alpha,
                                                                  args.top_k, emb))
                t = time.perf_counter()
                gens = backend.generate(ctx, cfg, guide=guide)
                secs = time.perf_counter() - t
                n = [len(g.token_ids) for g in gens]
                assert n == [args.tokens] * B, f"expected {args.tokens} tokens per row, got {n}"
                if mode not in best or secs < best[mode]["seconds"]:
                    best[mode] = {"seconds": secs, "guide_seconds": guide.seconds if guide else 0.0}
        plain = best["plain"]["seconds"]
        for mode, r in best.items():
            rows.append({"batch": B, "mode": mode, "seconds": round(r["seconds"], 3),
                         "ms_per_step": round(1000 * r["seconds"] / args.tokens, 2),
                         "ms_per_token": round(1000 * r["seconds"] / (args.tokens * B), 2),
                         "guide_ms_per_step": round(1000 * r["guide_seconds"] / args.tokens, 3),
                         "ratio": round(r["seconds"] / plain, 3)})

    print(f"model {backend.info()['model']} ({fp}), {args.tokens} new tokens, top-k {args.top_k}, "
          f"alpha {args.alpha}, threads {torch.get_num_threads()}, fastest of {args.repeats}; classifiers "
          f"{'shipped' if shipped else 'untrained stand-ins (same cost)'}")
    print("| batch | decoding | seconds | ms / step | ms / token | guide ms / step | guided / plain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['seconds']} | {r['ms_per_step']} | {r['ms_per_token']} | "
              f"{r['guide_ms_per_step']} | {r['ratio']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "fingerprint": fp, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)
    r1 = next(r for r in rows if r["batch"] == 1 and r["mode"] == "guided, 3 prefs") if any(
        r["batch"] == 1 for r in rows) else rows[-1]
    print(f"ratio_batch1={r1['ratio']}")


if __name__ == "__main__":
    main()
