"""The vLLM backend against the transformers backend on the embedded SmolLM2-135M-Instruct.

Runs in the vLLM environment (``bash scripts/bootstrap_vllm.sh``, then
``.venv-vllm/bin/python -m pytest -q tests/test_vllm.py``) and is skipped where vllm cannot be
imported. One engine serves the whole module (its start-up takes about 85 s on two CPU cores); the
references come from the hf backend loaded in the same process (transformers' own numbers, no
recorded constants).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("PREFSTEER_REQUIRE_VLLM") == "1":  # .ci/run: a broken .venv-vllm must fail, not skip
        raise ImportError("PREFSTEER_REQUIRE_VLLM=1 but vllm cannot be found in this environment")
    pytest.skip("vllm is not installed (its tests run in .venv-vllm: scripts/bootstrap_vllm.sh)",
                allow_module_level=True)

pytestmark = pytest.mark.model

import numpy as np  # noqa: E402
import torch  # noqa: E402

from prefsteer.attributes import load_library  # noqa: E402
from prefsteer.backends.base import GenerationConfig, ScoreRequest, UnsupportedOperation, user_turn  # noqa: E402
from prefsteer.backends.vllm import VLLMBackend  # noqa: E402
from prefsteer.methods.exact.select import greedy_select, make_objective, pair_requests  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TLDR = REPO.parent / "shared" / "data" / "fixtures" / "tldr_batch13_3users.jsonl"
SETS = [(), ("Concise",), ("Humor", "Casual"), ("Formal", "Detailed", "Polite")]
PROMPTS = ["How do I boil an egg?", "Write a haiku about the sea.", "What is the capital of France?",
           "Give me three tips for a job interview.", "Explain recursion to a child.",
           "Summarize: the meeting moved to Friday because the room was booked."]


@pytest.fixture(scope="module")
def hf(hf_backend):
    return hf_backend


@pytest.fixture(scope="module")
def vb():
    return VLLMBackend(dtype="float32")


def _tldr_pairs(n: int = 2):
    from prefsteer.data import load_pairs

    if TLDR.is_file():
        return load_pairs(str(TLDR))[:n]
    return load_pairs(str(REPO / "tests" / "fixtures" / "tldr_small.json"))[:n]


def test_identity_and_tokenization_match_hf(hf, vb):
    assert vb.fingerprint == hf.fingerprint  # score caches and classifier heads are shared
    assert vb.template_id == hf.template_id
    assert vb.eos_token_ids == hf.eos_token_ids and vb.eos_text == hf.eos_text
    for p in PROMPTS[:3]:
        msgs = user_turn(p, "Be brief.")
        assert vb.encode_context(msgs) == hf.encode_context(msgs)
        assert vb.encode_continuation(" " + p) == hf.encode_continuation(" " + p)
    assert vb.max_context == hf.max_context and vb.hidden_size == hf.hidden_size
    assert (vb.token_embeddings() == hf.token_embeddings()).all()


def test_score_matches_hf_on_tldr_pairs_under_attribute_variants(hf, vb):
    lib = load_library()
    reqs = [r for p in _tldr_pairs() for r in pair_requests(p.prompt, p.chosen, p.rejected, SETS, lib)]
    ref = hf.score(reqs)
    for read in (True, False):  # reading vLLM's prefix cache, and vLLM's default of not reading it
        got = vb.score(reqs, read_prefix_cache=read)
        assert [s.n_tokens for s in got] == [s.n_tokens for s in ref]
        worst = max(abs(a.logprob - b.logprob) for a, b in zip(got, ref))
        assert worst < 1e-3, (read, worst)


def test_score_continuations_with_a_common_start_and_empty_ones(hf, vb):
    # the second continuation's start can be served from the prefix cache: it must still be scored
    msgs = user_turn("Name a colour.")
    reqs = [ScoreRequest.of(msgs, c) for c in
            ("Teal is a colour between blue and green.", "Teal is a colour between blue and green, yes.",
             "", "Teal is a colour between blue and green.")]
    got, ref = vb.score(reqs), hf.score(reqs)
    assert got[2].logprob == 0.0 and got[2].n_tokens == 0
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, ref)) < 1e-3
    assert got[0] == got[3]


def test_greedy_generate_identical_to_hf(hf, vb):
    cfg = GenerationConfig(max_new_tokens=40)
    ctxs = [user_turn(p) for p in PROMPTS]
    ours, ref = vb.generate(ctxs, cfg), hf.generate(ctxs, cfg)
    assert [g.text for g in ours] == [g.text for g in ref]
    assert [g.token_ids for g in ours] == [g.token_ids for g in ref]


def test_min_new_tokens_gives_the_hf_backends_tokens_plain_guided_and_streamed(hf, vb):
    from prefsteer.methods.cliper import Cliper

    ctx = [user_turn("Say only the word yes.")]
    assert len(vb.generate(ctx, GenerationConfig(max_new_tokens=12))[0].token_ids) < 6  # ends early alone
    held = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    ours, ref = vb.generate(ctx, held)[0].token_ids, hf.generate(ctx, held)[0].token_ids
    assert ours == ref and len(ours) == 12
    assert vb.stream(ctx[0], held).wait() == ref
    guides = [Cliper(b, prefs="concise=1", alpha=2.0).guide_for(None)[0] for b in (vb, hf)]
    got, want = (b.generate(ctx, held, guide=g)[0].token_ids for b, g in zip((vb, hf), guides))
    assert got == want and len(got) == 12


def test_sampled_generate_honours_the_config(vb):
    ctxs = [user_turn(PROMPTS[0])] * 2 + [user_turn(PROMPTS[1])]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=3)
    a, b = vb.generate(ctxs, cfg), vb.generate(ctxs, cfg)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]  # seeded: reproducible
    assert all(1 <= len(g.token_ids) <= 12 for g in a)
    assert a[0].token_ids != a[1].token_ids  # rows of one prompt get their own samples
    one = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=1, seed=0)  # top-1 sampling is greedy
    assert vb.generate(ctxs[:1], one)[0].token_ids == vb.generate(ctxs[:1], GenerationConfig(max_new_tokens=12))[0].token_ids


def test_exact_selections_identical_to_hf_on_the_ci_fixture(hf, vb):
    from prefsteer.data import load_pairs

    lib = load_library()
    cands = ["Concise", "Humor", "Formal", "Detailed", "Casual"]
    for p in load_pairs(str(REPO / "tests" / "fixtures" / "pairs_small.jsonl")):
        sel = [greedy_select(make_objective(b, p.prompt, p.chosen, p.rejected, lib), cands, 2) for b in (hf, vb)]
        assert sel[0].attributes == sel[1].attributes
        assert abs(sel[0].objective - sel[1].objective) < 1e-3


def test_eval_quick_gives_the_same_accuracies_on_both_engines(hf, vb, tmp_path):
    """`prefsteer eval --config quick` on --backend vllm and --backend hf: the same accuracy for every
    method, each run in its own memory (no score is shared between the two)."""
    from prefsteer.evaluation.protocol import load_config
    from prefsteer.evaluation.runner import Runner

    config = load_config("quick")
    runs = [Runner(config, b, tmp_path / b.name, winrate=False, progress=False).run() for b in (vb, hf)]
    assert set(runs[0]["accuracy"]) == {"none", "base", "exact", "exact-global"}
    assert runs[0]["accuracy"] == runs[1]["accuracy"]
    assert runs[0]["records"] == runs[1]["records"] > 0


def test_what_vllm_cannot_do_is_refused_by_name(vb):
    from types import SimpleNamespace

    from prefsteer.backends.base import require

    assert {"score", "generate", "stream", "guide", "guide_branches", "hidden_states", "adapter",
            "cast"} <= vb.capabilities
    assert "start_decoding" not in vb.capabilities
    with pytest.raises(UnsupportedOperation, match="start_decoding"):
        require(vb, "start_decoding")
    with pytest.raises(UnsupportedOperation, match="guide_branches"):
        vb.start_decoding([user_turn("hi")])
    # a guide that is a Python callable cannot reach vLLM's engine process
    with pytest.raises(UnsupportedOperation, match="guide"):
        vb.generate([user_turn("hi")], guide=lambda h, l, i: l)
    assert vb.cast("float32") is vb
    off = SimpleNamespace(name="vllm", companion_enabled=False, dtype="float32")  # built with companion=False
    off.companion = lambda op, needed_by: VLLMBackend.companion(off, op, needed_by)
    for op, call in (("hidden_states", lambda: VLLMBackend.hidden_states(off, [])),
                     ("adapter", lambda: VLLMBackend.adapter(off)),
                     ("cast", lambda: VLLMBackend.cast(off, "bfloat16"))):
        with pytest.raises(UnsupportedOperation, match=f"{op} \\(this engine was built with companion=False\\)"):
            call()


def test_hidden_states_adapters_and_casts_run_on_the_companion(hf, vb):
    """vLLM's engine has no hidden states or gradients: the hf backend on the same checkpoint does
    them, in this process, with vLLM's fingerprint. The states must be those of the model vLLM's
    engine runs: through the output head they give back the engine's own score of each request
    (comparing them with `hf.hidden_states` would compare the same hf model with itself)."""
    reqs = [ScoreRequest.of(user_turn(p), "A short answer, with a reason.") for p in PROMPTS[:2]]
    got, engine = vb.hidden_states(reqs), vb.score(reqs)
    comp = vb.companion("hidden_states", "the test")
    for h, req, s in zip(got, reqs, engine):
        ids = vb.encode_continuation(req.continuation)
        assert tuple(h.shape) == (len(ids), vb.hidden_size) and s.n_tokens == len(ids)
        with torch.no_grad():  # row j is the state that predicts continuation token j
            logits = comp.lm_head(h.to(comp.device, comp.lm_head.weight.dtype)).float().cpu()
        mine = torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        assert abs(mine - s.logprob) < 2e-3, (mine, s.logprob)  # hf and vLLM agree to 1e-3 above
    assert comp.fingerprint == vb.fingerprint == hf.fingerprint and vb.info()["companion"]
    low = vb.cast("bfloat16")
    assert low.fingerprint != vb.fingerprint and low is vb.cast("bfloat16")
    assert abs(low.score(reqs[:1])[0].logprob - vb.score(reqs[:1])[0].logprob) < 1.0


def test_cliper_and_reward_fitted_on_vllm_serve_like_on_hf(hf, vb, tmp_path):
    """A personal CLIPer classifier trained through vLLM's companion guides vLLM's decoding (the side
    model reads the same hidden states), with hf's tokens; Reward trains its LoRA on the companion
    and ranks like on hf."""
    from prefsteer.data import load_pairs
    from prefsteer.storage import Memory
    from prefsteer.methods.cliper import Cliper
    from prefsteer.methods.reward import Reward

    pairs = load_pairs(str(REPO / "tests" / "fixtures" / "pairs_small.jsonl"))[:4]
    cfg = GenerationConfig(max_new_tokens=16)
    texts, margins = [], []
    for b in (vb, hf):
        c = Cliper(b, memory=Memory(str(tmp_path / f"{b.name}.db")), alpha=3.0, personal_steps=50)
        c.fit("u", pairs)
        texts.append([o.text for o in c.generate("u", GUIDED[:2], cfg)])
        r = Reward(b, memory=Memory(str(tmp_path / f"{b.name}-r.db")), epochs=1)
        r.fit("u", pairs[:2])
        margins.append(r.margins("u", pairs[2:]))
    assert texts[0] == texts[1]
    assert texts[0] != [g.text for g in vb.generate([user_turn(p) for p in GUIDED[:2]], cfg)]
    assert np.allclose(margins[0], margins[1], atol=1e-4) and any(abs(m) > 1e-6 for m in margins[0])


GUIDED = ["How do I boil an egg?", "Write a haiku about the sea.", "Explain recursion to a child.",
          "Give me three tips for a job interview."]


def test_cliper_with_alpha_zero_is_plain_vllm_decoding(vb):
    from prefsteer.methods.cliper import Cliper

    cfg = GenerationConfig(max_new_tokens=24)
    plain = [g.token_ids for g in vb.generate([user_turn(p) for p in GUIDED], cfg)]
    m = Cliper(vb, prefs="concise=1,humor=0.5", alpha=0.0)
    assert [o.text for o in m.generate("u", GUIDED, cfg)] == [vb.decode_tokens(t) for t in plain]
    guide = Cliper(vb, prefs="concise=1,humor=0.5", alpha=2.0).guide_for(None)[0]
    guide.alpha = 0.0  # through the engine's processor, not short-cut by the method
    assert [g.token_ids for g in vb.generate([user_turn(p) for p in GUIDED], cfg, guide=guide)] == plain


def test_cliper_on_vllm_gives_the_hf_backends_greedy_tokens(hf, vb):
    from prefsteer.methods.cliper import Cliper

    cfg = GenerationConfig(max_new_tokens=24)
    ctxs = [user_turn(p) for p in GUIDED]
    plain = [g.token_ids for g in vb.generate(ctxs, cfg)]
    for prefs, alpha in (("concise=1,humor=0.5", 2.0), ("formal=1", 1.0)):
        ours = Cliper(vb, prefs=prefs, alpha=alpha).guide_for(None)[0]
        ref = Cliper(hf, prefs=prefs, alpha=alpha).guide_for(None)[0]
        got = [g.token_ids for g in vb.generate(ctxs, cfg, guide=ours)]
        want = [g.token_ids for g in hf.generate(ctxs, cfg, guide=ref)]
        assert got == want, prefs
        assert sum(a != b for a, b in zip(got, plain)) >= 2, prefs  # the guidance changed the answers
    # the method itself, unchanged, on vLLM
    m = [Cliper(b, prefs="concise=1,humor=0.5", alpha=2.0).generate("u", GUIDED[:2], cfg) for b in (vb, hf)]
    assert [o.text for o in m[0]] == [o.text for o in m[1]]


@pytest.mark.parametrize("options", [{}, {"plain_system": "You are a helpful assistant."}],
                         ids=["plain-is-the-request", "plain-branch-of-its-own"])
def test_drift_on_vllm_gives_the_hf_backends_greedy_tokens(hf, vb, options):
    """Drift's branches as side rows in vLLM's engine (`guide_branches`): the same greedy text as
    Drift's lock-step decoding on the hf backend, for every prompt of one batch."""
    from prefsteer.methods.drift import Drift

    weights = {"Concise": 1.5, "Humor": -0.7, "Formal": 0.0}  # Formal inactive: no branch
    cfg = GenerationConfig(max_new_tokens=24)
    outs = []
    for b in (vb, hf):
        d = Drift(b, attributes=list(weights), **options)
        d.weights["u"] = weights
        outs.append([o.text for o in d.generate("u", GUIDED, cfg)])
    assert outs[0] == outs[1]
    plain = [g.text for g in vb.generate([user_turn(p) for p in GUIDED], cfg)]
    assert sum(a != b for a, b in zip(outs[0], plain)) >= 2  # the mixture changed the answers


