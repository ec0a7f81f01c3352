"""What a request asks the engine for, checked before the engine sees it.

Prompts are tokenized here (the engine gets token ids), so every check the engine would make
(empty prompt, token ids outside the vocabulary, a prompt longer than the context, a
max_tokens that runs past it) becomes a 400 naming the field, and a call whose second prompt
is bad never starts its first. So is a call that would make the server write back more
logprobs than one response should hold.

Tokenizing is CPU work: `prompt_weight` says how much, so that handlers run the large ones in
the CPU pool (offload.py) instead of on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.errors import ConfigError, RequestError
from moeflow.sampling import SamplingParams
from moeflow.server.engine_client import EngineClient
from moeflow.server.errors import APIError, bad_request, from_moeflow_error
from moeflow.server.fields import MAX_LOGPROB_ENTRIES
from moeflow.server.protocol import ChatMessage, SamplingRequest
from moeflow.server.settings import ServerSettings
from moeflow.tokenizer import TextTooLong


# Any top_p below the top token's probability (at least 1/vocab) keeps just that token: raising a
# tinier top_p to this changes nothing, but keeps it from rounding to 0 in the sampler's float32
# arithmetic, where it masks every token (top_p=5e-324 did, found by fuzzing).
MIN_TOP_P = 1e-6


@dataclass(frozen=True, slots=True)
class Prompt:
    ids: list[int]
    text: str | None  # as the client wrote it; None when it sent token ids


def check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.served_model_name:
        shown = model if len(model) <= 100 else f"{model[:100]}... ({len(model)} characters)"
        raise APIError(404, f"The model `{shown}` does not exist; this server serves `{settings.served_model_name}`.",
                       param="model", code="model_not_found")


def prompt_weight(prompt: str | list) -> int:
    """About how much tokenizing and checking `prompt` costs: characters of text, or token ids."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)


def messages_weight(messages: list[ChatMessage]) -> int:
    return sum((len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or []))
               + 64 for m in messages)


def completion_prompts(prompt: str | list, client: EngineClient) -> list[Prompt]:
    """`prompt` as text, texts, token ids, or token-id lists -> one Prompt per engine prompt."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt is empty", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt is empty", "prompt")
            ids = _encode(client, item, "prompt")
            if not ids:
                raise bad_request("prompt tokenizes to no tokens", "prompt")
            out.append(Prompt(ids, item))
        else:
            out.append(Prompt(check_token_ids(list(item), client, "prompt"), None))
    return out


def check_token_ids(ids: list[int], client: EngineClient, param: str) -> list[int]:
    if not ids:
        raise bad_request(f"{param} is empty", param)
    bad = next((t for t in ids if not 0 <= t < client.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {client.vocab_size})", param)
    return ids


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template reads them: content parts joined into one string."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            kinds = {p.type for p in m.content} - {"text"}
            if kinds:
                raise bad_request(f"messages[{i}].content: only text parts are supported, got {sorted(kinds)}",
                                  "messages")
            d["content"] = "".join(p.text or "" for p in m.content)
        out.append(d)
    return out


def chat_prompt(messages: list[ChatMessage], add_generation_prompt: bool, client: EngineClient) -> Prompt:
    try:
        text = client.tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt)
    except RequestError as exc:
        raise from_moeflow_error(exc, "messages") from None
    ids = _encode(client, text, "messages", add_special_tokens=False)  # the template writes its own BOS
    if not ids:
        raise bad_request("the chat template turned these messages into an empty prompt", "messages")
    return Prompt(ids, text)


def _encode(client: EngineClient, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    try:
        return client.tokenizer.encode(text, add_special_tokens, limit=client.max_model_len - 1)
    except TextTooLong as exc:
        raise _longer_than_the_context(exc.num_tokens, client, param) from None


def _longer_than_the_context(n: int, client: EngineClient, prompt_param: str) -> APIError:
    return bad_request(
        f"This model's maximum context length is {client.max_model_len} tokens (max_model_len), but the "
        f"{prompt_param} has {n} tokens and at least one must be left to generate. Please shorten the "
        f"{prompt_param}.", prompt_param)


def max_tokens_for(prompt: Prompt, asked: int | None, client: EngineClient, *, prompt_param: str = "prompt",
                   tokens_param: str = "max_tokens") -> int:
    """Tokens to generate for this prompt: what was asked, or (None) up to the context; 400 past it."""
    limit = client.max_model_len
    n = len(prompt.ids)
    if n >= limit:
        raise _longer_than_the_context(n, client, prompt_param)
    if asked is None:
        return limit - n
    if n + asked > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens (max_model_len). However, you requested "
            f"{n + asked} tokens ({n} in the {prompt_param}, {asked} in the completion). Please reduce the "
            f"length of the {prompt_param} or {tokens_param}.", tokens_param)
    return asked


def check_fan_out(num_requests: int, settings: ServerSettings, client: EngineClient) -> None:
    if num_requests > settings.max_queue + client.rows:
        raise bad_request(f"this call asks for {num_requests} sequences (prompts x n), more than the server can "
                          f"run ({client.rows}) and queue (--max-queue {settings.max_queue}) at once", "n")


def check_logprob_volume(entries: int, param: str) -> None:
    """`entries`: token positions the response describes, times the logprobs given at each."""
    if entries > MAX_LOGPROB_ENTRIES:
        raise bad_request(f"this call asks for {entries} logprob entries (choices x echoed and generated tokens x "
                          f"(logprobs + 1)), more than one response holds ({MAX_LOGPROB_ENTRIES}); send fewer or "
                          f"shorter prompts, fewer choices, fewer tokens or fewer logprobs", param)


def sampling_params(body: SamplingRequest, *, max_tokens: int, choice: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, default_routing: str = "exact") -> SamplingParams:
    """The engine's params for choice `choice` of a call: seed + choice, so n choices differ yet repeat."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P),
            top_k=-1 if body.top_k is None else body.top_k,
            seed=None if body.seed is None else (body.seed + choice) % 2**63,
            stop=body.stop or [], stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            routing=body.routing or default_routing, task=body.task, ttft_slo_ms=body.ttft_slo_ms,
            tpot_slo_ms=body.tpot_slo_ms, priority=body.priority,
        )
    except ConfigError as exc:
        raise from_moeflow_error(exc) from None
