"""The storage contract on both engines (a SQLite file; a PostgreSQL database on a throwaway server):
what is kept, the job queue shared by replicas (atomic claims, leases, one user per worker, tenants in
turn), the integrity of what was accepted, `db copy` between them, and each engine's refusals."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from prefsteer.cli import main
from prefsteer.errors import MemoryFileError, UnknownUserError
from prefsteer.retrieval import HashEmbedder
from prefsteer.storage import SCHEMA_VERSION, TABLES, Entry, Memory
from prefsteer.storage.base import copy_memory
from prefsteer.types import PreferencePair, pair_key


def pairs_of(user: str, n: int, tag: str = "") -> list[PreferencePair]:
    return [PreferencePair(user, f"{tag}question {i} of {user}", f"short answer {i}", f"a long rambling answer {i}!!")
            for i in range(n)]


def entry(user: str, prompt: str, pair_id: str, objective: float) -> Entry:
    return Entry(user, prompt, pair_id, ["Concise"], objective, 0.0, [objective], "hash",
                 np.arange(4, dtype=np.float32), "cfg")


# -- what is kept -------------------------------------------------------------------------------------

def test_pairs_entries_states_and_keys_round_trip(db):
    mem = Memory(db)
    assert mem.schema_version == SCHEMA_VERSION
    ps = pairs_of("u", 3)
    assert mem.add_pairs(ps + ps[:1]) == {"added": 3, "kept": 1, "updated": 0}
    assert [p.pair_id for p in mem.pairs("u")] == [pair_key(p.user_id, p.prompt, p.chosen, p.rejected) for p in ps]
    assert mem.add_pairs([PreferencePair("u", "p", "a", "b", "mine"), PreferencePair("u", "p2", "a", "b", "mine")]) \
        == {"added": 1, "kept": 0, "updated": 1}
    assert mem.pair_count("u") == 4 and mem.pairs("u")[-1].prompt == "p2"
    pid = mem.pairs("u")[0].pair_id
    mem.put_entries("u", [entry("u", ps[0].prompt, pid, 1.5)])
    mem.put_entries("u", [entry("u", ps[0].prompt, pid, 0.5)])  # a lower objective does not replace it
    (e,) = mem.entries("u")
    assert e.objective == 1.5 and e.embedding.tolist() == [0, 1, 2, 3]
    weights = bytes(range(256)) * 40
    mem.put_method_state("u", "reward", "s1", "fp", {"r": 4}, files={"w.safetensors": weights}, n_pairs=4)
    st = mem.method_state("u", "reward", "s1")
    assert st["files"] == {"w.safetensors": weights} and st["state"] == {"r": 4} and not st["stale"]
    assert mem.mark_stale("u") == 1 and mem.method_state("u", "reward", "s1")["stale"]
    key = mem.create_key("acme")
    assert mem.tenant_of(key["key"]) == "acme" and mem.tenant_of("ps-nope") is None
    assert key["key"] not in json.dumps(list(mem.dump("api_keys")))  # only the hash is kept
    assert mem.revoke_key(key["key_id"]) and mem.tenant_of(key["key"]) is None
    removed = mem.delete_user("u")
    assert removed["pairs"] == 4 and removed["entries"] == 1 and removed["method_files"] == 1
    assert set(mem.row_counts("u").values()) == {0}
    with pytest.raises(UnknownUserError):
        mem.pairs("u")
    mem.close()


def test_an_index_keeps_the_entry_of_feedback_given_while_it_ran(db, fake_backend):
    from prefsteer.methods.exact import Exact, ExactConfig

    mem = Memory(db)
    first = pairs_of("u", 4)
    mem.add_pairs(first)
    ex = Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1))
    late = PreferencePair("u", "a question asked while the index ran", "short", "a long rambling answer!!")
    real_select, fed = ex.select, []

    def select(pair):  # midway through the index, the user gives feedback (stored and indexed)
        if not fed:
            fed.append(True)
            mem.add_pairs([late])
            Exact(fake_backend, memory=mem, embedder=HashEmbedder(), config=ExactConfig(k=1)).add_feedback(
                mem.pairs("u")[-1])
        return real_select(pair)

    ex.select = select
    ex.fit("u", mem.pairs("u"))
    assert fed and mem.pair_count("u") == 5
    assert sorted(e.prompt for e in mem.entries("u")) == sorted([p.prompt for p in first] + [late.prompt])
    mem.close()


# -- the job queue --------------------------------------------------------------------------------------

def test_jobs_are_claimed_once_each_and_one_user_is_never_worked_by_two(db):
    setup = Memory(db)
    jobs = {setup.add_job("t", f"t/u{i % 5}", [f"p{i}"]) for i in range(30)}
    setup.close()
    claims: dict[str, list[str]] = {}
    overlap: list[str] = []
    busy: dict[str, str] = {}
    guard = threading.Lock()

    def replica(name: str) -> None:
        mem = Memory(db)  # each replica its own connection (SQLite) or pool (PostgreSQL)
        while True:
            job = mem.claim_job(name, lease_seconds=30)
            if job is None:
                if mem.queue_depth().get("t", 0) == 0:
                    break
                time.sleep(0.01)
                continue
            with guard:
                claims.setdefault(job["job_id"], []).append(name)
                if job["user_id"] in busy:
                    overlap.append(job["user_id"])
                busy[job["user_id"]] = name
            time.sleep(0.005)
            with guard:
                busy.pop(job["user_id"])
            assert mem.release_job(job["job_id"], name, status="done", finished=time.time())
        mem.close()

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(claims) == jobs and all(len(v) == 1 for v in claims.values())
    assert overlap == []  # a user's jobs were never worked by two replicas at once
    assert len({n for v in claims.values() for n in v}) > 1


def test_a_dead_replicas_job_is_taken_over_after_its_lease_and_a_live_ones_never(db):
    mem = Memory(db)
    jid = mem.add_job("t", "t/u", ["p1", "p2"])
    other = mem.add_job("t", "t/u", ["p3"])  # the same user: leased with the first job
    a = mem.claim_job("replica-a", lease_seconds=0.6)
    assert a["job_id"] == jid and a["status"] == "running" and a["owner"] == "replica-a"
    assert mem.claim_job("replica-b", lease_seconds=30) is None  # a's job and a's user are a's
    assert mem.renew_lease(jid, "replica-a", 0.6)
    time.sleep(0.4)
    assert mem.claim_job("replica-b", lease_seconds=30) is None  # renewed: still alive
    assert mem.update_job(jid, holder="replica-a", done=1)
    time.sleep(0.8)  # replica a died: no renewal
    b = mem.claim_job("replica-b", lease_seconds=30)
    assert b["job_id"] == jid and b["owner"] == "replica-b" and b["done"] == 1  # resumes where a was
    assert not mem.renew_lease(jid, "replica-a", 30) and not mem.update_job(jid, holder="replica-a", done=2)
    assert mem.release_job(jid, "replica-b", status="done")
    c = mem.claim_job("replica-c", lease_seconds=30)  # b let the user go with the job
    assert c["job_id"] == other
    mem.close()


def test_one_tenants_backlog_does_not_hold_up_anothers_first_job(db):
    mem = Memory(db)
    backlog = [mem.add_job("big", f"big/u{i % 3}", [f"p{i}"]) for i in range(60)]
    first = mem.claim_job("w", lease_seconds=30)
    assert first["job_id"] == backlog[0]
    small = mem.add_job("small", "small/u", ["q"])
    assert mem.others_waiting("big")
    mem.release_job(first["job_id"], "w", status="queued", done=0)  # the worker yields between two pairs
    assert mem.claim_job("w", lease_seconds=30)["job_id"] == small
    assert mem.queue_depth() == {"big": 60, "small": 1}
    mem.close()


# -- copying a memory between engines -----------------------------------------------------------------

def _fill(mem: Memory) -> None:
    mem.add_pairs(pairs_of("a/u", 3) + pairs_of("b/v", 2))
    for p in mem.pairs("a/u"):
        mem.put_selection("a/u", p.pair_id, "cfg", ["Concise"], 1.0, 0.2, [0.8])
        mem.put_entries("a/u", [entry("a/u", p.prompt, p.pair_id, 1.0)])
    mem.put_method_state("b/v", "reward", "s", "fp", {"x": 1}, files={"w": b"\x00\x01weights\xff"}, n_pairs=2)
    mem.create_key("a")
    mem.add_job("a", "a/u", ["x"])
    from prefsteer.backends.base import Score

    mem.put_scores({"k1": Score(-1.25, 3)})


def test_db_copy_sqlite_to_postgresql_and_back_keeps_every_row(tmp_path, postgres, capsys):
    first, url, back = str(tmp_path / "a.db"), postgres.new_database(), str(tmp_path / "b.db")
    mem = Memory(first)
    _fill(mem)
    want = mem.table_counts()
    mem.close()
    assert main(["db", "copy", first, url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == want and all(want[t] for t in ("pairs", "entries", "method_files", "jobs", "scores"))
    assert main(["db", "copy", url, back]) == 0
    capsys.readouterr()
    a, b = Memory(first), Memory(back)
    for table in TABLES:
        assert list(a.dump(table)) == list(b.dump(table)), table
    assert b.method_state("b/v", "reward", "s")["files"] == {"w": b"\x00\x01weights\xff"}
    # a database that is not empty is refused, and nothing is written to it
    assert main(["db", "copy", first, url]) == 2
    assert "is not empty" in capsys.readouterr().err and Memory(url).table_counts() == want


# -- each engine's refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", ["another_app", "other_tables", "pairs_of_another_shape"])
def test_a_sqlite_file_that_is_not_a_prefsteer_memory_is_refused_untouched(tmp_path, make):
    path = tmp_path / "invoices.db"
    c = sqlite3.connect(path)
    if make == "another_app":
        c.execute("PRAGMA application_id=1234")
        c.execute("CREATE TABLE users (user_id TEXT)")
    elif make == "other_tables":
        c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    else:
        c.execute("CREATE TABLE pairs (a TEXT, b TEXT)")
    c.commit()
    c.close()
    before = path.read_bytes()
    with pytest.raises(MemoryFileError) as e:
        Memory(path)
    assert str(path) in str(e.value) and "nothing was changed" in str(e.value)
    assert path.read_bytes() == before and not (tmp_path / "invoices.db-wal").exists()


def test_a_deleted_users_text_is_in_no_file_of_the_sqlite_memory(tmp_path):
    path = tmp_path / "m.db"
    mem = Memory(path)
    secret = "my-very-secret-question-about-zebras"
    mem.add_pairs([PreferencePair("gone", secret, "short", "long!!"), PreferencePair("kept", "hello", "a", "b")])
    mem.put_entries("gone", [entry("gone", secret, mem.pairs("gone")[0].pair_id, 1.0)])
    files = [path, tmp_path / "m.db-wal"]
    assert any(secret.encode() in f.read_bytes() for f in files if f.exists())
    mem.delete_user("gone")
    assert not any(secret.encode() in f.read_bytes() for f in files if f.exists())
    assert mem.users() == ["kept"]


def test_a_schema_1_file_moves_its_method_files_into_the_database(tmp_path):
    from prefsteer.storage.sqlite import SQLiteMemory
    from prefsteer.types import sha

    path = tmp_path / "m.db"
    mem = Memory(path)
    mem.add_pairs(pairs_of("u", 1))
    mem.conn.execute("INSERT INTO method_states VALUES ('u','reward','s1','fp','{}','[\"reward-s1-w.bin\"]',1,0,0)")
    mem.conn.execute("PRAGMA user_version=1")
    mem.conn.execute("PRAGMA application_id=0")
    mem.close()
    folder = tmp_path / "m.db.d" / sha("u")[:24]
    folder.mkdir(parents=True)
    (folder / "reward-s1-w.bin").write_bytes(b"adapter weights")
    mem = SQLiteMemory(path)
    assert mem.schema_version == SCHEMA_VERSION
    assert mem.method_state("u", "reward", "s1")["files"] == {"w.bin": b"adapter weights"}
    assert not (tmp_path / "m.db.d").exists() and mem.pair_count("u") == 1


def test_a_postgresql_url_is_a_database_never_a_file_path(tmp_path, postgres, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = postgres.new_database()
    assert main(["keys", "create", "--tenant", "acme", "--db", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tenant"] == "acme"
    assert list(tmp_path.iterdir()) == []  # no ./postgresql: folder, no file
    assert Memory(url).count_keys() == 1


def test_postgresql_refusals_name_the_database_without_its_password(postgres):
    import psycopg

    url = postgres.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    with pytest.raises(MemoryFileError, match="is not a prefsteer memory .*invoices.*nothing was changed"):
        Memory(url)
    with pytest.raises(MemoryFileError) as e:
        Memory(f"postgresql://postgres:hunter2@127.0.0.1:{postgres.port}/no_such_db")
    assert "hunter2" not in str(e.value) and "cannot be reached" in str(e.value) and "***" in str(e.value)
    with pytest.raises(MemoryFileError, match="mysql://"):
        Memory("mysql://u@h/db")


# -- a pair's identity survives file names and migrations ------------------------------------------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _index(db: str, data, capsys) -> None:
    assert main(["index", "--data", str(data), "--db", db, "--backend", "fake", "--embedder", "hash", "--quiet"]) == 0
    capsys.readouterr()


def test_two_tldr_files_of_the_same_name_in_two_folders_are_both_kept(tmp_path, capsys):
    src = (FIXTURES / "tldr_small.json").read_text().splitlines()
    other = [json.loads(line) for line in src]
    for o in other:  # other comparisons, as another batch of the same name would hold
        o["summaries"][0]["text"] += " (second batch)"
    for folder, lines in (("a", src), ("b", [json.dumps(o) for o in other])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "batch13.json").write_text("\n".join(lines) + "\n")
    db = str(tmp_path / "m.db")
    _index(db, tmp_path / "a" / "batch13.json", capsys)
    _index(db, tmp_path / "b" / "batch13.json", capsys)
    mem = Memory(db)
    assert sum(mem.pair_count(u) for u in mem.users()) == 2 * len(src)


def test_after_the_v0_migration_the_same_tldr_file_adds_no_pair(tmp_path, capsys):
    from prefsteer.data import load_pairs

    from tests.test_memory import V0_SCHEMA

    pairs = load_pairs(FIXTURES / "tldr_small.json")
    path = tmp_path / "old.db"
    c = sqlite3.connect(path)
    c.executescript(V0_SCHEMA)
    for i, p in enumerate(pairs):  # as prefsteer 0.x stored them: "<file stem>:<line>"
        c.execute("INSERT OR IGNORE INTO users VALUES (?, 'ready')", (p.user_id,))
        c.execute("INSERT INTO pairs VALUES (?,?,?,?,?,'{}',?)",
                  (p.user_id, f"tldr_small:{i}", p.prompt, p.chosen, p.rejected, i))
    c.commit()
    c.close()
    _index(str(path), FIXTURES / "tldr_small.json", capsys)
    mem = Memory(path)
    stored = [q for u in mem.users() for q in mem.pairs(u)]
    assert sorted(q.pair_id for q in stored) == sorted(p.pair_id for p in pairs)  # once each, by content
