"""The known-answer suite: loader, metrics on hand-made records, the fake-backend run, and (marker
`model`) a small real-model check that EXACT recovers the target style above chance."""

import json

import pytest

from prefsteer.errors import InputError
from prefsteer.evaluation import known_answer as ka


def test_the_shipped_suite_has_six_styles_of_eight_pairs_and_twenty_prompts():
    suite = ka.load_suite()
    assert len(suite.targets) >= 6
    assert set(suite.targets.values()) <= set(ka.MEASURES)
    for user in suite.users():
        ps = [p for p in suite.pairs if p.user_id == user]
        assert len(ps) == 8 and len({p.prompt for p in ps}) == 8
        if suite.targets[user] != "Concise":  # only Concise may differ in length
            for p in ps:
                assert 0.4 < len(p.chosen) / len(p.rejected) < 2.5, p
    assert len(suite.prompts) == 20
    small = ka.subset(suite, users=2, pairs_per_user=2, prompts=3)
    assert len(small.pairs) == 4 and len(small.targets) == 2 and len(small.prompts) == 3


@pytest.mark.parametrize("row, field", [
    ({"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}, "style"),
    ({"user_id": "u", "style": "Grumpy", "prompt": "p", "chosen": "a", "rejected": "b"}, "attributes"),
    ({"user_id": "u", "style": "Vivid", "prompt": "p", "chosen": "a", "rejected": "b"}, "style"),
])
def test_bad_suite_rows_name_the_field(tmp_path, row, field):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError) as e:
        ka.load_suite(path)
    assert e.value.field == field


def test_measures_move_the_way_their_style_says():
    assert ka.MEASURES["Concise"].fn("one two three") == 3 and ka.MEASURES["Concise"].direction == -1
    assert ka.formal_measure("Kindly ensure the report is sent.") > ka.formal_measure("hey, just send it, ok!")
    assert ka.exclamatory_measure("Great! Go!") > ka.exclamatory_measure("Great. Go.") == 0
    assert ka.humor_measure("That joke was funny, haha") > ka.humor_measure("That was a report") == 0
    assert ka.empathy_measure("I'm sorry, that feels tough") > ka.empathy_measure("Book a test") == 0
    assert ka.code_measure("Run:\n```bash\nls\n```") == 1 and ka.code_measure("Use `ls`.") == 1
    assert ka.code_measure("List the files.") == 0


def hand_made_records():
    sel = [("ava", "Concise", ["Concise", "Base", "Vivid"]), ("ava", "Concise", ["Formal", "Vivid", "Base"]),
           ("zoe", "Exclamatory", ["Exclamatory"]), ("zoe", "Exclamatory", ["Humor", "Exclamatory"])]
    recs = [{"kind": "selection", "variant": "v", "user": u, "target": t, "pair_id": f"{u}:{i}", "attributes": a}
            for i, (u, t, a) in enumerate(sel)]
    gens = [("ava", "Concise", "one two three four", "one two"), ("ava", "Concise", "a b", "a b c"),
            ("zoe", "Exclamatory", "Go now.", "Go now!"), ("zoe", "Exclamatory", "Yes.", "Yes!")]
    recs += [{"kind": "generation", "variant": "v", "user": u, "target": t, "prompt": f"p{i}", "plain": plain,
              "text": text, "attributes": []} for i, (u, t, plain, text) in enumerate(gens)]
    return recs


def test_recovery_and_effects_on_hand_made_records():
    recs = hand_made_records()
    assert ka.recovery(recs) == {"ava": 0.5, "zoe": 1.0, "all": 0.75}
    assert ka.recovery(recs, "other") == {}
    eff = ka.effects(recs, "v")
    # ava: words 4 -> 2 and 2 -> 3: mean 3 -> 2.5 (17% shorter), one of two prompts moved
    assert eff["ava"]["plain"] == 3 and eff["ava"]["personalized"] == 2.5
    assert eff["ava"]["change"] == pytest.approx(-1 / 6) and eff["ava"]["moved"] == 0.5 and eff["ava"]["intended"]
    assert eff["zoe"]["moved"] == 1.0 and eff["zoe"]["plain"] == 0
    assert ka.effect_line("ava", eff["ava"]).startswith("ava (Concise): 17% shorter than plain")
    assert ka.effect_line("zoe", eff["zoe"]).startswith("zoe (Exclamatory): more exclamatory than plain")
    md = ka.table(recs, {"config": {"k": 3}, "library": ["a"] * 12, "n_prompts": 2})
    assert "| v | ava | Concise | 50% |" in md and "**75%**" in md and "chance of holding the target: 25%" in md


def test_known_answer_configs_are_recognised():
    assert ka.is_known_answer("known-answer") and ka.is_known_answer("known-answer-cpu")
    assert not ka.is_known_answer("quick") and not ka.is_known_answer("no-such-config")
    cfg = ka.load_ka_config("known-answer")
    assert cfg["k"] == 3 and cfg["n_prompts"] == 20 and cfg["variants"][0] == {"label": "paper", "kwargs": {}}


def test_run_on_the_fake_backend_writes_records_and_the_table(fake_backend, tmp_path):
    from prefsteer.retrieval import HashEmbedder

    cfg = {"name": "t", "k": 1, "attributes": ["Base", "Concise", "Exclamatory", "Humor", "Formal", "Code",
                                               "Empathetic"],
           "users": 2, "pairs_per_user": 2, "max_new_tokens": 4,
           "variants": [{"label": "paper", "kwargs": {}},
                        {"label": "instr", "kwargs": {"render": "instruction", "placement": "system"}}]}
    s = ka.run(fake_backend, cfg, tmp_path, embedder=HashEmbedder(), n_prompts=2)
    recs = [json.loads(line) for line in (tmp_path / ka.RECORDS).read_text().splitlines()]
    assert sum(r["kind"] == "selection" for r in recs) == 2 * 4
    assert sum(r["kind"] == "generation" for r in recs) == 2 * 2 * 2
    assert set(s["recovery"]) == {"paper", "instr"} and set(s["effects"]["paper"]) == {"ava", "felix"}
    assert "| paper | ava | Concise |" in (tmp_path / ka.TABLE).read_text()


@pytest.mark.model
def test_real_model_recovers_the_target_above_chance(hf_backend, tmp_path):
    """2 users x 2 pairs (Formal, Empathetic), 6 attributes, k=1 and 2, in the measured best rendering
    (an instruction in the system prompt: 58% recovery at k=1 over 8 attributes, against 25% for the
    paper's): the selection holds the target in more pairs than chance (k/6) at each k."""
    from prefsteer.retrieval import HashEmbedder

    rows = [json.loads(line) for line in
            (ka.resources.files("prefsteer.resources") / ka.SUITE).read_text("utf-8").splitlines()]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["style"] in ("Formal", "Empathetic")))
    lib = ["Base", "Formal", "Concise", "Vivid", "Empathetic", "Humor"]
    for k in (1, 2):  # k=2 continues k=1's stored greedy steps
        cfg = {"name": "t", "k": k, "attributes": lib, "pairs_per_user": 2, "suite": str(path),
               "variants": [{"label": "best", "kwargs": {"render": "instruction", "placement": "system"}}]}
        s = ka.run(hf_backend, cfg, tmp_path / "run", embedder=HashEmbedder(), generate=False)
        assert s["recovery"]["best"]["all"] > k / len(lib), (k, s["recovery"])


