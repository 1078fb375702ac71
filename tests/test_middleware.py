"""TeamLoggingMiddleware at the ASGI level (scripted receive/send) and behind a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from team_logging_middleware._capture import Message
from team_logging_middleware._decode import decode_exchange
from team_logging_middleware._types import NO_LOGGING, Caller, Destination, Plan
from team_logging_middleware.middleware import (
    DEFAULT_ROUTES,
    TeamLoggingMiddleware,
    TeamLoggingRuntime,
)
from team_logging_middleware.records import Exchange
from team_logging_middleware.settings import CallbackSpec
from tests.fixtures.servers import run_uvicorn_async
from tests.helpers import ScriptedPeer, asgi_http_scope

Scope = dict[str, Any]
App = Callable[[Any, Any, Any], Awaitable[None]]

# A hang must fail fast and say where, not wait for the suite-wide timeout.
pytestmark = pytest.mark.timeout(30)

SECRET = "sk-live-0123456789abcdef"
CHAT = "/v1/chat/completions"
KEY_A = "key-a"


def logging_plan(team_id: str, **kwargs: Any) -> Plan:
    spec = CallbackSpec(callback_name="jsonl", callback_vars={"path": f"/logs/{team_id}"})
    destination = Destination(spec=spec, source="team", identity=spec.identity())
    return Plan(team_id=team_id, logging_enabled=True, success=(destination,), **kwargs)


class RecordingRuntime:
    """A small real runtime: bearer token -> caller, team -> plan; keeps submitted exchanges."""

    def __init__(
        self,
        callers: dict[str, Caller] | None = None,
        plans: dict[str | None, Plan] | None = None,
    ) -> None:
        self.callers = callers if callers is not None else {"key-a": Caller(team_id="team-a")}
        self.plans = plans if plans is not None else {"team-a": logging_plan("team-a")}
        self.exchanges: list[Exchange] = []
        self.started = False
        self.start_calls = 0
        self.stop_calls = 0
        self.resolve_calls = 0
        self.resolve_error: Exception | None = None
        self.plan_error: Exception | None = None
        self.submit_error: Exception | None = None
        self.start_error: Exception | None = None
        self.stop_error: Exception | None = None
        self.accept = True

    async def resolve(self, scope: Any) -> Caller | None:
        self.resolve_calls += 1
        if self.resolve_error is not None:
            raise self.resolve_error
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value.startswith(b"Bearer "):
                return self.callers.get(value[7:].decode())
        return None

    async def plan_for(self, caller: Caller | None) -> Plan:
        if self.plan_error is not None:
            raise self.plan_error
        return self.plans.get(caller.team_id if caller else None, NO_LOGGING)

    def submit(self, exchange: Exchange) -> bool:
        if self.submit_error is not None:
            raise self.submit_error
        if not self.accept:
            return False
        self.exchanges.append(exchange)
        return True

    async def start(self) -> None:
        self.start_calls += 1
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    async def stop(self) -> None:
        self.stop_calls += 1
        self.started = False
        if self.stop_error is not None:
            raise self.stop_error

    async def wait_for_exchanges(self, count: int, timeout: float = 5.0) -> list[Exchange]:
        deadline = time.monotonic() + timeout
        while len(self.exchanges) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.exchanges)} of {count} exchanges arrived")
            await asyncio.sleep(0.01)
        return self.exchanges


class Peer(ScriptedPeer):
    """A scripted request built from its body chunks; ``on_send`` runs after each sent message."""

    def __init__(self, *chunks: bytes, on_send: Callable[[Message], None] | None = None) -> None:
        super().__init__(chunks)
        self.on_send = on_send

    async def send(self, message: Message) -> None:
        await super().send(message)
        if self.on_send is not None:
            self.on_send(message)


def http_scope(
    path: str = CHAT,
    *,
    token: str | None = KEY_A,
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    root_path: str = "",
    with_state: bool = True,
) -> Scope:
    raw = [(b"host", b"gateway"), (b"content-type", b"application/json")]
    if token is not None:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    raw.extend(headers or [])
    scope: Scope = asgi_http_scope(path, raw, method=method, root_path=root_path)
    if with_state:
        scope["state"] = {}
    return scope


def json_app(payload: bytes = b'{"id":"chatcmpl-1","choices":[]}', status: int = 200) -> App:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


class SpyApp:
    """Records exactly what the middleware handed to the app, then answers with JSON."""

    def __init__(self, inner: App | None = None) -> None:
        self.inner = inner or json_app()
        self.calls: list[tuple[Any, Any, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        await self.inner(scope, receive, send)


# -- what is and is not wrapped ---------------------------------------------------------------


async def test_unlogged_path_is_not_wrapped_and_not_resolved() -> None:
    runtime = RecordingRuntime()
    spy = SpyApp()
    mw = TeamLoggingMiddleware(spy, team_logging=runtime)
    peer = Peer(b"{}")
    scope = http_scope("/v1/models")
    await mw(scope, peer.receive, peer.send)
    (seen_scope, seen_receive, seen_send) = spy.calls[0]
    assert seen_scope is scope and seen_receive == peer.receive and seen_send == peer.send
    assert "team_logging" not in scope["state"]
    assert runtime.resolve_calls == 0 and runtime.exchanges == []


async def test_inactive_plan_is_not_wrapped_but_the_decision_is_visible() -> None:
    runtime = RecordingRuntime(plans={"team-a": Plan(team_id="team-a", logging_enabled=False)})
    spy = SpyApp()
    mw = TeamLoggingMiddleware(spy, team_logging=runtime)
    peer = Peer(b"{}")
    scope = http_scope()
    await mw(scope, peer.receive, peer.send)
    (_, seen_receive, seen_send) = spy.calls[0]
    assert seen_receive == peer.receive and seen_send == peer.send
    assert scope["state"]["team_logging"] == {
        "team_id": "team-a",
        "logging_enabled": False,
        "cache_enabled": False,
        "message_logging": "full",
        "success_destinations": [],
        "failure_destinations": [],
    }
    assert runtime.resolve_calls == 1 and runtime.exchanges == []


async def test_unknown_caller_without_defaults_is_not_wrapped() -> None:
    runtime = RecordingRuntime()
    spy = SpyApp()
    mw = TeamLoggingMiddleware(spy, team_logging=runtime)
    peer = Peer(b"{}")
    await mw(http_scope(token=None), peer.receive, peer.send)
    assert spy.calls[0][1] == peer.receive
    assert runtime.exchanges == []


async def test_active_plan_is_wrapped_and_the_exchange_submitted() -> None:
    runtime = RecordingRuntime()
    spy = SpyApp()
    mw = TeamLoggingMiddleware(spy, team_logging=runtime)
    peer = Peer(b'{"model":"gpt-4o"}')
    scope = http_scope()
    await mw(scope, peer.receive, peer.send)
    assert spy.calls[0][1] != peer.receive and spy.calls[0][2] != peer.send
    assert peer.status == 200 and peer.body == b'{"id":"chatcmpl-1","choices":[]}'
    (exchange,) = runtime.exchanges
    assert exchange.method == "POST" and exchange.path == CHAT
    assert exchange.request_body == b'{"model":"gpt-4o"}'
    assert exchange.request_content_type == "application/json"
    assert exchange.caller == Caller(team_id="team-a")
    assert exchange.plan is runtime.plans["team-a"]
    assert exchange.outcome == "ok" and exchange.status == 200
    assert exchange.start_time == pytest.approx(time.time(), abs=5)
    assert exchange.end_perf is not None and exchange.end_perf >= exchange.start_perf
    assert scope["state"]["team_logging"]["success_destinations"] == ["jsonl"]


async def test_websocket_and_unknown_scopes_pass_through_untouched() -> None:
    runtime = RecordingRuntime()
    spy = SpyApp(inner=lambda scope, receive, send: asyncio.sleep(0))
    mw = TeamLoggingMiddleware(spy, team_logging=runtime)
    peer = Peer()
    for kind in ("websocket", "webtransport"):
        scope: Scope = {"type": kind, "path": CHAT, "headers": []}
        await mw(scope, peer.receive, peer.send)
        seen_scope, seen_receive, seen_send = spy.calls[-1]
        assert seen_scope is scope and seen_receive == peer.receive and seen_send == peer.send
        assert "state" not in scope
    assert runtime.resolve_calls == 0


@pytest.mark.parametrize(
    ("path", "root_path", "logged"),
    [
        (CHAT, "", True),
        (CHAT + "/", "", True),
        (CHAT + "//", "", False),
        (CHAT + "/x", "", False),
        ("/v1/chat/completion", "", False),
        ("/api" + CHAT, "/api", True),
        ("/api" + CHAT + "/", "/api", True),
        ("/api" + CHAT, "", False),
        ("/apiv1/chat/completions", "/api", False),
        # servers that keep root_path out of path
        (CHAT, "/api", True),
        ("/embeddings", "", True),
        ("/v1/responses", "", True),
        ("/completions", "", True),
    ],
)
async def test_route_matching(path: str, root_path: str, logged: bool) -> None:
    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime)
    peer = Peer(b"{}")
    await mw(http_scope(path, root_path=root_path), peer.receive, peer.send)
    assert len(runtime.exchanges) == (1 if logged else 0)


async def test_custom_routes_and_predicate() -> None:
    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime, routes=["/llm/chat/"])
    for path in ("/llm/chat", "/llm/chat/", CHAT):
        peer = Peer(b"{}")
        await mw(http_scope(path), peer.receive, peer.send)
    assert [e.path for e in runtime.exchanges] == ["/llm/chat", "/llm/chat/"]

    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(
        json_app(), team_logging=runtime, routes=lambda path: path.startswith("/openai/")
    )
    for path in ("/openai/deployments/gpt/chat/completions", CHAT):
        peer = Peer(b"{}")
        await mw(http_scope(path), peer.receive, peer.send)
    assert [e.path for e in runtime.exchanges] == ["/openai/deployments/gpt/chat/completions"]


def test_default_routes() -> None:
    assert set(DEFAULT_ROUTES) == {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/v1/embeddings",
        "/embeddings",
        "/v1/responses",
        "/responses",
    }


def test_constructor_rejects_ambiguous_arguments() -> None:
    runtime = RecordingRuntime()
    assert isinstance(runtime, TeamLoggingRuntime)
    with pytest.raises(TypeError):
        TeamLoggingMiddleware(json_app(), team_logging=runtime, resolver=runtime.resolve)
    with pytest.raises(TypeError):
        TeamLoggingMiddleware(json_app(), team_logging=runtime, routes=CHAT)
    with pytest.raises(ValueError):
        TeamLoggingMiddleware(json_app(), team_logging=runtime, max_request_bytes=-1)
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime)
    assert mw.team_logging is runtime


# -- the request body, the response, streaming ------------------------------------------------


async def test_multi_chunk_request_body_reaches_the_app_exactly() -> None:
    runtime = RecordingRuntime()
    parts = [b'{"model":', b"", b'"gpt-4o","messages":', b'[{"role":"user","content":"hi"}]}']
    seen: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    peer = Peer(*parts)
    expected = list(peer.inbox)
    await TeamLoggingMiddleware(app, team_logging=runtime)(http_scope(), peer.receive, peer.send)
    assert len(seen) == len(expected) and all(a is b for a, b in zip(seen, expected, strict=True))
    assert runtime.exchanges[0].request_body == b"".join(parts)


async def test_each_stream_chunk_reaches_the_client_before_the_next_is_produced() -> None:
    runtime = RecordingRuntime()
    delivered = [asyncio.Event() for _ in range(4)]
    chunks = [f'data: {{"n": {i}}}\n\n'.encode() for i in range(4)]

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            delivered[chunks.index(message["body"])].set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            # Produce chunk i+1 only once the server has chunk i: a middleware that held
            # chunks back would time out here.
            await asyncio.wait_for(delivered[i].wait(), timeout=2)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    peer = Peer(b'{"stream":true}', on_send=on_send)
    await TeamLoggingMiddleware(app, team_logging=runtime)(http_scope(), peer.receive, peer.send)
    (exchange,) = runtime.exchanges
    assert exchange.response_chunks == chunks
    assert exchange.first_byte_perf is not None
    assert exchange.outcome == "ok"


async def test_disconnect_mid_stream_is_recorded_with_the_partial_output() -> None:
    runtime = RecordingRuntime()
    peer = Peer(b'{"model":"gpt-4o","stream":true}')
    produced = 0

    async def tokens() -> AsyncIterator[bytes]:
        nonlocal produced
        for word in ("Hello", " there", " friend"):
            produced += 1
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if produced == 2:
                peer.leave()  # the client goes away after the second chunk
                await asyncio.Event().wait()  # the model would keep generating

    # Starlette's StreamingResponse watches receive() for http.disconnect (ASGI spec 2.3).
    app = StreamingResponse(tokens(), media_type="text/event-stream")
    mw = TeamLoggingMiddleware(app, team_logging=runtime)
    await asyncio.wait_for(mw(http_scope(), peer.receive, peer.send), timeout=5)
    (exchange,) = runtime.exchanges
    assert exchange.outcome == "client_disconnected"
    assert len(exchange.response_chunks) == 2
    record = decode_exchange(exchange)
    assert record.output == "Hello there"
    assert record.outcome == "client_disconnected" and not record.success


async def test_caps_set_the_truncated_flags() -> None:
    runtime = RecordingRuntime()
    payload = b"x" * 100
    mw = TeamLoggingMiddleware(
        json_app(payload), team_logging=runtime, max_request_bytes=10, max_response_bytes=30
    )
    peer = Peer(b"a" * 8, b"b" * 8)
    await mw(http_scope(), peer.receive, peer.send)
    assert peer.body == payload  # the client got everything
    (exchange,) = runtime.exchanges
    assert exchange.request_body == b"a" * 8 + b"b" * 2 and exchange.request_truncated
    assert b"".join(exchange.response_chunks) == b"x" * 30 and exchange.response_truncated


async def test_head_empty_body_and_binary_response() -> None:
    runtime = RecordingRuntime()
    binary = bytes(range(256)) * 4

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"application/octet-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else binary}
        )

    mw = TeamLoggingMiddleware(app, team_logging=runtime)
    head, post = Peer(), Peer()
    await mw(http_scope(method="HEAD"), head.receive, head.send)
    await mw(http_scope(), post.receive, post.send)
    assert head.body == b"" and post.body == binary
    head_ex, post_ex = runtime.exchanges
    assert (
        head_ex.method == "HEAD" and head_ex.request_body == b"" and head_ex.response_chunks == []
    )
    assert head_ex.first_byte_perf is None and head_ex.outcome == "ok"
    assert b"".join(post_ex.response_chunks) == binary
    for exchange in runtime.exchanges:
        record = decode_exchange(exchange)
        assert record.status_code == 200
    post_record = decode_exchange(post_ex)
    assert post_record.decode_note == "response body is not JSON"
    assert post_record.raw_response is not None


async def test_non_utf8_json_request_is_forwarded_exactly_and_decoded() -> None:
    runtime = RecordingRuntime()
    raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"caf\xe9"}]}'
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    peer = Peer(raw)
    await TeamLoggingMiddleware(app, team_logging=runtime)(http_scope(), peer.receive, peer.send)
    assert seen == [raw]
    record = decode_exchange(runtime.exchanges[0])
    assert record.model == "gpt-4o"
    assert record.decode_note is not None and "UTF-8" in record.decode_note


async def test_http_error_status_is_recorded() -> None:
    runtime = RecordingRuntime()
    error = b'{"error":{"message":"Rate limit reached","type":"rate_limit_error"}}'
    mw = TeamLoggingMiddleware(json_app(error, status=429), team_logging=runtime)
    peer = Peer(b"{}")
    await mw(http_scope(), peer.receive, peer.send)
    assert peer.status == 429
    assert runtime.exchanges[0].outcome == "http_error"
    assert decode_exchange(runtime.exchanges[0]).error == "rate_limit_error: Rate limit reached"


# -- request ids and scope state --------------------------------------------------------------


async def test_request_id_from_header_or_generated_unique() -> None:
    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime)
    peer = Peer(b"{}")
    await mw(http_scope(headers=[(b"x-request-id", b"abc-123")]), peer.receive, peer.send)
    peer = Peer(b"{}")
    await mw(http_scope(headers=[(b"x-request-id", b"z" * 500)]), peer.receive, peer.send)
    for _ in range(50):
        peer = Peer(b"{}")
        await mw(http_scope(), peer.receive, peer.send)
    ids = [e.request_id for e in runtime.exchanges]
    assert ids[0] == "abc-123"
    assert "z" * 500 not in ids  # an absurdly long client id is replaced, not stored
    assert len(set(ids)) == len(ids)


async def test_scope_state_is_created_or_extended() -> None:
    runtime = RecordingRuntime()
    seen: list[dict[str, Any]] = []

    async def endpoint(request: Request) -> Response:
        seen.append(dict(request.state.team_logging))
        seen.append({"other": getattr(request.state, "other", None)})
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(CHAT, endpoint, methods=["POST"])])
    mw = TeamLoggingMiddleware(app, team_logging=runtime)
    peer = Peer(b"{}")
    await mw(http_scope(with_state=False), peer.receive, peer.send)
    scope = http_scope()
    scope["state"]["other"] = "kept"
    peer = Peer(b"{}")
    await mw(scope, peer.receive, peer.send)
    assert seen[0]["team_id"] == "team-a" and seen[0]["logging_enabled"] is True
    assert seen[1] == {"other": None}
    assert seen[3] == {"other": "kept"}
    assert SECRET not in json.dumps(seen)
    assert "/logs/team-a" not in json.dumps(seen)  # destination vars never reach the app


# -- failures of the resolver, the planner and submit -----------------------------------------


async def test_resolver_error_proceeds_unlogged_counts_and_hides_the_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = RecordingRuntime()
    runtime.resolve_error = ValueError(f"lookup failed for {SECRET}")
    spy = SpyApp()
    mw = TeamLoggingMiddleware(spy, team_logging=runtime)
    scope = http_scope(token=SECRET)
    with caplog.at_level(logging.WARNING, logger="team_logging_middleware"):
        for _ in range(3):
            peer = Peer(b"{}")
            await mw(scope, peer.receive, peer.send)
            assert peer.status == 200 and peer.body == b'{"id":"chatcmpl-1","choices":[]}'
    assert spy.calls[0][1] == peer.receive or spy.calls[-1][1] == peer.receive
    assert runtime.exchanges == []
    assert scope["state"]["team_logging"] == NO_LOGGING.public()
    assert mw.stats.as_dict()["resolver_errors"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1  # throttled: one line per interval, not one per request
    assert "ValueError" in messages[0] and SECRET not in caplog.text


async def test_planner_error_proceeds_unlogged() -> None:
    runtime = RecordingRuntime()
    runtime.plan_error = ConnectionError("store down")
    peer = Peer(b"{}")
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime)
    await mw(http_scope(), peer.receive, peer.send)
    assert peer.status == 200
    assert mw.stats.plan_errors == 1 and runtime.exchanges == []


@pytest.mark.parametrize("failing", ["resolve", "plan"])
async def test_fail_closed_answers_503_without_calling_the_app(failing: str) -> None:
    runtime = RecordingRuntime()
    if failing == "resolve":
        runtime.resolve_error = RuntimeError(SECRET)
    else:
        runtime.plan_error = RuntimeError(SECRET)
    spy = SpyApp()
    mw = TeamLoggingMiddleware(spy, team_logging=runtime, fail_closed=True)
    peer = Peer(b"{}")
    await mw(http_scope(), peer.receive, peer.send)
    assert spy.calls == []
    assert peer.status == 503
    headers = dict(peer.sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(peer.body)
    error = json.loads(peer.body)["error"]
    assert set(error) == {"message", "type", "param"}
    assert error["type"] == "team_logging_unavailable" and error["param"] is None
    assert SECRET not in peer.body.decode()
    assert mw.stats.fail_closed_rejections == 1


async def test_fail_closed_still_serves_when_resolution_works() -> None:
    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime, fail_closed=True)
    peer = Peer(b"{}")
    await mw(http_scope(token="unknown-key"), peer.receive, peer.send)
    assert peer.status == 200


async def test_submit_error_or_rejection_never_changes_the_response() -> None:
    runtime = RecordingRuntime()
    runtime.submit_error = RuntimeError(f"queue exploded {SECRET}")
    mw = TeamLoggingMiddleware(json_app(b'{"fine":true}'), team_logging=runtime)
    peer = Peer(b"{}")
    await mw(http_scope(), peer.receive, peer.send)
    assert peer.status == 200 and peer.body == b'{"fine":true}'
    runtime.submit_error = None
    runtime.accept = False
    peer = Peer(b"{}")
    await mw(http_scope(), peer.receive, peer.send)
    assert peer.status == 200
    assert mw.stats.submit_errors == 1 and mw.stats.submit_rejected == 1


# -- app exceptions ---------------------------------------------------------------------------


class AppBoom(Exception):
    pass


@pytest.mark.parametrize("after_start", [False, True])
async def test_app_exception_reaches_the_caller_unchanged(after_start: bool) -> None:
    runtime = RecordingRuntime()
    runtime.submit_error = RuntimeError("and the logging layer fails too")
    error = AppBoom("model backend exploded")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise error

    mw = TeamLoggingMiddleware(app, team_logging=runtime)
    peer = Peer(b"{}")
    with pytest.raises(AppBoom) as caught:
        await mw(http_scope(), peer.receive, peer.send)
    assert caught.value is error
    assert mw.stats.submit_errors == 1

    runtime.submit_error = None
    peer = Peer(b"{}")
    with pytest.raises(AppBoom):
        await mw(http_scope(), peer.receive, peer.send)
    (exchange,) = runtime.exchanges
    assert exchange.outcome == "exception"
    assert exchange.error == "AppBoom: model backend exploded"
    assert exchange.status == (200 if after_start else None)
    assert exchange.response_chunks == ([b"partial"] if after_start else [])


async def test_cancelled_request_is_recorded_and_cancellation_propagates() -> None:
    runtime = RecordingRuntime()
    entered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        entered.set()
        await asyncio.Event().wait()

    peer = Peer(b"{}")
    task = asyncio.ensure_future(
        TeamLoggingMiddleware(app, team_logging=runtime)(http_scope(), peer.receive, peer.send)
    )
    await asyncio.wait_for(entered.wait(), timeout=2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (exchange,) = runtime.exchanges
    assert exchange.outcome == "exception" and exchange.error == "CancelledError"


# -- lifespan and lifecycle -------------------------------------------------------------------


class LifespanServer:
    """The server side of the lifespan protocol; notes the runtime's state at each message."""

    def __init__(self, runtime: RecordingRuntime) -> None:
        self.runtime = runtime
        self.inbox: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        self.handed_out: list[Message] = []
        self.sent: list[tuple[Message, bool]] = []

    async def receive(self) -> Message:
        message = self.inbox.pop(0)
        self.handed_out.append(message)
        return message

    async def send(self, message: Message) -> None:
        self.sent.append((message, self.runtime.started))


