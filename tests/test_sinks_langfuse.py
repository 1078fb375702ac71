"""The Langfuse sink against a real (fake) Langfuse server on loopback, with a real httpx client."""

from __future__ import annotations

import datetime
import email.utils
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import opentelemetry.trace
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from team_logging_middleware.errors import SettingsError, SinkError
from team_logging_middleware.records import REDACTED, LogRecord, Usage
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks import PartialBatchError
from team_logging_middleware.sinks.base import CheckableSink, Sink, SinkContext, SinkRegistry
from team_logging_middleware.sinks.langfuse import (
    DEFAULT_HOST,
    LANGFUSE_ATTRIBUTES,
    SINK_TYPE,
    LangfuseSink,
    encode_span,
    langfuse_span,
)
from team_logging_middleware.testing import sample_record
from tests.fixtures.fake_langfuse import FakeLangfuse, Project, decode_export, flatten_spans

START = 1_714_564_800.0  # 2024-05-01T12:00:00Z


def make_record(**overrides: Any) -> LogRecord:
    defaults: dict[str, Any] = {
        "team_id": "team-a",
        "key_alias": "ci-key",
        "user_id": "user-9",
        "start_time": START,
        "end_time": START + 1.25,
        "completion_start_time": START + 1.2,
        "model": "gpt-4o-mini",
        "response_model": "gpt-4o-mini-2024-07-18",
        "response_id": "chatcmpl-1",
        "model_parameters": {"temperature": 0.2, "max_tokens": 64},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
        ],
        "output": "Hello there",
        "finish_reason": "stop",
        "usage": Usage(input_tokens=12, output_tokens=5, total_tokens=17),
        "metadata": {"key_id": "k-1"},
    }
    return sample_record(**{**defaults, **overrides})


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as http:
        yield http


def build_sink(
    project: Project, host: str, http: httpx.AsyncClient, timeout: float = 5.0, **vars_: str
) -> LangfuseSink:
    callback_vars = {
        "langfuse_public_key": project.public_key,
        "langfuse_secret_key": project.secret_key,
        "langfuse_host": host,
        **vars_,
    }
    sink = SINK_TYPE.factory(
        callback_vars, SinkContext(http=http, team_id="team-a", timeout=timeout)
    )
    assert isinstance(sink, LangfuseSink)
    return sink


