"""Secrets stay secret, and only the right credentials read or change settings.

* A full flow on the example gateway (real uvicorn, every logger captured at DEBUG): admin writes
  with several kinds of secret (Langfuse secret keys, ``otel_headers`` values, values read through
  ``os.environ/`` references, a GCS service-account path, a key's own Langfuse secret), key
  generation, plain and streamed chats, failing destinations, ``/health``, ``GET`` of every
  team's callbacks, refused writes that carry secrets, the connection-test route. Every response
  (body and headers), every log line, the dispatcher's stats and every record exported to any
  destination are then searched for each secret — in full and for its unmasked middle part. None
  may appear.
* Without an encryption key, the example gateway process logs exactly one clear warning at start.
* Admin auth: every admin route answers 401 without valid credentials, with the same body whether
  the team exists or not; a team admin admitted through ``authorize`` reads and changes only its
  own team (403 otherwise, again the same body for existing and unknown teams).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.fake_langfuse import FakeLangfuse
from tests.fixtures.gcs_server import GcsServer
from tests.fixtures.otlp_receiver import OtlpReceiver
from tests.fixtures.servers import free_port, run_uvicorn_async
from tests.helpers import gateway_settings, load_gateway

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
MASTER = "sk-master-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {MASTER}"}


def secret(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# -- capturing everything -----------------------------------------------------------------------


class EveryLine(logging.Handler):
    """Keeps every log record of every logger, formatted with its exception and stack."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + " " + repr(record.args))


@contextlib.contextmanager
def capture_all_logs() -> Iterator[EveryLine]:
    """DEBUG for the root and every existing logger; a handler on each that does not propagate."""
    handler = EveryLine()
    manager = logging.root.manager
    loggers = [logging.root] + [
        logger for logger in manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level) for logger in loggers]
    attached = [logger for logger in loggers if logger is logging.root or not logger.propagate]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    for logger in attached:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in attached:
            logger.removeHandler(handler)
        for logger, level in saved:
            logger.setLevel(level)


@dataclass
class Exchanges:
    """Every response the test received: status, headers and body."""

    seen: list[tuple[str, int, str, str]] = field(default_factory=list)

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.seen.append(
            (
                f"{response.request.method} {response.request.url.path}",
                response.status_code,
                headers,
                response.text,
            )
        )


# -- the full flow ------------------------------------------------------------------------------


