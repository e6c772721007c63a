"""Bad input met at the command line (item 8 of the issue): each ends in exit status 2 and one line
naming the file, line, field or option, and writes nothing. The library-level parts are in
test_bad_input_library.py; these drive `prefsteer.cli.main` end to end on the toy backend."""

import errno
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from prefsteer.cli import main

FAST = ["--backend", "fake", "--embedder", "hash"]

ROWS = [
    {"user_id": "u", "prompt": "tell me a joke about cats", "chosen": "funny humor joke", "rejected": "formal dear sir"},
    {"user_id": "u", "prompt": "write a letter to my landlord", "chosen": "formal dear sir regards", "rejected": "lol wow"},
    {"user_id": "w", "prompt": "explain my code", "chosen": "python code function", "rejected": "lol"},
]

# small Reward settings (tests/test_method_state.py's OPTIONS), so a fit takes about a second
REWARD_FAST = ["--reward-r", "4", "--reward-alpha", "8", "--reward-lr", "1e-2", "--reward-epochs", "3",
               "--reward-batch-size", "4", "--reward-max-length", "32", "--reward-n", "3"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # `main` sets these for --quiet/--json and leaves them set: restore them after each test
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PREFSTEER_DB", raising=False)
    monkeypatch.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path / "user-cliper"))


def run(capsys, *argv, quiet=True):
    code = main(list(argv) + FAST + (["--quiet"] if quiet else []))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    return "Traceback" not in err and "internal error" not in err and len(err.strip().splitlines()) == 1


def tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


# 1
def test_index_of_a_user_not_in_the_file(tmp_path, capsys, data):
    db = tmp_path / "m.db"
    code, _, err = run(capsys, "index", "--data", str(data), "--user", "no-such-worker", "--db", str(db))
    assert code == 2 and one_line(err), err
    assert "no-such-worker" in err and "--user" in err
    assert tree(tmp_path) == ["pairs.jsonl"]


# 2
def test_index_with_a_negative_limit(tmp_path, capsys, data):
    code, _, err = run(capsys, "index", "--data", str(data), "--limit", "-1", "--db", str(tmp_path / "m.db"))
    assert code == 2 and one_line(err) and "--limit" in err, err
    assert tree(tmp_path) == ["pairs.jsonl"]


# 3
def test_generate_a_prompt_longer_than_the_context(tmp_path, capsys):
    from prefsteer.backends.fake import FakeBackend

    limit = FakeBackend().max_context
    code, _, err = run(capsys, "generate", "--db", str(tmp_path / "m.db"), "word " * (limit + 10))
    assert code == 2 and one_line(err), err
    assert f"context of {limit}" in err and "prompt" in err
    assert tree(tmp_path) == []


