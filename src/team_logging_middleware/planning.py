"""Settings + caller -> plan (the precedence rules of the README).

The rules, each tested by its own test:

1. destinations = the union of the global defaults (unless the team's ``inherit_defaults`` is
   false), the team's entries and the key's entries. API-managed settings for a team (the store has
   them) *replace* its static-config entry entirely: callbacks and switches.
2. Every entry keeps its own vars. Entries with the same callback name but different vars are
   all kept; an exact duplicate (same target identity, same outcome) is served once, and an
   identity listed for ``success`` in one place and ``failure`` in another receives each outcome
   once. The first source wins, in the order default, config/team, key.
3. ``callback_type`` routes: ``success`` → successes, ``failure`` → failures,
   ``success_and_failure`` → both.
4. Logging disabled on the team or on the key → no destination at all, defaults included. Nothing
   overrides it. When the store cannot be read and nothing is known about the team, logging is
   treated as disabled: a team whose switch we could not read is never sent anything.
5. ``message_logging``: the stricter of team and key (``metadata_only`` beats ``full``).
6. ``cache_enabled`` / ``cache_ttl_seconds`` come from the team's settings; ``cache_namespace`` is a
   stable hash of the team id, so teams never share cache entries.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from cachetools import LRUCache, TTLCache

from ._types import NO_LOGGING, Caller, Destination, DestinationSource, Plan
from .config import StaticConfig
from .errors import StoreUnavailableError
from .resolver import _SingleFlight, _TimedLRU
from .settings import CallbackSpec, MessageLogging, TeamSettings
from .stores.base import SettingsStore

__all__ = ["NO_LOGGING", "Destination", "Plan", "Planner"]

logger = logging.getLogger("team_logging_middleware.planning")

_ViewState = Literal["fresh", "stale", "failsafe"]
# What a key contributes to a plan, exactly (names, types and every var): equal fingerprints give
# equal plans. Built from the values themselves rather than a digest, so it cannot collide.
_KeyFingerprint = tuple[
    bool, "MessageLogging | None", tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]
]

_STORE_LOG_INTERVAL = 60.0


@dataclass(slots=True)
class _TeamView:
    """What is known about one team's settings, and the plans built from it (one per key shape)."""

    settings: TeamSettings | None  # the effective settings (store, else config); None: neither
    source: DestinationSource | None  # "team" (store) or "config"
    state: _ViewState
    plans: LRUCache[_KeyFingerprint, Plan] = field(default_factory=lambda: LRUCache(256))
    # Until when (the planner's clock) the view may be served; set when it is cached.
    expires_at: float = 0.0


