"""The OTLP/JSON encoder: valid for a strict OTLP decoder, deterministic ids, exact JSON."""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from team_logging_middleware import _otlp
from tests.fixtures.fake_langfuse import decode_export, flatten_spans


def _export(*spans: dict[str, object]) -> bytes:
    envelope = _otlp.ExportEnvelope.build(
        {"service.name": "svc", "count": 3}, scope_name="scope", scope_version="1.2"
    )
    return envelope.body([_otlp.dumps(s) for s in spans])


def _span(**overrides: object) -> dict[str, object]:
    trace_id, span_id = _otlp.ids_for("request-1")
    fields: dict[str, object] = {
        "trace_id": trace_id,
        "span_id": span_id,
        "name": "op",
        "start_time": 1_700_000_000.25,
        "end_time": 1_700_000_001.5,
        "attributes": _otlp.key_values(
            {"s": "text", "b": True, "i": 42, "f": 0.5, "l": ["a", 1], "m": {"k": "v"}, "n": None}
        ),
    }
    fields.update(overrides)
    return _otlp.span(**fields)  # type: ignore[arg-type]


def test_export_decodes_with_a_strict_otlp_decoder() -> None:
    body = _export(
        _span(),
        _span(
            name="failed",
            status_code=_otlp.STATUS_ERROR,
            status_message="boom",
            kind=_otlp.SPAN_KIND_CLIENT,
        ),
    )
    spans = flatten_spans(decode_export(body, "application/json"), "pk")
    assert [s["name"] for s in spans] == ["op", "failed"]
    first, second = spans
    trace_id, span_id = _otlp.ids_for("request-1")
    assert first["trace_id"] == trace_id and first["span_id"] == span_id
    assert first["start_time_unix_nano"] == 1_700_000_000_250_000_000
    assert first["end_time_unix_nano"] == 1_700_000_001_500_000_000
    assert first["attributes"] == {
        "s": "text",
        "b": True,
        "i": 42,
        "f": 0.5,
        "l": ["a", 1],
        "m": {"k": "v"},
    }
    assert first["status"]["code"] == _otlp.STATUS_UNSET
    assert second["status"] == {"code": _otlp.STATUS_ERROR, "message": "boom"}
    assert second["kind"] == _otlp.SPAN_KIND_CLIENT
    assert first["resource"] == {"service.name": "svc", "count": 3}
    assert first["scope"] == {"name": "scope", "version": "1.2"}


def test_empty_export_is_valid_and_overhead_is_its_size() -> None:
    envelope = _otlp.ExportEnvelope.build({"service.name": "svc"}, scope_name="s")
    empty = envelope.body([])
    assert len(empty) == envelope.overhead
    assert flatten_spans(decode_export(empty, "application/json"), "pk") == []


def test_end_time_never_precedes_start_time() -> None:
    encoded = _otlp.span(
        trace_id="ab" * 16, span_id="cd" * 8, name="x", start_time=10.0, end_time=9.0, attributes=[]
    )
    assert encoded["endTimeUnixNano"] == encoded["startTimeUnixNano"] == "10000000000"


def test_ids_are_deterministic_valid_and_distinct() -> None:
    trace_a, span_a = _otlp.ids_for("req-a")
    assert (trace_a, span_a) == _otlp.ids_for("req-a")
    trace_b, span_b = _otlp.ids_for("req-b")
    assert trace_a != trace_b and span_a != span_b
    assert len(trace_a) == 32 and len(span_a) == 16
    assert int(trace_a, 16) and int(span_a, 16)
    assert len(_otlp.trace_id_for("x")) == 32 and len(_otlp.span_id_for("x")) == 16
    assert _otlp.trace_id_for("x") != _otlp.trace_id_for("y")


