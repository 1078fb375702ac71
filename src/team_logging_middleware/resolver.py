"""Who is calling: the ``Caller`` value, the resolver protocol and its TTL/single-flight cache.

A *resolver* is the gateway's own async function from the ASGI scope to a :class:`Caller` (or
None for an unknown caller): it typically looks the API key up in the gateway's database.
:class:`CachedResolver` puts a cache in front of it so a logged request costs a dict lookup:

- results are cached per credential for ``ttl`` seconds, unknown callers (None) for the shorter
  ``negative_ttl`` (a key created a moment ago becomes known quickly);
- the cache key is the SHA-256 digest of the credential: the raw API key is never kept as a key of
  a long-lived dict;
- concurrent misses for one credential share *one* resolver call (single flight): a burst of
  requests with a fresh key does not stampede the key database;
- a resolver error reaches every request waiting on that call and nothing is cached, so the next
  request tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

from starlette.types import Scope

from ._types import Caller

__all__ = ["CachedResolver", "Caller", "CredentialGetter", "Resolver", "bearer_token"]

Resolver = Callable[[Scope], Awaitable[Caller | None]]
"""The gateway's lookup: ASGI scope -> :class:`Caller`, or None for an unknown caller."""

CredentialGetter = Callable[[Scope], str | None]
"""Extracts the credential that identifies a caller (the cache key) from the scope."""

_FALLBACK_HEADERS = (b"x-api-key", b"api-key")
_CREDENTIAL_HEADERS = frozenset((b"authorization", *_FALLBACK_HEADERS))


