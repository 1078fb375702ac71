"""decode_exchange: every API shape, streams, errors, odd bodies, redaction, and never raising."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from team_logging_middleware._decode import RAW_LIMIT, call_type_for_path, decode_exchange
from team_logging_middleware._types import NO_LOGGING, Caller, Destination, Plan
from team_logging_middleware.records import OUTCOMES, REDACTED, Exchange, LogRecord
from team_logging_middleware.settings import CallbackSpec

T0 = 1_700_000_000.0  # epoch seconds at request arrival
P0 = 500.0  # perf_counter() at the same instant


def plan(message_logging: str = "full", team_id: str | None = "team-a") -> Plan:
    spec = CallbackSpec(callback_name="jsonl")
    dest = Destination(spec=spec, source="team", identity=spec.identity())
    return Plan(
        team_id=team_id,
        logging_enabled=True,
        success=(dest,),
        failure=(dest,),
        message_logging=message_logging,  # type: ignore[arg-type]
    )


def exchange(
    path: str = "/v1/chat/completions",
    request: Any = None,
    response: Any = None,
    *,
    chunks: list[bytes] | None = None,
    content_type: str = "application/json",
    status: int | None = 200,
    outcome: str = "ok",
    caller: Caller | None = None,
    message_logging: str = "full",
    **kwargs: Any,
) -> Exchange:
    if isinstance(request, (dict, list)):
        request = json.dumps(request).encode()
    if chunks is None:
        if isinstance(response, (dict, list)):
            response = json.dumps(response).encode()
        chunks = [response] if response else []
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "method": "POST",
        "path": path,
        "start_time": T0,
        "start_perf": P0,
        "plan": plan(message_logging),
        "caller": caller
        if caller is not None
        else Caller(team_id="team-a", key_id="k-hash", key_alias="ci-key"),
        "request_body": request or b"",
        "request_content_type": "application/json",
        "status": status,
        "response_content_type": content_type,
        "response_chunks": chunks,
        "first_byte_perf": P0 + 0.25,
        "end_perf": P0 + 1.5,
        "outcome": outcome,
    }
    fields.update(kwargs)
    return Exchange(**fields)


def sse(*payloads: Any, done: bool = True, event_names: bool = False) -> list[bytes]:
    """One chunk per event, the way gateways flush them."""
    out: list[bytes] = []
    for payload in payloads:
        head = f"event: {payload['type']}\n" if event_names else ""
        out.append(f"{head}data: {json.dumps(payload)}\n\n".encode())
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


CHAT_REQUEST = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ],
    "temperature": 0.2,
    "top_p": 0.9,
    "max_tokens": 256,
    "max_completion_tokens": 300,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.0,
    "stop": ["\n\n"],
    "seed": 42,
    "n": 1,
    "user": "end-user-7",
    "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
    ],
    "response_format": {"type": "json_object"},
}

CHAT_RESPONSE = {
    "id": "chatcmpl-AbC123",
    "object": "chat.completion",
    "created": 1_700_000_001,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Sunny, 21°C.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43},
    "system_fingerprint": "fp_1",
}


# -- chat completions -------------------------------------------------------------------------


def test_chat_completion_json() -> None:
    record = decode_exchange(exchange(request=CHAT_REQUEST, response=CHAT_RESPONSE))
    assert record.call_type == "chat.completions"
    assert record.team_id == "team-a" and record.key_alias == "ci-key"
    assert record.user_id == "end-user-7"  # from the body: the caller named no user
    assert record.metadata == {"key_id": "k-hash"}
    assert record.model == "gpt-4o" and record.response_model == "gpt-4o-2024-08-06"
    assert record.response_id == "chatcmpl-AbC123"
    assert record.messages == CHAT_REQUEST["messages"]
    assert record.output == "Sunny, 21°C."
    assert record.tool_calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert record.finish_reason == "tool_calls"
    assert record.usage.to_dict() == {"input_tokens": 31, "output_tokens": 12, "total_tokens": 43}
    assert record.model_parameters == {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 256,
        "max_completion_tokens": 300,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.0,
        "stop": ["\n\n"],
        "seed": 42,
        "n": 1,
        "response_format": "json_object",
        "tools": ["get_weather", "get_time"],
    }
    assert record.stream is False
    assert record.outcome == "ok" and record.success and record.status_code == 200
    assert record.start_time == T0
    assert record.end_time == T0 + 1.5
    assert record.completion_start_time == T0 + 0.25
    assert record.latency_ms == 1500.0 and record.time_to_first_token_ms == 250.0
    assert record.decode_note is None and record.raw_request is None and not record.redacted
    json.dumps(record.to_dict())


def test_caller_user_wins_over_body_user_and_caller_metadata_is_kept() -> None:
    caller = Caller(team_id="t9", key_alias="alias", user_id="u-caller", metadata=(("env", "ci"),))
    record = decode_exchange(exchange(request=CHAT_REQUEST, response=CHAT_RESPONSE, caller=caller))
    assert record.user_id == "u-caller" and record.team_id == "t9"
    assert record.metadata == {"env": "ci"}


def test_team_id_falls_back_to_the_plan() -> None:
    ex = exchange(request=CHAT_REQUEST, response=CHAT_RESPONSE)
    ex.caller = None
    record = decode_exchange(ex)
    assert record.team_id == "team-a" and record.key_alias is None


def test_chat_stream_with_content_tool_calls_and_usage() -> None:
    base = {"id": "chatcmpl-S1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    stream = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz":'},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]}),
        chunk({}, "tool_calls"),
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
        },
    )
    # Split the byte stream at awkward places: inside a JSON string and between CR/LF.
    joined = b"".join(stream)
    pieces = [joined[:7], joined[7:301], joined[301:302], joined[302:]]
    record = decode_exchange(
        exchange(
            request={**CHAT_REQUEST, "stream": True, "stream_options": {"include_usage": True}},
            chunks=pieces,
            content_type="text/event-stream; charset=utf-8",
        )
    )
    assert record.stream is True
    assert record.output == "Let me check."
    assert record.tool_calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
        },
    ]
    assert record.finish_reason == "tool_calls"
    assert record.usage.to_dict() == {"input_tokens": 50, "output_tokens": 20, "total_tokens": 70}
    assert record.response_id == "chatcmpl-S1" and record.response_model == "gpt-4o-mini"
    assert record.decode_note is None


def test_chat_stream_with_several_choices_and_legacy_function_call() -> None:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

    stream = sse(
        chunk(0, {"content": "A"}),
        chunk(1, {"content": "B"}),
        chunk(0, {"content": "a"}),
        chunk(1, {"function_call": {"name": "lookup", "arguments": '{"q":'}}),
        chunk(1, {"function_call": {"arguments": '"x"}'}}),
        chunk(1, {}, "function_call"),
        chunk(0, {}, "stop"),
    )
    record = decode_exchange(exchange(request={"model": "m", "n": 2}, chunks=stream))
    assert record.output == "Aa\n\nB"
    assert record.tool_calls == [
        {"id": None, "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}
    ]
    assert record.finish_reason == "stop"  # choice 0's


def test_stream_without_event_stream_content_type_is_still_a_stream() -> None:
    stream = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
    record = decode_exchange(exchange(request={"model": "m"}, chunks=stream, content_type=""))
    assert record.stream and record.output == "hi"


def test_plain_data_streams_decode_as_the_general_parser_decodes_them() -> None:
    # The same events twice: once in the plain shape the fast path takes, once with a comment
    # that sends the stream through the general parser. Odd values must come out the same.
    events = [
        b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"Gr\xfc"}}]}',
        b"data: not json",
        b"data: [1, 2]",
        b'data:{"id":"c","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}',
        b"data:  [DONE] ",
    ]
    plain = [e + b"\n\n" for e in events]
    general = [b": keep-alive\n\n", *plain]
    fast = decode_exchange(exchange(request={"model": "m"}, chunks=plain))
    slow = decode_exchange(exchange(request={"model": "m"}, chunks=general))
    assert fast.output == slow.output == "Gr\ufffd!"
    assert fast.decode_note == slow.decode_note == "2 response events were not JSON"
    assert fast.finish_reason == slow.finish_reason == "stop"
    assert fast.response_model == slow.response_model == "m"


def test_chat_stream_tolerates_odd_chunk_shapes() -> None:
    stream = sse(
        {"id": "c1", "model": "m1", "choices": "oops"},
        {"id": "c2", "model": "m2", "choices": [7, {"index": True, "delta": None, "text": "a"}]},
        {"choices": [{"index": 1, "delta": {"content": "b"}, "finish_reason": ""}], "usage": {}},
        {
            "choices": [
                {"index": 0, "delta": {"content": 5, "refusal": "no"}, "finish_reason": "length"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
    )
    record = decode_exchange(exchange(request={"model": "m"}, chunks=stream))
    assert record.response_id == "c1" and record.response_model == "m1"
    assert record.output == "no\n\nab"  # choice 0 (a refusal), then choice 1 by its position
    assert record.finish_reason == "length"
    assert record.usage is not None
    assert (record.usage.input_tokens, record.usage.output_tokens) == (3, 2)
    assert record.usage.total_tokens == 5


def test_stream_error_event_and_http_error_json() -> None:
    stream = sse(
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "par"}}]},
        {"error": {"message": "upstream timed out", "type": "timeout"}},
        done=False,
    )
    record = decode_exchange(exchange(request={"model": "m", "stream": True}, chunks=stream))
    assert record.output == "par" and record.error == "timeout: upstream timed out"

    body = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    record = decode_exchange(
        exchange(request=CHAT_REQUEST, response=body, status=400, outcome="http_error")
    )
    assert record.outcome == "http_error" and not record.success
    assert (
        record.error == "invalid_request_error: This model's maximum context length is 8192 tokens."
    )
    assert record.status_code == 400
    assert record.model == "gpt-4o"


def test_framework_error_detail() -> None:
    record = decode_exchange(
        exchange(
            request=CHAT_REQUEST,
            response={"detail": "Not authenticated"},
            status=401,
            outcome="http_error",
        )
    )
    assert record.error == "Not authenticated"


def test_app_exception_keeps_the_captured_error() -> None:
    record = decode_exchange(
        exchange(
            request=CHAT_REQUEST,
            response=None,
            status=None,
            outcome="exception",
            error="RuntimeError: backend unreachable",
            first_byte_perf=None,
        )
    )
    assert record.outcome == "exception" and record.error == "RuntimeError: backend unreachable"
    assert record.status_code is None and record.completion_start_time is None
    assert record.output is None and record.decode_note is None


# -- legacy completions and embeddings --------------------------------------------------------


def test_legacy_completions_json_and_stream() -> None:
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7}
    response = {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
        "object": "text_completion",
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "\n\nThis is a test", "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    record = decode_exchange(exchange("/v1/completions", request, response))
    assert record.call_type == "completions"
    assert record.messages == "Say this is a test"
    assert record.output == "\n\nThis is a test"
    assert record.finish_reason == "length"
    assert record.usage.total_tokens == 12
    assert record.model_parameters == {"max_tokens": 7}

    stream = sse(
        {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "This", "index": 0}]},
        {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": " is", "index": 0}]},
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [{"text": "", "index": 0, "finish_reason": "stop"}],
        },
    )
    record = decode_exchange(exchange("/completions", {**request, "stream": True}, chunks=stream))
    assert record.output == "This is" and record.finish_reason == "stop" and record.stream


def test_embeddings_record_the_input_and_a_note_not_the_vectors() -> None:
    request = {"model": "text-embedding-3-small", "input": ["hello", "world"], "dimensions": 3}
    response = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]},
            {"object": "embedding", "index": 1, "embedding": [0.4, 0.5, -0.6]},
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    record = decode_exchange(exchange("/v1/embeddings", request, response))
    assert record.call_type == "embeddings"
    assert record.messages == ["hello", "world"]
    assert record.output == "<2 embeddings of 3 dimensions>"
    assert "0.1" not in json.dumps(record.to_dict())
    assert record.usage.to_dict() == {"input_tokens": 2, "output_tokens": None, "total_tokens": 2}
    assert record.model_parameters == {"dimensions": 3}
    assert record.response_model == "text-embedding-3-small"

    b64 = {**response, "data": [{"object": "embedding", "index": 0, "embedding": "AAAA"}]}
    record = decode_exchange(exchange("/embeddings", {**request, "encoding_format": "base64"}, b64))
    assert record.output == "<1 embeddings>"
    assert record.model_parameters["encoding_format"] == "base64"


# -- Responses API ----------------------------------------------------------------------------

RESPONSES_REQUEST = {
    "model": "gpt-4.1",
    "instructions": "Answer in French.",
    "input": [{"role": "user", "content": "Weather in Paris?"}],
    "max_output_tokens": 500,
    "temperature": 0.7,
    "reasoning": {"effort": "low"},
    "tools": [
        {"type": "function", "name": "get_weather", "parameters": {}},
        {"type": "web_search"},
    ],
}

RESPONSES_RESPONSE = {
    "id": "resp_67ccd2bed1ec8190",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "model": "gpt-4.1-2025-04-14",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "Il fait ", "annotations": []},
                {"type": "output_text", "text": "beau.", "annotations": []},
            ],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_xyz",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
            "status": "completed",
        },
    ],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
}


def test_responses_json() -> None:
    record = decode_exchange(exchange("/v1/responses", RESPONSES_REQUEST, RESPONSES_RESPONSE))
    assert record.call_type == "responses"
    assert record.model == "gpt-4.1" and record.response_model == "gpt-4.1-2025-04-14"
    assert record.response_id == "resp_67ccd2bed1ec8190"
    assert record.messages == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    assert record.output == "Il fait beau."
    assert record.tool_calls == [
        {
            "id": "call_xyz",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert record.usage.to_dict() == {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123}
    assert record.finish_reason == "completed"
    assert record.model_parameters == {
        "max_output_tokens": 500,
        "temperature": 0.7,
        "reasoning_effort": "low",
        "tools": ["get_weather", "web_search"],
    }


def test_responses_string_input_without_instructions() -> None:
    record = decode_exchange(
        exchange("/responses", {"model": "gpt-4.1", "input": "Tell me a joke"}, RESPONSES_RESPONSE)
    )
    assert record.messages == "Tell me a joke"
    record = decode_exchange(
        exchange(
            "/responses",
            {"model": "gpt-4.1", "input": "Tell me a joke", "instructions": "Be brief."},
            RESPONSES_RESPONSE,
        )
    )
    assert record.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a joke"},
    ]


def test_responses_event_stream() -> None:
    created = {"id": "resp_S", "object": "response", "status": "in_progress", "model": "gpt-4.1"}
    completed = {
        **created,
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello world"}],
            }
        ],
        "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
    }
    events = sse(
        {"type": "response.created", "sequence_number": 0, "response": created},
        {"type": "response.in_progress", "sequence_number": 1, "response": created},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"type": "message", "id": "msg_1", "role": "assistant", "content": []},
        },
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hello"},
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": " world"},
        {"type": "response.output_text.done", "item_id": "msg_1", "text": "Hello world"},
        {"type": "response.completed", "sequence_number": 9, "response": completed},
        done=False,
        event_names=True,
    )
    record = decode_exchange(
        exchange(
            "/v1/responses", {"model": "gpt-4.1", "input": "hi", "stream": True}, chunks=events
        )
    )
    assert record.stream and record.output == "Hello world"
    assert record.usage.total_tokens == 12
    assert record.response_id == "resp_S" and record.response_model == "gpt-4.1"
    assert record.finish_reason == "completed"
    assert record.decode_note is None


def test_responses_stream_with_function_call_and_no_completed_event() -> None:
    events = sse(
        {"type": "response.created", "response": {"id": "resp_F", "model": "gpt-4.1"}},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {
                "type": "function_call",
                "id": "fc_9",
                "call_id": "call_9",
                "name": "get_weather",
                "arguments": "",
            },
        },
        {"type": "response.function_call_arguments.delta", "item_id": "fc_9", "delta": '{"city":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_9", "delta": '"Oslo"}'},
        done=False,
    )
    record = decode_exchange(
        exchange(
            "/v1/responses",
            {"model": "gpt-4.1", "stream": True},
            chunks=events,
            outcome="client_disconnected",
        )
    )
    assert record.tool_calls == [
        {
            "id": "call_9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert record.output is None and record.outcome == "client_disconnected"


def test_responses_failed_and_incomplete_and_error_events() -> None:
    failed = {
        "id": "resp_X",
        "status": "failed",
        "error": {"code": "server_error", "message": "The model failed."},
        "output": [],
    }
    record = decode_exchange(
        exchange(
            "/v1/responses",
            {"model": "m"},
            chunks=sse({"type": "response.failed", "response": failed}),
        )
    )
    assert record.error == "server_error: The model failed." and record.finish_reason == "failed"

    incomplete = {
        "id": "resp_I",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [],
    }
    record = decode_exchange(
        exchange(
            "/v1/responses",
            {"model": "m"},
            chunks=sse(
                {"type": "response.output_text.delta", "delta": "Partial"},
                {"type": "response.incomplete", "response": incomplete},
            ),
        )
    )
    assert record.finish_reason == "max_output_tokens" and record.output == "Partial"

    record = decode_exchange(
        exchange(
            "/v1/responses",
            {"model": "m"},
            chunks=sse({"type": "error", "code": "rate_limit_exceeded", "message": "Slow down"}),
        )
    )
    assert record.error == "rate_limit_exceeded: Slow down"


# -- routes, inference and odd bodies ---------------------------------------------------------


def test_call_type_for_path() -> None:
    assert call_type_for_path("/v1/chat/completions") == "chat.completions"
    assert call_type_for_path("/openai/deployments/gpt/chat/completions/") == "chat.completions"
    assert call_type_for_path("/v1/completions") == "completions"
    assert call_type_for_path("/embeddings") == "embeddings"
    assert call_type_for_path("/v1/responses") == "responses"
    assert call_type_for_path("/v1/models") == "unknown"


def test_unknown_route_is_inferred_from_the_bodies() -> None:
    assert decode_exchange(exchange("/custom", CHAT_REQUEST, CHAT_RESPONSE)).call_type == (
        "chat.completions"
    )
    assert decode_exchange(exchange("/custom", {"model": "m"}, RESPONSES_RESPONSE)).call_type == (
        "responses"
    )
    embeddings = {"object": "list", "data": [{"object": "embedding", "embedding": [1.0]}]}
    record = decode_exchange(exchange("/custom", {"input": "x"}, embeddings))
    assert record.call_type == "embeddings" and record.output == "<1 embeddings of 1 dimensions>"
    assert decode_exchange(exchange("/custom", {"prompt": "x"}, None)).call_type == "completions"
    record = decode_exchange(exchange("/custom", {"input": "x"}, {"ok": True}))
    assert record.call_type == "unknown" and record.messages == "x"


def test_malformed_and_non_json_bodies_keep_raw_text_and_a_note() -> None:
    html = b"<html><body>502 Bad Gateway</body></html>"
    record = decode_exchange(
        exchange(
            request=b"{not json",
            response=html,
            content_type="text/html",
            status=502,
            outcome="http_error",
        )
    )
    assert record.raw_request == "{not json"
    assert record.raw_response == html.decode()
    assert record.decode_note == "request body is not JSON; response body is not JSON"
    record = decode_exchange(exchange(request=b"[1, 2]", response=b'"just a string"'))
    assert record.decode_note == (
        "request body is JSON but not an object; response body is JSON but not an object"
    )


def test_non_utf8_bodies_are_decoded_with_replacement() -> None:
    request = b'{"model":"gpt-4o","messages":[{"role":"user","content":"caf\xe9"}]}'
    record = decode_exchange(exchange(request=request, response=CHAT_RESPONSE))
    assert record.model == "gpt-4o"
    assert record.messages == [{"role": "user", "content": "caf\ufffd"}]
    assert (
        record.decode_note == "request body not valid UTF-8 (decoded with replacement characters)"
    )
    binary = bytes(range(256))
    record = decode_exchange(
        exchange(request=binary, response=binary, content_type="application/octet-stream")
    )
    assert record.raw_request is not None and "\ufffd" in record.raw_request
    assert record.decode_note is not None


def test_raw_bodies_are_truncated() -> None:
    big = b"x" * (RAW_LIMIT * 3)
    record = decode_exchange(exchange(request=big, response=big))
    assert record.raw_request is not None and len(record.raw_request) == RAW_LIMIT + 1
    assert record.raw_request.endswith("…")


def test_truncated_capture_still_yields_the_model() -> None:
    request = json.dumps({**CHAT_REQUEST, "stream": True}).encode()[:120]
    record = decode_exchange(
        exchange(request=request, response=CHAT_RESPONSE, request_truncated=True)
    )
    assert record.request_truncated
    assert record.model == "gpt-4o" and record.messages is None
    assert record.decode_note == "request body truncated at 120 bytes"
    head = json.dumps(CHAT_RESPONSE).encode()[:130]
    record = decode_exchange(exchange(request=CHAT_REQUEST, response=head, response_truncated=True))
    assert record.response_truncated and record.response_model == "gpt-4o-2024-08-06"
    assert record.response_id == "chatcmpl-AbC123"
    assert record.decode_note == "response body truncated at 130 bytes"


def test_truncated_stream_keeps_the_complete_events() -> None:
    stream = b"".join(
        sse(
            *(
                {"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                for i in range(5)
            )
        )
    )
    cut = stream[: stream.index(b"w3") + 1]
    record = decode_exchange(
        exchange(request={"model": "m", "stream": True}, chunks=[cut], response_truncated=True)
    )
    assert record.output == "w0 w1 w2 "
    assert record.decode_note is not None and "truncated" in record.decode_note


def test_empty_bodies() -> None:
    record = decode_exchange(
        exchange(request=b"", response=b"", method="HEAD", first_byte_perf=None)
    )
    assert record.method == "HEAD" and record.decode_note is None
    assert record.model is None and record.output is None and record.messages is None


def test_an_event_stream_without_json_events() -> None:
    record = decode_exchange(
        exchange(
            request={"model": "m"}, chunks=[b"data: hello\n\n"], content_type="text/event-stream"
        )
    )
    assert record.raw_response == "data: hello\n\n"
    assert record.decode_note == "response event stream has no JSON events"


# -- redaction --------------------------------------------------------------------------------


def test_metadata_only_redacts_content_and_keeps_metadata() -> None:
    record = decode_exchange(
        exchange(request=CHAT_REQUEST, response=CHAT_RESPONSE, message_logging="metadata_only")
    )
    assert record.redacted
    assert record.messages == REDACTED and record.output == REDACTED
    assert record.tool_calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": REDACTED},
        }
    ]
    assert record.model == "gpt-4o" and record.usage.total_tokens == 43
    assert record.finish_reason == "tool_calls" and record.response_id == "chatcmpl-AbC123"
    assert record.model_parameters["tools"] == ["get_weather", "get_time"]
    text = json.dumps(record.to_dict())
    assert "Paris" not in text and "Sunny" not in text and "terse" not in text


def test_metadata_only_redacts_raw_bodies_and_streams() -> None:
    record = decode_exchange(
        exchange(
            request=b"secret prompt text",
            response=b"secret answer",
            message_logging="metadata_only",
        )
    )
    assert record.raw_request == REDACTED and record.raw_response == REDACTED
    stream = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "private"}}]})
    record = decode_exchange(
        exchange(
            request={"model": "m", "messages": [{"role": "user", "content": "private"}]},
            chunks=stream,
            message_logging="metadata_only",
        )
    )
    assert "private" not in json.dumps(record.to_dict())
    assert record.model == "m"


def test_metadata_only_applies_to_the_fallback_record_too() -> None:
    ex = exchange(request=CHAT_REQUEST, message_logging="metadata_only")
    ex.response_chunks = [None]  # type: ignore[list-item]  # an exchange no decoder expects
    record = decode_exchange(ex)
    assert record.decode_note == "decoder error: TypeError"
    assert record.redacted and record.team_id == "team-a"


# -- never raises -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
api_keys = st.sampled_from(
    [
        "model",
        "messages",
        "choices",
        "delta",
        "content",
        "tool_calls",
        "usage",
        "output",
        "input",
        "prompt",
        "stream",
        "type",
        "response",
        "error",
        "data",
        "function",
        "index",
        "id",
        "text",
    ]
)
api_shaped = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(api_keys, inner, max_size=6),
    max_leaves=25,
)


def bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        api_shaped.map(lambda v: json.dumps(v).encode()),
        st.lists(api_shaped, max_size=5).map(
            lambda events: b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
        ),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(
        ["/v1/chat/completions", "/completions", "/v1/embeddings", "/v1/responses", "/x", ""]
    ),
    request=bodies(),
    response=bodies(),
    cut=st.integers(min_value=0, max_value=400),
    content_type=st.sampled_from(["", "application/json", "text/event-stream", "text/html"]),
    outcome=st.sampled_from(OUTCOMES),
    status=st.one_of(st.none(), st.sampled_from([200, 400, 429, 500])),
    message_logging=st.sampled_from(["full", "metadata_only"]),
    truncated=st.booleans(),
)
def test_decode_never_raises_and_the_record_serialises(
    path: str,
    request: bytes,
    response: bytes,
    cut: int,
    content_type: str,
    outcome: str,
    status: int | None,
    message_logging: str,
    truncated: bool,
) -> None:
    ex = exchange(
        path,
        request,
        chunks=[response[:cut], response[cut:]],
        content_type=content_type,
        outcome=outcome,
        status=status,
        message_logging=message_logging,
        request_truncated=truncated,
        response_truncated=truncated,
    )
    record = decode_exchange(ex)
    assert isinstance(record, LogRecord)
    assert record.outcome == outcome and record.status_code == status
    assert record.decode_note is None or not record.decode_note.startswith("decoder error")
    json.dumps(record.to_dict())
    if message_logging == "metadata_only":
        assert record.redacted
        for value in (record.messages, record.output, record.raw_request, record.raw_response):
            assert value is None or value == REDACTED


def test_no_logging_plan_exchange_decodes() -> None:
    ex = exchange(request=CHAT_REQUEST, response=CHAT_RESPONSE, plan=NO_LOGGING, caller=None)
    ex.caller = None
    record = decode_exchange(ex)
    assert record.team_id is None and record.output == "Sunny, 21°C."