# 4
def test_index_with_an_unknown_embedder_fails_fast(tmp_path, capsys, data):
    db = tmp_path / "m.db"
    start = time.monotonic()
    code = main(["index", "--data", str(data), "--db", str(db), "--backend", "fake", "--embedder", "nonexistent",
                 "--quiet"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and one_line(err), err
    assert took < 10 and "embedder 'nonexistent'" in err
    assert tree(tmp_path) == ["pairs.jsonl"]  # no db, so no pairs stored


# 5
def test_generate_for_a_user_not_fitted_with_exact(tmp_path, capsys, data):
    db = str(tmp_path / "m.db")
    code, _, err = run(capsys, "index", "--method", "drift", "--data", str(data), "--user", "u", "--db", db)
    assert code == 0, err
    code, _, err = run(capsys, "generate", "--user", "u", "--db", db, "--max-new-tokens", "3", "hi")
    assert code == 2 and one_line(err), err
    assert "'u'" in err and "not been fitted with the 'exact' method" in err


# 6
@pytest.mark.parametrize("backend", ["bogus", "vllm"])
def test_index_with_an_unusable_backend(tmp_path, capsys, data, backend):
    if backend == "vllm" and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    code = main(["index", "--data", str(data), "--db", str(tmp_path / "m.db"), "--backend", backend,
                 "--embedder", "hash", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err), err
    assert f"'{backend}'" in err
    assert ("unknown backend 'bogus'" in err) if backend == "bogus" else ("bootstrap_vllm.sh" in err)
    assert tree(tmp_path) == ["pairs.jsonl"]


# 7
def test_a_lone_surrogate_in_a_jsonl_field(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    bad = json.dumps(ROWS[1]).replace('"formal dear sir regards"', '"ok \\ud800 text"')
    assert "\\ud800" in bad
    data.write_text(json.dumps(ROWS[0]) + "\n" + bad + "\n")
    code, _, err = run(capsys, "index", "--data", str(data), "--db", str(tmp_path / "m.db"))
    assert code == 2 and "Traceback" not in err, err
    assert f"{data}:2" in err and "'chosen'" in err and "surrogate" in err
    assert tree(tmp_path) == ["pairs.jsonl"]


@pytest.mark.parametrize("argv, named", [
    (["generate", "--method", "none", "--max-new-tokens", "3", "ab\udcff"], "prompt"),  # argv of b"ab\xff"
    (["profile", "--user", "u\udcff"], "--user"),
])
def test_invalid_utf8_bytes_in_an_argument(tmp_path, capsys, data, argv, named):
    db = str(tmp_path / "m.db")
    assert run(capsys, "index", "--method", "base", "--data", str(data), "--db", db)[0] == 0
    code, _, err = run(capsys, *argv, "--db", db)
    assert code == 2 and one_line(err), err
    assert "UTF-8" in err and f"'{named}'" in err


# 8
def test_cliper_without_a_head_for_the_model(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--method", "cliper", "--prefs", "concise=1", "--max-new-tokens", "3",
                       "--db", str(tmp_path / "m.db"), "hi")
    assert code == 2 and one_line(err), err
    assert "Classifiers for this model: none" in err and "prefsteer cliper train --prefs concise" in err
    assert not (tmp_path / "m.db").exists()


# 9
def test_a_full_disk_while_reward_writes_its_state(tmp_path, capsys, data, monkeypatch):
    from prefsteer.storage import Memory
    from prefsteer.storage.sqlite import SQLiteMemory

    real_put, tried = SQLiteMemory.put_method_state, []

    def full_put(self, *a, **kw):  # the disk fills up as the weights are written
        tried.append(a[1])
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count={pages}")
        return real_put(self, *a, **kw)

    monkeypatch.setattr(SQLiteMemory, "put_method_state", full_put)
    db = tmp_path / "m.db"
    code, _, err = run(capsys, "index", "--method", "reward", *REWARD_FAST, "--data", str(data), "--user", "u",
                       "--db", str(db))
    monkeypatch.undo()
    assert tried == ["reward"], "the method wrote no state"
    assert code == 2 and one_line(err), err
    assert str(db) in err and "full" in err
    assert Memory(db, create=False).method_states("u") == []  # nothing half-written


# 10
def test_a_missing_db_folder_is_not_created(tmp_path, capsys):
    db = str(tmp_path / "missing" / "m.db")
    code, _, err = run(capsys, "profile", "--user", "x", "--db", db)
    assert code == 2 and one_line(err) and "does not exist" in err, err
    assert tree(tmp_path) == []
    code, out, err = run(capsys, "generate", "--method", "none", "--max-new-tokens", "3", "--db", db, "hi")
    assert code == 0 and out.strip(), err
    assert tree(tmp_path) == []


# 11
@pytest.mark.parametrize("argv", [["profile", "--user", "x"], ["index", "--data", "DATA"],
                                  ["generate", "--user", "u", "hi"]])
def test_an_empty_db_path(tmp_path, capsys, data, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    argv = [str(data) if a == "DATA" else a for a in argv]
    code, _, err = run(capsys, *argv, "--db", "")
    assert code == 2 and one_line(err), err
    assert "empty path" in err and "--db" in err and "is a directory" not in err
    assert tree(tmp_path) == ["pairs.jsonl"]


# 12
def test_another_methods_option_is_refused(tmp_path, capsys, data):
    code, _, err = run(capsys, "index", "--method", "exact", "--drift-beta", "2", "--data", str(data),
                       "--db", str(tmp_path / "m.db"))
    assert code == 2 and one_line(err), err
    assert "--drift-beta" in err and "'drift'" in err
    assert tree(tmp_path) == ["pairs.jsonl"]


# 13
def test_quiet_shows_no_progress_bars(tmp_path, capsys, data):
    code, _, err = run(capsys, "index", "--data", str(data), "--db", str(tmp_path / "a.db"), quiet=False)
    assert code == 0 and "indexing u" in err  # the bar a --quiet run must not show
    code, out, err = run(capsys, "index", "--data", str(data), "--db", str(tmp_path / "b.db"))
    assert code == 0 and "indexed 3 pairs" in out
    assert err == ""
    assert os.environ.get("TQDM_DISABLE") == "1" and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"
    code, out, err = run(capsys, "generate", "--method", "none", "--max-new-tokens", "3", "hi")
    assert code == 0 and err == ""


# 14
def test_json_errors_are_one_object_on_stdout(tmp_path, capsys, data):
    code, out, err = run(capsys, "index", "--json", "--limit", "-1", "--data", str(data),
                         "--db", str(tmp_path / "m.db"))
    assert code == 2 and err == ""
    assert len(out.strip().splitlines()) == 1
    e = json.loads(out)
    assert set(e) == {"error"} and set(e["error"]) == {"message", "type", "param"}
    assert e["error"]["param"] == "--limit" and "--limit" in e["error"]["message"] and e["error"]["type"]
    assert tree(tmp_path) == ["pairs.jsonl"]


# 15
def _option_help(text, option):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option + " "))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.strip() or line.lstrip().startswith("-") and len(line) - len(line.lstrip()) <= 4:
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_help_shows_the_command_lines_preset(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "100")
    assert main([command, "--help"]) == 0
    assert "(default: product)" in _option_help(capsys.readouterr().out, "--preset")


# 16
def test_keys_revoke_takes_options_before_or_after_the_id(tmp_path, capsys):
    db = str(tmp_path / "k.db")
    ids = []
    for _ in range(2):
        code, out, err = run(capsys, "keys", "create", "--tenant", "t", "--db", db, "--json")
        assert code == 0, err
        ids.append(json.loads(out)["key_id"])
    code, out, err = run(capsys, "keys", "revoke", "--db", db, ids[0])
    assert code == 0 and f"revoked {ids[0]}" in out, err
    code, out, err = run(capsys, "keys", "revoke", ids[1], "--db", db)
    assert code == 0 and f"revoked {ids[1]}" in out, err
    code, out, _ = run(capsys, "keys", "list", "--db", db, "--json")
    assert all(k["revoked"] for k in json.loads(out)["keys"])
