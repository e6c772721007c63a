"""EXACT's levers side by side: recovery on the known-answer suite and pairwise accuracy / beats-plain
on real TL;DR splits (quick, paper-cpu), for each rendering, placement, objective and the
non-negativity filter.

Each variant is a set of `ExactConfig` options; the paper's is ``paper`` (bare names in the user's
turn, summed objective, no filter). Every part keeps its score cache in ``--out`` (the suite in
``suite/``, the TL;DR split ``quick`` in ``tldr/``, any other split in ``tldr-<name>/``), so the
objective and filter variants (the same scores, another search) cost almost nothing and a rerun
re-scores nothing. Writes ``levers.md`` and ``levers.json`` into ``--out``; a ``levers.json``
already there is merged (what this run measures replaces the same variant's suite result or split
result, the rest stays, each with the suite configuration or seeds it was measured on), so seeds or
variants can be added one run at a time; ``--fresh`` starts the table anew.

    python benchmarks/levers.py --out results/known-answer/levers            # the CPU-sized run
    python benchmarks/levers.py --tldr-config quick paper-cpu --tldr-variants paper instruction-system
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
                   help="the known-answer configuration whose suite subset, library and k are used "
                        "(none = skip the suite)")
    p.add_argument("--tldr-config", nargs="+", default=["quick"],
                   help="the TL;DR configurations, each a column group of the table (none = skip)")
    p.add_argument("--tldr-seeds", type=int, nargs="+", default=None,
                   help="only these seeds of every TL;DR split (default: the split's own)")
    p.add_argument("--tldr-variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="variants run on TL;DR (default: all of --variants)")
    p.add_argument("--fresh", action="store_true", help="ignore the levers.json already in --out")
    return p


def main(args: argparse.Namespace) -> int:
    from prefsteer.backends import load_backend
    from prefsteer.evaluation import known_answer as ka
    from prefsteer.evaluation.protocol import MethodSpec, load_config
    from prefsteer.evaluation.runner import Runner
    from prefsteer.retrieval import load_embedder

    out = Path(args.out)
    tldr_configs = [c for c in args.tldr_config if c != "none"]
    for name in tldr_configs:  # a misspelt split fails before any model loads or anything is written
        load_config(name)
    cfg = ka.load_ka_config(args.suite_config) if args.suite_config != "none" else None
    rows = read_rows(out / "levers.json") if not args.fresh else {}  # a bad one: nothing run, nothing written
    out.mkdir(parents=True, exist_ok=True)
    backend = load_backend(args.backend, **({"threads": args.threads, "matmul_precision": args.matmul_precision}
                                            if args.backend == "hf" else {}))
    embedder = load_embedder(args.embedder)
    for v in dict.fromkeys([*args.variants, *(args.tldr_variants or [])]):
        rows.setdefault(v, {})["options"] = VARIANTS[v]

    def write():
        (out / "levers.json").write_text(json.dumps(rows, indent=2))
        (out / "levers.md").write_text(table(rows, args.backend))

    for v in args.variants if cfg is not None else []:  # one at a time: a stopped run keeps what it measured
        t0 = time.perf_counter()
        s = ka.run(backend, {**cfg, "variants": [{"label": v, "kwargs": VARIANTS[v]}]}, out / "suite",
                   embedder=embedder, generate=False)
        text = (out / "suite" / ka.RECORDS).read_text()
        (out / "suite" / f"records-{v}.jsonl").write_text(text)  # ka.run rewrites records.jsonl each time
        recs = [json.loads(line) for line in text.splitlines()]
        rows[v]["recovery"] = s["recovery"][v]["all"]
        rows[v]["mean_set_size"] = sum(len(r["attributes"]) for r in recs) / max(len(recs), 1)
        rows[v]["suite_seconds"] = time.perf_counter() - t0
        rows[v]["suite_config"] = args.suite_config
        print(f"suite {v}: recovery {100 * rows[v]['recovery']:.0f}% ({rows[v]['suite_seconds']:.0f}s)", flush=True)
        write()
    for name in tldr_configs:
        k = next(m.kwargs.get("k", 3) for m in load_config(name).methods if m.label == "exact")
        for v in args.tldr_variants or args.variants:
            t0 = time.perf_counter()
            config = load_config(name)
            config.seeds = args.tldr_seeds or config.seeds
            label = f"exact-{v}"
            config.methods = [MethodSpec("none"), MethodSpec(label, "exact", {"k": k, **VARIANTS[v]})]
            runner = Runner(config, backend, out / tldr_dir(name), embedder=embedder, winrate=False,
                            table7=False, progress=False)
            summary = runner.run()
            rows[v].setdefault("tldr", {})[name] = {
                "accuracy": summary["accuracy"][label], "plain_accuracy": summary["accuracy"]["none"],
                "beats_plain": summary["table8"].get(label), "seeds": list(config.seeds),
                "seconds": time.perf_counter() - t0}
            print(f"tldr {name} {v}: accuracy {100 * summary['accuracy'][label]:.1f}, beats plain "
                  f"{summary['table8'].get(label)}", flush=True)
            write()
    write()
    print((out / "levers.md").read_text())
    return 0


def tldr_dir(name: str) -> str:
    """The run directory of a TL;DR split under ``--out`` (``tldr`` for quick, as first committed)."""
    return "tldr" if name == "quick" else f"tldr-{name}"


def read_rows(path: Path) -> dict:
    """The rows of an earlier run's levers.json (none when there is no such file)."""
    from prefsteer.errors import InputError

    if not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg}); move it away or pass --fresh",
                         field="--out") from None
    if not isinstance(rows, dict) or not all(isinstance(r, dict) for r in rows.values()):
        raise InputError(f"{path}: not a levers.json (an object of variants); move it away or pass --fresh",
                         field="--out")
    return rows


