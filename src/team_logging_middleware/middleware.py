"""``TeamLoggingMiddleware``: the pure-ASGI request path.

Per request on a logged route it asks the runtime who is calling and where their logs go, shows
that decision to the app in ``scope["state"]["team_logging"]``, and — only when the plan logs or
caches anything — wraps ``receive``/``send`` with an :class:`~._capture.ExchangeRecorder`. In
``finally`` the raw exchange goes to ``runtime.submit()`` (synchronous, non-blocking); the app's
own exception is re-raised unchanged. Nothing is parsed on the request path: decoding happens in
the dispatcher.

Lifespan messages are observed, not altered: the runtime starts when the server sends
``lifespan.startup`` (before the app sees it) and stops — flushing — once the app has answered
``lifespan.shutdown.complete`` (before the server sees that). If the runtime cannot start, the
server is told ``lifespan.startup.failed`` and the app's startup does not run.

Response caching (a team's ``cache_enabled``): for a POST on a logged route the middleware reads
the request body itself (up to ``max_cache_request_bytes``) to compute the cache key, then replays
the very same messages to the app. A hit is answered from the runtime's ``cache`` without calling
the app and is submitted with ``cache_hit=True`` (logged like any request, per the plan); a miss
calls the app, marks its answer ``x-team-logging-cache: miss`` and stores it as the app sends the
final body message (before forwarding it, so the next identical request finds it). See
:mod:`~.cache` for the key, the opt-outs and what is stored.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from time import perf_counter
from typing import Any, Protocol, runtime_checkable

from ._capture import ExchangeRecorder, Message, Receive, Send, describe_error
from ._types import NO_LOGGING, Caller, Plan
from .cache import CacheSession, open_cache_session
from .errors import TeamLoggingError
from .records import Exchange

__all__ = [
    "DEFAULT_ROUTES",
    "RequestPathStats",
    "TeamLoggingMiddleware",
    "TeamLoggingRuntime",
]

logger = logging.getLogger("team_logging_middleware")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RoutePredicate = Callable[[str], bool]

DEFAULT_ROUTES: tuple[str, ...] = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/v1/embeddings",
    "/embeddings",
    "/v1/responses",
    "/responses",
)
"""The OpenAI-compatible routes logged by default (exact match, one trailing slash tolerated)."""

_REQUEST_ID_LIMIT = 200  # a client-supplied x-request-id is kept only when it is this short
_ERROR_LOG_INTERVAL = 10.0  # seconds between two log lines about the same failing plugin


@runtime_checkable
class TeamLoggingRuntime(Protocol):
    """What the middleware needs from the shared runtime (:class:`~.runtime.TeamLogging`).

    ``resolve`` and ``plan_for`` may raise; the middleware contains it. ``submit`` must be
    synchronous and non-blocking (False when the exchange was not accepted). ``start`` and
    ``stop`` must be idempotent.
    """

    async def resolve(self, scope: Any) -> Caller | None: ...

    async def plan_for(self, caller: Caller | None) -> Plan: ...

    def submit(self, exchange: Exchange) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class RequestPathStats:
    """Counters of what went wrong on the request path (no secrets; read with :meth:`as_dict`).

    ``resolver_errors``/``plan_errors``: the resolver or the planner raised (the request went on
    unlogged, or was refused with 503 when ``fail_closed``). ``submit_errors``: ``submit`` raised.
    ``submit_rejected``: ``submit`` returned False (the dispatcher counts why). ``capture_errors``:
    building the exchange failed. ``fail_closed_rejections``: requests answered 503.
    ``cache_errors``: the response cache raised (the request was served without it).
    """

    __slots__ = (
        "cache_errors",
        "capture_errors",
        "fail_closed_rejections",
        "plan_errors",
        "resolver_errors",
        "submit_errors",
        "submit_rejected",
    )

    def __init__(self) -> None:
        self.resolver_errors = 0
        self.plan_errors = 0
        self.submit_errors = 0
        self.submit_rejected = 0
        self.capture_errors = 0
        self.fail_closed_rejections = 0
        self.cache_errors = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Throttle:
    """Lets one log line per kind through every ``interval`` seconds, counting the rest."""

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        """None to stay quiet; else how many lines of this kind were suppressed since the last."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._suppressed.pop(kind, 0)


def _normalize_route(path: str) -> str:
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def _route_path(scope: Scope) -> str:
    """The path relative to where the app is mounted (Starlette's ``get_route_path`` rule)."""
    path: str = scope["path"]
    root_path: str | None = scope.get("root_path")
    if not root_path or not path.startswith(root_path):
        return path
    if len(path) == len(root_path):
        return "/"
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


