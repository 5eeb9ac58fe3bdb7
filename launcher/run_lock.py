"""One writer per run directory (a training run) or sweep directory (a sweep, a comparison).

Two runs on one `checkpoint.run_dir` both wrote checkpoints and both emptied the shared
MLflow pending file after their own uploads: steps were lost for good. `DirLock` takes an
exclusive `fcntl.flock` on `<dir>/.spikeprune.lock` and refuses a second holder at once with
one line naming the first (host, pid, start time, command with any password taken out:
written into the file by the holder; only for that message).

The kernel drops a flock when the holder's last file descriptor closes, however the process
ends (kill -9 included), so a crashed holder never leaves the lock behind and there is
nothing stale to clean up. The file itself is never deleted: removing it would let a third
process lock a new file while the second still holds the old one. The descriptor is
close-on-exec, so processes the holder execs (Ray's raylet, torchrun workers) do not keep
it; a fork without exec would. On NFS, Linux maps flock to NFS byte-range locks, so the
lock also holds between nodes on a shared file system.

Import-light on purpose (no torch): the sweep driver takes it before Ray starts.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from launcher.redact import redact_text

LOCK_FILE = ".spikeprune.lock"


class DirLocked(RuntimeError):
    """The directory is held by another run or sweep; the message names the holder."""


class DirLock:
    """Exclusive lock on `directory` (created if missing) for this process, until `release`.

        with DirLock(run_dir, "training run", "checkpoint.run_dir"):
            ...

    kind names the holder in the refusal; key names the setting that chose the directory,
    so the message can say what to change.
    """

    def __init__(self, directory: str | os.PathLike, kind: str, key: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.kind = kind
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirLocked(self._refusal()) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": redact_text(shlex.join([sys.executable, *sys.argv]))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the holder record stays; it is only read while the lock is held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            command = " ".join(str(holder["command"]).split())  # one line, whatever argv held
            if len(command) > 200:
                command = command[:197] + "..."
            who = (f"a {holder['kind']}, pid {holder['pid']} on {holder['host']} started "
                   f"{holder['started']}: {command}")
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that is still starting (no holder recorded yet)"
        return f"{self.directory} is in use by {who}; wait for it to end, or choose another {self.key}"
