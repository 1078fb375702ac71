"""Langfuse end to end: a gateway behind the real middleware and dispatcher, served by uvicorn,
exporting to a fake Langfuse with one project per team.

What is proven here: every project receives exactly its own team's records and nothing else,
under concurrency and with JSON and streaming requests interleaved; a rate-limited, misconfigured
or unreachable Langfuse never fails a client request, and delivery catches up (or the loss is
counted with its reason) as the dispatcher promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from team_logging_middleware._types import Caller
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.fixtures.fake_langfuse import FakeLangfuse, Project
from tests.fixtures.servers import run_uvicorn_async
from tests.helpers import asgi_http_scope

# -- a tiny OpenAI-compatible upstream --------------------------------------------------------


async def _chat(request: Request) -> Response:
    body = await request.json()
    content = "echo:" + body["messages"][-1]["content"]
    model = body.get("model", "test-model")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    if body.get("stream"):

        async def events() -> AsyncIterator[str]:
            for piece in (content[: len(content) // 2], content[len(content) // 2 :]):
                chunk = {
                    "id": "chatcmpl-s",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0)
            final = {
                "id": "chatcmpl-s",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": usage,
            }
            yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse(
        {
            "id": "chatcmpl-j",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


async def _resolve(scope: Any) -> Caller | None:
    token = bearer_token(scope)
    if token is None or not token.startswith("key-"):
        return None
    team = token.removeprefix("key-")
    return Caller(team_id=team, key_id=f"id-{team}", key_alias=f"alias-{team}")


# -- the gateway under test -------------------------------------------------------------------


async def asgi_request(
    app: Any, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    """One POST driven at the ASGI level: scripted ``receive``, collecting ``send``.

    ``receive`` gives the body, then reports a disconnect only once the response is complete
    (as a server does), so streaming responses run to their end.
    """
    scope = asgi_http_scope(
        path,
        [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        server=("127.0.0.1", 80),
        state={},
    )
    complete = asyncio.Event()
    body_sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete.set()

    await app(scope, receive, send)
    return status, b"".join(chunks)


def _sse_text(body: bytes) -> str:
    text = ""
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
    return text


@dataclass
class Gateway:
    """The gateway app and how the test talks to it: over HTTP (uvicorn) or at the ASGI level."""

    app: Any
    team_logging: TeamLogging
    client: httpx.AsyncClient | None

    async def call(self, team: str, index: int, stream: bool) -> None:
        """One chat request as ``team``, checked for a complete, correct answer."""
        payload = {
            "model": "test-model",
            "stream": stream,
            "messages": [{"role": "user", "content": f"hello from {team} #{index}"}],
        }
        headers = {"authorization": f"Bearer key-{team}", "x-request-id": f"{team}-{index}"}
        expected = f"echo:hello from {team} #{index}"
        if self.client is None:
            status, body = await asgi_request(
                self.app, "/v1/chat/completions", headers, json.dumps(payload).encode()
            )
        else:
            response = await self.client.post("/v1/chat/completions", json=payload, headers=headers)
            status, body = response.status_code, response.content
        assert status == 200
        if stream:
            assert _sse_text(body) == expected
        else:
            assert json.loads(body)["choices"][0]["message"]["content"] == expected

    async def run(self, calls: Sequence[tuple[str, int, bool]]) -> None:
        """All calls at once (the HTTP client's pool bounds its own concurrency)."""
        await asyncio.gather(*(self.call(*c) for c in calls))

    def langfuse_stats(self) -> dict[str, Any]:
        stats = self.team_logging.dispatcher.stats()
        lanes = [d for d in stats["destinations"].values() if d["callback_name"] == "langfuse"]
        return {
            "sent": sum(d["sent"] for d in lanes),
            "failed": sum(d["failed"] for d in lanes),
            "retried": sum(d["retried"] for d in lanes),
            "dropped": sum(sum(d["dropped"].values()) for d in lanes),
            "lanes": lanes,
            "lost": stats["lost"],
        }


async def _team_settings(
    store: MemorySettingsStore, team: str, fake: FakeLangfuse, project: Project
) -> None:
    spec = CallbackSpec(
        callback_name="langfuse",
        callback_type="success_and_failure",
        callback_vars=fake.callback_vars(project),
    )
    await store.put_team(TeamSettings(team_id=team, callbacks=[spec]))


class _GatewayContext:
    """Starts the gateway with one Langfuse project per team.

    ``http=True`` serves it with uvicorn in this loop (lifespan on) and talks HTTP; otherwise
    requests are driven at the ASGI level and the runtime is started by the middleware's
    ``async with``.
    """

    def __init__(
        self, fake: FakeLangfuse, teams: Sequence[str], *, http: bool = False, **dispatcher: Any
    ) -> None:
        self.fake = fake
        self.teams = list(teams)
        self.http = http
        self.projects: dict[str, Project] = {}
        options = {
            "flush_interval": 0.02,
            "backoff_base": 0.02,
            "backoff_max": 0.2,
            "max_retries": 50,
            "emit_timeout": 10.0,
            **dispatcher,
        }
        self.store = MemorySettingsStore()
        self.team_logging = TeamLogging(_resolve, store=self.store, dispatcher_options=options)
        app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
        self.app = TeamLoggingMiddleware(app, team_logging=self.team_logging)
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Gateway:
        for team in self.teams:
            self.projects[team] = self.fake.add_project(name=team)
            await _team_settings(self.store, team, self.fake, self.projects[team])
        client = None
        if self.http:
            url = await self._stack.enter_async_context(run_uvicorn_async(self.app))
            client = await self._stack.enter_async_context(
                httpx.AsyncClient(base_url=url, trust_env=False, timeout=30)
            )
        else:
            await self._stack.enter_async_context(self.app)
        return Gateway(self.app, self.team_logging, client)

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()


def _received(fake: FakeLangfuse, project: Project) -> dict[str, dict[str, Any]]:
    return {g["trace"]["metadata"]["request_id"]: g for g in fake.generations(project.public_key)}


def _assert_isolated(
    fake: FakeLangfuse, projects: dict[str, Project], calls: Sequence[tuple[str, int, bool]]
) -> None:
    for team, project in projects.items():
        mine = {(f"{t}-{i}", s) for t, i, s in calls if t == team}
        received = _received(fake, project)
        assert set(received) == {request_id for request_id, _ in mine}, team
        # Delivery is at least once (a batch whose answer came too late is sent again); the
        # deterministic ids make Langfuse keep one observation per record, which is what
        # ``generations`` shows. Every raw span must still be this team's own.
        raw = fake.spans(project.public_key)
        assert len(raw) >= len(mine)
        raw_teams = {json.loads(s["attributes"]["langfuse.trace.metadata"])["team_id"] for s in raw}
        assert raw_teams <= {team}
        for request_id, stream in mine:
            generation = received[request_id]
            index = request_id.rsplit("-", 1)[1]
            assert generation["trace"]["metadata"]["team_id"] == team
            assert generation["trace"]["metadata"]["key_alias"] == f"alias-{team}"
            assert generation["trace"]["tags"][0] == f"team:{team}"
            assert generation["input"] == [
                {"role": "user", "content": f"hello from {team} #{index}"}
            ]
            assert generation["output"] == {
                "role": "assistant",
                "content": f"echo:hello from {team} #{index}",
            }
            assert generation["usage_details"] == {"input": 7, "output": 3, "total": 10}
            assert generation["metadata"]["stream"] is stream
            assert (generation["completion_start_time"] is not None) is stream
        for request in fake.requests(project.public_key):
            expected = httpx.BasicAuth(project.public_key, project.secret_key)._auth_header
            assert request.headers["authorization"] == expected


def _interleaved(teams: Sequence[str], per_team: int) -> list[tuple[str, int, bool]]:
    # Round-robin over teams, alternating JSON and streaming, so neighbours always differ.
    return [(team, i, (i + n) % 2 == 0) for i in range(per_team) for n, team in enumerate(teams)]


# -- tests --------------------------------------------------------------------------------------


async def test_every_project_receives_exactly_its_own_teams_records(
    fake_langfuse: FakeLangfuse,
) -> None:
    teams = [f"team{n:02d}" for n in range(24)]
    calls = _interleaved(teams, per_team=10)
    context = _GatewayContext(fake_langfuse, teams)
    async with context as gateway:
        await gateway.run(calls)
        report = await gateway.team_logging.dispatcher.flush(timeout=30)
        assert not report.timed_out and report.pending == 0
        stats = gateway.langfuse_stats()
        assert (stats["sent"], stats["failed"], stats["dropped"]) == (len(calls), 0, 0)
    _assert_isolated(fake_langfuse, context.projects, calls)


@given(
    data=st.lists(
        st.tuples(st.integers(min_value=0, max_value=5), st.booleans()), min_size=1, max_size=40
    )
)
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_isolation_holds_for_any_mix_of_teams_and_stream_modes(
    data: list[tuple[int, bool]],
) -> None:
    teams = [f"t{n}" for n in range(6)]
    counters = dict.fromkeys(teams, 0)
    calls: list[tuple[str, int, bool]] = []
    for team_index, stream in data:
        team = teams[team_index]
        calls.append((team, counters[team], stream))
        counters[team] += 1

    async def scenario() -> None:
        with FakeLangfuse() as fake:
            context = _GatewayContext(fake, teams)
            async with context as gateway:
                await gateway.run(calls)
                report = await gateway.team_logging.dispatcher.flush(timeout=30)
                assert report.pending == 0
            _assert_isolated(fake, context.projects, calls)

    asyncio.run(scenario())


async def test_rate_limited_exports_are_retried_until_everything_is_delivered(
    fake_langfuse: FakeLangfuse,
) -> None:
    teams = ["alpha", "beta"]
    calls = _interleaved(teams, per_team=6)
    fake_langfuse.fail_next(4, status=429, retry_after=0)
    context = _GatewayContext(fake_langfuse, teams)
    async with context as gateway:
        await gateway.run(calls)
        await gateway.team_logging.dispatcher.flush(timeout=30)
        stats = gateway.langfuse_stats()
    assert stats["retried"] >= 1
    assert (stats["sent"], stats["failed"], stats["dropped"], stats["lost"]) == (12, 0, 0, 0)
    assert fake_langfuse.stats()["counters"]["status_429"] == 4
    _assert_isolated(fake_langfuse, context.projects, calls)


async def test_a_wrong_key_drops_that_teams_records_with_a_counted_reason(
    fake_langfuse: FakeLangfuse,
) -> None:
    context = _GatewayContext(fake_langfuse, ["good"])
    async with context as gateway:
        # A second team whose stored secret does not match its project.
        bad = fake_langfuse.add_project(name="bad")
        wrong = Project(bad.public_key, "sk-lf-not-the-secret", bad.id, bad.name)
        await _team_settings(context.store, "bad", fake_langfuse, wrong)
        await gateway.run(
            [("good", 0, False), ("bad", 0, False), ("bad", 1, True), ("good", 1, True)]
        )
        await gateway.team_logging.dispatcher.flush(timeout=30)
        lanes = {lane["team_ids"][0]: lane for lane in gateway.langfuse_stats()["lanes"]}
    assert lanes["bad"]["failed"] == 2 and lanes["bad"]["sent"] == 0
    assert lanes["bad"]["retried"] == 0  # a 401 is not retried
    assert "HTTP 401 Unauthorized from langfuse host" in lanes["bad"]["last_error"]
    assert "sk-lf-not-the-secret" not in json.dumps(lanes)
    assert lanes["good"]["sent"] == 2 and lanes["good"]["failed"] == 0
    assert fake_langfuse.span_count(bad.public_key) == 0
    assert set(_received(fake_langfuse, context.projects["good"])) == {"good-0", "good-1"}


async def test_langfuse_down_for_a_while_delays_delivery_but_never_fails_a_request(
    fake_langfuse: FakeLangfuse,
) -> None:
    teams = ["north", "south", "east"]
    before, during, after = (_interleaved(teams, 4)[i::3] for i in range(3))
    context = _GatewayContext(fake_langfuse, teams, http=True)
    async with context as gateway:
        await gateway.run(before)
        await gateway.team_logging.dispatcher.flush(timeout=30)

        fake_langfuse.set_mode("down")
        await gateway.run(during)  # every request still answers 200 with its content

        async def retried() -> bool:
            return gateway.langfuse_stats()["retried"] > 0

        deadline = asyncio.get_running_loop().time() + 20
        while not await retried():
            assert asyncio.get_running_loop().time() < deadline, gateway.langfuse_stats()
            await asyncio.sleep(0.01)

        fake_langfuse.set_mode("ok")
        await gateway.run(after)
        report = await gateway.team_logging.dispatcher.flush(timeout=30)
        assert report.pending == 0
        stats = gateway.langfuse_stats()
    assert (stats["failed"], stats["dropped"], stats["lost"]) == (0, 0, 0)
    assert stats["sent"] == len(before) + len(during) + len(after)
    _assert_isolated(fake_langfuse, context.projects, [*before, *during, *after])
