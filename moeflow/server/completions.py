"""POST /v1/completions: text, texts, token ids or token-id lists; n choices each; echo; logprobs; streaming.

Choice `p * n + i` is choice i of prompt p, as OpenAI numbers them. `max_tokens=0` scores the
prompt only (lm-evaluation-harness sends it with echo and logprobs): the engine needs at least
one token, so it generates one and the answer drops it. Tokenizing large prompts, and building
echo and logprobs, happen in the CPU pool, off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request, Response

from moeflow.outputs import RequestOutput
from moeflow.server.engine_client import EngineClient, EngineRequest, Submission
from moeflow.server.errors import request_id
from moeflow.server.inputs import (
    Prompt,
    check_fan_out,
    check_logprob_volume,
    check_model,
    completion_prompts,
    max_tokens_for,
    prompt_weight,
    sampling_params,
)
from moeflow.server.logprobs import CompletionLogprobsBuilder
from moeflow.server.offload import CpuPool
from moeflow.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from moeflow.server.responses import answer, sse
from moeflow.server.settings import ServerSettings


class Completions:
    def __init__(self, client: EngineClient, settings: ServerSettings, cpu: CpuPool):
        self.client, self.settings, self.cpu = client, settings, cpu

    async def __call__(self, body: CompletionRequest, request: Request) -> Response | CompletionResponse:
        arrival = time.time()
        check_model(body.model, self.settings)
        prompts = await self.cpu.run(completion_prompts, body.prompt, self.client, weight=prompt_weight(body.prompt))
        check_fan_out(len(prompts) * body.n, self.settings, self.client)
        score_only = body.max_tokens == 0
        echo_logprobs = body.logprobs if body.echo else None
        requests, volume = [], 0
        for prompt in prompts:
            max_tokens = max_tokens_for(prompt, body.max_tokens, self.client)
            volume += body.n * _entries(len(prompt.ids) if body.echo else 0, 0 if score_only else max_tokens,
                                        body.logprobs)
            for i in range(body.n):
                params = sampling_params(body, max_tokens=max(1, max_tokens), choice=i, logprobs=body.logprobs,
                                         prompt_logprobs=echo_logprobs,
                                         default_routing=self.settings.default_routing)
                requests.append(EngineRequest(prompt.ids, params))
        check_logprob_volume(volume, "logprobs" if body.logprobs is not None else "echo")
        call = _Call(f"cmpl-{request_id(request)}", self.settings.served_model_name, body, prompts, score_only,
                     self.client, self.cpu)
        return await answer(self.client, requests, call, body.stream, request, arrival, self.cpu, weight=volume)


def _entries(echoed: int, generated: int, logprobs: int | None) -> int:
    """What one choice makes the server write: echoed tokens, and logprobs for them and the generated ones."""
    if logprobs is None:
        return echoed
    return (echoed + generated) * (logprobs + 1)


class _Call:
    """One completions call: turns engine outputs into OpenAI choices, whole or as stream chunks."""

    def __init__(self, call_id: str, model: str, body: CompletionRequest, prompts: list[Prompt], score_only: bool,
                 client: EngineClient, cpu: CpuPool):
        self.id, self.model, self.body, self.prompts, self.score_only = call_id, model, body, prompts, score_only
        self.tokenizer = client.tokenizer
        self.cpu = cpu

    def _prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.body.n]

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids, skip_special_tokens=False)

    def _generated(self, out: RequestOutput) -> int:
        """Generated tokens the client sees (none when only scoring the prompt)."""
        return 0 if self.score_only else len(out.outputs[0].token_ids)

    def _finish(self, out: RequestOutput) -> tuple[str | None, int | str | None]:
        c = out.outputs[0]
        if not c.finished:
            return None, None
        return ("length", None) if self.score_only else (c.finish_reason, c.stop_reason)

    def _usage(self, finals: list[RequestOutput | None]) -> UsageInfo:
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        completion = sum(self._generated(out) for out in finals if out is not None)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion)

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for index, out in enumerate(finals):
            prompt, c = self._prompt(index), out.outputs[0]
            k = self._generated(out)
            text = c.text if k else ""
            logprobs = None
            if self.body.logprobs is not None:
                builder = CompletionLogprobsBuilder(self.tokenizer)
                ids, entries = list(c.token_ids[:k]), list(c.logprobs[:k])
                if self.body.echo:
                    ids, entries = prompt.ids + ids, list(out.prompt_logprobs) + entries
                logprobs = builder.build(ids, entries)
            if self.body.echo:
                text = self._prompt_text(prompt) + text
            finish, stop_reason = self._finish(out)
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                            stop_reason=stop_reason))
        return CompletionResponse(id=self.id, model=self.model, choices=choices, usage=self._usage(finals))

    def _chunk(self, index: int, out: RequestOutput, builder: CompletionLogprobsBuilder, first: bool,
               created: int) -> str:
        c = out.outputs[0]
        k = self._generated(out)  # this output's new token is token k-1
        text = c.new_text if k else ""
        ids = c.token_ids[k - 1 : k] if k else []
        entries = c.logprobs[k - 1 : k] if k and c.logprobs is not None else []
        if first and self.body.echo:
            prompt = self._prompt(index)
            text = self._prompt_text(prompt) + text
            if self.body.logprobs is not None:
                ids, entries = prompt.ids + ids, list(out.prompt_logprobs) + entries
        logprobs = builder.build(ids, entries) if self.body.logprobs is not None else None
        finish, stop_reason = self._finish(out)
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                  stop_reason=stop_reason)
        return sse(CompletionResponse(id=self.id, created=created, model=self.model, choices=[choice]))

    async def stream(self, sub: Submission) -> AsyncIterator[str]:
        """One chunk per engine output (one per generated token), then the usage chunk if asked for."""
        builders: dict[int, CompletionLogprobsBuilder] = {}
        finals: list[RequestOutput | None] = [None] * len(sub.request_ids)
        created = int(time.time())
        async for index, out in sub:
            first = index not in builders
            if first:
                builders[index] = CompletionLogprobsBuilder(self.tokenizer)
            if out.finished:
                finals[index] = out
            echoed = len(self._prompt(index).ids) if first and self.body.echo else 0  # the first chunk holds the echo
            weight = _entries(echoed, 1, self.body.logprobs)
            yield await self.cpu.run(self._chunk, index, out, builders[index], first, created, weight=weight,
                                     inline_below=2048)
        if self.body.include_usage:
            yield sse(CompletionResponse(id=self.id, created=created, model=self.model, choices=[],
                                         usage=self._usage(finals)))