def test_a_guide_for_another_model_is_refused_before_the_engine(vb):
    from prefsteer.errors import InputError
    from prefsteer.methods.cliper import Cliper

    guide = Cliper(vb, prefs="concise=1", alpha=1.0).guide_for(None)[0]
    guide.fingerprint = "hf:0123456789abcdef"
    with pytest.raises(InputError, match="trained for the model hf:0123456789abcdef"):
        vb.generate([user_turn("hi")], guide=guide)
    assert vb.generate([user_turn("hi")], GenerationConfig(max_new_tokens=2))  # the engine still serves


def test_vllm_safe_dir_adds_the_tied_embedding(vb, tmp_path):
    from safetensors import safe_open

    d = Path(vb.source["engine_path"])
    assert d.name.endswith("-vllm")
    with safe_open(str(d / "prefsteer-embed-tokens.safetensors"), framework="pt") as st:
        assert list(st.keys()) == ["model.embed_tokens.weight"]


def test_the_service_on_vllm(vb, tmp_path):
    """`prefsteer serve --backend vllm`: the service on the vLLM engine, through the openai client:
    feedback indexed on vLLM, a personalized answer carrying the user's attributes, and a plain one
    identical to the engine's own greedy answer (streamed and not)."""
    from openai import OpenAI

    from prefsteer.backends import GenerationConfig
    from prefsteer.retrieval import load_embedder
    from prefsteer.service import Settings
    from tests.test_service_helpers import thread_server, wait_job

    embedder = load_embedder("hash")
    settings = Settings(db=str(tmp_path / "memory.db"), backend="vllm", auth=False, default_max_tokens=24,
                        exact={"k": 1}, make_backend=lambda: vb, make_embedder=lambda: embedder)
    prompt = "How do I boil an egg?"
    with thread_server(settings, timeout=120) as base:
        import httpx

        with httpx.Client(base_url=base, timeout=600) as http:
            r = http.post("/v1/users/maya/feedback", json={"pairs": [
                {"prompt": prompt, "chosen": "Boil it 9 minutes.", "rejected": "Eggs are a magical adventure!!"}]})
            assert r.status_code == 202, r.text
            assert wait_job(http, r.json()["job_id"], timeout=600)["status"] == "done"
            attrs = http.get("/v1/users/maya/profile").json()
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        model = client.models.list().data[0].id
        msgs = [{"role": "user", "content": prompt}]
        personal = client.chat.completions.create(model=model, user="maya", max_tokens=24, messages=msgs)
        extra = personal.model_extra["prefsteer"]
        assert extra["method"] == "exact" and len(extra["attributes"]) == 1
        assert extra["attributes"][0] in str(attrs)
        plain = client.chat.completions.create(model=model, max_tokens=24, messages=msgs,
                                               extra_body={"prefsteer": {"method": "none"}})
        own = vb.generate([msgs], GenerationConfig(max_new_tokens=24))[0].text
        assert plain.choices[0].message.content == own
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, max_tokens=24, messages=msgs, stream=True, extra_body={"prefsteer": {"method": "none"}})
            if c.choices)
        assert streamed == own
        with httpx.Client(base_url=base, timeout=60) as http:  # the engine's load and token times
            metrics = http.get("/metrics").text
        assert 'prefsteer_engine_requests{state="running"} 0.0' in metrics
        assert 'prefsteer_engine_requests{state="waiting"} 0.0' in metrics
        assert 'prefsteer_time_to_first_token_seconds_count{method="none"} 2.0' in metrics


