"""How far two runs' EXACT selections agree: exact greedy against screened or lazy greedy, a CPU run
against a GPU run, float32 against bfloat16.

    prefsteer eval compare results/paper results/paper-screened     # run directories or .jsonl files

Selections are matched on (user, pair). Each side must hold one search configuration (``config_id``)
or name the one to use. On every matched pair the table counts the same attribute list (in the
order picked, as it is injected), the same set in any order, and the same first pick;
``shortfall`` is the reference's F minus the other's, each under its own run's model (positive: the
reference found the better set; on the same list it is only the two runs' numerical noise);
``|ΔF(∅)|`` compares the plain prompt's objective, which the two
runs compute for the very same input, so it shows how far their models' numbers differ at all.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from prefsteer.errors import InputError
from prefsteer.storage import read_selections


def load_side(path: str | Path, config_id: str | None = None) -> list[dict]:
    """One run's selections of one configuration: ``path`` is a run directory or a selections file."""
    path = Path(path)
    file = path / "selections.jsonl" if path.is_dir() else path
    if not file.exists():
        raise InputError("no such selections file (a run directory holds selections.jsonl)", file=str(file))
    rows = read_selections(file)
    ids = Counter(r["config_id"] for r in rows)
    if config_id is None:
        if len(ids) != 1:
            listed = ", ".join(f"{c} ({n} pairs)" for c, n in ids.most_common()) or "none"
            raise InputError(f"holds {len(ids)} search configurations ({listed}); name one with "
                             "--ref-config / --other-config", file=str(file), field="config_id")
        return rows
    if config_id not in ids:
        raise InputError(f"no selections of configuration '{config_id}'", file=str(file), field="config_id")
    return [r for r in rows if r["config_id"] == config_id]


def compare_selections(ref: list[dict], other: list[dict]) -> dict:
    """Agreement of ``other`` with ``ref`` on the (user, pair) both selected: a summary and one row
    per pair."""
    mine = {(r["user_id"], r["pair_id"]): r for r in other}
    rows = []
    for r in ref:
        o = mine.get((r["user_id"], r["pair_id"]))
        if o is None:
            continue
        a, b = list(r["attributes"]), list(o["attributes"])
        rows.append({"user_id": r["user_id"], "pair_id": r["pair_id"], "ref": a, "other": b,
                     "same_list": a == b, "same_set": set(a) == set(b), "same_first": a[:1] == b[:1],
                     "shortfall": r["objective"] - o["objective"],
                     "base_diff": abs(r["base_objective"] - o["base_objective"])})
    n = len(rows)
    summary = {"ref_pairs": len(ref), "other_pairs": len(other), "compared": n}
    if n:
        summary.update(
            same_list=sum(x["same_list"] for x in rows), same_set=sum(x["same_set"] for x in rows),
            same_first=sum(x["same_first"] for x in rows),
            mean_shortfall=statistics.fmean(x["shortfall"] for x in rows),
            median_shortfall=statistics.median(x["shortfall"] for x in rows),
            other_better=sum(not x["same_list"] and x["shortfall"] < 0 for x in rows),
            max_base_diff=max(x["base_diff"] for x in rows))
    return {"summary": summary, "rows": rows}


def format_comparison(result: dict, ref_name: str, other_name: str) -> str:
    s = result["summary"]
    lines = [f"reference: {ref_name} ({s['ref_pairs']} pairs); other: {other_name} ({s['other_pairs']} pairs); "
             f"{s['compared']} pairs in both"]
    if s["compared"]:
        n = s["compared"]
        pct = lambda k: f"{s[k]} / {n} ({100 * s[k] / n:.1f}%)"  # noqa: E731
        lines += ["", "| what | value |", "|---|---|",
                  f"| same attribute list (order included) | {pct('same_list')} |",
                  f"| same set, any order | {pct('same_set')} |",
                  f"| same first attribute | {pct('same_first')} |",
                  f"| other's (different) list scores higher | {pct('other_better')} |",
                  f"| shortfall, mean / median (nats) | {s['mean_shortfall']:.4f} / {s['median_shortfall']:.4f} |",
                  f"| max abs difference in F(plain prompt) (nats) | {s['max_base_diff']:.2e} |"]
    return "\n".join(lines)
