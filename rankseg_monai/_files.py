"""Writing files all or nothing: :func:`atomic_write` (the one place this is done; masks, records, CSV files,
plots and temperature files all go through it), and the helpers around it: :func:`stage` / :func:`commit` for
files that must land together (a mask and its record), :func:`sha256_file`, and :func:`clean_temporaries` for the
hidden temporaries a killed process leaves behind."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["VolumeError", "TMP_MARK", "atomic_write", "stage", "commit", "discard", "check_target", "same_file",
           "sha256_file",
           "is_temporary", "clean_temporaries"]

#: marks the hidden temporary files of :func:`atomic_write` (``.<stem>.rankseg-tmp-<8 hex><ext>``)
TMP_MARK = ".rankseg-tmp-"
_TMP_NAME = re.compile(r"^\..*\.rankseg-tmp-[0-9a-f]{8}(\.[^/]*)?$", re.DOTALL)
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


def _utf8_safe(text: str) -> str:
    """``text`` with every character that is not valid UTF-8 (undecodable bytes of a file name) replaced by ``_``:
    C++ libraries (SimpleITK) abort on such names, and only the temporary name is seen by the writer."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "replace").replace("\ufffd", "_")


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


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s hidden temporaries."""
    return bool(_TMP_NAME.match(name))


def stage(path: str | os.PathLike, write: Callable[[str], None], *,
          verify: Callable[[str], None] | None = None) -> Path:
    """First half of an atomic write: ``write(tmp)`` on a hidden temporary file beside ``path``, ``fsync`` it, then
    ``verify(tmp)`` when given.  Returns the temporary; the caller must :func:`commit` or :func:`discard` it.  On
    error nothing is left behind.

    The temporary name keeps ``path``'s extension (writers pick the format from it) and is valid UTF-8 even when
    ``path`` is not.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = _split_ext(path.name)
    tmp = path.with_name(f".{_utf8_safe(stem)}{TMP_MARK}{uuid.uuid4().hex[:8]}{_utf8_safe(ext)}")
    try:
        write(str(tmp))
        if not tmp.is_file():
            raise VolumeError(f"writing {path} produced no file")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if verify is not None:
            verify(str(tmp))
    except BaseException:
        discard(tmp)
        raise
    return tmp


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Second half of an atomic write: move the staged ``tmp`` into place (:func:`os.replace`) and sync the folder,
    so a reader sees the old file or the complete new one, never a part."""
    path = Path(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def discard(*tmps: str | os.PathLike | None) -> None:
    """Remove staged temporaries that were not committed (missing ones are fine)."""
    for tmp in tmps:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


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
    check_target(path, overwrite=overwrite, protected=protected)
    tmp = stage(path, write, verify=verify)
    try:
        return commit(tmp, path)
    finally:
        discard(tmp)


def check_target(path: Path, *, overwrite: bool = True, protected: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse to write ``path`` when it is one of the ``protected`` inputs, or (unless ``overwrite``) exists."""
    for p in protected:
        if same_file(path, Path(p)):
            raise VolumeError(f"refusing to write {path}: it is an input file; choose another output folder")
    if path.exists() and not overwrite:
        raise VolumeError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks).

    Example:
        >>> import tempfile, pathlib
        >>> from rankseg_monai._files import sha256_file
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def clean_temporaries(folder: str | os.PathLike, older_than: float | None = None,
                      extra: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove the hidden temporaries of :func:`atomic_write` (``.<stem>.rankseg-tmp-<8 hex><ext>``) that a killed
    process left in ``folder`` (not recursively), and files for which ``extra(name)`` is true; only regular files,
    and only those last modified before ``older_than`` (a :func:`time.time` value) when given.  Returns the removed
    paths.  Call it only when no other writer can be active in ``folder``."""
    folder = Path(folder)
    removed = []
    limit = time.time() + 1.0 if older_than is None else older_than
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not (is_temporary(entry.name) or (extra is not None and extra(entry.name))):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= limit:
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return removed
