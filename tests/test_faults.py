"""Faults of a logging destination never reach the client: real middleware, dispatcher and
Langfuse sink, served by uvicorn, exporting to the fake Langfuse server on loopback.

For each fault — the destination is down, slow beyond its timeout, answering 429 with
Retry-After, 500, 401, or flapping between all of these — the same traffic is sent while the
destination is healthy, while it fails and after it recovered, and the suite checks:

* no client request fails, and every answer is complete and correct;
* client latency is not tied to the destination: while an export hangs, every request still
  completes and p99 stays far below the destination's delay (loose bounds, never a timing race);
* after recovery every record is delivered (retryable faults, within the buffer), or counted in
  ``dispatcher.stats()`` with its reason (401: ``failed``; buffer overflow: ``buffer_full``;
  retries used up: ``retries_exhausted``): ``sent + failed + dropped`` always equals the records
  routed to the destination;
* one team's broken destination does not delay another team's (no head-of-line blocking).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from team_logging_middleware._types import Caller
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.fixtures.fake_langfuse import FakeLangfuse, Project
from tests.fixtures.servers import run_uvicorn_async

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
DEADLINE = 20.0

# -- the gateway ------------------------------------------------------------------------------


async def _chat(request: Request) -> Response:
    body = await request.json()
    text = body["messages"][-1]["content"]
    return JSONResponse(
        {
            "id": "chatcmpl-fault",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"echo:{text}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        }
    )


async def _resolve(scope: Any) -> Caller | None:
    token = bearer_token(scope)
    if token is None or not token.startswith("key-"):
        return None
    return Caller(team_id=token.removeprefix("key-"), key_id=token, key_alias=token)


def _langfuse(fake: FakeLangfuse, project: Project) -> CallbackSpec:
    return CallbackSpec(
        callback_name="langfuse",
        callback_type="success_and_failure",
        callback_vars=fake.callback_vars(project),
    )


def p50(latencies: Sequence[float]) -> float:
    return sorted(latencies)[len(latencies) // 2]


def p99(latencies: Sequence[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass
class Rig:
    """The gateway on a real uvicorn (in this loop) and a client that measures each request."""

    team_logging: TeamLogging
    client: httpx.AsyncClient
    store: MemorySettingsStore
    projects: dict[str, Project] = field(default_factory=dict)

    async def one(self, team: str, request_id: str) -> float:
        started = time.perf_counter()
        response = await self.client.post(
            CHAT,
            json={"model": "m", "messages": [{"role": "user", "content": request_id}]},
            headers={"authorization": f"Bearer key-{team}", "x-request-id": request_id},
        )
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == f"echo:{request_id}"
        return elapsed

    async def burst(
        self, label: str, count: int, teams: Sequence[str], concurrency: int = 8
    ) -> tuple[list[str], list[float]]:
        """``count`` requests spread over ``teams``, ``concurrency`` at a time; all must succeed."""
        ids = [f"{label}-{teams[i % len(teams)]}-{i}" for i in range(count)]
        latencies: list[float] = []
        gate = asyncio.Semaphore(concurrency)

        async def run(request_id: str) -> None:
            team = request_id.split("-")[1]
            async with gate:
                latencies.append(await self.one(team, request_id))

        await asyncio.gather(*(run(i) for i in ids))
        return ids, latencies

    def lane(self, team: str) -> dict[str, Any]:
        lanes = [
            lane
            for lane in self.team_logging.dispatcher.stats()["destinations"].values()
            if lane["team_ids"] == [team]
        ]
        assert len(lanes) == 1, lanes
        return lanes[0]


@contextlib.asynccontextmanager
async def gateway(
    destinations: dict[str, tuple[FakeLangfuse, Project]], **options: Any
) -> AsyncIterator[Rig]:
    dispatcher_options = {
        "flush_interval": 0.02,
        "batch_size": 10,
        "emit_timeout": 2.0,
        "backoff_base": 0.02,
        "backoff_max": 0.25,
        "max_retries": 10_000,
        **options.pop("dispatcher", {}),
    }
    store = MemorySettingsStore()
    for team, (fake, project) in destinations.items():
        await store.put_team(TeamSettings(team_id=team, callbacks=[_langfuse(fake, project)]))
    team_logging = TeamLogging(
        _resolve,
        store=store,
        dispatcher_options=dispatcher_options,
        shutdown_timeout=options.pop("shutdown_timeout", 1.0),
    )
    app = Starlette(routes=[Route(CHAT, _chat, methods=["POST"])])
    async with (
        run_uvicorn_async(TeamLoggingMiddleware(app, team_logging=team_logging)) as url,
        httpx.AsyncClient(
            base_url=url,
            trust_env=False,
            timeout=30,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        ) as client,
    ):
        rig = Rig(team_logging, client, store)
        rig.projects = {team: project for team, (_fake, project) in destinations.items()}
        yield rig


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def delivered_ids(fake: FakeLangfuse, project: Project) -> set[str]:
    return {g["trace"]["metadata"]["request_id"] for g in fake.generations(project.public_key)}


# -- the faults -------------------------------------------------------------------------------


class Flapper:
    """Switches the fake server between failure modes and health on its own thread, so that
    restarting its port never blocks the gateway's event loop."""

    CYCLE = ("500", "ok", "down", "ok", "429", "503", "ok")

    def __init__(self, fake: FakeLangfuse, period: float = 0.03) -> None:
        self.fake = fake
        self.period = period
        self.switches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flapper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            mode = self.CYCLE[self.switches % len(self.CYCLE)]
            self.fake.set_mode(mode, retry_after="0.05")
            self.switches += 1
            self._stop.wait(self.period)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.fake.set_mode("ok")