async def test_no_secret_leaves_through_responses_logs_stats_or_records(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_langfuse: FakeLangfuse,
    otlp_receiver: OtlpReceiver,
    gcs_server: GcsServer,
) -> None:
    gw = load_gateway()
    alpha = fake_langfuse.add_project(secret_key=secret("sk-lf-alpha-"))
    delta = fake_langfuse.add_project(
        public_key=secret("pk-lf-delta-env-"), secret_key=secret("sk-lf-delta-env-")
    )
    keyed = fake_langfuse.add_project(secret_key=secret("sk-lf-keyed-"))
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY_TLM_DELTA", delta.public_key)
    monkeypatch.setenv("LANGFUSE_SECRET_KEY_TLM_DELTA", delta.secret_key)
    refused_env = secret("aws-")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY_TLM_TEST", refused_env)
    otel_token = secret("otel-token-")
    otlp_receiver.require_header("authorization", f"Bearer {otel_token}", tenant="charlie")
    otlp_receiver.require_header("authorization", "Bearer something-else", tenant="charlie-bad")
    bucket = gcs_server.new_bucket()
    sa_path = str(tmp_path / f"sa-{secrets.token_hex(12)}.json")

    found: dict[str, str] = {
        "alpha langfuse secret": alpha.secret_key,
        "bravo wrong secret": secret("sk-lf-bravo-wrong-"),
        "foxtrot secret (host down)": secret("sk-lf-foxtrot-"),
        "otel header value": otel_token,
        "bad otel header value": secret("otel-bad-"),
        "env-referenced public key": delta.public_key,
        "env-referenced secret key": delta.secret_key,
        "env value refused by the allowlist": refused_env,
        "gcs service account path": sa_path,
        "key-level langfuse secret": keyed.secret_key,
        "master key": MASTER,
    }
    refused_secrets = {f"refused write {i}": secret(f"sk-refused-{i}-") for i in range(8)}
    found.update(refused_secrets)
    r = list(refused_secrets.values())

    def langfuse(public: str, secret_key: str, host: str = fake_langfuse.url) -> dict[str, Any]:
        return {
            "callback_name": "langfuse",
            "callback_type": "success_and_failure",
            "callback_vars": {
                "langfuse_public_key": public,
                "langfuse_secret_key": secret_key,
                "langfuse_host": host,
            },
        }

    def otel(tenant: str, token: str) -> dict[str, Any]:
        return {
            "callback_name": "otel",
            "callback_type": "success_and_failure",
            "callback_vars": {
                "otel_endpoint": otlp_receiver.endpoint(tenant),
                "otel_headers": f"authorization=Bearer%20{token}",
            },
        }

    settings = gateway_settings(
        tmp_path,
        "gateway.db",
        master_key=MASTER,
        flush_interval=0.02,
        dispatcher_options={"max_retries": 1, "backoff_base": 0.01, "backoff_max": 0.02},
    )
    exchanges = Exchanges()
    gateway_keys: list[str] = []
    with capture_all_logs() as logs:
        gateway = gw.create_gateway(settings)
        async with (
            run_uvicorn_async(
                gateway.app, log_config=None, log_level="debug", access_log=True
            ) as url,
            httpx.AsyncClient(
                base_url=url, timeout=30, event_hooks={"response": [exchanges.hook]}
            ) as client,
        ):

            async def ok(method: str, path: str, **kwargs: Any) -> httpx.Response:
                response = await client.request(method, path, headers=AUTH, **kwargs)
                assert response.status_code == 200, (path, response.text)
                return response

            async def bad(method: str, path: str, status: int, **kwargs: Any) -> None:
                response = await client.request(method, path, **{"headers": AUTH, **kwargs})
                assert response.status_code == status, (path, response.text)

            # Admin writes carrying every kind of secret.
            await ok(
                "POST", "/team/alpha/callback", json=langfuse(alpha.public_key, alpha.secret_key)
            )
            await ok(
                "POST",
                "/team/bravo/callback",
                json=langfuse(alpha.public_key, found["bravo wrong secret"]),
            )
            await ok("POST", "/team/charlie/callback", json=otel("charlie", otel_token))
            bad_otel = otel("charlie-bad", found["bad otel header value"])
            bad_otel["callback_type"] = "failure"
            await ok("POST", "/team/charlie/callback", json=bad_otel)
            await ok(
                "POST",
                "/team/delta/callback",
                json=langfuse(
                    "os.environ/LANGFUSE_PUBLIC_KEY_TLM_DELTA",
                    "os.environ/LANGFUSE_SECRET_KEY_TLM_DELTA",
                ),
            )
            await ok(
                "POST",
                "/team/echo/callback",
                json={
                    "callback_name": "gcs_bucket",
                    "callback_type": "success_and_failure",
                    "callback_vars": {
                        "gcs_bucket_name": bucket,
                        "gcs_path_service_account": sa_path,
                    },
                },
            )
            await ok(
                "POST",
                "/team/echo/callback",
                json={
                    "callback_name": "jsonl",
                    "callback_type": "success_and_failure",
                    "callback_vars": {"jsonl_path": "echo.jsonl"},
                },
            )
            down = f"http://127.0.0.1:{free_port()}"
            await ok(
                "POST",
                "/team/foxtrot/callback",
                json=langfuse("pk-lf-foxtrot", found["foxtrot secret (host down)"], down),
            )

            # Writes that are refused, each carrying a secret.
            await bad(
                "POST",
                "/team/alpha/callback",
                400,
                json=langfuse("pk-lf-x", r[0], "http://169.254.169.254"),
            )
            unknown_var = langfuse("pk-lf-x", r[1])
            unknown_var["callback_vars"]["langfuse_secrt_key"] = r[2]
            await bad("POST", "/team/alpha/callback", 400, json=unknown_var)
            await bad(
                "POST", "/team/alpha/callback", 400, json=langfuse("sk-lf-" + r[3], "sk-lf-y")
            )
            await bad(
                "POST",
                "/team/alpha/callback",
                400,
                content=b'{"callback_name": "langfuse", "callback_vars": {"langfuse_secret_key": "'
                + r[4].encode(),
                headers={**AUTH, "content-type": "application/json"},
            )
            await bad(
                "POST",
                "/team/alpha/callback",
                400,
                json=langfuse("pk-lf-x", "os.environ/AWS_SECRET_ACCESS_KEY_TLM_TEST"),
            )
            broken_headers = otel("charlie", "x")
            broken_headers["callback_vars"]["otel_headers"] = f"authorization Bearer {r[5]}"
            await bad("POST", "/team/charlie/callback", 400, json=broken_headers)
            await bad(
                "POST",
                "/team/alpha/callback",
                422,
                json=langfuse("pk-lf-x", r[6] + "x" * 9000),
            )
            await bad(
                "PATCH", "/team/alpha/settings", 422, json={"logging_enabled": True, "token": r[7]}
            )

            # Keys: an ordinary one per team, one with its own Langfuse destination, a team admin.
            for team in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot"):
                body: dict[str, Any] = {"team_id": team, "key_alias": f"{team}-key"}
                response = await ok("POST", "/key/generate", json=body)
                gateway_keys.append(response.json()["key"])
            response = await ok(
                "POST",
                "/key/generate",
                json={
                    "team_id": "golf",
                    "metadata": {"logging": [langfuse(keyed.public_key, keyed.secret_key)]},
                },
            )
            gateway_keys.append(response.json()["key"])
            response = await ok(
                "POST", "/key/generate", json={"team_id": "alpha", "metadata": {"team_admin": True}}
            )
            team_admin = response.json()["key"]
            gateway_keys.append(team_admin)
            await ok(
                "POST",
                "/key/update",
                json={"key": gateway_keys[-2], "metadata": {"tags": ["x"]}},
            )

            # Traffic: plain, streamed and failing chats for every key.
            for key in gateway_keys:
                user = {"Authorization": f"Bearer {key}"}
                chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
                response = await client.post("/v1/chat/completions", json=chat, headers=user)
                assert response.status_code == 200
                response = await client.post(
                    "/v1/chat/completions", json={**chat, "stream": True}, headers=user
                )
                assert response.status_code == 200
                response = await client.post(
                    "/v1/chat/completions", json={"model": "gpt-4o"}, headers=user
                )
                assert response.status_code == 400
            report = await gateway.team_logging.dispatcher.flush(timeout=30)
            assert report.pending == 0

            # Reads and checks.
            for team in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"):
                await ok("GET", f"/team/{team}/callback")
                await ok("GET", f"/team/{team}/settings")
            await ok("POST", "/team/alpha/callback/langfuse/test")
            await ok("POST", "/team/delta/callback/langfuse/test")
            await ok("POST", "/team/echo/callback/gcs_bucket/test")
            await ok("POST", "/team/charlie/callback/otel/test?callback_type=success_and_failure")
            await bad("POST", "/team/bravo/callback/langfuse/test", 400)
            await bad("POST", "/team/foxtrot/callback/langfuse/test", 400)
            await bad("POST", "/team/charlie/callback/otel/test?callback_type=failure", 400)
            health = (await ok("GET", "/health")).json()
            delegated = await client.get(
                "/health", headers={"Authorization": f"Bearer {team_admin}"}
            )
            assert delegated.status_code == 200
            stats = gateway.team_logging.dispatcher.stats()
            await gateway.team_logging.dispatcher.flush(timeout=30)

    # The flow did what it claims: working destinations delivered, failing ones failed.
    lanes = {
        lane["team_ids"][0]: lane for lane in stats["destinations"].values() if lane["team_ids"]
    }
    assert lanes["alpha"]["sent"] > 0 and lanes["delta"]["sent"] > 0 and lanes["echo"]["sent"] > 0
    assert lanes["golf"]["sent"] > 0
    assert lanes["bravo"]["failed"] > 0 and "HTTP 401" in lanes["bravo"]["last_error"]
    failing = [d for d in stats["destinations"].values() if d["sent"] == 0]
    assert len(failing) >= 3  # bravo, foxtrot, and the refused otel tenant
    assert otlp_receiver.spans("charlie") and not otlp_receiver.spans("charlie-bad")

    # Where secrets must never be. (/key/generate shows the new gateway key, once, to its
    # creator: that answer is the one place a gateway key may appear.)
    places: list[tuple[str, str]] = [
        (f"response {i}: {what} {status}", headers + "\n" + body)
        for i, (what, status, headers, body) in enumerate(exchanges.seen)
    ]
    places += [
        ("log lines", "\n".join(logs.lines)),
        ("dispatcher stats", json.dumps(stats)),
        ("health", json.dumps(health)),
        (
            "langfuse spans",
            # What was exported; the fake's own note of the authenticated project is left out.
            json.dumps(
                [
                    {k: v for k, v in span.items() if k != "public_key"}
                    for p in (alpha, delta, keyed)
                    for span in fake_langfuse.spans(p.public_key)
                ]
            ),
        ),
        ("otel spans", repr(otlp_receiver.spans())),
        (
            "gcs objects",
            "\n".join(
                gcs_server.read_object(bucket, name).decode()
                for name in gcs_server.list_objects(bucket)
            ),
        ),
        ("jsonl records", (tmp_path / "logs" / "echo.jsonl").read_text()),
    ]
    # The search looks where the values would show: public parts and masked forms are there.
    everything = "\n".join(text for _place, text in places)
    assert (
        alpha.public_key in everything and "os.environ/LANGFUSE_SECRET_KEY_TLM_DELTA" in everything
    )
    assert alpha.secret_key[:3] + "****" + alpha.secret_key[-2:] in everything
    assert "hello" in everything and "You said: hello" in everything  # the records themselves
    assert len(logs.lines) > 100, "the capture saw the flow"
    assert any("POST /team/alpha/callback" in line for line in logs.lines), "access log captured"

    searched = [(name, value, False) for name, value in found.items()]
    searched += [(f"gateway key {i}", key, True) for i, key in enumerate(gateway_keys)]
    leaks = []
    for name, value, is_gateway_key in searched:
        # A masked value shows a few characters at each end; its middle never appears.
        fragments = (value, value[4:-3])
        for place, text in places:
            if is_gateway_key and "POST /key/generate 200" in place:
                continue
            if any(fragment in text for fragment in fragments):
                leaks.append(f"{name} in {place}")
    assert leaks == []


