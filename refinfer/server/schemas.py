"""The OpenAI wire format as pydantic models: what a client may send, what it gets back.

Where it sits: the HTTP app (app.py) validates every request body against these models
once, so a wrong type, an out-of-range value or an unknown field is an error generated
from the schema, never a hand-written check. The ranges are the engine's
(`SamplingParams`), so a request that validates also runs. Field names, defaults and
response shapes are OpenAI's (platform.openai.com/docs/api-reference); refinfer's extras
(`top_k`, `min_p`, `repetition_penalty`) are the sampler's own knobs.

    POST /v1/completions       CompletionRequest -> CompletionResponse | CompletionChunk*
    POST /v1/chat/completions  ChatRequest       -> ChatResponse       | ChatChunk*
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit for chat)


class _Strict(BaseModel):
    """A request part: unknown fields are errors, not silently ignored parameters."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Generation(_Strict):
    """The fields both endpoints share."""

    model: str | None = None  # the served model's id; None: the one model served
    temperature: float = Field(1.0, ge=0, le=2)  # 0 = greedy (OpenAI's default is 1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)  # the same seed gives the same tokens
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # cut before it
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1  # one choice per request
    user: str | None = None  # accepted for compatibility, unused
    top_k: int = Field(0, ge=0)  # refinfer's extras: 0 = off
    min_p: float = Field(0.0, ge=0, lt=1)  # 0 = off
    repetition_penalty: float = Field(1.0, gt=0, le=100)  # 1 = off

    def stop_strings(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


class CompletionRequest(_Generation):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # accepted for compatibility, unused


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for it
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


# -- responses ------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the likeliest tokens at this position, likeliest first


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token's text starts in the generated text


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    """A /v1/completions answer; streamed, each chunk has this shape too, usage on the last."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None  # on the first chunk only
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "refinfer"
    numerics: str  # refinfer's: the arithmetic the model runs ("exact" or "ggml")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str  # one line for people
    type: str  # invalid_request_error, authentication_error, server_error, ...
    param: str | None = None  # the request field at fault
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
