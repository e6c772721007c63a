"""One rendering everywhere: what EXACT selects under a rendering and placement is what every path
injects (Exact.generate, the CLI's `generate --attributes`, the length check of index/feedback, the
service's chat). Fake backend, model-free embedder; each test records the contexts the backend got."""

from __future__ import annotations

import json

import pytest

from prefsteer.attributes import attribute_conversation, attribute_messages, load_library
from prefsteer.backends.fake import FakeBackend
from prefsteer.cli import main
from prefsteer.methods.exact import EXACT_PRESETS, Exact, ExactConfig

FAST = ["--backend", "fake", "--embedder", "hash", "--quiet"]
INSTRUCTION = "Answer in a way that is: "


@pytest.fixture
def seen(monkeypatch):
    """Every context FakeBackend.generate (or stream, the service's way) and count_tokens receive, in order."""
    got = {"generate": [], "count": []}
    gen, stream, count = FakeBackend.generate, FakeBackend.stream, FakeBackend.count_tokens

    def generate(self, contexts, *a, **kw):
        got["generate"] += [list(c) for c in contexts]
        return gen(self, contexts, *a, **kw)

    def streamed(self, context, *a, **kw):
        got["generate"].append(list(context))
        return stream(self, context, *a, **kw)

    def count_tokens(self, messages, continuation=""):
        got["count"].append(list(messages))
        return count(self, messages, continuation)

    monkeypatch.setattr(FakeBackend, "generate", generate)
    monkeypatch.setattr(FakeBackend, "stream", streamed)
    monkeypatch.setattr(FakeBackend, "count_tokens", count_tokens)
    return got


def cli(capsys, *argv):
    code = main(list(argv) + FAST)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


def test_conversation_rendering_matches_the_single_prompt_one():
    lib = load_library()
    for style in ("names", "described", "instruction"):
        for placement in ("user", "system"):
            for system in (None, "Be kind."):
                kw = {"style": style, "placement": placement, "system": system}
                assert attribute_conversation([{"role": "user", "content": "Q"}], ["Concise"], lib, **kw) == \
                    attribute_messages("Q", ["Concise"], lib, **kw)
    talk = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Q"}]
    out = attribute_conversation(talk, ["Humor"], lib, style="instruction", placement="system", system="ignored")
    assert out[0] == {"role": "system", "content": "You are terse.\nAnswer in a way that is: humor."}
    assert out[1:] == talk[1:] and talk[0]["content"] == "You are terse."  # the input is not changed
    out = attribute_conversation(talk, ["Humor"], lib, placement="user")
    assert out[:-1] == talk[:-1] and out[-1]["content"] == "Q\nAttributes: <Humor>"
    with pytest.raises(ValueError, match="user turn"):
        attribute_conversation(talk[:-1], ["Humor"], lib)


def test_presets_name_the_paper_and_the_product_settings():
    assert ExactConfig() == ExactConfig.of_preset("paper")  # the dataclass's defaults are the paper's
    prod = ExactConfig.of_preset("product", k=2)
    assert (prod.k, prod.render, prod.placement) == (2, *(EXACT_PRESETS["product"][f] for f in ("render", "placement")))
    with pytest.raises(ValueError, match="preset"):
        ExactConfig.of_preset("fancy")


def test_exact_generate_injects_what_the_configuration_renders(seen):
    from prefsteer.retrieval import HashEmbedder
    from prefsteer.types import PreferencePair

    ex = Exact(FakeBackend(), embedder=HashEmbedder(),
               config=ExactConfig(k=1, render="described", placement="system", system="Base prompt."))
    pairs = [PreferencePair("u", "tell me a joke", "funny joke humor", "dear sir regards")]
    ex.memory.add_pairs(pairs)
    ex.fit("u", pairs)
    out = ex.generate("u", ["another joke please"])[0]
    ctx = seen["generate"][-1]
    desc = ex.library.get(out.attributes[0]).description
    assert ctx[0] == {"role": "system", "content": f"Base prompt.\nAttributes: <{out.attributes[0]} ({desc})>"}
    assert ctx[1] == {"role": "user", "content": "another joke please"}
    assert out.extra == {"prompt": "another joke please", "system": ctx[0]["content"],
                         "retrieved": {"prompt": "tell me a joke", "similarity": pytest.approx(0.2887, abs=1e-4)}}


