"""The SettingsStore contract, run against every store: memory, SQLite and Redis.

Whatever backend an operator picks, the planner and the admin API see the same behaviour: writes
replace whole entries, reads and writes never share objects with the caller, listeners hear about
every write, and every TeamSettings field survives the round trip (encrypted or not).
The last part checks the codec the persistent stores share, property-based.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from team_logging_middleware.errors import SettingsError
from team_logging_middleware.settings import CallbackSpec, TeamSettings, is_secret_var
from team_logging_middleware.stores import (
    ENCRYPTED_PREFIX,
    KeyRecord,
    MemorySettingsStore,
    RedisSettingsStore,
    SettingsStore,
    SQLiteSettingsStore,
)
from team_logging_middleware.stores._codec import SettingsCodec
from tests.helpers import Opened, langfuse_team

SECRET = "sk-lf-contract-secret-0123456789"
KEY = Fernet.generate_key().decode()

StoreFactory = Callable[..., Awaitable[SettingsStore]]

BACKENDS = ["memory", "sqlite", "redis"]
PERSISTENT = ["sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """``await make_store(**options)``: a store of the parametrised backend, closed at teardown.

    SQLite and Redis stores made by one test share their file / Redis namespace, like replicas.
    """
    backend: str = request.param
    redis_url: str | None = None
    if backend == "redis":
        redis_url = request.getfixturevalue("redis_url")
    opened = Opened()

    async def make(**options: Any) -> SettingsStore:
        store: SettingsStore
        if backend == "memory":
            options.pop("encryption_key", None)
            store = MemorySettingsStore(**options)
        elif backend == "sqlite":
            store = SQLiteSettingsStore(tmp_path / "settings.db", **options)
        else:
            assert redis_url is not None
            store = RedisSettingsStore(redis_url, **options)
        return opened.add(store)

    make.backend = backend  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        await opened.aclose()


def _team(team_id: str = "t1", secret: str = SECRET) -> TeamSettings:
    return langfuse_team(team_id, secret, public_key="pk-lf-1", host="https://cloud.langfuse.com")


def _every_field_set() -> TeamSettings:
    """A team whose every field differs from its default (checked below, so new fields count)."""
    return TeamSettings(
        team_id="every-field",
        callbacks=[
            CallbackSpec(
                callback_name="langfuse",
                callback_type="success",
                callback_vars={
                    "langfuse_public_key": "os.environ/LANGFUSE_PUBLIC_KEY",
                    "langfuse_secret_key": "os.environ/LANGFUSE_SECRET_KEY",
                    "langfuse_host": "https://eu.cloud.langfuse.com",
                },
            ),
            CallbackSpec(
                callback_name="otel",
                callback_type="failure",
                callback_vars={
                    "otel_endpoint": "http://collector:4318",
                    "otel_headers": "authorization=Bearer abc",
                    "otel_api_token": SECRET,
                },
            ),
            CallbackSpec(
                callback_name="gcs_bucket",
                callback_type="success_and_failure",
                callback_vars={"gcs_bucket_name": "b", "gcs_path_service_account": "/sa.json"},
            ),
            CallbackSpec(callback_name="jsonl"),
        ],
        logging_enabled=False,
        cache_enabled=True,
        cache_ttl_seconds=3600,
        message_logging="metadata_only",
        inherit_defaults=False,
    )


def test_the_every_field_sample_sets_every_field() -> None:
    sample = _every_field_set().model_dump()
    default = TeamSettings(team_id="x").model_dump()
    assert set(sample) == set(TeamSettings.model_fields)
    assert [name for name in sample if sample[name] == default[name]] == []


async def test_implements_the_protocol(make_store: StoreFactory) -> None:
    assert isinstance(await make_store(), SettingsStore)


async def test_an_empty_store(make_store: StoreFactory) -> None:
    store = await make_store()
    assert await store.get_team("t1") is None
    assert await store.list_team_ids() == []
    assert await store.get_key("h1") is None
    assert await store.delete_team("t1") is False


async def test_team_round_trip_listing_and_replacement(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_team(_team("t2"))
    await store.put_team(_team("t1"))
    assert await store.get_team("t1") == _team("t1")
    assert await store.list_team_ids() == ["t1", "t2"]
    # put replaces the whole entry: nothing of the old one survives
    await store.put_team(TeamSettings(team_id="t1", logging_enabled=False))
    assert await store.get_team("t1") == TeamSettings(team_id="t1", logging_enabled=False)
    assert await store.list_team_ids() == ["t1", "t2"]


async def test_delete_team(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_team(_team("t1"))
    await store.put_team(_team("t2"))
    assert await store.delete_team("t1") is True
    assert await store.get_team("t1") is None
    assert await store.delete_team("t1") is False
    assert await store.list_team_ids() == ["t2"]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_every_team_settings_field_survives_the_round_trip(
    make_store: StoreFactory, encrypted: bool
) -> None:
    store = await make_store(encryption_key=KEY if encrypted else None)
    await store.put_team(_every_field_set())
    assert await store.get_team("every-field") == _every_field_set()
    # and a second store on the same backend (a restart, or another replica) reads the same
    if make_store.backend in PERSISTENT:  # type: ignore[attr-defined]
        other = await make_store(encryption_key=KEY if encrypted else None)
        assert await other.get_team("every-field") == _every_field_set()


@pytest.mark.parametrize(
    "team_id",
    [
        "équipe/日本語:🚀",
        "with spaces and 'quotes' \"double\"",
        "colons:team:key:*",
        "%s ? ; -- DROP TABLE teams",
        "x" * 256,
    ],
    ids=["unicode", "quotes", "colons", "sql", "long"],
)
async def test_unusual_team_ids(make_store: StoreFactory, team_id: str) -> None:
    store = await make_store()
    await store.put_team(_team(team_id))
    await store.put_team(_team("plain"))
    assert await store.get_team(team_id) == _team(team_id)
    assert await store.list_team_ids() == sorted([team_id, "plain"])
    assert await store.delete_team(team_id) is True
    assert await store.list_team_ids() == ["plain"]


async def test_lone_surrogates_round_trip_in_metadata_and_are_bad_input_in_ids(
    make_store: StoreFactory,
) -> None:
    # JSON bodies may carry "\ud800" escapes; Python keeps them as lone surrogates. Pydantic
    # refuses them in settings, but key metadata is free-form and ids come from the caller.
    store = await make_store(encryption_key=KEY)
    odd = _key(
        metadata={
            "note": "a\ud800b",
            "logging": [
                {"callback_name": "langfuse", "callback_vars": {"langfuse_secret_key": "s\udfffs"}}
            ],
        }
    )
    await store.put_key(odd)
    assert await store.get_key(odd.key_hash) == odd
    # An id no backend can encode is either handled as given or refused as bad input (400),
    # never a stray UnicodeEncodeError.
    for call in (
        lambda: store.get_team("bad\ud800id"),
        lambda: store.delete_team("bad\ud800id"),
        lambda: store.get_key("bad\ud800id"),
        lambda: store.put_key(KeyRecord(key_hash="bad\ud800id", team_id=None)),
    ):
        try:
            await call()
        except SettingsError as exc:
            assert exc.param in {"team_id", "key_hash"}


async def test_written_settings_cannot_be_mutated_by_the_writer(make_store: StoreFactory) -> None:
    store = await make_store()
    settings = _team()
    await store.put_team(settings)
    settings.callbacks.append(CallbackSpec(callback_name="jsonl"))
    settings.callbacks[0].callback_vars["langfuse_public_key"] = "changed"
    settings.logging_enabled = False
    assert await store.get_team("t1") == _team()


async def test_read_settings_cannot_mutate_the_store(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_team(_team())
    first = await store.get_team("t1")
    assert first is not None
    first.callbacks[0].callback_vars["langfuse_secret_key"] = "changed"
    first.callbacks.clear()
    first.logging_enabled = False
    assert await store.get_team("t1") == _team()


def _key(**changes: Any) -> KeyRecord:
    values: dict[str, Any] = {
        "key_hash": "h" * 64,
        "team_id": "t1",
        "key_alias": "alias",
        "user_id": "user-1",
        "metadata": {
            "logging": [
                {
                    "callback_name": "langfuse",
                    "callback_type": "success",
                    "callback_vars": {
                        "langfuse_public_key": "pk-key",
                        "langfuse_secret_key": SECRET,
                    },
                }
            ],
            "logging_enabled": True,
            "tags": ["a", "ü"],
            "nested": {"n": 1, "f": 1.5, "none": None},
        },
        "created_at": 1700000000.25,
    }
    values.update(changes)
    return KeyRecord(**values)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_keys_round_trip_and_are_copied(make_store: StoreFactory, encrypted: bool) -> None:
    store = await make_store(encryption_key=KEY if encrypted else None)
    key = _key()
    await store.put_key(key)
    key.metadata["logging"][0]["callback_vars"]["langfuse_secret_key"] = "changed"
    key.team_id = "other"
    got = await store.get_key("h" * 64)
    assert got == _key()
    assert got is not None
    got.metadata["logging"].clear()
    assert await store.get_key("h" * 64) == _key()


async def test_a_key_without_team_or_metadata(make_store: StoreFactory) -> None:
    store = await make_store()
    bare = KeyRecord(key_hash="bare", team_id=None)
    await store.put_key(bare)
    assert await store.get_key("bare") == KeyRecord(key_hash="bare", team_id=None)


async def test_put_key_replaces_the_key(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_key(_key())
    await store.put_key(_key(team_id="t2", metadata={}, key_alias=None))
    assert await store.get_key("h" * 64) == _key(team_id="t2", metadata={}, key_alias=None)


async def test_listeners_hear_every_write_as_soon_as_it_returns(make_store: StoreFactory) -> None:
    store = await make_store()
    seen: list[str] = []
    store.subscribe(seen.append)
    # Replicating stores may also deliver their own writes back later (harmless): the contract
    # is that the local notification has happened by the time the write returns.
    await store.put_team(_team("a"))
    assert "a" in seen
    await store.delete_team("a")
    assert seen.count("a") >= 2
    await store.put_key(KeyRecord(key_hash="k", team_id="b"))
    assert "b" in seen
    await store.put_key(KeyRecord(key_hash="k2", team_id=None))
    assert "*" in seen


async def test_a_failing_listener_breaks_neither_writes_nor_other_listeners(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_store()
    seen: list[str] = []

    def bad(team_id: str) -> None:
        raise RuntimeError(f"boom {SECRET}")

    store.subscribe(bad)
    store.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="team_logging_middleware"):
        await store.put_team(_team("a"))
    assert "a" in seen
    assert await store.get_team("a") == _team("a")
    assert "RuntimeError" in caplog.text
    assert SECRET not in caplog.text


async def test_health_names_the_backend_and_holds_no_secret(make_store: StoreFactory) -> None:
    store = await make_store(encryption_key=KEY)
    await store.put_team(_team("a"))
    await store.put_key(_key())
    health = await store.health()
    assert health["backend"] == make_store.backend  # type: ignore[attr-defined]
    assert health.get("reachable", True) is True
    assert SECRET not in repr(health)
    assert KEY not in repr(health)


# -- the codec the persistent stores share (pure, so property-based) ---------------------------

_var_names = st.sampled_from(
    [
        "langfuse_public_key",
        "langfuse_secret_key",
        "langfuse_host",
        "api_key",
        "key",
        "otel_headers",
        "gcs_path_service_account",
        "password",
        "token",
        "bucket_name",
    ]
)
_var_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["enc:v1:gAAAA", "raw:x", "enc:", "raw:", "os.environ/LANGFUSE_SECRET_KEY"]),
    st.builds(lambda a, b: a + b, st.sampled_from(["enc:v1:", "raw:", "enc:"]), st.text()),
)
_specs = st.builds(
    CallbackSpec,
    callback_name=st.sampled_from(["langfuse", "otel", "gcs_bucket", "jsonl", "custom_x"]),
    callback_type=st.sampled_from(["success", "failure", "success_and_failure"]),
    callback_vars=st.dictionaries(_var_names, _var_values, max_size=6),
)
_teams = st.builds(
    TeamSettings,
    team_id=st.text(min_size=1, max_size=40),
    callbacks=st.lists(_specs, max_size=4),
    logging_enabled=st.booleans(),
    cache_enabled=st.booleans(),
    cache_ttl_seconds=st.one_of(st.none(), st.integers(1, 30 * 24 * 3600)),
    message_logging=st.sampled_from(["full", "metadata_only"]),
    inherit_defaults=st.booleans(),
)
_PLAIN = SettingsCodec()
_SEALED = SettingsCodec(KEY)


@settings(max_examples=100, deadline=None)
@given(team=_teams)
def test_codec_round_trips_any_team_plain_and_encrypted(team: TeamSettings) -> None:
    for codec in (_PLAIN, _SEALED):
        stored = codec.dump_team(team)
        assert codec.load_team(stored, team_id=team.team_id) == team
    # A store that gains a key later still reads what was written without one.
    assert _SEALED.load_team(_PLAIN.dump_team(team), team_id=team.team_id) == team


@settings(max_examples=100, deadline=None)
@given(spec=_specs)
def test_codec_encrypts_exactly_the_secret_vars(spec: CallbackSpec) -> None:
    team = TeamSettings(team_id="t", callbacks=[spec])
    stored_vars = json.loads(_SEALED.dump_team(team))["callbacks"][0]["callback_vars"]
    for name, value in spec.callback_vars.items():
        if is_secret_var(name):
            assert stored_vars[name].startswith(ENCRYPTED_PREFIX)
            # (a short value could occur in a random token by chance; a long one cannot)
            if len(value) >= 12:
                assert value not in stored_vars[name][len(ENCRYPTED_PREFIX) :]
        else:
            assert stored_vars[name] == value
    key = KeyRecord(key_hash="k", team_id="t", metadata={"logging": [spec.model_dump()]})
    stored_key = json.loads(_SEALED.dump_key(key))
    for name, value in spec.callback_vars.items():
        sealed = stored_key["metadata"]["logging"][0]["callback_vars"][name]
        if is_secret_var(name):
            assert sealed.startswith(ENCRYPTED_PREFIX)
        else:
            assert sealed == value
    assert _SEALED.load_key(_SEALED.dump_key(key), key_hash="k") == key
