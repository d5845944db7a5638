"""One coordinator per data directory: an exclusive ``flock`` on
``<data_dir>/coordinator.lock``, which the OS releases when the process dies
(a ``kill -9`` leaves no stale lock). The file holds the owner's PID, so the
refusal can name it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rewardsignal.errors import ConflictError

LOCK_FILE = "coordinator.lock"


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConflictError(
                f"data directory {self.path.parent} is in use by another coordinator (pid "
                f"{holder}); stop it, or give this one another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
