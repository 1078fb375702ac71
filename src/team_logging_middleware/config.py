"""The static config file: global default destinations and per-team settings (YAML or JSON).

Accepted shape (every section optional)::

    default_callbacks:              # global defaults: CallbackSpec entries
      - callback_name: jsonl
        callback_type: success_and_failure
        callback_vars: {path: /var/log/llm}

    default_team_settings:          # LiteLLM's form, also accepted under litellm_settings:
      - team_id: my-secret-project
        success_callback: ["langfuse"]
        failure_callback: ["langfuse"]
        langfuse_public_key: os.environ/LANGFUSE_PUB_KEY_1
        langfuse_secret: os.environ/LANGFUSE_PRIVATE_KEY_1   # alias of langfuse_secret_key
        langfuse_host: https://cloud.langfuse.com
      - team_id: gdpr-team          # the richer form (may be mixed with the one above)
        logging_enabled: false
        cache_enabled: true
        cache_ttl_seconds: 600
        message_logging: metadata_only
        inherit_defaults: false
        callbacks:
          - {callback_name: otel, callback_type: success, callback_vars: {...}}

    team_logging:                   # operator settings of this package
      env_allowlist: ["LANGFUSE_*"] # os.environ/ names the admin API may reference
      log_unknown_callers: true     # requests without a caller get the global defaults

In LiteLLM's form each name listed in ``success_callback`` / ``failure_callback`` becomes one
:class:`CallbackSpec` whose vars are the entry's flat vars that the callback's sink type declares
(required, optional or an alias); a name in both lists becomes one ``success_and_failure`` entry.

A LiteLLM proxy config file may be loaded as is: when it has LiteLLM's own top-level sections
(``litellm_settings``, ``model_list``, ...), top-level keys this package does not know are ignored,
and so are LiteLLM's own keys inside ``litellm_settings`` (its global ``success_callback`` reads the
proxy's environment and is not a per-team destination). In a file without them every unknown key
is an error. A key that looks like a misspelling of one of ours is an error in both cases.

Values written ``os.environ/NAME`` stay references; they are resolved only when a destination is
built. The operator wrote this file, so any variable name may be referenced. Error messages name
the entry and the field, never a value.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigFileError, SettingsError
from .settings import MASK, CallbackSpec, CallbackType, TeamSettings, is_env_ref, is_secret_var
from .sinks.base import SinkRegistry

__all__ = ["StaticConfig"]

_LITELLM_TOP_LEVEL = frozenset(
    {
        "litellm_settings",
        "model_list",
        "general_settings",
        "router_settings",
        "environment_variables",
        "callback_settings",
        "guardrails",
        "credential_list",
        "files_settings",
        "assistant_settings",
        "finetune_settings",
        "mcp_servers",
        "include",
    }
)
_OUR_TOP_LEVEL = ("default_callbacks", "default_team_settings", "team_logging")
_OPTIONS = ("env_allowlist", "log_unknown_callers")
_SWITCHES = (
    "logging_enabled",
    "cache_enabled",
    "cache_ttl_seconds",
    "message_logging",
    "inherit_defaults",
)
_TEAM_FIELDS = ("team_id", "success_callback", "failure_callback", "callbacks", *_SWITCHES)


def _close_match(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.8)
    return matches[0] if matches else None


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _scrub(message: str, values: Iterable[str]) -> str:
    """Replace literal secret values in a message; a plugin's validator might echo one."""
    for value in sorted(set(values), key=len, reverse=True):
        if value:
            message = message.replace(value, MASK)
    return message


