"""CachedResolver and bearer_token: TTLs on a fake clock, single flight, errors, cancellation."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from team_logging_middleware.resolver import CachedResolver, Caller, bearer_token

KEY = "sk-live-0123456789abcdef"


class Clock:
    """A manual clock for TTLs: tests advance it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scope(*headers: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


def auth(key: str = KEY) -> dict[str, Any]:
    return scope(("authorization", f"Bearer {key}"))


class CountingResolver:
    """A resolver backed by a dict of keys, counting its calls; optionally gated by an event."""

    def __init__(self, keys: dict[str, Caller | None] | None = None) -> None:
        self.keys = keys if keys is not None else {KEY: Caller(team_id="t1", key_id="k1")}
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.error: Exception | None = None
        self.finished = 0

    async def __call__(self, scope: Any) -> Caller | None:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        self.finished += 1
        if self.error is not None:
            raise self.error
        return self.keys.get(bearer_token(scope) or "")


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Yield to the loop until ``predicate()`` holds (a deadline, not a fixed sleep)."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), timeout)


# -- bearer_token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc"),), "abc"),
        ((("authorization", "BEARER   abc  "),), "abc"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-api-key", "xk"),), "xk"),
        ((("api-key", "ak"),), "ak"),
        ((("api-key", "ak"), ("x-api-key", "xk")), "xk"),
        ((("x-api-key", "xk"), ("authorization", "Bearer b")), "b"),
        ((("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", "xk")), "xk"),
        ((("x-api-key", "  "),), None),
        ((("content-type", "application/json"),), None),
        ((), None),
    ],
)
def test_bearer_token(headers: tuple[tuple[str, str], ...], expected: str | None) -> None:
    assert bearer_token(scope(*headers)) == expected


def test_bearer_token_without_headers_key() -> None:
    assert bearer_token({"type": "http"}) is None


# -- caching --------------------------------------------------------------------------------


async def test_found_callers_are_cached_for_ttl() -> None:
    clock = Clock()
    inner = CountingResolver()
    resolver = CachedResolver(inner, ttl=60, timer=clock)
    first = await resolver(auth())
    assert first == Caller(team_id="t1", key_id="k1")
    clock.now += 59.9
    assert await resolver(auth()) is first
    assert inner.calls == 1
    clock.now += 0.1
    assert await resolver(auth()) == first
    assert inner.calls == 2
    assert resolver.stats() == {
        "hits": 1,
        "misses": 2,
        "errors": 0,
        "size": 1,
        "inflight": 0,
        "uncached": 0,
    }


async def test_unknown_callers_are_cached_for_negative_ttl() -> None:
    clock = Clock()
    inner = CountingResolver()
    resolver = CachedResolver(inner, ttl=60, negative_ttl=5, timer=clock)
    assert await resolver(auth("sk-new")) is None
    clock.now += 4.9
    assert await resolver(auth("sk-new")) is None
    assert inner.calls == 1
    # The key is created in the gateway's database; it is known after negative_ttl, not ttl.
    inner.keys["sk-new"] = Caller(team_id="t2")
    clock.now += 0.1
    assert await resolver(auth("sk-new")) == Caller(team_id="t2")
    assert inner.calls == 2


async def test_zero_ttls_disable_caching() -> None:
    clock = Clock()
    inner = CountingResolver()
    resolver = CachedResolver(inner, ttl=0, negative_ttl=0, timer=clock)
    await resolver(auth())
    await resolver(auth())
    await resolver(auth("unknown"))
    await resolver(auth("unknown"))
    assert inner.calls == 4
    assert resolver.stats()["size"] == 0


async def test_credentials_are_cached_separately_and_lru_bounded() -> None:
    clock = Clock()
    inner = CountingResolver({f"k{i}": Caller(team_id=f"t{i}") for i in range(3)})
    resolver = CachedResolver(inner, maxsize=2, timer=clock)
    assert (await resolver(auth("k0"))) == Caller(team_id="t0")
    assert (await resolver(auth("k1"))) == Caller(team_id="t1")
    assert (await resolver(auth("k0"))) == Caller(team_id="t0")  # k0 now most recently used
    assert (await resolver(auth("k2"))) == Caller(team_id="t2")  # evicts k1
    assert inner.calls == 3
    assert resolver.stats()["size"] == 2
    await resolver(auth("k0"))
    assert inner.calls == 3
    await resolver(auth("k1"))
    assert inner.calls == 4


