"""Where logs may be sent: destination hosts are checked when written and again when sending.

* Only ``http``/``https`` URLs are accepted, without credentials, spaces or control characters.
* Link-local and cloud-metadata addresses (``169.254.0.0/16``, ``fd00:ec2::254``, ...) are refused
  when a callback is written (admin 400, store unchanged) in every spelling the system resolver
  accepts (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``169.254.43518``, IPv4-mapped
  IPv6), and again when records are sent: a name that resolves (or is re-pointed) to such an
  address is refused after resolution — counted as a failure, no connection made — and an entry
  that reached the store without the write-time check is refused before anything is sent.
* A team admin admitted through ``authorize`` may only use the hosts of the operator's
  ``delegated_host_allowlist``.

Send-time tests run the real middleware, dispatcher and Langfuse sink against the fake Langfuse
server; where a host *name* must resolve to a chosen address, the sink's resolver answers as a
DNS server would (the test cannot edit the system's DNS), and the connection still goes to the
real fake server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from team_logging_middleware._types import Caller
from team_logging_middleware.admin import Principal, create_admin_app
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.sinks import default_registry
from team_logging_middleware.sinks import langfuse as langfuse_sink
from team_logging_middleware.sinks.base import SinkContext, SinkRegistry
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.fixtures.fake_langfuse import FakeLangfuse
from tests.helpers import asgi_http_scope

pytestmark = pytest.mark.timeout(60)

MASTER = "sk-master-hosts-0123456789"
AUTH = {"Authorization": f"Bearer {MASTER}"}
ALICE = {"Authorization": "Bearer alice-token"}

METADATA_SPELLINGS = [
    "169.254.169.254",
    "169.254.0.1:8080",
    "[fd00:ec2::254]",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
    "[fe80::1]",
    "100.100.100.200",
    # Shorthand IPv4 forms: getaddrinfo reads every one of these as 169.254.169.254.
    "2852039166",
    "0xa9fea9fe",
    "0xA9FEA9FE:4318",
    "0251.0376.0251.0376",
    "169.254.43518",
    "169.16689662",
]


HOSTS_SECRET = "sk-lf-hosts-secret-0001"


def langfuse_entry(host: str, secret: str = HOSTS_SECRET) -> dict[str, Any]:
    return {
        "callback_name": "langfuse",
        "callback_type": "success_and_failure",
        "callback_vars": {
            "langfuse_public_key": "pk-lf-hosts",
            "langfuse_secret_key": secret,
            "langfuse_host": host,
        },
    }


def otel_entry(endpoint: str, protocol: str = "http/protobuf") -> dict[str, Any]:
    return {
        "callback_name": "otel",
        "callback_vars": {"otel_endpoint": endpoint, "otel_protocol": protocol},
    }


# -- the admin app ----------------------------------------------------------------------------


async def _alice(request: Request, team_id: str | None) -> Principal | None:
    if request.headers.get("authorization") == ALICE["Authorization"]:
        return Principal(subject="alice", teams=frozenset({"a"}))
    return None


AdminClient = Callable[..., Awaitable[tuple[httpx.AsyncClient, TeamLogging]]]


@pytest.fixture
async def admin_client(tmp_path: Path) -> AsyncIterator[AdminClient]:
    opened: list[tuple[httpx.AsyncClient, TeamLogging]] = []

    async def make(**admin_options: Any) -> tuple[httpx.AsyncClient, TeamLogging]:
        team_logging = TeamLogging(None, registry=default_registry(jsonl_dir=tmp_path))
        await team_logging.start()
        app = create_admin_app(team_logging, master_key=MASTER, **admin_options)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://admin.test"
        )
        opened.append((client, team_logging))
        return client, team_logging

    yield make
    for client, team_logging in opened:
        await client.aclose()
        await team_logging.stop()


async def refused(
    client: httpx.AsyncClient, team: str, entry: Mapping[str, Any], param: str, headers: Any = None
) -> str:
    response = await client.post(f"/team/{team}/callback", json=entry, headers=headers or AUTH)
    assert response.status_code == 400, (entry, response.text)
    error = response.json()["error"]
    assert error["param"] == param, error
    message: str = error["message"]
    return message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://logs.example.com",
        "file:///etc/passwd",
        "gopher://logs.example.com:70/_x",
        "ws://logs.example.com",
        "javascript:alert(1)",
        "data:text/plain,x",
        "logs.example.com",
        "//logs.example.com",
        "http://",
        "http://user:pw@logs.example.com",
        "https://logs.example.com?token=1",
        "https://logs.example.com#frag",
        "http://logs.example.com:0",
        "http://logs.example.com:99999",
        "https://logs.example.com\n.evil.example",
        "https://evil.example\\@logs.example.com",
        "https://logs .example.com",
        "https://logs.example.com\x00",
    ],
)
async def test_only_plain_http_and_https_urls_are_accepted(
    admin_client: AdminClient, url: str
) -> None:
    client, team_logging = await admin_client()
    message = await refused(client, "t", langfuse_entry(url), "callback_vars.langfuse_host")
    assert "pw" not in message  # credentials in a refused URL are not echoed
    await refused(client, "t", otel_entry(url), "callback_vars.otel_endpoint")
    assert await team_logging.store.get_team("t") is None


@pytest.mark.parametrize("host", METADATA_SPELLINGS)
async def test_metadata_and_link_local_hosts_are_refused_when_written(
    admin_client: AdminClient, host: str
) -> None:
    client, team_logging = await admin_client()
    for scheme in ("http", "https"):
        message = await refused(
            client, "t", langfuse_entry(f"{scheme}://{host}"), "callback_vars.langfuse_host"
        )
        assert "logs cannot be sent there" in message
        await refused(
            client, "t", otel_entry(f"{scheme}://{host}/v1/traces"), "callback_vars.otel_endpoint"
        )
    await refused(client, "t", otel_entry(host, "grpc"), "callback_vars.otel_endpoint")
    # Every refusal above used the master key: nobody is exempt. Nothing was stored.
    assert await team_logging.store.get_team("t") is None


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f.1", "10.1.2.3", "[::1]", "collector.internal", "192.168.0.9"],
)
async def test_loopback_private_and_named_hosts_stay_allowed(
    admin_client: AdminClient, host: str
) -> None:
    client, _ = await admin_client()
    response = await client.post(
        "/team/t/callback", json=langfuse_entry(f"http://{host}:3000"), headers=AUTH
    )
    assert response.status_code == 200, response.text


# -- send time ----------------------------------------------------------------------------------


class Dns:
    """The answers a DNS server would give for the names the test uses; counts lookups."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups += 1
        if host not in self.answers:
            raise OSError(f"{host}: name or service not known")
        return list(self.answers[host])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry_with_dns(dns: Dns, clock: Clock) -> SinkRegistry:
    """The default registry whose Langfuse destinations resolve host names through ``dns``."""

    def build(resolved: Mapping[str, str], ctx: SinkContext) -> langfuse_sink.LangfuseSink:
        langfuse_sink.validate_langfuse_vars(resolved)
        return langfuse_sink.LangfuseSink(
            public_key=resolved["langfuse_public_key"],
            secret_key=resolved["langfuse_secret_key"],
            host=resolved["langfuse_host"],
            http=ctx.http,
            timeout=ctx.timeout,
            resolver=dns,
            timer=clock,
        )

    registry = default_registry()
    registry.register(dataclasses.replace(langfuse_sink.SINK_TYPE, factory=build), replace=True)
    return registry


