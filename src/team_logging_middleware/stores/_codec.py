"""How the persistent stores write settings: JSON documents, with secrets encrypted at rest.

Both the SQLite and the Redis store keep a team as one JSON document and a key's metadata as one
JSON document. When the store is given an encryption key, every callback var that
:func:`~team_logging_middleware.settings.is_secret_var` flags — in a team's ``callbacks`` *and* in
the ``callback_vars`` of a key's ``metadata.logging`` entries — is written as
``"enc:v1:<Fernet token>"`` and decrypted on read. Everything else (team ids, callback names,
public keys, hosts, switches) stays readable, so an operator can still inspect the database.

An encryption key is a Fernet key: 32 random bytes in url-safe base64 (44 characters). Generate
one with::

    python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"

A list of keys may be given to rotate: the first encrypts, every one of them decrypts, and a value
is re-encrypted with the first key the next time its team (or key) is written.

Reading never needs to know how a value was written:

* ``enc:v1:<token>`` is decrypted (and needs the key: without it, or with the wrong one, the read
  fails with :class:`SecretDecryptionError`, naming the team, never the value);
* ``raw:<value>`` is a plain secret that itself began with ``enc:`` or ``raw:`` and was escaped so
  it cannot be mistaken for an encrypted one;
* anything else is a plain value (written without encryption; it is encrypted on its next write
  once a key is configured, so turning encryption on needs no migration step).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import MissingDependencyError, SettingsError, StoreUnavailableError
from ..settings import TeamSettings, is_secret_var
from .base import KeyRecord

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

__all__ = [
    "ENCRYPTED_PREFIX",
    "EncryptionKey",
    "SecretDecryptionError",
    "SettingsCodec",
    "StoredDataError",
    "check_id",
]

ENCRYPTED_PREFIX = "enc:v1:"
_ESCAPE_PREFIX = "raw:"
# Any value that starts like one of our markers must be escaped when written in plain form.
_RESERVED_PREFIXES = ("enc:", _ESCAPE_PREFIX)

EncryptionKey = str | bytes | Sequence[str | bytes]
"""One Fernet key, or several (the first encrypts, all decrypt) to rotate keys."""

_GENERATE_HINT = (
    'generate one with: python -c "from cryptography.fernet import Fernet; '
    'print(Fernet.generate_key().decode())"'
)


class StoredDataError(StoreUnavailableError):
    """A stored document cannot be read back (corrupt, or written by an incompatible version).

    It is a :class:`StoreUnavailableError`: the admin API answers 503 and nothing is overwritten
    by a guess. The message names the team or key and the offending fields, never a value.
    """


class SecretDecryptionError(StoredDataError):
    """An encrypted secret cannot be decrypted: no encryption key, or not the key it was written
    with. The message names the team (or key) and the var, never the value."""


def _load_fernet(keys: EncryptionKey) -> MultiFernet:
    try:
        from cryptography.fernet import Fernet, MultiFernet
    except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
        raise MissingDependencyError("encryption at rest", "encryption") from exc
    if isinstance(keys, (str, bytes)):
        keys = [keys]
    if not keys:
        raise SettingsError(
            f"encryption_key: no key given; {_GENERATE_HINT}", param="encryption_key"
        )
    fernets = []
    for index, key in enumerate(keys):
        try:
            fernets.append(Fernet(key.strip() if isinstance(key, bytes) else key.strip().encode()))
        except (ValueError, TypeError):
            # Never echo the key: it is the one secret that protects all the others.
            raise SettingsError(
                f"encryption_key[{index}] is not a Fernet key (32 url-safe base64-encoded "
                f"bytes); {_GENERATE_HINT}",
                param="encryption_key",
            ) from None
    return MultiFernet(fernets)


class SettingsCodec:
    """Serialises :class:`TeamSettings` and :class:`KeyRecord` for a persistent store.

    ``encryption_key`` (see the module docstring) turns on encryption of secret callback vars;
    None stores them as given. Loading the ``cryptography`` package is deferred until a key is
    given; without it, :class:`MissingDependencyError` names the ``encryption`` extra.
    """

    def __init__(self, encryption_key: EncryptionKey | None = None) -> None:
        self._fernet = None if encryption_key is None else _load_fernet(encryption_key)

    @property
    def encrypts(self) -> bool:
        """Whether secrets are encrypted when written."""
        return self._fernet is not None

    # -- teams ------------------------------------------------------------------------------

    def dump_team(self, settings: TeamSettings) -> str:
        document = settings.model_dump(mode="json")
        for entry in document["callbacks"]:
            entry["callback_vars"] = self._seal_vars(entry["callback_vars"])
        return _dumps(document)

    def load_team(self, data: str | bytes, *, team_id: str) -> TeamSettings:
        what = f"team {team_id!r}"
        document = _loads(data, what)
        callbacks = document.get("callbacks") if isinstance(document, dict) else None
        if isinstance(callbacks, list):
            for index, entry in enumerate(callbacks):
                if isinstance(entry, dict) and isinstance(entry.get("callback_vars"), dict):
                    entry["callback_vars"] = self._open_vars(
                        entry["callback_vars"], what, f"callbacks[{index}]"
                    )
        return _validate(TeamSettings.model_validate, document, what)

    # -- keys -------------------------------------------------------------------------------

    def dump_metadata(self, metadata: Mapping[str, Any]) -> str:
        """A key's metadata as JSON, with the secrets of its ``logging`` entries sealed."""
        try:
            # A JSON round trip is the deep copy: nothing the caller keeps can alias the stored
            # document, and a value JSON cannot hold is refused here rather than half-written.
            document = json.loads(_dumps(metadata))
        except (TypeError, ValueError):
            raise SettingsError(
                "key metadata must be JSON-serialisable (str, numbers, bools, None, lists, dicts)",
                param="metadata",
            ) from None
        return _dumps(self._map_key_logging(document, self._seal_entry))

    def load_metadata(self, data: str | bytes, *, key_hash: str) -> dict[str, Any]:
        what = _key_name(key_hash)
        document = _loads(data, what)
        if not isinstance(document, dict):
            raise StoredDataError(f"stored metadata of {what} is not a JSON object")

        def open_entry(entry: dict[str, Any], index: int) -> None:
            entry["callback_vars"] = self._open_vars(
                entry["callback_vars"], what, f"metadata.logging[{index}]"
            )

        return self._map_key_logging(document, open_entry)

    def dump_key(self, key: KeyRecord) -> str:
        """A whole key record as one JSON document (the Redis layout)."""
        return _dumps(
            {
                "key_hash": key.key_hash,
                "team_id": key.team_id,
                "key_alias": key.key_alias,
                "user_id": key.user_id,
                "metadata": json.loads(self.dump_metadata(key.metadata)),
                "created_at": key.created_at,
            }
        )

    def load_key(self, data: str | bytes, *, key_hash: str) -> KeyRecord:
        what = _key_name(key_hash)
        document = _loads(data, what)
        try:
            metadata = document["metadata"]
            record = KeyRecord(
                key_hash=_str(document["key_hash"]),
                team_id=_opt_str(document.get("team_id")),
                key_alias=_opt_str(document.get("key_alias")),
                user_id=_opt_str(document.get("user_id")),
                metadata={},
                created_at=float(document.get("created_at") or 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoredDataError(
                f"stored {what} is not a valid key record ({type(exc).__name__})"
            ) from None
        record.metadata = self.load_metadata(_dumps(metadata), key_hash=key_hash)
        return record

    # -- the secret values ------------------------------------------------------------------

    def _seal_vars(self, callback_vars: dict[str, Any]) -> dict[str, Any]:
        return {
            name: (self._seal(value) if is_secret_var(name) and isinstance(value, str) else value)
            for name, value in callback_vars.items()
        }

    def _seal_entry(self, entry: dict[str, Any], index: int) -> None:
        entry["callback_vars"] = self._seal_vars(entry["callback_vars"])

    def _seal(self, value: str) -> str:
        if self._fernet is not None:
            plain = value.encode("utf-8", "surrogatepass")
            return ENCRYPTED_PREFIX + self._fernet.encrypt(plain).decode("ascii")
        if value.startswith(_RESERVED_PREFIXES):
            return _ESCAPE_PREFIX + value
        return value

    def _open_vars(self, callback_vars: dict[str, Any], what: str, where: str) -> dict[str, Any]:
        opened: dict[str, Any] = {}
        for name, value in callback_vars.items():
            # Only secret vars are ever sealed: a public var that happens to start with "enc:"
            # is a plain value and must come back unchanged.
            if is_secret_var(name) and isinstance(value, str):
                opened[name] = self._open(value, what, f"{where}.callback_vars.{name}")
            else:
                opened[name] = value
        return opened

    def _open(self, value: str, what: str, where: str) -> str:
        if value.startswith(_ESCAPE_PREFIX):
            return value[len(_ESCAPE_PREFIX) :]
        if not value.startswith(ENCRYPTED_PREFIX):
            return value
        if self._fernet is None:
            raise SecretDecryptionError(
                f"{where} of {what} is encrypted, but the store has no encryption_key; "
                "configure the key the settings were written with"
            )
        from cryptography.fernet import InvalidToken

        try:
            token = value[len(ENCRYPTED_PREFIX) :].encode("ascii")
            return self._fernet.decrypt(token).decode("utf-8", "surrogatepass")
        except (InvalidToken, UnicodeError):
            raise SecretDecryptionError(
                f"{where} of {what} cannot be decrypted with the configured encryption_key "
                "(it was written with another key, or the stored value is corrupt)"
            ) from None

    @staticmethod
    def _map_key_logging(
        metadata: dict[str, Any], apply: Callable[[dict[str, Any], int], None]
    ) -> dict[str, Any]:
        # Key metadata is free-form (the gateway owns it); only well-formed logging entries carry
        # callback vars. Anything else is kept as it is: refusing it is the planner's job.
        entries = metadata.get("logging")
        if isinstance(entries, list):
            for index, entry in enumerate(entries):
                if isinstance(entry, dict) and isinstance(entry.get("callback_vars"), dict):
                    apply(entry, index)
        return metadata


def check_id(value: str, param: str) -> str:
    """Refuse an id the backends cannot store (a lone surrogate is not UTF-8) as bad input."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SettingsError(f"{param} is not valid Unicode text", param=param) from None
    return value


def _key_name(key_hash: str) -> str:
    # A key hash is not a secret, but it is long; a prefix is enough to find the row.
    shown = key_hash if len(key_hash) <= 16 else key_hash[:12] + "…"
    return f"key {shown!r}"


def _dumps(document: Any) -> str:
    # ASCII output: any Python string survives, lone surrogates included (the JSON escapes them),
    # and the document is always valid UTF-8 for the database or Redis.
    return json.dumps(document, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _loads(data: str | bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeError):
        raise StoredDataError(f"stored settings of {what} are not valid JSON") from None


def _validate(validate: Callable[[Any], TeamSettings], document: Any, what: str) -> TeamSettings:
    try:
        return validate(document)
    except ValidationError as exc:
        # Only the field paths: pydantic's messages can quote the offending input.
        fields = sorted({".".join(str(p) for p in err["loc"]) or "(root)" for err in exc.errors()})
        raise StoredDataError(
            f"stored settings of {what} are not valid (fields: {', '.join(fields)})"
        ) from None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)
