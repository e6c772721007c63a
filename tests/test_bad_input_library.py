"""Bad input met in the library, before the CLI: each is a `PrefsteerError` naming the thing, and
nothing is created or written on the way."""

import json
import os
import time

import pytest

from prefsteer.errors import (BackendUnavailableError, EmbedderUnavailableError, InputError, MemoryFileError,
                              MemoryNotFoundError, PrefsteerError)
from prefsteer.storage import Memory


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- 1. read-only queries never create anything ---------------------------------------------------

def test_opening_a_missing_memory_for_a_query_creates_nothing(tmp_path):
    db = tmp_path / "no" / "such" / "dir" / "m.db"
    with pytest.raises(MemoryNotFoundError) as e:
        Memory(db, create=False)
    assert str(db) in str(e.value) and "does not exist" in str(e.value)
    assert isinstance(e.value, PrefsteerError) and isinstance(e.value, FileNotFoundError)
    assert e.value.path == str(db)
    assert tree(tmp_path) == []  # neither the file nor its folders

    flat = tmp_path / "m.db"
    with pytest.raises(MemoryNotFoundError):
        Memory(flat, create=False)
    assert tree(tmp_path) == []


def test_default_memory_path_is_not_created_by_a_query(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTEER_DB", str(tmp_path / "data" / "memory.db"))
    with pytest.raises(MemoryNotFoundError, match="memory.db does not exist"):
        Memory(None, create=False)
    assert tree(tmp_path) == []


def test_an_existing_memory_opens_for_a_query(tmp_path):
    from prefsteer.types import PreferencePair

    db = tmp_path / "m.db"
    mem = Memory(db)
    mem.add_pairs([PreferencePair("alice", "p", "a", "b")])
    mem.close()
    q = Memory(db, create=False)
    assert q.users() == ["alice"]
    q.close()
    assert Memory(":memory:", create=False).users() == []


def test_an_empty_db_path_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for create in (True, False):
        with pytest.raises(MemoryFileError) as e:
            Memory("", create=create)
        assert "empty path" in str(e.value) and "is a directory" not in str(e.value)
        assert "--db" in str(e.value)
    assert tree(tmp_path) == []


# -- 2. a full disk while a method writes its state -------------------------------------------------

def test_a_full_disk_keeps_the_previous_state_and_names_the_database(tmp_path):
    db = tmp_path / "m.db"
    mem = Memory(db)
    mem.put_method_state("u", "reward", "s1", "fp", {"v": 1}, files={"a.bin": b"old-a", "b.bin": b"old-b"})
    pages = mem.conn.execute("PRAGMA page_count").fetchone()[0]
    mem.conn.execute(f"PRAGMA max_page_count={pages + 1}")  # the disk is full one page later
    with pytest.raises(MemoryFileError) as e:
        mem.put_method_state("u", "reward", "s1", "fp", {"v": 2}, files={"a.bin": b"new-a" * 5000,
                                                                          "b.bin": b"new-b" * 5000})
    assert str(db) in str(e.value) and "full" in str(e.value) and "--db" in str(e.value)
    st = mem.method_state("u", "reward", "s1")  # all or nothing: the previous state and both its files
    assert st["state"] == {"v": 1} and st["files"] == {"a.bin": b"old-a", "b.bin": b"old-b"}
    with pytest.raises(MemoryFileError):  # a user's first state: nothing of the user is stored
        mem.put_method_state("v", "reward", "s1", "fp", {"v": 1}, files={"a.bin": b"x" * 50000})
    assert mem.method_state("v", "reward", "s1") is None and not mem.has_user("v")


# -- 3. lone surrogates and bad bytes in JSONL --------------------------------------------------------

GOOD = {"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}


def _jsonl(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_a_lone_surrogate_names_file_line_and_field(tmp_path):
    from prefsteer.data.loaders import load_jsonl, load_pairs

    bad = json.dumps(GOOD).replace('"a"', '"ok \\ud800 text"').encode()
    path = _jsonl(tmp_path / "pairs.jsonl", [json.dumps(GOOD).encode(), bad])
    for load in (load_jsonl, load_pairs):
        with pytest.raises(InputError) as e:
            load(path)
        assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, "chosen")
        assert f"{path}:2" in str(e.value) and "surrogate" in str(e.value) and "\\ud800" in str(e.value)


def test_a_lone_surrogate_in_an_extra_field_or_key(tmp_path):
    from prefsteer.data.loaders import load_jsonl

    rec = dict(GOOD, meta={"tags": ["fine", "\ud800"]})
    path = _jsonl(tmp_path / "p.jsonl", [json.dumps(rec).encode()])
    with pytest.raises(InputError) as e:
        load_jsonl(path)
    assert e.value.line == 1 and e.value.field == "meta.tags[1]"
    path = _jsonl(tmp_path / "k.jsonl", [json.dumps(dict(GOOD, **{"\udc80x": 1})).encode()])
    with pytest.raises(InputError, match="surrogate"):
        load_jsonl(path)
    # a proper pair of surrogate escapes is one character, and fine
    ok = json.dumps(dict(GOOD, chosen="\U0001F600")).encode()
    assert b"\\ud83d\\ude00" in ok
    assert load_jsonl(_jsonl(tmp_path / "ok.jsonl", [ok]))[0].chosen == "\U0001F600"


def test_invalid_utf8_bytes_name_the_line(tmp_path):
    from prefsteer.data.loaders import load_jsonl

    path = _jsonl(tmp_path / "p.jsonl", [json.dumps(GOOD).encode(), b'{"user_id": "u\xff\xfe", "prompt": "p"}'])
    with pytest.raises(InputError) as e:
        load_jsonl(path)
    assert e.value.line == 2 and "UTF-8" in str(e.value) and f"{path}:2" in str(e.value)


# -- 4. backends that are unknown or not installed ------------------------------------------------------

def test_an_unknown_backend_lists_the_available_ones():
    from prefsteer.backends import check_backend, load_backend

    for call in (load_backend, check_backend):
        with pytest.raises(BackendUnavailableError) as e:
            call("bogus")
        msg = str(e.value)
        assert "unknown backend 'bogus'" in msg and "fake" in msg and "hf" in msg
        assert isinstance(e.value, ValueError)


def test_vllm_without_vllm_says_how_to_install_it_before_loading_anything(monkeypatch):
    import importlib.util
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from prefsteer.backends import check_backend, load_backend, usable_backends

    before = set(sys.modules)
    with pytest.raises(BackendUnavailableError) as e:
        load_backend("vllm", model="/no/such/model")
    msg = str(e.value)
    assert "'vllm'" in msg and "scripts/bootstrap_vllm.sh" in msg and "available here: fake, hf" in msg
    assert not {m for m in set(sys.modules) - before if m.startswith("prefsteer.backends.vllm")}
    assert "vllm" not in usable_backends()
    with pytest.raises(BackendUnavailableError, match="bootstrap_vllm.sh"):
        check_backend("bogus")
    check_backend("fake")


# -- 5. CLIPer preferences with no head for this model ---------------------------------------------------

@pytest.fixture
def isolated_cliper(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path / "user-cliper"))
    return tmp_path


def _fake_head(directory, name, fingerprint):
    from prefsteer.methods.cliper.heads import PreferenceHead, save_classifier

    save_classifier(PreferenceHead(8, rank=2, meta={"name": name, "fingerprint": fingerprint}), directory)


def test_cliper_with_no_head_for_the_model_says_which_exist_and_how_to_train(fake_backend, isolated_cliper):
    from prefsteer.methods.cliper import Cliper
    from prefsteer.methods.cliper.heads import ClassifierNotFoundError

    with pytest.raises(ClassifierNotFoundError) as e:
        Cliper(fake_backend, prefs="concise=1")
    msg = str(e.value)
    assert isinstance(e.value, PrefsteerError) and isinstance(e.value, ValueError)
    assert "'concise' was trained for another model" in msg and fake_backend.fingerprint in msg
    assert "Classifiers for this model: none" in msg
    assert "prefsteer cliper train --prefs concise" in msg
    assert e.value.available == [] and e.value.fingerprint == fake_backend.fingerprint

    heads = isolated_cliper / "heads"
    _fake_head(heads, "humor", fake_backend.fingerprint)
    with pytest.raises(ClassifierNotFoundError) as e:
        Cliper(fake_backend, prefs="humor,concise", classifier_dirs=[str(heads)])
    assert "Classifiers for this model: humor." in str(e.value) and e.value.available == ["humor"]


def test_load_classifier_of_an_unknown_name(fake_backend, isolated_cliper):
    from prefsteer.methods.cliper.heads import ClassifierNotFoundError, load_classifier

    heads = isolated_cliper / "heads"
    _fake_head(heads, "mine", fake_backend.fingerprint)
    with pytest.raises(ClassifierNotFoundError) as e:
        load_classifier("yours", fake_backend.fingerprint, [heads])
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)  # what callers caught before
    assert "no classifier 'yours'" in msg and "Classifiers for this model: mine." in msg
    assert "PREFSTEER_CLIPER_DIR" in msg


