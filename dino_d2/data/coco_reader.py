"""Reading a COCO json file, whole or streamed, with syntax errors that say where.

:func:`read_coco_json` parses a whole file with Python's json (the small-dataset path).
:func:`iter_entries` streams the entries of one of its lists (``images``, ``annotations``) with
ijson's C backend (yajl2), one entry at a time, so a file of any size is read in bounded memory
(the cache of :mod:`dino_d2.data.coco_cache`). Both report a file that is not JSON with the file,
the dataset, the line, the column and the text around the error (with a caret under it), and ask
whether the file is truncated when it does not end with ``}``. The streamed path gives the
position in bytes (the json path in characters; the same for ASCII files) and the parser's own
message (yajl's, e.g. ``parse error: premature EOF``).
"""

import codecs
import functools
import json
import logging
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import ijson

from .coco_json import CocoFormatError, entries_of, file_and_dataset

__all__ = ["read_coco_json", "iter_entries", "check_json_object", "excerpt", "ijson_backend"]

logger = logging.getLogger(__name__)

_CONTEXT_CHARS = 60  # characters of the file shown on each side of a JSON syntax error
_WINDOW = 4096  # bytes read on each side of a streamed syntax error for its excerpt
_TRUNCATED_HINT = (
    "\nThe file does not end with '}': is it truncated (an interrupted copy or download)?"
)
_NAN_HINT = (
    "\nNaN and Infinity are not JSON (Python's json.dump writes them unless allow_nan=False); "
    "dataset.cache=False reads the file with Python's json, which accepts them."
)
_DELIMITERS = (b" ", b"\n", b"\r", b"\t", b"{", b"}", b"[", b"]", b",", b":")
_KINDS = {b"[": "list", b'"': "str", b"t": "bool", b"f": "bool", b"n": "NoneType"}


def excerpt(text: str, position: int) -> str:
    """The line of ``text`` around ``position``, cut to a window, with a caret under it."""
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    end = len(text) if end < 0 else end
    left = max(start, position - _CONTEXT_CHARS)
    right = min(end, position + _CONTEXT_CHARS)
    prefix = "..." if left > start else ""
    suffix = "..." if right < end else ""
    line = prefix + text[left:right] + suffix
    caret = " " * (len(prefix) + position - left) + "^"
    return f"    {line}\n    {caret}"


