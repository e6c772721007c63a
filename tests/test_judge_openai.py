"""The evaluation's `--judge openai` client against a real `prefsteer serve` on loopback.

The server's model is a fake one that answers like a judge ("A" or "B." for the shorter response,
"maybe" when both are as long), so the verdicts the client parses can be checked one by one; then
`prefsteer eval --judge openai --judge-url http://127.0.0.1:PORT/v1` runs the quick configuration
against it end to end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from prefsteer.backends.base import Generation  # noqa: E402
from prefsteer.backends.fake import FakeBackend  # noqa: E402
from prefsteer.errors import PrefsteerError  # noqa: E402
from prefsteer.evaluation.judge import OpenAIJudge, compare  # noqa: E402
from prefsteer.storage import Memory  # noqa: E402
from prefsteer.service import Settings, store  # noqa: E402
from prefsteer.types import PreferencePair  # noqa: E402
from tests.test_service_helpers import REPO, thread_server  # noqa: E402

HISTORY = [PreferencePair("u", "How do I boil an egg?", "Boil it 9 minutes.", "Eggs are magical!!", "1")]


class LengthJudgeBackend(FakeBackend):
    """The fake model, except that it answers a judge's question: the shorter response wins. It
    only generates whole answers (no ``stream``): the service falls back to `generate`."""

    capabilities = FakeBackend.capabilities - {"stream"}

    def generate(self, contexts, config=None, *, guide=None):
        outs = []
        for msgs in contexts:
            m = re.search(r"Response A: (.*)\n\nResponse B: (.*)\n\n", msgs[-1]["content"], re.S)
            if m is None:
                outs.extend(super().generate([msgs], config, guide=guide))
                continue
            a, b = len(m.group(1)), len(m.group(2))
            text = "A" if a < b else "B." if b < a else "maybe"
            outs.append(Generation(text, self.encode_continuation(text)))
        return outs


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("judge") / "m.db")
    mem = Memory(db)
    key = mem.create_key("evals")["key"]
    mem.close()
    settings = Settings(db=db, backend="fake", embedder="hash", model_id="judge-1",
                        make_backend=LengthJudgeBackend)
    with thread_server(settings) as base:
        yield {"base": base, "key": key}


def test_openai_judge_parses_the_verdicts_of_a_served_model(judge_server):
    judge = OpenAIJudge(judge_server["base"] + "/v1", "judge-1", api_key=judge_server["key"])
    assert judge.name == "openai:judge-1"
    # the shorter response wins, asked in both orders: a win, a loss, and a tie
    assert compare(judge, HISTORY, "How do I fry one?", "Hot pan, 3 min.", "Frying is an art of joy!!") \
        == (1.0, 1.0, 1.0)
    assert compare(judge, HISTORY, "How do I fry one?", "Frying is an art of joy!!", "Hot pan, 3 min.") \
        == (0.0, -1.0, -1.0)
    assert compare(judge, HISTORY, "How do I fry one?", "same length", "SAME LENGTH") == (0.5, 0.0, 0.0)
    # what the client parsed is what the server said to the same request
    req = judge.request(HISTORY, "q", "short", "longer one")
    raw = httpx.post(judge_server["base"] + "/v1/chat/completions", json=req,
                     headers={"Authorization": f"Bearer {judge_server['key']}"}).json()
    assert raw["choices"][0]["message"]["content"] == "A" and raw["usage"]["completion_tokens"] <= 1
    assert judge.prefer_a(HISTORY, "q", "short", "longer one") == OpenAIJudge.parse(raw) == 1.0


def test_openai_judge_errors_name_the_endpoint(judge_server):
    url = judge_server["base"] + "/v1"
    with pytest.raises(PrefsteerError, match=r"answered 401"):
        OpenAIJudge(url, "judge-1", api_key="ps-wrong").prefer_a(HISTORY, "q", "a", "b")
    with pytest.raises(PrefsteerError, match=r"answered 404.*does not exist"):
        OpenAIJudge(url, "no-such-model", api_key=judge_server["key"]).prefer_a(HISTORY, "q", "a", "b")


@pytest.mark.data
def test_eval_with_judge_url_runs_the_win_rate_against_the_server(judge_server, shared_data, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "prefsteer.cli", "eval", "--config", "quick", "--backend", "fake",
                        "--embedder", "hash", "--db", str(tmp_path / "e.db"), "--winrate", "--no-table7",
                        "--judge", "openai", "--judge-url", judge_server["base"] + "/v1",
                        "--judge-model", "judge-1", "--out", str(out), "--json", "--quiet"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "OPENAI_API_KEY": judge_server["key"]})
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    wins = [rec for rec in records if rec["kind"] == "winrate"]
    assert wins and all(rec["judge"] == "openai:judge-1" for rec in wins)
    for rec in wins:  # each verdict came back from the server as "A", "B." or "maybe"
        assert all(v in (-1.0, 0.0, 1.0) for pair in rec["preferences"] for v in pair)
        assert rec["winrate"] == sum(rec["per_prompt"]) / rec["n_prompts"]
    assert "winrate" in json.loads(r.stdout)
