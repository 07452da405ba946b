"""One run per folder: an advisory lock (``fcntl.flock``) on ``<output_dir>/.humanalign.lock`` while a run
writes there.

The lock file holds who holds it (pid, host, start time, command), so a second run is refused with a message
naming the holder. The kernel releases a flock when its process dies, however it dies, so a lock file whose
flock can be taken is stale (a run killed with SIGKILL, a crashed node) and is simply taken over. The holder
deletes the file when it releases it; since a waiting process may have opened the file just before that, a
process that got the flock checks that the path still names the file it locked, and retries otherwise.
Only the main process locks; ``launch.prepare_run_dir`` tells the other ranks the outcome.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from humanalign.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".humanalign.lock"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv)}


def describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The held lock of a run folder; ``stale`` is the holder record of a dead run it took over (or None)."""

    def __init__(self, path: Path, fd: int | None, stale: dict | None):
        self.path, self.fd, self.stale = path, fd, stale

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir`` (which must exist) or raise a UserError naming the run that holds it."""
        path = Path(run_dir) / LOCK_FILE
        if fcntl is None:  # not POSIX: no lock (a second run is not detected there)
            return cls(path, None, None)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"output_dir: cannot create {path} ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise UserError(f"{run_dir} is in use by another run ({describe(info)}); wait for it to end, stop "
                                f"it, or choose another output_dir (lock file: {path})") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder deleted the file between our open and our flock: lock the new one
        stale = _read(fd) or None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder()) + "\n").encode("utf-8"))
        os.fsync(fd)
        return cls(path, fd, stale)

    def release(self) -> None:
        """Delete the lock file (still holding the lock, see the module doc), then let go."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None
