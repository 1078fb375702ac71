"""Bad traffic on the request path: whatever clients and apps do, the exchange passes through
unchanged and a record still reaches the destinations.

Everything runs through the real runtime (resolver, planner, dispatcher, decoding) into two real
destinations of the team: an in-memory sink (to read the records) and the JSONL sink (a file, to
prove every record serialises). Requests are scripted at the ASGI level — so the tests decide
exactly when the client sends, reads or leaves — and the cases a server shapes itself (large
bodies, HEAD, websockets, an app that raises) also run against a real uvicorn.

Covered: malformed and non-UTF-8 JSON, bodies larger than the capture caps, empty and absent
bodies, binary responses, HEAD, websockets (passed through untouched, nothing logged), a client
leaving mid-stream (``client_disconnected`` with the partial output), an app raising before or
after it started its response (the very same exception object reaches the server), and a
property test over arbitrary request/response bytes, chunking and headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as ws_connect

from team_logging_middleware._types import Caller
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.records import LogRecord
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.sinks import default_registry
from team_logging_middleware.stores.memory import MemorySettingsStore
from team_logging_middleware.testing import MemorySink
from tests.fixtures.fake_langfuse import FakeLangfuse
from tests.fixtures.gcs_server import GcsServer
from tests.fixtures.otlp_receiver import OtlpReceiver
from tests.fixtures.servers import run_uvicorn_async
from tests.helpers import ScriptedPeer, asgi_http_scope

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
REQUEST_CAP = 4096
RESPONSE_CAP = 8192

Message = dict[str, Any]
App = Callable[[Any, Any, Any], Awaitable[None]]


# -- the runtime and the scripted peer ----------------------------------------------------------


async def _resolve(scope: Any) -> Caller | None:
    token = bearer_token(scope)
    return None if token is None else Caller(team_id="bad", key_alias="k")


@dataclass
class Gateway:
    """The middleware around an app, with the team's two destinations."""

    app: TeamLoggingMiddleware
    team_logging: TeamLogging
    memory: MemorySink
    jsonl: Path

    async def records(self, count: int) -> list[LogRecord]:
        report = await self.team_logging.dispatcher.flush(timeout=10)
        assert report.pending == 0 and report.dropped == 0, report
        records = self.memory.records("bad")
        assert len(records) == count, records
        # Every record is one line for any line reader: str.splitlines() (and JavaScript) also
        # break at U+2028, U+2029 and U+0085, which the client controls.
        lines = self.jsonl.read_bytes().decode("utf-8").splitlines()
        assert len(lines) == count
        for line in lines:
            json.loads(line)
        stats = self.team_logging.dispatcher.stats()
        assert stats["decode_errors"] == 0
        return records


@contextlib.asynccontextmanager
async def gateway(inner: App, tmp_path: Path) -> AsyncIterator[Gateway]:
    memory = MemorySink()
    registry = default_registry(jsonl_dir=tmp_path)
    registry.register(memory.sink_type)
    store = MemorySettingsStore()
    callbacks = [
        CallbackSpec(
            callback_name="memory",
            callback_type="success_and_failure",
            callback_vars={"destination": "bad"},
        ),
        CallbackSpec(
            callback_name="jsonl",
            callback_type="success_and_failure",
            callback_vars={"jsonl_path": "bad.jsonl"},
        ),
    ]
    await store.put_team(TeamSettings(team_id="bad", callbacks=callbacks))
    team_logging = TeamLogging(
        _resolve,
        store=store,
        registry=registry,
        dispatcher_options={"flush_interval": 0.01},
    )
    app = TeamLoggingMiddleware(
        inner,
        team_logging=team_logging,
        max_request_bytes=REQUEST_CAP,
        max_response_bytes=RESPONSE_CAP,
    )
    async with app:
        yield Gateway(app, team_logging, memory, tmp_path / "bad.jsonl")


class ClientGone(OSError):
    """What a server's ``send`` raises once the client left (uvicorn: ClientDisconnected)."""


