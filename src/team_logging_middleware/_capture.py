"""The per-request recorder: a bounded, unparsed copy of one HTTP exchange.

``ExchangeRecorder`` wraps an ASGI ``receive``/``send`` pair. Every message is forwarded first and
unchanged; only then is a bounded copy kept: request body chunks up to ``max_request_bytes``,
response status and content type, response body chunks up to ``max_response_bytes`` (chunk
references in a list, never a growing ``bytes``), and the ``perf_counter()`` of the first
non-empty response chunk. ``http.disconnect`` passes through and is noted. Nothing is parsed and
no I/O happens here; the recorder lives exactly as long as its request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .records import Exchange, Outcome

if TYPE_CHECKING:
    from ._types import Caller, Plan

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

__all__ = ["ERROR_TEXT_LIMIT", "ExchangeRecorder", "Message", "Receive", "Send", "describe_error"]

ERROR_TEXT_LIMIT = 1000
"""Longest ``Exchange.error`` text kept for an app exception (type and message only)."""


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, bounded; never a traceback, never raises."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not break the request's bookkeeping
        text = ""
    if not text:
        return name
    if len(text) > ERROR_TEXT_LIMIT:
        text = text[:ERROR_TEXT_LIMIT] + "..."
    return f"{name}: {text}"


class ExchangeRecorder:
    """Wraps one request's ``receive``/``send``: forward first, then keep a bounded copy.

    Pass :attr:`receive` and :attr:`send` (bound methods) to the app in place of the server's
    callables, then call :meth:`to_exchange` once the app has returned or raised.

    :meth:`read_request_body` is the seam for a layer that must see the whole request body
    before the app runs (a response cache computing its key): it drives ``receive`` itself and
    then replays the very same messages to the app.
    """

    __slots__ = (
        "_max_request",
        "_max_response",
        "_receive",
        "_replay",
        "_send",
        "disconnected",
        "first_byte_perf",
        "request_chunks",
        "request_complete",
        "request_size",
        "request_truncated",
        "response_chunks",
        "response_complete",
        "response_content_type",
        "response_size",
        "response_started",
        "response_truncated",
        "send_failed",
        "status",
    )

    def __init__(
        self, receive: Receive, send: Send, max_request_bytes: int, max_response_bytes: int
    ) -> None:
        self._receive = receive
        self._send = send
        self._max_request = max_request_bytes
        self._max_response = max_response_bytes
        self._replay: deque[Message] | None = None
        self.request_chunks: list[bytes] = []
        self.request_size = 0
        self.request_truncated = False
        self.request_complete = False
        self.status: int | None = None
        self.response_content_type = ""
        self.response_chunks: list[bytes] = []
        self.response_size = 0
        self.response_truncated = False
        self.response_started = False
        self.response_complete = False
        self.first_byte_perf: float | None = None
        self.disconnected = False
        self.send_failed = False

    # -- the wrapped callables ----------------------------------------------------------------

    async def receive(self) -> Message:
        """The app's ``receive``: the server's message, unchanged, after noting what it holds."""
        replay = self._replay
        if replay:
            return replay.popleft()
        message = await self._receive()
        self._observe_request(message)
        return message

    async def send(self, message: Message) -> None:
        """The app's ``send``: forward to the server first, then keep a bounded copy."""
        try:
            await self._send(message)
        except OSError:
            # The server could not write: the client is gone (uvicorn raises ClientDisconnected,
            # an OSError). The app sees the same exception it would have seen without us.
            self.send_failed = True
            if not self.response_complete:
                self.disconnected = True
            raise
        message_type = message["type"]
        if message_type == "http.response.body":
            body = message.get("body", b"")
            if body:
                if self.first_byte_perf is None:
                    self.first_byte_perf = perf_counter()
                if not self.response_truncated:
                    self._keep_response(body)
            if not message.get("more_body", False):
                self.response_complete = True
        elif message_type == "http.response.start":
            self.response_started = True
            self.status = message.get("status")
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-type":
                    self.response_content_type = value.decode("latin-1")
                    break
        elif message_type == "http.response.pathsend":
            # The server sends a file by path: the body never passes through us.
            self.response_complete = True

    # -- the cache seam ----------------------------------------------------------------------

    async def read_request_body(self, limit: int) -> bytes | None:
        """Read the request body before the app does, then replay it to the app exactly.

        Returns the whole body, or None when it is larger than ``limit`` bytes or the client
        disconnected first (the messages read so far are replayed either way, and the app goes
        on reading the rest live). Call it at most once, before the app runs.
        """
        pending: deque[Message] = deque()
        parts: list[bytes] = []
        size = 0
        complete = False
        while True:
            message = await self._receive()
            self._observe_request(message)
            pending.append(message)
            if message["type"] != "http.request":
                break  # http.disconnect
            body = message.get("body", b"")
            if body:
                parts.append(body)
                size += len(body)
            if not message.get("more_body", False):
                complete = True
                break
            if size > limit:
                break
        self._replay = pending
        if not complete or size > limit:
            return None
        return b"".join(parts)

    # -- bookkeeping -------------------------------------------------------------------------

    def _observe_request(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.request":
            body = message.get("body", b"")
            if body and not self.request_truncated:
                room = self._max_request - self.request_size
                if len(body) <= room:
                    self.request_chunks.append(bytes(body))
                    self.request_size += len(body)
                else:
                    if room > 0:
                        self.request_chunks.append(bytes(body[:room]))
                        self.request_size += room
                    self.request_truncated = True
            if not message.get("more_body", False):
                self.request_complete = True
        elif message_type == "http.disconnect" and not self.response_complete:
            # A disconnect after the last body byte is just the end of the connection.
            self.disconnected = True

    def _keep_response(self, body: bytes) -> None:
        room = self._max_response - self.response_size
        if len(body) <= room:
            # bytes() is a no-op for bytes and a copy for a bytearray/memoryview the app might
            # reuse after send() returns.
            self.response_chunks.append(bytes(body))
            self.response_size += len(body)
        else:
            if room > 0:
                self.response_chunks.append(bytes(body[:room]))
                self.response_size += room
            self.response_truncated = True

    def outcome(self, raised: bool) -> Outcome:
        """How the exchange ended, in precedence order.

        A client that went away before the final body message is ``client_disconnected`` even
        when the app then raised because of it (the exception is still re-raised unchanged).
        """
        if self.disconnected:  # set only when it happened before the final body message
            return "client_disconnected"
        if raised:
            return "exception"
        if self.status is None or self.status >= 400:
            return "http_error"
        return "ok"

    def to_exchange(
        self,
        *,
        request_id: str,
        method: str,
        path: str,
        start_time: float,
        start_perf: float,
        plan: Plan,
        caller: Caller | None,
        request_content_type: str,
        exc: BaseException | None,
        cache_hit: bool = False,
    ) -> Exchange:
        """The raw exchange to hand to the runtime (``exc``: what the app raised, if anything)."""
        chunks = self.request_chunks
        # One chunk is the common case; bytes.join returns that very object without copying.
        request_body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        outcome = self.outcome(exc is not None)
        if exc is not None:
            error: str | None = describe_error(exc)
        elif self.status is None and outcome == "http_error":
            error = "the application returned without sending a response"
        else:
            error = None
        return Exchange(
            request_id=request_id,
            method=method,
            path=path,
            start_time=start_time,
            start_perf=start_perf,
            plan=plan,
            caller=caller,
            request_body=request_body,
            request_truncated=self.request_truncated,
            request_content_type=request_content_type,
            status=self.status,
            response_content_type=self.response_content_type,
            response_chunks=self.response_chunks,
            response_truncated=self.response_truncated,
            first_byte_perf=self.first_byte_perf,
            end_perf=perf_counter(),
            outcome=outcome,
            error=error,
            cache_hit=cache_hit,
        )