def assert_no_secret(error: BaseException, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(error)
        assert secret not in repr(error)


async def emit_error(sink: LangfuseSink, batch: Sequence[LogRecord]) -> SinkError:
    with pytest.raises(SinkError) as info:
        await sink.emit(batch)
    return info.value


# -- the attribute table and the settings -------------------------------------------------------


def test_attribute_names_match_the_installed_langfuse_sdk() -> None:
    from langfuse import LangfuseOtelSpanAttributes

    for name, value in LANGFUSE_ATTRIBUTES.items():
        assert getattr(LangfuseOtelSpanAttributes, name) == value, name


def test_the_sink_satisfies_the_checkable_sink_protocol(client: httpx.AsyncClient) -> None:
    sink = LangfuseSink(public_key="pk-lf-1", secret_key="sk-lf-1", http=client)
    assert isinstance(sink, Sink) and isinstance(sink, CheckableSink)


def test_registry_applies_the_alias_and_requires_both_keys() -> None:
    registry = SinkRegistry([SINK_TYPE])
    spec = CallbackSpec(
        callback_name="langfuse",
        callback_vars={"langfuse_public_key": "pk-lf-1", "langfuse_secret": "sk-lf-1"},
    )
    assert registry.normalize(spec).callback_vars == {
        "langfuse_public_key": "pk-lf-1",
        "langfuse_secret_key": "sk-lf-1",
    }
    with pytest.raises(SettingsError) as info:
        registry.normalize(
            CallbackSpec(callback_name="langfuse", callback_vars={"langfuse_public_key": "pk"})
        )
    assert info.value.param == "callback_vars.langfuse_secret_key"
    with pytest.raises(SettingsError, match="unknown var"):
        registry.normalize(
            CallbackSpec(
                callback_name="langfuse",
                callback_vars={
                    "langfuse_public_key": "pk",
                    "langfuse_secret_key": "sk",
                    "langfuse_flush": "1",
                },
            )
        )


@pytest.mark.parametrize(
    ("vars_", "param", "fragment"),
    [
        ({"langfuse_host": "ftp://langfuse.example"}, "langfuse_host", "http"),
        ({"langfuse_host": "http://169.254.169.254"}, "langfuse_host", "link-local"),
        ({"langfuse_host": "http://[fd00:ec2::254]:80/"}, "langfuse_host", "metadata"),
        ({"langfuse_host": "https://u:sk-lf-in-url@x.example"}, "langfuse_host", "credentials"),
        ({"langfuse_environment": "Production"}, "langfuse_environment", "lowercase"),
        ({"langfuse_environment": "langfuse-prod"}, "langfuse_environment", "langfuse"),
        ({"langfuse_public_key": "sk-lf-swapped"}, "langfuse_public_key", "secret key"),
    ],
)
def test_unsafe_or_invalid_vars_are_refused_when_written(
    vars_: dict[str, str], param: str, fragment: str
) -> None:
    callback_vars = {"langfuse_public_key": "pk-lf-1", "langfuse_secret_key": "sk-lf-secret"}
    callback_vars.update(vars_)
    with pytest.raises(SettingsError) as info:
        SINK_TYPE.normalize(CallbackSpec(callback_name="langfuse", callback_vars=callback_vars))
    assert info.value.param == f"callback_vars.{param}"
    assert fragment in str(info.value)
    assert_no_secret(info.value, "sk-lf-secret", "sk-lf-in-url", "sk-lf-swapped")


def test_valid_vars_pass_and_environment_references_wait_for_resolution() -> None:
    spec = CallbackSpec(
        callback_name="langfuse",
        callback_vars={
            "langfuse_public_key": "os.environ/LANGFUSE_PUBLIC_KEY_1",
            "langfuse_secret_key": "os.environ/LANGFUSE_SECRET_KEY_1",
            "langfuse_host": "os.environ/LANGFUSE_HOST_1",
            "langfuse_environment": "staging-eu_1",
        },
    )
    assert SINK_TYPE.normalize(spec).callback_vars == spec.callback_vars
    SINK_TYPE.normalize(
        CallbackSpec(
            callback_name="langfuse",
            callback_vars={
                "langfuse_public_key": "pk",
                "langfuse_secret_key": "sk",
                "langfuse_host": "http://localhost:3000/",
            },
        )
    )


def test_a_resolved_unsafe_host_is_refused_when_the_sink_is_built(
    client: httpx.AsyncClient,
) -> None:
    with pytest.raises(SettingsError, match="link-local"):
        SINK_TYPE.factory(
            {
                "langfuse_public_key": "pk",
                "langfuse_secret_key": "sk",
                "langfuse_host": "http://169.254.169.254",
            },
            SinkContext(http=client),
        )


def test_empty_or_absent_host_means_langfuse_cloud(client: httpx.AsyncClient) -> None:
    for vars_ in ({"langfuse_host": ""}, {}):
        sink = SINK_TYPE.factory(
            {"langfuse_public_key": "pk-lf-1", "langfuse_secret_key": "sk-lf-zz", **vars_},
            SinkContext(http=client),
        )
        assert isinstance(sink, LangfuseSink)
        assert sink.host == DEFAULT_HOST
        assert "sk-lf-zz" not in repr(sink)


# -- mapping ------------------------------------------------------------------------------------


def _attributes(record: LogRecord, environment: str = "default") -> dict[str, Any]:
    span = langfuse_span(record, environment=environment)
    return {kv["key"]: kv["value"] for kv in span["attributes"]}


async def test_json_record_maps_to_one_generation_with_every_field(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    record = make_record(metadata={"key_id": "k-1", "team_id": "spoofed", "tier": 3})
    await sink.emit([record])

    (generation,) = fake_langfuse.generations(project.public_key)
    (span,) = fake_langfuse.spans(project.public_key)
    assert generation["trace_id"] == langfuse_span(record)["traceId"]
    assert generation["id"] == langfuse_span(record)["spanId"]
    assert span["parent_span_id"] is None  # the generation is the trace's root
    assert span["start_time_unix_nano"] == 1_714_564_800_000_000_000
    assert span["end_time_unix_nano"] == 1_714_564_801_250_000_000
    assert generation["name"] == "chat.completions"
    assert generation["type"] == "generation"
    assert generation["model"] == "gpt-4o-mini-2024-07-18"
    assert generation["model_parameters"] == {"temperature": 0.2, "max_tokens": 64}
    assert generation["input"] == record.messages
    assert generation["output"] == {"role": "assistant", "content": "Hello there"}
    assert generation["usage_details"] == {"input": 12, "output": 5, "total": 17}
    assert generation["completion_start_time"] is None  # not a stream: no time to first token
    assert generation["level"] == "DEFAULT"
    assert generation["status_message"] is None
    assert span["status"]["code"] == 0
    assert generation["environment"] == "default"
    assert generation["trace"] == {
        "name": "chat.completions",
        "user_id": "user-9",
        "session_id": None,
        "tags": ["team:team-a", "route:/v1/chat/completions"],
        "metadata": {
            "team_id": "team-a",
            "key_alias": "ci-key",
            "request_id": "req-1",
            "route": "/v1/chat/completions",
        },
    }
    assert generation["metadata"] == {
        "key_id": "k-1",
        "tier": 3,
        "team_id": "spoofed",  # request metadata stays in the observation...
        "request_id": "req-1",
        "method": "POST",
        "call_type": "chat.completions",
        "outcome": "ok",
        "status_code": 200,
        "cache_hit": False,
        "stream": False,
        "finish_reason": "stop",
        "response_id": "chatcmpl-1",
        "requested_model": "gpt-4o-mini",
    }  # ...while the trace's team_id is ours
    assert generation["resource"] == {
        "service.name": "team-logging-middleware",
        "telemetry.sdk.name": "team-logging-middleware",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": generation["resource"]["telemetry.sdk.version"],
    }
    assert generation["scope"]["name"] == "team-logging-middleware"

    (request,) = fake_langfuse.requests(project.public_key)
    assert request.path == "/api/public/otel/v1/traces"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["x-langfuse-ingestion-version"] == "4"


async def test_streaming_record_has_completion_start_time_tool_calls_session_and_tags(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client, langfuse_environment="production")
    tool_calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    record = make_record(
        request_id="req-stream",
        stream=True,
        completion_start_time=START + 0.2,
        output=None,
        tool_calls=tool_calls,
        finish_reason="tool_calls",
        cache_hit=True,
        metadata={"session_id": "conv-7", "tags": ["beta", 5, ""]},
    )
    await sink.emit([record])

    (generation,) = fake_langfuse.generations(project.public_key)
    assert generation["completion_start_time"] == "2024-05-01T12:00:00.200000Z"
    assert generation["output"] == {"role": "assistant", "content": None, "tool_calls": tool_calls}
    assert generation["environment"] == "production"
    assert generation["trace"]["session_id"] == "conv-7"
    assert generation["trace"]["tags"] == [
        "team:team-a",
        "route:/v1/chat/completions",
        "cache_hit",
        "beta",
    ]
    assert generation["metadata"]["stream"] is True
    assert generation["metadata"]["cache_hit"] is True
    assert "session_id" not in generation["metadata"] and "tags" not in generation["metadata"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"outcome": "http_error", "status_code": 429, "error": "rate limited upstream"},
            "rate limited upstream",
        ),
        ({"outcome": "http_error", "status_code": 502, "error": None}, "HTTP 502"),
        (
            {"outcome": "exception", "status_code": None, "error": "RuntimeError: boom"},
            "RuntimeError: boom",
        ),
        (
            {"outcome": "client_disconnected", "status_code": 200, "error": None},
            "client disconnected before the response completed",
        ),
    ],
)
async def test_failure_records_are_error_observations(
    fake_langfuse: FakeLangfuse,
    client: httpx.AsyncClient,
    overrides: dict[str, Any],
    message: str,
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    await sink.emit([make_record(output=None, usage=Usage(), **overrides)])
    (generation,) = fake_langfuse.generations(project.public_key)
    (span,) = fake_langfuse.spans(project.public_key)
    assert generation["level"] == "ERROR"
    assert generation["status_message"] == message
    assert span["status"] == {"code": 2, "message": message}
    assert generation["output"] is None
    assert generation["usage_details"] == {}
    assert generation["metadata"]["outcome"] == overrides["outcome"]


async def test_redacted_record_exports_the_marker_and_nothing_else(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    secret_text = "my card is 4111-1111"
    # The decoder already redacts; the sink must hold even if some text slipped through.
    record = make_record(
        redacted=True,
        messages=REDACTED,
        output=secret_text,
        raw_request=secret_text,
        raw_response=secret_text,
        tool_calls=[
            {"id": "c", "type": "function", "function": {"name": "pay", "arguments": secret_text}}
        ],
    )
    await sink.emit([record])
    (span,) = fake_langfuse.spans(project.public_key)
    assert secret_text not in json.dumps(span)
    (generation,) = fake_langfuse.generations(project.public_key)
    assert generation["input"] == REDACTED
    assert generation["output"] == REDACTED

    no_output = make_record(request_id="req-2", redacted=True, messages=REDACTED, output=None)
    assert "langfuse.observation.output" not in _attributes(no_output)


def test_undecoded_bodies_and_non_chat_calls() -> None:
    record = make_record(
        call_type="unknown",
        route="/v1/whatever",
        messages=None,
        output=None,
        raw_request="raw request",
        raw_response="raw response",
    )
    attributes = _attributes(record)
    assert attributes["langfuse.trace.name"] == {"stringValue": "POST /v1/whatever"}
    assert attributes["langfuse.observation.input"] == {"stringValue": "raw request"}
    assert attributes["langfuse.observation.output"] == {"stringValue": "raw response"}
    completion = _attributes(
        make_record(call_type="completions", messages="Once upon", output=" a time")
    )
    assert completion["langfuse.observation.input"] == {"stringValue": "Once upon"}
    assert completion["langfuse.observation.output"] == {"stringValue": " a time"}
    embedding = _attributes(
        make_record(
            call_type="embeddings",
            output=None,
            response_model=None,
            model_parameters={},
            user_id=None,
            key_alias=None,
        )
    )
    assert embedding["langfuse.observation.model.name"] == {"stringValue": "gpt-4o-mini"}
    assert "langfuse.observation.model.parameters" not in embedding
    assert "user.id" not in embedding
    trace_meta = json.loads(embedding["langfuse.trace.metadata"]["stringValue"])
    assert "key_alias" not in trace_meta


@given(
    text=st.text(max_size=200),
    meta=st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.one_of(
            st.text(max_size=20),
            st.integers(),
            st.booleans(),
            st.none(),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        max_size=5,
    ),
)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_round_trips_through_a_strict_otlp_decoder(
    text: str, meta: dict[str, Any]
) -> None:
    record = make_record(
        messages=[{"role": "user", "content": text}],
        output=text,
        call_type="completions",
        user_id=text or None,
        metadata=meta,
    )
    from team_logging_middleware._otlp import ExportEnvelope

    body = ExportEnvelope.build({}, scope_name="s").body(
        [encode_span(record, b',{"key":"langfuse.environment","value":{"stringValue":"e"}}')]
    )
    (span,) = flatten_spans(decode_export(body, "application/json"), "pk")
    attributes = span["attributes"]
    assert json.loads(attributes["langfuse.observation.input"]) == record.messages
    assert attributes["langfuse.observation.output"] == text
    observation_meta = json.loads(attributes["langfuse.observation.metadata"])
    for key, value in meta.items():
        if (
            value is not None
            and key not in ("tags", "session_id")
            and key
            not in (
                "request_id",
                "method",
                "call_type",
                "outcome",
                "status_code",
                "cache_hit",
                "stream",
                "finish_reason",
                "response_id",
                "requested_model",
            )
        ):
            assert observation_meta[key] == value


# -- credentials and isolation -------------------------------------------------------------------


async def test_each_project_gets_only_its_own_records_with_its_own_key_pair(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    first, second = fake_langfuse.add_project(), fake_langfuse.add_project()
    sink_one = build_sink(first, fake_langfuse.url, client)
    sink_two = build_sink(second, fake_langfuse.url, client)
    await sink_one.emit([make_record(request_id=f"one-{i}", team_id="one") for i in range(3)])
    await sink_two.emit([make_record(request_id="two-0", team_id="two")])

    assert {g["metadata"]["request_id"] for g in fake_langfuse.generations(first.public_key)} == {
        "one-0",
        "one-1",
        "one-2",
    }
    assert [
        g["trace"]["metadata"]["team_id"] for g in fake_langfuse.generations(second.public_key)
    ] == ["two"]
    for project in (first, second):
        for request in fake_langfuse.requests(project.public_key):
            expected = httpx.BasicAuth(project.public_key, project.secret_key)
            assert request.headers["authorization"] == expected._auth_header
            assert request.headers["x-langfuse-public-key"] == project.public_key


async def test_environment_credentials_never_reach_a_tenant_host_and_no_global_state(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    operator = FakeLangfuse().start()  # where the operator's own variables point
    try:
        operator_project = operator.add_project()
        monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", operator_project.public_key)
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", operator_project.secret_key)
        monkeypatch.setenv("LANGFUSE_HOST", operator.url)
        monkeypatch.setenv("LANGFUSE_BASE_URL", operator.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", operator.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Basic b3A6c2VjcmV0,x-op=1")
        tenant = fake_langfuse.add_project()
        assert opentelemetry.trace._TRACER_PROVIDER is None
        threads_before = set(threading.enumerate())

        sink = build_sink(tenant, fake_langfuse.url, client)
        await sink.emit([make_record()])
        await sink.check()
        await sink.aclose()

        assert opentelemetry.trace._TRACER_PROVIDER is None
        assert set(threading.enumerate()) <= threads_before
        assert operator.requests() == []
        for request in fake_langfuse.requests():
            assert "x-op" not in request.headers
            assert operator_project.secret_key not in json.dumps(request.headers)
            assert (
                request.headers["authorization"]
                == httpx.BasicAuth(tenant.public_key, tenant.secret_key)._auth_header
            )
    finally:
        operator.stop()


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (429, True),
        (408, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (413, False),
        (501, False),
        (307, False),
    ],
)
async def test_status_mapping(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient, status: int, retryable: bool
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    fake_langfuse.fail_next(1, status=status)
    error = await emit_error(sink, [make_record()])
    assert error.retryable is retryable
    assert error.status == status
    assert error.reason.startswith(f"HTTP {status} ")
    assert fake_langfuse.url in error.reason
    assert error.retry_after is None
    assert_no_secret(error, project.secret_key)
    if status == 307:
        assert "redirects are not followed" in error.reason
    # The next export goes through.
    await sink.emit([make_record()])
    assert len(fake_langfuse.generations(project.public_key)) == 1


async def test_429_honours_retry_after_in_seconds_and_as_a_date(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    fake_langfuse.fail_next(1, status=429, retry_after=7)
    error = await emit_error(sink, [make_record()])
    assert (error.retryable, error.retry_after, error.status) == (True, 7.0, 429)

    fake_langfuse.fail_next(
        1, status=503, retry_after=email.utils.formatdate(time.time() + 60, usegmt=True)
    )
    error = await emit_error(sink, [make_record()])
    assert error.retryable and error.retry_after is not None and 50 <= error.retry_after <= 61

    fake_langfuse.fail_next(1, status=429, retry_after="soon")
    error = await emit_error(sink, [make_record()])
    assert error.retryable and error.retry_after is None


async def test_wrong_secret_is_a_non_retryable_401_without_the_secret(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    wrong = Project(project.public_key, "sk-lf-wrong-secret", project.id, project.name)
    sink = build_sink(wrong, fake_langfuse.url, client)
    error = await emit_error(sink, [make_record()])
    assert (error.retryable, error.status) == (False, 401)
    assert error.reason == (
        f"HTTP 401 Unauthorized from langfuse host {fake_langfuse.url} "
        "(check langfuse_public_key / langfuse_secret_key)"
    )
    assert_no_secret(error, "sk-lf-wrong-secret", project.secret_key)
    assert fake_langfuse.span_count(project.public_key) == 0


async def test_server_down_is_retryable_and_delivery_resumes_when_it_returns(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    await sink.emit([make_record(request_id="before")])  # a pooled keep-alive connection exists
    fake_langfuse.set_mode("down")
    error = await emit_error(sink, [make_record(request_id="during")])
    assert error.retryable and error.status is None
    assert error.reason.startswith(f"cannot reach langfuse host {fake_langfuse.url}")
    fake_langfuse.set_mode("ok")
    await sink.emit([make_record(request_id="during")])
    assert sorted(
        g["metadata"]["request_id"] for g in fake_langfuse.generations(project.public_key)
    ) == ["before", "during"]


async def test_a_slow_server_times_out_retryably(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client, timeout=0.2)
    fake_langfuse.set_mode("delay", delay=2.0)
    error = await emit_error(sink, [make_record()])
    assert error.retryable
    assert error.reason == f"langfuse host {fake_langfuse.url} did not answer within 0.2s"


async def test_rejected_spans_are_a_non_retryable_reason_after_every_part_was_sent(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = LangfuseSink(
        public_key=project.public_key,
        secret_key=project.secret_key,
        http=client,
        host=fake_langfuse.url,
        max_request_bytes=2500,
    )
    fake_langfuse.set_partial_success(2, "span too large", times=1)
    batch = [make_record(request_id=f"r{i}") for i in range(4)]
    error = await emit_error(sink, batch)
    assert isinstance(error, PartialBatchError) and error.failed == 2
    assert not error.retryable
    assert error.reason == (
        f"langfuse host {fake_langfuse.url} rejected 2 of 4 spans: span too large"
    )
    assert len(fake_langfuse.requests(project.public_key)) > 1
    assert fake_langfuse.span_count(project.public_key) == 4


async def test_a_large_batch_is_split_into_bounded_requests(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    limit = 6000
    sink = LangfuseSink(
        public_key=project.public_key,
        secret_key=project.secret_key,
        http=client,
        host=fake_langfuse.url,
        max_request_bytes=limit,
        compress_in_thread_above=0,
    )
    batch = [make_record(request_id=f"r{i}", output="x" * (i * 40)) for i in range(40)]
    await sink.emit(batch)
    requests = fake_langfuse.requests(project.public_key)
    assert len(requests) > 5
    assert all(r.decoded_bytes <= limit for r in requests)
    assert sum(r.span_count for r in requests) == 40
    received = [g["metadata"]["request_id"] for g in fake_langfuse.generations(project.public_key)]
    assert received == [f"r{i}" for i in range(40)]
    # One record bigger than the limit still goes, alone.
    await sink.emit([make_record(request_id="huge", output="y" * (2 * limit))])
    assert fake_langfuse.requests(project.public_key)[-1].span_count == 1


async def test_a_retried_batch_updates_the_same_observations(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    sink = build_sink(project, fake_langfuse.url, client)
    batch = [make_record(request_id=f"r{i}") for i in range(3)]
    await sink.emit(batch)
    await sink.emit(batch)  # e.g. after a timeout the server had in fact honoured
    assert fake_langfuse.span_count(project.public_key) == 6
    assert len(fake_langfuse.generations(project.public_key)) == 3


async def test_a_closed_sink_refuses_batches(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    sink = build_sink(fake_langfuse.add_project(), fake_langfuse.url, client)
    await sink.emit([])
    await sink.aclose()
    error = await emit_error(sink, [make_record()])
    assert not error.retryable


# -- check() -------------------------------------------------------------------------------------


async def test_check_accepts_a_good_key_pair(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    await build_sink(project, fake_langfuse.url, client).check()
    (request,) = fake_langfuse.requests(project.public_key)
    assert request.status == 200 and request.span_count == 0


async def test_check_tells_a_wrong_key_from_an_unreachable_host(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    wrong = Project(project.public_key, "sk-lf-nope", project.id, project.name)
    with pytest.raises(SinkError) as info:
        await build_sink(wrong, fake_langfuse.url, client).check()
    assert info.value.status == 401 and not info.value.retryable
    assert "check langfuse_public_key / langfuse_secret_key" in info.value.reason
    assert_no_secret(info.value, "sk-lf-nope")

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with pytest.raises(SinkError) as info:
        await build_sink(project, f"http://127.0.0.1:{closed_port}", client).check()
    assert info.value.retryable and info.value.status is None
    assert info.value.reason.startswith(
        f"cannot reach langfuse host http://127.0.0.1:{closed_port}"
    )

    with pytest.raises(SinkError) as info:
        await build_sink(project, fake_langfuse.url + "/not-langfuse", client).check()
    assert info.value.status == 404
    assert "no OTLP endpoint" in info.value.reason


# -- host safety at send time -------------------------------------------------------------------


class FakeResolver:
    """Answers DNS queries from a table, counting them."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


def _named_sink(
    project: Project, client: httpx.AsyncClient, url: str, resolver: FakeResolver, **kw: Any
) -> LangfuseSink:
    return LangfuseSink(
        public_key=project.public_key,
        secret_key=project.secret_key,
        http=client,
        host=url,
        resolver=resolver,
        **kw,
    )


async def test_a_name_resolving_to_the_metadata_service_is_refused_at_send(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    resolver = FakeResolver({"metadata.local": ["169.254.169.254"]})
    sink = _named_sink(project, client, f"http://metadata.local:{fake_langfuse.port}", resolver)
    error = await emit_error(sink, [make_record()])
    assert not error.retryable
    assert "link-local" in error.reason and "metadata.local" in error.reason
    assert fake_langfuse.requests() == []


async def test_the_checked_address_is_the_one_connected_to(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    now = [100.0]
    resolver = FakeResolver({"langfuse.test": ["127.0.0.1"]})
    sink = _named_sink(
        project,
        client,
        f"http://langfuse.test:{fake_langfuse.port}",
        resolver,
        timer=lambda: now[0],
    )
    await sink.emit([make_record(request_id="a")])
    await sink.emit([make_record(request_id="b")])
    assert resolver.calls == ["langfuse.test"]  # cached between batches
    requests = fake_langfuse.requests(project.public_key)
    assert [r.headers["host"] for r in requests] == [f"langfuse.test:{fake_langfuse.port}"] * 2

    # Past the TTL the name is resolved and checked again; a rebinding is caught.
    now[0] += 31
    resolver.answers["langfuse.test"] = ["127.0.0.1", "169.254.169.254"]
    error = await emit_error(sink, [make_record(request_id="c")])
    assert not error.retryable
    assert resolver.calls == ["langfuse.test", "langfuse.test"]


async def test_dns_failures_are_retryable_and_resolved_again_after_connection_errors(
    fake_langfuse: FakeLangfuse, client: httpx.AsyncClient
) -> None:
    project = fake_langfuse.add_project()
    resolver = FakeResolver({})
    sink = _named_sink(project, client, f"http://langfuse.test:{fake_langfuse.port}", resolver)
    error = await emit_error(sink, [make_record()])
    assert error.retryable and error.reason.startswith("cannot resolve langfuse host")

    resolver.answers["langfuse.test"] = ["127.0.0.1"]
    await sink.emit([make_record()])
    fake_langfuse.set_mode("down")
    await emit_error(sink, [make_record()])
    fake_langfuse.set_mode("ok")
    await sink.emit([make_record()])
    # Resolved: the failed try, the first success, again after the connection error.
    assert resolver.calls == ["langfuse.test"] * 3


# -- HTTPS: checked, then connected by name so the certificate is verified ------------------------


@dataclass
class _Tls:
    server: FakeLangfuse
    context: ssl.SSLContext  # trusts the test CA only


@pytest.fixture
def tls_fake_langfuse(tmp_path: Path) -> Iterator[_Tls]:
    """The fake Langfuse over HTTPS with a certificate for ``localhost`` from a throwaway CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(
        cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    server = FakeLangfuse(ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)).start()
    try:
        yield _Tls(server, context)
    finally:
        server.stop()


async def test_https_host_is_checked_then_reached_by_name_with_certificate_verification(
    tls_fake_langfuse: _Tls,
) -> None:
    server = tls_fake_langfuse.server
    project = server.add_project()
    resolver = FakeResolver({"localhost": ["127.0.0.1"]})
    async with httpx.AsyncClient(verify=tls_fake_langfuse.context, trust_env=False) as http:
        sink = _named_sink(project, http, f"https://localhost:{server.port}", resolver)
        await sink.emit([make_record()])
        await sink.check()
        assert resolver.calls == ["localhost"]
        assert [r.headers["host"] for r in server.requests(project.public_key)] == [
            f"localhost:{server.port}"
        ] * 2
        assert len(server.generations(project.public_key)) == 1

        # The certificate names localhost, not 127.0.0.1: a literal-IP host fails verification.
        ip_sink = LangfuseSink(
            public_key=project.public_key,
            secret_key=project.secret_key,
            http=http,
            host=f"https://127.0.0.1:{server.port}",
        )
        error = await emit_error(ip_sink, [make_record()])
        assert error.retryable and error.reason.startswith("cannot reach langfuse host")


async def test_https_host_resolving_to_metadata_is_refused_before_connecting(
    tls_fake_langfuse: _Tls,
) -> None:
    server = tls_fake_langfuse.server
    project = server.add_project()
    resolver = FakeResolver({"localhost": ["169.254.169.254"]})
    async with httpx.AsyncClient(verify=tls_fake_langfuse.context, trust_env=False) as http:
        sink = _named_sink(project, http, f"https://localhost:{server.port}", resolver)
        error = await emit_error(sink, [make_record()])
    assert not error.retryable and "link-local" in error.reason
    assert server.requests() == []