async def test_the_raw_credential_is_not_kept_as_a_cache_key() -> None:
    resolver = CachedResolver(CountingResolver())
    await resolver(auth())
    keys = list(resolver._cache.keys())
    assert len(keys) == 1
    assert KEY not in repr(keys)
    assert KEY.encode() not in keys[0]
    assert KEY not in repr(resolver.stats())


async def test_requests_without_a_credential_always_reach_the_resolver() -> None:
    calls: list[Any] = []

    async def by_client_address(scope: Any) -> Caller | None:
        calls.append(scope["client"])
        return Caller(team_id="internal") if scope["client"][0] == "10.0.0.1" else None

    resolver = CachedResolver(by_client_address)
    internal = {"type": "http", "headers": [], "client": ("10.0.0.1", 1234)}
    other = {"type": "http", "headers": [], "client": ("10.0.0.2", 1234)}
    assert await resolver(internal) == Caller(team_id="internal")
    assert await resolver(other) is None
    assert await resolver(internal) == Caller(team_id="internal")
    assert len(calls) == 3
    assert resolver.stats()["uncached"] == 3
    assert resolver.stats()["size"] == 0


async def test_invalidate_one_or_all() -> None:
    clock = Clock()
    inner = CountingResolver({"a": Caller(team_id="A"), "b": Caller(team_id="B")})
    resolver = CachedResolver(inner, timer=clock)
    await resolver(auth("a"))
    await resolver(auth("b"))
    inner.keys["a"] = Caller(team_id="A2")
    resolver.invalidate("a")
    assert await resolver(auth("a")) == Caller(team_id="A2")
    assert await resolver(auth("b")) == Caller(team_id="B")
    assert inner.calls == 3
    resolver.invalidate()
    assert resolver.stats()["size"] == 0
    await resolver(auth("b"))
    assert inner.calls == 4


async def test_wrong_return_type_is_an_error() -> None:
    async def bad(scope: Any) -> Any:
        return {"team_id": "t"}

    resolver = CachedResolver(bad)
    with pytest.raises(TypeError, match="expected a Caller or None"):
        await resolver(auth())
    assert resolver.stats()["errors"] == 1
    assert resolver.stats()["size"] == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        CachedResolver(CountingResolver(), ttl=-1)
    with pytest.raises(ValueError):
        CachedResolver(CountingResolver(), maxsize=0)


# -- single flight --------------------------------------------------------------------------


async def test_concurrent_misses_share_one_resolver_call() -> None:
    inner = CountingResolver()
    inner.gate = asyncio.Event()
    resolver = CachedResolver(inner)
    tasks = [asyncio.create_task(resolver(auth())) for _ in range(100)]
    await inner.started.wait()
    await wait_for(lambda: resolver.stats()["misses"] == 100)
    assert resolver.stats()["inflight"] == 1
    inner.gate.set()
    results = await asyncio.gather(*tasks)
    assert inner.calls == 1
    assert all(r is results[0] for r in results)
    assert results[0] == Caller(team_id="t1", key_id="k1")
    assert resolver.stats()["inflight"] == 0
    # ... and the shared answer was cached.
    await resolver(auth())
    assert inner.calls == 1


async def test_an_error_reaches_every_waiter_and_is_not_cached() -> None:
    inner = CountingResolver()
    inner.gate = asyncio.Event()
    inner.error = ConnectionError("key database down")
    resolver = CachedResolver(inner)
    tasks = [asyncio.create_task(resolver(auth())) for _ in range(100)]
    await wait_for(lambda: resolver.stats()["misses"] == 100)
    inner.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert inner.calls == 1
    assert all(isinstance(r, ConnectionError) for r in results)
    assert resolver.stats()["errors"] == 1
    assert resolver.stats()["size"] == 0
    # The next request tries again (and succeeds once the database is back).
    inner.gate = None
    inner.error = None
    assert await resolver(auth()) == Caller(team_id="t1", key_id="k1")
    assert inner.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    inner = CountingResolver()
    inner.gate = asyncio.Event()
    resolver = CachedResolver(inner)
    first = asyncio.create_task(resolver(auth()))  # starts the shared call
    await inner.started.wait()
    others = [asyncio.create_task(resolver(auth())) for _ in range(5)]
    await wait_for(lambda: resolver.stats()["misses"] == 6)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    inner.gate.set()
    results = await asyncio.gather(*others)
    assert all(r == Caller(team_id="t1", key_id="k1") for r in results)
    assert inner.calls == 1
    assert inner.finished == 1


