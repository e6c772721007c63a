"""The memory's integrity: pair identity by content, additive indexing, duplicate feedback, bad
database files (each with its message and nothing written), schema migration and refusal."""

import json
import os
import sqlite3

import pytest

from prefsteer.cli import main
from prefsteer.errors import MemoryFileError, UnknownUserError
from prefsteer.storage import SCHEMA_VERSION, Memory
from prefsteer.storage.sqlite import SQLiteMemory
from prefsteer.types import pair_key
from prefsteer.methods.exact import Exact, ExactConfig
from prefsteer.retrieval import HashEmbedder
from prefsteer.types import PreferencePair

FAST = ["--backend", "fake", "--embedder", "hash", "--quiet"]


def cli(capsys, *argv):
    code = main(list(argv) + FAST)
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def row(prompt, chosen, rejected, user="u"):
    return {"user_id": user, "prompt": prompt, "chosen": chosen, "rejected": rejected}


JOKE = row("tell me a joke about cats", "funny humor joke", "formal dear sir")
LETTER = row("write a letter to my landlord", "formal dear sir regards", "lol wow")
CODE = row("fix my python script", "python code function", "lol wow")


def entries(capsys, db, user="u"):
    code, out, err = cli(capsys, "profile", "--user", user, "--db", db, "--json")
    assert code == 0, err
    return {e["prompt"]: e["attributes"] for e in json.loads(out)["entries"]}


# -- pair identity and additive indexing --------------------------------------------------------

def test_an_edited_line_is_selected_again_not_served_from_the_old_pair(tmp_path, capsys):
    db = str(tmp_path / "m.db")
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [JOKE, LETTER])
    assert cli(capsys, "index", "--data", str(data), "--db", db, "--k", "1")[0] == 0
    assert entries(capsys, db)["tell me a joke about cats"] == ["Humor"]
    # the same line, the preference flipped: a new pair, selected afresh (not the old Humor)
    flipped = row(JOKE["prompt"], JOKE["rejected"], JOKE["chosen"])
    write_jsonl(data, [flipped, LETTER])
    code, out, _ = cli(capsys, "index", "--data", str(data), "--db", db, "--k", "1", "--json")
    assert code == 0  # the flipped pair's scores come from the cache, but it is selected anew
    mem = Memory(db)
    ids = [p.pair_id for p in mem.pairs("u")]
    assert ids == [pair_key("u", JOKE["prompt"], JOKE["chosen"], JOKE["rejected"]),
                   pair_key("u", LETTER["prompt"], LETTER["chosen"], LETTER["rejected"]),
                   pair_key("u", flipped["prompt"], flipped["chosen"], flipped["rejected"])]
    cid = Exact(load_fake(), memory=mem, embedder=HashEmbedder(),  # the command line's preset
                config=ExactConfig.of_preset("product", k=1)).config_id
    assert mem.selection("u", ids[2], cid)["attributes"] == ["Formal"]
    fresh = str(tmp_path / "fresh.db")
    write_jsonl(tmp_path / "only.jsonl", [flipped])
    cli(capsys, "index", "--data", str(tmp_path / "only.jsonl"), "--db", fresh, "--k", "1")
    assert Memory(fresh).selection("u", ids[2], cid) == mem.selection("u", ids[2], cid)


def load_fake():
    from prefsteer.backends import load_backend

    return load_backend("fake")


def test_a_second_file_adds_to_the_memory_and_replace_is_explicit(tmp_path, capsys):
    db = str(tmp_path / "m.db")
    a = write_jsonl(tmp_path / "a" / "pairs.jsonl", [JOKE, LETTER])
    b = write_jsonl(tmp_path / "b" / "pairs.jsonl", [CODE, LETTER])  # same name, one pair in common
    assert cli(capsys, "index", "--data", a, "--db", db, "--k", "1")[0] == 0
    assert cli(capsys, "index", "--data", b, "--db", db, "--k", "1")[0] == 0
    assert entries(capsys, db) == {JOKE["prompt"]: ["Humor"], LETTER["prompt"]: ["Formal"],
                                   CODE["prompt"]: ["Code"]}
    assert len(Memory(db).pairs("u")) == 3  # the common pair is stored once
    assert cli(capsys, "index", "--data", b, "--db", db, "--k", "1", "--replace")[0] == 0
    assert entries(capsys, db) == {LETTER["prompt"]: ["Formal"], CODE["prompt"]: ["Code"]}
    assert [p.prompt for p in Memory(db).pairs("u")] == [LETTER["prompt"], CODE["prompt"]]