def most_common(values: list):
    return max(values, key=values.count) if values else None


def table(rows: dict, backend: str) -> str:
    """levers.md: one row per variant, the suite's columns if any variant ran on it and one column
    group per TL;DR split; a cell measured on other seeds than the split's usual ones says which."""
    from prefsteer.evaluation import known_answer as ka

    suites = [r["suite_config"] for r in rows.values() if "recovery" in r and "suite_config" in r]
    splits = list(dict.fromkeys(name for r in rows.values() for name in r.get("tldr", {})))
    seeds = {name: most_common([r["tldr"][name].get("seeds") for r in rows.values() if name in r.get("tldr", {})])
             for name in splits}
    lines = ["# EXACT levers", "", f"Backend {backend}."]
    suite = most_common(suites)
    if suite is not None:
        cfg = ka.load_ka_config(suite)
        lib = cfg.get("attributes") or []
        lines += ["", f"Suite: `{suite}` ({cfg.get('notes', '')}); recovery = share of pairs whose "
                  f"selected set (k={cfg.get('k')}) holds the target, chance "
                  f"{100 * cfg.get('k', 1) / max(len(lib), 1):.1f}%."]
    for name in splits:
        lines += ["", f"TL;DR `{name}`: {load_config_notes(name, seeds[name])} No win-rate; accuracy = share of "
                  "test pairs ranked as the annotator did (the plain prompt's in brackets), beats plain = Table 8's "
                  "share of test pairs whose margin beats the plain prompt's."]
    head = ["variant", "options"] + (["suite recovery", "mean set size"] if suite is not None else [])
    for name in splits:
        head += [f"{name} accuracy (plain)", f"{name} beats plain"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, r in rows.items():
        options = r.get("options", VARIANTS.get(v, {}))
        cells = [v, ", ".join(f"{k}={val}" for k, val in options.items()) or "paper defaults"]
        if suite is not None:
            mine = "recovery" in r and r.get("suite_config", suite) == suite
            cells += [f"{100 * r['recovery']:.0f}%" if mine else "–",
                      f"{r['mean_set_size']:.2f}" if mine else "–"]
        for name in splits:
            t = r.get("tldr", {}).get(name)
            other = (f" (seed(s) {', '.join(map(str, t['seeds']))})"
                     if t and t.get("seeds") not in (None, seeds[name]) else "")
            cells += [f"{100 * t['accuracy']:.1f} ({100 * t['plain_accuracy']:.1f}){other}" if t else "–",
                      f"{100 * t['beats_plain']:.1f}" if t and t["beats_plain"] is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_config_notes(name: str, seeds: list[int] | None = None) -> str:
    from prefsteer.evaluation.protocol import load_config

    c = load_config(name)
    c.seeds = seeds or c.seeds
    cut = (f", at most {c.max_train_pairs} training and {c.max_test_pairs} test pairs per user"
           if c.max_train_pairs or c.max_test_pairs else "")
    return f"seed(s) {', '.join(map(str, c.seeds))}, {c.n_users} users per seed{cut}, {len(c.attributes or [])} attributes."


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
