"""An in-process settings store: the default for tests, demos and single-replica gateways.

Settings live in plain dicts and vanish with the process. Every value is deep-copied on the way in
and on the way out, so a caller that mutates what it wrote (or what it read) cannot change the
stored state behind the planner's back.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from ..settings import TeamSettings
from ._listeners import notify_listeners
from .base import ChangeListener, KeyRecord

__all__ = ["MemorySettingsStore"]


class MemorySettingsStore:
    """A :class:`~team_logging_middleware.stores.base.SettingsStore` kept in this process's memory.

    Nothing is shared with other replicas; use the SQLite or Redis store for that. Listeners
    registered with :meth:`subscribe` are called synchronously after every write with the team id
    the write concerned (``"*"`` for a key without a team). A listener that raises is logged and
    skipped: it must not turn a successful write into an error.
    """

    def __init__(self) -> None:
        self._teams: dict[str, TeamSettings] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._listeners: list[ChangeListener] = []
        # The async methods never await, so on one event loop they are already atomic; the lock
        # keeps the store safe when a synchronous admin script shares it from another thread.
        self._lock = threading.Lock()

    async def get_team(self, team_id: str) -> TeamSettings | None:
        with self._lock:
            settings = self._teams.get(team_id)
        return None if settings is None else settings.model_copy(deep=True)

    async def put_team(self, settings: TeamSettings) -> None:
        stored = settings.model_copy(deep=True)
        with self._lock:
            self._teams[stored.team_id] = stored
        self._notify(stored.team_id)

    async def delete_team(self, team_id: str) -> bool:
        with self._lock:
            existed = self._teams.pop(team_id, None) is not None
        # Notify even when nothing was stored: invalidating a cache is idempotent, and a planner
        # that cached a plan built before a concurrent write must not keep it.
        self._notify(team_id)
        return existed

    async def list_team_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._teams)

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        with self._lock:
            key = self._keys.get(key_hash)
        return None if key is None else copy.deepcopy(key)

    async def put_key(self, key: KeyRecord) -> None:
        stored = copy.deepcopy(key)
        with self._lock:
            self._keys[stored.key_hash] = stored
        self._notify(stored.team_id if stored.team_id is not None else "*")

    def subscribe(self, listener: ChangeListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    async def health(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": "memory", "teams": len(self._teams), "keys": len(self._keys)}

    async def aclose(self) -> None:
        """Nothing to release; the data stays readable (a closed memory store loses nothing)."""

    def _notify(self, team_id: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        notify_listeners(listeners, team_id)