class Planner:
    """Turns a :class:`Caller` into the :class:`Plan` for its request, with a TTL cache.

    Args:
        store: the API-managed settings. The planner subscribes to its changes, so an admin write
            invalidates the team's cached plans at once.
        config: the static config file (global defaults and per-team entries).
        ttl: seconds a team's settings (and the plans built from them) are reused; 0 disables
            caching.
        maxsize: the most teams whose settings are cached (least recently used go first).
        timer: the clock (injectable for tests).
        log_unknown_callers: what a request with no caller (the resolver returned None) gets:
            True, the global defaults; False, nothing. None (default) takes the config's
            ``team_logging.log_unknown_callers`` (itself true by default).
        retry_interval: while the store is failing, how often a team's settings are retried;
            between tries the degraded (stale or fail-safe) plan is served from the cache.
        max_plans_per_team: plans cached per team, one per distinct key shape (key entries and
            switches); most keys have none, so they share one plan.

    When the store fails (any exception) while a team's settings are refreshed, the last
    settings read successfully are used (counted as ``stale_served``). With none, the team is
    planned with logging disabled (``failsafe_served``): a record is never sent for a team whose
    disabled switch could not be read. Store errors are logged at most once per team per minute,
    with the error's type only (its message could carry a connection URL with a password).
    An invalidation also forgets the team's last known settings: they are known to be outdated.
    """

    def __init__(
        self,
        store: SettingsStore,
        *,
        config: StaticConfig | None = None,
        ttl: float = 30.0,
        maxsize: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
        log_unknown_callers: bool | None = None,
        retry_interval: float = 1.0,
        max_plans_per_team: int = 256,
    ) -> None:
        if ttl < 0 or retry_interval < 0:
            raise ValueError("ttl and retry_interval must be >= 0")
        if maxsize < 1 or max_plans_per_team < 1:
            raise ValueError("maxsize and max_plans_per_team must be >= 1")
        self._store = store
        self._config = config if config is not None else StaticConfig.empty()
        self._ttl = ttl
        self._retry_interval = min(retry_interval, ttl)
        self._max_plans = max_plans_per_team
        self._maxsize = maxsize
        self._timer = timer
        self._views: _TimedLRU[str, _TeamView] = _TimedLRU(maxsize, timer)
        # The request path's shortcut: the plan last served to a Caller *object* (resolvers
        # cache their Callers, so a key's requests bring the same object back), with the view it
        # came from and the generation it was built in. Keyed by id(); the entry holds the
        # Caller itself, so the id cannot be reused while the entry exists. Valid while the
        # view has not expired and no invalidation happened since.
        self._recent: dict[int, tuple[Caller, Plan, _TeamView, int]] = {}
        self._last_known: LRUCache[str, _TeamView] = LRUCache(maxsize)
        self._logged: TTLCache[str, bool] = TTLCache(1024, _STORE_LOG_INTERVAL, timer=timer)
        self._flight: _SingleFlight[str, _TeamView] = _SingleFlight()
        # Store listeners may run on another thread (a store's subscriber thread): every cache
        # access is a short critical section, never held across an await.
        self._lock = threading.Lock()
        self._generation = 0
        self._no_team = _TeamView(
            None, None, "fresh", LRUCache(max_plans_per_team), expires_at=float("inf")
        )
        unknown = self._config.log_unknown_callers
        if log_unknown_callers is not None:
            unknown = log_unknown_callers
        self._unknown_plan = self._build(self._no_team, None) if unknown else NO_LOGGING
        self._hits = 0
        self._misses = 0
        self._stale_served = 0
        self._failsafe_served = 0
        self._store_errors = 0
        store.subscribe(self.invalidate)

    @property
    def config(self) -> StaticConfig:
        return self._config

    def cached_plan(self, caller: Caller | None) -> Plan | None:
        """The plan for ``caller`` when it is known without reading the store, else None.

        Synchronous and allocation-free on a hit: the request path tries it before awaiting
        :meth:`plan_for`. A hit is counted like one of :meth:`plan_for`.
        """
        if caller is None:
            self._hits += 1
            return self._unknown_plan
        entry = self._recent.get(id(caller))
        if (
            entry is None
            or entry[0] is not caller
            or entry[3] != self._generation
            or self._timer() >= entry[2].expires_at
        ):
            return None
        self._hits += 1
        if entry[2].state != "fresh":
            self._count_degraded(entry[2])
        return entry[1]

    async def plan_for(self, caller: Caller | None) -> Plan:
        """The plan for a request made by ``caller`` (None: an unknown caller)."""
        plan = self.cached_plan(caller)
        if plan is not None:
            return plan
        assert caller is not None
        generation = self._generation
        fingerprint = _fingerprint(caller)
        team_id = caller.team_id
        with self._lock:
            view = self._no_team if team_id is None else self._views.get(team_id)
            plan = None if view is None else view.plans.get(fingerprint)
        if view is None:
            assert team_id is not None
            view = await self._flight.do(team_id, self._fetcher(team_id))
        if plan is None:
            self._misses += 1
            plan = self._build(view, caller)
            with self._lock:
                view.plans[fingerprint] = plan
        else:
            self._hits += 1
        self._count_degraded(view)
        recent = self._recent
        if len(recent) >= self._maxsize:
            # The oldest entry (it is only a shortcut). pop with a default: a store listener on
            # another thread may clear the dict between the two steps.
            recent.pop(next(iter(recent), None), None)  # type: ignore[arg-type]
        recent[id(caller)] = (caller, plan, view, generation)
        return plan

    def _count_degraded(self, view: _TeamView) -> None:
        state = view.state
        if state == "stale":
            self._stale_served += 1
        elif state == "failsafe":
            self._failsafe_served += 1

    def invalidate(self, team_id: str | None = None) -> None:
        """Forget a team's cached settings and plans (None or ``"*"``: every team).

        Safe to call from any thread; this is the listener the planner subscribes to the store.
        """
        with self._lock:
            self._generation += 1
            self._recent.clear()
            if team_id is None or team_id == "*":
                self._views.clear()
                self._last_known.clear()
                self._flight.forget()
                self._no_team.plans.clear()
            else:
                self._views.pop(team_id, None)
                self._last_known.pop(team_id, None)
                self._flight.forget(team_id)

    async def effective_destinations(self, team_id: str) -> list[dict[str, Any]]:
        """What a request of the team (with a key that adds nothing) is sent to, for the admin GET.

        Each destination is ``{callback_name, callback_type, callback_vars, source}`` with secret
        vars masked; an empty list when the team's logging is disabled. Reads the store directly
        (no cache, no stale answer): raises :class:`StoreUnavailableError` when it cannot.
        """
        try:
            stored = await self._store.get_team(team_id)
        except StoreUnavailableError:
            raise
        except Exception as exc:
            raise StoreUnavailableError(
                f"the settings store failed ({type(exc).__name__})"
            ) from None
        plan = self._build(self._view_of(team_id, stored), Caller(team_id=team_id))
        grouped: dict[tuple[str, str], tuple[Destination, set[bool]]] = {}
        for outcome, destinations in ((True, plan.success), (False, plan.failure)):
            for destination in destinations:
                entry = grouped.setdefault(
                    (destination.identity, destination.source), (destination, set())
                )
                entry[1].add(outcome)
        out: list[dict[str, Any]] = []
        for destination, outcomes in grouped.values():
            item = destination.spec.masked()
            if len(outcomes) == 2:
                item["callback_type"] = "success_and_failure"
            else:
                item["callback_type"] = "success" if True in outcomes else "failure"
            item["source"] = destination.source
            out.append(item)
        return out

    def stats(self) -> dict[str, int]:
        """Counters (no settings values): hits, misses, stale/fail-safe plans served, store
        errors, cached plans (``size``), cached teams and store reads in flight."""
        with self._lock:
            self._views.expire()
            views = list(self._views.values())
            size = sum(len(v.plans) for v in views) + len(self._no_team.plans)
        return {
            "hits": self._hits,
            "misses": self._misses,
            "stale_served": self._stale_served,
            "failsafe_served": self._failsafe_served,
            "store_errors": self._store_errors,
            "size": size,
            "teams": len(views),
            "inflight": len(self._flight),
        }

    # -- reading a team's settings ------------------------------------------------------------

    def _fetcher(self, team_id: str) -> Callable[[], Awaitable[_TeamView]]:
        generation = self._generation

        async def fetch() -> _TeamView:
            try:
                stored = await self._store.get_team(team_id)
            except Exception as exc:
                self._store_errors += 1
                view = self._degraded(team_id, exc)
                fresh = False
            else:
                view = self._view_of(team_id, stored)
                fresh = True
            with self._lock:
                # A read that started before an invalidation may hold outdated settings: it
                # answers the requests that waited for it, but is not remembered.
                if generation == self._generation:
                    ttl = self._ttl if view.state == "fresh" else self._retry_interval
                    view.expires_at = self._views.set(team_id, view, ttl)
                    if fresh:
                        self._last_known[team_id] = view
            return view

        return fetch

    def _view_of(self, team_id: str, stored: TeamSettings | None) -> _TeamView:
        if stored is not None:
            return _TeamView(stored, "team", "fresh", LRUCache(self._max_plans))
        configured = self._config.teams.get(team_id)
        source: DestinationSource | None = "config" if configured is not None else None
        return _TeamView(configured, source, "fresh", LRUCache(self._max_plans))

    def _degraded(self, team_id: str, exc: Exception) -> _TeamView:
        with self._lock:
            last = self._last_known.get(team_id)
            first_in_interval = team_id not in self._logged
            if first_in_interval:
                self._logged[team_id] = True
        if last is not None:
            view = _TeamView(last.settings, last.source, "stale", LRUCache(self._max_plans))
            outcome = "serving its last known settings"
        else:
            view = _TeamView(None, None, "failsafe", LRUCache(self._max_plans))
            outcome = "logging is disabled for it until the store answers"
        if first_in_interval:
            logger.warning(
                "settings store unavailable (%s) while reading team %r; %s",
                type(exc).__name__,
                team_id,
                outcome,
            )
        return view

    # -- the rules ----------------------------------------------------------------------------

    def _build(self, view: _TeamView, caller: Caller | None) -> Plan:
        team_id = caller.team_id if caller is not None else None
        settings = view.settings
        namespace = _cache_namespace(team_id)
        if view.state == "failsafe":
            return Plan(team_id=team_id, logging_enabled=False, cache_namespace=namespace)

        team_mode: MessageLogging = settings.message_logging if settings is not None else "full"
        key_mode = caller.key_message_logging if caller is not None else None
        switches: dict[str, Any] = {
            "team_id": team_id,
            "cache_enabled": settings.cache_enabled if settings is not None else False,
            "cache_ttl_seconds": settings.cache_ttl_seconds if settings is not None else None,
            "message_logging": _stricter(team_mode, key_mode),
            "cache_namespace": namespace,
        }
        team_disabled = settings is not None and not settings.logging_enabled
        key_disabled = caller is not None and not caller.key_logging_enabled
        if team_disabled or key_disabled:
            return Plan(logging_enabled=False, **switches)

        entries: list[tuple[CallbackSpec, DestinationSource]] = []
        if settings is None or settings.inherit_defaults:
            entries.extend((spec, "default") for spec in self._config.defaults)
        if settings is not None and view.source is not None:
            source = view.source
            entries.extend((spec, source) for spec in settings.callbacks)
        if caller is not None:
            entries.extend((spec, "key") for spec in caller.key_logging)
        success, failure = _route(entries)
        return Plan(logging_enabled=True, success=success, failure=failure, **switches)


