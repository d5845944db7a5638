"""`signal-worker --gpus all|0,1,...`: one compute process per GPU (or per group
of ``--gpus-per-worker`` GPUs) under one supervisor.

Each child is an ordinary `signal-worker` pinned to its GPU with
``CUDA_VISIBLE_DEVICES`` (so it creates no CUDA context on the others) and
registers on its own: the coordinator sees one worker per GPU, each placed and
sized by its own memory. A child given a group of GPUs runs with
``--device-map auto``: each base model is spread over the group's GPUs by
accelerate's ``device_map`` (layers on one GPU after another), and the child
counts as one worker with the group's summed memory, for models larger than
one GPU. Children run in their own process group, so a
terminal's Ctrl-C reaches only the supervisor, which passes each signal on once
(the first lets children finish their task, a second abandons it, as for one
worker). Their output comes through the supervisor, line by line, so status
lines of several processes never overwrite each other on one terminal. The
supervisor exits when every child has, with the worst exit code among them, and
says which child exited how.

``cpu_standins``: children on CPU instead of GPUs, one per listed index (tests
of the supervisor on machines without GPUs).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rewardsignal.errors import ValidationError

_POLL_S = 0.2


def parse_gpus(spec: str, available: int) -> list[int]:
    """GPU indices from ``all`` or ``0,1,...``, checked against ``available``."""
    if spec.strip() == "all":
        if available < 1:
            raise ValidationError("--gpus all: no CUDA GPU is visible on this machine (is a "
                                  "CUDA build of torch installed?); use --device cpu")
        return list(range(available))
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValidationError(f"--gpus must be 'all' or a list like 0,1; got {spec!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValidationError(f"--gpus must list distinct GPU indices like 0,1; got {spec!r}")
    if max(ids) >= available:
        raise ValidationError(f"--gpus {spec}: this machine has {available} GPU(s) "
                              f"(indices 0..{available - 1})")
    return ids


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (even by
    SIGKILL), so no compute process outlives its box's supervisor (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    def __init__(self, children: Sequence[Child], *, stream=None) -> None:
        self.children = list(children)
        self.stream = stream or sys.stderr
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._signals = 0

    def say(self, text: str) -> None:
        with self._lock:
            self.stream.write(f"[supervisor] {text}\n")
            self.stream.flush()

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.stream.write(line if line.endswith("\n") else line + "\n")
                self.stream.flush()

    def _forward(self, signum: int, _frame=None) -> None:
        self._signals += 1
        what = "finishing their tasks" if self._signals == 1 else "abandoning their tasks"
        self.say(f"got {signal.Signals(signum).name}: stopping {len(self.procs)} workers "
                 f"({what})")
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        pumps = []
        try:
            for c in self.children:
                proc = subprocess.Popen(
                    c.argv, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, start_new_session=True, preexec_fn=_die_with_parent)
                self.procs[c.name] = proc
                self.say(f"started {c.name} (pid {proc.pid})")
                pump = threading.Thread(target=self._pump, args=(proc,), daemon=True)
                pump.start()
                pumps.append(pump)
            return self._wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for proc in self.procs.values():  # only if the supervisor itself failed
                if proc.poll() is None:
                    proc.terminate()
            for pump in pumps:
                pump.join(timeout=5)

    def _wait(self) -> int:
        codes: dict[str, int] = {}
        while len(codes) < len(self.procs):
            for name, proc in self.procs.items():
                if name in codes or proc.poll() is None:
                    continue
                code = proc.returncode
                # A child killed by a signal reads as the shell would show it.
                codes[name] = 128 - code if code < 0 else code
                self.say(f"{name} (pid {proc.pid}) exited with code {codes[name]}"
                         + (f"; {len(self.procs) - len(codes)} still running"
                            if len(codes) < len(self.procs) else ""))
            time.sleep(_POLL_S)
        worst = max(codes.values(), default=0)
        self.say(f"all {len(codes)} workers stopped; exit code {worst}")
        return worst


def group_gpus(gpus: list[int], per_worker: int) -> list[list[int]]:
    """``gpus`` in consecutive groups of ``per_worker``, one group per worker."""
    if per_worker < 1 or len(gpus) % per_worker:
        raise ValidationError(f"--gpus-per-worker {per_worker}: the {len(gpus)} GPU(s) of "
                              f"--gpus do not split into groups of {per_worker}")
    return [gpus[i:i + per_worker] for i in range(0, len(gpus), per_worker)]


def children_for(gpus: list[int], argv: list[str], name: str, *, cpu_standins: bool,
                 per_worker: int = 1) -> list[Child]:
    """One child per GPU, or per group of ``per_worker`` GPUs: the same worker
    flags (``argv``, without --gpus, --device and --name) plus its device and a
    name that says which GPUs (``box-gpu2``, ``box-gpu0+1``)."""
    out = []
    # Indices are of the GPUs this process sees: under a CUDA_VISIBLE_DEVICES of
    # its own, index i is the i-th entry there.
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    for group in group_gpus(gpus, per_worker):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        child = f"{name}-gpu{'+'.join(map(str, group))}"
        if cpu_standins:
            device = ["--device", "cpu"]
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if i < len(visible) else str(i)
                                                   for i in group)
            device = ["--device", "cuda"] + (["--device-map", "auto"] if len(group) > 1 else [])
        out.append(Child(child, [sys.executable, "-m", "rewardsignal.cli", "worker", *argv,
                                 *device, "--name", child], env))
    return out
