"""Who logs where: every precedence rule of the README, proven on the example gateway.

Each test runs ``examples/gateway.py``'s ``create_gateway`` under a real uvicorn in the test's
event loop and reads records where they land: JSONL files, the fake Langfuse server (per project,
with its own auth check), the OTLP receiver and the fake GCS server. Requests are told apart by
their ``x-request-id`` (kept as the record's ``request_id`` everywhere).

"Nothing arrived" is never proven by sleeping: :meth:`GatewayUnderTest.settle` waits until every
HTTP call the server accepted has returned through the middleware (so its exchange, if any, was
submitted) and then flushes the dispatcher, which resolves only once every submitted record was
delivered or dropped. The GDPR test also sends a later request through the very same
destinations and waits for it, as the issue asks.

One test per row of the table in the README's "Who logs where".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from team_logging_middleware.records import REDACTED
from tests.fixtures.fake_langfuse import FakeLangfuse, Project, langfuse_view
from tests.fixtures.gcs_server import GcsServer
from tests.fixtures.otlp_receiver import OtlpReceiver
from tests.fixtures.servers import run_uvicorn_async
from tests.helpers import asgi_http_scope, gateway_settings, load_gateway, wait_until

MASTER = "sk-precedence-master"
AUTH = {"Authorization": f"Bearer {MASTER}"}
DEADLINE = 15.0

Scope = dict[str, Any]
Message = dict[str, Any]


gw = load_gateway()


# -- the gateway under test ------------------------------------------------------------------


class CallTracker:
    """An outer ASGI layer counting HTTP calls that have fully returned.

    The middleware submits a request's exchange in its ``finally``, which can run after the
    client already read the whole response (a streaming response leaves its task group after the
    last byte). Once ``finished == started`` every exchange of every answered request has been
    handed to the dispatcher.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.started = 0
        self.finished = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.started += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.finished += 1


class GatewayUnderTest:
    """A running example gateway plus helpers to drive it and read its JSONL directory."""

    def __init__(
        self, gateway: Any, tracker: CallTracker, client: httpx.AsyncClient, logs: Path
    ) -> None:
        self.gateway = gateway
        self.tracker = tracker
        self.client = client
        self.logs = logs

    @property
    def tl(self) -> Any:
        return self.gateway.team_logging

    @property
    def app(self) -> Any:
        """The served ASGI app (for scripted ASGI-level calls)."""
        return self.tracker

    async def admin(
        self, method: str, path: str, body: Any = None, *, token: str = MASTER
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        if body is None:
            return await self.client.request(method, path, headers=headers)
        return await self.client.request(method, path, json=body, headers=headers)

    async def ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = await self.admin(method, path, body)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def add_callback(self, team_id: str, entry: Mapping[str, Any]) -> None:
        await self.ok("POST", f"/team/{team_id}/callback", dict(entry))

    async def key(self, team_id: str | None, **body: Any) -> str:
        data = await self.ok("POST", "/key/generate", {"team_id": team_id, **body})
        key: str = data["key"]
        return key

    async def chat(
        self,
        key: str,
        rid: str,
        *,
        text: str | None = None,
        stream: bool = False,
        fail: bool = False,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One chat completion identified by ``rid``; ``fail`` leaves out ``model`` (a 400)."""
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text or rid}]}
        if not fail:
            body["model"] = "gpt-4"
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        body.update(extra or {})
        all_headers = {"Authorization": f"Bearer {key}", "x-request-id": rid, **(headers or {})}
        response = await self.client.post(
            "/v1/chat/completions", json=body, headers=all_headers, params=params
        )
        assert response.status_code == (400 if fail else 200), response.text
        return response

    async def settle(self) -> None:
        """Every answered request has been submitted, and every submitted record resolved."""
        tracker = self.tracker
        await wait_until(lambda: tracker.finished >= tracker.started, "in-flight requests")
        report = await self.tl.dispatcher.flush(DEADLINE)
        assert not report.timed_out, report

    def submitted(self) -> int:
        count: int = self.tl.dispatcher.stats()["submitted"]
        return count

    def jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.logs / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def jsonl_ids(self, name: str) -> list[str]:
        return sorted(r["request_id"] for r in self.jsonl(name))


StartGateway = Callable[..., Awaitable[GatewayUnderTest]]


@contextlib.asynccontextmanager
async def gateway_factory(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Factory: ``await start(config={...}, **GatewaySettings fields)``; all stopped on exit.

    ``config`` is written to a YAML file and used as the static config file; ``settings`` may
    instead be a complete ``GatewaySettings`` (e.g. from ``GatewaySettings.from_args``).
    """
    async with contextlib.AsyncExitStack() as stack:
        counter = itertools.count()

        async def start(
            *, config: Mapping[str, Any] | None = None, settings: Any = None, **overrides: Any
        ) -> GatewayUnderTest:
            n = next(counter)
            if settings is None:
                config_path: str | None = None
                if config is not None:
                    path = tmp_path / f"config{n}.yaml"
                    path.write_text(yaml.safe_dump(dict(config)))
                    config_path = str(path)
                options: dict[str, Any] = {
                    "config": config_path,
                    "master_key": MASTER,
                    "flush_interval": 0.01,
                    **overrides,
                }
                settings = gateway_settings(tmp_path, f"gateway{n}.db", **options)
            gateway = gw.create_gateway(settings)
            tracker = CallTracker(gateway.app)
            base_url = await stack.enter_async_context(run_uvicorn_async(tracker))
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, timeout=DEADLINE)
            )
            return GatewayUnderTest(gateway, tracker, client, Path(settings.jsonl_dir))

        yield start


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """The example gateway factory of :func:`gateway_factory`, for one test."""
    async with gateway_factory(tmp_path) as start:
        yield start


# -- reading destinations --------------------------------------------------------------------


def jsonl_entry(path: str, callback_type: str = "success_and_failure") -> dict[str, Any]:
    return {
        "callback_name": "jsonl",
        "callback_type": callback_type,
        "callback_vars": {"jsonl_path": path},
    }


def default_jsonl_config(teams: list[dict[str, Any]]) -> dict[str, Any]:
    """A config file whose global default is ``default.jsonl``, with these team entries."""
    return {"default_callbacks": [jsonl_entry("default.jsonl")], "default_team_settings": teams}


async def start_with_team(
    start_gateway: StartGateway, team: dict[str, Any], *, in_config: bool
) -> GatewayUnderTest:
    """A gateway whose global default is ``default.jsonl``, and one team.

    ``in_config``: the team's whole entry is in the config file. Otherwise only its callbacks
    are added, through the admin API; its other fields are for the test to set.
    """
    gateway = await start_gateway(config=default_jsonl_config([team] if in_config else []))
    if not in_config:
        for entry in team["callbacks"]:
            await gateway.add_callback(team["team_id"], entry)
    return gateway