def _route_matcher(routes: frozenset[str]) -> RoutePredicate:
    def is_logged(path: str) -> bool:
        if path in routes:
            return True
        return len(path) > 1 and path[-1] == "/" and path[:-1] in routes

    return is_logged


# Process-unique request ids without the cost of uuid4 per request: a random prefix chosen at
# import plus a counter (itertools.count is atomic under the GIL).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


def _request_meta(scope: Scope) -> tuple[str | None, str]:
    """The client's ``x-request-id`` (when short enough) and the request content type."""
    request_id: str | None = None
    content_type = ""
    for name, value in scope.get("headers", ()):
        lowered = name.lower()
        if lowered == b"x-request-id":
            if 0 < len(value) <= _REQUEST_ID_LIMIT:
                request_id = value.decode("latin-1")
        elif lowered == b"content-type":
            content_type = value.decode("latin-1")
    return request_id, content_type


_LIFESPAN_ENDINGS = frozenset(
    {"lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed"}
)


def _safe_reason(exc: BaseException) -> str:
    """An error's type, plus its message only for this package's own (secret-free) errors."""
    if isinstance(exc, TeamLoggingError):
        return describe_error(exc)
    return type(exc).__name__


_FAIL_CLOSED_BODY = json.dumps(
    {
        "error": {
            "message": "The logging policy for this request could not be determined; "
            "the request was not processed. Try again later.",
            "type": "team_logging_unavailable",
            "param": None,
        }
    }
).encode()