async def test_lifespan_starts_before_the_app_and_stops_after_it() -> None:
    runtime = RecordingRuntime()
    app_saw: list[tuple[Message, bool]] = []
    app_sent: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            app_saw.append((message, runtime.started))
            if message["type"] == "lifespan.startup":
                reply: Message = {"type": "lifespan.startup.complete"}
            else:
                reply = {"type": "lifespan.shutdown.complete"}
            app_sent.append(reply)
            await send(reply)
            if message["type"] == "lifespan.shutdown":
                return

    server = LifespanServer(runtime)
    mw = TeamLoggingMiddleware(app, team_logging=runtime)
    await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, server.receive, server.send)
    # the app got the server's very messages, with the runtime already running at startup
    assert [m for m, _ in app_saw] == server.handed_out
    assert all(a is b for (a, _), b in zip(app_saw, server.handed_out, strict=True))
    assert [started for _, started in app_saw] == [True, True]
    # the server got the app's very messages; shutdown.complete only after the runtime stopped
    assert [m for m, _ in server.sent] == app_sent
    assert all(a is b for (a, _), b in zip(server.sent, app_sent, strict=True))
    assert [started for _, started in server.sent] == [True, False]
    assert runtime.start_calls == 1 and runtime.stop_calls == 1


async def test_app_without_lifespan_support_raises_as_before() -> None:
    runtime = RecordingRuntime()
    error = RuntimeError("lifespan not supported")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise error

    server = LifespanServer(runtime)
    with pytest.raises(RuntimeError) as caught:
        await TeamLoggingMiddleware(app, team_logging=runtime)(
            {"type": "lifespan"}, server.receive, server.send
        )
    assert caught.value is error
    assert server.sent == []
    # the runtime still runs: a server in lifespan "auto" mode goes on serving without lifespan
    assert runtime.started


