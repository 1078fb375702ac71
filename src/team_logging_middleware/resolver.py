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
from collections.abc import Awaitable, Callable, Hashable, Iterable
from functools import partial
from typing import Any, Generic, TypeVar

from cachetools import TLRUCache
from starlette.types import Scope

from ._types import Caller

__all__ = ["CachedResolver", "Caller", "CredentialGetter", "Resolver", "bearer_token"]

Resolver = Callable[[Scope], Awaitable[Caller | None]]
"""The gateway's lookup: ASGI scope -> :class:`Caller`, or None for an unknown caller."""

CredentialGetter = Callable[[Scope], str | None]
"""Extracts the credential that identifies a caller (the cache key) from the scope."""

_FALLBACK_HEADERS = (b"x-api-key", b"api-key")


def bearer_token(scope: Scope) -> str | None:
    """The caller's API key from the request headers, or None.

    ``Authorization: Bearer <key>`` (the scheme is case-insensitive, RFC 9110 §11.1) is preferred.
    When there is no bearer token, ``x-api-key`` (Anthropic-style clients) and then ``api-key``
    (Azure OpenAI-style clients) are used, matching what LLM gateways accept. Other
    ``Authorization`` schemes (e.g. Basic) are not API keys and are ignored.
    """
    fallbacks: dict[bytes, bytes] = {}
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    for name, value in headers:
        # ASGI requires lower-cased header names.
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                token = token.strip()
                if token:
                    return token.decode("latin-1")
        elif name in _FALLBACK_HEADERS and name not in fallbacks:
            fallbacks[name] = value
    for name in _FALLBACK_HEADERS:
        token = fallbacks.get(name, b"").strip()
        if token:
            return token.decode("latin-1")
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
        self._cache: TLRUCache[bytes, Caller | None] = TLRUCache(maxsize, self._ttu, timer=timer)
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
            self._cache[key] = caller
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

    def _ttu(self, key: bytes, value: Caller | None, now: float) -> float:
        return now + (self._ttl if value is not None else self._negative_ttl)


def _digest(credential: str) -> bytes:
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
