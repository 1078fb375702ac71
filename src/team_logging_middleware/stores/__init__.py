"""Where API-managed team settings (and gateway keys) live.

* :class:`MemorySettingsStore` — this process only; tests, demos, one replica.
* :class:`SQLiteSettingsStore` — one file, the embedded default; safe for several processes.
* :class:`RedisSettingsStore` — several replicas, with pub/sub cache invalidation.

The persistent stores can encrypt secret callback vars at rest (``encryption_key=``, a Fernet
key). They all implement :class:`SettingsStore`.
"""

from __future__ import annotations

from ._codec import ENCRYPTED_PREFIX, SecretDecryptionError, StoredDataError
from .base import ChangeListener, KeyRecord, SettingsStore
from .memory import MemorySettingsStore
from .redis import RedisSettingsStore
from .sqlite import SQLiteSettingsStore

__all__ = [
    "ENCRYPTED_PREFIX",
    "ChangeListener",
    "KeyRecord",
    "MemorySettingsStore",
    "RedisSettingsStore",
    "SQLiteSettingsStore",
    "SecretDecryptionError",
    "SettingsStore",
    "StoredDataError",
]
