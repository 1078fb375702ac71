"""Helpers for testing code that uses team-logging-middleware (public API).

:class:`MemorySink` is a destination type that keeps what it receives in memory, one list per
destination, and can be told to fail or to be slow::

    memory = MemorySink()                      # registers as callback_name "memory"
    registry = SinkRegistry([memory.sink_type])
    ...                                        # a team's callback: {"callback_name": "memory",
                                               #   "callback_vars": {"destination": "team-a"}}
    await wait_for(lambda: len(memory.records("team-a")) == 1)

    memory.fail(SinkError("HTTP 503", retryable=True), times=2)   # the next two emits fail
    memory.hang()                                                  # emits block until release()

``wait_for`` polls a condition until a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._types import Destination, DestinationSource
from .errors import SinkError
from .records import LogRecord
from .settings import CallbackSpec
from .sinks.base import Sink, SinkContext, SinkType

__all__ = [
    "EmitCall",
    "MemorySink",
    "MemorySinkType",
    "destination_for",
    "memory_sink_type",
    "sample_record",
    "wait_for",
]

DEFAULT_DESTINATION = "default"


@dataclass(frozen=True, slots=True)
class EmitCall:
    """One call of ``emit`` on a memory destination (failed ones included)."""

    destination: str
    size: int
    at: float  # time.monotonic() when the call started
    ok: bool


@dataclass(frozen=True, slots=True)
class MemorySinkType(SinkType):
    """The sink type of a :class:`MemorySink`; ``memory`` gives access to what it received."""

    memory: MemorySink = field(kw_only=True)


class MemorySink:
    """An in-memory destination type for tests, with switches to fail or to be slow.

    Destinations are told apart by the optional var ``destination`` (default ``"default"``);
    each gets its own list of records. ``api_key`` is accepted (and is a secret var) so tests can
    check that secrets stay out of logs and stats. Not thread-safe: use it from one event loop.
    """

    def __init__(
        self, name: str = "memory", *, optional_vars: Iterable[str] = ("destination", "api_key")
    ) -> None:
        self.name = name
        self._records: dict[str, list[LogRecord]] = {}
        self._batches: dict[str, list[list[LogRecord]]] = {}
        self._all: list[LogRecord] = []
        self.emits: list[EmitCall] = []
        self.contexts: list[SinkContext] = []
        self.built = 0
        self.closed = 0
        self.max_live = 0
        self.delay = 0.0
        self.check_error: SinkError | None = None
        self._error: Exception | None = None
        self._error_times: int | None = None
        self._error_destinations: frozenset[str] | None = None
        self._hung: frozenset[str] | None = None
        self._hang_all = False
        self._release = asyncio.Event()
        self.sink_type = MemorySinkType(
            name=name,
            factory=self._build,
            optional_vars=frozenset(optional_vars),
            description="in-memory destination for tests",
            memory=self,
        )

    # -- what was received ------------------------------------------------------------------

    def records(self, destination: str | None = None) -> list[LogRecord]:
        """Records delivered to ``destination`` (all destinations, in order, when None)."""
        if destination is None:
            return list(self._all)
        return list(self._records.get(destination, ()))

    def batches(self, destination: str = DEFAULT_DESTINATION) -> list[list[LogRecord]]:
        """The successful batches of one destination, as emitted."""
        return [list(b) for b in self._batches.get(destination, ())]

    def destinations(self) -> list[str]:
        """Destinations that received at least one record."""
        return sorted(self._records)

    @property
    def live(self) -> int:
        """Sinks built and not yet closed."""
        return self.built - self.closed

    # -- switches -----------------------------------------------------------------------------

    def fail(
        self,
        error: Exception | None,
        *,
        times: int | None = None,
        destinations: Iterable[str] | None = None,
    ) -> None:
        """Make the next ``times`` emits (all, when None) raise ``error``; None heals."""
        self._error = error
        self._error_times = times
        self._error_destinations = None if destinations is None else frozenset(destinations)

    def hang(self, destinations: Iterable[str] | None = None) -> None:
        """Block emits (of ``destinations``, or all) until :meth:`release`."""
        self._release.clear()
        if destinations is None:
            self._hang_all = True
        else:
            self._hung = frozenset(destinations) | (self._hung or frozenset())

    def release(self) -> None:
        """Let hung emits (and later ones) proceed."""
        self._hang_all = False
        self._hung = None
        self._release.set()

    # -- the sink -----------------------------------------------------------------------------

    def _build(self, vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        self.built += 1
        self.max_live = max(self.max_live, self.live)
        self.contexts.append(ctx)
        return _MemoryDestination(self, vars_.get("destination", DEFAULT_DESTINATION))

    def _hangs(self, destination: str) -> bool:
        return self._hang_all or (self._hung is not None and destination in self._hung)

    def _next_error(self, destination: str) -> Exception | None:
        if self._error is None:
            return None
        if self._error_destinations is not None and destination not in self._error_destinations:
            return None
        error = self._error
        if self._error_times is not None:
            self._error_times -= 1
            if self._error_times <= 0:
                self._error = None
        return error

    async def _emit(self, destination: str, batch: Sequence[LogRecord]) -> None:
        started = time.monotonic()
        if self._hangs(destination):
            await self._release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        error = self._next_error(destination)
        self.emits.append(EmitCall(destination, len(batch), started, error is None))
        if error is not None:
            raise error
        self._records.setdefault(destination, []).extend(batch)
        self._batches.setdefault(destination, []).append(list(batch))
        self._all.extend(batch)


class _MemoryDestination:
    """One live memory destination (what the factory builds)."""

    def __init__(self, owner: MemorySink, destination: str) -> None:
        self._owner = owner
        self.destination = destination
        self._closed = False

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        await self._owner._emit(self.destination, batch)

    async def check(self) -> None:
        if self._owner.check_error is not None:
            raise self._owner.check_error

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner.closed += 1


def memory_sink_type(name: str = "memory") -> MemorySinkType:
    """A new memory sink type; what it receives is in ``.memory`` (a :class:`MemorySink`)."""
    return MemorySink(name).sink_type


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    *,
    interval: float = 0.005,
) -> None:
    """Wait until ``predicate()`` (sync or async) is true; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:g}s")
        await asyncio.sleep(interval)


def sample_record(**fields: Any) -> LogRecord:
    """A plausible successful chat-completion record; keyword arguments override its fields."""
    now = time.time()
    values: dict[str, Any] = {
        "request_id": "req-1",
        "team_id": "team-a",
        "key_alias": None,
        "user_id": None,
        "route": "/v1/chat/completions",
        "method": "POST",
        "call_type": "chat.completions",
        "outcome": "ok",
        "status_code": 200,
        "start_time": now - 0.25,
        "end_time": now,
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "output": "hi",
        "finish_reason": "stop",
    }
    values.update(fields)
    return LogRecord(**values)


def destination_for(spec: CallbackSpec, source: DestinationSource = "team") -> Destination:
    """The plan entry for ``spec`` (as the planner would build it)."""
    return Destination(spec=spec, source=source, identity=spec.identity())
