"""Writing files all or nothing: :func:`atomic_write` (the one place this is done; masks, settings, CSV files,
plots and temperature files all go through it)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["VolumeError", "TMP_MARK", "atomic_write", "same_file"]

#: marks the hidden temporary files of :func:`atomic_write` (``.<stem>.rankseg-tmp-<hex><ext>``)
TMP_MARK = ".rankseg-tmp-"
_MULTI_SUFFIXES = (".nii.gz",)


class VolumeError(ValueError):
    """A file that cannot be used (or written) as it is; the message names the file and the fix."""


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (resolving links; False when that cannot be told)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _split_ext(name: str) -> tuple[str, str]:
    low = name.lower()
    for ext in _MULTI_SUFFIXES:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    return stem, ext


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True,
                 protected: Iterable[str | os.PathLike] = (), verify: Callable[[str], None] | None = None) -> Path:
    """Call ``write(tmp_path)`` on a hidden temporary file beside ``path``, then move it into place.

    The temporary name keeps ``path``'s extension (writers pick the format from it).  After ``write`` returns,
    the file is flushed to disk (``fsync``) and, when given, ``verify(tmp_path)`` must return without raising
    (e.g. read the file back and compare it with what was meant to be written); only then does
    :func:`os.replace` put it in place, so a reader sees the old file or the complete new one, never a part.
    Refuses a ``path`` that is one of ``protected`` (inputs) and, unless ``overwrite``, one that exists.  Nothing is
    left behind on error.

    Example:
        >>> import tempfile, pathlib
        >>> from rankseg_monai._files import atomic_write
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", lambda tmp: pathlib.Path(tmp).write_text("hi")).read_text()
        'hi'
    """
    path = Path(path)
    for p in protected:
        if same_file(path, Path(p)):
            raise VolumeError(f"refusing to write {path}: it is an input file; choose another output folder")
    if path.exists() and not overwrite:
        raise VolumeError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = _split_ext(path.name)
    tmp = path.with_name(f".{stem}{TMP_MARK}{uuid.uuid4().hex[:8]}{ext}")
    try:
        write(str(tmp))
        if not tmp.is_file():
            raise VolumeError(f"writing {path} produced no file")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if verify is not None:
            verify(str(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
