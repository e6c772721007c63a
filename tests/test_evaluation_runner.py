"""The runner, the Base method, reports and `prefsteer eval` on the fake backend."""

import json
import random

import pytest

from prefsteer.cli import main
from prefsteer.evaluation.protocol import config_from_dict
from prefsteer.evaluation.report import write_report
from prefsteer.evaluation.runner import Runner, make_jobs, read_records
from prefsteer.methods import get_method_class
from prefsteer.methods.history import BasePrompt, build_system_prompt
from prefsteer.methods.plain import plain_margins
from prefsteer.types import PreferencePair

WORDS = "funny joke humor concise short brief formal dear sir regards story data code happy sad".split()


def write_data(path, n_users=4, sizes=(22, 25, 30, 12)):
    rng = random.Random(0)
    with path.open("w") as fh:
        for u in range(n_users):
            for i in range(sizes[u % len(sizes)]):
                topic = rng.choice(["joke", "letter", "story"])
                fh.write(json.dumps({"user_id": f"user{u}", "pair_id": f"user{u}:{i}",
                                     "prompt": f"write a {topic} about item {i % 7}",
                                     "chosen": " ".join(rng.sample(WORDS, 4)),
                                     "rejected": " ".join(rng.sample(WORDS, 4))}) + "\n")
    return path


def make_config(data, **over):
    obj = {"name": "t", "data": str(data), "seeds": [0, 1], "n_users": 2,
           "methods": ["none", {"label": "base", "kwargs": {"max_chars": 3000}},
                       {"label": "exact", "kwargs": {"k": 1}}, {"label": "exact-global", "kwargs": {"k": 1}}],
           "attributes": ["Humor", "Formal", "Concise", "Storyteller"]}
    obj.update(over)
    return config_from_dict(obj)


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "pairs.jsonl")


def test_splits_are_deterministic_and_leak_free_through_the_runner(fake_backend, data, tmp_path):
    cfg = make_config(data)
    s1 = Runner(cfg, fake_backend, tmp_path / "a", embedder="hash", progress=False).run()
    Runner(cfg, fake_backend, tmp_path / "b", embedder="hash", progress=False).run()
    ra, rb = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    assert len(ra) == 2 * 2 * 4 and s1["new_records"] == 16
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "timings")}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    for r in ra:
        assert not set(r["train_ids"]) & set(r["test_ids"])
        assert all(i.startswith(r["user"] + ":") for i in r["train_ids"] + r["test_ids"])
        assert r["n_test"] == len(r["margins"]) == len(r["plain_margins"])
        assert r["accuracy"] == sum(m > 0 for m in r["margins"]) / len(r["margins"])
        assert r["model"] == fake_backend.fingerprint and r["git"] and r["config_json"]["name"] == "t"
    # users with 20..100 pairs only (user3 has 12); the same split for every method of a (seed, user)
    assert {r["user"] for r in ra} <= {"user0", "user1", "user2"}
    for seed in (0, 1):
        for user in {r["user"] for r in ra if r["seed"] == seed}:
            ids = {tuple(r["test_ids"]) for r in ra if r["seed"] == seed and r["user"] == user}
            assert len(ids) == 1
    # the plain method's margins are the plain margins: accuracy and Table 8 agree with them
    none = [r for r in ra if r["method"] == "none"]
    assert all(r["margins"] == r["plain_margins"] and r["table8"] == 0.0 for r in none)


def test_group_by_prompt_keeps_prompts_on_one_side(data):
    from prefsteer.data import load_pairs

    cfg = make_config(data, group_by_prompt=True)
    for job in make_jobs(cfg, load_pairs(data), [0, 1]):
        assert not {p.prompt for p in job.train} & {p.prompt for p in job.test}


class Counting(BasePrompt):
    fits = 0

    def fit(self, user_id, pairs):
        type(self).fits += 1
        super().fit(user_id, pairs)


