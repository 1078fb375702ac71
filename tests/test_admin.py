"""The admin sub-app: auth, every route, the one error shape, rejected writes and secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema_rs
import pytest
from starlette.requests import Request

from team_logging_middleware._types import Caller, Destination
from team_logging_middleware.admin import Principal, create_admin_app
from team_logging_middleware.config import StaticConfig
from team_logging_middleware.errors import StoreUnavailableError
from team_logging_middleware.records import LogRecord
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import MAX_CALLBACKS, CallbackSpec, TeamSettings
from team_logging_middleware.sinks import CustomLogger, default_registry
from team_logging_middleware.sinks.custom import custom_sink_type
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.fixtures.fake_langfuse import FakeLangfuse
from tests.helpers import asgi_http_scope

MASTER = "sk-master-0123456789"
AUTH = {"Authorization": f"Bearer {MASTER}"}
SECRET = "sk-lf-very-secret-value-0123456789"
LANGFUSE = {
    "callback_name": "langfuse",
    "callback_type": "success",
    "callback_vars": {
        "langfuse_public_key": "pk-lf-public-123",
        "langfuse_secret_key": SECRET,
        "langfuse_host": "https://cloud.langfuse.com",
    },
}


def jsonl(path: str = "team.jsonl", callback_type: str = "success") -> dict[str, Any]:
    return {
        "callback_name": "jsonl",
        "callback_type": callback_type,
        "callback_vars": {"jsonl_path": path},
    }


class Admin:
    """A started runtime, its admin app and a client for it."""

    def __init__(self, tl: TeamLogging, client: httpx.AsyncClient, jsonl_dir: Path) -> None:
        self.tl = tl
        self.client = client
        self.jsonl_dir = jsonl_dir

    async def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for team_id in await self.tl.store.list_team_ids():
            settings = await self.tl.store.get_team(team_id)
            assert settings is not None
            out[team_id] = settings.model_dump()
        return out


AdminFactory = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def make_admin(tmp_path: Path) -> AsyncIterator[AdminFactory]:
    stack: list[tuple[TeamLogging, httpx.AsyncClient]] = []

    async def make(
        *,
        store: Any = None,
        config: dict[str, Any] | None = None,
        master_key: str | None = MASTER,
        env_allowlist: tuple[str, ...] = ("LANGFUSE_*", "OTEL_*", "GCS_*"),
        **admin_kwargs: Any,
    ) -> Admin:
        jsonl_dir = tmp_path / "logs"
        registry = default_registry(jsonl_dir=jsonl_dir)
        static = StaticConfig.from_dict(config, registry) if config else StaticConfig.empty()
        tl = TeamLogging(
            None,
            store=store if store is not None else MemorySettingsStore(),
            config=static,
            registry=registry,
            env_allowlist=env_allowlist,
            plan_ttl=3600,
        )
        await tl.start()
        app = create_admin_app(tl, master_key=master_key, **admin_kwargs)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://admin.test"
        )
        stack.append((tl, client))
        return Admin(tl, client, jsonl_dir)

    yield make
    for tl, client in stack:
        await client.aclose()
        await tl.stop()


def assert_error(response: httpx.Response, status: int, param: str | None = "any") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    if param != "any":
        assert body["error"]["param"] == param
    message: str = body["error"]["message"]
    return message


# -- authentication --------------------------------------------------------------------------


async def test_requests_without_valid_master_key_get_401(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {MASTER}"},
        {"Authorization": f"Bearer {MASTER}x"},
        {"Authorization": f"Bearer {MASTER[:-1]}"},
        {"x-api-key": MASTER},
    ):
        response = await admin.client.get("/team/t1/callback", headers=headers)
        assert_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    response = await admin.client.get("/team/t1/callback", headers=AUTH)
    assert response.status_code == 200


async def test_401_is_the_same_whether_or_not_the_team_exists(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    r = await admin.client.post("/team/known/callback", json=jsonl(), headers=AUTH)
    assert r.status_code == 200
    bad = {"Authorization": "Bearer nope"}
    for method, suffix in (("GET", "callback"), ("POST", "disable_logging"), ("GET", "settings")):
        known = await admin.client.request(method, f"/team/known/{suffix}", headers=bad)
        unknown = await admin.client.request(method, f"/team/unknown/{suffix}", headers=bad)
        assert known.status_code == unknown.status_code == 401
        assert known.content == unknown.content
    # A rejected credential never reaches a body check either: no 413/422 hint before auth.
    r = await admin.client.post("/team/known/callback", content=b"x" * 100_000, headers=bad)
    assert_error(r, 401)


async def test_no_master_key_and_no_hook_refuses_everything(make_admin: AdminFactory) -> None:
    admin = await make_admin(master_key=None)
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
        assert_error(await admin.client.get("/team/t/callback", headers=headers), 401)


# -- POST /team/{team_id}/callback -------------------------------------------------------------


async def test_add_callback_returns_masked_entry_and_stores_it(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    response = await admin.client.post("/team/team-1/callback", json=LANGFUSE, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    data = body["data"]
    assert data["team_id"] == "team-1"
    assert data["callback_name"] == "langfuse"
    assert data["callback_type"] == "success"
    assert data["callback_vars"]["langfuse_public_key"] == "pk-lf-public-123"
    assert data["callback_vars"]["langfuse_host"] == "https://cloud.langfuse.com"
    assert data["callback_vars"]["langfuse_secret_key"] != SECRET
    assert SECRET not in response.text
    stored = await admin.tl.store.get_team("team-1")
    assert stored is not None
    assert stored.callbacks[0].callback_vars["langfuse_secret_key"] == SECRET


async def test_alias_is_normalized_before_storing(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    body = json.loads(json.dumps(LANGFUSE))
    body["callback_vars"]["langfuse_secret"] = body["callback_vars"].pop("langfuse_secret_key")
    response = await admin.client.post("/team/t/callback", json=body, headers=AUTH)
    assert response.status_code == 200
    stored = await admin.tl.store.get_team("t")
    assert stored is not None
    assert set(stored.callbacks[0].callback_vars) == {
        "langfuse_public_key",
        "langfuse_secret_key",
        "langfuse_host",
    }


async def test_same_name_and_type_replaces_other_type_adds(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    await admin.client.post("/team/t/callback", json=jsonl("a.jsonl"), headers=AUTH)
    await admin.client.post("/team/t/callback", json=jsonl("b.jsonl"), headers=AUTH)
    stored = await admin.tl.store.get_team("t")
    assert stored is not None
    assert [c.callback_vars["jsonl_path"] for c in stored.callbacks] == ["b.jsonl"]
    await admin.client.post("/team/t/callback", json=jsonl("f.jsonl", "failure"), headers=AUTH)
    stored = await admin.tl.store.get_team("t")
    assert stored is not None
    assert [(c.callback_type, c.callback_vars["jsonl_path"]) for c in stored.callbacks] == [
        ("success", "b.jsonl"),
        ("failure", "f.jsonl"),
    ]


async def test_bad_values_answer_400_naming_the_field(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    unknown = {"callback_name": "nosuch", "callback_vars": {}}
    message = assert_error(
        await admin.client.post("/team/t/callback", json=unknown, headers=AUTH),
        400,
        "callback_name",
    )
    for name in ("jsonl", "langfuse", "otel"):
        assert name in message
    extra = jsonl()
    extra["callback_vars"]["bogus_var"] = "x"
    assert_error(
        await admin.client.post("/team/t/callback", json=extra, headers=AUTH),
        400,
        "callback_vars.bogus_var",
    )
    missing = {"callback_name": "langfuse", "callback_vars": {"langfuse_public_key": "pk-lf-1"}}
    assert_error(
        await admin.client.post("/team/t/callback", json=missing, headers=AUTH),
        400,
        "callback_vars.langfuse_secret_key",
    )
    escape = jsonl("../../etc/passwd")
    assert_error(
        await admin.client.post("/team/t/callback", json=escape, headers=AUTH),
        400,
        "callback_vars.jsonl_path",
    )
    assert await admin.tl.store.list_team_ids() == []


async def test_wrong_shapes_answer_422_naming_the_field(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    cases: list[tuple[Any, str | None]] = [
        ({**jsonl(), "callback_type": "sometimes"}, "callback_type"),
        ({**jsonl(), "callback_vars": {"jsonl_path": 5}}, "callback_vars.jsonl_path"),
        ({**jsonl(), "unexpected": 1}, "unexpected"),
        ({"callback_type": "success"}, "callback_name"),
        ([jsonl()], None),
        ("jsonl", None),
    ]
    for body, param in cases:
        response = await admin.client.post("/team/t/callback", json=body, headers=AUTH)
        message = assert_error(response, 422, param)
        if param:
            assert param in message
    assert await admin.tl.store.list_team_ids() == []


async def test_env_refs_follow_the_allowlist_for_the_master_key(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    allowed = json.loads(json.dumps(LANGFUSE))
    allowed["callback_vars"]["langfuse_secret_key"] = "os.environ/LANGFUSE_SECRET_KEY"
    response = await admin.client.post("/team/t/callback", json=allowed, headers=AUTH)
    assert response.status_code == 200
    # A reference names the secret, it does not hold it: it is shown as written.
    assert response.json()["data"]["callback_vars"]["langfuse_secret_key"] == (
        "os.environ/LANGFUSE_SECRET_KEY"
    )
    refused = json.loads(json.dumps(LANGFUSE))
    refused["callback_vars"]["langfuse_secret_key"] = "os.environ/AWS_SECRET_ACCESS_KEY"
    before = await admin.snapshot()
    message = assert_error(
        await admin.client.post("/team/t/callback", json=refused, headers=AUTH),
        400,
        "callback_vars.langfuse_secret_key",
    )
    assert "allowlist" in message
    assert await admin.snapshot() == before


# -- delegated principals ----------------------------------------------------------------------


def team_admin_hook(grants: dict[str, set[str]]) -> Callable[..., Awaitable[Principal | None]]:
    async def authorize(request: Request, team_id: str | None) -> Principal | None:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ")
        teams = grants.get(token)
        if teams is None:
            return None
        return Principal(subject=f"admin-of-{sorted(teams)}", teams=frozenset(teams))

    return authorize


async def test_delegated_admin_manages_only_its_teams(make_admin: AdminFactory) -> None:
    admin = await make_admin(authorize=team_admin_hook({"alice": {"team-a"}}))
    alice = {"Authorization": "Bearer alice"}
    ok = await admin.client.post("/team/team-a/callback", json=jsonl(), headers=alice)
    assert ok.status_code == 200
    assert (await admin.client.get("/team/team-a/callback", headers=alice)).status_code == 200
    before = await admin.snapshot()
    for method, path, body in (
        ("POST", "/team/team-b/callback", jsonl()),
        ("GET", "/team/team-b/callback", None),
        ("POST", "/team/team-b/disable_logging", None),
        ("PATCH", "/team/team-b/settings", {"logging_enabled": False}),
        ("DELETE", "/team/team-b/callback/jsonl", None),
        ("POST", "/team/team-b/callback/jsonl/test", None),
    ):
        response = await admin.client.request(method, path, json=body, headers=alice)
        assert_error(response, 403, "team_id")
    assert await admin.snapshot() == before
    assert_error(
        await admin.client.get("/team/team-a/callback", headers={"Authorization": "Bearer bob"}),
        401,
    )


async def test_delegated_admin_cannot_use_env_refs(make_admin: AdminFactory) -> None:
    admin = await make_admin(authorize=team_admin_hook({"alice": {"a"}}))
    body = json.loads(json.dumps(LANGFUSE))
    body["callback_vars"]["langfuse_secret_key"] = "os.environ/LANGFUSE_SECRET_KEY"
    message = assert_error(
        await admin.client.post(
            "/team/a/callback", json=body, headers={"Authorization": "Bearer alice"}
        ),
        400,
        "callback_vars.langfuse_secret_key",
    )
    assert "master key" in message
    assert await admin.tl.store.list_team_ids() == []


async def test_delegated_env_refs_when_allowed_stay_within_allowlist(
    make_admin: AdminFactory,
) -> None:
    admin = await make_admin(
        authorize=team_admin_hook({"alice": {"a"}}), allow_env_refs_for_delegated=True
    )
    alice = {"Authorization": "Bearer alice"}
    body = json.loads(json.dumps(LANGFUSE))
    body["callback_vars"]["langfuse_secret_key"] = "os.environ/LANGFUSE_SECRET_KEY"
    assert (await admin.client.post("/team/a/callback", json=body, headers=alice)).is_success
    body["callback_vars"]["langfuse_secret_key"] = "os.environ/DATABASE_PASSWORD"
    assert_error(await admin.client.post("/team/a/callback", json=body, headers=alice), 400)


async def test_delegated_host_allowlist(make_admin: AdminFactory) -> None:
    admin = await make_admin(
        authorize=team_admin_hook({"alice": {"a"}}),
        delegated_host_allowlist=["*.langfuse.com", "collector.internal"],
    )
    alice = {"Authorization": "Bearer alice"}
    body = json.loads(json.dumps(LANGFUSE))
    assert (await admin.client.post("/team/a/callback", json=body, headers=alice)).is_success
    body["callback_vars"]["langfuse_host"] = "https://evil.example.com"
    message = assert_error(
        await admin.client.post("/team/a/callback", json=body, headers=alice),
        400,
        "callback_vars.langfuse_host",
    )
    assert "evil.example.com" in message
    otel = {
        "callback_name": "otel",
        "callback_vars": {"otel_endpoint": "https://collector.internal/v1/traces"},
    }
    assert (await admin.client.post("/team/a/callback", json=otel, headers=alice)).is_success
    otel["callback_vars"]["otel_endpoint"] = "https://10.0.0.1:4318/v1/traces"
    assert_error(await admin.client.post("/team/a/callback", json=otel, headers=alice), 400)
    # The master key is not bound by the delegated allowlist.
    body["callback_vars"]["langfuse_host"] = "https://langfuse.example.org"
    assert (await admin.client.post("/team/a/callback", json=body, headers=AUTH)).is_success


async def test_failing_authorize_hook_fails_closed_without_details(
    make_admin: AdminFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Request, team_id: str | None) -> Principal | None:
        raise RuntimeError(f"db down, token={request.headers.get('authorization')}")

    admin = await make_admin(authorize=broken)
    with caplog.at_level(logging.ERROR, logger="team_logging_middleware.admin"):
        response = await admin.client.get(
            "/team/a/callback", headers={"Authorization": "Bearer tok-123456"}
        )
    message = assert_error(response, 500)
    assert "tok-123456" not in message and "db down" not in message
    assert "tok-123456" not in caplog.text
    assert "RuntimeError" in caplog.text
    # The master key does not depend on the hook.
    assert (await admin.client.get("/team/a/callback", headers=AUTH)).status_code == 200


# -- GET /team/{team_id}/callback ----------------------------------------------------------------


async def test_get_callbacks_shape_and_masking(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    await admin.client.post("/team/t/callback", json=LANGFUSE, headers=AUTH)
    await admin.client.post("/team/t/callback", json=jsonl("f.jsonl", "failure"), headers=AUTH)
    await admin.client.post("/team/t/callback", json=jsonl("s.jsonl", "success"), headers=AUTH)
    response = await admin.client.get("/team/t/callback", headers=AUTH)
    assert response.status_code == 200
    assert SECRET not in response.text
    data = response.json()["data"]
    assert data["team_id"] == "t"
    assert data["success_callbacks"] == ["langfuse", "jsonl"]
    assert data["failure_callbacks"] == ["jsonl"]
    assert data["logging_enabled"] is True
    assert data["settings_source"] == "api"
    # LiteLLM's shape: vars by callback name; a name used twice is keyed name:type.
    assert set(data["callback_vars"]) == {"langfuse", "jsonl:failure", "jsonl:success"}
    assert data["callback_vars"]["langfuse"]["langfuse_public_key"] == "pk-lf-public-123"
    assert len(data["callbacks"]) == 3
    sources = {(d["callback_name"], d["source"]) for d in data["effective_destinations"]}
    assert ("langfuse", "team") in sources
    assert ("jsonl", "team") in sources


async def test_get_callbacks_of_unknown_team_is_empty_not_404(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    response = await admin.client.get("/team/nobody/callback", headers=AUTH)
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["success_callbacks"] == data["failure_callbacks"] == []
    assert data["callbacks"] == [] and data["callback_vars"] == {}
    assert data["settings_source"] == "none"
    assert data["logging_enabled"] is True
    # Reading creates nothing.
    assert await admin.tl.store.list_team_ids() == []


async def test_config_team_is_shown_and_seeds_api_writes(make_admin: AdminFactory) -> None:
    config = {
        "default_callbacks": [jsonl("all.jsonl", "success_and_failure")],
        "default_team_settings": [
            {
                "team_id": "cfg",
                "callbacks": [jsonl("cfg.jsonl")],
            }
        ],
    }
    admin = await make_admin(config=config)
    data = (await admin.client.get("/team/cfg/callback", headers=AUTH)).json()["data"]
    assert data["settings_source"] == "config"
    assert data["success_callbacks"] == ["jsonl"]
    sources = {d["source"] for d in data["effective_destinations"]}
    assert {"default", "config"} <= sources
    # Adding a callback keeps what the config gave the team.
    await admin.client.post("/team/cfg/callback", json=LANGFUSE, headers=AUTH)
    stored = await admin.tl.store.get_team("cfg")
    assert stored is not None
    assert [c.callback_name for c in stored.callbacks] == ["jsonl", "langfuse"]


async def test_delegated_admin_does_not_see_default_destination_vars(
    make_admin: AdminFactory,
) -> None:
    config = {"default_callbacks": [jsonl("operator-all.jsonl")]}
    admin = await make_admin(config=config, authorize=team_admin_hook({"alice": {"a"}}))
    data = (
        await admin.client.get("/team/a/callback", headers={"Authorization": "Bearer alice"})
    ).json()["data"]
    defaults = [d for d in data["effective_destinations"] if d["source"] == "default"]
    assert defaults and all(d["callback_vars"] == {} for d in defaults)
    assert "operator-all.jsonl" not in json.dumps(data)
    master_view = (await admin.client.get("/team/a/callback", headers=AUTH)).text
    assert "operator-all.jsonl" in master_view


# -- DELETE ---------------------------------------------------------------------------------------


async def test_delete_callback(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    await admin.client.post("/team/t/callback", json=jsonl("s.jsonl"), headers=AUTH)
    await admin.client.post("/team/t/callback", json=jsonl("f.jsonl", "failure"), headers=AUTH)
    await admin.client.post("/team/t/callback", json=LANGFUSE, headers=AUTH)
    message = assert_error(
        await admin.client.delete("/team/t/callback/otel", headers=AUTH), 404, "callback_name"
    )
    assert "otel" in message
    assert_error(
        await admin.client.delete(
            "/team/t/callback/langfuse", params={"callback_type": "failure"}, headers=AUTH
        ),
        404,
    )
    assert_error(
        await admin.client.delete(
            "/team/t/callback/jsonl", params={"callback_type": "bogus"}, headers=AUTH
        ),
        400,
        "callback_type",
    )
    response = await admin.client.delete(
        "/team/t/callback/jsonl", params={"callback_type": "failure"}, headers=AUTH
    )
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "Deleted callback jsonl for team t"
    assert [r["callback_type"] for r in body["data"]["removed"]] == ["failure"]
    assert body["data"]["failure_callbacks"] == []
    response = await admin.client.delete("/team/t/callback/langfuse", headers=AUTH)
    assert SECRET not in response.text
    stored = await admin.tl.store.get_team("t")
    assert stored is not None
    assert [c.callback_vars["jsonl_path"] for c in stored.callbacks] == ["s.jsonl"]
    assert_error(await admin.client.delete("/team/none/callback/jsonl", headers=AUTH), 404)


# -- disable / enable ------------------------------------------------------------------------


async def test_disable_logging_exact_seed_response_and_keeps_callbacks(
    make_admin: AdminFactory,
) -> None:
    admin = await make_admin()
    await admin.client.post("/team/YOUR_TEAM_ID/callback", json=LANGFUSE, headers=AUTH)
    response = await admin.client.post("/team/YOUR_TEAM_ID/disable_logging", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {
        "status": "success",
        "message": "Logging disabled for team YOUR_TEAM_ID",
        "data": {"team_id": "YOUR_TEAM_ID", "success_callbacks": [], "failure_callbacks": []},
    }
    stored = await admin.tl.store.get_team("YOUR_TEAM_ID")
    assert stored is not None
    assert stored.logging_enabled is False
    assert [c.callback_name for c in stored.callbacks] == ["langfuse"]
    plan = await admin.tl.plan_for(Caller(team_id="YOUR_TEAM_ID"))
    assert not plan.logs
    got = (await admin.client.get("/team/YOUR_TEAM_ID/callback", headers=AUTH)).json()["data"]
    assert got["logging_enabled"] is False
    assert got["success_callbacks"] == []
    assert [c["callback_name"] for c in got["callbacks"]] == ["langfuse"]

    response = await admin.client.post("/team/YOUR_TEAM_ID/enable_logging", headers=AUTH)
    assert response.json() == {
        "status": "success",
        "message": "Logging enabled for team YOUR_TEAM_ID",
        "data": {
            "team_id": "YOUR_TEAM_ID",
            "success_callbacks": ["langfuse"],
            "failure_callbacks": [],
        },
    }
    plan = await admin.tl.plan_for(Caller(team_id="YOUR_TEAM_ID"))
    assert [d.name for d in plan.success] == ["langfuse"]


async def test_disable_unknown_team_creates_disabled_settings(make_admin: AdminFactory) -> None:
    admin = await make_admin(config={"default_callbacks": [jsonl("all.jsonl")]})
    assert (await admin.tl.plan_for(Caller(team_id="gdpr"))).logs
    response = await admin.client.post("/team/gdpr/disable_logging", headers=AUTH)
    assert response.status_code == 200
    # The GDPR switch covers the global defaults too.
    assert not (await admin.tl.plan_for(Caller(team_id="gdpr"))).logs


async def test_writes_invalidate_cached_plans_at_once(make_admin: AdminFactory) -> None:
    admin = await make_admin()  # plan_ttl is an hour: only invalidation can refresh it
    assert not (await admin.tl.plan_for(Caller(team_id="t"))).logs
    await admin.client.post("/team/t/callback", json=jsonl(), headers=AUTH)
    assert [d.name for d in (await admin.tl.plan_for(Caller(team_id="t"))).success] == ["jsonl"]
    await admin.client.patch("/team/t/settings", json={"logging_enabled": False}, headers=AUTH)
    assert not (await admin.tl.plan_for(Caller(team_id="t"))).logs
    await admin.client.patch("/team/t/settings", json={"logging_enabled": True}, headers=AUTH)
    await admin.client.delete("/team/t/callback/jsonl", headers=AUTH)
    assert not (await admin.tl.plan_for(Caller(team_id="t"))).logs


# -- settings -------------------------------------------------------------------------------


async def test_get_and_patch_settings(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    got = (await admin.client.get("/team/t/settings", headers=AUTH)).json()
    assert got == {
        "status": "success",
        "data": {
            "team_id": "t",
            "callbacks": [],
            "logging_enabled": True,
            "cache_enabled": False,
            "cache_ttl_seconds": None,
            "message_logging": "full",
            "inherit_defaults": True,
            "settings_source": "none",
        },
    }
    await admin.client.post("/team/t/callback", json=LANGFUSE, headers=AUTH)
    response = await admin.client.patch(
        "/team/t/settings",
        json={"cache_enabled": True, "cache_ttl_seconds": 600, "message_logging": "metadata_only"},
        headers=AUTH,
    )
    assert response.status_code == 200
    assert SECRET not in response.text
    data = response.json()["data"]
    assert data["cache_enabled"] is True and data["cache_ttl_seconds"] == 600
    assert data["message_logging"] == "metadata_only"
    assert data["logging_enabled"] is True  # untouched
    assert data["callbacks"][0]["callback_name"] == "langfuse"
    # An explicit null clears the TTL.
    response = await admin.client.patch(
        "/team/t/settings", json={"cache_ttl_seconds": None}, headers=AUTH
    )
    assert response.json()["data"]["cache_ttl_seconds"] is None
    assert response.json()["data"]["cache_enabled"] is True


async def test_patch_settings_refuses_bad_fields(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    await admin.client.post("/team/t/callback", json=jsonl(), headers=AUTH)
    before = await admin.snapshot()
    for body, param in (
        ({"logging_enabled": False, "colour": "blue"}, "colour"),
        ({"callbacks": []}, "callbacks"),
        ({"logging_enabled": "maybe"}, "logging_enabled"),
        ({"logging_enabled": None}, "logging_enabled"),
        ({"cache_ttl_seconds": 0}, "cache_ttl_seconds"),
        ({"message_logging": "everything"}, "message_logging"),
    ):
        response = await admin.client.patch("/team/t/settings", json=body, headers=AUTH)
        message = assert_error(response, 422, param)
        assert param in message
    assert await admin.snapshot() == before


# -- the connection test -------------------------------------------------------------------


async def test_callback_test_route(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    await admin.client.post("/team/t/callback", json=jsonl("ok/t.jsonl"), headers=AUTH)
    response = await admin.client.post("/team/t/callback/jsonl/test", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "success"
    assert response.json()["data"] == {
        "team_id": "t",
        "callback_name": "jsonl",
        "callback_type": "success",
    }
    # A path whose parent is a regular file cannot be created: the check says so.
    admin.jsonl_dir.mkdir(parents=True, exist_ok=True)
    (admin.jsonl_dir / "blocker").write_text("not a directory")
    await admin.client.post(
        "/team/t/callback", json=jsonl("blocker/t.jsonl", "failure"), headers=AUTH
    )
    message = assert_error(
        await admin.client.post("/team/t/callback/jsonl/test", headers=AUTH), 409, "callback_type"
    )
    assert "callback_type" in message
    response = await admin.client.post(
        "/team/t/callback/jsonl/test", params={"callback_type": "failure"}, headers=AUTH
    )
    message = assert_error(response, 400)
    assert response.json()["error"]["type"] == "callback_check_failed"
    assert "blocker/t.jsonl" in message
    assert_error(await admin.client.post("/team/t/callback/otel/test", headers=AUTH), 404)


async def test_callback_test_against_langfuse_keys_and_reachability(
    make_admin: AdminFactory, fake_langfuse: FakeLangfuse
) -> None:
    admin = await make_admin()
    project = fake_langfuse.add_project()
    good = {"callback_name": "langfuse", "callback_vars": fake_langfuse.callback_vars(project)}
    assert (await admin.client.post("/team/good/callback", json=good, headers=AUTH)).is_success
    response = await admin.client.post("/team/good/callback/langfuse/test", headers=AUTH)
    assert response.status_code == 200, response.text
    assert project.secret_key not in response.text

    wrong = json.loads(json.dumps(good))
    wrong["callback_vars"]["langfuse_secret_key"] = SECRET
    await admin.client.post("/team/wrong/callback", json=wrong, headers=AUTH)
    response = await admin.client.post("/team/wrong/callback/langfuse/test", headers=AUTH)
    assert_error(response, 400)
    assert response.json()["error"]["type"] == "callback_check_failed"
    assert SECRET not in response.text

    # A port nothing listens on (bound, then closed): unreachable, said without the secret.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = json.loads(json.dumps(wrong))
    down["callback_vars"]["langfuse_host"] = f"http://127.0.0.1:{port}"
    await admin.client.post("/team/down/callback", json=down, headers=AUTH)
    response = await admin.client.post("/team/down/callback/langfuse/test", headers=AUTH)
    assert_error(response, 400)
    assert SECRET not in response.text


# -- bodies: size, type, JSON -------------------------------------------------------------------


async def test_body_limits_and_content_types(make_admin: AdminFactory) -> None:
    admin = await make_admin(max_body_bytes=1024)
    big = jsonl()
    big["callback_vars"]["jsonl_path"] = "x" * 2000
    assert_error(await admin.client.post("/team/t/callback", json=big, headers=AUTH), 413)
    r = await admin.client.post(
        "/team/t/callback",
        content=json.dumps(jsonl()),
        headers={**AUTH, "content-type": "text/plain"},
    )
    assert_error(r, 415)
    r = await admin.client.post(
        "/team/t/callback",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 400)
    r = await admin.client.post(
        "/team/t/callback", content=b"", headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(r, 400)
    r = await admin.client.post(
        "/team/t/callback",
        content=b"\xff\xfe{}",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 400)
    deep = b"[" * 500 + b"]" * 500
    r = await admin.client.post("/team/t/callback", content=deep, headers=AUTH)
    assert_error(r, 400)
    # No content type at all: JSON is assumed (curl -d without -H).
    r = await admin.client.post(
        "/team/t/callback", content=json.dumps(jsonl()).encode(), headers=AUTH
    )
    assert r.status_code == 200, r.text
    # A lone surrogate escape is valid JSON but cannot be stored: refused, never a 500.
    r = await admin.client.post(
        "/team/t/callback",
        content=b'{"callback_name": "jsonl", "callback_vars": {"jsonl_path": "a\\ud800.jsonl"}}',
        headers=AUTH,
    )
    assert_error(r, 400)


async def test_413_is_enforced_while_reading_the_stream(make_admin: AdminFactory) -> None:
    """A chunked body is refused once it passes the limit; the rest is never read."""
    admin = await make_admin(max_body_bytes=1000)
    app = create_admin_app(admin.tl, master_key=MASTER, max_body_bytes=1000)
    chunks = [b"[" + b" " * 399] + [b" " * 400] * 50
    consumed = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal consumed
        if consumed < len(chunks):
            consumed += 1
            return {
                "type": "http.request",
                "body": chunks[consumed - 1],
                "more_body": consumed < len(chunks),
            }
        await asyncio.Event().wait()  # never: the app must not wait for more
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = asgi_http_scope(
        "/team/t/callback",
        [
            (b"host", b"admin.test"),
            (b"authorization", f"Bearer {MASTER}".encode()),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        asgi={"version": "3.0"},
        client=("127.0.0.1", 1234),
        server=("127.0.0.1", 80),
    )
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    assert consumed == 3  # 400 + 400 + 400 bytes > 1000: refused at the third chunk
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["type"] == "request_too_large"


# -- routes, methods, team ids -------------------------------------------------------------


async def test_unknown_route_and_method_use_the_error_shape(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    assert_error(await admin.client.get("/nope", headers=AUTH), 404)
    assert_error(await admin.client.get("/team/t/nothing", headers=AUTH), 404)
    response = await admin.client.put("/team/t/callback", headers=AUTH)
    assert_error(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


async def test_team_ids_unicode_long_and_encoded_slash(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    for team_id in ("équipe-東京-🚀", "a b", "x" * 256, "%41", "a.b~c", "'; DROP TABLE teams;--"):
        r = await admin.client.post(
            f"/team/{quote(team_id, safe='')}/callback",
            json=jsonl(),
            headers=AUTH,
        )
        assert r.status_code == 200, (team_id, r.text)
        assert r.json()["data"]["team_id"] == team_id
        assert await admin.tl.store.get_team(team_id) is not None
    assert_error(
        await admin.client.post(f"/team/{'x' * 257}/callback", json=jsonl(), headers=AUTH),
        400,
        "team_id",
    )
    # An encoded slash is a path separator once decoded: no such route.
    assert_error(await admin.client.post("/team/a%2Fb/callback", json=jsonl(), headers=AUTH), 404)


# -- store failures ------------------------------------------------------------------------------


class DownStore(MemorySettingsStore):
    """A store whose writes fail as an unreachable backend's do."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def put_team(self, settings: TeamSettings) -> None:
        if self.down:
            raise StoreUnavailableError("backend unreachable")
        await super().put_team(settings)


