"""The OpenTelemetry collector destination (``otel``): one private OTLP exporter per destination.

Every destination gets its own ``opentelemetry-exporter-otlp`` span exporter (OTLP/HTTP protobuf
or gRPC). Records become spans that follow the OpenTelemetry GenAI semantic conventions
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/); they are built directly as
``ReadableSpan`` objects with the request's own start and end times, so no tracer provider, span
processor or SDK thread is involved, and the process-global tracer provider is never set or read.

Three properties a shared gateway needs and the stock exporters do not give:

* **No environment leak.** Both exporters merge ``OTEL_EXPORTER_OTLP_HEADERS`` /
  ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` (and endpoint, timeout, compression, certificate and
  credential-provider variables) from ``os.environ`` into every exporter: an operator's collector
  token would be sent to a tenant's collector. Every env-derived parameter is passed explicitly,
  and the headers that reach the wire are pinned *below* the exporter: an HTTP transport and a
  gRPC client interceptor replace whatever the exporter computed with the destination's own
  headers. ``os.environ`` is never modified (it is process-global; other threads read it).
* **Bounded threads.** The exporters block, so exports run on ONE small thread pool shared by all
  OTel and GCS destinations of the process (:func:`run_blocking`), never a thread per destination.
* **Real reasons.** The transport and the interceptor record what the collector answered, so a
  failure becomes a :class:`SinkError` that says "refused the credentials (HTTP 401)" or
  "unreachable", retryable or not.

``callback_vars``:

``otel_endpoint`` (required)
    HTTP: the full traces URL, e.g. ``https://collector:4318/v1/traces`` (a URL without a path
    gets ``/v1/traces``). gRPC: ``host:port`` (TLS), ``https://host:port`` (TLS) or
    ``http://host:port`` (plaintext).
``otel_protocol``
    ``http/protobuf`` (default) or ``grpc``.
``otel_headers`` (secret)
    ``name=value,name2=value2`` as in ``OTEL_EXPORTER_OTLP_HEADERS``; values are percent-decoded.
``otel_service_name``
    The ``service.name`` resource attribute (default ``team-logging-middleware``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from .. import __version__
from .._netsafety import blocked_reason, check_destination_url, literal_ip
from ..errors import MissingDependencyError, SettingsError, SinkError
from ..records import LogRecord
from .base import SinkContext, SinkType

logger = logging.getLogger("team_logging_middleware.sinks.otel")

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# The one bounded thread pool for blocking SDK calls (OTel exporters, google-cloud-storage).
# --------------------------------------------------------------------------------------------

BLOCKING_WORKERS = 4
BLOCKING_THREAD_PREFIX = "team-logging-io"

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def blocking_executor() -> ThreadPoolExecutor:
    """The process-wide pool that runs blocking exports; created on first use, at most 4 threads.

    However many destinations exist, the number of threads stays bounded: a destination waits for
    a free worker (its wait counts against its timeout) instead of getting a thread of its own.
    """
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=BLOCKING_WORKERS, thread_name_prefix=BLOCKING_THREAD_PREFIX
            )
        return _executor


def _forget_executor_after_fork() -> None:
    # A forked child (pre-fork servers) inherits the pool object but none of its threads.
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor_after_fork)


async def run_blocking(fn: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run ``fn`` on the shared pool; give up waiting after ``timeout`` seconds.

    On timeout a call that has not started yet is cancelled; one that is running cannot be
    interrupted, so every blocking call made through here carries its own, similar timeout.
    Raises a retryable :class:`SinkError` naming ``what`` on timeout; ``fn``'s own exceptions
    propagate unchanged.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(blocking_executor(), fn)
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise SinkError(f"{what} timed out after {timeout:g}s", retryable=True) from None


# --------------------------------------------------------------------------------------------
# Settings: parsing and validation of callback_vars (no secret ever appears in a message).
# --------------------------------------------------------------------------------------------

PROTOCOLS: tuple[str, ...] = ("http/protobuf", "grpc")
DEFAULT_PROTOCOL = "http/protobuf"
DEFAULT_SERVICE_NAME = "team-logging-middleware"
DEFAULT_GRPC_PORT = 4317
TRACES_PATH = "/v1/traces"
MAX_SERVICE_NAME = 256

_HTTP_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_GRPC_KEY = re.compile(r"^[0-9a-z_.-]+$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


@dataclass(frozen=True, slots=True)
class OtelTarget:
    """One collector as a destination describes it, validated.

    ``endpoint`` is the full URL for HTTP and ``host:port`` for gRPC; ``headers`` are the exact
    headers (gRPC: lowercase metadata) sent with every export and nothing else.
    """

    endpoint: str
    protocol: str
    host: str
    port: int
    insecure: bool
    headers: tuple[tuple[str, str], ...]
    service_name: str = DEFAULT_SERVICE_NAME

    def __repr__(self) -> str:  # headers are secret
        return (
            f"OtelTarget(endpoint={self.endpoint!r}, protocol={self.protocol!r}, "
            f"headers=<{len(self.headers)} hidden>, service_name={self.service_name!r})"
        )


def parse_protocol(value: str | None) -> str:
    protocol = (value or DEFAULT_PROTOCOL).strip().lower()
    if protocol not in PROTOCOLS:
        raise SettingsError(
            f"callback_vars.otel_protocol: must be one of {list(PROTOCOLS)}",
            param="callback_vars.otel_protocol",
        )
    return protocol


def parse_endpoint(value: str, protocol: str) -> tuple[str, str, int, bool]:
    """``(endpoint, host, port, insecure)`` for the exporter; raises :class:`SettingsError`.

    The shared destination-URL rules apply (http/https only, no credentials in the URL, no
    query, no link-local / cloud-metadata literal address); a bare gRPC ``host:port`` is
    checked as the ``https://`` URL it stands for.
    """
    param = "callback_vars.otel_endpoint"
    raw = value.strip()
    bare = "://" not in raw
    if protocol == "http/protobuf" and bare:
        raise SettingsError(
            f"{param}: must be a full http:// or https:// URL, e.g. "
            "https://collector:4318/v1/traces",
            param=param,
        )
    url = f"https://{raw}" if bare else raw
    check_destination_url(url, param=param)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port
    if protocol == "grpc":
        if parts.path not in ("", "/"):
            raise SettingsError(
                f"{param}: a gRPC endpoint is host:port (optionally with http:// or https://), "
                "without a path",
                param=param,
            )
        if port is None and bare:
            raise SettingsError(f"{param}: a gRPC endpoint needs a port (host:port)", param=param)
        grpc_port = port if port is not None else DEFAULT_GRPC_PORT
        netloc_host = f"[{host}]" if ":" in host else host
        return f"{netloc_host}:{grpc_port}", host, grpc_port, parts.scheme == "http" and not bare
    path = parts.path if parts.path not in ("", "/") else TRACES_PATH
    endpoint = f"{parts.scheme}://{parts.netloc}{path}"
    default_port = 443 if parts.scheme == "https" else 80
    return endpoint, host, port if port is not None else default_port, False


def parse_headers(value: str | None, protocol: str) -> tuple[tuple[str, str], ...]:
    """Parse ``name=value,...``; messages name the entry's position, never a name or value."""
    param = "callback_vars.otel_headers"
    if not value or not value.strip():
        return ()
    out: dict[str, str] = {}
    for index, item in enumerate(value.split(","), start=1):
        if not item.strip():
            continue
        name, sep, raw_value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingsError(f"{param}: entry {index} is not name=value", param=param)
        header_value = unquote(raw_value.strip())
        if not _HTTP_TOKEN.match(name):
            raise SettingsError(
                f"{param}: entry {index} has a name that is not a valid header name", param=param
            )
        if not _PRINTABLE.match(header_value):
            raise SettingsError(
                f"{param}: entry {index} has a value with characters other than printable ASCII",
                param=param,
            )
        if protocol == "grpc":
            # gRPC metadata keys must be lowercase; "-bin" keys carry bytes; "grpc-" is reserved.
            name = name.lower()
            if not _GRPC_KEY.match(name) or name.endswith("-bin") or name.startswith("grpc-"):
                raise SettingsError(
                    f"{param}: entry {index} is not a valid gRPC metadata key "
                    "(lowercase letters, digits, '-', '_', '.'; "
                    "no 'grpc-' prefix or '-bin' suffix)",
                    param=param,
                )
        out[name] = header_value
    return tuple(out.items())


