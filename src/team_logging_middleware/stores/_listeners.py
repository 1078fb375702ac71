"""Change notification, the same for every settings store."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .base import ChangeListener

logger = logging.getLogger("team_logging_middleware.stores")


def notify_listeners(listeners: Iterable[ChangeListener], team_id: str) -> None:
    """Call every listener with ``team_id``; one that raises is logged and the rest still run.

    Pass a snapshot of the store's listeners: a listener may subscribe another one while it runs.
    """
    for listener in listeners:
        try:
            listener(team_id)
        except Exception as exc:
            # Only the exception's type is logged: its message could echo settings values.
            logger.error(
                "settings change listener %r failed for team %r: %s",
                listener,
                team_id,
                type(exc).__name__,
            )
