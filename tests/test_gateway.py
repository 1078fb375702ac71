"""The example gateway: settings, keys, the mock model, the upstream pass-through, delegation."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from team_logging_middleware.sinks import unregister_callback
from tests.fixtures.servers import run_uvicorn_async
from tests.helpers import gateway_settings, load_gateway, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
MASTER = "sk-test-master"
AUTH = {"Authorization": f"Bearer {MASTER}"}


gw = load_gateway()


class Running:
    """A gateway served by a real uvicorn in the test's loop."""

    def __init__(self, base_url: str, gateway: Any, client: httpx.AsyncClient) -> None:
        self.base_url = base_url
        self.gateway = gateway
        self.client = client

    async def key(self, team_id: str | None = "t", **body: Any) -> str:
        response = await self.client.post(
            "/key/generate", json={"team_id": team_id, **body}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        key: str = response.json()["key"]
        return key

    async def flush(self) -> None:
        report = await self.gateway.team_logging.dispatcher.flush(10)
        assert not report.timed_out


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    stack: list[Any] = []

    async def start(**overrides: Any) -> Running:
        options: dict[str, Any] = {"master_key": MASTER, "flush_interval": 0.02, **overrides}
        gateway = gw.create_gateway(gateway_settings(tmp_path, f"gw{len(stack)}.db", **options))
        server = run_uvicorn_async(gateway.app)
        base_url = await server.__aenter__()
        stack.append(server)
        client = httpx.AsyncClient(base_url=base_url, timeout=10)
        stack.append(client)
        return Running(base_url, gateway, client)

    yield start
    for item in reversed(stack):
        await item.__aexit__(None, None, None)


def openai_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- settings from the command line and the environment ----------------------------------------


def test_settings_defaults_environment_and_arguments() -> None:
    defaults = gw.GatewaySettings.from_args([], environ={})
    assert (defaults.host, defaults.port) == ("127.0.0.1", 4000)
    assert defaults.master_key == "sk-1234" and defaults.master_key_defaulted
    assert defaults.db == "./team_logging.db"
    assert defaults.config is not None and Path(defaults.config) == ROOT / "examples/config.yaml"
    assert defaults.jsonl_dir == "./logs"
    assert defaults.upstream is None and defaults.redis_url is None
    assert defaults.env_allowlist is None and defaults.encryption_key is None

    env = {
        "HOST": "0.0.0.0",
        "PORT": "4100",
        "TLM_MASTER_KEY": "sk-env",
        "TLM_DB": "/tmp/x.db",
        "TLM_CONFIG": "",
        "TLM_UPSTREAM": "http://up/v1",
        "TLM_REDIS_URL": "redis://r:6379/0",
        "TLM_ENCRYPTION_KEY": "k",
        "TLM_ENV_ALLOWLIST": "LANGFUSE_*, MY_APP_* ,",
        "TLM_JSONL_DIR": "/var/log/x",
        "TLM_FLUSH_INTERVAL": "0.5",
    }
    from_env = gw.GatewaySettings.from_args([], environ=env)
    assert (from_env.host, from_env.port, from_env.master_key) == ("0.0.0.0", 4100, "sk-env")
    assert not from_env.master_key_defaulted
    assert from_env.config is None
    assert from_env.env_allowlist == ("LANGFUSE_*", "MY_APP_*")
    assert from_env.redis_url == "redis://r:6379/0"
    assert from_env.flush_interval == 0.5

    args = gw.GatewaySettings.from_args(
        ["--port", "5000", "--master-key", "sk-arg", "--db", "a.db", "--upstream", "http://u"],
        environ=env,
    )
    assert (args.port, args.master_key, args.db, args.upstream) == (
        5000,
        "sk-arg",
        "a.db",
        "http://u",
    )


# -- the OpenAI-compatible mock ------------------------------------------------------------------


async def test_chat_requires_a_known_key(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer sk-unknown"}):
        response = await gateway.client.post("/v1/chat/completions", json=body, headers=headers)
        error = openai_error_shape(response, 401)
        assert error["code"] == "invalid_api_key"
    key = await gateway.key()
    response = await gateway.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
    # The master key may call the model too.
    response = await gateway.client.post("/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200


async def test_chat_completion_shape(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    key = await gateway.key()
    response = await gateway.client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, Claude gm!"},
            ],
        },
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    data = response.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int) and data["model"] == "gpt-4"
    assert data["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "You said: Hello, Claude gm!",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def test_chat_stream_chunks(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    headers = {"Authorization": f"Bearer {await gateway.key()}"}
    body = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "one two three"}]}],
    }
    async with gateway.client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_chunks = chunks[1:-2]
    assert len(content_chunks) > 2
    text = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    assert text == "You said: one two three"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert all(c["usage"] is None for c in chunks[:-1])

    body.pop("stream_options")
    async with gateway.client.stream(
        "POST", "/chat/completions", json=body, headers=headers
    ) as response:
        events = [line async for line in response.aiter_lines() if line]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


