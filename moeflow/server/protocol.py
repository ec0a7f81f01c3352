"""Request and response bodies of the OpenAI-compatible API (and vLLM's tokenizer routes).

Field names, defaults and shapes follow OpenAI's API reference, with vLLM's extensions where
OpenAI has none (top_k, ignore_eos, stop_token_ids, stop_reason, /tokenize). Unknown request
fields are ignored, as vLLM does, so clients newer than this file keep working. Range checks
sit on the fields, so a bad value is a 400 that names the field before any engine work starts;
numbers and booleans are strict and text must be valid Unicode (fields.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from moeflow.sampling import MAX_LOGPROBS
from moeflow.server.fields import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    Bool,
    Float,
    Int,
    StopString,
    Text,
    TokenId,
    check_nested_text,
)

MAX_N = 128  # choices per prompt, as OpenAI allows


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestModel):
    include_usage: Bool = False


class SamplingRequest(RequestModel):
    """Fields that completions and chat completions share. None means "the default"."""

    model: Text | None = None
    temperature: Float | None = Field(None, ge=0, allow_inf_nan=False, description="default 1.0; 0 is greedy")
    top_p: Float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="default 1.0")
    top_k: Int | None = Field(None, ge=-1, description="-1 or 0: no limit (vLLM extension)")
    n: Int = Field(1, ge=1, le=MAX_N)
    stop: (Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None) = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: Bool = False
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    user: Text | None = None
    # vLLM's extensions
    min_p: Float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: Float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: Float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    priority: Int = 0
    # moeflow's: the routing mode (exact unless the server's default says otherwise), and hints a scheduler reads
    routing: Literal["exact", "lynx"] | None = None
    task: Annotated[Text, Field(max_length=128)] | None = None
    ttft_slo_ms: Float | None = Field(None, gt=0, allow_inf_nan=False)
    tpot_slo_ms: Float | None = Field(None, gt=0, allow_inf_nan=False)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists")
    max_tokens: Int | None = Field(16, ge=0, description="0 with echo scores the prompt only; null: up to the context")
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top logprobs per token, legacy format")


class ContentPart(RequestModel):
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool calls, names, ...: handed to the chat template as given

    role: Text = Field(min_length=1)
    content: Text | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _extra_text_is_valid(self) -> ChatMessage:
        check_nested_text(self.model_extra)
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1, description="deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: Bool = True


# -- responses ------------------------------------------------------------------------------------


class ResponseModel(BaseModel):
    pass


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(ResponseModel):
    """A completion, or (with `stream`) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[ChatLogprob] | None = None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):  # a delta carries only what changed, as OpenAI's do
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moeflow"
    root: str
    parent: str | None = None
    max_model_len: int
    vocab_size: int  # token ids in [0, vocab_size) are valid prompt tokens


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenizer routes (vLLM's shapes) --------------------------------------------------------------


class TokenizeCompletionRequest(RequestModel):
    model: Text | None = None
    prompt: Text
    add_special_tokens: Bool = True
    return_token_strs: Bool = False


class TokenizeChatRequest(RequestModel):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: Bool = True
    add_special_tokens: Bool = False  # chat templates write their own BOS
    return_token_strs: Bool = False


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(ResponseModel):
    prompt: str


class TokenizerInfo(ResponseModel):
    tokenizer_class: str = "moeflow.tokenizer.Tokenizer"
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
