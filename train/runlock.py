"""One run per ``train.out_dir`` at a time: an advisory POSIX lock on ``<out_dir>/.lock``.

Global rank 0 takes the lock at start and holds it until it exits (the kernel drops it when the
process dies, even by ``kill -9``: there is no stale lock to clean up). A second run on the same
folder (e.g. a relaunch while the ranks of a run whose launcher was killed are still training)
fails at start with one line naming the holder. ``fcntl.lockf`` locks (POSIX, not ``flock``) also
work on NFS with a lock daemon. The lock file stays empty: it is never part of a checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock; the message names it."""


def _holder(path: Path) -> str:
    """'pid N: <command line>' of the process holding ``path``'s lock on this machine, if known."""
    try:
        inode = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] in ("POSIX", "OFDLCK") and int(fields[5].rsplit(":", 1)[1]) == inode:
                pid = int(fields[4])
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    return f"pid {pid}"
                cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
                return f"pid {pid} on {socket.gethostname()}: {cmd}"
    except (OSError, ValueError, IndexError):
        pass
    return "a process on another machine, or one this user cannot see"


class RunLock:
    """Holds ``<out_dir>/.lock`` until ``release()`` or process exit."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise RunFolderBusy(f"train.out_dir {out} is an existing file, not a folder; choose another train.out_dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.path = out / LOCK_FILE
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderBusy(f"train.out_dir {out}: cannot create the run folder or its lock file ({e.strerror})") from None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK: no locks on this filesystem
                print(f"warning: train.out_dir {out}: cannot lock the run folder ({e.strerror}); "
                      "nothing stops a second run from using it at the same time", file=sys.stderr)
                return
            raise RunFolderBusy(
                f"train.out_dir {out} is in use by another run ({_holder(self.path)}); wait for it to end or stop "
                "it (SIGTERM saves a checkpoint), or choose another train.out_dir"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
