"""Settings models: what a team or a key asks for, validated at the edges.

``CallbackSpec`` is one logging destination entry, exactly in the seed's shape
(``callback_name``, ``callback_type``, ``callback_vars``). Each entry keeps its *own* vars: entries
are never merged into one flat dict, so a team and its key can log to two Langfuse projects.

Values of the form ``os.environ/NAME`` are kept as references in the store and resolved only when
the destination is built (:func:`resolve_vars`); they are never echoed back resolved.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import SettingsError

CallbackType = Literal["success", "failure", "success_and_failure"]
MessageLogging = Literal["full", "metadata_only"]
CALLBACK_TYPES: tuple[str, ...] = ("success", "failure", "success_and_failure")
MESSAGE_LOGGING_MODES: tuple[str, ...] = ("full", "metadata_only")

ENV_PREFIX = "os.environ/"
DEFAULT_ENV_ALLOWLIST: tuple[str, ...] = ("LANGFUSE_*", "OTEL_*", "GCS_*")
MAX_VAR_LENGTH = 8192
MAX_CALLBACKS = 64
MASK = "****"


class CallbackSpec(BaseModel):
    """One destination entry: which sink, for which outcomes, with which vars."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    callback_name: str = Field(min_length=1, max_length=128)
    callback_type: CallbackType = "success"
    callback_vars: dict[str, str] = Field(default_factory=dict)

    @field_validator("callback_vars")
    @classmethod
    def _bounded_vars(cls, value: dict[str, str]) -> dict[str, str]:
        for name, var in value.items():
            if len(var) > MAX_VAR_LENGTH:
                raise ValueError(f"callback_vars.{name} is longer than {MAX_VAR_LENGTH} characters")
        return value

    def receives(self, success: bool) -> bool:
        """Whether this entry gets a record of the given outcome."""
        if self.callback_type == "success_and_failure":
            return True
        return (self.callback_type == "success") == success

    def identity(self) -> str:
        """A stable id of the *target* (name + vars), used to serve exact duplicates once."""
        digest = hashlib.sha256(self.callback_name.encode())
        for key in sorted(self.callback_vars):
            digest.update(b"\0" + key.encode() + b"\0" + self.callback_vars[key].encode())
        return digest.hexdigest()[:32]

    def masked(self) -> dict[str, Any]:
        """The entry as an API may return it: secret values masked."""
        return {
            "callback_name": self.callback_name,
            "callback_type": self.callback_type,
            "callback_vars": mask_vars(self.callback_vars),
        }


class TeamSettings(BaseModel):
    """Everything stored for one team through the admin API (or the static config file)."""

    model_config = ConfigDict(extra="forbid")

    team_id: str = Field(min_length=1, max_length=256)
    callbacks: list[CallbackSpec] = Field(default_factory=list, max_length=MAX_CALLBACKS)
    logging_enabled: bool = True
    cache_enabled: bool = False
    cache_ttl_seconds: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)
    message_logging: MessageLogging = "full"
    inherit_defaults: bool = True


class TeamSettingsPatch(BaseModel):
    """Body of ``PATCH /team/{team_id}/settings``: only the switches, every field optional.

    Strict: ``0``, ``0.0`` or ``"false"`` are refused for a boolean (an API body says what it
    means; a silently coerced switch is how a GDPR kill switch gets flipped by accident).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    logging_enabled: bool | None = None
    cache_enabled: bool | None = None
    cache_ttl_seconds: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)
    message_logging: MessageLogging | None = None
    inherit_defaults: bool | None = None


class KeyLoggingSettings(BaseModel):
    """The logging part of a key's ``metadata``, as the seed's key-based logging writes it.

    ``metadata.logging`` is the list of entries; ``metadata.logging_enabled: false`` turns every
    destination off for requests made with the key; ``metadata.message_logging`` may tighten (never
    loosen) the team's mode.
    """

    model_config = ConfigDict(extra="ignore")

    logging: list[CallbackSpec] = Field(default_factory=list, max_length=MAX_CALLBACKS)
    logging_enabled: bool = True
    message_logging: MessageLogging | None = None


def is_env_ref(value: str) -> bool:
    return value.startswith(ENV_PREFIX)


def env_ref_name(value: str) -> str:
    return value[len(ENV_PREFIX) :]


def check_env_refs(
    spec: CallbackSpec,
    *,
    allowed: bool,
    allowlist: Iterable[str] = DEFAULT_ENV_ALLOWLIST,
    param_prefix: str = "callback_vars",
) -> None:
    """Refuse ``os.environ/`` references the writer may not use.

    Only the static config file and master-key callers may use them (``allowed``), and only for
    names matching the operator's allowlist of glob patterns.
    """
    patterns = tuple(allowlist)
    for name, value in spec.callback_vars.items():
        if not is_env_ref(value):
            continue
        param = f"{param_prefix}.{name}"
        if not allowed:
            raise SettingsError(
                f"{param}: os.environ/ references may only be set with the master key "
                "or in the static config file",
                param=param,
            )
        env_name = env_ref_name(value)
        if not env_name or not any(fnmatch.fnmatchcase(env_name, p) for p in patterns):
            raise SettingsError(
                f"{param}: environment variable {env_name!r} is not in the allowlist "
                f"{list(patterns)}; the operator can allow it with the env_allowlist "
                "setting (TLM_ENV_ALLOWLIST for the example gateway)",
                param=param,
            )


def resolve_vars(
    callback_vars: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Resolve ``os.environ/NAME`` references; raises ``SettingsError`` for an unset variable."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name, value in callback_vars.items():
        if is_env_ref(value):
            env_name = env_ref_name(value)
            if env_name not in env:
                raise SettingsError(
                    f"callback_vars.{name}: environment variable {env_name!r} is not set",
                    param=f"callback_vars.{name}",
                )
            out[name] = env[env_name]
        else:
            out[name] = value
    return out


_PUBLIC_SUFFIXES = ("public_key",)
_SECRET_MARKERS = ("secret", "password", "token", "service_account", "headers", "credential")


def is_secret_var(name: str) -> bool:
    """Whether a callback var holds a secret (and must never be returned in full or logged)."""
    lowered = name.lower()
    if lowered.endswith(_PUBLIC_SUFFIXES):
        return False
    if any(marker in lowered for marker in _SECRET_MARKERS):
        return True
    return lowered.endswith("_key") or lowered == "key"


def mask_value(value: str) -> str:
    """Mask a secret: an ``os.environ/`` reference stays (it names, not holds, the secret)."""
    if is_env_ref(value):
        return value
    if len(value) >= 16:
        return value[:3] + MASK + value[-2:]
    return MASK


def mask_vars(callback_vars: Mapping[str, str]) -> dict[str, str]:
    return {
        name: (mask_value(value) if is_secret_var(name) else value)
        for name, value in callback_vars.items()
    }


def secret_values(callback_vars: Mapping[str, str]) -> list[str]:
    """The literal secret values of an entry (for log scrubbing)."""
    return [v for k, v in callback_vars.items() if is_secret_var(k) and v and not is_env_ref(v)]
