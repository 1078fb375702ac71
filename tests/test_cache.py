"""The response cache on its own: keys, opt-outs, the stored answer, the memory backend (fake
clock) and the Redis backend against a real redis-server (including Redis going away)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from team_logging_middleware._capture import Message
from team_logging_middleware.cache import (
    CACHE_HEADER,
    IGNORED_FIELDS,
    CachedResponse,
    CacheRequest,
    MemoryResponseCache,
    RedisResponseCache,
    ResponseCache,
    cache_key,
    open_cache_session,
    parse_cache_request,
)
from team_logging_middleware.testing import wait_for
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)

NS_A = "a" * 32
NS_B = "b" * 32
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def dumps(obj: Any, **kwargs: Any) -> bytes:
    return json.dumps(obj, **kwargs).encode()


def entry(
    *chunks: bytes,
    status: int = 200,
    stream: bool = False,
    created_at: float = 1_700_000_000.0,
    content_type: bytes = b"application/json",
) -> CachedResponse:
    return CachedResponse(
        status=status,
        headers=((b"content-type", content_type),),
        body=chunks or (b'{"ok":true}',),
        stream=stream,
        created_at=created_at,
    )


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- keys -----------------------------------------------------------------------------------------


def test_key_ignores_order_whitespace_and_the_documented_fields() -> None:
    base = cache_key(NS_A, CHAT, dumps(BODY))
    assert base is not None and base.startswith(NS_A + ":")
    reordered = {k: BODY[k] for k in reversed(list(BODY))}
    assert cache_key(NS_A, CHAT, dumps(reordered, indent=4)) == base
    noisy = {
        **BODY,
        "user": "alice",
        "metadata": {"trace": 1},
        "cache": {"no-store": True},
        "request_id": "r-1",
        "litellm_call_id": "c-1",
    }
    assert cache_key(NS_A, CHAT, dumps(noisy)) == base
    assert cache_key(NS_A, CHAT + "/", dumps(BODY)) == base
    assert {"user", "metadata", "cache", "request_id"} <= IGNORED_FIELDS


@pytest.mark.parametrize(
    "change",
    [
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"temperature": 0.5},
        {"model": "gpt-4"},
        {"messages": [{"role": "user", "content": "hi!"}]},
    ],
)
def test_key_changes_with_anything_that_changes_the_answer(change: dict[str, Any]) -> None:
    assert cache_key(NS_A, CHAT, dumps({**BODY, **change})) != cache_key(NS_A, CHAT, dumps(BODY))


def test_key_differs_by_team_and_route() -> None:
    body = dumps(BODY)
    keys = {
        cache_key(NS_A, CHAT, body),
        cache_key(NS_B, CHAT, body),
        cache_key(NS_A, "/v1/completions", body),
        # The parts are delimited: moving a character across the boundary is another key.
        cache_key(NS_A[:-1], "a" + CHAT, body),
    }
    assert len(keys) == 4 and None not in keys


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b"{" * 100_000, b"null"]
)
def test_bodies_that_are_not_a_json_object_are_not_cacheable(body: bytes) -> None:
    assert cache_key(NS_A, CHAT, body) is None
    assert parse_cache_request(NS_A, CHAT, body) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
    noise=st.dictionaries(st.sampled_from(sorted(IGNORED_FIELDS)), json_values, max_size=3),
    ensure_ascii=st.booleans(),
)
def test_key_is_canonical_property(
    body: dict[str, Any], noise: dict[str, Any], ensure_ascii: bool
) -> None:
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    reference = cache_key(NS_A, CHAT, dumps(kept))
    assert reference is not None
    shuffled = dict(reversed(list({**kept, **noise}.items())))
    assert cache_key(NS_A, CHAT, dumps(shuffled, ensure_ascii=ensure_ascii, indent=1)) == reference
    changed = {**kept, "__probe__": [kept]}
    assert cache_key(NS_A, CHAT, dumps(changed)) != reference


# -- opt-outs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "cache_field", "expected"),
    [
        (None, None, (False, False)),
        (b"no-cache", None, (True, False)),
        (b"No-Store", None, (False, True)),
        (b"max-age=0, no-cache, no-store", None, (True, True)),
        (None, {"no-cache": True}, (True, False)),
        (None, {"no-store": True}, (False, True)),
        (None, {"no-cache": True, "no-store": True}, (True, True)),
        # Malformed directives are ignored, never an error.
        (None, {"no-cache": "true", "no-store": 1}, (False, False)),
        (None, "no-cache", (False, False)),
    ],
)
def test_opt_outs_from_the_header_and_the_body(
    header: bytes | None, cache_field: Any, expected: tuple[bool, bool]
) -> None:
    body = dict(BODY) if cache_field is None else {**BODY, "cache": cache_field}
    headers = [] if header is None else [(b"Cache-Control", header)]
    request = parse_cache_request(NS_A, CHAT, dumps(body), headers)
    assert request is not None
    assert (request.no_read, request.no_write) == expected
    assert request.key == cache_key(NS_A, CHAT, dumps(BODY))


def test_max_age_and_ttl_directives() -> None:
    request = parse_cache_request(
        NS_A,
        CHAT,
        dumps({**BODY, "cache": {"s-maxage": 30, "ttl": 5}}),
        [(b"cache-control", b"max-age=60")],
    )
    assert request is not None and request.max_age == 30 and request.ttl == 5
    fresh = entry(created_at=1000.0)
    assert request.accepts(fresh, now=1029.0)
    assert not request.accepts(fresh, now=1031.0)
    # A request's ttl may only shorten the team's.
    assert request.store_ttl(300) == 5
    assert CacheRequest("k", ttl=900).store_ttl(300) == 300
    assert CacheRequest("k").store_ttl(300) == 300
    for bad in ({"ttl": -1}, {"ttl": True}, {"ttl": "5"}, {"s-maxage": float("nan")}):
        parsed = parse_cache_request(NS_A, CHAT, json.dumps({**BODY, "cache": bad}).encode())
        assert parsed is not None and parsed.ttl is None and parsed.max_age is None


# -- the stored answer ----------------------------------------------------------------------------


def test_wire_format_round_trip_keeps_bytes_and_chunks() -> None:
    original = CachedResponse(
        status=201,
        headers=(
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"openai-model", b"\xe9"),
        ),
        body=(b"data: {}\n\n", b"", b"\x00\xff binary", b"data: [DONE]\n\n"),
        stream=True,
        created_at=1_700_000_123.25,
    )
    assert CachedResponse.from_bytes(original.to_bytes()) == original


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-1],  # truncated body
        lambda b: b + b"x",  # trailing garbage
        lambda b: b"XXXX" + b[4:],  # wrong magic
        lambda b: b[:9] + b"x" + b[10:],  # broken header JSON
        lambda b: b"TLMC1",  # no header length
    ],
)
def test_wire_format_rejects_damaged_values(mangle: Any) -> None:
    with pytest.raises(ValueError):
        CachedResponse.from_bytes(mangle(entry().to_bytes()))


def test_a_json_answer_replays_as_one_message_with_its_length() -> None:
    cached = entry(b'{"id":', b'"x"}', created_at=100.0)
    start, body = cached.asgi_messages(now=142.9)
    headers = dict(start["headers"])
    assert start["status"] == 200
    assert headers[b"content-length"] == b"10" and headers[b"age"] == b"42"
    assert headers[CACHE_HEADER] == b"hit"
    assert body == {"type": "http.response.body", "body": b'{"id":"x"}', "more_body": False}


def test_a_stream_replays_chunk_by_chunk_without_a_length() -> None:
    chunks = (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n")
    messages = entry(*chunks, stream=True, content_type=b"text/event-stream").asgi_messages()
    assert b"content-length" not in dict(messages[0]["headers"])
    assert [m["body"] for m in messages[1:]] == list(chunks)
    assert [m["more_body"] for m in messages[1:]] == [True, True, False]


# -- memory backend -------------------------------------------------------------------------------


async def test_memory_hit_miss_and_ttl_with_a_fake_clock() -> None:
    clock = FakeClock()
    cache = MemoryResponseCache(default_ttl=60, timer=clock)
    assert isinstance(cache, ResponseCache)
    assert await cache.get("k") is None
    await cache.set("k", entry(), ttl=10)
    assert await cache.get("k") == entry()
    clock.now += 9.999
    assert await cache.get("k") is not None
    clock.now += 0.001
    assert await cache.get("k") is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["expired"], stats["entries"]) == (2, 2, 1, 0)
    assert stats["bytes"] == 0
    await cache.set("k", entry(), ttl=0)  # a non-positive TTL stores nothing
    await cache.set("k", entry(), ttl=float("nan"))
    assert len(cache) == 0


async def test_memory_is_bounded_by_bytes_with_lru_eviction() -> None:
    clock = FakeClock()
    one = entry(b"x" * 1000)
    size = one.size_hint() + 2
    cache = MemoryResponseCache(max_bytes=3 * size, timer=clock)
    for key in ("k1", "k2", "k3"):
        await cache.set(key, one, ttl=60)
    assert await cache.get("k1") is not None  # k1 is now the most recently used
    await cache.set("k4", one, ttl=60)
    assert await cache.get("k2") is None  # the least recently used went
    assert all([await cache.get(k) is not None for k in ("k1", "k3", "k4")])
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["entries"] == 3 and stats["bytes"] <= 3 * size
    # Replacing an entry does not count its old bytes twice.
    await cache.set("k4", one, ttl=60)
    assert cache.stats()["bytes"] == 3 * size
    # An expired entry making room counts as expired, not evicted.
    clock.now += 61
    await cache.set("k5", one, ttl=60)
    assert cache.stats()["expired"] >= 1 and cache.stats()["evictions"] == 1
    await cache.aclose()
    assert len(cache) == 0 and cache.stats()["bytes"] == 0


async def test_memory_skips_entries_over_the_entry_cap() -> None:
    cache = MemoryResponseCache(max_bytes=10_000, max_entry_bytes=100)
    await cache.set("big", entry(b"x" * 101), ttl=60)
    await cache.set("huge", entry(b"x" * 50, b"y" * 51), ttl=60)
    await cache.set("ok", entry(b"x" * 100), ttl=60)
    assert await cache.get("big") is None and await cache.get("huge") is None
    assert await cache.get("ok") is not None
    assert cache.stats()["too_large"] == 2
    assert MemoryResponseCache(max_bytes=1000).max_entry_bytes == 1000
    with pytest.raises(ValueError):
        MemoryResponseCache(max_bytes=0)


# -- Redis backend --------------------------------------------------------------------------------


async def test_redis_round_trip_with_px_expiry(redis_url: str) -> None:
    cache = RedisResponseCache(redis_url, prefix="t:cache:")
    try:
        assert isinstance(cache, ResponseCache)
        assert await cache.get("k") is None
        value = entry(b"data: 1\n\n", b"data: [DONE]\n\n", stream=True)
        await cache.set("k", value, ttl=30)
        assert await cache.get("k") == value
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["stores"], stats["errors"]) == (1, 1, 1, 0)
        assert stats["available"] is True
    finally:
        await cache.aclose()
    with redis.Redis.from_url(redis_url) as raw:
        assert 0 < raw.pttl("t:cache:k") <= 30_000
        assert raw.get("t:cache:k") == value.to_bytes()


async def test_redis_entries_expire(redis_url: str) -> None:
    cache = RedisResponseCache(redis_url)
    try:
        await cache.set("short", entry(), ttl=0.05)
        await wait_for(lambda: _is_none(cache, "short"), timeout=5)
    finally:
        await cache.aclose()


async def _is_none(cache: ResponseCache, key: str) -> bool:
    return await cache.get(key) is None


async def test_redis_skips_large_entries_and_treats_foreign_values_as_misses(
    redis_url: str,
) -> None:
    cache = RedisResponseCache(redis_url, max_entry_bytes=10)
    try:
        await cache.set("big", entry(b"x" * 11), ttl=30)
        with redis.Redis.from_url(redis_url) as raw:
            assert raw.exists("tlm:cache:big") == 0
            raw.set("tlm:cache:foreign", b"something else")
        assert await cache.get("foreign") is None
        stats = cache.stats()
        assert stats["too_large"] == 1 and stats["corrupt"] == 1 and stats["misses"] == 1
    finally:
        await cache.aclose()


async def test_redis_outage_is_a_counted_miss_then_recovers(
    redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    password = "cache-pw-s3cret-4242"
    server: RedisServer = redis_server_factory(password=password)
    clock = FakeClock()
    cache = RedisResponseCache(server.url, socket_timeout=0.5, retry_interval=5.0, timer=clock)
    caplog.set_level(logging.INFO, logger="team_logging_middleware.cache")
    try:
        await cache.set("k", entry(), ttl=60)
        assert await cache.get("k") is not None
        server.stop(kill=True)
        assert await cache.get("k") is None  # an error: a miss, never an exception
        await cache.set("k2", entry(), ttl=60)  # skipped: Redis is left alone for a while
        assert await cache.get("k") is None
        stats = cache.stats()
        assert stats["errors"] == 1 and stats["skipped"] == 2 and stats["available"] is False
        server.start()  # empty again: no persistence
        assert await cache.get("k") is None and cache.stats()["skipped"] == 3
        clock.now += 5.0  # the retry interval has passed: the next call probes
        await cache.set("k", entry(), ttl=60)
        assert await cache.get("k") is not None
        stats = cache.stats()
        assert stats["available"] is True and stats["errors"] == 1 and stats["stores"] == 2
    finally:
        await cache.aclose()
    text = caplog.text + json.dumps(cache.stats())
    assert password not in text
    assert f"redis://127.0.0.1:{server.port}/0" in caplog.text
    assert "answers again" in caplog.text


async def test_a_hung_redis_is_cut_off_by_the_deadline(redis_server: RedisServer) -> None:
    cache = RedisResponseCache(redis_server.url, socket_timeout=0.2)
    try:
        await cache.set("k", entry(), ttl=60)
        redis_server.pause()
        try:
            assert await asyncio.wait_for(cache.get("k"), timeout=5) is None
        finally:
            redis_server.resume()
        assert cache.stats()["errors"] == 1
    finally:
        await cache.aclose()


# -- one request's session (without the middleware) -----------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)


def body_reader(body: bytes) -> Any:
    async def read(limit: int) -> bytes | None:
        return body if len(body) <= limit else None

    return read


async def session_for(cache: ResponseCache, body: bytes = b"", **kwargs: Any) -> Any:
    errors: list[str] = []
    session = await open_cache_session(
        cache,
        namespace=NS_A,
        route=CHAT,
        headers=kwargs.pop("headers", []),
        read_body=body_reader(body or dumps(BODY)),
        max_request_bytes=kwargs.pop("max_request_bytes", 1000),
        ttl_seconds=kwargs.pop("ttl_seconds", None),
        on_error=lambda where, exc: errors.append(type(exc).__name__),
    )
    return session, errors


async def answer(session: Any, *messages: Message) -> Sent:
    sent = Sent()
    send = session.wrap_send(sent)
    for message in messages:
        await send(message)
    return sent


def start(status: int = 200, *headers: tuple[bytes, bytes]) -> Message:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), *headers],
    }


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


@pytest.mark.parametrize(
    ("messages", "stored"),
    [
        ([start(), body(b"{}")], True),
        ([start(201), body(b"{"), body(b"}")], True),
        ([start(500), body(b"{}")], False),
        ([start(304), body(b"")], False),
        ([start(200, (b"Set-Cookie", b"s=1")), body(b"{}")], False),
        ([start(200, (b"content-encoding", b"gzip")), body(b"{}")], False),
        ([start(200, (b"cache-control", b"private, max-age=9")), body(b"{}")], False),
        ([start(200, (b"cache-control", b"no-store")), body(b"{}")], False),
        ([start(), body(b"{", more=True)], False),  # never completed
        ([start(), body(b"x" * 600, more=True), body(b"x" * 600)], False),  # over the cap
        ([start(), {"type": "http.response.pathsend", "path": "/x"}], False),
    ],
)
async def test_what_a_miss_stores(messages: list[Message], stored: bool) -> None:
    cache = MemoryResponseCache(max_entry_bytes=1000)
    session, errors = await session_for(cache)
    assert session is not None and session.hit is None
    sent = await answer(session, *messages)
    # Forwarded unchanged but for the miss marker on the start message.
    assert sent.messages[0]["headers"][-1] == (CACHE_HEADER, b"miss")
    assert sent.messages[1:] == messages[1:]
    assert messages[0]["headers"][-1] != (CACHE_HEADER, b"miss")  # the app's dict untouched
    assert session.stored is stored
    assert (len(cache) == 1) is stored and errors == []


async def test_session_hit_opt_outs_and_uncacheable_requests() -> None:
    cache = MemoryResponseCache()
    session, _ = await session_for(cache, ttl_seconds=7)
    await answer(session, start(200, (b"x-request-id", b"r1")), body(b'{"a":1}'))
    assert session.stored
    hit, _ = await session_for(cache)
    assert hit.hit is not None and hit.hit.body == (b'{"a":1}',)
    # Only the safe headers are kept.
    assert hit.hit.headers == ((b"content-type", b"application/json"),)
    replayed = Sent()
    assert await hit.replay(replayed)
    assert replayed.messages == hit.hit.asgi_messages(now=hit.hit.created_at + 0.5)
    no_read, _ = await session_for(cache, headers=[(b"cache-control", b"no-cache")])
    assert no_read.hit is None
    no_write, _ = await session_for(cache, dumps({**BODY, "n": 1, "cache": {"no-store": True}}))
    sent = await answer(no_write, start(), body(b"{}"))
    assert not no_write.stored and sent.messages[0]["headers"][-1] == (CACHE_HEADER, b"miss")
    assert (await session_for(cache, b"[1]"))[0] is None
    assert (await session_for(cache, max_request_bytes=5))[0] is None


class BrokenCache(MemoryResponseCache):
    async def get(self, key: str) -> CachedResponse | None:
        raise RuntimeError("boom")

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        raise RuntimeError("boom")


async def test_a_failing_cache_is_a_miss_and_reported() -> None:
    session, errors = await session_for(BrokenCache())
    assert session is not None and session.hit is None
    await answer(session, start(), body(b"{}"))
    assert not session.stored
    assert errors == ["RuntimeError", "RuntimeError"]


async def test_a_client_gone_during_a_replay_ends_it_quietly() -> None:
    async def gone(message: Message) -> None:
        raise OSError("client disconnected")

    cache = MemoryResponseCache()
    session, _ = await session_for(cache)
    await answer(session, start(), body(b"{}"))
    hit, _ = await session_for(cache)
    assert await hit.replay(gone) is False


async def test_a_miss_is_stored_before_its_final_message_goes_out() -> None:
    cache = MemoryResponseCache()
    session, _ = await session_for(cache)
    seen_in_cache: list[bool] = []

    async def client(message: Message) -> None:
        if message["type"] == "http.response.body":
            seen_in_cache.append(len(cache) == 1)

    send = session.wrap_send(client)
    await send(start())
    await send(body(b"{", more=True))
    await send(body(b"}"))
    # Earlier chunks went out first; the last one only once the answer was in the cache.
    assert seen_in_cache == [False, True]


async def test_an_answer_is_not_stored_once_the_client_has_left() -> None:
    cache = MemoryResponseCache()
    session, _ = await session_for(cache)
    send = session.wrap_send(Sent(), lambda: True)
    await send(start())
    await send(body(b"{}"))
    assert not session.stored and len(cache) == 0
