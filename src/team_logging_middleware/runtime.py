"""``TeamLogging``: the one object the middleware and the admin app share.

It owns the wiring — sink registry, settings store, static config, planner, caching resolver and
dispatcher — and their lifecycle. The middleware starts and stops it from the ASGI lifespan; apps
without a lifespan use ``async with team_logging:``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._types import Caller, Plan
from .cache import MemoryResponseCache, ResponseCache
from .config import StaticConfig
from .dispatcher import Dispatcher
from .planning import Planner
from .records import Exchange
from .resolver import _MISSING, CachedResolver, Resolver
from .settings import DEFAULT_ENV_ALLOWLIST
from .sinks import default_registry
from .sinks.base import SinkRegistry
from .stores.base import SettingsStore
from .stores.memory import MemorySettingsStore

logger = logging.getLogger("team_logging_middleware")

Scope = dict[str, Any]


class TeamLogging:
    """Shared state of one gateway process: who is calling, where their logs go, and delivery.

    Args:
        resolver: async callable from the ASGI scope to a :class:`Caller` (or None for an unknown
            caller). It is wrapped in a :class:`CachedResolver` (TTL, single flight) unless it
            already is one. None: every caller is unknown (global defaults only).
        store: where API-managed team settings live; default an in-memory store. The store is
            closed on :meth:`stop` when ``own_store`` is true (the default).
        config: the static config file (path) or an already loaded :class:`StaticConfig`.
        registry: sink types; default :func:`default_registry` (jsonl, langfuse, otel,
            gcs_bucket and registered custom callbacks).
        env_allowlist: glob patterns of environment variable names that ``os.environ/`` references
            written through the admin API may name; default the config file's
            ``team_logging.env_allowlist``, else ``LANGFUSE_*``, ``OTEL_*``, ``GCS_*``.
        dispatcher_options: keyword arguments for the :class:`Dispatcher` built when none is given.
        cache: where the answers of teams with ``cache_enabled`` are kept; default a
            :class:`~team_logging_middleware.cache.MemoryResponseCache` (empty, and so free,
            until a team turns caching on). Use a
            :class:`~team_logging_middleware.cache.RedisResponseCache` to share it between
            replicas. It is closed on :meth:`stop`.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        store: SettingsStore | None = None,
        config: StaticConfig | str | os.PathLike[str] | None = None,
        registry: SinkRegistry | None = None,
        dispatcher: Dispatcher | None = None,
        planner: Planner | None = None,
        resolver_ttl: float = 60.0,
        plan_ttl: float = 30.0,
        env_allowlist: Iterable[str] | None = None,
        jsonl_dir: str | os.PathLike[str] | None = None,
        dispatcher_options: Mapping[str, Any] | None = None,
        shutdown_timeout: float = 10.0,
        own_store: bool = True,
        timer: Callable[[], float] = time.monotonic,
        cache: ResponseCache | None = None,
    ) -> None:
        self.registry = registry if registry is not None else default_registry(jsonl_dir=jsonl_dir)
        if config is None:
            self.config = StaticConfig.empty()
        elif isinstance(config, StaticConfig):
            self.config = config
        else:
            self.config = StaticConfig.load(config, self.registry)
        self.store: SettingsStore = store if store is not None else MemorySettingsStore()
        self.planner = (
            planner
            if planner is not None
            else Planner(self.store, config=self.config, ttl=plan_ttl, timer=timer)
        )
        self.resolver: CachedResolver | None
        if resolver is None or isinstance(resolver, CachedResolver):
            self.resolver = resolver
        else:
            self.resolver = CachedResolver(resolver, ttl=resolver_ttl, timer=timer)
        self.dispatcher = (
            dispatcher
            if dispatcher is not None
            else Dispatcher(self.registry, **dict(dispatcher_options or {}))
        )
        if env_allowlist is None:
            env_allowlist = self.config.env_allowlist or DEFAULT_ENV_ALLOWLIST
        self.cache: ResponseCache = cache if cache is not None else MemoryResponseCache()
        self.env_allowlist: tuple[str, ...] = tuple(env_allowlist)
        self.shutdown_timeout = shutdown_timeout
        self._own_store = own_store
        self._started = False
        self._lock = asyncio.Lock()
        self._request_path_stats: list[Callable[[], Mapping[str, int]]] = []

    # -- the request path -------------------------------------------------------------------

    async def resolve(self, scope: Scope) -> Caller | None:
        if self.resolver is None:
            return None
        return await self.resolver(scope)

    async def plan_for(self, caller: Caller | None) -> Plan:
        return await self.planner.plan_for(caller)

    def cached_decision(self, scope: Scope) -> tuple[Caller | None, Plan | None] | None:
        """What the caches already know about ``scope``'s request, without awaiting anything.

        None: the caller is not cached (await :meth:`resolve`, then :meth:`plan_for`).
        ``(caller, None)``: the caller is cached but its plan is not (await :meth:`plan_for`).
        ``(caller, plan)``: both are cached; the request awaits nothing before the app runs.
        Hits are counted by the resolver and the planner as usual, and whatever invalidates
        their caches (TTL, ``invalidate``, store changes) invalidates this answer too.
        """
        resolver = self.resolver
        if resolver is None:
            caller = None
        else:
            caller = resolver.cached(scope)
            if caller is _MISSING:
                return None
        return caller, self.planner.cached_plan(caller)

    def submit(self, exchange: Exchange) -> bool:
        return self.dispatcher.submit(exchange)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Start the store's background work (if any) and the dispatcher. Idempotent."""
        async with self._lock:
            if self._started:
                return
            start_store = getattr(self.store, "start", None)
            if start_store is not None:
                await start_store()
            await self.dispatcher.start()
            self._started = True

    async def stop(self) -> None:
        """Flush and stop delivery within ``shutdown_timeout``; close an owned store. Idempotent."""
        async with self._lock:
            if not self._started:
                return
            self._started = False
            try:
                await self.dispatcher.stop(self.shutdown_timeout)
            finally:
                try:
                    await self.cache.aclose()
                except Exception as exc:  # a cache that fails to close must not block shutdown
                    logger.warning("response cache: closing it raised %s", type(exc).__name__)
                if self._own_store:
                    await self.store.aclose()

    async def __aenter__(self) -> TeamLogging:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- introspection ------------------------------------------------------------------------

    def attach_request_path(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Let a middleware report its request-path counters (resolver errors, ...) in health."""
        self._request_path_stats.append(stats)

    def request_path_stats(self) -> dict[str, int]:
        """The request-path counters of every middleware using this runtime, added up."""
        totals: dict[str, int] = {}
        for stats in self._request_path_stats:
            for name, value in stats().items():
                totals[name] = totals.get(name, 0) + value
        return totals

    async def health(self) -> dict[str, Any]:
        """Figures for ``/health``: dispatcher, planner, resolver, cache and store; no secrets."""
        try:
            store_health = await self.store.health()
        except Exception as exc:  # a store that is down still gets a health answer
            store_health = {"reachable": False, "error": type(exc).__name__}
        return {
            "started": self._started,
            "dispatcher": self.dispatcher.stats(),
            "planner": self.planner.stats(),
            "resolver": self.resolver.stats() if self.resolver is not None else None,
            "store": store_health,
            "cache": self._cache_stats(),
            "request_path": self.request_path_stats(),
        }

    def _cache_stats(self) -> dict[str, Any]:
        try:
            return self.cache.stats()
        except Exception as exc:  # a user's cache whose stats() fails still gets an answer
            return {"error": type(exc).__name__}