def test_resumes_after_a_kill_and_computes_only_the_rest(fake_backend, data, tmp_path, monkeypatch):
    import prefsteer.methods.base as registry

    monkeypatch.setitem(registry._REGISTRY, "counting", f"{__name__}:Counting")
    cfg = make_config(data, methods=["none", "counting"])
    out = tmp_path / "run"
    Counting.fits = 0
    first = Runner(cfg, fake_backend, out, embedder="hash", progress=False).run(max_records=3)
    assert first["new_records"] == 3 and len(read_records(out)) == 3
    fits_before = Counting.fits
    with (out / "records.jsonl").open("a") as fh:
        fh.write('{"kind": "method", "torn')  # a write cut off by the kill
    Counting.fits = 0
    second = Runner(cfg, fake_backend, out, embedder="hash", progress=False).run()
    assert second["new_records"] == 8 - 3
    assert Counting.fits == 4 - fits_before
    recs = read_records(out)
    assert len(recs) == 8 and len({(r["seed"], r["user"], r["method"]) for r in recs}) == 8
    third = Runner(cfg, fake_backend, out, embedder="hash", progress=False).run()
    assert third["new_records"] == 0 and third["accuracy"] == second["accuracy"]


def test_a_copied_run_resumes_from_its_selections_without_the_score_cache(fake_backend, data, tmp_path):
    """What a fresh checkout of committed results sees: records and selections, no memory.sqlite."""
    import shutil

    cfg = make_config(data, methods=["none", {"label": "exact", "kwargs": {"k": 2}}])
    first = tmp_path / "first"
    Runner(cfg, fake_backend, first, embedder="hash", progress=False).run()
    recs = read_records(first)
    sel = [json.loads(line) for line in (first / "selections.jsonl").read_text().splitlines()]
    trained = {(r["user"], pid) for r in recs if r["method"] == "exact" for pid in r["train_ids"]}
    assert {(s["user_id"], s["pair_id"]) for s in sel} == trained  # every indexed pair, once
    assert all(len(s["attributes"]) == 2 and len(s["gains"]) == 2 for s in sel)
    assert all(abs(s["base_objective"] + sum(s["gains"]) - s["objective"]) < 1e-9 for s in sel)

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "selections.jsonl"):
        shutil.copy(first / name, copy / name)
    last = recs[-1]
    assert last["method"] == "exact"
    (copy / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:-1]))

    calls = []
    real_score = fake_backend.score

    def counting_score(requests, **kw):
        calls.append(len(requests))
        return real_score(requests, **kw)

    fake_backend.score = counting_score
    try:
        again = Runner(cfg, fake_backend, copy, embedder="hash", progress=False).run()
    finally:
        del fake_backend.score
    assert again["new_records"] == 1
    # no selection is redone: only the test pairs (plain and with attributes) are scored
    assert sum(calls) == 2 * 2 * last["n_test"]
    redone = read_records(copy)[-1]
    assert redone["margins"] == last["margins"] and redone["attributes"] == last["attributes"]


def test_a_run_directory_refuses_another_protocol(fake_backend, data, tmp_path):
    Runner(make_config(data), fake_backend, tmp_path / "r", embedder="hash", progress=False)
    with pytest.raises(ValueError, match="another protocol"):
        Runner(make_config(data, test_fraction=0.3), fake_backend, tmp_path / "r", embedder="hash",
               progress=False)


def test_base_prompt_truncates_at_200_pairs_and_20000_chars():
    short = [PreferencePair("u", f"q{i}", "a", "b", str(i)) for i in range(250)]
    text, n = build_system_prompt(short)
    assert n == 200 and "Example 200\n" in text and "Example 201\n" not in text
    long = [PreferencePair("u", "q" * 3000, "a" * 1000, "b", str(i)) for i in range(10)]
    text, n = build_system_prompt(long)
    assert len(text) <= 20_000 and n == 4  # whole pairs only: the fifth would pass the budget
    huge = [PreferencePair("u", "q" * 30_000, "a", "b", "0")]
    text, n = build_system_prompt(huge)
    assert len(text) == 20_000 and n == 1
    assert get_method_class("base") is BasePrompt


