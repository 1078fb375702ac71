"""Graceful shutdown of a real uvicorn process (``tests/_shutdown_app.py``) logging to the fake
Langfuse server in this process.

* Records still queued when the process gets SIGTERM are all delivered to a slow but working
  destination before it exits, within the shutdown deadline.
* When the destination hangs, the process still exits once the deadline passed, and its log says
  how many records it could not deliver and why, without any secret.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fixtures.fake_langfuse import FakeLangfuse, Project
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
APP = "tests._shutdown_app:app"

pytestmark = pytest.mark.timeout(90)

# uvicorn finishes its graceful shutdown, then re-raises the signal it caught, so a clean exit
# after SIGTERM is "terminated by SIGTERM" (older versions exit with 0).
EXIT_CODES = (0, -signal.SIGTERM)

StartProcess = Callable[..., tuple[str, "subprocess.Popen[bytes]"]]


def start_gateway(
    uvicorn_process: StartProcess,
    fake: FakeLangfuse,
    project: Project,
    log_file: Path,
    *,
    shutdown_timeout: float,
    batch_size: int,
    flush_interval: float,
) -> tuple[str, subprocess.Popen[bytes]]:
    return uvicorn_process(
        APP,
        cwd=ROOT,
        env={
            "SHUTDOWN_LANGFUSE_HOST": fake.url,
            "SHUTDOWN_LANGFUSE_PUBLIC_KEY": project.public_key,
            "SHUTDOWN_LANGFUSE_SECRET_KEY": project.secret_key,
            "SHUTDOWN_TIMEOUT": str(shutdown_timeout),
            "SHUTDOWN_BATCH_SIZE": str(batch_size),
            "SHUTDOWN_FLUSH_INTERVAL": str(flush_interval),
            "SHUTDOWN_LOG_FILE": str(log_file),
        },
        shutdown_timeout=30.0,
    )


def send_chats(base_url: str, count: int) -> list[str]:
    ids = [f"req-{i}" for i in range(count)]
    with httpx.Client(base_url=base_url, timeout=10, trust_env=False) as client:
        for request_id in ids:
            response = client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": request_id}]},
                headers={"authorization": "Bearer key-t", "x-request-id": request_id},
            )
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == f"echo:{request_id}"
    return ids


def terminate(proc: subprocess.Popen[bytes], limit: float) -> float:
    """SIGTERM, then the seconds until the process exited (it must, within ``limit``)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the process did not exit within {limit}s of SIGTERM") from None
    return time.monotonic() - started


def test_sigterm_delivers_every_queued_record_to_a_slow_destination(
    uvicorn_process: StartProcess, fake_langfuse: FakeLangfuse, tmp_path: Path
) -> None:
    project = fake_langfuse.add_project()
    delay = 0.25
    fake_langfuse.set_mode("delay", delay=delay)
    log_file = tmp_path / "gateway.log"
    count, batch_size, deadline = 30, 5, 20.0
    base_url, proc = start_gateway(
        uvicorn_process,
        fake_langfuse,
        project,
        log_file,
        shutdown_timeout=deadline,
        batch_size=batch_size,
        flush_interval=0.05,
    )
    ids = send_chats(base_url, count)
    # One batch at a time, `delay` each: records are still queued when SIGTERM arrives.
    assert fake_langfuse.span_count(project.public_key) < count

    elapsed = terminate(proc, deadline + 10)
    print(f"\nshutdown: {count} queued records delivered, exit {elapsed:.2f}s after SIGTERM")

    assert proc.returncode in EXIT_CODES
    assert elapsed < deadline
    received = {
        g["trace"]["metadata"]["request_id"] for g in fake_langfuse.generations(project.public_key)
    }
    assert received == set(ids)
    log = log_file.read_text()
    assert f"every record was delivered ({count} sent)" in log
    assert project.secret_key not in log


def test_sigterm_with_a_hanging_destination_exits_at_the_deadline_and_reports_losses(
    uvicorn_process: StartProcess, fake_langfuse: FakeLangfuse, tmp_path: Path
) -> None:
    project = fake_langfuse.add_project()
    hang = 60.0
    fake_langfuse.set_mode("delay", delay=hang)
    log_file = tmp_path / "gateway.log"
    count, deadline = 25, 1.0
    base_url, proc = start_gateway(
        uvicorn_process,
        fake_langfuse,
        project,
        log_file,
        shutdown_timeout=deadline,
        batch_size=10,
        flush_interval=0.05,
    )
    send_chats(base_url, count)
    wait_for(
        lambda: fake_langfuse.stats()["counters"].get("otlp_requests", 0) >= 1,
        "an export to hang at the destination",
    )

    elapsed = terminate(proc, 20.0)
    print(f"\nshutdown with a hanging destination: exit {elapsed:.2f}s after SIGTERM")

    assert proc.returncode in EXIT_CODES
    assert elapsed < hang / 4  # it did not wait for the destination
    assert fake_langfuse.span_count(project.public_key) == 0
    log = log_file.read_text()
    lines = [line for line in log.splitlines() if "log delivery stopped" in line]
    assert len(lines) == 1, log
    # One line with the counts and the reason: every record was abandoned at shutdown.
    assert "0 sent, not delivered: langfuse:" in lines[0]
    assert f"={count} (shutdown={count})" in lines[0]
    assert project.secret_key not in log and project.public_key not in log
