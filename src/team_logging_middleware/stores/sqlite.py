"""The embedded default settings store: one SQLite file, safe for several processes.

Every call runs in a small thread pool owned by the store (sqlite3 blocks; the event loop never
does), each worker thread with its own connection. The database uses WAL mode, so readers never
wait for a writer; every write is one ``BEGIN IMMEDIATE`` transaction, so two processes (or two
store objects) writing the same file serialise on SQLite's lock, waiting up to ``busy_timeout``
seconds before the write fails with :class:`StoreUnavailableError`.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`; :func:`_migrate` upgrades older files)::

    teams   (team_id TEXT PRIMARY KEY, document TEXT, updated_at REAL)
    keys    (key_hash TEXT PRIMARY KEY, team_id, key_alias, user_id, metadata TEXT, created_at)
    changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, team_id TEXT, writer TEXT, at REAL)

``changes`` is a short log (the last :data:`CHANGE_LOG_SIZE` writes) that lets a store see writes
made by *other* processes: once started, it polls the log every ``poll_interval`` seconds and
calls its listeners with the team ids others changed (``"*"`` when it fell too far behind).

WAL needs a local filesystem (not NFS/SMB); a new database file is created readable by its owner
only, since it holds destination credentials (encrypt them too: ``encryption_key``). Replaced rows
are zeroed on disk (``secure_delete``), so once encryption is on and a team is written again, its
old clear-text secret is gone from the file after the next checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import StoreUnavailableError
from ..settings import TeamSettings
from ._codec import EncryptionKey, SettingsCodec, check_id
from ._listeners import notify_listeners
from .base import ChangeListener, KeyRecord

logger = logging.getLogger("team_logging_middleware.stores")

__all__ = ["CHANGE_LOG_SIZE", "SCHEMA_VERSION", "SQLiteSettingsStore"]

T = TypeVar("T")

SCHEMA_VERSION = 1
CHANGE_LOG_SIZE = 1000


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS teams ("
        " team_id TEXT PRIMARY KEY NOT NULL,"
        " document TEXT NOT NULL,"
        " updated_at REAL NOT NULL)"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS keys ("
        " key_hash TEXT PRIMARY KEY NOT NULL,"
        " team_id TEXT,"
        " key_alias TEXT,"
        " user_id TEXT,"
        " metadata TEXT NOT NULL,"
        " created_at REAL NOT NULL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS keys_team_id ON keys (team_id)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS changes ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " team_id TEXT NOT NULL,"
        " writer TEXT NOT NULL,"
        " at REAL NOT NULL)"
    )


# _MIGRATIONS[n] upgrades a database at user_version n to n + 1. Append, never edit.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_0_to_1,)
assert len(_MIGRATIONS) == SCHEMA_VERSION


def _migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` in one transaction; return the old version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read the version under the write lock: another process may have migrated meanwhile.
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreUnavailableError(
                f"the settings database has schema version {version}, newer than this "
                f"version of team-logging-middleware understands ({SCHEMA_VERSION}); upgrade it"
            )
        for step in _MIGRATIONS[version:]:
            step(conn)
        if version != SCHEMA_VERSION:
            # PRAGMA takes no parameters; the value is our own integer constant.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return version


class SQLiteSettingsStore:
    """A :class:`~team_logging_middleware.stores.base.SettingsStore` in one SQLite file.

    Args:
        path: the database file (created if missing, with mode 0600). ``":memory:"`` is refused:
            use :class:`~team_logging_middleware.stores.memory.MemorySettingsStore` instead.
        encryption_key: a Fernet key (or a list, to rotate) to encrypt secret callback vars at
            rest; see :mod:`team_logging_middleware.stores._codec` for how to generate one.
        busy_timeout: seconds a write waits for another writer's lock before it fails.
        poll_interval: seconds between checks for other processes' writes once the store is
            started (:meth:`start`, or the first :meth:`subscribe` inside a running loop);
            None turns cross-process change detection off.
        max_threads: size of the store's thread pool (one connection per thread).

    Listeners are called synchronously after each local write, and from the poller for other
    writers' changes. A listener that raises is logged and skipped.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encryption_key: EncryptionKey | None = None,
        busy_timeout: float = 5.0,
        poll_interval: float | None = 1.0,
        max_threads: int = 4,
    ) -> None:
        self._path = os.fspath(path)
        if self._path in ("", ":memory:") or self._path.startswith("file:"):
            raise ValueError(
                "SQLiteSettingsStore needs a file path; use MemorySettingsStore for an "
                "in-memory store"
            )
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        if poll_interval is not None and poll_interval <= 0:
            raise ValueError("poll_interval must be > 0 (or None to turn polling off)")
        self._codec = SettingsCodec(encryption_key)
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, max_threads), thread_name_prefix="tlm-sqlite"
        )
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._writer = uuid.uuid4().hex
        self._listeners: list[ChangeListener] = []
        self._listeners_lock = threading.Lock()
        self._closed = False
        self._poller: asyncio.Task[None] | None = None
        self._poll_failing = False

    @property
    def path(self) -> str:
        return self._path

    # -- the SettingsStore protocol -----------------------------------------------------------

    async def get_team(self, team_id: str) -> TeamSettings | None:
        check_id(team_id, "team_id")

        def read(conn: sqlite3.Connection) -> TeamSettings | None:
            row = conn.execute(
                "SELECT document FROM teams WHERE team_id = ?", (team_id,)
            ).fetchone()
            return None if row is None else self._codec.load_team(row[0], team_id=team_id)

        return await self._run(read, f"reading team {team_id!r}")

    async def put_team(self, settings: TeamSettings) -> None:
        team_id = check_id(settings.team_id, "team_id")
        # Serialise (and encrypt) on the loop: the settings object is the caller's and must not
        # be read from another thread while the caller may be changing it.
        document = self._codec.dump_team(settings)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO teams (team_id, document, updated_at) VALUES (?, ?, ?)",
                (team_id, document, time.time()),
            )
            self._log_change(conn, team_id)

        await self._run(functools.partial(self._transaction, write), f"writing team {team_id!r}")
        self._notify(team_id)

    async def delete_team(self, team_id: str) -> bool:
        check_id(team_id, "team_id")

        def write(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute("DELETE FROM teams WHERE team_id = ?", (team_id,)).rowcount > 0
            self._log_change(conn, team_id)
            return deleted

        try:
            return await self._run(
                functools.partial(self._transaction, write), f"deleting team {team_id!r}"
            )
        finally:
            # Like the memory store: notify even when nothing was stored (idempotent), and even
            # when the outcome is unknown, so no planner keeps a plan it cannot trust.
            self._notify(team_id)

    async def list_team_ids(self) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT team_id FROM teams ORDER BY team_id").fetchall()
            return [row[0] for row in rows]

        return await self._run(read, "listing teams")

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        check_id(key_hash, "key_hash")

        def read(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(
                "SELECT team_id, key_alias, user_id, metadata, created_at FROM keys"
                " WHERE key_hash = ?",
                (key_hash,),
            ).fetchone()
            if row is None:
                return None
            return KeyRecord(
                key_hash=key_hash,
                team_id=row[0],
                key_alias=row[1],
                user_id=row[2],
                metadata=self._codec.load_metadata(row[3], key_hash=key_hash),
                created_at=float(row[4]),
            )

        return await self._run(read, "reading a key")

    async def put_key(self, key: KeyRecord) -> None:
        for name in ("key_hash", "team_id", "key_alias", "user_id"):
            value = getattr(key, name)
            if value is not None:
                check_id(value, name)
        metadata = self._codec.dump_metadata(key.metadata)
        values = (key.key_hash, key.team_id, key.key_alias, key.user_id, metadata, key.created_at)
        changed = key.team_id if key.team_id is not None else "*"

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO keys"
                " (key_hash, team_id, key_alias, user_id, metadata, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                values,
            )
            self._log_change(conn, changed)

        await self._run(functools.partial(self._transaction, write), "writing a key")
        self._notify(changed)

    def subscribe(self, listener: ChangeListener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)
        # Start watching other processes' writes as soon as someone listens, if we can. The
        # runtime calls start() from the lifespan anyway; this covers stores used without it.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._start_poller(None)

    async def health(self) -> dict[str, Any]:
        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                "teams": conn.execute("SELECT count(*) FROM teams").fetchone()[0],
                "keys": conn.execute("SELECT count(*) FROM keys").fetchone()[0],
                "schema_version": conn.execute("PRAGMA user_version").fetchone()[0],
            }

        base: dict[str, Any] = {
            "backend": "sqlite",
            "path": self._path,
            "encrypted": self._codec.encrypts,
            "change_poller": self._poller is not None and not self._poller.done(),
        }
        try:
            counts = await self._run(read, "reading health figures")
        except StoreUnavailableError as exc:
            return {**base, "reachable": False, "error": str(exc)}
        return {**base, "reachable": True, **counts}

    async def aclose(self) -> None:
        """Stop the poller, the thread pool and every connection. Idempotent.

        Later calls raise :class:`StoreUnavailableError`; the data stays in the file.
        """
        if self._closed:
            return
        self._closed = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        # Wait for calls already running in the pool (a write in flight completes) off the loop.
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- lifecycle extras ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open (and create or migrate) the database now, and start watching other writers.

        Optional: the first call does the same lazily. Raises :class:`StoreUnavailableError` when
        the file cannot be opened, so a gateway fails at startup rather than at its first request.
        """
        last_seq = await self._run(self._last_change, "opening the database")
        self._start_poller(last_seq)

    # -- internals ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T], action: str) -> T:
        if self._closed:
            raise StoreUnavailableError(f"the SQLite settings store {self._path!r} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(self._call, fn, action)
            )
        except RuntimeError as exc:
            if self._closed or "shutdown" in str(exc):
                raise StoreUnavailableError(
                    f"the SQLite settings store {self._path!r} is closed"
                ) from None
            raise

    def _call(self, fn: Callable[[sqlite3.Connection], T], action: str) -> T:
        """Runs in a pool thread: get this thread's connection, then do the work."""
        try:
            conn = self._connection()
            self._ensure_schema(conn)
            return fn(conn)
        except sqlite3.Error as exc:
            raise self._unavailable(exc, action) from exc

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        self._create_file()
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            # Autocommit: this module issues BEGIN IMMEDIATE / COMMIT itself.
            isolation_level=None,
            # The connection is used by one pool thread only; aclose() closes it from another
            # after the pool has stopped.
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000):d}")
            # Zero the bytes of replaced and deleted rows: an old document may hold a secret in
            # clear (written before encryption was turned on, or a rotated credential).
            conn.execute("PRAGMA secure_delete = ON")
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _create_file(self) -> None:
        # Create the database file owner-only before SQLite does (its -wal and -shm files copy
        # the main file's permissions): it holds destination credentials.
        try:
            fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StoreUnavailableError(
                f"the SQLite settings store cannot create {self._path!r}: {exc.strerror}"
            ) from exc
        os.close(fd)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite settings store %r could not use WAL mode (got %r): readers will "
                    "wait for writers",
                    self._path,
                    mode,
                )
            old = _migrate(conn)
            if old != SCHEMA_VERSION:
                logger.info(
                    "SQLite settings store %r migrated from schema %d to %d",
                    self._path,
                    old,
                    SCHEMA_VERSION,
                )
            self._schema_ready = True

    @staticmethod
    def _transaction(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a transaction
        # never fails half-way on a lock upgrade the busy handler cannot retry.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return result

    def _log_change(self, conn: sqlite3.Connection, team_id: str) -> None:
        cursor = conn.execute(
            "INSERT INTO changes (team_id, writer, at) VALUES (?, ?, ?)",
            (team_id, self._writer, time.time()),
        )
        seq = cursor.lastrowid
        if seq is not None and seq > CHANGE_LOG_SIZE:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (seq - CHANGE_LOG_SIZE,))

    @staticmethod
    def _last_change(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def _unavailable(self, exc: sqlite3.Error, action: str) -> StoreUnavailableError:
        # sqlite3 messages name tables and columns, never bound values, so they are safe to show.
        detail = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in detail or "busy" in detail):
            return StoreUnavailableError(
                f"the SQLite settings store {self._path!r} stayed locked by another writer for "
                f"longer than busy_timeout={self._busy_timeout}s while {action}; retry"
            )
        return StoreUnavailableError(
            f"the SQLite settings store {self._path!r} failed while {action}: "
            f"{type(exc).__name__}: {detail}"
        )

    def _notify(self, team_id: str) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        notify_listeners(listeners, team_id)

    # -- watching other processes ---------------------------------------------------------------

    def _start_poller(self, last_seq: int | None) -> None:
        if self._poll_interval is None or self._closed:
            return
        if self._poller is not None and not self._poller.done():
            return
        loop = asyncio.get_running_loop()
        # A fresh context: a poller started lazily inside a request must not carry that
        # request's contextvars for the rest of its life.
        self._poller = contextvars.Context().run(
            loop.create_task, self._poll(last_seq), name="tlm-sqlite-changes"
        )

    async def _poll(self, last_seq: int | None) -> None:
        interval = self._poll_interval
        assert interval is not None
        while last_seq is None:
            try:
                last_seq = await self._run(self._last_change, "reading the change log")
            except StoreUnavailableError as exc:
                self._poll_failed(exc)
                await asyncio.sleep(interval)
        seq: int = last_seq
        while True:
            await asyncio.sleep(interval)
            try:
                seq, changed = await self._run(
                    functools.partial(self._changes_since, seq), "reading the change log"
                )
            except StoreUnavailableError as exc:
                self._poll_failed(exc)
                continue
            if self._poll_failing:
                self._poll_failing = False
                logger.info("SQLite settings store %r: change log readable again", self._path)
            for team_id in changed:
                self._notify(team_id)

    def _changes_since(self, last_seq: int, conn: sqlite3.Connection) -> tuple[int, list[str]]:
        """The newest change seen and the team ids other writers changed since ``last_seq``."""
        rows = conn.execute(
            "SELECT seq, team_id, writer FROM changes WHERE seq > ? ORDER BY seq",
            (last_seq,),
        ).fetchall()
        if not rows:
            return last_seq, []
        if rows[0][0] > last_seq + 1:
            # Entries we never saw were pruned: anything may have changed.
            return int(rows[-1][0]), ["*"]
        changed: list[str] = []
        for _, team_id, writer in rows:
            if writer != self._writer and team_id not in changed:
                changed.append(team_id)
        if "*" in changed:
            changed = ["*"]
        return int(rows[-1][0]), changed

    def _poll_failed(self, exc: StoreUnavailableError) -> None:
        if not self._poll_failing:
            self._poll_failing = True
            logger.warning("SQLite settings store: cannot read the change log: %s", exc)