def test_base_margins_are_logprob_differences_under_the_system_prompt(fake_backend):
    train = [PreferencePair("u", "tell a joke", "funny humor joke", "formal dear sir", "1")]
    test = [PreferencePair("u", "another joke", "humor funny", "regards sir", "2"),
            PreferencePair("u", "a letter", "dear sir", "lol wow", "3")]
    base = BasePrompt(fake_backend)
    base.fit("u", train)
    system, n = build_system_prompt(train)
    assert base.system("u") == system and n == 1
    assert base.margins("u", test) == plain_margins(fake_backend, test, system)
    assert base.margins("u", test) != plain_margins(fake_backend, test)
    out = base.generate("u", ["a joke please"])
    assert len(out) == 1 and out[0].extra["pairs_in_prompt"] == 1
    with pytest.raises(ValueError, match="not been fitted"):
        base.margins("v", test)


def test_report_from_a_hand_made_results_file(tmp_path):
    recs = []
    for seed in (0, 1):
        for user in ("a", "b"):
            for label, reg, k, acc in [("none", "none", None, 0.5), ("exact-k1", "exact", 1, 0.6),
                                       ("exact", "exact", 3, 0.7), ("exact-global", "exact-global", 3, 0.55)]:
                recs.append({"kind": "method", "seed": seed, "user": user, "method": label,
                             "registry": reg, "kwargs": {"k": k} if k else {}, "accuracy": acc + 0.1 * seed,
                             "table8": 0.4, "n_test": 5, "timings": {"fit": 2.0}, "model": "m", "git": "abc",
                             "backend": "fake", "config": "hand", "config_json": {"notes": "hand-made"}})
    # k=5 ran for one (seed, user) only: Figure 1 compares every k on that pair alone
    recs.append({**recs[1], "method": "exact-k5", "kwargs": {"k": 5}, "accuracy": 0.9, "table8": 0.8})
    recs.append({"kind": "table7", "seed": 0, "user": "a", "method": "greedy-vs-exhaustive", "pair_id": "p",
                 "greedy": 1.0, "exhaustive": 1.5, "base": 0.5, "k": 3, "library_size": 12})
    # seed 2 has begun: one user of 'none' so far, shown but kept out of the mean ± std
    recs.append({**recs[0], "seed": 2, "accuracy": 0.0})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    path = write_report(tmp_path)
    md = path.read_text()
    assert "| exact | 75.00 ± 7.07 | 70.00 | 80.00 | – | 4 | 20 | 40.00 ± 0.00 |" in md
    assert "| none | 55.00 ± 7.07 | 50.00 | 60.00 | 0.00 (1/2 users) | 4 | 20 | – |" in md
    assert "| exact-k5 | 90.00 | 90.00 (1/2 users) | – | – | 1 | 5 | 80.00 |" in md
    assert "(n/2 users) is not complete" in md
    assert "## Figure 1" in md and "| 1 | exact-k1 | 60.00 | 40.00 | 1 |" in md
    assert "| 3 | exact | 70.00 | 40.00 | 1 |" in md and "| 5 | exact-k5 | 90.00 | 80.00 | 1 |" in md
    assert "## Table 8" in md and "## Table 7" in md and "first 12 attributes" in md
    assert "| 1 | 0.500 | 1.000 | 1.500 |" in md
    for png in ("accuracy.png", "figure1_k.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_config_end_to_end_through_the_cli(shared_data, tmp_path, capsys):
    out = tmp_path / "quick"
    args = ["eval", "--config", "quick", "--backend", "fake", "--embedder", "hash", "--json", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    # the toy model's numbers, the same before and after the CLI and memory rework of issue 17
    assert summary["accuracy"] == {"none": 2 / 6, "base": 1 / 6, "exact": 2 / 6, "exact-global": 2 / 6}
    assert summary["table8"] == {"none": 0.0, "base": 1 / 6, "exact": 3 / 6, "exact-global": 2 / 6}
    assert set(summary["winrate"]) == {"none", "exact", "exact-global"}
    assert summary["n_test_pairs"]["exact"] == 3 * 2 and summary["new_records"] == 4 * 3 + 3 * 3
    # a second call resumes: nothing new, the same numbers
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["new_records"] == 0 and again["accuracy"] == summary["accuracy"]
    assert main(["eval", "report", str(out), "--json"]) == 0
    assert "Table 2" in (out / "report.md").read_text()


def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_the_interrupted_users_selections(data, tmp_path):
    import sqlite3
    import subprocess
    import sys
    import time

    cfg = tmp_path / "long.json"
    cfg.write_text(json.dumps({"name": "long", "data": str(data), "seeds": [0, 1, 2], "n_users": 3,
                               "methods": ["none", {"label": "exact", "kwargs": {"k": 3}}]}))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "prefsteer.cli", "eval", "--config", str(cfg), "--backend",
                             "fake", "--embedder", "hash", "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, selected = time.monotonic() + 120, 0
        while selected < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if (out / "memory.sqlite").exists():
                with sqlite3.connect(f"file:{out / 'memory.sqlite'}?mode=ro", uri=True) as db:
                    try:
                        selected = db.execute("SELECT COUNT(*) FROM selections").fetchone()[0]
                    except sqlite3.OperationalError:  # the schema is still being written
                        pass
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    exported = (out / "selections.jsonl").read_text().splitlines()
    with sqlite3.connect(out / "memory.sqlite") as db:
        stored = db.execute("SELECT COUNT(*) FROM selections").fetchone()[0]
    # everything selected is exported, also the pairs of a user whose indexing the signal cut short
    assert len(exported) == stored >= selected >= 2


def test_an_unknown_method_option_in_a_config_is_an_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"extends": "quick", "methods": ["none", {"label": "exact", "kwargs": {"kk": 3}}]}))
    assert main(["eval", "--config", str(bad), "--backend", "fake", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'kk' for method 'exact'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything ran
    bad.write_text(json.dumps({"extends": "quick", "methods": [{"label": "exact", "kwarg": {"k": 3}}]}))
    assert main(["eval", "--config", str(bad), "--backend", "fake", "--out", str(tmp_path / "run")]) == 2
    assert "unknown key(s) 'kwarg' in the method entry" in capsys.readouterr().err


def test_a_users_memory_in_a_run_is_its_training_split_only(fake_backend, data, tmp_path):
    cfg = make_config(data)
    runner = Runner(cfg, fake_backend, tmp_path / "a", embedder="hash", methods=["exact"], progress=False)
    runner.run()
    last = {}
    for r in read_records(tmp_path / "a"):
        last[r["user"]] = r  # the last seed's record of each user
    for user, r in last.items():
        # another seed's split put other pairs in training (some are this split's test pairs): not retrieved
        assert {e.pair_id for e in runner.memory.entries(user)} <= set(r["train_ids"])
        assert not {e.pair_id for e in runner.memory.entries(user)} & set(r["test_ids"])


def test_eval_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "--config", "nope", "--backend", "fake", "--embedder", "hash"]) == 2
    assert "no configuration 'nope'" in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path)]) == 2


