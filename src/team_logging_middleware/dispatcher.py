"""Delivery: from a captured exchange to every destination, off the request path.

The request path only calls :meth:`Dispatcher.submit` — synchronous, O(1), never blocking, never
raising — which appends the raw exchange to a byte-bounded intake queue. Everything else happens
in tasks started from the application's lifespan (:meth:`Dispatcher.start`)::

    submit(exchange) ─▶ intake (bounded in bytes; full ⇒ False, counted)
                          │  one worker task: decode, pick destinations by outcome
                          ▼
                  one lane per destination identity
                  (bounded deque: full ⇒ drop oldest, counted)
                          │  one sender task per live lane: batch by count/bytes/interval,
                          ▼  emit with a timeout, retry retryable errors with backoff
                        sink.emit(batch)

Lanes keep one slow or broken destination from delaying any other (no head-of-line blocking).
At most ``max_live_sinks`` lanes hold a built sink (and a sender task) at once: idle lanes are
closed least-recently-used first, and when every slot is busy, lanes with records wait their turn
and busy lanes hand over their slot after a batch — so thousands of destinations run with a
constant number of tasks. Counters of evicted lanes survive in :meth:`Dispatcher.stats`.
At most ``max_concurrent_emits`` exports run at once, and with more live lanes than
``_LANES_PER_INTERVAL`` a partial batch waits proportionally longer than ``flush_interval``: the
number of export requests per second stays bounded from one destination to thousands.

Memory is bounded in bytes: the intake by ``max_queue_bytes``, each lane by ``max_lane_bytes``
and all lanes together by ``max_queue_bytes`` again (the largest lane loses its oldest records
first), plus at most one batch in flight per live lane.

Sink code is never trusted: every call is guarded, exceptions of any type are contained and
counted, and the reasons kept in stats and log lines are scrubbed of the destination's secrets.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import httpx

from ._types import Destination
from .errors import SinkError
from .records import Exchange, LogRecord
from .settings import CallbackSpec, is_env_ref, resolve_vars, secret_values
from .sinks.base import CheckableSink, Sink, SinkContext, SinkRegistry
from .sinks.custom import PartialBatchError

__all__ = ["Decode", "Dispatcher", "FlushReport"]

logger = logging.getLogger("team_logging_middleware.dispatcher")

MiB = 1024 * 1024
Decode = Callable[[Exchange], LogRecord]

# The worker lets the loop run other tasks (requests, their first bytes) once it has decoded for
# this long since it last yielded: a decoded stream costs far more than a decoded JSON exchange,
# so a count alone would hold the loop for milliseconds behind a run of streams.
_YIELD_AFTER_S = 0.0005
_YIELD_EVERY = 16  # and at the latest after this many exchanges, however cheap they were
_MAX_TEAM_IDS = 16  # team ids remembered per destination for stats
_MAX_REASON_CHARS = 300
_MAX_TRACKED_DESTINATIONS = 10_000  # counters of idle destinations beyond this are folded
_MAX_LOGGED_DESTINATIONS = 20  # in the shutdown line
# Live destinations per flush interval: beyond this many, every
# lane waits proportionally longer before sending a partial batch, so the number of export
# requests per second stays bounded however many destinations share the traffic (1,000 teams
# at one record each per interval would otherwise cost 1,000 tiny requests a second).
_LANES_PER_INTERVAL = 250
_DECODED_FACTOR = 2  # bytes a decoded record holds per byte of its exchange's size_hint()
_DROP_REASONS = ("buffer_full", "retries_exhausted", "build_failed", "shutdown")
_SCRUBBED = "****"

_State = Literal["new", "running", "stopping", "stopped"]


@dataclass(frozen=True, slots=True)
class FlushReport:
    """What :meth:`Dispatcher.flush` (or :meth:`Dispatcher.stop`) achieved.

    ``delivered`` and ``dropped`` count record deliveries (one record sent to two destinations
    counts twice) that completed while the call ran; ``dropped`` includes records that failed,
    were dropped, or exchanges that could not be decoded. ``pending`` is what was still waiting
    when the call returned: exchanges not yet decoded plus records not yet delivered (for
    :meth:`Dispatcher.stop`: what was abandoned at the deadline). ``timed_out`` says the
    deadline passed before everything submitted earlier was resolved.
    """

    delivered: int
    dropped: int
    pending: int
    timed_out: bool


@dataclass(slots=True)
class _RecordItem:
    """An already-decoded record (cache hits, tests) waiting in the intake."""

    record: LogRecord
    destinations: tuple[Destination, ...]


class _Lane:
    """One destination identity: its queue, its sink, its sender and its counters."""

    __slots__ = (
        "bytes",
        "callback_name",
        "ctx_team_id",
        "done",
        "dropped",
        "enqueued",
        "failed",
        "identity",
        "in_flight",
        "label",
        "last_error",
        "overflow_warned",
        "queue",
        "retried",
        "secrets",
        "sent",
        "sink",
        "spec",
        "task",
        "team_ids",
        "team_ids_more",
        "waiting",
        "wake",
    )

    def __init__(self, destination: Destination, team_id: str | None) -> None:
        self.identity = destination.identity
        self.spec: CallbackSpec = destination.spec
        self.callback_name = destination.spec.callback_name
        self.label = f"{self.callback_name}:{self.identity[:8]}"
        # A destination shared by several teams (a global default) belongs to none of them.
        self.ctx_team_id = team_id if destination.source in ("team", "key") else None
        self.queue: deque[tuple[LogRecord, int, float]] = deque()
        self.bytes = 0
        self.in_flight = 0
        self.sink: Sink | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.waiting = False
        self.overflow_warned = False
        self.team_ids: list[str] = []
        self.team_ids_more = 0
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.dropped: dict[str, int] = {}
        self.last_error: str | None = None
        self.enqueued = 0
        self.done = 0
        self.secrets: tuple[str, ...] = ()
        self.add_secrets(secret_values(destination.spec.callback_vars))

    def add_secrets(self, values: Iterable[str]) -> None:
        merged = set(self.secrets) | _secret_fragments(values)
        # Longest first, so a secret containing another is scrubbed whole.
        self.secrets = tuple(sorted(merged, key=len, reverse=True))

    def see_team(self, team_id: str | None) -> None:
        if team_id is None or team_id in self.team_ids:
            return
        if len(self.team_ids) < _MAX_TEAM_IDS:
            self.team_ids.append(team_id)
        else:
            self.team_ids_more += 1

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue and self.in_flight == 0

    @property
    def unresolved(self) -> int:
        return self.enqueued - self.done


def shared_http_client(timeout: float) -> httpx.AsyncClient:
    """The one connection pool every HTTP destination shares.

    It carries no default headers or auth, and it never stores cookies: tenants that share a host
    (e.g. two projects on cloud.langfuse.com) must not receive each other's cookies.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)),
        limits=httpx.Limits(
            max_connections=100, max_keepalive_connections=100, keepalive_expiry=30.0
        ),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        follow_redirects=False,
    )