def parse_service_name(value: str | None) -> str:
    name = (value or "").strip() or DEFAULT_SERVICE_NAME
    if len(name) > MAX_SERVICE_NAME or not _PRINTABLE.match(name):
        raise SettingsError(
            f"callback_vars.otel_service_name: at most {MAX_SERVICE_NAME} printable characters",
            param="callback_vars.otel_service_name",
        )
    return name


def parse_target(callback_vars: Mapping[str, str]) -> OtelTarget:
    """The validated target of resolved ``callback_vars``; raises :class:`SettingsError`."""
    protocol = parse_protocol(callback_vars.get("otel_protocol"))
    endpoint_value = callback_vars.get("otel_endpoint") or ""
    if not endpoint_value.strip():
        raise SettingsError(
            "callback_vars.otel_endpoint: required by callback 'otel'",
            param="callback_vars.otel_endpoint",
        )
    endpoint, host, port, insecure = parse_endpoint(endpoint_value, protocol)
    return OtelTarget(
        endpoint=endpoint,
        protocol=protocol,
        host=host,
        port=port,
        insecure=insecure,
        headers=parse_headers(callback_vars.get("otel_headers"), protocol),
        service_name=parse_service_name(callback_vars.get("otel_service_name")),
    )


def validate_otel_vars(literal_vars: Mapping[str, str]) -> None:
    """Check the literal vars of an entry when it is written (``os.environ/`` ones are absent)."""
    protocol = parse_protocol(literal_vars.get("otel_protocol"))
    if literal_vars.get("otel_endpoint"):
        parse_endpoint(literal_vars["otel_endpoint"], protocol)
    parse_headers(literal_vars.get("otel_headers"), protocol)
    parse_service_name(literal_vars.get("otel_service_name"))


