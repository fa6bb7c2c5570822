"""Writing into a job's output folder so that a failed write never damages an existing file.

* :func:`atomic_write` writes a file through a temporary file in the same folder, flushed to
  disk (``fsync``) and renamed over the final name (``os.replace``, atomic on POSIX and
  Windows): a reader sees the old file or the complete new one. On an error the temporary file
  is removed; a killed process leaves a ``.<name>.<12 hex digits>.tmp`` file, which nothing reads.
* :func:`write_json` writes a JSON file with :func:`atomic_write`.
* :func:`append_or_roll_back` appends to a file (``metrics.json``) and, if the write fails part
  way, truncates the file back to its previous length, so it never ends in half a line.
* :func:`write_error` turns the ``OSError`` of a failed write (the disk is full, the folder is
  read-only, ...; :func:`os_error_of` finds it behind the ``RuntimeError`` that ``torch.save``
  raises then) into an :class:`OutputWriteError` whose message names the file, the folder,
  the space the write needed and the space that is free, and says what was kept.

Test seam: the environment variable ``DINO_D2_CHECKPOINT_WRITE_DELAY`` (seconds, a float) makes
:func:`atomic_write` sleep after the temporary file is complete and before it is renamed, so that
a test can kill the process in that window. It is read at every write; unset or empty means no
delay. Do not set it outside tests.
"""

import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from typing import IO, Any, Callable, Optional

__all__ = [
    "OutputWriteError",
    "atomic_write",
    "append_or_roll_back",
    "write_json",
    "write_error",
    "os_error_of",
    "fsync_dir",
    "format_size",
    "TEMPORARY_FILE",
    "WRITE_DELAY_ENV",
]

logger = logging.getLogger(__name__)

WRITE_DELAY_ENV = "DINO_D2_CHECKPOINT_WRITE_DELAY"

# The temporary files of atomic_write: ".<final name>.<12 hex digits>.tmp".
TEMPORARY_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class OutputWriteError(OSError):
    """A file of the output folder could not be written; the message says why and what was kept.

    Attributes:
        folder: the folder written to.
        needed_bytes: the size of what was being written, when known.
        free_bytes: the space free in that folder's file system after the failure, when known.
    """

    def __init__(self, message: str, *, folder: str, needed_bytes=None, free_bytes=None, code=None):
        super().__init__(message)
        self.errno = code
        self.folder = folder
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes

    def __str__(self) -> str:
        return self.args[0]


def format_size(num_bytes: Optional[float]) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if num_bytes is None:
        return "an unknown amount"
    value = float(num_bytes)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _free_bytes(folder: str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_error(
    error: OSError,
    path: str,
    *,
    needed_bytes: Optional[int] = None,
    kept: str = "",
    advice: str = "",
    name: Optional[str] = None,
) -> OutputWriteError:
    """An :class:`OutputWriteError` for a failed write of ``path``.

    Args:
        error: the error of the write.
        path: the file being written.
        name: what to call it in the message; default: the file's name.
        needed_bytes: the size of the whole file, when known.
        kept: a sentence saying what is unchanged on disk.
        advice: a sentence saying how to go on (after the space or permission fix).

    Returns:
        the error to raise (``raise write_error(...) from error``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    free = _free_bytes(folder)
    reason = error.strerror or str(error)
    message = f"Could not write {name or os.path.basename(path)} in {folder}: {reason}"
    if error.errno in _FULL:
        message += " (the disk is full)."
        if needed_bytes is not None and free is not None:
            missing = max(needed_bytes - free, 0)
            message += (
                f" Writing it needs {format_size(needed_bytes)} and the folder's file system has "
                f"{format_size(free)} free: free at least {format_size(missing)} more, or use a "
                "folder on another disk."
            )
        else:
            message += f" The folder's file system has {format_size(free)} free."
    elif error.errno in _NOT_WRITABLE:
        if error.errno == errno.EROFS:
            message += " (the folder's file system is mounted read-only)."
        else:
            message += " (this user may not write in that folder)."
        if needed_bytes is not None:
            message += (
                f" Writing it needs {format_size(needed_bytes)}; the folder's file system has "
                f"{format_size(free)} free."
            )
    else:
        message += f". The folder's file system has {format_size(free)} free."
    for sentence in (kept, advice):
        if sentence:
            message += f" {sentence}"
    return OutputWriteError(
        message, folder=folder, needed_bytes=needed_bytes, free_bytes=free, code=error.errno
    )


def os_error_of(error: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``error``: itself, or the first one among its causes and contexts.

    ``torch.save`` into a file that fails with ``ENOSPC`` raises a ``RuntimeError`` of its zip
    writer ("unexpected pos ...") whose context is the ``OSError``.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_delay() -> float:
    value = os.environ.get(WRITE_DELAY_ENV, "")
    return float(value) if value else 0.0


def fsync_dir(folder: str) -> None:
    """Makes a rename in ``folder`` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO], None], *, mode: str = "wb") -> None:
    """Writes ``path`` through a temporary file in its folder, then renames it into place.

    Args:
        path: the final local file path.
        write: called with the open temporary file; writes the whole content.
        mode: ``"wb"`` or ``"w"``.

    On any error (or a kill) before the rename, ``path`` is left as it was; on an error the
    temporary file is removed and the error is raised as it came.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # Permissions as for a file opened normally (the umask applies), unlike tempfile's 0600.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        delay = _write_delay()
        if delay > 0:
            logger.warning(f"{WRITE_DELAY_ENV}: sleeping {delay}s before renaming {path}")
            time.sleep(delay)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    fsync_dir(folder)


def append_or_roll_back(path: str, data: bytes) -> None:
    """Appends ``data`` to ``path`` (created if missing), all of it or nothing.

    If the write fails part way (a full disk), the file is truncated back to its length before
    the call and the error is raised as it came.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON with :func:`atomic_write`.

    Raises:
        OutputWriteError: the write failed; ``path`` is as it was before the call.
    """
    text = json.dumps(obj, indent=2)
    try:
        atomic_write(path, lambda f: f.write(text), mode="w")
    except OSError as error:
        kept = f"{os.path.basename(path)} is as it was before." if os.path.exists(path) else ""
        raise write_error(error, path, needed_bytes=len(text.encode("utf-8")), kept=kept) from error
