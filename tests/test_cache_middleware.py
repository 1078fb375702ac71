"""Response caching through TeamLoggingMiddleware, at the ASGI level (scripted receive/send) with
the real runtime (planner, dispatcher, memory sink) over the memory and Redis caches, and once
through a real uvicorn."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from team_logging_middleware._capture import Message
from team_logging_middleware._types import Caller
from team_logging_middleware.cache import (
    CACHE_HEADER,
    CachedResponse,
    MemoryResponseCache,
    RedisResponseCache,
    ResponseCache,
)
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.sinks.base import SinkRegistry
from team_logging_middleware.stores.memory import MemorySettingsStore
from team_logging_middleware.testing import MemorySink, wait_for
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.servers import run_uvicorn_async
from tests.helpers import asgi_http_scope

pytestmark = pytest.mark.timeout(30)

CHAT = "/v1/chat/completions"
REQUEST = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is 2+2?"}]}
STREAM_REQUEST = {**REQUEST, "stream": True}
KEYS = {
    "key-a": Caller(team_id="team-a", key_alias="alice"),
    "key-b": Caller(team_id="team-b"),
    "key-off": Caller(team_id="team-off"),
    "key-plain": Caller(team_id="team-plain"),
}


def memory_spec(destination: str) -> CallbackSpec:
    return CallbackSpec(
        callback_name="memory",
        callback_type="success_and_failure",
        callback_vars={"destination": destination},
    )


def default_teams(ttl: int | None = None) -> list[TeamSettings]:
    return [
        TeamSettings(
            team_id="team-a",
            callbacks=[memory_spec("team-a")],
            cache_enabled=True,
            cache_ttl_seconds=ttl,
        ),
        TeamSettings(team_id="team-b", callbacks=[memory_spec("team-b")], cache_enabled=True),
        TeamSettings(
            team_id="team-off",
            callbacks=[memory_spec("team-off")],
            cache_enabled=True,
            logging_enabled=False,
        ),
        TeamSettings(team_id="team-plain", callbacks=[memory_spec("team-plain")]),
    ]


class ModelApp:
    """A pure-ASGI model: each call answers ``answer #<n>`` (JSON, or SSE in several chunks).

    It records every message ``receive`` gave it; ``model: "fail"`` answers 500; ``crash``
    raises after the first stream chunk; ``swallow_send_errors`` returns quietly when the
    client is gone (as a framework does).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.received: list[list[Message]] = []
        self.swallow_send_errors = False
        self.read_after_response = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
                await send({"type": f"{message['type']}.complete"})
                if kind == "shutdown":
                    return
        self.calls += 1
        number = self.calls
        messages: list[Message] = []
        parts: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.received.append(messages)
        if scope["method"] != "POST":
            await self._json(send, 200, {"object": "list", "data": []}, number)
            return
        try:
            data = json.loads(b"".join(parts))
        except ValueError:
            await self._json(send, 400, {"error": {"message": "not JSON"}}, number)
            return
        try:
            if data.get("model") == "fail":
                await self._json(send, 500, {"error": {"message": "upstream failed"}}, number)
            elif data.get("stream"):
                await self._stream(send, data, number)
            else:
                answer = {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion",
                    "model": data["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"answer #{number}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
                }
                await self._json(send, 200, answer, number)
        except OSError:
            if not self.swallow_send_errors:
                raise
        if self.read_after_response:
            messages.append(await receive())

    async def _json(self, send: Any, status: int, payload: Any, number: int) -> None:
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", f"req-{number}".encode()),
                    (b"x-ratelimit-remaining-requests", b"99"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, send: Any, data: dict[str, Any], number: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", f"req-{number}".encode()),
                ],
            }
        )
        base = {"id": f"chatcmpl-{number}", "object": "chat.completion.chunk", "model": "gpt-4o"}
        pieces = ["The answer", " is ", f"#{number}"]
        for index, piece in enumerate(pieces):
            event = {**base, "choices": [{"index": 0, "delta": {"content": piece}}]}
            chunk = b"data: " + json.dumps(event).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if index == 0 and data.get("crash"):
                raise RuntimeError("the model crashed mid-stream")
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + json.dumps(done).encode() + b"\n\n",
                "more_body": True,
            }
        )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