def bearer_token(scope: Scope) -> str | None:
    """The caller's API key from the request headers, or None.

    ``Authorization: Bearer <key>`` (the scheme is case-insensitive, RFC 9110 §11.1) is preferred.
    When there is no bearer token, ``x-api-key`` (Anthropic-style clients) and then ``api-key``
    (Azure OpenAI-style clients) are used, matching what LLM gateways accept. Other
    ``Authorization`` schemes (e.g. Basic) are not API keys and are ignored.
    """
    # No dict or list per call: this runs on every logged request. Only the first occurrence of
    # each fallback header counts, and an empty one defers to the next header name.
    fallback: bytes | None = None
    fallback_rank = len(_FALLBACK_HEADERS)
    seen = 0
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    for name, value in headers:
        # ASGI requires lower-cased header names. One set lookup skips every other header.
        if name not in _CREDENTIAL_HEADERS:
            continue
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                token = token.strip()
                if token:
                    return token.decode("latin-1")
        else:
            rank = _FALLBACK_HEADERS.index(name)
            if not seen & (1 << rank):
                seen |= 1 << rank
                value = value.strip()
                if value and rank < fallback_rank:
                    fallback, fallback_rank = value, rank
    if fallback is not None:
        return fallback.decode("latin-1")
    return None


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _SingleFlight(Generic[K, V]):
    """Concurrent calls for one key share one task.

    Every waiter awaits the task through :func:`asyncio.shield`, so a waiter that is cancelled
    (its client went away) does not cancel the call the other waiters share. The task's
    exception, if any, is delivered to every waiter and marked retrieved even when nobody waits.
    """

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        call = self._calls.get(key)
        # A call left over from another event loop (e.g. a closed test loop) cannot be awaited.
        if call is None or call.get_loop() is not asyncio.get_running_loop():
            call = asyncio.ensure_future(fn())
            self._calls[key] = call
            call.add_done_callback(partial(self._finished, key))
        return await asyncio.shield(call)

    def forget(self, key: K | None = None) -> None:
        """New callers start a fresh call; current waiters still get the running one's result."""
        if key is None:
            self._calls.clear()
        else:
            self._calls.pop(key, None)

    def _finished(self, key: K, call: asyncio.Future[V]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        if not call.cancelled():
            call.exception()  # retrieved: no "exception was never retrieved" if all waiters left


class _TimedLRU(Generic[K, V]):
    """A bounded map whose entries expire at their own deadline; least recently used go first.

    The request path reads it on every request, so a hit is one dict lookup, one clock call and
    a C-level ``move_to_end``; expired entries are dropped when met, and all of them by
    :meth:`expire`. Same rules as ``cachetools.TLRUCache``: an entry whose deadline is not in
    the future is not stored.
    """

    __slots__ = ("_items", "_maxsize", "_timer")

    def __init__(self, maxsize: int, timer: Callable[[], float]) -> None:
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._maxsize = maxsize
        self._timer = timer

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> Iterator[K]:
        return iter(list(self._items))

    def values(self) -> list[V]:
        return [value for _, value in self._items.values()]

    def get(self, key: K, default: Any = None) -> Any:
        entry = self._items.get(key)
        if entry is None:
            return default
        if self._timer() >= entry[0]:
            self._items.pop(key, None)
            return default
        self._items.move_to_end(key)
        return entry[1]

    def set(self, key: K, value: V, ttl: float) -> float:
        """Store ``value`` for ``ttl`` seconds; returns its deadline (not stored unless > now)."""
        now = self._timer()
        expires = now + ttl
        items = self._items
        items.pop(key, None)
        if not now < expires:
            return expires
        items[key] = (expires, value)
        while len(items) > self._maxsize:
            items.popitem(last=False)
        return expires

    def pop(self, key: K, default: Any = None) -> Any:
        entry = self._items.pop(key, None)
        return default if entry is None else entry[1]

    def clear(self) -> None:
        self._items.clear()

    def expire(self) -> None:
        now = self._timer()
        for key in [k for k, (expires, _) in self._items.items() if now >= expires]:
            del self._items[key]


_MISSING: Any = object()


class CachedResolver:
    """A TTL cache with single flight in front of a :data:`Resolver`.

    Args:
        resolver: the gateway's lookup.
        ttl: seconds a found caller is reused (0 disables caching).
        maxsize: the most credentials cached; the least recently used go first.
        negative_ttl: seconds an unknown caller (None) is remembered (0: not at all).
        credential: extracts the credential from the scope; default :func:`bearer_token`.
        timer: the clock (injectable for tests).

    A request without a credential is passed to the resolver every time and never cached: the
    resolver may recognise the caller by other means (mTLS, a session cookie, a client address),
    and there is no key under which to share its answer safely.

    Callers with the same credential share one answer: the resolver sees the scope of the first
    request of a burst. ``invalidate`` drops cached answers (e.g. after a key was revoked); a
    lookup running while it is called still answers its waiters but is not cached.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        ttl: float = 60.0,
        maxsize: int = 10_000,
        negative_ttl: float = 5.0,
        credential: CredentialGetter = bearer_token,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or negative_ttl < 0:
            raise ValueError("ttl and negative_ttl must be >= 0")
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._resolver = resolver
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._credential = credential
        self._cache: _TimedLRU[bytes, Caller | None] = _TimedLRU(maxsize, timer)
        self._flight: _SingleFlight[bytes, Caller | None] = _SingleFlight()
        # Bumped by invalidate(): a lookup started before it must not store its (old) answer.
        self._generation = 0
        self._hits = 0
        self._misses = 0
        self._errors = 0
        self._uncached = 0

    @property
    def resolver(self) -> Resolver:
        """The wrapped resolver."""
        return self._resolver

    def cached(self, scope: Scope) -> Any:
        """The cached answer for the scope's credential, or ``_MISSING`` (no await, no call).

        The request path tries this first; on ``_MISSING`` it awaits :meth:`__call__`.
        """
        credential = self._credential(scope)
        if not credential:
            return _MISSING
        cached = self._cache.get(_digest(credential), _MISSING)
        if cached is not _MISSING:
            self._hits += 1
        return cached

    async def __call__(self, scope: Scope) -> Caller | None:
        credential = self._credential(scope)
        if not credential:
            self._uncached += 1
            return await self._resolve(scope)
        key = _digest(credential)
        cached = self._cache.get(key, _MISSING)
        if cached is not _MISSING:
            self._hits += 1
            return cached  # type: ignore[no-any-return]
        self._misses += 1
        return await self._flight.do(key, partial(self._load, key, scope, self._generation))

    def invalidate(self, credential: str | None = None) -> None:
        """Forget one credential's answer, or every answer when ``credential`` is None."""
        self._generation += 1
        if credential is None:
            self._cache.clear()
            self._flight.forget()
        else:
            key = _digest(credential)
            self._cache.pop(key, None)
            self._flight.forget(key)

    def stats(self) -> dict[str, int]:
        """Counters (no credentials): hits, misses, errors, size, in-flight and uncached calls."""
        self._cache.expire()
        return {
            "hits": self._hits,
            "misses": self._misses,
            "errors": self._errors,
            "size": len(self._cache),
            "inflight": len(self._flight),
            "uncached": self._uncached,
        }

    async def _load(self, key: bytes, scope: Scope, generation: int) -> Caller | None:
        caller = await self._resolve(scope)
        if generation == self._generation:
            self._cache.set(key, caller, self._ttl if caller is not None else self._negative_ttl)
        return caller

    async def _resolve(self, scope: Scope) -> Caller | None:
        try:
            caller = await self._resolver(scope)
        except Exception:
            self._errors += 1
            raise
        if caller is not None and not isinstance(caller, Caller):
            self._errors += 1
            raise TypeError(
                f"the resolver returned {type(caller).__name__}; expected a Caller or None"
            )
        return caller


def _digest(credential: str, _sha256: Callable[[bytes], Any] = hashlib.sha256) -> bytes:
    digest: bytes = _sha256(credential.encode("utf-8", "surrogatepass")).digest()
    return digest
