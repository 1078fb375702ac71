"""The fake Langfuse answers like Langfuse's OTLP endpoint: what the sink tests rely on."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from team_logging_middleware import _otlp
from tests.fixtures.fake_langfuse import OTLP_PATH, FakeLangfuse, Project

TRACE_ID, SPAN_ID = _otlp.ids_for("fake-test")


def _json_export(**span_overrides: object) -> bytes:
    span = _otlp.span(
        trace_id=TRACE_ID,
        span_id=SPAN_ID,
        name="op",
        start_time=1.0,
        end_time=2.0,
        attributes=_otlp.key_values({"langfuse.observation.type": "generation", "n": 3}),
    )
    span.update(span_overrides)
    return _otlp.ExportEnvelope.build({}, scope_name="s").body([_otlp.dumps(span)])


def _protobuf_export() -> bytes:
    span = Span(
        trace_id=bytes.fromhex(TRACE_ID),
        span_id=bytes.fromhex(SPAN_ID),
        name="op",
        start_time_unix_nano=1_000_000_000,
        end_time_unix_nano=2_000_000_000,
        attributes=[
            KeyValue(key="langfuse.observation.type", value=AnyValue(string_value="generation")),
            KeyValue(key="n", value=AnyValue(int_value=3)),
        ],
    )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    return request.SerializeToString()


@pytest.fixture
def project(fake_langfuse: FakeLangfuse) -> Project:
    return fake_langfuse.add_project()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


def _post(
    http: httpx.Client, server: FakeLangfuse, project: Project | None, body: bytes, **headers: str
) -> httpx.Response:
    auth = (project.public_key, project.secret_key) if project else None
    merged = {"content-type": "application/json", **headers}
    return http.post(server.url + OTLP_PATH, content=body, headers=merged, auth=auth)


def test_json_and_protobuf_exports_decode_to_the_same_span(
    fake_langfuse: FakeLangfuse, project: Project, http: httpx.Client
) -> None:
    assert _post(http, fake_langfuse, project, _json_export()).status_code == 200
    response = _post(
        http,
        fake_langfuse,
        project,
        gzip.compress(_protobuf_export()),
        **{"content-type": "application/x-protobuf", "content-encoding": "gzip"},
    )
    assert response.status_code == 200 and response.json() == {}
    json_span, proto_span = fake_langfuse.spans(project.public_key)
    for span in (json_span, proto_span):
        assert span["trace_id"] == TRACE_ID and span["span_id"] == SPAN_ID
        assert span["attributes"] == {"langfuse.observation.type": "generation", "n": 3}
        assert span["start_time_unix_nano"] == 1_000_000_000
    assert len(fake_langfuse.generations(project.public_key)) == 1  # same id: one observation


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"not gzip", {"content-encoding": "gzip"}, 400),
        (b"{}", {"content-type": "text/plain"}, 400),
        (b"{}", {"x-langfuse-ingestion-version": "5"}, 400),
        (b"{not json", {}, 400),
        (b'{"resourceSpans": [], "extra": 1}', {}, 400),
        (b'{"resourceSpans": []}', {"x-langfuse-ingestion-version": "4"}, 200),
    ],
)
def test_malformed_requests_are_refused_like_langfuse(
    fake_langfuse: FakeLangfuse,
    project: Project,
    http: httpx.Client,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    assert _post(http, fake_langfuse, project, body, **headers).status_code == status


@pytest.mark.parametrize("trace_id", ["zz" * 16, "ab" * 8, "00" * 16])
def test_ids_must_be_hex_of_the_right_size(
    fake_langfuse: FakeLangfuse, project: Project, http: httpx.Client, trace_id: str
) -> None:
    response = _post(http, fake_langfuse, project, _json_export(traceId=trace_id))
    assert response.status_code == 400 and "traceId" in response.json()["error"]


def test_auth_is_checked_per_project(
    fake_langfuse: FakeLangfuse, project: Project, http: httpx.Client
) -> None:
    assert _post(http, fake_langfuse, None, _json_export()).status_code == 401
    wrong = Project(project.public_key, "nope", project.id, project.name)
    assert _post(http, fake_langfuse, wrong, _json_export()).status_code == 401
    projects = http.get(
        fake_langfuse.url + "/api/public/projects", auth=(project.public_key, project.secret_key)
    )
    assert projects.status_code == 200 and projects.json()["data"][0]["id"] == project.id
    assert http.get(fake_langfuse.url + "/api/public/projects").status_code == 401


def test_accept_any_key_registers_projects_on_first_use(http: httpx.Client) -> None:
    with FakeLangfuse(accept_any_key=True, keep_spans=False) as server:
        anyone = Project("pk-any", "sk-any", "", "")
        assert _post(http, server, anyone, _json_export()).status_code == 200
        assert server.span_count("pk-any") == 1 and server.spans("pk-any") == []


def test_control_routes_drive_a_server_from_outside(
    fake_langfuse: FakeLangfuse, http: httpx.Client
) -> None:
    base = fake_langfuse.url
    keys = http.post(base + "/_fake/projects", json={"public_key": "pk-c", "secret_key": "sk-c"})
    project = Project(keys.json()["public_key"], keys.json()["secret_key"], "", "")
    http.post(base + "/_fake/fail_next", json={"n": 1, "status": 503, "retry_after": 2})
    failed = _post(http, fake_langfuse, project, _json_export())
    assert failed.status_code == 503 and failed.headers["retry-after"] == "2"
    http.post(base + "/_fake/mode", json={"mode": "429"})
    assert _post(http, fake_langfuse, project, _json_export()).status_code == 429
    http.post(base + "/_fake/mode", json={"mode": "ok"})
    assert _post(http, fake_langfuse, project, _json_export()).status_code == 200
    stats = http.get(base + "/_fake/stats").json()
    assert stats["spans"] == {"pk-c": 1}
    assert stats["counters"]["status_503"] == 1 and stats["counters"]["status_429"] == 1
    spans = http.get(base + "/_fake/spans", params={"public_key": "pk-c"}).json()
    assert [s["span_id"] for s in spans] == [SPAN_ID]


def test_runs_as_a_separate_process(http: httpx.Client) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.fake_langfuse", "--project", "pk-p:sk-p"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.rsplit(" ", 1)[1].strip()
        response = http.post(
            url + OTLP_PATH,
            content=_json_export(),
            headers={"content-type": "application/json"},
            auth=("pk-p", "sk-p"),
        )
        assert response.status_code == 200
        assert json.loads(http.get(url + "/_fake/stats").text)["spans"] == {"pk-p": 1}
    finally:
        process.terminate()
        assert process.wait(10) == 0
        if process.stdout is not None:
            process.stdout.close()
