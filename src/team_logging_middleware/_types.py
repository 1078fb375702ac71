"""Small shared value types (frozen, slotted): the caller and the plan for one request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from .settings import CallbackSpec, MessageLogging

DestinationSource = Literal["default", "config", "team", "key"]


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError(f"{type(self).__name__} is read-only: it is shared by every request of a plan")


class PublicList(list[str]):
    """A list that cannot be changed: one plan's view is shared by all of its requests."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce__(self) -> tuple[type[PublicList], tuple[list[str]]]:
        return PublicList, (list(self),)  # copy and pickle build it whole, never item by item


class PublicView(dict[str, Any]):
    """A plan's decision as the downstream app sees it: a read-only dict (JSON-serialisable,
    equal to a plain dict), built once per plan rather than once per request."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    pop = popitem = clear = update = setdefault = _read_only

    def __reduce__(self) -> tuple[type[PublicView], tuple[dict[str, Any]]]:
        return PublicView, (dict(self),)  # copy and pickle build it whole, never item by item


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as the user's resolver says. Never holds the raw API key.

    ``key_id`` is a stable id of the key (e.g. a hash); ``key_logging`` are the key's own
    destination entries (``metadata.logging``); ``key_logging_enabled=False`` turns every
    destination off for the key; ``key_message_logging`` may tighten the team's mode.
    """

    team_id: str | None
    key_id: str | None = None
    key_alias: str | None = None
    user_id: str | None = None
    key_logging: tuple[CallbackSpec, ...] = ()
    key_logging_enabled: bool = True
    key_message_logging: MessageLogging | None = None
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    """One destination of a plan: an entry plus where it came from."""

    spec: CallbackSpec
    source: DestinationSource
    identity: str  # spec.identity(): equal targets share one live sink

    @property
    def name(self) -> str:
        return self.spec.callback_name


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request's record goes and which switches apply (no secrets in ``public()``)."""

    team_id: str | None
    logging_enabled: bool
    cache_enabled: bool = False
    cache_ttl_seconds: int | None = None
    message_logging: MessageLogging = "full"
    success: tuple[Destination, ...] = ()
    failure: tuple[Destination, ...] = ()
    cache_namespace: str = field(default="")
    # Derived once, when the plan is built (a plan serves many requests): not part of equality.
    active: bool = field(init=False, repr=False, compare=False)
    """True when the middleware must capture anything at all (it logs or caches)."""
    _public: PublicView = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "active", self.logs or self.cache_enabled)
        object.__setattr__(
            self,
            "_public",
            PublicView(
                team_id=self.team_id,
                logging_enabled=self.logging_enabled,
                cache_enabled=self.cache_enabled,
                message_logging=self.message_logging,
                success_destinations=PublicList(d.name for d in self.success),
                failure_destinations=PublicList(d.name for d in self.failure),
            ),
        )

    @property
    def logs(self) -> bool:
        """True when at least one destination would receive a record."""
        return self.logging_enabled and bool(self.success or self.failure)

    def destinations_for(self, success: bool) -> tuple[Destination, ...]:
        if not self.logging_enabled:
            return ()
        return self.success if success else self.failure

    def public(self) -> dict[str, Any]:
        """The decision as the downstream app sees it in ``scope["state"]``: no vars, no secrets.

        A read-only :class:`PublicView` built with the plan: every request of the plan gets the
        same object, and none can change what the others see.
        """
        return self._public


NO_LOGGING = Plan(team_id=None, logging_enabled=False)
