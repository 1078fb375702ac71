"""Two real gateway processes sharing one real Redis: settings, keys and cached answers written
through one replica are used by the other, and a Redis crash and restart fails no chat request.

Records are read where they land (one JSONL directory shared by both replicas); every wait polls a
condition with a deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.redis_server import RedisServer
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = ["python", str(ROOT / "examples" / "gateway.py"), "--host", "{host}", "--port", "{port}"]
MASTER = "sk-replicas-master"
ADMIN = {"Authorization": f"Bearer {MASTER}"}
TEAM = "team-replicated"
DEADLINE = 15.0
CACHE_HEADER = "x-team-logging-cache"
REDIS_PASSWORD = "replica-redis-pw-8675309"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # A line being appended by the other process may be incomplete: only whole lines count.
    records = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            records.append(json.loads(line))
    return records


def chat_body(text: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return body


def sse_text(raw: bytes) -> str:
    """The streamed answer; fails unless the body is well-formed SSE ending in [DONE]."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    events = raw.decode().split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    text = ""
    for event in events[:-1]:
        assert event.startswith("data: "), event
        for choice in json.loads(event[6:])["choices"]:
            text += choice["delta"].get("content") or ""
    return text


def chat(
    client: httpx.Client, key: str, text: str, *, stream: bool = False
) -> tuple[httpx.Response, bytes, str]:
    """One chat request; returns the response, its raw body and the answer text."""
    headers = {"Authorization": f"Bearer {key}"}
    body = chat_body(text, stream=stream)
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        raw = response.read()
    if response.status_code != 200:
        return response, raw, ""
    answer = sse_text(raw) if stream else json.loads(raw)["choices"][0]["message"]["content"]
    return response, raw, answer


@dataclass
class Traffic:
    """Chat requests in a loop against one replica, in a thread, recording every failure."""

    client: httpx.Client
    key: str
    name: str
    done: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"traffic-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            # Fresh prompts reach the model; the repeated one exercises the response cache.
            text = "the cached question" if n % 3 == 0 else f"{self.name} request {n}"
            stream = n % 2 == 0
            try:
                response, raw, answer = chat(self.client, self.key, text, stream=stream)
                if response.status_code != 200 or answer != f"You said: {text}":
                    self.failures.append(f"{response.status_code}: {raw[:200]!r}")
            except Exception as exc:  # a transport error is a failed request too
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.done += 1

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(DEADLINE)
            assert not self.thread.is_alive()


