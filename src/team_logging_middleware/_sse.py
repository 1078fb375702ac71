"""Incremental Server-Sent Events decoding, as OpenAI-style streaming APIs use it.

The parser follows the WHATWG event-stream interpretation rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end with CRLF, LF or CR; a blank line dispatches the event; lines starting with ``:`` are
comments; ``field: value`` loses exactly one leading space of its value; several ``data:`` lines
of one event are joined with ``\\n``; a leading byte order mark is ignored.

Chunk boundaries are arbitrary: a chunk may end in the middle of a line, of a multi-byte UTF-8
character or between the CR and the LF of a CRLF. Lines are split as bytes and decoded one whole
line at a time (a line terminator byte never occurs inside a UTF-8 sequence), with invalid bytes
replaced rather than raised.

This runs off the request path (the dispatcher decodes captured chunks); it does no I/O and has
no dependencies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DONE",
    "SSEDecoder",
    "SSEEvent",
    "data_only_values",
    "is_done",
    "looks_like_sse",
    "parse_sse",
]

DONE = "[DONE]"
"""The sentinel ``data:`` payload OpenAI-compatible APIs send as the last event of a stream."""

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"
_BOM_BYTES = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its type (``message`` when the stream names none), data and id."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Turns a byte stream, fed in chunks of any size, into :class:`SSEEvent` objects.

    ``feed(chunk)`` returns the events completed by that chunk; ``finish()`` ends the stream.
    Unlike a browser, ``finish()`` also returns an event whose data lines were complete but whose
    terminating blank line never came (servers that close right after the last ``data:`` line,
    or a capture cut short): for a log record a complete last payload is worth keeping. A line
    cut off without its terminator is still dropped, since it is most likely truncated.
    """

    __slots__ = ("_buf", "_data", "_event", "_id", "_last_id", "_retry", "_started")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add ``chunk`` to the stream; return the events it completed (possibly none)."""
        events: list[SSEEvent] = []
        if not chunk:
            return events
        buf = self._buf
        buf.extend(chunk)
        end = len(buf)
        pos = 0
        for match in _LINE_END.finditer(buf):
            if match.end() == end and buf[end - 1] == 0x0D:
                # A CR at the very end may be the first half of a CRLF split across chunks:
                # keep the line until the next chunk (or finish()) says which it is.
                break
            self._line(bytes(buf[pos : match.start()]), events)
            pos = match.end()
        if pos:
            del buf[:pos]
        return events

    def finish(self) -> list[SSEEvent]:
        """End of stream: flush a line held back by a trailing CR and a pending complete event."""
        events: list[SSEEvent] = []
        buf = self._buf
        if buf.endswith(b"\r"):
            self._line(bytes(buf[:-1]), events)
        buf.clear()
        if self._data:
            self._dispatch(events)
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return  # comment (keep-alive pings and the like)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # any other field name is ignored, as the spec says

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._id is not None:
            self._last_id = self._id
            self._id = None
        if self._data:
            events.append(
                SSEEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self._last_id,
                    retry=self._retry,
                )
            )
        self._data = []
        self._event = ""
        self._retry = None


def parse_sse(chunks: Iterable[bytes]) -> list[SSEEvent]:
    """Every event of a finished stream given as chunks (``finish()`` included)."""
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.finish())
    return events


def data_only_values(data: bytes) -> list[bytes] | None:
    """The raw ``data:`` values of a whole stream made only of single-line ``data:`` events.

    This is the shape nearly every chat completion stream has, and splitting it on blank lines
    is several times cheaper than the line-by-line :class:`SSEDecoder`. The values are those
    ``parse_sse([data])`` would give (before UTF-8 decoding), all of type ``message``. Anything
    else — comments, other fields (``event:``, ``id:``, ``retry:``), several lines in one event,
    CR-only line ends — returns None, and the caller uses the general decoder instead.
    """
    if data.startswith(_BOM_BYTES):
        data = data[3:]
    if b"\r" in data:
        if data.count(b"\r") != data.count(b"\r\n"):
            return None  # a CR-only line end: only the general decoder splits those right
        data = data.replace(b"\r\n", b"\n")
    blocks = data.split(b"\n\n")
    # Whatever follows the last blank line: a complete line is an event finish() keeps, an
    # unterminated one is dropped as truncated (see SSEDecoder).
    tail = blocks.pop().lstrip(b"\n")
    values: list[bytes] = []
    for block in blocks:
        if block.startswith(b"\n"):
            block = block.lstrip(b"\n")
        if not block:
            continue  # extra blank lines dispatch nothing
        if not block.startswith(b"data:") or b"\n" in block:
            return None
        values.append(block[6:] if block[5:6] == b" " else block[5:])
    if tail:
        newline = tail.find(b"\n")
        if newline == -1:
            return values
        if newline != len(tail) - 1 or not tail.startswith(b"data:"):
            return None
        values.append(tail[6:-1] if tail[5:6] == b" " else tail[5:-1])
    return values


def is_done(event: SSEEvent) -> bool:
    """True for OpenAI's end-of-stream sentinel ``data: [DONE]``."""
    return event.data.strip() == DONE


def looks_like_sse(content_type: str, head: bytes) -> bool:
    """True when a response is an event stream, by content type or, failing that, by its start.

    Gateways sometimes stream with a wrong content type (``application/json``, none at all), so
    a body whose first non-blank line is an SSE field or comment counts too.
    """
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        return True
    start = head.lstrip(b"\xef\xbb\xbf").lstrip()[:16]
    return start.startswith((b"data:", b"event:", b"id:", b": ", b"retry:"))