async def test_completions_embeddings_and_models(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    headers = {"Authorization": f"Bearer {await gateway.key()}"}
    completion = await gateway.client.post(
        "/v1/completions", json={"model": "gpt-3.5-turbo", "prompt": "say hi"}, headers=headers
    )
    assert completion.json()["choices"][0]["text"] == "You said: say hi"
    assert completion.json()["object"] == "text_completion"
    first = await gateway.client.post(
        "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": ["a b", "c"]},
        headers=headers,
    )
    second = await gateway.client.post(
        "/embeddings", json={"model": "text-embedding-3-small", "input": "a b"}, headers=headers
    )
    data = first.json()
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert second.json()["data"][0]["embedding"] == data["data"][0]["embedding"]
    models = await gateway.client.get("/v1/models", headers=headers)
    assert "gpt-4" in [m["id"] for m in models.json()["data"]]
    assert (await gateway.client.get("/v1/models")).status_code == 401


async def test_bad_model_requests_get_openai_errors(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    headers = {"Authorization": f"Bearer {await gateway.key()}"}
    for body in (
        {"messages": [{"role": "user", "content": "x"}]},
        {"model": "gpt-4", "messages": []},
        {"model": "gpt-4", "messages": ["x"]},
    ):
        response = await gateway.client.post("/v1/chat/completions", json=body, headers=headers)
        openai_error_shape(response, 400)
    response = await gateway.client.post(
        "/v1/chat/completions",
        content=b"{nope",
        headers={**headers, "content-type": "application/json"},
    )
    openai_error_shape(response, 400)
    response = await gateway.client.post(
        "/v1/embeddings", json={"model": "m", "input": 5}, headers=headers
    )
    openai_error_shape(response, 400)


# -- keys ------------------------------------------------------------------------------------------


async def test_keys_are_stored_hashed(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway(db=str(tmp_path / "keys.db"))
    response = await gateway.client.post(
        "/key/generate",
        json={"team_id": "t", "key_alias": "alice", "user_id": "u1", "duration": "30d"},
        headers=AUTH,
    )
    assert response.status_code == 200
    data = response.json()
    key = data["key"]
    assert key.startswith("sk-") and len(key) > 20
    assert (data["team_id"], data["key_alias"], data["user_id"]) == ("t", "alice", "u1")
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert data["key_id"] == digest[:16]
    record = await gateway.gateway.team_logging.store.get_key(digest)
    assert record is not None and record.team_id == "t" and record.key_alias == "alice"
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert key.encode() not in raw
    # A second key is different.
    assert await gateway.key() != key


async def test_key_routes_need_admin_credentials(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    key = await gateway.key()
    for path, body in (("/key/generate", {"team_id": "t"}), ("/key/update", {"key": key})):
        for headers in ({}, {"Authorization": f"Bearer {key}"}):
            response = await gateway.client.post(path, json=body, headers=headers)
            assert response.status_code == 401, response.text
            assert set(response.json()["error"]) == {"message", "type", "param"}


async def test_key_update_merges_and_validates_logging(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    good = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "k.jsonl"}}
    key = await gateway.key(metadata={"tags": ["a"], "logging": [good]})
    response = await gateway.client.post(
        "/key/update", json={"key": key, "metadata": {"owner": "bob"}}, headers=AUTH
    )
    assert response.status_code == 200
    metadata = response.json()["metadata"]
    assert metadata["tags"] == ["a"] and metadata["owner"] == "bob"
    assert metadata["logging"][0]["callback_vars"] == {"jsonl_path": "k.jsonl"}

    bad_entries = [
        (
            {"callback_name": "jsonl", "callback_vars": {"nope": "x"}},
            "metadata.logging[1].callback_vars.nope",
        ),
        ({"callback_name": "nosuch"}, "metadata.logging[1].callback_name"),
        (
            {"callback_name": "jsonl", "callback_type": "x", "callback_vars": {}},
            "metadata.logging[1].callback_type",
        ),
    ]
    for entry, param in bad_entries:
        response = await gateway.client.post(
            "/key/update", json={"key": key, "metadata": {"logging": [good, entry]}}, headers=AUTH
        )
        assert response.status_code in (400, 422), response.text
        assert response.json()["error"]["param"] == param
        assert param in response.json()["error"]["message"]
    record = await gateway.gateway.team_logging.store.get_key(gw.hash_key(key))
    assert record.metadata["logging"] == [
        {
            "callback_name": "jsonl",
            "callback_type": "success",
            "callback_vars": {"jsonl_path": "k.jsonl"},
        }
    ]
    response = await gateway.client.post(
        "/key/update", json={"key": "sk-nope", "metadata": {}}, headers=AUTH
    )
    assert response.status_code == 404
    # The hashed form of the key is accepted too (as LiteLLM does).
    response = await gateway.client.post(
        "/key/update",
        json={"key": gw.hash_key(key), "metadata": {"logging_enabled": False}},
        headers=AUTH,
    )
    assert response.status_code == 200
    assert response.json()["metadata"]["logging_enabled"] is False


async def test_key_env_refs_follow_the_allowlist(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(env_allowlist=("LANGFUSE_*",))
    entry = {
        "callback_name": "langfuse",
        "callback_vars": {
            "langfuse_public_key": "os.environ/LANGFUSE_PUBLIC_KEY",
            "langfuse_secret_key": "os.environ/LANGFUSE_SECRET_KEY",
        },
    }
    await gateway.key(metadata={"logging": [entry]})
    entry["callback_vars"]["langfuse_secret_key"] = "os.environ/OTEL_TOKEN"
    response = await gateway.client.post(
        "/key/generate", json={"team_id": "t", "metadata": {"logging": [entry]}}, headers=AUTH
    )
    assert response.status_code == 400
    assert (
        response.json()["error"]["param"] == "metadata.logging[0].callback_vars.langfuse_secret_key"
    )


async def test_team_admin_keys_manage_only_their_team(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    admin_key = await gateway.key("team-a", metadata={"team_admin": True})
    plain_key = await gateway.key("team-a")
    admin = {"Authorization": f"Bearer {admin_key}"}
    callback = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "a.jsonl"}}
    assert (
        await gateway.client.post("/team/team-a/callback", json=callback, headers=admin)
    ).is_success
    response = await gateway.client.post("/team/team-b/callback", json=callback, headers=admin)
    assert response.status_code == 403
    response = await gateway.client.post(
        "/team/team-a/callback", json=callback, headers={"Authorization": f"Bearer {plain_key}"}
    )
    assert response.status_code == 401
    # Keys: for its own team only, and it cannot hand out admin rights.
    response = await gateway.client.post("/key/generate", json={"team_id": "team-a"}, headers=admin)
    assert response.status_code == 200
    response = await gateway.client.post("/key/generate", json={"team_id": "team-b"}, headers=admin)
    assert response.status_code == 403
    response = await gateway.client.post(
        "/key/generate", json={"team_id": "team-a", "metadata": {"team_admin": True}}, headers=admin
    )
    assert response.status_code == 403
    # No os.environ/ references for delegated writers.
    entry = {
        "callback_name": "langfuse",
        "callback_vars": {
            "langfuse_public_key": "pk-lf-1",
            "langfuse_secret_key": "os.environ/LANGFUSE_SECRET_KEY",
        },
    }
    response = await gateway.client.post(
        "/key/generate", json={"team_id": "team-a", "metadata": {"logging": [entry]}}, headers=admin
    )
    assert response.status_code == 400


# -- storage options -------------------------------------------------------------------------------


async def test_plaintext_warning_and_encryption_at_rest(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-lf-secret-at-rest-0123456789"
    entry = {
        "callback_name": "langfuse",
        "callback_vars": {"langfuse_public_key": "pk-lf-1", "langfuse_secret_key": secret},
    }
    with caplog.at_level(logging.WARNING, logger="team_logging_gateway"):
        await start_gateway(db=str(tmp_path / "plain.db"))
    assert any("TLM_ENCRYPTION_KEY" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="team_logging_gateway"):
        gateway = await start_gateway(
            db=str(tmp_path / "enc.db"), encryption_key=Fernet.generate_key().decode()
        )
    assert not any("TLM_ENCRYPTION_KEY" in r.getMessage() for r in caplog.records)
    response = await gateway.client.post("/team/t/callback", json=entry, headers=AUTH)
    assert response.status_code == 200
    assert secret not in response.text
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("enc.db*"))
    assert secret.encode() not in raw
    stored = await gateway.gateway.team_logging.store.get_team("t")
    assert stored.callbacks[0].callback_vars["langfuse_secret_key"] == secret


async def test_redis_store_hook(
    start_gateway: StartGateway, redis_url: str, tmp_path: Path
) -> None:
    gateway = await start_gateway(redis_url=redis_url)
    key = await gateway.key("red")
    callback = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "red.jsonl"}}
    await gateway.client.post("/team/red/callback", json=callback, headers=AUTH)
    # A second replica on the same Redis sees the team and the key.
    other = await start_gateway(redis_url=redis_url)
    got = await other.client.get("/team/red/callback", headers=AUTH)
    assert got.json()["data"]["success_callbacks"] == ["jsonl"]
    response = await other.client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "over redis"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    await other.flush()
    records = read_jsonl(tmp_path / "logs" / "red.jsonl")
    assert [r["output"] for r in records] == ["You said: over redis"]


