"""The CLI end to end on the toy backend and the model-free embedder (fast)."""

import json

import pytest

from prefsteer.cli import main

FAST = ["--backend", "fake", "--embedder", "hash", "--quiet"]


def run(capsys, *argv):
    code = main(list(argv) + FAST)
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


ROWS = [
    {"user_id": "u", "prompt": "tell me a joke about cats", "chosen": "funny humor joke", "rejected": "formal dear sir"},
    {"user_id": "u", "prompt": "write a letter to my landlord", "chosen": "formal dear sir regards", "rejected": "lol wow"},
    {"user_id": "w", "prompt": "explain my code", "chosen": "python code function", "rejected": "lol"},
]


def test_index_profile_generate_feedback_round_trip(tmp_path, capsys):
    db = str(tmp_path / "m.db")
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    code, out, _ = run(capsys, "index", "--data", str(data), "--db", db, "--k", "1", "--json")
    assert code == 0
    rep = json.loads(out)
    assert [(u["user_id"], u["pairs"], u["entries"]) for u in rep["users"]] == [("u", 2, 2), ("w", 1, 1)]

    code, out, _ = run(capsys, "profile", "--user", "u", "--db", db, "--json")
    prof = json.loads(out)
    assert prof["status"] == "ready"
    assert {e["prompt"]: e["attributes"] for e in prof["entries"]} == {
        "tell me a joke about cats": ["Humor"], "write a letter to my landlord": ["Formal"]}
    assert all(len(e["gains"]) == 1 for e in prof["entries"])

    code, out, _ = run(capsys, "generate", "--user", "u", "--db", db, "--k", "1", "--json",
                       "--max-new-tokens", "5", "a joke about cats please")
    gen = json.loads(out)
    assert code == 0 and gen["attributes"] == ["Humor"] and gen["text"]
    # the command line's default is EXACT's product preset: an instruction in the user's turn
    assert gen["prompt"] == "a joke about cats please\nAnswer in a way that is: humor." and "system" not in gen
    assert set(gen["timings"]) >= {"retrieval", "generation", "overhead_pct"}

    code, out, _ = run(capsys, "feedback", "--user", "u", "--db", db, "--k", "1", "--json",
                       "--prompt", "fix my python script", "--chosen", "python code", "--rejected", "lol wow")
    assert code == 0 and json.loads(out)["added"][0]["attributes"] == ["Code"]
    code, out, _ = run(capsys, "profile", "--user", "u", "--db", db, "--json")
    assert len(json.loads(out)["entries"]) == 3


def test_generate_none_is_plain_greedy_and_reproducible(tmp_path, capsys):
    a = run(capsys, "generate", "--method", "none", "--json", "--max-new-tokens", "6", "hello there")
    b = run(capsys, "generate", "--method", "none", "--json", "--max-new-tokens", "6", "hello there")
    assert a[0] == 0 and json.loads(a[1])["text"] == json.loads(b[1])["text"]
    assert json.loads(a[1])["attributes"] == []


def test_generate_with_explicit_attributes_and_an_unknown_one(capsys):
    code, out, _ = run(capsys, "generate", "--method", "none", "--attributes", "concise,humor", "--json",
                       "--max-new-tokens", "3", "hi")
    assert code == 0 and json.loads(out)["attributes"] == ["Concise", "Humor"]
    code, _, err = run(capsys, "generate", "--attributes", "Grumpy", "hi")
    assert code == 2 and "unknown attribute 'Grumpy'" in err


def test_unknown_user_is_a_clear_error(tmp_path, capsys):
    # a mistyped --db: said so, and a query creates nothing
    code, _, err = run(capsys, "generate", "--user", "ghost", "--db", str(tmp_path / "no" / "m.db"), "hi")
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists()
    code, _, err = run(capsys, "profile", "--user", "ghost", "--db", str(tmp_path / "no" / "m.db"))
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists()
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert run(capsys, "index", "--method", "base", "--data", str(data), "--db", str(tmp_path / "m.db"))[0] == 0
    code, _, err = run(capsys, "generate", "--user", "ghost", "--db", str(tmp_path / "m.db"), "hi")
    assert code == 2 and "unknown user 'ghost'" in err