def test_cli_generate_with_given_attributes_follows_render_and_placement(seen, capsys):
    out = cli(capsys, "generate", "--method", "none", "--attributes", "concise,humor", "--render", "instruction",
              "--placement", "system", "--json", "--max-new-tokens", "3", "hi there")
    assert seen["generate"][-1] == [{"role": "system", "content": INSTRUCTION + "concise, humor."},
                                    {"role": "user", "content": "hi there"}]
    assert out["system"] == INSTRUCTION + "concise, humor." and out["prompt"] == "hi there"
    out = cli(capsys, "generate", "--method", "none", "--attributes", "concise", "--render", "described",
              "--placement", "user", "--json", "--max-new-tokens", "3", "hi there")
    assert seen["generate"][-1] == [{"role": "user", "content": "hi there\nAttributes: <Concise (short and to the "
                                                                "point, no filler)>"}]
    assert "system" not in out
    cli(capsys, "generate", "--method", "none", "--attributes", "concise", "--preset", "paper", "--json",
        "--max-new-tokens", "3", "hi there")
    assert seen["generate"][-1] == [{"role": "user", "content": "hi there\nAttributes: <Concise>"}]
    cli(capsys, "generate", "--method", "none", "--attributes", "concise", "--json", "--max-new-tokens", "3", "hi")
    assert seen["generate"][-1] == [{"role": "user", "content": "hi\n" + INSTRUCTION + "concise."}]  # the product default


def test_cli_index_checks_lengths_and_generate_injects_in_the_configured_rendering(seen, capsys, tmp_path):
    db = str(tmp_path / "m.db")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"user_id": "u", "prompt": "tell me a joke about cats",
                                "chosen": "funny humor joke", "rejected": "formal dear sir"}) + "\n")
    opts = ["--render", "instruction", "--placement", "system", "--k", "1"]
    cli(capsys, "index", "--data", str(data), "--db", db, *opts, "--json")
    # the length check measured the prompt with the instruction in the system prompt
    checked = seen["count"][0]
    assert checked[0]["role"] == "system" and checked[0]["content"].startswith(INSTRUCTION)
    assert checked[1] == {"role": "user", "content": "tell me a joke about cats"}
    out = cli(capsys, "generate", "--user", "u", "--db", db, *opts, "--json", "--max-new-tokens", "3", "a cat joke")
    assert seen["generate"][-1] == [{"role": "system", "content": INSTRUCTION + out["attributes"][0].lower() + "."},
                                    {"role": "user", "content": "a cat joke"}]
    seen["count"].clear()
    cli(capsys, "feedback", "--user", "u", "--db", db, *opts, "--json", "--prompt", "fix my python script",
        "--chosen", "python code", "--rejected", "lol wow")
    assert seen["count"][0][0]["content"].startswith(INSTRUCTION)


