"""The benchmarked gateway: a tiny OpenAI-shaped ASGI app and the variant wrappers around it.

Served by uvicorn as a factory (``uvicorn --factory bench.app:create_app``); the variant and its
parameters come from environment variables so the runner can start one process per variant:

``BENCH_VARIANT``
    ``bare`` (no middleware), ``tlm-off`` (team logging disabled), ``tlm-null`` (a sink that
    discards), ``tlm-langfuse`` (the Langfuse sink), ``otel-asgi`` (OpenTelemetry's ASGI
    middleware, spans to a no-op exporter) or ``basehttp`` (a naive ``BaseHTTPMiddleware`` logger).
``BENCH_TEAMS``
    number of distinct teams; the key ``k-<i>`` belongs to team ``i`` (default 1).
``BENCH_LANGFUSE_HOST``
    base URL of the (fake) Langfuse server for ``tlm-langfuse``.

The app itself: ``POST /v1/chat/completions`` answers a chat completion with usage; with
``"stream": true`` it sends 20 SSE chunks, a usage chunk and ``[DONE]``, one ASGI message each;
``"pace_ms": N`` waits N ms between chunks (a model producing tokens). ``GET /__bench/stats``
returns the variant's delivery counters (read by the runner after a measurement, never during).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

VARIANTS: tuple[str, ...] = ("bare", "tlm-off", "tlm-null", "tlm-langfuse", "otel-asgi", "basehttp")
TLM_VARIANTS: tuple[str, ...] = ("tlm-off", "tlm-null", "tlm-langfuse")
CHAT_PATH = "/v1/chat/completions"
STATS_PATH = "/__bench/stats"
STREAM_CHUNKS = 20
NULL_SINK_NAME = "bench_null"

# The bodies the load generator sends (bench/post.lua holds the same three).
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the benchmark in a few words."},
]
REQUEST_BODIES: dict[str, bytes] = {
    "json": json.dumps({"model": "gpt-bench", "messages": MESSAGES}).encode(),
    "stream": json.dumps({"model": "gpt-bench", "stream": True, "messages": MESSAGES}).encode(),
    "paced": json.dumps(
        {"model": "gpt-bench", "stream": True, "pace_ms": 5, "messages": MESSAGES}
    ).encode(),
}


def team_id_for(kind: str, index: int, teams: int) -> str:
    """``t-null`` with one team, ``t-null-<i>`` when requests are spread over several."""
    return f"t-{kind}" if teams <= 1 else f"t-{kind}-{index}"


def langfuse_keys(index: int) -> tuple[str, str]:
    """The (public, secret) key pair of the Langfuse project of team ``index``."""
    return f"pk-lf-bench-{index}", f"sk-lf-bench-{index}"


# -- the gateway ------------------------------------------------------------------------------

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_STREAM_ID = "chatcmpl-bench"


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    payload = {
        "id": _STREAM_ID,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _stream_events(model: str) -> list[bytes]:
    events = [_chunk(model, {"role": "assistant", "content": "Hello"}, None)]
    events += [_chunk(model, {"content": f" tok{i}"}, None) for i in range(1, STREAM_CHUNKS - 1)]
    events.append(_chunk(model, {"content": "!"}, "stop"))
    usage = {
        "id": _STREAM_ID,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 21, "completion_tokens": STREAM_CHUNKS, "total_tokens": 41},
    }
    events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


# The events are pre-encoded per model name so the bare app stays as cheap as a real proxy's
# pass-through of upstream bytes; the bounded dict keeps a hostile model name from growing it.
_EVENTS_BY_MODEL: dict[str, list[bytes]] = {}


def _events_for(model: str) -> list[bytes]:
    events = _EVENTS_BY_MODEL.get(model)
    if events is None:
        events = _stream_events(model)
        if len(_EVENTS_BY_MODEL) < 64:
            _EVENTS_BY_MODEL[model] = events
    return events


def completion_body(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello, benchmark!"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25},
        },
        separators=(",", ":"),
    ).encode()


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client went away before the body was read")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _respond(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The tiny OpenAI-shaped gateway (pure ASGI), with lifespan hooks for the variants."""

    def __init__(self) -> None:
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []
        self.on_flush: list[Hook] = []
        self._stats: Callable[[], Mapping[str, Any]] | None = None

    async def flush(self) -> None:
        """Wait until the variant's background logging has caught up (in-process use)."""
        for hook in self.on_flush:
            await hook()

    def set_stats(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Serve ``stats()`` (the variant's delivery counters) on ``GET /__bench/stats``."""
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == CHAT_PATH and scope["method"] == "POST":
            await self._chat(receive, send)
        elif path == STATS_PATH:
            stats = dict(self._stats()) if self._stats is not None else {}
            await _respond(send, 200, json.dumps(stats, default=str).encode(), _JSON_HEADERS)
        else:
            await _respond(send, 404, b'{"error":"not found"}', _JSON_HEADERS)

    async def _chat(self, receive: Receive, send: Send) -> None:
        try:
            request = json.loads(await _read_body(receive))
        except ConnectionAbortedError:
            return
        except ValueError:
            await _respond(send, 400, b'{"error":"invalid JSON"}', _JSON_HEADERS)
            return
        model = str(request.get("model", "gpt-bench"))
        if not request.get("stream"):
            await _respond(send, 200, completion_body(model), _JSON_HEADERS)
            return
        pace = float(request.get("pace_ms", 0)) / 1000.0
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        for index, event in enumerate(_events_for(model)):
            if pace and index:
                await asyncio.sleep(pace)  # between chunks: the first token is not held back
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for hook in self.on_startup:
                        await hook()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self.on_shutdown:
                    await hook()
                await send({"type": "lifespan.shutdown.complete"})
                return


# -- variants ---------------------------------------------------------------------------------


class NullSink:
    """A destination that accepts every batch and discards it: measures our own cost alone."""

    async def emit(self, batch: Sequence[Any]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _tlm_app(gateway: Gateway, variant: str, teams: int, langfuse_host: str | None) -> ASGIApp:
    from team_logging_middleware._types import Caller
    from team_logging_middleware.middleware import TeamLoggingMiddleware
    from team_logging_middleware.runtime import TeamLogging
    from team_logging_middleware.settings import CallbackSpec, TeamSettings
    from team_logging_middleware.sinks import default_registry
    from team_logging_middleware.sinks.base import SinkType
    from team_logging_middleware.stores.memory import MemorySettingsStore

    kind = variant.removeprefix("tlm-")
    registry = default_registry()
    registry.register(SinkType(name=NULL_SINK_NAME, factory=lambda _vars, _ctx: NullSink()))

    def settings_for(index: int) -> TeamSettings:
        team_id = team_id_for(kind, index, teams)
        if kind == "off":
            return TeamSettings(team_id=team_id, logging_enabled=False)
        if kind == "null":
            return TeamSettings(
                team_id=team_id, callbacks=[CallbackSpec(callback_name=NULL_SINK_NAME)]
            )
        if not langfuse_host:
            raise RuntimeError("BENCH_LANGFUSE_HOST is required for tlm-langfuse")
        public, secret = langfuse_keys(index)
        spec = CallbackSpec(
            callback_name="langfuse",
            callback_vars={
                "langfuse_public_key": public,
                "langfuse_secret_key": secret,
                "langfuse_host": langfuse_host,
            },
        )
        return TeamSettings(team_id=team_id, callbacks=[spec])

    callers = {
        f"k-{i}": Caller(
            team_id=team_id_for(kind, i, teams), key_id=f"key-id-{i}", key_alias=f"bench-key-{i}"
        )
        for i in range(teams)
    }

    async def resolve(scope: Scope) -> Caller | None:
        # A typical user resolver: find the Bearer token and look the key up.
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value.decode("latin-1")
                return callers.get(token[7:]) if token[:7].lower() == "bearer " else None
        return None

    store = MemorySettingsStore()
    team_logging = TeamLogging(resolve, store=store, registry=registry)

    async def seed() -> None:
        for i in range(teams):
            await store.put_team(settings_for(i))

    async def flush() -> None:
        await team_logging.dispatcher.flush(30.0)

    gateway.on_startup.insert(0, seed)
    gateway.on_flush.append(flush)
    gateway.set_stats(lambda: team_logging.dispatcher.stats())
    return TeamLoggingMiddleware(gateway, team_logging=team_logging)


def _otel_app(gateway: Gateway) -> ASGIApp:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class NoopExporter(SpanExporter):
        """Accepts and discards spans: the cost measured is instrumentation + processor only."""

        exported = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            NoopExporter.exported += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    # A private provider (never the global one); the BatchSpanProcessor is what a production
    # deployment uses: spans are queued on the request path and exported from its thread, whose
    # CPU is counted too because it belongs to the same server process.
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoopExporter()))

    async def shutdown() -> None:
        provider.shutdown()

    async def flush() -> None:
        provider.force_flush()

    gateway.on_shutdown.append(shutdown)
    gateway.on_flush.append(flush)
    gateway.set_stats(lambda: {"spans_exported": NoopExporter.exported})
    app: ASGIApp = OpenTelemetryMiddleware(gateway, tracer_provider=provider)
    return app


def _basehttp_app(gateway: Gateway) -> ASGIApp:
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import Response

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    counters = {"logged": 0}
    tasks: list[asyncio.Task[None]] = []

    async def drain() -> None:
        while True:
            item = await queue.get()
            json.dumps(item)  # what a naive logger would write somewhere
            counters["logged"] += 1

    async def start() -> None:
        tasks.append(asyncio.create_task(drain()))

    async def stop() -> None:
        for task in tasks:
            task.cancel()

    async def dispatch(request: Request, call_next: RequestResponseEndpoint) -> Response:
        # The naive logger people write first: read the request body, let the app run, read the
        # response body (through a pass-through generator, so streams are not held back), and
        # queue a dict of everything.
        started = time.time()
        request_body = await request.body()
        response = await call_next(request)
        original = response.body_iterator  # type: ignore[attr-defined]
        chunks: list[bytes] = []

        async def body_iterator() -> Any:
            async for chunk in original:
                chunks.append(chunk if isinstance(chunk, bytes) else chunk.encode())
                yield chunk
            queue.put_nowait(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "status": response.status_code,
                    "request": request_body.decode("utf-8", "replace"),
                    "response": b"".join(chunks).decode("utf-8", "replace"),
                    "latency_ms": (time.time() - started) * 1000.0,
                }
            )

        response.body_iterator = body_iterator()  # type: ignore[attr-defined]
        return response

    async def flush() -> None:
        while queue.qsize():
            await asyncio.sleep(0)

    gateway.on_startup.append(start)
    gateway.on_shutdown.append(stop)
    gateway.on_flush.append(flush)
    gateway.set_stats(lambda: {"logged": counters["logged"], "queued": queue.qsize()})
    return BaseHTTPMiddleware(gateway, dispatch=dispatch)


def build_app(
    variant: str, *, teams: int = 1, langfuse_host: str | None = None
) -> tuple[ASGIApp, Gateway]:
    """The ASGI app of one variant, and the gateway inside it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    gateway = Gateway()
    if variant == "bare":
        return gateway, gateway
    if variant in TLM_VARIANTS:
        return _tlm_app(gateway, variant, teams, langfuse_host), gateway
    if variant == "otel-asgi":
        return _otel_app(gateway), gateway
    return _basehttp_app(gateway), gateway


def create_app() -> ASGIApp:
    """uvicorn factory: the variant named by ``BENCH_VARIANT`` (see the module docstring)."""
    app, _ = build_app(
        os.environ.get("BENCH_VARIANT", "bare"),
        teams=int(os.environ.get("BENCH_TEAMS", "1")),
        langfuse_host=os.environ.get("BENCH_LANGFUSE_HOST") or None,
    )
    return app
