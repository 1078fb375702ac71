"""What the gateway shows of a team's logging decision, on the example gateway.

* To the downstream app: ``scope["state"]["team_logging"]`` (``request.state.team_logging`` in
  Starlette) holds the plan's switches and destination *names*, never a var value. A probe layer
  placed where the gateway's own routes sit reads it for real requests served by uvicorn.
* To admins: ``GET /team/{team_id}/callback`` lists, under ``effective_destinations``, every
  destination a request of the team is sent to (global defaults and the config file's entry
  included), each marked with its ``source``, secrets masked.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from tests.fixtures.fake_langfuse import FakeLangfuse
from tests.fixtures.otlp_receiver import OtlpReceiver
from tests.test_precedence_e2e import (
    GatewayUnderTest,
    StartGateway,
    gateway_factory,
    jsonl_entry,
    langfuse_entry,
    langfuse_ids,
)

MISSING = "<no team_logging in scope state>"


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    async with gateway_factory(tmp_path) as start:
        yield start


class StateProbe:
    """An ASGI layer where the gateway's own routes sit: keeps what each request saw in
    ``request.state.team_logging``, by ``x-request-id``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: dict[str, Any] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            rid = request.headers.get("x-request-id")
            if rid is not None:
                self.seen[rid] = getattr(request.state, "team_logging", MISSING)
        await self.app(scope, receive, send)


def probe(gateway: GatewayUnderTest) -> StateProbe:
    """Insert a :class:`StateProbe` between the middleware and the gateway's routes."""
    middleware = gateway.gateway.app
    state_probe = StateProbe(middleware.app)
    middleware.app = state_probe
    return state_probe


async def test_the_plan_is_visible_to_the_downstream_app_without_secrets(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, otlp_receiver: OtlpReceiver
) -> None:
    team_project, key_project = fake_langfuse.add_project(), fake_langfuse.add_project()
    otel_token = "otel-tenant-token-0123456789"
    otel = {
        "callback_name": "otel",
        "callback_type": "success",
        "callback_vars": {
            "otel_endpoint": otlp_receiver.endpoint("scope-state"),
            "otel_headers": f"authorization=Bearer {otel_token}",
        },
    }
    gateway = await start_gateway()
    seen = probe(gateway).seen
    for entry in (
        langfuse_entry(fake_langfuse, team_project),
        jsonl_entry("team-failures.jsonl", "failure"),
        otel,
    ):
        await gateway.add_callback("t", entry)
    key_entries = [
        jsonl_entry("key.jsonl", "success"),
        langfuse_entry(fake_langfuse, key_project, "success"),
    ]
    full = await gateway.key("t", metadata={"logging": key_entries})
    private = await gateway.key("t", metadata={"message_logging": "metadata_only"})
    await gateway.ok("PATCH", "/team/cached/settings", {"cache_enabled": True})
    cached = await gateway.key("cached")
    await gateway.ok("PATCH", "/team/gdpr/settings", {"logging_enabled": False})
    await gateway.add_callback("gdpr", jsonl_entry("gdpr.jsonl"))
    gdpr = await gateway.key("gdpr", metadata={"logging": key_entries})

    await gateway.chat(full, "full")
    await gateway.chat(private, "private")
    await gateway.chat(cached, "cached")
    await gateway.chat(gdpr, "gdpr")
    unknown = await gateway.client.post(
        "/v1/chat/completions", json={"model": "gpt-4"}, headers={"x-request-id": "anonymous"}
    )
    assert unknown.status_code == 401
    models = await gateway.client.get(
        "/v1/models", headers={"Authorization": f"Bearer {full}", "x-request-id": "unlogged"}
    )
    assert models.status_code == 200
    await gateway.settle()

    assert seen["full"] == {
        "team_id": "t",
        "logging_enabled": True,
        "cache_enabled": False,
        "message_logging": "full",
        # Team entries in order, then the key's.
        "success_destinations": ["langfuse", "otel", "jsonl", "langfuse"],
        "failure_destinations": ["langfuse", "jsonl"],
    }
    assert seen["private"] == {
        "team_id": "t",
        "logging_enabled": True,
        "cache_enabled": False,
        "message_logging": "metadata_only",
        "success_destinations": ["langfuse", "otel"],
        "failure_destinations": ["langfuse", "jsonl"],
    }
    assert seen["cached"] == {
        "team_id": "cached",
        "logging_enabled": True,
        "cache_enabled": True,
        "message_logging": "full",
        "success_destinations": [],
        "failure_destinations": [],
    }
    assert seen["gdpr"] == {
        "team_id": "gdpr",
        "logging_enabled": False,
        "cache_enabled": False,
        "message_logging": "full",
        "success_destinations": [],
        "failure_destinations": [],
    }
    # No key: the global defaults (none here) of an unknown caller.
    assert seen["anonymous"]["team_id"] is None
    assert seen["anonymous"]["success_destinations"] == []
    # Routes the middleware does not log are not touched at all.
    assert seen["unlogged"] == MISSING

    # The decision the app saw is the one the records followed.
    assert langfuse_ids(fake_langfuse, team_project) == ["full", "private"]
    assert langfuse_ids(fake_langfuse, key_project) == ["full"]
    assert [
        s.attributes["team_logging.request_id"] for s in otlp_receiver.spans("scope-state")
    ] == [
        "full",
        "private",
    ]
    assert gateway.jsonl_ids("key.jsonl") == ["full"]

    # Names only: no var value (secret or not) and no credential is in what the app can see.
    shown = repr(seen) + json.dumps(seen)
    values = [
        team_project.public_key,
        team_project.secret_key,
        key_project.public_key,
        key_project.secret_key,
        fake_langfuse.url,
        otlp_receiver.endpoint("scope-state"),
        otel_token,
        "team-failures.jsonl",
        "key.jsonl",
        "gdpr.jsonl",
        full,
        private,
        gdpr,
    ]
    for value in values:
        assert value not in shown