@dataclass(frozen=True, slots=True)
class StaticConfig:
    """The operator's static configuration, validated against a sink registry.

    ``defaults`` are the global default destinations (``default_callbacks``); ``teams`` maps a
    team id to its settings from ``default_team_settings`` (API-managed settings for the same team
    replace the entry entirely). ``env_allowlist`` (None: the package default) and
    ``log_unknown_callers`` come from the optional ``team_logging:`` section.
    """

    defaults: tuple[CallbackSpec, ...] = ()
    teams: Mapping[str, TeamSettings] = field(default_factory=lambda: MappingProxyType({}))
    env_allowlist: tuple[str, ...] | None = None
    log_unknown_callers: bool = True

    @classmethod
    def empty(cls) -> StaticConfig:
        """No defaults, no teams."""
        return cls()

    @classmethod
    def load(cls, path: str | os.PathLike[str], registry: SinkRegistry) -> StaticConfig:
        """Read and validate a YAML (or JSON) file; raises :class:`ConfigFileError`."""
        where = os.fspath(path)
        try:
            with open(where, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigFileError(
                f"{where}: cannot read the config file ({exc.strerror or type(exc).__name__})"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # str(exc) quotes the offending line, which may hold a secret: keep position + problem.
            raise ConfigFileError(f"{where}: invalid YAML{_yaml_position(exc)}") from None
        return cls._parse(data, registry, origin=f"{where}: ")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, registry: SinkRegistry) -> StaticConfig:
        """Validate already parsed data (e.g. from another config system)."""
        return cls._parse(data, registry, origin="")

    @classmethod
    def _parse(cls, data: object, registry: SinkRegistry, *, origin: str) -> StaticConfig:
        try:
            return _Parser(registry).parse(data)
        except ConfigFileError as exc:
            if not origin:
                raise
            raise ConfigFileError(origin + exc.message, param=exc.param) from None


def _yaml_position(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        out = ""
        if exc.problem_mark is not None:
            out = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        if exc.problem:
            out += f": {exc.problem}"
        return out
    return ""


class _Parser:
    """Turns the parsed document into a :class:`StaticConfig`; every error names its location."""

    def __init__(self, registry: SinkRegistry) -> None:
        self.registry = registry

    def parse(self, data: object) -> StaticConfig:
        if data is None:
            return StaticConfig.empty()
        if not isinstance(data, Mapping):
            raise ConfigFileError(
                f"the config file must be a mapping at the top level (got {_type_name(data)})"
            )
        is_litellm = any(key in _LITELLM_TOP_LEVEL for key in data)
        self._check_keys(
            data, _OUR_TOP_LEVEL, where="top level", strict=not is_litellm, extra=_LITELLM_TOP_LEVEL
        )

        team_entries: object = None
        team_loc = "default_team_settings"
        if "default_team_settings" in data:
            team_entries = data["default_team_settings"]
        nested = data.get("litellm_settings")
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise ConfigFileError(
                    f"litellm_settings: must be a mapping (got {_type_name(nested)})",
                    param="litellm_settings",
                )
            # LiteLLM keeps many of its own settings here; only ours are read.
            self._check_keys(
                nested, ("default_team_settings",), where="litellm_settings", strict=False
            )
            if "default_team_settings" in nested:
                if "default_team_settings" in data:
                    raise ConfigFileError(
                        "default_team_settings: given both at the top level and under "
                        "litellm_settings; keep one",
                        param="default_team_settings",
                    )
                team_entries = nested["default_team_settings"]
                team_loc = "litellm_settings.default_team_settings"

        defaults = self._defaults(data.get("default_callbacks"))
        teams = self._teams(team_entries, team_loc)
        env_allowlist, log_unknown = self._options(data.get("team_logging"))
        return StaticConfig(
            defaults=defaults,
            teams=MappingProxyType(teams),
            env_allowlist=env_allowlist,
            log_unknown_callers=log_unknown,
        )

    # -- sections --------------------------------------------------------------------------

    def _check_keys(
        self,
        mapping: Mapping[Any, Any],
        allowed: Iterable[str],
        *,
        where: str,
        strict: bool,
        extra: Iterable[str] = (),
        param_prefix: str = "",
    ) -> None:
        allowed = tuple(allowed)
        known = set(allowed) | set(extra)
        for key in mapping:
            if not isinstance(key, str):
                raise ConfigFileError(
                    f"{where}: keys must be strings (got {_type_name(key)})",
                    param=param_prefix.rstrip(".") or None,
                )
            if key in known:
                continue
            suggestion = _close_match(key, allowed)
            if suggestion is None and not strict:
                continue
            hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
            raise ConfigFileError(
                f"{where}: unknown field {key!r}{hint}; allowed: {sorted(allowed)}",
                param=f"{param_prefix}{key}",
            )

    def _defaults(self, raw: object) -> tuple[CallbackSpec, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise ConfigFileError(
                f"default_callbacks: must be a list of callback entries (got {_type_name(raw)})",
                param="default_callbacks",
            )
        specs = [self._spec(item, f"default_callbacks[{i}]") for i, item in enumerate(raw)]
        return tuple(specs)

    def _options(self, raw: object) -> tuple[tuple[str, ...] | None, bool]:
        if raw is None:
            return None, True
        if not isinstance(raw, Mapping):
            raise ConfigFileError(
                f"team_logging: must be a mapping (got {_type_name(raw)})", param="team_logging"
            )
        self._check_keys(
            raw, _OPTIONS, where="team_logging", strict=True, param_prefix="team_logging."
        )
        allowlist: tuple[str, ...] | None = None
        if "env_allowlist" in raw:
            value = raw["env_allowlist"]
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ConfigFileError(
                    "team_logging.env_allowlist: must be a list of glob patterns (strings)",
                    param="team_logging.env_allowlist",
                )
            allowlist = tuple(value)
        log_unknown = raw.get("log_unknown_callers", True)
        if not isinstance(log_unknown, bool):
            raise ConfigFileError(
                "team_logging.log_unknown_callers: must be true or false "
                f"(got {_type_name(log_unknown)})",
                param="team_logging.log_unknown_callers",
            )
        return allowlist, log_unknown

    def _teams(self, raw: object, loc: str) -> dict[str, TeamSettings]:
        if raw is None:
            return {}
        if not isinstance(raw, list):
            raise ConfigFileError(
                f"{loc}: must be a list of team entries (got {_type_name(raw)})", param=loc
            )
        teams: dict[str, TeamSettings] = {}
        first_index: dict[str, int] = {}
        for index, entry in enumerate(raw):
            settings = self._team(entry, f"{loc}[{index}]")
            if settings.team_id in teams:
                raise ConfigFileError(
                    f"{loc}[{index}] (team_id {settings.team_id!r}): duplicate team_id, "
                    f"already defined by {loc}[{first_index[settings.team_id]}]",
                    param=f"{loc}[{index}].team_id",
                )
            teams[settings.team_id] = settings
            first_index[settings.team_id] = index
        return teams

    # -- one team entry --------------------------------------------------------------------

    def _team(self, entry: object, loc: str) -> TeamSettings:
        if not isinstance(entry, Mapping):
            raise ConfigFileError(
                f"{loc}: must be a mapping with a team_id (got {_type_name(entry)})", param=loc
            )
        team_id = entry.get("team_id")
        if team_id is None:
            raise ConfigFileError(f"{loc}: missing field 'team_id'", param=f"{loc}.team_id")
        if not isinstance(team_id, str) or not team_id:
            raise ConfigFileError(
                f"{loc}: team_id must be a non-empty string (got {_type_name(team_id)})",
                param=f"{loc}.team_id",
            )
        where = f"{loc} (team_id {team_id!r})"
        # Literal secret values of this entry, scrubbed from any message as a second line of
        # defence (messages are built from names, but a plugin's validator could echo a value).
        secrets = [
            v
            for k, v in entry.items()
            if isinstance(k, str) and isinstance(v, str) and is_secret_var(k) and not is_env_ref(v)
        ]
        try:
            return self._team_settings(entry, team_id, loc, where)
        except ConfigFileError as exc:
            raise ConfigFileError(_scrub(exc.message, secrets), param=exc.param) from None

    def _team_settings(
        self, entry: Mapping[Any, Any], team_id: str, loc: str, where: str
    ) -> TeamSettings:
        success = self._names(entry, "success_callback", loc, where)
        failure = self._names(entry, "failure_callback", loc, where)
        listed = list(dict.fromkeys(success + failure))

        # Which flat vars each listed callback claims (its declared vars and their aliases).
        claims: dict[str, list[str]] = {}
        for name in listed:
            sink_type = self.registry.get(name)
            if sink_type is None:
                field_name = "success_callback" if name in success else "failure_callback"
                raise ConfigFileError(
                    f"{where}: {field_name}: unknown callback {name!r}; "
                    f"registered: {self.registry.names()}",
                    param=f"{loc}.{field_name}",
                )
            declared = (
                set(sink_type.required_vars) | set(sink_type.optional_vars) | set(sink_type.aliases)
            )
            for var in declared:
                claims.setdefault(var, []).append(name)

        allowed = (*_TEAM_FIELDS, *sorted(claims))
        # A var of a callback the entry does not list is most often the symptom of a misspelt
        # success_callback key, so other unknown fields are reported first.
        foreign = {key: self._declaring(key) for key in entry if key not in allowed}
        foreign = {key: owners for key, owners in foreign.items() if owners}
        self._check_keys(
            {k: v for k, v in entry.items() if k not in foreign},
            allowed,
            where=where,
            strict=True,
            param_prefix=f"{loc}.",
        )
        for key, owners in foreign.items():
            raise ConfigFileError(
                f"{where}: {key!r} is a var of callback {owners[0]!r}, which this entry does "
                "not list in success_callback or failure_callback",
                param=f"{loc}.{key}",
            )

        vars_by_callback: dict[str, dict[str, str]] = {name: {} for name in listed}
        for key, value in entry.items():
            if key not in claims:
                continue
            if not isinstance(value, str):
                raise ConfigFileError(
                    f"{where}: {key}: must be a string (got {_type_name(value)})",
                    param=f"{loc}.{key}",
                )
            for name in claims[key]:
                vars_by_callback[name][key] = value

        callbacks: list[CallbackSpec] = []
        for name in listed:
            callback_type: CallbackType = "success"
            if name in failure:
                callback_type = "success_and_failure" if name in success else "failure"
            spec = CallbackSpec(
                callback_name=name,
                callback_type=callback_type,
                callback_vars=vars_by_callback[name],
            )
            callbacks.append(self._normalize_flat(spec, where, loc))

        rich = entry.get("callbacks")
        if rich is not None:
            if not isinstance(rich, list):
                raise ConfigFileError(
                    f"{where}: callbacks: must be a list of callback entries "
                    f"(got {_type_name(rich)})",
                    param=f"{loc}.callbacks",
                )
            for i, item in enumerate(rich):
                callbacks.append(self._spec(item, f"{loc}.callbacks[{i}]", where=where))

        fields: dict[str, Any] = {"team_id": team_id, "callbacks": callbacks}
        fields.update({k: entry[k] for k in _SWITCHES if k in entry})
        try:
            return TeamSettings.model_validate(fields, strict=True)
        except ValidationError as exc:
            raise _from_validation(exc, where, loc, fields=TeamSettings.model_fields) from None

    def _declaring(self, var: object) -> list[str]:
        """Registered callbacks that declare ``var`` (for a helpful error)."""
        out: list[str] = []
        for name in self.registry.names():
            sink_type = self.registry.get(name)
            if sink_type is not None and (
                var in sink_type.required_vars
                or var in sink_type.optional_vars
                or var in sink_type.aliases
            ):
                out.append(name)
        return out

    def _names(self, entry: Mapping[Any, Any], key: str, loc: str, where: str) -> list[str]:
        raw = entry.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
            raise ConfigFileError(
                f'{where}: {key}: must be a list of callback names, e.g. ["langfuse"]',
                param=f"{loc}.{key}",
            )
        return list(dict.fromkeys(raw))

    # -- one callback entry ----------------------------------------------------------------

    def _spec(self, item: object, loc: str, *, where: str | None = None) -> CallbackSpec:
        """Validate one ``CallbackSpec`` mapping found at ``loc``.

        ``where`` is the enclosing team entry's label when the spec sits inside one; messages
        then read ``<where>: callbacks[i].<field>: ...``.
        """
        header = where if where is not None else loc
        sub = loc.rsplit(".", 1)[1] + "." if where is not None else ""
        if not isinstance(item, Mapping):
            raise ConfigFileError(
                f"{header}: {sub}must be a mapping with callback_name, callback_type and "
                f"callback_vars (got {_type_name(item)})",
                param=loc,
            )
        raw_vars = item.get("callback_vars")
        secrets = (
            [
                v
                for k, v in raw_vars.items()
                if isinstance(k, str) and isinstance(v, str) and is_secret_var(k)
            ]
            if isinstance(raw_vars, Mapping)
            else []
        )
        try:
            spec = CallbackSpec.model_validate(item, strict=True)
        except ValidationError as exc:
            err = _from_validation(exc, header, loc, sub=sub, fields=CallbackSpec.model_fields)
            raise ConfigFileError(_scrub(err.message, secrets), param=err.param) from None
        try:
            return self.registry.normalize(spec, param_prefix="callback_vars")
        except ValueError as exc:  # SettingsError, or a plugin validator's plain ValueError
            detail, param = _settings_error_parts(exc)
            message = _scrub(f"{header}: {sub}{detail}", secrets)
            raise ConfigFileError(message, param=f"{loc}.{param or 'callback_vars'}") from None

    def _normalize_flat(self, spec: CallbackSpec, where: str, loc: str) -> CallbackSpec:
        """Validate a spec built from an entry's flat vars; a var is a field of the entry."""
        try:
            return self.registry.normalize(spec, param_prefix="callback_vars")
        except ValueError as exc:
            detail, param = _settings_error_parts(exc)
            detail = detail.removeprefix("callback_vars.")
            param = (param or "").removeprefix("callback_vars.")
            raise ConfigFileError(
                f"{where}: {detail}", param=f"{loc}.{param}".rstrip(".")
            ) from None


def _settings_error_parts(exc: ValueError) -> tuple[str, str | None]:
    if isinstance(exc, SettingsError):
        return exc.message, exc.param
    return str(exc), None


def _from_validation(
    exc: ValidationError,
    where: str,
    loc: str,
    *,
    sub: str = "",
    fields: Iterable[str] = (),
) -> ConfigFileError:
    """A pydantic error as a located message, without the offending input (it may be a secret)."""
    first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    path = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        detail = f"missing field {path!r}"
    elif first["type"] == "extra_forbidden":
        detail = f"unknown field {path!r}"
        if len(first["loc"]) == 1 and fields:
            detail += f"; allowed: {sorted(fields)}"
    else:
        detail = f"{path}: {first['msg']}"
    return ConfigFileError(f"{where}: {sub}{detail}", param=f"{loc}.{path}" if path else loc)
