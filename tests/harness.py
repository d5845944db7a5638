"""Real processes on 127.0.0.1 for end-to-end tests: a coordinator (free port,
read from its announcement line) and workers, all torn down reliably."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

_ANNOUNCE = re.compile(r"signal coordinator listening on (http://\S+)")


class Proc:
    """A child process whose combined output is collected in the background."""

    def __init__(self, args: list[str], name: str, env: dict | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 60.0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout_s}s; "
                             f"output:\n" + "\n".join(self.lines[-40:]))

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig=None) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig or 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        return self.proc.returncode

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=15)


def start_coordinator(data_dir: Path, *extra: str) -> tuple[Proc, str]:
    p = Proc([sys.executable, "-m", "rewardsignal.cli", "coordinator", "--port", "0",
              "--data-dir", str(data_dir), "--log-level", "info", *extra], "coordinator")
    url = p.wait_for(_ANNOUNCE.pattern, 60).group(1)
    return p, url


def start_worker(url: str, name: str, *extra: str) -> Proc:
    return Proc([sys.executable, "-m", "rewardsignal.cli", "worker", "--coordinator", url,
                 "--name", name, "--device", "cpu", "--threads", "1", *extra], name)


def wait_workers(url: str, n: int, timeout_s: float = 90.0, api_key: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        req = urllib.request.Request(url + "/v1/workers")
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        workers = json.loads(urllib.request.urlopen(req, timeout=5).read())["workers"]
        if sum(w["status"] in ("idle", "busy") for w in workers) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{n} workers did not register within {timeout_s}s")


def free_port() -> str:
    """A port free right now on 127.0.0.1 (for restarting a coordinator on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def wait_busy(client, timeout_s: float = 30.0) -> str:
    """The name of the first worker seen computing a task."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [w["name"] for w in client.list_workers() if w["status"] == "busy"]
        if busy:
            return busy[0]
        time.sleep(0.01)
    raise AssertionError(f"no worker became busy within {timeout_s}s")
