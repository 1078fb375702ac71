"""The ``otel`` and ``gcs_bucket`` destinations on the example gateway, end to end.

The gateway runs on a real uvicorn; its destinations use the real exporters (OTLP/HTTP protobuf,
OTLP/gRPC, google-cloud-storage) against real local peers: the OTLP receiver fixture and the
``fake-gcs-server`` binary. What is proven here:

* destinations set through ``POST /team/{id}/callback`` and through a key's ``metadata.logging``
  (``/key/generate``, ``/key/update``) receive exactly their own requests' spans (GenAI
  attributes, the request's timings) and NDJSON objects (the standard record);
* ``POST /team/{id}/callback/{name}/test`` answers 200 for a working destination and 400 with a
  reason, never a secret, for refused credentials, a missing bucket or an unreachable peer;
* a failing destination costs the client nothing and is counted in ``/health``, without secrets;
* the GCS credential policy: team admins can never name a key file on the gateway host, and add
  ``gcs_bucket`` destinations only when the operator allows it.

"Nothing else arrived" is proved without sleeping: the dispatcher routes a record to all of its
destinations in one step, so once a request reached one destination, ``/health`` shows whether
any other destination was handed it too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from team_logging_middleware.records import LogRecord
from team_logging_middleware.settings import CallbackSpec
from tests.fixtures.gcs_server import GcsServer
from tests.fixtures.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.helpers import chat_answer, load_gateway, wait_for

MASTER = "sk-1234"
AUTH = {"Authorization": f"Bearer {MASTER}"}
SPAN_KIND_CLIENT = 3
# {prefix}/{team}/{YYYY-MM-DD}/{epoch_ms}-{random}.ndjson
OBJECT_NAME = re.compile(
    r"^(?:(?P<prefix>.+)/)?(?P<team>[^/]+)/(?P<day>\d{4}-\d{2}-\d{2})/"
    r"(?P<ms>\d+)-(?P<rand>[0-9a-f]+)\.ndjson$"
)
# Every field of the standard record, taken from the record type itself.
RECORD_FIELDS = frozenset(
    LogRecord(
        request_id="r",
        team_id=None,
        key_alias=None,
        user_id=None,
        route="/",
        method="POST",
        call_type="unknown",
        outcome="ok",
        status_code=200,
        start_time=0.0,
        end_time=0.0,
    ).to_dict()
)


# -- the gateway ---------------------------------------------------------------------------------


StartGateway = Callable[..., httpx.Client]


@pytest.fixture
def start_gateway(uvicorn_server: Callable[..., str], tmp_path: Path) -> Iterator[StartGateway]:
    """Factory: the example gateway on a real uvicorn, returning a client for it.

    Fast delivery for tests: flush every 20 ms, one retry with a short backoff, 3 s per export.
    """
    counter = iter(range(1_000))
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> httpx.Client:
            gw = load_gateway()
            n = next(counter)
            options: dict[str, Any] = {
                "db": str(tmp_path / f"gateway-{n}.db"),
                "config": None,
                "jsonl_dir": str(tmp_path / "logs"),
                "flush_interval": 0.02,
                "dispatcher_options": {
                    "emit_timeout": 3.0,
                    "max_retries": 1,
                    "backoff_base": 0.01,
                    "backoff_max": 0.05,
                },
            }
            options.update(overrides)
            base_url = uvicorn_server(gw.create_app(gw.GatewaySettings(**options)))
            return stack.enter_context(httpx.Client(base_url=base_url, timeout=20))

        yield start


# -- helpers -------------------------------------------------------------------------------------


def add_callback(
    client: httpx.Client, team: str, entry: dict[str, Any], headers: dict[str, str] = AUTH
) -> httpx.Response:
    return client.post(f"/team/{team}/callback", json=entry, headers=headers)


def new_key(client: httpx.Client, team: str, **body: Any) -> str:
    response = client.post("/key/generate", json={"team_id": team, **body}, headers=AUTH)
    assert response.status_code == 200, response.text
    key: str = response.json()["key"]
    return key


def chat(
    client: httpx.Client, key: str, text: str, *, request_id: str, stream: bool = False
) -> tuple[float, float]:
    """One chat (the answer is checked); returns the wall-clock window around it."""
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0.5,
    }
    headers = {"Authorization": f"Bearer {key}", "x-request-id": request_id}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    before = time.time()
    answer = chat_answer(client, body, headers)
    after = time.time()
    assert answer == f"You said: {text}"
    return before, after


def spans_by_request(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    out: dict[str, ReceivedSpan] = {}
    for span in spans:
        request_id = span.attributes["team_logging.request_id"]
        assert request_id not in out, f"span of {request_id} delivered twice"
        out[request_id] = span
    return out


def bucket_records(gcs: GcsServer, bucket: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every record in ``bucket`` by request id, with the name of the object holding it."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in gcs.list_objects(bucket):
        body = gcs.read_object(bucket, name).decode()
        assert body.endswith("\n")
        for line in body.splitlines():
            record = json.loads(line)
            assert record["request_id"] not in out, "a record was written twice"
            out[record["request_id"]] = (name, record)
    return out


def wait_for_records(
    gcs: GcsServer, bucket: str, request_ids: set[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    def ready() -> dict[str, tuple[str, dict[str, Any]]] | None:
        found = bucket_records(gcs, bucket)
        return found if request_ids <= set(found) else None

    result: dict[str, tuple[str, dict[str, Any]]] = wait_for(
        ready, f"records {sorted(request_ids)} in bucket {bucket}"
    )
    return result


def label(entry: dict[str, Any]) -> str:
    """The dispatcher's ``/health`` label of a destination entry."""
    spec = CallbackSpec.model_validate(entry)
    return f"{spec.callback_name}:{spec.identity()[:8]}"


