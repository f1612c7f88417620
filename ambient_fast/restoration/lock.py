"""The ``--dst`` lock: one restoration writes into a destination at a time.

The lock is a file ``.DST.lock`` beside ``DST`` holding one line,
``another restoration is writing here: pid N on host H since T``, written to a private file
and hard-linked into place (atomic and exclusive on local filesystems and NFS). A second run refuses with
that line. While a run holds the lock, a daemon thread refreshes the file's mtime every
``heartbeat`` seconds (30 by default): the lease.

A lock left by a killed run is *stale*, and taken over:

- same host: its pid is no longer alive (or alive but started after the lock was written: a
  reused pid, checked with ``/proc/PID/stat`` where available);
- another host (a restarted cluster job whose rank 0 lands elsewhere): its mtime has not
  been refreshed for ``lease`` seconds (600 by default). The age is read on the file
  system's clock (the mtime of a probe file written beside it), so skewed host clocks do
  not matter. A lock written without a heartbeat is judged by its mtime the same way.

Taking over is race-free: a taker judges the lock again while holding a takers' mutex
(``.DST.lock.takeover``, created with O_EXCL), removes it only if it is still stale, and then
competes for the lock with O_EXCL like any run: of several takers one wins and the others see
its fresh lock. A holder that finds its lock gone or rewritten (its heartbeat stalled past the lease and
another run took over) warns once and never removes the other run's lock on release.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import socket
import threading
import time
import warnings
from pathlib import Path

__all__ = [
    "DestinationLocked",
    "DestinationLock",
    "lock_path",
    "LEASE_SECONDS",
    "HEARTBEAT_SECONDS",
    "TAKEOVER_SECONDS",
]

LEASE_SECONDS = 600.0  # a foreign host's lock not refreshed for this long is stale
HEARTBEAT_SECONDS = 30.0  # how often the holder refreshes its lock's mtime
TAKEOVER_SECONDS = 60.0  # a takers' mutex older than this was left by a killed taker
_ATTEMPTS = 40  # create / judge / take over rounds before giving up (a busy mutex waits 50 ms)


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
    """Hold ``.DST.lock`` while writing ``DST`` (a context manager; :meth:`acquire` / :meth:`release`).

    Args:
        dst: the destination folder.
        lease: seconds without a refresh after which another host's lock is stale.
        heartbeat: seconds between the holder's refreshes (well under ``lease``).
    """

    def __init__(self, dst: Path, *, lease: float = LEASE_SECONDS, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        if not 0 < heartbeat < lease:
            raise ValueError(f"need 0 < heartbeat < lease, got heartbeat {heartbeat} s, lease {lease} s")
        self.path = lock_path(dst)
        self.lease, self.heartbeat = float(lease), float(heartbeat)
        self.held = False
        self.lost = False  # our lock was removed or rewritten by another run while we held it
        self._line = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; :class:`DestinationLocked` if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"another restoration is writing here: pid {os.getpid()} on host {socket.gethostname()} since {since}"
        for _ in range(_ATTEMPTS):
            try:
                self._create(line)
            except FileExistsError:
                judged = self._stat()
                verdict = self._verdict(judged)
                if verdict is not None:
                    raise DestinationLocked(verdict) from None
                self._take_over(judged)
                continue
            self._line, self.held, self.lost = line, True, False
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lock {self.path.name}", daemon=True)
            self._thread.start()
            return
        raise DestinationLocked(self._holder_line())

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.held = False

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the holder's side

    def _create(self, line: str) -> None:
        """The lock file with ``line`` in it, or FileExistsError: the line is written to a
        private file first and hard-linked into place (atomic, NFS-safe), so no reader ever
        sees an empty lock."""
        mine = self._private("new")
        try:
            mine.write_text(line + "\n")
            os.link(mine, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                mine.unlink()

    def _private(self, kind: str) -> Path:
        """A name beside the lock that no other process or thread uses."""
        owner = f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
        return self.path.with_name(f"{self.path.name}.{kind}-{owner}")

    def _ours(self) -> bool:
        return self._read() == self._line

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self._ours():
                self.lost = True
                warnings.warn(
                    f"{self.path}: this run's lock was removed or taken over by another run (its heartbeat "
                    f"stalled for more than {self.lease:g} s?); now: {self._read() or 'no lock'}",
                    RuntimeWarning,
                    stacklevel=1,
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    # -- another run's lock

    def _read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _stat(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            return None

    def _holder_line(self) -> str:
        return self._read() or f"another restoration is writing here (lock file {self.path})"

    def _verdict(self, judged: os.stat_result | None) -> str | None:
        """None when the lock (as ``judged``) is stale or gone, else the refusal message."""
        text = self._read()
        if judged is None or (not text and self._stat() is None):
            return None  # released meanwhile
        words = text.split()
        try:
            pid = int(words[words.index("pid") + 1])
            host = words[words.index("host") + 1]
            since = calendar.timegm(time.strptime(words[words.index("since") + 1], "%Y-%m-%dT%H:%M:%SZ"))
        except (ValueError, IndexError):
            return self._holder_line()  # not a lock line we wrote: leave it to a human
        if host == socket.gethostname():
            return None if not _alive(pid, since) else self._holder_line()
        age = self._file_system_now() - judged.st_mtime
        if age > self.lease:
            return None
        return (
            f"{self._holder_line()} (refreshed {max(age, 0.0):.0f} s ago; taken over once {self.lease:g} s "
            "pass without a refresh)"
        )

    def _file_system_now(self) -> float:
        """The file system's current time: the mtime of a probe file written beside the lock."""
        probe = self._private("probe")
        try:
            probe.write_bytes(b"")
            return os.stat(probe).st_mtime
        except OSError:
            return time.time()
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def _take_over(self, judged: os.stat_result | None) -> None:
        """Remove the stale lock ``judged``, judged again under the takers' mutex
        (``.DST.lock.takeover``, O_EXCL) so that of several takers one removes it and none
        removes the lock a faster one created meanwhile. A mutex older than
        :data:`TAKEOVER_SECONDS` (its taker was killed) is removed."""
        if judged is None:
            return
        mutex = self.path.with_name(f"{self.path.name}.takeover")
        try:
            os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):
                if self._file_system_now() - os.stat(mutex).st_mtime > TAKEOVER_SECONDS:
                    os.unlink(mutex)
            time.sleep(0.05)  # another taker is at work: look again
            return
        try:
            now = self._stat()
            if now is not None and self._verdict(now) is None:
                os.unlink(self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mutex)
