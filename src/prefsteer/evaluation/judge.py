"""Judges for the generation win-rate (EXACT §6.3): which of two responses fits the user better.

A judge sees the user's training pairs, the prompt and two responses labelled A and B, and returns
its preference for A (> 0: A, < 0: B, 0: tie). `compare` asks in both orders so a position bias
cancels (see `metrics.prompt_winrate`).

The history shown is capped: at most ``max_pairs`` of the user's training pairs (10 by default) and
``max_chars`` characters of history (6,000), whole pairs only, the earliest first. The paper's judge
(EXACT §6.3) is given the user's training pairs with no cap stated; 0 lifts a cap (``max_pairs=0,
max_chars=0``: every pair, however long). The evaluation sets both from its configuration's ``winrate.judge_pairs`` and
``winrate.judge_chars``, and its report states them (`cap_text`).

* `LocalJudge`: the evaluation's own backend; preference = log p("A") - log p("B") as the answer.
* `OpenAIJudge`: any OpenAI-compatible ``/chat/completions`` endpoint, called with the official
  `openai` client (a `prefsteer serve`, vLLM, OpenAI itself); the first letter of the reply
  decides, anything else is a tie. The call goes through ``transport`` so it can be replaced
  (tests use a fake one to check the request and parsing without a server).

    >>> judge = LocalJudge(backend)
    >>> compare(judge, history, prompt, method_text, base_text)   # 1.0 win, 0.5 tie, 0.0 loss
    >>> judge = OpenAIJudge("http://127.0.0.1:8000/v1", "smollm2", api_key="ps-...")
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Protocol, Sequence

from prefsteer.backends.base import ScoreRequest
from prefsteer.methods.history import build_system_prompt
from prefsteer.types import PreferencePair
from prefsteer.evaluation.metrics import prompt_winrate

JUDGE_HEADER = ("You are a careful judge of personal preferences. Below are a user's past choices: "
                "for each request, the response the user preferred and the one they rejected.\n")
QUESTION = ("Which response would this user prefer for the request above? "
            "Answer with a single letter, A or B.")


JUDGE_PAIRS = 10     # training pairs shown to the judge at most (0: all)
JUDGE_CHARS = 6000   # characters of history shown to the judge at most (0: no limit)


def check_judge_cap(max_pairs: int, max_chars: int, names: tuple[str, str] = ("max_pairs", "max_chars")) -> None:
    """A cap is a whole number: 0 (no cap) or, for pairs, at least 1 and, for characters, more than
    the judge's header. ``names`` are the argument names the message uses."""
    for name, v in zip(names, (max_pairs, max_chars)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"`{name}` (={v!r}) has to be a whole number (0: no cap)")
        if v < 0:
            raise ValueError(f"`{name}` (={v}) has to be 0 (no cap) or positive")
    if 0 < max_chars <= len(JUDGE_HEADER):
        raise ValueError(f"`{names[1]}` (={max_chars}) has to be 0 (no cap) or exceed the judge header's "
                         f"{len(JUDGE_HEADER)} characters")


def cap_text(max_pairs: int, max_chars: int) -> str:
    """The cap in words, for reports: 'at most 10 of the user's training pairs and at most 6,000
    characters of history'."""
    pairs = "all of the user's training pairs" if max_pairs == 0 else \
        f"at most {max_pairs:,} of the user's training pairs"
    chars = "no limit on characters" if max_chars == 0 else f"at most {max_chars:,} characters of history"
    return f"{pairs} and {chars}"


def judge_messages(history: Sequence[PreferencePair], prompt: str, a: str, b: str,
                   max_pairs: int = JUDGE_PAIRS, max_chars: int = JUDGE_CHARS) -> list[dict]:
    """The judge's chat: the user's history (capped, see the module's docstring) as the system
    message, the request and both responses as the user's."""
    check_judge_cap(max_pairs, max_chars)
    history = list(history)
    system, _ = build_system_prompt(history, max_pairs or max(len(history), 1), max_chars or sys.maxsize,
                                    header=JUDGE_HEADER)
    user = f"Request: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n{QUESTION}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class Judge(Protocol):
    name: str

    def prefer_a(self, history: Sequence[PreferencePair], prompt: str, a: str, b: str) -> float:
        """> 0 when A fits the user better, < 0 when B does, 0 for a tie."""


