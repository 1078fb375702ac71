"""Fuzzing the admin API: schemathesis against its own OpenAPI document, plus hypothesis tests.

Whatever arrives — odd team ids, wrong types, huge or deeply nested bodies — the answer is a
documented status with the one error shape, never a 5xx.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.applications import Starlette

from team_logging_middleware.admin import create_admin_app
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.sinks import default_registry
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.fixtures.servers import run_uvicorn

MASTER = "sk-fuzz-master"
AUTH = {"Authorization": f"Bearer {MASTER}"}
LIMIT = 4096
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def build_admin_app(jsonl_dir: Path) -> Starlette:
    # Not started: the fuzzed routes read and write settings, which needs no delivery; the
    # connection test builds its own short-lived client.
    tl = TeamLogging(
        None, store=MemorySettingsStore(), registry=default_registry(jsonl_dir=jsonl_dir)
    )
    return create_admin_app(tl, master_key=MASTER, max_body_bytes=LIMIT)


# schemathesis generates one test per operation at collection time, so its app is built at import
# (its lazy, fixture-based loader does not work with this pytest); the directory is removed at the
# end of the module.
_SCHEMA_DIR = tempfile.TemporaryDirectory(prefix="admin-fuzz-")
schema = schemathesis.openapi.from_asgi("/openapi.json", build_admin_app(Path(_SCHEMA_DIR.name)))


@pytest.fixture(scope="module", autouse=True)
def _remove_schema_dir() -> Iterator[None]:
    yield
    _SCHEMA_DIR.cleanup()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A client of the admin app served by a real uvicorn (its own instance)."""
    app = build_admin_app(tmp_path_factory.mktemp("fuzz-server-logs"))
    with run_uvicorn(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as http:
        yield http


@schema.parametrize()
@settings(FUZZ, max_examples=40)
def test_admin_api_conforms_to_its_openapi_document(case: Any) -> None:
    case.call_and_validate(
        headers=AUTH,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )


def assert_error_shape(response: Any) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param"}
    assert isinstance(body["error"]["message"], str)


@given(team_id=st.text(max_size=300))
@FUZZ
def test_any_team_id_gets_a_clean_answer(client: httpx.Client, team_id: str) -> None:
    response = client.get(f"/team/{quote(team_id, safe='')}/callback", headers=AUTH)
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code == 200:
        assert response.json()["data"]["team_id"] == team_id
        assert 1 <= len(team_id) <= 256
    else:
        assert_error_shape(response)
        if response.status_code == 400:
            assert len(team_id) > 256


@given(team_id=st.lists(st.text(max_size=12), min_size=2, max_size=4).map("/".join))
@FUZZ
def test_encoded_slashes_never_reach_a_team(client: httpx.Client, team_id: str) -> None:
    response = client.post(f"/team/{quote(team_id, safe='')}/disable_logging", headers=AUTH)
    assert response.status_code == 404
    assert_error_shape(response)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)


@given(
    body=json_values
    | st.fixed_dictionaries(
        {},
        optional={
            "callback_name": json_values | st.sampled_from(["jsonl", "langfuse", "otel"]),
            "callback_type": json_values | st.sampled_from(["success", "failure"]),
            "callback_vars": json_values
            | st.dictionaries(st.sampled_from(["jsonl_path", "langfuse_host", "x"]), json_values),
        },
    )
)
@FUZZ
def test_wrong_types_in_callback_bodies_never_500(client: httpx.Client, body: Any) -> None:
    response = client.post("/team/fuzz/callback", content=json.dumps(body), headers=AUTH)
    assert response.status_code in (200, 400, 409, 413, 422), response.text
    if response.status_code != 200:
        assert_error_shape(response)


@given(body=st.dictionaries(st.text(max_size=20), json_values, max_size=6))
@FUZZ
def test_wrong_types_in_settings_patches_never_500(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.patch("/team/fuzz/settings", content=json.dumps(body), headers=AUTH)
    assert response.status_code in (200, 413, 422), response.text
    if response.status_code != 200:
        assert_error_shape(response)


@given(size=st.integers(min_value=LIMIT + 1, max_value=LIMIT * 8), declared=st.booleans())
@FUZZ
def test_bodies_over_the_limit_get_413(client: httpx.Client, size: int, declared: bool) -> None:
    payload = b'{"callback_name": "' + b"a" * size + b'"}'

    def chunks() -> Iterator[bytes]:
        # A generator body is sent chunked, without Content-Length: the limit must hold anyway.
        for start in range(0, len(payload), 1000):
            yield payload[start : start + 1000]

    response = client.post(
        "/team/fuzz/callback",
        content=payload if declared else chunks(),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


@given(depth=st.integers(min_value=1, max_value=3000), kind=st.sampled_from(["list", "dict"]))
@FUZZ
def test_deeply_nested_bodies_never_500(client: httpx.Client, depth: int, kind: str) -> None:
    text = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    body = '{"callback_name": "jsonl", "callback_vars": ' + text + "}"
    response = client.post("/team/fuzz/callback", content=body, headers=AUTH)
    assert response.status_code in (400, 413, 422), response.text
    assert_error_shape(response)


def test_openapi_document_is_valid_openapi_3_1(client: httpx.Client) -> None:
    """The served document validates against the OpenAPI 3.1 schema (the OAI's own)."""
    document = client.get("/openapi.json").json()
    validator = jsonschema_rs.validator_for(OPENAPI_31)
    errors = [error.message for error in validator.iter_errors(document)]
    assert errors == []
    # The validator does catch a broken document.
    assert not validator.is_valid({**document, "paths": {"no-leading-slash": {}}})
