"""The dispatcher: intake bounds, lanes, batching, retries, flush/stop, eviction and stats."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx
import pytest

from team_logging_middleware import dispatcher as dispatcher_module
from team_logging_middleware._types import Destination, Plan
from team_logging_middleware.dispatcher import Dispatcher, FlushReport
from team_logging_middleware.errors import SinkError
from team_logging_middleware.records import Exchange, LogRecord
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks.base import Sink, SinkContext, SinkRegistry, SinkType
from team_logging_middleware.testing import (
    MemorySink,
    destination_for,
    sample_record,
    wait_for,
)

LOGGER = "team_logging_middleware.dispatcher"


def memory_spec(destination: str = "a", **vars_: str) -> CallbackSpec:
    return CallbackSpec(
        callback_name="memory",
        callback_type="success_and_failure",
        callback_vars={"destination": destination, **vars_},
    )


def dest(destination: str = "a", **vars_: str) -> Destination:
    return destination_for(memory_spec(destination, **vars_))


def label(d: Destination) -> str:
    return f"{d.spec.callback_name}:{d.identity[:8]}"


def entry(d: Dispatcher, target: Destination) -> dict[str, Any]:
    """The stats entry of one destination ({} until the worker has seen it)."""
    stats: dict[str, Any] = d.stats()["destinations"].get(label(target), {})
    return stats


def rec(i: int, *, size: int = 0, team: str = "team-a", outcome: str = "ok") -> LogRecord:
    # _record_size() is 512 + len(output): ``size`` makes a record weigh exactly that many bytes.
    output = "x" * max(size - 512, 0)
    return sample_record(
        request_id=f"r{i}", team_id=team, output=output, outcome=outcome, messages=None
    )


def plan(
    success: Sequence[Destination] = (),
    failure: Sequence[Destination] = (),
    *,
    team: str = "team-a",
    enabled: bool = True,
) -> Plan:
    return Plan(
        team_id=team, logging_enabled=enabled, success=tuple(success), failure=tuple(failure)
    )


def exchange(p: Plan, i: int, *, body: bytes = b"", outcome: str = "ok") -> Exchange:
    now = time.perf_counter()
    return Exchange(
        request_id=f"r{i}",
        method="POST",
        path="/v1/chat/completions",
        start_time=time.time(),
        start_perf=now,
        plan=p,
        caller=None,
        request_body=body,
        status=200 if outcome == "ok" else 500,
        end_perf=now,
        outcome=outcome,  # type: ignore[arg-type]
    )


def simple_decode(ex: Exchange) -> LogRecord:
    return sample_record(
        request_id=ex.request_id,
        team_id=ex.plan.team_id,
        outcome=ex.outcome,
        status_code=ex.status,
    )


def ids(records: Sequence[LogRecord]) -> list[str]:
    return [r.request_id for r in records]


MakeDispatcher = Callable[..., Awaitable[Dispatcher]]


@pytest.fixture
def memory() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def make_dispatcher(memory: MemorySink) -> AsyncIterator[MakeDispatcher]:
    made: list[Dispatcher] = []

    async def make(*, start: bool = True, **options: Any) -> Dispatcher:
        registry = options.pop("registry", None) or SinkRegistry([memory.sink_type])
        options.setdefault("decode", simple_decode)
        options.setdefault("flush_interval", 60.0)  # tests flush explicitly unless they say so
        dispatcher = Dispatcher(registry, **options)
        if start:
            await dispatcher.start()
        made.append(dispatcher)
        return dispatcher

    yield make
    memory.release()
    for dispatcher in made:
        await dispatcher.stop(timeout=2.0)


# -- batching -----------------------------------------------------------------------------------


async def test_batches_by_count(make_dispatcher: MakeDispatcher, memory: MemorySink) -> None:
    d = await make_dispatcher(batch_size=3)
    for i in range(7):
        assert d.submit_record(rec(i), [dest("a")])
    await wait_for(lambda: len(memory.records("a")) == 6)
    assert [len(b) for b in memory.batches("a")] == [3, 3]  # the 7th waits for the interval
    report = await d.flush(timeout=5)
    assert report == FlushReport(delivered=1, dropped=0, pending=0, timed_out=False)
    assert [len(b) for b in memory.batches("a")] == [3, 3, 1]
    assert ids(memory.records("a")) == [f"r{i}" for i in range(7)]


async def test_batches_by_bytes(make_dispatcher: MakeDispatcher, memory: MemorySink) -> None:
    d = await make_dispatcher(batch_size=100, max_batch_bytes=2500)
    for i in range(5):
        d.submit_record(rec(i, size=1000), [dest("a")])
    await wait_for(lambda: len(memory.records("a")) == 4)
    assert [len(b) for b in memory.batches("a")] == [2, 2]
    await d.flush(timeout=5)
    assert [len(b) for b in memory.batches("a")] == [2, 2, 1]


async def test_partial_batch_is_sent_after_the_flush_interval(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(batch_size=100, flush_interval=0.05)
    d.submit_record(rec(0), [dest("a")])
    d.submit_record(rec(1), [dest("a")])
    await wait_for(lambda: len(memory.records("a")) == 2)  # no flush() call
    assert [len(b) for b in memory.batches("a")] == [2]


async def test_interval_is_measured_with_the_injected_clock(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    now = [1000.0]
    d = await make_dispatcher(batch_size=100, flush_interval=30.0, timer=lambda: now[0])
    d.submit_record(rec(0), [dest("a")])
    await wait_for(lambda: entry(d, dest("a")).get("in_queue") == 1)
    now[0] += 31.0
    # The clock only matters when the lane wakes up; a new record wakes it.
    d.submit_record(rec(1), [dest("a")])
    await wait_for(lambda: len(memory.records("a")) == 2)
    assert [len(b) for b in memory.batches("a")] == [2]


# -- retries and failures -----------------------------------------------------------------------


async def test_retryable_errors_are_retried_with_backoff(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(backoff_base=0.02, backoff_max=1.0)
    memory.fail(SinkError("HTTP 503", retryable=True, status=503), times=2)
    d.submit_record(rec(0), [dest("a")])
    report = await d.flush(timeout=5)
    assert report.delivered == 1 and report.dropped == 0
    assert [c.ok for c in memory.emits] == [False, False, True]
    gaps = [b.at - a.at for a, b in zip(memory.emits, memory.emits[1:], strict=False)]
    # Exponential with jitter in [0.5, 1]: at least 0.01 s, then at least 0.02 s.
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02
    stats = entry(d, dest("a"))
    assert stats["retried"] == 2 and stats["sent"] == 1 and stats["failed"] == 0
    assert stats["last_error"] == "HTTP 503"


async def test_retry_after_is_honoured(make_dispatcher: MakeDispatcher, memory: MemorySink) -> None:
    d = await make_dispatcher(backoff_base=0.001, backoff_max=5.0)
    memory.fail(SinkError("HTTP 429", retryable=True, retry_after=0.3, status=429), times=1)
    d.submit_record(rec(0), [dest("a")])
    await d.flush(timeout=5)
    first, second = memory.emits
    assert not first.ok and second.ok
    assert second.at - first.at >= 0.3


async def test_retry_after_is_capped_by_backoff_max(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(backoff_base=0.001, backoff_max=0.05)
    memory.fail(SinkError("HTTP 429", retryable=True, retry_after=3600), times=1)
    d.submit_record(rec(0), [dest("a")])
    report = await d.flush(timeout=5)
    assert report.delivered == 1 and not report.timed_out


async def test_retries_give_up_after_max_retries(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(max_retries=2, backoff_base=0.001)
    memory.fail(SinkError("HTTP 502", retryable=True, status=502))
    d.submit_record(rec(0), [dest("a")])
    report = await d.flush(timeout=5)
    assert report == FlushReport(delivered=0, dropped=1, pending=0, timed_out=False)
    assert len(memory.emits) == 3
    stats = entry(d, dest("a"))
    assert stats["dropped"] == {"retries_exhausted": 1}
    assert stats["retried"] == 2
    assert stats["last_error"] == "HTTP 502 (gave up after 2 retries)"


async def test_non_retryable_errors_count_as_failed_once(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(backoff_base=0.001)
    memory.fail(SinkError("HTTP 401", status=401), times=1)
    d.submit_record(rec(0), [dest("a")])
    d.submit_record(rec(1), [dest("a")])
    report = await d.flush(timeout=5)
    assert report.dropped == 2 and report.delivered == 0  # one batch of two, refused
    assert len(memory.emits) == 1
    stats = entry(d, dest("a"))
    assert stats["failed"] == 2 and stats["retried"] == 0 and stats["last_error"] == "HTTP 401"
    d.submit_record(rec(2), [dest("a")])  # the destination is still usable afterwards
    assert (await d.flush(timeout=5)).delivered == 1


async def test_any_sink_exception_is_contained_and_counted(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher()
    memory.fail(RuntimeError("boom"), times=1)
    d.submit_record(rec(0), [dest("a")])
    report = await d.flush(timeout=5)
    assert report.dropped == 1
    stats = entry(d, dest("a"))
    assert stats["failed"] == 1 and stats["last_error"] == "RuntimeError: boom"


async def test_connection_errors_are_retried(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(backoff_base=0.001)
    memory.fail(httpx.ConnectError("All connection attempts failed"), times=1)
    d.submit_record(rec(0), [dest("a")])
    assert (await d.flush(timeout=5)).delivered == 1
    assert entry(d, dest("a"))["retried"] == 1


async def test_emit_timeout_is_retried_then_dropped(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(emit_timeout=0.05, max_retries=1, backoff_base=0.001)
    memory.hang(["a"])
    d.submit_record(rec(0), [dest("a")])
    report = await d.flush(timeout=5)
    assert report.dropped == 1
    stats = entry(d, dest("a"))
    assert stats["dropped"] == {"retries_exhausted": 1}
    assert stats["last_error"] == "timed out after 0.05s (gave up after 1 retries)"


async def test_a_hanging_destination_does_not_delay_another(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(emit_timeout=30.0, flush_interval=0.01)
    memory.hang(["slow"])
    for i in range(3):
        d.submit_record(rec(i), [dest("slow"), dest("fast")])
    await wait_for(lambda: len(memory.records("fast")) == 3)
    assert memory.records("slow") == []
    assert entry(d, dest("slow"))["in_queue"] == 3
    # More traffic for the healthy destination still flows while the other one hangs.
    d.submit_record(rec(3), [dest("fast")])
    await wait_for(lambda: len(memory.records("fast")) == 4)
    memory.release()
    await wait_for(lambda: len(memory.records("slow")) == 3)


# -- bounds -------------------------------------------------------------------------------------


async def test_intake_is_bounded_in_bytes(make_dispatcher: MakeDispatcher) -> None:
    d = await make_dispatcher(max_queue_bytes=2000)
    p = plan([dest("a")])
    body = b"x" * 488  # size_hint() = 512 + 488 = 1000
    # Submitting is synchronous: the worker cannot drain the queue between these calls.
    assert d.submit(exchange(p, 0, body=body))
    assert d.submit(exchange(p, 1, body=body))
    assert not d.submit(exchange(p, 2, body=body))
    stats = d.stats()
    assert stats["dropped_queue_full"] == 1 and stats["queued_bytes"] == 2000
    await d.flush(timeout=5)
    assert d.stats()["queued_bytes"] == 0
    assert d.submit(exchange(p, 3, body=body))  # room again once drained


async def test_submit_before_start_is_refused_counted_and_warned_once(
    make_dispatcher: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    d = await make_dispatcher(start=False)
    p = plan([dest("a")])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not d.submit(exchange(p, 0))
        assert not d.submit(exchange(p, 1))
        assert not d.submit_record(rec(2), [dest("a")])
    assert d.stats()["dropped_not_running"] == 3
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "not running" in warnings[0].getMessage()


async def test_a_plan_that_logs_nowhere_is_not_queued(make_dispatcher: MakeDispatcher) -> None:
    d = await make_dispatcher()
    assert d.submit(exchange(plan([dest("a")], enabled=False), 0))  # logging disabled (GDPR)
    assert d.submit(exchange(plan(), 1))  # no destination at all
    assert d.stats()["submitted"] == 0


async def test_submit_never_raises(make_dispatcher: MakeDispatcher) -> None:
    class BrokenExchange(Exchange):
        __slots__ = ()

        def size_hint(self) -> int:
            raise RuntimeError("broken")

    d = await make_dispatcher()
    broken = BrokenExchange(
        request_id="r0",
        method="POST",
        path="/",
        start_time=0.0,
        start_perf=0.0,
        plan=plan([dest("a")]),
        caller=None,
    )
    assert d.submit(broken) is False


async def test_a_full_lane_drops_its_oldest_records(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(batch_size=1, max_lane_bytes=3000, emit_timeout=30.0)
    memory.hang(["a"])
    d.submit_record(rec(0, size=1000), [dest("a")])
    # r0 is in flight (taken off the queue) and its emit hangs.
    await wait_for(lambda: entry(d, dest("a")).get("queued_bytes") == 0)
    assert entry(d, dest("a"))["in_queue"] == 1
    for i in range(1, 10):
        d.submit_record(rec(i, size=1000), [dest("a")])
    await wait_for(lambda: entry(d, dest("a")).get("dropped", {}).get("buffer_full") == 6)
    assert entry(d, dest("a"))["queued_bytes"] == 3000
    memory.release()
    await d.flush(timeout=5)
    assert ids(memory.records("a")) == ["r0", "r7", "r8", "r9"]


async def test_all_lanes_together_are_bounded_by_max_queue_bytes(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(max_queue_bytes=5000, max_lane_bytes=4000)
    for i in range(1, 5):
        d.submit_record(rec(i, size=1000), [dest("a")])
    # Let the intake drain into the lane first (the intake has the same 5000-byte bound).
    await wait_for(lambda: d.stats()["lane_bytes"] == 4000)
    for i in range(5, 7):
        d.submit_record(rec(i, size=1000), [dest("b")])
    await d.flush(timeout=5)
    # 6000 bytes for a 5000-byte budget: the fullest lane ("a") lost its oldest record.
    assert ids(memory.records("a")) == ["r2", "r3", "r4"]
    assert ids(memory.records("b")) == ["r5", "r6"]
    assert entry(d, dest("a"))["dropped"] == {"buffer_full": 1}


# -- decoding and routing -----------------------------------------------------------------------


async def test_records_are_routed_by_outcome(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher()
    p = plan(success=[dest("ok")], failure=[dest("errors")])
    d.submit(exchange(p, 0))
    d.submit(exchange(p, 1, outcome="http_error"))
    d.submit(exchange(p, 2, outcome="client_disconnected"))
    report = await d.flush(timeout=5)
    assert report.delivered == 3
    assert ids(memory.records("ok")) == ["r0"]
    assert ids(memory.records("errors")) == ["r1", "r2"]


async def test_a_record_for_two_entries_of_one_target_is_delivered_once(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher()
    team_entry = dest("a")
    key_entry = Destination(spec=team_entry.spec, source="key", identity=team_entry.identity)
    d.submit_record(rec(0), [team_entry, key_entry])
    assert (await d.flush(timeout=5)).delivered == 1
    assert ids(memory.records("a")) == ["r0"]


async def test_decode_errors_are_counted_and_do_not_stop_the_worker(
    make_dispatcher: MakeDispatcher, memory: MemorySink, caplog: pytest.LogCaptureFixture
) -> None:
    def decode(ex: Exchange) -> LogRecord:
        if ex.request_id == "r1":
            raise ValueError("unparseable body: secret prompt text")
        return simple_decode(ex)

    d = await make_dispatcher(decode=decode)
    p = plan([dest("a")])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(3):
            d.submit(exchange(p, i))
        report = await d.flush(timeout=5)
    assert report.delivered == 2 and report.dropped == 1
    assert d.stats()["decode_errors"] == 1
    assert ids(memory.records("a")) == ["r0", "r2"]
    assert "secret prompt text" not in caplog.text


async def _ticks_seen_by_decodes(
    make_dispatcher: MakeDispatcher, count: int, busy_seconds: float = 0.0
) -> list[int]:
    """Decode ``count`` exchanges (each busy for ``busy_seconds``) while a task counts loop turns;
    returns the count each decode saw, so the caller can tell how often the worker yielded."""
    ticks = 0
    seen: list[int] = []

    def decode(ex: Exchange) -> LogRecord:
        seen.append(ticks)
        start = time.perf_counter()
        while time.perf_counter() - start < busy_seconds:
            pass
        return simple_decode(ex)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    d = await make_dispatcher(decode=decode)
    p = plan([dest("a")])
    for i in range(count):
        d.submit(exchange(p, i))
    task = asyncio.create_task(ticker())
    try:
        await d.flush(timeout=5)
    finally:
        task.cancel()
    return seen


async def test_decoding_yields_to_other_tasks(make_dispatcher: MakeDispatcher) -> None:
    seen = await _ticks_seen_by_decodes(make_dispatcher, 200)
    assert len(seen) == 200
    assert len(set(seen)) > 5  # the ticker ran many times while the 200 were decoded


async def test_slow_decodes_yield_after_each_one(make_dispatcher: MakeDispatcher) -> None:
    # Each decode takes longer than the worker's yield budget, so the worker must let other
    # tasks run between every two of them, well before the count-based cap.
    count = 6
    assert count < dispatcher_module._YIELD_EVERY
    seen = await _ticks_seen_by_decodes(
        make_dispatcher, count, busy_seconds=2 * dispatcher_module._YIELD_AFTER_S
    )
    assert len(seen) == count
    assert seen == sorted(set(seen))  # strictly increasing: the ticker ran between every two


async def test_tasks_do_not_inherit_the_callers_contextvars(
    make_dispatcher: MakeDispatcher,
) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("request_scoped")
    observed: list[str] = []

    class Probe:
        async def emit(self, batch: Sequence[LogRecord]) -> None:
            observed.append(var.get("unset"))

        async def aclose(self) -> None:
            return None

    def factory(vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        return Probe()

    probe = SinkType(name="probe", factory=factory)
    var.set("started-inside-a-request")
    d = await make_dispatcher(registry=SinkRegistry([probe]))
    var.set("another-request")
    d.submit_record(rec(0), [destination_for(CallbackSpec(callback_name="probe"))])
    await d.flush(timeout=5)
    assert observed == ["unset"]


# -- flush and stop -----------------------------------------------------------------------------


async def test_flush_delivers_everything_submitted(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(batch_size=10)
    targets = [dest("a"), dest("b"), dest("c")]
    for i in range(250):
        d.submit_record(rec(i), targets)
    report = await d.flush(timeout=10)
    assert report == FlushReport(delivered=750, dropped=0, pending=0, timed_out=False)
    for name in ("a", "b", "c"):
        assert ids(memory.records(name)) == [f"r{i}" for i in range(250)]


async def test_flush_with_a_deadline_reports_what_is_pending(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(emit_timeout=30.0, batch_size=2)
    memory.hang(["a"])
    for i in range(5):
        d.submit_record(rec(i), [dest("a")])
    report = await d.flush(timeout=0.1)
    assert report == FlushReport(delivered=0, dropped=0, pending=5, timed_out=True)


async def test_stop_delivers_everything_queued(
    make_dispatcher: MakeDispatcher, memory: MemorySink, caplog: pytest.LogCaptureFixture
) -> None:
    d = await make_dispatcher(batch_size=100)  # flush_interval=60: only stop() sends them
    for i in range(20):
        d.submit_record(rec(i), [dest("a")])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = await d.stop(timeout=5)
    assert report == FlushReport(delivered=20, dropped=0, pending=0, timed_out=False)
    assert len(memory.records("a")) == 20
    assert memory.built == memory.closed == 1
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == ["log delivery stopped: every record was delivered (20 sent)"]


async def test_stop_with_a_deadline_reports_and_logs_what_was_abandoned(
    make_dispatcher: MakeDispatcher, memory: MemorySink, caplog: pytest.LogCaptureFixture
) -> None:
    d = await make_dispatcher(emit_timeout=30.0, batch_size=2, flush_interval=0.01)
    memory.hang(["a"])
    for i in range(5):
        d.submit_record(rec(i), [dest("a"), dest("b")])
    await wait_for(lambda: len(memory.records("b")) == 5)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = await d.stop(timeout=0.2)
    assert report.timed_out and report.pending == 5 and report.dropped == 5
    stats = d.stats()
    assert stats["destinations"][label(dest("a"))]["dropped"] == {"shutdown": 5}
    assert stats["pending"] == 0 and stats["tasks"] == 0 and not stats["running"]
    assert memory.built == memory.closed == 2
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1
    assert (
        lines[0]
        == f"log delivery stopped; 5 sent, not delivered: {label(dest('a'))}=5 (shutdown=5)"
    )


async def test_start_and_stop_are_idempotent(make_dispatcher: MakeDispatcher) -> None:
    d = await make_dispatcher()
    await d.start()
    assert d.stats()["tasks"] == 1  # one worker, not two
    d.submit_record(rec(0), [dest("a")])
    first = await d.stop(timeout=5)
    second = await d.stop(timeout=5)
    assert first is second and first.delivered == 1
    assert not d.submit_record(rec(1), [dest("a")])
    assert d.stats()["dropped_not_running"] == 1


async def test_concurrent_stops_share_one_shutdown(make_dispatcher: MakeDispatcher) -> None:
    d = await make_dispatcher()
    d.submit_record(rec(0), [dest("a")])
    a, b = await asyncio.gather(d.stop(timeout=5), d.stop(timeout=5))
    assert a is b and a.delivered == 1


async def test_one_shared_http_client_owned_and_closed(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher()
    for name in ("a", "b", "c"):
        d.submit_record(rec(0), [dest(name)])
    await d.flush(timeout=5)
    clients = {id(ctx.http) for ctx in memory.contexts}
    assert len(clients) == 1
    assert all(ctx.team_id == "team-a" and ctx.timeout == 10.0 for ctx in memory.contexts)
    await d.stop(timeout=5)
    assert memory.contexts[0].http.is_closed


async def test_an_injected_http_client_is_used_and_left_open(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    async with httpx.AsyncClient() as client:
        d = await make_dispatcher(http_client=client)
        d.submit_record(rec(0), [dest("a")])
        await d.stop(timeout=5)
        assert memory.contexts[0].http is client and not client.is_closed


async def test_global_defaults_get_no_team_in_their_sink_context(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher()
    default = destination_for(memory_spec("shared"), source="default")
    d.submit_record(rec(0, team="team-a"), [default])
    d.submit_record(rec(1, team="team-b"), [default])
    await d.flush(timeout=5)
    assert [ctx.team_id for ctx in memory.contexts] == [None]
    assert d.stats()["destinations"][label(default)]["team_ids"] == ["team-a", "team-b"]


# -- many destinations --------------------------------------------------------------------------


class CountingSinks:
    """A custom sink type that counts live sinks and the tasks alive while it emits."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.live = 0
        self.max_live = 0
        self.built = 0
        self.closed = 0
        self.max_tasks = 0
        self.sink_type = SinkType(
            name="counting", factory=self.build, required_vars=frozenset({"target"})
        )

    def build(self, vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        self.built += 1
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        return _CountingSink(self, vars_["target"])


class _CountingSink:
    def __init__(self, owner: CountingSinks, target: str) -> None:
        self.owner = owner
        self.target = target

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        self.owner.max_tasks = max(self.owner.max_tasks, len(asyncio.all_tasks()))
        self.owner.records.setdefault(self.target, []).extend(r.request_id for r in batch)

    async def aclose(self) -> None:
        self.owner.live -= 1
        self.owner.closed += 1


async def test_a_thousand_destinations_with_constant_tasks(
    make_dispatcher: MakeDispatcher,
) -> None:
    counting = CountingSinks()
    d = await make_dispatcher(
        registry=SinkRegistry([counting.sink_type]), max_live_sinks=50, flush_interval=0.01
    )
    targets = [
        destination_for(CallbackSpec(callback_name="counting", callback_vars={"target": str(n)}))
        for n in range(1000)
    ]
    baseline = len(asyncio.all_tasks())  # this test's task (the worker is already running)
    for round_ in range(2):
        for n, target in enumerate(targets):
            assert d.submit_record(rec(round_ * 1000 + n), [target])
    report = await d.flush(timeout=60)
    assert report == FlushReport(delivered=2000, dropped=0, pending=0, timed_out=False)
    assert all(counting.records[str(n)] == [f"r{n}", f"r{1000 + n}"] for n in range(1000))
    assert counting.max_live <= 50
    # baseline + at most 50 senders + flush's own wait: constant, whatever the destination count.
    assert counting.max_tasks <= baseline + 51
    assert d.stats()["tasks"] <= 51
    assert counting.closed == counting.built - counting.live >= 950
    stats = d.stats()
    assert len(stats["destinations"]) == 1000  # counters of evicted destinations survive
    assert sum(s["sent"] for s in stats["destinations"].values()) == 2000
    assert stats["lane_bytes"] == 0 and stats["live_sinks"] <= 50
    await d.stop(timeout=5)
    assert counting.live == 0


async def test_evicted_sinks_are_closed_and_rebuilt_on_demand(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher(max_live_sinks=2)
    for name in ("a", "b", "c"):
        d.submit_record(rec(0), [dest(name)])
        await d.flush(timeout=5)
    assert memory.built == 3 and memory.closed == 1  # "a" was the least recently used
    assert {n: s["live"] for n, s in d.stats()["destinations"].items()} == {
        label(dest("a")): False,
        label(dest("b")): True,
        label(dest("c")): True,
    }
    d.submit_record(rec(1), [dest("a")])
    await d.flush(timeout=5)
    assert memory.built == 4 and memory.closed == 2
    assert entry(d, dest("a"))["sent"] == 2


# -- build failures, secrets and connection tests -----------------------------------------------


SECRET = "sk-live-0123456789abcdef"
ENV_SECRET = "envsecret-ZZZZ9999"


@pytest.fixture
def env_memory() -> MemorySink:
    return MemorySink("envmem", optional_vars=("destination", "api_key", "endpoint"))


def env_spec(endpoint: str = "os.environ/TLM_TEST_ENDPOINT") -> CallbackSpec:
    return CallbackSpec(
        callback_name="envmem",
        callback_vars={"destination": "s", "api_key": SECRET, "endpoint": endpoint},
    )


async def test_secrets_never_reach_stats_or_logs(
    make_dispatcher: MakeDispatcher, env_memory: MemorySink, caplog: pytest.LogCaptureFixture
) -> None:
    d = await make_dispatcher(
        registry=SinkRegistry([env_memory.sink_type]),
        environ={"TLM_TEST_ENDPOINT": f"https://user:{ENV_SECRET}@collector.example"},
        backoff_base=0.001,
        max_retries=1,
    )
    # A careless sink quoting its credentials in the error.
    env_memory.fail(
        SinkError(f"HTTP 401: key {SECRET} refused by https://user:{ENV_SECRET}@collector")
    )
    target = destination_for(env_spec())
    with caplog.at_level(logging.DEBUG):
        d.submit_record(rec(0), [target])
        await d.flush(timeout=5)
        env_memory.fail(RuntimeError(f"retry me {SECRET}"))
        d.submit_record(rec(1), [target])
        await d.flush(timeout=5)
        stats = d.stats()
        await d.stop(timeout=5)
    dumped = json.dumps(stats) + json.dumps(d.stats())
    for secret in (SECRET, ENV_SECRET):
        assert secret not in dumped
        assert secret not in caplog.text
    entry = stats["destinations"][label(target)]
    assert entry["last_error"] == "RuntimeError: retry me ****"
    assert "vars" not in json.dumps(entry)


async def test_a_destination_that_cannot_be_built_drops_its_records(
    make_dispatcher: MakeDispatcher, env_memory: MemorySink
) -> None:
    d = await make_dispatcher(registry=SinkRegistry([env_memory.sink_type]), environ={})
    target = destination_for(env_spec("os.environ/TLM_MISSING_ENDPOINT"))
    d.submit_record(rec(0), [target])
    d.submit_record(rec(1), [target])
    report = await d.flush(timeout=5)
    assert report.dropped == 2 and report.delivered == 0
    entry = d.stats()["destinations"][label(target)]
    assert entry["dropped"] == {"build_failed": 2}
    assert "TLM_MISSING_ENDPOINT" in entry["last_error"] and "not set" in entry["last_error"]


async def test_an_unknown_callback_is_a_build_failure(make_dispatcher: MakeDispatcher) -> None:
    d = await make_dispatcher()
    ghost = destination_for(CallbackSpec(callback_name="ghost"))
    d.submit_record(rec(0), [ghost])
    assert (await d.flush(timeout=5)).dropped == 1
    assert d.stats()["destinations"][label(ghost)]["dropped"] == {"build_failed": 1}


async def test_check_passes_fails_and_closes(
    make_dispatcher: MakeDispatcher, memory: MemorySink
) -> None:
    d = await make_dispatcher()
    await d.check(memory_spec("a"), "team-a")
    memory.check_error = SinkError("HTTP 401: wrong key", status=401)
    with pytest.raises(SinkError) as info:
        await d.check(memory_spec("a"), "team-a")
    assert info.value.reason == "HTTP 401: wrong key" and info.value.status == 401
    assert memory.built == memory.closed == 2
    assert memory.contexts[0].team_id == "team-a"


async def test_check_works_before_start(make_dispatcher: MakeDispatcher) -> None:
    d = await make_dispatcher(start=False)
    await d.check(memory_spec("a"), None)


async def test_check_reports_untestable_and_unbuildable_entries(
    make_dispatcher: MakeDispatcher, env_memory: MemorySink
) -> None:
    def factory(vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        return _CountingSink(CountingSinks(), "x")

    plain = SinkType(name="plain", factory=factory)
    d = await make_dispatcher(registry=SinkRegistry([plain, env_memory.sink_type]), environ={})
    with pytest.raises(SinkError, match="callback 'plain' has no connection test"):
        await d.check(CallbackSpec(callback_name="plain"), None)
    with pytest.raises(SinkError, match="TLM_TEST_ENDPOINT") as info:
        await d.check(env_spec(), None)
    assert SECRET not in str(info.value)
    with pytest.raises(SinkError, match="unknown callback 'ghost'"):
        await d.check(CallbackSpec(callback_name="ghost"), None)


async def test_check_scrubs_secrets_and_times_out(
    make_dispatcher: MakeDispatcher, env_memory: MemorySink
) -> None:
    d = await make_dispatcher(
        registry=SinkRegistry([env_memory.sink_type]),
        environ={"TLM_TEST_ENDPOINT": ENV_SECRET},
        emit_timeout=0.05,
    )
    env_memory.check_error = SinkError(f"refused {SECRET} at {ENV_SECRET}")
    with pytest.raises(SinkError) as info:
        await d.check(env_spec(), None)
    assert info.value.reason == "refused **** at ****"
    assert info.value.__suppress_context__  # the unscrubbed original is not chained

    class Hanging:
        async def emit(self, batch: Sequence[LogRecord]) -> None:
            return None

        async def check(self) -> None:
            await asyncio.Event().wait()

        async def aclose(self) -> None:
            return None

    def factory(vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        return Hanging()

    d2 = await make_dispatcher(
        registry=SinkRegistry([SinkType("hang", factory)]), emit_timeout=0.05
    )
    with pytest.raises(SinkError, match=r"timed out after 0.05s") as timed_out:
        await d2.check(CallbackSpec(callback_name="hang"), None)
    assert timed_out.value.retryable


async def test_counters_of_idle_destinations_are_folded_beyond_the_tracking_bound(
    make_dispatcher: MakeDispatcher, memory: MemorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "_MAX_TRACKED_DESTINATIONS", 5)
    d = await make_dispatcher(max_live_sinks=2)
    for n in range(8):
        d.submit_record(rec(n), [dest(f"d{n}")])
        await d.flush(timeout=5)
    stats = d.stats()
    assert len(stats["destinations"]) == 5
    assert stats["retired"]["destinations"] == 3
    assert stats["retired"]["sent"] + sum(e["sent"] for e in stats["destinations"].values()) == 8


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Dispatcher(SinkRegistry(), batch_size=0)
    with pytest.raises(ValueError, match="flush_interval"):
        Dispatcher(SinkRegistry(), flush_interval=-1)
    with pytest.raises(ValueError, match="emit_timeout"):
        Dispatcher(SinkRegistry(), emit_timeout=0)


async def test_shared_http_client_never_keeps_cookies_between_tenants() -> None:
    # Two tenants on one host share the pool; a cookie set for one must never reach the other.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from team_logging_middleware.dispatcher import shared_http_client

    from .fixtures.servers import run_uvicorn_async

    seen: list[str | None] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        seen.append(request.headers.get("cookie"))
        response = PlainTextResponse("ok")
        response.set_cookie("session", "tenant-a-session")
        return response

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    async with run_uvicorn_async(app) as base_url:
        client = shared_http_client(5.0)
        try:
            for _ in range(2):
                response = await client.post(base_url + "/")
                assert response.status_code == 200
        finally:
            await client.aclose()
    assert seen == [None, None]
    assert len(client.cookies.jar) == 0