async def test_get_callback_lists_effective_destinations_with_their_source(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, monkeypatch: pytest.MonkeyPatch
) -> None:
    default_project = fake_langfuse.add_project(name="default")
    config_project = fake_langfuse.add_project(name="config")
    monkeypatch.setenv("LANGFUSE_CFG_PUBLIC", config_project.public_key)
    monkeypatch.setenv("LANGFUSE_CFG_SECRET", config_project.secret_key)
    gateway = await start_gateway(
        config={
            "default_callbacks": [
                jsonl_entry("default.jsonl"),
                langfuse_entry(fake_langfuse, default_project, "success"),
            ],
            "default_team_settings": [
                {
                    "team_id": "cfg",
                    "callbacks": [
                        jsonl_entry("cfg.jsonl", "failure"),
                        {
                            "callback_name": "langfuse",
                            "callback_vars": {
                                "langfuse_public_key": "os.environ/LANGFUSE_CFG_PUBLIC",
                                "langfuse_secret_key": "os.environ/LANGFUSE_CFG_SECRET",
                                "langfuse_host": fake_langfuse.url,
                            },
                        },
                    ],
                },
                {
                    "team_id": "optout",
                    "inherit_defaults": False,
                    "callbacks": [jsonl_entry("optout.jsonl")],
                },
                {
                    "team_id": "gdpr",
                    "logging_enabled": False,
                    "callbacks": [jsonl_entry("gdpr.jsonl")],
                },
            ],
        }
    )

    async def listing(team_id: str, token: str | None = None) -> dict[str, Any]:
        if token is None:
            response = await gateway.admin("GET", f"/team/{team_id}/callback")
        else:
            response = await gateway.admin("GET", f"/team/{team_id}/callback", token=token)
        assert response.status_code == 200, response.text
        assert default_project.secret_key not in response.text
        assert config_project.secret_key not in response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    def summary(data: dict[str, Any]) -> list[tuple[str, str, str]]:
        return sorted(
            (d["source"], d["callback_name"], d["callback_type"])
            for d in data["effective_destinations"]
        )

    def find(data: dict[str, Any], source: str, name: str) -> dict[str, Any]:
        (found,) = [
            d
            for d in data["effective_destinations"]
            if (d["source"], d["callback_name"]) == (source, name)
        ]
        return found

    defaults = [("default", "jsonl", "success_and_failure"), ("default", "langfuse", "success")]
    data = await listing("cfg")
    assert data["settings_source"] == "config"
    # The team's own entries (the seed's fields) stay a separate list from the effective ones.
    assert [c["callback_name"] for c in data["callbacks"]] == ["jsonl", "langfuse"]
    assert data["success_callbacks"] == ["langfuse"] and data["failure_callbacks"] == ["jsonl"]
    assert summary(data) == [
        ("config", "jsonl", "failure"),
        ("config", "langfuse", "success"),
        *defaults,
    ]
    assert find(data, "default", "jsonl")["callback_vars"] == {"jsonl_path": "default.jsonl"}
    default_vars = find(data, "default", "langfuse")["callback_vars"]
    assert default_vars["langfuse_public_key"] == default_project.public_key
    assert default_vars["langfuse_secret_key"] != default_project.secret_key
    assert "****" in default_vars["langfuse_secret_key"]
    # An os.environ/ reference names the secret without holding it: shown as written.
    config_vars = find(data, "config", "langfuse")["callback_vars"]
    assert config_vars["langfuse_secret_key"] == "os.environ/LANGFUSE_CFG_SECRET"

    assert summary(await listing("nobody")) == defaults
    assert summary(await listing("optout")) == [("config", "jsonl", "success_and_failure")]
    gdpr = await listing("gdpr")
    assert gdpr["logging_enabled"] is False and gdpr["effective_destinations"] == []
    assert [c["callback_name"] for c in gdpr["callbacks"]] == ["jsonl"]  # kept, not in force

    # After an API write the team's settings live in the store (seeded from the config entry).
    await gateway.add_callback("cfg", jsonl_entry("api.jsonl", "success"))
    data = await listing("cfg")
    assert data["settings_source"] == "api"
    assert summary(data) == [
        *defaults,
        ("team", "jsonl", "failure"),
        ("team", "jsonl", "success"),
        ("team", "langfuse", "success"),
    ]

    # The listing says where records actually go.
    key = await gateway.key("cfg")
    await gateway.chat(key, "listed-ok")
    await gateway.chat(key, "listed-bad", fail=True)
    await gateway.settle()
    assert gateway.jsonl_ids("default.jsonl") == ["listed-bad", "listed-ok"]
    assert gateway.jsonl_ids("cfg.jsonl") == ["listed-bad"]
    assert gateway.jsonl_ids("api.jsonl") == ["listed-ok"]
    assert langfuse_ids(fake_langfuse, default_project) == ["listed-ok"]
    assert langfuse_ids(fake_langfuse, config_project) == ["listed-ok"]

    # A delegated team admin sees that operator-wide defaults apply, not their settings.
    admin_key = await gateway.key("cfg", metadata={"team_admin": True})
    delegated = await listing("cfg", token=admin_key)
    assert summary(delegated) == summary(data)
    assert find(delegated, "default", "jsonl")["callback_vars"] == {}
    assert find(delegated, "default", "langfuse")["callback_vars"] == {}
    assert default_project.public_key not in json.dumps(delegated)
