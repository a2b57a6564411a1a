"""Who may write into an output folder at the same time: runs with the same settings, never runs with different
ones (:class:`FolderRuns`), and one run per case (:meth:`FolderRuns.claim`).

POSIX (Linux, macOS): ``fcntl.flock`` on hidden files in the folder; the kernel releases them when a process dies,
even by ``kill -9``, so a lock never outlives its run.

* ``.rankseg.lock``: held (exclusively) for the moment a run registers;
* ``.rankseg-active.lock``: held *shared* by every run writing into the folder for its whole life; a run that gets
  it *exclusively* is alone, records its settings in ``.rankseg-active.json`` and keeps it shared from then on;
  a run that finds it held reads that file: same settings, it joins; other settings, it is refused;
* ``.<name>.rankseg-claim``: held exclusively while one run decides and writes that case (``predict`` claims the
  mask file's name, so runs writing two formats of a case do not leave it to each other); a run that finds a case
  claimed leaves it to the run that holds it.

Network file systems: NFS (v3 with lockd, v4) supports ``flock`` across machines on Linux; Lustre only when
mounted with ``-o flock``.  Where ``flock`` is refused (``ENOLCK``, ``EOPNOTSUPP``, ...) and on platforms without
``fcntl`` (Windows), nothing is locked: a warning says so, and two runs must not write into one folder at once.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._files import atomic_write

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderRuns", "RunConflict", "LOCK_FILE", "ACTIVE_LOCK", "ACTIVE_FILE", "CLAIM_SUFFIX", "is_claim",
           "locks_available"]

LOCK_FILE = ".rankseg.lock"
ACTIVE_LOCK = ".rankseg-active.lock"
ACTIVE_FILE = ".rankseg-active.json"
CLAIM_SUFFIX = ".rankseg-claim"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1)}


class RunConflict(Exception):
    """Another run with other settings is writing into the folder (nothing was done)."""


def is_claim(name: str) -> bool:
    """Whether a file name is a per-case claim file (``.<case>.rankseg-claim``)."""
    return name.startswith(".") and name.endswith(CLAIM_SUFFIX)


def locks_available() -> bool:
    """Whether this platform has ``fcntl.flock`` (the file system may still refuse it)."""
    return fcntl is not None


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FolderRuns:
    """Register a run that writes into ``folder`` (a context manager; the folder is created).

    Args:
        folder: the output folder.
        key: what must be equal for two runs to share the folder (e.g. a digest of the settings).
        description: shown to a refused run (command, settings, ...); stored in ``.rankseg-active.json``.
        warn: called with a one-line message when the file system (or platform) cannot lock.

    Attributes:
        alone: ``True`` when no other run was writing into the folder when this one registered (stale temporaries
            of killed runs may then be removed); ``False`` when it joined runs with the same settings, or when
            nothing could be locked.
        locked: whether locks are in force.

    Raises:
        RunConflict: another run with other settings holds the folder.
        OSError: the folder cannot be created or written (e.g. read-only).
    """

    def __init__(self, folder: str | os.PathLike, key: str, description: dict[str, Any] | None = None,
                 warn: Any = None) -> None:
        self.folder = Path(folder)
        self.key = key
        self.description = dict(description or {})
        self.warn = warn or (lambda msg: print(f"rankseg-monai: warning: {msg}", file=sys.stderr))
        self.alone = False
        self.locked = False
        self._opened = False
        self._active: int | None = None

    # ------------------------------------------------------------------------------------------ register
    def __enter__(self) -> FolderRuns:
        if not self._opened:
            self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Unregister (the kernel does the same when the process dies); the last run out removes the lock files."""
        self._opened = False
        if self._active is None:
            return
        mutex = self._take(self.folder / LOCK_FILE, blocking=True)
        try:
            os.close(self._active)  # our shared hold
            self._active = None
            last = _open(self.folder / ACTIVE_LOCK)
            try:
                fcntl.flock(last, fcntl.LOCK_EX | fcntl.LOCK_NB)
                for name in (ACTIVE_FILE, ACTIVE_LOCK):  # nobody opens these without the mutex we hold
                    _unlink(self.folder / name)
            except BlockingIOError:
                pass  # other runs still write here
            finally:
                os.close(last)
        finally:
            _unlink(self.folder / LOCK_FILE)  # while held: a waiter sees another inode and retries
            os.close(mutex)

    def open(self) -> FolderRuns:
        """Register (see the class docstring); :meth:`close` or leaving the ``with`` block unregisters."""
        self._opened = True
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self._supported():
            return self
        mutex = self._take(self.folder / LOCK_FILE, blocking=True)
        if mutex is None:
            return self
        try:
            active = _open(self.folder / ACTIVE_LOCK)
            try:
                try:
                    fcntl.flock(active, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.alone = True
                    self._write_active()
                except BlockingIOError:
                    other = self._read_active()
                    if other.get("key") != self.key:
                        raise RunConflict(self._conflict_message(other)) from None
                fcntl.flock(active, fcntl.LOCK_SH | fcntl.LOCK_NB)  # downgrade, or join the runs holding it
            except BaseException:
                if self.alone:  # refused (e.g. a full disk) while alone: leave no lock file behind
                    self.alone = False
                    for name in (ACTIVE_FILE, ACTIVE_LOCK, LOCK_FILE):  # LOCK_FILE while held, as close() does
                        _unlink(self.folder / name)
                os.close(active)
                raise
            self._active = active
            self.locked = True
        finally:
            os.close(mutex)  # releases the registration lock
        return self

    def _supported(self) -> bool:
        if fcntl is None:  # pragma: no cover - Windows
            self.warn("file locks are not available on this platform: do not run two rankseg-monai runs into "
                      f"{self.folder} at the same time")
            return False
        return True

    def _take(self, path: Path, blocking: bool) -> int | None:
        """An exclusive ``flock`` on ``path`` that is still ``path`` once held (holders unlink it on release);
        ``None`` when it is held by another process (``blocking=False``) or when the file system cannot lock
        (with a warning)."""
        while True:
            fd = _open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _UNSUPPORTED:
                    self.warn(f"the file system of {self.folder} does not support locks ({exc.strerror}): do not "
                              "run two rankseg-monai runs into it at the same time")
                    _unlink(path)
                    return None
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder removed it between our open and our lock: take the new file

    def _write_active(self) -> None:
        info = {"key": self.key, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.description}
        text = json.dumps(info, indent=1, default=str)
        atomic_write(self.folder / ACTIVE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _read_active(self) -> dict[str, Any]:
        try:
            info = json.loads((self.folder / ACTIVE_FILE).read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _conflict_message(self, other: dict[str, Any]) -> str:
        who = f"pid {other.get('pid', '?')} on {other.get('host', '?')}, started {other.get('started', '?')}"
        what = other.get("command")
        shown = f" ({what})" if what else ""
        return (f"another rankseg-monai run{shown} is writing into {self.folder} with other settings ({who}); "
                "wait for it to finish, or choose another -o (a folder never mixes settings)")

    # ------------------------------------------------------------------------------------------ claims
    @contextmanager
    def claim(self, case: str) -> Iterator[bool]:
        """``with runs.claim(case) as mine:`` -- ``mine`` is ``False`` when another run is working on ``case``.

        Without locks every claim succeeds."""
        if not self.locked:
            yield True
            return
        path = self.folder / f".{case}{CLAIM_SUFFIX}"
        fd = self._take(path, blocking=False)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            _unlink(path)  # while still holding it: a run waiting on this inode re-checks and retries
            os.close(fd)
