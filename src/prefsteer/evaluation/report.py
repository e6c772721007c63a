"""Turn a run's records into Markdown tables and PNG plots (the second step after `Runner.run`).

    >>> write_report("results/paper")          # writes report.md, accuracy.png, figure1_k.png
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from prefsteer.evaluation.metrics import summarize
from prefsteer.evaluation.runner import RUN_INFO, read_records


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return _pct(mean) + (f" ± {100 * std:.2f}" if std is not None else "")


def _is_exact(r: dict) -> bool:
    return str(r.get("registry", "")).startswith("exact")


def _partial_seeds(methods: Sequence[dict]) -> tuple[dict[tuple[str, int], int], int, set[tuple[str, int]]]:
    """Users per (method, seed), the most any has, and the (method, seed)s with fewer: a seed still
    running, or a method run on some users only."""
    counts = Counter((r["method"], r["seed"]) for r in methods)
    most = max(counts.values(), default=0)
    return counts, most, {key for key, n in counts.items() if n < most}


def _headline(records: Sequence[dict]) -> list[dict]:
    """The records behind a method's headline numbers: its complete seeds, or all it has when no
    seed is complete; records of other kinds as they are."""
    methods = [r for r in records if r.get("kind") == "method"]
    counts, _, partial = _partial_seeds(methods)
    complete = {m for m, x in counts if (m, x) not in partial}
    return [r for r in records if r.get("kind") != "method" or
            (r["method"], r["seed"]) not in partial or r["method"] not in complete]


def accuracy_table(records: Sequence[dict]) -> str:
    """Table 2. A seed with fewer users than the others is shown in its column, marked, and left
    out of the mean ± std and of the columns after the seeds (unless a method has nothing else)."""
    methods = [r for r in records if r.get("kind") == "method"]
    counts, most, partial = _partial_seeds(methods)
    s = summarize(_headline(records))
    every = summarize(methods)
    seeds = sorted({r["seed"] for r in methods})
    exact_labels = {r["method"] for r in methods if _is_exact(r)}
    head = ("| method | accuracy (%) | " + " | ".join(f"seed {x}" for x in seeds) +
            " | users | test pairs | beats plain (%, Table 8 metric) | margin shift vs plain (nats) | "
            "win-rate vs base (%) | win-rate, position-calibrated (%) | seconds |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in s["methods"]:
        per = every["accuracy_per_seed"][m]
        cells = [_pct(per.get(str(x))) + (f" ({counts[m, x]}/{most} users)" if (m, x) in partial else "")
                 for x in seeds]
        t8 = _pm(s["table8"].get(m), s["table8_std"].get(m)) if m in exact_labels else "–"
        wr, wrc = s.get("winrate", {}).get(m), s.get("winrate_calibrated", {}).get(m)
        shift = f"{s['shift'][m]:+.2f}" if m in exact_labels and m in s["shift"] else "–"
        lines.append(f"| {m} | {_pm(s['accuracy'][m], s['accuracy_std'][m])} | " + " | ".join(cells) +
                     f" | {s['n_users'][m]} | {s['n_test_pairs'][m]} | {t8} | {shift} | {_pct(wr)} | {_pct(wrc)} | "
                     f"{every['seconds'][m]:.0f} |")
    if partial:
        lines += ["", f"A seed marked (n/{most} users) is not complete: its column shows the users so far, and "
                  "the mean ± std, users, test pairs, Table 8 and margin-shift columns leave it out."]
    return "\n".join(lines)


def k_curve(records: Sequence[dict]) -> list[dict]:
    """Exact-greedy EXACT runs with names only, by k, on the (seed, user) pairs all of them have: dicts with
    ``k``, ``label``, ``accuracy``/``accuracy_std`` and ``table8``/``table8_std``."""
    by_label = {}
    for r in records:
        if r.get("kind") == "method" and r.get("registry") == "exact" and not r["kwargs"].get("describe") \
                and r["kwargs"].get("mode", "greedy") == "greedy":
            by_label.setdefault(r["method"], r["kwargs"].get("k", 3))
    s = summarize(_covering(records, list(by_label)))
    out = [{"k": k, "label": label, "accuracy": s["accuracy"][label], "accuracy_std": s["accuracy_std"][label],
            "table8": s["table8"].get(label), "table8_std": s["table8_std"].get(label), "users": s["n_users"][label]}
           for label, k in by_label.items() if label in s["accuracy"]]
    return sorted(out, key=lambda c: (c["k"], c["label"]))


def _covering(records: Sequence[dict], labels: Sequence[str]) -> list[dict]:
    """Method records of the (seed, user) pairs every one of ``labels`` has: a fair comparison."""
    ms = [r for r in records if r.get("kind") == "method"]
    have: dict[tuple, set] = {}
    for r in ms:
        have.setdefault((r["seed"], r["user"]), set()).add(r["method"])
    keep = {key for key, got in have.items() if set(labels) <= got}
    return [r for r in ms if (r["seed"], r["user"]) in keep and r["method"] in labels]


def comparison_table(records: Sequence[dict], labels: Sequence[str], title: str) -> str | None:
    present = {r["method"] for r in records if r.get("kind") == "method"}
    labels = [x for x in labels if x in present]
    if len(labels) < 2:
        return None
    rs = _covering(records, labels)
    if not rs:
        return None
    s = summarize(rs)
    lines = [f"| {title} | accuracy (%) | beats plain (%) | users |", "|---|---|---|---|"]
    for m in labels:
        lines.append(f"| {m} | {_pm(s['accuracy'][m], s['accuracy_std'][m])} | "
                     f"{_pm(s['table8'].get(m), s['table8_std'].get(m))} | {s['n_users'][m]} |")
    return "\n".join(lines)


def table7_table(records: Sequence[dict]) -> str | None:
    t7 = [r for r in records if r.get("kind") == "table7"]
    if not t7:
        return None
    s = summarize(t7)["table7"]
    fmt = (lambda v: "–" if v is None else f"{v:.3f}")
    return "\n".join([
        f"Greedy versus exhaustive search at k={s['k']} on a reduced library of the first "
        f"{s['library_size']} attributes ({s['n_pairs']} training pairs; exhaustive over all 42 "
        f"attributes is 11,480 subsets or 68,880 ordered triples per pair, too slow on this machine). "
        f"Objective F in nats. "
        + ("F(exhaustive) is the best ordered k-tuple (the injected line's order changes F); "
           "F(subsets) the best k-subset rendered in library order." if s["ordered"] else
           "F(exhaustive) is the best k-subset rendered in library order; greedy renders its picks "
           "in the order it chose them, so it can exceed it."),
        "",
        "| pairs | F(plain) | F(greedy) | F(exhaustive) | F(subsets) | ratio F(g)/F(e) | improvement ratio | gap | greedy optimal (%) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['n_pairs']} | {fmt(s['plain'])} | {fmt(s['greedy'])} | {fmt(s['exhaustive'])} | "
        f"{fmt(s['exhaustive_unordered'])} | {fmt(s['ratio'])} | "
        f"{fmt(s['improvement_ratio'])} | {fmt(s['gap'])} | {100 * s['greedy_optimal']:.0f} |",
        "",
        "ratio F(g)/F(e) is averaged over pairs where both are positive; improvement ratio = "
        "sum(F(g) - F(plain)) / sum(F(e) - F(plain)) over the pairs where exhaustive improves on the "
        "plain prompt: the share of the best achievable improvement that greedy gets."])


def _plot_accuracy(records: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(_headline(records))
    labels = s["methods"]
    means = [100 * s["accuracy"][m] for m in labels]
    errs = [100 * (s["accuracy_std"][m] or 0) for m in labels]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(labels)), 3.2))
    ax.bar(labels, means, yerr=errs, capsize=3, color="#4C72B0")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_k(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, name in (("accuracy", "pairwise accuracy"), ("table8", "beats plain (Table 8)")):
        pts = [c for c in curve if c[key] is not None]
        ax.errorbar([c["k"] for c in pts], [100 * c[key] for c in pts],
                    yerr=[100 * (c[key + "_std"] or 0) for c in pts], marker="o", capsize=3, label=name)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("k (attributes per pair)")
    ax.set_ylabel("% of test pairs")
    ax.set_xticks(sorted({c["k"] for c in curve}))
    ax.set_title("EXACT by k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` (and PNGs) for a run directory; returns the Markdown file's path."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(run_dir)
    if not [r for r in records if r.get("kind") in ("method", "table7")]:
        from prefsteer.errors import InputError

        raise InputError("no evaluation records to report on", file=str(run_dir / "records.jsonl"))
    info = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).exists() else {}
    first = records[0]
    parts = [f"# Evaluation report: {info.get('config', first.get('config'))}", "",
             f"- model: `{first.get('model')}` (backend {first.get('backend')})",
             f"- git commits: {', '.join(sorted({r.get('git', 'unknown')[:12] for r in records}))}",
             f"- records: {len(records)}; seeds: {sorted({r['seed'] for r in records})}",
             f"- notes: {records[-1].get('config_json', {}).get('notes', '')}", ""]
    if any(r.get("kind") == "method" for r in records):
        parts += ["## Table 2: pairwise accuracy by method", "",
                  "Mean over users per seed, then mean ± sample std over seeds. 'beats plain' (the "
                  "paper's Table 8 metric, EXACT methods only): share of test pairs whose "
                  "chosen-minus-rejected margin exceeds the plain prompt's; 'margin shift': the mean of "
                  "(method margin - plain margin) in nats, however small; 'win-rate': each order's verdict "
                  "counts half (a split vote is a tie); 'position-calibrated': the judge's graded "
                  "preferences of both orders summed before the verdict (Wang et al. 2023).", "",
                  accuracy_table(records), "", "![accuracy](accuracy.png)", ""]
        _plot_accuracy(records, out / "accuracy.png")
        curve = k_curve(records)
        if len(curve) >= 2:
            parts += ["## Figure 1: EXACT accuracy by k", "",
                      "On the (seed, user) pairs all listed labels have.", "",
                      "| k | label | accuracy (%) | beats plain (%) | users |", "|---|---|---|---|---|"]
            parts += [f"| {c['k']} | {c['label']} | {_pm(c['accuracy'], c['accuracy_std'])} | "
                      f"{_pm(c['table8'], c['table8_std'])} | {c['users']} |" for c in curve]
            parts += ["", "![EXACT accuracy by k](figure1_k.png)", ""]
            _plot_k(curve, out / "figure1_k.png")
        t8 = comparison_table(records, ["none", "exact", "exact-global"], "Table 8: retrieval")
        if t8:
            parts += ["## Table 8: retrieval versus one global attribute set", "",
                      "On the (seed, user) pairs all listed methods have.", "", t8, ""]
        ab = comparison_table(records, ["exact", "exact-describe"], "attribute format")
        if ab:
            parts += ["## Ablation: attribute names versus names with descriptions", "",
                      "exact = names only (the paper's format); exact-describe = each name with its "
                      "one-line description.", "", ab, ""]
    t7 = table7_table(records)
    if t7:
        parts += ["## Table 7: greedy versus exhaustive", "", t7, ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
