"""A small OTLP/JSON trace encoder: pure functions, no OpenTelemetry SDK, no global state.

It writes the JSON form of ``ExportTraceServiceRequest`` as the OTLP specification defines it
(https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding), which differs from the
generic protobuf JSON mapping in two ways that receivers rely on:

* ``traceId`` / ``spanId`` / ``parentSpanId`` are lowercase **hex** strings, not base64;
* enum fields (``kind``, ``status.code``) are integers, not names.

64-bit integers (timestamps, ``intValue``) are decimal strings, as protobuf's JSON mapping
allows. Keys are lowerCamelCase.

Spans are encoded one by one and joined into a request body with a constant prefix and suffix
(:class:`ExportEnvelope`), so a sender knows every span's size before building a request and can
split a batch without encoding anything twice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_orjson_dumps: Callable[..., bytes] | None
try:  # orjson is several times faster; the stdlib keeps the package dependency-free.
    import orjson as _orjson

    _orjson_dumps = _orjson.dumps
    _ORJSON_OPTS = _orjson.OPT_NON_STR_KEYS
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _orjson_dumps = None
    _ORJSON_OPTS = 0

# SpanKind (opentelemetry/proto/trace/v1/trace.proto)
SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
# Status.StatusCode
STATUS_UNSET = 0
STATUS_OK = 1
STATUS_ERROR = 2

JSON_CONTENT_TYPE = "application/json"


def _stdlib_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return str(value)


def _orjson_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON. Values JSON cannot express (sets, bytes, objects) degrade to text
    instead of raising: a log record must never fail to export because of one odd value."""
    if _orjson_dumps is not None:
        try:
            return _orjson_dumps(value, default=_orjson_default, option=_ORJSON_OPTS)
        except (TypeError, ValueError):
            pass  # e.g. integers beyond 64 bits: the stdlib handles them
    text = json.dumps(value, default=_stdlib_default, ensure_ascii=False, separators=(",", ":"))
    return _scrub(text).encode()


def json_text(value: Any) -> str:
    """``value`` as a JSON document in a ``str`` (for attributes that carry JSON)."""
    return dumps(value).decode()


def _scrub(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) become U+FFFD; valid text is unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _stdlib_string(value: str) -> bytes:
    return json.dumps(_scrub(value), ensure_ascii=False).encode()


def json_string(value: str) -> bytes:
    """A ``str`` as a JSON string literal (quotes and escapes included), UTF-8 encoded."""
    if _orjson_dumps is not None:
        try:
            return _orjson_dumps(value)
        except TypeError:  # lone surrogates: orjson refuses them
            pass
    return _stdlib_string(value)


def attribute_prefix(key: str, value_type: str = "stringValue") -> bytes:
    """The constant start of a ``KeyValue`` whose value follows (close it with ``b"}}"``).

    For writers that assemble spans from bytes: ``prefix + json_string(v) + b"}}"`` is the
    same JSON as ``dumps({"key": key, "value": {value_type: v}})``.
    """
    return b'{"key":' + json_string(key) + b',"value":{"' + value_type.encode() + b'":'


def _hash_id(seed: str, size: int, person: bytes) -> str:
    digest = hashlib.blake2b(
        seed.encode("utf-8", "surrogatepass"), digest_size=size, person=person
    ).digest()
    if not any(digest):  # the all-zero id means "invalid" in OTLP
        digest = digest[:-1] + b"\x01"
    return digest.hex()


def ids_for(seed: str) -> tuple[str, str]:
    """``(trace_id, span_id)`` hex derived from ``seed`` with a single hash."""
    digest = hashlib.blake2b(
        seed.encode("utf-8", "surrogatepass"), digest_size=24, person=b"tlm-ids"
    ).digest()
    trace, span_ = digest[:16], digest[16:]
    if not any(trace):  # the all-zero id means "invalid" in OTLP
        trace = trace[:-1] + b"\x01"
    if not any(span_):
        span_ = span_[:-1] + b"\x01"
    return trace.hex(), span_.hex()


def trace_id_for(seed: str) -> str:
    """A deterministic, valid 16-byte trace id (hex) derived from ``seed`` (e.g. a request id)."""
    return _hash_id(seed, 16, b"tlm-trace")


def span_id_for(seed: str) -> str:
    """A deterministic, valid 8-byte span id (hex) derived from ``seed``."""
    return _hash_id(seed, 8, b"tlm-span")


def nanos(epoch_seconds: float) -> int:
    """Epoch seconds as integer nanoseconds, without the float rounding of ``t * 1e9``
    (a double cannot hold today's epoch in nanoseconds exactly)."""
    whole = int(epoch_seconds)
    return whole * 1_000_000_000 + round((epoch_seconds - whole) * 1_000_000_000)


