"""Per-team response caching: the key, the opt-outs, the cached answer and two backends.

A team whose settings say ``cache_enabled`` gets identical requests answered from a cache instead
of the model. Teams never share entries: every key is derived from the plan's
``cache_namespace`` (a hash of the team id) as well as the route and the request body.

The key (:func:`cache_key`)
    ``{namespace}:{sha256(namespace, route, canonical JSON body)}``. The body must be a JSON
    object; it is canonicalised (sorted keys at every level, compact separators) after removing
    the top-level fields listed in :data:`IGNORED_FIELDS`, which identify or steer a request
    without changing its answer: ``user``, ``metadata``, ``cache`` (the opt-outs below),
    ``request_id``, ``litellm_call_id``, ``litellm_trace_id``, ``litellm_session_id`` and
    ``litellm_metadata``. ``stream`` and ``stream_options`` stay in the key: a JSON answer and an
    SSE answer are different bytes, and ``stream_options.include_usage`` adds a final usage
    chunk that a client without it may not expect. A body that is not a JSON object is not
    cacheable.

Opt-outs, per request (as in LiteLLM)
    ``Cache-Control: no-cache`` request header, or ``"cache": {"no-cache": true}`` in the body:
    do not answer from the cache (the fresh answer is still stored). ``Cache-Control: no-store``
    or ``"cache": {"no-store": true}``: do not store this answer. ``Cache-Control: max-age=N`` or
    ``"cache": {"s-maxage": N}``: accept only an answer at most N seconds old.
    ``"cache": {"ttl": N}``: keep this answer at most N seconds (it can shorten the team's TTL,
    never lengthen it).

What is stored (:class:`CachedResponse`)
    Only complete 2xx answers (the app sent its final body message, the client had not left) of
    at most the backend's ``max_entry_bytes``, without ``Set-Cookie``, without a non-identity
    ``Content-Encoding`` (the key does not cover ``Accept-Encoding``) and without
    ``Cache-Control: no-store``/``private`` from the app. Of the headers, only those in
    :data:`STORED_HEADERS` are kept; ``content-length`` is recomputed on replay. A replayed
    answer carries ``x-team-logging-cache: hit`` and an ``age`` header; a fresh answer to a
    cacheable request carries ``x-team-logging-cache: miss``. A miss is stored as the app sends
    its final body message, just before that message is forwarded: the first byte is never
    delayed, and a client that has the whole answer finds it cached when it asks again.

Backends
    :class:`MemoryResponseCache` (per process, bounded by bytes, LRU and TTL) and
    :class:`RedisResponseCache` (shared by replicas). Neither ever raises into a request: a Redis
    outage turns into misses and skipped writes, counted in ``stats()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ._capture import Message, Send
from .errors import MissingDependencyError

if TYPE_CHECKING:
    from redis.asyncio import BlockingConnectionPool, Redis

__all__ = [
    "CACHE_HEADER",
    "DEFAULT_MAX_ENTRY_BYTES",
    "IGNORED_FIELDS",
    "STORED_HEADERS",
    "CacheRequest",
    "CacheSession",
    "CachedResponse",
    "MemoryResponseCache",
    "RedisResponseCache",
    "ResponseCache",
    "cache_key",
    "open_cache_session",
    "parse_cache_request",
]

logger = logging.getLogger("team_logging_middleware.cache")

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_MAX_ENTRY_BYTES = 4 * MiB
"""The largest answer a backend stores by default (bigger answers are simply not cached)."""

CACHE_HEADER = b"x-team-logging-cache"
"""Response header saying whether a cacheable request was answered from the cache."""

IGNORED_FIELDS: frozenset[str] = frozenset(
    {
        "user",
        "metadata",
        "cache",
        "request_id",
        "litellm_call_id",
        "litellm_trace_id",
        "litellm_session_id",
        "litellm_metadata",
    }
)
"""Top-level request fields left out of the cache key: they do not change the answer."""

STORED_HEADERS: frozenset[bytes] = frozenset(
    {
        b"content-type",
        b"content-language",
        b"cache-control",
        b"x-accel-buffering",
        b"openai-model",
        b"openai-version",
    }
)
"""Response headers kept with a cached answer; every other header (cookies, request ids, rate
limit figures of the key that happened to ask first, dates) is dropped."""

_ERROR_LOG_INTERVAL = 10.0
_FAILED: Any = object()  # what a Redis call that could not be done returns


# -- the cached answer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """One stored answer: status, the safe headers, the body chunks as sent, when it was made.

    ``stream`` is true for a ``text/event-stream`` answer: it is replayed chunk by chunk, as the
    app sent it, so every SSE event arrives whole and in order. A JSON answer is replayed as one
    body message with a recomputed ``content-length``. ``created_at`` is epoch seconds (shared by
    replicas, so not a monotonic clock).
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: tuple[bytes, ...]
    stream: bool
    created_at: float

    @property
    def body_size(self) -> int:
        return sum(len(chunk) for chunk in self.body)

    def size_hint(self) -> int:
        """Bytes this entry holds in memory, roughly (payload plus per-object overhead)."""
        headers = sum(len(name) + len(value) + 64 for name, value in self.headers)
        return 256 + headers + sum(len(chunk) + 40 for chunk in self.body)

    def age(self, now: float | None = None) -> float:
        """Seconds since the answer was made (never negative: clocks of replicas may differ)."""
        current = time.time() if now is None else now
        return max(0.0, current - self.created_at)

    def asgi_messages(self, *, now: float | None = None) -> list[Message]:
        """The ASGI messages that replay this answer, marked as a cache hit."""
        headers: list[tuple[bytes, bytes]] = list(self.headers)
        headers.append((b"age", str(int(self.age(now))).encode()))
        headers.append((CACHE_HEADER, b"hit"))
        messages: list[Message] = []
        if self.stream and len(self.body) > 1:
            messages.append(
                {"type": "http.response.start", "status": self.status, "headers": headers}
            )
            last = len(self.body) - 1
            for index, chunk in enumerate(self.body):
                messages.append(
                    {"type": "http.response.body", "body": chunk, "more_body": index < last}
                )
            return messages
        body = b"".join(self.body)
        if not self.stream:
            headers.append((b"content-length", str(len(body)).encode()))
        messages.append({"type": "http.response.start", "status": self.status, "headers": headers})
        messages.append({"type": "http.response.body", "body": body, "more_body": False})
        return messages

    # -- the wire format (Redis) ------------------------------------------------------------
    #
    # b"TLMC1" + 4-byte big-endian header length + JSON header + the body chunks, concatenated.
    # The header holds status, headers (latin-1), stream flag, created_at and chunk lengths, so
    # the body bytes are stored as they are (no base64) and a truncated value is detected.

    _MAGIC = b"TLMC1"

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "s": self.status,
                "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                "t": self.stream,
                "c": self.created_at,
                "l": [len(chunk) for chunk in self.body],
            },
            separators=(",", ":"),
        ).encode()
        return b"".join((self._MAGIC, struct.pack(">I", len(header)), header, *self.body))

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedResponse:
        """Decode :meth:`to_bytes`; raises ``ValueError`` for anything else."""
        magic = cls._MAGIC
        if not data.startswith(magic) or len(data) < len(magic) + 4:
            raise ValueError("not a cached response")
        (header_len,) = struct.unpack_from(">I", data, len(magic))
        start = len(magic) + 4
        try:
            header = json.loads(data[start : start + header_len])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError("bad cached response header") from exc
        if not isinstance(header, dict):
            raise ValueError("bad cached response header")
        status, raw_headers = header.get("s"), header.get("h")
        stream, created, lengths = header.get("t"), header.get("c"), header.get("l")
        if (
            not isinstance(status, int)
            or not isinstance(stream, bool)
            or not isinstance(created, (int, float))
            or not isinstance(raw_headers, list)
            or not isinstance(lengths, list)
            or not all(isinstance(n, int) and n >= 0 for n in lengths)
        ):
            raise ValueError("bad cached response header")
        headers: list[tuple[bytes, bytes]] = []
        for pair in raw_headers:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(part, str) for part in pair)
            ):
                raise ValueError("bad cached response header")
            headers.append((pair[0].encode("latin-1"), pair[1].encode("latin-1")))
        offset = start + header_len
        if offset + sum(lengths) != len(data):
            raise ValueError("cached response body has the wrong length")
        chunks: list[bytes] = []
        for length in lengths:
            chunks.append(data[offset : offset + length])
            offset += length
        return cls(status, tuple(headers), tuple(chunks), stream, float(created))