# --------------------------------------------------------------------------------------------
# Records -> GenAI spans (pure functions; no SDK types).
# --------------------------------------------------------------------------------------------

MAX_CONTENT_CHARS = 128_000
MAX_STATUS_DESCRIPTION = 1024
CONNECTION_TEST_SPAN = "team-logging-middleware connection test"

_OPERATIONS = {
    "chat.completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}
_NUMERIC_PARAMS = (
    ("temperature", "gen_ai.request.temperature", float),
    ("top_p", "gen_ai.request.top_p", float),
    ("top_k", "gen_ai.request.top_k", float),
    ("frequency_penalty", "gen_ai.request.frequency_penalty", float),
    ("presence_penalty", "gen_ai.request.presence_penalty", float),
    ("max_tokens", "gen_ai.request.max_tokens", int),
    ("max_completion_tokens", "gen_ai.request.max_tokens", int),
    ("max_output_tokens", "gen_ai.request.max_tokens", int),
    ("seed", "gen_ai.request.seed", int),
    ("n", "gen_ai.request.choice.count", int),
)

AttributeValue = str | bool | int | float | list[str]


def operation_name(record: LogRecord) -> str:
    return _OPERATIONS.get(record.call_type, record.call_type or "unknown")


def span_name(record: LogRecord) -> str:
    """``"{operation} {model}"`` as the GenAI conventions name a client span (e.g. "chat gpt-4")."""
    operation = operation_name(record)
    return f"{operation} {record.model}" if record.model else operation


def span_ids(record: LogRecord) -> tuple[int, int]:
    """Trace and span id derived from the record, so a retried export repeats the same span."""
    seed = f"{record.request_id}\0{record.team_id}\0{record.start_time!r}".encode()
    digest = hashlib.sha256(b"team-logging-middleware/otel\0" + seed).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return trace_id, span_id


def _json(value: Any) -> tuple[str, bool]:
    text = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    if len(text) > MAX_CONTENT_CHARS:
        return text[:MAX_CONTENT_CHARS], True
    return text, False


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "content": text}


