"""Every registered method on the real embedded model, through the command line: fitted by
`prefsteer index --method M` in one process, then `generate` and `profile` in new processes that
know only the database file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

PAIRS = [
    {"user_id": "maya", "prompt": "How do I boil an egg?",
     "chosen": "Boil it for nine minutes, then cool it in cold water.",
     "rejected": "Oh, eggs! What a wonderful adventure, let us dance around the kitchen together!"},
    {"user_id": "maya", "prompt": "How can I sleep better?",
     "chosen": "Keep a fixed schedule and avoid screens before bed.",
     "rejected": "Dream of fluffy clouds, count happy sheep and giggle yourself to sleep!"},
]
# small settings per method, so the whole file runs in about a minute on two cores
OPTIONS = {
    "none": [], "base": [], "exact": ["--k", "1"], "exact-global": ["--k", "1"],
    "drift": ["--drift-attributes", "Concise", "Humor"],
    "reward": ["--reward-epochs", "1", "--reward-n", "2"],
    "cliper": ["--personal-steps", "20"],
}


def prefsteer(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "prefsteer.cli", *args, "--json", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    data = d / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return d / "memory.db", data


@pytest.mark.parametrize("method", list(OPTIONS))
def test_method_fitted_in_one_process_generates_in_another(db, method):
    path, data = db
    prefsteer("index", "--method", method, "--data", str(data), "--db", str(path), *OPTIONS[method])
    gen = ["generate", "How do I make tea?", "--method", method, "--user", "maya", "--db", str(path),
           "--max-new-tokens", "12", *OPTIONS[method]]  # options last: some take several values
    first, again = prefsteer(*gen), prefsteer(*gen)
    assert first["text"].strip()
    if method != "reward":  # greedy decoding: a new process reads the same state and writes the same text
        assert first["text"] == again["text"]
    profile = prefsteer("profile", "--user", "maya", "--db", str(path))
    if method == "exact":
        assert {e["prompt"] for e in profile["entries"]} == {p["prompt"] for p in PAIRS}
        assert all(len(e["attributes"]) == 1 for e in profile["entries"])
    elif method != "none":
        assert method in {m["method"] for m in profile["methods"]}
