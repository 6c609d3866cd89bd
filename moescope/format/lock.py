"""One recorder per run directory and rank: a lock file naming its owner, released by the kernel on a crash.

The lock is an advisory `flock` on `RUN/.moescope-rank-R.lock`: the kernel drops it when the owning process
dies (SIGKILL, OOM), so a lock left by a dead recorder is taken over without anyone deleting the file. The
file holds the owner's pid, host and start time (for the refusal message), followed by a reserve of
`RESERVE_BYTES` that the owner gives back on a full disk so the final manifest can still be written.
Where `fcntl` is missing (Windows), a lock whose pid is not alive on this host is taken over instead.

An object store (`s3://...`) has no locks: the lock is an object naming its owner, written at start and deleted
at close. Finding another owner's lock object cannot tell a live recorder from a crashed one, so it is a warning
naming that owner, not a refusal: one recorder per run URL and rank is then the user's job.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from .manifest import TraceError
from .storage import RemotePath, as_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLocked", "RunLock", "lock_name", "RESERVE_BYTES"]

#: Bytes kept in the lock file and released on a full disk: enough for a manifest of hundreds of layers.
RESERVE_BYTES = 256 << 10


class RunLocked(TraceError):
    """Another live recorder owns this run directory and rank."""


def lock_name(rank: int) -> str:
    """The lock file of one rank (ranks of one run record side by side)."""
    return f".moescope-rank-{rank}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """Hold the recording lock of (run_dir, rank); `acquire()` raises RunLocked naming the live owner."""

    def __init__(self, run_dir: str | os.PathLike[str], rank: int = 0, reserve: int = RESERVE_BYTES, *,
                 name: str | None = None, role: str = "recorded") -> None:
        self.path: Path | RemotePath = as_path(run_dir) / (name or lock_name(rank))
        self.reserve = int(reserve)
        #: what the owner does, for the refusal message ("recorded", "compacted")
        self.role = role
        self._fd: int | None = None
        self._head_len = 0
        self._remote_held = False

    def owner(self) -> dict[str, Any]:
        """What the lock file says about its owner ({} when unreadable)."""
        try:
            head = self.path.read_bytes()[:4096].split(b"\n", 1)[0]
            d = json.loads(head)
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self) -> RunLocked:
        o = self.owner()
        who = f"pid {o.get('pid', '?')} on {o.get('host', '?')}, since {o.get('since', '?')}"
        doing = o.get("role", "recorded")
        if doing != "recorded":  # e.g. `moescope compact` holds the rank while it merges its parts
            return RunLocked(f"{self.path.parent}: being {doing} by {who}; try again when it is done "
                             f"(lock file {self.path.name})")
        return RunLocked(f"{self.path.parent}: already being recorded (rank {self.path.name.split('-')[-1][:-5]}) "
                         f"by {who}; record into another directory, or close that recorder first "
                         f"(lock file {self.path.name})")

    def acquire(self) -> RunLock:
        """Take the lock (a dead owner's lock is taken over); RunLocked if a live recorder holds it."""
        if isinstance(self.path, RemotePath):
            return self._acquire_remote()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the file can be unlinked by its closing owner between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock_fd(fd):
                    raise self._refuse()
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError  # we locked a file its owner just removed: try the new one
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._write_owner()
            return self
        raise self._refuse()

    def _acquire_remote(self) -> RunLock:
        o = self.owner()
        if o and self.role != "recorded":  # a compaction refuses: two would merge the same parts
            who = f"pid {o.get('pid', '?')} on {o.get('host', '?')}, since {o.get('since', '?')}"
            raise RunLocked(f"{self.path.parent}: being {o.get('role', 'recorded')} by {who} (object stores have no "
                            f"locks: if that process is gone, delete {self.path} and run again)")
        if o:
            warnings.warn(f"moescope: {self.path.parent}: object stores have no locks; found {self.path.name} of "
                          f"pid {o.get('pid', '?')} on {o.get('host', '?')} since {o.get('since', '?')} (a live "
                          "recorder of this rank, or one that crashed): recording anyway", RuntimeWarning, stacklevel=4)
        self.path.write_bytes(self._head())
        self._remote_held = True
        return self

    def _head(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           **({"role": self.role} if self.role != "recorded" else {})}).encode() + b"\n"

    def _lock_fd(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError:  # a filesystem without flock (some network mounts): the owner's pid decides
                pass
        o = self.owner()  # no flock: the owner's pid decides (same host only)
        pid, host = o.get("pid"), o.get("host")
        if isinstance(pid, int) and pid != os.getpid() and host == socket.gethostname() and _alive(pid):
            return False
        return True

    def _write_owner(self) -> None:
        assert self._fd is not None
        head = self._head()
        self._head_len = len(head)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, head, 0)
        try:
            # the reserve: real blocks (not a sparse hole), so giving them back frees space on a full disk
            os.pwrite(self._fd, b"\0" * self.reserve, len(head))
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, len(head))  # no room for a reserve: still the owner

    def free_reserve(self) -> None:
        """Give the reserve back to the filesystem (a full disk: the final manifest needs the room)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, self._head_len)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock file and drop the lock; safe to call twice."""
        if self._remote_held:
            self._remote_held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink()  # before unlocking: a waiter then finds the inode changed and retries
        except OSError:
            pass
        os.close(fd)

    @property
    def held(self) -> bool:
        """True while this object owns the lock."""
        return self._fd is not None or self._remote_held

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