def read_coco_json(json_file: str, dataset_name: Optional[str] = None) -> Dict:
    """Reads a COCO json file.

    Args:
        json_file: the file.
        dataset_name: named in the errors.

    Returns:
        the parsed json object (a dict).

    Raises:
        CocoFormatError: the file is not UTF-8 JSON, or not a JSON object; the message names the
            file and the dataset and, for a syntax error, gives the line, the column and the
            text around the error.
    """
    where = file_and_dataset(json_file, dataset_name)
    with open(json_file, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CocoFormatError(
            f"{where} is not UTF-8 text (byte {error.start}: {error.reason}); a COCO json is "
            "UTF-8 JSON"
        ) from error
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        truncated = not text.rstrip().endswith("}")
        hint = (
            "\nThe file does not end with '}': is it truncated (an interrupted copy or download)?"
        )
        raise CocoFormatError(
            f"{where} is not valid JSON: {error.msg}: line {error.lineno}, column {error.colno} "
            f"(character {error.pos} of {len(text)}):\n{excerpt(text, error.pos)}"
            + (hint if truncated else "")
        ) from error
    if not isinstance(content, dict):
        raise CocoFormatError(
            f"{where} holds a JSON {type(content).__name__}; a COCO json is an object with "
            "'images', 'annotations' and 'categories'"
        )
    return content


@functools.lru_cache(maxsize=None)
def ijson_backend():
    """ijson's C backend (yajl2_c); else its default backend (much slower), with a warning."""
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        logger.warning(
            f"ijson's C backend (yajl2_c) is not available; using '{ijson.backend}', which is "
            "much slower on large files. Reinstall ijson from a wheel for your platform."
        )
        return ijson


class _TrackedFile:
    """A binary file that remembers the last chunk the parser read and where it starts.

    A UTF-8 byte order mark at the start is skipped (as ``utf-8-sig`` does on the json path).
    """

    def __init__(self, file):
        self._file = file
        self.chunk = b""
        self.start = 0  # the offset in the file of chunk[0]
        self._first = True

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        data = self._file.read(size)
        self.start += len(self.chunk)
        if self._first:
            self._first = False
            if data.startswith(codecs.BOM_UTF8):
                data = data[len(codecs.BOM_UTF8) :]
                self.start += len(codecs.BOM_UTF8)
        self.chunk = data
        return data


def _message(error: Exception) -> str:
    """yajl's message (bytes when it quotes bytes that are not UTF-8)."""
    message = error.args[0] if error.args else str(error)
    if isinstance(message, bytes):
        return message.decode("utf-8", "surrogateescape")
    return str(message)


def _error_position(error: Exception, tracked: _TrackedFile, size: int) -> Optional[int]:
    """The byte offset of a yajl syntax error, found from the text it quotes, or None.

    yajl's message is ``<what>\\n<up to 30 bytes before><up to 30 after>\\n(right here) --^``,
    with newlines shown as spaces, quoted from the chunk it was parsing.
    """
    lines = _message(error).split("\n")
    if "premature EOF" in lines[0]:
        return size
    if len(lines) < 3 or "^" not in lines[2]:
        return None
    caret = lines[2].index("^")
    before = lines[1][:caret].lstrip(" ").encode("utf-8", "surrogateescape")
    after = lines[1][caret:].rstrip(" ").encode("utf-8", "surrogateescape")
    chunk = tracked.chunk.replace(b"\n", b" ").replace(b"\r", b" ")
    found = chunk.rfind(before + after)
    return None if found < 0 else tracked.start + found + len(before)


def _line_and_column(json_file: str, position: int) -> Tuple[int, int]:
    """The 1-based line and column (in bytes) of a byte offset, counted in 1 MiB blocks."""
    lines, last_newline, offset = 1, -1, 0
    with open(json_file, "rb") as f:
        while offset < position:
            block = f.read(min(1 << 20, position - offset))
            if not block:
                break
            newlines = block.count(b"\n")
            if newlines:
                lines += newlines
                last_newline = offset + block.rindex(b"\n")
            offset += len(block)
    return lines, position - last_newline


def _tail_is_brace(json_file: str, size: int) -> bool:
    with open(json_file, "rb") as f:
        f.seek(max(0, size - 64))
        return f.read().rstrip().endswith(b"}")


def _syntax_error(json_file: str, where: str, error: Exception, tracked: _TrackedFile):
    """The :class:`CocoFormatError` for an ijson error, with the position and an excerpt."""
    size = os.path.getsize(json_file)
    what = _message(error).split("\n")[0]
    position = _error_position(error, tracked, size)
    hint = "" if _tail_is_brace(json_file, size) else _TRUNCATED_HINT
    if position is None:
        return CocoFormatError(f"{where} is not valid JSON: {what} (position unknown)" + hint)
    low = max(0, position - _WINDOW)
    with open(json_file, "rb") as f:
        f.seek(low)
        window = f.read(position - low + _WINDOW)
    if position < size:
        # yajl stops a byte or two into the offending token: point at its start.
        while position > low and window[position - low - 1 : position - low] not in _DELIMITERS:
            position -= 1
    if "UTF8" in what:
        return CocoFormatError(
            f"{where} is not UTF-8 text (byte {position}: {what}); a COCO json is UTF-8 JSON"
        )
    line, column = _line_and_column(json_file, position)
    before = window[: position - low].decode("utf-8", "replace")
    text = before + window[position - low :].decode("utf-8", "replace")
    if text[len(before) :].lstrip("-").startswith(("NaN", "Infinity")):
        hint += _NAN_HINT
    return CocoFormatError(
        f"{where} is not valid JSON: {what}: line {line}, column {column} (byte {position} of "
        f"{size}):\n{excerpt(text, len(before))}" + hint
    )


def check_json_object(json_file: str, dataset_name: Optional[str] = None) -> None:
    """Raises :class:`CocoFormatError` unless the file's first value starts as a JSON object."""
    with open(json_file, "rb") as f:
        head = f.read(4096)
    head = head[len(codecs.BOM_UTF8) :] if head.startswith(codecs.BOM_UTF8) else head
    first = head.lstrip()[:1]
    if first in (b"{", b""):
        return
    kind = _KINDS.get(first, "number" if first in b"-0123456789" else "value")
    raise CocoFormatError(
        f"{file_and_dataset(json_file, dataset_name)} holds a JSON {kind}; a COCO json is an "
        "object with 'images', 'annotations' and 'categories'"
    )


def _stream(json_file: str, prefix: str, where: str) -> Iterator[Any]:
    with open(json_file, "rb") as f:
        tracked = _TrackedFile(f)
        try:
            yield from ijson_backend().items(tracked, prefix, use_float=True)
        except ijson.JSONError as error:
            raise _syntax_error(json_file, where, error, tracked) from error
        except UnicodeDecodeError as error:
            raise CocoFormatError(
                f"{where} is not UTF-8 text ({error.reason}); a COCO json is UTF-8 JSON"
            ) from error


def iter_entries(
    json_file: str, key: str, dataset_name: Optional[str] = None, *, required: bool
) -> Iterator[Any]:
    """Streams the entries of the top-level list ``key`` of a json file, in file order.

    One entry is held at a time. Numbers are ``int`` or ``float`` (as Python's json gives them).

    Args:
        json_file: the file.
        key: ``"images"``, ``"annotations"`` or ``"categories"``.
        dataset_name: named in the errors.
        required: whether a missing or null ``key`` is an error (else it streams nothing).

    Raises:
        CocoFormatError: the file is not JSON (with the position), not an object, or ``key`` is
            not a list (or missing while ``required``).
    """
    where = file_and_dataset(json_file, dataset_name)
    check_json_object(json_file, dataset_name)
    empty = True
    for entry in _stream(json_file, f"{key}.item", where):
        empty = False
        yield entry
    if empty:
        # Nothing streamed: the list is empty, or the key is missing or not a list.
        # (a null value reads as a missing key here)
        values = _stream(json_file, key, where)
        try:
            whole = next(values, None)
        finally:
            values.close()
        entries_of({} if whole is None else {key: whole}, key, where, required=required)