class Peer:
    """The server side of one scripted request: body chunks, then (when told) a disconnect."""

    def __init__(self, chunks: list[bytes], *, fail_send_at: int | None = None) -> None:
        self.inbox: list[Message] = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ]
        self.sent: list[Message] = []
        self.fail_send_at = fail_send_at
        self.gone = False

    async def receive(self) -> Message:
        if self.inbox:
            return self.inbox.pop(0)
        assert self.gone, "the app waited for a message the client never sends"
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.fail_send_at is not None and len(self.sent) >= self.fail_send_at:
            self.gone = True
            raise OSError("client disconnected")
        self.sent.append(message)


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    bodies: list[bytes]
    peer: Peer

    @property
    def body(self) -> bytes:
        return b"".join(self.bodies)

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name]
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None

    @property
    def cache(self) -> bytes | None:
        return self.header(CACHE_HEADER)


@dataclass
class Gateway:
    mw: TeamLoggingMiddleware
    tl: TeamLogging
    memory: MemorySink
    model: ModelApp
    store: MemorySettingsStore

    async def call(
        self,
        body: dict[str, Any] | bytes = REQUEST,
        *,
        key: str = "key-a",
        headers: list[tuple[bytes, bytes]] | None = None,
        chunks: list[bytes] | None = None,
        method: str = "POST",
        fail_send_at: int | None = None,
        disconnect_after_body: bool = False,
    ) -> Answer:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        peer = Peer(chunks if chunks is not None else [raw], fail_send_at=fail_send_at)
        peer.gone = disconnect_after_body
        scope = asgi_http_scope(
            CHAT,
            [
                (b"host", b"gateway"),
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {key}".encode()),
                *(headers or []),
            ],
            method=method,
            asgi={"version": "3.0", "spec_version": "2.4"},
            server=("127.0.0.1", 4000),
        )
        await self.mw(scope, peer.receive, peer.send)
        start = next(m for m in peer.sent if m["type"] == "http.response.start")
        bodies = [m.get("body", b"") for m in peer.sent if m["type"] == "http.response.body"]
        return Answer(start["status"], list(start["headers"]), bodies, peer)

    async def records(self, destination: str) -> list[Any]:
        await self.tl.dispatcher.flush(5.0)
        return self.memory.records(destination)


@asynccontextmanager
async def gateway(
    cache: ResponseCache | None = None,
    *,
    teams: list[TeamSettings] | None = None,
    model: ModelApp | None = None,
    **options: Any,
) -> AsyncIterator[Gateway]:
    memory = MemorySink()
    store = MemorySettingsStore()
    for team in teams if teams is not None else default_teams():
        await store.put_team(team)

    async def resolve(scope: Any) -> Caller | None:
        return KEYS.get(bearer_token(scope) or "")

    tl = TeamLogging(
        resolve,
        store=store,
        registry=SinkRegistry([memory.sink_type]),
        cache=cache,
        dispatcher_options={"flush_interval": 0.01},
    )
    app = model if model is not None else ModelApp()
    mw = TeamLoggingMiddleware(app, team_logging=tl, **options)
    async with mw:
        yield Gateway(mw, tl, memory, app, store)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def make_cache(request: pytest.FixtureRequest) -> Callable[..., ResponseCache]:
    """A factory of caches of each backend (Redis: the shared server, emptied)."""
    if request.param == "memory":
        return lambda **kw: MemoryResponseCache(**kw)
    url = request.getfixturevalue("redis_url")
    return lambda **kw: RedisResponseCache(url, **kw)


