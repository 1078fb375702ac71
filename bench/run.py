"""The benchmark: ``python -m bench.run [--smoke] [--rounds N] [--duration S] [--variants ...]``.

Each variant of ``bench.app`` is served by one uvicorn worker pinned to core 0; wrk, the fake
Langfuse server and this runner share core 1, so the server's core does nothing but serve.
Rounds are interleaved (A B C, A B C, ...) so drift (thermal, noisy neighbours) hits every variant
alike, and each figure is compared with ``bare`` *from the same round*; the report gives medians
over rounds.

Measured per (variant, workload, round): requests/s and p50/p99 latency (wrk, via the ``done()``
hook of ``bench/post.lua``), server CPU per request (``utime + stime`` of the uvicorn process
from ``/proc/<pid>/stat`` across the run *and* the drain that follows it, so background export is
included), resident memory before/after, and for streams the time to first byte (a sequential
raw-socket client). Then: scaling in the number of teams, a memory soak with the Langfuse
destination down, and the dispatcher alone (records/s per core).

Results go to ``<out>/<timestamp>.json`` and ``.md``; a full run also refreshes
``bench/RESULTS.md`` and ``bench/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.app import CHAT_PATH, REQUEST_BODIES, STATS_PATH, VARIANTS, langfuse_keys

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "post.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
SERVER_CORE = 0
CLIENT_CORE = 1

WORKLOADS: tuple[str, ...] = ("json", "stream", "paced")
# Which variants run which workload in a full run (the others are measured on JSON only).
WORKLOAD_VARIANTS: dict[str, tuple[str, ...]] = {
    "json": VARIANTS,
    "stream": ("bare", "tlm-null", "tlm-langfuse"),
    "paced": ("bare", "tlm-null", "tlm-langfuse"),
}
# Paced streams are latency-bound: 30 connections keep the bare server well below saturation,
# so the paced ratio shows what the middleware does to chunk timing, not to peak throughput.
CONNECTIONS = {"json": 50, "stream": 50, "paced": 30}
SETTLE_DEADLINE = 20.0  # seconds a team-scale server may take to deliver its warm-up records
TTFB_SAMPLES = {"stream": 200, "paced": 12}
PACKAGES = (
    "team-logging-middleware",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
    "orjson",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
)


class BenchError(RuntimeError):
    """The benchmark cannot run or a measurement is unusable (the message says why)."""


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if core is not None else list(argv)


class Processes:
    """Every child process this run starts; all are stopped on exit, error or Ctrl-C."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self.started: list[int] = []  # every pid, for the report (and the test that none is left)

    def start(
        self, argv: Sequence[str], *, env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            # A session of its own: a Ctrl-C in the terminal reaches the runner only, which then
            # stops its children in order (servers first) instead of racing them.
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        self.started.append(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        self.stop_all([proc], timeout)

    def stop_all(
        self, procs: Sequence[subprocess.Popen[bytes]] | None = None, timeout: float = 15.0
    ) -> None:
        targets = list(self._procs if procs is None else procs)
        for proc in targets:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in targets:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc in self._procs:
                self._procs.remove(proc)


def _cpu_ticks(pid: int) -> int:
    # Fields 14/15 of /proc/<pid>/stat (utime, stime) cover every thread of the process,
    # including threads that already exited; the command name (field 2) may contain spaces.
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def _http_get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"GET {path} answered {response.status}")
        return json.loads(body)
    finally:
        conn.close()


@dataclass
class Server:
    """One uvicorn worker serving one variant of ``bench.app``."""

    name: str
    variant: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{CHAT_PATH}"

    def cpu_ticks(self) -> int:
        return _cpu_ticks(self.pid)

    def rss_kb(self) -> int:
        return _rss_kb(self.pid)

    def stats(self) -> Any:
        return _http_get_json(self.port, STATS_PATH)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"server {self.name} exited ({self.proc.returncode}):\n{tail(self.log)}"
            )

    def wait_ready(self, deadline: float) -> None:
        while True:
            self.check_alive()
            try:
                self.stats()
                return
            except (OSError, BenchError, ValueError):
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"server {self.name} did not start:\n{tail(self.log)}"
                    ) from None
                time.sleep(0.05)

    def drain(self, deadline: float) -> Any:
        """Wait until the dispatcher has resolved every record; returns its final stats."""
        while True:
            stats = self.stats()
            if not stats.get("pending") or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def wait_idle(self, *, quiet: float, deadline: float) -> float:
        """Wait until the process has used no CPU for ``quiet`` seconds (the export backlog has
        drained); returns the seconds waited. One clock tick of slack absorbs uvicorn's timer."""
        started = time.monotonic()
        last = self.cpu_ticks()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now_ticks = self.cpu_ticks()
            if now_ticks - last > 1:
                last = now_ticks
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet:
                break
        return time.monotonic() - started


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- load generation and measurements ----------------------------------------------------------


