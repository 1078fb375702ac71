"""The ``otel`` destination against a real OTLP receiver on loopback (HTTP and gRPC)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from team_logging_middleware.errors import SettingsError, SinkError
from team_logging_middleware.records import REDACTED, LogRecord, Usage
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks import otel
from team_logging_middleware.sinks.otel import (
    BLOCKING_THREAD_PREFIX,
    BLOCKING_WORKERS,
    SINK_TYPE,
    OtelSink,
)
from team_logging_middleware.testing import sample_record
from tests.fixtures.otlp_receiver import OtlpReceiver
from tests.helpers import SinkMaker, build_without

START = 1_717_171_717.25  # 2024-05-31T16:08:37.25Z
END = START + 1.5
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


def make_record(**overrides: Any) -> LogRecord:
    defaults: dict[str, Any] = {
        "team_id": "team-1",
        "key_alias": "alias-1",
        "user_id": "user-1",
        "start_time": START,
        "end_time": END,
        "completion_start_time": START + 0.25,
        "model": "gpt-4",
        "response_model": "gpt-4-0613",
        "response_id": "chatcmpl-123",
        "model_parameters": {"temperature": 0.2, "max_tokens": 64, "top_p": 0.9},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        "output": "4",
        "finish_reason": "stop",
        "usage": Usage(input_tokens=12, output_tokens=1, total_tokens=13),
    }
    return sample_record(**{**defaults, **overrides})


def endpoint_for(receiver: OtlpReceiver, protocol: str, http_tenant: str) -> tuple[str, str]:
    """``(endpoint, tenant)``: the receiver's gRPC target (one tenant, ``"grpc"``), or its HTTP
    endpoint for ``http_tenant``.
    """
    if protocol == "grpc":
        return "http://" + receiver.grpc_target, "grpc"
    return receiver.endpoint(http_tenant), http_tenant


@pytest.fixture
async def make_sink(shared_http: httpx.AsyncClient) -> AsyncIterator[SinkMaker[OtelSink]]:
    """Builds destinations through the sink type's factory; closes them all at teardown."""
    maker = SinkMaker(SINK_TYPE, OtelSink, shared_http)
    yield maker
    await maker.aclose()


# ---- delivery, per tenant ----------------------------------------------------------------------


async def test_two_teams_each_receive_only_their_spans_with_their_headers(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    otlp_receiver.require_header("authorization", "Bearer team-1-token", tenant="t1")
    otlp_receiver.require_header("authorization", "Bearer team-2-token", tenant="t2")
    sink1 = make_sink(
        {
            "otel_endpoint": otlp_receiver.endpoint("t1"),
            "otel_headers": "Authorization=Bearer%20team-1-token,X-Project=one",
        },
        team_id="team-1",
    )
    sink2 = make_sink(
        {
            "otel_endpoint": otlp_receiver.endpoint("t2"),
            "otel_headers": "authorization=Bearer team-2-token",
        },
        team_id="team-2",
    )

    await sink1.emit([make_record(request_id="a1"), make_record(request_id="a2")])
    await sink2.emit([make_record(request_id="b1", team_id="team-2", key_alias="alias-2")])

    assert otlp_receiver.refused == []
    spans1, spans2 = otlp_receiver.spans("t1"), otlp_receiver.spans("t2")
    assert [s.attributes["team_logging.request_id"] for s in spans1] == ["a1", "a2"]
    assert {s.attributes["team_logging.team_id"] for s in spans1} == {"team-1"}
    assert [s.attributes["team_logging.request_id"] for s in spans2] == ["b1"]
    assert spans2[0].attributes["team_logging.team_id"] == "team-2"
    assert spans2[0].attributes["team_logging.key_alias"] == "alias-2"
    (request1,) = otlp_receiver.requests_for("t1")
    (request2,) = otlp_receiver.requests_for("t2")
    assert request1.headers["authorization"] == "Bearer team-1-token"
    assert request1.headers["x-project"] == "one"
    assert request2.headers["authorization"] == "Bearer team-2-token"
    assert "x-project" not in request2.headers
    assert request1.content_type == "application/x-protobuf"
    assert request1.content_encoding == "gzip"


async def test_span_follows_the_genai_semantic_conventions(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink(
        {"otel_endpoint": otlp_receiver.endpoint("conv"), "otel_service_name": "gateway-eu"}
    )
    record = make_record(
        cache_hit=True,
        model_parameters={"temperature": 1, "max_completion_tokens": 32, "top_p": 0.5, "stop": "x"},
        tool_calls=[
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'},
            }
        ],
        finish_reason="tool_calls",
    )
    await sink.emit([record])

    (span,) = otlp_receiver.spans("conv")
    assert span.name == "chat gpt-4"
    assert span.kind == SPAN_KIND_CLIENT
    assert span.start_time_unix_nano == round(START * 1e9)
    assert span.end_time_unix_nano == round(END * 1e9)
    assert span.status_code == 0  # unset: a success is not marked OK by instrumentations
    assert span.resource == {"service.name": "gateway-eu"}
    assert span.scope_name == "team_logging_middleware"
    attrs = span.attributes
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4",
        "gen_ai.response.model": "gpt-4-0613",
        "gen_ai.response.id": "chatcmpl-123",
        "gen_ai.request.temperature": 1.0,
        "gen_ai.request.max_tokens": 32,
        "gen_ai.request.top_p": 0.5,
        "gen_ai.request.stop_sequences": ["x"],
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 1,
        "gen_ai.response.finish_reasons": ["tool_calls"],
        "team_logging.team_id": "team-1",
        "team_logging.key_alias": "alias-1",
        "team_logging.request_id": "req-1",
        "team_logging.outcome": "ok",
        "team_logging.cache_hit": True,
        "http.response.status_code": 200,
    }
    assert {k: attrs[k] for k in expected} == expected
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is 2+2?"}]},
    ]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "4"},
                {"type": "tool_call", "id": "call_1", "name": "add", "arguments": {"a": 2, "b": 2}},
            ],
            "finish_reason": "tool_calls",
        }
    ]
    assert "error.type" not in attrs