def sse_events(raw: bytes) -> list[str]:
    """Parse an SSE body strictly: ``data:`` events separated by blank lines, ending in [DONE]."""
    assert raw.endswith(b"\n\n")
    events = raw.decode().split("\n\n")[:-1]
    data: list[str] = []
    for event in events:
        lines = event.split("\n")
        assert lines and all(line.startswith("data: ") for line in lines), event
        data.append("".join(line[6:] for line in lines))
    assert data[-1] == "[DONE]"
    for item in data[:-1]:
        json.loads(item)
    return data


def stream_text(raw: bytes) -> str:
    text = ""
    for item in sse_events(raw)[:-1]:
        for choice in json.loads(item)["choices"]:
            text += choice["delta"].get("content") or ""
    return text


# -- hit and miss ---------------------------------------------------------------------------------


async def test_json_miss_then_hit_is_byte_identical_without_calling_the_app(
    make_cache: Callable[..., ResponseCache],
) -> None:
    async with gateway(make_cache()) as gw:
        first = await gw.call()
        assert first.status == 200 and first.cache == b"miss"
        second = await gw.call()
        assert gw.model.calls == 1
        assert second.cache == b"hit" and second.status == 200
        assert second.body == first.body and json.loads(second.body)["id"] == "chatcmpl-1"
        assert second.header(b"content-length") == str(len(first.body)).encode()
        assert second.header(b"content-type") == b"application/json"
        assert second.header(b"age") is not None
        # Per-request and per-key headers of the first answer are not replayed.
        assert second.header(b"x-request-id") is None
        assert second.header(b"x-ratelimit-remaining-requests") is None
        assert len(second.bodies) == 1
        # Key order and the ignored fields do not matter.
        reordered = {"messages": REQUEST["messages"], "user": "bob", "model": "gpt-4o"}
        assert (await gw.call(reordered)).cache == b"hit"
        # Anything that changes the answer does.
        assert (await gw.call({**REQUEST, "temperature": 1})).cache == b"miss"
        assert gw.model.calls == 2
    assert gw.tl.cache.stats()["hits"] == 2


async def test_stream_miss_then_hit_replays_well_formed_sse_chunk_by_chunk(
    make_cache: Callable[..., ResponseCache],
) -> None:
    async with gateway(make_cache()) as gw:
        first = await gw.call(STREAM_REQUEST)
        assert first.cache == b"miss" and stream_text(first.body) == "The answer is #1"
        second = await gw.call(STREAM_REQUEST)
        assert gw.model.calls == 1 and second.cache == b"hit"
        assert second.body == first.body
        # The same chunks, as separate body messages, each a whole SSE event.
        assert second.bodies == first.bodies and len(second.bodies) == 5
        assert all(b.endswith(b"\n\n") for b in second.bodies)
        assert [m.get("more_body", False) for m in second.peer.sent[1:]] == [True] * 4 + [False]
        assert second.header(b"content-length") is None
        assert second.header(b"content-type") == b"text/event-stream; charset=utf-8"
        # JSON and SSE answers to otherwise equal requests are different entries.
        assert (await gw.call(REQUEST)).cache == b"miss"


async def test_teams_never_share_entries(make_cache: Callable[..., ResponseCache]) -> None:
    async with gateway(make_cache()) as gw:
        assert (await gw.call(key="key-a")).cache == b"miss"
        assert (await gw.call(key="key-a")).cache == b"hit"
        b_first = await gw.call(key="key-b")
        assert b_first.cache == b"miss" and b"answer #2" in b_first.body
        b_second = await gw.call(key="key-b")
        assert b_second.cache == b"hit" and b"answer #2" in b_second.body
        assert b"answer #1" in (await gw.call(key="key-a")).body
        assert gw.model.calls == 2


async def test_teams_without_caching_and_other_methods_are_not_cached() -> None:
    async with gateway() as gw:
        for _ in range(2):
            answer = await gw.call(key="key-plain")
            assert answer.cache is None and answer.status == 200
        for _ in range(2):
            assert (await gw.call(method="GET", chunks=[b""])).cache is None
        for _ in range(2):
            assert (await gw.call(b"not json")).cache is None
        assert gw.model.calls == 6


