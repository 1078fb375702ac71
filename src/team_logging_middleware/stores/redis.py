"""The settings store for several gateway replicas: Redis, with pub/sub cache invalidation.

Layout (``prefix`` defaults to ``"tlm:"``)::

    {prefix}team:{team_id}   a team's settings, one JSON document (secrets sealed, see _codec)
    {prefix}teams            a set of every stored team id
    {prefix}key:{key_hash}   a gateway key, one JSON document

Every write is one ``MULTI``/``EXEC`` transaction that also ``PUBLISH``-es the changed team id
(``"*"`` for a key without a team) on ``channel``. Each store runs one subscriber task (started by
:meth:`RedisSettingsStore.start`, which the runtime calls from the lifespan, or lazily by the
first :meth:`~RedisSettingsStore.subscribe`) that calls the local listeners for every message, so
every replica drops its cached plans within a round trip. When the subscription drops (Redis
restarted, network cut), the task reconnects with backoff and then calls the listeners with
``"*"``: while it was blind, anything may have changed.

Failure model: every command has a socket timeout (``socket_timeout``, default 1 s) and an
overall deadline, so a call never hangs; an unreachable Redis surfaces as
:class:`~team_logging_middleware.errors.StoreUnavailableError` and the store recovers by itself
when Redis is back. Messages and :meth:`RedisSettingsStore.health` name the server as
``redis://host:port/db``, never with the URL's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import MissingDependencyError, StoreUnavailableError
from ..settings import TeamSettings
from ._codec import EncryptionKey, SettingsCodec, check_id
from ._listeners import notify_listeners
from .base import ChangeListener, KeyRecord

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("team_logging_middleware.stores")

__all__ = ["RedisSettingsStore", "redacted_redis_url"]

T = TypeVar("T")

_FIRST_RESUBSCRIBE_DELAY = 0.05


def redacted_redis_url(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL: no user name, no password, no query."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        host = parts.hostname or "localhost"
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        port = parts.port or 6379
    except ValueError:
        return "redis://<unparsable url>"
    return f"{parts.scheme or 'redis'}://{host}:{port}{parts.path or '/0'}"


class RedisSettingsStore:
    """A :class:`~team_logging_middleware.stores.base.SettingsStore` shared by replicas via Redis.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS,
            ``unix://`` for a socket).
        encryption_key: a Fernet key (or a list, to rotate) to encrypt secret callback vars at
            rest; see :mod:`team_logging_middleware.stores._codec`.
        prefix: namespace of every Redis key this store writes.
        channel: the pub/sub channel of change notifications (share it between replicas).
        socket_timeout: seconds to connect, and to wait for any reply.
        resubscribe_interval: the longest wait between two attempts to re-subscribe.
        keepalive_interval: seconds of silence on the subscription after which it is PINGed;
            no answer within the call deadline counts as a lost subscription (a hung server or
            a network partition never closes the connection by itself).

    Needs the ``redis`` extra (``pip install "team-logging-middleware[redis]"``).
    """

    def __init__(
        self,
        url: str,
        *,
        encryption_key: EncryptionKey | None = None,
        prefix: str = "tlm:",
        channel: str = "tlm:invalidate",
        socket_timeout: float = 1.0,
        resubscribe_interval: float = 1.0,
        keepalive_interval: float = 5.0,
    ) -> None:
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError
        except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
            raise MissingDependencyError("the Redis settings store", "redis") from exc
        if socket_timeout <= 0:
            raise ValueError("socket_timeout must be > 0")
        if resubscribe_interval <= 0 or keepalive_interval <= 0:
            raise ValueError("resubscribe_interval and keepalive_interval must be > 0")
        self._codec = SettingsCodec(encryption_key)
        self._location = redacted_redis_url(url)
        self._prefix = prefix
        self._teams_key = f"{prefix}teams"
        self._channel = channel
        self._socket_timeout = socket_timeout
        self._resubscribe_interval = resubscribe_interval
        self._keepalive_interval = keepalive_interval
        # A whole call (connect + retry + reply) must finish within this, whatever the socket
        # layer does: "Redis is slow" must look like "Redis is down", not like a hung request.
        self._deadline = 3 * socket_timeout + 0.5
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # One immediate retry on a broken connection: after a Redis restart the first
            # command on a pooled connection fails, the second one reconnects. No retry on a
            # timeout (that would double the wait), no backoff (callers answer 503 instead).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=False,
        )
        # The subscriber gets its own client without retries: a dropped subscription must reach
        # our loop (which then announces "*"), not be silently re-established by the library.
        self._sub_client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._listeners: list[ChangeListener] = []
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False

    # -- the SettingsStore protocol -----------------------------------------------------------

    async def get_team(self, team_id: str) -> TeamSettings | None:
        check_id(team_id, "team_id")
        data = await self._call(self._client.get(self._team_key(team_id)), "reading a team")
        return None if data is None else self._codec.load_team(data, team_id=team_id)

    async def put_team(self, settings: TeamSettings) -> None:
        team_id = check_id(settings.team_id, "team_id")
        document = self._codec.dump_team(settings)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._team_key(team_id), document)
        pipe.sadd(self._teams_key, team_id)
        pipe.publish(self._channel, team_id)
        await self._call(pipe.execute(), "writing a team")
        self._notify(team_id)

    async def delete_team(self, team_id: str) -> bool:
        check_id(team_id, "team_id")
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._team_key(team_id))
        pipe.srem(self._teams_key, team_id)
        pipe.publish(self._channel, team_id)
        try:
            results = await self._call(pipe.execute(), "deleting a team")
        finally:
            # Notify even when nothing was stored, or when the outcome is unknown: no cache may
            # keep a plan it cannot trust.
            self._notify(team_id)
        return bool(results[0])

    async def list_team_ids(self) -> list[str]:
        members = await self._call(self._client.smembers(self._teams_key), "listing teams")
        return sorted(_text(member) for member in members)

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        check_id(key_hash, "key_hash")
        data = await self._call(self._client.get(self._key_key(key_hash)), "reading a key")
        return None if data is None else self._codec.load_key(data, key_hash=key_hash)

    async def put_key(self, key: KeyRecord) -> None:
        check_id(key.key_hash, "key_hash")
        if key.team_id is not None:
            check_id(key.team_id, "team_id")
        changed = key.team_id if key.team_id is not None else "*"
        document = self._codec.dump_key(key)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._key_key(key.key_hash), document)
        pipe.publish(self._channel, changed)
        await self._call(pipe.execute(), "writing a key")
        self._notify(changed)

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        # Listen to other replicas as soon as someone cares, if a loop is running; the runtime
        # calls start() from the lifespan anyway.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._start_subscriber()

    async def health(self) -> dict[str, Any]:
        """Backend, location (no credentials), reachability, subscriber state and team count."""
        figures: dict[str, Any] = {
            "backend": "redis",
            "location": self._location,
            "prefix": self._prefix,
            "encrypted": self._codec.encrypts,
            "subscriber_connected": self._subscribed.is_set(),
        }
        try:
            await self._call(self._client.ping(), "answering PING")
            teams = await self._call(self._client.scard(self._teams_key), "counting teams")
        except StoreUnavailableError as exc:
            return {**figures, "reachable": False, "error": str(exc)}
        return {**figures, "reachable": True, "teams": int(teams)}

    async def aclose(self) -> None:
        """Stop the subscriber and close both connection pools. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._subscriber = self._subscriber, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscribed.clear()
        for client in (self._client, self._sub_client):
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- lifecycle extras ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the subscriber and wait (a few socket timeouts at most) until it listens.

        Never raises because Redis is down: the gateway starts, reads answer
        :class:`StoreUnavailableError`, and the subscriber keeps trying in the background.
        """
        self._start_subscriber()
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=self._deadline)
        except asyncio.TimeoutError:
            logger.warning(
                "Redis settings store at %s: not subscribed to %r yet; retrying in the "
                "background (other replicas' changes are not seen until then)",
                self._location,
                self._channel,
            )

    @property
    def subscriber_connected(self) -> bool:
        """True while the change subscription is established."""
        return self._subscribed.is_set()

    # -- internals ----------------------------------------------------------------------------

    def _team_key(self, team_id: str) -> str:
        return f"{self._prefix}team:{team_id}"

    def _key_key(self, key_hash: str) -> str:
        return f"{self._prefix}key:{key_hash}"

    async def _call(self, operation: Awaitable[T], action: str) -> T:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self._closed:
            if asyncio.iscoroutine(operation):
                operation.close()
            raise StoreUnavailableError(f"the Redis settings store at {self._location} is closed")
        try:
            return await asyncio.wait_for(operation, timeout=self._deadline)
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError) as exc:
            # Connection-level messages name the host and the socket error only.
            reason = str(exc) or "no reply in time"
            raise StoreUnavailableError(
                f"the Redis settings store at {self._location} is unreachable while {action}: "
                f"{type(exc).__name__}: {reason}"
            ) from exc
        except RedisError as exc:
            # Not chained, and only the class: a pipeline error's message quotes the commands,
            # whose arguments are the stored settings (secrets included when not encrypted).
            raise StoreUnavailableError(
                f"the Redis settings store at {self._location} refused {action}: "
                f"{type(exc).__name__}"
            ) from None

    def _notify(self, team_id: str) -> None:
        notify_listeners(list(self._listeners), team_id)

    def _start_subscriber(self) -> None:
        if self._closed or (self._subscriber is not None and not self._subscriber.done()):
            return
        loop = asyncio.get_running_loop()
        # A fresh context: a subscriber started lazily inside a request must not carry that
        # request's contextvars for the rest of its life.
        self._subscriber = contextvars.Context().run(
            loop.create_task, self._listen(), name="tlm-redis-invalidation"
        )

    async def _listen(self) -> None:
        from redis.exceptions import RedisError

        loop = asyncio.get_running_loop()
        delay = _FIRST_RESUBSCRIBE_DELAY
        # Whether the next successful subscription must announce "*": true after any failure,
        # false only for the very first attempt (nothing was cached before it).
        blind = False
        poll = min(self._resubscribe_interval, self._keepalive_interval)
        while True:
            pubsub = self._sub_client.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self._channel), self._deadline)
                # When we last sent something that must be answered (SUBSCRIBE, then PINGs), and
                # when the server last said anything: a connection whose peer hangs or vanished
                # behind a partition never errors by itself, it just stays silent.
                awaiting_since: float | None = loop.time()
                last_heard = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=poll)
                    now = loop.time()
                    if message is None:
                        if awaiting_since is not None:
                            if now - awaiting_since > self._deadline:
                                raise asyncio.TimeoutError("no reply on the subscription")
                        elif now - last_heard >= self._keepalive_interval:
                            await asyncio.wait_for(pubsub.ping(), self._deadline)
                            awaiting_since = now
                        continue
                    awaiting_since, last_heard = None, now
                    kind = _text(message.get("type", b""))
                    if kind == "subscribe":
                        self._subscribed.set()
                        delay = _FIRST_RESUBSCRIBE_DELAY
                        if blind:
                            logger.info(
                                "Redis settings store at %s: subscribed again; invalidating "
                                "everything",
                                self._location,
                            )
                            self._notify("*")
                        blind = True
                    elif kind == "message":
                        team_id = _text(message.get("data", b""))
                        if team_id:
                            self._notify(team_id)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                if self._subscribed.is_set():
                    logger.warning(
                        "Redis settings store at %s: lost the change subscription (%s); "
                        "reconnecting",
                        self._location,
                        type(exc).__name__,
                    )
                blind = True
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        pubsub.aclose(),  # type: ignore[no-untyped-call]
                        self._deadline,
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._resubscribe_interval)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
