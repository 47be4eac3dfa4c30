"""The OpenAI-compatible HTTP server (FastAPI): routes, SSE streaming, auth, limits, metrics."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..chat import ChatTemplate
from ..llm import LLM
from . import anthropic, responses
from .jobs import ChatJob, CompletionJob, ServerConfig
from .metrics import render_metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from .runner import EngineRunner


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="qwen36", docs_url=None, redoc_url=None)
    runner = EngineRunner(llm.engine())
    template = ChatTemplate.from_checkpoint(llm.path)
    tokenizer = llm.tokenizer
    app.state.runner = runner
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path
        try:
            if config.api_key and route != "/health":
                bearer = request.headers.get("authorization", "") == f"Bearer {config.api_key}"
                if not bearer and request.headers.get("x-api-key") != config.api_key:   # (Anthropic's header)
                    raise APIError("invalid or missing API key (send 'Authorization: Bearer <key>' or "
                                   "'x-api-key: <key>')", 401, type_="authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                raise APIError(f"request body of {length} bytes exceeds the limit of {config.max_body_bytes}", 413)
            response = await call_next(request)
        except APIError as e:
            response = error_response(e, route)
        key = (route, response.status_code)
        runner.stats.requests[key] = runner.stats.requests.get(key, 0) + 1
        return response

    async def body(request: Request) -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > config.max_body_bytes:
                raise APIError(f"request body exceeds the limit of {config.max_body_bytes} bytes", 413)
        return bytes(data)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model", "created": created,
                                            "owned_by": "qwen36", "max_model_len": runner.engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(runner.stats, runner.load()), media_type="text/plain; version=0.0.4")

    async def run(request: Request, make_job):
        """Validate, queue and answer one request (SSE when it asks to stream); errors in the route's shape."""
        try:
            job = make_job(await body(request))
            await job.prepare()
            return StreamingResponse(job.stream(request), media_type="text/event-stream") if job.req.stream \
                else JSONResponse(await job.complete(request))
        except APIError as e:
            return error_response(e, request.url.path)

    def chat_job(req: ChatCompletionRequest) -> ChatJob:
        return ChatJob(req, config, template, tokenizer, llm, runner)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, lambda raw: chat_job(parse(ChatCompletionRequest, raw)))

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await run(request, lambda raw: anthropic.MessagesJob(anthropic.parse_request(raw), chat_job))

    stored = responses.ResponseStore(config.responses_store_size)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        return await run(request, lambda raw: responses.ResponsesJob(responses.parse_request(raw), chat_job, stored))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            return JSONResponse(await anthropic.count_tokens(await body(request), chat_job))
        except APIError as e:
            return error_response(e, request.url.path)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, lambda raw: CompletionJob(parse(CompletionRequest, raw), config, tokenizer,
                                                            llm, runner))

    @app.on_event("shutdown")
    def _shutdown():
        runner.close()

    return app


class Booting:
    """The ASGI app `qwen36 serve` listens with from its first second: while the model loads, /health answers
    503 {"status": "loading"} and every other route 503 with Retry-After (llama.cpp's server does the same);
    once `ready(app)` is called, everything goes to the real app. It owns the lifespan: on shutdown it stops
    the real app's engine thread."""

    def __init__(self):
        self.app: FastAPI | None = None

    def ready(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.app is not None:
                        self.app.state.runner.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        health = scope["path"] == "/health"
        body = ({"status": "loading"} if health else
                {"error": {"message": "the model is loading; retry shortly (GET /health answers 200 when ready)",
                           "type": "service_unavailable", "param": None, "code": "loading"}})
        await JSONResponse(body, status_code=503, headers={"Retry-After": "5"})(scope, receive, send)


def error_response(e: APIError, route: str = "") -> Response:
    body = anthropic.error_body(e) if route.startswith("/v1/messages") else e.body()
    return JSONResponse(body, status_code=e.status)