async def test_when_every_waiter_leaves_the_call_still_completes_and_caches() -> None:
    inner = CountingResolver()
    inner.gate = asyncio.Event()
    resolver = CachedResolver(inner)
    waiters = [asyncio.create_task(resolver(auth())) for _ in range(3)]
    await inner.started.wait()
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    inner.gate.set()
    await wait_for(lambda: resolver.stats()["inflight"] == 0)
    assert resolver.stats()["size"] == 1
    assert await resolver(auth()) == Caller(team_id="t1", key_id="k1")
    assert inner.calls == 1


async def test_an_abandoned_failing_call_leaves_no_unretrieved_exception() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        inner = CountingResolver()
        inner.gate = asyncio.Event()
        inner.error = RuntimeError("boom")
        resolver = CachedResolver(inner)
        waiter = asyncio.create_task(resolver(auth()))
        await inner.started.wait()
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        inner.gate.set()
        await wait_for(lambda: resolver.stats()["inflight"] == 0)
        gc.collect()
        assert reported == []
        assert resolver.stats()["errors"] == 1
    finally:
        loop.set_exception_handler(previous)


async def test_a_lookup_running_during_invalidate_is_not_cached() -> None:
    inner = CountingResolver()
    inner.gate = asyncio.Event()
    resolver = CachedResolver(inner)
    waiter = asyncio.create_task(resolver(auth()))
    await inner.started.wait()
    # The key is revoked while its lookup runs: the running answer must not outlive the revoke.
    resolver.invalidate(KEY)
    inner.gate.set()
    assert await waiter == Caller(team_id="t1", key_id="k1")
    assert resolver.stats()["size"] == 0
    inner.gate = None
    inner.keys.clear()
    assert await resolver(auth()) is None
    assert inner.calls == 2


# -- the request path's synchronous lookup ------------------------------------------------------


async def test_cached_answers_only_what_a_call_has_cached_and_counts_hits() -> None:
    clock = Clock()
    inner = CountingResolver()
    resolver = CachedResolver(inner, ttl=10, timer=clock)
    missing = resolver.cached(auth())
    assert missing is resolver.cached(scope())  # no credential: nothing to look up
    assert missing is not None and not isinstance(missing, Caller)
    caller = await resolver(auth())
    assert resolver.cached(auth()) is caller  # the very object: the planner keys on it
    assert inner.calls == 1 and resolver.stats()["hits"] == 1
    clock.now += 10
    assert resolver.cached(auth()) is missing  # expired
    await resolver(auth())
    resolver.invalidate(KEY)
    assert resolver.cached(auth()) is missing
    assert inner.calls == 2


async def test_cached_remembers_unknown_callers_for_the_negative_ttl_only() -> None:
    clock = Clock()
    resolver = CachedResolver(CountingResolver({}), negative_ttl=2, timer=clock)
    assert await resolver(auth("nobody")) is None
    assert resolver.cached(auth("nobody")) is None  # a cached "unknown", not a miss
    clock.now += 2
    assert resolver.cached(auth("nobody")) is not None  # the miss marker again


async def test_zero_ttl_caches_nothing() -> None:
    inner = CountingResolver()
    resolver = CachedResolver(inner, ttl=0)
    await resolver(auth())
    await resolver(auth())
    assert inner.calls == 2 and resolver.stats()["size"] == 0


def test_only_the_first_fallback_header_of_each_name_counts() -> None:
    assert (
        bearer_token(scope(("x-api-key", " "), ("x-api-key", "later"), ("api-key", "az"))) == "az"
    )
    assert bearer_token(scope(("api-key", "az"), ("x-api-key", "anthropic"))) == "anthropic"
    assert bearer_token(scope(("authorization", "Basic abc"), ("api-key", " az "))) == "az"
