"""Guided decoding for vLLM without vLLM: the guide as data, and the side model's rows.

`CliperGuide.describe` / `from_description` and `VLLMBackend.guide_description` are checked on
random heads; `GuidedRequests` (what vLLM's logits processor runs) is driven here by an engine
loop made of the hf backend's own decoding sessions, with requests arriving late, skipping steps
and reading several tokens at once, and must reproduce CLIPer on the hf backend token for token.
The same thing inside vLLM's engine is tests/test_vllm.py (in .venv-vllm).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prefsteer.backends.base import GenerationConfig, UnsupportedOperation, user_turn
from prefsteer.errors import InputError
from prefsteer.methods.cliper.guidance import CliperGuide, check_description
from prefsteer.methods.cliper.heads import HeadBank, PreferenceHead


def vllm_stand_in(capabilities=("generate", "guide"), fingerprint="hf:abc", side_spec=None):
    """The attributes of a `VLLMBackend` that its description-making methods read, without an
    engine: called unbound on this, they run as on the real backend."""
    from prefsteer.backends.vllm.backend import VLLMBackend

    me = SimpleNamespace(name="vllm", capabilities=frozenset(capabilities), side_fingerprint=fingerprint,
                         side_spec=side_spec or {"model": None, "dtype": "float32", "cache_dir": None},
                         source={"model": "smollm2-135m"})
    me.guide_description = lambda g: VLLMBackend.guide_description(me, g)
    return me


def _bank(fp="hf:abc", d=16, ranks=(2, 3), seed=0):
    torch.manual_seed(seed)
    heads = []
    for i, r in enumerate(ranks):
        h = PreferenceHead(d, r, {"name": f"h{i}", "fingerprint": fp})
        with torch.no_grad():
            for p in h.parameters():
                p.normal_()
            h.set_standardisation(torch.randn(50, d), torch.randn(50, d))
        heads.append(h)
    return HeadBank(heads)


def test_a_described_guide_rebuilds_the_same_guidance():
    V, d = 40, 16
    emb = torch.randn(V, d)
    g = CliperGuide(_bank(d=d), [1.0, -0.5], alpha=1.5, top_k=7, embeddings=emb)
    desc = g.describe()
    assert isinstance(desc["heads"], bytes) and desc["fingerprint"] == "hf:abc"
    assert desc["weights"] == [1.0, -0.5] and desc["alpha"] == 1.5 and desc["top_k"] == 7
    back = CliperGuide.from_description(desc, emb)
    hidden, logits = torch.randn(3, d), torch.randn(3, V)
    a, b = g(hidden, logits, None), back(hidden, logits, None)
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and (torch.isinf(a).sum(1) == V - 7).all()
    assert torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)], atol=1e-5)
    assert not torch.equal(a[~torch.isinf(a)], logits.log_softmax(-1)[~torch.isinf(a)])  # it did guide
    # the key changes with anything that changes the guidance, not otherwise
    assert CliperGuide(_bank(d=d), [1.0, -0.5], 1.5, 7, emb).describe()["key"] == desc["key"]
    assert CliperGuide(_bank(d=d), [1.0, -0.5], 1.0, 7, emb).describe()["key"] != desc["key"]
    assert CliperGuide(_bank(d=d, seed=1), [1.0, -0.5], 1.5, 7, emb).describe()["key"] != desc["key"]


def test_descriptions_are_checked():
    emb = torch.randn(40, 16)
    with pytest.raises(ValueError, match="fingerprint"):
        CliperGuide(_bank(fp=""), [1.0, 1.0], 1.0, 5, emb).describe()
    mixed = HeadBank([PreferenceHead(16, 2, {"name": "a", "fingerprint": "hf:a"}),
                      PreferenceHead(16, 2, {"name": "b", "fingerprint": "hf:b"})])
    with pytest.raises(ValueError, match="fingerprint"):
        CliperGuide(mixed, [1.0, 1.0], 1.0, 5, emb).describe()
    assert CliperGuide(mixed, [1.0, 1.0], 1.0, 5, emb, fingerprint="hf:a").describe()["fingerprint"] == "hf:a"
    desc = CliperGuide(_bank(), [1.0, 1.0], 1.0, 5, emb).describe()
    check_description(desc)
    for bad in ({**desc, "format": "x"}, {k: v for k, v in desc.items() if k != "heads"},
                {**desc, "alpha": -1.0}, {**desc, "top_k": 0}, {**desc, "weights": [1.0]}, "not a dict"):
        with pytest.raises(ValueError):
            check_description(bad)
    with pytest.raises(ValueError, match="hidden size"):
        CliperGuide.from_description(desc, torch.randn(40, 8))


def test_the_vllm_backend_sends_only_guides_that_describe_themselves():
    from prefsteer.backends.vllm.backend import VLLMBackend

    emb = torch.randn(40, 16)
    fake = vllm_stand_in()
    with pytest.raises(UnsupportedOperation, match="guide"):
        VLLMBackend.guide_description(fake, lambda h, l, i: l)
    desc = VLLMBackend.guide_description(fake, CliperGuide(_bank(), [1.0, 1.0], 1.0, 5, emb))
    assert desc["side"] == {"model": None, "dtype": "float32", "cache_dir": None} and desc["fingerprint"] == "hf:abc"
    with pytest.raises(InputError, match="trained for the model hf:other"):
        VLLMBackend.guide_description(fake, CliperGuide(_bank(fp="hf:other"), [1.0, 1.0], 1.0, 5, emb))
    off = SimpleNamespace(**{**vars(fake), "capabilities": frozenset({"generate"})})
    with pytest.raises(UnsupportedOperation, match="guidance off"):
        VLLMBackend.guide_description(off, CliperGuide(_bank(), [1.0, 1.0], 1.0, 5, emb))


# -- the side model's rows against CLIPer on the hf backend --------------------------------------
PROMPTS = ["How do I boil an egg?", "Write a haiku about the sea.", "Explain recursion to a child.",
           "Give me three tips for a job interview."]


@pytest.mark.model
def test_side_rows_reproduce_cliper_on_hf_under_vllm_like_scheduling(hf_backend):
    from prefsteer.backends.vllm.side import GuidedRequests
    from prefsteer.methods.cliper import Cliper

    hf = hf_backend
    n = 24
    m = Cliper(hf, prefs="concise=1,humor=0.5", alpha=2.0, top_k=20)
    guide, _ = m.guide_for(None)
    cfg = GenerationConfig(max_new_tokens=n)
    ref = [g.token_ids for g in hf.generate([user_turn(p) for p in PROMPTS], cfg, guide=guide)]
    plain = [g.token_ids for g in hf.generate([user_turn(p) for p in PROMPTS], cfg)]
    assert ref != plain  # the guidance changes the text: the comparison below means something
    desc = dict(guide.describe(), side={"model": None, "dtype": "float32"})
    loads = []
    core = GuidedRequests(lambda spec: loads.append(spec) or hf)
    arrive = {0: 0, 1: 0, 2: 3, 3: 0}      # request 2 enters at step 3, a group of its own
    forced = {3: (1, 2)}                   # request 3 skips guidance at steps 1, 2 (reads 3 tokens at 3)
    state, outs, sizes = {}, {r: [] for r in arrive}, []
    eos = hf.eos_token_ids
    for step in range(60):
        for r, t in arrive.items():
            if t == step:
                core.add(r, desc)
                ctx = user_turn(PROMPTS[r])
                state[r] = {"rows": hf.start_decoding([ctx]), "seq": hf.encode_context(ctx)}
        live = [r for r in sorted(state) if state[r] is not None]
        if not live and step > max(arrive.values()):
            break
        batch = [r for r in live if step not in forced.get(r, ())]
        if batch:
            logits = torch.cat([state[r]["rows"].logits() for r in batch])
            guided = core.apply(logits.clone(), [(i, r, list(state[r]["seq"])) for i, r in enumerate(batch)])
        for r in live:
            s = state[r]
            tok = int(guided[batch.index(r)].argmax()) if r in batch else ref[r][len(outs[r])]
            if tok in eos:
                state[r] = None
                continue
            outs[r].append(tok)
            s["seq"].append(tok)
            if len(outs[r]) == n:
                state[r] = None
                continue
            s["rows"].append([tok])
        core.retain(r for r in state if state[r] is not None)
        sizes.append((len(core.groups), sum(g.rows for g in core.groups.values()),
                      sum(s is not None for s in state.values())))
    assert len(loads) == 1  # the side model is loaded once
    assert [outs[r] for r in sorted(outs)] == ref
    # one group of rows for the side model, whoever joins late: a step is one forward of it; the
    # rows of a request that ended leave at once
    assert all(groups <= 1 and rows == live for groups, rows, live in sizes)
    assert max(live for *_, live in sizes) == len(PROMPTS) and sizes[-2][2] < len(PROMPTS)
    assert not core.requests and not core.groups  # every row released with its request


@pytest.mark.model
def test_a_side_row_whose_tokens_are_taken_back_starts_over(hf_backend):
    """A request whose sequence got shorter than what its row has read (tokens taken back) is
    prefilled again; the rows beside it keep their place and their numbers."""
    from prefsteer.backends.vllm.side import GuidedRequests
    from prefsteer.methods.cliper import Cliper

    hf = hf_backend
    guide, _ = Cliper(hf, prefs="concise=1", alpha=2.0, top_k=20).guide_for(None)
    desc = dict(guide.describe(), side={"model": None, "dtype": "float32"})
    seqs = [hf.encode_context(user_turn(p)) for p in PROMPTS[:3]]
    more = hf.encode_continuation(" Sure, here it is.")
    vocab = hf.start_decoding([user_turn("hi")]).logits().shape[-1]
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))

    def guided(core, rows):
        return core.apply(logits[:len(rows)].clone(), [(i, k, s) for i, (k, s) in enumerate(rows)])

    core = GuidedRequests(lambda spec: hf)
    for k in range(3):
        core.add(k, desc)
    guided(core, [(k, seqs[k]) for k in range(3)])
    guided(core, [(k, seqs[k] + more) for k in range(3)])
    # request 1 takes back all but the first of the tokens it had read past its prompt
    final = [seqs[0] + more + more[:1], seqs[1] + more[:1], seqs[2] + more + more[:1]]
    got = guided(core, [(k, final[k]) for k in range(3)])
    assert len(core.groups) == 1 and next(iter(core.groups.values())).rows == 3
    fresh = GuidedRequests(lambda spec: hf)
    for k in range(3):
        fresh.add(k, desc)
    want = guided(fresh, [(k, final[k]) for k in range(3)])
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)


# -- Drift as data: its guide, and its branches as side rows --------------------------------------
def test_a_drift_description_carries_the_mixture_and_each_prompts_branches():
    from prefsteer.backends.vllm.side import check_description as check_any
    from prefsteer.methods.drift import DriftGuide, check_drift_description, combine_logits

    rows = [{"plain_ids": None, "branch_ids": [[1, 2, 3], [1, 4]]}, {"plain_ids": [7, 8], "branch_ids": [[5], [6]]}]
    g = DriftGuide([1.5, -0.5], 2.0, "hf:abc", rows)
    desc = g.describe()
    assert desc["kind"] == "drift" and desc["rows"] == rows and desc["weights"] == [1.5, -0.5]
    one = {k: v for k, v in desc.items() if k != "rows"} | rows[1]  # what request 1 receives
    check_drift_description(one)
    check_any(one)
    back = DriftGuide.from_description(one)
    V = 11
    own, plain, branches = torch.randn(3, V), torch.randn(3, V), torch.randn(3, 2, V)
    want = combine_logits(own, plain, branches, torch.tensor([1.5, -0.5]), 2.0)
    assert torch.allclose(back.combine(own, plain, branches), want)
    assert not torch.allclose(want, own.log_softmax(-1))  # the branches do move it
    # the key names the mixture, not the prompts
    assert DriftGuide([1.5, -0.5], 2.0, "hf:abc", rows[:1]).describe()["key"] == desc["key"]
    assert DriftGuide([1.5, -0.4], 2.0, "hf:abc").describe()["key"] != desc["key"]
    assert DriftGuide([1.5, -0.5], 1.0, "hf:abc").describe()["key"] != desc["key"]
    for bad in ({**one, "format": "x"}, {k: v for k, v in one.items() if k != "branch_ids"},
                {**one, "branch_ids": [[5]]}, {**one, "branch_ids": [[5], []]}, {**one, "beta": 0.0},
                {**one, "plain_ids": []}):
        with pytest.raises(ValueError):
            check_drift_description(bad)
    with pytest.raises(ValueError, match="2 branches for 1 weights"):
        DriftGuide([1.0], 1.0, "hf:abc", rows[:1])


def test_the_vllm_backend_gives_each_request_its_own_branches():
    from prefsteer.backends.vllm.backend import VLLMBackend
    from prefsteer.backends.vllm.side import GUIDE_KEY
    from prefsteer.methods.drift import DriftGuide

    fake = vllm_stand_in(("generate", "guide", "guide_branches"))
    rows = [{"plain_ids": None, "branch_ids": [[1, 2]]}, {"plain_ids": None, "branch_ids": [[3]]}]
    args = VLLMBackend._guide_args(fake, DriftGuide([1.0], 1.0, "hf:abc", rows), 2)
    assert [a[GUIDE_KEY]["branch_ids"] for a in args] == [[[1, 2]], [[3]]]
    assert all("rows" not in a[GUIDE_KEY] and a[GUIDE_KEY]["side"]["dtype"] == "float32" for a in args)
    with pytest.raises(ValueError, match="2 rows for 3 contexts"):
        VLLMBackend._guide_args(fake, DriftGuide([1.0], 1.0, "hf:abc", rows), 3)
    with pytest.raises(InputError, match="Drift's branches are decoded by the model hf:other"):
        VLLMBackend._guide_args(fake, DriftGuide([1.0], 1.0, "hf:other", rows), 2)


class SimulatedEngine:
    """An engine with vLLM's shape, made of the hf backend: requests decode on their own rows, a
    `GuidedRequests` rewrites the logits of the guided ones at each step, exactly as vLLM's logits
    processor does, and the backend offers only ``generate`` with guides given as data."""

    name = "simulated"
    capabilities = frozenset({"score", "generate", "guide", "guide_branches"})

    def __init__(self, hf, late: dict[int, int] | None = None):
        self.hf, self.late = hf, late or {}  # late: request -> the step it enters at
        from prefsteer.backends.vllm.side import GuidedRequests

        self.core = GuidedRequests(lambda spec: hf)
        self.fingerprint, self.max_context = hf.fingerprint, hf.max_context
        self.encode_context, self.decode_tokens = hf.encode_context, hf.decode_tokens

    def generate(self, contexts, config=None, *, guide=None):
        from prefsteer.backends.base import Generation
        from prefsteer.backends.vllm.backend import VLLMBackend

        config = config or GenerationConfig()
        me = vllm_stand_in(self.capabilities, self.fingerprint)
        extras = VLLMBackend._guide_args(me, guide, len(contexts))
        state, outs, eos = {}, {r: [] for r in range(len(contexts))}, self.hf.eos_token_ids
        for step in range(10 * config.max_new_tokens):
            for r, ctx in enumerate(contexts):
                if self.late.get(r, 0) == step:
                    seq = self.hf.encode_context(ctx)
                    if extras[r] is not None:
                        self.core.add(r, extras[r]["prefsteer_guide"], len(seq))
                    state[r] = {"rows": self.hf.start_decoding([ctx]), "seq": seq}
            live = [r for r in sorted(state) if state[r] is not None]
            if not live and step >= max(self.late.values(), default=0):
                break
            if not live:
                continue
            logits = torch.cat([state[r]["rows"].logits() for r in live])
            guided = [(i, r, list(state[r]["seq"])) for i, r in enumerate(live) if extras[r] is not None]
            logits = self.core.apply(logits.clone(), guided)
            for i, r in enumerate(live):
                tok = int(logits[i].argmax())
                if tok in eos:
                    state[r] = None
                    continue
                outs[r].append(tok)
                if len(outs[r]) == config.max_new_tokens:
                    state[r] = None
                    continue
                state[r]["seq"].append(tok)
                state[r]["rows"].append([tok])
            self.core.retain(r for r in state if state[r] is not None)
        return [Generation(self.hf.decode_tokens(outs[r]), outs[r]) for r in range(len(contexts))]


DRIFT_PROMPTS = ["Write one sentence about cats.", "How do I boil an egg?", "Describe the sea in a few words."]


@pytest.mark.model
@pytest.mark.parametrize("options", [{}, {"plain_system": "You are a helpful assistant."}],
                         ids=["plain-is-the-request", "plain-branch-of-its-own"])
def test_drift_through_an_engine_that_takes_guides_as_data_matches_drift_on_hf(hf_backend, options):
    """`Drift.generate` on a backend with ``guide_branches`` only (no ``start_decoding``) sends
    `DriftGuide`s; the side rows then reproduce Drift's lock-step decoding on the hf backend token for
    token, with a request entering late (its branches a group of their own)."""
    from prefsteer.methods.drift import Drift

    weights = {"Concise": 1.5, "Humor": -0.7, "Formal": 0.0}  # Formal inactive: no branch
    cfg = GenerationConfig(max_new_tokens=16)
    ref = Drift(hf_backend, attributes=list(weights), **options)
    ref.weights["u"] = weights
    want = [o.text for o in ref.generate("u", DRIFT_PROMPTS, cfg)]
    plain = [g.text for g in hf_backend.generate([user_turn(p) for p in DRIFT_PROMPTS], cfg)]
    assert sum(a != b for a, b in zip(want, plain)) >= 2  # the mixture changes the answers
    engine = SimulatedEngine(hf_backend, late={2: 3})
    d = Drift(engine, attributes=list(weights), **options)
    d.weights["u"] = weights
    outs = d.generate("u", DRIFT_PROMPTS, cfg)
    assert [o.text for o in outs] == want
    assert outs[0].attributes == ["Concise", "Humor"]
    assert not engine.core.requests and not engine.core.groups  # every row released with its request