def test_an_explicit_id_with_new_text_is_updated_and_selected_again(tmp_path, fake_backend):
    mem = Memory(tmp_path / "m.db")
    ex = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))
    old = [PreferencePair("u", "a joke", "funny humor joke", "formal dear sir", "mine")]
    mem.add_pairs(old)
    ex.fit("u", old)
    assert mem.selection("u", "mine", ex.config_id)["attributes"] == ["Humor"]
    new = [PreferencePair("u", "a joke", "formal dear sir", "funny humor joke", "mine")]
    assert mem.add_pairs(new) == {"added": 0, "kept": 0, "updated": 1}
    assert mem.selection("u", "mine", ex.config_id) is None and mem.entries("u") == []  # dropped with the old text
    ex.fit("u", new)
    assert [(p.pair_id, p.chosen) for p in mem.pairs("u")] == [("mine", "formal dear sir")]
    assert mem.selection("u", "mine", ex.config_id)["attributes"] == ["Formal"]
    assert [e.attributes for e in mem.entries("u")] == [["Formal"]]


def test_the_same_feedback_twice_is_stored_once_and_different_texts_never_collide(tmp_path, capsys):
    db = str(tmp_path / "m.db")
    fb = ["feedback", "--user", "u", "--db", db, "--k", "1", "--json", "--prompt", CODE["prompt"]]
    for _ in range(2):
        code, out, _ = cli(capsys, *fb, "--chosen", CODE["chosen"], "--rejected", CODE["rejected"])
        assert code == 0
    assert json.loads(out)["stored"][0] == {"user_id": "u", "method": None, "action": "stored",
                                            "added": 0, "kept": 1, "updated": 0}
    code, out, _ = cli(capsys, *fb, "--chosen", "funny humor joke", "--rejected", "formal dear sir")
    assert code == 0 and json.loads(out)["added"][0]["attributes"] == ["Humor"]
    pairs = Memory(db).pairs("u")
    assert [(p.chosen, p.rejected) for p in pairs] == [(CODE["chosen"], CODE["rejected"]),
                                                       ("funny humor joke", "formal dear sir")]
    # one prompt, two pairs: the entry keeps the better selection of the two
    assert len(entries(capsys, db)) == 1


def test_a_failed_feedback_stores_nothing(tmp_path, fake_backend, capsys, monkeypatch):
    db = str(tmp_path / "m.db")
    write_jsonl(tmp_path / "p.jsonl", [JOKE])
    assert cli(capsys, "index", "--data", str(tmp_path / "p.jsonl"), "--db", db, "--k", "1")[0] == 0
    import prefsteer.backends

    # registered for this test only: other tests list the backends available
    monkeypatch.setitem(prefsteer.backends._REGISTRY, "fake-failing", "tests.test_memory:FailingFake")
    code = main(["feedback", "--user", "u", "--prompt", "p", "--chosen", "python code", "--rejected", "lol",
                 "--db", db, "--backend", "fake-failing", "--embedder", "hash", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "RuntimeError: the model failed" in err  # a bug, with its traceback
    assert [p.prompt for p in Memory(db).pairs("u")] == [JOKE["prompt"]]
    # and through the method: the pair, selection and entry go in one transaction after selecting
    mem = Memory(tmp_path / "n.db")
    ex = Exact(FailingFake(), memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))
    with pytest.raises(RuntimeError):
        ex.add_feedback(PreferencePair("v", "p", "a", "b"))
    assert mem.users() == []


class FailingFake:
    """The toy model, whose scoring fails (the model breaking mid-selection)."""

    def __new__(cls, **kw):
        from prefsteer.backends.fake import FakeBackend

        b = FakeBackend()

        def score(requests, progress=False):
            raise RuntimeError("the model failed")

        b.score = score
        return b


def test_delete_user_removes_every_row_and_the_state_blobs(tmp_path, fake_backend):
    mem = Memory(tmp_path / "m.db")
    ex = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))
    for user, ps in (("u", [PreferencePair("u", "a joke", "funny humor joke", "formal dear sir"),
                            PreferencePair("u", "a letter", "formal dear sir", "lol")]),
                     ("w", [PreferencePair("w", "a joke", "funny humor joke", "formal dear sir")])):
        mem.add_pairs(ps)
        ex.fit(user, ps)
    mem.put_method_state("u", "m", "s", "fp", {"w": 1}, files={"weights.bin": b"123"}, n_pairs=2)
    assert mem.delete_user("u") == {"pairs": 2, "selections": 2, "entries": 2, "method_states": 1,
                                    "method_files": 1, "jobs": 0, "user_leases": 0, "users": 1}
    assert mem.users() == ["w"] and set(mem.row_counts("u").values()) == {0}
    assert len(mem.entries("w")) == 1
    with pytest.raises(UnknownUserError):
        mem.delete_user("u")


