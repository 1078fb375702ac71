"""Langfuse destination: each team's records go to its own Langfuse project.

Export uses Langfuse's OpenTelemetry endpoint, ``POST {host}/api/public/otel/v1/traces``, with
OTLP/HTTP JSON, gzip, Basic auth ``public_key:secret_key`` and ``x-langfuse-ingestion-version: 4``,
sent through the one ``httpx.AsyncClient`` every HTTP sink shares. The ``langfuse`` SDK is not
used: its client installs or joins the process-wide OpenTelemetry tracer provider, is a singleton
per public key, starts threads per project, drops spans silently past its queue size and has a
``flush()`` without timeout — none of which is acceptable with one project per tenant.

One record becomes one trace holding one span, the ``generation`` observation. Ids derive from
the request id, so a batch that is retried after an ambiguous failure (a timeout after the server
had already stored it) updates the same trace and observation instead of duplicating them.

The host is the tenant's choice, so it is checked like any tenant-chosen URL
(:mod:`team_logging_middleware._netsafety`): http(s) only, no credentials in the URL, never a
link-local or cloud-metadata address — neither literally when settings are written nor through
DNS when records are sent (plain-HTTP connections then go to the checked address; over HTTPS the
certificate check rules out a re-pointed name). The sink only uses
its own vars: no ``LANGFUSE_*`` or ``OTEL_*`` environment variable is ever read implicitly, so a
tenant-chosen host can never receive the operator's own Langfuse credentials by fallback.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import httpx

from .._netsafety import (
    Resolver,
    UnsafeHostError,
    check_destination_url,
    literal_ip,
    resolve_host,
    safe_addresses,
)
from .._otlp import (
    SPAN_KIND_CLIENT,
    STATUS_ERROR,
    ExportEnvelope,
    attribute_prefix,
    dumps,
    gzip_bytes,
    ids_for,
    iso_utc,
    json_string,
    nanos,
    split_by_size,
)
from ..errors import SettingsError, SinkError
from ..records import REDACTED, LogRecord
from .base import SinkContext, SinkType
from .custom import PartialBatchError

__all__ = [
    "DEFAULT_HOST",
    "LANGFUSE_ATTRIBUTES",
    "OTLP_TRACES_PATH",
    "SINK_TYPE",
    "LangfuseSink",
    "encode_span",
    "langfuse_span",
    "validate_langfuse_vars",
]

DEFAULT_HOST = "https://cloud.langfuse.com"
OTLP_TRACES_PATH = "/api/public/otel/v1/traces"
INGESTION_VERSION = "4"
DEFAULT_ENVIRONMENT = "default"

# Attribute names Langfuse's OTLP ingestion reads. Copied from the Python SDK's
# ``langfuse._client.attributes.LangfuseOtelSpanAttributes`` (the server's
# ``packages/shared/src/server/otel/attributes.ts`` holds the same names) so that ``langfuse`` is
# not a runtime dependency; tests compare this table with the installed SDK.
LANGFUSE_ATTRIBUTES: Mapping[str, str] = MappingProxyType(
    {
        "TRACE_NAME": "langfuse.trace.name",
        "TRACE_USER_ID": "user.id",
        "TRACE_SESSION_ID": "session.id",
        "TRACE_TAGS": "langfuse.trace.tags",
        "TRACE_METADATA": "langfuse.trace.metadata",
        "OBSERVATION_TYPE": "langfuse.observation.type",
        "OBSERVATION_METADATA": "langfuse.observation.metadata",
        "OBSERVATION_LEVEL": "langfuse.observation.level",
        "OBSERVATION_STATUS_MESSAGE": "langfuse.observation.status_message",
        "OBSERVATION_INPUT": "langfuse.observation.input",
        "OBSERVATION_OUTPUT": "langfuse.observation.output",
        "OBSERVATION_COMPLETION_START_TIME": "langfuse.observation.completion_start_time",
        "OBSERVATION_MODEL": "langfuse.observation.model.name",
        "OBSERVATION_MODEL_PARAMETERS": "langfuse.observation.model.parameters",
        "OBSERVATION_USAGE_DETAILS": "langfuse.observation.usage_details",
        "ENVIRONMENT": "langfuse.environment",
    }
)
_TRACE_NAME = LANGFUSE_ATTRIBUTES["TRACE_NAME"]
_USER_ID = LANGFUSE_ATTRIBUTES["TRACE_USER_ID"]
_SESSION_ID = LANGFUSE_ATTRIBUTES["TRACE_SESSION_ID"]
_TAGS = LANGFUSE_ATTRIBUTES["TRACE_TAGS"]
_LEVEL = LANGFUSE_ATTRIBUTES["OBSERVATION_LEVEL"]
_STATUS_MESSAGE = LANGFUSE_ATTRIBUTES["OBSERVATION_STATUS_MESSAGE"]
_INPUT = LANGFUSE_ATTRIBUTES["OBSERVATION_INPUT"]
_OUTPUT = LANGFUSE_ATTRIBUTES["OBSERVATION_OUTPUT"]
_COMPLETION_START = LANGFUSE_ATTRIBUTES["OBSERVATION_COMPLETION_START_TIME"]
_MODEL = LANGFUSE_ATTRIBUTES["OBSERVATION_MODEL"]
_MODEL_PARAMETERS = LANGFUSE_ATTRIBUTES["OBSERVATION_MODEL_PARAMETERS"]
_USAGE = LANGFUSE_ATTRIBUTES["OBSERVATION_USAGE_DETAILS"]
_ENVIRONMENT = LANGFUSE_ATTRIBUTES["ENVIRONMENT"]

# Langfuse's own rule for environment names (lowercase, digits, '-', '_', at most 40
# characters, not starting with "langfuse"); anything else is rejected by the server.
_ENVIRONMENT_RE = re.compile(r"^(?!langfuse)[a-z0-9_-]{1,40}$")
_CHAT_CALL_TYPES = frozenset({"chat.completions", "responses"})
_MAX_USER_METADATA_KEYS = 64
_MAX_TAGS = 32

_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_RESPONSE_BYTES = 64 * 1024
_DNS_TTL = 30.0


# -- settings ---------------------------------------------------------------------------------


def validate_langfuse_vars(callback_vars: Mapping[str, str]) -> None:
    """Checks on literal var values (``os.environ/`` references are checked once resolved).

    Raises :class:`SettingsError` naming the var; messages never contain a key.
    """
    host = callback_vars.get("langfuse_host")
    if host:
        check_destination_url(host, param="callback_vars.langfuse_host")
    environment = callback_vars.get("langfuse_environment")
    if environment and not _ENVIRONMENT_RE.match(environment):
        raise SettingsError(
            "callback_vars.langfuse_environment: Langfuse environments are 1-40 characters of "
            "lowercase letters, digits, '-' and '_', and must not start with 'langfuse'",
            param="callback_vars.langfuse_environment",
        )
    public_key = callback_vars.get("langfuse_public_key", "")
    if public_key.startswith("sk-lf-"):
        raise SettingsError(
            "callback_vars.langfuse_public_key: this looks like a secret key (sk-lf-...); "
            "the public key starts with pk-lf-",
            param="callback_vars.langfuse_public_key",
        )


def _build(callback_vars: Mapping[str, str], ctx: SinkContext) -> LangfuseSink:
    # Vars arrive normalized and resolved; they are validated again because values that came
    # from os.environ/ references were not visible when the settings were written.
    validate_langfuse_vars(callback_vars)
    secret = callback_vars.get("langfuse_secret_key") or callback_vars.get("langfuse_secret")
    public = callback_vars.get("langfuse_public_key")
    if not public or not secret:
        raise SettingsError(
            "langfuse needs langfuse_public_key and langfuse_secret_key",
            param=f"callback_vars.langfuse_{'secret' if public else 'public'}_key",
        )
    return LangfuseSink(
        public_key=public,
        secret_key=secret,
        host=callback_vars.get("langfuse_host") or DEFAULT_HOST,
        environment=callback_vars.get("langfuse_environment") or DEFAULT_ENVIRONMENT,
        http=ctx.http,
        timeout=ctx.timeout,
    )


SINK_TYPE = SinkType(
    name="langfuse",
    factory=_build,
    required_vars=frozenset({"langfuse_public_key", "langfuse_secret_key"}),
    optional_vars=frozenset({"langfuse_host", "langfuse_environment"}),
    aliases=MappingProxyType({"langfuse_secret": "langfuse_secret_key"}),
    description="Langfuse project (OTLP/HTTP; langfuse_host defaults to Langfuse Cloud)",
    validate_vars=validate_langfuse_vars,
)


# -- mapping ----------------------------------------------------------------------------------
#
# Spans are written straight to bytes from precomputed attribute prefixes: building the OTLP
# KeyValue dicts and serialising them costs several times more, and this runs once per logged
# request. ``langfuse_span`` gives the same span as a dict for readers and tests.


def _prefix(key: str, value_type: str = "stringValue") -> bytes:
    return b"," + attribute_prefix(key, value_type)


_P_TRACE_NAME = _prefix(_TRACE_NAME)
_P_USER_ID = _prefix(_USER_ID)
_P_SESSION_ID = _prefix(_SESSION_ID)
_P_LEVEL = _prefix(_LEVEL)
_P_STATUS_MESSAGE = _prefix(_STATUS_MESSAGE)
_P_INPUT = _prefix(_INPUT)
_P_OUTPUT = _prefix(_OUTPUT)
_P_COMPLETION_START = _prefix(_COMPLETION_START)
_P_MODEL = _prefix(_MODEL)
_P_MODEL_PARAMETERS = _prefix(_MODEL_PARAMETERS)
_P_USAGE = _prefix(_USAGE)
_P_TAGS = _prefix(_TAGS, "arrayValue") + b'{"values":['
_GENERATION_TYPE = attribute_prefix(LANGFUSE_ATTRIBUTES["OBSERVATION_TYPE"]) + b'"generation"}}'
_LEVEL_ERROR = _P_LEVEL + b'"ERROR"}}'
_END = b"}}"
_P_TRACE_METADATA = _prefix(LANGFUSE_ATTRIBUTES["TRACE_METADATA"])
_P_OBSERVATION_METADATA = _prefix(LANGFUSE_ATTRIBUTES["OBSERVATION_METADATA"])


def _input_value(record: LogRecord) -> str | bytes | None:
    if record.redacted:
        return REDACTED
    if record.messages is not None:
        return record.messages if isinstance(record.messages, str) else dumps(record.messages)
    return record.raw_request


def _output_value(record: LogRecord) -> str | bytes | None:
    if record.redacted:
        has_output = record.output is not None or record.tool_calls or record.raw_response
        return REDACTED if has_output else None
    if record.tool_calls:
        return dumps(
            {"role": "assistant", "content": record.output, "tool_calls": record.tool_calls}
        )
    if record.output is not None:
        if record.call_type in _CHAT_CALL_TYPES:
            return dumps({"role": "assistant", "content": record.output})
        return record.output
    return record.raw_response


def _text(value: str | bytes) -> bytes:
    """A string attribute's JSON literal; bytes hold an already encoded JSON document.

    A JSON document embeds in a JSON string by escaping only backslashes and quotes: encoders
    never leave raw control characters in their output, and its bytes are valid UTF-8.
    """
    if isinstance(value, str):
        return json_string(value)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_LITERALS: dict[str, bytes] = {}


def _literal(text: str) -> bytes:
    """``json_string`` memoised for the few values that repeat on every record of a team
    (tags, names); bounded, since route and team names come from outside."""
    cached = _LITERALS.get(text)
    if cached is None:
        cached = json_string(text)
        if len(_LITERALS) < 4096:
            _LITERALS[text] = cached
    return cached


def _status_message(record: LogRecord) -> str:
    if record.error:
        return record.error
    if record.outcome == "client_disconnected":
        return "client disconnected before the response completed"
    if record.status_code is not None:
        return f"HTTP {record.status_code}"
    return record.outcome


def _environment_attribute(environment: str) -> bytes:
    return _prefix(_ENVIRONMENT) + json_string(environment) + _END


def encode_span(record: LogRecord, environment_attribute: bytes) -> bytes:
    """One record as the OTLP/JSON span Langfuse reads as a trace with one generation."""
    name = record.call_type if record.call_type != "unknown" else f"{record.method} {record.route}"
    parts: list[bytes] = [
        _GENERATION_TYPE,
        environment_attribute,
        _P_TRACE_NAME,
        _literal(name),
        _END,
    ]

    model = record.response_model or record.model
    if model:
        parts += (_P_MODEL, json_string(model), _END)
    if record.model_parameters:
        parts += (_P_MODEL_PARAMETERS, _text(dumps(record.model_parameters)), _END)
    value = _input_value(record)
    if value is not None:
        parts += (_P_INPUT, _text(value), _END)
    value = _output_value(record)
    if value is not None:
        parts += (_P_OUTPUT, _text(value), _END)
    usage = record.usage
    if (
        usage.input_tokens is not None
        or usage.output_tokens is not None
        or (usage.total_tokens is not None)
    ):
        usage_details = {
            "input": usage.input_tokens,
            "output": usage.output_tokens,
            "total": usage.total_tokens,
        }
        parts += (
            _P_USAGE,
            _text(dumps({k: v for k, v in usage_details.items() if v is not None})),
            _END,
        )
    if record.stream and record.completion_start_time is not None:
        parts += (_P_COMPLETION_START, b'"', iso_utc(record.completion_start_time).encode(), b'"}}')
    failed = record.outcome != "ok"
    status = b""
    if failed:
        message = json_string(_status_message(record))
        parts += (_LEVEL_ERROR, _P_STATUS_MESSAGE, message, _END)
        status = b',"status":{"code":%d,"message":%s}' % (STATUS_ERROR, message)
    if record.user_id:
        parts += (_P_USER_ID, json_string(record.user_id), _END)

    user_meta = record.metadata if isinstance(record.metadata, Mapping) else {}
    session_id = user_meta.get("session_id")
    if isinstance(session_id, str) and session_id:
        parts += (_P_SESSION_ID, json_string(session_id), _END)
    tags = [b'{"stringValue":' + _literal("route:" + record.route) + b"}"]
    if record.team_id:
        tags.insert(0, b'{"stringValue":' + _literal("team:" + record.team_id) + b"}")
    if record.cache_hit:
        tags.append(b'{"stringValue":"cache_hit"}')
    extra_tags = user_meta.get("tags")
    if isinstance(extra_tags, (list, tuple)):
        tags += (
            b'{"stringValue":' + json_string(tag) + b"}"
            for tag in extra_tags[:_MAX_TAGS]
            if isinstance(tag, str) and tag
        )
    parts += (_P_TAGS, b",".join(tags), b"]}}}")

    # Metadata goes as one JSON object per level, which Langfuse parses and merges with any
    # flattened ``...metadata.<key>`` attributes; one attribute per group is far cheaper to
    # write than one per key, and numbers and booleans keep their JSON types.
    trace_meta = {"team_id": record.team_id, "request_id": record.request_id, "route": record.route}
    if record.key_alias is not None:
        trace_meta["key_alias"] = record.key_alias
    observation_meta: dict[str, Any] = {}
    if user_meta:
        for count, (key, item) in enumerate(user_meta.items()):
            if count >= _MAX_USER_METADATA_KEYS:
                break
            if item is not None and key not in ("tags", "session_id"):
                observation_meta[str(key)] = item
    observation_meta.update(
        request_id=record.request_id,
        method=record.method,
        call_type=record.call_type,
        outcome=record.outcome,
        status_code=record.status_code,
        cache_hit=record.cache_hit,
        stream=record.stream,
    )  # ours are written last so request metadata cannot overwrite them
    if record.finish_reason is not None:
        observation_meta["finish_reason"] = record.finish_reason
    if record.response_id is not None:
        observation_meta["response_id"] = record.response_id
    if record.decode_note is not None:
        observation_meta["decode_note"] = record.decode_note
    if record.model and record.response_model and record.model != record.response_model:
        observation_meta["requested_model"] = record.model
    if record.request_truncated:
        observation_meta["request_truncated"] = True
    if record.response_truncated:
        observation_meta["response_truncated"] = True
    parts += (
        _P_TRACE_METADATA,
        _text(dumps(trace_meta)),
        _END,
        _P_OBSERVATION_METADATA,
        _text(dumps(observation_meta)),
        _END,
    )

    trace_id, span_id = ids_for(record.request_id)
    end_time = max(record.end_time, record.start_time)
    return b"".join(
        (
            b'{"traceId":"%s","spanId":"%s","name":%s,"kind":%d,"startTimeUnixNano":"%d",'
            b'"endTimeUnixNano":"%d","attributes":['
            % (
                trace_id.encode(),
                span_id.encode(),
                _literal(name),
                SPAN_KIND_CLIENT,
                nanos(record.start_time),
                nanos(end_time),
            ),
            *parts,
            b"]",
            status,
            b"}",
        )
    )


def langfuse_span(record: LogRecord, *, environment: str = DEFAULT_ENVIRONMENT) -> dict[str, Any]:
    """The OTLP span for ``record`` as a dict (what :class:`LangfuseSink` sends, decoded)."""
    result: dict[str, Any] = json.loads(encode_span(record, _environment_attribute(environment)))
    return result


# -- transport --------------------------------------------------------------------------------


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - time.time())


def _rejected_spans(body: bytes) -> tuple[int, str]:
    """``partialSuccess`` of an OTLP response: (rejected span count, server message)."""
    if not body or not body.lstrip().startswith(b"{"):
        return 0, ""
    try:
        data = json.loads(body)
    except ValueError:
        return 0, ""
    partial = data.get("partialSuccess") if isinstance(data, dict) else None
    if not isinstance(partial, dict):
        return 0, ""
    try:
        rejected = int(partial.get("rejectedSpans") or 0)
    except (TypeError, ValueError):
        rejected = 0
    message = partial.get("errorMessage")
    return max(rejected, 0), message[:200] if isinstance(message, str) else ""


class LangfuseSink:
    """Exports batches of records to one Langfuse project (one public/secret key pair).

    ``emit`` sends one OTLP request per batch, split into several when the encoded batch is
    larger than ``max_request_bytes`` (before compression, so every request stays below it
    after compression too). It raises :class:`SinkError`: retryable for 408/429/5xx-gateway
    statuses, connection errors and timeouts (with ``retry_after`` from ``Retry-After``),
    non-retryable otherwise. Spans the server reports as rejected (OTLP ``partialSuccess``)
    raise :class:`PartialBatchError` once every part was sent, so only they count as failed.
    Messages name the host and the status, never a key.

    ``check`` posts an empty export with the same credentials: 401/403 means a wrong key pair,
    a connection error an unreachable host.
    """

    __slots__ = (
        "_base",
        "_checked",
        "_checked_until",
        "_closed",
        "_compress_level",
        "_endpoint",
        "_envelope",
        "_environment",
        "_headers",
        "_host_header",
        "_hostname",
        "_http",
        "_literal_host",
        "_max_request_bytes",
        "_pin",
        "_port",
        "_resolver",
        "_thread_threshold",
        "_timeout",
        "_timer",
        "public_key",
    )

    def __init__(
        self,
        *,
        public_key: str,
        secret_key: str,
        http: httpx.AsyncClient,
        host: str = DEFAULT_HOST,
        environment: str = DEFAULT_ENVIRONMENT,
        timeout: float = 10.0,
        max_request_bytes: int = 3_000_000,
        compress_level: int = 1,
        compress_in_thread_above: int = 256 * 1024,
        resolver: Resolver = resolve_host,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        from .. import __version__

        self._base = check_destination_url(host or DEFAULT_HOST, param="langfuse_host")
        url = httpx.URL(self._base + OTLP_TRACES_PATH)
        self._endpoint = url
        self._hostname = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._host_header = url.netloc.decode("ascii")
        self._literal_host = literal_ip(self._hostname) is not None
        self.public_key = public_key
        self._http = http
        self._timeout = timeout
        self._max_request_bytes = max_request_bytes
        self._compress_level = compress_level
        self._thread_threshold = compress_in_thread_above
        self._resolver = resolver
        self._timer = timer
        self._environment = _environment_attribute(environment or DEFAULT_ENVIRONMENT)
        token = base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")
        self._headers = {
            "authorization": f"Basic {token}",
            "content-type": "application/json",
            "content-encoding": "gzip",
            "x-langfuse-ingestion-version": INGESTION_VERSION,
            "x-langfuse-public-key": public_key,
            "user-agent": f"team-logging-middleware/{__version__}",
        }
        self._envelope = ExportEnvelope.build(
            {
                "service.name": "team-logging-middleware",
                "telemetry.sdk.name": "team-logging-middleware",
                "telemetry.sdk.language": "python",
                "telemetry.sdk.version": __version__,
            },
            scope_name="team-logging-middleware",
            scope_version=__version__,
        )
        self._pin: bool | None = None
        self._checked: str | None = None
        self._checked_until = 0.0
        self._closed = False

    def __repr__(self) -> str:  # no secret, ever
        return f"LangfuseSink(host={self._base!r}, public_key={self.public_key!r})"

    @property
    def host(self) -> str:
        return self._base

    # -- Sink protocol ------------------------------------------------------------------------

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        if self._closed:
            raise SinkError("langfuse sink is closed")
        if not batch:
            return
        encoded: list[bytes] = []
        environment = self._environment
        for index, record in enumerate(batch):
            encoded.append(encode_span(record, environment))
            if index % 128 == 127:
                await asyncio.sleep(0)  # a huge batch must not hold the loop for its whole encode
        chunks = split_by_size(
            [len(item) for item in encoded], self._max_request_bytes, self._envelope.overhead
        )
        rejected = 0
        message = ""
        for chunk in chunks:
            body = self._envelope.body(encoded[chunk.start : chunk.stop])
            count, text = await self._post(await self._compress(body))
            rejected += count
            message = message or text
        if rejected:
            # The other spans were stored: count only the rejected ones, and do not retry.
            detail = f": {message}" if message else ""
            raise PartialBatchError(
                f"langfuse host {self._base} rejected {rejected} of {len(batch)} spans{detail}",
                failed=min(rejected, len(batch)),
            )

    async def check(self) -> None:
        await self._post(await self._compress(self._envelope.body([])), probe=True)

    async def aclose(self) -> None:
        # The HTTP pool is shared and owned by the dispatcher: nothing of ours to release.
        self._closed = True

    # -- internals ----------------------------------------------------------------------------

    async def _compress(self, body: bytes) -> bytes:
        if len(body) > self._thread_threshold:
            # zlib releases the GIL: a big body compresses beside the loop, not on it.
            return await asyncio.to_thread(gzip_bytes, body, self._compress_level)
        return gzip_bytes(body, self._compress_level)

    def _can_pin(self) -> bool:
        """Whether requests may connect to the checked address instead of the name.

        Only plain-HTTP connections straight to the host are pinned. Over HTTPS the certificate
        check already stops DNS rebinding (an internal service cannot prove it is the tenant's
        host), and pinning would let connections pooled per address be reused across names,
        skipping that check. Through a proxy, the proxy resolves the name and owns egress policy.
        """
        if self._pin is None:
            if self._endpoint.scheme != "http":
                self._pin = False
            else:
                try:
                    transport = self._http._transport_for_url(self._endpoint)
                    self._pin = transport is self._http._transport
                except Exception:  # private httpx API: if it moves, fall back to not pinning
                    self._pin = False
        return self._pin

    async def _target(self) -> tuple[httpx.URL, dict[str, str]]:
        if self._literal_host:
            return self._endpoint, {}
        now = self._timer()
        if self._checked is None or now >= self._checked_until:
            try:
                addresses = await safe_addresses(
                    self._hostname, self._port, resolver=self._resolver
                )
            except UnsafeHostError as exc:
                raise SinkError(f"langfuse host {self._base}: {exc}", retryable=False) from None
            except OSError as exc:
                raise SinkError(
                    f"cannot resolve langfuse host {self._base}: "
                    f"{exc.strerror or type(exc).__name__}",
                    retryable=True,
                ) from None
            self._checked = addresses[0].split("%", 1)[0]
            self._checked_until = now + _DNS_TTL
        if not self._can_pin():
            return self._endpoint, {}
        # Connect to the checked address; the Host header keeps the real name.
        return self._endpoint.copy_with(host=self._checked), {"host": self._host_header}

    async def _post(self, body: bytes, *, probe: bool = False) -> tuple[int, str]:
        url, extra_headers = await self._target()
        headers = {**self._headers, **extra_headers} if extra_headers else self._headers
        request = self._http.build_request(
            "POST", url, content=body, headers=headers, timeout=self._timeout
        )
        try:
            # auth=None: a client-wide auth must never replace (or reach) a tenant's host;
            # no redirects: a redirect could lead the credentials to any address.
            response = await self._http.send(
                request, stream=True, auth=None, follow_redirects=False
            )
            try:
                payload = await self._read_capped(response) if response.is_success else b""
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            self._checked = None
            raise SinkError(
                f"langfuse host {self._base} did not answer within {self._timeout:g}s",
                retryable=True,
            ) from None
        except httpx.TransportError as exc:
            self._checked = None  # the address may have changed: resolve again next time
            raise SinkError(
                f"cannot reach langfuse host {self._base}: {type(exc).__name__}",
                retryable=True,
            ) from None
        status = response.status_code
        if 200 <= status < 300:
            return _rejected_spans(payload)
        phrase = httpx.codes.get_reason_phrase(status) or "error"
        reason = f"HTTP {status} {phrase} from langfuse host {self._base}"
        if status in (401, 403):
            reason += " (check langfuse_public_key / langfuse_secret_key)"
        elif status == 404 and probe:
            reason += f" (no OTLP endpoint at {OTLP_TRACES_PATH}: is it a Langfuse v3 server?)"
        elif 300 <= status < 400:
            reason += " (redirects are not followed: set langfuse_host to the final URL)"
        retryable = status in _RETRYABLE_STATUSES
        retry_after = _parse_retry_after(response.headers.get("retry-after")) if retryable else None
        raise SinkError(reason, retryable=retryable, retry_after=retry_after, status=status)

    @staticmethod
    async def _read_capped(response: httpx.Response) -> bytes:
        # A tenant-chosen host could answer with an endless body: read a bounded prefix only.
        parts: list[bytes] = []
        size = 0
        async for part in response.aiter_bytes():
            parts.append(part)
            size += len(part)
            if size >= _MAX_RESPONSE_BYTES:
                break
        return b"".join(parts)