def test_oracle_injects_each_users_target_under_every_rendering(fake_backend, tmp_path):
    """``oracle``: the target itself injected (the effect of a perfect selection); with ``select``
    false nothing is selected, and a configuration that would measure nothing is refused. The
    contexts the backend must see are written out here, not rebuilt through EXACT's rendering."""
    from prefsteer.retrieval import HashEmbedder

    class Recording:
        """The fake backend, keeping the answer it gave to each context it was asked about."""

        def __init__(self, inner):
            self.inner, self.answers = inner, {}

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def generate(self, contexts, config=None, **kw):
            outs = self.inner.generate(contexts, config, **kw)
            for c, o in zip(contexts, outs):
                self.answers[json.dumps([dict(m) for m in c], sort_keys=True)] = o.text
            return outs

    prompts = ["How do I prepare for a job interview?", "What is a good way to start exercising?",
               "How can I keep track of my monthly expenses?"]  # the suite's first three
    targets = {"ava": "Concise", "felix": "Formal"}  # the suite's first two users

    def context(label, target, prompt):
        if label == "paper":  # the paper's rendering: the names appended to the user's turn
            msgs = [{"role": "user", "content": f"{prompt}\nAttributes: <{target}>"}]
        elif label == "instr":  # an instruction in the system prompt
            msgs = [{"role": "system", "content": f"Answer in a way that is: {target.lower()}."},
                    {"role": "user", "content": prompt}]
        else:  # no attributes: the plain answer
            msgs = [{"role": "user", "content": prompt}]
        return json.dumps(msgs, sort_keys=True)

    lib = ["Base", "Concise", "Exclamatory", "Humor", "Formal", "Code", "Empathetic"]
    variants = [{"label": "paper", "kwargs": {}},
                {"label": "instr", "kwargs": {"render": "instruction", "placement": "system"}}]
    cfg = {"name": "t", "k": 1, "attributes": lib, "users": 2, "max_new_tokens": 4, "oracle": True,
           "select": False, "variants": variants}
    backend = Recording(fake_backend)
    s = ka.run(backend, cfg, tmp_path, embedder=HashEmbedder(), n_prompts=3)
    recs = [json.loads(line) for line in (tmp_path / ka.RECORDS).read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"oracle"} and len(recs) == 2 * 2 * 3
    # the backend was asked the plain prompts and each user's target rendered as each variant says,
    # nothing else; each record holds the backend's answer to its own context
    want = {context(None, None, p) for p in prompts}
    want |= {context(v["label"], t, p) for v in variants for t in targets.values() for p in prompts}
    assert set(backend.answers) == want
    assert [(r["variant"], r["user"], r["target"], r["prompt"]) for r in recs] == [
        (v["label"], u, t, p) for v in variants for u, t in targets.items() for p in prompts]
    for r in recs:
        assert r["attributes"] == [r["target"]]
        assert r["text"] == backend.answers[context(r["variant"], r["target"], r["prompt"])]
        assert r["plain"] == backend.answers[context(None, None, r["prompt"])]
    assert any(r["text"] != r["plain"] for r in recs)  # the injection reaches the fake model
    assert set(s["oracle"]["instr"]) == {"ava", "felix"} and s["effects"]["instr"] == {}
    text = (tmp_path / ka.TABLE).read_text()
    assert "| target injected |" in text and "| paper | ava | Concise | – | words |" in text
    with pytest.raises(ka.InputError, match="select"):
        ka.run(fake_backend, {**cfg, "oracle": False}, tmp_path / "none", embedder=HashEmbedder(), n_prompts=3)
    assert not (tmp_path / "none").exists()  # nothing written