def test_service_chat_injects_in_the_configured_rendering(seen, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from prefsteer.storage import Memory
    from prefsteer.service import Settings, store
    from tests.test_service_helpers import thread_server, wait_job

    db = str(tmp_path / "m.db")
    mem = Memory(db)
    key = mem.create_key("A")["key"]
    mem.close()
    auth = {"Authorization": f"Bearer {key}"}
    settings = Settings(db=db, backend="fake", embedder="hash",
                        exact={"k": 1, "render": "instruction", "placement": "system"})
    pairs = [{"prompt": "tell me a joke about cats", "chosen": "funny humor joke", "rejected": "formal dear sir"}]
    with thread_server(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/v1/users/ren/feedback", json={"pairs": pairs}, headers=auth)
        assert wait_job(http, r.json()["job_id"], auth)["status"] == "done"
        for messages, system in (([{"role": "user", "content": "a cat joke"}], ""),
                                 ([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "a cat joke"}], "Be brief.\n")):
            seen["generate"].clear()
            r = http.post("/v1/chat/completions", headers=auth,
                          json={"model": "fake", "user": "ren", "max_tokens": 3, "messages": messages})
            assert r.status_code == 200, r.text
            attrs = r.json()["prefsteer"]["attributes"]
            assert seen["generate"][-1] == [
                {"role": "system", "content": system + INSTRUCTION + ", ".join(a.lower() for a in attrs) + "."},
                {"role": "user", "content": "a cat joke"}]


def test_a_preset_is_only_a_name_for_its_values(fake_backend):
    """The product preset shares its stored selections with the same options given one by one, and
    an option given with a preset overrides the preset's value."""
    def cid(**kw):
        return Exact(fake_backend, config=ExactConfig(k=2, **kw)).config_id

    assert cid(preset="product") == cid(**EXACT_PRESETS["product"]) != cid()
    assert cid(preset="product", render="names", placement="user") == cid(preset="paper") == cid()
    assert ExactConfig(preset="product", describe=True).style == "described"
    assert ExactConfig(preset="product", placement="user").placement == "user"


def test_demo_uses_the_product_preset_and_prints_one_measured_line_per_user(seen, capsys):
    from prefsteer.cli import DEMO_ATTRIBUTES

    out = cli(capsys, "demo", "--json", "--max-new-tokens", "6", "--measure-prompts", "2")
    assert out["settings"]["preset"] == "product" and out["settings"]["placement"] == "user"
    assert out["settings"]["render"] == "instruction" and out["settings"]["stop_when_no_gain"]
    assert out["settings"]["library"] == list(DEMO_ATTRIBUTES) and len(out["prompts"]) == 2
    for user, u in out["users"].items():
        assert set(u["attributes"]) <= set(DEMO_ATTRIBUTES) and len(u["texts"]) == 2
        assert u["effect"].startswith(f"{user} ({u['style']}): ") and "of 2 prompts" in u["effect"]
        # the filter: no stored pick lowered the user's margin
        assert all(g > 0 for e in u["entries"] for g in e["gains"])
        assert u["retrieved"] in {e["prompt"] for e in u["entries"]}
    # plain answers are the bare prompt; a personalized one ends with the instruction, when it has attributes
    plain_turns = {f"{q}" for q in out["prompts"]}
    personalized = [c for c in seen["generate"] if c[-1]["content"] not in plain_turns]
    assert all(len(c) == 1 and "\n" + INSTRUCTION in c[0]["content"] for c in personalized)
    text = cli(capsys, "demo", "--preset", "paper", "--max-new-tokens", "4", "--measure-prompts", "1")
    assert "preset paper" in text and "rendered as names in the user prompt" in text
    assert seen["generate"][-1][-1]["content"].split("\n")[-1].startswith("Attributes: <")
    code = main(["demo", "--measure-prompts", "0"] + FAST)
    assert code == 2 and "--measure-prompts" in capsys.readouterr().err


def test_instruction_described_renders_the_descriptions_as_one_sentence():
    from prefsteer.attributes import render

    lib = load_library()
    assert render(["Concise", "Humor"], lib, style="instruction-described") == \
        "Answer in a way that is short and to the point, no filler; funny, playful, with jokes or wit."
    with pytest.raises(ValueError, match="library"):
        render(["Concise"], None, style="instruction-described")
    with pytest.raises(ValueError, match="instruction-described"):
        ExactConfig(describe=True, render="instruction-described")


def test_serve_defaults_to_the_product_preset_and_takes_preset_paper(tmp_path):
    pytest.importorskip("fastapi")
    from prefsteer.cli import Context, make_parser
    from prefsteer.cli.serve import settings_from_args

    for extra, preset in (([], "product"), (["--preset", "paper"], "paper")):
        args = make_parser().parse_args(["serve", "--db", str(tmp_path / "m.db"), *FAST, *extra])
        s = settings_from_args(args, Context(args))
        cfg = ExactConfig(**s.exact)
        assert cfg.preset == preset and cfg == ExactConfig.of_preset(preset)
