"""The Google Cloud Storage destination (``gcs_bucket``): one NDJSON object per batch.

Each batch the dispatcher hands over becomes ONE new object::

    {gcs_path_prefix}/{team_id}/{YYYY-MM-DD}/{epoch_ms}-{random}.ndjson

(the prefix is left out when empty; the date and ``epoch_ms`` come from the first record's start
time, in UTC) holding one :meth:`LogRecord.to_dict` JSON document per line, uploaded with
``content_type="application/x-ndjson"`` and ``if_generation_match=0``: an existing object is never
overwritten; a name collision is retried under a new name.

``google-cloud-storage`` is synchronous, so uploads run on the process's shared, bounded blocking
pool (:func:`team_logging_middleware.sinks.otel.run_blocking`) with a timeout and with the
library's own retries turned off (the dispatcher retries, with backoff, what is worth retrying).
One ``storage.Client`` per set of credentials is shared by every destination using them.

``callback_vars``:

``gcs_bucket_name`` (required)
    The bare bucket name (no ``gs://``), checked against GCS naming rules.
``gcs_path_service_account`` (secret)
    Path of a service-account JSON key file on the gateway host. Without it, the platform's
    default credentials are used; with ``STORAGE_EMULATOR_HOST`` set (which must include
    ``http://``), anonymous credentials.
``gcs_path_prefix``
    A folder inside the bucket (``logs/llm``); no ``.``/``..`` segments.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MissingDependencyError, SettingsError, SinkError
from ..records import LogRecord
from .base import SinkContext, SinkType
from .jsonl import json_line, utf8
from .otel import run_blocking

logger = logging.getLogger("team_logging_middleware.sinks.gcs")

CONTENT_TYPE = "application/x-ndjson"
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
MAX_PREFIX_BYTES = 512
MAX_TEAM_SEGMENT = 96
MAX_CLIENTS = 32
NAME_ATTEMPTS = 3
UNKNOWN_TEAM = "_unknown"

# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# https://cloud.google.com/storage/docs/buckets#naming: no "google" or close misspellings.
_GOOGLE_LIKE = re.compile(r"g[o0]{2}g[l1]e")


def check_bucket_name(name: str) -> str:
    """Validate a bucket name against the GCS naming rules; raises :class:`SettingsError`."""
    param = "callback_vars.gcs_bucket_name"

    def refuse(why: str) -> SettingsError:
        return SettingsError(f"{param}: {why}", param=param)

    if name.startswith("gs://") or "/" in name:
        raise refuse(
            "give the bare bucket name (no gs:// and no path); put a folder in gcs_path_prefix"
        )
    limit = 222 if "." in name else 63
    if not 3 <= len(name) <= limit:
        raise refuse(f"a bucket name has 3 to {limit} characters")
    if not _BUCKET_CHARS.match(name):
        raise refuse(
            "a bucket name has lowercase letters, digits, '-', '_' and '.', "
            "and starts and ends with a letter or digit"
        )
    if any(not 1 <= len(part) <= 63 for part in name.split(".")):
        raise refuse("each dot-separated part of a bucket name has 1 to 63 characters")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        raise refuse("a bucket name cannot be an IP address")
    if name.startswith("goog") or _GOOGLE_LIKE.search(name):
        raise refuse('a bucket name cannot start with "goog" or contain "google"')
    return name


def normalize_prefix(prefix: str | None) -> str:
    """The object-name prefix without leading/trailing or doubled slashes; raises on ``..``."""
    param = "callback_vars.gcs_path_prefix"
    if not prefix:
        return ""
    segments = [s for s in prefix.strip().split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise SettingsError(f"{param}: must not contain '.' or '..' segments", param=param)
    if _CONTROL.search(prefix):
        raise SettingsError(f"{param}: must not contain control characters", param=param)
    normalized = "/".join(segments)
    if len(normalized.encode()) > MAX_PREFIX_BYTES:
        raise SettingsError(f"{param}: at most {MAX_PREFIX_BYTES} bytes", param=param)
    return normalized


def validate_gcs_vars(literal_vars: Mapping[str, str]) -> None:
    """Check the literal vars of an entry when it is written (``os.environ/`` ones are absent)."""
    if literal_vars.get("gcs_bucket_name"):
        check_bucket_name(literal_vars["gcs_bucket_name"])
    normalize_prefix(literal_vars.get("gcs_path_prefix"))
    if (
        "gcs_path_service_account" in literal_vars
        and not literal_vars["gcs_path_service_account"].strip()
    ):
        raise SettingsError(
            "callback_vars.gcs_path_service_account: must not be empty",
            param="callback_vars.gcs_path_service_account",
        )


def team_segment(team_id: str | None) -> str:
    """``team_id`` as one safe object-name segment.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; whenever that (or truncation, or a leading
    ``_`` or ``.``) changed the id, a short hash of the original is appended, so two teams never
    share a folder.
    """
    if team_id is None:
        return UNKNOWN_TEAM
    cleaned = _SAFE_SEGMENT.sub("_", team_id)[:MAX_TEAM_SEGMENT]
    if cleaned == team_id and cleaned and not cleaned.startswith(("_", ".")):
        return cleaned
    digest = hashlib.sha256(team_id.encode()).hexdigest()[:10]
    return f"{cleaned.lstrip('._') or 'team'}-{digest}"


def object_name(prefix: str, team: str, start_time: float, suffix: str) -> str:
    """``{prefix}/{team}/{YYYY-MM-DD}/{epoch_ms}-{suffix}.ndjson`` (no prefix when empty)."""
    day = dt.datetime.fromtimestamp(start_time, tz=dt.timezone.utc).strftime("%Y-%m-%d")
    name = f"{team}/{day}/{int(start_time * 1000)}-{suffix}.ndjson"
    return f"{prefix}/{name}" if prefix else name


def _random_suffix() -> str:
    return secrets.token_hex(6)


def ndjson(batch: Sequence[LogRecord]) -> bytes:
    """One ``to_dict()`` JSON document per line, UTF-8 (see :func:`.jsonl.json_line`)."""
    lines = (json_line(record.to_dict(), separators=(",", ":")) for record in batch)
    return utf8("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# google-cloud-storage, imported lazily, and the shared clients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Google:
    storage: Any
    exceptions: Any
    auth: Any
    auth_exceptions: Any
    anonymous: Any
    service_account: Any
    requests_exceptions: Any


def _require_dependency() -> None:
    try:
        found = importlib.util.find_spec("google.cloud.storage") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError("the gcs_bucket destination", "gcs")


@functools.cache
def _google() -> _Google:
    try:
        # Runs once, on the blocking pool (the import is slow). catch_warnings is process-wide
        # state, which is acceptable for this one-time, narrowly filtered import.
        with warnings.catch_warnings():
            # google-api-core warns at import when grpcio is installed without grpcio-status;
            # this destination uses the JSON API only, so the hint is noise.
            warnings.filterwarnings("ignore", message=".*grpcio-status.*", category=ImportWarning)
            import google.auth
            import google.auth.exceptions
            import requests.exceptions
            from google.api_core import exceptions
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage
            from google.oauth2 import service_account
    except ImportError as exc:
        raise MissingDependencyError("the gcs_bucket destination", "gcs") from exc
    return _Google(
        storage=storage,
        exceptions=exceptions,
        auth=google.auth,
        auth_exceptions=google.auth.exceptions,
        anonymous=AnonymousCredentials,
        service_account=service_account,
        requests_exceptions=requests.exceptions,
    )


_clients: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_clients_lock = threading.Lock()


def _load_client(service_account_path: str | None) -> Any:
    """A shared ``storage.Client`` for these credentials (blocking: call it on the pool).

    Keyed by the emulator setting, the key file's path and a digest of its content (a rotated key
    gets a new client); at most :data:`MAX_CLIENTS` are kept, least recently used first out.
    """
    google = _google()
    emulator = os.environ.get(EMULATOR_ENV, "")
    info: dict[str, Any] | None = None
    digest = ""
    if service_account_path and not emulator:
        try:
            with open(service_account_path, "rb") as handle:
                raw = handle.read()
            info = json.loads(raw)
        except (OSError, ValueError):
            # The path is a secret var: never repeat it.
            raise SinkError("the service account key file could not be read") from None
        if not isinstance(info, dict):
            raise SinkError("the service account key file is not a JSON object")
        digest = hashlib.sha256(raw).hexdigest()
    key = (emulator, "" if emulator else (service_account_path or ""), digest)
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            _clients.move_to_end(key)
            return client
    if emulator:
        client = google.storage.Client(project=None, credentials=google.anonymous())
    elif info is not None:
        try:
            credentials = google.service_account.Credentials.from_service_account_info(
                info, scopes=list(SCOPES)
            )
        except ValueError:
            raise SinkError("the service account key file is not a valid key") from None
        client = google.storage.Client(project=credentials.project_id, credentials=credentials)
    else:
        try:
            credentials, project = google.auth.default(scopes=list(SCOPES))
        except google.auth_exceptions.DefaultCredentialsError:
            raise SinkError(
                "no Google Cloud credentials found; set gcs_path_service_account"
            ) from None
        client = google.storage.Client(project=project, credentials=credentials)
    with _clients_lock:
        existing = _clients.get(key)
        if existing is not None:  # another thread built one meanwhile: share that one
            return existing
        _clients[key] = client
        while len(_clients) > MAX_CLIENTS:
            _clients.popitem(last=False)  # its sinks keep their reference; GC closes it later
    return client


def _error_for(exc: BaseException, bucket: str) -> SinkError:
    """Map a google-cloud-storage / transport exception to a :class:`SinkError`."""
    google = _google()
    gex = google.exceptions
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, gex.NotFound):
        return SinkError(f"bucket {bucket} not found", status=404)
    if isinstance(exc, gex.Forbidden):
        return SinkError(
            f"access to bucket {bucket} denied (HTTP 403): the credentials may not create objects",
            status=403,
        )
    if isinstance(exc, gex.Unauthorized):
        return SinkError("Google Cloud rejected the credentials (HTTP 401)", status=401)
    if isinstance(exc, gex.TooManyRequests):
        return SinkError("GCS rate limit (HTTP 429)", retryable=True, status=429)
    if isinstance(exc, gex.GoogleAPICallError):
        code = exc.code if isinstance(exc.code, int) else None
        if code is not None and code >= 500:
            return SinkError(f"GCS failed the upload (HTTP {code})", retryable=True, status=code)
        return SinkError(f"GCS refused the upload (HTTP {code})", status=code)
    if isinstance(exc, google.auth_exceptions.RefreshError):
        return SinkError(
            "the credentials could not be refreshed",
            retryable=bool(getattr(exc, "retryable", False)),
        )
    if isinstance(
        exc,
        (
            google.auth_exceptions.TransportError,
            google.requests_exceptions.ConnectionError,
            google.requests_exceptions.Timeout,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return SinkError("GCS unreachable (connection failed or timed out)", retryable=True)
    return SinkError(f"GCS upload failed ({type(exc).__name__})")


# --------------------------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------------------------


class GcsBucketSink:
    """Writes each batch as one new NDJSON object in a team's GCS bucket; never overwrites.

    ``suffix`` makes the random part of object names (injectable so tests can force a collision).
    """

    def __init__(
        self,
        bucket: str,
        *,
        team_id: str | None = None,
        prefix: str = "",
        service_account_path: str | None = None,
        timeout: float = 10.0,
        suffix: Callable[[], str] = _random_suffix,
    ) -> None:
        self._bucket = check_bucket_name(bucket)
        self._prefix = normalize_prefix(prefix)
        self._team_id = team_id
        self._service_account_path = service_account_path or None
        # The dispatcher bounds every emit by the context's timeout: each HTTP request gets a
        # share of it, and the wait for the pool a little less than all of it, so failures carry
        # this sink's reason rather than an outer timeout.
        self._timeout = max(float(timeout), 0.1)
        self._request_timeout = self._timeout * 0.6
        self._suffix = suffix
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self._bucket

    def __repr__(self) -> str:  # the key file path is a secret var
        return f"GcsBucketSink(bucket={self._bucket!r}, prefix={self._prefix!r})"

    def _team_folder(self, batch: Sequence[LogRecord]) -> str:
        if self._team_id is not None:
            return team_segment(self._team_id)
        teams = {record.team_id for record in batch}
        # A shared destination (no team of its own) files a single-team batch under that team.
        return team_segment(teams.pop()) if len(teams) == 1 else UNKNOWN_TEAM

    def _bucket_handle(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = _load_client(self._service_account_path)
            return self._client.bucket(self._bucket)

    def _upload(self, body: bytes, team: str, start_time: float) -> str:
        """Runs on the blocking pool. Returns the object name written."""
        try:
            bucket = self._bucket_handle()
            gex = _google().exceptions
            for _attempt in range(NAME_ATTEMPTS):
                name = object_name(self._prefix, team, start_time, self._suffix())
                try:
                    bucket.blob(name).upload_from_string(
                        body,
                        content_type=CONTENT_TYPE,
                        if_generation_match=0,  # create only: never replace an object
                        timeout=self._request_timeout,
                        retry=None,  # the dispatcher owns retries and their backoff
                    )
                    return name
                except gex.PreconditionFailed:
                    logger.info("gcs object name collision; retrying under a new name")
            raise SinkError("object name collided repeatedly; will retry", retryable=True)
        except Exception as exc:
            raise _error_for(exc, self._bucket) from None

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        if not batch:
            return
        body = ndjson(batch)
        team = self._team_folder(batch)
        start = batch[0].start_time
        await run_blocking(
            functools.partial(self._upload, body, team, start),
            timeout=self._timeout * 0.95,
            what="GCS upload",
        )

    def _check(self) -> None:
        try:
            bucket = self._bucket_handle()
            gex = _google().exceptions
            try:
                granted = bucket.test_iam_permissions(
                    ["storage.objects.create"], timeout=self._request_timeout, retry=None
                )
            except gex.NotFound:
                # A missing bucket, or a server without testIamPermissions (emulators).
                if not bucket.exists(timeout=self._request_timeout, retry=None):
                    raise
                return
            if "storage.objects.create" not in granted:
                raise SinkError(
                    f"the credentials may not create objects in bucket {self._bucket}", status=403
                )
        except Exception as exc:
            raise _error_for(exc, self._bucket) from None

    async def check(self) -> None:
        """The bucket exists and these credentials may create objects in it."""
        await run_blocking(self._check, timeout=self._timeout * 0.95, what="GCS bucket check")

    async def aclose(self) -> None:
        # The client is shared by every destination with the same credentials; nothing to close.
        self._client = None


def _build(resolved_vars: Mapping[str, str], ctx: SinkContext) -> GcsBucketSink:
    _require_dependency()
    return GcsBucketSink(
        resolved_vars.get("gcs_bucket_name", ""),
        team_id=ctx.team_id,
        prefix=resolved_vars.get("gcs_path_prefix", ""),
        service_account_path=resolved_vars.get("gcs_path_service_account"),
        timeout=ctx.timeout,
    )


SINK_TYPE = SinkType(
    name="gcs_bucket",
    factory=_build,
    required_vars=frozenset({"gcs_bucket_name"}),
    optional_vars=frozenset({"gcs_path_service_account", "gcs_path_prefix"}),
    description="Google Cloud Storage bucket: one NDJSON object of log records per batch",
    validate_vars=validate_gcs_vars,
)