def _route(
    entries: Iterable[tuple[CallbackSpec, DestinationSource]],
) -> tuple[tuple[Destination, ...], tuple[Destination, ...]]:
    """Rules 2 and 3: route by callback_type; each identity receives each outcome once."""
    success: list[Destination] = []
    failure: list[Destination] = []
    seen_success: set[str] = set()
    seen_failure: set[str] = set()
    for spec, source in entries:
        identity = spec.identity()
        to_success = spec.receives(True) and identity not in seen_success
        to_failure = spec.receives(False) and identity not in seen_failure
        if not (to_success or to_failure):
            continue
        destination = Destination(spec=spec, source=source, identity=identity)
        if to_success:
            seen_success.add(identity)
            success.append(destination)
        if to_failure:
            seen_failure.add(identity)
            failure.append(destination)
    return tuple(success), tuple(failure)


def _stricter(team: MessageLogging, key: MessageLogging | None) -> MessageLogging:
    return "metadata_only" if "metadata_only" in (team, key) else "full"


def _cache_namespace(team_id: str | None) -> str:
    if team_id is None:
        return ""
    return hashlib.sha256(
        b"team-logging-cache\0" + team_id.encode("utf-8", "surrogatepass")
    ).hexdigest()[:32]


def _fingerprint(caller: Caller) -> _KeyFingerprint:
    return (
        caller.key_logging_enabled,
        caller.key_message_logging,
        tuple(
            (spec.callback_name, spec.callback_type, tuple(sorted(spec.callback_vars.items())))
            for spec in caller.key_logging
        ),
    )
