"""End to end: the example gateway on a real uvicorn, driven the way the LiteLLM docs drive it.

Records are read where they land (JSONL files, a fake Langfuse); "nothing was logged" is proved by
a later request through the same destination arriving while the earlier one never does (one
destination delivers in order), never by sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from team_logging_middleware.records import REDACTED
from tests.fixtures.fake_langfuse import FakeLangfuse
from tests.helpers import chat_answer, load_gateway, read_jsonl, wait_for

ROOT = Path(__file__).resolve().parents[1]
MASTER = "sk-1234"  # the gateway's documented default
AUTH = {"Authorization": f"Bearer {MASTER}"}
TEAM = "dbe2f686-a686-4896-864a-4c3924458709"  # the docs' team id


def records_until(path: Path, needle: str) -> list[dict[str, Any]]:
    """Every record of ``path`` once one of them has ``needle`` in its output."""

    def ready() -> list[dict[str, Any]] | None:
        records = read_jsonl(path)
        return records if any(needle in (r.get("output") or "") for r in records) else None

    result: list[dict[str, Any]] = wait_for(ready, f"a record with {needle!r} in {path.name}")
    return result


def chat(
    client: httpx.Client, key: str, text: str, *, stream: bool = False, model: str = "gpt-4"
) -> str:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return chat_answer(client, body, {"Authorization": f"Bearer {key}"})


@pytest.fixture
def gateway(
    uvicorn_server: Callable[..., str], tmp_path: Path
) -> Iterator[tuple[httpx.Client, Path]]:
    """The example gateway (temp SQLite db and JSONL dir) on a real uvicorn in a thread."""
    gw = load_gateway()
    logs = tmp_path / "logs"
    settings = gw.GatewaySettings(
        db=str(tmp_path / "gateway.db"),
        config=None,
        jsonl_dir=str(logs),
        flush_interval=0.02,
    )
    base_url = uvicorn_server(gw.create_app(settings))
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client, logs


def test_team_logging_flow(gateway: tuple[httpx.Client, Path]) -> None:
    client, logs = gateway
    # 1. Set a callback for the team.
    response = client.post(
        f"/team/{TEAM}/callback",
        json={
            "callback_name": "jsonl",
            "callback_type": "success_and_failure",
            "callback_vars": {"jsonl_path": "team.jsonl"},
        },
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    # 2. Create a key for the team.
    response = client.post(
        "/key/generate", json={"team_id": TEAM, "key_alias": "alice"}, headers=AUTH
    )
    key = response.json()["key"]
    # 3. Chat with it, plain and streaming.
    assert chat(client, key, "Hello, Claude gm!") == "You said: Hello, Claude gm!"
    assert chat(client, key, "stream me please", stream=True) == "You said: stream me please"
    records = records_until(logs / "team.jsonl", "stream me please")
    assert len(records) == 2
    plain, streamed = records
    assert plain["team_id"] == TEAM and plain["key_alias"] == "alice"
    assert plain["model"] == "gpt-4" and plain["call_type"] == "chat.completions"
    assert plain["messages"] == [{"role": "user", "content": "Hello, Claude gm!"}]
    assert plain["output"] == "You said: Hello, Claude gm!"
    assert plain["usage"] == {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}
    assert plain["status_code"] == 200 and plain["outcome"] == "ok" and plain["stream"] is False
    assert streamed["stream"] is True
    assert streamed["output"] == "You said: stream me please"
    assert streamed["usage"] == {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}
    assert streamed["finish_reason"] == "stop"
    assert streamed["time_to_first_token_ms"] is not None
    # The raw key never reaches a record.
    assert key not in (logs / "team.jsonl").read_text()

    # Disable logging: the seed's exact answer, and the next request leaves nothing.
    response = client.post(f"/team/{TEAM}/disable_logging", headers=AUTH)
    assert response.json() == {
        "status": "success",
        "message": f"Logging disabled for team {TEAM}",
        "data": {"team_id": TEAM, "success_callbacks": [], "failure_callbacks": []},
    }
    chat(client, key, "while disabled")
    listed = client.get(f"/team/{TEAM}/callback", headers=AUTH).json()["data"]
    assert listed["logging_enabled"] is False
    assert [c["callback_name"] for c in listed["callbacks"]] == ["jsonl"]

    # Enable it again: the kept callback is back.
    response = client.post(f"/team/{TEAM}/enable_logging", headers=AUTH)
    assert response.json()["data"]["success_callbacks"] == ["jsonl"]
    chat(client, key, "after enable")
    records = records_until(logs / "team.jsonl", "after enable")
    outputs = [r["output"] for r in records]
    assert outputs == [
        "You said: Hello, Claude gm!",
        "You said: stream me please",
        "You said: after enable",
    ]

    # A failed request reaches a success_and_failure destination as a failure record.
    response = client.post(
        "/v1/chat/completions", json={"model": "gpt-4"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 400
    failed = wait_for(
        lambda: [r for r in read_jsonl(logs / "team.jsonl") if r["status_code"] == 400],
        "the failure record",
    )
    assert failed[0]["outcome"] == "http_error"

    health = client.get("/health", headers=AUTH).json()
    assert health["status"] == "ok"
    assert health["dispatcher"]["sent"] >= 4


def test_key_based_logging(gateway: tuple[httpx.Client, Path]) -> None:
    client, logs = gateway
    entry = {
        "callback_name": "jsonl",
        "callback_type": "success",
        "callback_vars": {"jsonl_path": "keys/k.jsonl"},
    }
    response = client.post(
        "/key/generate",
        json={"team_id": "no-callbacks", "key_alias": "bob", "metadata": {"logging": [entry]}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    key = response.json()["key"]
    chat(client, key, "key logged")
    records = records_until(logs / "keys" / "k.jsonl", "key logged")
    assert [(r["team_id"], r["key_alias"]) for r in records] == [("no-callbacks", "bob")]

    # A bad entry is refused, naming entry and field; the old entry stays in force.
    bad = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "../../escape.jsonl"}}
    response = client.post(
        "/key/update", json={"key": key, "metadata": {"logging": [bad]}}, headers=AUTH
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata.logging[0].callback_vars.jsonl_path"
    chat(client, key, "still logged")
    records_until(logs / "keys" / "k.jsonl", "still logged")
    assert not (logs.parent / "escape.jsonl").exists()

    # metadata_only: the record keeps usage and model, not the prompt or the answer.
    response = client.post(
        "/key/update",
        json={"key": key, "metadata": {"message_logging": "metadata_only"}},
        headers=AUTH,
    )
    assert response.status_code == 200
    chat(client, key, "private words")
    records = wait_for(
        lambda: [r for r in read_jsonl(logs / "keys" / "k.jsonl") if r["redacted"]],
        "the redacted record",
    )
    assert records[0]["output"] == REDACTED
    assert "private words" not in (logs / "keys" / "k.jsonl").read_text()
    assert records[0]["usage"]["input_tokens"] == 2

    # The key's kill switch: nothing for this key, while another key of the same destination
    # (same lane, delivered in order) still logs.
    response = client.post(
        "/key/update",
        json={"key": key, "metadata": {"logging_enabled": False, "message_logging": "full"}},
        headers=AUTH,
    )
    assert response.status_code == 200
    other = client.post(
        "/key/generate",
        json={"team_id": "no-callbacks", "key_alias": "carol", "metadata": {"logging": [entry]}},
        headers=AUTH,
    ).json()["key"]
    chat(client, key, "switched off")
    chat(client, other, "carol speaks")
    records = records_until(logs / "keys" / "k.jsonl", "carol speaks")
    assert not any("switched off" in (r["output"] or "") for r in records)
    assert records[-1]["key_alias"] == "carol"


def test_example_config_demo_team(uvicorn_server: Callable[..., str], tmp_path: Path) -> None:
    """examples/config.yaml loads as shipped and its demo team logs to demo-team.jsonl."""
    gw = load_gateway()
    logs = tmp_path / "logs"
    settings = gw.GatewaySettings(
        db=str(tmp_path / "g.db"), jsonl_dir=str(logs), flush_interval=0.02
    )
    assert settings.config is not None and settings.config.endswith("config.yaml")
    with httpx.Client(base_url=uvicorn_server(gw.create_app(settings)), timeout=10) as client:
        demo = client.post("/key/generate", json={"team_id": "demo-team"}, headers=AUTH).json()
        gdpr = client.post("/key/generate", json={"team_id": "gdpr-team"}, headers=AUTH).json()
        chat(client, gdpr["key"], "gdpr request")
        chat(client, demo["key"], "demo request")
        records = records_until(logs / "demo-team.jsonl", "demo request")
        assert [r["team_id"] for r in records] == ["demo-team"]
        data = client.get("/team/my-secret-project/callback", headers=AUTH).json()["data"]
        assert data["settings_source"] == "config"
        assert data["callback_vars"]["langfuse"]["langfuse_secret_key"] == (
            "os.environ/LANGFUSE_PRIVATE_KEY_1"
        )


def test_gateway_process_runs_the_docs_commands(
    uvicorn_process: Callable[..., tuple[str, Any]], fake_langfuse: FakeLangfuse, tmp_path: Path
) -> None:
    """``python examples/gateway.py --port P`` as its own process, driven like the docs' curls."""
    project = fake_langfuse.add_project()
    base_url, _ = uvicorn_process(
        ["python", "examples/gateway.py", "--port", "{port}", "--db", str(tmp_path / "p.db")],
        cwd=ROOT,
        env={
            "TLM_MASTER_KEY": "",  # the documented default, sk-1234
            "TLM_CONFIG": "",
            "TLM_JSONL_DIR": str(tmp_path / "logs"),
            "TLM_FLUSH_INTERVAL": "0.02",
        },
    )
    with httpx.Client(base_url=base_url, timeout=10) as client:
        response = client.post(
            f"/team/{TEAM}/callback",
            headers={**AUTH, "Content-Type": "application/json"},
            content=json.dumps(
                {
                    "callback_name": "langfuse",
                    "callback_type": "success",
                    "callback_vars": {
                        "langfuse_public_key": project.public_key,
                        "langfuse_secret_key": project.secret_key,
                        "langfuse_host": fake_langfuse.url,
                    },
                }
            ),
        )
        assert response.status_code == 200, response.text
        assert project.secret_key not in response.text
        key = client.post("/key/generate", headers=AUTH, json={"team_id": TEAM}).json()["key"]
        response = client.post(
            "/v1/chat/completions",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            json={"model": "gpt-4", "messages": [{"role": "user", "content": "Hello, Claude gm!"}]},
        )
        assert response.status_code == 200
        wait_for(lambda: fake_langfuse.span_count(project.public_key) >= 1, "the Langfuse span")
        generation = fake_langfuse.generations(project.public_key)[0]
        assert generation["model"] == "gpt-4"
        assert "Hello, Claude gm!" in json.dumps(generation["input"])
        assert "You said: Hello, Claude gm!" in json.dumps(generation["output"])

        listed = client.get(f"/team/{TEAM}/callback", headers=AUTH).json()["data"]
        assert listed["success_callbacks"] == ["langfuse"]
        assert listed["callback_vars"]["langfuse"]["langfuse_public_key"] == project.public_key
        assert project.secret_key not in json.dumps(listed)

        response = client.post(f"/team/{TEAM}/disable_logging", headers=AUTH)
        assert response.json() == {
            "status": "success",
            "message": f"Logging disabled for team {TEAM}",
            "data": {"team_id": TEAM, "success_callbacks": [], "failure_callbacks": []},
        }
        chat(client, key, "while disabled")
        client.post(f"/team/{TEAM}/enable_logging", headers=AUTH)
        chat(client, key, "after enable")
        wait_for(lambda: fake_langfuse.span_count(project.public_key) >= 2, "the second span")
        inputs = [json.dumps(g["input"]) for g in fake_langfuse.generations(project.public_key)]
        assert any("after enable" in i for i in inputs)
        assert not any("while disabled" in i for i in inputs)