def test_two_replicas_share_state_through_redis_and_survive_its_restart(
    redis_server_factory: Callable[..., RedisServer],
    uvicorn_process: Callable[..., tuple[str, Any]],
    tmp_path: Path,
) -> None:
    redis_server = redis_server_factory(password=REDIS_PASSWORD)
    logs = tmp_path / "logs"
    env = {
        "TLM_REDIS_URL": redis_server.url,
        "TLM_CONFIG": "",
        "TLM_MASTER_KEY": MASTER,
        "TLM_JSONL_DIR": str(logs),
        "TLM_FLUSH_INTERVAL": "0.02",
    }
    url_a, _ = uvicorn_process(GATEWAY, env=env, cwd=tmp_path)
    url_b, _ = uvicorn_process(GATEWAY, env=env, cwd=tmp_path)
    a = httpx.Client(base_url=url_a, timeout=10, trust_env=False)
    b = httpx.Client(base_url=url_b, timeout=10, trust_env=False)
    traffic: list[Traffic] = []
    try:
        # A key generated on A is known to B (keys live in Redis).
        response = a.post("/key/generate", json={"team_id": TEAM, "key_alias": "r"}, headers=ADMIN)
        assert response.status_code == 200, response.text
        key = response.json()["key"]
        for client in (a, b):
            assert chat(client, key, "warm up")[2] == "You said: warm up"
        # B now holds a plan for the team that sends nothing (no callbacks, no defaults).

        # 1. A callback set through A routes B's next request within one second.
        response = a.post(
            f"/team/{TEAM}/callback",
            json={"callback_name": "jsonl", "callback_vars": {"jsonl_path": "team.jsonl"}},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text
        written = time.monotonic()
        # Probes through B, each sent less than a second after the write.
        probes: list[str] = []
        while True:
            probes.append(f"probe {len(probes)}")
            assert chat(b, key, probes[-1])[2] == f"You said: {probes[-1]}"
            if time.monotonic() - written >= 1.0:
                break
        team_file = logs / "team.jsonl"

        def logged_probes() -> list[str]:
            outputs = {r.get("output") for r in read_jsonl(team_file)}
            return [p for p in probes if f"You said: {p}" in outputs]

        wait_for(lambda: probes[-1] in logged_probes(), "the last probe's record")
        logged = logged_probes()
        # Once B routed by the new callback it kept doing so, and it did within the second.
        assert logged == probes[probes.index(logged[0]) :]
        assert "warm up" not in team_file.read_text()

        # 2. Caching switched on through A: an answer A stored is served by B, byte for byte.
        response = a.patch(f"/team/{TEAM}/settings", json={"cache_enabled": True}, headers=ADMIN)
        assert response.status_code == 200, response.text
        for stream in (False, True):
            text = f"shared answer (stream={stream})"
            first, first_raw, _ = chat(a, key, text, stream=stream)
            assert first.headers.get(CACHE_HEADER) == "miss"
            # Stored before its last byte went out: A's next identical request is a hit.
            again, again_raw, _ = chat(a, key, text, stream=stream)
            assert again.headers.get(CACHE_HEADER) == "hit" and again_raw == first_raw
            # B answers from the same entry once it has seen the switch (pub/sub).

            def b_hit(text: str = text, stream: bool = stream) -> Any:
                reply = chat(b, key, text, stream=stream)
                return reply if reply[0].headers.get(CACHE_HEADER) == "hit" else None

            _, hit_raw, hit_text = wait_for(b_hit, f"a cache hit on B (stream={stream})", 5)
            assert hit_raw == first_raw and hit_text == f"You said: {text}"

        # 3. Redis crashes and comes back while both replicas serve chat traffic.
        traffic = [Traffic(a, key, "a"), Traffic(b, key, "b")]
        for t in traffic:
            t.start()

        def each_served(more: int) -> Callable[[], bool]:
            marks = [t.done + more for t in traffic]
            return lambda: all(t.done >= mark for t, mark in zip(traffic, marks, strict=True))

        wait_for(each_served(3), "traffic before the crash")
        # A production Redis persists its data; so does this one, by a snapshot taken before
        # the crash (the server runs without automatic snapshots). Without it the restart would
        # forget every key, and the replicas rightly answer 401 to keys that no longer exist.
        with redis_server.client() as raw:
            raw.save()
        redis_server.stop(kill=True)
        wait_for(each_served(5), "traffic while Redis is down")
        for client in (a, b):
            response = client.post(
                f"/team/{TEAM}/callback",
                json={"callback_name": "jsonl", "callback_vars": {"jsonl_path": "during.jsonl"}},
                headers=ADMIN,
            )
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "store_unavailable"
        redis_server.start()  # the same port and directory: it loads the snapshot
        # The next admin write after Redis is back succeeds, on the first try.
        response = a.post(
            f"/team/{TEAM}/callback",
            json={"callback_name": "jsonl", "callback_vars": {"jsonl_path": "after.jsonl"}},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text
        wait_for(each_served(5), "traffic after the restart")
        for t in traffic:
            t.finish()
        assert [t.failures for t in traffic] == [[], []]
        # B's subscription came back: it routes by the write made on A after the restart.
        after_file = logs / "after.jsonl"

        def b_logs_after() -> bool:
            text = f"after restart {time.monotonic()}"
            assert chat(b, key, text)[2] == f"You said: {text}"
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if any(r.get("output") == f"You said: {text}" for r in read_jsonl(after_file)):
                    return True
                time.sleep(0.02)
            return False

        wait_for(b_logs_after, "B routing by the write made after the restart")
        assert not (logs / "during.jsonl").exists()
        health = b.get("/health", headers=ADMIN)
        assert health.status_code == 200, health.text
        cache = health.json()["cache"]
        assert cache["backend"] == "redis" and cache["hits"] >= 1
        assert REDIS_PASSWORD not in health.text
    finally:
        for t in traffic:
            t.finish()
        a.close()
        b.close()
