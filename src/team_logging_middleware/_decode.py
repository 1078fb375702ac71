"""From a raw :class:`~.records.Exchange` to one :class:`~.records.LogRecord`, off the request path.

``decode_exchange`` understands the OpenAI-compatible APIs an LLM gateway serves:

* chat completions — JSON, and SSE streams (content deltas joined per choice, tool-call deltas
  merged by index into ``[{id, type, function: {name, arguments}}]``, the usage chunk,
  ``finish_reason``, response id and model);
* legacy completions (``prompt`` / ``choices[].text``), JSON and streamed;
* embeddings (``input`` and usage; the output is a short note such as ``<2 embeddings>``,
  never the vectors);
* the Responses API — JSON, and its SSE event stream (``response.output_text.delta``,
  function-call items and argument deltas, ``response.completed`` / ``incomplete`` /
  ``failed``, ``error``).

The API is chosen by the route (path suffix), else by the response's ``object``/event types,
else by the request's keys. Bodies that are not JSON, not an object, cut off by the capture caps
or not valid UTF-8 still give a record: what could be read, the raw text (first
:data:`RAW_LIMIT` bytes, decoded with replacement characters) and a ``decode_note`` saying why.
When the plan's ``message_logging`` is ``metadata_only``, messages, output, tool-call arguments
and raw bodies become :data:`~.records.REDACTED` (model, usage, timings, status, ids and tool
names stay) and ``redacted`` is set. ``decode_exchange`` never raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from ._sse import DONE, SSEEvent, data_only_values, is_done, looks_like_sse, parse_sse
from .records import REDACTED, Exchange, LogRecord, Usage

__all__ = ["RAW_LIMIT", "call_type_for_path", "decode_exchange"]

RAW_LIMIT = 4096
"""Bytes of an undecodable body kept as ``raw_request`` / ``raw_response``."""

_loads: Callable[[bytes], Any]
try:  # orjson is several times faster on the large bodies LLM traffic carries
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - exercised only without the [fast] extra
    _loads = json.loads


class _Fail:
    """Marker: the body could not be parsed."""


_FAIL = _Fail()

_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "seed",
    "n",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "logprobs",
    "top_logprobs",
    "dimensions",
    "encoding_format",
)
_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM_RE = re.compile(rb'"stream"\s*:\s*(true|false)')
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')


def decode_exchange(exchange: Exchange) -> LogRecord:
    """Decode and redact one exchange. Never raises: a decoder bug yields a minimal record."""
    try:
        return _decode(exchange)
    except Exception as exc:
        return _minimal(exchange, f"decoder error: {type(exc).__name__}")


def call_type_for_path(path: str) -> str:
    """``chat.completions`` / ``completions`` / ``embeddings`` / ``responses`` / ``unknown``."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("chat/completions"):
        return "chat.completions"
    if path.endswith("/completions") or path == "completions":
        return "completions"
    if path.endswith("/embeddings") or path == "embeddings":
        return "embeddings"
    if path.endswith("/responses") or path == "responses":
        return "responses"
    return "unknown"


# -- small, total helpers ---------------------------------------------------------------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _raw(body: bytes) -> str:
    text = body[:RAW_LIMIT].decode("utf-8", errors="replace")
    return text + "…" if len(body) > RAW_LIMIT else text


def _parse_json(body: bytes) -> tuple[Any, str | None]:
    """(value, note) or (_FAIL, None). Non-UTF-8 JSON is read with replacement characters."""
    try:
        return _loads(body), None
    except (ValueError, RecursionError):
        pass
    # orjson is strict about UTF-8 (and lone surrogate escapes); the stdlib parser on a
    # replacement-decoded text still recovers the structure of an otherwise valid document.
    try:
        text = body.decode("utf-8")
        note = None
    except UnicodeDecodeError:
        text = body.decode("utf-8", errors="replace")
        note = "not valid UTF-8 (decoded with replacement characters)"
    try:
        return json.loads(text), note
    except (ValueError, RecursionError):
        return _FAIL, None