def run_wrk(
    url: str, workload: str, *, connections: int, seconds: int, teams: int = 1, core: int | None
) -> dict[str, Any]:
    argv = pinned(
        core,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA_SCRIPT),
            "--latency",
            url,
        ],
    )
    env = {**os.environ, "BENCH_WORKLOAD": workload, "BENCH_TEAMS": str(teams)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise BenchError(
        f"wrk printed no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


async def _ttfb(port: int, workload: str, samples: int) -> list[float]:
    """Seconds from writing a request to reading its first SSE event, over one keep-alive
    connection, one request at a time (so it is latency, not queueing, that is measured)."""
    body = REQUEST_BODIES[workload]
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer k-0\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection(HOST, port)
    out: list[float] = []
    try:
        for _ in range(samples):
            buf = bytearray()
            started = time.perf_counter()
            writer.write(request)
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    raise BenchError("server closed the connection during a TTFB sample")
                buf += chunk
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0 and buf.find(b"data:", head_end) >= 0:
                    break
            out.append(time.perf_counter() - started)
            if not buf.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"TTFB request answered {bytes(buf[:40])!r}")
            # Read to the terminating chunk so the next request starts on a clean connection.
            while not buf.endswith(b"\r\n0\r\n\r\n"):
                chunk = await reader.read(65536)
                if not chunk:
                    raise BenchError("server closed the connection during a TTFB sample")
                buf += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return out


def measure_ttfb(port: int, workload: str, samples: int) -> dict[str, float]:
    values = asyncio.run(_ttfb(port, workload, samples + 3))[3:]  # the first few warm the path
    values.sort()
    return {
        "samples": len(values),
        "p50_ms": percentile(values, 50) * 1000.0,
        "p99_ms": percentile(values, 99) * 1000.0,
    }


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[index]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


# -- the plan -------------------------------------------------------------------------------


@dataclass
class Config:
    smoke: bool
    rounds: int
    duration: int
    warmup: int
    variants: tuple[str, ...]
    workloads: tuple[str, ...]
    teams_scale: tuple[int, ...]
    teams_variant: str
    teams_duration: int
    soak_requests: int
    soak_slice: int
    dispatcher_seconds: float
    idle_quiet: float
    out: Path
    publish: bool
    pin: bool
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[tuple[str, str]]:
        """(workload, variant) in run order within one round: A B C per workload."""
        out = []
        for workload in self.workloads:
            chosen = self.variants if self.smoke else WORKLOAD_VARIANTS[workload]
            out += [(workload, v) for v in VARIANTS if v in chosen and v in self.variants]
        return out

    def duration_for(self, workload: str) -> int:
        # Paced requests are latency-bound (~0.12 s each, steady): 40% of the time is as stable.
        if workload == "paced":
            return max(1, self.duration * 4 // 10)
        if workload == "stream":
            return max(1, self.duration * 8 // 10)  # keeps the whole run under ten minutes
        return self.duration

    def estimate_seconds(self) -> float:
        per_run_overhead = self.idle_quiet + 0.3
        total = 0.0
        for workload, variant in self.cells():
            total += self.warmup + self.rounds * (self.duration_for(workload) + per_run_overhead)
            if variant == "tlm-langfuse" and not self.smoke:
                total += self.rounds * self.duration_for(workload) * 0.5  # export drain
            if workload in TTFB_SAMPLES and not self.smoke:
                per_sample = 0.002 if workload == "stream" else 0.13
                total += self.rounds * TTFB_SAMPLES[workload] * per_sample
        total += sum(self.teams_duration + self.warmup + 3.0 + t / 40.0 for t in self.teams_scale)
        if self.soak_requests:
            total += self.warmup + 3.0 + self.soak_requests / 3000.0
        total += self.dispatcher_seconds + 3.0
        total += 5.0  # start-up and shutdown of the servers
        return total


def available(variant: str) -> str | None:
    """None when the variant can run here, else why not."""
    if variant.startswith("tlm-"):
        for module in (
            "team_logging_middleware.middleware",
            "team_logging_middleware.runtime",
            "team_logging_middleware.dispatcher",
            "team_logging_middleware.stores.memory",
        ):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not there yet"
    if variant == "tlm-langfuse":
        if importlib.util.find_spec("team_logging_middleware.sinks.langfuse") is None:
            return "the Langfuse sink is not there yet"
        reason = fake_langfuse_unavailable()
        if reason:
            return reason
    return None


def fake_langfuse_unavailable() -> str | None:
    try:
        module = importlib.import_module("tests.fixtures.fake_langfuse")
    except Exception as exc:  # an import error in a fixture module is a reason, not a crash
        return f"tests.fixtures.fake_langfuse does not import: {exc!r}"
    if not hasattr(module, "main"):
        return "tests.fixtures.fake_langfuse has no command-line entry point yet"
    return None


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one short round (CI): ~30 s in all")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; smoke 1)")
    parser.add_argument(
        "--duration", type=int, help="seconds per measurement (default 10; smoke 1)"
    )
    parser.add_argument(
        "--warmup", type=int, help="seconds of warm-up per cell (default 2; smoke 1)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="variants to run")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="workloads to run")
    parser.add_argument("--teams", nargs="*", type=int, help="team counts for the scale run")
    parser.add_argument("--soak-requests", type=int, help="requests in the memory soak (0: skip)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results)")
    parser.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refresh bench/RESULTS.md and bench/latest.json (default: full default runs only)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    args = parser.parse_args(argv)

    smoke = bool(args.smoke)
    notes: list[str] = []
    explicit = args.variants is not None
    if explicit:
        variants = tuple(args.variants)
    elif smoke:
        variants = ("bare", "tlm-off", "tlm-null", "tlm-langfuse")
    else:
        variants = VARIANTS
    missing = {v: r for v in variants if (r := available(v))}
    if missing:
        if smoke and not explicit and set(missing) == {"tlm-langfuse"}:
            notes.append(f"tlm-langfuse skipped: {missing['tlm-langfuse']}")
            variants = tuple(v for v in variants if v != "tlm-langfuse")
        else:
            raise BenchError(
                "cannot run "
                + "; ".join(f"{v}: {r}" for v, r in missing.items())
                + " (choose others with --variants)"
            )
    if "bare" not in variants:
        variants = ("bare", *variants)  # every ratio is to bare from the same round
    workloads = tuple(args.workloads) if args.workloads else (("json",) if smoke else WORKLOADS)
    teams_variant = "tlm-langfuse" if "tlm-langfuse" in variants else "tlm-null"
    if args.teams is not None:
        teams_scale = tuple(args.teams)
    elif smoke or teams_variant not in variants:
        teams_scale = ()
    else:
        teams_scale = (1, 100, 1000)
    soak_variant_ok = "tlm-langfuse" in variants
    soak = args.soak_requests if args.soak_requests is not None else (2_000 if smoke else 200_000)
    if soak and not soak_variant_ok:
        notes.append("memory soak skipped: it needs the tlm-langfuse variant")
        soak = 0
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not pin:
        notes.append(
            "processes not pinned to cores (fewer than 2 cores, taskset missing or --no-pin)"
        )
    default_run = not smoke and not explicit and args.workloads is None and args.rounds is None
    return Config(
        smoke=smoke,
        rounds=args.rounds or (1 if smoke else 3),
        duration=args.duration or (1 if smoke else 10),
        warmup=args.warmup if args.warmup is not None else (1 if smoke else 2),
        variants=variants,
        workloads=workloads,
        teams_scale=teams_scale,
        teams_variant=teams_variant,
        teams_duration=1 if smoke else max(1, (args.duration or 10) * 3 // 10),
        soak_requests=soak,
        soak_slice=1 if smoke else 5,
        dispatcher_seconds=(0.0 if "tlm-langfuse" not in variants else (1.0 if smoke else 5.0)),
        idle_quiet=0.3 if smoke else 0.5,
        out=args.out or BENCH_DIR / "results",
        publish=args.publish if args.publish is not None else default_run,
        pin=pin,
        notes=notes,
    )


# -- the run --------------------------------------------------------------------------------


class Bench:
    """One benchmark run: starts the servers, measures, stops everything it started."""

    def __init__(self, cfg: Config, procs: Processes, workdir: Path) -> None:
        self.cfg = cfg
        self.procs = procs
        self.workdir = workdir
        self.server_core = SERVER_CORE if cfg.pin else None
        self.client_core = CLIENT_CORE if cfg.pin else None
        self.langfuse_port: int | None = None
        self.langfuse_proc: subprocess.Popen[bytes] | None = None
        self.langfuse_sent = 0  # spans our servers reported sent, to compare with the fake's count
        self.langfuse_drained = True  # False once a server still had records when it was stopped

    def retire(self, servers: Sequence[Server], drain_seconds: float = 15.0) -> None:
        """Stop servers; a Langfuse variant first drains, and its sent count is kept."""
        for server in servers:
            if server.variant == "tlm-langfuse" and server.proc.poll() is None:
                try:
                    stats = server.drain(time.monotonic() + drain_seconds)
                except (OSError, BenchError, ValueError):
                    self.langfuse_drained = False
                    continue
                self.langfuse_sent += int(stats.get("sent", 0))
                if stats.get("pending"):
                    self.langfuse_drained = False
        self.procs.stop_all([s.proc for s in servers])

    def langfuse_check(self) -> dict[str, int] | None:
        if self.langfuse_port is None:
            return None
        stats = _http_get_json(self.langfuse_port, "/_fake/stats")
        return {
            "sent_by_servers": self.langfuse_sent,
            "received_by_fake": sum(stats.get("spans", {}).values()),
            "otlp_requests": int(stats.get("counters", {}).get("otlp_requests", 0)),
            # When a server was stopped with records still queued, its shutdown flush sent more
            # than it had reported: the fake then received more than "sent_by_servers".
            "all_drained": self.langfuse_drained,
        }

    # processes

    def start_fake_langfuse(self, projects: int) -> None:
        port = free_port()
        # Every team's project is registered (auth is checked per request, as Langfuse does);
        # spans are decoded and counted but not kept, so the fake's memory stays flat.
        pairs = [":".join(langfuse_keys(i)) for i in range(projects)]
        argv = pinned(
            self.client_core,
            [
                sys.executable,
                "-m",
                "tests.fixtures.fake_langfuse",
                "--port",
                str(port),
                "--no-keep",
                *(arg for pair in pairs for arg in ("--project", pair)),
            ],
        )
        log = self.workdir / "fake-langfuse.log"
        self.langfuse_proc = self.procs.start(argv, env=dict(os.environ), log=log)
        deadline = time.monotonic() + 20
        while True:
            if self.langfuse_proc.poll() is not None:
                raise BenchError(f"the fake Langfuse server exited:\n{tail(log)}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the fake Langfuse server did not start:\n{tail(log)}")
            time.sleep(0.05)
        self.langfuse_port = port

    @property
    def langfuse_host(self) -> str:
        return f"http://{HOST}:{self.langfuse_port}"

    def start_server(
        self, name: str, variant: str, *, teams: int = 1, langfuse_host: str | None = None
    ) -> Server:
        port = free_port()
        env = {
            **os.environ,
            "BENCH_VARIANT": variant,
            "BENCH_TEAMS": str(teams),
            "BENCH_LANGFUSE_HOST": langfuse_host or "",
            "PYTHONHASHSEED": "0",
        }
        argv = pinned(
            self.server_core,
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "bench.app:create_app",
                "--host",
                HOST,
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--lifespan",
                "on",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        )
        log = self.workdir / f"server-{name}.log"
        proc = self.procs.start(argv, env=env, log=log)
        return Server(name=name, variant=variant, port=port, proc=proc, log=log)

    def start_servers(self, specs: Sequence[tuple[str, str, int, str | None]]) -> dict[str, Server]:
        servers = {
            name: self.start_server(name, v, teams=t, langfuse_host=h) for name, v, t, h in specs
        }
        deadline = time.monotonic() + 30
        for server in servers.values():
            server.wait_ready(deadline)
        return servers

    # one measurement

    def measure(
        self, server: Server, workload: str, *, seconds: int, teams: int = 1
    ) -> dict[str, Any]:
        server.check_alive()
        rss_before = server.rss_kb()
        ticks_before = server.cpu_ticks()
        wall_before = time.monotonic()
        result = run_wrk(
            server.url,
            workload,
            connections=CONNECTIONS[workload],
            seconds=seconds,
            teams=teams,
            core=self.client_core,
        )
        ticks_loaded = server.cpu_ticks()
        loaded_wall = time.monotonic() - wall_before
        drained = server.wait_idle(quiet=self.cfg.idle_quiet, deadline=time.monotonic() + 20)
        ticks_after = server.cpu_ticks()
        rss_after = server.rss_kb()
        errors = result["errors"]
        failed = sum(errors.values())
        if result["requests"] == 0:
            raise BenchError(f"{server.name}/{workload}: wrk completed no request ({errors})")
        cpu_seconds = (ticks_after - ticks_before) / CLK_TCK
        out = {
            "requests": result["requests"],
            "errors": failed,
            "error_detail": errors,
            "rps": result["rps"],
            "p50_ms": result["latency_us"]["p50"] / 1000.0,
            "p99_ms": result["latency_us"]["p99"] / 1000.0,
            "cpu_us_per_req": cpu_seconds * 1e6 / result["requests"],
            "cpu_utilisation": (ticks_loaded - ticks_before) / CLK_TCK / loaded_wall,
            "drain_s": round(drained, 3),
            "rss_before_mb": rss_before / 1024.0,
            "rss_after_mb": rss_after / 1024.0,
        }
        if workload in TTFB_SAMPLES and not self.cfg.smoke:
            out["ttfb"] = measure_ttfb(server.port, workload, TTFB_SAMPLES[workload])
        with contextlib.suppress(OSError, BenchError, ValueError):
            out["stats"] = server.stats()
        return out

    # the parts of a run

    def run_matrix(self, servers: dict[str, Server]) -> list[dict[str, Any]]:
        cfg = self.cfg
        cells = cfg.cells()
        results: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cells}
        for round_no in range(cfg.rounds):
            for workload, variant in cells:
                server = servers[variant]
                if round_no == 0 and cfg.warmup:
                    run_wrk(
                        server.url,
                        workload,
                        connections=CONNECTIONS[workload],
                        seconds=cfg.warmup,
                        core=self.client_core,
                    )
                    server.wait_idle(quiet=cfg.idle_quiet, deadline=time.monotonic() + 20)
                m = self.measure(server, workload, seconds=cfg.duration_for(workload))
                m["round"] = round_no
                results[(workload, variant)].append(m)
                log(
                    f"  round {round_no + 1}/{cfg.rounds} {workload:6} {variant:13} "
                    f"{m['rps']:9.0f} req/s  p50 {m['p50_ms']:7.2f} ms  "
                    f"{m['cpu_us_per_req']:7.1f} µs CPU/req"
                    + (f"  TTFB p50 {m['ttfb']['p50_ms']:.3f} ms" if "ttfb" in m else "")
                    + (f"  ({m['errors']} errors)" if m["errors"] else "")
                )
        return summarise(results, cfg)

    def run_teams_scale(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        if not cfg.teams_scale:
            return []
        host = self.langfuse_host if cfg.teams_variant == "tlm-langfuse" else None
        out = []
        for teams in cfg.teams_scale:
            servers = self.start_servers([(f"teams-{teams}", cfg.teams_variant, teams, host)])
            server = servers[f"teams-{teams}"]
            m: dict[str, Any]
            try:
                # Warm-up touches every team once (plans, resolver entries, live sinks); how
                # long the server then stays busy delivering is itself a result.
                ticks = server.cpu_ticks()
                warm = run_wrk(
                    server.url,
                    "json",
                    connections=50,
                    seconds=cfg.warmup or 1,
                    teams=teams,
                    core=self.client_core,
                )
                settle = server.wait_idle(
                    quiet=cfg.idle_quiet, deadline=time.monotonic() + SETTLE_DEADLINE
                )
                # The warm-up's CPU, delivery included, per request: with many teams the
                # delivery can outlast the deadline, which makes this a lower bound.
                settled = settle < SETTLE_DEADLINE
                warm_cpu = (server.cpu_ticks() - ticks) / CLK_TCK * 1e6 / max(1, warm["requests"])
                if settled:
                    try:
                        m = self.measure(server, "json", seconds=cfg.teams_duration, teams=teams)
                    except BenchError as exc:
                        # A server too busy delivering to answer is a finding, not a crash.
                        m = {"error": str(exc), "requests": 0, "rps": 0.0}
                else:
                    m = {"error": f"still delivering {SETTLE_DEADLINE:.0f} s after the warm-up"}
                m.update(
                    warmup_requests=warm["requests"],
                    warmup_cpu_us_per_req=warm_cpu,
                    warmup_settled=settled,
                    settle_s=round(settle, 1),
                )
            finally:
                # Thousands of lanes drain slowly; the CPU of the drain was measured already.
                self.retire([server], drain_seconds=5.0)
            m.update(variant=cfg.teams_variant, teams=teams)
            out.append(m)
            if "error" in m:
                log(
                    f"  teams {teams:5} {cfg.teams_variant}: {m['error']}; warm-up "
                    f"{'' if m['warmup_settled'] else '≥ '}{m['warmup_cpu_us_per_req']:.0f} "
                    "µs CPU/req incl. delivery"
                )
            else:
                log(
                    f"  teams {teams:5} {cfg.teams_variant}: {m['rps']:9.0f} req/s  "
                    f"{m['cpu_us_per_req']:7.1f} µs CPU/req  RSS {m['rss_after_mb']:.1f} MB  "
                    f"(busy {m['settle_s']} s after the warm-up)"
                )
        return out

    def run_soak(self) -> dict[str, Any] | None:
        cfg = self.cfg
        if not cfg.soak_requests:
            return None
        down = f"http://{HOST}:{free_port()}"  # nothing listens there: every export fails
        servers = self.start_servers([("soak", "tlm-langfuse", 1, down)])
        server = servers["soak"]
        try:
            warm = run_wrk(
                server.url, "json", connections=50, seconds=cfg.warmup or 1, core=self.client_core
            )
            rss_start = server.rss_kb()
            series = [{"requests": 0, "rss_mb": rss_start / 1024.0}]
            total = 0
            errors = 0
            started = time.monotonic()
            while total < cfg.soak_requests:
                server.check_alive()
                r = run_wrk(
                    server.url,
                    "json",
                    connections=50,
                    seconds=cfg.soak_slice,
                    core=self.client_core,
                )
                total += r["requests"]
                errors += sum(r["errors"].values())
                series.append({"requests": total, "rss_mb": server.rss_kb() / 1024.0})
            elapsed = time.monotonic() - started
            rss_end = server.rss_kb()
            stats = None
            with contextlib.suppress(OSError, BenchError, ValueError):
                stats = server.stats()
        finally:
            # A graceful shutdown would wait out the dispatcher's flush deadline while Langfuse
            # is down (by design); nothing is left to measure, so do not wait for it.
            self.procs.stop(server.proc, timeout=1.0)
        growth = (rss_end - rss_start) / 1024.0
        peak = max(p["rss_mb"] for p in series)
        log(
            f"  soak: {total} requests with Langfuse down, "
            f"RSS {rss_start / 1024:.1f} → {rss_end / 1024:.1f} MB"
        )
        return {
            "variant": "tlm-langfuse",
            "langfuse": "down (connection refused)",
            "warmup_requests": warm["requests"],
            "requests": total,
            "errors": errors,
            "seconds": elapsed,
            "rps": total / elapsed,
            "rss_start_mb": rss_start / 1024.0,
            "rss_end_mb": rss_end / 1024.0,
            "rss_peak_mb": peak,
            "growth_mb": growth,
            "series": series,
            "stats": stats,
        }

    def run_dispatcher(self) -> dict[str, Any] | None:
        cfg = self.cfg
        if not cfg.dispatcher_seconds or self.langfuse_port is None:
            return None
        argv = pinned(
            self.server_core,
            [
                sys.executable,
                "-m",
                "bench.dispatch",
                "--langfuse-host",
                self.langfuse_host,
                "--seconds",
                str(cfg.dispatcher_seconds),
                "--stage-records",
                "500" if cfg.smoke else "5000",
            ],
        )
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=120 + cfg.dispatcher_seconds
        )
        for line in done.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
                log(
                    "  dispatcher alone: "
                    f"{result['records_per_cpu_second']:.0f} records/s per core "
                    f"({result['sent']} sent, {result['lost']} lost)"
                )
                return result
        raise BenchError(
            f"bench.dispatch failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        )

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.monotonic()
        loadavg_at_start = _loadavg()
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        langfuse_projects = max([1, *cfg.teams_scale]) if cfg.teams_variant == "tlm-langfuse" else 1
        if "tlm-langfuse" in cfg.variants:
            self.start_fake_langfuse(langfuse_projects)
        host = self.langfuse_host if self.langfuse_port else None
        in_matrix = sorted({v for _, v in cfg.cells()}, key=VARIANTS.index)
        servers = self.start_servers([(v, v, 1, host) for v in in_matrix])
        log(f"servers up: {', '.join(f'{s.name}=:{s.port}' for s in servers.values())}")
        try:
            matrix = self.run_matrix(servers)
        finally:
            self.retire(list(servers.values()))
        teams = self.run_teams_scale()
        soak = self.run_soak()
        langfuse = self.langfuse_check()  # before the dispatcher-alone run adds its own spans
        dispatcher = self.run_dispatcher()
        report: dict[str, Any] = {
            "schema": 1,
            "mode": "smoke" if cfg.smoke else "full",
            "started_at": started_at,
            "machine": machine_info(cfg),
            "config": {
                "rounds": cfg.rounds,
                "duration_s": cfg.duration,
                "warmup_s": cfg.warmup,
                "variants": list(cfg.variants),
                "workloads": list(cfg.workloads),
                "connections": CONNECTIONS,
                "ttfb_samples": TTFB_SAMPLES if not cfg.smoke else {},
                "teams_scale": list(cfg.teams_scale),
                "soak_requests": cfg.soak_requests,
                "pinned": cfg.pin,
                "idle_quiet_s": cfg.idle_quiet,
                "notes": cfg.notes,
            },
            "results": matrix,
            "teams_scale": teams,
            "soak": soak,
            "dispatcher": dispatcher,
            "langfuse_delivery": langfuse,
            "processes": self.procs.started,
        }
        report["machine"]["loadavg_at_start"] = loadavg_at_start
        report["machine"]["loadavg_at_end"] = _loadavg()
        report["targets"] = evaluate_targets(report)
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        return report


# -- summary, targets and report ------------------------------------------------------------


def summarise(
    results: dict[tuple[str, str], list[dict[str, Any]]], cfg: Config
) -> list[dict[str, Any]]:
    out = []
    for (workload, variant), rounds in results.items():
        bare = results.get((workload, "bare"), [])
        ratios: dict[str, list[float]] = {"rps": [], "cpu_extra_us": [], "ttfb_p50": [], "p50": []}
        for m in rounds:
            base = next((b for b in bare if b["round"] == m["round"]), None)
            if base is None:
                continue
            ratios["rps"].append(m["rps"] / base["rps"])
            ratios["p50"].append(m["p50_ms"] / base["p50_ms"] if base["p50_ms"] else float("nan"))
            ratios["cpu_extra_us"].append(m["cpu_us_per_req"] - base["cpu_us_per_req"])
            if "ttfb" in m and "ttfb" in base:
                ratios["ttfb_p50"].append(m["ttfb"]["p50_ms"] / base["ttfb"]["p50_ms"])
        summary: dict[str, Any] = {
            "variant": variant,
            "workload": workload,
            "connections": CONNECTIONS[workload],
            "duration_s": cfg.duration_for(workload),
            "rps": median([m["rps"] for m in rounds]),
            "rps_ratio": median(ratios["rps"]),
            "p50_ms": median([m["p50_ms"] for m in rounds]),
            "p99_ms": median([m["p99_ms"] for m in rounds]),
            "p50_ratio": median(ratios["p50"]),
            "cpu_us_per_req": median([m["cpu_us_per_req"] for m in rounds]),
            "cpu_extra_us": median(ratios["cpu_extra_us"]),
            "server_cpu_share": median([m["cpu_utilisation"] for m in rounds]),
            "drain_s": median([m["drain_s"] for m in rounds]),
            "rss_mb": median([m["rss_after_mb"] for m in rounds]),
            "errors": sum(m["errors"] for m in rounds),
            "rounds": rounds,
        }
        if any("ttfb" in m for m in rounds):
            summary["ttfb_p50_ms"] = median([m["ttfb"]["p50_ms"] for m in rounds if "ttfb" in m])
            summary["ttfb_p99_ms"] = median([m["ttfb"]["p99_ms"] for m in rounds if "ttfb" in m])
            summary["ttfb_p50_ratio"] = median(ratios["ttfb_p50"])
        out.append(summary)
    return out


def _find(report: dict[str, Any], variant: str, workload: str) -> dict[str, Any] | None:
    return next(
        (r for r in report["results"] if r["variant"] == variant and r["workload"] == workload),
        None,
    )


# (target, goal, variant, workload, field, unit, passes(value))
_TARGETS: tuple[tuple[str, str, str, str, str, str, Callable[[float], bool]], ...] = (
    ("tlm-off JSON req/s", "≥ 0.97x bare", "tlm-off", "json", "rps_ratio", "x bare",
     lambda v: v >= 0.97),
    ("tlm-null JSON extra CPU", "≤ 15 µs/request", "tlm-null", "json", "cpu_extra_us", "µs",
     lambda v: v <= 15.0),
    ("tlm-null JSON req/s", "≥ 0.85x bare", "tlm-null", "json", "rps_ratio", "x bare",
     lambda v: v >= 0.85),
    ("tlm-langfuse JSON extra CPU (incl. export)", "≤ 60 µs/request", "tlm-langfuse", "json",
     "cpu_extra_us", "µs", lambda v: v <= 60.0),
    ("tlm-null stream TTFB p50", "≤ 1.05x bare", "tlm-null", "stream", "ttfb_p50_ratio",
     "x bare", lambda v: v <= 1.05),
    ("tlm-langfuse stream TTFB p50", "≤ 1.05x bare", "tlm-langfuse", "stream", "ttfb_p50_ratio",
     "x bare", lambda v: v <= 1.05),
    ("tlm-null paced req/s", "≥ 0.97x bare", "tlm-null", "paced", "rps_ratio", "x bare",
     lambda v: v >= 0.97),
    ("tlm-langfuse paced req/s", "≥ 0.97x bare", "tlm-langfuse", "paced", "rps_ratio", "x bare",
     lambda v: v >= 0.97),
)  # fmt: skip
SOAK_LIMIT_MB = 64.0


def _target(name: str, goal: str, value: float | None, ok: bool, unit: str) -> dict[str, Any]:
    measured = value is not None and value == value  # not None, not NaN
    return {
        "target": name,
        "goal": goal,
        "value": round(value, 3) if measured and value is not None else None,
        "unit": unit,
        "pass": ok if measured else None,
    }


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and pass/fail (None: not measured)."""
    targets = []
    for name, goal, variant, workload, key, unit, passes in _TARGETS:
        row = _find(report, variant, workload)
        value = row.get(key) if row else None
        ok = value is not None and value == value and passes(float(value))
        targets.append(_target(name, goal, value, ok, unit))
    soak = report.get("soak")
    goal = f"≤ {SOAK_LIMIT_MB:.0f} MB / 200k requests, Langfuse down"
    if soak:
        # Compared as measured: a smoke soak runs fewer requests, so it only catches gross leaks.
        growth = float(soak["growth_mb"])
        name = f"memory growth over {soak['requests']:,} requests"
        targets.append(_target(name, goal, growth, growth <= SOAK_LIMIT_MB, "MB"))
    else:
        targets.append(_target("memory growth, Langfuse down", goal, None, False, "MB"))
    return targets


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_info(cfg: Config) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    wrk_version = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        first = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5).stdout
        wrk_version = first.splitlines()[0].split(" [")[0] if first else "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "wrk": wrk_version,
        "packages": versions,
        "pinning": f"server on core {SERVER_CORE}, wrk + fake Langfuse on core {CLIENT_CORE}"
        if cfg.pin
        else "none",
    }


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:{spec}}{suffix}"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    c = report["config"]
    lines = [
        f"# Benchmark results ({report['mode']} run, {report['started_at']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"{m['implementation']} {m['python']}, {m['wrk']}. Pinning: {m['pinning']}. Load "
        f"average (1/5/15 min) at start {m.get('loadavg_at_start')}, at end "
        f"{m.get('loadavg_at_end')}: anything well above 2 means other work shared the cores, "
        "which lowers throughput and inflates CPU per request.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v) + ".",
        "",
        f"One uvicorn worker (uvloop, httptools, no access log) per variant; wrk -t1 "
        f"(JSON/stream {c['connections']['json']}/{c['connections']['stream']} connections, paced "
        f"{c['connections']['paced']}); {c['rounds']} interleaved round(s) of {c['duration_s']} s "
        f"after {c['warmup_s']} s warm-up; medians over rounds; every ratio is to `bare` in the "
        "same round. CPU is the server process's utime+stime over the run and the drain after it "
        '(background export included), divided by requests completed; "server busy" is that '
        "CPU over the run's wall time (near 100%: the server, not the client, was the limit); "
        '"drain s" is how long the server kept working after the load stopped (the quiet period '
        f"that ends it, {c.get('idle_quiet_s', 0.5)} s, included).",
        "",
    ]
    for note in c.get("notes", []):
        lines += [f"Note: {note}.", ""]
    lines += [
        "## Throughput, latency and CPU",
        "",
        "| variant | workload | req/s | x bare | p50 ms | p99 ms | CPU µs/req | extra µs/req "
        "| TTFB p50 ms | TTFB x bare | server busy | drain s | RSS MB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['workload']} | {_fmt(r['rps'], '.0f')} "
            f"| {_fmt(r['rps_ratio'], '.3f')} | {_fmt(r['p50_ms'], '.2f')} "
            f"| {_fmt(r['p99_ms'], '.2f')} | {_fmt(r['cpu_us_per_req'])} "
            f"| {_fmt(r['cpu_extra_us'], '+.1f')} | {_fmt(r.get('ttfb_p50_ms'), '.3f')} "
            f"| {_fmt(r.get('ttfb_p50_ratio'), '.3f')} "
            f"| {_fmt(100 * r['server_cpu_share'], '.0f')}% | {_fmt(r.get('drain_s'))} "
            f"| {_fmt(r['rss_mb'])} | {r['errors']} |"
        )
    if report["teams_scale"]:
        lines += [
            "",
            "## Scaling in the number of teams",
            "",
            "JSON requests spread round-robin over N keys, each of its own team and destination.",
            "",
            "| variant | teams | warm-up requests | warm-up CPU µs/req | busy after warm-up s "
            "| req/s | CPU µs/req | p99 ms | RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in report["teams_scale"]:
            bound = "" if t.get("warmup_settled", True) else "≥ "
            head = (
                f"| {t['variant']} | {t['teams']} | {t.get('warmup_requests', 0):,} "
                f"| {bound}{_fmt(t.get('warmup_cpu_us_per_req'), '.0f')} "
                f"| {bound}{_fmt(t.get('settle_s'))} "
            )
            if "error" in t:
                lines.append(head + f"| {t['error']} | | | |")
                continue
            lines.append(
                head + f"| {_fmt(t['rps'], '.0f')} | {_fmt(t['cpu_us_per_req'])} "
                f"| {_fmt(t['p99_ms'], '.2f')} | {_fmt(t['rss_after_mb'])} |"
            )
        lines += [
            "",
            f"Warm-up: {c['warmup_s']} s of load touching every team; its CPU per request "
            'includes delivering those records, and "busy after warm-up" is how long that '
            f"delivery kept the server working (given up after {SETTLE_DEADLINE:.0f} s: then "
            "both are lower bounds and the steady-state measurement is skipped).",
        ]
    soak = report.get("soak")
    if soak:
        lines += [
            "",
            "## Memory soak (Langfuse destination down)",
            "",
            f"{soak['requests']:,} JSON requests to `tlm-langfuse` whose Langfuse host refuses "
            f"connections, after {soak['warmup_requests']:,} warm-up requests: RSS "
            f"{soak['rss_start_mb']:.1f} → {soak['rss_end_mb']:.1f} MB (growth "
            f"{soak['growth_mb']:+.1f} MB, peak {soak['rss_peak_mb']:.1f} MB) at "
            f"{soak['rps']:.0f} req/s.",
        ]
    delivery = report.get("langfuse_delivery")
    if delivery:
        lines += [
            "",
            f"Langfuse delivery check: the servers reported {delivery['sent_by_servers']:,} spans "
            f"sent; the fake Langfuse received and decoded {delivery['received_by_fake']:,} "
            f"in {delivery['otlp_requests']:,} OTLP requests"
            + (
                "."
                if delivery.get("all_drained", True)
                else " (some servers still had records queued when stopped, which their "
                "shutdown flush then sent)."
            ),
        ]
    disp = report.get("dispatcher")
    if disp:
        lines += [
            "",
            "## Dispatcher alone",
            "",
            f"{disp['sent']:,} records decoded, encoded as OTLP, gzipped and sent to the fake "
            f"Langfuse in {disp['seconds']:.1f} s wall / {disp['cpu_seconds']:.2f} s CPU: "
            f"**{disp['records_per_cpu_second']:,.0f} records/s per core** "
            f"({disp['records_per_second']:,.0f} records/s wall; {disp['lost']} lost; the "
            f"submitting loop was held back {disp['rejected_submits']:,} times by a full intake).",
        ]
    lines += ["", "## Targets", "", "| target | goal | measured | result |", "|---|---|---:|---|"]
    for t in report["targets"]:
        verdict = {True: "pass", False: "**FAIL**", None: "not measured"}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']} {t['unit']}".strip()
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {verdict} |")
    if report["mode"] == "smoke":
        lines += ["", "Smoke run: one short round; the figures are indicative only."]
    lines += ["", f"Total time: {report['elapsed_s']} s.", ""]
    return "\n".join(lines)


_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}" if message else "", flush=True)


def write_outputs(report: dict[str, Any], cfg: Config) -> tuple[Path, Path]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = cfg.out / f"{stamp}.json"
    md_path = cfg.out / f"{stamp}.md"
    text = json.dumps(report, indent=2, default=str) + "\n"
    markdown = render_markdown(report)
    json_path.write_text(text)
    md_path.write_text(markdown)
    if cfg.publish:
        (BENCH_DIR / "latest.json").write_text(text)
        (BENCH_DIR / "RESULTS.md").write_text(markdown)
    return json_path, md_path


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop the servers."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if shutil.which("wrk") is None:
            raise BenchError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if cfg.pin:
        # The runner (and the TTFB client) belong on the client core, away from the server.
        os.sched_setaffinity(0, {CLIENT_CORE})
    estimate = cfg.estimate_seconds()
    log(
        f"bench: {'smoke' if cfg.smoke else 'full'} run, variants {', '.join(cfg.variants)}; "
        f"workloads {', '.join(cfg.workloads)}; {cfg.rounds} round(s) x {cfg.duration} s; "
        f"planned duration ≈ {estimate / 60:.1f} min ({estimate:.0f} s)"
    )
    for note in cfg.notes:
        log(f"bench: note: {note}")
    procs = Processes()
    with terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="tlm-bench-") as tmp:
        try:
            report = Bench(cfg, procs, Path(tmp)).run()
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; stopping servers", file=sys.stderr)
            return 130
        finally:
            procs.stop_all(timeout=5.0)
    json_path, md_path = write_outputs(report, cfg)
    print("\n" + render_markdown(report), flush=True)
    log(
        f"bench: wrote {json_path} and {md_path}"
        + (" and bench/RESULTS.md, bench/latest.json" if cfg.publish else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
