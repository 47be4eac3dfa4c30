"""The HTTP server (FastAPI): routes, SSE streaming, auth, limits, metrics.

`create_app` builds the `ServingContext` once (context.py); each route parses its API's request and runs a
job of its adapter: OpenAI chat completions and completions (openai.py), Anthropic Messages (anthropic.py)
and Responses (responses.py), the three chat APIs on one chat core (chat.py).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match

from ..llm import LLM
from . import anthropic, responses
from .chat import ChatTurn
from .config import ServerConfig
from .context import ServingContext
from .metrics import CONTENT_TYPE
from .openai import ChatCompletionJob, CompletionJob, to_call
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from .runner import EngineRunner

__all__ = ["Booting", "ServerConfig", "create_app", "header_timeout_protocol"]

log = logging.getLogger("qwen36.server")


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="qwen36", docs_url=None, redoc_url=None)
    runner = EngineRunner(llm.engine(), max_waiting=config.max_waiting)
    ctx = ServingContext.build(llm, config, runner)
    app.state.runner = runner
    created = int(time.time())
    app.add_middleware(Guard, config=config, metrics=runner.metrics, routes=app.router.routes)

    async def body(request: Request) -> bytes:
        """The whole body, within the size limit and the read timeout (a client trickling bytes is cut off)."""
        async def read() -> bytes:
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > config.max_body_bytes:
                    raise APIError(f"request body exceeds the limit of {config.max_body_bytes} bytes", 413)
            return bytes(data)
        try:
            return await asyncio.wait_for(read(), config.request_timeout)
        except asyncio.TimeoutError:
            raise APIError(f"the request body was not received within {config.request_timeout:g} s", 408,
                           code="request_timeout") from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model", "created": created,
                                            "owned_by": "qwen36", "max_model_len": ctx.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE)

    async def run(request: Request, make_job, answer=None):
        """Read, parse (off the event loop: it scales with the body), prepare and answer one request, SSE
        when it asks to stream; the work stops when the client leaves. Errors in the route's shape: an
        APIError as raised; anything else before generation began is a 400 (input validation missed), after
        it a 500."""
        route, job = request.url.path, None
        try:
            raw = await body(request)
            job = await asyncio.to_thread(make_job, raw)
            if answer is not None:                                   # a route that only computes something
                return JSONResponse(await until_disconnected(request, answer(job)))
            if job.req.stream:
                await until_disconnected(request, job.prepare())
                return StreamingResponse(job.stream(request), media_type="text/event-stream")
            return JSONResponse(await until_disconnected(request, prepare_and_complete(job, request)))
        except APIError as e:
            return error_response(e, route)
        except ClientGone:
            return Response(status_code=499)                   # nobody reads it (nginx's "client closed")
        except Exception as e:  # noqa: BLE001 - the catch-all: one request fails, in its route's shape
            started = bool(getattr(job, "started", False))
            log.error("%s failed (%s): %s: %s", route, "during generation" if started else "before generation",
                      type(e).__name__, e, exc_info=True)
            if started:
                return error_response(APIError("the server failed while generating; the request was dropped",
                                               500, type_="server_error"), route)
            return error_response(APIError(f"the request could not be processed ({type(e).__name__}); "
                                           "check its fields' types and sizes", 400), route)

    def chat_turn(req: ChatCompletionRequest) -> ChatTurn:
        """The chat turn of another API's request, translated into a chat completions request."""
        return ChatTurn(to_call(req, ctx.vocab_size), ctx)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, lambda raw: ChatCompletionJob(parse(ChatCompletionRequest, raw), ctx))

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await run(request, lambda raw: anthropic.MessagesJob(anthropic.parse_request(raw), chat_turn))

    stored = responses.ResponseStore(config.responses_store_size, max_bytes=config.responses_store_bytes)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        return await run(request, lambda raw: responses.ResponsesJob(responses.parse_request(raw), chat_turn, stored))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        return await run(request, lambda raw: raw, lambda raw: anthropic.count_tokens(raw, chat_turn))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, lambda raw: CompletionJob(parse(CompletionRequest, raw), ctx))

    @app.on_event("shutdown")
    def _shutdown():
        runner.close()

    return app


