"""The ``gcs_bucket`` destination against a real fake-gcs-server on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from team_logging_middleware.errors import SettingsError, SinkError
from team_logging_middleware.records import LogRecord, Usage
from team_logging_middleware.settings import CallbackSpec
from team_logging_middleware.sinks import gcs
from team_logging_middleware.sinks.gcs import SINK_TYPE, GcsBucketSink
from team_logging_middleware.sinks.otel import BLOCKING_THREAD_PREFIX, BLOCKING_WORKERS
from team_logging_middleware.testing import sample_record
from tests.fixtures.gcs_server import GcsServer
from tests.helpers import SinkMaker, build_without

# 2024-02-29T23:59:59.5Z: the date folder comes from the first record's start, in UTC.
START = 1_709_251_199.5
NAME = re.compile(
    r"^(?:(?P<prefix>.+)/)?(?P<team>[^/]+)/(?P<day>\d{4}-\d{2}-\d{2})/(?P<ms>\d+)-(?P<rand>[0-9a-f]{12})\.ndjson$"
)


def make_record(**overrides: Any) -> LogRecord:
    defaults: dict[str, Any] = {
        "team_id": "team-1",
        "key_alias": "alias-1",
        "user_id": None,
        "start_time": START,
        "end_time": START + 0.75,
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "héllo"}],
        "output": "hi",
        "usage": Usage(5, 1, 6),
        "finish_reason": None,
    }
    return sample_record(**{**defaults, **overrides})


@pytest.fixture
async def make_sink(shared_http: httpx.AsyncClient) -> AsyncIterator[SinkMaker[GcsBucketSink]]:
    """Builds destinations through the sink type's factory; closes them all at teardown."""
    maker = SinkMaker(SINK_TYPE, GcsBucketSink, shared_http)
    yield maker
    await maker.aclose()


def read_ndjson(server: GcsServer, bucket: str, name: str) -> list[dict[str, Any]]:
    body = server.read_object(bucket, name).decode()
    assert body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


# ---- delivery ----------------------------------------------------------------------------------


async def test_two_teams_buckets_each_hold_exactly_their_records(
    gcs_server: GcsServer, make_sink: Callable[..., GcsBucketSink]
) -> None:
    bucket1, bucket2 = gcs_server.new_bucket(), gcs_server.new_bucket()
    sink1 = make_sink(
        {"gcs_bucket_name": bucket1, "gcs_path_prefix": "/logs//llm/"}, team_id="team-1"
    )
    sink2 = make_sink({"gcs_bucket_name": bucket2}, team_id="team-2")
    batch_a = [make_record(request_id="a1"), make_record(request_id="a2", start_time=START + 1)]
    batch_b = [make_record(request_id="a3", start_time=START + 3600)]
    team2 = [make_record(request_id="b1", team_id="team-2", key_alias=None)]

    await sink1.emit(batch_a)
    await sink1.emit(batch_b)
    await sink2.emit(team2)

    names1 = gcs_server.list_objects(bucket1)
    names2 = gcs_server.list_objects(bucket2)
    assert len(names1) == 2 and len(names2) == 1
    by_ms: dict[int, str] = {}
    for name in names1:
        match = NAME.match(name)
        assert match, name
        assert (match["prefix"], match["team"]) == ("logs/llm", "team-1")
        by_ms[int(match["ms"])] = name
    first, second = by_ms[int(START * 1000)], by_ms[int((START + 3600) * 1000)]
    assert NAME.match(first)["day"] == "2024-02-29"  # type: ignore[index]
    assert NAME.match(second)["day"] == "2024-03-01"  # type: ignore[index]
    assert read_ndjson(gcs_server, bucket1, first) == [r.to_dict() for r in batch_a]
    assert read_ndjson(gcs_server, bucket1, second) == [r.to_dict() for r in batch_b]
    (only,) = names2
    match = NAME.match(only)
    assert match and match["prefix"] is None and match["team"] == "team-2"
    assert read_ndjson(gcs_server, bucket2, only) == [r.to_dict() for r in team2]
    info = gcs_server.object_info(bucket1, first)
    assert info.content_type == "application/x-ndjson"
    # UTF-8, not \\u escapes: the message text survives as written.
    assert "héllo".encode() in gcs_server.read_object(bucket1, first)


