"""The jsonl sink: file content end to end, confinement to the base directory, concurrency."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from team_logging_middleware.dispatcher import Dispatcher
from team_logging_middleware.errors import SettingsError, SinkError
from team_logging_middleware.records import Exchange, LogRecord
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks import SinkContext, default_registry
from team_logging_middleware.sinks.jsonl import JsonlSink, jsonl_sink_type
from team_logging_middleware.testing import destination_for, sample_record


def jsonl_spec(path: str) -> CallbackSpec:
    return CallbackSpec(
        callback_name="jsonl",
        callback_type="success_and_failure",
        callback_vars={"jsonl_path": path},
    )


def no_decode(ex: Exchange) -> LogRecord:
    raise AssertionError("these tests submit decoded records")


def expected_line(record: LogRecord) -> Any:
    return json.loads(json.dumps(record.to_dict()))


def read_lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
async def dispatcher(base: Path) -> AsyncIterator[Dispatcher]:
    d = Dispatcher(default_registry(jsonl_dir=base), decode=no_decode, flush_interval=60.0)
    await d.start()
    yield d
    await d.stop(timeout=5)


async def test_records_are_appended_one_json_object_per_line(
    dispatcher: Dispatcher, base: Path
) -> None:
    target = destination_for(jsonl_spec("team-a/requests.jsonl"))
    records = [
        sample_record(request_id="r0", output="héllo ✓ 世界"),
        sample_record(request_id="r1", outcome="http_error", status_code=502, error="bad gateway"),
        sample_record(request_id="r2", metadata={"not_json": {1, 2}}),  # written as text
    ]
    for record in records[:2]:
        assert dispatcher.submit_record(record, [target])
    assert (await dispatcher.flush(timeout=5)).delivered == 2
    dispatcher.submit_record(records[2], [target])
    assert (await dispatcher.flush(timeout=5)).delivered == 1

    path = base / "team-a" / "requests.jsonl"
    lines = read_lines(path)
    assert lines[:2] == [expected_line(r) for r in records[:2]]
    assert lines[2]["request_id"] == "r2" and lines[2]["metadata"] == {"not_json": "{1, 2}"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # records hold prompts and outputs
    assert "héllo ✓ 世界" in path.read_text("utf-8")  # UTF-8, not escaped


async def test_an_existing_file_is_appended_to_not_truncated(
    dispatcher: Dispatcher, base: Path
) -> None:
    path = base / "requests.jsonl"
    base.mkdir()
    path.write_text('{"earlier": true}\n', "utf-8")
    target = destination_for(jsonl_spec("requests.jsonl"))
    dispatcher.submit_record(sample_record(request_id="r9"), [target])
    await dispatcher.flush(timeout=5)
    assert [line.get("request_id") for line in read_lines(path)] == [None, "r9"]


@pytest.mark.parametrize(
    "value",
    ["../escape.jsonl", "a/../../escape.jsonl", "/etc/team.jsonl", ".", "a/..", "bad\0name"],
)
def test_paths_outside_the_base_directory_are_refused(base: Path, value: str) -> None:
    registry = default_registry(jsonl_dir=base)
    with pytest.raises(SettingsError) as info:
        registry.normalize(jsonl_spec(value))
    assert info.value.param == "callback_vars.jsonl_path"
    assert "inside the server's JSONL log directory" in info.value.message
    assert str(base) not in info.value.message  # the server's layout is not disclosed


@pytest.mark.parametrize("value", ["x.jsonl", "a/b/c.jsonl", "a/../b.jsonl", "./x.jsonl"])
def test_paths_inside_the_base_directory_are_accepted(base: Path, value: str) -> None:
    registry = default_registry(jsonl_dir=base)
    assert registry.normalize(jsonl_spec(value)).callback_vars == {"jsonl_path": value}


def test_an_absolute_path_inside_the_base_directory_is_accepted(base: Path) -> None:
    registry = default_registry(jsonl_dir=base)
    registry.normalize(jsonl_spec(str(base / "team" / "x.jsonl")))


def test_a_symlink_leading_out_is_refused_at_validation(base: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    base.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(SettingsError, match="outside the JSONL log directory"):
        default_registry(jsonl_dir=base).normalize(jsonl_spec("link/x.jsonl"))


async def test_a_symlink_planted_after_validation_is_refused_at_write(
    dispatcher: Dispatcher, base: Path, tmp_path: Path
) -> None:
    target = destination_for(jsonl_spec("later/x.jsonl"))
    dispatcher.submit_record(sample_record(request_id="r0"), [target])
    await dispatcher.flush(timeout=5)  # the sink is built and has written once
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "later" / "x.jsonl").unlink()
    (base / "later").rmdir()
    (base / "later").symlink_to(outside)
    dispatcher.submit_record(sample_record(request_id="r1"), [target])
    report = await dispatcher.flush(timeout=5)
    assert report.dropped == 1 and report.delivered == 0
    assert list(outside.iterdir()) == []
    entry = dispatcher.stats()["destinations"][f"jsonl:{target.identity[:8]}"]
    assert entry["failed"] == 1 and "outside the JSONL log directory" in entry["last_error"]


async def test_a_path_from_the_environment_is_confined_too(base: Path, tmp_path: Path) -> None:
    d = Dispatcher(
        default_registry(jsonl_dir=base),
        decode=no_decode,
        environ={"TEAM_JSONL": str(tmp_path / "escape.jsonl")},
    )
    await d.start()
    try:
        target = destination_for(jsonl_spec("os.environ/TEAM_JSONL"))
        d.submit_record(sample_record(), [target])
        assert (await d.flush(timeout=5)).dropped == 1
        entry = d.stats()["destinations"][f"jsonl:{target.identity[:8]}"]
        assert entry["dropped"] == {"build_failed": 1}
        assert not (tmp_path / "escape.jsonl").exists()
    finally:
        await d.stop(timeout=5)


async def test_write_errors_are_reported_without_the_server_path(
    dispatcher: Dispatcher, base: Path
) -> None:
    (base / "taken").mkdir(parents=True)  # a directory where the file should be
    target = destination_for(jsonl_spec("taken"))
    dispatcher.submit_record(sample_record(), [target])
    report = await dispatcher.flush(timeout=5)
    assert report.dropped == 1
    entry = dispatcher.stats()["destinations"][f"jsonl:{target.identity[:8]}"]
    assert entry["failed"] == 1 and entry["retried"] == 0  # not retryable
    assert entry["last_error"] == "cannot write JSONL file 'taken': Is a directory"


async def test_concurrent_writers_never_interleave_lines(base: Path) -> None:
    async with httpx.AsyncClient() as client:
        ctx = SinkContext(http=client)
        factory = jsonl_sink_type(base).factory
        sinks = [factory({"jsonl_path": "shared.jsonl"}, ctx) for _ in range(8)]
        big = "y" * 20_000  # larger than a pipe buffer and than Python's write buffer

        async def writer(n: int) -> None:
            for b in range(25):
                batch = [sample_record(request_id=f"w{n}-b{b}-{i}", output=big) for i in range(4)]
                await sinks[n].emit(batch)

        await asyncio.gather(*(writer(n) for n in range(8)))
        for sink in sinks:
            await sink.aclose()
    lines = read_lines(base / "shared.jsonl")  # raises if any line was torn
    assert len(lines) == 8 * 25 * 4
    assert sorted(line["request_id"] for line in lines) == sorted(
        f"w{n}-b{b}-{i}" for n in range(8) for b in range(25) for i in range(4)
    )
    assert all(line["output"] == big for line in lines)


async def test_check_passes_for_a_writable_path_and_explains_otherwise(
    dispatcher: Dispatcher, base: Path
) -> None:
    await dispatcher.check(jsonl_spec("team-a/check.jsonl"), "team-a")
    assert (base / "team-a" / "check.jsonl").exists()
    base.joinpath("plain-file").write_text("", "utf-8")
    with pytest.raises(SinkError) as info:
        await dispatcher.check(jsonl_spec("plain-file/x.jsonl"), "team-a")
    assert info.value.reason == "cannot write JSONL file 'plain-file/x.jsonl': File exists"
    assert str(base) not in info.value.reason


def test_the_default_base_is_logs_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sink_type = jsonl_sink_type()
    with pytest.raises(SettingsError):
        sink_type.normalize(jsonl_spec("../x.jsonl"))

    async def write() -> None:
        async with httpx.AsyncClient() as client:
            sink = sink_type.factory({"jsonl_path": "x.jsonl"}, SinkContext(http=client))
            assert isinstance(sink, JsonlSink)
            await sink.emit([sample_record(request_id="r0")])

    asyncio.run(write())
    assert read_lines(tmp_path / "logs" / "x.jsonl")[0]["request_id"] == "r0"


def test_the_sink_type_declares_its_vars() -> None:
    sink_type = jsonl_sink_type()
    assert sink_type.name == "jsonl"
    assert sink_type.required_vars == frozenset({"jsonl_path"})
    with pytest.raises(SettingsError, match=r"callback_vars.jsonl_path: required"):
        sink_type.normalize(CallbackSpec(callback_name="jsonl"))