class LocalJudge:
    def __init__(self, backend, max_pairs: int = JUDGE_PAIRS, max_chars: int = JUDGE_CHARS):
        check_judge_cap(max_pairs, max_chars)
        self.backend, self.max_pairs, self.max_chars = backend, max_pairs, max_chars
        self.name = f"local:{backend.fingerprint}"

    def prefer_a(self, history, prompt, a, b) -> float:
        msgs = judge_messages(history, prompt, a, b, self.max_pairs, self.max_chars)
        sa, sb = self.backend.score([ScoreRequest.of(msgs, "A"), ScoreRequest.of(msgs, "B")])
        return sa.logprob - sb.logprob


Transport = Callable[[str, dict, dict], dict]  # (url, json payload, headers) -> json response


class OpenAITransport:
    """The default transport: the `openai` client, one per base URL and key (its connection pool
    is reused across calls). HTTP and connection errors become a `PrefsteerError` naming the URL."""

    def __init__(self, timeout: float = 120.0, max_retries: int = 2):
        self.timeout, self.max_retries = timeout, max_retries
        self._clients: dict[tuple[str, str], object] = {}

    def client(self, base_url: str, api_key: str):
        import openai  # imported when a judge is called: `import prefsteer.evaluation` needs no openai

        key = (base_url, api_key)
        if key not in self._clients:
            self._clients[key] = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=self.timeout,
                                               max_retries=self.max_retries)
        return self._clients[key]

    def __call__(self, url: str, payload: dict, headers: dict) -> dict:
        import openai

        from prefsteer.errors import PrefsteerError

        base = url[: -len("/chat/completions")] if url.endswith("/chat/completions") else url
        auth = headers.get("Authorization", "")
        # the client insists on a key; a server without auth ignores this placeholder
        api_key = auth[len("Bearer "):] if auth.startswith("Bearer ") else "none"
        extra = {k: v for k, v in headers.items() if k != "Authorization"}
        try:
            out = self.client(base, api_key).chat.completions.create(**payload, extra_headers=extra or None)
        except openai.APIStatusError as e:
            raise PrefsteerError(f"the judge at {url} answered {e.status_code}: {e.message}") from None
        except openai.APIConnectionError as e:
            raise PrefsteerError(f"the judge at {url} could not be reached: {e}") from None
        return out.model_dump()


class OpenAIJudge:
    def __init__(self, url: str, model: str, api_key: str | None = None,
                 transport: Transport | None = None, max_pairs: int = JUDGE_PAIRS, max_chars: int = JUDGE_CHARS):
        check_judge_cap(max_pairs, max_chars)
        if not url:
            raise ValueError("`judge_url` has to be given for the OpenAI-compatible judge")
        if not model:
            raise ValueError("`judge_model` has to be given for the OpenAI-compatible judge")
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.transport = transport or OpenAITransport()
        self.max_pairs, self.max_chars = max_pairs, max_chars
        self.name = f"openai:{model}"

    def request(self, history, prompt, a, b) -> dict:
        return {"model": self.model, "temperature": 0, "max_tokens": 1,
                "messages": judge_messages(history, prompt, a, b, self.max_pairs, self.max_chars)}

    @staticmethod
    def parse(response: dict) -> float:
        """+1 for an answer starting with A, -1 for B, 0 otherwise (a tie)."""
        try:
            text = response["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"unexpected judge response: {json.dumps(response)[:200]}") from None
        first = text.strip().lstrip("*(\"'").upper()[:1]
        return 1.0 if first == "A" else -1.0 if first == "B" else 0.0

    def prefer_a(self, history, prompt, a, b) -> float:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return self.parse(self.transport(self.url, self.request(history, prompt, a, b), headers))


def compare(judge: Judge, history: Sequence[PreferencePair], prompt: str, method_text: str,
            reference_text: str) -> tuple[float, float, float]:
    """(win score in {0, 0.5, 1}, preference with the method first, preference with it second)."""
    first = judge.prefer_a(history, prompt, method_text, reference_text)
    second = -judge.prefer_a(history, prompt, reference_text, method_text)
    return prompt_winrate(first, second), first, second