def _generic_part(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return _text_part(value)
    return _text_part(json.dumps(value, ensure_ascii=False, default=str))


def _tool_call_part(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        return _generic_part(call)
    raw_function = call.get("function")
    function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
    name = function.get("name", call.get("name"))
    arguments = function.get("arguments", call.get("arguments"))
    if isinstance(arguments, str):
        # Keep the raw text when a model emitted invalid JSON arguments.
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    part: dict[str, Any] = {"type": "tool_call", "name": name, "arguments": arguments}
    if call.get("id") is not None:
        part["id"] = call.get("id")
    return part


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_part(content)]
    if not isinstance(content, list):
        return [_generic_part(content)]
    parts: list[dict[str, Any]] = []
    for item in content:
        if isinstance(item, str):
            parts.append(_text_part(item))
        elif isinstance(item, dict):
            kind = item.get("type")
            text = item.get("text")
            if isinstance(text, str) and kind in ("text", "input_text", "output_text", None):
                parts.append(_text_part(text))
            elif kind == "image_url":
                image = item.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    parts.append({"type": "uri", "modality": "image", "uri": url})
                else:  # inline data URLs are large and add nothing a log reader needs
                    parts.append({"type": "blob", "modality": "image"})
            else:
                parts.append({"type": str(kind) if kind else "unknown"})
        else:
            parts.append(_generic_part(item))
    return parts


def _chat_message(message: dict[str, Any]) -> dict[str, Any]:
    role = str(message.get("role"))
    content = message.get("content")
    if role == "tool":
        parts: list[dict[str, Any]] = [
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": content,
            }
        ]
    else:
        parts = _content_parts(content)
    for call in message.get("tool_calls") or ():
        parts.append(_tool_call_part(call))
    out: dict[str, Any] = {"role": role, "parts": parts}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def input_messages(messages: Any) -> list[dict[str, Any]]:
    """The request's input in the GenAI ``gen_ai.input.messages`` shape (role + parts)."""
    if messages is None:
        return []
    if isinstance(messages, str):
        return [{"role": "user", "parts": [_text_part(messages)]}]
    if isinstance(messages, list):
        if messages and all(isinstance(m, str) for m in messages):
            return [{"role": "user", "parts": [_text_part(m) for m in messages]}]
        out: list[dict[str, Any]] = []
        for message in messages:
            if isinstance(message, dict) and "role" in message:
                out.append(_chat_message(message))
            else:
                out.append({"role": "user", "parts": [_generic_part(message)]})
        return out
    return [{"role": "user", "parts": [_generic_part(messages)]}]


def output_messages(record: LogRecord) -> list[dict[str, Any]]:
    """The response in the GenAI ``gen_ai.output.messages`` shape."""
    parts: list[dict[str, Any]] = []
    if record.output:
        parts.append(_text_part(record.output))
    parts.extend(_tool_call_part(call) for call in record.tool_calls)
    if not parts:
        return []
    return [{"role": "assistant", "parts": parts, "finish_reason": record.finish_reason or ""}]


def _provider(record: LogRecord) -> str:
    for key in ("gen_ai.provider.name", "provider"):
        value = record.metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return "openai"