async def test_runtime_start_failure_fails_the_startup_before_the_app_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = RecordingRuntime()
    runtime.start_error = ConnectionError(f"store unreachable at redis://:{SECRET}@db")
    app_started: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app_started.append(True)
        yield

    server = LifespanServer(runtime)
    with caplog.at_level(logging.ERROR, logger="team_logging_middleware"):
        await TeamLoggingMiddleware(Starlette(lifespan=lifespan), team_logging=runtime)(
            {"type": "lifespan"}, server.receive, server.send
        )
    ((failed, _),) = server.sent
    assert failed == {
        "type": "lifespan.startup.failed",
        "message": "team logging failed to start: ConnectionError",
    }
    assert app_started == []
    assert "ConnectionError" in caplog.text and SECRET not in caplog.text


async def test_app_startup_failure_stops_the_runtime() -> None:
    runtime = RecordingRuntime()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("database missing")
        yield

    server = LifespanServer(runtime)
    with pytest.raises(RuntimeError):
        await TeamLoggingMiddleware(Starlette(lifespan=lifespan), team_logging=runtime)(
            {"type": "lifespan"}, server.receive, server.send
        )
    ((failed, started_when_forwarded),) = server.sent
    assert failed["type"] == "lifespan.startup.failed"
    assert not started_when_forwarded and runtime.stop_calls == 1