@pytest.mark.model
def test_reduced_quick_config_on_the_real_model(shared_data, tmp_path, capsys):
    """The quick config cut to one user, 2 training pairs, 1 test pair, 3 attributes and no win-rate
    (the full quick config takes longer than a CI test should on 2 shared cores)."""
    pytest.importorskip("transformers")
    from prefsteer.backends.loading import ModelNotFoundError, resolve_model

    try:
        resolve_model(None)
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"extends": "quick", "n_users": 1, "max_train_pairs": 2, "max_test_pairs": 1,
                               "attributes": ["Concise", "Formal", "Humor"], "winrate": {"enabled": False},
                               "methods": ["none", "base", {"label": "exact", "kwargs": {"k": 1}},
                                           {"label": "exact-global", "kwargs": {"k": 1}}]}))
    out = tmp_path / "tiny"
    assert main(["eval", "--config", str(cfg), "--json", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"].startswith("hf:")
    # SmolLM2-135M's numbers on this cut, measured with the code before issue 17's rework (d7f63c0)
    # and unchanged by it: every method ranks the one test pair right, and the attributes (and
    # Base's history) widen its margin over the plain prompt
    assert summary["accuracy"] == {"none": 1.0, "base": 1.0, "exact": 1.0, "exact-global": 1.0}
    assert summary["table8"] == {"none": 0.0, "base": 1.0, "exact": 1.0, "exact-global": 1.0}
    assert all(n == 1 for n in summary["n_test_pairs"].values())
    recs = [r for r in read_records(out) if r["kind"] == "method"]
    assert all(len(r["margins"]) == 1 and len(r["train_ids"]) == 2 for r in recs)
    none = next(r for r in recs if r["method"] == "none")
    assert none["margins"] == none["plain_margins"]


def test_table7_records_bound_greedy_by_the_ordered_exhaustive_search(fake_backend, data, tmp_path):
    cfg = make_config(data, seeds=[0], methods=["none"], attributes=None,
                      table7={"enabled": True, "n_pairs": 2, "library_size": 5, "k": 2})
    Runner(cfg, fake_backend, tmp_path / "t7", embedder="hash", progress=False).run()
    t7 = [r for r in read_records(tmp_path / "t7") if r["kind"] == "table7"]
    assert len(t7) == 2
    for r in t7:
        assert r["ordered"] and r["library_size"] == 5 and len(r["exhaustive_set"]) == 2
        assert r["exhaustive"] >= r["greedy"] - 1e-9  # greedy's ordered pick is among the tuples
        assert r["exhaustive"] >= r["exhaustive_unordered"] - 1e-9
        assert r["exhaustive_evaluations"] == 1 + 5 * 4 + 1
    report = write_report(tmp_path / "t7").read_text()
    assert "F(subsets)" in report and "best ordered k-tuple" in report


def test_table7_studies_a_pair_once_across_seeds(fake_backend, data, tmp_path):
    t7 = {"enabled": True, "n_pairs": 6, "library_size": 4, "k": 2}
    for seed in (0, 1):  # a later run whose first seed is another one, into the same directory
        Runner(make_config(data, seeds=[seed], methods=["none"], attributes=None, table7=t7),
               fake_backend, tmp_path / "t7", embedder="hash", progress=False).run()
    recs = [r for r in read_records(tmp_path / "t7") if r["kind"] == "table7"]
    first = {(r["user"], r["pair_id"]) for r in recs if r["seed"] == 0}
    again = [(r["user"], r["pair_id"]) for r in recs if r["seed"] == 1]
    assert first and len(again) == len(set(again))
    assert not first & set(again)
    seed1 = Runner(make_config(data, seeds=[1], methods=["none"], attributes=None, table7=t7),
                   fake_backend, tmp_path / "other", embedder="hash", progress=False)
    seed1.run()
    fresh = {(r["user"], r["pair_id"]) for r in read_records(tmp_path / "other") if r["kind"] == "table7"}
    assert first & fresh  # the two seeds share pairs, so the first directory skipped them


def test_a_run_on_either_store_gives_the_same_records(fake_backend, data, tmp_path, db):
    cfg = make_config(data)
    Runner(cfg, fake_backend, tmp_path / "file", embedder="hash", methods=["exact"], progress=False).run()
    on_db = Runner(cfg, fake_backend, tmp_path / "db", embedder="hash", methods=["exact"], progress=False, db=db)
    on_db.run()
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "timings")}  # noqa: E731
    assert [strip(r) for r in read_records(tmp_path / "file")] == [strip(r) for r in read_records(tmp_path / "db")]
    assert on_db.memory.db == db and sum(on_db.memory.pair_count(u) for u in on_db.memory.users()) > 0