class Peer(ScriptedPeer):
    """A scripted request whose server refuses to send once the client left.

    Once the client left (:meth:`leave`), ``send`` raises :class:`ClientGone`. ``no_body``: the
    server hands out no request message at all.
    """

    def __init__(self, chunks: list[bytes] | None = None, *, no_body: bool = False) -> None:
        super().__init__(chunks or [])
        if no_body:
            self.inbox = []
        self.received_by_app: list[bytes] = []
        self.on_body: Callable[[bytes], None] | None = None

    async def receive(self) -> Message:
        if self.inbox:
            message = self.inbox.pop(0)
            self.received_by_app.append(message["body"])
            return message
        return await super().receive()

    async def send(self, message: Message) -> None:
        if self.gone.is_set():
            raise ClientGone("client disconnected")
        await super().send(message)
        if message["type"] == "http.response.body" and self.on_body is not None:
            self.on_body(message.get("body", b""))


def http_scope(method: str = "POST", path: str = CHAT, **extra: Any) -> dict[str, Any]:
    headers = [
        (b"authorization", b"Bearer key"),
        (b"content-type", b"application/json"),
        *extra.pop("headers", []),
    ]
    return asgi_http_scope(path, headers, method=method, client=("127.0.0.1", 40000), **extra)


def echo_app(content_type: bytes = b"application/json", status: int = 200) -> App:
    """Answers with the request body it read (in the same chunks), as is."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type)],
            }
        )
        for index, chunk in enumerate(chunks):
            await send(
                {"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1}
            )

    return app


async def call(gw: Gateway, peer: Peer, scope: dict[str, Any] | None = None) -> None:
    await asyncio.wait_for(gw.app(scope or http_scope(), peer.receive, peer.send), timeout=10)


# -- bodies the app cannot or need not parse ------------------------------------------------------


async def test_malformed_json_passes_through_and_is_logged_raw(tmp_path: Path) -> None:
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "unterminated'
    async with gateway(echo_app(), tmp_path) as gw:
        peer = Peer([body])
        await call(gw, peer)
        (record,) = await gw.records(1)
    assert peer.body == body and peer.status == 200
    assert record.outcome == "ok" and record.status_code == 200
    assert record.raw_request is not None and "unterminated" in record.raw_request
    assert record.decode_note


async def test_non_utf8_json_passes_through_exactly(tmp_path: Path) -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"caf\xe9 \xff\xfe"}]}'
    async with gateway(echo_app(), tmp_path) as gw:
        peer = Peer([body[:20], body[20:]])
        await call(gw, peer)
        (record,) = await gw.records(1)
    assert b"".join(peer.received_by_app) == body and peer.body == body
    assert record.outcome == "ok"
    text = json.dumps(record.to_dict())
    assert "caf" in text and record.decode_note


async def test_bodies_larger_than_the_caps_reach_app_and_client_whole(tmp_path: Path) -> None:
    chunk = os.urandom(64 * 1024)
    chunks = [chunk] * 48  # 3 MiB each way, far above both capture caps
    async with gateway(echo_app(b"application/octet-stream"), tmp_path) as gw:
        peer = Peer(chunks)
        await call(gw, peer)
        (record,) = await gw.records(1)
        queued = gw.team_logging.dispatcher.stats()["queued_bytes"]
    whole = hashlib.sha256(chunk * 48).hexdigest()
    assert hashlib.sha256(b"".join(peer.received_by_app)).hexdigest() == whole
    assert hashlib.sha256(peer.body).hexdigest() == whole
    assert record.request_truncated and record.response_truncated
    assert len(record.raw_request or "") <= REQUEST_CAP + 64
    assert len(record.raw_response or "") <= RESPONSE_CAP + 64
    assert queued == 0


@pytest.mark.parametrize("no_body", [False, True], ids=["empty-body", "no-body-message"])
async def test_empty_or_absent_request_body(tmp_path: Path, no_body: bool) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if not no_body:
            message = await receive()
            assert message == {"type": "http.request", "body": b"", "more_body": False}
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with gateway(app, tmp_path) as gw:
        peer = Peer(no_body=no_body)
        await call(gw, peer)
        (record,) = await gw.records(1)
    assert peer.status == 400 and peer.body == b""
    assert record.outcome == "http_error" and record.status_code == 400
    assert record.messages is None and record.output is None


async def test_binary_response_passes_through(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4 + b"\xff\xfe\x00"
    chunks = [payload[:7], payload[7:500], payload[500:]]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        for index, part in enumerate(chunks):
            body = bytearray(part)  # a buffer the app reuses after send() returns
            await send({"type": "http.response.body", "body": body, "more_body": index < 2})
            body[:] = b"\x00" * len(body)

    async with gateway(app, tmp_path) as gw:
        peer = Peer([b'{"model":"m"}'])
        await call(gw, peer)
        (record,) = await gw.records(1)
    # The client got the original bytes: the middleware forwarded the app's very buffer
    # before the app reused it, and kept its own copy.
    assert record.outcome == "ok"
    assert record.raw_response is not None
    assert "\x00" * 10 not in record.raw_response[: len(payload) // 2]


async def test_head_request(tmp_path: Path) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["method"] == "HEAD"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"42")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async with gateway(app, tmp_path) as gw:
        peer = Peer(no_body=True)
        await call(gw, peer, http_scope("HEAD"))
        (record,) = await gw.records(1)
    assert peer.status == 200 and peer.body == b""
    assert record.method == "HEAD" and record.outcome == "ok" and record.output is None


# -- websockets ----------------------------------------------------------------------------------


async def test_websockets_on_a_logged_path_pass_through_untouched(tmp_path: Path) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    scope = http_scope(type="websocket", subprotocols=[])
    scope["type"] = "websocket"

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        pass

    async with gateway(app, tmp_path) as gw:
        await gw.app(scope, receive, send)
        assert seen == [(scope, receive, send)]  # the very same objects
        assert "state" not in scope
        await gw.team_logging.dispatcher.flush(timeout=5)
        assert gw.team_logging.dispatcher.stats()["submitted"] == 0


async def test_websocket_echo_through_uvicorn(tmp_path: Path) -> None:
    async def ws_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_text(f"echo:{text}")

    inner = Starlette(routes=[WebSocketRoute(CHAT, ws_echo)])
    async with gateway(inner, tmp_path) as gw, run_uvicorn_async(gw.app) as url:
        uri = url.replace("http://", "ws://") + CHAT
        async with ws_connect(uri, additional_headers={"authorization": "Bearer key"}) as ws:
            for text in ("one", "two", "ünï"):
                await ws.send(text)
                assert await ws.recv() == f"echo:{text}"
        await gw.team_logging.dispatcher.flush(timeout=5)
        assert gw.team_logging.dispatcher.stats()["submitted"] == 0


# -- clients that leave, apps that raise --------------------------------------------------------


def _sse(text: str) -> bytes:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def test_client_leaving_mid_stream_is_recorded_with_the_partial_output(
    tmp_path: Path,
) -> None:
    peer = Peer([b'{"model":"gpt-4o","stream":true,"messages":[]}'])
    produced: list[str] = []

    async def tokens() -> AsyncIterator[bytes]:
        for word in ("Hel", "lo ", "wor", "ld"):
            produced.append(word)
            yield _sse(word)
            if len(produced) == 2:
                peer.leave()  # the client hangs up after two chunks
                await asyncio.Event().wait()  # the model would go on generating

    app = StreamingResponse(tokens(), media_type="text/event-stream")
    async with gateway(app, tmp_path) as gw:
        await call(gw, peer)
        (record,) = await gw.records(1)
    assert produced == ["Hel", "lo "]
    assert record.outcome == "client_disconnected" and not record.success
    assert record.output == "Hello "
    assert record.stream is True and record.status_code == 200


async def test_client_leaving_while_the_app_still_sends(tmp_path: Path) -> None:
    """The server's send raises once the client left; the app sees that very error."""
    peer = Peer([b'{"model":"m","stream":true}'])
    errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": _sse("partial"), "more_body": True})
        peer.leave()
        try:
            await send({"type": "http.response.body", "body": _sse(" more"), "more_body": True})
        except OSError as exc:
            errors.append(exc)
            raise

    async with gateway(app, tmp_path) as gw:
        with pytest.raises(ClientGone) as raised:
            await call(gw, peer)
        (record,) = await gw.records(1)
    assert errors == [raised.value]
    assert record.outcome == "client_disconnected" and record.output == "partial"