def span_attributes(record: LogRecord) -> dict[str, AttributeValue]:
    """The span's attributes: GenAI conventions plus ``team_logging.*``; no None values.

    Message content (``gen_ai.input.messages`` / ``gen_ai.output.messages``) is included only when
    the record is not redacted, i.e. the team's message logging is ``full``.
    """
    provider = _provider(record)
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation_name(record),
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "team_logging.request_id": record.request_id,
        "team_logging.outcome": record.outcome,
        "team_logging.cache_hit": record.cache_hit,
        "team_logging.stream": record.stream,
        "team_logging.redacted": record.redacted,
        "http.request.method": record.method,
        "http.route": record.route,
    }
    optional: tuple[tuple[str, Any], ...] = (
        ("gen_ai.request.model", record.model),
        ("gen_ai.response.model", record.response_model),
        ("gen_ai.response.id", record.response_id),
        ("gen_ai.usage.input_tokens", record.usage.input_tokens),
        ("gen_ai.usage.output_tokens", record.usage.output_tokens),
        ("http.response.status_code", record.status_code),
        ("team_logging.team_id", record.team_id),
        ("team_logging.key_alias", record.key_alias),
        ("team_logging.user_id", record.user_id),
        ("team_logging.time_to_first_token_ms", record.time_to_first_token_ms),
        ("team_logging.decode_note", record.decode_note),
    )
    for key, value in optional:
        if value is not None:
            attrs[key] = value
    if record.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = [record.finish_reason]
    params = record.model_parameters if isinstance(record.model_parameters, dict) else {}
    for name, key, kind in _NUMERIC_PARAMS:
        value = params.get(name)
        if key in attrs or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        attrs[key] = kind(value)
    stop = params.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = list(stop)
    if not record.success:
        attrs["error.type"] = (
            str(record.status_code)
            if record.outcome == "http_error" and record.status_code
            else record.outcome
        )
    if not record.redacted:
        truncated = False
        inputs = input_messages(record.messages)
        if inputs:
            attrs["gen_ai.input.messages"], cut = _json(inputs)
            truncated = truncated or cut
        outputs = output_messages(record)
        if outputs:
            attrs["gen_ai.output.messages"], cut = _json(outputs)
            truncated = truncated or cut
        if truncated:
            attrs["team_logging.content_truncated"] = True
    return attrs


def status_description(record: LogRecord) -> str | None:
    """The ERROR status description of a failed request (None for a success)."""
    if record.success:
        return None
    if record.error:
        text = record.error
    elif record.outcome == "http_error" and record.status_code:
        text = f"HTTP {record.status_code}"
    elif record.outcome == "client_disconnected":
        text = "client disconnected"
    else:
        text = record.outcome
    return text[:MAX_STATUS_DESCRIPTION]


def _nanos(epoch_seconds: float) -> int:
    return round(epoch_seconds * 1_000_000_000)


# --------------------------------------------------------------------------------------------
# What the collector answered, as seen below the exporter (the exporter only says FAILURE).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int | None = None  # HTTP status
    grpc_code: str | None = None  # grpc.StatusCode name
    connection_error: bool = False
    redirect: bool = False
    retry_after: float | None = None


_GRPC_RETRYABLE = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None


def _error_for(answer: _Answer | None, protocol: str) -> SinkError:
    if answer is None:
        return SinkError("spans could not be exported (encoding failed or the batch is too large)")
    if answer.grpc_code is not None:
        code = answer.grpc_code
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return SinkError(f"collector refused the credentials (gRPC {code})")
        if code == "UNAVAILABLE":
            return SinkError("collector unreachable (gRPC UNAVAILABLE)", retryable=True)
        if code in _GRPC_RETRYABLE:
            return SinkError(f"collector failed the export (gRPC {code})", retryable=True)
        if code == "UNIMPLEMENTED":
            return SinkError("endpoint is not an OTLP trace receiver (gRPC UNIMPLEMENTED)")
        return SinkError(f"collector rejected the export (gRPC {code})")
    if answer.redirect:
        return SinkError(
            f"collector redirected the export (HTTP {answer.status}); "
            "set otel_endpoint to the final URL",
            status=answer.status,
        )
    if answer.status is not None:
        status = answer.status
        if status in (401, 403):
            return SinkError(f"collector refused the credentials (HTTP {status})", status=status)
        if status == 429 or status >= 500:
            return SinkError(
                f"collector failed the export (HTTP {status})",
                retryable=True,
                retry_after=answer.retry_after,
                status=status,
            )
        return SinkError(f"collector rejected the export (HTTP {status})", status=status)
    if answer.connection_error:
        return SinkError(
            "collector unreachable (connection refused, reset or timed out)", retryable=True
        )
    return SinkError(f"export over {protocol} failed")