def test_parse_prefs_errors_are_input_errors():
    from prefsteer.methods.cliper.prefs import parse_prefs

    with pytest.raises(InputError, match="unknown preference 'sarcasm'") as e:
        parse_prefs("sarcasm=1")
    assert e.value.field == "prefs" and str(e.value).startswith("`prefs`")


# -- 6. an embedder that cannot be loaded fails fast ---------------------------------------------------

def test_an_unknown_embedder_fails_fast_offline(monkeypatch, tmp_path):
    from prefsteer.retrieval import check_embedder, load_embedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for call in (check_embedder, load_embedder):
        start = time.monotonic()
        with pytest.raises(EmbedderUnavailableError) as e:
            call("nonexistent")
        assert time.monotonic() - start < 5
        msg = str(e.value)
        assert "embedder 'nonexistent'" in msg and "'hash'" in msg and "HF_HUB_OFFLINE" in msg
        assert "all-MiniLM-L6-v2" in msg


def test_an_unreachable_hub_is_asked_once(monkeypatch):
    import prefsteer.retrieval as r

    asked = []

    def probe(repo_id, timeout):
        asked.append((repo_id, timeout))
        return "is not in the local cache, and the hub is unreachable (ConnectError: no route)"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(r, "_hub_offline", lambda: False)
    monkeypatch.setattr(r, "_hub_probe", probe)
    with pytest.raises(EmbedderUnavailableError, match="hub is unreachable"):
        r.load_embedder("nonexistent-model-xyz")
    assert asked == [("sentence-transformers/nonexistent-model-xyz", r.HUB_PROBE_SECONDS)]


def test_the_real_probe_returns_within_its_timeout(monkeypatch):
    """Whatever the network here (none, or the hub), one probe ends within its timeout."""
    import prefsteer.retrieval as r

    start = time.monotonic()
    r._hub_probe("sentence-transformers/prefsteer-no-such-model-4f1c", 2.0)
    assert time.monotonic() - start < 4.5


def test_embedder_paths(tmp_path):
    from prefsteer.retrieval import check_embedder

    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(EmbedderUnavailableError, match="is a file"):
        check_embedder(str(tmp_path / "file.bin"))
    with pytest.raises(EmbedderUnavailableError, match="no such path"):
        check_embedder(str(tmp_path / "nope"))
    with pytest.raises(EmbedderUnavailableError, match="empty name"):
        check_embedder("")
    assert check_embedder("hash") == "hash"
    assert check_embedder(str(tmp_path)) == "local"
    assert tree(tmp_path) == ["file.bin"]
