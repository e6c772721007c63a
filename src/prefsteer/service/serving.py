"""The serving object behind `POST /v1/chat/completions`: request in, OpenAI answer out.

Like vLLM's OpenAI server, the route stays thin: it checks the model name and hands the request to
`ChatServing`, which reads OpenAI's sampling parameters, picks the method (``prefsteer.method``; by
default the service's personalization method when there is a user, the plain model otherwise),
builds it through the method registry, lets it answer the whole conversation and shapes the
``chat.completion`` (or its stream of chunks). Nothing here knows one method from another: what a
method needs (a user, a fitted state) it says by raising `NotFittedError`, which maps to HTTP
answers by type, never by message text.

A user with no stored feedback, or whose feedback is not learned yet, gets the plain model when no
method was asked for, and ``prefsteer.note`` says why; asking for a method makes that an error.

With ``stream`` the answer is generated first and then sent as OpenAI's ``chat.completion.chunk``
events, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from prefsteer.backends.base import GenerationConfig, UnsupportedOperation
from prefsteer.errors import PrefsteerError
from prefsteer.methods.base import ConversationError, NotFittedError, UnknownOptionError
from prefsteer.service.errors import ApiError, not_found_user
from prefsteer.service.schemas import (ChatCompletion, ChatCompletionRequest, Choice, PrefsteerInfo,
                                       PrefsteerOptions, ResponseMessage, Usage)

PLAIN = "none"  # the method that answers when no personalization applies


@dataclass
class Answer:
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    info: PrefsteerInfo
    extra: dict[str, Any] = field(default_factory=dict)


# -- checking the request --------------------------------------------------------------------

def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    for name, default in (("presence_penalty", 0), ("frequency_penalty", 0), ("logprobs", False),
                          ("top_logprobs", 0)):
        v = getattr(req, name)
        if v not in (None, default):
            raise ApiError(400, f"`{name}` (={v!r}) is not supported by this server; leave it out",
                           param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise ApiError(400, "`logit_bias` is not supported by this server; leave it out", param="logit_bias",
                       code="unsupported_parameter")
    if req.n not in (None, 1):
        raise ApiError(400, f"`n` (={req.n}) has to be 1: this server returns one choice", param="n",
                       code="unsupported_parameter")


def _stops(req: ChatCompletionRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"`stop` has {len(stops)} sequences; at most 4", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise ApiError(400, "`stop` sequences must not be empty", param="stop", code="invalid_value")
    return stops


def generation_config(req: ChatCompletionRequest, settings) -> GenerationConfig:
    """OpenAI's sampling parameters as the backend's config. Without temperature and top_p the
    answer is greedy (reproducible); temperature 0 is greedy too."""
    max_tokens = req.max_completion_tokens or req.max_tokens or settings.default_max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"`{param}` (={max_tokens}) is more than this server's limit of "
                            f"{settings.max_tokens_limit}", param=param, code="invalid_value")
    sample = (req.temperature is not None and req.temperature > 0) or \
             (req.temperature is None and req.top_p is not None and req.top_p < 1)
    try:
        return GenerationConfig(max_new_tokens=max_tokens, do_sample=sample,
                                temperature=req.temperature if sample and req.temperature else 1.0,
                                top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed)
    except ValueError as e:  # the config names the argument: map it to the request's field
        m = re.search(r"`(\w+)`", str(e))
        name = {"max_new_tokens": param}.get(m.group(1), m.group(1)) if m else None
        raise ApiError(400, str(e), param=name, code="invalid_value") from None


def _messages(req: ChatCompletionRequest, settings) -> list[dict]:
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    if msgs[-1]["role"] != "user":
        raise ApiError(400, "the last message has to be the user's", param="messages", code="invalid_value")
    total = sum(len(m["content"]) for m in msgs)
    if total > settings.max_prompt_chars:
        raise ApiError(413, f"the messages have {total} characters, more than the limit of "
                            f"{settings.max_prompt_chars} (max_prompt_chars)", param="messages",
                       code="prompt_too_long")
    return msgs


# -- answering -------------------------------------------------------------------------------

def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _check_context(eng, ctx: list[dict], config: GenerationConfig) -> int:
    n = eng.backend.count_tokens(ctx)
    if n + config.max_new_tokens > eng.backend.max_context:
        raise ApiError(413, f"the prompt takes {n} tokens and max_tokens asks for {config.max_new_tokens}: "
                            f"more than the model's context of {eng.backend.max_context} tokens",
                       param="messages", code="context_length_exceeded")
    return n


def _finish(eng, text: str, n_tokens: int | None, prompt_tokens: int, config, stops, info) -> Answer:
    if n_tokens is None:
        n_tokens = len(eng.backend.encode_continuation(text))
    text, stopped = _cut_at_stop(text, stops)
    reason = "stop" if stopped or n_tokens < config.max_new_tokens else "length"
    if stopped:
        n_tokens = len(eng.backend.encode_continuation(text))
    return Answer(text, n_tokens, prompt_tokens, reason, info)


class ChatServing:
    """Answers chat requests with the engine's backend and whichever method a request names."""

    def __init__(self, engine):
        self.engine = engine

    def _method(self, name: str, options: dict[str, Any]):
        try:
            return self.engine.method(name, options)
        except UnknownOptionError as e:
            raise ApiError(400, f"`prefsteer.{e.option}` does not apply to method '{name}'",
                           param=f"prefsteer.{e.option}", code="invalid_value") from None
        except PrefsteerError as e:
            raise ApiError(400, f"method '{name}': {e}", param="prefsteer", code="invalid_value") from None

    def answer(self, tenant, req: ChatCompletionRequest) -> Answer:
        eng = self.engine
        s = eng.settings
        _refuse_unsupported(req)
        stops = _stops(req)
        config = generation_config(req, s)
        msgs = _messages(req, s)
        opts = req.prefsteer or PrefsteerOptions()
        user_id = opts.user_id or req.user
        explicit = opts.method is not None
        name = opts.method or (s.default_method if user_id else PLAIN)
        options = {k: v for k, v in (("prefs", opts.prefs), ("alpha", opts.alpha)) if v is not None}
        method = self._method(name, options)
        uid = tenant.user(user_id) if user_id else None
        info = PrefsteerInfo(method=name, user_id=user_id)
        if uid is not None and method.per_user and not eng.memory.has_user(uid):
            if explicit:
                raise not_found_user(user_id)
            method, info.method = self._method(PLAIN, {}), PLAIN
            info.note = "no feedback stored for this user yet: the plain model answered"
        prompt_tokens = _check_context(eng, msgs, config)
        try:
            out = self._generate(method, uid, msgs, config)
        except NotFittedError as e:
            if e.user_id is None:
                raise ApiError(400, f"method '{name}' needs a user: set `user` or `prefsteer.user_id`",
                               param="prefsteer.user_id") from None
            if explicit:
                raise ApiError(409, f"method '{name}' has not learned from user '{user_id}' yet: index the "
                                    f"user with it first (prefsteer index --method {name}; GET /v1/jobs/... "
                                    "for queued feedback)", param="prefsteer.method", code="not_fitted") from None
            method, info.method = self._method(PLAIN, {}), PLAIN
            info.note = "this user's feedback is not learned yet: the plain model answered"
            out = self._generate(method, uid, msgs, config)
        if out.context is not None:  # what the model read: the method's additions counted too
            prompt_tokens = eng.backend.count_tokens(out.context)
        info.attributes = list(out.attributes)
        info.retrieved = out.extra.get("retrieved")
        info.timings.update({k: round(v, 6) for k, v in out.timings.items()})
        return _finish(eng, out.text, None, prompt_tokens, config, stops, info)

    def _generate(self, method, uid, msgs, config):
        try:
            try:
                return method.generate(uid, [msgs], config)[0]
            except NotFittedError as e:
                # a state built from the stored pairs alone (Base's history prompt) is built now
                if not (method.fits_on_demand and e.user_id is not None and uid is not None):
                    raise
                method.fit(uid, self.engine.memory.pairs(uid))
                return method.generate(uid, [msgs], config)[0]
        except UnsupportedOperation as e:
            raise ApiError(400, str(e), param="prefsteer.method", code="unsupported_method") from None
        except ConversationError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        except NotFittedError:
            raise
        except PrefsteerError as e:
            raise ApiError(400, f"method '{method.name}': {e}", param="prefsteer", code="invalid_value") from None

    # -- shaping the answer ------------------------------------------------------------------
    def completion(self, a: Answer) -> ChatCompletion:
        return _completion(self.engine, a)

    def events(self, a: Answer, include_usage: bool) -> Iterator[str]:
        return _events(self.engine, a, include_usage)


def _completion(eng, a: Answer) -> ChatCompletion:
    return ChatCompletion(
        id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()), model=eng.model_id,
        system_fingerprint=eng.system_fingerprint,
        choices=[Choice(index=0, message=ResponseMessage(content=a.text), finish_reason=a.finish_reason)],
        usage=Usage(prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens,
                    total_tokens=a.prompt_tokens + a.completion_tokens),
        prefsteer=a.info)


def _pieces(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+$", text) or [""]


def _events(eng, a: Answer, include_usage: bool) -> Iterator[str]:
    cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    def chunk(delta: dict, finish: str | None = None, **more) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.model_id,
               "system_fingerprint": eng.system_fingerprint,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, prefsteer=a.info.model_dump())
    for piece in _pieces(a.text):
        yield chunk({"content": piece})
    yield chunk({}, a.finish_reason)
    if include_usage:
        usage = {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                 "total_tokens": a.prompt_tokens + a.completion_tokens}
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.model_id,
               "choices": [], "usage": usage}
        yield f"data: {json.dumps(obj)}\n\n"
    yield "data: [DONE]\n\n"