# --------------------------------------------------------------------------------------------
# The exporters (imported lazily: the module imports without the otel extra).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Backend:
    readable_span: Any
    span_context: Any
    trace_flags: Any
    span_kind_client: Any
    status: Any
    status_code: Any
    resource: Any
    scope: Any
    success: Any
    make_exporter: Callable[[OtelTarget, float, threading.local], Any]


_UNSUPPORTED = (
    "the installed opentelemetry-exporter-otlp version is not supported by the otel destination "
    "(its headers could not be kept apart from the environment's); upgrade it"
)


@functools.cache
def _http_backend() -> Callable[[OtelTarget, float, threading.local], Any]:
    try:
        import requests
        import requests.utils
        from opentelemetry.exporter.http.transport._base import BaseHTTPTransport
        from opentelemetry.exporter.http.transport._requests import (
            RequestsHTTPResult,
            RequestsHTTPTransport,
        )
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.metrics import NoOpMeterProvider
    except ImportError as exc:
        raise MissingDependencyError("the otel destination", "otel") from exc
    if "_transport" not in inspect.signature(OTLPSpanExporter.__init__).parameters:
        raise SinkError(_UNSUPPORTED)

    class _RedirectRefused(Exception):
        pass

    class PinnedHeadersTransport(BaseHTTPTransport):
        """Sends exactly the destination's headers, whatever the exporter merged from the env."""

        def __init__(self, url: str, headers: dict[str, str], answers: threading.local) -> None:
            session = requests.Session()
            # No .netrc credentials, no env CA/proxy guessing per request; proxies are read once
            # here (operator infrastructure, honouring NO_PROXY), never credentials.
            session.trust_env = False
            session.proxies.update(requests.utils.get_environ_proxies(url))
            verify: bool | str = (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            )
            self._inner = RequestsHTTPTransport(verify=verify, session=session)
            self._headers = headers
            self._answers = answers

        def request(
            self,
            method: str,
            url: str,
            *,
            headers: dict[str, str] | None = None,
            timeout: float | None = None,
            data: bytes | None = None,
        ) -> Any:
            # ``headers`` (the exporter's) may hold OTEL_EXPORTER_OTLP_*HEADERS: never sent.
            result = self._inner.request(
                method, url, headers=dict(self._headers), timeout=timeout, data=data
            )
            status = result.status_code
            if status is None:
                self._answers.last = _Answer(
                    connection_error=self._inner.is_connection_error(result.error)
                )
                return result
            retry_after = None
            if status == 429 or status >= 500:
                retry_after = _retry_after(result.headers().get("retry-after"))
            redirect = 300 <= status < 400
            self._answers.last = _Answer(status=status, redirect=redirect, retry_after=retry_after)
            if redirect:
                # The exporter counts any status below 400 as delivered; a redirect is not.
                return RequestsHTTPResult(error=_RedirectRefused(f"HTTP {status}"))
            return result

        def is_connection_error(self, exception: Exception | None) -> bool:
            return bool(self._inner.is_connection_error(exception))

        def close(self) -> None:
            self._inner.close()

    def make(target: OtelTarget, timeout: float, answers: threading.local) -> Any:
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "User-Agent": f"team-logging-middleware/{__version__}",
        }
        headers.update(target.headers)
        return OTLPSpanExporter(
            endpoint=target.endpoint,
            headers=dict(target.headers),
            timeout=timeout,
            compression=Compression.Gzip,
            meter_provider=NoOpMeterProvider(),
            _transport=PinnedHeadersTransport(target.endpoint, headers, answers),
        )

    return make


