"""Custom callbacks: routing by outcome, containment, the three logger shapes, registration in
code and through a real entry point, and ``default_registry``."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from team_logging_middleware.dispatcher import Dispatcher
from team_logging_middleware.errors import SettingsError
from team_logging_middleware.records import Exchange, LogRecord
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks import (
    CustomLogger,
    PartialBatchError,
    SinkRegistry,
    default_registry,
    register_callback,
    unregister_callback,
)
from team_logging_middleware.sinks.custom import custom_sink_type, registered_callbacks
from team_logging_middleware.testing import destination_for, sample_record


class Collector(CustomLogger):
    """Keeps what it is given; raises for records whose output is "explode"."""

    def __init__(self) -> None:
        self.success: list[str] = []
        self.failure: list[str] = []
        self.closed = 0

    async def log_success_event(self, record: LogRecord) -> None:
        if record.output == "explode":
            raise ValueError("token sk-custom-secret-123 rejected")
        self.success.append(record.request_id)

    async def log_failure_event(self, record: LogRecord) -> None:
        self.failure.append(record.request_id)

    async def aclose(self) -> None:
        self.closed += 1


class WithVars(CustomLogger):
    """Built once per destination from its vars."""

    required_vars = ("endpoint",)
    optional_vars = ("api_key",)
    instances: list[WithVars] = []

    def __init__(self, *, endpoint: str, api_key: str = "") -> None:
        self.endpoint = endpoint
        self.api_key = api_key
        self.records: list[str] = []
        self.closed = False
        WithVars.instances.append(self)

    async def log_success_event(self, record: LogRecord) -> None:
        self.records.append(record.request_id)

    async def aclose(self) -> None:
        self.closed = True


def spec(name: str, callback_type: str = "success_and_failure", **vars_: str) -> CallbackSpec:
    return CallbackSpec(
        callback_name=name,
        callback_type=callback_type,  # type: ignore[arg-type]
        callback_vars=vars_,
    )


def no_decode(ex: Exchange) -> LogRecord:
    raise AssertionError("these tests submit decoded records")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def run() -> AsyncIterator[Any]:
    """Start a dispatcher over a registry; stopped at teardown."""
    started: list[Dispatcher] = []

    async def start(registry: SinkRegistry, **options: Any) -> Dispatcher:
        d = Dispatcher(registry, decode=no_decode, flush_interval=60.0, **options)
        await d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        await d.stop(timeout=5)


@pytest.fixture
def process_names() -> Iterator[list[str]]:
    """Names registered process-wide by a test, removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_callback(name)


# -- routing and containment --------------------------------------------------------------------


async def test_records_go_to_the_hook_of_their_outcome(run: Any) -> None:
    collector = Collector()
    registry = SinkRegistry()
    register_callback("collector", collector, registry=registry)
    d = await run(registry)
    target = destination_for(spec("collector"))
    d.submit_record(sample_record(request_id="ok-1"), [target])
    d.submit_record(sample_record(request_id="err-1", outcome="http_error"), [target])
    d.submit_record(sample_record(request_id="err-2", outcome="exception"), [target])
    d.submit_record(sample_record(request_id="ok-2"), [target])
    assert (await d.flush(timeout=5)).delivered == 4
    assert collector.success == ["ok-1", "ok-2"]
    assert collector.failure == ["err-1", "err-2"]