def langfuse_entry(
    fake: FakeLangfuse, project: Project, callback_type: str = "success_and_failure"
) -> dict[str, Any]:
    return {
        "callback_name": "langfuse",
        "callback_type": callback_type,
        "callback_vars": fake.callback_vars(project),
    }


def langfuse_ids(fake: FakeLangfuse, project: Project) -> list[str]:
    """Request ids of every span the project received (duplicates included)."""
    return sorted(
        langfuse_view(span)["trace"]["metadata"]["request_id"]
        for span in fake.spans(project.public_key)
    )


def langfuse_by_id(fake: FakeLangfuse, project: Project) -> dict[str, dict[str, Any]]:
    views = [langfuse_view(span) for span in fake.spans(project.public_key)]
    return {v["trace"]["metadata"]["request_id"]: v for v in views}


def assert_only_authenticated_exports(fake: FakeLangfuse, projects: Iterable[Project]) -> None:
    """Every export the fake saw carried one of ``projects``' own key pairs, and was accepted."""
    pairs = {p.public_key: p.secret_key for p in projects}
    for request in fake.requests():
        assert request.status == 200, request
        assert request.public_key in pairs, request
        scheme, _, encoded = request.headers["authorization"].partition(" ")
        assert scheme == "Basic"
        public, _, secret = base64.b64decode(encoded).decode().partition(":")
        assert (public, secret) == (request.public_key, pairs[request.public_key])


async def wait_for_ids(read: Callable[[], list[str]], expected: Iterable[str], what: str) -> None:
    wanted = set(expected)
    await wait_until(lambda: wanted <= set(read()), what)


# -- rule 1: the union of sources; API settings replace the config entry ------------------------


async def test_rule1_destinations_are_defaults_config_api_and_key_entries(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse
) -> None:
    p_config, p_api, p_key = (fake_langfuse.add_project(name=n) for n in ("config", "api", "key"))
    gateway = await start_gateway(
        config={
            "default_callbacks": [jsonl_entry("default.jsonl")],
            "default_team_settings": [
                {
                    "team_id": "t-config",
                    "callbacks": [
                        jsonl_entry("config.jsonl"),
                        langfuse_entry(fake_langfuse, p_config),
                    ],
                },
                {
                    "team_id": "t-optout",
                    "inherit_defaults": False,
                    "callbacks": [jsonl_entry("optout.jsonl")],
                },
            ],
        }
    )
    key = await gateway.key(
        "t-config",
        metadata={"logging": [jsonl_entry("key.jsonl"), langfuse_entry(fake_langfuse, p_key)]},
    )
    plain = await gateway.key("t-plain")
    optout = await gateway.key("t-optout")

    def landed() -> dict[str, list[str]]:
        return {
            "default": gateway.jsonl_ids("default.jsonl"),
            "config": gateway.jsonl_ids("config.jsonl"),
            "langfuse-config": langfuse_ids(fake_langfuse, p_config),
            "langfuse-api": langfuse_ids(fake_langfuse, p_api),
            "key": gateway.jsonl_ids("key.jsonl"),
            "langfuse-key": langfuse_ids(fake_langfuse, p_key),
            "optout": gateway.jsonl_ids("optout.jsonl"),
        }

    # Only the static config: the defaults, the config entry and the key's entries.
    await gateway.chat(key, "r1")
    await gateway.chat(plain, "r1-plain")  # a team nobody configured: the defaults only
    await gateway.chat(optout, "r1-optout")  # inherit_defaults: false in the config file
    await gateway.settle()
    assert landed() == {
        "default": ["r1", "r1-plain"],
        "config": ["r1"],
        "langfuse-config": ["r1"],
        "langfuse-api": [],
        "key": ["r1"],
        "langfuse-key": ["r1"],
        "optout": ["r1-optout"],
    }

    # The first API write starts from a copy of the config entry: nothing the file gave is lost.
    await gateway.add_callback("t-config", langfuse_entry(fake_langfuse, p_api, "success"))
    listed = (await gateway.ok("GET", "/team/t-config/callback"))["data"]
    assert listed["settings_source"] == "api"
    assert [c["callback_name"] for c in listed["callbacks"]] == ["jsonl", "langfuse", "langfuse"]
    assert [d["source"] for d in listed["effective_destinations"]] == [
        "default",
        "team",
        "team",
        "team",
    ]
    await gateway.chat(key, "r2")
    await gateway.settle()
    expected = {
        "default": ["r1", "r1-plain", "r2"],
        "config": ["r1", "r2"],
        "langfuse-config": ["r1", "r2"],
        "langfuse-api": ["r2"],
        "key": ["r1", "r2"],
        "langfuse-key": ["r1", "r2"],
        "optout": ["r1-optout"],
    }
    assert landed() == expected

    # From then on the stored settings *replace* the config entry: deleting the copied entry
    # stops it, although the config file still lists it.
    await gateway.ok("DELETE", "/team/t-config/callback/jsonl")
    await gateway.chat(key, "r3")
    await gateway.settle()
    for name in ("default", "langfuse-config", "langfuse-api", "key", "langfuse-key"):
        expected[name] = sorted([*expected[name], "r3"])
    assert landed() == expected

    # The stored team opts out of the global defaults.
    await gateway.ok("PATCH", "/team/t-config/settings", {"inherit_defaults": False})
    await gateway.chat(key, "r4")
    await gateway.settle()
    for name in ("langfuse-config", "langfuse-api", "key", "langfuse-key"):
        expected[name] = sorted([*expected[name], "r4"])
    assert landed() == expected
    assert_only_authenticated_exports(fake_langfuse, [p_config, p_api, p_key])


