"""Every method answers a multi-turn conversation with a system prompt (fake backend).

A recording backend keeps the chat contexts each method hands to the model, so each test checks
what the method made of the conversation: the caller's turns kept in order, the method's own part
(Base's history, EXACT's attributes, Drift's instructions) where the method says it goes.
"""

import pytest

from prefsteer.backends.base import GenerationConfig
from prefsteer.backends.fake import FakeBackend
from prefsteer.storage import Memory
from prefsteer.methods.base import ConversationError, NotFittedError, as_conversation, with_system
from prefsteer.methods.history import HEADER
from prefsteer.methods.registry import Resources, build
from prefsteer.retrieval import HashEmbedder
from prefsteer.types import PreferencePair

GREEDY = GenerationConfig(max_new_tokens=6)
TOPICS = "dog cat car house job friend".split()
PAIRS = [PreferencePair("ann", f"tell me about my {t}", f"funny joke lol about the {t}",
                        f"dear sir regards about the {t}", f"p{i}") for i, t in enumerate(TOPICS)]
CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a good summary of the news?"},
        {"role": "assistant", "content": "Which news?"},
        {"role": "user", "content": "tell me about my dog"}]


class Recording(FakeBackend):
    """The fake model, keeping every context it was asked to generate from or decode."""

    def __init__(self):
        super().__init__()
        self.seen: list[list[dict]] = []

    def generate(self, contexts, config=None, *, guide=None):
        self.seen += [[dict(m) for m in c] for c in contexts]
        return super().generate(contexts, config, guide=guide)

    def start_decoding(self, contexts):
        self.seen += [[dict(m) for m in c] for c in contexts]
        return super().start_decoding(contexts)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTEER_CLIPER_DIR", str(tmp_path / "cliper"))
    mem = Memory(tmp_path / "m.db")
    mem.add_pairs(PAIRS)  # the caller stores the pairs; each method's fit learns from them
    return Recording(), Resources(memory=mem, embedder=HashEmbedder())


def fitted(name, env, **options):
    backend, res = env
    m = build(name, backend, res, options)
    m.fit("ann", PAIRS)
    backend.seen.clear()
    return m


def test_none_sends_the_conversation_as_it_is(env):
    m = fitted("none", env)
    out = m.generate("ann", [CONV], GREEDY)[0]
    assert env[0].seen == [CONV] and out.text.strip()
    # a prompt string is one user turn: the same path
    m.generate(None, ["hi"], GREEDY)
    assert env[0].seen[-1] == [{"role": "user", "content": "hi"}]


def test_base_puts_the_history_after_the_callers_system_prompt(env):
    m = fitted("base", env)
    m.generate("ann", [CONV], GREEDY)
    ctx = env[0].seen[-1]
    assert ctx[1:] == CONV[1:]
    head, history = ctx[0]["content"].split("\n\n", 1)
    assert head == "You are terse." and history.startswith(HEADER) and "Request: tell me about my cat" in history
    m.generate("ann", [CONV[1:]], GREEDY)  # no system prompt of the caller's: the history is the system prompt
    assert env[0].seen[-1][0]["content"].startswith(HEADER)


@pytest.mark.parametrize("name", ["exact", "exact-global"])
def test_exact_retrieves_on_the_last_user_turn_and_injects_there(env, name):
    m = fitted(name, env, k=1)
    out = m.generate("ann", [CONV], GREEDY)[0]
    ctx = env[0].seen[-1]
    assert ctx[:3] == CONV[:3]  # the earlier turns and the system prompt are the caller's
    assert ctx[3]["content"].startswith("tell me about my dog\n") and out.attributes
    assert out.attributes[0].lower() in ctx[3]["content"].lower()
    if name == "exact":  # the nearest past prompt is the last turn's, not the first turn's
        assert out.extra["retrieved"]["prompt"] == "tell me about my dog"


def test_cliper_guides_over_the_whole_conversation(env):
    m = fitted("cliper", env, alpha=3.0, personal_rank=2, personal_steps=60)
    guided = m.generate("ann", [CONV], GREEDY)[0].text
    assert env[0].seen[-1] == CONV
    plain = fitted("none", env).generate(None, [CONV], GREEDY)[0].text
    off = build("cliper", env[0], env[1], {"alpha": 0.0, "personal_rank": 2, "personal_steps": 60})
    off = off.generate("ann", [CONV], GREEDY)[0].text
    assert off == plain and guided != plain  # alpha 0 is plain decoding; the personal head steers
    # the guidance reads the conversation: another history gives another answer
    short = m.generate("ann", [CONV[-1:]], GREEDY)[0].text
    assert short != guided


@pytest.mark.parametrize("placement", ["system", "user"])
def test_drift_decodes_its_branches_over_the_conversation(env, placement):
    m = fitted("drift", env, attributes=("Concise", "Humor", "Formal"), placement=placement)
    out = m.generate("ann", [CONV], GREEDY)[0]
    branches = env[0].seen
    # the plain branch is the conversation itself; each attribute branch keeps every turn and adds
    # its instruction after the caller's system prompt, or at the end of the last user turn
    assert CONV in branches
    others = [b for b in branches if b != CONV]
    assert len(others) == len(out.attributes) > 0
    for b in others:
        if placement == "system":
            assert b[1:] == CONV[1:] and b[0]["content"].startswith("You are terse.\n\n")
        else:
            assert b[:3] == CONV[:3] and b[3]["content"].startswith("tell me about my dog\n")


def test_reward_ranks_candidates_over_the_whole_conversation(env):
    m = fitted("reward", env, r=4, alpha=8, lr=1e-2, epochs=2, batch_size=4, max_length=48, n=3)
    out = m.generate("ann", [CONV], GREEDY)[0]
    assert env[0].seen == [CONV] * 3 and out.extra["candidates"][out.extra["chosen_index"]] == out.text
    y = "funny joke lol about the dog"
    whole, last = m.rewards("ann", [(CONV, y), (CONV[-1:], y)])
    assert whole != pytest.approx(last)  # the reward model reads the earlier turns too


@pytest.mark.parametrize("name", ["base", "exact", "exact-global", "drift", "reward"])
def test_a_method_that_learns_per_user_needs_a_user(env, name):
    m = build(name, env[0], env[1], {})
    with pytest.raises(NotFittedError) as info:
        m.generate(None, [CONV], GREEDY)
    assert info.value.user_id is None and name in str(info.value)


@pytest.mark.parametrize("conv, message", [
    ([{"role": "robot", "content": "hi"}], "message 0: role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}, {"role": "user", "content": "x"}],
     "message 1: a system prompt has to be the first"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with the user's turn"),
    ([{"role": "user", "content": None}], "message 0: content has to be a string"),
    ([], "end with the user's turn"),
])
def test_a_conversation_a_method_cannot_answer_is_named(conv, message):
    with pytest.raises(ConversationError, match=message):
        as_conversation(conv)


def test_with_system_keeps_the_callers_prompt_first():
    assert with_system([{"role": "user", "content": "q"}], "S") == [{"role": "system", "content": "S"},
                                                                    {"role": "user", "content": "q"}]
    assert with_system(CONV, "S")[0] == {"role": "system", "content": "You are terse.\n\nS"}
    assert with_system(CONV, None) == CONV