@pytest.mark.data
def test_the_levers_benchmark_puts_tldr_splits_side_by_side(shared_data, tmp_path):
    """benchmarks/levers.py on the fake backend: no suite (--suite-config none), the quick split for
    two variants at seed 0, one column group per split; a misspelt split fails before any work."""
    import importlib.util
    from pathlib import Path

    from prefsteer.errors import InputError

    spec = importlib.util.spec_from_file_location(
        "levers", Path(__file__).resolve().parents[1] / "benchmarks" / "levers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--backend", "fake", "--embedder", "hash", "--out", str(tmp_path), "--suite-config", "none",
            "--variants", "paper", "instruction", "--tldr-config", "quick", "--tldr-seeds", "0"]
    assert bench.main(bench.make_parser().parse_args(argv)) == 0
    rows = json.loads((tmp_path / "levers.json").read_text())
    assert set(rows) == {"paper", "instruction"} and all("recovery" not in r for r in rows.values())
    for r in rows.values():
        q = r["tldr"]["quick"]
        assert 0 <= q["accuracy"] <= 1 and 0 <= q["plain_accuracy"] <= 1
    text = (tmp_path / "levers.md").read_text()
    assert "| quick accuracy (plain) | quick beats plain |" in text and "suite recovery" not in text
    assert "seed(s) 0" in text
    with pytest.raises(InputError):
        bench.main(bench.make_parser().parse_args([*argv[:-3], "nope"]))
    bad = [*argv[:-3], "nope"]
    bad[bad.index("--out") + 1] = str(tmp_path / "new")
    with pytest.raises(InputError):
        bench.main(bench.make_parser().parse_args(bad))
    assert not (tmp_path / "new").exists()  # nothing written
    # a second run merges into levers.json: a new variant, and paper on another seed, say which seeds
    more = [*argv[:argv.index("--variants")], "--variants", "mean", "--tldr-config", "quick",
            "--tldr-variants", "mean", "paper", "--tldr-seeds", "1"]
    assert bench.main(bench.make_parser().parse_args(more)) == 0
    rows2 = json.loads((tmp_path / "levers.json").read_text())
    assert set(rows2) == {"paper", "instruction", "mean"}
    assert rows2["instruction"] == rows["instruction"] and rows2["paper"]["tldr"]["quick"]["seeds"] == [1]
    table = {line.split(" | ")[0]: line for line in (tmp_path / "levers.md").read_text().splitlines()
             if line.startswith("| ")}
    # two of three cells are on seed 1, so the split's note says seed 1 and instruction's cell seed 0
    assert "seed(s) 1, 3 users" in (tmp_path / "levers.md").read_text()
    assert "(seed(s) 0)" in table["| instruction"] and "seed(s)" not in table["| paper"] + table["| mean"]
    fresh = [*argv[:argv.index("--variants")], "--variants", "paper", "--tldr-config", "quick", "--tldr-seeds",
             "0", "--fresh"]
    assert bench.main(bench.make_parser().parse_args(fresh)) == 0
    assert set(json.loads((tmp_path / "levers.json").read_text())) == {"paper"}
    (tmp_path / "levers.json").write_text("{not json")
    with pytest.raises(InputError, match="levers.json:1"):
        bench.main(bench.make_parser().parse_args(argv))
    assert (tmp_path / "levers.json").read_text() == "{not json"  # nothing written
