"""POST /v1/chat/completions: OpenAI's chat API, personalized by the request's user.

The user is ``prefsteer.user_id`` or else OpenAI's own ``user`` field; the method is
``prefsteer.method``. The route checks the model name and leaves the rest to the serving object
(`prefsteer.service.serving.ChatServing`). The request's checks, retrieval and the hand-over to the
engine run in the server's thread pool; the answer is then read from the engine on the event loop as
it is decoded, streamed or gathered, holding no thread while it waits.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from prefsteer.service.auth import Tenant, current_tenant, engine
from prefsteer.service.errors import ApiError
from prefsteer.service.schemas import ChatCompletion, ChatCompletionRequest, error_responses

router = APIRouter(prefix="/v1")

# with `stream: true` the 200 is OpenAI's server-sent events (`data: {chunk}` lines, then `data: [DONE]`)
_EVENT = {"type": "object", "required": ["data"],
          "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                         "data": {"type": "string", "description": "a chat.completion.chunk as JSON, or [DONE]"}}}
_STREAM = {200: {"content": {"text/event-stream": {"schema": _EVENT}},
                 "description": "a chat.completion object, or with `stream: true` chat.completion.chunk events"}}


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={**_STREAM, **error_responses(400, 401, 404, 409, 413, 422, 503)})
async def chat_completions(req: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant),
                           eng=Depends(engine)):
    if req.model != eng.model_id:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{eng.model_id}` "
                            "(GET /v1/models)", param="model", code="model_not_found")
    # checks, retrieval and the hand-over to the engine block: in the thread pool
    reply = await run_in_threadpool(eng.serving.start, tenant, req)  # errors come before any event
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(eng.serving.events(reply, include), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return eng.serving.completion(await eng.serving.gather(reply, request.is_disconnected))
