"""Soak: memory stays bounded while a destination is down for a long run of requests.

The real middleware, runtime, dispatcher and Langfuse sink are driven in-process with scripted ASGI
messages (no sockets on the request side, so a long run is fast); the team's Langfuse host is a
loopback port where nothing listens, so every export fails with a retryable connection error for
the whole run. Resident memory (``VmRSS``) is sampled after a warm-up and then throughout the run;
its growth must stay within :data:`MAX_GROWTH`, and every request must be accounted for.

``TLM_SOAK_REQUESTS`` sets the number of requests (default 20,000; ``make soak`` runs 100,000).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from typing import Any

import pytest

from team_logging_middleware._types import Caller
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.fixtures.servers import free_port
from tests.helpers import asgi_http_scope

REQUESTS = int(os.environ.get("TLM_SOAK_REQUESTS", "20000"))
WARMUP = 2_000
MAX_GROWTH = 64 * 1024 * 1024
CLIENTS = 8
SAMPLE_EVERY = 500

pytestmark = pytest.mark.timeout(max(120, REQUESTS // 500))


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/status``."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("VmRSS not found in /proc/self/status")


async def _resolve(scope: Any) -> Caller | None:
    token = bearer_token(scope)
    return None if token is None else Caller(team_id="soak", key_id="k", key_alias="soak-key")


_ANSWER = json.dumps(
    {
        "id": "chatcmpl-soak",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a reply of ordinary length " * 8},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 48, "total_tokens": 88},
    }
).encode()
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_ANSWER))]


async def chat_app(scope: Any, receive: Any, send: Any) -> None:
    """A bare ASGI chat endpoint: reads the body, answers a fixed completion."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _ANSWER})


def _scope(index: int) -> dict[str, Any]:
    return asgi_http_scope(
        "/v1/chat/completions",
        [
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer sk-soak"),
            (b"x-request-id", b"soak-%d" % index),
        ],
        state={},
    )


def _body(index: int) -> bytes:
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"request number {index}: " + "words " * 30},
            ],
            "temperature": 0.2,
        }
    ).encode()


async def _one(app: Any, index: int) -> int:
    status = 0
    request = {"type": "http.request", "body": _body(index), "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(index), receive, send)
    return status


async def test_memory_is_bounded_over_a_long_run_with_the_destination_down() -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every export is refused
    store = MemorySettingsStore()
    spec = CallbackSpec(
        callback_name="langfuse",
        callback_type="success_and_failure",
        callback_vars={
            "langfuse_public_key": "pk-lf-soak",
            "langfuse_secret_key": "sk-lf-soak-secret",
            "langfuse_host": down,
        },
    )
    await store.put_team(TeamSettings(team_id="soak", callbacks=[spec]))
    # The dispatcher's defaults, as an operator gets them, except a short backoff cap so that
    # the dead destination is retried throughout the run instead of once.
    team_logging = TeamLogging(
        _resolve,
        store=store,
        dispatcher_options={"backoff_base": 0.05, "backoff_max": 0.5},
        shutdown_timeout=1.0,
    )
    app = TeamLoggingMiddleware(chat_app, team_logging=team_logging)
    counter = iter(range(10**9))
    statuses: dict[int, int] = {}
    samples: list[int] = []

    async def client(until: int) -> None:
        while (index := next(counter)) < until:
            status = await _one(app, index)
            statuses[status] = statuses.get(status, 0) + 1
            if index % SAMPLE_EVERY == 0:
                samples.append(rss_bytes())
            # A real server interleaves requests with everything else on its loop; here the
            # dispatcher gets its turn between two requests of each client.
            await asyncio.sleep(0)

    async with app:
        await asyncio.gather(*(client(WARMUP) for _ in range(CLIENTS)))
        counter = iter(range(WARMUP, 10**9))
        gc.collect()
        baseline = rss_bytes()
        started = time.monotonic()
        await asyncio.gather(*(client(WARMUP + REQUESTS) for _ in range(CLIENTS)))
        elapsed = time.monotonic() - started
        gc.collect()
        samples.append(rss_bytes())
    stats = team_logging.dispatcher.stats()  # after the shutdown: everything is resolved

    total = WARMUP + REQUESTS
    assert statuses == {200: total}
    growth = max(samples[-(REQUESTS // SAMPLE_EVERY) - 1 :]) - baseline
    assert growth <= MAX_GROWTH, f"RSS grew by {growth / 2**20:.1f} MiB over {REQUESTS} requests"
    # Every request is accounted for: queued and then dropped (retries used up, buffer full or
    # at shutdown), or refused at the intake; none was delivered to the dead host.
    lane = next(iter(stats["destinations"].values()))
    assert stats["submitted"] + stats["dropped_queue_full"] == total
    assert stats["sent"] == 0 and lane["sent"] == 0
    resolved = lane["failed"] + sum(lane["dropped"].values())
    assert resolved + stats["abandoned_exchanges"] == stats["submitted"]
    assert lane["dropped"].get("buffer_full", 0) > 0 or REQUESTS < 10_000
    assert lane["retried"] > 0
    assert "cannot reach langfuse host" in lane["last_error"]
    print(
        f"\nsoak: {REQUESTS} requests in {elapsed:.1f}s "
        f"({REQUESTS / elapsed:,.0f}/s), RSS {baseline / 2**20:.1f} MiB after warm-up, "
        f"growth {growth / 2**20:.1f} MiB (limit {MAX_GROWTH / 2**20:.0f} MiB); "
        f"lane dropped {lane['dropped']}, intake refused {stats['dropped_queue_full']}"
    )