async def test_a_hook_that_raises_fails_only_that_record(
    run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    collector = Collector()
    registry = SinkRegistry()
    register_callback("collector", collector, registry=registry)
    d = await run(registry)
    target = destination_for(spec("collector"))
    with caplog.at_level(logging.DEBUG):
        for i, output in enumerate(["fine", "explode", "fine"]):
            d.submit_record(sample_record(request_id=f"r{i}", output=output), [target])
        report = await d.flush(timeout=5)
    assert report.delivered == 2 and report.dropped == 1
    assert collector.success == ["r0", "r2"]
    entry = d.stats()["destinations"][f"collector:{target.identity[:8]}"]
    assert entry["sent"] == 2 and entry["failed"] == 1 and entry["retried"] == 0
    assert entry["last_error"] == (
        "custom callback 'collector' raised ValueError for 1 of 3 record(s)"
    )
    # The hook's own message may quote credentials: it is never repeated.
    assert "sk-custom-secret-123" not in caplog.text + json.dumps(d.stats())


async def test_partial_batch_error_is_available_to_any_sink() -> None:
    error = PartialBatchError("2 of 5 rows refused", failed=2)
    assert error.failed == 2 and not error.retryable and error.reason == "2 of 5 rows refused"


# -- the three shapes of logger -------------------------------------------------------------------


async def test_a_subclass_is_built_per_destination_from_its_vars(run: Any) -> None:
    WithVars.instances.clear()
    registry = SinkRegistry()
    register_callback("withvars", WithVars, registry=registry)
    with pytest.raises(SettingsError, match=r"callback_vars.endpoint: required"):
        registry.normalize(spec("withvars"))
    with pytest.raises(SettingsError, match=r"callback_vars.colour: unknown var"):
        registry.normalize(spec("withvars", endpoint="e", colour="blue"))

    d = await run(registry)
    one = destination_for(spec("withvars", endpoint="https://one", api_key="k1"))
    two = destination_for(spec("withvars", endpoint="https://two"))
    d.submit_record(sample_record(request_id="r1"), [one, two])
    await d.flush(timeout=5)
    by_endpoint = {i.endpoint: i for i in WithVars.instances}
    assert set(by_endpoint) == {"https://one", "https://two"}
    assert by_endpoint["https://one"].api_key == "k1"
    assert all(i.records == ["r1"] for i in WithVars.instances)
    await d.stop(timeout=5)
    assert all(i.closed for i in WithVars.instances)  # owned by the dispatcher: closed


async def test_a_factory_gets_the_vars_and_must_return_a_logger(run: Any) -> None:
    seen: list[dict[str, str]] = []
    built: list[Collector] = []

    def factory(vars_: Mapping[str, str]) -> CustomLogger:
        seen.append(dict(vars_))
        logger = Collector()
        built.append(logger)
        return logger

    def bad_factory(vars_: Mapping[str, str]) -> CustomLogger:
        return "not a logger"  # type: ignore[return-value]

    registry = SinkRegistry()
    register_callback("made", factory, optional_vars=("region",), registry=registry)
    register_callback("bad", bad_factory, registry=registry)
    d = await run(registry)
    made, bad = destination_for(spec("made", region="eu")), destination_for(spec("bad"))
    d.submit_record(sample_record(request_id="r1"), [made, bad])
    report = await d.flush(timeout=5)
    assert report.delivered == 1 and report.dropped == 1
    assert seen == [{"region": "eu"}] and built[0].success == ["r1"]
    entry = d.stats()["destinations"][f"bad:{bad.identity[:8]}"]
    assert entry["dropped"] == {"build_failed": 1}
    assert "the factory returned str, not a CustomLogger" in entry["last_error"]
    await d.stop(timeout=5)
    assert built[0].closed == 1


async def test_a_shared_instance_is_not_closed_by_the_dispatcher(run: Any) -> None:
    collector = Collector()
    registry = SinkRegistry()
    register_callback("shared", collector, optional_vars=("n",), registry=registry)
    d = await run(registry, max_live_sinks=1)
    for n in range(3):  # three destinations, one slot: two evictions
        d.submit_record(
            sample_record(request_id=f"r{n}"), [destination_for(spec("shared", n=str(n)))]
        )
        await d.flush(timeout=5)
    await d.stop(timeout=5)
    assert collector.success == ["r0", "r1", "r2"] and collector.closed == 0


def test_invalid_loggers_and_names_are_refused() -> None:
    class NotALogger:
        pass

    with pytest.raises(TypeError, match="not a CustomLogger subclass"):
        custom_sink_type("x", NotALogger)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a CustomLogger"):
        custom_sink_type("x", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 128 characters"):
        custom_sink_type("", Collector)
    with pytest.raises(ValueError, match="built-in destination"):
        register_callback("langfuse", Collector, registry=SinkRegistry())


# -- registration in code -------------------------------------------------------------------------


def test_process_wide_registration_reaches_later_default_registries(
    process_names: list[str],
) -> None:
    name = unique("audit")
    before = default_registry()
    sink_type = register_callback(name, WithVars)
    process_names.append(name)
    assert sink_type.required_vars == frozenset({"endpoint"})  # from the class attributes
    assert sink_type in registered_callbacks()
    assert name not in before.names()  # registries built earlier are not changed
    assert default_registry().get(name) is sink_type
    with pytest.raises(ValueError, match="already registered"):
        register_callback(name, Collector)
    replacement = register_callback(name, Collector, replace=True)
    assert default_registry().get(name) is replacement
    assert unregister_callback(name) and not unregister_callback(name)
    assert name not in default_registry().names()


def test_default_registry_is_new_each_time_and_holds_the_builtins(tmp_path: Path) -> None:
    first, second = default_registry(), default_registry(jsonl_dir=tmp_path)
    assert first is not second
    first.register(custom_sink_type("only_in_first", Collector))
    assert "only_in_first" not in second.names()
    assert "jsonl" in second.names()
    for module in ("langfuse", "otel", "gcs"):
        full = f"team_logging_middleware.sinks.{module}"
        if importlib.util.find_spec(full) is not None:
            assert importlib.import_module(full).SINK_TYPE.name in second.names()


# -- registration through an entry point ----------------------------------------------------------


def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: str) -> str:
    """A real installed distribution (dist-info + module) on sys.path; returns the module name."""
    module = unique("tlm_plugin")
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from team_logging_middleware.sinks import CustomLogger, SinkType

            RECEIVED = []


            class PluginLogger(CustomLogger):
                required_vars = ("project",)

                def __init__(self, *, project):
                    self.project = project

                async def log_success_event(self, record):
                    RECEIVED.append((self.project, record.request_id))


            class _Null:
                async def emit(self, batch):
                    RECEIVED.extend(("sinktype", r.request_id) for r in batch)

                async def aclose(self):
                    pass


            SINK_TYPE = SinkType(name="plugin_sinktype", factory=lambda vars_, ctx: _Null())
            NOT_A_LOGGER = 42
            """
        ),
        "utf-8",
    )
    dist = tmp_path / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n", "utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[team_logging_middleware.callbacks]\n" + entries.format(module=module), "utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return module


async def test_entry_points_register_loggers_and_sink_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, run: Any
) -> None:
    module = install_plugin(
        tmp_path,
        monkeypatch,
        "plugin_logger = {module}:PluginLogger\n"
        "plugin_sinktype = {module}:SINK_TYPE\n"
        "broken = tlm_no_such_module_anywhere:Thing\n"
        "wrong_type = {module}:NOT_A_LOGGER\n"
        "jsonl = {module}:PluginLogger\n",
    )
    with caplog.at_level(logging.WARNING, logger="team_logging_middleware.sinks"):
        registry = default_registry(jsonl_dir=tmp_path / "logs")
    names = registry.names()
    assert "plugin_logger" in names and "plugin_sinktype" in names
    assert "broken" not in names and "wrong_type" not in names
    messages = [r.getMessage() for r in caplog.records]
    assert any("'broken'" in m and "ModuleNotFoundError" in m for m in messages)
    assert any("'wrong_type'" in m and "not a CustomLogger or a SinkType" in m for m in messages)
    assert any("'jsonl'" in m and "already taken" in m for m in messages)
    # The class's declared vars are enforced like a built-in's.
    with pytest.raises(SettingsError, match=r"callback_vars.project: required"):
        registry.normalize(spec("plugin_logger"))

    d = await run(registry)
    d.submit_record(
        sample_record(request_id="r1"),
        [
            destination_for(spec("plugin_logger", project="p1")),
            destination_for(spec("plugin_sinktype")),
        ],
    )
    assert (await d.flush(timeout=5)).delivered == 2
    received = sys.modules[module].RECEIVED
    assert sorted(received) == [("p1", "r1"), ("sinktype", "r1")]