async def prepare_and_complete(job, request: Request) -> dict:
    await job.prepare()
    return await job.complete(request)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def until_disconnected(request: Request, work):
    """Await `work`, cancelled as soon as the client disconnects (vLLM's with_cancellation does the same):
    a request nobody waits for stops generating, streaming or not, and its media work stops too."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone: nothing to report
        pass
    raise ClientGone


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """The checks every request passes before its route runs, as plain ASGI (nothing buffered or wrapped):
    - the API key (constant-time), when the server has one; /health stays open;
    - Host and Origin, when the server has no key and listens on loopback: only loopback names (and the
      operator's --allowed-hosts) pass, so a web page cannot drive it through DNS rebinding or a cross-site
      form (Ollama checks the same);
    - POST bodies: Content-Type application/json (a browser's cross-site "simple" POST is text/plain) and
      a Content-Length within the limit;
    and it counts every answer in /metrics by the route template it matched ("unmatched" otherwise)."""

    def __init__(self, app, config: ServerConfig, metrics, routes):
        self.app, self.config, self.metrics, self.routes = app, config, metrics, routes
        key = config.api_key
        self.key = key.encode() if key else None
        self.check_host = key is None and is_loopback(config.host)
        self.hosts = _LOOPBACK_HOSTS | {h.lower() for h in config.allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            self._check(scope)
        except APIError as e:
            await error_response(e, scope["path"])(scope, receive, send_status)
            route = self._route(scope)                 # refused before routing: match it here for the label
        else:
            try:
                await self.app(scope, receive, send_status)
            except Exception:  # noqa: BLE001 - a route's uncaught error: a JSON 500 in its shape if not started
                log.exception("%s failed", scope["path"])
                if status == 0:
                    await error_response(APIError("internal error", 500, type_="server_error"),
                                         scope["path"])(scope, receive, send_status)
            matched = scope.get("route")               # FastAPI's router records the route it matched
            route = matched.path if matched is not None else "unmatched"
        self.metrics.requests.labels(route, str(status)).inc()

    def _route(self, scope) -> str:
        for r in self.routes:
            if r.matches(scope)[0] == Match.FULL:
                return r.path
        return "unmatched"

    def _check(self, scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.check_host:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[:host.find("]") + 1]
            if name.strip("[]").lower() not in self.hosts:
                raise APIError(f"Host {host!r} is not allowed: this server has no API key and listens on loopback, "
                               "so it answers loopback names only (add names with --allowed-hosts, or set an "
                               "--api-key)", 403, type_="permission_error", code="host_not_allowed")
            origin = headers.get("origin")
            if origin is not None:
                o = urlsplit(origin)
                if o.scheme not in ("http", "https") or (o.hostname or "").lower() not in self.hosts:
                    raise APIError(f"Origin {origin!r} is not allowed (a web page from another site cannot call "
                                   "this server)", 403, type_="permission_error", code="origin_not_allowed")
        if self.key is not None and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            bearer = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)
            if not bearer and not hmac.compare_digest(headers.get("x-api-key", "").encode(), self.key):
                raise APIError("invalid or missing API key (send 'Authorization: Bearer <key>' or "
                               "'x-api-key: <key>')", 401, type_="authentication_error", code="invalid_api_key")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise APIError(f"Content-Type must be application/json, not {kind or 'missing'!r} (with curl: "
                               "-H 'Content-Type: application/json')", 415, code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                raise APIError(f"request body of {length} bytes exceeds the limit of {self.config.max_body_bytes}",
                               413)


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
    return JSONResponse(body, status_code=e.status, headers=getattr(e, "headers", None))




def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's headers: a connection that opens and
    trickles its headers (slowloris) is closed after `seconds`, as llama.cpp's server does with its read
    timeout. uvicorn itself times out only idle keep-alive connections; the body has its own deadline
    (`request_timeout`, in the route)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()                     # the next request on a kept-alive connection begins
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()                  # its headers are complete

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11