def destination_stats(client: httpx.Client, entry: dict[str, Any]) -> dict[str, Any] | None:
    health = client.get("/health", headers=AUTH).json()
    stats: dict[str, Any] | None = health["dispatcher"]["destinations"].get(label(entry))
    return stats


def otel_entry(endpoint: str, headers: str | None = None, **extra: str) -> dict[str, Any]:
    callback_vars = {"otel_endpoint": endpoint, **extra}
    if headers is not None:
        callback_vars["otel_headers"] = headers
    return {
        "callback_name": "otel",
        "callback_type": "success_and_failure",
        "callback_vars": callback_vars,
    }


def gcs_entry(bucket: str, prefix: str | None = None) -> dict[str, Any]:
    callback_vars = {"gcs_bucket_name": bucket}
    if prefix is not None:
        callback_vars["gcs_path_prefix"] = prefix
    return {
        "callback_name": "gcs_bucket",
        "callback_type": "success",
        "callback_vars": callback_vars,
    }


def check_span(
    span: ReceivedSpan,
    record: dict[str, Any],
    *,
    team: str,
    key_alias: str,
    text: str,
    window: tuple[float, float],
    stream: bool,
) -> None:
    """A span carries the GenAI attributes and exactly the timings of the request's record."""
    attrs = span.attributes
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == SPAN_KIND_CLIENT
    assert span.status_code == 0  # UNSET: the request succeeded
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.id"] == record["response_id"]
    assert attrs["gen_ai.response.id"].startswith("chatcmpl-")
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    words = len(text.split())
    assert attrs["gen_ai.usage.input_tokens"] == words
    assert attrs["gen_ai.usage.output_tokens"] == words + 2  # "You said: " + the words
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.route"] == "/v1/chat/completions"
    assert attrs["team_logging.team_id"] == team
    assert attrs["team_logging.key_alias"] == key_alias
    assert attrs["team_logging.stream"] is stream
    assert attrs["team_logging.outcome"] == "ok"
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": text}]}
    ]
    output = json.loads(attrs["gen_ai.output.messages"])
    assert output[0]["parts"] == [{"type": "text", "content": f"You said: {text}"}]
    # The request's own timings: the span starts when the request arrived (inside the client's
    # window) and matches the record the bucket holds for the same request, to the nanosecond.
    before, after = window
    assert before * 1e9 <= span.start_time_unix_nano <= after * 1e9
    assert span.start_time_unix_nano == round(record["start_time"] * 1e9)
    assert span.end_time_unix_nano == round(record["end_time"] * 1e9)
    assert span.end_time_unix_nano >= span.start_time_unix_nano
    if stream:
        assert attrs["team_logging.time_to_first_token_ms"] == record["time_to_first_token_ms"]
        assert 0 <= record["time_to_first_token_ms"] <= record["latency_ms"]


