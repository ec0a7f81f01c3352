"""POST /v1/chat/completions: the tokenizer's chat template, n choices, logprobs, streaming.

`max_completion_tokens` (or the older `max_tokens`) bounds the answer; with neither, it may
run to the end of the context, as in vLLM.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request, Response

from moeflow.outputs import RequestOutput
from moeflow.server.engine_client import EngineClient, EngineRequest, Submission
from moeflow.server.errors import bad_request, request_id
from moeflow.server.inputs import (
    chat_prompt,
    check_fan_out,
    check_logprob_volume,
    check_model,
    max_tokens_for,
    messages_weight,
    sampling_params,
)
from moeflow.server.logprobs import chat_logprobs
from moeflow.server.offload import CpuPool
from moeflow.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    UsageInfo,
)
from moeflow.server.responses import answer, sse
from moeflow.server.settings import ServerSettings


class ChatCompletions:
    def __init__(self, client: EngineClient, settings: ServerSettings, cpu: CpuPool):
        self.client, self.settings, self.cpu = client, settings, cpu

    async def __call__(self, body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        arrival = time.time()
        check_model(body.model, self.settings)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        check_fan_out(body.n, self.settings, self.client)
        prompt = await self.cpu.run(chat_prompt, body.messages, body.add_generation_prompt, self.client,
                                    weight=messages_weight(body.messages))
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = max_tokens_for(prompt, asked, self.client, prompt_param="messages", tokens_param=param)
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        volume = body.n * max_tokens * (num_logprobs + 1) if num_logprobs is not None else 0
        check_logprob_volume(volume, "top_logprobs")
        requests = [EngineRequest(prompt.ids, sampling_params(body, max_tokens=max_tokens, choice=i,
                                                              logprobs=num_logprobs,
                                                              default_routing=self.settings.default_routing))
                    for i in range(body.n)]
        call = _ChatCall(f"chatcmpl-{request_id(request)}", self.settings.served_model_name, body, len(prompt.ids),
                         self.client)
        return await answer(self.client, requests, call, body.stream, request, arrival, self.cpu, weight=volume)


class _ChatCall:
    def __init__(self, call_id: str, model: str, body: ChatCompletionRequest, prompt_tokens: int,
                 client: EngineClient):
        self.id, self.model, self.body, self.prompt_tokens = call_id, model, body, prompt_tokens
        self.tokenizer = client.tokenizer

    def _logprobs(self, token_ids: list[int], entries: list) -> ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(self.tokenizer, token_ids, entries, self.body.top_logprobs or 0))

    def _usage(self, finals: list[RequestOutput | None]) -> UsageInfo:
        completion = sum(len(out.outputs[0].token_ids) for out in finals if out is not None)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)

    def response(self, finals: list[RequestOutput]) -> ChatCompletionResponse:
        choices = []
        for index, out in enumerate(finals):
            c = out.outputs[0]
            choices.append(ChatChoice(index=index, message=AssistantMessage(content=c.text),
                                      logprobs=self._logprobs(c.token_ids, c.logprobs or []),
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=self._usage(finals))

    async def stream(self, sub: Submission) -> AsyncIterator[str]:
        """A role chunk per choice, then one chunk per generated token, then usage if asked for."""
        created = int(time.time())
        finals: list[RequestOutput | None] = [None] * len(sub.request_ids)

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=self.id, created=created, model=self.model, choices=choices,
                                           usage=usage))

        for index in range(len(sub.request_ids)):
            yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        async for index, out in sub:
            c = out.outputs[0]
            k = len(c.token_ids)
            logprobs = self._logprobs(c.token_ids[k - 1 : k], (c.logprobs or [])[k - 1 : k])
            if out.finished:
                finals[index] = out
            yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=c.new_text), logprobs=logprobs,
                                         finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
        if self.body.include_usage:
            yield chunk([], self._usage(finals))