# -- bad database files ----------------------------------------------------------------------

def _good_db(path):
    mem = Memory(path)
    mem.add_pairs([PreferencePair("u", "p", "a", "b")])
    mem.close()
    return path


def _corrupt(tmp_path):
    p = tmp_path / "junk.db"
    p.write_bytes(b"this is not a database at all, " * 40)
    return p, "is not a readable prefsteer memory"


def _truncated(tmp_path):
    p = _good_db(tmp_path / "t.db")
    c = sqlite3.connect(p)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.executemany("INSERT INTO scores VALUES (?,?,?)", [(f"k{i}", 0.0, 1) for i in range(3000)])
    c.commit()
    c.execute("PRAGMA journal_mode=DELETE")
    c.close()
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, "truncated"


def _read_only(tmp_path):
    p = _good_db(tmp_path / "ro.db")
    p.chmod(0o444)
    return p, "is read-only"


def _newer(tmp_path):
    p = _good_db(tmp_path / "new.db")
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    return p, f"was written by a newer prefsteer (memory schema {SCHEMA_VERSION + 1}"


def _directory(tmp_path):
    p = tmp_path / "adir"
    p.mkdir()
    return p, "is a directory"


def _unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return blocker / "sub" / "m.db", "cannot be created"


@pytest.mark.parametrize("make", [_corrupt, _truncated, _read_only, _newer, _directory, _unwritable],
                         ids=["corrupt", "truncated", "read-only", "newer-schema", "directory", "unwritable"])
def test_a_bad_database_is_one_clear_error_and_nothing_is_written(tmp_path, capsys, make):
    path, message = make(tmp_path)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(MemoryFileError) as ei:
        Memory(path)
    assert str(path) in str(ei.value) and message in str(ei.value)
    data = write_jsonl(tmp_path / "pairs.jsonl", [JOKE])
    for argv in (["index", "--data", data], ["profile", "--user", "u"],
                 ["feedback", "--user", "u", "--prompt", "p", "--chosen", "a", "--rejected", "b"]):
        code, _, err = cli(capsys, *argv, "--db", str(path))
        assert code == 2 and "Traceback" not in err
        # a query of a database that cannot exist says it does not (and creates nothing)
        said = "does not exist" if argv[0] == "profile" and not path.exists() else message
        assert err.count("\n") == 1 and str(path) in err and said in err and "--db" in err
    assert (path.read_bytes() if path.is_file() else None) == before
    assert not os.path.exists(str(path) + "-wal")


# -- schema versions ---------------------------------------------------------------------------

