"""EXACT's levers side by side: recovery on the known-answer suite and pairwise accuracy / beats-plain
on the real TL;DR quick split, for each rendering, placement, objective and the non-negativity filter.

Each variant is a set of `ExactConfig` options; the paper's is ``paper`` (bare names in the user's
turn, summed objective, no filter). Both parts keep their score caches in ``--out``, so the
objective and filter variants (the same scores, another search) cost almost nothing and a rerun
re-scores nothing. Writes ``levers.md`` and ``levers.json`` into ``--out``.

    python benchmarks/levers.py --out results/known-answer/levers            # the CPU-sized run
    python benchmarks/levers.py --backend fake --embedder hash --out /tmp/lv  # a dry run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "paper": {},
    "described": {"render": "described"},
    "instruction": {"render": "instruction"},
    "instruction-system": {"render": "instruction", "placement": "system"},
    "names-system": {"placement": "system"},
    "instruction-described": {"render": "instruction-described"},
    "instruction-described-system": {"render": "instruction-described", "placement": "system"},
    "mean": {"objective": "mean"},
    "filter": {"stop_when_no_gain": True},
    "instruction-system-mean": {"render": "instruction", "placement": "system", "objective": "mean"},
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="hf")
    p.add_argument("--embedder", default=None)
    p.add_argument("--threads", type=int, default=None, help="hf: CPU threads for the model")
    p.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                   help="hf: float32 matrix-product precision (see prefsteer --help)")
    p.add_argument("--out", default="results/known-answer/levers")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--suite-config", default="known-answer-cpu",
                   help="the known-answer configuration whose suite subset, library and k are used")
    p.add_argument("--tldr-config", default="quick", help="the TL;DR configuration (none = skip)")
    p.add_argument("--tldr-variants", nargs="+", default=None,
                   help="variants run on TL;DR (default: all of --variants)")
    return p


def main(args: argparse.Namespace) -> int:
    from prefsteer.backends import load_backend
    from prefsteer.evaluation import known_answer as ka
    from prefsteer.evaluation.protocol import MethodSpec, load_config
    from prefsteer.evaluation.runner import Runner
    from prefsteer.retrieval import load_embedder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = load_backend(args.backend, **({"threads": args.threads, "matmul_precision": args.matmul_precision}
                                            if args.backend == "hf" else {}))
    embedder = load_embedder(args.embedder)
    rows: dict[str, dict] = {v: {} for v in args.variants}

    def write():
        (out / "levers.json").write_text(json.dumps(rows, indent=2))
        (out / "levers.md").write_text(table(rows, cfg, args))

    cfg = ka.load_ka_config(args.suite_config)
    cfg["variants"] = [{"label": v, "kwargs": VARIANTS[v]} for v in args.variants]
    for v in args.variants:  # one at a time, so a stopped run keeps what it measured
        t0 = time.perf_counter()
        s = ka.run(backend, {**cfg, "variants": [{"label": v, "kwargs": VARIANTS[v]}]}, out / "suite",
                   embedder=embedder, generate=False)
        text = (out / "suite" / ka.RECORDS).read_text()
        (out / "suite" / f"records-{v}.jsonl").write_text(text)  # ka.run rewrites records.jsonl each time
        recs = [json.loads(line) for line in text.splitlines()]
        rows[v]["recovery"] = s["recovery"][v]["all"]
        rows[v]["mean_set_size"] = sum(len(r["attributes"]) for r in recs) / max(len(recs), 1)
        rows[v]["suite_seconds"] = time.perf_counter() - t0
        print(f"suite {v}: recovery {100 * rows[v]['recovery']:.0f}% ({rows[v]['suite_seconds']:.0f}s)", flush=True)
        write()
    if args.tldr_config != "none":
        config = load_config(args.tldr_config)
        for v in args.tldr_variants or args.variants:
            t0 = time.perf_counter()
            config.methods = [MethodSpec("none"),
                              MethodSpec(f"exact-{v}", "exact", {"k": next(m.kwargs.get("k", 3) for m in
                                                                           load_config(args.tldr_config).methods
                                                                           if m.label == "exact"),
                                                                 **VARIANTS[v]})]
            runner = Runner(config, backend, out / "tldr", embedder=embedder, winrate=False, table7=False,
                            progress=False)
            summary = runner.run()
            label = f"exact-{v}"
            rows[v]["tldr_accuracy"] = summary["accuracy"][label]
            rows[v]["tldr_plain_accuracy"] = summary["accuracy"]["none"]
            rows[v]["tldr_beats_plain"] = summary["table8"].get(label)
            rows[v]["tldr_seconds"] = time.perf_counter() - t0
            print(f"tldr {v}: accuracy {100 * rows[v]['tldr_accuracy']:.1f}, beats plain "
                  f"{rows[v]['tldr_beats_plain']}", flush=True)
            write()
    write()
    print((out / "levers.md").read_text())
    return 0


def table(rows: dict, cfg: dict, args) -> str:
    lib = cfg.get("attributes") or []
    lines = ["# EXACT levers", "",
             f"Backend {args.backend}. Suite: `{args.suite_config}` ({cfg.get('notes', '')}); recovery = share "
             f"of pairs whose selected set (k={cfg.get('k')}) holds the target, chance "
             f"{100 * cfg.get('k', 1) / max(len(lib), 1):.1f}%. TL;DR: `{args.tldr_config}` split, no win-rate; "
             "accuracy = share of test pairs ranked as the annotator did, beats plain = Table 8's share "
             "of test pairs whose margin beats the plain prompt's.", "",
             "| variant | options | suite recovery | mean set size | TL;DR accuracy (plain) | TL;DR beats plain |",
             "|---|---|---|---|---|---|"]
    for v, r in rows.items():
        opts = ", ".join(f"{k}={val}" for k, val in VARIANTS[v].items()) or "paper defaults"
        rec = f"{100 * r['recovery']:.0f}%" if "recovery" in r else "–"
        size = f"{r['mean_set_size']:.2f}" if "mean_set_size" in r else "–"
        acc = (f"{100 * r['tldr_accuracy']:.1f} ({100 * r['tldr_plain_accuracy']:.1f})"
               if "tldr_accuracy" in r else "–")
        bp = f"{100 * r['tldr_beats_plain']:.1f}" if r.get("tldr_beats_plain") is not None else "–"
        lines.append(f"| {v} | {opts} | {rec} | {size} | {acc} | {bp} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