async def test_shared_destination_files_a_single_team_batch_under_that_team(
    gcs_server: GcsServer, make_sink: Callable[..., GcsBucketSink]
) -> None:
    bucket = gcs_server.new_bucket()
    sink = make_sink({"gcs_bucket_name": bucket}, team_id=None)
    await sink.emit([make_record(team_id="solo"), make_record(team_id="solo")])
    await sink.emit([make_record(team_id="x"), make_record(team_id="y")])
    await sink.emit([make_record(team_id=None)])
    teams = sorted(NAME.match(n)["team"] for n in gcs_server.list_objects(bucket))  # type: ignore[index]
    assert teams == ["_unknown", "_unknown", "solo"]


async def test_team_ids_become_safe_distinct_folders(
    gcs_server: GcsServer, make_sink: Callable[..., GcsBucketSink]
) -> None:
    bucket = gcs_server.new_bucket()
    for team in ("a/b", "a_b", "../etc", "_unknown"):
        await make_sink({"gcs_bucket_name": bucket}, team_id=team).emit([make_record()])
    folders = {name.split("/")[0] for name in gcs_server.list_objects(bucket)}
    assert len(folders) == 4
    assert "a_b" in folders
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", f) for f in folders), folders
    # A team literally named "_unknown" does not share the folder of records without a team.
    assert gcs.team_segment(None) == "_unknown" != gcs.team_segment("_unknown")
    assert gcs.team_segment("a/b") == gcs.team_segment("a/b")  # stable across batches


async def test_concurrent_destinations_share_the_bounded_pool(
    gcs_server: GcsServer, make_sink: Callable[..., GcsBucketSink]
) -> None:
    bucket = gcs_server.new_bucket()
    sinks = [make_sink({"gcs_bucket_name": bucket}, team_id=f"t{i}") for i in range(40)]
    await asyncio.gather(*(s.emit([make_record(request_id=str(i))]) for i, s in enumerate(sinks)))
    assert len(gcs_server.list_objects(bucket)) == 40
    pool = [t for t in threading.enumerate() if t.name.startswith(BLOCKING_THREAD_PREFIX)]
    assert 1 <= len(pool) <= BLOCKING_WORKERS
    # One storage client for every destination using the same credentials.
    assert len({id(s._client) for s in sinks}) == 1


# ---- never overwrite ---------------------------------------------------------------------------


def _suffixes(*values: str) -> Callable[[], str]:
    iterator = itertools.chain(values, (f"{i:012x}" for i in itertools.count(1)))
    return lambda: next(iterator)


async def test_a_name_collision_never_overwrites_and_retries_under_a_new_name(
    gcs_server: GcsServer,
) -> None:
    bucket = gcs_server.new_bucket()
    taken = gcs.object_name("p", "team-1", START, "aaaaaaaaaaaa")
    gcs_server.put_object(bucket, taken, b"precious\n")
    sink = GcsBucketSink(
        bucket, team_id="team-1", prefix="p", timeout=5.0, suffix=_suffixes("aaaaaaaaaaaa")
    )

    await sink.emit([make_record(request_id="new")])

    # if_generation_match=0 reached the server: the existing object answered 412 and survived.
    assert gcs_server.read_object(bucket, taken) == b"precious\n"
    names = gcs_server.list_objects(bucket)
    assert len(names) == 2
    (written,) = set(names) - {taken}
    assert written == gcs.object_name("p", "team-1", START, f"{1:012x}")
    assert read_ndjson(gcs_server, bucket, written)[0]["request_id"] == "new"


async def test_repeated_collisions_give_a_retryable_error(gcs_server: GcsServer) -> None:
    bucket = gcs_server.new_bucket()
    taken = gcs.object_name("", "team-1", START, "bbbbbbbbbbbb")
    gcs_server.put_object(bucket, taken, b"precious\n")
    sink = GcsBucketSink(bucket, team_id="team-1", suffix=lambda: "bbbbbbbbbbbb")
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert info.value.retryable is True
    assert gcs_server.list_objects(bucket) == [taken]
    assert gcs_server.read_object(bucket, taken) == b"precious\n"


# ---- failures ----------------------------------------------------------------------------------