async def test_failed_request_is_an_error_span(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink({"otel_endpoint": otlp_receiver.endpoint("err")})
    await sink.emit(
        [
            make_record(
                request_id="e1",
                outcome="http_error",
                status_code=429,
                error="rate limited by upstream",
                output=None,
                finish_reason=None,
                usage=Usage(),
            ),
            make_record(
                request_id="e2",
                call_type="embeddings",
                model="text-embedding-3-small",
                messages=["a", "b"],
                output=None,
                outcome="client_disconnected",
                status_code=None,
            ),
        ]
    )
    first, second = otlp_receiver.spans("err")
    assert first.status_code == STATUS_ERROR
    assert first.status_message == "rate limited by upstream"
    assert first.attributes["error.type"] == "429"
    assert first.attributes["http.response.status_code"] == 429
    assert "gen_ai.usage.input_tokens" not in first.attributes
    assert second.name == "embeddings text-embedding-3-small"
    assert second.status_code == STATUS_ERROR
    assert second.status_message == "client disconnected"
    assert second.attributes["error.type"] == "client_disconnected"
    assert json.loads(second.attributes["gen_ai.input.messages"]) == [
        {
            "role": "user",
            "parts": [{"type": "text", "content": "a"}, {"type": "text", "content": "b"}],
        }
    ]


async def test_redacted_records_carry_no_message_content(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink({"otel_endpoint": otlp_receiver.endpoint("gdpr")})
    await sink.emit(
        [
            make_record(
                redacted=True,
                messages=REDACTED,
                output=REDACTED,
                tool_calls=[{"id": "c", "function": {"name": "f", "arguments": REDACTED}}],
            )
        ]
    )
    (span,) = otlp_receiver.spans("gdpr")
    assert "gen_ai.input.messages" not in span.attributes
    assert "gen_ai.output.messages" not in span.attributes
    assert span.attributes["team_logging.redacted"] is True
    assert REDACTED not in json.dumps(span.attributes)
    # Metadata still flows: the team keeps its usage and latency view.
    assert span.attributes["gen_ai.usage.input_tokens"] == 12
    assert span.attributes["gen_ai.request.model"] == "gpt-4"


async def test_endpoint_without_path_gets_the_traces_path(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink({"otel_endpoint": otlp_receiver.http_url + "/"})
    assert sink.target.endpoint == otlp_receiver.http_url + "/v1/traces"
    await sink.emit([make_record()])
    assert len(otlp_receiver.spans("default")) == 1


async def test_retried_export_repeats_the_same_span_ids(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink({"otel_endpoint": otlp_receiver.endpoint("ids")})
    await sink.emit([make_record(request_id="same")])
    await sink.emit([make_record(request_id="same")])
    await sink.emit([make_record(request_id="other")])
    first, again, other = otlp_receiver.spans("ids")
    assert (first.trace_id, first.span_id) == (again.trace_id, again.span_id)
    assert first.trace_id != other.trace_id
    assert len(first.trace_id) == 32 and int(first.trace_id, 16) != 0


async def test_grpc_export_sends_lowercase_metadata(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    otlp_receiver.require_header("x-tenant-token", "grpc-secret", tenant="grpc")
    sink = make_sink(
        {
            "otel_endpoint": "http://" + otlp_receiver.grpc_target,
            "otel_protocol": "grpc",
            "otel_headers": "X-Tenant-Token=grpc-secret",
        }
    )
    await sink.emit([make_record(request_id="g1"), make_record(request_id="g2")])

    assert otlp_receiver.refused == []
    spans = otlp_receiver.spans("grpc")
    assert [s.attributes["team_logging.request_id"] for s in spans] == ["g1", "g2"]
    assert spans[0].name == "chat gpt-4"
    (request,) = otlp_receiver.requests_for("grpc")
    assert request.headers["x-tenant-token"] == "grpc-secret"


def test_grpc_endpoint_forms() -> None:
    plain = otel.parse_target({"otel_endpoint": "http://collector:4317", "otel_protocol": "grpc"})
    assert (plain.endpoint, plain.insecure) == ("collector:4317", True)
    tls = otel.parse_target({"otel_endpoint": "collector.example:4317", "otel_protocol": "grpc"})
    assert (tls.endpoint, tls.insecure) == ("collector.example:4317", False)
    tls_url = otel.parse_target({"otel_endpoint": "https://collector", "otel_protocol": "grpc"})
    assert (tls_url.endpoint, tls_url.insecure) == ("collector:4317", False)


# ---- the environment never reaches a tenant --------------------------------------------------

OPERATOR_ENV = {
    "OTEL_EXPORTER_OTLP_HEADERS": "x-operator-token=SECRET-OPERATOR",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-operator-traces=SECRET-TRACES",
}


def _set_operator_env(monkeypatch: pytest.MonkeyPatch, down: str) -> None:
    for name, value in OPERATOR_ENV.items():
        monkeypatch.setenv(name, value)
    # Endpoint / timeout / compression / TLS settings meant for the operator's own collector.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{down}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://{down}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.001")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "false")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")


def test_installed_stock_exporter_does_leak_environment_headers(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins the hazard on the installed version: the stock exporter sends the operator's token.

    If this starts failing, the exporter changed how it reads the environment; re-check the
    guard in ``sinks/otel.py`` (the other tests here prove the guard itself).
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", OPERATOR_ENV["OTEL_EXPORTER_OTLP_HEADERS"])
    stock = OTLPSpanExporter(endpoint=otlp_receiver.endpoint("stock"), timeout=5)
    try:
        probe = ReadableSpan(
            name="probe", context=SpanContext(1, 1, is_remote=False), start_time=1, end_time=2
        )
        stock.export([probe])
    finally:
        stock.shutdown()
    (request,) = otlp_receiver.requests_for("stock")
    assert request.headers.get("x-operator-token") == "SECRET-OPERATOR"


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
@pytest.mark.parametrize("tenant_headers", ["", "x-tenant=mine"])
async def test_environment_headers_never_reach_a_tenant_collector(
    otlp_receiver: OtlpReceiver,
    make_sink: Callable[..., OtelSink],
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
    tenant_headers: str,
) -> None:
    _set_operator_env(monkeypatch, otlp_receiver.down_endpoint())
    endpoint, tenant = endpoint_for(otlp_receiver, protocol, "tenant")
    callback_vars = {"otel_endpoint": endpoint, "otel_protocol": protocol}
    if tenant_headers:
        callback_vars["otel_headers"] = tenant_headers
    sink = make_sink(callback_vars)

    await sink.emit([make_record()])  # reaches the tenant's endpoint, not the env's

    (request,) = otlp_receiver.requests_for(tenant)
    assert len(request.spans) == 1
    assert not {"x-operator-token", "x-operator-traces"} & set(request.headers)
    assert "SECRET" not in json.dumps(request.headers)
    if tenant_headers:
        assert request.headers["x-tenant"] == "mine"


# ---- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_wrong_credentials_are_a_non_retryable_error(
    otlp_receiver: OtlpReceiver,
    make_sink: Callable[..., OtelSink],
    protocol: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint, tenant = endpoint_for(otlp_receiver, protocol, "auth")
    otlp_receiver.require_header("authorization", "Bearer right", tenant=tenant)
    sink = make_sink(
        {
            "otel_endpoint": endpoint,
            "otel_protocol": protocol,
            "otel_headers": "authorization=Bearer wrong-secret-value",
        }
    )
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert info.value.retryable is False
    assert "refused the credentials" in info.value.reason
    assert ("UNAUTHENTICATED" if protocol == "grpc" else "HTTP 401") in info.value.reason
    assert len(otlp_receiver.refused) == 1  # no retries of a 401
    assert "wrong-secret-value" not in caplog.text
    assert "wrong-secret-value" not in repr(sink)
    assert "wrong-secret-value" not in str(info.value)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_down_collector_is_a_retryable_error_within_the_timeout(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink], protocol: str
) -> None:
    down = otlp_receiver.down_endpoint()
    endpoint = f"http://{down}" + ("" if protocol == "grpc" else "/v1/traces")
    sink = make_sink({"otel_endpoint": endpoint, "otel_protocol": protocol}, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    # Bounded by the destination's timeout (plus a grace), not by the exporter's 10 s default.
    assert time.monotonic() - started < 0.5 + 2.0 + 1.0
    assert info.value.retryable is True
    assert "unreachable" in info.value.reason


async def test_server_error_is_retryable_with_its_status(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    otlp_receiver.answer(503, tenant="busy")
    sink = make_sink({"otel_endpoint": otlp_receiver.endpoint("busy")}, timeout=0.5)
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert (info.value.retryable, info.value.status) == (True, 503)


async def test_bad_request_and_redirect_are_not_retryable(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink({"otel_endpoint": otlp_receiver.endpoint("odd")})
    otlp_receiver.answer(400, tenant="odd")
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert (info.value.retryable, info.value.status) == (False, 400)
    # The stock exporter counts any status below 400 as delivered; a redirect delivered nothing.
    otlp_receiver.answer(307, tenant="odd")
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert (info.value.retryable, info.value.status) == (False, 307)
    assert "redirected" in info.value.reason


async def test_closed_destination_refuses_to_export(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    sink = make_sink({"otel_endpoint": otlp_receiver.endpoint("closed")})
    await sink.aclose()
    await sink.aclose()  # idempotent
    with pytest.raises(SinkError, match="closed"):
        await sink.emit([make_record()])
    assert otlp_receiver.requests_for("closed") == []


async def test_a_name_resolving_to_a_metadata_address_is_refused_at_export(
    otlp_receiver: OtlpReceiver,
    make_sink: Callable[..., OtelSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A harmless-looking name written through the admin API, later re-pointed by its DNS owner.
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "collector.rebind.test":
            return real_getaddrinfo("169.254.169.254", port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    port = otlp_receiver.http_url.rsplit(":", 1)[1]
    sink = make_sink({"otel_endpoint": f"http://collector.rebind.test:{port}/v1/traces"})
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert info.value.retryable is False
    assert "metadata" in info.value.reason
    assert otlp_receiver.requests == []


async def test_a_host_name_is_resolved_and_used(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    port = otlp_receiver.http_url.rsplit(":", 1)[1]
    sink = make_sink({"otel_endpoint": f"http://localhost:{port}/named/v1/traces"})
    await sink.emit([make_record()])
    assert len(otlp_receiver.spans("named")) == 1


# ---- check() -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_check_sends_one_test_span_and_reports_failures(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink], protocol: str
) -> None:
    endpoint, tenant = endpoint_for(otlp_receiver, protocol, "chk")
    otlp_receiver.require_header("x-key", "good", tenant=tenant)
    good = make_sink(
        {"otel_endpoint": endpoint, "otel_protocol": protocol, "otel_headers": "x-key=good"}
    )
    await good.check()
    (span,) = otlp_receiver.spans(tenant)
    assert span.name == "team-logging-middleware connection test"

    bad = make_sink(
        {"otel_endpoint": endpoint, "otel_protocol": protocol, "otel_headers": "x-key=bad"}
    )
    with pytest.raises(SinkError, match="refused the credentials"):
        await bad.check()

    down = otlp_receiver.down_endpoint()
    unreachable = make_sink(
        {
            "otel_endpoint": f"http://{down}" + ("" if protocol == "grpc" else "/v1/traces"),
            "otel_protocol": protocol,
        },
        timeout=0.5,
    )
    with pytest.raises(SinkError, match="unreachable"):
        await unreachable.check()


# ---- resources ---------------------------------------------------------------------------------


async def test_threads_stay_bounded_with_200_destinations(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    before = threading.active_count()
    sinks = [
        make_sink({"otel_endpoint": otlp_receiver.endpoint(f"many{i % 10}")}, team_id=f"team-{i}")
        for i in range(200)
    ]
    await asyncio.gather(
        *(sink.emit([make_record(request_id=f"m{i}")]) for i, sink in enumerate(sinks))
    )

    assert len(otlp_receiver.spans()) == 200
    pool_threads = [t for t in threading.enumerate() if t.name.startswith(BLOCKING_THREAD_PREFIX)]
    assert 1 <= len(pool_threads) <= BLOCKING_WORKERS
    assert threading.active_count() - before <= BLOCKING_WORKERS


async def test_global_opentelemetry_state_is_never_touched(
    otlp_receiver: OtlpReceiver, make_sink: Callable[..., OtelSink]
) -> None:
    import opentelemetry.metrics._internal as metrics_internal
    import opentelemetry.trace as trace_api

    for protocol, endpoint in (
        ("http/protobuf", otlp_receiver.endpoint("global")),
        ("grpc", "http://" + otlp_receiver.grpc_target),
    ):
        sink = make_sink({"otel_endpoint": endpoint, "otel_protocol": protocol})
        await sink.emit([make_record()])
        await sink.check()
    assert trace_api._TRACER_PROVIDER is None
    assert metrics_internal._METER_PROVIDER is None


# ---- settings ----------------------------------------------------------------------------------


def _normalize(callback_vars: dict[str, str]) -> CallbackSpec:
    return SINK_TYPE.normalize(CallbackSpec(callback_name="otel", callback_vars=callback_vars))


def test_valid_settings_pass_and_keep_their_values() -> None:
    spec = _normalize(
        {
            "otel_endpoint": "https://collector.example:4318/v1/traces",
            "otel_protocol": "http/protobuf",
            "otel_headers": "api-key=abc",
            "otel_service_name": "svc",
        }
    )
    assert spec.callback_vars["otel_endpoint"] == "https://collector.example:4318/v1/traces"
    # os.environ/ references are checked when the destination is built, not when written.
    _normalize({"otel_endpoint": "os.environ/OTEL_TEAM_ENDPOINT", "otel_headers": "os.environ/X"})


@pytest.mark.parametrize(
    ("callback_vars", "param", "fragment"),
    [
        ({"otel_endpoint": "http://c:4318", "otel_protocol": "thrift"}, "otel_protocol", "grpc"),
        ({"otel_endpoint": "collector:4318"}, "otel_endpoint", "http://"),
        ({"otel_endpoint": "ftp://collector/v1/traces"}, "otel_endpoint", "http://"),
        ({"otel_endpoint": "http://u:pw@collector/v1/traces"}, "otel_endpoint", "credentials"),
        ({"otel_endpoint": "http://169.254.169.254/v1/traces"}, "otel_endpoint", "metadata"),
        ({"otel_endpoint": "http://[fd00:ec2::254]/v1/traces"}, "otel_endpoint", "metadata"),
        (
            {"otel_endpoint": "169.254.169.254:4317", "otel_protocol": "grpc"},
            "otel_endpoint",
            "metadata",
        ),
        ({"otel_endpoint": "collector", "otel_protocol": "grpc"}, "otel_endpoint", "port"),
        ({"otel_endpoint": "http://c/v1/traces?x=1"}, "otel_endpoint", "query"),
        (
            {"otel_endpoint": "http://c/v1/traces", "otel_headers": "Bearer tok-123"},
            "otel_headers",
            "entry 1",
        ),
        (
            {"otel_endpoint": "http://c/v1/traces", "otel_headers": "a=1,b c=tok-123"},
            "otel_headers",
            "entry 2",
        ),
        (
            {"otel_endpoint": "http://c/v1/traces", "otel_headers": "a=tok-123%0d%0aX: y"},
            "otel_headers",
            "ASCII",
        ),
        (
            {"otel_endpoint": "c:4317", "otel_protocol": "grpc", "otel_headers": "grpc-x=tok-123"},
            "otel_headers",
            "gRPC metadata key",
        ),
    ],
)
def test_invalid_settings_are_refused_by_name_without_echoing_secrets(
    callback_vars: dict[str, str], param: str, fragment: str
) -> None:
    with pytest.raises(SettingsError) as info:
        _normalize(callback_vars)
    assert info.value.param == f"callback_vars.{param}"
    assert fragment in info.value.message
    assert "tok-123" not in info.value.message


def test_settings_with_env_references_are_checked_at_build(
    make_sink: Callable[..., OtelSink],
) -> None:
    with pytest.raises(SettingsError, match="otel_protocol"):
        make_sink({"otel_endpoint": "http://c/v1/traces", "otel_protocol": "zipkin"})


async def test_receiver_fixture_decodes_otlp_json_with_gzip(otlp_receiver: OtlpReceiver) -> None:
    document = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "j"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "manual"},
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "name": "json span",
                                "kind": 3,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "attributes": [
                                    {"key": "n", "value": {"intValue": "7"}},
                                    {
                                        "key": "list",
                                        "value": {"arrayValue": {"values": [{"stringValue": "a"}]}},
                                    },
                                ],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    async with httpx.AsyncClient() as client:
        response = await client.post(
            otlp_receiver.endpoint("json"),
            content=gzip.compress(json.dumps(document).encode()),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    assert response.status_code == 200
    (span,) = otlp_receiver.spans("json")
    assert (span.name, span.trace_id, span.span_id) == (
        "json span",
        "5b8efff798038103d269b633813fc60c",
        "eee19b7ec3c1b174",
    )
    assert span.attributes == {"n": 7, "list": ["a"]}
    assert span.resource == {"service.name": "j"}


def test_module_imports_without_the_extra_and_names_it() -> None:
    message = build_without(
        ("opentelemetry", "grpc"), "otel", {"otel_endpoint": "http://c/v1/traces"}, "otel"
    )
    assert message == (
        "the otel destination needs an optional dependency: "
        'pip install "team-logging-middleware[otel]"'
    )


# ---- through the dispatcher --------------------------------------------------------------------


async def test_end_to_end_through_the_dispatcher(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from team_logging_middleware._types import Destination
    from team_logging_middleware.dispatcher import Dispatcher
    from team_logging_middleware.sinks import default_registry

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-operator-token=SECRET-OPERATOR")
    otlp_receiver.require_header("authorization", "Bearer one", tenant="e2e1")
    otlp_receiver.require_header("x-team-key", "two", tenant="grpc")
    team1 = CallbackSpec(
        callback_name="otel",
        callback_type="success_and_failure",
        callback_vars={
            "otel_endpoint": otlp_receiver.endpoint("e2e1"),
            "otel_headers": "authorization=Bearer one",
        },
    )
    team2 = CallbackSpec(
        callback_name="otel",
        callback_vars={
            "otel_endpoint": "http://" + otlp_receiver.grpc_target,
            "otel_protocol": "grpc",
            "otel_headers": "os.environ/OTEL_TEAM2_HEADERS",
        },
    )
    dispatcher = Dispatcher(
        default_registry(),
        flush_interval=0.05,
        emit_timeout=5.0,
        environ={"OTEL_TEAM2_HEADERS": "X-Team-Key=two"},
    )
    await dispatcher.start()
    try:
        to1 = [Destination(team1, "team", team1.identity())]
        to2 = [Destination(team2, "team", team2.identity())]
        assert dispatcher.submit_record(make_record(request_id="d1"), to1)
        assert dispatcher.submit_record(
            make_record(request_id="d2", outcome="exception", error="boom"), to1
        )
        assert dispatcher.submit_record(make_record(request_id="d3", team_id="team-2"), to2)
        report = await dispatcher.flush(15.0)
        assert (report.delivered, report.dropped, report.timed_out) == (3, 0, False)

        await dispatcher.check(team1, "team-1")
        wrong = team1.model_copy(
            update={"callback_vars": {**team1.callback_vars, "otel_headers": "authorization=no"}}
        )
        with pytest.raises(SinkError, match="HTTP 401"):
            await dispatcher.check(wrong, "team-1")
    finally:
        await dispatcher.stop(10.0)

    spans1 = otlp_receiver.spans("e2e1")
    assert sorted(
        s.attributes["team_logging.request_id"]
        for s in spans1
        if s.name != otel.CONNECTION_TEST_SPAN
    ) == ["d1", "d2"]
    assert [s.attributes["team_logging.request_id"] for s in otlp_receiver.spans("grpc")] == ["d3"]
    for request in otlp_receiver.requests + otlp_receiver.refused:
        assert "x-operator-token" not in request.headers
    assert "Bearer one" not in json.dumps(dispatcher.stats(), default=str)