# -- the warning about secrets in plain text -----------------------------------------------------


def test_the_gateway_warns_once_at_start_when_secrets_are_stored_in_plain_text(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TLM_MASTER_KEY": MASTER,
        "TLM_CONFIG": "",
        "TLM_DB": str(tmp_path / "plain.db"),
        "TLM_JSONL_DIR": str(tmp_path / "logs"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TLM_ENCRYPTION_KEY", None)
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            [sys.executable, "examples/gateway.py", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            with httpx.Client(timeout=1, trust_env=False) as client:
                while True:
                    assert proc.poll() is None, "the gateway exited at start"
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(f"http://127.0.0.1:{port}/health/liveness").is_success:
                            break
                    assert time.monotonic() < deadline, "the gateway did not start"
                    time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    warnings = [line for line in text.splitlines() if "TLM_ENCRYPTION_KEY" in line]
    assert len(warnings) == 1, text
    assert warnings[0].startswith("WARNING") and "plain text" in warnings[0]
    assert MASTER not in text


# -- admin auth ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_gateway(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    gw = load_gateway()
    settings = gateway_settings(tmp_path, "auth.db", master_key=MASTER)
    gateway = gw.create_gateway(settings)
    async with (
        run_uvicorn_async(gateway.app) as url,
        httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client,
    ):
        yield client, gateway


def concrete(path: str, team: str) -> str:
    return path.replace("{team_id}", team).replace("{callback_name}", "jsonl")


async def admin_routes(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """Every (method, path template) of the admin API that needs credentials, from its own
    OpenAPI document, plus the gateway's key routes."""
    document = (await client.get("/openapi.json")).json()
    routes = [
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if operation.get("security") != []
    ]
    assert len(routes) >= 9
    return [*routes, ("POST", "/key/generate"), ("POST", "/key/update")]


async def test_every_admin_route_refuses_bad_credentials_alike(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as (client, _gateway):
        callback = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "k.jsonl"}}
        assert (
            await client.post("/team/known/callback", json=callback, headers=AUTH)
        ).status_code == 200
        plain_key = (
            await client.post("/key/generate", json={"team_id": "known"}, headers=AUTH)
        ).json()["key"]
        credentials: list[dict[str, str]] = [
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {MASTER}x"},
            {"Authorization": f"Bearer {MASTER[:-1]}"},
            {"Authorization": f"Bearer {MASTER.upper()}"},
            {"Authorization": f"Basic {MASTER}"},
            {"Authorization": f"Token {MASTER}"},
            {"Authorization": MASTER},
            {"x-api-key": MASTER},
            {"Authorization": f"Bearer {plain_key}"},  # a gateway key without admin rights
        ]
        bodies: set[bytes] = set()
        checked = 0
        for method, template in await admin_routes(client):
            for headers in credentials:
                answers = []
                for team in ("known", "unknown-team", "x" * 300):
                    response = await client.request(
                        method,
                        concrete(template, team),
                        headers=headers,
                        # A body that would fail every later check: auth must come first.
                        content=b"{" * 70_000 if method in ("POST", "PATCH") else None,
                    )
                    assert response.status_code == 401, (method, template, headers, response.text)
                    assert response.headers["www-authenticate"] == "Bearer"
                    answers.append(response.content)
                    checked += 1
                assert len(set(answers)) == 1, (method, template)
                bodies.update(answers)
        # One answer for every route and every wrong credential: nothing to learn from it.
        assert len(bodies) == 1 and checked > 300
        (body,) = bodies
        assert json.loads(body)["error"]["type"] == "authentication_error"
        # The public routes stay public.
        assert (await client.get("/health/liveness")).status_code == 200


async def test_team_admins_read_and_change_only_their_own_team(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as (client, gateway):
        callback = {"callback_name": "jsonl", "callback_vars": {"jsonl_path": "t.jsonl"}}
        for team in ("mine", "theirs"):
            response = await client.post(f"/team/{team}/callback", json=callback, headers=AUTH)
            assert response.status_code == 200
        response = await client.post(
            "/key/generate",
            json={"team_id": "mine", "metadata": {"team_admin": True}},
            headers=AUTH,
        )
        admin = {"Authorization": f"Bearer {response.json()['key']}"}
        theirs_key = (
            await client.post("/key/generate", json={"team_id": "theirs"}, headers=AUTH)
        ).json()["key"]
        before = {
            team: (await gateway.team_logging.store.get_team(team)).model_dump()
            for team in ("mine", "theirs")
        }

        bodies: set[bytes] = set()
        team_routes = [(m, p) for m, p in await admin_routes(client) if "{team_id}" in p]
        for method, template in team_routes:
            payload = {"logging_enabled": False} if method == "PATCH" else callback
            answers = []
            for team in ("theirs", "nobody-has-this-team"):
                response = await client.request(
                    method,
                    concrete(template, team),
                    headers=admin,
                    json=payload if method in ("POST", "PATCH") else None,
                )
                assert response.status_code == 403, (method, template, response.text)
                answers.append(response.content)
            assert len(set(answers)) == 1, (method, template)
            bodies.update(answers)
            # Its own team: allowed (any answer but 401/403).
            response = await client.request(
                method,
                concrete(template, "mine"),
                headers=admin,
                json=payload if method in ("POST", "PATCH") else None,
            )
            assert response.status_code not in (401, 403), (method, template, response.text)
        assert len(bodies) == 1
        # Keys of another team are out of reach too.
        response = await client.post("/key/generate", json={"team_id": "theirs"}, headers=admin)
        assert response.status_code == 403
        response = await client.post(
            "/key/update", json={"key": theirs_key, "key_alias": "mine now"}, headers=admin
        )
        assert response.status_code == 403
        # And the other team's settings are exactly as they were.
        after = await gateway.team_logging.store.get_team("theirs")
        assert after is not None and after.model_dump() == before["theirs"]
        # The health view of a team admin holds no other team's destinations.
        health = (await client.get("/health", headers=admin)).json()
        assert "dispatcher" not in health
        assert all(d["team_ids"] == ["mine"] for d in health["destinations"])