# -- opt-outs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["header", "body"])
@pytest.mark.parametrize("stream", [False, True])
async def test_no_cache_skips_the_lookup_but_stores_the_fresh_answer(
    make_cache: Callable[..., ResponseCache], form: str, stream: bool
) -> None:
    plain = STREAM_REQUEST if stream else REQUEST
    async with gateway(make_cache()) as gw:
        await gw.call(plain)
        if form == "header":
            fresh = await gw.call(plain, headers=[(b"cache-control", b"no-cache")])
        else:
            fresh = await gw.call({**plain, "cache": {"no-cache": True}})
        assert fresh.cache == b"miss" and gw.model.calls == 2
        later = await gw.call(plain)
        assert later.cache == b"hit" and later.body == fresh.body
        assert b"#2" in later.body


@pytest.mark.parametrize("form", ["header", "body"])
@pytest.mark.parametrize("stream", [False, True])
async def test_no_store_answers_from_the_app_and_keeps_nothing(
    make_cache: Callable[..., ResponseCache], form: str, stream: bool
) -> None:
    plain = STREAM_REQUEST if stream else REQUEST
    async with gateway(make_cache()) as gw:
        if form == "header":
            first = await gw.call(plain, headers=[(b"Cache-Control", b"no-store")])
        else:
            first = await gw.call({**plain, "cache": {"no-store": True}})
        assert first.cache == b"miss"
        second = await gw.call(plain)
        assert second.cache == b"miss" and gw.model.calls == 2
        assert (await gw.call(plain)).cache == b"hit"


# -- TTL ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_memory_entries_expire_after_the_team_ttl(stream: bool) -> None:
    clock = FakeClock()
    request = STREAM_REQUEST if stream else REQUEST
    async with gateway(MemoryResponseCache(timer=clock), teams=default_teams(ttl=10)) as gw:
        await gw.call(request)
        clock.now += 9.9
        assert (await gw.call(request)).cache == b"hit"
        clock.now += 0.1
        assert (await gw.call(request)).cache == b"miss"
        assert gw.model.calls == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_redis_entries_carry_the_team_ttl_and_expire(redis_url: str, stream: bool) -> None:
    request = STREAM_REQUEST if stream else REQUEST
    raw = redis.Redis.from_url(redis_url)
    async with gateway(RedisResponseCache(redis_url), teams=default_teams(ttl=120)) as gw:
        await gw.call(request)
        (key,) = raw.keys("tlm:cache:*")
        assert 115_000 < raw.pttl(key) <= 120_000
        # A request's own ttl can shorten it: this one is gone within ~50 ms.
        raw.delete(key)
        await gw.call({**request, "cache": {"ttl": 0.05}})
        assert gw.model.calls == 2
        await wait_for(lambda: not raw.keys("tlm:cache:*"), timeout=5)
        assert (await gw.call(request)).cache == b"miss" and gw.model.calls == 3
    raw.close()


# -- the request body reaches the app exactly -----------------------------------------------------


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("limit", [1024 * 1024, 10_000])
async def test_large_body_in_many_chunks_is_replayed_exactly_then_live(limit: int) -> None:
    body = {**REQUEST, "messages": [{"role": "user", "content": "x" * 300_000}]}
    raw = json.dumps(body).encode()
    chunks = [*chunked(raw, 1999), b""]  # an empty final message, as servers may send
    model = ModelApp()
    model.read_after_response = True
    async with gateway(model=model, max_cache_request_bytes=limit) as gw:
        answer = await gw.call(chunks=chunks, disconnect_after_body=True)
        received = model.received[0]
        assert [m.get("body", b"") for m in received[:-1]] == chunks
        assert [m.get("more_body", False) for m in received[:-1]] == [True] * (len(chunks) - 1) + [
            False
        ]
        # What the client sends after its body (the disconnect) passes through too.
        assert received[-1] == {"type": "http.disconnect"}
        cacheable = limit > len(raw)
        assert answer.cache == (b"miss" if cacheable else None)
        again = await gw.call(chunks=chunks, disconnect_after_body=True)
        assert again.cache == (b"hit" if cacheable else None)
        assert model.calls == (1 if cacheable else 2)