@pytest.mark.parametrize("content, line, field", [
    ('{"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}\n{"user_id": "u", "prompt": "p",', 2, None),
    ('{"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}\n{"user_id": "u", "prompt": "p", "chosen": "a"}', 2, "rejected"),
    ('{"user_id": "u", "prompt": "  ", "chosen": "a", "rejected": "b"}', 1, "prompt"),
    ('{"user_id": "u", "prompt": "p", "chosen": "same", "rejected": "same"}', 1, None),
])
def test_bad_files_name_file_line_field_and_write_nothing(tmp_path, capsys, content, line, field):
    db = tmp_path / "m.db"
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    code, _, err = run(capsys, "index", "--data", str(data), "--db", str(db))
    assert code == 2
    assert f"{data}:{line}" in err
    if field:
        assert f"'{field}'" in err
    from prefsteer.storage import Memory
    assert Memory(db).users() == []


def test_prompt_longer_than_the_context_is_refused_before_writing(tmp_path, capsys):
    from prefsteer.backends import register_backend

    register_backend("fake-short", "tests.test_cli:ShortFake")
    db = tmp_path / "m.db"
    rows = [ROWS[0], {"user_id": "u", "prompt": "word " * 200, "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code = main(["index", "--data", str(data), "--db", str(db), "--backend", "fake-short", "--embedder", "hash",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2" in err and "context of 100" in err
    from prefsteer.storage import Memory
    assert Memory(db).users() == []


class ShortFake:
    def __new__(cls, **kw):
        from prefsteer.backends.fake import FakeBackend
        return FakeBackend(max_context=100)


def test_attributes_lists_the_library(capsys):
    code, out, _ = run(capsys, "attributes", "--json")
    lib = json.loads(out)
    assert code == 0 and len(lib["attributes"]) == 42 and lib["attributes"][2]["name"] == "Concise"


def test_feedback_without_fields_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "feedback", "--user", "u", "--prompt", "p", "--db", str(tmp_path / "m.db"))
    assert code == 2 and "'--chosen'" in err
    code, _, err = run(capsys, "feedback", "--user", "u", "--prompt", "p", "--chosen", "x", "--rejected", "x",
                       "--db", str(tmp_path / "m.db"))
    assert code == 2 and "same text" in err


def test_every_method_indexes_then_generates_and_profiles_from_the_memory(tmp_path, capsys):
    """Each call of `main` builds its method afresh from the database, as a new process does."""
    db = str(tmp_path / "m.db")
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    for m, opts in (("exact-global", ["--k", "1"]), ("base", []), ("drift", [])):
        code, out, err = run(capsys, "index", "--method", m, "--data", str(data), "--db", db, *opts, "--json")
        assert code == 0, err
        assert [(u["user_id"], u["pairs"]) for u in json.loads(out)["users"]] == [("u", 2), ("w", 1)]
    code, out, err = run(capsys, "generate", "--method", "exact-global", "--user", "u", "--db", db, "--k", "1",
                         "--json", "--max-new-tokens", "4", "anything")
    assert code == 0 and json.loads(out)["attributes"] == ["Humor"], err
    code, out, _ = run(capsys, "profile", "--user", "u", "--db", db, "--json")
    prof = json.loads(out)
    assert prof["entries"] == [] and prof["pairs"] == 2
    assert sorted(s["method"] for s in prof["methods"]) == ["base", "drift", "exact-global"]
    glob = next(s for s in prof["methods"] if s["method"] == "exact-global")
    assert glob["state"]["attributes"] == ["Humor"] and glob["n_pairs"] == 2 and not glob["stale"]
    # feedback: exact-global cannot take a pair without refitting, so it says its state is stale;
    # Base rebuilds its history prompt and Drift refits (both from every stored pair)
    code, out, _ = run(capsys, "feedback", "--user", "u", "--db", db, "--k", "1", "--json",
                       "--prompt", "fix my python script", "--chosen", "python code", "--rejected", "lol wow")
    actions = {r["method"]: r["action"] for r in json.loads(out)["methods"]}
    assert code == 0 and actions == {"exact-global": "stale", "base": "refit", "drift": "refit"}
    code, out, _ = run(capsys, "profile", "--user", "u", "--db", db, "--json")
    prof = json.loads(out)
    states = {s["method"]: s for s in prof["methods"]}
    assert prof["pairs"] == 3 and states["exact-global"]["stale"]
    assert (states["base"]["n_pairs"], states["drift"]["n_pairs"]) == (3, 3)
    assert not states["base"]["stale"] and states["base"]["state"]["pairs_in_prompt"] == 3


def test_method_options_reach_the_methods_config(tmp_path, capsys):
    from prefsteer.cli import Context, make_parser

    ctx = Context(make_parser().parse_args(["generate", "--method", "drift", "--drift-beta", "2.5", "hi", *FAST]))
    assert ctx.method("drift").config.beta == 2.5
    ctx = Context(make_parser().parse_args(["generate", "--method", "exact", "--k", "4", "hi", *FAST]))
    assert ctx.method("exact").config.k == 4 and ctx.method("exact-global").config.k == 4
    # another method's option is refused by name, before anything is built or written
    code, _, err = run(capsys, "index", "--method", "exact", "--drift-beta", "2", "--data", "x.jsonl",
                       "--db", str(tmp_path / "never.db"))
    assert code == 2 and "--drift-beta is an option of method 'drift', not of 'exact'" in err
    assert not (tmp_path / "never.db").exists()
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    code, _, err = run(capsys, "index", "--method", "drift", "--drift-beta", "-1", "--data", str(data),
                       "--db", str(tmp_path / "m.db"))
    assert code == 2 and "`beta` (=-1.0) has to be a strictly positive float" in err and "Traceback" not in err


def test_argparse_errors_exit_2_and_a_bug_exits_1_with_its_traceback(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "index", "--method", "nope", "--data", "x")
    assert code == 2 and "invalid choice: 'nope'" in err
    code, _, err = run(capsys, "profile")
    assert code == 2 and "--user" in err
    import prefsteer.cli.attributes as attributes_cmd

    def broken(args, ctx):
        raise KeyError("a bug")

    monkeypatch.setattr(attributes_cmd, "cmd_attributes", broken)
    code, _, err = run(capsys, "attributes")
    assert code == 1 and "Traceback" in err and "KeyError: 'a bug'" in err


def test_index_reports_every_bad_line_at_once_and_writes_nothing(tmp_path, capsys):
    db = tmp_path / "m.db"
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([json.dumps(ROWS[0]), '{"user_id": "u", "prompt": "Hi", "chosen":',
                               json.dumps({**ROWS[0], "rejected": ROWS[0]["chosen"]}),
                               json.dumps({**ROWS[1], "user_id": ""})]) + "\n")
    code, _, err = run(capsys, "index", "--data", str(data), "--db", str(db))
    assert code == 2 and "3 bad lines" in err and "Traceback" not in err
    assert f"{data}:2: malformed JSON" in err
    assert f"{data}:3: field 'rejected': chosen and rejected are the same text" in err
    assert f"{data}:4: field 'user_id': empty" in err
    from prefsteer.storage import Memory
    assert Memory(db).users() == []