@functools.cache
def _grpc_backend() -> Callable[[OtelTarget, float, threading.local], Any]:
    try:
        import grpc  # type: ignore[import-untyped]
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.metrics import NoOpMeterProvider
    except ImportError as exc:
        raise MissingDependencyError("the otel destination", "otel") from exc
    if not hasattr(OTLPSpanExporter, "_initialize_channel_and_stub"):
        raise SinkError(_UNSUPPORTED)

    class CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
        def __init__(self, base: Any, metadata: tuple[tuple[str, str], ...]) -> None:
            self.method = base.method
            self.timeout = base.timeout
            self.metadata = metadata
            self.credentials = getattr(base, "credentials", None)
            self.wait_for_ready = getattr(base, "wait_for_ready", None)
            self.compression = getattr(base, "compression", None)

    class PinnedMetadataInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        """Sends exactly the destination's metadata and records the call's status code."""

        def __init__(self, metadata: tuple[tuple[str, str], ...], answers: threading.local):
            self._metadata = metadata
            self._answers = answers

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            call = continuation(CallDetails(details, self._metadata), request)
            self._answers.last = _Answer(grpc_code=call.code().name)
            return call

    class PrivateGrpcExporter(OTLPSpanExporter):
        """The stock gRPC exporter, its channel wrapped by the interceptor (also on reconnect)."""

        def __init__(self, interceptor: Any, **kwargs: Any) -> None:
            self._team_logging_interceptor = interceptor  # read by the channel set-up below
            super().__init__(**kwargs)

        def _initialize_channel_and_stub(self) -> None:
            super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
            self._channel = grpc.intercept_channel(self._channel, self._team_logging_interceptor)
            self._client = self._stub(self._channel)

    retryable = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    )

    def make(target: OtelTarget, timeout: float, answers: threading.local) -> Any:
        return PrivateGrpcExporter(
            PinnedMetadataInterceptor(target.headers, answers),
            endpoint=target.endpoint,
            insecure=target.insecure,
            # Explicit credentials: the exporter would otherwise read certificate files and a
            # credential provider named by the environment.
            credentials=None if target.insecure else grpc.ssl_channel_credentials(),
            headers=target.headers,
            timeout=timeout,
            compression=grpc.Compression.Gzip,
            retryable_error_codes=retryable,
            meter_provider=NoOpMeterProvider(),
        )

    return make


@functools.cache
def _backend(protocol: str) -> _Backend:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    except ImportError as exc:
        raise MissingDependencyError("the otel destination", "otel") from exc
    make = _grpc_backend() if protocol == "grpc" else _http_backend()
    return _Backend(
        readable_span=ReadableSpan,
        span_context=SpanContext,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        span_kind_client=SpanKind.CLIENT,
        status=Status,
        status_code=StatusCode,
        resource=Resource,
        scope=InstrumentationScope("team_logging_middleware", __version__),
        success=SpanExportResult.SUCCESS,
        make_exporter=make,
    )


# --------------------------------------------------------------------------------------------
# The sink.
# --------------------------------------------------------------------------------------------

# The dispatcher bounds every emit by the context's timeout. The exporter gets a shorter deadline
# of its own (its internal retries and backoff stop there), and the wait for the pool a slightly
# shorter one, so a failure is reported with this sink's reason rather than as an outer timeout.
EXPORT_SHARE = 0.7
WAIT_SHARE = 0.95