async def _resolve(scope: Any) -> Caller | None:
    token = bearer_token(scope)
    return None if token is None else Caller(team_id=token, key_alias=token)


async def chat(app: Any, team: str, request_id: str) -> int:
    """One chat request driven at the ASGI level; returns the status the client got."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": request_id}]})
    scope = asgi_http_scope(
        "/v1/chat/completions",
        [
            (b"authorization", f"Bearer {team}".encode()),
            (b"x-request-id", request_id.encode()),
            (b"content-type", b"application/json"),
        ],
        asgi={"version": "3.0"},
        client=("127.0.0.1", 5000),
        server=("127.0.0.1", 80),
    )
    messages = [{"type": "http.request", "body": body.encode(), "more_body": False}]
    status = 0

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # a server blocks until the client goes away
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id":"x","choices":[]}'})


def lane_of(team_logging: TeamLogging, team: str) -> dict[str, Any]:
    lanes = [
        lane
        for lane in team_logging.dispatcher.stats()["destinations"].values()
        if lane["team_ids"] == [team]
    ]
    assert len(lanes) == 1
    return lanes[0]


async def test_a_name_re_pointed_at_the_metadata_service_is_refused_at_send_time(
    fake_langfuse: FakeLangfuse,
) -> None:
    project = fake_langfuse.add_project()
    dns, clock = Dns(), Clock()
    name = "logs.tenant.test"
    dns.answers[name] = ["127.0.0.1"]
    store = MemorySettingsStore()
    entry = langfuse_entry(f"http://{name}:{fake_langfuse.port}", project.secret_key)
    entry["callback_vars"]["langfuse_public_key"] = project.public_key
    await store.put_team(TeamSettings(team_id="t", callbacks=[CallbackSpec(**entry)]))
    team_logging = TeamLogging(
        _resolve,
        store=store,
        registry=registry_with_dns(dns, clock),
        dispatcher_options={"flush_interval": 0.01, "backoff_base": 0.01, "backoff_max": 0.05},
    )
    app = TeamLoggingMiddleware(echo_app, team_logging=team_logging)
    dispatcher = team_logging.dispatcher

    async def send_one(request_id: str) -> None:
        assert await chat(app, "t", request_id) == 200
        report = await dispatcher.flush(timeout=10)
        assert report.pending == 0

    async with app:
        await send_one("while-safe")
        assert fake_langfuse.span_count(project.public_key) == 1
        # The connection went to the checked address, with the tenant's host name kept.
        assert fake_langfuse.requests()[-1].headers["host"] == f"{name}:{fake_langfuse.port}"

        blocked_answers = [
            ["169.254.169.254"],
            ["127.0.0.1", "169.254.169.254"],  # one bad answer among good ones is enough
            ["fd00:ec2::254"],
            ["::ffff:169.254.169.254"],
            ["fe80::1%2"],
        ]
        for index, answer in enumerate(blocked_answers):
            dns.answers[name] = answer
            clock.now += 60  # past the pinned address's lifetime: the name is resolved again
            seen = len(fake_langfuse.requests())
            await send_one(f"re-pointed-{index}")
            assert len(fake_langfuse.requests()) == seen, "a request left for a blocked address"
            lane = lane_of(team_logging, "t")
            assert lane["failed"] == index + 1
            assert lane["retried"] == 0  # refused outright, not an unreachable host
            assert "resolves to a" in lane["last_error"]
            assert "refusing to send" in lane["last_error"]

        dns.answers[name] = ["127.0.0.1"]
        clock.now += 60
        await send_one("safe-again")
    got = {
        g["trace"]["metadata"]["request_id"] for g in fake_langfuse.generations(project.public_key)
    }
    assert got == {"while-safe", "safe-again"}


@pytest.mark.parametrize("host", ["2852039166", "0xa9fea9fe", "169.254.43518", "[fd00:ec2::254]"])
async def test_an_unchecked_stored_entry_is_refused_before_anything_is_sent(host: str) -> None:
    """An entry written straight into the store (by hand, or by an older version) is checked
    again when its destination is built: no request, the records counted with the reason."""
    store = MemorySettingsStore()
    callbacks = [
        CallbackSpec(**langfuse_entry(f"http://{host}:3000")),
        CallbackSpec(**otel_entry(f"http://{host}:4318/v1/traces")),
    ]
    await store.put_team(TeamSettings(team_id="t", callbacks=callbacks))
    team_logging = TeamLogging(_resolve, store=store, dispatcher_options={"flush_interval": 0.01})
    app = TeamLoggingMiddleware(echo_app, team_logging=team_logging)
    async with app:
        for index in range(3):
            assert await chat(app, "t", f"r{index}") == 200
        report = await team_logging.dispatcher.flush(timeout=10)
        stats = team_logging.dispatcher.stats()
    assert report.pending == 0 and stats["sent"] == 0
    lanes = list(stats["destinations"].values())
    assert sorted(lane["callback_name"] for lane in lanes) == ["langfuse", "otel"]
    for lane in lanes:
        assert lane["dropped"] == {"build_failed": 3}, lane
        assert lane["retried"] == 0
        assert "logs cannot be sent there" in lane["last_error"], lane["last_error"]


# -- the operator's allowlist for team admins ----------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "allowed"),
    [
        (langfuse_entry("https://eu.langfuse.com"), True),
        (langfuse_entry("https://EU.Langfuse.com"), True),
        (otel_entry("https://collector.internal/v1/traces"), True),
        (otel_entry("collector.internal:4317", "grpc"), True),
        (otel_entry("http://collector.internal:4317", "grpc"), True),
        (langfuse_entry("https://langfuse.com.evil.example"), False),
        (langfuse_entry("https://eu.langfuse.com.evil.example"), False),
        (langfuse_entry("https://evillangfuse.com"), False),
        (langfuse_entry("https://evil.example/.langfuse.com"), False),
        (langfuse_entry("https://eu.langfuse.com.:443"), False),
        (langfuse_entry("https://eu.langfuse.com@evil.example"), False),
        (langfuse_entry("https://evil.example\\@eu.langfuse.com"), False),
        (langfuse_entry("https://evil.example\n.langfuse.com"), False),
        (langfuse_entry("https://evil.example\uff0elangfuse.com"), False),
        (langfuse_entry("https://10.0.0.1"), False),
        (langfuse_entry("https://[::1]"), False),
        (otel_entry("https://collector.internal.evil.example/v1/traces"), False),
        (otel_entry("evil.example:4317", "grpc"), False),
        (otel_entry("collector.internal:4317@evil.example:1", "grpc"), False),
    ],
)
async def test_team_admins_may_only_use_the_allowed_hosts(
    admin_client: AdminClient, entry: dict[str, Any], allowed: bool
) -> None:
    client, team_logging = await admin_client(
        authorize=_alice, delegated_host_allowlist=["*.langfuse.com", "collector.internal"]
    )
    response = await client.post("/team/a/callback", json=entry, headers=ALICE)
    if allowed:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("callback_vars.")
    assert await team_logging.store.get_team("a") is None


async def test_the_operator_is_not_bound_by_the_team_admin_allowlist(
    admin_client: AdminClient,
) -> None:
    client, _ = await admin_client(
        authorize=_alice, delegated_host_allowlist=["*.langfuse.com", "collector.internal"]
    )
    for entry in (
        langfuse_entry("https://langfuse.example.org"),
        langfuse_entry("http://10.0.0.1:3000"),
        otel_entry("https://otel.example.org/v1/traces"),
    ):
        assert (await client.post("/team/a/callback", json=entry, headers=ALICE)).status_code == 400
        response = await client.post("/team/a/callback", json=entry, headers=AUTH)
        assert response.status_code == 200, response.text