class Boom(Exception):
    pass


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "after-start"])
async def test_an_app_exception_reaches_the_server_as_the_same_object(
    tmp_path: Path, started: bool
) -> None:
    boom = Boom("the model backend fell over")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": _sse("half"), "more_body": True})
        raise boom

    async with gateway(app, tmp_path) as gw:
        peer = Peer([b'{"model":"m"}'])
        with pytest.raises(Boom) as raised:
            await call(gw, peer)
        (record,) = await gw.records(1)
    assert raised.value is boom
    assert raised.value.__traceback__ is not None
    assert record.outcome == "exception" and not record.success
    assert record.error == "Boom: the model backend fell over"
    assert record.status_code == (200 if started else None)
    if started:
        assert record.output == "half"


# -- against a real uvicorn -----------------------------------------------------------------------


async def test_odd_traffic_through_uvicorn(tmp_path: Path) -> None:
    async def chat(request: Request) -> Response:
        if request.headers.get("x-raise") == "1":
            raise Boom("raised by the app")
        body = await request.body()
        return Response(body, media_type=request.headers.get("content-type", "text/plain"))

    inner = Starlette(routes=[Route(CHAT, chat, methods=["POST", "GET", "HEAD"])])
    big = os.urandom(2 * 1024 * 1024)
    async with (
        gateway(inner, tmp_path) as gw,
        run_uvicorn_async(gw.app) as url,
        httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client,
    ):
        auth = {"authorization": "Bearer key"}
        large = await client.post(CHAT, content=big, headers=auth)
        assert large.status_code == 200 and large.content == big
        head = await client.head(CHAT, headers=auth)
        assert head.status_code == 200 and head.content == b""
        empty = await client.post(CHAT, content=b"", headers=auth)
        assert empty.status_code == 200 and empty.content == b""
        malformed = await client.post(
            CHAT, content=b"{not json", headers={**auth, "content-type": "application/json"}
        )
        assert malformed.content == b"{not json"
        raised = await client.post(CHAT, content=b"{}", headers={**auth, "x-raise": "1"})
        assert raised.status_code == 500  # the server's own answer to an app exception
        after = await client.post(CHAT, content=b'{"ok":1}', headers=auth)
        assert after.content == b'{"ok":1}'  # and it goes on serving
        records = await gw.records(6)
    by_method = sorted((r.method, r.outcome) for r in records)
    assert by_method == [
        ("HEAD", "ok"),
        ("POST", "exception"),
        ("POST", "ok"),
        ("POST", "ok"),
        ("POST", "ok"),
        ("POST", "ok"),
    ]
    truncated = [r for r in records if r.request_truncated]
    assert len(truncated) == 1 and truncated[0].response_truncated