# -- the engine loop: streams, continuous batching, cancellation, admission -----------------------

def _drift_guide_and_answer(vb, monkeypatch, prompt, cfg):
    """Drift's one-row guide for ``prompt`` as the method hands it to `generate`, and that answer."""
    from prefsteer.methods.drift import Drift

    seen = []
    generate = vb.generate

    def spy(contexts, config=None, *, guide=None):
        gens = generate(contexts, config, guide=guide)
        seen.append((contexts[0], config, guide, gens[0].token_ids))
        return gens

    monkeypatch.setattr(vb, "generate", spy)
    d = Drift(vb, attributes=["Concise", "Humor"])
    d.weights["u"] = {"Concise": 1.5, "Humor": -0.7}
    d.generate("u", [prompt], cfg)
    monkeypatch.undo()
    (context, config, guide, ids), = seen
    assert len(guide.rows) == 1
    return context, config, guide, ids


def test_stream_gives_generates_greedy_tokens_plain_cliper_and_drift(vb, monkeypatch):
    """`stream` through the engine loop: the same greedy token ids as `generate`, with no guide,
    with CLIPer's guide and with Drift's guide of one row (side rows in vLLM's engine)."""
    from prefsteer.methods.cliper import Cliper

    cfg = GenerationConfig(max_new_tokens=20)
    ctx = user_turn(GUIDED[0])
    plain = vb.generate([ctx], cfg)[0].token_ids
    s = vb.stream(ctx, cfg)
    assert s.wait() == plain and s.finish_reason in ("stop", "length")
    assert not set(s.token_ids) & set(vb.eos_token_ids)
    guide = Cliper(vb, prefs="concise=1,humor=0.5", alpha=2.0).guide_for(None)[0]
    cliper = vb.generate([ctx], cfg, guide=guide)[0].token_ids
    assert vb.stream(ctx, cfg, guide=guide).wait() == cliper
    context, dcfg, dguide, drift = _drift_guide_and_answer(vb, monkeypatch, GUIDED[0], cfg)
    assert vb.stream(context, dcfg, guide=dguide).wait() == drift
    assert cliper != plain and drift != plain  # the guides changed the answer
    two = type(dguide)(dguide.weights, dguide.beta, dguide.fingerprint, dguide.rows * 2)
    with pytest.raises(ValueError, match="one row"):
        vb.stream(context, dcfg, guide=two)