def _epoch(exchange: Exchange, perf: float | None) -> float | None:
    if perf is None:
        return None
    return exchange.start_time + (perf - exchange.start_perf)


def _usage(data: Any) -> Usage | None:
    usage = _dict(data)
    if not usage:
        return None
    inp = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    out = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    total = _int(usage.get("total_tokens"))
    if total is None and inp is not None and out is not None:
        total = inp + out
    return Usage(input_tokens=inp, output_tokens=out, total_tokens=total)


def _error_text(value: Any) -> str | None:
    """The message of an OpenAI-style error object (``{"message", "type", "code"}``) or string."""
    if isinstance(value, str):
        return value or None
    err = _dict(value)
    message = _str(err.get("message"))
    kind = _str(err.get("type")) or _str(err.get("code"))
    if message and kind:
        return f"{kind}: {message}"
    return message or kind


def _join_outputs(parts: dict[int, list[str]]) -> str | None:
    texts = ["".join(parts[i]) for i in sorted(parts)]
    texts = [t for t in texts if t]
    if not texts:
        return None
    return texts[0] if len(texts) == 1 else "\n\n".join(texts)


def _content_text(content: Any) -> str | None:
    """Chat message content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    texts = [
        _str(part.get("text")) or ""
        for part in _list(content)
        if isinstance(part, dict) and part.get("type") in ("text", "output_text")
    ]
    return "".join(texts) if texts else None


# -- the record -------------------------------------------------------------------------------


def _base_record(exchange: Exchange, call_type: str) -> LogRecord:
    caller = exchange.caller
    plan = exchange.plan
    team_id = caller.team_id if caller is not None and caller.team_id is not None else None
    if team_id is None:
        team_id = plan.team_id
    metadata: dict[str, Any] = {}
    if caller is not None:
        metadata.update(caller.metadata)
        if caller.key_id is not None:
            metadata.setdefault("key_id", caller.key_id)
    end_time = _epoch(exchange, exchange.end_perf)
    return LogRecord(
        request_id=exchange.request_id,
        team_id=team_id,
        key_alias=caller.key_alias if caller is not None else None,
        user_id=caller.user_id if caller is not None else None,
        route=exchange.path,
        method=exchange.method,
        call_type=call_type,
        outcome=exchange.outcome,
        status_code=exchange.status,
        start_time=exchange.start_time,
        end_time=end_time if end_time is not None else exchange.start_time,
        completion_start_time=_epoch(exchange, exchange.first_byte_perf),
        error=exchange.error,
        cache_hit=exchange.cache_hit,
        request_truncated=exchange.request_truncated,
        response_truncated=exchange.response_truncated,
        metadata=metadata,
    )


def _minimal(exchange: Exchange, note: str) -> LogRecord:
    try:
        record = _base_record(exchange, call_type_for_path(exchange.path))
    except Exception:  # an exchange too broken even for the basics
        record = LogRecord(
            request_id=str(getattr(exchange, "request_id", "")),
            team_id=None,
            key_alias=None,
            user_id=None,
            route=str(getattr(exchange, "path", "")),
            method=str(getattr(exchange, "method", "")),
            call_type="unknown",
            outcome="exception",
            status_code=None,
            start_time=0.0,
            end_time=0.0,
        )
    record.decode_note = note
    try:
        redact = exchange.plan.message_logging == "metadata_only"
    except Exception:
        redact = True  # when in doubt, keep content out
    if redact:
        _redact(record)
    return record


def _json_body(
    body: bytes, truncated: bool, side: str, notes: list[str]
) -> tuple[dict[str, Any], str | None]:
    """A non-empty request or response body as ``(object, raw text)``.

    What went wrong is added to ``notes``, naming the ``side``. The raw text is kept only when the
    body is not a JSON object; a truncated body still gives whatever fields could be salvaged from
    its start.
    """
    value, note = _parse_json(body)
    if isinstance(value, dict):
        if note:
            notes.append(f"{side} body {note}")
        return value, None
    if value is _FAIL and truncated:
        notes.append(f"{side} body truncated at {len(body)} bytes")
        return _salvage(body), _raw(body)
    if value is _FAIL:
        notes.append(f"{side} body is not JSON")
    else:
        notes.append(f"{side} body is JSON but not an object")
    return {}, _raw(body)


def _decode(exchange: Exchange) -> LogRecord:
    notes: list[str] = []

    request: dict[str, Any] = {}
    raw_request: str | None = None
    if exchange.request_body:
        request, raw_request = _json_body(
            exchange.request_body, exchange.request_truncated, "request", notes
        )

    response_bytes = b"".join(exchange.response_chunks)
    events: list[tuple[str, dict[str, Any]]] | None = None
    response: dict[str, Any] = {}
    raw_response: str | None = None
    if response_bytes:
        if looks_like_sse(exchange.response_content_type, response_bytes[:64]):
            events, undecoded = _sse_payloads(response_bytes)
            if not events:
                raw_response = _raw(response_bytes)
                notes.append("response event stream has no JSON events")
            elif undecoded:
                notes.append(f"{undecoded} response events were not JSON")
            if exchange.response_truncated:
                notes.append(f"response stream truncated at {len(response_bytes)} bytes")
        else:
            response, raw_response = _json_body(
                response_bytes, exchange.response_truncated, "response", notes
            )

    call_type = call_type_for_path(exchange.path)
    if call_type == "unknown":
        call_type = _infer_call_type(request, response, events)

    record = _base_record(exchange, call_type)
    record.raw_request = raw_request
    record.raw_response = raw_response
    _apply_request(record, request, call_type)

    if events is not None:
        record.stream = True
        if call_type == "responses":
            _responses_stream(record, events)
        else:
            _chat_stream(record, events)
    elif response:
        if call_type == "responses":
            _responses_json(record, response)
        elif call_type == "embeddings":
            _embeddings_json(record, response)
        else:
            _chat_json(record, response)
        if record.error is None and (
            exchange.outcome == "http_error" or (exchange.status or 0) >= 400
        ):
            record.error = _error_text(response.get("error")) or _str(response.get("detail"))

    if record.model is None:
        record.model = record.response_model
    if record.user_id is None:
        record.user_id = _str(request.get("user")) or _str(request.get("safety_identifier"))
    record.decode_note = "; ".join(notes) or None
    if exchange.plan.message_logging == "metadata_only":
        _redact(record)
    return record


def _salvage(body: bytes) -> dict[str, Any]:
    """Top-level facts worth keeping from a JSON document cut off by the capture cap."""
    found: dict[str, Any] = {}
    model = _MODEL_RE.search(body)
    if model:
        found["model"] = model.group(1).decode("utf-8", errors="replace")
    stream = _STREAM_RE.search(body)
    if stream:
        found["stream"] = stream.group(1) == b"true"
    response_id = _ID_RE.search(body)
    if response_id:
        found["id"] = response_id.group(1).decode("utf-8", errors="replace")
    return found


def _sse_payloads(stream: bytes) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    payloads: list[tuple[str, dict[str, Any]]] = []
    undecoded = 0
    values = data_only_values(stream)
    if values is not None:
        # The common shape: load each value straight from the captured bytes. Anything that
        # is not a plain JSON payload takes the general route below, so the result is the same.
        for value in values:
            try:
                loaded = _loads(value)
            except (ValueError, RecursionError):
                text = value.decode("utf-8", errors="replace")
                if text.strip() == DONE:
                    continue
                loaded = _event_json(SSEEvent(data=text))
            if isinstance(loaded, dict):
                payloads.append(("message", loaded))
            else:
                undecoded += 1
        return payloads, undecoded
    for event in parse_sse((stream,)):
        if is_done(event):
            continue
        value = _event_json(event)
        if isinstance(value, dict):
            payloads.append((event.event, value))
        else:
            undecoded += 1
    return payloads, undecoded


def _event_json(event: SSEEvent) -> Any:
    try:
        return _loads(event.data.encode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        try:
            return json.loads(event.data)
        except (ValueError, RecursionError):
            return _FAIL


def _infer_call_type(
    request: dict[str, Any],
    response: dict[str, Any],
    events: list[tuple[str, dict[str, Any]]] | None,
) -> str:
    probe: dict[str, Any] = response
    event_name = ""
    if events:
        event_name, probe = events[0]
    obj = _str(probe.get("object")) or ""
    kind = _str(probe.get("type")) or event_name
    if obj.startswith("chat.completion"):
        return "chat.completions"
    if obj == "text_completion":
        return "completions"
    if obj == "response" or kind.startswith("response."):
        return "responses"
    if obj == "list" and any(
        isinstance(item, dict) and item.get("object") == "embedding"
        for item in _list(probe.get("data"))[:1]
    ):
        return "embeddings"
    if "messages" in request:
        return "chat.completions"
    if "prompt" in request:
        return "completions"
    return "unknown"


# -- request side -----------------------------------------------------------------------------


def _apply_request(record: LogRecord, request: dict[str, Any], call_type: str) -> None:
    if not request:
        return
    record.model = _str(request.get("model"))
    record.stream = request.get("stream") is True
    params: dict[str, Any] = {}
    for name in _PARAMS:
        if name in request and request[name] is not None:
            params[name] = request[name]
    response_format = request.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("type"), str):
        params["response_format"] = response_format["type"]
    reasoning = _dict(request.get("reasoning"))
    if "reasoning_effort" not in params and isinstance(reasoning.get("effort"), str):
        params["reasoning_effort"] = reasoning["effort"]
    tools = _tool_names(request.get("tools")) + _tool_names(request.get("functions"))
    if tools:
        params["tools"] = tools
    record.model_parameters = params

    if call_type == "responses":
        record.messages = _responses_input(request)
    elif call_type == "chat.completions":
        record.messages = request.get("messages")
    elif call_type == "completions":
        record.messages = request.get("prompt")
    elif call_type == "embeddings":
        record.messages = request.get("input")
    else:
        for key in ("messages", "prompt", "input"):
            if key in request:
                record.messages = request[key]
                break


def _tool_names(tools: Any) -> list[str]:
    names: list[str] = []
    for tool in _list(tools):
        if not isinstance(tool, dict):
            continue
        name = _str(_dict(tool.get("function")).get("name")) or _str(tool.get("name"))
        if name is None:
            name = _str(tool.get("type"))  # built-in tools: web_search, file_search, ...
        if name:
            names.append(name)
    return names


def _responses_input(request: dict[str, Any]) -> Any:
    """The Responses API's ``input``, with ``instructions`` as a leading system message."""
    items = request.get("input")
    instructions = _str(request.get("instructions"))
    if not instructions:
        return items
    system = {"role": "system", "content": instructions}
    if isinstance(items, list):
        return [system, *items]
    if items is None:
        return [system]
    return [system, {"role": "user", "content": items}]