async def test_missing_bucket_is_a_non_retryable_error_naming_it(
    gcs_server: GcsServer, make_sink: Callable[..., GcsBucketSink]
) -> None:
    sink = make_sink({"gcs_bucket_name": "no-such-bucket-tlm"})
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert info.value.reason == "bucket no-such-bucket-tlm not found"
    assert (info.value.retryable, info.value.status) == (False, 404)


async def test_unreachable_storage_is_retryable(
    make_sink: Callable[..., GcsBucketSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{unused.getsockname()[1]}")
        sink = make_sink({"gcs_bucket_name": "bucket-down"}, timeout=1.0)
        with pytest.raises(SinkError) as info:
            await sink.emit([make_record()])
    assert info.value.retryable is True
    assert "unreachable" in info.value.reason


async def test_unreadable_service_account_file_never_names_the_path(
    make_sink: Callable[..., GcsBucketSink], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    secret_path = str(tmp_path / "very-secret-key-name.json")
    sink = make_sink({"gcs_bucket_name": "bucket-x", "gcs_path_service_account": secret_path})
    with pytest.raises(SinkError) as info:
        await sink.emit([make_record()])
    assert info.value.retryable is False
    assert "could not be read" in info.value.reason
    assert "very-secret-key-name" not in str(info.value)
    assert "very-secret-key-name" not in repr(sink)

    Path(secret_path).write_text('{"type": "service_account"}')  # JSON, but not a usable key
    with pytest.raises(SinkError, match="not a valid key") as info:
        await sink.emit([make_record()])
    assert "very-secret-key-name" not in str(info.value)


@pytest.mark.parametrize(
    ("exc_name", "args", "retryable", "status"),
    [
        ("TooManyRequests", ("slow down",), True, 429),
        ("ServiceUnavailable", ("down",), True, 503),
        ("InternalServerError", ("oops",), True, 500),
        ("Forbidden", ("no",), False, 403),
        ("Unauthorized", ("who",), False, 401),
        ("BadRequest", ("bad",), False, 400),
    ],
)
def test_http_errors_map_to_retryable_or_not(
    exc_name: str, args: tuple[str, ...], retryable: bool, status: int
) -> None:
    from google.api_core import exceptions

    error = gcs._error_for(getattr(exceptions, exc_name)(*args), "bkt")
    assert (error.retryable, error.status) == (retryable, status)


# ---- check() -----------------------------------------------------------------------------------


async def test_check_passes_for_an_existing_bucket_and_names_a_missing_one(
    gcs_server: GcsServer, make_sink: Callable[..., GcsBucketSink]
) -> None:
    bucket = gcs_server.new_bucket()
    await make_sink({"gcs_bucket_name": bucket}).check()
    assert gcs_server.list_objects(bucket) == []  # the check writes nothing
    with pytest.raises(SinkError) as info:
        await make_sink({"gcs_bucket_name": "missing-bucket-tlm"}).check()
    assert info.value.reason == "bucket missing-bucket-tlm not found"
    assert info.value.retryable is False


# ---- settings ----------------------------------------------------------------------------------


def _normalize(callback_vars: dict[str, str]) -> CallbackSpec:
    return SINK_TYPE.normalize(
        CallbackSpec(callback_name="gcs_bucket", callback_vars=callback_vars)
    )


@pytest.mark.parametrize(
    "name", ["abc", "my-bucket_1", "logs.example.com", "a" * 63, ".".join(["a" * 63] * 3)]
)
def test_valid_bucket_names(name: str) -> None:
    assert _normalize({"gcs_bucket_name": name}).callback_vars["gcs_bucket_name"] == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("ab", "3 to 63"),
        ("a" * 64, "3 to 63"),
        ("My-Bucket", "lowercase"),
        ("-bucket", "starts and ends"),
        ("bucket-", "starts and ends"),
        ("a..b", "dot-separated"),
        ("192.168.1.1", "IP address"),
        ("goog-logs", "goog"),
        ("my-g00gle-logs", "google"),
        ("gs://bucket", "bare bucket name"),
        ("bucket/path", "gcs_path_prefix"),
    ],
)
def test_invalid_bucket_names_are_refused(name: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        _normalize({"gcs_bucket_name": name})
    assert info.value.param == "callback_vars.gcs_bucket_name"
    assert fragment in info.value.message


@pytest.mark.parametrize("prefix", ["../up", "a/../b", "./a", "a\nb"])
def test_path_prefix_cannot_escape_or_smuggle(prefix: str) -> None:
    with pytest.raises(SettingsError) as info:
        _normalize({"gcs_bucket_name": "bucket-1", "gcs_path_prefix": prefix})
    assert info.value.param == "callback_vars.gcs_path_prefix"


def test_unknown_and_missing_vars_are_refused() -> None:
    with pytest.raises(SettingsError, match="gcs_bucket_name"):
        _normalize({"gcs_path_prefix": "x"})
    with pytest.raises(SettingsError, match="unknown var"):
        _normalize({"gcs_bucket_name": "bucket-1", "gcs_project": "p"})
    # A reference is resolved (and checked) when the destination is built.
    _normalize({"gcs_bucket_name": "os.environ/GCS_TEAM_BUCKET"})


def test_object_names_are_dated_in_utc_from_the_first_record() -> None:
    name = gcs.object_name("", "t", START, "0123456789ab")
    assert name == f"t/2024-02-29/{int(START * 1000)}-0123456789ab.ndjson"
    day = dt.datetime.fromtimestamp(START + 1, tz=dt.timezone.utc).date().isoformat()
    assert gcs.object_name("p/q", "t", START + 1, "x").startswith(f"p/q/t/{day}/")


def test_module_imports_without_the_extra_and_names_it() -> None:
    message = build_without(
        ("google", "google.cloud", "google.cloud.storage"),
        "gcs",
        {"gcs_bucket_name": "bucket-1"},
        "gcs",
    )
    assert message == (
        "the gcs_bucket destination needs an optional dependency: "
        'pip install "team-logging-middleware[gcs]"'
    )


# ---- through the dispatcher --------------------------------------------------------------------


async def test_end_to_end_through_the_dispatcher(gcs_server: GcsServer) -> None:
    from team_logging_middleware._types import Destination
    from team_logging_middleware.dispatcher import Dispatcher
    from team_logging_middleware.sinks import default_registry

    bucket1, bucket2 = gcs_server.new_bucket(), gcs_server.new_bucket()
    spec1 = CallbackSpec(
        callback_name="gcs_bucket",
        callback_vars={"gcs_bucket_name": bucket1, "gcs_path_prefix": "llm"},
    )
    spec2 = CallbackSpec(
        callback_name="gcs_bucket", callback_vars={"gcs_bucket_name": "os.environ/GCS_TEAM2"}
    )
    dispatcher = Dispatcher(
        default_registry(), flush_interval=0.05, emit_timeout=5.0, environ={"GCS_TEAM2": bucket2}
    )
    await dispatcher.start()
    try:
        to1 = [Destination(spec1, "team", spec1.identity())]
        to2 = [Destination(spec2, "key", spec2.identity())]
        for i in range(3):
            assert dispatcher.submit_record(make_record(request_id=f"one-{i}"), to1)
        assert dispatcher.submit_record(make_record(request_id="two-0", team_id="team-2"), to2)
        report = await dispatcher.flush(15.0)
        assert (report.delivered, report.dropped, report.timed_out) == (4, 0, False)

        await dispatcher.check(spec1, "team-1")
        missing = CallbackSpec(
            callback_name="gcs_bucket", callback_vars={"gcs_bucket_name": "absent-bucket-tlm"}
        )
        with pytest.raises(SinkError, match="bucket absent-bucket-tlm not found"):
            await dispatcher.check(missing, "team-1")
    finally:
        await dispatcher.stop(10.0)

    ids1 = [
        line["request_id"]
        for name in gcs_server.list_objects(bucket1)
        for line in read_ndjson(gcs_server, bucket1, name)
    ]
    assert sorted(ids1) == ["one-0", "one-1", "one-2"]
    assert all(n.startswith("llm/team-1/") for n in gcs_server.list_objects(bucket1))
    (only,) = gcs_server.list_objects(bucket2)
    assert only.startswith("team-2/")
    assert [r["request_id"] for r in read_ndjson(gcs_server, bucket2, only)] == ["two-0"]
