"""Exclusive locks for run directories and output files: one writer at a time.

A lock is a small JSON file (``{"pid", "host", "command", "started"}``) held with ``flock`` for the
life of the process, so the kernel releases it when the holder dies however it dies. A second writer
is refused with a :class:`~w2s_jax.core.errors.UserError` naming the holder's pid and host. A lock file
left behind by a dead process (killed, out of memory, machine lost) is stale: it is taken over with a
warning naming the dead holder.

Where ``flock`` is not available (some network or FUSE file systems) the pid in the file decides: a
lock held by a live pid on this host, or by any pid on another host (which cannot be checked from
here), is refused; one whose pid is dead on this host is taken over.

Multi-host runs lock once, on process 0 (the process that writes the outputs); every process learns
the outcome, so all of them fail alike when the lock is held elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from w2s_jax.core.errors import UserError
from w2s_jax.parallel import distributed

__all__ = ["FileLock", "hold", "lock_path_for_file", "LOCK_NAME"]

LOCK_NAME = ".w2s.lock"  # the lock of a directory (run directory, training out_dir)


def lock_path_for_file(path: str | os.PathLike) -> Path:
    """The lock of an output file: a hidden ``.<name>.lock`` beside it."""
    p = Path(path)
    return p.parent / f".{p.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class FileLock:
    """An exclusive lock on ``path`` (the lock file itself). ``what`` names the locked thing in messages."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> FileLock:
        import fcntl

        self._made = []  # directories created for the lock, deepest first: removed again if left empty
        d = self.path.parent
        while not d.exists() and d != d.parent:
            self._made.append(d)
            d = d.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.path.parent}: {e.strerror or e}") from None
        for _ in range(20):  # retried only when the file was replaced under us (see below)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
            try:
                flock_ok = True
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    info = _read_info(fd)
                    raise UserError(
                        f"{self.what} is in use by another w2s process ({_describe(info)}, started "
                        f"{info.get('started', '?')}; lock {self.path}); wait for it to finish or stop it"
                    ) from None
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    flock_ok = False
                # the holder may have released (and removed) the file between our open and flock
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                old = _read_info(fd)
                if old and old.get("pid") != os.getpid():
                    if not flock_ok:
                        here = old.get("host") == socket.gethostname()
                        pid = old.get("pid")
                        if not here or not isinstance(pid, int) or _pid_alive(pid):
                            raise UserError(
                                f"{self.what} is in use by another w2s process ({_describe(old)}; lock "
                                f"{self.path}); if that process is gone, delete the lock file"
                            )
                    print(f"w2s: warning: taking over the stale lock {self.path} left by {_describe(old)} "
                          "(no longer running)", file=sys.stderr)
                info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(info) + "\n").encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise UserError(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before closing: nobody can lock this inode meanwhile
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        for d in self._made:  # a refused or empty run leaves no directory behind
            try:
                d.rmdir()
            except OSError:
                break

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the ``with`` block; in a multi-host run only process 0 takes it
    and every process raises when it could not."""
    multi = distributed.process_count() > 1
    lock = FileLock(path, what)
    err: UserError | None = None
    if not multi or distributed.is_main_process():
        try:
            lock.acquire()
        except UserError as e:
            err = e
    if multi and not distributed.all_true(err is None):
        raise err or UserError(f"{what}: process 0 could not take the lock {path} (see its log)")
    if err is not None:
        raise err
    try:
        yield
    finally:
        lock.release()