async def test_rule1_restart_keeps_api_settings_over_a_changed_config_file(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The config file is the starting point only: once the API wrote a team, a new version of
    the file (the operator redeploys) does not change that team, while untouched teams follow."""
    db = str(tmp_path / "shared.db")
    first = await start_gateway(
        db=db,
        config={
            "default_team_settings": [
                {"team_id": "written", "callbacks": [jsonl_entry("written-v1.jsonl")]},
                {"team_id": "untouched", "callbacks": [jsonl_entry("untouched-v1.jsonl")]},
            ]
        },
    )
    await first.add_callback("written", jsonl_entry("written-api.jsonl", "failure"))
    written = await first.key("written")
    untouched = await first.key("untouched")
    second = await start_gateway(
        db=db,
        config={
            "default_team_settings": [
                {"team_id": "written", "callbacks": [jsonl_entry("written-v2.jsonl")]},
                {"team_id": "untouched", "callbacks": [jsonl_entry("untouched-v2.jsonl")]},
            ]
        },
    )
    await second.chat(written, "w")
    await second.chat(written, "w-bad", fail=True)
    await second.chat(untouched, "u")
    await second.settle()
    assert second.jsonl_ids("written-v1.jsonl") == ["w", "w-bad"]
    assert second.jsonl_ids("written-api.jsonl") == ["w-bad"]
    assert second.jsonl_ids("written-v2.jsonl") == []
    assert second.jsonl_ids("untouched-v2.jsonl") == ["u"]
    assert second.jsonl_ids("untouched-v1.jsonl") == []


# -- rule 2: every entry keeps its own vars; exact duplicates are served once -------------------


async def test_rule2_entries_keep_their_own_vars_and_duplicates_are_served_once(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse
) -> None:
    p_team, p_key = fake_langfuse.add_project(name="team"), fake_langfuse.add_project(name="key")
    gateway = await start_gateway(
        config={"default_callbacks": [jsonl_entry("dup.jsonl", "success_and_failure")]}
    )
    # The team: its own Langfuse project; the shared file again, for failures only.
    await gateway.add_callback("t", langfuse_entry(fake_langfuse, p_team))
    await gateway.add_callback("t", jsonl_entry("dup.jsonl", "failure"))
    key = await gateway.key(
        "t",
        metadata={
            "logging": [
                # Another Langfuse project, with its own key pair.
                langfuse_entry(fake_langfuse, p_key, "success"),
                # The team's project again (an exact duplicate of the target).
                langfuse_entry(fake_langfuse, p_team, "success"),
                # Same callback name, two different targets: both served.
                jsonl_entry("k1.jsonl", "success"),
                jsonl_entry("k2.jsonl", "success"),
                # The global default's file again.
                jsonl_entry("dup.jsonl", "success"),
            ]
        },
    )
    await gateway.chat(key, "ok-1")
    await gateway.chat(key, "ok-2", stream=True)
    await gateway.chat(key, "bad-1", fail=True)
    await gateway.settle()

    assert langfuse_ids(fake_langfuse, p_team) == ["bad-1", "ok-1", "ok-2"]
    assert langfuse_ids(fake_langfuse, p_key) == ["ok-1", "ok-2"]
    assert gateway.jsonl_ids("k1.jsonl") == ["ok-1", "ok-2"]
    assert gateway.jsonl_ids("k2.jsonl") == ["ok-1", "ok-2"]
    # Listed three times (default, team, key), written once per request.
    assert gateway.jsonl_ids("dup.jsonl") == ["bad-1", "ok-1", "ok-2"]
    # Each project received its records under its own credentials, never the other's.
    assert_only_authenticated_exports(fake_langfuse, [p_team, p_key])
    assert {r.public_key for r in fake_langfuse.requests()} == {p_team.public_key, p_key.public_key}
    team_view = langfuse_by_id(fake_langfuse, p_team)["ok-1"]
    assert team_view["trace"]["metadata"]["team_id"] == "t"
    assert team_view["output"] == {"role": "assistant", "content": "You said: ok-1"}


# -- rule 3: callback_type routes outcomes ----------------------------------------------------


def scripted_upstream(release: asyncio.Event) -> Starlette:
    """An OpenAI-compatible upstream whose answer depends on the user's text.

    ``fail-400``/``fail-500``: that status; ``explode``: one SSE chunk, then the connection is cut
    (the gateway's relay raises); ``hang``: one SSE chunk, then nothing until ``release``;
    anything else: the mock model's answer.
    """
    model = gw.MockModel()

    def chunk(text: str) -> bytes:
        payload = {
            "id": "chatcmpl-upstream",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "gpt-4",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    async def chat(request: Request) -> Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        if text.startswith("fail-"):
            status = int(text.removeprefix("fail-"))
            return JSONResponse({"error": {"message": text, "type": "upstream"}}, status)
        if text in ("explode", "hang"):

            async def stream() -> AsyncIterator[bytes]:
                yield chunk("partial ")
                if text == "explode":
                    raise ConnectionAbortedError("the model backend went away mid-stream")
                await asyncio.wait_for(release.wait(), DEADLINE)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        response: Response = model.chat(body)
        return response

    return Starlette(routes=[Route("/chat/completions", chat, methods=["POST"])])


def http_scope(path: str, headers: Mapping[str, str], body: bytes) -> Scope:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"host", b"gateway.test"), (b"content-length", str(len(body)).encode())]
    return asgi_http_scope(path, raw, server=("127.0.0.1", 4000), state={})


async def call_and_disconnect(app: Any, scope: Scope, body: bytes) -> list[Message]:
    """Drive ``app`` at the ASGI level: the client leaves after the first body chunk arrives."""
    sent: list[Message] = []
    first_chunk = asyncio.Event()
    request_given = False

    async def receive() -> Message:
        nonlocal request_given
        if not request_given:
            request_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    await asyncio.wait_for(app(scope, receive, send), DEADLINE)
    return sent


async def test_rule3_callback_type_routes_each_outcome(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse
) -> None:
    release = asyncio.Event()
    async with run_uvicorn_async(scripted_upstream(release)) as upstream_url:
        gateway = await start_gateway(upstream=upstream_url)
        projects = {kind: fake_langfuse.add_project(name=kind) for kind in ("s", "f", "sf")}
        for kind, callback_type in (
            ("s", "success"),
            ("f", "failure"),
            ("sf", "success_and_failure"),
        ):
            await gateway.add_callback("t", jsonl_entry(f"{kind}.jsonl", callback_type))
            await gateway.add_callback(
                "t", langfuse_entry(fake_langfuse, projects[kind], callback_type)
            )
        key = await gateway.key("t")
        headers = {"Authorization": f"Bearer {key}"}

        async def send(rid: str, text: str, status: int | None) -> None:
            response = await gateway.client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4", "messages": [{"role": "user", "content": text}]},
                headers={**headers, "x-request-id": rid},
            )
            assert response.status_code == status, response.text

        await send("ok", "hello", 200)
        await send("http-400", "fail-400", 400)
        await send("http-500", "fail-500", 500)
        # The backend dies mid-stream: the gateway's relay raises, the client sees a cut stream.
        with pytest.raises(httpx.RemoteProtocolError):
            await send("exception", "explode", None)
        # The client leaves after the first chunk (scripted at the ASGI level, deterministic).
        body = json.dumps(
            {"model": "gpt-4", "messages": [{"role": "user", "content": "hang"}], "stream": True}
        ).encode()
        scope = http_scope(
            "/v1/chat/completions",
            {**headers, "content-type": "application/json", "x-request-id": "disconnected"},
            body,
        )
        sent = await call_and_disconnect(gateway.app, scope, body)
        assert sent[0]["status"] == 200 and b"partial" in sent[1]["body"]
        release.set()
        await gateway.settle()

    failures = ["disconnected", "exception", "http-400", "http-500"]
    assert gateway.jsonl_ids("s.jsonl") == ["ok"]
    assert gateway.jsonl_ids("f.jsonl") == failures
    assert gateway.jsonl_ids("sf.jsonl") == sorted([*failures, "ok"])
    assert langfuse_ids(fake_langfuse, projects["s"]) == ["ok"]
    assert langfuse_ids(fake_langfuse, projects["f"]) == failures
    assert langfuse_ids(fake_langfuse, projects["sf"]) == sorted([*failures, "ok"])

    outcomes = {r["request_id"]: (r["outcome"], r["status_code"]) for r in gateway.jsonl("f.jsonl")}
    assert outcomes == {
        "http-400": ("http_error", 400),
        "http-500": ("http_error", 500),
        "exception": ("exception", 200),
        "disconnected": ("client_disconnected", 200),
    }
    ok_record = gateway.jsonl("s.jsonl")[0]
    assert (ok_record["outcome"], ok_record["output"]) == ("ok", "You said: hello")
    views = langfuse_by_id(fake_langfuse, projects["f"])
    assert {rid: v["level"] for rid, v in views.items()} == dict.fromkeys(failures, "ERROR")
    assert views["disconnected"]["output"] == {"role": "assistant", "content": "partial "}
    assert_only_authenticated_exports(fake_langfuse, projects.values())


# -- rule 4: logging disabled on the team or the key: nothing leaves, nothing overrides it -------

# What a client might try in order to switch logging back on for its own request.
OVERRIDE_HEADERS = {
    "x-team-logging": "on",
    "x-litellm-enable-logging": "true",
    "x-logging-enabled": "true",
    "x-team-id": "open",
}
OVERRIDE_BODY: dict[str, Any] = {
    "metadata": {
        "logging": [jsonl_entry("client.jsonl")],
        "logging_enabled": True,
        "team_id": "open",
        "success_callback": ["jsonl"],
    },
    "litellm_metadata": {"logging": [jsonl_entry("client.jsonl")]},
    "logging": [jsonl_entry("client.jsonl")],
    "success_callback": ["langfuse"],
    "team_id": "open",
}
OVERRIDE_PARAMS = {"logging": "on", "team_id": "open"}


@pytest.mark.parametrize(
    "how", ["disable_logging", "patch_settings", "config_file", "key_generate", "key_update"]
)
async def test_rule4_disabled_logging_sends_nothing_anywhere(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, how: str
) -> None:
    p_team, p_key = fake_langfuse.add_project(name="team"), fake_langfuse.add_project(name="key")
    team_entries = [jsonl_entry("gdpr-team.jsonl"), langfuse_entry(fake_langfuse, p_team)]
    key_entries = [jsonl_entry("gdpr-key.jsonl"), langfuse_entry(fake_langfuse, p_key)]
    gateway = await start_with_team(
        start_gateway,
        {"team_id": "gdpr", "logging_enabled": False, "callbacks": team_entries},
        in_config=how == "config_file",
    )
    if how == "disable_logging":
        await gateway.ok("POST", "/team/gdpr/disable_logging")
    elif how == "patch_settings":
        await gateway.ok("PATCH", "/team/gdpr/settings", {"logging_enabled": False})
    elif how == "config_file":
        # A later API write starts from the config entry, switch included: still disabled.
        await gateway.add_callback("gdpr", jsonl_entry("gdpr-api.jsonl"))
    metadata: dict[str, Any] = {"logging": key_entries}
    if how == "key_generate":
        metadata["logging_enabled"] = False
    off = await gateway.key("gdpr", key_alias="off", metadata=metadata)
    if how == "key_update":
        await gateway.ok(
            "POST", "/key/update", {"key": off, "metadata": {"logging_enabled": False}}
        )
    # The sentinel: an enabled team whose key lists every destination the disabled requests
    # would have reached (same targets, so the same delivery lanes), plus the global default.
    on = await gateway.key("open", key_alias="on", metadata={"logging": team_entries + key_entries})
    await gateway.settle()
    before = gateway.submitted()

    await gateway.chat(off, "off-plain", text="gdpr secret one")
    await gateway.chat(off, "off-stream", text="gdpr secret two", stream=True)
    await gateway.chat(off, "off-failed", text="gdpr secret three", fail=True)
    await gateway.chat(
        off,
        "off-override",
        text="gdpr secret four",
        extra=OVERRIDE_BODY,
        headers=OVERRIDE_HEADERS,
        params=OVERRIDE_PARAMS,
    )
    await gateway.chat(
        off,
        "off-override-failed",
        text="gdpr secret five",
        fail=True,
        extra=OVERRIDE_BODY,
        headers=OVERRIDE_HEADERS,
    )
    await gateway.settle()
    # Not even captured: nothing about these requests was handed to the delivery side.
    assert gateway.submitted() == before

    await gateway.chat(on, "sentinel", text="open request")
    # Wait for the sentinel at every destination; the disabled requests went first.
    for name in ("default.jsonl", "gdpr-team.jsonl", "gdpr-key.jsonl"):
        await wait_for_ids(lambda n=name: gateway.jsonl_ids(n), ["sentinel"], name)
    for project in (p_team, p_key):
        await wait_for_ids(lambda p=project: langfuse_ids(fake_langfuse, p), ["sentinel"], "span")
    await gateway.settle()

    for name in ("default.jsonl", "gdpr-team.jsonl", "gdpr-key.jsonl"):
        assert gateway.jsonl_ids(name) == ["sentinel"], name
        assert b"gdpr secret" not in (gateway.logs / name).read_bytes()
    for name in ("client.jsonl", "gdpr-api.jsonl"):
        assert not (gateway.logs / name).exists(), name
    assert sorted(p.name for p in gateway.logs.iterdir()) == [
        "default.jsonl",
        "gdpr-key.jsonl",
        "gdpr-team.jsonl",
    ]
    # One export per project, carrying the sentinel's one span: zero bytes about the rest.
    for project in (p_team, p_key):
        exports = fake_langfuse.requests(project.public_key)
        assert [(r.status, r.span_count) for r in exports] == [(200, 1)]
        assert langfuse_ids(fake_langfuse, project) == ["sentinel"]
        assert "gdpr secret" not in json.dumps(fake_langfuse.spans(project.public_key))
    assert len(fake_langfuse.requests()) == 2
    assert_only_authenticated_exports(fake_langfuse, [p_team, p_key])

    if how == "disable_logging":
        # Disabling is non-destructive: enable_logging brings the team's callbacks back.
        await gateway.ok("POST", "/team/gdpr/enable_logging")
        plain = await gateway.key("gdpr")
        await gateway.chat(plain, "after-enable")
        await gateway.settle()
        assert gateway.jsonl_ids("gdpr-team.jsonl") == ["after-enable", "sentinel"]
        assert langfuse_ids(fake_langfuse, p_team) == ["after-enable", "sentinel"]


async def test_rule4_a_key_switched_off_on_one_replica_is_off_on_every_replica(
    start_gateway: StartGateway, redis_url: str, tmp_path: Path
) -> None:
    """Two gateway replicas sharing the Redis store: ``/key/update`` on one switches the key off
    (and tightens its message logging) on the other at once, not when a cached key expires."""
    first = await start_gateway(redis_url=redis_url)
    second = await start_gateway(redis_url=redis_url)
    entry = jsonl_entry("replicated.jsonl")
    off = await first.key("t", key_alias="off", metadata={"logging": [entry]})
    private = await first.key("t", key_alias="private", metadata={"logging": [entry]})
    sentinel = await first.key("t", key_alias="sentinel", metadata={"logging": [entry]})
    # The second replica resolves (and caches) both keys while they still log in full.
    await second.chat(off, "before")
    await second.chat(private, "private-before")
    await second.settle()
    assert second.jsonl_ids("replicated.jsonl") == ["before", "private-before"]

    notified = asyncio.Event()
    second.tl.store.subscribe(lambda team_id: notified.set() if team_id == "t" else None)
    await first.ok("POST", "/key/update", {"key": off, "metadata": {"logging_enabled": False}})
    await wait_until(notified.is_set, "the change notification on the second replica")
    notified.clear()
    await first.ok(
        "POST", "/key/update", {"key": private, "metadata": {"message_logging": "metadata_only"}}
    )
    await wait_until(notified.is_set, "the second change notification")

    await second.chat(off, "after", text="switched off elsewhere")
    await second.chat(private, "private-after", text="keep this out")
    await second.chat(sentinel, "sentinel")
    await second.settle()
    records = {r["request_id"]: r for r in second.jsonl("replicated.jsonl")}
    assert sorted(records) == ["before", "private-after", "private-before", "sentinel"]
    assert records["private-after"]["redacted"] is True
    raw = (tmp_path / "logs" / "replicated.jsonl").read_bytes()
    assert b"switched off elsewhere" not in raw and b"keep this out" not in raw


async def test_rule4_clients_cannot_add_destinations_to_an_enabled_team(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway()
    await gateway.add_callback("open", jsonl_entry("open.jsonl"))
    key = await gateway.key("open")
    await gateway.chat(
        key, "tries", extra=OVERRIDE_BODY, headers=OVERRIDE_HEADERS, params=OVERRIDE_PARAMS
    )
    await gateway.settle()
    assert gateway.jsonl_ids("open.jsonl") == ["tries"]
    assert sorted(p.name for p in gateway.logs.iterdir()) == ["open.jsonl"]


@pytest.mark.parametrize("how", ["team", "key"])
async def test_rule4_cache_hits_of_a_disabled_team_or_key_reach_no_destination(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse, how: str
) -> None:
    p_team, p_key = fake_langfuse.add_project(name="team"), fake_langfuse.add_project(name="key")
    team_entries = [jsonl_entry("gdpr-team.jsonl"), langfuse_entry(fake_langfuse, p_team)]
    key_entries = [jsonl_entry("gdpr-key.jsonl"), langfuse_entry(fake_langfuse, p_key)]
    gateway = await start_gateway(config={"default_callbacks": [jsonl_entry("default.jsonl")]})
    for entry in team_entries:
        await gateway.add_callback("gdpr", entry)
    await gateway.ok("PATCH", "/team/gdpr/settings", {"cache_enabled": True})
    off = await gateway.key("gdpr", key_alias="off", metadata={"logging": key_entries})
    # Prime the team's cache while everything still logs: this one is expected everywhere.
    primed = await gateway.chat(off, "prime", text="cached gdpr question")
    assert primed.headers["x-team-logging-cache"] == "miss"
    if how == "team":
        await gateway.ok("PATCH", "/team/gdpr/settings", {"logging_enabled": False})
    else:
        await gateway.ok(
            "POST", "/key/update", {"key": off, "metadata": {"logging_enabled": False}}
        )
    on = await gateway.key("open", key_alias="on", metadata={"logging": team_entries + key_entries})

    hit = await gateway.chat(off, "off-hit", text="cached gdpr question")
    assert hit.headers["x-team-logging-cache"] == "hit"
    assert hit.json() == primed.json()
    streamed = await gateway.chat(off, "off-stream-miss", text="cached gdpr question", stream=True)
    assert streamed.headers["x-team-logging-cache"] == "miss"
    streamed_hit = await gateway.chat(
        off, "off-stream-hit", text="cached gdpr question", stream=True
    )
    assert streamed_hit.headers["x-team-logging-cache"] == "hit"
    await gateway.chat(
        off, "off-hit-override", text="cached gdpr question", headers=OVERRIDE_HEADERS
    )
    await gateway.chat(on, "sentinel")
    for name in ("default.jsonl", "gdpr-team.jsonl", "gdpr-key.jsonl"):
        await wait_for_ids(lambda n=name: gateway.jsonl_ids(n), ["sentinel"], name)
    for project in (p_team, p_key):
        await wait_for_ids(lambda p=project: langfuse_ids(fake_langfuse, p), ["sentinel"], "span")
    await gateway.settle()

    for name in ("default.jsonl", "gdpr-team.jsonl", "gdpr-key.jsonl"):
        assert gateway.jsonl_ids(name) == ["prime", "sentinel"], name
    for project in (p_team, p_key):
        assert langfuse_ids(fake_langfuse, project) == ["prime", "sentinel"]
    assert not any(r["cache_hit"] for r in gateway.jsonl("default.jsonl"))


async def test_cache_hits_are_logged_per_plan_and_never_shared_between_teams(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse
) -> None:
    project = fake_langfuse.add_project(name="a")
    gateway = await start_gateway()
    await gateway.add_callback("a", jsonl_entry("a.jsonl"))
    await gateway.add_callback("a", langfuse_entry(fake_langfuse, project))
    await gateway.add_callback("b", jsonl_entry("b.jsonl"))
    for team in ("a", "b"):
        await gateway.ok("PATCH", f"/team/{team}/settings", {"cache_enabled": True})
    a_full = await gateway.key("a", key_alias="full")
    a_private = await gateway.key(
        "a", key_alias="private", metadata={"message_logging": "metadata_only"}
    )
    b_key = await gateway.key("b")

    question = "what is cached here"
    answers = {}
    for key, rid in (
        (a_full, "a-miss"),
        (a_full, "a-hit"),
        (a_private, "a-private-hit"),  # one cache per team; the key's own switches still apply
        (b_key, "b-miss"),  # another team never gets team a's answer
        (b_key, "b-hit"),
    ):
        response = await gateway.chat(key, rid, text=question)
        answers[rid] = (response.headers["x-team-logging-cache"], response.json()["id"])
    await gateway.settle()

    assert {rid: state for rid, (state, _) in answers.items()} == {
        "a-miss": "miss",
        "a-hit": "hit",
        "a-private-hit": "hit",
        "b-miss": "miss",
        "b-hit": "hit",
    }
    assert answers["a-hit"][1] == answers["a-miss"][1] == answers["a-private-hit"][1]
    assert answers["b-miss"][1] != answers["a-miss"][1]

    a_records = {r["request_id"]: r for r in gateway.jsonl("a.jsonl")}
    assert sorted(a_records) == ["a-hit", "a-miss", "a-private-hit"]
    assert [a_records[r]["cache_hit"] for r in ("a-miss", "a-hit", "a-private-hit")] == [
        False,
        True,
        True,
    ]
    assert a_records["a-hit"]["output"] == "You said: what is cached here"
    assert a_records["a-hit"]["usage"] == a_records["a-miss"]["usage"]
    private = a_records["a-private-hit"]
    assert (private["redacted"], private["messages"], private["output"]) == (
        True,
        REDACTED,
        REDACTED,
    )
    views = langfuse_by_id(fake_langfuse, project)
    assert sorted(views) == ["a-hit", "a-miss", "a-private-hit"]
    assert "cache_hit" in views["a-hit"]["trace"]["tags"]
    assert "cache_hit" not in views["a-miss"]["trace"]["tags"]
    assert views["a-private-hit"]["input"] == REDACTED
    assert gateway.jsonl_ids("b.jsonl") == ["b-hit", "b-miss"]


# -- rule 5: metadata_only, the stricter of team and key, in every destination ---------------

LOOSEN_HEADERS = {"x-message-logging": "full", "x-team-logging-message-logging": "full"}
LOOSEN_BODY: dict[str, Any] = {"metadata": {"message_logging": "full"}, "message_logging": "full"}


async def gcs_records(gcs: GcsServer, bucket: str) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for name in gcs.list_objects(bucket):
            for line in gcs.read_object(bucket, name).decode().splitlines():
                records.append(json.loads(line))
        return records

    return await asyncio.to_thread(read)


async def gcs_raw(gcs: GcsServer, bucket: str) -> bytes:
    def read() -> bytes:
        return b"".join(gcs.read_object(bucket, n) for n in gcs.list_objects(bucket))

    return await asyncio.to_thread(read)


@pytest.mark.parametrize(
    ("where", "team_mode", "key_mode"),
    [
        ("team", "metadata_only", "full"),  # the key asks for full: the stricter team wins
        ("key", "full", "metadata_only"),  # the key is stricter than its team
        ("config", "metadata_only", None),  # the config file's team entry
    ],
)
async def test_rule5_metadata_only_redacts_content_in_every_destination(
    start_gateway: StartGateway,
    fake_langfuse: FakeLangfuse,
    otlp_receiver: OtlpReceiver,
    gcs_server: GcsServer,
    where: str,
    team_mode: str,
    key_mode: str | None,
) -> None:
    project = fake_langfuse.add_project(name="redacted")
    bucket = await asyncio.to_thread(gcs_server.new_bucket)
    tenant = f"redact-{where}"
    team_entries = [jsonl_entry("team.jsonl"), langfuse_entry(fake_langfuse, project)]
    gateway = await start_with_team(
        start_gateway,
        {"team_id": "t", "message_logging": team_mode, "callbacks": team_entries},
        in_config=where == "config",
    )
    if where != "config":
        await gateway.ok("PATCH", "/team/t/settings", {"message_logging": team_mode})
    metadata: dict[str, Any] = {
        "logging": [
            {
                "callback_name": "otel",
                "callback_type": "success_and_failure",
                "callback_vars": {"otel_endpoint": otlp_receiver.endpoint(tenant)},
            },
            {
                "callback_name": "gcs_bucket",
                "callback_type": "success_and_failure",
                "callback_vars": {"gcs_bucket_name": bucket},
            },
        ]
    }
    if key_mode is not None:
        metadata["message_logging"] = key_mode
    key = await gateway.key("t", key_alias="private", metadata=metadata)
    control = await gateway.key("open", key_alias="control")

    def secret(rid: str) -> str:
        # Words that no id, timestamp or hash can contain by chance.
        return f"launch code quokka zebra for {rid}"

    await gateway.chat(
        key, "plain", text=secret("plain"), extra=LOOSEN_BODY, headers=LOOSEN_HEADERS
    )
    await gateway.chat(
        key, "stream", text=secret("stream"), stream=True, extra=LOOSEN_BODY, headers=LOOSEN_HEADERS
    )
    await gateway.chat(key, "failed", text=secret("failed"), fail=True, extra=LOOSEN_BODY)
    await gateway.chat(control, "control", text="nothing to hide")
    await gateway.settle()
    rids = ["failed", "plain", "stream"]

    # Content is gone everywhere; the marker stands in for it.
    raw = {
        "team.jsonl": (gateway.logs / "team.jsonl").read_bytes(),
        "default.jsonl": (gateway.logs / "default.jsonl").read_bytes(),
        "langfuse": json.dumps(fake_langfuse.spans(project.public_key)).encode(),
        "otel": json.dumps([s.attributes for s in otlp_receiver.spans(tenant)]).encode(),
        "gcs": await gcs_raw(gcs_server, bucket),
    }
    for name, data in raw.items():
        assert b"launch code" not in data and b"quokka zebra" not in data, name

    prompt_tokens = gw.count_tokens(secret("plain"))
    completion_tokens = gw.count_tokens("You said: " + secret("plain"))
    usage = {
        "input_tokens": prompt_tokens,
        "output_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    file_records = {
        "team.jsonl": gateway.jsonl("team.jsonl"),
        "default.jsonl": [r for r in gateway.jsonl("default.jsonl") if r["key_alias"] == "private"],
        "gcs": await gcs_records(gcs_server, bucket),
    }
    for name, records in file_records.items():
        by_id = {r["request_id"]: r for r in records}
        assert sorted(by_id) == rids, name
        for rid, record in by_id.items():
            assert record["redacted"] is True
            assert record["messages"] == REDACTED
            assert (record["team_id"], record["key_alias"], record["model"]) == (
                "t",
                "private",
                None if rid == "failed" else "gpt-4",
            )
            assert record["start_time"] <= record["end_time"] and record["latency_ms"] >= 0
        for rid in ("plain", "stream"):
            record = by_id[rid]
            assert record["output"] == REDACTED, name
            assert (record["status_code"], record["outcome"]) == (200, "ok")
            assert record["usage"] == usage
            assert record["response_id"].startswith("chatcmpl-")
            assert record["finish_reason"] == "stop"
        assert by_id["stream"]["stream"] is True
        assert by_id["stream"]["time_to_first_token_ms"] is not None
        assert (by_id["failed"]["status_code"], by_id["failed"]["outcome"]) == (400, "http_error")

    views = langfuse_by_id(fake_langfuse, project)
    assert sorted(views) == rids
    for rid in ("plain", "stream"):
        view = views[rid]
        assert view["input"] == REDACTED and view["output"] == REDACTED
        assert view["model"] == "gpt-4"
        assert view["usage_details"] == {
            "input": usage["input_tokens"],
            "output": usage["output_tokens"],
            "total": usage["total_tokens"],
        }
        assert view["metadata"]["status_code"] == 200
        assert view["metadata"]["response_id"].startswith("chatcmpl-")
        assert view["start_time_unix_nano"] <= view["end_time_unix_nano"]
    assert views["failed"]["input"] == REDACTED and views["failed"]["level"] == "ERROR"

    # OTel: message content attributes are left out entirely; the span says it was redacted.
    spans = {s.attributes["team_logging.request_id"]: s for s in otlp_receiver.spans(tenant)}
    assert sorted(spans) == rids
    for span in spans.values():
        attributes = span.attributes
        assert attributes["team_logging.redacted"] is True
        assert "gen_ai.input.messages" not in attributes
        assert "gen_ai.output.messages" not in attributes
        assert attributes["team_logging.team_id"] == "t"
        assert span.start_time_unix_nano <= span.end_time_unix_nano
    for rid in ("plain", "stream"):
        attributes = spans[rid].attributes
        assert attributes["gen_ai.request.model"] == "gpt-4"
        assert attributes["gen_ai.usage.input_tokens"] == usage["input_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"]
        assert attributes["http.response.status_code"] == 200
        assert str(attributes["gen_ai.response.id"]).startswith("chatcmpl-")
    assert spans["failed"].attributes["http.response.status_code"] == 400

    # The control request of a full-logging team keeps its content: redaction is per plan.
    (control_record,) = [r for r in gateway.jsonl("default.jsonl") if r["key_alias"] == "control"]
    assert control_record["redacted"] is False
    assert control_record["messages"] == [{"role": "user", "content": "nothing to hide"}]
    assert control_record["output"] == "You said: nothing to hide"


# -- rule 6: invalid key entries are refused; the old entry stays in force ---------------------

LEAKY_SECRET = "sk-lf-never-echo-this-0123456789"

BAD_KEY_ENTRIES: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown callback", {"callback_name": "nosuch"}, 400, "callback_name"),
    (
        "unknown var",
        {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "x.jsonl", "nope": "1"}},
        400,
        "callback_vars.nope",
    ),
    (
        "missing var",
        {"callback_name": "langfuse", "callback_vars": {"langfuse_public_key": "pk-lf-1"}},
        400,
        "callback_vars.langfuse_secret_key",
    ),
    (
        "path escapes the log directory",
        {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "../../escape.jsonl"}},
        400,
        "callback_vars.jsonl_path",
    ),
    (
        "cloud metadata host",
        {
            "callback_name": "langfuse",
            "callback_vars": {
                "langfuse_public_key": "pk-lf-1",
                "langfuse_secret_key": LEAKY_SECRET,
                "langfuse_host": "http://169.254.169.254",
            },
        },
        400,
        "callback_vars.langfuse_host",
    ),
    (
        "secret key given as the public key",
        {
            "callback_name": "langfuse",
            "callback_vars": {
                "langfuse_public_key": LEAKY_SECRET,
                "langfuse_secret_key": LEAKY_SECRET,
            },
        },
        400,
        "callback_vars.langfuse_public_key",
    ),
    # Shape errors (a value outside the enum, a non-string var) are 422s, as in the admin API.
    (
        "bad callback_type",
        {"callback_name": "jsonl", "callback_type": "sometimes", "callback_vars": {}},
        422,
        "callback_type",
    ),
    (
        "non-string var",
        {"callback_name": "jsonl", "callback_vars": {"jsonl_path": 5}},
        422,
        "callback_vars.jsonl_path",
    ),
]


async def test_rule6_invalid_key_entries_are_refused_and_the_old_entry_stays(
    start_gateway: StartGateway, fake_langfuse: FakeLangfuse
) -> None:
    project = fake_langfuse.add_project(name="key")
    gateway = await start_gateway()
    good = [jsonl_entry("good.jsonl"), langfuse_entry(fake_langfuse, project)]
    key = await gateway.key("t", key_alias="k", metadata={"logging": good})
    stored_before = (await gateway.tl.store.get_key(gw.hash_key(key))).metadata
    for what, entry, status, field in BAD_KEY_ENTRIES:
        param = f"metadata.logging[2].{field}"
        for path, body in (
            ("/key/generate", {"team_id": "t", "metadata": {"logging": [*good, entry]}}),
            ("/key/update", {"key": key, "metadata": {"logging": [*good, entry]}}),
        ):
            response = await gateway.admin("POST", path, body)
            assert response.status_code == status, (what, path, response.text)
            error = response.json()["error"]
            assert error["param"] == param, (what, path)
            assert param in error["message"], (what, path)
            assert LEAKY_SECRET not in response.text
            assert "key" not in response.json(), (what, path)
    stored_after = (await gateway.tl.store.get_key(gw.hash_key(key))).metadata
    assert stored_after == stored_before

    # The old entries still serve the key; the refused ones never got a destination.
    await gateway.chat(key, "still-logged")
    await gateway.settle()
    assert gateway.jsonl_ids("good.jsonl") == ["still-logged"]
    assert langfuse_ids(fake_langfuse, project) == ["still-logged"]
    assert sorted(p.name for p in gateway.logs.iterdir()) == ["good.jsonl"]
    assert not (gateway.logs.parent.parent / "escape.jsonl").exists()
    assert_only_authenticated_exports(fake_langfuse, [project])


# -- property: random mixes never leak a disabled team's record, nor one team's to another -------

SLOTS = range(3)
CONFIG_VARIANTS = ("on", "off", "noinherit")

team_strategy = st.fixed_dictionaries(
    {
        # None: a team the config file does not know; else which entry of the file it is.
        "config": st.sampled_from([None, *CONFIG_VARIANTS]),
        "api_langfuse": st.booleans(),  # POST /team/{id}/callback: the slot's Langfuse project
        "switch": st.sampled_from(
            [None, "disable_logging", "enable_logging", "patch_off", "patch_on"]
        ),
        "inherit": st.sampled_from([None, True, False]),  # PATCH inherit_defaults
        "keys": st.lists(
            st.fixed_dictionaries(
                {
                    "files": st.integers(0, 2),  # own JSONL entries
                    "langfuse": st.booleans(),  # the team slot's project, as a key entry
                    "default_file": st.booleans(),  # the global default's target, as a key entry
                    "enabled": st.booleans(),
                    "disabled_by": st.sampled_from(["generate", "update"]),
                }
            ),
            min_size=1,
            max_size=2,
        ),
    }
)


class PropertyWorld:
    """One gateway reused by every example: config teams per slot, one Langfuse project per slot."""

    def __init__(self, gateway: GatewayUnderTest, fake: FakeLangfuse) -> None:
        self.gateway = gateway
        self.fake = fake
        self.projects = [fake.add_project(name=f"slot{slot}") for slot in SLOTS]
        self.examples = itertools.count()

    @staticmethod
    def config() -> dict[str, Any]:
        teams = []
        for slot in SLOTS:
            for variant in CONFIG_VARIANTS:
                teams.append(
                    {
                        "team_id": f"cfg{slot}-{variant}",
                        "logging_enabled": variant != "off",
                        "inherit_defaults": variant != "noinherit",
                        "callbacks": [jsonl_entry(f"cfg{slot}.jsonl")],
                    }
                )
        return default_jsonl_config(teams)

    def destinations(self) -> dict[str, Callable[[], list[str]]]:
        readers: dict[str, Callable[[], list[str]]] = {
            "default.jsonl": lambda: self.gateway.jsonl_ids("default.jsonl")
        }
        for slot in SLOTS:
            readers[f"cfg{slot}.jsonl"] = lambda s=slot: self.gateway.jsonl_ids(f"cfg{s}.jsonl")
            readers[f"P{slot}"] = lambda s=slot: langfuse_ids(self.fake, self.projects[s])
            for k in range(2):
                for j in range(2):
                    name = f"s{slot}-k{k}-{j}.jsonl"
                    readers[name] = lambda n=name: self.gateway.jsonl_ids(n)
        return readers

    async def reset_config_teams(self) -> None:
        # Setup, not the rule under test: config teams go back to their file entry.
        tl = self.gateway.tl
        for slot in SLOTS:
            for variant in CONFIG_VARIANTS:
                await tl.store.delete_team(f"cfg{slot}-{variant}")
        tl.planner.invalidate()


@pytest.fixture
async def property_world(start_gateway: StartGateway, fake_langfuse: FakeLangfuse) -> PropertyWorld:
    gateway = await start_gateway(config=PropertyWorld.config())
    return PropertyWorld(gateway, fake_langfuse)


def owner_of(destination: str) -> int | None:
    """The one slot whose records a destination may hold (None: the shared global default)."""
    if destination == "default.jsonl":
        return None
    return int(destination.removeprefix("cfg").removeprefix("P").removeprefix("s")[0])


# Shrinking would re-run the gateway scenario hundreds of times; the falsifying example is
# printed in full anyway, so a failure is reported well within the test timeout.
@settings(
    max_examples=20,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(teams=st.lists(team_strategy, min_size=len(SLOTS), max_size=len(SLOTS)))
async def test_property_random_settings_never_leak_across_teams_or_past_a_kill_switch(
    property_world: PropertyWorld, teams: list[dict[str, Any]]
) -> None:
    world = property_world
    gateway = world.gateway
    n = next(world.examples)
    prefix = f"ex{n}-"
    await world.reset_config_teams()

    expected: dict[str, set[str]] = {name: set() for name in world.destinations()}
    disabled_rids: set[str] = set()
    requests: list[tuple[str, str, bool]] = []
    for slot, team in zip(SLOTS, teams, strict=True):
        variant = team["config"]
        team_id = f"cfg{slot}-{variant}" if variant else f"{prefix}t{slot}"
        # The model of the rules, applied to what the config file gave the team.
        callbacks = {f"cfg{slot}.jsonl"} if variant else set()
        enabled = variant != "off"
        inherit = variant != "noinherit"
        if team["api_langfuse"]:
            await gateway.add_callback(team_id, langfuse_entry(world.fake, world.projects[slot]))
            callbacks.add(f"P{slot}")
        switch = team["switch"]
        if switch in ("disable_logging", "enable_logging"):
            await gateway.ok("POST", f"/team/{team_id}/{switch}")
            enabled = switch == "enable_logging"
        elif switch in ("patch_off", "patch_on"):
            enabled = switch == "patch_on"
            await gateway.ok("PATCH", f"/team/{team_id}/settings", {"logging_enabled": enabled})
        if team["inherit"] is not None:
            inherit = team["inherit"]
            await gateway.ok("PATCH", f"/team/{team_id}/settings", {"inherit_defaults": inherit})

        for k, spec in enumerate(team["keys"]):
            own = {f"s{slot}-k{k}-{j}.jsonl" for j in range(spec["files"])}
            entries = [jsonl_entry(name) for name in sorted(own)]
            if spec["langfuse"]:
                entries.append(langfuse_entry(world.fake, world.projects[slot]))
                own.add(f"P{slot}")
            if spec["default_file"]:
                entries.append(jsonl_entry("default.jsonl"))
                own.add("default.jsonl")
            metadata: dict[str, Any] = {"logging": entries}
            if not spec["enabled"] and spec["disabled_by"] == "generate":
                metadata["logging_enabled"] = False
            key = await gateway.key(team_id, key_alias=f"{prefix}s{slot}k{k}", metadata=metadata)
            if not spec["enabled"] and spec["disabled_by"] == "update":
                await gateway.ok(
                    "POST", "/key/update", {"key": key, "metadata": {"logging_enabled": False}}
                )
            targets = (
                (({"default.jsonl"} if inherit else set()) | callbacks | own)
                if (enabled and spec["enabled"])
                else set()
            )
            for outcome in ("ok", "bad"):
                rid = f"{prefix}s{slot}-k{k}-{outcome}"
                requests.append((key, rid, outcome == "bad"))
                if not targets:
                    disabled_rids.add(rid)
                for name in targets:
                    expected[name].add(rid)

    for key, rid, fail in requests:
        await gateway.chat(key, rid, fail=fail)
    await gateway.settle()

    landed = {
        name: [rid for rid in read() if rid.startswith(prefix)]
        for name, read in world.destinations().items()
    }
    for name, rids in landed.items():
        # A disabled team's (or key's) record reaches no destination at all.
        assert not disabled_rids & set(rids), (name, teams)
        # A team's (or its keys') destination holds that team's records only.
        slot_owner = owner_of(name)
        if slot_owner is not None:
            assert all(rid.startswith(f"{prefix}s{slot_owner}-") for rid in rids), (name, teams)
        # And everything else the rules say, each record exactly once.
        assert rids == sorted(expected[name]), (name, teams)