# -- upstream pass-through -------------------------------------------------------------------------


async def test_upstream_pass_through_plain_and_streaming(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    upstream = await start_gateway(master_key="sk-upstream", db=str(tmp_path / "up.db"))
    front = await start_gateway(
        upstream=upstream.base_url + "/v1",
        upstream_key="sk-upstream",
        db=str(tmp_path / "front.db"),
    )
    callback = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "front.jsonl"}}
    await front.client.post("/team/t/callback", json=callback, headers=AUTH)
    headers = {"Authorization": f"Bearer {await front.key()}"}
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "via upstream"}]}
    response = await front.client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "You said: via upstream"
    async with front.client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers
    ) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in streamed.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1]
    )
    assert text == "You said: via upstream"
    models = await front.client.get("/v1/models", headers=headers)
    assert models.status_code == 200 and models.json()["object"] == "list"
    # The upstream's errors pass through as they are.
    bad = await front.client.post("/v1/chat/completions", json={"model": "x"}, headers=headers)
    assert bad.status_code == 400
    await front.flush()
    records = read_jsonl(tmp_path / "logs" / "front.jsonl")
    assert [r["output"] for r in records if r["status_code"] == 200] == [
        "You said: via upstream",
        "You said: via upstream",
    ]


async def test_unreachable_upstream_is_a_502(start_gateway: StartGateway) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    front = await start_gateway(upstream=f"http://127.0.0.1:{port}/v1")
    headers = {"Authorization": f"Bearer {await front.key()}"}
    response = await front.client.post(
        "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers
    )
    openai_error_shape(response, 502)


