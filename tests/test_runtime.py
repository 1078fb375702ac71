"""TeamLogging: wiring, lifecycle and the figures it reports for /health."""

from __future__ import annotations

from typing import Any

from team_logging_middleware import TeamLogging, TeamLoggingMiddleware
from team_logging_middleware.config import StaticConfig
from team_logging_middleware.resolver import CachedResolver


async def _ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "root_path": "",
        "headers": [(b"authorization", b"Bearer k")],
    }
    await app(scope, receive, send)
    return sent


async def test_request_path_failures_show_in_health() -> None:
    async def broken_resolver(scope: Any) -> None:
        raise RuntimeError("resolver down")

    tl = TeamLogging(broken_resolver)
    app = TeamLoggingMiddleware(_ok_app, team_logging=tl)
    async with tl:
        sent = await _call(app)
        health = await tl.health()
    assert sent[0]["status"] == 200  # the request proceeds
    assert health["request_path"]["resolver_errors"] == 1
    assert health["started"] is True


async def test_resolver_is_wrapped_once_and_lifecycle_is_idempotent() -> None:
    async def resolver(scope: Any) -> None:
        return None

    cached = CachedResolver(resolver)
    tl = TeamLogging(cached)
    assert tl.resolver is cached
    assert isinstance(TeamLogging(resolver).resolver, CachedResolver)
    await tl.start()
    await tl.start()
    assert tl.started
    await tl.stop()
    await tl.stop()
    assert not tl.started


def test_env_allowlist_comes_from_the_config_file_unless_given() -> None:
    config = StaticConfig(env_allowlist=("MY_*",))
    assert TeamLogging(config=config).env_allowlist == ("MY_*",)
    assert TeamLogging(config=config, env_allowlist=["X_*"]).env_allowlist == ("X_*",)
    assert TeamLogging().env_allowlist == ("LANGFUSE_*", "OTEL_*", "GCS_*")


async def test_a_cached_request_awaits_nothing_and_follows_invalidations() -> None:
    from team_logging_middleware._types import Caller
    from team_logging_middleware.settings import TeamSettings

    calls = 0
    caller = Caller(team_id="t", key_id="k")

    async def resolver(scope: Any) -> Caller:
        nonlocal calls
        calls += 1
        return caller

    tl = TeamLogging(resolver)
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer k")]}
    assert tl.cached_decision(scope) is None  # nothing cached yet
    assert await tl.resolve(scope) is caller
    assert tl.cached_decision(scope) == (caller, None)  # the caller, not yet its plan
    plan = await tl.plan_for(caller)
    assert tl.cached_decision(scope) == (caller, plan)

    await tl.store.put_team(TeamSettings(team_id="t", logging_enabled=False))
    assert tl.cached_decision(scope) == (caller, None)
    assert tl.resolver is not None
    tl.resolver.invalidate("k")
    assert tl.cached_decision(scope) is None

    # Through the middleware: the second request is answered from the caches.
    app = TeamLoggingMiddleware(_ok_app, team_logging=tl)
    async with tl:
        await _call(app)
        await _call(app)
    assert calls == 2
    stats = (await tl.health())["planner"]
    assert stats["hits"] >= 1


async def test_without_a_resolver_every_request_gets_the_unknown_callers_plan() -> None:
    tl = TeamLogging()
    decision = tl.cached_decision({"type": "http", "headers": []})
    assert decision is not None and decision[0] is None
    assert decision[1] is await tl.plan_for(None)
