"""The settings store contract shared by the memory, SQLite and Redis stores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..settings import TeamSettings

ChangeListener = Callable[[str], None]
"""Called with a team id (or ``"*"`` for everything) when settings changed, here or elsewhere."""


@dataclass(slots=True)
class KeyRecord:
    """A gateway API key as the example gateway stores it: hashed, never the raw key."""

    key_hash: str
    team_id: str | None
    key_alias: str | None = None
    user_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0


@runtime_checkable
class SettingsStore(Protocol):
    """Persistent team settings (and gateway keys).

    Writes raise :class:`~team_logging_middleware.errors.StoreUnavailableError` when the backend
    cannot be reached, so the admin API answers 503 and nothing is silently lost.
    ``subscribe`` registers a listener called after any change (including other replicas' changes,
    for stores that can see them) so plan caches invalidate at once.
    """

    async def get_team(self, team_id: str) -> TeamSettings | None: ...

    async def put_team(self, settings: TeamSettings) -> None: ...

    async def delete_team(self, team_id: str) -> bool: ...

    async def list_team_ids(self) -> list[str]: ...

    async def get_key(self, key_hash: str) -> KeyRecord | None: ...

    async def put_key(self, key: KeyRecord) -> None: ...

    def subscribe(self, listener: ChangeListener) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
