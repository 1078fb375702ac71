"""Incremental SSE decoding: spec rules, OpenAI-style streams, and arbitrary chunk boundaries."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from team_logging_middleware._sse import (
    DONE,
    SSEDecoder,
    SSEEvent,
    data_only_values,
    is_done,
    looks_like_sse,
    parse_sse,
)

# A realistic OpenAI chat stream: role chunk, content deltas (one with a multi-byte character),
# a keep-alive comment, the usage chunk and the [DONE] sentinel.
CHAT_STREAM = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"content":"Gr\xc3\xbc\xc3\x9fe"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)

RESPONSES_STREAM = (
    b"event: response.created\r\n"
    b'data: {"type":"response.created","response":{"id":"resp_1","model":"gpt-4.1"}}\r\n\r\n'
    b"event: response.output_text.delta\r\n"
    b'data: {"type":"response.output_text.delta","delta":"Hi"}\r\n\r\n'
    b"event: response.completed\r\n"
    b'data: {"type":"response.completed","response":{"id":"resp_1","status":"completed"}}\r\n'
    b"\r\n"
)


def test_openai_chat_stream_events_in_order() -> None:
    events = parse_sse([CHAT_STREAM])
    assert len(events) == 5  # the comment is not an event
    payloads = [json.loads(e.data) for e in events[:-1]]
    assert payloads[1]["choices"][0]["delta"]["content"] == "Grüße"
    assert payloads[3]["usage"]["total_tokens"] == 11
    assert all(e.event == "message" for e in events)
    assert is_done(events[-1]) and events[-1].data == DONE
    assert not any(is_done(e) for e in events[:-1])


def test_event_names_and_crlf_lines() -> None:
    events = parse_sse([RESPONSES_STREAM])
    assert [e.event for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.completed",
    ]
    assert json.loads(events[1].data) == {"type": "response.output_text.delta", "delta": "Hi"}


def test_multi_line_data_is_joined_with_newlines() -> None:
    events = parse_sse([b"data: first\ndata:second\ndata:  third\n\n"])
    # exactly one leading space is removed from a value
    assert events == [SSEEvent(data="first\nsecond\n third")]


def test_lone_cr_line_endings() -> None:
    assert parse_sse([b"event: x\rdata: a\r\rdata: b\r\r"]) == [
        SSEEvent(data="a", event="x"),
        SSEEvent(data="b"),
    ]


def test_comments_unknown_fields_and_empty_events_are_ignored() -> None:
    stream = b": comment\nfoo: bar\n\nevent: only-a-type\n\ndata\n\n"
    # "data" with no colon is a data field with an empty value: it dispatches an empty event.
    assert parse_sse([stream]) == [SSEEvent(data="")]


def test_id_persists_and_retry_is_parsed() -> None:
    stream = (
        b"id: 7\nretry: 1500\ndata: a\n\ndata: b\n\nid: 8\x00\ndata: c\n\nretry: soon\ndata: d\n\n"
    )
    events = parse_sse([stream])
    assert [(e.data, e.id, e.retry) for e in events] == [
        ("a", "7", 1500),
        ("b", "7", None),
        ("c", "7", None),  # an id containing NUL is ignored, as the spec says
        ("d", "7", None),  # a non-numeric retry is ignored
    ]


def test_byte_order_mark_at_stream_start_is_ignored() -> None:
    assert parse_sse([b"\xef\xbb", b"\xbfdata: x\n\n"]) == [SSEEvent(data="x")]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == []
    # The CR after "a\r\n" ends the blank line only once the next byte shows it is not CRLF.
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [SSEEvent(data="a"), SSEEvent(data="b")]
    assert decoder.finish() == []


def test_trailing_cr_at_end_of_stream_is_flushed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []
    assert decoder.finish() == [SSEEvent(data="a")]


def test_finish_keeps_a_complete_last_event_but_drops_a_cut_line() -> None:
    assert parse_sse([b"data: whole\n"]) == [SSEEvent(data="whole")]
    assert parse_sse([b'data: whole\n\ndata: {"cut']) == [SSEEvent(data="whole")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse_sse([b"data: \xff\xfe ok\n\n"]) == [SSEEvent(data="\ufffd\ufffd ok")]


def test_every_two_way_split_gives_the_same_events() -> None:
    expected = parse_sse([CHAT_STREAM])
    for cut in range(len(CHAT_STREAM) + 1):
        assert parse_sse([CHAT_STREAM[:cut], CHAT_STREAM[cut:]]) == expected, cut
    expected = parse_sse([RESPONSES_STREAM])
    for cut in range(len(RESPONSES_STREAM) + 1):
        assert parse_sse([RESPONSES_STREAM[:cut], RESPONSES_STREAM[cut:]]) == expected, cut


def test_byte_by_byte_feeding() -> None:
    stream = CHAT_STREAM + RESPONSES_STREAM.replace(b"\r\n", b"\r")
    assert parse_sse([stream[i : i + 1] for i in range(len(stream))]) == parse_sse([stream])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=len(CHAT_STREAM + RESPONSES_STREAM)), max_size=20)
)
def test_arbitrary_chunking_is_invisible(cuts: list[int]) -> None:
    stream = CHAT_STREAM + RESPONSES_STREAM
    points = sorted(set(cuts))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse_sse(chunks) == parse_sse([stream])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_random_bytes_never_raise_and_chunking_is_invisible(data: bytes, size: int) -> None:
    whole = parse_sse([data])
    assert parse_sse([data[i : i + size] for i in range(0, len(data), size)]) == whole
    assert all(isinstance(e.data, str) for e in whole)


def _fast_agrees(data: bytes) -> bool:
    """True when the fast path declines ``data`` or gives exactly the general decoder's events."""
    values = data_only_values(data)
    if values is None:
        return False
    events = parse_sse([data])
    assert [SSEEvent(data=v.decode("utf-8", errors="replace")) for v in values] == [
        SSEEvent(data=e.data) for e in events
    ]
    assert all(e.event == "message" for e in events)
    return True