# -- the custom callback example --------------------------------------------------------------


def load_custom_sink() -> ModuleType:
    name = "team_logging_example_custom_sink"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "custom_sink.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


async def test_custom_webhook_callback(start_gateway: StartGateway) -> None:
    received: list[tuple[str | None, dict[str, Any]]] = []

    async def hook(request: Request) -> Response:
        received.append((request.headers.get("authorization"), await request.json()))
        return JSONResponse({"ok": True})

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    custom = load_custom_sink()
    custom.install()  # process-wide: the gateway built next includes it
    try:
        gateway = await start_gateway()
    finally:
        unregister_callback("webhook")
    async with run_uvicorn_async(receiver) as hook_url:
        token = "hook-token-0123456789"
        callback = {
            "callback_name": "webhook",
            "callback_type": "success_and_failure",
            "callback_vars": {"webhook_url": f"{hook_url}/hook", "webhook_token": token},
        }
        response = await gateway.client.post("/team/t/callback", json=callback, headers=AUTH)
        assert response.status_code == 200, response.text
        assert token not in response.text
        bad = {"callback_name": "webhook", "callback_vars": {}}
        response = await gateway.client.post("/team/t/callback", json=bad, headers=AUTH)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "callback_vars.webhook_url"
        key = await gateway.key("t", key_alias="hooked")
        response = await gateway.client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4", "messages": [{"role": "user", "content": "to the hook"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200
        await gateway.flush()
    assert len(received) == 1
    authorization, record = received[0]
    assert authorization == f"Bearer {token}"
    assert record["output"] == "You said: to the hook"
    assert record["key_alias"] == "hooked" and record["team_id"] == "t"
