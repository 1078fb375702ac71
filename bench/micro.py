"""In-process micro-benchmark and profile of the request path (no HTTP, no server).

``python -m bench.micro [--variants ...] [--workload json|stream] [--requests N] [--profile V]``
drives each variant of ``bench.app`` with scripted ASGI messages (a receive that returns the body
at once, a send that discards) in one event loop, and splits the CPU per request into

* *request path*: inside ``app(scope, receive, send)`` — what delays the response, and
* *background*: the dispatcher's decoding and delivery, run when the loop is yielded to and in
  the final flush.

With ``--profile VARIANT`` the same loop runs under ``cProfile`` and the functions with the most
own time are printed: where the microseconds go. The uvicorn/HTTP cost, identical for every
variant, is absent here, so the ``bare`` figure is the app alone; differences are the overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

from bench.app import CHAT_PATH, REQUEST_BODIES, VARIANTS, build_app

YIELD_EVERY = 50  # requests between two yields to the loop (background tasks run then)


def _scope(body_len: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT_PATH,
        "raw_path": CHAT_PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer k-0"),
            (b"content-length", str(body_len).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _lifespan(app: Any) -> tuple[asyncio.Queue[Any], asyncio.Task[None]]:
    to_app: asyncio.Queue[Any] = asyncio.Queue()
    from_app: asyncio.Queue[Any] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    message = await from_app.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {message}")
    return to_app, task


async def measure(
    variant: str, workload: str, requests: int, profile: cProfile.Profile | None = None
) -> dict[str, float]:
    app, gateway = build_app(variant, langfuse_host="http://127.0.0.1:9")
    to_app, lifespan_task = await _lifespan(app)
    body = REQUEST_BODIES[workload]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    # Warm caches (resolver, plan, lanes) before measuring.
    for _ in range(200):
        await app(_scope(len(body)), receive, send)
    await asyncio.sleep(0.05)
    gc.collect()

    request_cpu = 0.0
    started_cpu = time.process_time()
    if profile is not None:
        profile.enable()
    for i in range(requests):
        scope = _scope(len(body))
        t0 = time.process_time()
        await app(scope, receive, send)
        request_cpu += time.process_time() - t0
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    await gateway.flush()
    if profile is not None:
        profile.disable()
    total_cpu = time.process_time() - started_cpu

    await to_app.put({"type": "lifespan.shutdown"})
    await lifespan_task
    return {
        "request_path_us": request_cpu * 1e6 / requests,
        "background_us": (total_cpu - request_cpu) * 1e6 / requests,
        "total_us": total_cpu * 1e6 / requests,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=["bare", "tlm-off", "tlm-null"]
    )
    parser.add_argument("--workload", choices=("json", "stream"), default="json")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="interleaved repetitions; the minimum is reported"
    )
    parser.add_argument("--profile", choices=VARIANTS, help="profile this variant with cProfile")
    parser.add_argument("--top", type=int, default=30, help="functions to list in the profile")
    args = parser.parse_args(argv)

    import uvloop

    # Interleaved repetitions, keeping each variant's fastest: noise from other processes only
    # ever adds CPU time, so the minimum is the best estimate of the cost itself.
    results: dict[str, dict[str, float]] = {}
    for _ in range(max(1, args.repeat)):
        for variant in args.variants:
            r = uvloop.run(measure(variant, args.workload, args.requests))
            best = results.get(variant)
            if best is None or r["total_us"] < best["total_us"]:
                results[variant] = r
    bare = results.get("bare")
    print(
        f"{args.workload}, {args.requests} requests per variant, best of {args.repeat} "
        "(µs of CPU per request)"
    )
    print(f"{'variant':14} {'request path':>12} {'background':>11} {'total':>8} {'extra':>8}")
    for variant, r in results.items():
        extra = r["total_us"] - bare["total_us"] if bare else float("nan")
        print(
            f"{variant:14} {r['request_path_us']:12.1f} {r['background_us']:11.1f} "
            f"{r['total_us']:8.1f} {extra:+8.1f}"
        )
    if args.profile:
        profile = cProfile.Profile()
        uvloop.run(measure(args.profile, args.workload, args.requests, profile))
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        print(f"\nprofile of {args.profile} ({args.workload}), by own time:")
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