def test_streams_started_together_are_decoded_together(vb):
    """4 streams started at once run in the engine at the same steps (vLLM's continuous batching)
    and each gets the tokens it gets alone."""
    cfg = GenerationConfig(max_new_tokens=20)
    ctxs = [user_turn(p) for p in GUIDED]
    alone = [vb.generate([c], cfg)[0].token_ids for c in ctxs]
    vb.engine_loop.reset_peak()
    streams = [vb.stream(c, cfg) for c in ctxs]
    assert [s.wait() for s in streams] == alone
    assert all(s.finish_reason in ("stop", "length") for s in streams)
    stats = vb.engine_stats()
    assert stats["peak_running"] > 1, stats
    assert stats["running"] == 0


def test_a_cancelled_stream_stops_and_leaves_the_engine(vb):
    import threading
    import time

    s = vb.stream(user_turn("Explain recursion to a child."), GenerationConfig(max_new_tokens=200))
    cancelled, late = threading.Event(), []
    push = s.push

    def spy(ids):  # any push after `cancel` returned
        if cancelled.is_set():
            late.append(ids)
        push(ids)

    s.push = spy
    it = iter(s)
    next(it)
    s.cancel()
    cancelled.set()
    list(it)
    assert s.finish_reason == "cancelled" and late == []
    assert 1 <= len(s.token_ids) < 200
    deadline = time.time() + 30
    while vb.engine_stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert vb.engine_stats()["running"] == 0
    assert vb.llm.llm_engine.get_num_unfinished_requests() == 0
    assert vb.stream(user_turn("hi"), GenerationConfig(max_new_tokens=2)).wait()  # the engine still serves