# -- anything at all ----------------------------------------------------------------------------

chunk_lists = st.lists(st.binary(max_size=3000), min_size=1, max_size=5)
header_values = st.binary(min_size=0, max_size=300).map(
    lambda b: bytes(c for c in b if c not in (0x0A, 0x0D))
)


@given(
    requests=st.lists(
        st.tuples(
            chunk_lists,
            chunk_lists,
            st.sampled_from(
                [b"application/json", b"text/event-stream", b"application/octet-stream", b""]
            ),
            st.integers(min_value=100, max_value=599),
            header_values,
        ),
        min_size=1,
        max_size=6,
    )
)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_pass_through_unchanged_and_are_logged(
    tmp_path_factory: pytest.TempPathFactory,
    requests: list[tuple[list[bytes], list[bytes], bytes, int, bytes]],
) -> None:
    async def scenario() -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            index = int(dict(scope["headers"])[b"x-index"])
            _, response_chunks, content_type, status, _ = requests[index]
            more = True
            while more:
                more = (await receive()).get("more_body", False)
            headers = [(b"content-type", content_type)] if content_type else []
            await send({"type": "http.response.start", "status": status, "headers": headers})
            for i, part in enumerate(response_chunks):
                last = i == len(response_chunks) - 1
                await send({"type": "http.response.body", "body": part, "more_body": not last})

        async with gateway(app, tmp_path_factory.mktemp("any")) as gw:
            for index, (request_chunks, response_chunks, _, status, odd) in enumerate(requests):
                peer = Peer(list(request_chunks))
                headers = [
                    (b"x-index", str(index).encode()),
                    (b"x-request-id", odd),
                    (b"x-odd", odd),
                ]
                await call(gw, peer, http_scope(headers=headers))
                assert b"".join(peer.received_by_app) == b"".join(request_chunks)
                assert peer.body == b"".join(response_chunks) and peer.status == status
            records = await gw.records(len(requests))
        for record, (_, _, _, status, _) in zip(records, requests, strict=True):
            assert record.status_code == status
            assert record.outcome == ("ok" if status < 400 else "http_error")

    asyncio.run(scenario())


