"""One exported file, written atomically: checked before any work, written under a temporary name
beside it, moved into place with one ``os.replace``.

An existing file at the destination is replaced only when it is a file of the same format (a GGUF
file starts with the bytes ``GGUF``; an ONNX file is a protobuf with no magic number, so only its
name is checked); anything else there is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SUFFIXES = {"gguf": ".gguf", "onnx": ".onnx"}
GGUF_MAGIC = b"GGUF"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_file(path: str | os.PathLike, format: str) -> Path:
    """``path`` as a Path, or a ValueError naming ``path`` when the export could not be written
    there: a wrong suffix, a folder, a file of another kind, an unwritable folder."""
    suffix = SUFFIXES[format]
    if not str(path).strip():
        raise ValueError("path: expected a file path, got an empty string")
    target = Path(path)
    if target.suffix.lower() != suffix:
        raise ValueError(f"path: a {format.upper()} file name ends in {suffix}; got {str(path)!r}")
    if target.is_dir():
        raise ValueError(f"path: {target} is a folder; expected a file path")
    if target.exists():
        if not target.is_file():
            raise ValueError(f"path: {target} exists and is not a regular file")
        if format == "gguf" and _head(target) != GGUF_MAGIC:
            raise ValueError(f"path: {target} exists and is not a GGUF file; not replacing it")
        if not os.access(target, os.W_OK):
            raise ValueError(f"path: {target} is not writable")
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise ValueError(f"path: cannot create {target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"path: cannot write {target}: folder {parent} is not writable")
    return target


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(len(GGUF_MAGIC))


@contextlib.contextmanager
def temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target`` (same folder, so the final rename is atomic); removed on
    any error, never left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_atomically(target: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(temporary)``, move the temporary file onto ``target`` (mode as a new file's) and
    return what ``write`` returned."""
    with temporary_beside(target) as temporary:
        result = write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    return result
