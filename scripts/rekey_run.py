"""Re-key a run directory written before pairs were keyed by content (``<file stem>:<n>`` ids).

Runs of `prefsteer eval` made before schema 1 name each TL;DR pair ``<stem>:<n>``, ``n`` the
0-based record of the data file; today's loader keys a pair by its content (`prefsteer.types.pair_key`).
This rewrites the ids in ``records.jsonl`` and ``selections.jsonl`` of such a run, in place, from
the data file itself, so that a resumed run (new methods added to its configuration) reuses its
selections and its reports line the old records up with the new ones. Every old id must map to a
pair of the same user, or nothing is written.

    .venv/bin/python scripts/rekey_run.py results/paper-cpu ../shared/data/tldr/batch13.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from prefsteer.data.loaders import load_tldr_comparisons

OLD = re.compile(r"^([^:\s]+):(\d+)$")


def main(run: Path, data: Path) -> int:
    pairs = load_tldr_comparisons(data)
    new = {(p.user_id, f"{data.stem}:{p.source[1] - 1}"): p.pair_id for p in pairs}
    by_id = {f"{data.stem}:{p.source[1] - 1}": p.user_id for p in pairs}

    def rekey(user: str, old: str) -> str:
        if not OLD.match(old):
            return old
        if (user, old) not in new:
            raise SystemExit(f"{old}: no pair of user {user} at that record of {data} (its user: {by_id.get(old)})")
        return new[(user, old)]

    out, counts = {}, {}
    for name in ("records.jsonl", "selections.jsonl"):
        lines, n = [], 0
        for line in (run / name).read_text().splitlines():
            r = json.loads(line)
            if name == "selections.jsonl":
                n += OLD.match(r["pair_id"]) is not None
                r["pair_id"] = rekey(r["user_id"], r["pair_id"])
            elif "user" in r:
                if "pair_id" in r:  # a Table 7 record
                    n += OLD.match(r["pair_id"]) is not None
                    r["pair_id"] = rekey(r["user"], r["pair_id"])
                for key in ("train_ids", "test_ids"):
                    if key in r:
                        n += sum(OLD.match(i) is not None for i in r[key])
                        r[key] = [rekey(r["user"], i) for i in r[key]]
            lines.append(json.dumps(r))
        out[name], counts[name] = "\n".join(lines) + "\n", n
    for name, text in out.items():
        (run / name).write_text(text)
    print(f"re-keyed {counts['records.jsonl']} ids in records.jsonl and {counts['selections.jsonl']} in selections.jsonl")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
