"""``os.environ/NAME`` references on the example gateway: who may write them, which names, and
that they are resolved only when a destination is built and never echoed back resolved.

Policy under test (see the README, "`os.environ/` references"):

* the static config file may reference any variable (the operator wrote it);
* the master key may reference names matching the operator's allowlist (default ``LANGFUSE_*``,
  ``OTEL_*``, ``GCS_*``; the config file's ``team_logging.env_allowlist``; ``TLM_ENV_ALLOWLIST``
  on the gateway, which wins); anything else is a 400 saying how the operator can allow it;
* a delegated team admin may not write them at all, through any route.

Records are checked where they land: the fake Langfuse accepts an export only with the project's
own key pair, so a span arriving proves the environment's credentials were used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.fake_langfuse import FakeLangfuse, Project
from tests.test_precedence_e2e import (
    GatewayUnderTest,
    StartGateway,
    assert_only_authenticated_exports,
    gateway_factory,
    gw,
    jsonl_entry,
    langfuse_ids,
)

PUBLIC_VAR = "LANGFUSE_TLM_TEST_PUBLIC"
SECRET_VAR = "LANGFUSE_TLM_TEST_SECRET"


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    async with gateway_factory(tmp_path) as start:
        yield start


def env_entry(
    fake: FakeLangfuse,
    public: str = PUBLIC_VAR,
    secret: str = SECRET_VAR,
    *,
    alias: bool = False,
) -> dict[str, Any]:
    """A Langfuse entry whose key pair comes from the environment (``alias``: the secret is
    spelled ``langfuse_secret``, LiteLLM's alias)."""
    return {
        "callback_name": "langfuse",
        "callback_type": "success_and_failure",
        "callback_vars": {
            "langfuse_public_key": f"os.environ/{public}",
            "langfuse_secret" if alias else "langfuse_secret_key": f"os.environ/{secret}",
            "langfuse_host": fake.url,
        },
    }


class Transcript:
    """Every admin response body the test saw, to prove no resolved value was ever echoed."""

    def __init__(self, gateway: GatewayUnderTest) -> None:
        self.gateway = gateway
        self.bodies: list[str] = []

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> httpx.Response:
        if token is None:
            response = await self.gateway.admin(method, path, body)
        else:
            response = await self.gateway.admin(method, path, body, token=token)
        self.bodies.append(response.text)
        return response

    def assert_never_contains(self, *values: str) -> None:
        for text in self.bodies:
            for value in values:
                assert value not in text


def assert_refused(response: httpx.Response, param: str, *needles: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for needle in needles:
        assert needle in error["message"], error["message"]


async def test_master_key_refs_resolve_when_the_destination_is_built(
    start_gateway: StartGateway,
    fake_langfuse: FakeLangfuse,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    team_project = fake_langfuse.add_project(name="team")
    key_project = fake_langfuse.add_project(name="key")
    gateway = await start_gateway()
    calls = Transcript(gateway)

    # Written while the variables do not even exist: only the names are checked and stored.
    response = await calls.call("POST", "/team/t/callback", env_entry(fake_langfuse))
    assert response.status_code == 200, response.text
    assert response.json()["data"]["callback_vars"]["langfuse_secret_key"] == (
        f"os.environ/{SECRET_VAR}"
    )
    key_vars = ("LANGFUSE_TLM_KEY_PUBLIC", "LANGFUSE_TLM_KEY_SECRET")
    response = await calls.call(
        "POST",
        "/key/generate",
        {"team_id": "t", "metadata": {"logging": [env_entry(fake_langfuse, *key_vars)]}},
    )
    assert response.status_code == 200, response.text
    key = response.json()["key"]
    assert response.json()["metadata"]["logging"][0]["callback_vars"]["langfuse_public_key"] == (
        f"os.environ/{key_vars[0]}"
    )

    # The environment provides the credentials; the first record builds the destinations.
    monkeypatch.setenv(PUBLIC_VAR, team_project.public_key)
    monkeypatch.setenv(SECRET_VAR, team_project.secret_key)
    monkeypatch.setenv(key_vars[0], key_project.public_key)
    monkeypatch.setenv(key_vars[1], key_project.secret_key)
    await gateway.chat(key, "env-resolved")
    await gateway.settle()
    assert langfuse_ids(fake_langfuse, team_project) == ["env-resolved"]
    assert langfuse_ids(fake_langfuse, key_project) == ["env-resolved"]
    assert_only_authenticated_exports(fake_langfuse, [team_project, key_project])

    # Every way of reading the settings back shows the reference, never what it resolves to.
    for path in ("/team/t/callback", "/team/t/settings", "/health"):
        response = await calls.call("GET", path)
        assert response.status_code == 200, response.text
    listed = json.loads(calls.bodies[-3])["data"]
    assert listed["callback_vars"]["langfuse"]["langfuse_public_key"] == f"os.environ/{PUBLIC_VAR}"
    assert listed["effective_destinations"][0]["callback_vars"]["langfuse_secret_key"] == (
        f"os.environ/{SECRET_VAR}"
    )
    response = await calls.call("POST", "/team/t/callback/langfuse/test")
    assert response.status_code == 200, response.text
    response = await calls.call("POST", "/key/update", {"key": key, "metadata": {"tags": ["x"]}})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"]["logging"][0]["callback_vars"]["langfuse_secret_key"] == (
        f"os.environ/{key_vars[1]}"
    )

    # A wrong secret in the environment: the connection test fails without quoting it.
    monkeypatch.setenv(SECRET_VAR, "sk-lf-wrong-secret-from-the-environment")
    response = await calls.call("POST", "/team/t/callback/langfuse/test")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "callback_check_failed"

    resolved = [
        team_project.secret_key,
        key_project.secret_key,
        "sk-lf-wrong-secret-from-the-environment",
    ]
    calls.assert_never_contains(*resolved)
    for record in caplog.records:
        line = record.getMessage()
        for value in resolved:
            assert value not in line


@pytest.mark.parametrize(
    ("route", "name"),
    [
        ("team", "AWS_SECRET_ACCESS_KEY"),
        ("team", "langfuse_lowercase"),  # patterns are case-sensitive
        ("team", ""),
        ("key_generate", "DATABASE_URL"),
        ("key_update", "HOME"),
    ],
)
async def test_names_outside_the_allowlist_are_refused_with_the_way_to_allow_them(
    start_gateway: StartGateway,
    fake_langfuse: FakeLangfuse,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
    name: str,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-never-shown")
    gateway = await start_gateway()
    entry = env_entry(fake_langfuse, secret=name)
    key = await gateway.key("t", metadata={"logging": [jsonl_entry("old.jsonl")]})
    if route == "team":
        response = await gateway.admin("POST", "/team/t/callback", entry)
        param = "callback_vars.langfuse_secret_key"
    elif route == "key_generate":
        response = await gateway.admin(
            "POST", "/key/generate", {"team_id": "t", "metadata": {"logging": [entry]}}
        )
        param = "metadata.logging[0].callback_vars.langfuse_secret_key"
    else:
        response = await gateway.admin(
            "POST", "/key/update", {"key": key, "metadata": {"logging": [entry]}}
        )
        param = "metadata.logging[0].callback_vars.langfuse_secret_key"
    assert_refused(response, param, "allowlist", "TLM_ENV_ALLOWLIST", "env_allowlist", "LANGFUSE_*")
    assert "aws-secret-value-never-shown" not in response.text

    # Nothing was stored: the team has no callback, the key keeps its old entry.
    listed = (await gateway.ok("GET", "/team/t/callback"))["data"]
    assert listed["callbacks"] == [] and listed["settings_source"] == "none"
    stored = await gateway.tl.store.get_key(gw.hash_key(key))
    assert [e["callback_vars"] for e in stored.metadata["logging"]] == [{"jsonl_path": "old.jsonl"}]


@pytest.mark.parametrize(
    ("config_allowlist", "env_allowlist", "allowed", "refused"),
    [
        (None, None, "LANGFUSE_TLM_X", "MYCORP_LF_X"),
        (["MYCORP_LF_*"], None, "MYCORP_LF_X", "LANGFUSE_TLM_X"),  # the config file's list
        (["MYCORP_LF_*"], "TENANT_A_*, LANGFUSE_TLM_*", "TENANT_A_X", "MYCORP_LF_X"),  # env wins
    ],
)
async def test_the_operator_allowlist_comes_from_tlm_env_allowlist_or_the_config_file(
    start_gateway: StartGateway,
    fake_langfuse: FakeLangfuse,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    config_allowlist: list[str] | None,
    env_allowlist: str | None,
    allowed: str,
    refused: str,
) -> None:
    project = fake_langfuse.add_project()
    config_path = tmp_path / "operator.yaml"
    config: dict[str, Any] = {"default_callbacks": []}
    if config_allowlist is not None:
        config["team_logging"] = {"env_allowlist": config_allowlist}
    config_path.write_text(json.dumps(config))
    environ = {"TLM_MASTER_KEY": "sk-operator", "TLM_FLUSH_INTERVAL": "0.01"}
    if env_allowlist is not None:
        environ["TLM_ENV_ALLOWLIST"] = env_allowlist
    settings = gw.GatewaySettings.from_args(
        [
            "--db",
            str(tmp_path / "allow.db"),
            "--config",
            str(config_path),
            "--jsonl-dir",
            str(tmp_path / "logs"),
        ],
        environ=environ,
    )
    gateway = await start_gateway(settings=settings)
    master = "sk-operator"

    response = await gateway.admin(
        "POST", "/team/t/callback", env_entry(fake_langfuse, refused, refused), token=master
    )
    assert_refused(response, "callback_vars.langfuse_public_key", repr(refused), "allowlist")
    public_var, secret_var = f"{allowed}_PK", f"{allowed}_SK"
    response = await gateway.admin(
        "POST", "/team/t/callback", env_entry(fake_langfuse, public_var, secret_var), token=master
    )
    assert response.status_code == 200, response.text

    monkeypatch.setenv(public_var, project.public_key)
    monkeypatch.setenv(secret_var, project.secret_key)
    response = await gateway.admin("POST", "/key/generate", {"team_id": "t"}, token=master)
    key = response.json()["key"]
    await gateway.chat(key, "allowed-name")
    await gateway.settle()
    assert langfuse_ids(fake_langfuse, project) == ["allowed-name"]
    assert_only_authenticated_exports(fake_langfuse, [project])


async def test_the_static_config_file_may_reference_any_variable(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = fake_langfuse.add_project()
    monkeypatch.setenv("OPERATOR_ONLY_LF_PUBLIC", project.public_key)
    monkeypatch.setenv("OPERATOR_ONLY_LF_SECRET", project.secret_key)
    gateway = await start_gateway(
        config={
            "default_team_settings": [
                {
                    # LiteLLM's flat form, as in the docs, with the alias langfuse_secret.
                    "team_id": "cfg",
                    "success_callback": ["langfuse"],
                    "langfuse_public_key": "os.environ/OPERATOR_ONLY_LF_PUBLIC",
                    "langfuse_secret": "os.environ/OPERATOR_ONLY_LF_SECRET",
                    "langfuse_host": fake_langfuse.url,
                }
            ]
        }
    )
    key = await gateway.key("cfg")
    await gateway.chat(key, "from-config")
    await gateway.settle()
    assert langfuse_ids(fake_langfuse, project) == ["from-config"]
    assert_only_authenticated_exports(fake_langfuse, [project])
    response = await gateway.admin("GET", "/team/cfg/callback")
    assert response.json()["data"]["callback_vars"]["langfuse"]["langfuse_secret_key"] == (
        "os.environ/OPERATOR_ONLY_LF_SECRET"
    )
    assert project.secret_key not in response.text
    # The same name written through the API is refused: the file's trust does not carry over.
    response = await gateway.admin(
        "POST",
        "/team/cfg/callback",
        env_entry(fake_langfuse, "OPERATOR_ONLY_LF_PUBLIC", "OPERATOR_ONLY_LF_SECRET"),
    )
    assert_refused(response, "callback_vars.langfuse_public_key", "allowlist")


async def test_a_delegated_team_admin_cannot_use_env_refs_anywhere(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = fake_langfuse.add_project()
    monkeypatch.setenv(PUBLIC_VAR, project.public_key)
    monkeypatch.setenv(SECRET_VAR, project.secret_key)
    gateway = await start_gateway()
    admin_key = await gateway.key("team-a", metadata={"team_admin": True})
    # The operator (master key) gave one of the team's keys env-based logging.
    operated = await gateway.key(
        "team-a", key_alias="operated", metadata={"logging": [env_entry(fake_langfuse)]}
    )
    refusal = "may only be set with the master key or in the static config file"

    # Names inside the allowlist, and the secret through its alias: refused on every route.
    for entry in (env_entry(fake_langfuse), env_entry(fake_langfuse, alias=True)):
        response = await gateway.admin("POST", "/team/team-a/callback", entry, token=admin_key)
        assert_refused(response, "callback_vars.langfuse_public_key", refusal)
        response = await gateway.admin(
            "POST",
            "/key/generate",
            {"team_id": "team-a", "metadata": {"logging": [entry]}},
            token=admin_key,
        )
        assert_refused(response, "metadata.logging[0].callback_vars.langfuse_public_key", refusal)
        response = await gateway.admin(
            "POST",
            "/key/update",
            {"key": operated, "metadata": {"logging": [entry]}},
            token=admin_key,
        )
        assert_refused(response, "metadata.logging[0].callback_vars.langfuse_public_key", refusal)

    # The same entry with literal values is fine for the team admin.
    literal = {"callback_name": "langfuse", "callback_vars": fake_langfuse.callback_vars(project)}
    response = await gateway.admin("POST", "/team/team-a/callback", literal, token=admin_key)
    assert response.status_code == 200, response.text
    assert project.secret_key not in response.text
    # Changing something else on the operator's key keeps its env-based entry in force.
    response = await gateway.admin(
        "POST", "/key/update", {"key": operated, "metadata": {"tags": ["a"]}}, token=admin_key
    )
    assert response.status_code == 200, response.text
    await gateway.chat(operated, "operated-key")
    await gateway.settle()
    # Team entry and key entry are the same project with different spellings of the pair
    # (literal vs. references): two targets, so the project receives the record twice.
    assert langfuse_ids(fake_langfuse, project) == ["operated-key", "operated-key"]
    assert_only_authenticated_exports(fake_langfuse, [project])
    listed = (await gateway.ok("GET", "/team/team-a/callback"))["data"]
    assert all("os.environ/" not in json.dumps(c) for c in listed["callbacks"])


async def test_an_unset_variable_fails_delivery_visibly_without_leaking(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, monkeypatch: pytest.MonkeyPatch
) -> None:
    project: Project = fake_langfuse.add_project()
    monkeypatch.delenv(PUBLIC_VAR, raising=False)
    monkeypatch.setenv(SECRET_VAR, project.secret_key)
    gateway = await start_gateway()
    await gateway.ok("POST", "/team/t/callback", env_entry(fake_langfuse))
    await gateway.add_callback("t", jsonl_entry("t.jsonl"))
    key = await gateway.key("t")
    await gateway.chat(key, "unset")
    await gateway.settle()
    # The other destination is unaffected; the Langfuse one could not be built.
    assert gateway.jsonl_ids("t.jsonl") == ["unset"]
    assert fake_langfuse.requests() == []
    health = await gateway.admin("GET", "/health")
    destinations = health.json()["dispatcher"]["destinations"].values()
    (langfuse,) = [d for d in destinations if d["callback_name"] == "langfuse"]
    assert langfuse["sent"] == 0 and sum(langfuse["dropped"].values()) == 1
    assert PUBLIC_VAR in (langfuse["last_error"] or "")
    assert project.secret_key not in health.text