# -- chat completions and legacy completions --------------------------------------------------


class _ToolCalls:
    """Tool calls keyed by (choice index, tool index), merged from deltas or whole messages."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[tuple[int, int], dict[str, Any]] = {}

    def merge(self, choice: int, index: int, call: dict[str, Any]) -> None:
        slot = self._slots.get((choice, index))
        if slot is None:
            slot = {"id": None, "type": None, "name": "", "arguments": []}
            self._slots[(choice, index)] = slot
        call_id = _str(call.get("id")) or _str(call.get("call_id"))
        if call_id and not slot["id"]:
            slot["id"] = call_id
        kind = _str(call.get("type"))
        if kind and not slot["type"]:
            slot["type"] = kind
        function = _dict(call.get("function")) or call
        name = _str(function.get("name"))
        # OpenAI sends the name once; some servers repeat it in every delta, a few split it.
        if name and name != slot["name"]:
            slot["name"] += name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            slot["arguments"].append(arguments)
        elif isinstance(arguments, dict):  # a few providers send parsed arguments
            slot["arguments"].append(json.dumps(arguments))

    def count(self, choice: int) -> int:
        return sum(1 for c, _ in self._slots if c == choice)

    def result(self) -> list[dict[str, Any]]:
        return [
            {
                "id": slot["id"],
                "type": slot["type"] or "function",
                "function": {"name": slot["name"] or None, "arguments": "".join(slot["arguments"])},
            }
            for _, slot in sorted(self._slots.items())
        ]


def _apply_top(record: LogRecord, payload: dict[str, Any]) -> None:
    if record.response_id is None:
        record.response_id = _str(payload.get("id"))
    if record.response_model is None:
        record.response_model = _str(payload.get("model"))


def _choices(payload: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each object in ``choices`` with its ``index`` (its position when it has none)."""
    for position, choice in enumerate(_list(payload.get("choices"))):
        if isinstance(choice, dict):
            index = _int(choice.get("index"))
            yield (position if index is None else index), choice