# -- the backends' contract ---------------------------------------------------------------------


@runtime_checkable
class ResponseCache(Protocol):
    """Where cached answers live. Implementations must never raise from ``get``/``set`` for a
    backend failure (a miss, or a skipped write, counted in ``stats()``); the middleware guards
    them anyway.

    ``default_ttl`` (seconds) applies when the team sets no ``cache_ttl_seconds``;
    ``max_entry_bytes`` bounds the body of one stored answer (the middleware stops collecting a
    response once it is larger).
    """

    @property
    def default_ttl(self) -> float: ...

    @property
    def max_entry_bytes(self) -> int: ...

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class _Throttle:
    """One log line per ``interval`` seconds; the rest are counted and reported with the next."""

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float = _ERROR_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: float | None = None
        self._suppressed = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return None
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


# -- memory ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    value: CachedResponse
    expires: float
    size: int


class MemoryResponseCache:
    """A per-process response cache bounded by bytes: least recently used entries go first.

    Args:
        max_bytes: the most bytes all entries may hold together (their :meth:`size_hint`).
        default_ttl: seconds an entry lives when the team sets no TTL.
        max_entry_bytes: the largest body stored (default: 4 MiB, or ``max_bytes`` if smaller).
        timer: the clock for expiry (inject a fake one in tests).

    Expired entries are dropped when they are read or reach the LRU end. ``stats()`` counts
    hits, misses, stores, evictions (to make room), expirations and entries too large to keep.
    """

    def __init__(
        self,
        max_bytes: int = 64 * MiB,
        default_ttl: float = 300.0,
        *,
        max_entry_bytes: int | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        if default_ttl <= 0:
            raise ValueError("default_ttl must be > 0")
        entry_cap = (
            min(DEFAULT_MAX_ENTRY_BYTES, max_bytes) if max_entry_bytes is None else max_entry_bytes
        )
        if entry_cap < 0:
            raise ValueError("max_entry_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.default_ttl = float(default_ttl)
        self.max_entry_bytes = entry_cap
        self._timer = timer
        self._entries: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._evictions = 0
        self._expired = 0
        self._too_large = 0

    async def get(self, key: str) -> CachedResponse | None:
        slot = self._entries.get(key)
        if slot is None:
            self._misses += 1
            return None
        if slot.expires <= self._timer():
            self._drop(key, slot)
            self._expired += 1
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return slot.value

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        if not ttl > 0:  # also refuses NaN
            return
        size = value.size_hint() + len(key)
        if value.body_size > self.max_entry_bytes or size > self.max_bytes:
            self._too_large += 1
            return
        old = self._entries.get(key)
        if old is not None:
            self._drop(key, old)
        now = self._timer()
        while self._entries and self._bytes + size > self.max_bytes:
            oldest_key, oldest = next(iter(self._entries.items()))
            self._drop(oldest_key, oldest)
            if oldest.expires <= now:
                self._expired += 1
            else:
                self._evictions += 1
        self._entries[key] = _Slot(value, now + ttl, size)
        self._bytes += size
        self._stores += 1

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "max_entry_bytes": self.max_entry_bytes,
            "default_ttl": self.default_ttl,
            "hits": self._hits,
            "misses": self._misses,
            "stores": self._stores,
            "evictions": self._evictions,
            "expired": self._expired,
            "too_large": self._too_large,
        }

    async def aclose(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str, slot: _Slot) -> None:
        del self._entries[key]
        self._bytes -= slot.size


# -- Redis -----------------------------------------------------------------------------------------


class RedisResponseCache:
    """A response cache shared by every replica of a gateway, in Redis.

    Each entry is one Redis string ``{prefix}{key}`` written with ``SET ... PX <ttl ms>`` (Redis
    expires it), holding :meth:`CachedResponse.to_bytes`.

    Failure model: a Redis error, a timeout (``socket_timeout`` to connect and to wait for a
    reply; a whole call is cut off a little later) or an unreadable value is a miss or a skipped
    write, counted (``errors``, ``corrupt``) and logged at most every 10 s, naming the server as
    ``redis://host:port/db`` (never the URL's credentials). After a failure the cache is not
    asked again for ``retry_interval`` seconds (those lookups count as ``skipped``), so an outage
    costs each request nothing instead of a timeout; then one request probes, and the cache
    resumes as soon as Redis answers. ``stats()["available"]`` is false from a failure until a
    later call succeeds.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``.
        prefix: namespace of the Redis keys.
        socket_timeout: seconds to connect and to wait for a reply.
        max_entry_bytes: the largest body stored.
        default_ttl: seconds an entry lives when the team sets no TTL.
        max_connections: size of the connection pool (a request waits ``socket_timeout`` at most
            for a free connection).
        retry_interval: seconds to leave Redis alone after a failure.

    Needs the ``redis`` extra (``pip install "team-logging-middleware[redis]"``).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tlm:cache:",
        socket_timeout: float = 0.5,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        default_ttl: float = 300.0,
        max_connections: int = 64,
        retry_interval: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError
        except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
            raise MissingDependencyError("the Redis response cache", "redis") from exc
        from .stores.redis import redacted_redis_url

        if socket_timeout <= 0 or retry_interval < 0 or default_ttl <= 0:
            raise ValueError("socket_timeout and default_ttl must be > 0, retry_interval >= 0")
        if max_entry_bytes < 0 or max_connections < 1:
            raise ValueError("max_entry_bytes must be >= 0 and max_connections >= 1")
        self.location = redacted_redis_url(url)
        self.prefix = prefix
        self.default_ttl = float(default_ttl)
        self.max_entry_bytes = max_entry_bytes
        self._retry_interval = retry_interval
        self._timer = timer
        # Connect + one reconnect, each bounded by the socket timeout, and a little slack: a call
        # never takes longer than this, whatever the socket layer does.
        self._deadline = 2 * socket_timeout + 0.1
        self._pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # One immediate retry on a broken connection: after a Redis restart the first command
            # on a pooled connection fails and the second reconnects. No retry on a timeout.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._client: Redis = Redis(connection_pool=self._pool)
        self._down_until: float | None = None  # set while Redis is left alone after a failure
        self._probing = False
        self._throttle = _Throttle()
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._errors = 0
        self._skipped = 0
        self._corrupt = 0
        self._too_large = 0

    async def get(self, key: str) -> CachedResponse | None:
        data = await self._call(lambda: self._client.get(self.prefix + key), "reading")
        if data is _FAILED or data is None:
            self._misses += 1
            return None
        try:
            if not isinstance(data, bytes):
                raise ValueError("not bytes")
            value = CachedResponse.from_bytes(data)
        except ValueError:
            # Written by something else (or an older format): a miss; the next store replaces it.
            self._corrupt += 1
            self._misses += 1
            return None
        self._hits += 1
        return value

    async def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        if not ttl > 0:
            return
        if value.body_size > self.max_entry_bytes:
            self._too_large += 1
            return
        payload = value.to_bytes()
        milliseconds = max(1, math.ceil(ttl * 1000))
        done = await self._call(
            lambda: self._client.set(self.prefix + key, payload, px=milliseconds), "writing"
        )
        if done is not _FAILED:
            self._stores += 1

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "location": self.location,
            "prefix": self.prefix,
            "available": self._down_until is None,
            "max_entry_bytes": self.max_entry_bytes,
            "default_ttl": self.default_ttl,
            "hits": self._hits,
            "misses": self._misses,
            "stores": self._stores,
            "errors": self._errors,
            "skipped": self._skipped,
            "corrupt": self._corrupt,
            "too_large": self._too_large,
        }

    async def aclose(self) -> None:
        """Close the pooled connections (a later call reconnects). Idempotent."""
        try:
            await self._pool.disconnect()
        except Exception as exc:  # closing a broken connection must not fail a shutdown
            logger.debug("response cache: closing the Redis pool raised %s", type(exc).__name__)

    async def _call(self, operation: Callable[[], Awaitable[Any]], action: str) -> Any:
        """Run one Redis command; ``_FAILED`` (never an exception) when it could not be done."""
        probe = False
        if self._down_until is not None:
            if self._probing or self._timer() < self._down_until:
                self._skipped += 1
                return _FAILED
            # This call finds out whether Redis is back; the others keep skipping meanwhile.
            probe = self._probing = True
        try:
            result = await asyncio.wait_for(operation(), timeout=self._deadline)
        except Exception as exc:
            self._errors += 1
            self._down_until = self._timer() + self._retry_interval
            self._log_failure(action, exc)
            return _FAILED
        finally:
            if probe:
                self._probing = False
        if self._down_until is not None:
            self._down_until = None
            logger.info("response cache: Redis at %s answers again", self.location)
        return result

    def _log_failure(self, action: str, exc: BaseException) -> None:
        suppressed = self._throttle.allow()
        if suppressed is None:
            return
        # Only the exception's type: a Redis error message can quote the command's arguments.
        logger.warning(
            "response cache: Redis at %s failed while %s (%s); serving without the cache for %gs%s",
            self.location,
            action,
            type(exc).__name__,
            self._retry_interval,
            f" ({suppressed} similar errors not logged)" if suppressed else "",
        )


# -- the key and the opt-outs ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """A cacheable request: its key and what the client asked of the cache."""

    key: str
    no_read: bool = False  # Cache-Control: no-cache / cache.no-cache
    no_write: bool = False  # Cache-Control: no-store / cache.no-store
    max_age: float | None = None  # Cache-Control: max-age / cache.s-maxage
    ttl: float | None = None  # cache.ttl (only ever shortens the team's TTL)

    def accepts(self, entry: CachedResponse, *, now: float | None = None) -> bool:
        """Whether ``entry`` may answer this request (its age within ``max_age``)."""
        return self.max_age is None or entry.age(now) <= self.max_age

    def store_ttl(self, team_ttl: float) -> float:
        return team_ttl if self.ttl is None else min(self.ttl, team_ttl)


def _canonical(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or absurdly nested
        return None
    return data if isinstance(data, dict) else None


def _digest(namespace: str, route: str, data: Mapping[str, Any]) -> str | None:
    kept = {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
    try:
        canonical = json.dumps(
            kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
        )
    except (ValueError, RecursionError):
        return None
    if len(route) > 1 and route.endswith("/"):
        route = route[:-1]
    digest = hashlib.sha256()
    for part in (namespace, route, canonical):
        # Separated by NUL (not valid in any part's own encoding of a route or a namespace),
        # so ("a", "bc") and ("ab", "c") can never collide.
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return f"{namespace}:{digest.hexdigest()}"


def cache_key(namespace: str, route: str, body: bytes) -> str | None:
    """The cache key of a request body on ``route`` for the team ``namespace``, or None.

    None when the body is not a JSON object (not cacheable). Fields in :data:`IGNORED_FIELDS`
    are left out; everything else, ``stream`` and ``stream_options`` included, counts, with key
    order and whitespace not mattering.
    """
    data = _canonical(body)
    return None if data is None else _digest(namespace, route, data)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _header_directives(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for name, value in headers:
        if name.lower() != b"cache-control":
            continue
        for part in value.decode("latin-1").split(","):
            token, _, argument = part.strip().partition("=")
            token = token.strip().lower()
            if token:
                directives[token] = argument.strip().strip('"') if argument else None
    return directives


def parse_cache_request(
    namespace: str, route: str, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> CacheRequest | None:
    """The key and the client's cache directives (header and body forms), or None.

    None when the body is not a JSON object. Body directives: ``cache: {"no-cache": true,
    "no-store": true, "s-maxage": N, "ttl": N}``; header: ``Cache-Control: no-cache, no-store,
    max-age=N``. Malformed directives are ignored (never an error: the request is served).
    """
    data = _canonical(body)
    if data is None:
        return None
    key = _digest(namespace, route, data)
    if key is None:
        return None
    no_read = no_write = False
    max_age: float | None = None
    ttl: float | None = None
    directives = _header_directives(headers)
    if "no-cache" in directives:
        no_read = True
    if "no-store" in directives:
        no_write = True
    header_max_age = directives.get("max-age")
    if header_max_age is not None and header_max_age.isdigit():
        max_age = float(header_max_age)
    options = data.get("cache")
    if isinstance(options, dict):
        no_read = no_read or options.get("no-cache") is True
        no_write = no_write or options.get("no-store") is True
        body_max_age = _number(options.get("s-maxage"))
        if body_max_age is not None:
            max_age = body_max_age if max_age is None else min(max_age, body_max_age)
        ttl = _number(options.get("ttl"))
    return CacheRequest(key, no_read=no_read, no_write=no_write, max_age=max_age, ttl=ttl)


# -- one request's use of the cache (the middleware's side) ------------------------------------

ErrorHook = Callable[[str, BaseException], None]


def _should_not_store(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"set-cookie":
            return True  # an answer that sets a cookie belongs to one client
        if lowered == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return True  # the key does not cover Accept-Encoding
        if lowered == b"cache-control":
            tokens = {t.strip().split(b"=")[0].lower() for t in value.split(b",")}
            if b"no-store" in tokens or b"private" in tokens:
                return True
    return False


class _ResponseFill:
    """Wraps ``send`` on a miss: marks the answer as a miss, forwards it, keeps a bounded copy,
    and stores the copy when the app sends its final body message.

    The store happens just *before* that final message is forwarded: every earlier byte has
    already gone out (the first byte is never delayed), and once a client holds the whole
    answer, the same request sent next -- to this replica or another -- finds it in the cache.
    Stored only if the answer is 2xx, fits ``limit``, and the client had not left by then.
    """

    __slots__ = (
        "_client_gone",
        "_limit",
        "_on_complete",
        "_send",
        "chunks",
        "complete",
        "headers",
        "size",
        "status",
        "storable",
        "stream",
    )

    def __init__(
        self,
        send: Send,
        limit: int,
        on_complete: Callable[[CachedResponse], Awaitable[None]] | None,
        client_gone: Callable[[], bool],
    ) -> None:
        self._send = send
        self._limit = limit
        self._on_complete = on_complete
        self._client_gone = client_gone
        self.status = 0
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.stream = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.storable = False
        self.complete = False

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.response.start":
            original = [(bytes(n), bytes(v)) for n, v in message.get("headers", ())]
            # A new message (the app's dict is not ours to change) with the marker appended.
            marked = dict(message)
            marked["headers"] = [*original, (CACHE_HEADER, b"miss")]
            await self._send(marked)
            self.status = int(message.get("status", 0))
            kept = tuple((n.lower(), v) for n, v in original if n.lower() in STORED_HEADERS)
            self.headers = kept
            self.stream = any(
                n == b"content-type" and v.lower().startswith(b"text/event-stream") for n, v in kept
            )
            self.storable = (
                self._on_complete is not None
                and 200 <= self.status < 300
                and not message.get("trailers", False)
                and not _should_not_store(original)
            )
            return
        if message_type != "http.response.body":
            # A file sent by path, trailers, or an extension we do not know: not replayable.
            self.storable = False
            await self._send(message)
            return
        if message.get("more_body", False):
            await self._send(message)
            self._keep(message.get("body", b""))
            return
        self.complete = True
        if self.storable:
            self._keep(message.get("body", b""))
            if self.storable and not self._client_gone() and self._on_complete is not None:
                await self._on_complete(self._entry())
        await self._send(message)

    def _keep(self, body: bytes) -> None:
        if not self.storable or not body:
            return
        if self.size + len(body) > self._limit:
            # Too large to keep: stop collecting (and free what was kept).
            self.storable = False
            self.chunks = []
            return
        # bytes(): the app may reuse a bytearray once send() returned.
        self.chunks.append(bytes(body))
        self.size += len(body)

    def _entry(self) -> CachedResponse:
        return CachedResponse(
            status=self.status,
            headers=self.headers,
            body=tuple(self.chunks),
            stream=self.stream,
            created_at=time.time(),
        )


class CacheSession:
    """The cache's part of one request: the lookup before the app, the store as it finishes.

    Built by :func:`open_cache_session`. On a hit, :meth:`replay` answers in place of the app.
    On a miss, give the app :meth:`wrap_send`: it marks the answer, and stores it when the app
    sends the final body message (see :class:`_ResponseFill`). ``stored`` says whether it was.
    No method raises because of the cache: failures go to ``on_error``.
    """

    __slots__ = ("_cache", "_on_error", "_ttl", "hit", "request", "stored")

    def __init__(
        self,
        cache: ResponseCache,
        request: CacheRequest,
        ttl: float,
        on_error: ErrorHook,
        hit: CachedResponse | None = None,
    ) -> None:
        self._cache = cache
        self.request = request
        self._ttl = ttl
        self._on_error = on_error
        self.hit = hit
        self.stored = False

    async def replay(self, send: Send) -> bool:
        """Send the cached answer; False when the client went away during it."""
        assert self.hit is not None
        try:
            for message in self.hit.asgi_messages():
                await send(message)
        except OSError:
            # The client is gone (uvicorn raises ClientDisconnected, an OSError). There is no
            # app to tell; the exchange records the disconnect.
            return False
        return True

    def wrap_send(self, send: Send, client_gone: Callable[[], bool] = lambda: False) -> Send:
        """The ``send`` to give the app on a miss. ``client_gone`` is asked before storing."""
        if self.request.no_write:
            return _ResponseFill(send, 0, None, client_gone).send
        try:
            limit = int(self._cache.max_entry_bytes)
        except Exception as exc:
            self._on_error("response cache", exc)
            return send
        return _ResponseFill(send, limit, self._store, client_gone).send

    async def _store(self, entry: CachedResponse) -> None:
        try:
            await self._cache.set(self.request.key, entry, self.request.store_ttl(self._ttl))
        except Exception as exc:
            self._on_error("response cache", exc)
            return
        self.stored = True


async def open_cache_session(
    cache: ResponseCache,
    *,
    namespace: str,
    route: str,
    headers: Iterable[tuple[bytes, bytes]],
    read_body: Callable[[int], Awaitable[bytes | None]],
    max_request_bytes: int,
    ttl_seconds: float | None,
    on_error: ErrorHook,
) -> CacheSession | None:
    """Read the request body (``read_body`` replays it to the app) and look the answer up.

    None when the request is not cacheable: its body is larger than ``max_request_bytes``, the
    client left while sending it, or it is not a JSON object. A failing cache is a miss.
    """
    body = await read_body(max_request_bytes)
    if body is None:
        return None
    request = parse_cache_request(namespace, route, body, headers)
    if request is None:
        return None
    try:
        ttl = float(ttl_seconds) if ttl_seconds else float(cache.default_ttl)
    except Exception as exc:
        on_error("response cache", exc)
        return None
    hit: CachedResponse | None = None
    if not request.no_read:
        try:
            hit = await cache.get(request.key)
        except Exception as exc:
            on_error("response cache", exc)
            hit = None
        if hit is not None and not request.accepts(hit):
            hit = None
    return CacheSession(cache, request, ttl, on_error, hit)
