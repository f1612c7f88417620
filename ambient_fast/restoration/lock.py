"""The ``--dst`` lock: one restoration writes into a destination at a time.

The lock is a file ``.DST.lock`` beside ``DST`` holding one line,
``another restoration is writing here: pid N on host H since T``, created with
``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+). A second run refuses with
that line. A lock left by a killed run is *stale*: same host and its pid no longer alive (or
alive but started after the lock was written: a reused pid, checked with ``/proc/PID/stat``
where available); a stale lock is taken over. A lock from another host
cannot be checked from here and is never taken over: remove it by hand once that run is
known to be dead.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import socket
import time
from pathlib import Path

__all__ = ["DestinationLocked", "DestinationLock", "lock_path"]


class DestinationLocked(RuntimeError):
    """Another live restoration holds the destination's lock (the message is its lock line)."""


def lock_path(dst: Path) -> Path:
    """``.DST.lock`` beside ``DST``."""
    return dst.parent / f".{dst.name}.lock"


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after the wall time ``when`` (Linux ``/proc``; False if unknown)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return boot + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0


def _alive(pid: int, since: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _started_after(pid, since)


class DestinationLock:
    """Hold ``.DST.lock`` while writing ``DST`` (a context manager; :meth:`acquire` / :meth:`release`)."""

    def __init__(self, dst: Path) -> None:
        self.path = lock_path(dst)
        self.held = False

    def _line(self) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pid = os.getpid()
        return f"another restoration is writing here: pid {pid} on host {socket.gethostname()} since {since}"

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; :class:`DestinationLocked` if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise DestinationLocked(self._holder_line()) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self._line() + "\n")
            self.held = True
            return
        raise DestinationLocked(self._holder_line())

    def _read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _holder_line(self) -> str:
        return self._read() or f"another restoration is writing here (lock file {self.path})"

    def _stale(self) -> bool:
        words = self._read().split()
        try:
            pid = int(words[words.index("pid") + 1])
            host = words[words.index("host") + 1]
            since = calendar.timegm(time.strptime(words[words.index("since") + 1], "%Y-%m-%dT%H:%M:%SZ"))
        except (ValueError, IndexError):
            return False  # not a lock line we wrote: leave it to a human
        if host != socket.gethostname():
            return False
        return not _alive(pid, since)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