@pytest.mark.parametrize(
    "text",
    ["plain", 'quote " and \\ backslash', "nl\n tab\t nul\x00 bell\x07", "é ü 😀 中文", ""],
)
def test_json_string_is_a_json_literal(text: str) -> None:
    literal = _otlp.json_string(text)
    assert json.loads(literal) == text


def test_json_string_replaces_lone_surrogates_instead_of_failing() -> None:
    literal = _otlp.json_string("a\ud800b")
    assert json.loads(literal) == "a\ufffdb"


def test_attribute_prefix_builds_the_same_key_value_as_dumps() -> None:
    written = _otlp.attribute_prefix("k.x") + _otlp.json_string("v") + b"}}"
    assert json.loads(written) == {"key": "k.x", "value": {"stringValue": "v"}}
    written = _otlp.attribute_prefix("flag", "boolValue") + b"true}}"
    assert json.loads(written) == {"key": "flag", "value": {"boolValue": True}}


def test_dumps_degrades_odd_values_to_text() -> None:
    value = {"set": {1}, "bytes": b"\xffok", "big": 2**70, "obj": object, "s": "a\ud800"}
    decoded = json.loads(_otlp.dumps(value))
    assert decoded["set"] == [1]
    assert decoded["bytes"] == "\ufffdok"
    assert decoded["big"] == 2**70
    assert decoded["obj"] == str(object)
    assert decoded["s"] == "a\ufffd"


def test_any_value_and_key_values() -> None:
    assert _otlp.any_value(True) == {"boolValue": True}
    assert _otlp.any_value(7) == {"intValue": "7"}
    assert _otlp.any_value(None) == {}
    assert _otlp.any_value(object()).keys() == {"stringValue"}
    assert _otlp.key_values([("a", 1), ("b", None)]) == [{"key": "a", "value": {"intValue": "1"}}]


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
@settings(max_examples=300)
def test_iso_utc_matches_datetime(seconds: float) -> None:
    expected = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=round(seconds * 1_000_000))
    assert _otlp.iso_utc(seconds) == expected.isoformat(timespec="microseconds") + "Z"


def test_iso_utc_memo_follows_the_second() -> None:
    assert _otlp.iso_utc(1_714_564_800.25) == "2024-05-01T12:00:00.250000Z"
    assert _otlp.iso_utc(1_714_564_801.5) == "2024-05-01T12:00:01.500000Z"
    assert _otlp.iso_utc(1_714_564_800.999_999_7) == "2024-05-01T12:00:01.000000Z"


def test_unix_nanos_is_exact_decimal_string() -> None:
    assert _otlp.unix_nanos(1.5) == "1500000000"
    # 1_700_000_000.25 * 1e9 as a float would be ...249999872.
    assert _otlp.unix_nanos(1_700_000_000.25) == "1700000000250000000"


@given(
    st.lists(st.integers(min_value=1, max_value=500), max_size=60),
    st.integers(min_value=1, max_value=1000),
    st.integers(min_value=0, max_value=50),
)
@settings(max_examples=300)
def test_split_by_size_covers_everything_in_order_within_the_limit(
    sizes: list[int], limit: int, overhead: int
) -> None:
    chunks = _otlp.split_by_size(sizes, limit, overhead)
    assert [i for chunk in chunks for i in chunk] == list(range(len(sizes)))
    for chunk in chunks:
        total = overhead + sum(sizes[i] for i in chunk) + len(chunk) - 1
        assert total <= limit or len(chunk) == 1
    # Greedy: no chunk could have taken the next item.
    for chunk, following in itertools.pairwise(chunks):
        grown = overhead + sum(sizes[i] for i in chunk) + len(chunk) + sizes[following[0]]
        assert grown > limit


def test_gzip_bytes_is_deterministic_and_round_trips() -> None:
    data = b'{"resourceSpans":[]}' * 50
    assert _otlp.gzip_bytes(data) == _otlp.gzip_bytes(data)
    assert gzip.decompress(_otlp.gzip_bytes(data, 1)) == data
