"""The log record: what every destination receives, decoded off the request path.

``Exchange`` is the raw capture built on the request path (bytes, timings, status, outcome; no
parsing). ``LogRecord`` is what the dispatcher decodes from it (see ``decode_exchange`` in
``_decode.py``) and what sinks serialise. ``LogRecord.to_dict()`` is the package's standard JSON
record (documented field by field in the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .planning import Plan
    from .resolver import Caller

Outcome = Literal["ok", "http_error", "exception", "client_disconnected"]
OUTCOMES: tuple[str, ...] = ("ok", "http_error", "exception", "client_disconnected")
REDACTED = "[redacted: message_logging=metadata_only]"


@dataclass(slots=True)
class Exchange:
    """One request/response pair as captured on the request path: raw, bounded, unparsed."""

    request_id: str
    method: str
    path: str
    start_time: float  # epoch seconds (time.time()) when the request arrived
    start_perf: float  # time.perf_counter() at the same instant
    plan: Plan
    caller: Caller | None
    request_body: bytes = b""
    request_truncated: bool = False
    request_content_type: str = ""
    status: int | None = None
    response_content_type: str = ""
    response_chunks: list[bytes] = field(default_factory=list)
    response_truncated: bool = False
    first_byte_perf: float | None = None  # perf_counter() of the first non-empty body chunk
    end_perf: float | None = None
    outcome: Outcome = "ok"
    error: str | None = None  # type and message of an app exception, never a traceback
    cache_hit: bool = False

    def size_hint(self) -> int:
        """Bytes this exchange holds, for the dispatcher's byte-bounded queue."""
        return 512 + len(self.request_body) + sum(len(c) for c in self.response_chunks)


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(slots=True)
class LogRecord:
    """One decoded, redacted request/response, ready for every destination."""

    request_id: str
    team_id: str | None
    key_alias: str | None
    user_id: str | None
    route: str
    method: str
    call_type: str  # chat.completions | completions | embeddings | responses | unknown
    outcome: Outcome
    status_code: int | None
    start_time: float  # epoch seconds
    end_time: float  # epoch seconds
    completion_start_time: float | None = None  # epoch seconds of the first response byte
    model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    stream: bool = False
    model_parameters: dict[str, Any] = field(default_factory=dict)
    messages: Any = None  # input: chat messages, prompt, embedding input or Responses input
    output: str | None = None  # output text (joined choices / deltas)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    cache_hit: bool = False
    redacted: bool = False
    decode_note: str | None = None
    raw_request: str | None = None  # truncated raw body when it could not be decoded
    raw_response: str | None = None
    request_truncated: bool = False
    response_truncated: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.outcome == "ok"

    @property
    def latency_ms(self) -> float:
        return round((self.end_time - self.start_time) * 1000.0, 3)

    @property
    def time_to_first_token_ms(self) -> float | None:
        if self.completion_start_time is None:
            return None
        return round((self.completion_start_time - self.start_time) * 1000.0, 3)

    def to_dict(self) -> dict[str, Any]:
        """The standard JSON record (stable field names; see README "The log record")."""
        return {
            "request_id": self.request_id,
            "team_id": self.team_id,
            "key_alias": self.key_alias,
            "user_id": self.user_id,
            "route": self.route,
            "method": self.method,
            "call_type": self.call_type,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "completion_start_time": self.completion_start_time,
            "latency_ms": self.latency_ms,
            "time_to_first_token_ms": self.time_to_first_token_ms,
            "model": self.model,
            "response_model": self.response_model,
            "response_id": self.response_id,
            "stream": self.stream,
            "model_parameters": self.model_parameters,
            "messages": self.messages,
            "output": self.output,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "error": self.error,
            "cache_hit": self.cache_hit,
            "redacted": self.redacted,
            "decode_note": self.decode_note,
            "raw_request": self.raw_request,
            "raw_response": self.raw_response,
            "request_truncated": self.request_truncated,
            "response_truncated": self.response_truncated,
            "metadata": self.metadata,
        }