def test_eval_and_cliper_are_subcommands_of_the_one_parser():
    from prefsteer.cli import make_parser

    p = make_parser()
    a = p.parse_args(["eval", "compare", "r1", "r2", "--json"])
    assert (a.ref, a.other, a.json, a.func.__name__) == ("r1", "r2", True, "cmd_compare")
    a = p.parse_args(["eval", "report", "run", "--backend", "fake"])
    assert (a.run_dir, a.backend, a.func.__name__) == ("run", "fake", "cmd_report")
    a = p.parse_args(["eval", "--config", "quick", "--backend", "fake", "--embedder", "hash"])
    assert (a.config, a.func.__name__, a.embedder) == ("quick", "cmd_eval", "hash")
    a = p.parse_args(["cliper", "train", "--backend", "fake", "--steps", "3", "--db", "x.db"])
    assert (a.steps, a.backend, a.db, a.func.__name__) == (3, "fake", "x.db", "run_train")


def test_every_command_closes_the_backend_it_loaded_even_when_it_fails(tmp_path, capsys, monkeypatch):
    """vLLM's engine process is stopped by the command, not left to interpreter exit (where it could
    abort the process after the work was written)."""
    import prefsteer.backends as backends
    from prefsteer.backends.fake import FakeBackend

    closed = []

    class Closing(FakeBackend):
        def close(self):
            closed.append(self)
            super().close()

    monkeypatch.setattr(backends, "load_backend", lambda name, **kw: Closing())
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    db = str(tmp_path / "m.db")
    code, _, _ = run(capsys, "index", "--method", "exact", "--k", "1", "--data", str(data), "--db", db)
    assert code == 0 and len(closed) == 1
    code, _, err = run(capsys, "generate", "--method", "exact", "--user", "nobody", "--db", db, "hi")
    assert code == 2 and len(closed) == 2 and closed[0] is not closed[1]
    code, _, _ = run(capsys, "attributes")  # loads no backend: nothing to close
    assert code == 0 and len(closed) == 2