async def test_a_miss_forwards_each_chunk_before_the_next_is_produced() -> None:
    """Caching never buffers a stream: chunk N reaches the client before N+1 exists."""
    delivered: list[bytes] = []
    produced: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for n in range(3):
            # What was produced so far has reached the client already.
            assert delivered == produced
            chunk = f"data: {n}\n\n".encode()
            produced.append(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": n < 2})

    class Spy(Peer):
        async def send(self, message: Message) -> None:
            await super().send(message)
            if message["type"] == "http.response.body":
                delivered.append(message["body"])

    async with gateway() as gw:
        gw.mw.app = app
        peer = Spy([json.dumps(STREAM_REQUEST).encode()])
        scope = {
            "type": "http",
            "method": "POST",
            "path": CHAT,
            "headers": [(b"authorization", b"Bearer key-a")],
        }
        await gw.mw(scope, peer.receive, peer.send)
        assert delivered == produced and len(delivered) == 3
        assert (await gw.call(STREAM_REQUEST)).bodies == produced


# -- what is not stored ---------------------------------------------------------------------------


async def test_error_answers_are_not_stored(make_cache: Callable[..., ResponseCache]) -> None:
    async with gateway(make_cache()) as gw:
        for _ in range(2):
            answer = await gw.call({**REQUEST, "model": "fail"})
            assert answer.status == 500 and answer.cache == b"miss"
        assert gw.model.calls == 2


async def test_a_stream_the_client_left_is_not_stored(
    make_cache: Callable[..., ResponseCache],
) -> None:
    model = ModelApp()
    model.swallow_send_errors = True
    async with gateway(make_cache(), model=model) as gw:
        cut = await gw.call(STREAM_REQUEST, fail_send_at=2)  # start and one chunk got through
        assert len(cut.bodies) == 1
        complete = await gw.call(STREAM_REQUEST)
        assert complete.cache == b"miss" and model.calls == 2
        assert (await gw.call(STREAM_REQUEST)).cache == b"hit"
        records = await gw.records("team-a")
        assert [r.outcome for r in records] == ["client_disconnected", "ok", "ok"]


async def test_a_stream_the_app_broke_off_is_not_stored() -> None:
    async with gateway() as gw:
        with pytest.raises(RuntimeError, match="crashed"):
            await gw.call({**STREAM_REQUEST, "crash": True})
        with pytest.raises(RuntimeError, match="crashed"):
            await gw.call({**STREAM_REQUEST, "crash": True})
        assert gw.model.calls == 2 and gw.tl.cache.stats()["stores"] == 0


async def test_a_hit_to_a_client_that_left_ends_quietly() -> None:
    async with gateway() as gw:
        await gw.call()
        cut = await gw.call(fail_send_at=1)
        assert cut.peer.gone and gw.model.calls == 1
        records = await gw.records("team-a")
        assert records[-1].outcome == "client_disconnected" and records[-1].cache_hit


# -- logging of cache hits ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_hits_are_logged_to_the_team_with_cache_hit_true(stream: bool) -> None:
    request = STREAM_REQUEST if stream else REQUEST
    async with gateway() as gw:
        await gw.call(request, headers=[(b"x-request-id", b"first")])
        await gw.call(request, headers=[(b"x-request-id", b"second")])
        records = await gw.records("team-a")
    assert [(r.request_id, r.cache_hit) for r in records] == [("first", False), ("second", True)]
    miss, hit = records
    assert hit.team_id == "team-a" and hit.key_alias == "alice"
    assert hit.status_code == 200 and hit.outcome == "ok" and hit.stream is stream
    assert hit.output == miss.output == ("The answer is #1" if stream else "answer #1")
    assert hit.messages == REQUEST["messages"]
    assert hit.to_dict()["cache_hit"] is True
    assert gw.memory.destinations() == ["team-a"]


async def test_hits_of_a_team_with_logging_disabled_are_not_logged() -> None:
    async with gateway() as gw:
        assert (await gw.call(key="key-off")).cache == b"miss"
        assert (await gw.call(key="key-off")).cache == b"hit"
        assert (await gw.call(STREAM_REQUEST, key="key-off")).cache == b"miss"
        assert (await gw.call(STREAM_REQUEST, key="key-off")).cache == b"hit"
        await gw.call(key="key-a")  # the pipeline works: this one arrives
        assert len(await gw.records("team-a")) == 1
        assert gw.memory.records("team-off") == [] and gw.memory.destinations() == ["team-a"]
        # Nothing of team-off was even queued: only team-a's exchange was submitted.
        assert gw.tl.dispatcher.stats()["submitted"] == 1


# -- a cache that fails ---------------------------------------------------------------------------


async def test_redis_down_means_misses_counted_and_every_request_served(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    cache = RedisResponseCache(redis_server.url, retry_interval=2.0, timer=clock)
    async with gateway(cache) as gw:
        await gw.call()
        assert (await gw.call()).cache == b"hit"
        redis_server.stop(kill=True)
        for stream in (False, True, False):
            answer = await gw.call(STREAM_REQUEST if stream else REQUEST)
            assert answer.status == 200 and answer.cache == b"miss"
        assert gw.model.calls == 4
        stats = cache.stats()
        assert stats["errors"] == 1 and stats["skipped"] >= 4 and not stats["available"]
        assert gw.mw.stats.cache_errors == 0  # the backend contained it
        health = await gw.tl.health()
        assert health["cache"]["backend"] == "redis" and health["cache"]["available"] is False
        redis_server.start()
        clock.now += 2.0
        assert (await gw.call()).cache == b"miss"
        assert (await gw.call()).cache == b"hit"
        assert cache.stats()["available"] is True
        assert len(await gw.records("team-a")) == 7


class BrokenCache:
    """A user-supplied cache whose every call raises."""

    default_ttl = 60.0

    @property
    def max_entry_bytes(self) -> int:
        raise RuntimeError("no entry cap")

    async def get(self, key: str) -> CachedResponse | None:
        raise RuntimeError("get failed")

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        raise RuntimeError("set failed")

    def stats(self) -> dict[str, Any]:
        raise RuntimeError("stats failed")

    async def aclose(self) -> None:
        raise RuntimeError("close failed")


async def test_a_cache_that_raises_never_fails_a_request(caplog: pytest.LogCaptureFixture) -> None:
    async with gateway(BrokenCache()) as gw:
        for stream in (False, True):
            answer = await gw.call(STREAM_REQUEST if stream else REQUEST)
            assert answer.status == 200 and answer.cache is None
        assert gw.mw.stats.cache_errors == 4  # get and max_entry_bytes, twice
        assert (await gw.tl.health())["cache"] == {"error": "RuntimeError"}
    assert "get failed" not in caplog.text


# -- through a real server ------------------------------------------------------------------------


async def test_through_uvicorn_a_cached_stream_arrives_as_the_original() -> None:
    async with (
        gateway() as gw,
        run_uvicorn_async(gw.mw) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as client,
    ):
        headers = {"authorization": "Bearer key-a"}

        async def fetch() -> tuple[str | None, bytes]:
            chunks: list[bytes] = []
            async with client.stream(
                "POST", CHAT, json=STREAM_REQUEST, headers=headers
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    chunks.append(chunk)
                return response.headers.get("x-team-logging-cache"), b"".join(chunks)

        state, first = await fetch()
        assert state == "miss"
        # Stored before the last message went out: the very next request is a hit.
        state, again = await fetch()
        assert state == "hit" and again == first and gw.model.calls == 1
        assert stream_text(again) == "The answer is #1"
