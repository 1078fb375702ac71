"""The public test helpers: MemorySink and its switches, sample records, wait_for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from team_logging_middleware.dispatcher import Dispatcher
from team_logging_middleware.errors import SinkError
from team_logging_middleware.records import Exchange, LogRecord
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks.base import CheckableSink, Sink, SinkContext, SinkRegistry
from team_logging_middleware.testing import (
    MemorySink,
    MemorySinkType,
    destination_for,
    memory_sink_type,
    sample_record,
    wait_for,
)


@pytest.fixture
async def ctx() -> AsyncIterator[SinkContext]:
    async with httpx.AsyncClient() as client:
        yield SinkContext(http=client, team_id="team-a")


def build(memory: MemorySink, ctx: SinkContext, destination: str | None = None) -> Sink:
    vars_ = {} if destination is None else {"destination": destination}
    return memory.sink_type.factory(vars_, ctx)


async def test_records_are_kept_per_destination(ctx: SinkContext) -> None:
    memory = MemorySink()
    a, b, default = build(memory, ctx, "a"), build(memory, ctx, "b"), build(memory, ctx)
    r1, r2, r3 = (sample_record(request_id=f"r{i}") for i in (1, 2, 3))
    await a.emit([r1, r2])
    await b.emit([r3])
    await default.emit([r1])
    assert memory.records("a") == [r1, r2] and memory.records("b") == [r3]
    assert memory.records("default") == [r1]
    assert memory.records() == [r1, r2, r3, r1]  # everything, in delivery order
    assert memory.batches("a") == [[r1, r2]]
    assert memory.destinations() == ["a", "b", "default"]
    assert [(c.destination, c.size, c.ok) for c in memory.emits] == [
        ("a", 2, True),
        ("b", 1, True),
        ("default", 1, True),
    ]
    assert memory.contexts == [ctx, ctx, ctx]


async def test_fail_for_a_number_of_emits_and_some_destinations(ctx: SinkContext) -> None:
    memory = MemorySink()
    a, b = build(memory, ctx, "a"), build(memory, ctx, "b")
    error = SinkError("HTTP 503", retryable=True)
    memory.fail(error, times=2, destinations=["a"])
    await b.emit([sample_record()])  # not affected, and does not use up a failure
    for _ in range(2):
        with pytest.raises(SinkError) as info:
            await a.emit([sample_record()])
        assert info.value is error
    await a.emit([sample_record(request_id="after")])
    assert [r.request_id for r in memory.records("a")] == ["after"]
    assert [c.ok for c in memory.emits] == [True, False, False, True]

    memory.fail(RuntimeError("always"))
    with pytest.raises(RuntimeError):
        await b.emit([sample_record()])
    memory.fail(None)
    await b.emit([sample_record()])


async def test_hang_blocks_chosen_destinations_until_release(ctx: SinkContext) -> None:
    memory = MemorySink()
    a, b = build(memory, ctx, "a"), build(memory, ctx, "b")
    memory.hang(["a"])
    stuck = asyncio.create_task(a.emit([sample_record(request_id="late")]))
    await b.emit([sample_record(request_id="free")])
    assert not stuck.done() and memory.records("a") == []
    memory.release()
    await asyncio.wait_for(stuck, 5)
    assert [r.request_id for r in memory.records("a")] == ["late"]

    memory.hang()  # every destination
    stuck = asyncio.create_task(b.emit([sample_record()]))
    await asyncio.sleep(0)
    assert not stuck.done()
    memory.release()
    await asyncio.wait_for(stuck, 5)


async def test_a_slow_memory_sink_trips_the_emit_timeout() -> None:
    memory = MemorySink()
    memory.delay = 0.3

    def no_decode(ex: Exchange) -> LogRecord:
        raise AssertionError

    d = Dispatcher(
        SinkRegistry([memory.sink_type]), decode=no_decode, emit_timeout=0.02, max_retries=0
    )
    await d.start()
    try:
        target = destination_for(CallbackSpec(callback_name="memory"))
        d.submit_record(sample_record(), [target])
        report = await d.flush(timeout=5)
        assert report.dropped == 1 and memory.records() == []
    finally:
        await d.stop(timeout=5)


async def test_check_and_lifecycle_counters(ctx: SinkContext) -> None:
    memory = MemorySink()
    first, second = build(memory, ctx, "a"), build(memory, ctx, "b")
    assert isinstance(first, CheckableSink)
    await first.check()
    memory.check_error = SinkError("HTTP 401: wrong key", status=401)
    with pytest.raises(SinkError, match="wrong key"):
        await first.check()
    assert (memory.built, memory.closed, memory.live, memory.max_live) == (2, 0, 2, 2)
    await first.aclose()
    await first.aclose()  # closing twice counts once
    await second.aclose()
    assert (memory.built, memory.closed, memory.live) == (2, 2, 0)


def test_memory_sink_type_is_a_registrable_sink_type() -> None:
    sink_type = memory_sink_type("mem2")
    assert isinstance(sink_type, MemorySinkType) and isinstance(sink_type.memory, MemorySink)
    assert sink_type.name == "mem2" and sink_type.memory.sink_type is sink_type
    registry = SinkRegistry([sink_type])
    normalized = registry.normalize(
        CallbackSpec(callback_name="mem2", callback_vars={"destination": "x", "api_key": "k"})
    )
    assert normalized.callback_vars == {"destination": "x", "api_key": "k"}


def test_sample_record_and_destination_for() -> None:
    record = sample_record(request_id="abc", outcome="exception", output=None)
    assert record.request_id == "abc" and not record.success and record.output is None
    assert sample_record().success and sample_record().latency_ms == 250.0
    spec = CallbackSpec(callback_name="memory", callback_vars={"destination": "a"})
    d = destination_for(spec, "key")
    assert d.spec is spec and d.source == "key" and d.identity == spec.identity()


async def test_wait_for_accepts_sync_and_async_predicates() -> None:
    state = {"n": 0}

    async def bump() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
            state["n"] += 1

    task = asyncio.create_task(bump())
    await wait_for(lambda: state["n"] == 3)

    async def is_three() -> bool:
        return state["n"] == 3

    await wait_for(is_three)
    await task


async def test_wait_for_raises_timeout_error_at_the_deadline() -> None:
    with pytest.raises(TimeoutError, match=r"condition not met within 0\.05s"):
        await wait_for(lambda: False, timeout=0.05)
