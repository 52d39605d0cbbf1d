"""One run per output directory: a lock file created with ``O_EXCL``, naming its holder."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import BinaryIO

LOCK_NAME = ".run.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live run holds the lock on this output directory."""


class RunLock:
    """Exclusive lock on a run directory, held from ``acquire()`` to ``release()`` (or a ``with`` block).

    The lock is the file ``<directory>/.run.lock`` holding ``{"pid", "host", "started"}``, created
    atomically and complete (written to a private file, then hard-linked into place, which fails if
    the lock exists, like ``O_CREAT | O_EXCL``). A lock left by a dead process of this host is stale and
    taken over; a lock of a live process, or of another host (which cannot be checked), stops the run.
    Runs racing for one stale lock judge and delete it one at a time, under an ``flock`` of that file,
    so exactly one of them takes it over.

    Args:
        directory: The run directory; created if missing.

    Raises:
        RunDirectoryLocked: From ``acquire()``, naming the directory and the holder.
        PermissionError: From ``acquire()``, if the directory cannot be written (read-only file system).

    Example::

        with RunLock("outputs/train/2026-01-01_00-00-00"):
            trainer.fit(module, datamodule)
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._held = False

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # more tries after a stale lock was removed or the holder released it
            if self._create():
                self._held = True
                return self
            holder = self._remove_if_stale()
            if holder is not None:
                raise RunDirectoryLocked(
                    f"output directory {str(self.directory)!r} is in use by another run "
                    f"(pid {holder.get('pid')} on host {holder.get('host')!r}, "
                    f"started {holder.get('started')}); "
                    f"wait for it to finish or choose another paths.output_dir (hydra.run.dir); if that "
                    f"run is gone, delete {str(self.path)!r}"
                )
        raise RunDirectoryLocked(f"could not take the lock {str(self.path)!r}: another run took it first")

    def release(self) -> None:
        """Delete the lock file if this object holds it."""
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _create(self) -> bool:
        """Write the holder to a private file, then hard-link it into place: never half written."""
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        private = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
        private.write_text(json.dumps(holder))
        try:
            os.link(private, self.path)
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)
        return True

    def _remove_if_stale(self) -> dict | None:
        """Delete the lock if its holder is stale; return the holder if it is not (``None``: try again).

        The lock file is judged and deleted under an exclusive ``flock`` of it, and only if it is still
        the file at ``self.path``: of runs that found the same stale lock, the first deletes it; the others
        then find another file (the lock a run created since) or none there, and leave it.
        """
        try:
            with self._open_lock_file() as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
                if not os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                    return None  # deleted by a run that judged it before us, and created anew
                holder = _parse_holder(handle.read())
                if not _is_stale(holder):
                    return holder
                self.path.unlink()
        except FileNotFoundError:
            pass  # released by its holder, or deleted by a run that judged it before us
        return None

    def _open_lock_file(self) -> BinaryIO:
        """The lock file, writable where we may write it (NFS locks only writable files exclusively),
        else read-only (another user's lock: still judged, and a live one named)."""
        try:
            return self.path.open("rb+")
        except PermissionError:
            return self.path.open("rb")


def _parse_holder(text: bytes) -> dict:
    """The holder a lock file names; ``{}`` if it names none (not this class's JSON object)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    """Whether the lock's holder is a process of this host that no longer exists (or it names none)."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return not _pid_alive(holder["pid"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM  # exists, owned by someone else
    return True
