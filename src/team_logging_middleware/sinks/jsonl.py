"""The ``jsonl`` destination: one JSON record per line, appended to a file on the server.

Team admins may be delegated the right to configure their own destinations, so ``jsonl_path`` is
confined to one base directory (``jsonl_dir``; default ``./logs`` under the working directory):
relative paths are taken inside it, and absolute paths or ``..`` that leave it are refused when the
settings are written. The check is repeated on every write, after symlinks are resolved, so a link
planted inside the directory later cannot redirect the records elsewhere.

Files are created with mode 0600 (records hold prompts and outputs). Each batch is written with a
single ``O_APPEND`` write under a per-path lock, so concurrent writers never interleave lines.
All file work runs in a thread: the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SettingsError, SinkError
from ..records import LogRecord
from .base import Sink, SinkContext, SinkType

__all__ = ["DEFAULT_JSONL_DIR", "SINK_TYPE", "JsonlSink", "jsonl_sink_type", "resolve_jsonl_path"]

DEFAULT_JSONL_DIR = "logs"
_PARAM = "callback_vars.jsonl_path"
_RETRYABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.EIO, errno.EBUSY}
)
# Lock striping: a bounded set of locks shared by all paths, so the table never grows with the
# number of destinations while two writers of one file are still serialised.
_LOCKS = tuple(threading.Lock() for _ in range(64))


def _lock_for(path: Path) -> threading.Lock:
    return _LOCKS[hash(str(path)) % len(_LOCKS)]


def _refused(reason: str) -> SettingsError:
    # The server's own directory layout is not revealed to a team admin.
    return SettingsError(
        f"{_PARAM}: {reason}; give a file path inside the server's JSONL log directory, "
        "e.g. 'team-a/requests.jsonl' (absolute paths and '..' that leave it are refused)",
        param=_PARAM,
    )


def resolve_jsonl_path(base_dir: Path, value: str) -> Path:
    """Where ``value`` points inside ``base_dir`` (symlinks resolved); ``SettingsError`` outside."""
    if not value or not value.strip():
        raise _refused("the path is empty")
    if "\0" in value:
        raise _refused("the path contains a NUL character")
    base = Path(os.path.realpath(base_dir))
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = base / candidate
    target = Path(os.path.realpath(candidate))
    if target == base or not target.is_relative_to(base):
        raise _refused(f"{value!r} is outside the JSONL log directory")
    return target


def json_line(value: Any, separators: tuple[str, str] | None = None) -> str:
    """``value`` as JSON that every line reader sees as one line.

    ``default=str``: a user-supplied metadata value that JSON cannot express is written as text
    rather than losing the whole batch. U+2028, U+2029 and U+0085 are valid raw inside JSON
    strings, but ``str.splitlines()`` and JavaScript break lines at them, and clients choose the
    text: they are written as escapes, which decode to the same string.
    """
    text = json.dumps(value, ensure_ascii=False, default=str, separators=separators)
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        text = text.replace("\x85", "\\u0085")
    return text


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate becomes U+FFFD instead of failing the whole batch.

    A client's JSON may hold escapes such as ``"\\ud800"``: valid JSON, decoded into a string
    that has no UTF-8 encoding.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _serialise(batch: Sequence[LogRecord]) -> bytes:
    return utf8("".join(json_line(record.to_dict()) + "\n" for record in batch))


class JsonlSink:
    """Appends records to one JSONL file inside the base directory."""

    def __init__(self, base_dir: Path, jsonl_path: str) -> None:
        self._base = base_dir
        self._value = jsonl_path  # as the team wrote it: the only form shown in errors
        self.path = resolve_jsonl_path(base_dir, jsonl_path)

    async def emit(self, batch: Sequence[LogRecord]) -> None:
        if batch:
            await asyncio.to_thread(self._append, batch)

    async def check(self) -> None:
        """Raise :class:`SinkError` unless the file can be created/appended to."""
        await asyncio.to_thread(self._open_and_close)

    async def aclose(self) -> None:
        return None  # no file is held open between batches

    def _target(self) -> Path:
        try:
            return resolve_jsonl_path(self._base, self._value)
        except SettingsError as exc:
            raise SinkError(exc.message) from None

    def _open(self, target: Path) -> int:
        try:
            os.makedirs(target.parent, mode=0o750, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            return os.open(target, flags, 0o600)
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> SinkError:
        detail = exc.strerror or type(exc).__name__
        return SinkError(
            f"cannot write JSONL file {self._value!r}: {detail}",
            retryable=exc.errno in _RETRYABLE_ERRNOS,
        )

    def _append(self, batch: Sequence[LogRecord]) -> None:
        data = _serialise(batch)
        target = self._target()
        with _lock_for(target):
            fd = self._open(target)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            except OSError as exc:
                raise self._error(exc) from None
            finally:
                os.close(fd)

    def _open_and_close(self) -> None:
        os.close(self._open(self._target()))


def jsonl_sink_type(base_dir: str | os.PathLike[str] | None = None) -> SinkType:
    """The ``jsonl`` sink type confined to ``base_dir`` (default: ``./logs`` at use time)."""
    fixed = None if base_dir is None else Path(base_dir).absolute()

    def base() -> Path:
        return fixed if fixed is not None else Path.cwd() / DEFAULT_JSONL_DIR

    def validate(vars_: Mapping[str, str]) -> None:
        value = vars_.get("jsonl_path")
        if value is not None:
            resolve_jsonl_path(base(), value)

    def factory(vars_: Mapping[str, str], ctx: SinkContext) -> Sink:
        return JsonlSink(base(), vars_["jsonl_path"])

    return SinkType(
        name="jsonl",
        factory=factory,
        required_vars=frozenset({"jsonl_path"}),
        description="append one JSON record per line to a file in the server's log directory",
        validate_vars=validate,
    )


SINK_TYPE = jsonl_sink_type()
