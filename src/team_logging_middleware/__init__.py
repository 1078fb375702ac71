"""team-logging-middleware: per-team and per-key logging destinations for ASGI LLM gateways.

Two lines in a gateway::

    tl = TeamLogging(resolve, store=SQLiteSettingsStore("team_logging.db"))
    app = TeamLoggingMiddleware(app, team_logging=tl)

and one to mount the admin routes: ``app.mount("/admin", create_admin_app(tl, master_key=k))``.
"""

from __future__ import annotations

# Defined before the imports below: submodules (admin's OpenAPI document) read it.
__version__ = "0.1.0"

from ._types import Caller, Destination, Plan
from .admin import Principal, create_admin_app
from .cache import CachedResponse, MemoryResponseCache, RedisResponseCache, ResponseCache
from .config import StaticConfig
from .dispatcher import Dispatcher, FlushReport
from .errors import (
    ConfigFileError,
    MissingDependencyError,
    SettingsError,
    SinkError,
    StoreUnavailableError,
    TeamLoggingError,
)
from .middleware import DEFAULT_ROUTES, TeamLoggingMiddleware
from .planning import Planner
from .records import Exchange, LogRecord, Usage
from .resolver import CachedResolver, Resolver, bearer_token
from .runtime import TeamLogging
from .settings import CallbackSpec, KeyLoggingSettings, TeamSettings, TeamSettingsPatch
from .sinks import CustomLogger, default_registry, register_callback
from .sinks.base import CheckableSink, Sink, SinkContext, SinkRegistry, SinkType

__all__ = [
    "DEFAULT_ROUTES",
    "CachedResolver",
    "CachedResponse",
    "CallbackSpec",
    "Caller",
    "CheckableSink",
    "ConfigFileError",
    "CustomLogger",
    "Destination",
    "Dispatcher",
    "Exchange",
    "FlushReport",
    "KeyLoggingSettings",
    "LogRecord",
    "MemoryResponseCache",
    "MissingDependencyError",
    "Plan",
    "Planner",
    "Principal",
    "RedisResponseCache",
    "Resolver",
    "ResponseCache",
    "SettingsError",
    "Sink",
    "SinkContext",
    "SinkError",
    "SinkRegistry",
    "SinkType",
    "StaticConfig",
    "StoreUnavailableError",
    "TeamLogging",
    "TeamLoggingError",
    "TeamLoggingMiddleware",
    "TeamSettings",
    "TeamSettingsPatch",
    "Usage",
    "__version__",
    "bearer_token",
    "create_admin_app",
    "default_registry",
    "register_callback",
]
