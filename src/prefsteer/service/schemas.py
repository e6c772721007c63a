"""Request and response models: OpenAI's chat completion API field for field, prefsteer's extras
in a ``prefsteer`` object. Unknown request fields are refused (400 naming the field), so a client
never believes an option was applied when it was not. Numbers and booleans are taken as JSON types
only (``"max_tokens": "10"`` or ``true`` for a number is a 400 naming the field); an integer is a
number, so ``"temperature": 1`` is accepted."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from prefsteer.methods import available_methods

# every registered method, as the schema's enum (a method registered later is served too)
MethodName = Literal[tuple(available_methods())]  # type: ignore[valid-type]

# `seed`: a signed 64-bit integer, as OpenAI's API defines it; torch.Generator.manual_seed (every
# backend's sampler, the fake one included) takes -2**63 .. 2**64-1 and fails past it
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- chat ------------------------------------------------------------------------------------

class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`, `tool_calls`, ... of other turns: not used
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class PrefsteerOptions(_Strict):
    user_id: Optional[str] = Field(None, description="whose preferences steer the answer (else `user`)")
    method: Optional[MethodName] = Field(
        None, description="personalization method (default: the service's, exact, when a user is given, "
                          "else none)")
    prefs: Optional[Union[dict[str, StrictFloat], str]] = Field(None, description="cliper: preference -> weight")
    alpha: Optional[StrictFloat] = Field(None, ge=0, description="cliper: guidance strength")


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    # vLLM's extension: no end of turn before this many tokens (benchmarks ask for answers of one length)
    min_tokens: Optional[StrictInt] = Field(None, ge=0)
    temperature: Optional[StrictFloat] = Field(None, ge=0, le=2)
    top_p: Optional[StrictFloat] = Field(None, gt=0, le=1)
    seed: Optional[StrictInt] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Union[str, list[str], None] = None
    n: Optional[StrictInt] = Field(None, ge=1)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # accepted at their defaults only (a non-default value is refused, naming the field)
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict[str, StrictFloat]] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[StrictBool] = None
    prefsteer: Optional[PrefsteerOptions] = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PrefsteerInfo(BaseModel):
    method: str
    user_id: Optional[str] = None
    attributes: list[str] = Field(default_factory=list)
    retrieved: Optional[dict[str, Any]] = None
    note: Optional[str] = None
    timings: dict[str, float] = Field(default_factory=dict)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[Choice]
    usage: Usage
    prefsteer: PrefsteerInfo


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefsteer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# -- feedback, jobs, profiles ------------------------------------------------------------------

class PairIn(_Strict):
    prompt: str
    chosen: str
    rejected: str


class FeedbackRequest(_Strict):
    pairs: list[PairIn] = Field(min_length=1)


class FeedbackAccepted(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    user_id: str
    pairs: int
    new_pairs: int


class Job(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    user_id: str
    pairs: int
    indexed: int
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    result: dict[str, Any] = Field(default_factory=dict)


class ProfileEntry(BaseModel):
    prompt: str
    pair_id: str
    attributes: list[str]
    gains: list[float] = Field(description="the objective's rise as each attribute was added (nats)")
    objective: float
    base_objective: float


class Profile(BaseModel):
    user_id: str
    status: str
    pairs: int
    entries: list[ProfileEntry]
    methods: list[dict[str, Any]]
    pending_jobs: list[str]


class Deleted(BaseModel):
    user_id: str
    deleted: bool = True
    rows: dict[str, int]


# -- errors ------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = Field(None, description="the request field at fault, when there is one")
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer: OpenAI's error object."""
    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "invalid request: the field is named in `error.param` (a validation error is a 400 too; so are a "
         "second Authorization header and, without keys, a Host that is not a loopback name)",
    401: "missing or invalid API key",
    404: "not found (another tenant's user is not found either)",
    408: "the request body did not arrive within `body_read_timeout` seconds",
    409: "the user's feedback is not indexed yet, or the method is not fitted",
    413: "a size limit: body, prompt, pairs per request, text length, context",
    422: "the user id does not match the user id format",
    429: "rate limit reached (per API key, else per client address; not /health or /ready): retry after "
         "`Retry-After` s",
    503: "the engine is full (rows decoding and requests waiting at their bounds): retry after `Retry-After` s",
}

# what the edge (`prefsteer.service.edge`) may answer on any route, before the route runs
EDGE_ERRORS = (400, 408, 413, 429)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these error codes (documented in the schema).
    Declaring 422 also replaces FastAPI's default validation-error body, which this server never
    sends (its validation errors are 400s in OpenAI's shape)."""
    return {c: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[c]} for c in codes}