class Dispatcher:
    """Delivers log records to their destinations in the background, bounded and counted.

    Args:
        registry: the sink types destinations are built from.
        max_queue_bytes: bound of the intake queue (``Exchange.size_hint()`` bytes); also the
            bound of all lanes' buffers together, where a decoded record counts twice its
            exchange's size (the Python objects it is made of).
        max_lane_bytes: bound of one destination's buffer; when full its oldest records are
            dropped (reason ``buffer_full``).
        batch_size, max_batch_bytes, flush_interval: a batch is sent when it has ``batch_size``
            records or ``max_batch_bytes`` bytes, or when its oldest record waited
            ``flush_interval`` seconds.
        emit_timeout: seconds one ``emit`` may take (also ``SinkContext.timeout``).
        max_retries, backoff_base, backoff_max: retryable failures (``SinkError(retryable=True)``,
            timeouts, connection errors) are retried up to ``max_retries`` times after
            ``backoff_base * 2**n`` seconds (with jitter, at most ``backoff_max``), or after the
            server's ``retry_after`` when it is longer (also capped at ``backoff_max``, so one
            server cannot park a lane indefinitely).
        max_live_sinks: how many destinations may hold a built sink at once.
        max_concurrent_emits: how many ``emit`` calls may run at once over all destinations
            (a lane waiting for its turn has not started its ``emit_timeout`` yet).
        environ: where ``os.environ/NAME`` references are resolved (default ``os.environ``).
        http_client: the connection pool handed to every sink; created (and closed) here when
            not given.
        decode: exchange -> record; default ``decode_exchange`` from the package.
        timer: monotonic clock used for batch ages.

    ``submit`` must be called from the event loop's thread.
    """

    def __init__(
        self,
        registry: SinkRegistry,
        *,
        max_queue_bytes: int = 32 * MiB,
        max_lane_bytes: int = 8 * MiB,
        batch_size: int = 100,
        max_batch_bytes: int = 1 * MiB,
        flush_interval: float = 1.0,
        emit_timeout: float = 10.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_live_sinks: int = 1024,
        max_concurrent_emits: int = 16,
        environ: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        decode: Decode | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("max_queue_bytes", max_queue_bytes),
            ("max_lane_bytes", max_lane_bytes),
            ("batch_size", batch_size),
            ("max_batch_bytes", max_batch_bytes),
            ("max_live_sinks", max_live_sinks),
            ("max_concurrent_emits", max_concurrent_emits),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1")
        if emit_timeout <= 0:
            raise ValueError("emit_timeout must be positive")
        for name, fvalue in (
            ("flush_interval", flush_interval),
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
        ):
            if fvalue < 0:
                raise ValueError(f"{name} must not be negative")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self._registry = registry
        self._max_queue_bytes = max_queue_bytes
        self._max_lane_bytes = max_lane_bytes
        self._batch_size = batch_size
        self._max_batch_bytes = max_batch_bytes
        self._flush_interval = flush_interval
        self._emit_timeout = emit_timeout
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_live = max_live_sinks
        # Exports in flight at once, over all lanes. Beyond a few dozen, concurrent requests
        # only queue inside the shared connection pool, whose bookkeeping grows with the square
        # of its waiters: 1,000 lanes flushing together once took minutes of CPU there.
        self._emit_slots = asyncio.Semaphore(max_concurrent_emits)
        self._environ = environ
        self._client = http_client
        self._owns_client = False
        self._decode = decode
        self._timer = timer
        # A private generator: jitter must not consume (or depend on) the application's seeded
        # global random state.
        self._random = random.Random()

        self._state: _State = "new"
        self._intake: deque[tuple[Exchange | _RecordItem, int]] = deque()
        self._intake_bytes = 0
        self._wake = asyncio.Event()
        self._lanes: OrderedDict[str, _Lane] = OrderedDict()  # every known lane, LRU first
        self._live: OrderedDict[str, _Lane] = OrderedDict()  # lanes holding a slot, LRU first
        self._waiting: deque[_Lane] = deque()  # lanes with records but no slot, FIFO
        self._lane_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._unclosed: dict[int, tuple[Sink, _Lane]] = {}  # evicted sinks a sender will close
        self._accepting = False
        # Tasks run in a context of their own, never in the caller's: a worker that inherited a
        # request's contextvars would carry them for its whole life.
        self._context = contextvars.Context()
        self._progress: asyncio.Event | None = None
        self._flushing = 0
        self._closing = False
        self._stopped = asyncio.Event()
        self._stop_report: FlushReport | None = None

        self._submitted = 0
        self._processed = 0
        self._dropped_queue_full = 0
        self._dropped_not_running = 0
        self._decode_errors = 0
        self._abandoned_exchanges = 0
        self._enqueued_total = 0
        self._done_total = 0
        self._sent_total = 0
        self._lost_total = 0  # failed + dropped record deliveries
        self._warned_not_running = False
        self._warned_full = False
        self._retired = {"destinations": 0, "sent": 0, "failed": 0, "dropped": 0, "retried": 0}

    # -- the request path ---------------------------------------------------------------------

    def submit(self, exchange: Exchange) -> bool:
        """Queue an exchange for decoding and delivery; never blocks, never raises.

        Returns False when the exchange is lost: the dispatcher is not running
        (``dropped_not_running``) or the intake is full (``dropped_queue_full``). An exchange
        whose plan sends nothing anywhere is not queued at all (and True is returned: nothing
        was lost).
        """
        try:
            if not exchange.plan.logs:
                return True
            return self._enqueue(exchange, exchange.size_hint())
        except Exception as exc:  # the request path must never see our failure
            logger.error("could not queue a log exchange: %s", type(exc).__name__)
            return False

    def submit_record(self, record: LogRecord, destinations: Sequence[Destination]) -> bool:
        """Queue an already-decoded record for ``destinations``; same contract as :meth:`submit`."""
        try:
            if not destinations:
                return True
            item = _RecordItem(record, tuple(destinations))
            return self._enqueue(item, _record_size(record))
        except Exception as exc:
            logger.error("could not queue a log record: %s", type(exc).__name__)
            return False

    def _enqueue(self, item: Exchange | _RecordItem, size: int) -> bool:
        if not self._accepting:
            self._dropped_not_running += 1
            if not self._warned_not_running:
                self._warned_not_running = True
                logger.warning(
                    "log records are being dropped: the dispatcher is not running (start it "
                    "from the application's lifespan, or use 'async with team_logging')"
                )
            return False
        if self._intake_bytes + size > self._max_queue_bytes:
            self._dropped_queue_full += 1
            if not self._warned_full:
                self._warned_full = True  # once per episode; reset when the intake drains
                logger.warning(
                    "log intake queue is full (%d bytes); dropping new records",
                    self._max_queue_bytes,
                )
            return False
        self._intake.append((item, size))
        self._intake_bytes += size
        self._submitted += 1
        self._wake.set()
        return True

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker (from the application's lifespan). Idempotent."""
        if self._state != "new":
            return
        if self._decode is None:
            # Imported here, not at module import: decoding pulls in the SSE and record
            # machinery that nothing on the import path of the package needs.
            module = importlib.import_module(f"{__package__}._decode")
            self._decode = cast(Decode, module.decode_exchange)
        if self._client is None:
            self._client = shared_http_client(self._emit_timeout)
            self._owns_client = True
        self._state = "running"
        self._accepting = True
        self._spawn(self._run_worker(), "team-logging-worker")

    async def flush(self, timeout: float | None = None) -> FlushReport:
        """Wait until everything submitted so far is delivered or dropped, or ``timeout`` passes.

        Partial batches are sent at once instead of waiting for ``flush_interval``.
        """
        if self._state not in ("running", "stopping"):
            return FlushReport(0, 0, self._pending(), False)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        sent0, lost0 = self._sent_total, self._lost_total + self._decode_errors
        self._flushing += 1
        for lane in self._live.values():
            lane.wake.set()
        try:
            target = self._submitted
            done = await self._wait_until(lambda: self._processed >= target, deadline)
            if done:
                lanes = [(lane, lane.enqueued) for lane in self._lanes.values() if lane.unresolved]
                done = await self._wait_lanes(lanes, deadline)
        finally:
            self._flushing -= 1
        return FlushReport(
            delivered=self._sent_total - sent0,
            dropped=self._lost_total + self._decode_errors - lost0,
            pending=self._pending(),
            timed_out=not done,
        )

    async def stop(self, timeout: float = 10.0) -> FlushReport:
        """Flush within ``timeout``, then cancel the tasks, close every sink and owned client.

        Logs one line saying what could not be delivered. Idempotent; not restartable.
        """
        if self._state == "new":
            self._state = "stopped"
            self._stop_report = FlushReport(0, 0, 0, False)
            self._stopped.set()
        if self._state == "stopping" or self._stop_report is not None:
            await self._stopped.wait()
            assert self._stop_report is not None
            return self._stop_report
        self._state = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            report = await self.flush(timeout)
            lost_mark = self._lost_total
            self._closing = True
            self._accepting = False
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            abandoned_exchanges = self._abandon_queued()
            await self._close_all_sinks(max(deadline - loop.time(), 1.0))
            if self._owns_client and self._client is not None:
                await self._client.aclose()
            self._state = "stopped"
            self._stop_report = FlushReport(
                delivered=report.delivered,
                # In-flight batches cut by the cancellation, queued records, undecoded exchanges.
                dropped=report.dropped + self._lost_total - lost_mark + abandoned_exchanges,
                pending=report.pending,
                timed_out=report.timed_out,
            )
            self._log_shutdown()
        finally:
            self._state = "stopped"
            self._accepting = False
            if not self._closing:  # stop() itself was cancelled: leave no task behind
                self._closing = True
                for task in list(self._tasks):
                    task.cancel()
            if self._stop_report is None:
                self._stop_report = FlushReport(0, 0, self._pending(), True)
            self._stopped.set()
        return self._stop_report

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for health endpoints: totals and one entry per destination label.

        Contains no callback vars and no secrets; ``last_error`` is a reason text scrubbed of the
        destination's secret values.
        """
        destinations: dict[str, dict[str, Any]] = {}
        for lane in self._lanes.values():
            destinations[lane.label] = {
                "label": lane.label,
                "callback_name": lane.callback_name,
                "team_ids": list(lane.team_ids),
                "more_team_ids": lane.team_ids_more,
                "sent": lane.sent,
                "failed": lane.failed,
                "dropped": dict(lane.dropped),
                "retried": lane.retried,
                "in_queue": len(lane.queue) + lane.in_flight,
                "queued_bytes": lane.bytes,
                "live": lane.identity in self._live,
                "last_error": lane.last_error,
            }
        return {
            "running": self._state == "running",
            "submitted": self._submitted,
            "queued": len(self._intake),
            "queued_bytes": self._intake_bytes,
            "lane_bytes": self._lane_bytes,
            "dropped_queue_full": self._dropped_queue_full,
            "dropped_not_running": self._dropped_not_running,
            "decode_errors": self._decode_errors,  # exchanges that could not be decoded/routed
            "abandoned_exchanges": self._abandoned_exchanges,
            "sent": self._sent_total,
            "lost": self._lost_total,
            "pending": self._pending(),
            "live_sinks": len(self._live),
            "waiting_destinations": len(self._waiting),
            "tasks": len(self._tasks),
            "retired": dict(self._retired),
            "destinations": destinations,
        }

    async def check(self, spec: CallbackSpec, team_id: str | None) -> None:
        """Build a fresh sink for ``spec`` and run its connection test.

        Raises :class:`SinkError` with a clear, secret-free reason when the entry cannot be built
        (unknown callback, bad or missing vars, missing optional dependency), when the test fails
        or times out, and also when the sink type has no connection test (``CheckableSink``):
        an untestable destination is reported, not silently passed.
        """
        secrets = _secret_fragments(secret_values(spec.callback_vars))
        client = self._client
        temporary = client is None or client.is_closed
        if temporary:
            client = shared_http_client(self._emit_timeout)
        assert client is not None
        try:
            try:
                normalized = self._registry.normalize(spec)
                resolved = resolve_vars(normalized.callback_vars, self._environ)
                secrets |= _secret_fragments(_resolved_secrets(normalized.callback_vars, resolved))
                ctx = SinkContext(http=client, team_id=team_id, timeout=self._emit_timeout)
                sink = self._registry.build(normalized, resolved, ctx)
            except Exception as exc:
                raise SinkError(
                    f"callback {spec.callback_name!r} could not be set up: "
                    f"{_scrub(_describe(exc), secrets)}"
                ) from None
            try:
                await self._check_sink(spec.callback_name, sink, secrets)
            finally:
                await self._close_sink(sink, spec.callback_name, secrets, self._emit_timeout)
        finally:
            if temporary:
                await client.aclose()

    async def _check_sink(self, name: str, sink: Sink, secrets: Iterable[str]) -> None:
        if not isinstance(sink, CheckableSink):
            raise SinkError(f"callback {name!r} has no connection test")
        try:
            await _with_timeout(sink.check(), self._emit_timeout)
        except SinkError as exc:
            raise SinkError(
                _scrub(exc.reason, secrets),
                retryable=exc.retryable,
                retry_after=exc.retry_after,
                status=exc.status,
            ) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise SinkError(
                f"connection test timed out after {self._emit_timeout:g}s", retryable=True
            ) from None
        except Exception as exc:
            raise SinkError(_scrub(_describe(exc), secrets)) from None

    # -- worker: intake -> lanes ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        task = self._context.run(loop.create_task, coro, name=name)
        self._tasks.add(task)  # strong reference: the loop only keeps weak ones
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("log delivery task %s died: %s", task.get_name(), type(exc).__name__)

    async def _run_worker(self) -> None:
        since_yield = 0
        clock = time.perf_counter
        last_yield = clock()
        while True:
            if not self._intake:
                self._warned_full = False
                self._wake.clear()
                await self._wake.wait()
                since_yield = 0
                last_yield = clock()
                continue
            item, size = self._intake.popleft()
            self._intake_bytes -= size
            try:
                self._route(item, size)
            except Exception as exc:  # a bug here must not stop delivery of everything else
                self._decode_errors += 1
                logger.error("could not route a log record: %s", type(exc).__name__)
            self._processed += 1
            self._notify_progress()
            since_yield += 1
            if since_yield >= _YIELD_EVERY or clock() - last_yield >= _YIELD_AFTER_S:
                since_yield = 0
                await asyncio.sleep(0)
                last_yield = clock()

    def _route(self, item: Exchange | _RecordItem, size: int) -> None:
        if isinstance(item, _RecordItem):
            record, destinations = item.record, item.destinations
        else:
            assert self._decode is not None
            try:
                record = self._decode(item)
            except Exception as exc:
                self._decode_errors += 1
                # Only the type: the message of a parser error can quote the body.
                logger.warning(
                    "could not decode exchange %s: %s", item.request_id, type(exc).__name__
                )
                return
            destinations = item.plan.destinations_for(record.success)
            # A decoded record holds its payload as Python objects (dicts, lists, str), which
            # take about 1.6x the captured bytes (measured with tracemalloc on chat
            # completions); account for that, or the byte bounds let twice the memory through.
            size *= _DECODED_FACTOR
        seen: set[str] = set()
        for destination in destinations:
            if destination.identity in seen:
                continue
            seen.add(destination.identity)
            lane = self._lane_for(destination, record.team_id)
            lane.see_team(record.team_id)
            self._append(lane, record, size)

    def _lane_for(self, destination: Destination, team_id: str | None) -> _Lane:
        lane = self._lanes.get(destination.identity)
        if lane is None:
            lane = _Lane(destination, team_id)
            self._lanes[destination.identity] = lane
            if len(self._lanes) > _MAX_TRACKED_DESTINATIONS:
                self._retire_idle_lanes()
        else:
            self._lanes.move_to_end(destination.identity)
        return lane

    def _retire_idle_lanes(self) -> None:
        # Keep stats bounded: fold the counters of the least recently used idle, non-live
        # destinations into one "retired" entry.
        excess = len(self._lanes) - _MAX_TRACKED_DESTINATIONS
        for identity in list(self._lanes):
            if excess <= 0:
                break
            lane = self._lanes[identity]
            if not lane.idle or identity in self._live or lane.waiting:
                continue
            del self._lanes[identity]
            excess -= 1
            self._retired["destinations"] += 1
            self._retired["sent"] += lane.sent
            self._retired["failed"] += lane.failed
            self._retired["dropped"] += sum(lane.dropped.values())
            self._retired["retried"] += lane.retried

    def _append(self, lane: _Lane, record: LogRecord, size: int) -> None:
        lane.queue.append((record, size, self._timer()))
        lane.bytes += size
        self._lane_bytes += size
        lane.enqueued += 1
        self._enqueued_total += 1
        # A single record larger than the bound is still given its chance to be sent.
        while lane.bytes > self._max_lane_bytes and len(lane.queue) > 1:
            self._drop_oldest(lane)
        while self._lane_bytes > self._max_queue_bytes:
            fullest = max((lane for lane in self._lanes.values() if lane.queue), key=_lane_bytes)
            self._drop_oldest(fullest)
        self._schedule(lane)

    def _drop_oldest(self, lane: _Lane) -> None:
        _record, size, _at = lane.queue.popleft()
        lane.bytes -= size
        self._lane_bytes -= size
        self._resolve_dropped(lane, "buffer_full", 1)
        if not lane.overflow_warned:
            lane.overflow_warned = True
            logger.warning(
                "log destination %s cannot keep up; dropping its oldest records", lane.label
            )

    # -- slots: which lanes may hold a sink and a sender ----------------------------------------

    def _schedule(self, lane: _Lane) -> None:
        if self._closing:
            return
        if lane.task is not None:
            lane.wake.set()
            return
        if lane.identity in self._live:
            self._live.move_to_end(lane.identity)
            self._start_sender(lane, None)
            return
        if lane.waiting:
            return  # already queued for a slot: no scan of the live lanes per record
        if len(self._live) < self._max_live:
            self._live[lane.identity] = lane
            self._start_sender(lane, None)
            return
        victim = self._idle_live_lane()
        if victim is not None:
            self._start_sender(lane, self._evict(victim))
            self._live[lane.identity] = lane
            return
        if not lane.waiting:
            lane.waiting = True
            self._waiting.append(lane)

    def _idle_live_lane(self) -> _Lane | None:
        for lane in self._live.values():  # least recently used first
            if lane.idle:
                return lane
        return None

    def _evict(self, lane: _Lane) -> tuple[Sink, _Lane] | None:
        del self._live[lane.identity]
        sink, lane.sink = lane.sink, None
        return None if sink is None else (sink, lane)

    def _start_sender(self, lane: _Lane, to_close: tuple[Sink, _Lane] | None) -> None:
        if to_close is not None:
            # Remembered until the sender closed it, so a shutdown that cancels the sender
            # first still closes the evicted sink.
            self._unclosed[id(to_close[0])] = to_close
        lane.task = self._spawn(self._run_sender(lane, to_close), f"team-logging-{lane.label}")

    def _release_waiting(self) -> None:
        while self._waiting and not self._closing:
            lane = self._waiting[0]
            if not lane.queue:
                self._waiting.popleft()
                lane.waiting = False
                continue
            if len(self._live) >= self._max_live and self._idle_live_lane() is None:
                return
            self._waiting.popleft()
            lane.waiting = False
            self._schedule(lane)

    def _hand_over(self, lane: _Lane) -> None:
        """Give ``lane``'s slot to the longest-waiting lane and queue ``lane`` behind it."""
        while self._waiting:
            other = self._waiting.popleft()
            other.waiting = False
            if other.queue and other.task is None and other.identity not in self._live:
                self._start_sender(other, self._evict(lane))
                self._live[other.identity] = other
                lane.waiting = True
                self._waiting.append(lane)
                return
        self._schedule(lane)  # nobody was waiting after all

    # -- sender: lane -> sink -------------------------------------------------------------------

    async def _run_sender(self, lane: _Lane, to_close: tuple[Sink, _Lane] | None) -> None:
        handed_over = False
        try:
            if to_close is not None:
                sink, owner = to_close
                self._unclosed.pop(id(sink), None)
                await self._close_sink(sink, owner.label, owner.secrets, self._emit_timeout)
            while lane.queue:
                await self._until_batch_ready(lane)
                batch = self._take_batch(lane)
                if batch:
                    await self._deliver(lane, batch)
                if lane.queue and self._waiting:
                    handed_over = True  # fairness: more destinations are busy than slots exist
                    break
        finally:
            lane.task = None
            if not self._closing:
                if handed_over:
                    self._hand_over(lane)
                elif lane.queue:
                    self._schedule(lane)
                else:
                    self._release_waiting()

    async def _until_batch_ready(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while lane.queue:
            if (
                len(lane.queue) >= self._batch_size
                or lane.bytes >= self._max_batch_bytes
                or self._flushing
                or self._closing
            ):
                return
            remaining = lane.queue[0][2] + self._batch_interval() - self._timer()
            if remaining <= 0:
                return
            lane.wake.clear()
            # call_later instead of wait_for: no extra task per waiting lane.
            handle = loop.call_later(remaining, lane.wake.set)
            try:
                await lane.wake.wait()
            finally:
                handle.cancel()

    def _batch_interval(self) -> float:
        """How long a partial batch may wait: ``flush_interval``, stretched when many lanes are
        busy at once so that they send fewer, larger batches instead of a flood of small ones."""
        busy = len(self._live)
        if busy <= _LANES_PER_INTERVAL or self._waiting:
            # Lanes waiting for a slot: holders must send and hand over, not wait longer.
            return self._flush_interval
        return self._flush_interval * busy / _LANES_PER_INTERVAL

    def _take_batch(self, lane: _Lane) -> list[LogRecord]:
        batch: list[LogRecord] = []
        batch_bytes = 0
        while lane.queue and len(batch) < self._batch_size:
            record, size, _at = lane.queue[0]
            if batch and batch_bytes + size > self._max_batch_bytes:
                break
            lane.queue.popleft()
            lane.bytes -= size
            self._lane_bytes -= size
            batch.append(record)
            batch_bytes += size
        if not lane.queue:
            lane.overflow_warned = False
        lane.in_flight = len(batch)
        return batch

    async def _deliver(self, lane: _Lane, batch: list[LogRecord]) -> None:
        resolved = False
        attempt = 0
        try:
            while True:
                if lane.sink is None:
                    try:
                        lane.sink = self._build(lane)
                    except Exception as exc:
                        self._note_error(lane, "build failed: " + _describe(exc))
                        # Whatever is queued would fail the same way: drop it with the batch.
                        queued = len(lane.queue)
                        lane.queue.clear()
                        self._lane_bytes -= lane.bytes
                        lane.bytes = 0
                        self._resolve_dropped(lane, "build_failed", len(batch) + queued)
                        resolved = True
                        return
                try:
                    async with self._emit_slots:
                        await _with_timeout(lane.sink.emit(batch), self._emit_timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    retryable, reason, retry_after = self._classify(exc)
                    if isinstance(exc, PartialBatchError):
                        failed = min(max(exc.failed, 0), len(batch))
                        self._note_error(lane, reason)
                        self._resolve_sent(lane, len(batch) - failed)
                        self._resolve_failed(lane, failed)
                        resolved = True
                        return
                    if not retryable:
                        self._note_error(lane, reason)
                        self._resolve_failed(lane, len(batch))
                        resolved = True
                        return
                    if attempt >= self._max_retries:
                        self._note_error(lane, f"{reason} (gave up after {attempt} retries)")
                        self._resolve_dropped(lane, "retries_exhausted", len(batch))
                        resolved = True
                        return
                    self._note_error(lane, reason, quiet=True)
                    attempt += 1
                    lane.retried += 1
                    await asyncio.sleep(self._backoff(attempt, retry_after))
                else:
                    self._resolve_sent(lane, len(batch))
                    resolved = True
                    return
        except asyncio.CancelledError:
            if not resolved:
                self._resolve_dropped(lane, "shutdown", len(batch))
                resolved = True
            raise
        except Exception as exc:  # defensive: never leave a batch unaccounted for
            logger.error("log destination %s: delivery error %s", lane.label, type(exc).__name__)
            if not resolved:
                self._resolve_failed(lane, len(batch))
        finally:
            lane.in_flight = 0

    def _build(self, lane: _Lane) -> Sink:
        assert self._client is not None
        spec = self._registry.normalize(lane.spec)
        resolved = resolve_vars(spec.callback_vars, self._environ)
        lane.add_secrets(_resolved_secrets(spec.callback_vars, resolved))
        ctx = SinkContext(http=self._client, team_id=lane.ctx_team_id, timeout=self._emit_timeout)
        return self._registry.build(spec, resolved, ctx)

    def _classify(self, exc: Exception) -> tuple[bool, str, float | None]:
        if isinstance(exc, SinkError):
            return exc.retryable, exc.reason, exc.retry_after
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return True, f"timed out after {self._emit_timeout:g}s", None
        if isinstance(exc, (httpx.TransportError, ConnectionError)):
            return True, _describe(exc), None
        return False, _describe(exc), None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self._backoff_max, self._backoff_base * 2.0 ** (attempt - 1))
        delay *= self._random.uniform(0.5, 1.0)  # jitter: replicas that failed together spread
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return min(delay, self._backoff_max)

    def _note_error(self, lane: _Lane, reason: str, *, quiet: bool = False) -> None:
        text = _scrub(reason, lane.secrets)
        if text != lane.last_error and not quiet:
            logger.warning("log destination %s: %s", lane.label, text)
        lane.last_error = text

    # -- accounting -----------------------------------------------------------------------------

    def _resolve_sent(self, lane: _Lane, count: int) -> None:
        lane.sent += count
        self._sent_total += count
        self._resolve(lane, count)

    def _resolve_failed(self, lane: _Lane, count: int) -> None:
        lane.failed += count
        self._lost_total += count
        self._resolve(lane, count)

    def _resolve_dropped(self, lane: _Lane, reason: str, count: int) -> None:
        if count <= 0:
            return
        lane.dropped[reason] = lane.dropped.get(reason, 0) + count
        self._lost_total += count
        self._resolve(lane, count)

    def _resolve(self, lane: _Lane, count: int) -> None:
        lane.done += count
        self._done_total += count
        self._notify_progress()

    def _pending(self) -> int:
        return len(self._intake) + self._enqueued_total - self._done_total

    def _notify_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    async def _wait_progress(self, deadline: float | None) -> bool:
        """Wait for any progress; False when the deadline passed."""
        if self._progress is None:
            self._progress = asyncio.Event()
        event = self._progress
        if deadline is None:
            await event.wait()
            return True
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(event.wait(), remaining)
        except (asyncio.TimeoutError, TimeoutError):
            return False
        return True

    async def _wait_until(self, predicate: Callable[[], bool], deadline: float | None) -> bool:
        while not predicate():
            if not await self._wait_progress(deadline):
                return predicate()
        return True

    async def _wait_lanes(self, lanes: list[tuple[_Lane, int]], deadline: float | None) -> bool:
        while True:
            lanes = [(lane, target) for lane, target in lanes if lane.done < target]
            if not lanes:
                return True
            if not await self._wait_progress(deadline):
                return all(lane.done >= target for lane, target in lanes)

    # -- shutdown -------------------------------------------------------------------------------

    def _abandon_queued(self) -> int:
        """Count what is still queued as dropped at shutdown; returns the undecoded exchanges."""
        abandoned = len(self._intake)
        self._abandoned_exchanges += abandoned
        self._intake.clear()
        self._intake_bytes = 0
        for lane in self._lanes.values():
            if lane.queue:
                count = len(lane.queue)
                lane.queue.clear()
                self._lane_bytes -= lane.bytes
                lane.bytes = 0
                self._resolve_dropped(lane, "shutdown", count)
        self._waiting.clear()
        return abandoned

    async def _close_all_sinks(self, timeout: float) -> None:
        closing = []
        for lane in self._live.values():
            if lane.sink is not None:
                sink, lane.sink = lane.sink, None
                closing.append(self._close_sink(sink, lane.label, lane.secrets, timeout))
        self._live.clear()
        for sink, owner in self._unclosed.values():
            closing.append(self._close_sink(sink, owner.label, owner.secrets, timeout))
        self._unclosed.clear()
        if closing:
            await asyncio.gather(*closing)

    async def _close_sink(
        self, sink: Sink, label: str, secrets: Iterable[str], timeout: float
    ) -> None:
        try:
            await _with_timeout(sink.aclose(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "log destination %s: closing failed: %s", label, _scrub(_describe(exc), secrets)
            )

    def _log_shutdown(self) -> None:
        losses = []
        for lane in self._lanes.values():
            lost = lane.failed + sum(lane.dropped.values())
            if lost:
                reasons = {"failed": lane.failed, **lane.dropped} if lane.failed else lane.dropped
                detail = ", ".join(f"{k}={v}" for k, v in reasons.items() if v)
                losses.append((lost, f"{lane.label}={lost} ({detail})"))
        losses.sort(key=lambda item: -item[0])
        intake = {
            "queue_full": self._dropped_queue_full,
            "not_running": self._dropped_not_running,
            "decode_errors": self._decode_errors,
            "abandoned": self._abandoned_exchanges,
        }
        intake_lost = {k: v for k, v in intake.items() if v}
        retired_lost = self._retired["failed"] + self._retired["dropped"]
        if not losses and not intake_lost and not retired_lost:
            logger.info(
                "log delivery stopped: every record was delivered (%d sent)", self._sent_total
            )
            return
        parts = [text for _lost, text in losses[:_MAX_LOGGED_DESTINATIONS]]
        if len(losses) > _MAX_LOGGED_DESTINATIONS:
            parts.append(f"+{len(losses) - _MAX_LOGGED_DESTINATIONS} more destinations")
        if retired_lost:
            parts.append(f"retired destinations={retired_lost}")
        if intake_lost:
            parts.append("exchanges: " + ", ".join(f"{k}={v}" for k, v in intake_lost.items()))
        logger.warning(
            "log delivery stopped; %d sent, not delivered: %s", self._sent_total, "; ".join(parts)
        )


if sys.version_info >= (3, 11):

    async def _with_timeout(awaitable: Awaitable[None], timeout: float) -> None:
        # asyncio.timeout runs the awaitable in the current task: no extra task per emit.
        async with asyncio.timeout(timeout):
            await awaitable

else:  # pragma: no cover - Python 3.10

    async def _with_timeout(awaitable: Awaitable[None], timeout: float) -> None:
        await asyncio.wait_for(awaitable, timeout)


def _lane_bytes(lane: _Lane) -> int:
    return lane.bytes


def _resolved_secrets(raw: Mapping[str, str], resolved: Mapping[str, str]) -> list[str]:
    """Secret values after resolution: secret-named vars and anything read from the environment."""
    values = secret_values(resolved)
    values.extend(resolved[k] for k, v in raw.items() if is_env_ref(v) and resolved.get(k))
    return values


def _secret_fragments(values: Iterable[str]) -> set[str]:
    """Secret values plus the password of any URL among them.

    An error message may quote a URL only in part (``https://user:pw@host`` without its path),
    so the password alone is scrubbed too.
    """
    fragments: set[str] = set()
    for value in values:
        if not value:
            continue
        fragments.add(value)
        if "@" in value and "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                fragments.add(password)
                fragments.add(unquote(password))
    return fragments


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SinkError):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and secret in text:
            text = text.replace(secret, _SCRUBBED)
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 1] + "…"
    return text


def _record_size(record: LogRecord) -> int:
    """A cheap estimate of a decoded record's footprint, for records submitted already decoded."""
    size = 512
    for text in (record.output, record.raw_request, record.raw_response, record.error):
        if text:
            size += len(text)
    if isinstance(record.messages, str):
        size += len(record.messages)
    elif record.messages is not None:
        size += len(repr(record.messages))
    return size
