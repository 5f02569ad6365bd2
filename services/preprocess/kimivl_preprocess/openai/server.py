"""The OpenAI-compatible HTTP port: ``/v1/chat/completions`` (SSE or not), ``/v1/models``,
``/health`` (alive) and ``/ready`` (503 while draining), beside the gRPC port, in the same
process and event loop, on the same :class:`~kimivl_preprocess.chat.ChatFlow` (one prompt
builder, one image loader, one set of limits).

Why aiohttp.web and not uvicorn (+ Starlette / FastAPI, as vLLM serves): it is already the
tier's dependency (the image fetcher's client), it runs on the asyncio loop grpc.aio needs (no
uvloop for either stack), and it was the fastest of the three for this traffic: a 470 KB
photo chat in, 16 SSE chunks out, p50 per round 3.2 ms against 4.6 (uvicorn + Starlette) and
7.4 (FastAPI) on this 2-core machine, 11 rounds interleaved (``bench/http_stack.py``). The
request's shape is checked by hand (``request.py``) rather than by pydantic models: the
domain checks ranges anyway, and unknown fields must be refused, not dropped.

A handler is cancelled when its client disconnects (``handler_cancellation``): leaving the
ChatFlow stream cancels the inference call and so the engine request, even before the first
byte of a non-streamed reply. Bodies are bounded: a Content-Length over the limit is a 413
before anything is read, and aiohttp stops reading a chunked body at the same limit.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from contextlib import aclosing

import grpc
from aiohttp import web

from kimivl.v1 import chat_pb2
from kimivl_contract.errors import RequestError, Unauthenticated, own_details
from kimivl_contract.errors import retry_after_s as retry_hint
from kimivl_hosting import tracing
from kimivl_hosting.grpc_host import DRAINING

from .. import metrics
from ..auth import ApiKeys
from ..chat import ChatFlow
from . import render
from .errors import HttpError, from_request_error, from_status, not_found_model
from .request import to_chat_request

log = logging.getLogger("kimivl.preprocess")

CHAT_ROUTE = "/v1/chat/completions"
LARGE_BODY = 4 << 20
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _parse(raw: bytes):
    return json.loads(raw.decode())  # str parses faster than bytes


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


def _error_response(e: HttpError) -> web.Response:
    return _json(e.status, e.body(), e.headers)


class OpenAIServer:
    """The HTTP app; :meth:`start` listens, :meth:`drain` refuses new chats and lets the
    in-flight ones finish."""

    def __init__(self, flow: ChatFlow, *, models: list[str], max_model_len: int, max_body_bytes: int,
                 keys: ApiKeys | None = None):
        self.flow = flow
        self.models = models
        self.max_model_len = max_model_len
        self.max_body_bytes = max_body_bytes
        self.keys = keys
        self.created = int(time.time())
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware], client_max_size=max_body_bytes)
        self.app.router.add_post(CHAT_ROUTE, self.chat_completions)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/v1/models/{model:.+}", self.get_model)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/ready", self.ready)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0 picks one); the port bound."""
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, shutdown_timeout=0.1)
        try:
            await site.start()
        except OSError as e:
            raise SystemExit(f"cannot listen on {host}:{port} (--http-port): {e}") from None
        return self.runner.addresses[-1][1]

    async def drain(self, grace_s: float) -> None:
        """New chats get 503 and /ready says so; in-flight ones get up to ``grace_s``, then the
        port closes (cancelling what is left, which cancels their engine requests)."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=max(grace_s, 0))
        except asyncio.TimeoutError:
            pass
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------ cross-cutting
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            if self.keys is not None and request.path.startswith("/v1/"):
                self.keys.check(request.headers.get("Authorization"))
            resp = await handler(request)
            status = resp.status
            return resp
        except Unauthenticated as e:
            status = 401
            return _error_response(HttpError(401, str(e), headers={"WWW-Authenticate": "Bearer"}))
        except HttpError as e:
            status = e.status
            resp = _error_response(e)
            if self.draining:
                resp.force_close()
            return resp
        except web.HTTPException as e:  # routing (404, 405) and aiohttp's own body limit (413)
            status = e.status
            if e.status == 413:
                message = f"the request body is over the limit of {self.max_body_bytes} bytes"
            elif e.status in (404, 405):
                message = f"no route for {request.method} {request.path}"
            else:
                message = e.reason
            return _error_response(HttpError(e.status, message))
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except Exception as e:  # a bug, not bad input: log it, answer a clean status
            log.exception("%s %s failed", request.method, route)
            return _error_response(HttpError(500, f"internal error: {type(e).__name__}"))
        finally:
            metrics.HTTP_REQUESTS.labels(route, str(status)).inc()

    # ------------------------------------------------------------------ routes
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self.draining:
            return _json(503, {"status": "NOT_SERVING", "reason": DRAINING})
        return _json(200, {"status": "SERVING"})

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "kimivl",
                "max_model_len": self.max_model_len}

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(200, {"object": "list", "data": [self._model_card(m) for m in self.models]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.models:
            raise not_found_model(name)
        return _json(200, self._model_card(name))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        if self.draining:
            raise HttpError(503, DRAINING, headers={"Retry-After": "1"})
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise HttpError(413, f"the request body is {request.content_length} bytes; the limit is "
                                 f"{self.max_body_bytes}")
        try:
            raw = await request.read()
            # A large body parses in a thread: the GIL still switches, so other requests on this
            # event loop (both ports) are not stalled for the whole parse.
            body = _parse(raw) if len(raw) < LARGE_BODY else await asyncio.to_thread(_parse, raw)
        except (ValueError, RecursionError) as e:
            raise HttpError(400, f"the request body is not valid JSON: {e}") from None
        try:
            mapped = to_chat_request(body, self.models, request_id=request.headers.get("X-Request-Id"))
        except LookupError as e:
            raise not_found_model(str(e.args[0])) from None
        except RequestError as e:
            raise from_request_error(e, param=e.field) from None
        self.in_flight += 1
        self.idle.clear()
        span = tracing.start("POST /v1/chat/completions", parent=tracing.extract(request.headers.items()),
                             kind="server") if tracing.enabled else None
        status = "ERROR"
        try:
            try:
                start = await self.flow.prepare(mapped.request, arrived, span)
            except RequestError as e:
                raise from_request_error(e, mapped.translate(str(e)), mapped.param(e.field, str(e))) from None
            headers = {"X-Request-Id": start.request_id}
            async with aclosing(self.flow.stream(start, mapped.request, None)) as replies:
                first = await self._next(replies, mapped)  # before any byte is sent: a failure keeps its status
                if mapped.stream:
                    resp = await self._stream(request, mapped, start.request_id, first, replies, headers)
                else:
                    resp = await self._collect(mapped, start.request_id, first, replies, headers)
                status = "OK"
                return resp
        except HttpError as e:
            status = f"HTTP {e.status}"
            raise
        finally:
            tracing.end(span, status)
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    # ------------------------------------------------------------------ replies
    async def _next(self, replies, mapped):
        try:
            return await anext(replies)
        except grpc.aio.AioRpcError as e:
            s = self.flow.upstream_status(e)  # the inference tier checks fields too (max_tokens)
            own = own_details(s.trailing_metadata)
            raise from_status(s.code, mapped.translate(s.details), param=mapped.param(None, s.details),
                              retry_after_s=retry_hint(s.trailing_metadata), reason=own and own[0]) from None
        except StopAsyncIteration:
            raise HttpError(500, "the inference tier's stream ended without a result") from None

    async def _collect(self, mapped, request_id: str, item, replies, headers: dict) -> web.Response:
        thinking, answer = [], []
        while isinstance(item, bytes):
            d = chat_pb2.ChatResponse.FromString(item).delta
            thinking.append(d.thinking)
            answer.append(d.answer)
            item = await self._next(replies, mapped)
        body = render.completion(f"chatcmpl-{request_id}", mapped.model, int(time.time()), "".join(thinking),
                                 "".join(answer), item.result, mapped.show_reasoning)
        return _json(200, body, headers)

    async def _stream(self, request: web.Request, mapped, request_id: str, item, replies,
                      headers: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await resp.prepare(request)
        out = render.StreamRenderer(f"chatcmpl-{request_id}", mapped.model, mapped.include_usage)
        try:
            while True:
                if not isinstance(item, bytes):
                    await resp.write(out.end(item.result))
                    break
                d = chat_pb2.ChatResponse.FromString(item).delta
                chunk = out.delta(d.thinking, d.answer)
                if chunk:
                    await resp.write(chunk)
                item = await self._next(replies, mapped)
        except HttpError as e:  # the status line has gone: the error travels as an event
            await resp.write(out.error(e.body()))
        except ConnectionResetError:
            return resp  # the client left; leaving the stream cancels the engine request
        await resp.write_eof()
        return resp


def ssl_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """HTTPS with the gRPC port's certificate (--tls-cert-file / --tls-key-file), if given."""
    if not cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