class TeamLoggingMiddleware:
    """Per-team and per-key logging for an ASGI LLM gateway, as a pure ASGI middleware.

    Wrap an app: ``app = TeamLoggingMiddleware(app, team_logging=tl)``, or with Starlette /
    FastAPI ``app.add_middleware(TeamLoggingMiddleware, team_logging=tl)``. Without
    ``team_logging`` a :class:`~.runtime.TeamLogging` is built from ``resolver``, ``store``,
    ``config`` and ``runtime_kwargs`` and exposed as :attr:`team_logging` (pass your own to share
    it with the admin app).

    Only ``http`` requests whose path is in ``routes`` are considered (exact match after removing
    the mount's ``root_path``, one trailing slash tolerated; ``routes`` may also be a predicate on
    that path). Everything else — other paths, websockets, unknown scope types — reaches the app
    untouched.

    Trust and failure policy: the resolver, the planner and ``submit`` are the user's and the
    runtime's code; whatever they raise is counted in :attr:`stats`, logged without its message
    (it may hold credentials), and never changes the app's response. When the caller cannot be
    resolved the request proceeds without logging — or, with ``fail_closed=True``, is refused
    with a 503 JSON error before the app runs.

    Response caching uses the runtime's ``cache`` attribute (a
    :class:`~.cache.ResponseCache`; :class:`~.runtime.TeamLogging` always has one) for teams
    whose plan has ``cache_enabled``; a runtime without it serves every request from the app.
    ``max_cache_request_bytes`` bounds the request body read ahead for a cache lookup; a larger
    request is passed to the app (replayed, then live) and not cached. A failing cache is never
    a failing request: it is counted in :attr:`stats` (``cache_errors``) and treated as a miss.

    The middleware is also an async context manager (``async with mw:``) that starts and stops
    the runtime, for servers that do not run the ASGI lifespan.
    """

    __slots__ = (
        "_decide",
        "_has_started",
        "_is_logged",
        "_routes",
        "_throttle",
        "_warned_not_started",
        "app",
        "fail_closed",
        "max_cache_request_bytes",
        "max_request_bytes",
        "max_response_bytes",
        "stats",
        "team_logging",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        team_logging: TeamLoggingRuntime | None = None,
        resolver: Callable[[Any], Awaitable[Caller | None]] | None = None,
        store: Any = None,
        config: Any = None,
        routes: Iterable[str] | RoutePredicate = DEFAULT_ROUTES,
        fail_closed: bool = False,
        max_request_bytes: int = 256 * 1024,
        max_response_bytes: int = 1024 * 1024,
        max_cache_request_bytes: int = 1024 * 1024,
        **runtime_kwargs: Any,
    ) -> None:
        if min(max_request_bytes, max_response_bytes, max_cache_request_bytes) < 0:
            raise ValueError(
                "max_request_bytes, max_response_bytes and max_cache_request_bytes must be >= 0"
            )
        if team_logging is None:
            # Imported here so that the request path of a user-supplied runtime never pays for
            # (or depends on) the default wiring.
            from .runtime import TeamLogging

            team_logging = TeamLogging(resolver, store=store, config=config, **runtime_kwargs)
        elif resolver is not None or store is not None or config is not None or runtime_kwargs:
            raise TypeError(
                "pass either team_logging or the arguments to build one "
                "(resolver, store, config, ...), not both"
            )
        self.app = app
        self.team_logging: TeamLoggingRuntime = team_logging
        self.fail_closed = fail_closed
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.max_cache_request_bytes = max_cache_request_bytes
        self.stats = RequestPathStats()
        # Resolver/planner/submit failures are counted here; /health shows them via the runtime.
        attach = getattr(team_logging, "attach_request_path", None)
        if attach is not None:
            attach(self.stats.as_dict)
        # The runtime's synchronous shortcut (both answers cached: nothing to await), if any.
        self._decide: Callable[[Scope], tuple[Caller | None, Plan | None] | None] | None = getattr(
            team_logging, "cached_decision", None
        )
        self._routes: frozenset[str] | None = None
        if callable(routes):
            self._is_logged: RoutePredicate = routes
        else:
            if isinstance(routes, str):
                raise TypeError("routes must be an iterable of paths, not a single string")
            self._routes = frozenset(_normalize_route(r) for r in routes)
            self._is_logged = _route_matcher(self._routes)
        self._throttle = _Throttle(_ERROR_LOG_INTERVAL)
        self._has_started = False
        self._warned_not_started = False

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http":
            if scope_type == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        routes = self._routes
        if routes is not None and not scope.get("root_path"):
            # The default route table, unmounted: the same rule as _route_matcher, inlined.
            path: str = scope["path"]
            logged = path in routes or (len(path) > 1 and path[-1] == "/" and path[:-1] in routes)
        else:
            logged = self._is_logged(_route_path(scope))
        if not logged:
            await self.app(scope, receive, send)
            return

        decided = None
        decide = self._decide
        if decide is not None:
            try:
                decided = decide(scope)
            except Exception:
                decided = None  # the awaited path below meets the error again, and counts it
        caller, cached_plan = decided if decided is not None else (None, None)
        if cached_plan is not None:
            # Both answers were cached: nothing was awaited, so the clock starts below, and
            # only for a request that is captured (0.0: not started yet).
            plan = cached_plan
            start_time = start_perf = 0.0
        else:
            start_time = time.time()
            start_perf = perf_counter()
            outcome = await self._resolve_and_plan(scope, send, decided)
            if outcome is None:
                return  # refused (fail_closed)
            caller, plan = outcome

        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["team_logging"] = plan.public()

        if not plan.active:
            await self.app(scope, receive, send)
            return

        if not start_perf:
            start_time = time.time()
            start_perf = perf_counter()
        if not self._warned_not_started:
            self._check_started()
        recorder = ExchangeRecorder(receive, send, self.max_request_bytes, self.max_response_bytes)
        session: CacheSession | None = None
        if plan.cache_enabled and scope.get("method") == "POST":
            session = await self._open_cache(scope, recorder, plan)
        exc_seen: BaseException | None = None
        cache_hit = False
        try:
            if session is None:
                await self.app(scope, recorder.receive, recorder.send)
            elif session.hit is not None:
                # Answered from the cache: the app never runs (it would call the model).
                cache_hit = True
                await session.replay(recorder.send)
                return
            else:
                send_and_fill = session.wrap_send(
                    recorder.send, lambda: recorder.disconnected or recorder.send_failed
                )
                await self.app(scope, recorder.receive, send_and_fill)
        except BaseException as exc:
            exc_seen = exc
            raise
        finally:
            self._submit(recorder, scope, start_time, start_perf, plan, caller, exc_seen, cache_hit)

    async def _resolve_and_plan(
        self, scope: Scope, send: Send, decided: tuple[Caller | None, Plan | None] | None
    ) -> tuple[Caller | None, Plan] | None:
        """Ask the runtime who is calling and what their plan is; None when refused with 503.

        ``decided``: what the runtime's caches already knew (a caller without its plan), if any.
        """
        runtime = self.team_logging
        caller: Caller | None = None
        try:
            caller = decided[0] if decided is not None else await runtime.resolve(scope)
        except Exception as exc:
            self.stats.resolver_errors += 1
            self._log_plugin_error("resolver", exc)
            if self.fail_closed:
                await self._refuse(send)
                return None
            return None, NO_LOGGING
        try:
            return caller, await runtime.plan_for(caller)
        except Exception as exc:
            self.stats.plan_errors += 1
            self._log_plugin_error("planner", exc)
            if self.fail_closed:
                await self._refuse(send)
                return None
            return caller, NO_LOGGING

    async def _open_cache(
        self, scope: Scope, recorder: ExchangeRecorder, plan: Plan
    ) -> CacheSession | None:
        """Read the body ahead (replayed to the app) and look it up; None: no caching."""
        cache = getattr(self.team_logging, "cache", None)
        if cache is None:
            return None
        try:
            return await open_cache_session(
                cache,
                namespace=plan.cache_namespace,
                route=_route_path(scope),
                headers=scope.get("headers", ()),
                read_body=recorder.read_request_body,
                max_request_bytes=self.max_cache_request_bytes,
                ttl_seconds=plan.cache_ttl_seconds,
                on_error=self._cache_error,
            )
        except Exception as exc:
            self._cache_error("response cache", exc)
            return None

    def _cache_error(self, where: str, exc: BaseException) -> None:
        self.stats.cache_errors += 1
        self._log_plugin_error(where, exc)

    def _submit(
        self,
        recorder: ExchangeRecorder,
        scope: Scope,
        start_time: float,
        start_perf: float,
        plan: Plan,
        caller: Caller | None,
        exc: BaseException | None,
        cache_hit: bool = False,
    ) -> None:
        """Build the exchange and hand it over; contains every error (runs inside ``finally``)."""
        try:
            request_id, content_type = _request_meta(scope)
            exchange = recorder.to_exchange(
                request_id=request_id or _new_request_id(),
                method=scope.get("method", ""),
                path=scope.get("path", ""),
                start_time=start_time,
                start_perf=start_perf,
                plan=plan,
                caller=caller,
                request_content_type=content_type,
                exc=exc,
                cache_hit=cache_hit,
            )
        except Exception as err:
            self.stats.capture_errors += 1
            self._log_plugin_error("capture", err)
            return
        try:
            accepted = self.team_logging.submit(exchange)
        except Exception as err:
            self.stats.submit_errors += 1
            self._log_plugin_error("submit", err)
            return
        if not accepted:
            self.stats.submit_rejected += 1

    async def _refuse(self, send: Send) -> None:
        self.stats.fail_closed_rejections += 1
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_FAIL_CLOSED_BODY)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _FAIL_CLOSED_BODY})

    def _log_plugin_error(self, where: str, exc: BaseException) -> None:
        # Only the exception type: a resolver's or store's message may quote a credential.
        suppressed = self._throttle.allow(where)
        if suppressed is None:
            return
        if where in ("resolver", "planner"):
            effect = "the request was refused (503)" if self.fail_closed else "request not logged"
        else:
            effect = "the response is unaffected"
        logger.warning(
            "team logging: the %s raised %s; %s%s",
            where,
            type(exc).__name__,
            effect,
            f" ({suppressed} similar errors not logged)" if suppressed else "",
        )

    def _check_started(self) -> None:
        started = getattr(self.team_logging, "started", None)
        if started is False and not self._has_started:
            logger.warning(
                "team logging: requests are being captured but the runtime was never started; "
                "run the server with the ASGI lifespan or use `async with middleware:`"
            )
        self._warned_not_started = True

    # -- lifecycle ----------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The server's first message is read here and replayed to the app unchanged, so the
        # runtime is running before the app's own startup code (which may already serve
        # logged traffic) — and it starts even for an app that does not speak the lifespan
        # protocol (it raises, as before, and uvicorn's "auto" mode carries on without it).
        first = await receive()
        if first["type"] == "lifespan.startup":
            try:
                await self.start()
            except Exception as exc:
                # Report the failure to the server ourselves: left to propagate through the
                # app, uvicorn's default "auto" mode would mistake it for an app without
                # lifespan support and run with neither the runtime nor the app's startup.
                reason = _safe_reason(exc)
                logger.error("team logging: the runtime failed to start: %s", reason)
                await send(
                    {
                        "type": "lifespan.startup.failed",
                        "message": f"team logging failed to start: {reason}",
                    }
                )
                return
        pending: Message | None = first

        async def lifespan_receive() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()

        async def lifespan_send(message: Message) -> None:
            if message["type"] in _LIFESPAN_ENDINGS:
                # Flush after the app has finished its own shutdown (its last requests are in),
                # before the server is told it may exit; a failed app startup releases the
                # runtime too.
                try:
                    await self.stop()
                except Exception as exc:
                    self._log_plugin_error("runtime shutdown", exc)
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

    async def start(self) -> None:
        """Start the runtime (idempotent)."""
        if self._has_started:
            return
        await self.team_logging.start()
        self._has_started = True

    async def stop(self) -> None:
        """Stop the runtime, flushing what it holds (idempotent; a no-op unless started here)."""
        if not self._has_started:
            return
        self._has_started = False
        await self.team_logging.stop()

    async def __aenter__(self) -> TeamLoggingMiddleware:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
