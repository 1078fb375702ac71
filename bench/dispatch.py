"""The dispatcher alone: records/s decoded, encoded as OTLP, gzipped and sent to Langfuse.

``python -m bench.dispatch --langfuse-host URL [--seconds S]`` submits pre-built exchanges (a
JSON chat completion each, as the middleware captures them) to a :class:`Dispatcher` whose one
destination is the Langfuse sink pointed at ``URL`` (the fake Langfuse server, on another core),
keeping its intake busy without overflowing it, then flushes. It prints one ``BENCH_JSON {...}``
line: records sent, wall and CPU seconds of this process, and records per CPU second — the
throughput of one core, since the whole pipeline runs on this process's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from bench.app import REQUEST_BODIES, completion_body, langfuse_keys

WARMUP_SECONDS = 0.5
SUBMIT_BURST = 64  # exchanges per loop iteration before the worker gets a turn


async def run(langfuse_host: str, seconds: float) -> dict[str, Any]:
    from team_logging_middleware._types import Destination, Plan
    from team_logging_middleware.dispatcher import Dispatcher
    from team_logging_middleware.records import Exchange
    from team_logging_middleware.settings import CallbackSpec
    from team_logging_middleware.sinks import default_registry

    public, secret = langfuse_keys(0)
    spec = CallbackSpec(
        callback_name="langfuse",
        callback_vars={
            "langfuse_public_key": public,
            "langfuse_secret_key": secret,
            "langfuse_host": langfuse_host,
        },
    )
    plan = Plan(
        team_id="t-langfuse",
        logging_enabled=True,
        success=(Destination(spec=spec, source="team", identity=spec.identity()),),
    )
    now, perf = time.time(), time.perf_counter()
    template = Exchange(
        request_id="",
        method="POST",
        path="/v1/chat/completions",
        start_time=now,
        start_perf=perf,
        plan=plan,
        caller=None,
        request_body=REQUEST_BODIES["json"],
        request_content_type="application/json",
        status=200,
        response_content_type="application/json",
        response_chunks=[completion_body("gpt-bench")],
        first_byte_perf=perf + 0.0004,
        end_perf=perf + 0.0005,
    )

    dispatcher = Dispatcher(default_registry())
    await dispatcher.start()
    rejected = 0
    submitted = 0
    marks: dict[str, tuple[float, float, int]] = {}
    started = time.perf_counter()
    try:
        while True:
            elapsed = time.perf_counter() - started
            if "start" not in marks and elapsed >= WARMUP_SECONDS:
                marks["start"] = (time.perf_counter(), time.process_time(), _sent(dispatcher))
            if elapsed >= WARMUP_SECONDS + seconds:
                break
            for _ in range(SUBMIT_BURST):
                exchange = dataclasses.replace(template, request_id=f"bench-{submitted}")
                if dispatcher.submit(exchange):
                    submitted += 1
                else:
                    rejected += 1
                    await asyncio.sleep(0.001)  # intake full: let the pipeline catch up
                    break
            await asyncio.sleep(0)
        report = await dispatcher.flush(30.0)
        marks["end"] = (time.perf_counter(), time.process_time(), _sent(dispatcher))
        stats = dispatcher.stats()
    finally:
        await dispatcher.stop(5.0)
    wall = marks["end"][0] - marks["start"][0]
    cpu = marks["end"][1] - marks["start"][1]
    sent = marks["end"][2] - marks["start"][2]
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "sent": sent,
        "submitted": submitted,
        "rejected_submits": rejected,
        "lost": stats["lost"],  # deliveries that failed or were dropped inside the dispatcher
        "flush_timed_out": report.timed_out,
        "records_per_second": sent / wall if wall else 0.0,
        "records_per_cpu_second": sent / cpu if cpu else 0.0,
    }


def _sent(dispatcher: Any) -> int:
    sent: int = dispatcher.stats()["sent"]
    return sent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__)
    parser.add_argument("--langfuse-host", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args.langfuse_host, args.seconds))
    except ImportError:
        result = asyncio.run(run(args.langfuse_host, args.seconds))
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