class OtelSink:
    """Exports records as GenAI client spans to one OTLP collector (HTTP/protobuf or gRPC).

    Owns a private exporter; shares the process's bounded blocking pool with the other
    OTel and GCS destinations. ``emit`` raises :class:`SinkError` (retryable for 429/5xx,
    unreachable collectors and timeouts); ``check`` exports one small test span.
    """

    def __init__(self, target: OtelTarget, *, timeout: float = 10.0) -> None:
        self._target = target
        self._timeout = max(float(timeout), 0.1)
        self._backend = _backend(target.protocol)
        self._answers = threading.local()
        self._exporter = self._backend.make_exporter(
            target, self._timeout * EXPORT_SHARE, self._answers
        )
        self._resource = self._backend.resource({"service.name": target.service_name})
        self._closed = False

    @property
    def target(self) -> OtelTarget:
        return self._target

    def __repr__(self) -> str:
        return f"OtelSink({self._target!r})"

    def _span(self, record: LogRecord) -> Any:
        backend = self._backend
        trace_id, span_id = span_ids(record)
        description = status_description(record)
        status = (
            backend.status(backend.status_code.ERROR, description)
            if description is not None
            else backend.status(backend.status_code.UNSET)
        )
        start = _nanos(record.start_time)
        end = max(_nanos(record.end_time), start)
        return backend.readable_span(
            name=span_name(record),
            context=backend.span_context(
                trace_id=trace_id, span_id=span_id, is_remote=False, trace_flags=backend.trace_flags
            ),
            resource=self._resource,
            attributes=span_attributes(record),
            kind=backend.span_kind_client,
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=backend.scope,
        )

    def _check_host(self) -> None:
        """Resolve the collector host here, next to the export: a name validated when it was
        written can resolve (or be re-pointed) to a metadata address later."""
        host, port = self._target.host, self._target.port
        ip = literal_ip(host)
        if ip is not None:
            addresses = [str(ip)]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise SinkError(
                    "collector unreachable (its host name did not resolve)", retryable=True
                ) from None
            addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            reason = blocked_reason(address.split("%", 1)[0])
            if reason is not None:
                raise SinkError(f"collector host resolves to a {reason} address; refusing to send")

    def _export(self, spans: Sequence[Any]) -> None:
        """Runs on the blocking pool: check the host, export, translate a failure."""
        if self._closed:
            raise SinkError("destination is closed")
        self._check_host()
        self._answers.last = None
        try:
            result = self._exporter.export(spans)
        except Exception as exc:  # the exporters catch transport errors; anything else is ours
            raise SinkError(f"OTLP export failed ({type(exc).__name__})") from None
        if result == self._backend.success:
            return
        raise _error_for(getattr(self._answers, "last", None), self._target.protocol)

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        if not batch:
            return
        spans = [self._span(record) for record in batch]
        await run_blocking(
            functools.partial(self._export, spans),
            timeout=self._timeout * WAIT_SHARE,
            what="OTLP export",
        )

    async def check(self) -> None:
        """Export one tiny span named "team-logging-middleware connection test"."""
        backend = self._backend
        trace_id = int.from_bytes(os.urandom(16), "big") or 1
        span_id = int.from_bytes(os.urandom(8), "big") or 1
        now = time.time_ns()
        span = backend.readable_span(
            name=CONNECTION_TEST_SPAN,
            context=backend.span_context(
                trace_id=trace_id, span_id=span_id, is_remote=False, trace_flags=backend.trace_flags
            ),
            resource=self._resource,
            attributes={"team_logging.connection_test": True},
            kind=backend.span_kind_client,
            start_time=now,
            end_time=now,
            instrumentation_scope=backend.scope,
        )
        await run_blocking(
            functools.partial(self._export, [span]),
            timeout=self._timeout * WAIT_SHARE,
            what="OTLP connection test",
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await run_blocking(self._exporter.shutdown, timeout=self._timeout, what="OTLP shutdown")
        except Exception as exc:  # closing must not fail a shutdown
            logger.warning("otel destination did not shut down cleanly: %s", type(exc).__name__)


def _build(resolved_vars: Mapping[str, str], ctx: SinkContext) -> OtelSink:
    return OtelSink(parse_target(resolved_vars), timeout=ctx.timeout)


SINK_TYPE = SinkType(
    name="otel",
    factory=_build,
    required_vars=frozenset({"otel_endpoint"}),
    optional_vars=frozenset({"otel_protocol", "otel_headers", "otel_service_name"}),
    description=(
        "OpenTelemetry collector over OTLP (http/protobuf or grpc): GenAI spans per request"
    ),
    validate_vars=validate_otel_vars,
)