@dataclass(frozen=True)
class Fault:
    name: str
    reasons: tuple[str, ...]  # what the lane's last_error says (one of)
    retryable: bool = True
    hangs: bool = False  # exports stay in flight for the whole fault
    dispatcher: dict[str, Any] = field(default_factory=dict)

    def start(self, fake: FakeLangfuse) -> Flapper | None:
        if self.name == "flapping":
            flapper = Flapper(fake)
            flapper.start()
            return flapper
        if self.name == "slow":
            fake.set_mode("delay", delay=SLOW_DELAY)
        elif self.name == "429":
            fake.set_mode("429", retry_after=str(RETRY_AFTER))
        else:
            fake.set_mode(self.name)
        return None


SLOW_DELAY = 8.0  # the server's answer time while slow
SLOW_TIMEOUT = 1.0  # the dispatcher's emit_timeout in that case
RETRY_AFTER = 0.3

FAULTS = [
    Fault("down", ("cannot reach langfuse host",)),
    Fault(
        "slow",
        # The sink's own HTTP timeout or the dispatcher's emit timeout, whichever fires first.
        ("did not answer within", "timed out after"),
        hangs=True,
        dispatcher={"emit_timeout": SLOW_TIMEOUT},
    ),
    Fault("429", ("HTTP 429",), dispatcher={"backoff_max": 1.0}),
    Fault("500", ("HTTP 500",)),
    Fault("401", ("HTTP 401",), retryable=False),
    Fault("flapping", (), dispatcher={"backoff_max": 0.1}),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_a_failing_destination_never_fails_or_slows_a_request(
    fault: Fault, fake_langfuse: FakeLangfuse
) -> None:
    teams = ["red", "blue"]
    destinations = {t: (fake_langfuse, fake_langfuse.add_project(name=t)) for t in teams}
    async with gateway(destinations, dispatcher=fault.dispatcher) as rig:
        before, healthy = await rig.burst("before", 24, teams)
        report = await rig.team_logging.dispatcher.flush(timeout=DEADLINE)
        assert report.pending == 0 and report.dropped == 0

        spans_before = sum(fake_langfuse.span_count(p.public_key) for p in rig.projects.values())

        def answered() -> int:
            counters = fake_langfuse.stats()["counters"]
            return sum(v for k, v in counters.items() if k.startswith("status_"))

        answered_before = answered()
        flapper = fault.start(fake_langfuse)
        probe: list[str] = []
        if fault.hangs:
            # One request first, and wait until its export is in flight at the stalled server:
            # everything below is then served while the destination hangs.
            started = fake_langfuse.stats()["counters"].get("otlp_requests", 0)
            probe, _ = await rig.burst("probe", 1, teams[:1])
            await until(
                lambda: fake_langfuse.stats()["counters"].get("otlp_requests", 0) > started,
                "an export to reach the stalled server",
            )
        fault_started = time.monotonic()
        during, faulty = await rig.burst("during", 40, teams)
        served_in = time.monotonic() - fault_started

        if fault.hangs:
            # Every request was answered while the server was still sitting on the export.
            assert served_in < SLOW_DELAY
            assert answered() == answered_before
            assert p99(faulty) < SLOW_TIMEOUT, "a request waited for the hanging destination"
        print(
            f"\n{fault.name}: p50/p99 {p50(healthy) * 1000:.1f}/{p99(healthy) * 1000:.1f} ms "
            f"healthy, {p50(faulty) * 1000:.1f}/{p99(faulty) * 1000:.1f} ms during the fault"
        )
        # Loose on purpose: a request path that waited on the destination would pay its
        # timeout, its Retry-After or its reconnects, not a few milliseconds.
        assert p99(faulty) < 10 * p99(healthy) + 0.5, (p99(healthy), p99(faulty))

        if flapper is None:
            # The fault is seen (and counted) before anything changes.
            await until(
                lambda: all(rig.lane(t)["retried"] > 0 or rig.lane(t)["failed"] > 0 for t in teams),
                "every lane to meet the fault",
            )
            spans_now = sum(fake_langfuse.span_count(p.public_key) for p in rig.projects.values())
            assert spans_now == spans_before, "a failing destination accepted records"
            for team in teams:
                last_error = rig.lane(team)["last_error"] or ""
                assert any(r in last_error for r in fault.reasons), last_error
            if not fault.retryable:
                # Final answers: each record sent during the fault is resolved as failed.
                so_far = [*before, *probe, *during]
                await until(
                    lambda: all(
                        rig.lane(t)["sent"] + rig.lane(t)["failed"]
                        == sum(1 for i in so_far if i.split("-")[1] == t)
                        for t in teams
                    ),
                    "every record of the fault to be resolved",
                )
            fake_langfuse.set_mode("ok")
        else:
            await until(lambda: flapper.switches >= len(Flapper.CYCLE), "a full flapping cycle")
            flapper.stop()

        after, _ = await rig.burst("after", 12, teams)
        report = await rig.team_logging.dispatcher.flush(timeout=DEADLINE)
        assert report.pending == 0 and not report.timed_out
        stats = rig.team_logging.dispatcher.stats()

    everything = [*before, *probe, *during, *after]
    routed = {t: [i for i in everything if i.split("-")[1] == t] for t in teams}
    for team in teams:
        lane = next(d for d in stats["destinations"].values() if d["team_ids"] == [team])
        got = delivered_ids(fake_langfuse, rig.projects[team])
        # Accounting is exact whatever happened: every routed record is resolved once.
        assert lane["sent"] + lane["failed"] + sum(lane["dropped"].values()) == len(routed[team])
        if fault.retryable:
            assert got == set(routed[team]), team
            assert (lane["failed"], lane["dropped"]) == (0, {})
        else:
            lost = {i for i in routed[team] if i.startswith(("during", "probe"))}
            assert got == set(routed[team]) - lost
            assert lane["failed"] == len(lost) and lane["retried"] == 0
    assert stats["dropped_queue_full"] == 0


async def test_retry_after_paces_the_retries(fake_langfuse: FakeLangfuse) -> None:
    """A 429 with Retry-After is retried no sooner than the server asked (upper bound only)."""
    project = fake_langfuse.add_project(name="paced")
    async with gateway(
        {"paced": (fake_langfuse, project)}, dispatcher={"backoff_max": 5.0, "batch_size": 100}
    ) as rig:
        fake_langfuse.set_mode("429", retry_after="0.25")
        started = time.monotonic()
        ids, _ = await rig.burst("paced", 10, ["paced"])
        await until(lambda: rig.lane("paced")["retried"] >= 3, "three retries")
        fake_langfuse.set_mode("ok")
        report = await rig.team_logging.dispatcher.flush(timeout=DEADLINE)
        elapsed = time.monotonic() - started
    attempts = fake_langfuse.stats()["counters"].get("status_429", 0)
    # Each retry waited at least 0.25 s: no more attempts than the elapsed time allows.
    assert 3 <= attempts <= elapsed / 0.25 + 2
    assert report.pending == 0
    assert delivered_ids(fake_langfuse, project) == set(ids)


async def test_overflow_while_down_drops_the_oldest_and_counts_them(
    fake_langfuse: FakeLangfuse, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="team_logging_middleware")
    project = fake_langfuse.add_project(name="flood")
    # Room for a few records only (each exchange counts about 1 KiB here).
    options = {"max_lane_bytes": 12 * 1024, "batch_size": 5}
    async with gateway({"flood": (fake_langfuse, project)}, dispatcher=options) as rig:
        fake_langfuse.set_mode("down")
        ids, _ = await rig.burst("flood", 120, ["flood"])
        await until(lambda: rig.team_logging.dispatcher.stats()["queued"] == 0, "the intake")
        await until(lambda: rig.lane("flood")["dropped"].get("buffer_full", 0) > 0, "overflow")
        fake_langfuse.set_mode("ok")
        report = await rig.team_logging.dispatcher.flush(timeout=DEADLINE)
        lane = rig.lane("flood")
    assert report.pending == 0
    got = delivered_ids(fake_langfuse, project)
    dropped = lane["dropped"]["buffer_full"]
    assert lane["sent"] == len(got) and lane["sent"] + dropped == len(ids)
    assert dropped >= len(ids) // 2
    # The newest records survive: what was dropped is older than what was kept in the buffer.
    assert ids[-1] in got
    # One warning for the whole episode, not one per dropped record.
    overflow_lines = [r for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert len(overflow_lines) == 1


async def test_exhausted_retries_are_counted_then_delivery_resumes(
    fake_langfuse: FakeLangfuse,
) -> None:
    project = fake_langfuse.add_project(name="brief")
    options = {"max_retries": 2, "backoff_base": 0.01, "backoff_max": 0.02}
    async with gateway({"brief": (fake_langfuse, project)}, dispatcher=options) as rig:
        fake_langfuse.set_mode("500")
        lost, _ = await rig.burst("lost", 25, ["brief"])
        report = await rig.team_logging.dispatcher.flush(timeout=DEADLINE)
        assert report.pending == 0
        lane = rig.lane("brief")
        assert lane["dropped"] == {"retries_exhausted": len(lost)}
        assert "gave up after 2 retries" in lane["last_error"]
        fake_langfuse.set_mode("ok")
        kept, _ = await rig.burst("kept", 10, ["brief"])
        report = await rig.team_logging.dispatcher.flush(timeout=DEADLINE)
        assert report.pending == 0 and report.dropped == 0
    assert delivered_ids(fake_langfuse, project) == set(kept)
    # Three attempts per batch (the first and two retries), never more.
    failures = fake_langfuse.stats()["counters"]["status_500"]
    assert failures % 3 == 0 and failures >= 3 * -(-len(lost) // 10)


async def test_one_teams_hanging_destination_does_not_delay_another(
    fake_langfuse: FakeLangfuse,
) -> None:
    with FakeLangfuse() as stalled:
        stalled.set_mode("delay", delay=30.0)
        stuck = stalled.add_project(name="stuck")
        fine = fake_langfuse.add_project(name="fine")
        destinations = {"stuck": (stalled, stuck), "fine": (fake_langfuse, fine)}
        async with gateway(
            destinations, dispatcher={"emit_timeout": 60.0}, shutdown_timeout=0.5
        ) as rig:
            await rig.burst("first", 1, ["stuck"])
            await until(
                lambda: stalled.stats()["counters"].get("otlp_requests", 0) >= 1,
                "the stuck team's export to hang",
            )
            ids, _ = await rig.burst("mixed", 60, ["stuck", "fine"])
            fine_ids = {i for i in ids if "-fine-" in i}
            # The healthy team's records all arrive while the other export is still hanging.
            await until(
                lambda: delivered_ids(fake_langfuse, fine) == fine_ids, "the healthy team's records"
            )
            assert stalled.stats()["counters"].get("status_200") is None
            assert rig.lane("stuck")["sent"] == 0 and rig.lane("stuck")["in_queue"] == 31
            # Stopping does not wait for the hanging destination beyond its deadline, and
            # counts what it abandoned.
            report = await rig.team_logging.dispatcher.stop(timeout=0.5)
            assert report.timed_out and report.dropped == 31
            assert rig.lane("stuck")["dropped"] == {"shutdown": 31}
            assert rig.lane("fine")["dropped"] == {}