def test_data_only_fast_path_takes_plain_chat_streams() -> None:
    plain = CHAT_STREAM.replace(b": keep-alive\n\n", b"")
    assert _fast_agrees(plain)
    assert _fast_agrees(plain.replace(b"\n", b"\r\n"))
    assert _fast_agrees(b"\xef\xbb\xbf" + plain + b"\n\n\n")
    assert _fast_agrees(b"data: {}\n\ndata:x\n")  # a complete last line without its blank line
    assert _fast_agrees(b"data: {}\n\ndata: cut")  # a cut last line is dropped
    assert data_only_values(b"data:  two spaces\n\n") == [b" two spaces"]


def test_data_only_fast_path_declines_anything_else() -> None:
    assert data_only_values(CHAT_STREAM) is None  # a comment
    assert data_only_values(RESPONSES_STREAM) is None  # event: fields
    assert data_only_values(b"data: a\ndata: b\n\n") is None  # multi-line data
    assert data_only_values(b"data: a\r\rdata: b\r\r") is None  # CR-only line ends
    assert data_only_values(b"data: a\n\nid: 7\n") is None


_SSE_PIECES = st.sampled_from(
    [
        *(b"data:", b"data: ", b"event: x", b"id: 1", b": c", b"{}", b"[DONE]", b'{"a":1}', b"x"),
        *(b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b"\xef\xbb\xbf", b"\xff", b" "),
    ]
)


@given(st.lists(_SSE_PIECES, max_size=30).map(b"".join))
@settings(max_examples=300, deadline=None)
def test_data_only_fast_path_agrees_with_the_decoder(data: bytes) -> None:
    _fast_agrees(data)


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_data_only_fast_path_agrees_on_random_bytes(data: bytes) -> None:
    _fast_agrees(data)


def test_looks_like_sse() -> None:
    assert looks_like_sse("text/event-stream; charset=utf-8", b"")
    assert looks_like_sse("TEXT/EVENT-STREAM", b"{")
    assert looks_like_sse("application/json", b'\n\ndata: {"a":1}')
    assert looks_like_sse("", b"event: response.created\n")
    assert looks_like_sse("", b": ping\n\n")
    assert not looks_like_sse("application/json", b'{"data": 1}')
    assert not looks_like_sse("", b"")