async def test_store_unavailable_answers_503_and_applies_nothing(make_admin: AdminFactory) -> None:
    store = DownStore()
    admin = await make_admin(store=store)
    await admin.client.post("/team/t/callback", json=jsonl(), headers=AUTH)
    before = await admin.snapshot()
    store.down = True
    for method, path, body in (
        ("POST", "/team/t/callback", LANGFUSE),
        ("POST", "/team/t/disable_logging", None),
        ("PATCH", "/team/t/settings", {"cache_enabled": True}),
        ("DELETE", "/team/t/callback/jsonl", None),
    ):
        response = await admin.client.request(method, path, json=body, headers=AUTH)
        message = assert_error(response, 503)
        assert "NOT applied" in message
        assert SECRET not in response.text
    assert await admin.snapshot() == before
    assert (await admin.tl.plan_for(Caller(team_id="t"))).logs


class BrokenStore(MemorySettingsStore):
    async def get_team(self, team_id: str) -> TeamSettings | None:
        raise RuntimeError(f"unexpected: {SECRET}")


async def test_unexpected_error_is_a_bare_500(
    make_admin: AdminFactory, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await make_admin(store=BrokenStore())
    with caplog.at_level(logging.ERROR, logger="team_logging_middleware.admin"):
        response = await admin.client.get("/team/t/callback", headers=AUTH)
    message = assert_error(response, 500)
    assert message == "internal error"
    assert SECRET not in response.text
    assert "RuntimeError" in caplog.text
    assert "test_admin.py" in caplog.text  # where it came from
    assert SECRET not in caplog.text


async def test_rejected_writes_leave_the_store_exactly_as_it_was(make_admin: AdminFactory) -> None:
    admin = await make_admin(max_body_bytes=2048)
    await admin.client.post("/team/t/callback", json=LANGFUSE, headers=AUTH)
    await admin.client.post("/team/t/callback", json=jsonl(), headers=AUTH)
    before = await admin.snapshot()
    bad_bodies: list[Any] = [
        {"callback_name": "nosuch"},
        {**LANGFUSE, "callback_vars": {"langfuse_public_key": "pk-lf-x"}},
        {**LANGFUSE, "callback_type": "never"},
        {
            **LANGFUSE,
            "callback_vars": {**LANGFUSE["callback_vars"], "langfuse_host": "ftp://x"},
        },
        {**jsonl(), "callback_vars": {"jsonl_path": "/etc/passwd"}},
        {**jsonl(), "callback_vars": {"jsonl_path": "y" * 5000}},
        [],
        None,
    ]
    for body in bad_bodies:
        response = await admin.client.post("/team/t/callback", json=body, headers=AUTH)
        assert 400 <= response.status_code < 500, (body, response.text)
    assert await admin.snapshot() == before


class SlowStore(MemorySettingsStore):
    """Yields to the loop between reading and writing, as a networked store does."""

    async def get_team(self, team_id: str) -> TeamSettings | None:
        settings = await super().get_team(team_id)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return settings


async def test_concurrent_writes_to_one_team_lose_nothing(make_admin: AdminFactory) -> None:
    admin = await make_admin(store=SlowStore())
    paths = [f"p{i}.jsonl" for i in range(3)]
    types = ["success", "failure", "success_and_failure"]
    responses = await asyncio.gather(
        *(
            admin.client.post("/team/t/callback", json=jsonl(p, t), headers=AUTH)
            for p, t in zip(paths, types, strict=True)
        )
    )
    assert all(r.status_code == 200 for r in responses)
    stored = await admin.tl.store.get_team("t")
    assert stored is not None
    assert sorted(c.callback_type for c in stored.callbacks) == sorted(types)


# -- secrets in logs -----------------------------------------------------------------------------


async def test_no_secret_in_any_log_line(
    make_admin: AdminFactory, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await make_admin()
    with caplog.at_level(logging.DEBUG):
        await admin.client.post("/team/t/callback", json=LANGFUSE, headers=AUTH)
        await admin.client.get("/team/t/callback", headers=AUTH)
        await admin.client.post("/team/t/disable_logging", headers=AUTH)
        await admin.client.post("/team/t/callback/langfuse/test", headers=AUTH)
        await admin.client.delete("/team/t/callback/langfuse", headers=AUTH)
    assert caplog.records, "writes are logged"
    assert SECRET not in caplog.text
    assert MASTER not in caplog.text
    assert any("langfuse" in r.getMessage() and "'t'" in r.getMessage() for r in caplog.records)


# -- health and the OpenAPI document -------------------------------------------------------------


async def test_health_needs_credentials_and_scopes_delegated_view(
    make_admin: AdminFactory,
) -> None:
    admin = await make_admin(authorize=team_admin_hook({"alice": {"a"}}))
    assert_error(await admin.client.get("/health"), 401)
    full = (await admin.client.get("/health", headers=AUTH)).json()
    assert full["status"] == "ok"
    assert full["started"] is True
    assert {"dispatcher", "planner", "store"} <= set(full)
    delegated = (
        await admin.client.get("/health", headers={"Authorization": "Bearer alice"})
    ).json()
    assert delegated["status"] == "ok"
    assert "dispatcher" not in delegated and "planner" not in delegated
    assert delegated["destinations"] == []
    live = await admin.client.get("/health/liveness")
    assert live.status_code == 200 and live.json() == {"status": "ok"}


async def test_delegated_health_shows_only_its_own_destinations(
    make_admin: AdminFactory,
) -> None:
    admin = await make_admin(authorize=team_admin_hook({"alice": {"a"}}))
    shared = CallbackSpec(callback_name="jsonl", callback_vars={"jsonl_path": "shared.jsonl"})
    for team_id in ("a", "b"):
        own = CallbackSpec(callback_name="jsonl", callback_vars={"jsonl_path": f"{team_id}.jsonl"})
        record = LogRecord(
            request_id=f"req-{team_id}",
            team_id=team_id,
            key_alias=None,
            user_id=None,
            route="/v1/chat/completions",
            method="POST",
            call_type="chat.completions",
            outcome="ok",
            status_code=200,
            start_time=0.0,
            end_time=1.0,
        )
        destinations = [
            Destination(own, "team", own.identity()),
            Destination(shared, "default", shared.identity()),
        ]
        assert admin.tl.dispatcher.submit_record(record, destinations)
    assert not (await admin.tl.dispatcher.flush(10)).timed_out
    full = (await admin.client.get("/health", headers=AUTH)).json()
    assert len(full["dispatcher"]["destinations"]) == 3
    view = (await admin.client.get("/health", headers={"Authorization": "Bearer alice"})).json()
    # Only the destination that serves team "a" alone; the shared one describes team "b" too.
    assert [d["team_ids"] for d in view["destinations"]] == [["a"]]
    assert view["destinations"][0]["sent"] == 1
    assert "b.jsonl" not in json.dumps(view) and '"b"' not in json.dumps(view)


async def test_409_when_a_team_has_the_most_callbacks(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    # Entries are unique per (name, type): enough sink types are needed to reach the bound.
    names = [f"custom{i}" for i in range(MAX_CALLBACKS // 3 + 1)]
    for name in names:
        admin.tl.registry.register(custom_sink_type(name, CustomLogger()))
    count = 0
    for name in names:
        for callback_type in ("success", "failure", "success_and_failure"):
            body = {"callback_name": name, "callback_type": callback_type}
            response = await admin.client.post("/team/t/callback", json=body, headers=AUTH)
            if count < MAX_CALLBACKS:
                assert response.status_code == 200, response.text
            else:
                assert_error(response, 409, "callback_name")
            count += 1
    stored = await admin.tl.store.get_team("t")
    assert stored is not None and len(stored.callbacks) == MAX_CALLBACKS
    # Replacing an existing entry is still possible at the bound.
    body = {"callback_name": names[0], "callback_type": "success"}
    assert (await admin.client.post("/team/t/callback", json=body, headers=AUTH)).is_success


async def test_openapi_document_describes_routes_and_responses(make_admin: AdminFactory) -> None:
    admin = await make_admin()
    doc = (await admin.client.get("/openapi.json")).json()  # public: no credentials needed
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/team/{team_id}/callback",
        "/team/{team_id}/callback/{callback_name}",
        "/team/{team_id}/callback/{callback_name}/test",
        "/team/{team_id}/disable_logging",
        "/team/{team_id}/enable_logging",
        "/team/{team_id}/settings",
        "/health",
        "/health/liveness",
    }
    schemas = doc["components"]["schemas"]
    assert "jsonl" in schemas["CallbackSpec"]["properties"]["callback_name"]["enum"]

    def validator(name: str) -> Any:
        # Resolve "#/components/schemas/X" refs against the document itself.
        return jsonschema_rs.validator_for({**schemas[name], "components": {"schemas": schemas}})

    # Real answers validate against the documented schemas.
    await admin.client.post("/team/t/callback", json=LANGFUSE, headers=AUTH)
    checks = [
        (
            "CallbackWriteResponse",
            await admin.client.post("/team/t/callback", json=jsonl(), headers=AUTH),
        ),
        ("TeamCallbacksResponse", await admin.client.get("/team/t/callback", headers=AUTH)),
        ("LoggingSwitchResponse", await admin.client.post("/team/t/disable_logging", headers=AUTH)),
        ("TeamSettingsResponse", await admin.client.get("/team/t/settings", headers=AUTH)),
        ("HealthResponse", await admin.client.get("/health", headers=AUTH)),
        (
            "CallbackDeleteResponse",
            await admin.client.delete("/team/t/callback/jsonl", headers=AUTH),
        ),
        ("ErrorResponse", await admin.client.get("/team/t/callback")),
    ]
    for name, response in checks:
        validator(name).validate(response.json())
    # Every operation documents the error shape for its failures.
    for path_item in doc["paths"].values():
        for operation in path_item.values():
            assert "200" in operation["responses"]
            assert "500" in operation["responses"]
