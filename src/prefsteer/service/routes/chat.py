"""POST /v1/chat/completions: OpenAI's chat API, personalized by the request's user.

The user is ``prefsteer.user_id`` or else OpenAI's own ``user`` field; the method is
``prefsteer.method``, by default EXACT when there is a user (retrieve the user's most similar past
prompt, inject its attributes as EXACT's configuration renders and places them: the last user turn
or the system prompt) and none otherwise. A user with no indexed feedback yet gets the plain model,
and ``prefsteer.note`` says why; asking for a method explicitly makes that an error instead.

Generation is blocking and runs in the server's thread pool (a ``def`` route). With ``stream``
the answer is generated first and then sent as OpenAI's ``chat.completion.chunk`` events, ending
with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from prefsteer.backends.base import GenerationConfig, UnsupportedOperation, user_turn
from prefsteer.errors import PrefsteerError
from prefsteer.service.auth import Tenant, current_tenant, engine
from prefsteer.service.errors import ApiError, not_found_user
from prefsteer.service.schemas import (ChatCompletion, ChatCompletionRequest, Choice, PrefsteerInfo,
                                       PrefsteerOptions, ResponseMessage, Usage, error_responses)

router = APIRouter(prefix="/v1")


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


def _user_exists(eng, uid: str) -> bool:
    return eng.memory.conn.execute("SELECT 1 FROM users WHERE user_id=?", (uid,)).fetchone() is not None


def answer(eng, tenant: Tenant, req: ChatCompletionRequest) -> Answer:
    s = eng.settings
    _refuse_unsupported(req)
    stops = _stops(req)
    config = generation_config(req, s)
    msgs = _messages(req, s)
    opts = req.prefsteer or PrefsteerOptions()
    user_id = opts.user_id or req.user
    param_user = "prefsteer.user_id" if opts.user_id else "user"
    explicit = opts.method is not None
    method = opts.method or ("exact" if user_id else "none")
    if (opts.prefs is not None or opts.alpha is not None) and method != "cliper":
        raise ApiError(400, "`prefsteer.prefs` and `prefsteer.alpha` apply to method 'cliper' only",
                       param="prefsteer.prefs" if opts.prefs is not None else "prefsteer.alpha")
    uid = tenant.user(user_id) if user_id else None
    info = PrefsteerInfo(method=method, user_id=user_id)
    if uid is not None and method != "none" and not _user_exists(eng, uid):
        if explicit:
            raise not_found_user(user_id)
        method = info.method = "none"
        info.note = "no feedback stored for this user yet: the plain model answered"
    if method in ("exact", "cliper", "drift", "base") and uid is None and not (method == "cliper" and opts.prefs):
        raise ApiError(400, f"method '{method}' needs a user: set `user` or `prefsteer.user_id`",
                       param="prefsteer.user_id")

    exact = eng.exact() if method == "exact" else None  # built once per thread: not the request's retrieval
    start = time.perf_counter()
    if exact is not None:
        try:
            entry, sim = exact.retrieve(uid, [msgs[-1]["content"]])[0]
        except ValueError:  # the user's feedback is stored but not indexed yet
            if explicit:
                raise ApiError(409, f"user '{user_id}' has no indexed feedback yet (see GET /v1/jobs/...)",
                               param=param_user, code="not_indexed") from None
            method = info.method = "none"
            info.note = "this user's feedback is not indexed yet: the plain model answered"
        else:
            msgs = exact.attribute_messages(msgs, entry.attributes)  # rendered and placed as selected
            info.attributes = list(entry.attributes)
            info.retrieved = {"prompt": entry.prompt, "similarity": round(float(sim), 4)}
    info.timings["retrieval"] = round(time.perf_counter() - start, 6)

    if method in ("none", "exact"):
        prompt_tokens = _check_context(eng, msgs, config)
        t = time.perf_counter()
        g = eng.backend.generate([msgs], config)[0]
        info.timings["generation"] = round(time.perf_counter() - t, 6)
        return _finish(eng, g.text, len(g.token_ids), prompt_tokens, config, stops, info)

    # the other methods take one prompt: the conversation has to be a single user turn
    if len(msgs) > 1:
        raise ApiError(400, f"method '{method}' answers a single user message; send one message, or use "
                            "method 'exact' or 'none' for a conversation", param="messages")
    prompt = msgs[-1]["content"]
    prompt_tokens = _check_context(eng, user_turn(prompt), config)
    options: dict[str, Any] = {}
    if method == "cliper":
        options = {k: v for k, v in (("prefs", opts.prefs), ("alpha", opts.alpha)) if v is not None}
    try:
        m = eng.method(method, options)
    except (ValueError, PrefsteerError) as e:
        raise ApiError(400, f"method '{method}': {e}", param="prefsteer", code="invalid_value") from None
    try:
        out = _generate(m, method, uid or "", prompt, config, eng)
    except UnsupportedOperation as e:
        raise ApiError(400, str(e), param="prefsteer.method", code="unsupported_method") from None
    except (ValueError, PrefsteerError) as e:
        if "not been fitted" in str(e) or "not fitted" in str(e):
            raise ApiError(409, f"method '{method}' has not been fitted for user '{user_id}': index the user "
                                f"with it first (prefsteer index --method {method})", param="prefsteer.method",
                           code="not_fitted") from None
        raise ApiError(400, f"method '{method}': {e}", param="prefsteer", code="invalid_value") from None
    info.attributes = list(out.attributes)
    info.timings.update({k: round(v, 6) for k, v in out.timings.items()})
    return _finish(eng, out.text, None, prompt_tokens, config, stops, info)


def _generate(m, method: str, uid: str, prompt: str, config, eng):
    try:
        return m.generate(uid, [prompt], config)[0]
    except ValueError as e:
        # Base's state is its history prompt, built from the stored pairs without the model
        if method == "base" and "not been fitted" in str(e):
            m.fit(uid, eng.memory.pairs(uid))
            return m.generate(uid, [prompt], config)[0]
        raise


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


# with `stream: true` the 200 is OpenAI's server-sent events (`data: {chunk}` lines, then `data: [DONE]`)
_EVENT = {"type": "object", "required": ["data"],
          "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                         "data": {"type": "string", "description": "a chat.completion.chunk as JSON, or [DONE]"}}}
_STREAM = {200: {"content": {"text/event-stream": {"schema": _EVENT}},
                 "description": "a chat.completion object, or with `stream: true` chat.completion.chunk events"}}


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={**_STREAM, **error_responses(400, 401, 404, 409, 413, 422)})
def chat_completions(req: ChatCompletionRequest, tenant: Tenant = Depends(current_tenant), eng=Depends(engine)):
    if req.model != eng.model_id:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{eng.model_id}` "
                            "(GET /v1/models)", param="model", code="model_not_found")
    a = answer(eng, tenant, req)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(eng, a, include), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return _completion(eng, a)
