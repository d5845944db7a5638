"""A coordinator and worker processes on 127.0.0.1 for benchmarks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time


class Cluster:
    def __init__(self, n_workers: int, *, threads: int | None = None,
                 coordinator_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = (),
                 device: str = "cpu", worker_log: str | None = None,
                 worker_delay_s: float = 0.0, client_delay_s: float = 0.0,
                 data_parent: str | None = None) -> None:
        from rewardsignal import SignalClient

        # data_parent: where the coordinator's data directory goes (e.g. /dev/shm,
        # to see what the step costs when fsync costs nothing).
        self.data_dir = tempfile.mkdtemp(prefix="signal-bench-", dir=data_parent)
        self.procs: list[subprocess.Popen] = []
        coord = subprocess.Popen([sys.executable, "-m", "rewardsignal.cli", "coordinator",
                                  "--port", "0", "--data-dir", self.data_dir, "--log-level",
                                  "warning", *coordinator_args],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(coord)
        self.url = None
        deadline = time.monotonic() + 60
        while self.url is None and time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", coord.stdout.readline())
            self.url = m.group(1) if m else None
        if self.url is None:
            self.close()
            raise SystemExit("coordinator did not start")
        # Proxies adding a delay each way: between the workers and the
        # coordinator, and between the client (the SDK) and the coordinator.
        self.proxies: list = []
        worker_url = self._through(worker_delay_s)
        client_url = self._through(client_delay_s)
        extra = ("--threads", str(threads)) if threads else ()
        # Workers' output (status lines, the exit line with peak GPU memory) goes
        # to worker_log when one is given.
        self._log = open(worker_log, "w") if worker_log else None  # noqa: SIM115
        out = self._log or subprocess.DEVNULL
        for i in range(n_workers):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "rewardsignal.cli", "worker", "--coordinator", worker_url,
                 "--device", device, "--name", f"bench{i}", "--log-level", "warning", *extra,
                 *worker_args], stdout=out, stderr=out))
        self.client = SignalClient(base_url=client_url)
        deadline = time.monotonic() + 120
        while len(self.client.list_workers()) < n_workers:
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit("workers did not register")
            time.sleep(0.2)

    def _through(self, delay_s: float) -> str:
        """The coordinator's address, through a proxy adding ``delay_s`` each way
        when it is not 0."""
        if not delay_s:
            return self.url
        from _proxy import DelayProxy

        self.proxies.append(DelayProxy(int(self.url.rsplit(":", 1)[1].strip("/")), delay_s))
        return f"http://127.0.0.1:{self.proxies[-1].port}"

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample of /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.client._loop.run(self.client._target._http("GET", "/metrics", raw=True))
        total = 0.0
        for fam in text_string_to_metric_families(text.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        for proxy in getattr(self, "proxies", ()):
            proxy.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
