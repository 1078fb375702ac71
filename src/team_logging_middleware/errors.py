"""Exceptions raised by team-logging-middleware.

Hierarchy::

    TeamLoggingError
    ├── SettingsError          bad settings (API body, config file, key metadata); has ``param``
    │   └── ConfigFileError    the static config file could not be loaded
    ├── StoreUnavailableError  the settings store cannot be reached (answers 503)
    ├── MissingDependencyError an optional backend is not installed
    └── SinkError              a destination failed; ``retryable`` says whether to try again
"""

from __future__ import annotations


class TeamLoggingError(Exception):
    """Base class of every error this package raises on purpose."""


class SettingsError(TeamLoggingError, ValueError):
    """Settings were refused. ``param`` names the offending field (dotted path) when known."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigFileError(SettingsError):
    """The static config file is invalid; the message names the entry and the field."""


class StoreUnavailableError(TeamLoggingError):
    """The settings store is unreachable; a write must be retried by the caller."""


class MissingDependencyError(TeamLoggingError, ImportError):
    """An optional backend was used without its extra installed."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs an optional dependency: "
            f'pip install "team-logging-middleware[{extra}]"'
        )
        self.extra = extra


class SinkError(TeamLoggingError):
    """A destination refused or failed a batch.

    ``retryable`` errors (429, 502/503/504, connection errors, timeouts) are retried by the
    dispatcher with backoff; ``retry_after`` (seconds) honours a server's ``Retry-After``.
    Non-retryable errors (400/401/403, bad bucket) are counted as failed with ``reason``.
    The message must never contain a secret.
    """

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
