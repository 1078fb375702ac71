"""Destinations: the sink contract, the registry of sink types and the built-in sinks.

:func:`default_registry` returns a *new* registry holding the built-in destinations (``jsonl``,
``langfuse``, ``otel``, ``gcs_bucket``), every custom callback registered in code with
:func:`register_callback` and every callback published by an installed package in the entry-point
group ``team_logging_middleware.callbacks``.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points

from .base import CheckableSink, Sink, SinkContext, SinkRegistry, SinkType
from .custom import (
    CustomLogger,
    PartialBatchError,
    custom_sink_type,
    register_callback,
    registered_callbacks,
    unregister_callback,
)
from .jsonl import jsonl_sink_type

__all__ = [
    "ENTRY_POINT_GROUP",
    "CheckableSink",
    "CustomLogger",
    "PartialBatchError",
    "Sink",
    "SinkContext",
    "SinkRegistry",
    "SinkType",
    "default_registry",
    "register_callback",
    "unregister_callback",
]

logger = logging.getLogger("team_logging_middleware.sinks")

ENTRY_POINT_GROUP = "team_logging_middleware.callbacks"
# Built-in sinks living in their own modules, each exposing ``SINK_TYPE``.
_BUILTIN_MODULES = ("langfuse", "otel", "gcs")


def _builtin_sink_types() -> list[SinkType]:
    found: list[SinkType] = []
    for short in _BUILTIN_MODULES:
        module_name = f"{__name__}.{short}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only the module itself being absent is tolerated (it is added by its own change);
            # a missing import *inside* it is a real error and must surface.
            if exc.name != module_name:
                raise
            continue
        sink_type = getattr(module, "SINK_TYPE", None)
        if not isinstance(sink_type, SinkType):
            raise TypeError(f"{module_name}.SINK_TYPE is not a SinkType")
        found.append(sink_type)
    return found


def _entry_point_sink_types() -> list[SinkType]:
    found: list[SinkType] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, SinkType):
                found.append(obj)
            elif isinstance(obj, CustomLogger) or (
                isinstance(obj, type) and issubclass(obj, CustomLogger)
            ):
                found.append(custom_sink_type(ep.name, obj))
            else:
                raise TypeError(
                    f"{ep.value} is a {type(obj).__name__}, not a CustomLogger or a SinkType"
                )
        except Exception as exc:  # one broken plugin must not stop the gateway
            logger.warning(
                "skipping callback entry point %r (%s): %s: %s",
                ep.name,
                ep.value,
                type(exc).__name__,
                exc,
            )
    return found


def default_registry(*, jsonl_dir: str | os.PathLike[str] | None = None) -> SinkRegistry:
    """A new registry with the built-in destinations and every registered custom callback.

    ``jsonl_dir`` is the directory ``jsonl`` destinations are confined to (default ``./logs``
    under the working directory). A custom callback whose name is already taken is logged and
    skipped.
    """
    registry = SinkRegistry([jsonl_sink_type(jsonl_dir), *_builtin_sink_types()])
    for source, sink_types in (
        ("register_callback", registered_callbacks()),
        ("entry point", _entry_point_sink_types()),
    ):
        for sink_type in sink_types:
            try:
                registry.register(sink_type)
            except ValueError:
                logger.warning(
                    "skipping callback %r from %s: the name is already taken",
                    sink_type.name,
                    source,
                )
    return registry