def unix_nanos(epoch_seconds: float) -> str:
    """Epoch seconds as the decimal-string ``fixed64`` nanoseconds OTLP/JSON uses."""
    return str(nanos(epoch_seconds))


# One-entry memo of the formatted second: records of one batch mostly share it. A single tuple
# is swapped in whole, so concurrent callers (encoding may run in a thread) never mix halves.
_second_memo: list[tuple[int, str]] = [(-1, "")]


def iso_utc(epoch_seconds: float) -> str:
    """Epoch seconds as ISO 8601 UTC, microseconds and ``Z``: ``2024-05-01T12:00:00.500000Z``."""
    second, fraction = divmod(round(epoch_seconds * 1_000_000), 1_000_000)
    cached_second, text = _second_memo[0]
    if cached_second != second:
        moment = _dt.datetime.fromtimestamp(second, tz=_dt.timezone.utc)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S")
        _second_memo[0] = (second, text)
    return f"{text}.{fraction:06d}Z"


def any_value(value: Any) -> dict[str, Any]:
    """One ``AnyValue``. ``bool`` is tested before ``int`` (it is a subclass)."""
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": key_values(value)}}
    if value is None:
        return {}
    return {"stringValue": str(value)}


def key_values(attributes: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Attributes as OTLP ``KeyValue`` list; None values are left out."""
    items = attributes.items() if isinstance(attributes, Mapping) else attributes
    return [{"key": key, "value": any_value(value)} for key, value in items if value is not None]


def span(
    *,
    trace_id: str,
    span_id: str,
    name: str,
    start_time: float,
    end_time: float,
    attributes: list[dict[str, Any]],
    kind: int = SPAN_KIND_INTERNAL,
    status_code: int = STATUS_UNSET,
    status_message: str | None = None,
    parent_span_id: str | None = None,
) -> dict[str, Any]:
    """One ``Span`` as a JSON-ready dict; times are epoch seconds."""
    out: dict[str, Any] = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": kind,
        "startTimeUnixNano": unix_nanos(start_time),
        "endTimeUnixNano": unix_nanos(max(end_time, start_time)),
        "attributes": attributes,
    }
    if parent_span_id:
        out["parentSpanId"] = parent_span_id
    if status_code != STATUS_UNSET:
        status: dict[str, Any] = {"code": status_code}
        if status_message:
            status["message"] = status_message
        out["status"] = status
    return out


@dataclass(frozen=True, slots=True)
class ExportEnvelope:
    """The constant part of an ``ExportTraceServiceRequest`` with one resource and one scope.

    ``body(spans)`` joins already-encoded spans (``dumps(span(...))``) between the precomputed
    prefix and suffix; ``overhead`` is the size of an empty body, for splitting by size.
    """

    prefix: bytes
    suffix: bytes

    @classmethod
    def build(
        cls,
        resource_attributes: Mapping[str, Any],
        *,
        scope_name: str,
        scope_version: str | None = None,
    ) -> ExportEnvelope:
        scope: dict[str, Any] = {"name": scope_name}
        if scope_version:
            scope["version"] = scope_version
        skeleton = dumps(
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": key_values(resource_attributes)},
                        "scopeSpans": [{"scope": scope, "spans": ["\x00"]}],
                    }
                ]
            }
        )
        prefix, _, suffix = skeleton.partition(b'"\\u0000"')
        return cls(prefix=prefix, suffix=suffix)

    @property
    def overhead(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def body(self, encoded_spans: Sequence[bytes]) -> bytes:
        return b"".join((self.prefix, b",".join(encoded_spans), self.suffix))


def split_by_size(sizes: Sequence[int], limit: int, overhead: int = 0) -> list[range]:
    """Consecutive index ranges whose joined size (items + commas + overhead) stays within
    ``limit``. An item larger than the limit on its own gets a range of its own."""
    chunks: list[range] = []
    start = 0
    total = overhead
    for index, size in enumerate(sizes):
        extra = size + (1 if index > start else 0)
        if index > start and total + extra > limit:
            chunks.append(range(start, index))
            start = index
            total = overhead + size
        else:
            total += extra
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """gzip (zero mtime, so equal input gives equal output).

    ``gzip.compress`` asks zlib for its largest state (memLevel 9), whose set-up dominates the
    cost of the small bodies a logger sends: memLevel 8 (zlib's default) compresses a 2 KB body
    about five times faster to the same size.
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8)
    return compressor.compress(data) + compressor.flush()
