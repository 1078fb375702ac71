"""MemorySettingsStore: the SettingsStore contract, copy isolation and change notification."""

from __future__ import annotations

import logging

import pytest

from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.stores.base import KeyRecord, SettingsStore
from team_logging_middleware.stores.memory import MemorySettingsStore
from tests.helpers import langfuse_team

SECRET = "sk-lf-secret"


def _team(team_id: str = "t1", secret: str = SECRET) -> TeamSettings:
    return langfuse_team(team_id, secret, public_key="pk-1")


def test_implements_the_protocol() -> None:
    assert isinstance(MemorySettingsStore(), SettingsStore)


async def test_team_round_trip_and_listing() -> None:
    store = MemorySettingsStore()
    assert await store.get_team("t1") is None
    await store.put_team(_team("t2"))
    await store.put_team(_team("t1"))
    assert await store.get_team("t1") == _team("t1")
    assert await store.list_team_ids() == ["t1", "t2"]
    # put replaces the whole entry
    await store.put_team(TeamSettings(team_id="t1", logging_enabled=False))
    got = await store.get_team("t1")
    assert got is not None and got.callbacks == [] and got.logging_enabled is False


async def test_delete_team() -> None:
    store = MemorySettingsStore()
    await store.put_team(_team("t1"))
    assert await store.delete_team("t1") is True
    assert await store.get_team("t1") is None
    assert await store.delete_team("t1") is False
    assert await store.list_team_ids() == []


async def test_written_settings_cannot_be_mutated_by_the_writer() -> None:
    store = MemorySettingsStore()
    settings = _team()
    await store.put_team(settings)
    settings.callbacks.append(CallbackSpec(callback_name="jsonl"))
    settings.callbacks[0].callback_vars["langfuse_public_key"] = "changed"
    settings.logging_enabled = False
    stored = await store.get_team("t1")
    assert stored == _team()


async def test_read_settings_cannot_mutate_the_store() -> None:
    store = MemorySettingsStore()
    await store.put_team(_team())
    first = await store.get_team("t1")
    assert first is not None
    first.callbacks.clear()
    first.logging_enabled = False
    assert await store.get_team("t1") == _team()


async def test_keys_round_trip_and_are_copied() -> None:
    store = MemorySettingsStore()
    assert await store.get_key("h1") is None
    key = KeyRecord(
        key_hash="h1",
        team_id="t1",
        key_alias="alias",
        metadata={"logging": [{"callback_name": "jsonl"}]},
        created_at=12.5,
    )
    await store.put_key(key)
    key.metadata["logging"].append({"callback_name": "otel"})
    key.team_id = "other"
    got = await store.get_key("h1")
    assert got == KeyRecord(
        key_hash="h1",
        team_id="t1",
        key_alias="alias",
        metadata={"logging": [{"callback_name": "jsonl"}]},
        created_at=12.5,
    )
    assert got is not None
    got.metadata.clear()
    again = await store.get_key("h1")
    assert again is not None and again.metadata == {"logging": [{"callback_name": "jsonl"}]}


async def test_listeners_are_called_after_every_write() -> None:
    store = MemorySettingsStore()
    seen: list[tuple[str, bool]] = []

    def listener(team_id: str) -> None:
        # Record whether the write is already visible when the listener runs.
        seen.append((team_id, team_id in store._teams))

    store.subscribe(listener)
    await store.put_team(_team("a"))
    await store.delete_team("a")
    await store.put_key(KeyRecord(key_hash="h", team_id="b"))
    await store.put_key(KeyRecord(key_hash="h2", team_id=None))
    assert seen == [("a", True), ("a", False), ("b", False), ("*", False)]


async def test_a_failing_listener_does_not_break_writes_or_other_listeners(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemorySettingsStore()
    seen: list[str] = []

    def bad(team_id: str) -> None:
        raise RuntimeError("boom sk-lf-secret")

    store.subscribe(bad)
    store.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="team_logging_middleware"):
        await store.put_team(_team("a"))
    assert seen == ["a"]
    assert await store.get_team("a") is not None
    assert "RuntimeError" in caplog.text
    assert "sk-lf-secret" not in caplog.text


async def test_health_counts_teams_and_keys() -> None:
    store = MemorySettingsStore()
    assert await store.health() == {"backend": "memory", "teams": 0, "keys": 0}
    await store.put_team(_team("a"))
    await store.put_team(_team("b"))
    await store.put_key(KeyRecord(key_hash="h", team_id="a"))
    health = await store.health()
    assert health == {"backend": "memory", "teams": 2, "keys": 1}
    assert "sk-lf-secret" not in repr(health)


async def test_aclose_keeps_data() -> None:
    store = MemorySettingsStore()
    await store.put_team(_team("a"))
    await store.aclose()
    assert await store.list_team_ids() == ["a"]
