"""SQLiteSettingsStore: persistence, concurrent writers (objects and processes), locking, schema,
encryption at rest and the errors an operator sees."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from team_logging_middleware.errors import (
    MissingDependencyError,
    SettingsError,
    StoreUnavailableError,
)
from team_logging_middleware.settings import TeamSettings
from team_logging_middleware.stores import (
    ENCRYPTED_PREFIX,
    KeyRecord,
    SecretDecryptionError,
    SQLiteSettingsStore,
    StoredDataError,
)
from team_logging_middleware.stores import sqlite as sqlite_store
from tests.helpers import Opened, langfuse_team, wait_until

SECRET = "sk-lf-very-secret-value-4242"
KEY_SECRET = "sk-key-level-secret-7777"
KEY = Fernet.generate_key().decode()


def _team(team_id: str = "t1", secret: str = SECRET, **changes: object) -> TeamSettings:
    return langfuse_team(team_id, secret, **changes)


def _key(team_id: str | None = "t1") -> KeyRecord:
    return KeyRecord(
        key_hash="a" * 64,
        team_id=team_id,
        key_alias="ci-key",
        metadata={
            "logging": [
                {
                    "callback_name": "langfuse",
                    "callback_vars": {
                        "langfuse_public_key": "pk-key-public",
                        "langfuse_secret_key": KEY_SECRET,
                    },
                }
            ]
        },
        created_at=123.5,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "settings.db"


@pytest.fixture
async def open_store(db_path: Path) -> AsyncIterator[Callable[..., SQLiteSettingsStore]]:
    """``open_store(**options)``: a store on ``db_path``; every one is closed at teardown."""
    opened = Opened()

    def make(**options: object) -> SQLiteSettingsStore:
        return opened.add(SQLiteSettingsStore(db_path, **options))  # type: ignore[arg-type]

    try:
        yield make
    finally:
        await opened.aclose()


async def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    await wait_until(condition, "the condition", timeout, interval=0.01)


def _raw_bytes(path: Path) -> bytes:
    """Everything SQLite wrote for the database: the file, its WAL and shared memory."""
    data = b""
    for suffix in ("", "-wal", "-shm"):
        part = Path(str(path) + suffix)
        if part.exists():
            data += part.read_bytes()
    return data


# -- persistence and layout -------------------------------------------------------------------


async def test_settings_survive_a_restart(open_store: Callable[..., SQLiteSettingsStore]) -> None:
    first = open_store(encryption_key=KEY)
    await first.put_team(_team("t1"))
    await first.put_team(_team("t2", logging_enabled=False))
    await first.put_key(_key())
    await first.delete_team("t2")
    await first.aclose()

    second = open_store(encryption_key=KEY)
    assert await second.list_team_ids() == ["t1"]
    assert await second.get_team("t1") == _team("t1")
    assert await second.get_key("a" * 64) == _key()


async def test_schema_wal_mode_and_private_file(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    store = open_store()
    await store.start()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {"teams", "keys", "changes"} <= tables
        columns = [row[1] for row in conn.execute("PRAGMA table_info(keys)")]
        assert columns == ["key_hash", "team_id", "key_alias", "user_id", "metadata", "created_at"]
    finally:
        conn.close()
    # It holds credentials: readable by its owner only.
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    health = await store.health()
    assert health["schema_version"] == sqlite_store.SCHEMA_VERSION
    assert health["change_poller"] is True


async def test_an_existing_database_is_opened_without_migrating_again(
    open_store: Callable[..., SQLiteSettingsStore],
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = open_store()
    with caplog.at_level("INFO", logger="team_logging_middleware"):
        await first.put_team(_team())
    assert "migrated from schema 0 to 1" in caplog.text
    await first.aclose()
    caplog.clear()
    second = open_store()
    with caplog.at_level("INFO", logger="team_logging_middleware"):
        assert await second.get_team("t1") == _team()
    assert "migrated" not in caplog.text


async def test_a_database_from_a_newer_version_is_refused(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    store = open_store()
    with pytest.raises(StoreUnavailableError, match="schema version 99, newer"):
        await store.get_team("t1")
    health = await store.health()
    assert health["reachable"] is False
    assert "newer" in health["error"]


def test_memory_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="MemorySettingsStore"):
        SQLiteSettingsStore(":memory:")


# -- encryption at rest -------------------------------------------------------------------------


async def test_the_raw_file_holds_secrets_only_when_not_encrypted(tmp_path: Path) -> None:
    for encrypted in (False, True):
        path = tmp_path / f"enc-{encrypted}.db"
        store = SQLiteSettingsStore(path, encryption_key=KEY if encrypted else None)
        await store.put_team(_team())
        await store.put_key(_key())
        raw = _raw_bytes(path)
        # The public parts stay readable either way (operators can inspect the database).
        assert b"pk-lf-public" in raw and b"pk-key-public" in raw
        assert (SECRET.encode() in raw) is not encrypted
        assert (KEY_SECRET.encode() in raw) is not encrypted
        assert (ENCRYPTED_PREFIX.encode() in raw) is encrypted
        await store.aclose()
        # and after the WAL was checkpointed into the main file on close
        raw = _raw_bytes(path)
        assert (SECRET.encode() in raw) is not encrypted
        assert (KEY_SECRET.encode() in raw) is not encrypted


async def test_reading_with_the_wrong_key_or_none_fails_clearly(
    open_store: Callable[..., SQLiteSettingsStore],
) -> None:
    writer = open_store(encryption_key=KEY)
    await writer.put_team(_team("team-x"))
    await writer.put_key(_key())

    wrong = open_store(encryption_key=Fernet.generate_key())
    with pytest.raises(SecretDecryptionError) as caught:
        await wrong.get_team("team-x")
    message = str(caught.value)
    assert "team 'team-x'" in message and "langfuse_secret_key" in message
    assert SECRET not in message and KEY not in message
    assert isinstance(caught.value, StoreUnavailableError)  # the admin API answers 503
    with pytest.raises(SecretDecryptionError, match=r"metadata\.logging"):
        await wrong.get_key("a" * 64)

    keyless = open_store()
    with pytest.raises(SecretDecryptionError, match="no encryption_key"):
        await keyless.get_team("team-x")


async def test_turning_encryption_on_and_rotating_keys(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    plain = open_store()
    await plain.put_team(_team("old"))
    # A key configured later reads what was written without one...
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed = open_store(encryption_key=old_key)
    assert await sealed.get_team("old") == _team("old")
    await sealed.put_team(_team("old"))  # ...and seals it on the next write
    await plain.aclose()
    await sealed.aclose()  # the last connection checkpoints the WAL into the file
    # The replaced clear-text row was zeroed, not just unlinked (secure_delete).
    assert SECRET.encode() not in _raw_bytes(db_path)
    # Rotation: the first key encrypts, every listed key decrypts.
    rotating = open_store(encryption_key=[new_key, old_key])
    assert await rotating.get_team("old") == _team("old")
    await rotating.put_team(_team("old"))
    only_new = open_store(encryption_key=new_key)
    assert await only_new.get_team("old") == _team("old")
    with pytest.raises(SecretDecryptionError):
        await open_store(encryption_key=old_key).get_team("old")


async def test_plain_secrets_that_look_encrypted_round_trip(
    open_store: Callable[..., SQLiteSettingsStore],
) -> None:
    store = open_store()
    for i, value in enumerate(["enc:v1:not-a-token", "raw:already", "enc:"]):
        await store.put_team(_team(f"t{i}", secret=value))
        assert await store.get_team(f"t{i}") == _team(f"t{i}", secret=value)


def test_a_bad_encryption_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError, match=r"Fernet\.generate_key") as caught:
        SQLiteSettingsStore("unused.db", encryption_key="not-a-valid-key-but-secret")
    assert "not-a-valid-key-but-secret" not in str(caught.value)


def test_encryption_without_cryptography_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.fernet", None)
    with pytest.raises(MissingDependencyError, match=r"team-logging-middleware\[encryption\]"):
        SQLiteSettingsStore("unused.db", encryption_key=KEY)


# -- stored data that cannot be read -------------------------------------------------------------


async def test_corrupt_documents_name_the_team_never_the_values(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    store = open_store()
    await store.put_team(_team("broken"))
    await store.put_team(_team("invalid"))
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE teams SET document = '{not json' WHERE team_id = 'broken'")
    document = {"team_id": "invalid", "callbacks": SECRET, "cache_ttl_seconds": -5}
    conn.execute("UPDATE teams SET document = ? WHERE team_id = 'invalid'", (json.dumps(document),))
    conn.commit()
    conn.close()
    with pytest.raises(StoredDataError, match="team 'broken' are not valid JSON"):
        await store.get_team("broken")
    with pytest.raises(StoredDataError) as caught:
        await store.get_team("invalid")
    assert "callbacks" in str(caught.value) and "cache_ttl_seconds" in str(caught.value)
    assert SECRET not in str(caught.value)


async def test_metadata_that_is_not_json_is_refused(
    open_store: Callable[..., SQLiteSettingsStore],
) -> None:
    store = open_store()
    with pytest.raises(SettingsError, match="JSON-serialisable"):
        await store.put_key(KeyRecord(key_hash="k", team_id="t", metadata={"when": object()}))
    assert await store.get_key("k") is None


# -- concurrency -------------------------------------------------------------------------------


async def test_two_store_objects_writing_concurrently_lose_nothing(
    open_store: Callable[..., SQLiteSettingsStore],
) -> None:
    a, b = open_store(encryption_key=KEY), open_store(encryption_key=KEY)
    writes = [a.put_team(_team(f"a-{i}")) for i in range(40)]
    writes += [b.put_team(_team(f"b-{i}")) for i in range(40)]
    # and both fighting over the same team and the same key
    writes += [s.put_team(_team("shared", secret=f"s-{n}")) for n, s in enumerate([a, b] * 10)]
    writes += [s.put_key(_key(team_id=f"k-{n}")) for n, s in enumerate([a, b] * 10)]
    await asyncio.gather(*writes)
    expected = sorted([f"a-{i}" for i in range(40)] + [f"b-{i}" for i in range(40)] + ["shared"])
    assert await a.list_team_ids() == expected
    assert await b.list_team_ids() == expected
    shared = await a.get_team("shared")
    assert shared is not None
    assert shared.callbacks[0].callback_vars["langfuse_secret_key"] in {f"s-{n}" for n in range(20)}
    key = await b.get_key("a" * 64)
    assert key is not None and key.team_id in {f"k-{n}" for n in range(20)}


_WRITER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from team_logging_middleware.settings import TeamSettings
    from team_logging_middleware.stores import SQLiteSettingsStore

    async def main(path, name, count):
        store = SQLiteSettingsStore(path, busy_timeout=20.0)
        await asyncio.gather(
            *(store.put_team(TeamSettings(team_id=f"{name}-{i}")) for i in range(count))
        )
        await store.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_two_processes_write_and_a_third_sees_their_changes(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    watcher = open_store(poll_interval=0.02)
    seen: list[str] = []
    watcher.subscribe(seen.append)
    await watcher.start()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER_SCRIPT, str(db_path), name, "25"],
            stderr=subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    for proc in procs:
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err.decode()
    expected = sorted(f"{name}-{i}" for name in ("p1", "p2") for i in range(25))
    assert await watcher.list_team_ids() == expected
    # The watcher hears about every team the other processes wrote (no "*": nothing was lost).
    await _wait_for(lambda: set(expected) <= set(seen))
    assert "*" not in seen


async def test_the_poller_reports_other_writers_only(
    open_store: Callable[..., SQLiteSettingsStore],
) -> None:
    watcher, other = open_store(poll_interval=0.02), open_store()
    seen: list[str] = []
    watcher.subscribe(seen.append)  # inside a running loop: starts the poller lazily
    await _wait_for(lambda: watcher._poller is not None)
    await watcher.put_team(_team("mine"))
    await other.put_team(_team("theirs"))
    await _wait_for(lambda: "theirs" in seen)
    await other.delete_team("theirs")
    await _wait_for(lambda: seen.count("theirs") == 2)
    await other.put_key(_key(team_id=None))
    await _wait_for(lambda: "*" in seen)
    # Its own write was announced once, synchronously, never again by the poller.
    assert seen.count("mine") == 1


async def test_a_poller_that_fell_behind_the_pruned_log_announces_everything(
    open_store: Callable[..., SQLiteSettingsStore],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_store, "CHANGE_LOG_SIZE", 5)
    writer, reader = open_store(), open_store()
    for i in range(12):
        await writer.put_team(_team(f"t{i}"))
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT count(*) FROM changes").fetchone()[0] == 5
        # a reader that last saw change 3 missed pruned entries; one that saw 8 missed none
        assert reader._changes_since(3, conn) == (12, ["*"])
        assert reader._changes_since(8, conn) == (12, ["t8", "t9", "t10", "t11"])
    finally:
        conn.close()


# -- locking and errors ----------------------------------------------------------------------------


async def test_a_write_waits_for_the_lock_without_blocking_the_loop(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    store = open_store(busy_timeout=30.0)
    await store.put_team(_team("before"))
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        write = asyncio.ensure_future(store.put_team(_team("during")))
        ticks = 0
        while ticks < 20:  # the loop keeps running while the write waits in its thread
            await asyncio.sleep(0.005)
            ticks += 1
        assert not write.done()
        # WAL: readers are not blocked by a writer holding the lock
        assert await store.get_team("before") == _team("before")
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    await write
    assert await store.get_team("during") == _team("during")


async def test_a_lock_held_beyond_busy_timeout_is_store_unavailable(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    store = open_store(busy_timeout=0.05)
    seen: list[str] = []
    await store.put_team(_team())
    store.subscribe(seen.append)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError, match="locked by another writer") as caught:
            await store.put_team(_team(secret="new-secret-value-xyz"))
        assert "new-secret-value-xyz" not in str(caught.value)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert "t1" not in seen  # a failed put is not announced as a change
    assert await store.get_team("t1") == _team()
    await store.put_team(_team(secret="after"))
    assert seen == ["t1"]


async def test_a_file_that_is_not_a_database(
    open_store: Callable[..., SQLiteSettingsStore], db_path: Path
) -> None:
    db_path.write_bytes(b"this is not a database, it is a text file" * 100)
    store = open_store()
    with pytest.raises(StoreUnavailableError, match="not a database"):
        await store.list_team_ids()
    health = await store.health()
    assert health["reachable"] is False and health["backend"] == "sqlite"


async def test_a_missing_directory(tmp_path: Path) -> None:
    store = SQLiteSettingsStore(tmp_path / "missing" / "settings.db")
    try:
        with pytest.raises(StoreUnavailableError, match="cannot create"):
            await store.put_team(_team())
        with pytest.raises(StoreUnavailableError):
            await store.start()
    finally:
        await store.aclose()


async def test_aclose_stops_the_poller_and_refuses_later_calls(
    open_store: Callable[..., SQLiteSettingsStore],
) -> None:
    store = open_store(poll_interval=0.01)
    await store.start()
    poller = store._poller
    assert poller is not None and not poller.done()
    await store.put_team(_team())
    await store.aclose()
    await store.aclose()  # idempotent
    assert poller.done()
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.get_team("t1")
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.put_team(_team())
    reopened = open_store()
    assert await reopened.get_team("t1") == _team()
