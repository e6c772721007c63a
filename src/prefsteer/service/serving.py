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

Every answer is decoded through the backend's engine (`Method.stream` -> `Backend.stream`), which
decodes it together with the other requests it holds. With ``stream`` each text piece goes out as
an OpenAI ``chat.completion.chunk`` event as soon as it is decoded, ending with ``data: [DONE]``; a
client that disconnects cancels its decoding. Without, the same pieces are gathered into one
``chat.completion`` (the same text). ``stop`` sequences are found as the text grows, and end the
decoding. An engine with no room left is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from prefsteer.backends.base import GenerationConfig, UnsupportedOperation
from prefsteer.backends.streaming import ContextTooLong, EngineBusy
from prefsteer.errors import PrefsteerError
from prefsteer.methods.base import AnswerStream, ConversationError, NotFittedError, UnknownOptionError
from prefsteer.service.errors import ApiError, not_found_user
from prefsteer.service.schemas import (ChatCompletion, ChatCompletionRequest, Choice, PrefsteerInfo,
                                       PrefsteerOptions, ResponseMessage, Usage)

log = logging.getLogger("prefsteer.service")

PLAIN = "none"  # the method that answers when no personalization applies
DISCONNECT_POLL_S = 0.25  # how often a whole (non-streamed) answer checks that its client is still there


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
    if (req.min_tokens or 0) > max_tokens:
        raise ApiError(400, f"`min_tokens` (={req.min_tokens}) is more than `{param}` (={max_tokens})",
                       param="min_tokens", code="invalid_value")
    sample = (req.temperature is not None and req.temperature > 0) or \
             (req.temperature is None and req.top_p is not None and req.top_p < 1)
    try:
        return GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=req.min_tokens or 0, do_sample=sample,
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

def _check_context(eng, ctx: list[dict], config: GenerationConfig) -> int:
    n = eng.backend.count_tokens(ctx)
    if n + config.max_new_tokens > eng.backend.max_context:
        raise ApiError(413, f"the prompt takes {n} tokens and max_tokens asks for {config.max_new_tokens}: "
                            f"more than the model's context of {eng.backend.max_context} tokens",
                       param="messages", code="context_length_exceeded")
    return n


class StopScan:
    """Finds the request's ``stop`` sequences in a text that arrives piece by piece: `feed` gives
    what can be sent now, holding back an ending that may be the start of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.text, self.hit = stops, "", "", False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        buf = self.held + piece
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.held = True, ""
            out = buf[: min(cuts)]
        else:
            keep = max((n for s in self.stops for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
            out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        self.text += out
        return out


@dataclass
class Reply:
    """A request being answered: the method's answer stream and what the answer will report."""
    stream: AnswerStream
    info: PrefsteerInfo
    prompt_tokens: int
    config: GenerationConfig
    stops: list[str]
    scan: StopScan = field(init=False)

    def __post_init__(self):
        self.scan = StopScan(self.stops)

    def piece(self, piece: str) -> str:
        """What to send of ``piece``; a stop sequence ends the decoding."""
        out = self.scan.feed(piece)
        if self.scan.hit:
            self.stream.cancel()
        return out

    def answer(self, eng) -> Answer:
        """The whole answer, once the stream has been read to its end (or stopped)."""
        text, ids = self.scan.text, self.stream.token_ids
        if self.scan.hit:
            n, reason = len(eng.backend.encode_continuation(text)), "stop"
        elif self.stream.finish_reason in ("stop", "length"):
            n, reason = len(ids), self.stream.finish_reason
        else:  # an answer that came whole
            n = len(eng.backend.encode_continuation(text))
            reason = "stop" if n < self.config.max_new_tokens else "length"
        return Answer(text, n, self.prompt_tokens, reason, self.info)