# -- text that encoders refuse ------------------------------------------------------------------


async def test_text_no_encoder_accepts_does_not_poison_a_batch(
    tmp_path: Path,
    fake_langfuse: FakeLangfuse,
    otlp_receiver: OtlpReceiver,
    gcs_server: GcsServer,
) -> None:
    """A request whose JSON holds lone surrogates (``"\\ud800"``: valid JSON, not encodable as
    UTF-8) or line-separator characters shares a batch with ordinary requests: every record,
    its own included, still reaches every kind of destination."""
    project = fake_langfuse.add_project()
    bucket = gcs_server.new_bucket()
    destinations = [
        CallbackSpec(callback_name="langfuse", callback_vars=fake_langfuse.callback_vars(project)),
        CallbackSpec(
            callback_name="otel", callback_vars={"otel_endpoint": otlp_receiver.endpoint()}
        ),
        CallbackSpec(callback_name="gcs_bucket", callback_vars={"gcs_bucket_name": bucket}),
        CallbackSpec(callback_name="jsonl", callback_vars={"jsonl_path": "odd.jsonl"}),
    ]
    store = MemorySettingsStore()
    await store.put_team(TeamSettings(team_id="bad", callbacks=destinations))
    team_logging = TeamLogging(
        _resolve,
        store=store,
        registry=default_registry(jsonl_dir=tmp_path),
        # One batch for everything: a record that cannot be encoded would take the others down.
        dispatcher_options={"flush_interval": 30.0, "batch_size": 100},
    )
    odd = [
        '{"model":"m","messages":[{"role":"user","content":"lone \\ud800 high"}]}',
        '{"model":"m","messages":[{"role":"user","content":"lone \\udfff low"}]}',
        '{"model":"m","messages":[{"role":"user","content":"breaks \u2028 \u2029 \u0085 here"}]}',
    ]
    bodies = [
        f'{{"model":"m","messages":[{{"role":"user","content":"plain {i}"}}]}}' for i in range(3)
    ]
    app = TeamLoggingMiddleware(echo_app(), team_logging=team_logging)
    async with app:
        for body in [*bodies[:2], *odd, bodies[2]]:
            peer = Peer([body.encode()])
            await asyncio.wait_for(app(http_scope(), peer.receive, peer.send), timeout=10)
            assert peer.body == body.encode()
        report = await team_logging.dispatcher.flush(timeout=30)
        stats = team_logging.dispatcher.stats()
    assert report.pending == 0
    total = len(bodies) + len(odd)
    for lane in stats["destinations"].values():
        assert (lane["sent"], lane["failed"], lane["dropped"]) == (total, 0, {}), lane
    assert len(fake_langfuse.generations(project.public_key)) == total
    assert len(otlp_receiver.spans()) == total
    (name,) = gcs_server.list_objects(bucket)
    gcs_lines = gcs_server.read_object(bucket, name).decode("utf-8").splitlines()
    jsonl_lines = (tmp_path / "odd.jsonl").read_bytes().decode("utf-8").splitlines()
    for lines in (gcs_lines, jsonl_lines):
        assert len(lines) == total
        texts = [json.dumps(json.loads(line)["messages"]) for line in lines]
        assert sum("plain" in t for t in texts) == 3
