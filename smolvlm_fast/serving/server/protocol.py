"""What the OpenAI API's wire format is here: the request bodies (pydantic, each field with its range, in
/openapi.json too), the fields refused unless they ask for nothing, and the error body
{"error": {"message", "type", "param", "code"}} every refusal is answered with."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException

from ...config import SamplingParams
from .limits import Limits

__all__ = ["Limits", "ApiError", "error_body", "ChatRequest", "CompletionRequest", "check_supported"]

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # one stop string: every new chunk of text is checked against the end of each


class ApiError(Exception):
    """A request the server refuses: answered with an OpenAI error body and this status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.param, self.code, self.type), status_code=self.status)


def error_body(message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies

class Body(BaseModel):
    # Extra fields (of newer clients) that change nothing are ignored. Strict: a bool or "5" is not a count, a
    # string is not a number; and no NaN or infinity, which would turn the logits into NaN.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def not_bool_or_text(value):
    if isinstance(value, (bool, str)):
        raise ValueError(f"Input should be a valid integer, not a {'boolean' if isinstance(value, bool) else 'string'}")
    return value


def integer(ge: int | None = None, le: int | None = None):
    """An integer field in [ge, le]. As in JSON Schema, 5.0 is the integer 5; true or "5" is no integer."""
    return Annotated[int, Field(strict=False, ge=ge, le=le), BeforeValidator(not_bool_or_text)]


def unicode_text(text: str) -> str:
    """JSON lets a string hold an unpaired surrogate (\\ud800), which is no Unicode: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds an unpaired surrogate (\\u{ord(text[e.start]):04x} at {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ImageUrl(Body):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageUrl


class VideoPart(Body):
    """Not OpenAI's (as vLLM's): {"type": "video_url", "video_url": {"url": ...}}, a SmolVLM2 model's video."""
    type: Literal["video_url"]
    video_url: ImageUrl


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]],
                              Field(min_length=1)]


class StreamOptions(Body):
    include_usage: bool | None = None  # null: the default (false), as the OpenAI API takes it


class JsonSchemaFormat(Body):
    name: Text | None = None   # OpenAI's clients send one; it names nothing here
    description: Text | None = None
    schema_: dict | bool = Field(alias="schema")  # the JSON Schema the output must satisfy
    strict: bool | None = None  # every schema is enforced strictly


class ResponseFormat(Body):
    """{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, include={"type", "json_schema"})


class Sampling(Body):
    """The fields both endpoints share, each with its range. As in the OpenAI API, null is each field's default."""
    model: Text | None = None  # when given, the served model's name
    max_tokens: integer(ge=1) | None = None                # at most Limits.max_tokens, and the context's room
    temperature: float | None = Field(None, ge=0, le=2)    # below 1e-5: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: integer(ge=-1) | None = None                    # not OpenAI's: as vLLM's (-1 or 0: no top-k filter)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # not OpenAI's: as vLLM's; bounded so that
    # the penalized logits stay finite in float32
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # OpenAI's ranges; only 0 is supported
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | integer() | None = None               # bool for chat, int for completions; not supported
    top_logprobs: integer(ge=0, le=20) | None = None
    n: integer(ge=1, le=128) | None = None                 # only 1 (or null) is supported
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: integer(ge=-1, le=2**64 - 1) | None = None       # -1: no seed, as llama.cpp's server and vLLM take it
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None  # not OpenAI's: as vLLM's, each choice (each chunk) with its new token ids
    response_format: ResponseFormat | None = None  # structured output (engine/grammar.py)

    @property
    def usage_in_stream(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: integer(ge=1) | None = None


class CompletionRequest(Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]  # a list of texts or of token-id lists: one prompt


# Fields of the OpenAI API this server does not implement: refused unless they ask for nothing.
UNSUPPORTED = {
    "frequency_penalty": "use repetition_penalty (> 1 discourages repeated tokens)",
    "presence_penalty": "use repetition_penalty (> 1 discourages repeated tokens)",
    "logprobs": "log probabilities are not returned", "top_logprobs": "log probabilities are not returned",
    "logit_bias": "", "tools": "tool calls are not supported", "functions": "tool calls are not supported",
    "echo": "", "suffix": "", "best_of": "", "audio": "",
    "prediction": "",
}
FIELD_NAMES = {name for model in (TextPart, ImageUrl, ImagePart, Message, StreamOptions, ChatRequest,
                                  CompletionRequest, ResponseFormat) for name in model.model_fields} | {"schema"}


def check_supported(body: Sampling) -> None:
    if body.n not in (None, 1):
        raise ApiError(f"n is {body.n}: this server returns one choice per request (n = 1)", param="n")
    for name, value in dict(body).items():  # declared fields and extra ones
        if name in UNSUPPORTED and not asks_nothing(name, value):
            raise ApiError(f"{name} is not supported by this server" + (f": {UNSUPPORTED[name]}"
                                                                        if UNSUPPORTED[name] else ""), param=name)


def asks_nothing(name: str, value) -> bool:
    if name == "best_of":
        return value in (None, 1)
    return value in (None, False, 0, "", [], {})


def stop_strings(body: Sampling) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else body.stop or []


def sampling_params(body: Sampling) -> SamplingParams:
    """The body's sampling fields as SamplingParams (max_new_tokens is set once the prompt's length is known)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(max_new_tokens=1, temperature=temperature, do_sample=temperature > 0,
                          top_p=body.top_p or 1.0, top_k=max(body.top_k or 0, 0),
                          repetition_penalty=body.repetition_penalty or 1.0, stop_strings=tuple(stop_strings(body)),
                          seed=None if body.seed == -1 else body.seed,
                          response_format=None if body.response_format is None else body.response_format.as_dict())


def max_tokens_param(body: Sampling) -> str:
    """The name the client used for the completion's length (chat takes either, the newer one first)."""
    return "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"


# -- errors as OpenAI shapes them

async def api_error(_, exc: ApiError) -> JSONResponse:
    return exc.response()


async def http_error(_, exc: HTTPException) -> JSONResponse:
    return ApiError(str(exc.detail), status=exc.status_code).response()


NOT_AN_OBJECT = ("model_type", "model_attributes_type", "dict_type", "missing")  # pydantic's error types for a body


async def validation_error(_, exc: RequestValidationError) -> JSONResponse:
    """pydantic's errors -> a 400 naming the first field at fault (messages.0.content.1.image_url ...)."""
    errors = exc.errors()
    # the deepest error; of a union's (content: str | list of parts), the one of the branch that was not a string,
    # or the one of a check of ours (value_error) over a type's
    first = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") != "string_type",
                                       e.get("type") == "value_error")) if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                        code="invalid_json").response()
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in NOT_AN_OBJECT:
        return ApiError("the request body must be a JSON object, sent with Content-Type: application/json").response()
    loc = [str(x) for x in first.get("loc", ())[1:] if isinstance(x, int) or x in FIELD_NAMES]
    param = ".".join(x for i, x in enumerate(loc) if i == 0 or x != loc[i - 1]) or None  # union tags repeat a name
    message = first.get("msg", "invalid request")
    return ApiError(f"{param}: {message}" if param else message, param=param).response()