def check_record(
    name: str,
    record: dict[str, Any],
    *,
    prefix: str | None,
    team: str,
    key_alias: str,
    text: str,
    stream: bool,
) -> None:
    """An NDJSON line is the standard record, in an object named by the documented layout."""
    assert set(record) == RECORD_FIELDS
    assert record["team_id"] == team and record["key_alias"] == key_alias
    assert record["call_type"] == "chat.completions" and record["outcome"] == "ok"
    assert record["status_code"] == 200 and record["stream"] is stream
    assert record["model"] == "gpt-4o-mini"
    assert record["messages"] == [{"role": "user", "content": text}]
    assert record["output"] == f"You said: {text}"
    assert record["finish_reason"] == "stop"
    assert record["usage"]["input_tokens"] == len(text.split())
    match = OBJECT_NAME.match(name)
    assert match is not None, name
    assert match["prefix"] == prefix
    assert match["team"] == team
    # The date and epoch_ms of an object come from its first record's start time, in UTC.
    start_ms = int(match["ms"])
    assert start_ms <= int(record["start_time"] * 1000)
    day = dt.datetime.fromtimestamp(start_ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d")
    assert match["day"] == day


# -- team destinations through the callback API -------------------------------------------------


def test_two_teams_each_get_exactly_their_own_spans_and_objects(
    start_gateway: StartGateway, otlp_receiver: OtlpReceiver, gcs_server: GcsServer
) -> None:
    client = start_gateway()
    otlp_receiver.require_header("authorization", "Bearer alpha-token", tenant="alpha")
    otlp_receiver.require_header("x-team-key", "beta-token", tenant="grpc")
    bucket_a, bucket_b = gcs_server.new_bucket("alpha"), gcs_server.new_bucket("beta")
    teams = {
        "team-alpha": (
            # OTLP/HTTP protobuf, the token percent-encoded as in OTEL_EXPORTER_OTLP_HEADERS
            otel_entry(otlp_receiver.endpoint("alpha"), "Authorization=Bearer%20alpha-token"),
            gcs_entry(bucket_a, prefix="llm/logs"),
        ),
        "team-beta": (
            otel_entry(
                "http://" + otlp_receiver.grpc_target,
                "X-Team-Key=beta-token",
                otel_protocol="grpc",
                otel_service_name="beta-gateway",
            ),
            gcs_entry(bucket_b),
        ),
    }
    for team, entries in teams.items():
        for entry in entries:
            response = add_callback(client, team, entry)
            assert response.status_code == 200, response.text
            assert "-token" not in response.text  # otel_headers is secret: masked
    listed = client.get("/team/team-beta/callback", headers=AUTH).json()["data"]
    assert sorted(listed["success_callbacks"]) == ["gcs_bucket", "otel"]
    assert listed["failure_callbacks"] == ["otel"]

    keys = {
        "team-alpha": new_key(client, "team-alpha", key_alias="alice"),
        "team-beta": new_key(client, "team-beta", key_alias="bob"),
    }
    windows: dict[str, tuple[float, float]] = {}
    texts = {
        "a-plain": "hello from alpha",
        "b-plain": "hello from beta team",
        "a-stream": "alpha streams now please",
        "b-stream": "beta streams",
    }
    for request_id, text in texts.items():
        team = "team-alpha" if request_id.startswith("a-") else "team-beta"
        windows[request_id] = chat(
            client, keys[team], text, request_id=request_id, stream=request_id.endswith("stream")
        )

    spans_a = spans_by_request(otlp_receiver.wait_for_spans(2, tenant="alpha"))
    spans_b = spans_by_request(otlp_receiver.wait_for_spans(2, tenant="grpc"))
    records_a = wait_for_records(gcs_server, bucket_a, {"a-plain", "a-stream"})
    records_b = wait_for_records(gcs_server, bucket_b, {"b-plain", "b-stream"})
    # Exactly their own: nothing of the other team anywhere.
    assert set(spans_a) == {"a-plain", "a-stream"}
    assert set(spans_b) == {"b-plain", "b-stream"}
    assert set(records_a) == {"a-plain", "a-stream"}
    assert set(records_b) == {"b-plain", "b-stream"}
    assert otlp_receiver.refused == []
    assert {s.tenant for s in otlp_receiver.spans()} == {"alpha", "grpc"}

    for request_id, text in texts.items():
        alpha = request_id.startswith("a-")
        team, alias = ("team-alpha", "alice") if alpha else ("team-beta", "bob")
        name, record = (records_a if alpha else records_b)[request_id]
        span = (spans_a if alpha else spans_b)[request_id]
        stream = request_id.endswith("stream")
        check_span(
            span,
            record,
            team=team,
            key_alias=alias,
            text=text,
            window=windows[request_id],
            stream=stream,
        )
        check_record(
            name,
            record,
            prefix="llm/logs" if alpha else None,
            team=team,
            key_alias=alias,
            text=text,
            stream=stream,
        )
    assert {s.resource["service.name"] for s in spans_a.values()} == {"team-logging-middleware"}
    assert {s.resource["service.name"] for s in spans_b.values()} == {"beta-gateway"}
    # Each tenant's requests carried its own credentials (gRPC: lowercase metadata keys).
    for request in otlp_receiver.requests_for("alpha"):
        assert request.transport == "http" and request.content_encoding == "gzip"
        assert request.headers["authorization"] == "Bearer alpha-token"
        assert "x-team-key" not in request.headers
    for request in otlp_receiver.requests_for("grpc"):
        assert request.transport == "grpc" and request.headers["x-team-key"] == "beta-token"
        assert "authorization" not in request.headers
    for name in gcs_server.list_objects(bucket_a):
        assert gcs_server.object_info(bucket_a, name).content_type == "application/x-ndjson"


def test_failed_request_reaches_a_failure_destination_as_an_error_span(
    start_gateway: StartGateway, otlp_receiver: OtlpReceiver, gcs_server: GcsServer
) -> None:
    client = start_gateway()
    bucket = gcs_server.new_bucket()
    assert add_callback(client, "t-fail", otel_entry(otlp_receiver.endpoint("fail"))).is_success
    # The bucket takes successes only: the failed request must not reach it.
    assert add_callback(client, "t-fail", gcs_entry(bucket)).is_success
    key = new_key(client, "t-fail")
    response = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini"},
        headers={"Authorization": f"Bearer {key}", "x-request-id": "bad-1"},
    )
    assert response.status_code == 400
    chat(client, key, "fine", request_id="good-1")
    spans = spans_by_request(otlp_receiver.wait_for_spans(2, tenant="fail"))
    failed = spans["bad-1"]
    assert failed.status_code == 2  # ERROR
    assert "'messages' must be a non-empty list" in failed.status_message  # the app's error
    assert failed.attributes["error.type"] == "400"
    assert failed.attributes["team_logging.outcome"] == "http_error"
    records = wait_for_records(gcs_server, bucket, {"good-1"})
    assert set(records) == {"good-1"}


