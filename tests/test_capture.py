"""ExchangeRecorder: forward first and unchanged, keep a bounded copy, classify the outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from team_logging_middleware._capture import (
    ERROR_TEXT_LIMIT,
    ExchangeRecorder,
    Message,
    describe_error,
)
from team_logging_middleware._types import NO_LOGGING, Caller


class ScriptedPeer:
    """The server side of one request: hands out scripted messages, collects what is sent."""

    def __init__(self, *messages: Message, send_error: BaseException | None = None) -> None:
        self.inbox = list(messages)
        self.sent: list[Message] = []
        self.send_error = send_error
        self.received_calls = 0

    async def receive(self) -> Message:
        self.received_calls += 1
        if self.inbox:
            return self.inbox.pop(0)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(message)


def request(body: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


def start(status: int = 200, content_type: bytes = b"application/json") -> Message:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type)],
    }


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def recorder_for(peer: ScriptedPeer, max_req: int = 1024, max_resp: int = 1024) -> ExchangeRecorder:
    return ExchangeRecorder(peer.receive, peer.send, max_req, max_resp)


def exchange_of(rec: ExchangeRecorder, exc: BaseException | None = None) -> Any:
    return rec.to_exchange(
        request_id="req-1",
        method="POST",
        path="/v1/chat/completions",
        start_time=1000.0,
        start_perf=5.0,
        plan=NO_LOGGING,
        caller=Caller(team_id="t1"),
        request_content_type="application/json",
        exc=exc,
    )


async def test_messages_are_forwarded_as_the_same_objects_in_order() -> None:
    inbound = [request(b'{"a":', more=True), request(b"1}")]
    peer = ScriptedPeer(*inbound)
    rec = recorder_for(peer)
    assert await rec.receive() is inbound[0]
    assert await rec.receive() is inbound[1]
    outbound = [start(), body(b"x", more=True), body(b"y")]
    for message in outbound:
        await rec.send(message)
    assert peer.sent == outbound and all(a is b for a, b in zip(peer.sent, outbound, strict=True))
    # forwarded unchanged: the recorder did not add or rewrite keys
    assert outbound[1] == {"type": "http.response.body", "body": b"x", "more_body": True}
    ex = exchange_of(rec)
    assert ex.request_body == b'{"a":1}'
    assert ex.response_chunks == [b"x", b"y"]
    assert ex.status == 200 and ex.response_content_type == "application/json"
    assert ex.request_content_type == "application/json"
    assert ex.outcome == "ok" and ex.error is None
    assert not ex.request_truncated and not ex.response_truncated
    assert ex.caller == Caller(team_id="t1") and ex.plan is NO_LOGGING


async def test_request_cap_truncates_and_sets_flag() -> None:
    peer = ScriptedPeer(request(b"abcd", more=True), request(b"efgh", more=True), request(b"ij"))
    rec = recorder_for(peer, max_req=6)
    seen = [await rec.receive() for _ in range(3)]
    assert b"".join(m["body"] for m in seen) == b"abcdefghij"  # the app got everything
    ex = exchange_of(rec)
    assert ex.request_body == b"abcdef"
    assert ex.request_truncated


async def test_body_exactly_at_the_cap_is_not_truncated() -> None:
    peer = ScriptedPeer(request(b"abc", more=True), request(b"def"))
    rec = recorder_for(peer, max_req=6, max_resp=3)
    await rec.receive()
    await rec.receive()
    await rec.send(start())
    await rec.send(body(b"xyz", more=True))
    await rec.send(body(b"", more=False))
    ex = exchange_of(rec)
    assert ex.request_body == b"abcdef" and not ex.request_truncated
    assert ex.response_chunks == [b"xyz"] and not ex.response_truncated


async def test_response_cap_truncates_and_keeps_chunk_boundaries() -> None:
    peer = ScriptedPeer(request(b""))
    rec = recorder_for(peer, max_resp=5)
    await rec.send(start(content_type=b"text/event-stream"))
    for part in (b"ab", b"cd", b"ef", b"gh"):
        await rec.send(body(part, more=True))
    await rec.send(body(b""))
    assert [m.get("body") for m in peer.sent[1:]] == [b"ab", b"cd", b"ef", b"gh", b""]
    ex = exchange_of(rec)
    assert ex.response_chunks == [b"ab", b"cd", b"e"]
    assert ex.response_truncated
    assert ex.response_content_type == "text/event-stream"
    assert ex.outcome == "ok"


async def test_zero_caps_keep_nothing() -> None:
    peer = ScriptedPeer(request(b"hello"))
    rec = recorder_for(peer, max_req=0, max_resp=0)
    await rec.receive()
    await rec.send(start())
    await rec.send(body(b"world"))
    ex = exchange_of(rec)
    assert ex.request_body == b"" and ex.request_truncated
    assert ex.response_chunks == [] and ex.response_truncated
    assert ex.first_byte_perf is not None


async def test_a_reused_bytearray_is_copied() -> None:
    peer = ScriptedPeer()
    rec = recorder_for(peer)
    buffer = bytearray(b"first")
    await rec.send(start())
    await rec.send({"type": "http.response.body", "body": buffer, "more_body": True})
    buffer[:] = b"xxxxx"  # an app reusing its buffer after send() returned
    await rec.send(body(b""))
    assert exchange_of(rec).response_chunks == [b"first"]


async def test_first_byte_time_is_the_first_non_empty_chunk() -> None:
    peer = ScriptedPeer()
    rec = recorder_for(peer)
    await rec.send(start())
    await rec.send(body(b"", more=True))
    assert rec.first_byte_perf is None
    await rec.send(body(b"a", more=True))
    first = rec.first_byte_perf
    assert first is not None
    await rec.send(body(b"b"))
    assert rec.first_byte_perf == first
    ex = exchange_of(rec)
    assert ex.end_perf is not None and ex.end_perf >= first


async def test_disconnect_before_the_final_body_is_client_disconnected() -> None:
    peer = ScriptedPeer(request(b"{}"), {"type": "http.disconnect"})
    rec = recorder_for(peer)
    await rec.receive()
    await rec.send(start(content_type=b"text/event-stream"))
    await rec.send(body(b"data: 1\n\n", more=True))
    disconnect = await rec.receive()
    assert disconnect == {"type": "http.disconnect"}  # passed through, not swallowed
    ex = exchange_of(rec)
    assert ex.outcome == "client_disconnected"
    assert ex.response_chunks == [b"data: 1\n\n"]


async def test_disconnect_then_final_body_is_still_client_disconnected() -> None:
    peer = ScriptedPeer(request(b"{}"), {"type": "http.disconnect"})
    rec = recorder_for(peer)
    await rec.receive()
    await rec.send(start())
    await rec.receive()
    await rec.send(body(b"late"))  # servers drop writes to a gone client silently
    assert exchange_of(rec).outcome == "client_disconnected"


async def test_disconnect_after_the_response_completed_is_not_a_failure() -> None:
    peer = ScriptedPeer(request(b"{}"), {"type": "http.disconnect"})
    rec = recorder_for(peer)
    await rec.receive()
    await rec.send(start())
    await rec.send(body(b"done"))
    await rec.receive()
    assert exchange_of(rec).outcome == "ok"


async def test_send_oserror_is_noted_and_re_raised_unchanged() -> None:
    error = ConnectionResetError("peer went away")
    peer = ScriptedPeer(send_error=error)
    rec = recorder_for(peer)
    with pytest.raises(ConnectionResetError) as caught:
        await rec.send(start())
    assert caught.value is error
    assert rec.send_failed
    ex = exchange_of(rec, exc=error)
    assert ex.outcome == "client_disconnected"
    assert ex.error == "ConnectionResetError: peer went away"


async def test_other_send_errors_are_not_disconnects() -> None:
    peer = ScriptedPeer(send_error=RuntimeError("protocol violation"))
    rec = recorder_for(peer)
    with pytest.raises(RuntimeError):
        await rec.send(start())
    ex = exchange_of(rec, exc=RuntimeError("protocol violation"))
    assert ex.outcome == "exception"


@pytest.mark.parametrize(
    ("status", "expected"), [(200, "ok"), (304, "ok"), (400, "http_error"), (503, "http_error")]
)
async def test_status_outcomes(status: int, expected: str) -> None:
    rec = recorder_for(ScriptedPeer())
    await rec.send(start(status))
    await rec.send(body(b"{}"))
    assert exchange_of(rec).outcome == expected


async def test_no_response_at_all_is_an_http_error_with_a_reason() -> None:
    ex = exchange_of(recorder_for(ScriptedPeer()))
    assert ex.outcome == "http_error"
    assert ex.status is None
    assert ex.error == "the application returned without sending a response"


async def test_exception_outcome_and_error_text() -> None:
    rec = recorder_for(ScriptedPeer())
    await rec.send(start())
    ex = exchange_of(rec, exc=ValueError("bad thing"))
    assert ex.outcome == "exception"
    assert ex.status == 200
    assert ex.error == "ValueError: bad thing"


async def test_pathsend_completes_the_response() -> None:
    peer = ScriptedPeer({"type": "http.disconnect"})
    rec = recorder_for(peer)
    await rec.send(start(content_type=b"application/octet-stream"))
    await rec.send({"type": "http.response.pathsend", "path": "/tmp/file"})
    await rec.receive()
    assert exchange_of(rec).outcome == "ok"


async def test_unknown_messages_pass_through() -> None:
    peer = ScriptedPeer({"type": "http.something.new", "x": 1})
    rec = recorder_for(peer)
    assert await rec.receive() == {"type": "http.something.new", "x": 1}
    await rec.send({"type": "http.response.trailers", "headers": [], "more_trailers": False})
    assert peer.sent[-1]["type"] == "http.response.trailers"


async def test_read_request_body_replays_the_same_messages() -> None:
    inbound = [request(b"ab", more=True), request(b"", more=True), request(b"cd")]
    peer = ScriptedPeer(*inbound)
    rec = recorder_for(peer)
    assert await rec.read_request_body(limit=100) == b"abcd"
    calls = peer.received_calls
    replayed = [await rec.receive() for _ in range(3)]
    assert all(a is b for a, b in zip(replayed, inbound, strict=True))
    assert peer.received_calls == calls  # replayed, not read again
    assert await rec.receive() == {"type": "http.disconnect"}  # then live again
    ex = exchange_of(rec)
    assert ex.request_body == b"abcd"  # observed once, not twice


async def test_read_request_body_over_the_limit_replays_then_reads_live() -> None:
    inbound = [request(b"abc", more=True), request(b"def", more=True), request(b"ghi")]
    peer = ScriptedPeer(*inbound)
    rec = recorder_for(peer)
    assert await rec.read_request_body(limit=4) is None
    seen = [await rec.receive() for _ in range(3)]
    assert all(a is b for a, b in zip(seen, inbound, strict=True))
    assert exchange_of(rec).request_body == b"abcdefghi"


async def test_read_request_body_with_a_disconnect_first() -> None:
    peer = ScriptedPeer(request(b"ab", more=True), {"type": "http.disconnect"})
    rec = recorder_for(peer)
    assert await rec.read_request_body(limit=100) is None
    assert (await rec.receive())["body"] == b"ab"
    assert (await rec.receive())["type"] == "http.disconnect"
    assert exchange_of(rec).outcome == "client_disconnected"


async def test_concurrent_recorders_do_not_share_state() -> None:
    async def one(i: int) -> bytes:
        peer = ScriptedPeer(request(str(i).encode()))
        rec = recorder_for(peer)
        await rec.receive()
        await asyncio.sleep(0)
        await rec.send(start())
        await rec.send(body(f"r{i}".encode()))
        ex = exchange_of(rec)
        return ex.request_body + b"|" + b"".join(ex.response_chunks)

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results == [f"{i}|r{i}".encode() for i in range(20)]


def test_describe_error_is_bounded_and_total() -> None:
    assert describe_error(KeyError()) == "KeyError"
    long = describe_error(ValueError("x" * (ERROR_TEXT_LIMIT + 50)))
    assert long.startswith("ValueError: xxx") and long.endswith("...")
    assert len(long) == len("ValueError: ") + ERROR_TEXT_LIMIT + 3

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert describe_error(Broken()) == "Broken"
