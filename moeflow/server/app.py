"""The FastAPI app: OpenAI routes under /v1 and vLLM's /tokenize, /detokenize, /tokenizer_info,
behind the API key when one is set; /health and /metrics open beside them.

Every request first passes the RequestGuard (guard.py: request id, body size and time limits);
every route is a GuardedRoute (routes.py: JSON parsed off the loop, exceptions answered once).

The app never starts or stops the engine thread: whoever made the EngineClient owns it (the
`serve` command, or a test), so one engine can sit behind several apps.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from moeflow import __version__
from moeflow.errors import RequestError
from moeflow.server.chat import ChatCompletions
from moeflow.server.completions import Completions
from moeflow.server.engine_client import EngineClient
from moeflow.server.errors import APIError, from_moeflow_error, install_error_handlers
from moeflow.server.guard import RequestGuard
from moeflow.server.inputs import chat_messages, check_model, check_token_ids, messages_weight
from moeflow.server.logprobs import token_texts
from moeflow.server.metrics import CONTENT_TYPE
from moeflow.server.offload import CpuPool
from moeflow.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from moeflow.server.responses import json_response
from moeflow.server.routes import GuardedRoute
from moeflow.server.settings import ServerSettings

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 500, 503)}


def create_app(client: EngineClient, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="moeflow", version=__version__, description="OpenAI-compatible API for an MoE model")
    app.router.route_class = GuardedRoute
    cpu = CpuPool()
    app.state.client, app.state.settings, app.state.cpu = client, settings, cpu
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_request_bytes,
                       body_timeout_s=settings.body_timeout_s, request_done=cpu.request_done)
    install_error_handlers(app)
    tokenizer = client.tokenizer
    completions, chat = Completions(client, settings, cpu), ChatCompletions(client, settings, cpu)
    keyed = [Depends(_api_key_check(settings.api_key))]

    v1 = APIRouter(prefix="/v1", dependencies=keyed, responses=_ERRORS, route_class=GuardedRoute)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        # root: the name, not the directory: a path says more about the host than a client needs
        return ModelList(data=[ModelCard(id=settings.served_model_name, root=settings.served_model_name,
                                         max_model_len=client.max_model_len,
                                         vocab_size=min(client.vocab_size, tokenizer.vocab_size))])

    @v1.post("/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions(body, request)

    @v1.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat(body, request)

    app.include_router(v1)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if client.draining or not client.alive:
            why = "shutting down" if client.draining else "the engine thread is not running"
            return APIError(503, f"unhealthy: {why}", code="unhealthy").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        body = client.metrics.render() if client.metrics else b""
        return Response(body, media_type=CONTENT_TYPE)

    def tokenized(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        if isinstance(body, TokenizeChatRequest):
            try:
                text = tokenizer.apply_chat_template(chat_messages(body.messages), body.add_generation_prompt)
            except RequestError as exc:
                raise from_moeflow_error(exc, "messages") from None
        else:
            text = body.prompt
        try:
            ids = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        except RequestError as exc:
            param = "prompt" if isinstance(body, TokenizeCompletionRequest) else "messages"
            raise from_moeflow_error(exc, param) from None
        strs = token_texts(tokenizer, ids) if body.return_token_strs else None
        # made without validating what the tokenizer made: a million ids would hold the GIL for it
        return TokenizeResponse.model_construct(count=len(ids), max_model_len=client.max_model_len, tokens=ids,
                                                token_strs=strs)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, dependencies=keyed)
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        check_model(body.model, settings)
        weight = len(body.prompt) if isinstance(body, TokenizeCompletionRequest) else messages_weight(body.messages)
        return await json_response(cpu, lambda: tokenized(body), weight * (8 if body.return_token_strs else 1))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, dependencies=keyed)
    async def detokenize(body: DetokenizeRequest) -> Response:
        check_model(body.model, settings)

        def detokenized() -> DetokenizeResponse:
            ids = check_token_ids(body.tokens, client, "tokens") if body.tokens else []
            return DetokenizeResponse(prompt=tokenizer.decode(ids, skip_special_tokens=False))

        return await json_response(cpu, detokenized, len(body.tokens) * 4)

    @app.get("/tokenizer_info", response_model=TokenizerInfo, dependencies=keyed)
    async def tokenizer_info() -> TokenizerInfo:
        return TokenizerInfo(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                             chat_template=tokenizer.chat_template, model_max_length=client.max_model_len,
                             vocab_size=tokenizer.vocab_size)

    return app


def _api_key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    return check
