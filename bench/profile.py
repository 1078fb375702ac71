"""Where a variant's server CPU goes: sample the uvicorn worker with py-spy under wrk load.

``python -m bench.profile [--variant tlm-null] [--workload json] [--seconds 8] [--out DIR]``
starts the variant exactly as ``bench.run`` does (one pinned uvicorn worker, the fake Langfuse
server when needed), drives it with wrk, records the worker with ``py-spy record --function``
and prints:

* the share of on-CPU samples *owned* by each part — a sample is owned by the innermost frame
  that belongs to this package, to the benchmark app or to uvicorn; library frames (json,
  cachetools, hashlib, httpx, ...) count for the code that called them;
* this package's functions by owned share, converted to µs per request with the CPU per request
  measured in the same run.

py-spy is not a dependency of the project (``pip install py-spy``); it needs ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.app import VARIANTS
from bench.run import (
    CLIENT_CORE,
    CLK_TCK,
    CONNECTIONS,
    WORKLOADS,
    Bench,
    Config,
    Processes,
    run_wrk,
)

PACKAGE = "team_logging_middleware/"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def owner(frame: str) -> str | None:
    """The part a frame belongs to, or None for library code (attributed to its caller)."""
    match = _FRAME.match(frame)
    if not match:
        return None
    path = match["file"]
    if PACKAGE in path:
        module = path.split(PACKAGE, 1)[1]
        return f"tlm {module}:{match['func']}"
    if path.endswith("bench/app.py"):
        return "bench app (the gateway itself)"
    if "uvicorn/protocols/" in path or "uvicorn/middleware/" in path:
        return "uvicorn (HTTP parsing, transport)"
    return None


def attribute(raw: Path) -> tuple[int, collections.Counter[str]]:
    """Samples in all, and samples per owner (see :func:`owner`)."""
    total = 0
    owned: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        label = "event loop, asyncio, other"
        for frame in reversed(stack.split(";")):
            found = owner(frame)
            if found is not None:
                label = found
                break
        owned[label] += count
    return total, owned


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="tlm-null")
    parser.add_argument("--workload", choices=WORKLOADS, default="json")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the raw py-spy stacks here")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2

    cfg = Config(
        smoke=False,
        rounds=1,
        duration=args.seconds,
        warmup=2,
        variants=("bare", args.variant),
        workloads=(args.workload,),
        teams_scale=(),
        teams_variant=args.variant,
        teams_duration=0,
        soak_requests=0,
        soak_slice=1,
        dispatcher_seconds=0.0,
        idle_quiet=0.5,
        out=args.out or Path(tempfile.gettempdir()),
        publish=False,
        pin=True,
    )
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="tlm-profile-") as tmp:
        raw = (args.out or Path(tmp)) / f"pyspy-{args.variant}-{args.workload}.txt"
        raw.parent.mkdir(parents=True, exist_ok=True)
        bench = Bench(cfg, procs, Path(tmp))
        try:
            if args.variant == "tlm-langfuse":
                bench.start_fake_langfuse(1)
            host = bench.langfuse_host if bench.langfuse_port else None
            server = bench.start_servers([(args.variant, args.variant, 1, host)])[args.variant]
            conns = CONNECTIONS[args.workload]
            run_wrk(server.url, args.workload, connections=conns, seconds=2, core=CLIENT_CORE)
            server.wait_idle(quiet=0.5, deadline=time.monotonic() + 20)
            ticks = server.cpu_ticks()
            result: dict[str, object] = {}

            def load() -> None:
                result.update(
                    run_wrk(
                        server.url,
                        args.workload,
                        connections=conns,
                        seconds=args.seconds,
                        core=CLIENT_CORE,
                    )
                )

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(0.5)  # past wrk's connection set-up
            subprocess.run(
                [
                    "taskset",
                    "-c",
                    str(CLIENT_CORE),
                    py_spy,
                    "record",
                    "--function",
                    "--nonblocking",
                    "-r",
                    str(args.rate),
                    "-d",
                    str(max(1, args.seconds - 1)),
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "-p",
                    str(server.pid),
                ],
                check=True,
                capture_output=True,
            )
            thread.join()
            server.wait_idle(quiet=0.5, deadline=time.monotonic() + 20)
            cpu_us = (server.cpu_ticks() - ticks) / CLK_TCK * 1e6 / int(str(result["requests"]))
        finally:
            procs.stop_all(timeout=5.0)
        total, owned = attribute(raw)

    print(
        f"{args.variant} / {args.workload}: {result['rps']:.0f} req/s, {cpu_us:.1f} µs server "
        f"CPU per request (py-spy inflates it a little); {total} samples"
    )
    parts: collections.Counter[str] = collections.Counter()
    for label, count in owned.items():
        parts["team_logging_middleware" if label.startswith("tlm ") else label] += count
    print("\nowned share by part:")
    for label, count in parts.most_common():
        print(f"  {100 * count / total:5.1f}%  {cpu_us * count / total:7.1f} µs/req  {label}")
    print("\nthis package, by function (own time incl. the library calls it makes):")
    tlm = [(label, count) for label, count in owned.most_common() if label.startswith("tlm ")]
    for label, count in tlm[: args.top]:
        print(f"  {100 * count / total:5.1f}%  {cpu_us * count / total:7.1f} µs/req  {label[4:]}")
    if args.out:
        print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
