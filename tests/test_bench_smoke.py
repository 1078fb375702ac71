"""The benchmark: its gateway app at the ASGI level, its report logic, and an end-to-end smoke run.

The smoke run (``python -m bench.run --smoke``) starts real uvicorn servers, drives them with wrk
and must finish within a minute; it needs ``wrk`` on PATH and fails (never skips) without it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from bench import run as bench_run
from bench.app import REQUEST_BODIES, STREAM_CHUNKS, build_app

from tests.helpers import asgi_http_scope

ROOT = Path(__file__).resolve().parent.parent


# -- the gateway app, driven with scripted ASGI messages ------------------------------------------


def _scope(path: str = "/v1/chat/completions", method: str = "POST") -> dict[str, Any]:
    return asgi_http_scope(
        path,
        [(b"content-type", b"application/json"), (b"authorization", b"Bearer k-0")],
        method=method,
        asgi={"version": "3.0"},
    )


async def _call(app: Any, body: bytes, path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    """Run one request; every sent message is stamped with the loop time it was sent at."""
    loop = asyncio.get_running_loop()
    incoming = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:], "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # a real server blocks until the client disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append({**message, "at": loop.time()})

    await app(_scope(path), receive, send)
    return sent


def _events(messages: list[dict[str, Any]]) -> list[bytes]:
    return [m["body"] for m in messages if m["type"] == "http.response.body" and m.get("body")]


async def test_json_request_gets_a_chat_completion_with_usage() -> None:
    app, _ = build_app("bare")
    messages = await _call(app, REQUEST_BODIES["json"])
    start, body = messages[0], messages[1]
    assert start["status"] == 200
    assert dict(start["headers"])[b"content-type"] == b"application/json"
    answer = json.loads(body["body"])
    assert int(dict(start["headers"])[b"content-length"]) == len(body["body"])
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "gpt-bench"
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["total_tokens"] == 25


async def test_stream_sends_each_chunk_as_its_own_message_then_usage_and_done() -> None:
    app, _ = build_app("bare")
    messages = await _call(app, REQUEST_BODIES["stream"])
    assert messages[0]["status"] == 200
    assert dict(messages[0]["headers"])[b"content-type"] == b"text/event-stream"
    events = _events(messages)
    assert len(events) == STREAM_CHUNKS + 2
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:STREAM_CHUNKS])
    assert text.startswith("Hello") and text.endswith("!")
    assert chunks[STREAM_CHUNKS - 1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == STREAM_CHUNKS
    assert events[-1] == b"data: [DONE]\n\n"
    assert messages[-1]["more_body"] is False


async def test_paced_stream_waits_between_chunks_but_not_before_the_first() -> None:
    app, _ = build_app("bare")
    ticks = 0

    async def ticker() -> None:
        # Counts event-loop iterations: a message sent at the same count as the one before it
        # was sent without the app suspending in between.
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    sent_at_tick: list[int] = []
    task = asyncio.create_task(ticker())
    try:
        loop = asyncio.get_running_loop()
        times: list[float] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": REQUEST_BODIES["paced"], "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" or message.get("body"):
                sent_at_tick.append(ticks)
                times.append(loop.time())

        await app(_scope(), receive, send)
    finally:
        task.cancel()
    assert len(times) == 1 + STREAM_CHUNKS + 2
    assert sent_at_tick[1] == sent_at_tick[0]  # the first token is not held back by the pacing
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert min(gaps) >= 0.004  # 5 ms pacing; the loop clock may round down by a hair


async def test_unknown_route_is_404_and_bad_json_is_400() -> None:
    app, _ = build_app("bare")
    assert (await _call(app, b"{}", path="/nope"))[0]["status"] == 404
    assert (await _call(app, b"{not json at all"))[0]["status"] == 400


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        build_app("fastest")


async def test_basehttp_variant_logs_both_bodies_from_its_drain_task() -> None:
    app, gateway = build_app("basehttp")
    for hook in gateway.on_startup:
        await hook()
    try:
        messages = await _call(app, REQUEST_BODIES["stream"])
        assert len(_events(messages)) == STREAM_CHUNKS + 2
        stats_messages = await _call(app, b"", path="/__bench/stats")
        deadline = time.monotonic() + 5
        while json.loads(_events(stats_messages)[0])["logged"] < 1:
            assert time.monotonic() < deadline, "the drain task never logged the request"
            await asyncio.sleep(0.01)
            stats_messages = await _call(app, b"", path="/__bench/stats")
    finally:
        for hook in gateway.on_shutdown:
            await hook()


# -- report logic --------------------------------------------------------------------------------


def test_percentile_and_median() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert bench_run.percentile(values, 50) in (50.0, 51.0)
    assert bench_run.percentile(values, 99) == 99.0
    assert bench_run.percentile(values, 100) == 100.0
    assert bench_run.median([3.0, float("nan"), 1.0, 2.0]) == 2.0


def _row(variant: str, workload: str, **values: float) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant, "workload": workload, "rps_ratio": 1.0}
    row.update(values)
    return row


def test_targets_pass_and_fail_on_the_issue_thresholds() -> None:
    report = {
        "results": [
            _row("tlm-off", "json", rps_ratio=0.98, cpu_extra_us=1.0),
            _row("tlm-null", "json", rps_ratio=0.80, cpu_extra_us=14.9),
            _row("tlm-langfuse", "json", rps_ratio=0.7, cpu_extra_us=61.0),
            _row("tlm-null", "stream", ttfb_p50_ratio=1.04),
            _row("tlm-null", "paced", rps_ratio=0.96),
        ],
        "soak": {"requests": 200_000, "growth_mb": 12.5},
    }
    verdicts = {t["target"]: t["pass"] for t in bench_run.evaluate_targets(report)}
    assert verdicts["tlm-off JSON req/s"] is True
    assert verdicts["tlm-null JSON extra CPU"] is True
    assert verdicts["tlm-null JSON req/s"] is False
    assert verdicts["tlm-langfuse JSON extra CPU (incl. export)"] is False
    assert verdicts["tlm-null stream TTFB p50"] is True
    assert verdicts["tlm-langfuse stream TTFB p50"] is None  # not measured is not a pass
    assert verdicts["tlm-null paced req/s"] is False
    assert verdicts["memory growth over 200,000 requests"] is True


# -- end to end ----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent, the runner, has exited).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_runner_fails_clearly_without_wrk(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no wrk, no taskset
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--smoke",
            "--variants",
            "bare",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "wrk is not installed" in done.stderr
    assert not list(tmp_path.glob("*.json"))


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    assert shutil.which("wrk"), (
        "the benchmark smoke test needs wrk on PATH (Debian/Ubuntu: apt-get install wrk)"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert elapsed < 60, f"the smoke run took {elapsed:.1f} s"

    [json_path] = tmp_path.glob("*.json")
    [md_path] = tmp_path.glob("*.md")
    report = json.loads(json_path.read_text())
    assert report["mode"] == "smoke"
    assert report["machine"]["cores"] >= 1 and report["machine"]["python"]

    rows = {(r["variant"], r["workload"]): r for r in report["results"]}
    assert {("bare", "json"), ("tlm-off", "json"), ("tlm-null", "json")} <= set(rows)
    for (variant, _workload), row in rows.items():
        assert row["errors"] == 0, f"{variant}: {row['rounds']}"
        assert row["rps"] > 50, variant
        assert 0 < row["p50_ms"] <= row["p99_ms"] < 5_000, variant
        # One request costs between a microsecond and 50 ms of server CPU on any sane machine.
        assert 1 < row["cpu_us_per_req"] < 50_000, variant
        assert 5 < row["rss_mb"] < 2_000, variant
        assert 0 < row["rps_ratio"] < 10, variant
        [measured] = row["rounds"]
        assert measured["requests"] > 50
        assert measured["stats"] is not None
    bare = rows[("bare", "json")]
    assert bare["rps_ratio"] == 1.0 and bare["cpu_extra_us"] == 0.0
    assert rows[("tlm-null", "json")]["cpu_us_per_req"] > 0

    soak = report["soak"]
    assert soak is not None, "the smoke run includes a tiny memory soak"
    assert soak["requests"] >= 2_000 and soak["errors"] == 0
    assert 5 < soak["rss_start_mb"] < 2_000 and 5 < soak["rss_end_mb"] < 2_000
    assert soak["series"][0]["requests"] == 0 and soak["series"][-1]["requests"] == soak["requests"]

    # Every span our Langfuse servers reported sent reached the fake Langfuse, and was decoded.
    delivery = report["langfuse_delivery"]
    assert delivery["sent_by_servers"] > 0
    if delivery["all_drained"]:
        assert delivery["received_by_fake"] == delivery["sent_by_servers"]
    else:  # a server stopped with records queued flushed them on shutdown: more, never fewer
        assert delivery["received_by_fake"] >= delivery["sent_by_servers"]

    disp = report["dispatcher"]
    assert disp is not None and disp["sent"] > 0 and disp["records_per_cpu_second"] > 0

    names = [t["target"] for t in report["targets"]]
    assert "tlm-off JSON req/s" in names and "tlm-null JSON extra CPU" in names
    assert all(t["pass"] in (True, False, None) for t in report["targets"])

    markdown = md_path.read_text()
    assert markdown == bench_run.render_markdown(report)
    for variant, workload in rows:
        assert f"| {variant} | {workload} |" in markdown
    assert "## Targets" in markdown and report["machine"]["cpu"] in markdown
    assert markdown in done.stdout  # the table is printed too

    # Every process the run started (servers, fake Langfuse) is gone.
    assert report["processes"]
    assert not [pid for pid in report["processes"] if _alive(pid)]