V0_SCHEMA = """
CREATE TABLE users (user_id TEXT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'new');
CREATE TABLE pairs (user_id TEXT NOT NULL, pair_id TEXT NOT NULL, prompt TEXT NOT NULL, chosen TEXT NOT NULL,
    rejected TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}', seq INTEGER NOT NULL, PRIMARY KEY (user_id, pair_id));
CREATE TABLE selections (user_id TEXT NOT NULL, pair_id TEXT NOT NULL, config_id TEXT NOT NULL,
    attributes TEXT NOT NULL, objective REAL NOT NULL, base_objective REAL NOT NULL, gains TEXT NOT NULL,
    PRIMARY KEY (user_id, pair_id, config_id));
CREATE TABLE entries (user_id TEXT NOT NULL, prompt_hash TEXT NOT NULL, prompt TEXT NOT NULL, pair_id TEXT NOT NULL,
    config_id TEXT NOT NULL, attributes TEXT NOT NULL, objective REAL NOT NULL, base_objective REAL NOT NULL,
    gains TEXT NOT NULL, embedder TEXT NOT NULL, embedding BLOB NOT NULL, PRIMARY KEY (user_id, prompt_hash));
CREATE TABLE scores (key TEXT PRIMARY KEY, logprob REAL NOT NULL, n_tokens INTEGER NOT NULL);
"""


def test_a_v0_file_is_migrated_in_one_transaction_with_its_ids_rekeyed_by_content(tmp_path, fake_backend):
    import numpy as np

    path = tmp_path / "old.db"
    c = sqlite3.connect(path)
    c.executescript(V0_SCHEMA)
    c.execute("INSERT INTO users VALUES ('u', 'ready')")
    rows = [("pairs:1", "a joke", "funny humor", "formal"), ("pairs:2", "a letter", "formal sir", "lol"),
            ("feedback:1700000000000", "a joke", "funny humor", "formal"),  # the same content again
            ("mine", "code", "python", "lol")]                             # an id the user gave
    for seq, (pid, pr, ch, rj) in enumerate(rows):
        c.execute("INSERT INTO pairs VALUES ('u',?,?,?,?,'{}',?)", (pid, pr, ch, rj, seq))
        c.execute("INSERT INTO selections VALUES ('u',?,'cfg','[\"Humor\"]',1.0,0.5,'[0.5]')", (pid,))
    emb = np.ones(4, dtype=np.float32).tobytes()
    for pid, pr in (("feedback:1700000000000", "a joke"), ("pairs:2", "a letter"), ("mine", "code")):
        c.execute("INSERT INTO entries VALUES ('u',?,?,?,'cfg','[\"Humor\"]',1.0,0.5,'[0.5]','hash',?)",
                  (pr, pr, pid, emb))
    c.commit()
    c.close()
    mem = Memory(path)
    assert mem.schema_version == SCHEMA_VERSION
    joke, letter = pair_key("u", "a joke", "funny humor", "formal"), pair_key("u", "a letter", "formal sir", "lol")
    assert [p.pair_id for p in mem.pairs("u")] == [joke, letter, "mine"]
    assert {e.prompt: e.pair_id for e in mem.entries("u")} == {"a joke": joke, "a letter": letter, "code": "mine"}
    sel = mem.conn.execute("SELECT pair_id FROM selections ORDER BY pair_id").fetchall()
    assert sorted(r[0] for r in sel) == sorted([joke, letter, "mine"])
    # opening it again changes nothing
    mem.close()
    assert [p.pair_id for p in Memory(path).pairs("u")] == [joke, letter, "mine"]


def test_a_failed_migration_leaves_the_v0_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    c = sqlite3.connect(path)
    c.executescript(V0_SCHEMA)
    c.execute("INSERT INTO users VALUES ('u', 'ready')")
    c.execute("INSERT INTO pairs VALUES ('u','pairs:1','p','a','b','{}',0)")
    c.commit()
    c.close()

    def boom(conn):
        conn.execute("UPDATE pairs SET pair_id='half-done'")
        raise RuntimeError("crash mid-migration")

    monkeypatch.setattr(SQLiteMemory, "_migrate_v0", staticmethod(boom))
    with pytest.raises(RuntimeError):
        Memory(path)
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == 0
    assert c.execute("SELECT pair_id FROM pairs").fetchall() == [("pairs:1",)]
    assert "method_states" not in {r[0] for r in c.execute("SELECT name FROM sqlite_master")}


def test_a_new_file_gets_the_current_schema_version(tmp_path):
    Memory(tmp_path / "m.db").close()
    assert sqlite3.connect(tmp_path / "m.db").execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
