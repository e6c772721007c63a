"""scripts/rekey_run.py: a run written with `<stem>:<n>` ids gets today's content keys."""

import json
import subprocess
import sys
from pathlib import Path

from prefsteer.data.loaders import load_tldr_comparisons

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "fixtures" / "tldr_small.json"


def run_script(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "rekey_run.py"), str(run), str(DATA)],
                          capture_output=True, text=True)


def test_old_ids_become_content_keys_and_a_wrong_user_writes_nothing(tmp_path):
    pairs = load_tldr_comparisons(DATA)
    p0, p1 = pairs[0], pairs[1]
    old = lambda i: f"tldr_small:{i}"  # noqa: E731  (record i of the file, counted from 0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text(json.dumps({"kind": "method", "user": p0.user_id, "train_ids": [old(0)],
                                                   "test_ids": ["given-id"]}) + "\n")
    (run / "selections.jsonl").write_text(json.dumps({"user_id": p1.user_id, "pair_id": old(1)}) + "\n")
    r = run_script(run)
    assert r.returncode == 0, r.stderr
    rec = json.loads((run / "records.jsonl").read_text())
    sel = json.loads((run / "selections.jsonl").read_text())
    assert rec["train_ids"] == [p0.pair_id] and rec["test_ids"] == ["given-id"] and sel["pair_id"] == p1.pair_id

    other = next(p for p in pairs if p.user_id != p0.user_id)
    (run / "selections.jsonl").write_text(json.dumps({"user_id": other.user_id, "pair_id": old(0)}) + "\n")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    r = run_script(run)
    assert r.returncode != 0 and "tldr_small:0" in r.stderr + r.stdout
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