class ChatServing:
    """Answers chat requests with the engine's backend and whichever method a request names."""

    def __init__(self, engine):
        self.engine = engine
        self.metrics = None  # the app's `Metrics` (set by the app): tokens generated, admission refusals

    def _method(self, name: str, options: dict[str, Any]):
        try:
            return self.engine.method(name, options)
        except UnknownOptionError as e:
            raise ApiError(400, f"`prefsteer.{e.option}` does not apply to method '{name}'",
                           param=f"prefsteer.{e.option}", code="invalid_value") from None
        except PrefsteerError as e:
            raise ApiError(400, f"method '{name}': {e}", param="prefsteer", code="invalid_value") from None

    def start(self, tenant, req: ChatCompletionRequest) -> Reply:
        """Check the request, pick and build the method, and hand the conversation to the engine:
        the reply's stream gives the answer as it is decoded. Every error a request can cause is
        raised here, before the first token."""
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
            stream = self._stream(method, uid, msgs, config)
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
            stream = self._stream(method, uid, msgs, config)
        out = stream.output
        if out.context is not None:  # what the model reads: the method's additions counted too
            prompt_tokens = eng.backend.count_tokens(out.context)
        info.attributes = list(out.attributes)
        info.retrieved = out.extra.get("retrieved")
        info.timings.update({k: round(v, 6) for k, v in out.timings.items()})
        return Reply(stream, info, prompt_tokens, config, stops)

    def _stream(self, method, uid, msgs, config):
        try:
            try:
                return method.stream(uid, msgs, config)
            except NotFittedError as e:
                # a state built from the stored pairs alone (Base's history prompt) is built now
                if not (method.fits_on_demand and e.user_id is not None and uid is not None):
                    raise
                method.fit(uid, self.engine.memory.pairs(uid))
                return method.stream(uid, msgs, config)
        except ContextTooLong as e:  # the method's additions (Base's history) made it too long
            raise ApiError(413, f"method '{method.name}': {e}", param="messages",
                           code="context_length_exceeded") from None
        except EngineBusy as e:
            if self.metrics is not None:
                self.metrics.refused_busy()
            raise ApiError(503, f"the server is busy: {e}; retry after {e.retry_after:g} s", code="overloaded",
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        except UnsupportedOperation as e:
            raise ApiError(400, str(e), param="prefsteer.method", code="unsupported_method") from None
        except ConversationError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        except NotFittedError:
            raise
        except PrefsteerError as e:
            raise ApiError(400, f"method '{method.name}': {e}", param="prefsteer", code="invalid_value") from None

    def answer(self, tenant, req: ChatCompletionRequest) -> Answer:
        """The whole answer, read from the engine in this thread as it decodes (blocking)."""
        reply, start = self.start(tenant, req), time.perf_counter()
        try:
            for piece in reply.stream:
                reply.piece(piece)
                if reply.scan.hit:
                    break
        finally:
            reply.stream.cancel()  # a no-op once the stream has ended
        return self._whole(reply, start)

    async def gather(self, reply: Reply, disconnected: Callable[[], Awaitable[bool]] | None = None) -> Answer:
        """The whole answer, read from the engine without holding a thread (the route's way); when
        ``disconnected()`` turns true (the client went away) the decoding is cancelled."""

        async def watch():
            while not await disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            reply.stream.cancel()

        watcher = asyncio.create_task(watch()) if disconnected is not None else None
        start = time.perf_counter()
        try:
            async for piece in reply.stream:
                reply.piece(piece)
                if reply.scan.hit:
                    break
        finally:
            reply.stream.cancel()
            if watcher is not None:
                watcher.cancel()
        return self._whole(reply, start)

    def _whole(self, reply: Reply, start: float) -> Answer:
        reply.scan.flush()
        reply.info.timings.setdefault("generation", round(time.perf_counter() - start, 6))
        return self._answered(reply)

    def _answered(self, reply: Reply) -> Answer:
        a = reply.answer(self.engine)
        if self.metrics is not None:  # counted as an answer ends (a stream its client left is not)
            self.metrics.generated(a.info.method, a.completion_tokens, reply.stream.tokens)
        return a

    # -- shaping the answer ------------------------------------------------------------------
    def completion(self, a: Answer) -> ChatCompletion:
        eng = self.engine
        return ChatCompletion(
            id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()), model=eng.model_id,
            system_fingerprint=eng.system_fingerprint,
            choices=[Choice(index=0, message=ResponseMessage(content=a.text), finish_reason=a.finish_reason)],
            usage=Usage(prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens,
                        total_tokens=a.prompt_tokens + a.completion_tokens),
            prefsteer=a.info)

    async def events(self, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """OpenAI's ``chat.completion.chunk`` events, one per text piece as the engine decodes it,
        read without holding a thread; a client that goes away cancels the decoding (Starlette
        cancels this generator when the connection closes)."""
        eng = self.engine
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.model_id,
                   "system_fingerprint": eng.system_fingerprint,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        start = time.perf_counter()
        try:
            yield chunk({"role": "assistant", "content": ""}, prefsteer=reply.info.model_dump())
            try:
                async for piece in reply.stream:
                    if out := reply.piece(piece):
                        yield chunk({"content": out})
                    if reply.scan.hit:
                        break
            except Exception as e:  # the engine failed after the answer began: say so in the stream
                log.exception("a streamed answer failed")
                yield f"data: {json.dumps(ApiError(500, f'generation failed: {type(e).__name__}').body())}\n\n"
                return
            if out := reply.scan.flush():
                yield chunk({"content": out})
            reply.info.timings.setdefault("generation", round(time.perf_counter() - start, 6))
            a = self._answered(reply)
            yield chunk({}, a.finish_reason)
            if include_usage:
                usage = {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                         "total_tokens": a.prompt_tokens + a.completion_tokens}
                obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.model_id,
                       "choices": [], "usage": usage}
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            reply.stream.cancel()  # the client left (or a stop sequence ended it): free the batch row