def _chat_json(record: LogRecord, response: dict[str, Any]) -> None:
    _apply_top(record, response)
    usage = _usage(response.get("usage"))
    if usage is not None:
        record.usage = usage
    parts: dict[int, list[str]] = {}
    tools = _ToolCalls()
    for index, choice in _choices(response):
        message = _dict(choice.get("message"))
        text = _content_text(message.get("content"))
        if text is None:
            text = _str(message.get("refusal")) or _str(choice.get("text"))
        if text:
            parts.setdefault(index, []).append(text)
        for tool_index, call in enumerate(_list(message.get("tool_calls"))):
            if isinstance(call, dict):
                tools.merge(index, tool_index, call)
        function_call = _dict(message.get("function_call"))
        if function_call:
            tools.merge(index, tools.count(index), {"type": "function", "function": function_call})
        reason = _str(choice.get("finish_reason"))
        if reason and (record.finish_reason is None or index == 0):
            record.finish_reason = reason
    record.output = _join_outputs(parts)
    record.tool_calls = tools.result()


def _chat_stream(record: LogRecord, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Chat (and legacy completions) chunks: ``choices[].delta`` or ``choices[].text``."""
    parts: dict[int, list[str]] = {}
    tools = _ToolCalls()
    reasons: dict[int, str] = {}
    # A stream has one chunk per token or so: this loop is the hot part of decoding a stream,
    # hence the inlined type checks instead of the _dict/_str/_choices helpers.
    no_delta: dict[str, Any] = {}  # read only
    for _, chunk in events:
        if "error" in chunk and record.error is None:
            record.error = _error_text(chunk["error"])
        if record.response_id is None or record.response_model is None:
            _apply_top(record, chunk)
        raw_usage = chunk.get("usage")
        if raw_usage:
            usage = _usage(raw_usage)
            if usage is not None:
                record.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            continue
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                index = position
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = no_delta
            text = delta.get("content")
            if not isinstance(text, str):
                text = _str(delta.get("refusal")) or _str(choice.get("text"))
            if text:
                part = parts.get(index)
                if part is None:
                    parts[index] = [text]
                else:
                    part.append(text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if not isinstance(call, dict):
                    continue
                tool_index = _int(call.get("index"))
                if tool_index is None:  # servers that omit the index: a new id starts a call
                    existing = tools.count(index)
                    tool_index = existing if call.get("id") or not existing else existing - 1
                tools.merge(index, tool_index, call)
            function_call = delta.get("function_call")
            if function_call and isinstance(function_call, dict):
                tools.merge(index, 0, {"type": "function", "function": function_call})
            reason = choice.get("finish_reason")
            if reason and isinstance(reason, str):
                reasons[index] = reason
    record.output = _join_outputs(parts)
    record.tool_calls = tools.result()
    if reasons:
        record.finish_reason = reasons.get(0, reasons[min(reasons)])


# -- embeddings -------------------------------------------------------------------------------


def _embeddings_json(record: LogRecord, response: dict[str, Any]) -> None:
    record.response_model = _str(response.get("model"))
    usage = _usage(response.get("usage"))
    if usage is not None:
        record.usage = usage
    data = _list(response.get("data"))
    if "data" in response:
        vector = _dict(data[0]).get("embedding") if data else None
        if isinstance(vector, list):
            record.output = f"<{len(data)} embeddings of {len(vector)} dimensions>"
        else:
            record.output = f"<{len(data)} embeddings>"


# -- Responses API ----------------------------------------------------------------------------


def _responses_json(record: LogRecord, response: dict[str, Any], text: str | None = None) -> None:
    """A Responses API ``response`` object; ``text`` (joined stream deltas) wins when given."""
    _apply_top(record, response)
    usage = _usage(response.get("usage"))
    if usage is not None:
        record.usage = usage
    texts: list[str] = []
    tools = _ToolCalls()
    for item in _list(response.get("output")):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in _list(item.get("content")):
                part = _dict(part)
                if part.get("type") == "output_text":
                    texts.append(_str(part.get("text")) or "")
                elif part.get("type") == "refusal":
                    texts.append(_str(part.get("refusal")) or "")
        elif kind == "function_call":
            call = {
                "id": _str(item.get("call_id")) or _str(item.get("id")),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            tools.merge(0, tools.count(0), call)
    if text:
        record.output = text
    elif any(texts):
        record.output = "".join(texts)
    if tools.count(0):
        record.tool_calls = tools.result()
    status = _str(response.get("status"))
    reason = _str(_dict(response.get("incomplete_details")).get("reason"))
    if reason or status:
        record.finish_reason = reason or status
    if record.error is None:
        record.error = _error_text(response.get("error"))


def _responses_stream(record: LogRecord, events: list[tuple[str, dict[str, Any]]]) -> None:
    texts: list[str] = []
    calls: dict[str, dict[str, Any]] = {}  # function-call items by item id, in arrival order
    final: dict[str, Any] | None = None
    for event_name, payload in events:
        kind = _str(payload.get("type")) or event_name
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            delta = _str(payload.get("delta"))
            if delta:
                texts.append(delta)
        elif kind in ("response.created", "response.in_progress"):
            _apply_top(record, _dict(payload.get("response")))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            final = _dict(payload.get("response"))
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = _dict(payload.get("item"))
            if item.get("type") == "function_call":
                key = _str(item.get("id")) or _str(item.get("call_id")) or str(len(calls))
                call = calls.setdefault(key, {"call_id": None, "name": None, "arguments": ""})
                call["call_id"] = _str(item.get("call_id")) or call["call_id"]
                call["name"] = _str(item.get("name")) or call["name"]
                if kind == "response.output_item.done" and isinstance(item.get("arguments"), str):
                    call["arguments"] = item["arguments"]
        elif kind == "response.function_call_arguments.delta":
            key = _str(payload.get("item_id")) or ""
            call = calls.setdefault(key, {"call_id": None, "name": None, "arguments": ""})
            call["arguments"] += _str(payload.get("delta")) or ""
        elif kind == "response.function_call_arguments.done":
            key = _str(payload.get("item_id")) or ""
            call = calls.setdefault(key, {"call_id": None, "name": None, "arguments": ""})
            if isinstance(payload.get("arguments"), str):
                call["arguments"] = payload["arguments"]
        elif kind == "error" and record.error is None:
            error = payload.get("error")
            if error is None:  # the documented shape: {"type": "error", "code", "message"}
                error = {"message": payload.get("message"), "code": payload.get("code")}
            record.error = _error_text(error)
    joined = "".join(texts) or None
    if final is not None:
        _responses_json(record, final, joined)
    else:
        record.output = joined
    if not record.tool_calls and calls:
        record.tool_calls = [
            {
                "id": call["call_id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in calls.values()
        ]


# -- redaction --------------------------------------------------------------------------------


def _redact(record: LogRecord) -> None:
    """``metadata_only``: keep what describes the call, drop what was said."""
    record.redacted = True
    if record.messages is not None:
        record.messages = REDACTED
    if record.output is not None:
        record.output = REDACTED
    if record.raw_request is not None:
        record.raw_request = REDACTED
    if record.raw_response is not None:
        record.raw_response = REDACTED
    for call in record.tool_calls:
        function = call.get("function")
        if isinstance(function, dict) and function.get("arguments") is not None:
            function["arguments"] = REDACTED