async def test_runtime_stop_failure_still_completes_the_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = RecordingRuntime()
    runtime.stop_error = RuntimeError(f"flush failed {SECRET}")
    server = LifespanServer(runtime)
    with caplog.at_level(logging.WARNING, logger="team_logging_middleware"):
        await TeamLoggingMiddleware(Starlette(), team_logging=runtime)(
            {"type": "lifespan"}, server.receive, server.send
        )
    assert [m["type"] for m, _ in server.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert "RuntimeError" in caplog.text and SECRET not in caplog.text


async def test_async_context_manager_and_idempotent_start_stop() -> None:
    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime)
    async with mw as entered:
        assert entered is mw and runtime.started
        await mw.start()
    assert not runtime.started
    await mw.stop()
    assert runtime.start_calls == 1 and runtime.stop_calls == 1
    # a second server run of the same app object starts it again
    async with mw:
        assert runtime.started
    assert runtime.start_calls == 2 and runtime.stop_calls == 2


async def test_warns_once_when_capturing_with_a_runtime_never_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = RecordingRuntime()
    mw = TeamLoggingMiddleware(json_app(), team_logging=runtime)
    with caplog.at_level(logging.WARNING, logger="team_logging_middleware"):
        for _ in range(3):
            peer = Peer(b"{}")
            await mw(http_scope(), peer.receive, peer.send)
    assert [r.getMessage() for r in caplog.records if "never started" in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert len(runtime.exchanges) == 3


# -- behind a real uvicorn --------------------------------------------------------------------


def streaming_gateway(
    runtime: RecordingRuntime, client_saw: list[asyncio.Event]
) -> TeamLoggingMiddleware:
    """A Starlette gateway whose stream produces chunk i+1 only after the client read chunk i."""

    async def chat(request: Request) -> Response:
        body = await request.json()

        async def events() -> AsyncIterator[bytes]:
            for i, event in enumerate(client_saw):
                chunk = {
                    "id": "chatcmpl-9",
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.wait_for(event.wait(), timeout=5)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert runtime.started  # the runtime is up before the app's own startup runs
        yield

    app = Starlette(routes=[Route(CHAT, chat, methods=["POST"])], lifespan=lifespan)
    return TeamLoggingMiddleware(app, team_logging=runtime)


async def test_real_uvicorn_streams_each_chunk_before_the_next_is_produced() -> None:
    runtime = RecordingRuntime()
    client_saw = [asyncio.Event() for _ in range(3)]
    gateway = streaming_gateway(runtime, client_saw)
    async with run_uvicorn_async(gateway) as base_url:
        assert runtime.started and runtime.start_calls == 1
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            request = client.build_request(
                "POST",
                CHAT,
                json={"model": "gpt-4o", "stream": True},
                headers={"authorization": "Bearer key-a", "x-request-id": "real-1"},
            )
            response = await client.send(request, stream=True)
            received = b""
            seen = 0
            async for data in response.aiter_raw():
                received += data
                while seen < len(client_saw) and f"tok{seen} ".encode() in received:
                    client_saw[seen].set()  # only now may the app produce the next chunk
                    seen += 1
            await response.aclose()
        assert seen == 3 and received.endswith(b"data: [DONE]\n\n")
        (exchange,) = await runtime.wait_for_exchanges(1)
    assert not runtime.started and runtime.stop_calls == 1  # stopped by the lifespan
    assert exchange.request_id == "real-1" and exchange.outcome == "ok"
    record = decode_exchange(exchange)
    assert record.output == "tok0 tok1 tok2 "
    assert record.stream and record.model == "gpt-4o" and record.response_id == "chatcmpl-9"
    assert record.completion_start_time is not None
    assert record.start_time <= record.completion_start_time <= record.end_time


async def test_real_uvicorn_client_disconnect_mid_stream() -> None:
    runtime = RecordingRuntime()
    client_saw = [asyncio.Event() for _ in range(3)]
    gateway = streaming_gateway(runtime, client_saw)
    async with run_uvicorn_async(gateway) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            request = client.build_request(
                "POST",
                CHAT,
                json={"model": "gpt-4o", "stream": True},
                headers={"authorization": "Bearer key-a"},
            )
            response = await client.send(request, stream=True)
            received = b""
            async for data in response.aiter_raw():
                received += data
                if b"tok0 " in received:
                    client_saw[0].set()
                if b"tok1 " in received:
                    break  # leave while the app waits to produce chunk 2
            await response.aclose()  # closes the connection mid-stream
        (exchange,) = await runtime.wait_for_exchanges(1)
    assert exchange.outcome == "client_disconnected"
    record = decode_exchange(exchange)
    assert record.output == "tok0 tok1 "
    assert record.outcome == "client_disconnected"


async def test_real_uvicorn_head_binary_and_unlogged_routes() -> None:
    runtime = RecordingRuntime()

    async def chat(request: Request) -> Response:
        await request.body()
        return Response(bytes(range(256)), media_type="application/octet-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"data": []})

    app = Starlette(
        routes=[
            Route(CHAT, chat, methods=["POST", "HEAD", "GET"]),
            Route("/v1/models", models),
        ]
    )
    gateway = TeamLoggingMiddleware(app, team_logging=runtime)
    async with run_uvicorn_async(gateway) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            auth = {"authorization": "Bearer key-a"}
            binary = await client.post(CHAT, content=b"\xff\xfe\x00", headers=auth)
            head = await client.head(CHAT, headers=auth)
            models_response = await client.get("/v1/models", headers=auth)
        assert binary.content == bytes(range(256))
        assert head.status_code == 200 and head.content == b""
        assert models_response.json() == {"data": []}
        exchanges = await runtime.wait_for_exchanges(2)
    assert sorted(e.method for e in exchanges) == ["HEAD", "POST"]
    post = next(e for e in exchanges if e.method == "POST")
    assert post.request_body == b"\xff\xfe\x00"
    assert b"".join(post.response_chunks) == bytes(range(256))
    for exchange in exchanges:
        assert decode_exchange(exchange).status_code == 200


async def test_default_runtime_end_to_end_through_uvicorn(tmp_path: Any) -> None:
    """No runtime passed: the middleware builds TeamLogging (planner, dispatcher, sinks)."""
    from team_logging_middleware.resolver import bearer_token
    from team_logging_middleware.runtime import TeamLogging
    from team_logging_middleware.settings import TeamSettings
    from team_logging_middleware.stores.memory import MemorySettingsStore

    keys = {"key-a": Caller(team_id="team-a", key_alias="a"), "key-b": Caller(team_id="team-b")}

    async def resolve(scope: Any) -> Caller | None:
        return keys.get(bearer_token(scope) or "")

    store = MemorySettingsStore()
    for team, mode in (("team-a", "full"), ("team-b", "metadata_only")):
        spec = CallbackSpec(callback_name="jsonl", callback_vars={"jsonl_path": f"{team}.jsonl"})
        await store.put_team(TeamSettings(team_id=team, callbacks=[spec], message_logging=mode))
    await store.put_team(TeamSettings(team_id="team-c", logging_enabled=False))

    async def chat(request: Request) -> Response:
        body = await request.json()
        answer = "echo:" + body["messages"][-1]["content"]
        return JSONResponse(
            {
                "id": "chatcmpl-e2e",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    gateway = TeamLoggingMiddleware(
        Starlette(routes=[Route(CHAT, chat, methods=["POST"])]),
        resolver=resolve,
        store=store,
        jsonl_dir=tmp_path,
        dispatcher_options={"flush_interval": 0.01},
    )
    assert isinstance(gateway.team_logging, TeamLogging)
    async with run_uvicorn_async(gateway) as base_url:
        client = httpx.AsyncClient(base_url=base_url, timeout=10)
        async with client:
            for token in ("key-a", "key-b", "key-c", "unknown"):
                response = await client.post(
                    CHAT,
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": token}]},
                    headers={"authorization": f"Bearer {token}", "x-request-id": f"id-{token}"},
                )
                assert response.json()["choices"][0]["message"]["content"] == f"echo:{token}"
    # the lifespan shutdown flushed delivery before uvicorn exited
    files = sorted(p.name for p in tmp_path.rglob("*.jsonl"))
    assert files == ["team-a.jsonl", "team-b.jsonl"]
    (record_a,) = [
        json.loads(line) for line in (tmp_path / "team-a.jsonl").read_text().splitlines()
    ]
    (record_b,) = [
        json.loads(line) for line in (tmp_path / "team-b.jsonl").read_text().splitlines()
    ]
    assert record_a["request_id"] == "id-key-a" and record_a["team_id"] == "team-a"
    assert record_a["output"] == "echo:key-a" and record_a["key_alias"] == "a"
    assert record_a["usage"]["total_tokens"] == 5
    assert record_b["request_id"] == "id-key-b" and record_b["redacted"] is True
    assert "key-b" not in json.dumps([record_b["messages"], record_b["output"]])
