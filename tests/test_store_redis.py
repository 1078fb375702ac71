"""RedisSettingsStore against a real redis-server: layout, encryption at rest, pub/sub
invalidation between replicas, and surviving Redis being killed, hung and restarted."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable

import pytest
from cryptography.fernet import Fernet

from team_logging_middleware.errors import MissingDependencyError, StoreUnavailableError
from team_logging_middleware.settings import TeamSettings
from team_logging_middleware.stores import (
    ENCRYPTED_PREFIX,
    KeyRecord,
    RedisSettingsStore,
    SecretDecryptionError,
    StoredDataError,
)
from team_logging_middleware.stores.redis import redacted_redis_url
from tests.fixtures.redis_server import RedisServer
from tests.helpers import Opened, langfuse_team, wait_until

SECRET = "sk-lf-redis-secret-31337"
KEY_SECRET = "sk-key-redis-secret-2718"
KEY = Fernet.generate_key().decode()

# Each wait below is bounded, and polls a condition: no fixed sleeps.
INVALIDATION_DEADLINE = 1.0
HANG_GUARD = 10.0  # far above the store's own deadline; only turns a hang into a failure


def _team(team_id: str = "t1", secret: str = SECRET) -> TeamSettings:
    return langfuse_team(team_id, secret)


def _key(team_id: str | None = "t1") -> KeyRecord:
    return KeyRecord(
        key_hash="b" * 64,
        team_id=team_id,
        metadata={
            "logging": [
                {
                    "callback_name": "otel",
                    "callback_vars": {"otel_endpoint": "http://c:4318", "otel_token": KEY_SECRET},
                }
            ]
        },
    )


@pytest.fixture
async def open_store() -> AsyncIterator[Callable[..., RedisSettingsStore]]:
    """``open_store(url, **options)``: a store closed at teardown."""
    opened = Opened()

    def make(url: str, **options: object) -> RedisSettingsStore:
        return opened.add(RedisSettingsStore(url, **options))  # type: ignore[arg-type]

    try:
        yield make
    finally:
        await opened.aclose()


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    await wait_until(condition, "the condition", timeout)


# -- layout and encryption at rest ------------------------------------------------------------


async def test_layout_under_the_prefix(
    open_store: Callable[..., RedisSettingsStore], shared_redis_server: RedisServer, redis_url: str
) -> None:
    store = open_store(redis_url, prefix="app1:")
    await store.put_team(_team("t1"))
    await store.put_team(_team("t:2"))
    await store.put_key(_key())
    with shared_redis_server.client() as raw:
        assert sorted(raw.keys("*")) == [
            b"app1:key:" + b"b" * 64,
            b"app1:team:t1",
            b"app1:team:t:2",
            b"app1:teams",
        ]
        assert raw.smembers("app1:teams") == {b"t1", b"t:2"}
        assert json.loads(raw.get("app1:team:t1"))["team_id"] == "t1"
        assert json.loads(raw.get("app1:key:" + "b" * 64))["key_hash"] == "b" * 64
    # Another prefix is another namespace on the same server.
    other = open_store(redis_url, prefix="app2:")
    assert await other.list_team_ids() == []
    assert await other.get_team("t1") is None


async def test_raw_values_hold_secrets_only_when_not_encrypted(
    open_store: Callable[..., RedisSettingsStore], shared_redis_server: RedisServer, redis_url: str
) -> None:
    for encrypted in (False, True):
        prefix = f"enc-{encrypted}:"
        store = open_store(redis_url, prefix=prefix, encryption_key=KEY if encrypted else None)
        await store.put_team(_team())
        await store.put_key(_key())
        with shared_redis_server.client() as raw:
            team_value = raw.get(f"{prefix}team:t1")
            key_value = raw.get(f"{prefix}key:" + "b" * 64)
        assert b"pk-lf-public" in team_value and b"http://c:4318" in key_value
        assert (SECRET.encode() in team_value) is not encrypted
        assert (KEY_SECRET.encode() in key_value) is not encrypted
        assert (ENCRYPTED_PREFIX.encode() in team_value) is encrypted
        assert (ENCRYPTED_PREFIX.encode() in key_value) is encrypted
        assert await store.get_team("t1") == _team()
        assert await store.get_key("b" * 64) == _key()


async def test_the_wrong_key_fails_clearly(
    open_store: Callable[..., RedisSettingsStore], redis_url: str
) -> None:
    await open_store(redis_url, encryption_key=KEY).put_team(_team("team-r"))
    wrong = open_store(redis_url, encryption_key=Fernet.generate_key())
    with pytest.raises(SecretDecryptionError) as caught:
        await wrong.get_team("team-r")
    assert "team 'team-r'" in str(caught.value)
    assert SECRET not in str(caught.value) and KEY not in str(caught.value)
    with pytest.raises(SecretDecryptionError, match="no encryption_key"):
        await open_store(redis_url).get_team("team-r")


async def test_a_corrupt_value_names_the_team(
    open_store: Callable[..., RedisSettingsStore], shared_redis_server: RedisServer, redis_url: str
) -> None:
    store = open_store(redis_url)
    with shared_redis_server.client() as raw:
        raw.set("tlm:team:broken", b"\xff{not json")
        raw.set("tlm:key:kk", json.dumps({"metadata": {}}))
    with pytest.raises(StoredDataError, match="team 'broken'"):
        await store.get_team("broken")
    with pytest.raises(StoredDataError, match="key 'kk'"):
        await store.get_key("kk")


async def test_a_refused_command_never_quotes_the_stored_document(
    open_store: Callable[..., RedisSettingsStore], shared_redis_server: RedisServer, redis_url: str
) -> None:
    store = open_store(redis_url)
    with shared_redis_server.client() as raw:
        raw.set("tlm:teams", "not a set")  # SADD in the write transaction fails: WRONGTYPE
    with pytest.raises(StoreUnavailableError) as caught:
        await store.put_team(_team())
    # redis-py quotes a failed pipeline's commands (the document, with the secret) in its
    # message: ours carries only the error class, and does not chain it.
    assert "ResponseError" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_without_the_redis_package_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(MissingDependencyError, match=r"team-logging-middleware\[redis\]"):
        RedisSettingsStore("redis://127.0.0.1:1/0")


# -- invalidation across replicas ---------------------------------------------------------------


async def test_another_replica_hears_every_write_within_a_second(
    open_store: Callable[..., RedisSettingsStore], redis_url: str
) -> None:
    replica, writer = open_store(redis_url), open_store(redis_url)
    heard: list[str] = []
    replica.subscribe(heard.append)
    await replica.start()
    assert replica.subscriber_connected

    async def heard_within_deadline(action: asyncio.Future[object], team_id: str) -> None:
        count = heard.count(team_id)
        await action
        await _wait_for(lambda: heard.count(team_id) > count, INVALIDATION_DEADLINE)

    await heard_within_deadline(asyncio.ensure_future(writer.put_team(_team("t1"))), "t1")
    await heard_within_deadline(asyncio.ensure_future(writer.delete_team("t1")), "t1")
    await heard_within_deadline(asyncio.ensure_future(writer.put_key(_key("t9"))), "t9")
    await heard_within_deadline(asyncio.ensure_future(writer.put_key(_key(None))), "*")
    # The replica sees the data itself, too (nothing is cached in the store).
    await writer.put_team(_team("t2"))
    assert await replica.get_team("t2") == _team("t2")


async def test_subscribe_in_a_running_loop_starts_listening(
    open_store: Callable[..., RedisSettingsStore], redis_url: str
) -> None:
    replica, writer = open_store(redis_url), open_store(redis_url)
    heard: list[str] = []
    replica.subscribe(heard.append)  # no start(): the subscriber starts lazily
    await _wait_for(lambda: replica.subscriber_connected)
    await writer.put_team(_team("lazy"))
    await _wait_for(lambda: "lazy" in heard, INVALIDATION_DEADLINE)
    assert "*" not in heard  # the first subscription has nothing to catch up on


async def test_keepalive_pings_keep_a_quiet_subscription(
    open_store: Callable[..., RedisSettingsStore],
    shared_redis_server: RedisServer,
    redis_url: str,
) -> None:
    replica = open_store(redis_url, keepalive_interval=0.02)
    heard: list[str] = []
    replica.subscribe(heard.append)
    await replica.start()

    def subscriber_pinged() -> bool:
        with shared_redis_server.client() as raw:
            clients = raw.client_list()
        return any(c.get("sub") == "1" and c.get("cmd") == "ping" for c in clients)

    await _wait_for(subscriber_pinged)
    # The PONGs were taken as signs of life: still the same subscription, nothing to re-read.
    assert replica.subscriber_connected and "*" not in heard
    await open_store(redis_url).put_team(_team("still-heard"))
    await _wait_for(lambda: "still-heard" in heard, INVALIDATION_DEADLINE)


async def test_a_separate_channel_is_not_heard(
    open_store: Callable[..., RedisSettingsStore], redis_url: str
) -> None:
    a = open_store(redis_url, channel="tlm:a")
    b = open_store(redis_url, channel="tlm:b")
    heard_a: list[str] = []
    a.subscribe(heard_a.append)
    await a.start()
    await b.put_team(_team("from-b"))
    await a.put_team(_team("from-a"))
    # a hears its own write twice (locally, then through Redis), never b's
    await _wait_for(lambda: heard_a.count("from-a") == 2, INVALIDATION_DEADLINE)
    assert "from-b" not in heard_a


# -- Redis down, hung, restarted ---------------------------------------------------------------


async def _expect_unavailable(operation: asyncio.Future[object] | object) -> StoreUnavailableError:
    """Await ``operation``: it must raise StoreUnavailableError (and nothing else) and not hang."""
    with pytest.raises(StoreUnavailableError) as caught:
        await asyncio.wait_for(operation, HANG_GUARD)  # type: ignore[arg-type]
    return caught.value


async def test_killed_and_restarted_redis(
    open_store: Callable[..., RedisSettingsStore], redis_server: RedisServer
) -> None:
    replica = open_store(redis_server.url, socket_timeout=0.5, resubscribe_interval=0.2)
    writer = open_store(redis_server.url, socket_timeout=0.5)
    heard: list[str] = []
    replica.subscribe(heard.append)
    await replica.start()
    await writer.put_team(_team("before"))
    await _wait_for(lambda: "before" in heard, INVALIDATION_DEADLINE)

    redis_server.stop(kill=True)
    # Every call fails fast with StoreUnavailableError, never another exception, never a hang.
    for store in (replica, writer):
        await _expect_unavailable(store.get_team("before"))
        await _expect_unavailable(store.put_team(_team("during")))
        await _expect_unavailable(store.delete_team("before"))
        await _expect_unavailable(store.list_team_ids())
        await _expect_unavailable(store.get_key("x"))
        await _expect_unavailable(store.put_key(_key()))
    health = await replica.health()
    assert health["reachable"] is False
    await _wait_for(lambda: not replica.subscriber_connected)
    assert "*" not in heard

    redis_server.start()  # same port, empty (no persistence)
    # Once re-subscribed, the replica tells its listeners that anything may have changed.
    await _wait_for(lambda: "*" in heard)
    assert replica.subscriber_connected
    await writer.put_team(_team("after"))  # the first write after the restart succeeds
    await _wait_for(lambda: "after" in heard, INVALIDATION_DEADLINE)
    assert await replica.get_team("after") == _team("after")
    health = await replica.health()
    assert health["reachable"] is True and health["subscriber_connected"] is True


async def test_a_hung_redis_times_out_instead_of_hanging(
    open_store: Callable[..., RedisSettingsStore], redis_server: RedisServer
) -> None:
    store = open_store(
        redis_server.url, socket_timeout=0.2, resubscribe_interval=0.1, keepalive_interval=0.1
    )
    heard: list[str] = []
    store.subscribe(heard.append)
    await store.start()
    await store.put_team(_team())
    redis_server.pause()  # accepts connections, never answers
    try:
        error = await _expect_unavailable(store.get_team("t1"))
        assert "Timeout" in str(error) or "no reply" in str(error)
        await _expect_unavailable(store.put_team(_team("while-hung")))
        health = await asyncio.wait_for(store.health(), HANG_GUARD)
        assert health["reachable"] is False
        # The silent subscription is found out by its unanswered keepalive PING.
        await _wait_for(lambda: not store.subscriber_connected)
    finally:
        redis_server.resume()
    await _wait_for(lambda: store.subscriber_connected)
    await _wait_for(lambda: "*" in heard)
    assert await store.get_team("t1") == _team()
    await store.put_team(_team("recovered"))
    assert await store.get_team("recovered") == _team("recovered")


async def test_starting_while_redis_is_down(
    open_store: Callable[..., RedisSettingsStore], redis_server: RedisServer
) -> None:
    redis_server.stop()
    store = open_store(redis_server.url, socket_timeout=0.1, resubscribe_interval=0.1)
    heard: list[str] = []
    store.subscribe(heard.append)
    await asyncio.wait_for(store.start(), HANG_GUARD)  # does not raise: the gateway starts
    assert not store.subscriber_connected
    await _expect_unavailable(store.get_team("t1"))
    redis_server.start()
    await _wait_for(lambda: store.subscriber_connected)
    # It was blind since it started: listeners drop whatever they may have cached.
    await _wait_for(lambda: "*" in heard)
    await store.put_team(_team())
    assert await store.get_team("t1") == _team()


# -- credentials and lifecycle ----------------------------------------------------------------


async def test_the_password_never_appears_in_health_or_errors(
    open_store: Callable[..., RedisSettingsStore],
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    password = "pw-Do-Not-Leak-91"
    server = redis_server_factory(password=password)
    store = open_store(server.url, encryption_key=KEY)
    await store.start()
    await store.put_team(_team())
    health = await store.health()
    assert health["reachable"] is True and health["subscriber_connected"] is True
    assert health["location"] == f"redis://127.0.0.1:{server.port}/0"
    assert password not in repr(health) and KEY not in repr(health)

    wrong = open_store(server.url.replace(password, "wrong-password-42"))
    error = await _expect_unavailable(wrong.get_team("t1"))
    assert "wrong-password-42" not in str(error) and password not in str(error)

    server.stop(kill=True)
    error = await _expect_unavailable(store.get_team("t1"))
    health = await store.health()
    assert password not in str(error) and password not in repr(health)


def test_redacted_urls() -> None:
    assert redacted_redis_url("redis://user:pw@h:1234/2") == "redis://h:1234/2"
    assert redacted_redis_url("rediss://:pw@h") == "rediss://h:6379/0"
    assert redacted_redis_url("redis://[::1]:7000/0?password=pw") == "redis://[::1]:7000/0"
    assert redacted_redis_url("unix:///run/redis.sock?password=pw") == "unix:///run/redis.sock"
    assert "pw" not in redacted_redis_url("redis://:pw@h:notaport/0")


async def test_aclose_stops_the_subscriber_and_refuses_later_calls(
    open_store: Callable[..., RedisSettingsStore], redis_url: str
) -> None:
    store = open_store(redis_url)
    await store.start()
    task = store._subscriber
    assert task is not None and not task.done()
    await store.put_team(_team())
    await store.aclose()
    await store.aclose()  # idempotent
    assert task.done() and not store.subscriber_connected
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.get_team("t1")
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.put_team(_team())
    # the data is in Redis, not in the store object
    assert await open_store(redis_url).get_team("t1") == _team()
