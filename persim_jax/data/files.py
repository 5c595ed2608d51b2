"""Generic file I/O: atomic writes, msgpack payloads and JSON.

Files are written atomically: to a temporary file in the destination folder,
then renamed over the final name, so an interrupted save never leaves a
half-written file behind. A msgpack file of ours carries a "format" entry
naming its kind; a file that is not of the expected kind, or one of that kind
that no longer decodes (cut short, overwritten), is refused with one
`ValueError` naming it, never a library traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file next to `path`; renames it to `path` on success.

    If the body raises (or the process dies), `path` is untouched: it keeps its
    previous content or stays absent, and the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        newline = {} if "b" in mode else {"newline": ""}
        with os.fdopen(fd, mode, **newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); the result gets the mode any
        # new file would get (0666 less the umask), before it becomes visible.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------
# msgpack


def save_msgpack(path: str | os.PathLike, payload: dict) -> None:
    """Writes `payload` (a dict of arrays, numbers, strings, lists; with a
    "format" entry naming the file's kind) as one msgpack file, atomically."""
    from flax import serialization

    with atomic_write(path) as handle:
        handle.write(serialization.msgpack_serialize(payload))


def load_msgpack(path: str | os.PathLike, file_format: str, what: str) -> dict:
    """The payload of a `save_msgpack` file whose "format" is `file_format`.

    Raises:
      ValueError: "<path>: damaged <file_format> file (<why>); delete it to
        rebuild" for a file of this kind that does not decode (cut short,
        overwritten); "<path>: not <what>" for any other file.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    return decode_msgpack(raw, file_format, what, source=os.fspath(path))


def decode_msgpack(raw: bytes, file_format: str, what: str, source: str) -> dict:
    """The payload of msgpack bytes `raw` (as `save_msgpack` writes them)
    whose "format" is `file_format`; `source` names the bytes in errors.

    Raises:
      ValueError: as `load_msgpack`, naming `source`.
    """
    from flax import serialization

    try:
        payload = serialization.msgpack_restore(raw)
    except Exception as error:      # msgpack raises several types for foreign or cut bytes
        why = _decode_failure(error, raw)
        if _carries_format(raw, file_format):
            raise ValueError(f"{source}: damaged {file_format} file ({why}); delete it to "
                             f"rebuild") from None
        raise ValueError(f"{source}: not {what} (damaged or foreign: {why})") from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ValueError(f"{source}: not {what}")
    return payload


def _carries_format(raw: bytes, file_format: str) -> bool:
    """Whether `raw` starts like a `save_msgpack` file of kind `file_format`:
    a map whose first entry is "format": file_format (the writers put it
    first), so a cut-short file of ours is told from a foreign one."""
    import msgpack

    tag = msgpack.packb("format") + msgpack.packb(file_format)
    return tag in raw[:len(tag) + 8]     # after the map header (at most 5 bytes)


def _decode_failure(error: Exception, raw: bytes) -> str:
    """msgpack's reason in a few words: "incomplete input", "extra data", ..."""
    if not raw:
        return "empty file"
    text = (str(error).strip().splitlines() or [""])[0].rstrip(".")
    for prefix in ("Unpack failed: ", "unpack(b) received "):
        text = text.removeprefix(prefix)
    return text or type(error).__name__


# ---------------------------------------------------------------------------
# JSON


def jsonable(value):
    """`value` with JSON's types only, recursively through dicts, lists and tuples.

    numpy integers, floats and bools become Python numbers, numpy arrays
    nested lists of them, tuples lists; None, strings, numbers and bools are
    kept, dict keys too. What `write_json` writes for `value`, as objects.

    Raises:
      TypeError: naming the type of a value JSON cannot hold.
    """
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value.item() if isinstance(value, np.generic) else value     # np.float64, np.str_
    return jsonable(_json_default(value))


def write_json(path: str | os.PathLike, payload) -> None:
    """Writes `payload` as JSON, atomically: indent 1, a trailing newline,
    numpy values and tuples as `jsonable` turns them.

    Raises:
      TypeError: naming the type of a value JSON cannot hold (nothing is
        written).
    """
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=1, default=_json_default)
        handle.write("\n")


def _json_default(value):
    """One value that `json` cannot write, as one it can (its items may need
    this again): numpy scalars as Python numbers, arrays and tuples as lists."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
