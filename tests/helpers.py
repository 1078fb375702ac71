"""Plain helpers shared by several test modules (fixtures live in ``tests/fixtures``).

* :func:`load_gateway` imports ``examples/gateway.py`` (not a package) once, under one module name
  that every gateway test shares, so its registered sink types are registered once.
* :func:`gateway_settings` is the example gateway's settings for a test run under ``tmp_path``.
* :func:`wait_for` (blocking) and :func:`wait_until` (async) poll a condition up to a deadline
  instead of sleeping a fixed time.
* :func:`chat_answer` sends one chat completion through a gateway and returns its answer.
* :func:`read_jsonl` reads a JSONL destination file.
* :func:`langfuse_team` builds the team settings the settings store tests save and read back.
* :func:`build_without` builds a destination in a fresh interpreter where some packages cannot
  be imported, and returns what it printed.
* :func:`asgi_http_scope` is the ``http`` scope a server on loopback hands an app.
* :class:`ScriptedPeer` is the server side of one scripted ASGI request (streaming and
  disconnects are tested with it, never through a client that buffers whole responses).
* :class:`Opened` keeps what a fixture opened (stores, destinations) and closes it all.
* :class:`SinkMaker` builds destinations through a sink type's factory and closes them all.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, Protocol, TypeVar

import httpx

from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.sinks.base import Sink, SinkContext, SinkType

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_MODULE = "team_logging_example_gateway"
# How long a test waits for something that happens in the background (a delivery, a restart).
DEADLINE = 15.0

SinkT = TypeVar("SinkT", bound=Sink)


class _Closable(Protocol):
    async def aclose(self) -> None: ...


ClosableT = TypeVar("ClosableT", bound=_Closable)
Message = dict[str, Any]


def load_gateway() -> ModuleType:
    """``examples/gateway.py`` as a module, imported once under one name for every test."""
    module = sys.modules.get(GATEWAY_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            GATEWAY_MODULE, ROOT / "examples" / "gateway.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[GATEWAY_MODULE] = module
        spec.loader.exec_module(module)
    return module


def gateway_settings(tmp_path: Path, db_name: str, *, master_key: str, **overrides: Any) -> Any:
    """The example gateway's ``GatewaySettings`` for one test.

    Its own SQLite file ``db_name`` and the JSONL directory ``logs`` under ``tmp_path``, no config
    file, and an explicit master key (so the gateway does not warn about the default one);
    ``overrides`` sets any other field, or replaces one of these.
    """
    options: dict[str, Any] = {
        "db": str(tmp_path / db_name),
        "config": None,
        "master_key": master_key,
        "master_key_defaulted": False,
        "jsonl_dir": str(tmp_path / "logs"),
        **overrides,
    }
    return load_gateway().GatewaySettings(**options)


def wait_for(
    predicate: Callable[[], Any], what: str, timeout: float = DEADLINE, *, interval: float = 0.01
) -> Any:
    """Poll ``predicate`` (blocking) until it returns a truthy value, and return that value.

    Fails naming ``what`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


async def wait_until(
    predicate: Callable[[], Any], what: str, timeout: float = DEADLINE, *, interval: float = 0.005
) -> None:
    """Poll ``predicate`` from the event loop until it holds.

    Fails naming ``what`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def chat_answer(client: httpx.Client, body: dict[str, Any], headers: dict[str, str]) -> str:
    """POST one chat completion (streamed when ``body["stream"]``); assert a 200, return the text.

    A stream's every ``data:`` event but ``[DONE]`` must be a chunk; the answer is its deltas.
    """
    if not body.get("stream"):
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        content: str = response.json()["choices"][0]["message"]["content"]
        return content
    parts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file; none when the file does not exist yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Opened:
    """What a fixture opened for one test (stores, destinations); :meth:`aclose` closes it all."""

    def __init__(self) -> None:
        self._items: list[_Closable] = []

    def add(self, item: ClosableT) -> ClosableT:
        self._items.append(item)
        return item

    async def aclose(self) -> None:
        for item in self._items:
            await item.aclose()


class SinkMaker(Generic[SinkT]):
    """``make(callback_vars, team_id=..., timeout=...)``: a destination from a sink type's factory.

    Every destination built is closed by :meth:`aclose`; the factory's result is checked to be of
    the expected class.
    """

    def __init__(self, sink_type: SinkType, sink_class: type[SinkT], http: httpx.AsyncClient):
        self._sink_type = sink_type
        self._sink_class = sink_class
        self._http = http
        self._opened = Opened()

    def __call__(
        self, callback_vars: dict[str, str], *, team_id: str | None = "team-1", timeout: float = 5.0
    ) -> SinkT:
        ctx = SinkContext(http=self._http, team_id=team_id, timeout=timeout)
        sink = self._sink_type.factory(callback_vars, ctx)
        assert isinstance(sink, self._sink_class)
        return self._opened.add(sink)

    async def aclose(self) -> None:
        await self._opened.aclose()


def langfuse_team(
    team_id: str,
    secret_key: str,
    *,
    public_key: str = "pk-lf-public",
    host: str | None = None,
    **changes: Any,
) -> TeamSettings:
    """A team whose one destination is Langfuse; ``changes`` sets other team fields."""
    callback_vars = {"langfuse_public_key": public_key, "langfuse_secret_key": secret_key}
    if host is not None:
        callback_vars["langfuse_host"] = host
    return TeamSettings(
        team_id=team_id,
        callbacks=[CallbackSpec(callback_name="langfuse", callback_vars=callback_vars)],
        **changes,
    )


_BUILD_WITHOUT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # make the optional package unimportable
import httpx
from team_logging_middleware.errors import MissingDependencyError
from team_logging_middleware.sinks import {module}
from team_logging_middleware.sinks.base import SinkContext
ctx = SinkContext(http=httpx.AsyncClient())
try:
    {module}.SINK_TYPE.factory({callback_vars!r}, ctx)
except MissingDependencyError as exc:
    assert exc.extra == {extra!r}, exc
    print(exc)
"""


def build_without(
    blocked: tuple[str, ...], module: str, callback_vars: dict[str, str], extra: str
) -> str:
    """Build a ``sinks.<module>`` destination in a fresh interpreter where the ``blocked``
    packages cannot be imported; assert it refused with ``MissingDependencyError(extra)``, and
    return the message it printed.
    """
    code = _BUILD_WITHOUT.format(
        blocked=blocked, module=module, callback_vars=callback_vars, extra=extra
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def asgi_http_scope(
    path: str, headers: list[tuple[bytes, bytes]], *, method: str = "POST", **fields: Any
) -> dict[str, Any]:
    """An ASGI ``http`` scope for ``method path`` from a client on loopback.

    ``fields`` replace or add scope keys (``state``, ``root_path``, the ``asgi`` versions, the
    client and server addresses).
    """
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        **fields,
    }


class ScriptedPeer:
    """The server side of one HTTP request: hands out body chunks, collects what the app sends.

    After the body, ``receive`` blocks until the client leaves (:meth:`leave`) and then returns
    ``http.disconnect``, as a real server does. With no chunks, the body is one empty message.
    """

    def __init__(self, chunks: Sequence[bytes] = ()) -> None:
        parts = list(chunks) or [b""]
        self.inbox: list[Message] = [
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
            for i, part in enumerate(parts)
        ]
        self.sent: list[Message] = []
        self.gone = asyncio.Event()

    def leave(self) -> None:
        self.gone.set()

    async def receive(self) -> Message:
        if self.inbox:
            return self.inbox.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
