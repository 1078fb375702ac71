"""The admin sub-app: manage each team's logging destinations over HTTP.

``create_admin_app(team_logging, master_key=...)`` returns a Starlette app to mount (at the
root, so the routes are exactly LiteLLM's ``/team/{team_id}/callback``,
``/team/{team_id}/disable_logging`` ...). Every error, whatever produced it, has one JSON shape::

    {"error": {"message": "...", "type": "...", "param": "callback_vars.langfuse_host" | null}}

Trust model:

* ``Authorization: Bearer <master key>`` may manage every team and may write ``os.environ/``
  references whose names match ``team_logging.env_allowlist``.
* An optional ``authorize(request, team_id)`` hook lets the gateway admit *delegated* principals
  (team admins): they see and change only the teams they are granted (403 otherwise), never write
  ``os.environ/`` references (unless ``allow_env_refs_for_delegated``), and, when
  ``delegated_host_allowlist`` is set, only point destinations at hosts it matches.
* Destinations that act with the gateway host's own credentials are the operator's: a delegated
  principal may never set ``gcs_path_service_account`` (a file path on the gateway host: it
  would pick which key file the gateway reads and writes with), and may add ``gcs_bucket``
  destinations -- which then write with the operator's default Google Cloud credentials -- only
  when the operator says so with ``allow_delegated_gcs=True``.
* Credentials are checked before anything is looked up, so a 401 says nothing about which teams
  exist. Secrets (vars that :func:`~team_logging_middleware.settings.is_secret_var` flags) are
  masked in every response and never logged; log lines name team ids and callback names only.

A rejected write leaves the store exactly as it was; a write that the store could not apply
answers 503 and says so.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import hmac
import json
import logging
import traceback
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .errors import SettingsError, SinkError, StoreUnavailableError
from .settings import (
    CALLBACK_TYPES,
    MASK,
    MAX_CALLBACKS,
    CallbackSpec,
    TeamSettings,
    TeamSettingsPatch,
    check_env_refs,
    is_env_ref,
    is_secret_var,
    mask_value,
    secret_values,
)

if TYPE_CHECKING:
    from .runtime import TeamLogging

__all__ = [
    "AdminAccess",
    "AdminError",
    "AuthorizeHook",
    "Principal",
    "build_openapi",
    "create_admin_app",
    "error_response",
    "read_json_body",
    "read_json_object",
    "refusal_response",
    "unexpected_error_response",
    "validation_error",
]

logger = logging.getLogger("team_logging_middleware.admin")

MAX_TEAM_ID_LENGTH = 256
# Callbacks that act with the gateway host's own identity, and their vars that name host files.
HOST_CREDENTIAL_CALLBACKS: Mapping[str, tuple[str, ...]] = {
    "gcs_bucket": ("gcs_path_service_account",),
}
MAX_CALLBACK_NAME_LENGTH = 128
MAX_JSON_DEPTH = 32
CHECK_TIMEOUT = 30.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024


# -- principals and errors ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling the admin API.

    ``subject`` names the caller in log lines (never a credential). ``teams`` are the team ids a
    delegated principal may read and change. ``is_master`` grants everything the master key grants
    (an ``authorize`` hook may return one for operators it authenticates its own way).
    """

    subject: str
    teams: frozenset[str] = frozenset()
    is_master: bool = False

    def may_manage(self, team_id: str) -> bool:
        return self.is_master or team_id in self.teams


MASTER = Principal(subject="master-key", is_master=True)

AuthorizeHook = Callable[[Request, "str | None"], Awaitable["Principal | None"]]
"""``async authorize(request, team_id) -> Principal | None``.

Called when the request does not carry the master key. ``team_id`` is the team the route concerns
(None for team-less routes such as ``/health``). Return None to answer 401.
"""


_DEFAULT_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    409: "conflict_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    500: "internal_error",
    503: "store_unavailable",
}


class AdminError(Exception):
    """An error answer of the admin API (or the example gateway): status, message, type, param.

    The message is shown to the client as is: it must not contain a secret.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "error")
        self.param = param
        self.headers = dict(headers or {})


class _JSON(JSONResponse):
    """Compact JSON that cannot fail to encode (a lone surrogate falls back to ``\\u`` escapes)."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The one error shape: ``{"error": {"message", "type", "param"}}``."""
    return _JSON(
        {
            "error": {
                "message": message,
                "type": type or _DEFAULT_TYPES.get(status, "error"),
                "param": param,
            }
        },
        status_code=status,
        headers=dict(headers) if headers else None,
    )


def _ok(content: Any) -> Response:
    return _JSON(content)


