"""The sink contract and the registry of sink types.

A sink only exports a batch (``emit``) and releases its resources (``aclose``). Batching, retries,
timeouts and counting live in the dispatcher. ``emit`` raises :class:`SinkError` on failure, with
``retryable`` set for errors worth retrying; any other exception counts as a non-retryable failure.

A *sink type* declares its ``callback_vars`` (required, optional, aliases, which are secret) so
settings are validated when written, and builds a sink from the resolved vars when first needed.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import httpx

from ..errors import SettingsError
from ..records import LogRecord
from ..settings import CallbackSpec


@runtime_checkable
class Sink(Protocol):
    """Exports batches of records to one destination."""

    async def emit(self, batch: Sequence[LogRecord]) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class CheckableSink(Sink, Protocol):
    """A sink that can test its credentials/reachability (``POST .../callback/{name}/test``).

    ``check`` raises :class:`SinkError` whose reason says what failed (wrong key, unreachable host).
    """

    async def check(self) -> None: ...


@dataclass(slots=True)
class SinkContext:
    """Shared resources handed to every sink factory.

    ``http`` is the one connection pool shared by all HTTP sinks (Langfuse projects, ...);
    ``team_id`` is the team the destination belongs to (for path layouts such as GCS objects).
    """

    http: httpx.AsyncClient
    team_id: str | None = None
    timeout: float = 10.0


SinkFactory = Callable[[Mapping[str, str], SinkContext], Sink]
VarsValidator = Callable[[Mapping[str, str]], None]


@dataclass(frozen=True, slots=True)
class SinkType:
    """A registered destination kind: its name, declared vars and factory."""

    name: str
    factory: SinkFactory
    required_vars: frozenset[str] = frozenset()
    optional_vars: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> canonical var name
    description: str = ""
    validate_vars: VarsValidator | None = None  # extra checks on literal values (e.g. URL scheme)

    def normalize(self, spec: CallbackSpec, *, param_prefix: str = "callback_vars") -> CallbackSpec:
        """Apply aliases, then reject unknown or missing vars by name."""
        vars_: dict[str, str] = {}
        for name, value in spec.callback_vars.items():
            canonical = self.aliases.get(name, name)
            if canonical in vars_ and name != canonical:
                continue  # the canonical spelling wins over its alias
            vars_[canonical] = value
        allowed = self.required_vars | self.optional_vars
        unknown = sorted(set(vars_) - allowed)
        if unknown:
            raise SettingsError(
                f"{param_prefix}.{unknown[0]}: unknown var for callback {self.name!r}; "
                f"allowed: {sorted(allowed)}",
                param=f"{param_prefix}.{unknown[0]}",
            )
        missing = sorted(v for v in self.required_vars if not vars_.get(v))
        if missing:
            raise SettingsError(
                f"{param_prefix}.{missing[0]}: required by callback {self.name!r} "
                f"(required: {sorted(self.required_vars)})",
                param=f"{param_prefix}.{missing[0]}",
            )
        if self.validate_vars is not None:
            literal = {k: v for k, v in vars_.items() if not v.startswith("os.environ/")}
            self.validate_vars(literal)
        return CallbackSpec(
            callback_name=spec.callback_name, callback_type=spec.callback_type, callback_vars=vars_
        )


class SinkRegistry:
    """Name -> :class:`SinkType`. Thread-safe for registration at import/start-up time."""

    def __init__(self, types: Iterable[SinkType] = ()) -> None:
        self._types: dict[str, SinkType] = {}
        self._lock = threading.Lock()
        for sink_type in types:
            self.register(sink_type)

    def register(self, sink_type: SinkType, *, replace: bool = False) -> None:
        with self._lock:
            if sink_type.name in self._types and not replace:
                raise ValueError(f"a sink type named {sink_type.name!r} is already registered")
            self._types[sink_type.name] = sink_type

    def get(self, name: str) -> SinkType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def normalize(self, spec: CallbackSpec, *, param_prefix: str = "callback_vars") -> CallbackSpec:
        """Validate an entry against its sink type; unknown names list the registered ones."""
        sink_type = self._types.get(spec.callback_name)
        if sink_type is None:
            param = (
                param_prefix.rsplit(".", 1)[0] + ".callback_name"
                if "." in param_prefix
                else ("callback_name")
            )
            raise SettingsError(
                f"{param}: unknown callback {spec.callback_name!r}; registered: {self.names()}",
                param=param,
            )
        return sink_type.normalize(spec, param_prefix=param_prefix)

    def build(self, spec: CallbackSpec, resolved_vars: Mapping[str, str], ctx: SinkContext) -> Sink:
        sink_type = self._types.get(spec.callback_name)
        if sink_type is None:
            raise SettingsError(f"unknown callback {spec.callback_name!r}", param="callback_name")
        return sink_type.factory(resolved_vars, ctx)


AsyncCheck = Callable[[], Awaitable[None]]
