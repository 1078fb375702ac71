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
import cProfile
import dataclasses
import io
import json
import pstats
import time
from collections.abc import Sequence
from typing import Any

from bench.app import REQUEST_BODIES, completion_body, langfuse_keys

WARMUP_SECONDS = 0.5
SUBMIT_BURST = 64  # exchanges per loop iteration before the worker gets a turn
MAX_PENDING = 2_000  # undelivered records allowed before the producer waits


def _template(langfuse_host: str) -> Any:
    """A captured JSON chat completion whose plan sends it to one Langfuse project."""
    from team_logging_middleware._types import Destination, Plan
    from team_logging_middleware.records import Exchange
    from team_logging_middleware.settings import CallbackSpec

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
    return Exchange(
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


async def stages(langfuse_host: str, records: int = 5_000, batch: int = 100) -> dict[str, float]:
    """CPU µs per record of each stage, timed apart: decode, span encoding, gzip, one POST.

    The POST stage is the CPU of ``LangfuseSink.emit`` for a whole batch minus its encoding and
    compression (so: httpx request building, the connection, the response), per record.
    """
    import httpx

    from team_logging_middleware._decode import decode_exchange
    from team_logging_middleware._otlp import gzip_bytes
    from team_logging_middleware.sinks.langfuse import (
        LangfuseSink,
        _environment_attribute,
        encode_span,
    )

    template = _template(langfuse_host)
    exchanges = [dataclasses.replace(template, request_id=f"s-{i}") for i in range(records)]
    t0 = time.process_time()
    decoded = [decode_exchange(e) for e in exchanges]
    t1 = time.process_time()
    environment = _environment_attribute("default")
    spans = [encode_span(r, environment) for r in decoded]
    t2 = time.process_time()
    bodies = [b"[" + b",".join(spans[i : i + batch]) + b"]" for i in range(0, records, batch)]
    t3 = time.process_time()
    for body in bodies:
        gzip_bytes(body, 1)
    t4 = time.process_time()
    public, secret = langfuse_keys(0)
    async with httpx.AsyncClient() as client:
        sink = LangfuseSink(public_key=public, secret_key=secret, http=client, host=langfuse_host)
        await sink.emit(decoded[:batch])  # connection set-up, address check
        t5 = time.process_time()
        for i in range(0, records, batch):
            await sink.emit(decoded[i : i + batch])
        t6 = time.process_time()
        await sink.aclose()
    per = 1e6 / records
    encode = (t2 - t1) * per
    compress = (t4 - t3) * per
    return {
        "decode": (t1 - t0) * per,
        "encode_span": encode,
        "gzip": compress,
        "post": max(0.0, (t6 - t5) * per - encode - compress),
        "emit_total": (t6 - t5) * per,
    }


async def run(langfuse_host: str, seconds: float, stage_records: int = 5_000) -> dict[str, Any]:
    from team_logging_middleware.dispatcher import Dispatcher
    from team_logging_middleware.sinks import default_registry

    template = _template(langfuse_host)
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
            if dispatcher.stats()["pending"] > MAX_PENDING:
                # Keep a steady backlog rather than a growing one: the lane would otherwise
                # drop its oldest records, and dropped records cost nothing to "deliver".
                await asyncio.sleep(0.001)
                continue
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
    breakdown = await stages(langfuse_host, stage_records)
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
        "stages_us_per_record": breakdown,
    }


def _sent(dispatcher: Any) -> int:
    sent: int = dispatcher.stats()["sent"]
    return sent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__)
    parser.add_argument("--langfuse-host", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--stage-records", type=int, default=5_000)
    parser.add_argument("--profile", type=int, metavar="TOP", help="cProfile; list TOP functions")
    args = parser.parse_args(argv)
    import uvloop

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    result = uvloop.run(run(args.langfuse_host, args.seconds, args.stage_records))
    print("BENCH_JSON " + json.dumps(result), flush=True)
    if profile is not None:
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