def _loc_to_param(loc: Iterable[int | str], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def validation_error(exc: ValidationError, *, prefix: str = "") -> AdminError:
    """A 422 naming the first offending field (pydantic's message never includes the input)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return AdminError(422, "the request body has the wrong shape", type="validation_error")
    first = errors[0]
    param = _loc_to_param(first.get("loc", ()), prefix) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    text = f"{param}: {message}{more}" if param else f"{message}{more}"
    return AdminError(422, text, type="validation_error", param=param)


def settings_error(exc: SettingsError) -> AdminError:
    return AdminError(400, exc.message, type="invalid_request_error", param=exc.param)


def refusal_response(exc: AdminError | ValidationError | SettingsError) -> Response:
    """The error answer for a request refused as it stands (a 4xx in the one error shape)."""
    if isinstance(exc, ValidationError):
        exc = validation_error(exc)
    elif isinstance(exc, SettingsError):
        exc = settings_error(exc)
    return error_response(
        exc.status, exc.message, type=exc.type, param=exc.param, headers=exc.headers
    )


# -- request bodies --------------------------------------------------------------------------


def _is_json_media_type(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def _check_json_value(value: Any, depth: int = 0) -> None:
    """Refuse nesting deeper than any admin body needs, and strings that cannot be stored."""
    if depth > MAX_JSON_DEPTH:
        raise AdminError(
            400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", type="invalid_json"
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AdminError(
                400, "JSON string holds an unpaired surrogate", type="invalid_json"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(key, depth + 1)
            _check_json_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_value(item, depth + 1)


async def read_json_body(request: Request, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """Read and parse a JSON body, enforcing ``max_bytes`` while the stream is read.

    415 for a non-JSON content type, 413 as soon as the body (or its declared length) passes the
    limit, 400 for malformed or absurdly nested JSON. A missing content type is accepted.
    """
    content_type = request.headers.get("content-type")
    if content_type and not _is_json_media_type(content_type):
        raise AdminError(
            415,
            "the request body must be JSON (Content-Type: application/json)",
            type="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise AdminError(
            413, f"request body is larger than {max_bytes} bytes", type="request_too_large"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise AdminError(
                413, f"request body is larger than {max_bytes} bytes", type="request_too_large"
            )
        if chunk:
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise AdminError(
            400, "the request body is empty; a JSON object is expected", type="invalid_json"
        )
    try:
        value = json.loads(raw)
    except RecursionError:
        raise AdminError(400, "JSON nested too deeply", type="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        where = f" at position {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise AdminError(
            400, f"the request body is not valid JSON{where}", type="invalid_json"
        ) from None
    _check_json_value(value)
    return value


async def read_json_object(
    request: Request, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> dict[str, Any]:
    """:func:`read_json_body`, and a 422 unless the body is a JSON object."""
    value = await read_json_body(request, max_bytes)
    if not isinstance(value, dict):
        raise AdminError(422, "the request body must be a JSON object", type="validation_error")
    return value


# -- access control ---------------------------------------------------------------------------

_HOST_VAR_SUFFIXES = ("_host", "_endpoint", "_url")
_HOST_VAR_NAMES = frozenset({"host", "endpoint", "url"})


def _is_host_var(name: str) -> bool:
    lowered = name.lower()
    return lowered in _HOST_VAR_NAMES or lowered.endswith(_HOST_VAR_SUFFIXES)


def bearer_credential(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class AdminAccess:
    """Who may manage what, and which settings a principal may write.

    Shared by the admin app and a gateway's own management routes (the example gateway's
    ``/key/generate`` uses it), so both apply the same rules.
    """

    def __init__(
        self,
        team_logging: TeamLogging,
        *,
        master_key: str | None,
        authorize: AuthorizeHook | None = None,
        allow_env_refs_for_delegated: bool = False,
        delegated_host_allowlist: Sequence[str] | None = None,
        allow_delegated_gcs: bool = False,
    ) -> None:
        self.team_logging = team_logging
        # Only a digest of the master key is kept: comparing fixed-length digests with
        # compare_digest leaks neither the key's content nor its length through timing.
        self._master_digest = hashlib.sha256(master_key.encode()).digest() if master_key else None
        self._authorize = authorize
        self.allow_env_refs_for_delegated = allow_env_refs_for_delegated
        self.allow_delegated_gcs = allow_delegated_gcs
        self.delegated_host_allowlist: tuple[str, ...] | None = (
            tuple(p.lower() for p in delegated_host_allowlist)
            if delegated_host_allowlist is not None
            else None
        )

    def is_master_key(self, token: str | None) -> bool:
        if token is None or self._master_digest is None:
            return False
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._master_digest)

    async def authenticate(self, request: Request, team_id: str | None = None) -> Principal:
        """The caller's principal, or 401; 403 when it may not manage ``team_id``."""
        principal: Principal | None = None
        if self.is_master_key(bearer_credential(request)):
            principal = MASTER
        elif self._authorize is not None:
            try:
                principal = await self._authorize(request, team_id)
            except AdminError:
                raise
            except Exception as exc:
                # A broken hook must fail closed; its message may hold credentials, so only the
                # exception type is logged.
                logger.error("admin authorize hook failed: %s", type(exc).__name__)
                raise AdminError(
                    500, "internal error while checking credentials", type="internal_error"
                ) from None
        if principal is None:
            raise AdminError(
                401,
                "missing or invalid credentials: send Authorization: Bearer <admin key>",
                type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if team_id is not None and not principal.may_manage(team_id):
            raise AdminError(
                403,
                "these credentials may not manage this team",
                type="permission_error",
                param="team_id",
            )
        return principal

    def may_use_env_refs(self, principal: Principal) -> bool:
        return principal.is_master or self.allow_env_refs_for_delegated

    def validate_spec(
        self,
        spec: CallbackSpec,
        principal: Principal,
        *,
        param_prefix: str = "callback_vars",
    ) -> CallbackSpec:
        """Normalize an entry with the registry, then apply the credential, env-ref and host
        policies."""
        try:
            normalized = self.team_logging.registry.normalize(spec, param_prefix=param_prefix)
        except SettingsError as exc:
            raise _reprefixed(exc, param_prefix) from None
        except ValueError as exc:
            # A plugin's validator may raise a plain ValueError; its text could echo a value.
            detail = _scrub(str(exc), secret_values(spec.callback_vars))
            raise SettingsError(f"{param_prefix}: {detail}", param=param_prefix) from None
        if not principal.is_master:
            self._check_host_credentials(normalized, param_prefix)
        check_env_refs(
            normalized,
            allowed=self.may_use_env_refs(principal),
            allowlist=self.team_logging.env_allowlist,
            param_prefix=param_prefix,
        )
        if not principal.is_master and self.delegated_host_allowlist is not None:
            self._check_hosts(normalized, param_prefix)
        return normalized

    def _check_host_credentials(self, spec: CallbackSpec, param_prefix: str) -> None:
        """Refuse a delegated write that would make the gateway act with its host's identity.

        ``gcs_path_service_account`` names a file on the gateway host: a team admin choosing it
        could make the gateway read any file it can open as a key, or write with another
        tenant's service account. Without it, ``gcs_bucket`` writes with the operator's default
        credentials, which may reach buckets the team admin has no right to.
        """
        host_vars = HOST_CREDENTIAL_CALLBACKS.get(spec.callback_name)
        if host_vars is None:
            return
        for name in host_vars:
            if name in spec.callback_vars:
                param = f"{param_prefix}.{name}"
                raise SettingsError(
                    f"{param}: only the operator (master key) can set {name}: it names a file "
                    "on the gateway host",
                    param=param,
                )
        if spec.callback_name == "gcs_bucket" and not self.allow_delegated_gcs:
            param = (
                param_prefix.rsplit(".", 1)[0] + ".callback_name"
                if "." in param_prefix
                else "callback_name"
            )
            raise SettingsError(
                f"{param}: only the operator (master key) can add gcs_bucket destinations: "
                "they write with the gateway's default Google Cloud credentials. The operator "
                "can allow team admins to add them with create_admin_app(..., "
                "allow_delegated_gcs=True) (TLM_ALLOW_DELEGATED_GCS=1 for the example gateway)",
                param=param,
            )

    def _check_hosts(self, spec: CallbackSpec, param_prefix: str) -> None:
        patterns = self.delegated_host_allowlist or ()
        for name, value in spec.callback_vars.items():
            if not _is_host_var(name) or not value or is_env_ref(value):
                continue
            param = f"{param_prefix}.{name}"
            try:
                host = urlsplit(value if "://" in value else "//" + value).hostname
            except ValueError:
                host = None
            if not host:
                raise SettingsError(f"{param}: not a URL with a host name", param=param)
            if not any(fnmatch.fnmatchcase(host, p) for p in patterns):
                raise SettingsError(
                    f"{param}: host {host!r} is not allowed for team admins; "
                    f"allowed hosts: {list(patterns)}",
                    param=param,
                )


def _reprefixed(exc: SettingsError, param_prefix: str) -> SettingsError:
    """Sink validators name vars ``callback_vars.x``; inside key metadata they sit deeper."""
    base = "callback_vars"
    if param_prefix == base or not exc.param or not exc.param.startswith(base):
        return exc
    param = param_prefix + exc.param[len(base) :]
    message = exc.message
    if message.startswith(exc.param):
        message = param + message[len(exc.param) :]
    return SettingsError(message, param=param)


# -- response models (also the OpenAPI document) ------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Model):
    message: str
    type: str
    param: str | None


class ErrorResponse(_Model):
    """Every error answer."""

    error: ErrorDetail


class MaskedCallback(_Model):
    """A stored destination entry with its secret vars masked."""

    callback_name: str
    callback_type: Literal["success", "failure", "success_and_failure"]
    callback_vars: dict[str, str]


class CallbackWriteData(MaskedCallback):
    team_id: str


class CallbackWriteResponse(_Model):
    status: Literal["success"]
    data: CallbackWriteData


SettingsSource = Literal["api", "config", "none"]


class TeamCallbacksData(_Model):
    team_id: str
    success_callbacks: list[str]
    failure_callbacks: list[str]
    callback_vars: dict[str, dict[str, str]]
    callbacks: list[MaskedCallback]
    logging_enabled: bool
    settings_source: SettingsSource
    effective_destinations: list[dict[str, Any]]


class TeamCallbacksResponse(_Model):
    status: Literal["success"]
    data: TeamCallbacksData


class LoggingSwitchData(_Model):
    team_id: str
    success_callbacks: list[str]
    failure_callbacks: list[str]


class LoggingSwitchResponse(_Model):
    status: Literal["success"]
    message: str
    data: LoggingSwitchData


class CallbackDeleteData(_Model):
    team_id: str
    removed: list[MaskedCallback]
    success_callbacks: list[str]
    failure_callbacks: list[str]


class CallbackDeleteResponse(_Model):
    status: Literal["success"]
    message: str
    data: CallbackDeleteData


class TeamSettingsData(_Model):
    team_id: str
    callbacks: list[MaskedCallback]
    logging_enabled: bool
    cache_enabled: bool
    cache_ttl_seconds: int | None
    message_logging: Literal["full", "metadata_only"]
    inherit_defaults: bool
    settings_source: SettingsSource


class TeamSettingsResponse(_Model):
    status: Literal["success"]
    data: TeamSettingsData


class CallbackTestData(_Model):
    team_id: str
    callback_name: str
    callback_type: Literal["success", "failure", "success_and_failure"]


class CallbackTestResponse(_Model):
    status: Literal["success"]
    message: str
    data: CallbackTestData


class HealthResponse(BaseModel):
    """Figures without secrets; the master key sees everything, a team admin its own teams."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded"]
    started: bool
    store: dict[str, Any]


class LivenessResponse(_Model):
    status: Literal["ok"]


# -- helpers ----------------------------------------------------------------------------------


def _masked(spec: CallbackSpec) -> dict[str, Any]:
    return spec.masked()


def _mask_destination(dest: Mapping[str, Any]) -> dict[str, Any]:
    """Mask a planner destination again, defensively: a secret var never leaves unmasked."""
    out = dict(dest)
    vars_ = out.get("callback_vars")
    if isinstance(vars_, Mapping):
        safe: dict[str, Any] = {}
        for name, value in vars_.items():
            if (
                isinstance(name, str)
                and is_secret_var(name)
                and isinstance(value, str)
                and MASK not in value
            ):
                safe[name] = mask_value(value)
            else:
                safe[name] = value
        out["callback_vars"] = safe
    return out


def _names(settings: TeamSettings, success: bool) -> list[str]:
    """Names of the entries that receive records of an outcome now (none while disabled)."""
    if not settings.logging_enabled:
        return []
    seen: dict[str, None] = {}
    for spec in settings.callbacks:
        if spec.receives(success):
            seen.setdefault(spec.callback_name, None)
    return list(seen)


def _vars_by_name(callbacks: Sequence[CallbackSpec]) -> dict[str, dict[str, str]]:
    """LiteLLM's ``callback_vars`` by callback name; names used twice are keyed ``name:type``."""
    counts: dict[str, int] = {}
    for spec in callbacks:
        counts[spec.callback_name] = counts.get(spec.callback_name, 0) + 1
    out: dict[str, dict[str, str]] = {}
    for spec in callbacks:
        key = spec.callback_name
        if counts[key] > 1:
            key = f"{key}:{spec.callback_type}"
        out[key] = _masked(spec)["callback_vars"]
    return out


def _settings_data(settings: TeamSettings, source: str) -> dict[str, Any]:
    return {
        "team_id": settings.team_id,
        "callbacks": [_masked(s) for s in settings.callbacks],
        "logging_enabled": settings.logging_enabled,
        "cache_enabled": settings.cache_enabled,
        "cache_ttl_seconds": settings.cache_ttl_seconds,
        "message_logging": settings.message_logging,
        "inherit_defaults": settings.inherit_defaults,
        "settings_source": source,
    }


def _scrub(message: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            message = message.replace(secret, MASK)
    return message


Endpoint = Callable[[Request], Awaitable[Response]]


def unexpected_error_response(exc: BaseException, *, where: str, debug: bool = False) -> Response:
    """Log an unexpected error safely and answer the bare 500 of the one error shape.

    The log line has the exception type and the code location it came from, not the message
    (which may carry a settings value or a credential); ``debug`` adds the full traceback to the
    log and the type to the answer.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    origin = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    logger.error(
        "%s failed: %s at %s",
        where,
        type(exc).__name__,
        origin,
        exc_info=exc if debug else None,
    )
    detail = f" ({type(exc).__name__})" if debug else ""
    return error_response(500, f"internal error{detail}", type="internal_error")


def _guard(debug: bool) -> Callable[[Endpoint], Endpoint]:
    """Turn every failure of an endpoint into the one error shape (never a bare 500 page)."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            try:
                return await endpoint(request)
            except (AdminError, ValidationError, SettingsError) as exc:
                return refusal_response(exc)
            except StoreUnavailableError:
                logger.warning(
                    "settings store unavailable during %s %s", request.method, endpoint.__name__
                )
                reading = request.method in ("GET", "HEAD")
                return error_response(
                    503,
                    "the settings store is unavailable; retry later"
                    if reading
                    else "the settings store is unavailable; the change was NOT applied, "
                    "retry later",
                    type="store_unavailable",
                )
            except HTTPException as exc:
                return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
            except Exception as exc:
                return unexpected_error_response(exc, where=endpoint.__name__, debug=debug)

        return guarded

    return decorate


def _path_param(request: Request, name: str, max_length: int) -> str:
    value = str(request.path_params.get(name, ""))
    if not value or len(value) > max_length:
        raise AdminError(400, f"{name} must be 1 to {max_length} characters", param=name)
    return value


def _team_id(request: Request) -> str:
    return _path_param(request, "team_id", MAX_TEAM_ID_LENGTH)


def _callback_name(request: Request) -> str:
    return _path_param(request, "callback_name", MAX_CALLBACK_NAME_LENGTH)


def _callbacks_named(
    settings: TeamSettings, team_id: str, name: str, callback_type: str | None
) -> list[CallbackSpec]:
    """The team's callbacks called ``name`` (of ``callback_type`` when given); a 404 when none."""
    found = [
        spec
        for spec in settings.callbacks
        if spec.callback_name == name
        and (callback_type is None or spec.callback_type == callback_type)
    ]
    if not found:
        what = f"{name!r}" + (f" of type {callback_type!r}" if callback_type else "")
        raise AdminError(404, f"team {team_id!r} has no callback {what}", param="callback_name")
    return found


def _callback_type_query(request: Request) -> str | None:
    value = request.query_params.get("callback_type")
    if value is None or value == "":
        return None
    if value not in CALLBACK_TYPES:
        raise AdminError(
            400,
            f"callback_type must be one of {list(CALLBACK_TYPES)}",
            param="callback_type",
        )
    return value


# -- the app ----------------------------------------------------------------------------------


class _AdminAPI:
    """The endpoints. Holds configuration only; per-request state lives in locals."""

    def __init__(self, access: AdminAccess, *, max_body_bytes: int, debug: bool) -> None:
        self.access = access
        self.tl = access.team_logging
        self.max_body_bytes = max_body_bytes
        self.debug = debug
        # One writer per team at a time within this process: read-modify-write of a team's
        # settings must not lose a concurrent change (another replica still can; last wins).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._openapi: dict[str, Any] | None = None

    def _lock(self, team_id: str) -> asyncio.Lock:
        lock = self._locks.get(team_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[team_id] = lock
        return lock

    async def _current(self, team_id: str) -> tuple[TeamSettings, str]:
        """The team's settings: stored ones, else a copy of its config entry, else defaults."""
        stored = await self.tl.store.get_team(team_id)
        if stored is not None:
            return stored, "api"
        from_config = self.tl.config.teams.get(team_id)
        if from_config is not None:
            # Seeding from the config entry keeps "add a callback" and "disable, then enable"
            # from silently dropping what the config file gave the team.
            return from_config.model_copy(deep=True, update={"team_id": team_id}), "config"
        return TeamSettings(team_id=team_id), "none"

    async def _save(self, settings: TeamSettings) -> None:
        await self.tl.store.put_team(settings)
        # The store notifies its listeners too; invalidating here makes this replica's very next
        # request see the change even with a store that notifies asynchronously.
        self.tl.planner.invalidate(settings.team_id)

    # POST /team/{team_id}/callback
    async def add_callback(self, request: Request) -> Response:
        team_id = request.path_params.get("team_id", "")
        principal = await self.access.authenticate(request, str(team_id))
        team_id = _team_id(request)
        body = await read_json_object(request, self.max_body_bytes)
        spec = CallbackSpec.model_validate(body)
        spec = self.access.validate_spec(spec, principal)
        async with self._lock(team_id):
            settings, _ = await self._current(team_id)
            callbacks = list(settings.callbacks)
            for index, existing in enumerate(callbacks):
                if (
                    existing.callback_name == spec.callback_name
                    and existing.callback_type == spec.callback_type
                ):
                    callbacks[index] = spec
                    replaced = True
                    break
            else:
                replaced = False
                if len(callbacks) >= MAX_CALLBACKS:
                    raise AdminError(
                        409,
                        f"team already has {MAX_CALLBACKS} callbacks; delete one first",
                        type="conflict_error",
                        param="callback_name",
                    )
                callbacks.append(spec)
            await self._save(settings.model_copy(update={"callbacks": callbacks}))
        logger.info(
            "team %r: callback %r (%s) %s by %s",
            team_id,
            spec.callback_name,
            spec.callback_type,
            "replaced" if replaced else "added",
            principal.subject,
        )
        return _ok({"status": "success", "data": {"team_id": team_id, **_masked(spec)}})

    # GET /team/{team_id}/callback
    async def get_callbacks(self, request: Request) -> Response:
        principal = await self.access.authenticate(
            request, str(request.path_params.get("team_id", ""))
        )
        team_id = _team_id(request)
        settings, source = await self._current(team_id)
        effective = await self.tl.planner.effective_destinations(team_id)
        destinations = []
        for dest in effective:
            shown = _mask_destination(dest)
            # A team admin sees that operator-wide defaults apply, not their settings.
            if not principal.is_master and shown.get("source") == "default":
                shown["callback_vars"] = {}
            destinations.append(shown)
        return _ok(
            {
                "status": "success",
                "data": {
                    "team_id": team_id,
                    "success_callbacks": _names(settings, True),
                    "failure_callbacks": _names(settings, False),
                    "callback_vars": _vars_by_name(settings.callbacks),
                    "callbacks": [_masked(s) for s in settings.callbacks],
                    "logging_enabled": settings.logging_enabled,
                    "settings_source": source,
                    "effective_destinations": destinations,
                },
            }
        )

    # DELETE /team/{team_id}/callback/{callback_name}
    async def delete_callback(self, request: Request) -> Response:
        principal = await self.access.authenticate(
            request, str(request.path_params.get("team_id", ""))
        )
        team_id = _team_id(request)
        name = _callback_name(request)
        callback_type = _callback_type_query(request)
        async with self._lock(team_id):
            settings, _ = await self._current(team_id)
            removed = _callbacks_named(settings, team_id, name, callback_type)
            kept = [s for s in settings.callbacks if s not in removed]
            updated = settings.model_copy(update={"callbacks": kept})
            await self._save(updated)
        logger.info(
            "team %r: callback %r deleted (%d entries) by %s",
            team_id,
            name,
            len(removed),
            principal.subject,
        )
        return _ok(
            {
                "status": "success",
                "message": f"Deleted callback {name} for team {team_id}",
                "data": {
                    "team_id": team_id,
                    "removed": [_masked(s) for s in removed],
                    "success_callbacks": _names(updated, True),
                    "failure_callbacks": _names(updated, False),
                },
            }
        )

    async def _switch_logging(self, request: Request, enabled: bool) -> Response:
        principal = await self.access.authenticate(
            request, str(request.path_params.get("team_id", ""))
        )
        team_id = _team_id(request)
        async with self._lock(team_id):
            settings, _ = await self._current(team_id)
            # Non-destructive: the stored callbacks stay, so enable_logging brings them back.
            updated = settings.model_copy(update={"logging_enabled": enabled})
            await self._save(updated)
        word = "enabled" if enabled else "disabled"
        logger.info("team %r: logging %s by %s", team_id, word, principal.subject)
        return _ok(
            {
                "status": "success",
                "message": f"Logging {word} for team {team_id}",
                "data": {
                    "team_id": team_id,
                    "success_callbacks": _names(updated, True),
                    "failure_callbacks": _names(updated, False),
                },
            }
        )

    async def disable_logging(self, request: Request) -> Response:
        return await self._switch_logging(request, False)

    async def enable_logging(self, request: Request) -> Response:
        return await self._switch_logging(request, True)

    # GET /team/{team_id}/settings
    async def get_settings(self, request: Request) -> Response:
        await self.access.authenticate(request, str(request.path_params.get("team_id", "")))
        team_id = _team_id(request)
        settings, source = await self._current(team_id)
        return _ok({"status": "success", "data": _settings_data(settings, source)})

    # PATCH /team/{team_id}/settings
    async def patch_settings(self, request: Request) -> Response:
        principal = await self.access.authenticate(
            request, str(request.path_params.get("team_id", ""))
        )
        team_id = _team_id(request)
        body = await read_json_object(request, self.max_body_bytes)
        patch = TeamSettingsPatch.model_validate(body)
        changes = patch.model_dump(exclude_unset=True)
        async with self._lock(team_id):
            settings, _ = await self._current(team_id)
            merged = settings.model_dump()
            merged.update(changes)
            # Re-validate the whole result: an explicit null for a switch is refused here.
            updated = TeamSettings.model_validate(merged)
            await self._save(updated)
        logger.info(
            "team %r: settings %s changed by %s", team_id, sorted(changes), principal.subject
        )
        return _ok({"status": "success", "data": _settings_data(updated, "api")})

    # POST /team/{team_id}/callback/{callback_name}/test
    async def test_callback(self, request: Request) -> Response:
        await self.access.authenticate(request, str(request.path_params.get("team_id", "")))
        team_id = _team_id(request)
        name = _callback_name(request)
        callback_type = _callback_type_query(request)
        settings, _ = await self._current(team_id)
        matches = _callbacks_named(settings, team_id, name, callback_type)
        if len(matches) > 1:
            raise AdminError(
                409,
                f"team {team_id!r} has {len(matches)} {name!r} callbacks; "
                "choose one with ?callback_type=",
                type="conflict_error",
                param="callback_type",
            )
        spec = matches[0]
        secrets = secret_values(spec.callback_vars)
        try:
            await asyncio.wait_for(self.tl.dispatcher.check(spec, team_id), CHECK_TIMEOUT)
        except SinkError as exc:
            raise AdminError(
                400,
                f"callback {name!r} check failed: {_scrub(exc.reason, secrets)}",
                type="callback_check_failed",
                param="callback_name",
            ) from None
        except SettingsError as exc:
            raise AdminError(
                400,
                f"callback {name!r} check failed: {_scrub(exc.message, secrets)}",
                type="callback_check_failed",
                param=exc.param,
            ) from None
        except (TimeoutError, asyncio.TimeoutError):
            raise AdminError(
                400,
                f"callback {name!r} check failed: no answer within {CHECK_TIMEOUT:g}s",
                type="callback_check_failed",
                param="callback_name",
            ) from None
        except ImportError as exc:  # MissingDependencyError: its message is the pip command
            raise AdminError(
                400, f"callback {name!r} check failed: {exc}", type="callback_check_failed"
            ) from None
        except Exception as exc:
            # The message of an arbitrary error could hold a resolved secret: type only.
            raise AdminError(
                400,
                f"callback {name!r} check failed: {type(exc).__name__}",
                type="callback_check_failed",
                param="callback_name",
            ) from None
        return _ok(
            {
                "status": "success",
                "message": f"callback {name} for team {team_id} is reachable "
                "and accepted the credentials",
                "data": {
                    "team_id": team_id,
                    "callback_name": spec.callback_name,
                    "callback_type": spec.callback_type,
                },
            }
        )

    # GET /health
    async def health(self, request: Request) -> Response:
        principal = await self.access.authenticate(request, None)
        figures = await self.tl.health()
        store = figures.get("store") or {}
        reachable = bool(store.get("reachable", True)) if isinstance(store, Mapping) else False
        status = "ok" if reachable else "degraded"
        if principal.is_master:
            return _ok({"status": status, **figures})
        # A team admin sees whether the service works and its own teams' destinations only.
        dispatcher = figures.get("dispatcher")
        return _ok(
            {
                "status": status,
                "started": bool(figures.get("started")),
                "store": {"reachable": reachable},
                "destinations": _team_destinations(dispatcher, principal.teams),
            }
        )

    async def liveness(self, request: Request) -> Response:
        return _ok({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = build_openapi(self.tl.registry.names(), self.max_body_bytes)
        return _ok(self._openapi)


def _team_destinations(dispatcher_stats: Any, teams: frozenset[str]) -> list[dict[str, Any]]:
    """Counters of the destinations that serve only the given teams (no secrets).

    A destination shared with other teams (a global default) is left out: its counters and last
    error describe other teams' traffic too.
    """
    if not isinstance(dispatcher_stats, Mapping):
        return []
    destinations = dispatcher_stats.get("destinations")
    items: Iterable[Any]
    if isinstance(destinations, Mapping):
        items = destinations.values()
    elif isinstance(destinations, list):
        items = destinations
    else:
        return []
    out: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        team_ids = item.get("team_ids")
        if not isinstance(team_ids, list) or not team_ids or item.get("more_team_ids"):
            continue
        if all(t in teams for t in team_ids):
            out.append(dict(item))
    return out


def _by_method(endpoints: Mapping[str, Endpoint]) -> Endpoint:
    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    return dispatch


def create_admin_app(
    team_logging: TeamLogging,
    *,
    master_key: str | None,
    authorize: AuthorizeHook | None = None,
    allow_env_refs_for_delegated: bool = False,
    delegated_host_allowlist: Sequence[str] | None = None,
    allow_delegated_gcs: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    debug: bool = False,
) -> Starlette:
    """Build the admin sub-app for ``team_logging``.

    Args:
        team_logging: the runtime shared with the middleware (store, planner, registry, ...).
        master_key: the operator's admin key (``Authorization: Bearer <key>``); None disables it,
            leaving only ``authorize``. With neither, every call answers 401.
        authorize: optional hook admitting delegated principals (team admins); see
            :data:`AuthorizeHook`.
        allow_env_refs_for_delegated: let delegated principals write ``os.environ/`` references
            (still limited to ``team_logging.env_allowlist``).
        delegated_host_allowlist: glob patterns of host names that delegated principals may point
            destinations at (vars named ``*_host``, ``*_endpoint``, ``*_url``); None: any host.
        allow_delegated_gcs: let delegated principals add ``gcs_bucket`` destinations, which
            write with the gateway's default Google Cloud credentials (a delegated principal
            can never set ``gcs_path_service_account``, whatever this says).
        max_body_bytes: request bodies above this answer 413 (enforced while reading).
        debug: name the exception type in 500 answers (never its message or a traceback).

    The app keeps the runtime and the access rules in ``app.state.team_logging`` and
    ``app.state.admin_access``. It does not start or stop the runtime: whoever owns the runtime's
    lifespan (the middleware, or ``async with team_logging``) does.
    """
    access = AdminAccess(
        team_logging,
        master_key=master_key,
        authorize=authorize,
        allow_env_refs_for_delegated=allow_env_refs_for_delegated,
        delegated_host_allowlist=delegated_host_allowlist,
        allow_delegated_gcs=allow_delegated_gcs,
    )
    api = _AdminAPI(access, max_body_bytes=max_body_bytes, debug=debug)
    guard = _guard(debug)
    by_path: dict[str, dict[str, Endpoint]] = {
        "/team/{team_id}/callback": {"POST": api.add_callback, "GET": api.get_callbacks},
        "/team/{team_id}/callback/{callback_name}": {"DELETE": api.delete_callback},
        "/team/{team_id}/callback/{callback_name}/test": {"POST": api.test_callback},
        "/team/{team_id}/disable_logging": {"POST": api.disable_logging},
        "/team/{team_id}/enable_logging": {"POST": api.enable_logging},
        "/team/{team_id}/settings": {"GET": api.get_settings, "PATCH": api.patch_settings},
        "/health": {"GET": api.health},
        "/health/liveness": {"GET": api.liveness},
        "/openapi.json": {"GET": api.openapi},
    }
    # One route per path, so a 405 lists every method the path allows in its Allow header.
    routes = [
        Route(
            path, _by_method({m: guard(e) for m, e in endpoints.items()}), methods=list(endpoints)
        )
        for path, endpoints in by_path.items()
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "no such route", 405: "method not allowed on this route"}.get(
            exc.status_code, str(exc.detail)
        )
        return error_response(exc.status_code, message, headers=exc.headers)

    app = Starlette(debug=False, routes=routes, exception_handlers={HTTPException: http_error})
    app.state.team_logging = team_logging
    app.state.admin_access = access
    return app


# -- OpenAPI -----------------------------------------------------------------------------------

_ERROR_STATUSES: dict[str, str] = {
    "400": "Bad value (unknown callback, unknown or missing var, refused os.environ/ reference)",
    "401": "Missing or invalid credentials",
    "403": "A team admin asked about another team",
    "404": "No such team entry or route",
    "405": "Method not allowed",
    "409": "Conflicts with the team's current settings",
    "413": "Request body too large",
    "415": "Request body is not JSON",
    "422": "Request body has the wrong shape",
    "500": "Unexpected internal error (no details)",
    "503": "Settings store unavailable: the change was NOT applied",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    summary: str,
    response_model: str,
    errors: Sequence[str],
    *,
    params: Sequence[dict[str, Any]] = (),
    body: str | None = None,
    public: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "Success", "content": _json_content(_ref(response_model))}
    }
    statuses = list(errors) if public else ["401", "403", *errors]
    for status in sorted(set(statuses) | {"405", "500"}):
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json_content(_ref(body))}
    if public:
        op["security"] = []
    return op


def build_openapi(callback_names: Sequence[str], max_body_bytes: int) -> dict[str, Any]:
    """The admin API as an OpenAPI 3.1 document, schemas generated from the pydantic models."""
    models: list[type[BaseModel]] = [
        ErrorResponse,
        CallbackWriteResponse,
        TeamCallbacksResponse,
        LoggingSwitchResponse,
        CallbackDeleteResponse,
        TeamSettingsResponse,
        CallbackTestResponse,
        HealthResponse,
        LivenessResponse,
    ]
    _, top = models_json_schema(
        [(m, "serialization") for m in models]
        + [(CallbackSpec, "validation"), (TeamSettingsPatch, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    spec_schema = schemas.get("CallbackSpec")
    if spec_schema is not None and callback_names:
        spec_schema["properties"]["callback_name"] = {
            "type": "string",
            "enum": list(callback_names),
            "description": "A registered callback (sink) name",
        }
        spec_schema.setdefault("required", [])
        if "callback_name" not in spec_schema["required"]:
            spec_schema["required"].append("callback_name")
    string_no_slash = {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}
    team = {
        "name": "team_id",
        "in": "path",
        "required": True,
        "schema": {**string_no_slash, "maxLength": MAX_TEAM_ID_LENGTH},
    }
    cb_name = {
        "name": "callback_name",
        "in": "path",
        "required": True,
        "schema": {**string_no_slash, "maxLength": MAX_CALLBACK_NAME_LENGTH},
    }
    cb_type = {
        "name": "callback_type",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(CALLBACK_TYPES)},
    }
    body_errors = ["400", "413", "415", "422", "503"]
    paths: dict[str, Any] = {
        "/team/{team_id}/callback": {
            "post": _operation(
                "Add a team's callback, or replace the one with the same name and type",
                "CallbackWriteResponse",
                [*body_errors, "409"],
                params=[team],
                body="CallbackSpec",
            ),
            "get": _operation(
                "A team's callbacks (masked) and its effective destinations",
                "TeamCallbacksResponse",
                ["400", "503"],
                params=[team],
            ),
        },
        "/team/{team_id}/callback/{callback_name}": {
            "delete": _operation(
                "Delete a team's callback(s) by name (and type)",
                "CallbackDeleteResponse",
                ["400", "404", "503"],
                params=[team, cb_name, cb_type],
            )
        },
        "/team/{team_id}/callback/{callback_name}/test": {
            "post": _operation(
                "Check a stored callback's credentials and reachability",
                "CallbackTestResponse",
                ["400", "404", "409", "503"],
                params=[team, cb_name, cb_type],
            )
        },
        "/team/{team_id}/disable_logging": {
            "post": _operation(
                "Turn a team's logging off (its callbacks are kept)",
                "LoggingSwitchResponse",
                ["400", "503"],
                params=[team],
            )
        },
        "/team/{team_id}/enable_logging": {
            "post": _operation(
                "Turn a team's logging back on",
                "LoggingSwitchResponse",
                ["400", "503"],
                params=[team],
            )
        },
        "/team/{team_id}/settings": {
            "get": _operation(
                "A team's full settings (callbacks masked)",
                "TeamSettingsResponse",
                ["400", "503"],
                params=[team],
            ),
            "patch": _operation(
                "Change a team's switches (logging, cache, message logging, defaults)",
                "TeamSettingsResponse",
                body_errors,
                params=[team],
                body="TeamSettingsPatch",
            ),
        },
        "/health": {
            "get": _operation(
                "Delivery counters, caches and store health (no secrets)",
                "HealthResponse",
                [],
            )
        },
        "/health/liveness": {
            "get": _operation("The process answers", "LivenessResponse", [], public=True)
        },
    }
    responses = {
        f"E{status}": {
            "description": description
            + (f" (limit: {max_body_bytes} bytes)" if status == "413" else ""),
            "content": _json_content(_ref("ErrorResponse")),
        }
        for status, description in _ERROR_STATUSES.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "team-logging-middleware admin API",
            "version": __version__,
            "description": "Per-team logging destinations. Every error has the shape "
            '{"error": {"message", "type", "param"}}.',
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