def test_streams_past_the_limits_are_refused_with_engine_busy(vb):
    from prefsteer.backends.streaming import EngineBusy

    loop = vb.engine_loop
    old = (loop.max_rows, loop.max_waiting)
    vb.set_stream_limits(max_rows=1, max_waiting=0)
    try:
        s = vb.stream(user_turn("Explain recursion to a child."), GenerationConfig(max_new_tokens=200))
        with pytest.raises(EngineBusy):
            vb.stream(user_turn("hi"), GenerationConfig(max_new_tokens=2))
        s.cancel()
        s.wait()
        assert s.finish_reason == "cancelled"
        assert vb.stream(user_turn("hi"), GenerationConfig(max_new_tokens=2)).wait()  # room again
    finally:
        vb.set_stream_limits(*old)
    with pytest.raises(ValueError):
        vb.set_stream_limits(max_rows=0)


def test_a_command_on_vllm_stops_the_engine_and_exits_cleanly(vb):
    """`prefsteer generate --backend vllm`: the command closes vLLM's engine before the interpreter
    exits (left to exit handlers, the engine process went down under the loop's thread and the
    process aborted with "terminate called without an active exception" after its work was done)."""
    import subprocess
    import sys

    prompt = "How do I boil an egg?"
    r = subprocess.run([sys.executable, "-m", "prefsteer.cli", "generate", "--backend", "vllm", "--method", "none",
                        "--max-new-tokens", "8", "--json", "--quiet", prompt],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "terminate called" not in r.stderr and "exited unexpectedly" not in r.stderr, r.stderr[-2000:]
    own = vb.generate([user_turn(prompt)], GenerationConfig(max_new_tokens=8))[0].text
    assert json.loads(r.stdout)["text"] == own


class _StubEngine:
    """vLLM's LLMEngine as the engine loop uses it: every request gets token 7 at each step, and
    ends after ``finish_after`` tokens (never when None); ``fail_next`` makes the next step raise."""

    def __init__(self, finish_after: int | None = None):
        from types import SimpleNamespace

        self.ns = SimpleNamespace
        self.finish_after = finish_after
        self.live: dict[str, int] = {}
        self.most = 0
        self.aborted: list[str] = []
        self.fail_next = False

    def add_request(self, request_id, prompt, params):
        self.live[request_id] = 0
        self.most = max(self.most, len(self.live))

    def abort_request(self, ids):
        for i in ids:
            self.live.pop(i, None)
        self.aborted += ids

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        import time

        time.sleep(0.002)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the engine core died")
        outs = []
        for rid in list(self.live):
            self.live[rid] += 1
            done = self.finish_after is not None and self.live[rid] >= self.finish_after
            outs.append(self.ns(request_id=rid, finished=done,
                                outputs=[self.ns(token_ids=[7], finish_reason="length" if done else None)]))
            if done:
                del self.live[rid]
        return outs


def _until(cond, timeout=10.0):
    import time

    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_engine_loop_admission_on_a_stub_engine():
    """At most max_rows streamed requests in the engine, max_waiting more queued, `EngineBusy` past
    that; a cancelled one is aborted in the engine and its place goes to the next."""
    from prefsteer.backends.streaming import EngineBusy
    from prefsteer.backends.vllm.loop import EngineLoop

    eng = _StubEngine()
    loop = EngineLoop(eng, max_rows=2, max_waiting=1)
    try:
        streams = [loop.submit_stream(f"p{i}", None) for i in range(3)]
        with pytest.raises(EngineBusy, match="engine is full"):
            loop.submit_stream("p3", None)
        assert next(iter(streams[0])) == [7]
        assert loop.stats()["streams"] == 2 and loop.stats()["waiting"] == 1
        streams[0].cancel()
        assert streams[0].wait() and streams[0].finish_reason == "cancelled"
        _until(lambda: loop.stats()["waiting"] == 0)
        assert len(eng.aborted) == 1 and loop.stats()["streams"] == 2 and eng.most == 2
        late = loop.submit_stream("p4", None)  # one waiting place again
        with pytest.raises(EngineBusy):
            loop.submit_stream("p5", None)
    finally:
        loop.close()
    assert all(s.finish_reason == "cancelled" for s in streams[1:] + [late])
    assert not eng.live


def test_engine_loop_fails_what_it_holds_and_survives_on_a_stub_engine():
    from prefsteer.backends.vllm.loop import EngineLoop

    eng = _StubEngine(finish_after=3)
    loop = EngineLoop(eng, eos_ids=[9])
    try:
        outs = loop.run(["a", "b"], [None, None])
        assert len({o.request_id for o in outs}) == 2 and all(o.finished for o in outs)
        s = loop.submit_stream("c", None)
        assert s.wait() == [7, 7, 7] and s.finish_reason == "length"
        eng.fail_next = True
        s = loop.submit_stream("d", None)
        with pytest.raises(RuntimeError, match="engine core died"):
            s.wait()
        assert loop.stats()["failures"] == 1 and loop.stats()["running"] == 0
        assert len(loop.run(["e"], [None])) == 1  # the loop goes on
    finally:
        loop.close()