# -- key destinations (metadata.logging) next to the team's own --------------------------------


def test_key_destinations_receive_next_to_the_team_destination(
    start_gateway: StartGateway, otlp_receiver: OtlpReceiver, gcs_server: GcsServer
) -> None:
    client = start_gateway()
    team_otel = otel_entry(otlp_receiver.endpoint("team-c"))
    assert add_callback(client, "team-c", team_otel).is_success
    otlp_receiver.require_header("authorization", "Bearer key-token", tenant="key-c")
    key_otel = otel_entry(otlp_receiver.endpoint("key-c"), "authorization=Bearer key-token")
    key_bucket = gcs_server.new_bucket("key")
    key_gcs = gcs_entry(key_bucket, prefix="by-key")
    response = client.post(
        "/key/generate",
        json={
            "team_id": "team-c",
            "key_alias": "carol",
            "metadata": {"logging": [key_otel, key_gcs]},
        },
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert "key-token" not in response.text
    key = response.json()["key"]
    plain_key = new_key(client, "team-c", key_alias="dave")  # the team's destination only

    chat(client, key, "key and team", request_id="k-1")
    chat(client, plain_key, "team only", request_id="t-1", stream=True)
    team_spans = spans_by_request(otlp_receiver.wait_for_spans(2, tenant="team-c"))
    assert set(team_spans) == {"k-1", "t-1"}
    key_spans = spans_by_request(otlp_receiver.wait_for_spans(1, tenant="key-c"))
    (name, record) = wait_for_records(gcs_server, key_bucket, {"k-1"})["k-1"]
    check_record(
        name,
        record,
        prefix="by-key",
        team="team-c",
        key_alias="carol",
        text="key and team",
        stream=False,
    )
    # The request of the other key went to the team destination only; routing is one step,
    # so once the team's span of t-1 arrived, the key's destinations were handed all they get.
    assert set(key_spans) == {"k-1"}
    assert key_spans["k-1"].attributes["team_logging.key_alias"] == "carol"
    for entry in (key_otel, key_gcs):
        stats = destination_stats(client, entry)
        assert stats is not None
        assert (stats["sent"], stats["in_queue"], stats["team_ids"]) == (1, 0, ["team-c"])
    assert set(spans_by_request(otlp_receiver.spans("key-c"))) == {"k-1"}
    assert set(bucket_records(gcs_server, key_bucket)) == {"k-1"}

    # /key/update replaces the key's entries: a new collector (gRPC) and a new bucket.
    otlp_receiver.require_header("x-key", "second", tenant="grpc")
    key_otel_2 = otel_entry(
        "http://" + otlp_receiver.grpc_target, "x-key=second", otel_protocol="grpc"
    )
    key_bucket_2 = gcs_server.new_bucket("key2")
    response = client.post(
        "/key/update",
        json={"key": key, "metadata": {"logging": [key_otel_2, gcs_entry(key_bucket_2)]}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert "second" not in response.text
    chat(client, key, "after the update", request_id="k-2", stream=True)
    otlp_receiver.wait_for_spans(3, tenant="team-c")
    grpc_spans = spans_by_request(otlp_receiver.wait_for_spans(1, tenant="grpc"))
    assert set(grpc_spans) == {"k-2"}
    (name, record) = wait_for_records(gcs_server, key_bucket_2, {"k-2"})["k-2"]
    check_record(
        name,
        record,
        prefix=None,
        team="team-c",
        key_alias="carol",
        text="after the update",
        stream=True,
    )
    # The replaced entries got nothing more: their lanes are idle with what they had before.
    for old, sent in ((key_otel, 1), (key_gcs, 1)):
        stats = destination_stats(client, old)
        assert stats is not None
        assert (stats["sent"], stats["in_queue"], stats["failed"]) == (sent, 0, 0)
    assert set(spans_by_request(otlp_receiver.spans("key-c"))) == {"k-1"}
    assert set(bucket_records(gcs_server, key_bucket)) == {"k-1"}


# -- the test-connection route -----------------------------------------------------------------


def test_connection_route_for_otel(
    start_gateway: StartGateway, otlp_receiver: OtlpReceiver
) -> None:
    client = start_gateway()
    otlp_receiver.require_header("authorization", "Bearer right-token-0001", tenant="probe")
    otlp_receiver.require_header("x-probe", "right-grpc-0001", tenant="grpc")
    cases = {
        "ok-http": otel_entry(
            otlp_receiver.endpoint("probe"), "authorization=Bearer right-token-0001"
        ),
        "ok-grpc": otel_entry(
            "http://" + otlp_receiver.grpc_target, "x-probe=right-grpc-0001", otel_protocol="grpc"
        ),
        "bad-http": otel_entry(
            otlp_receiver.endpoint("probe"), "authorization=Bearer wrong-token-0002"
        ),
        "bad-grpc": otel_entry(
            "http://" + otlp_receiver.grpc_target, "x-probe=wrong-grpc-0002", otel_protocol="grpc"
        ),
        "down-http": otel_entry(
            f"http://{otlp_receiver.down_endpoint()}/v1/traces", "authorization=Bearer down-0003"
        ),
        "down-grpc": otel_entry(
            "http://" + otlp_receiver.down_endpoint(), "x-probe=down-0003", otel_protocol="grpc"
        ),
    }
    for team, entry in cases.items():
        assert add_callback(client, team, entry).is_success

    def test(team: str) -> httpx.Response:
        return client.post(f"/team/{team}/callback/otel/test", headers=AUTH)

    for team in ("ok-http", "ok-grpc"):
        response = test(team)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "success"
    tested = [s for s in otlp_receiver.spans() if s.name.endswith("connection test")]
    assert sorted(s.tenant for s in tested) == ["grpc", "probe"]

    expected = {
        "bad-http": "collector refused the credentials (HTTP 401)",
        "bad-grpc": "collector refused the credentials (gRPC UNAUTHENTICATED)",
        "down-http": "collector unreachable",
        "down-grpc": "collector unreachable",
    }
    for team, reason in expected.items():
        response = test(team)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "callback_check_failed"
        assert error["message"].startswith("callback 'otel' check failed: ")
        assert reason in error["message"]
        for secret in ("wrong-token-0002", "wrong-grpc-0002", "down-0003", "right-"):
            assert secret not in response.text


def test_connection_route_for_gcs(
    start_gateway: StartGateway, gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = start_gateway()
    bucket = gcs_server.new_bucket()
    assert add_callback(client, "has-bucket", gcs_entry(bucket, prefix="x")).is_success
    # The operator may name a key file (with the emulator it is not read); it never shows.
    missing = {
        "callback_name": "gcs_bucket",
        "callback_vars": {
            "gcs_bucket_name": "no-such-bucket-tlm",
            "gcs_path_service_account": "/etc/secret-sa-file-0004.json",
        },
    }
    assert add_callback(client, "no-bucket", missing).is_success

    response = client.post("/team/has-bucket/callback/gcs_bucket/test", headers=AUTH)
    assert response.status_code == 200, response.text
    assert gcs_server.list_objects(bucket) == []  # the check writes nothing

    response = client.post("/team/no-bucket/callback/gcs_bucket/test", headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == (
        "callback 'gcs_bucket' check failed: bucket no-such-bucket-tlm not found"
    )
    assert "secret-sa-file" not in response.text

    # Storage that does not answer at all (a bound port where nothing listens).
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{unused.getsockname()[1]}")
        response = client.post("/team/has-bucket/callback/gcs_bucket/test", headers=AUTH)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("callback 'gcs_bucket' check failed: ")
    assert "unreachable" in message


# -- failing destinations cost the client nothing -----------------------------------------------


def test_refused_and_down_destinations_cost_the_client_nothing_and_show_in_health(
    start_gateway: StartGateway, otlp_receiver: OtlpReceiver, gcs_server: GcsServer
) -> None:
    # Short export deadlines: an unreachable collector fails each attempt within 0.7 s.
    client = start_gateway(
        dispatcher_options={
            "emit_timeout": 1.0,
            "max_retries": 1,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
        }
    )
    otlp_receiver.require_header("authorization", "Bearer the-real-token", tenant="strict")
    refused = otel_entry(otlp_receiver.endpoint("strict"), "authorization=Bearer wrong-secret-77")
    down = otel_entry(
        "http://" + otlp_receiver.down_endpoint(), "x-down=down-secret-88", otel_protocol="grpc"
    )
    down_http = otel_entry(
        f"http://{otlp_receiver.down_endpoint()}/v1/traces", "x-down=down-secret-99"
    )
    no_bucket = gcs_entry("missing-bucket-tlm-health")
    working = otel_entry(otlp_receiver.endpoint("works"))
    # A team has one entry per callback name and type; the key's list holds the others.
    assert add_callback(client, "flaky", refused).is_success
    admin_key = new_key(client, "flaky", metadata={"team_admin": True})
    key = new_key(client, "flaky", metadata={"logging": [down, down_http, no_bucket, working]})

    ids = [f"f-{i}" for i in range(4)]
    for i, request_id in enumerate(ids):
        chat(client, key, f"request number {i}", request_id=request_id, stream=i % 2 == 1)
    # The working destination of the same team got everything.
    assert set(spans_by_request(otlp_receiver.wait_for_spans(4, tenant="works"))) == set(ids)

    def all_failed() -> dict[str, dict[str, Any]] | None:
        found: dict[str, dict[str, Any]] = {}
        for name, entry in (
            ("refused", refused),
            ("down", down),
            ("down_http", down_http),
            ("no_bucket", no_bucket),
        ):
            stats = destination_stats(client, entry)
            if stats is None or stats["failed"] + sum(stats["dropped"].values()) < len(ids):
                return None
            found[name] = stats
        return found

    stats = wait_for(all_failed, "every failing destination to count its losses")
    assert "HTTP 401" in stats["refused"]["last_error"]
    assert "unreachable" in stats["down"]["last_error"]
    assert "unreachable" in stats["down_http"]["last_error"]
    assert "missing-bucket-tlm-health not found" in stats["no_bucket"]["last_error"]
    for entry_stats in stats.values():
        assert entry_stats["sent"] == 0 and entry_stats["team_ids"] == ["flaky"]
    health = client.get("/health", headers=AUTH)
    assert health.json()["dispatcher"]["lost"] >= 4 * len(ids)
    # The team admin's own view names its destinations too; no view has a secret.
    team_view = client.get("/health", headers={"Authorization": f"Bearer {admin_key}"})
    assert team_view.status_code == 200
    labels = {d["label"] for d in team_view.json()["destinations"]}
    assert {label(e) for e in (refused, down, down_http, no_bucket, working)} <= labels
    for text in (health.text, team_view.text):
        for secret in ("wrong-secret-77", "down-secret-88", "down-secret-99", "the-real-token"):
            assert secret not in text
        assert key not in text and admin_key not in text
    assert otlp_receiver.requests_for("strict") == []  # refused ones are kept apart
    assert {r.tenant for r in otlp_receiver.refused} == {"strict"}


# -- the GCS credential policy -------------------------------------------------------------------


def team_admin(client: httpx.Client, team: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key(client, team, metadata={'team_admin': True})}"}


def test_team_admins_never_name_a_key_file_and_add_buckets_only_when_allowed(
    start_gateway: StartGateway, gcs_server: GcsServer, otlp_receiver: OtlpReceiver
) -> None:
    client = start_gateway()
    admin = team_admin(client, "team-d")
    with_file = {
        "callback_name": "gcs_bucket",
        "callback_vars": {
            "gcs_bucket_name": "some-bucket-tlm",
            "gcs_path_service_account": "/etc/gateway/operator-sa-9.json",
        },
    }
    response = add_callback(client, "team-d", with_file, headers=admin)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "callback_vars.gcs_path_service_account"
    assert "only the operator (master key) can set gcs_path_service_account" in error["message"]
    assert "operator-sa-9" not in response.text

    response = add_callback(client, "team-d", gcs_entry("some-bucket-tlm"), headers=admin)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "callback_name"
    assert "only the operator (master key) can add gcs_bucket destinations" in error["message"]
    assert "allow_delegated_gcs=True" in error["message"]  # says how to allow it
    assert "TLM_ALLOW_DELEGATED_GCS" in error["message"]

    # The same through a key's metadata.logging, at generation and at update.
    response = client.post(
        "/key/generate",
        json={"team_id": "team-d", "metadata": {"logging": [with_file]}},
        headers=admin,
    )
    assert response.status_code == 400
    assert (
        response.json()["error"]["param"]
        == "metadata.logging[0].callback_vars.gcs_path_service_account"
    )
    key = new_key(client, "team-d")
    response = client.post(
        "/key/update",
        json={"key": key, "metadata": {"logging": [gcs_entry("some-bucket-tlm")]}},
        headers=admin,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata.logging[0].callback_name"
    # Nothing was stored by the refused writes.
    listed = client.get("/team/team-d/callback", headers=AUTH).json()["data"]
    assert listed["callbacks"] == [] and listed["effective_destinations"] == []

    # Other destinations stay open to team admins.
    assert add_callback(
        client, "team-d", otel_entry(otlp_receiver.endpoint("d")), headers=admin
    ).is_success
    # The operator may do both.
    assert add_callback(client, "team-d", with_file).is_success
    response = client.post(
        "/key/update",
        json={"key": key, "metadata": {"logging": [gcs_entry(gcs_server.new_bucket())]}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text


def test_an_operator_can_let_team_admins_add_buckets_but_never_key_files(
    start_gateway: StartGateway, gcs_server: GcsServer
) -> None:
    client = start_gateway(allow_delegated_gcs=True)
    admin = team_admin(client, "team-e")
    bucket = gcs_server.new_bucket("delegated")
    response = add_callback(client, "team-e", gcs_entry(bucket, prefix="mine"), headers=admin)
    assert response.status_code == 200, response.text
    response = client.post("/team/team-e/callback/gcs_bucket/test", headers=admin)
    assert response.status_code == 200, response.text
    key = new_key(client, "team-e", key_alias="erin")
    chat(client, key, "delegated bucket", request_id="e-1")
    (name, record) = wait_for_records(gcs_server, bucket, {"e-1"})["e-1"]
    check_record(
        name,
        record,
        prefix="mine",
        team="team-e",
        key_alias="erin",
        text="delegated bucket",
        stream=False,
    )
    # A key file stays the operator's, whatever the option says (env references too).
    for value in ("/home/op/sa.json", "os.environ/GCS_SA_PATH"):
        entry = gcs_entry(bucket)
        entry["callback_vars"]["gcs_path_service_account"] = value
        response = add_callback(client, "team-e", entry, headers=admin)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "callback_vars.gcs_path_service_account"


def test_the_gateway_reads_the_delegated_gcs_switch_from_the_environment() -> None:
    gw = load_gateway()
    assert gw.GatewaySettings.from_args([], environ={}).allow_delegated_gcs is False
    for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        settings = gw.GatewaySettings.from_args([], environ={"TLM_ALLOW_DELEGATED_GCS": value})
        assert settings.allow_delegated_gcs is expected
