"""Custom callbacks: user code that receives every record of the destinations that name it.

A custom callback is a :class:`CustomLogger` registered under a ``callback_name``. Teams and keys
then use it like a built-in destination::

    class AuditLogger(CustomLogger):
        required_vars = ("audit_url",)

        def __init__(self, *, audit_url: str) -> None:
            self.audit_url = audit_url

        async def log_success_event(self, record: LogRecord) -> None:
            ...

    register_callback("audit", AuditLogger)

    # POST /team/t1/callback {"callback_name": "audit", "callback_vars": {"audit_url": "..."}}

``register_callback`` accepts three shapes of logger:

* an **instance**: shared by every destination naming the callback; its vars are ignored and the
  dispatcher never closes it (whoever created it owns it);
* a **subclass**: instantiated once per destination with the destination's resolved vars as
  keyword arguments (``AuditLogger(audit_url=...)``), closed when the destination is evicted;
* a **factory** ``(vars) -> CustomLogger``: called once per destination with the resolved vars,
  the logger it returns is closed like a subclass's.

Packages can also publish callbacks in the entry-point group ``team_logging_middleware.callbacks``
(the entry point's name is the callback name; it resolves to a ``CustomLogger`` subclass or
instance, or to a complete :class:`~team_logging_middleware.sinks.base.SinkType`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar

from ..errors import SinkError
from ..records import LogRecord
from .base import Sink, SinkContext, SinkRegistry, SinkType

__all__ = [
    "BUILTIN_CALLBACK_NAMES",
    "CustomLogger",
    "PartialBatchError",
    "custom_sink_type",
    "register_callback",
    "registered_callbacks",
    "unregister_callback",
]

BUILTIN_CALLBACK_NAMES = frozenset({"jsonl", "langfuse", "otel", "gcs_bucket"})
_MAX_NAME_LENGTH = 128  # CallbackSpec.callback_name's bound


class PartialBatchError(SinkError):
    """Some records of a batch failed, the others were delivered.

    The dispatcher counts ``failed`` records as failed and the rest as sent, and does not retry
    (a retry would deliver the successful records twice). Any sink may raise it.
    """

    def __init__(self, reason: str, *, failed: int) -> None:
        super().__init__(reason, retryable=False)
        self.failed = failed


class CustomLogger:
    """Base class of custom callbacks: override the hooks you need (the defaults do nothing).

    ``required_vars`` / ``optional_vars`` declare the ``callback_vars`` a destination may set;
    they are validated when a team's settings are written, like a built-in destination's.
    A hook that raises fails that one record only; it never reaches the request.
    """

    required_vars: ClassVar[tuple[str, ...]] = ()
    optional_vars: ClassVar[tuple[str, ...]] = ()

    async def log_success_event(self, record: LogRecord) -> None:
        """Called with each record of a request that succeeded (``record.success``)."""
        return None

    async def log_failure_event(self, record: LogRecord) -> None:
        """Called with each record of a request that failed (HTTP error, exception, disconnect)."""
        return None

    async def aclose(self) -> None:
        """Release resources; called when the destination is evicted or the dispatcher stops."""
        return None


LoggerSpec = CustomLogger | type[CustomLogger] | Callable[[Mapping[str, str]], CustomLogger]


class CustomLoggerSink:
    """Adapts a :class:`CustomLogger` to the sink contract: one hook call per record."""

    def __init__(self, name: str, logger: CustomLogger, *, owned: bool) -> None:
        self.name = name
        self.logger = logger
        self._owned = owned

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        failed = 0
        first: BaseException | None = None
        for record in batch:
            try:
                if record.success:
                    await self.logger.log_success_event(record)
                else:
                    await self.logger.log_failure_event(record)
            except Exception as exc:  # user code: contain it, fail this record only
                failed += 1
                if first is None:
                    first = exc
        if failed:
            # Only the exception type: a user's message may quote credentials.
            raise PartialBatchError(
                f"custom callback {self.name!r} raised {type(first).__name__} "
                f"for {failed} of {len(batch)} record(s)",
                failed=failed,
            )

    async def aclose(self) -> None:
        if self._owned:
            await self.logger.aclose()


def custom_sink_type(
    name: str,
    logger: LoggerSpec,
    *,
    required_vars: Iterable[str] = (),
    optional_vars: Iterable[str] = (),
    description: str = "",
) -> SinkType:
    """Build the :class:`SinkType` of a custom callback without registering it anywhere.

    When neither ``required_vars`` nor ``optional_vars`` is given, a ``CustomLogger`` subclass's
    (or instance's) own ``required_vars`` / ``optional_vars`` class attributes are used.
    """
    if not name or len(name) > _MAX_NAME_LENGTH:
        raise ValueError(f"a callback name must have 1 to {_MAX_NAME_LENGTH} characters")
    required = frozenset(required_vars)
    optional = frozenset(optional_vars)
    declared: type[CustomLogger] | None = None
    if isinstance(logger, CustomLogger):
        declared = type(logger)
    elif isinstance(logger, type):
        if not issubclass(logger, CustomLogger):
            raise TypeError(f"callback {name!r}: {logger.__name__} is not a CustomLogger subclass")
        declared = logger
    elif not callable(logger):
        raise TypeError(f"callback {name!r}: expected a CustomLogger, a subclass or a factory")
    if declared is not None and not required and not optional:
        required = frozenset(declared.required_vars)
        optional = frozenset(declared.optional_vars)

    def factory(vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        if isinstance(logger, CustomLogger):
            return CustomLoggerSink(name, logger, owned=False)
        instance = logger(**vars_) if isinstance(logger, type) else logger(vars_)
        if not isinstance(instance, CustomLogger):
            raise TypeError(
                f"callback {name!r}: the factory returned {type(instance).__name__}, "
                "not a CustomLogger"
            )
        return CustomLoggerSink(name, instance, owned=True)

    return SinkType(
        name=name,
        factory=factory,
        required_vars=required,
        optional_vars=optional,
        description=description or f"custom callback {name}",
    )


_lock = threading.Lock()
_process_callbacks: dict[str, SinkType] = {}


def register_callback(
    name: str,
    logger: LoggerSpec,
    *,
    required_vars: Iterable[str] = (),
    optional_vars: Iterable[str] = (),
    registry: SinkRegistry | None = None,
    replace: bool = False,
) -> SinkType:
    """Register a custom callback under ``name`` and return its sink type.

    With ``registry`` the callback goes into that registry only. Without it, it goes into a
    process-wide table that every later :func:`~team_logging_middleware.sinks.default_registry`
    includes (registries built earlier are not changed). Names of built-in destinations are
    refused, and so is a second registration of a name unless ``replace`` is true.
    """
    if name in BUILTIN_CALLBACK_NAMES:
        raise ValueError(f"{name!r} is a built-in destination; choose another callback name")
    sink_type = custom_sink_type(
        name, logger, required_vars=required_vars, optional_vars=optional_vars
    )
    if registry is not None:
        registry.register(sink_type, replace=replace)
        return sink_type
    with _lock:
        if name in _process_callbacks and not replace:
            raise ValueError(f"a callback named {name!r} is already registered")
        _process_callbacks[name] = sink_type
    return sink_type


def unregister_callback(name: str) -> bool:
    """Remove a callback from the process-wide table; True when it was there."""
    with _lock:
        return _process_callbacks.pop(name, None) is not None


def registered_callbacks() -> list[SinkType]:
    """The callbacks registered process-wide, in registration order."""
    with _lock:
        return list(_process_callbacks.values())
