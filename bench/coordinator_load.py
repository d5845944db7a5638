"""Coordinator under a swarm: simulated workers on 127.0.0.1, real protocol, no compute.

One coordinator process; N lightweight asyncio workers register, long-poll for
tasks and submit a realistic LoRA-sized update (signal-small with LoRA r=64:
3.5M parameters, fp16 = 7 MB) for every task, for a bounded time. A driver keeps
forward_backward requests queued so there is always work, and a second run
steps (forward_backward + optim_step) all along, so versions, AdamW and
checkpoint writes happen under the swarm as well.

Lease latency is measured where a real worker would see it: by a few probe
workers in a process of their own (``--probes``), doing the same cycle as the
rest; a worker's first lease (waiting for the driver's first request) is left
out. The N - probes bulk workers share this benchmark process, which on a
small machine saturates (it pushes hundreds of MB/s); their latencies are
reported too, with the lag of their event loop, so the two can be told apart.
Also reported: workers held, submissions/s, MB/s ingested, errors, the
coordinator's own view (lease handler time, event-loop lag) and its peak RSS as
a multiple of the update size, and fairness: the second run's median step time
under the swarm over its step time with the same workers and no backlog
(measured first, in the same run; target <= 3).

    python bench/coordinator_load.py [--workers 1000] [--seconds 60] [--probes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import msgpack
import torch

from rewardsignal.aggregation.codecs import encode
from rewardsignal.protocol import MSGPACK, tensors_from_bytes, tensors_to_bytes

MODEL = "signal-small"


def _histogram_quantiles(text: str, name: str, labels: dict) -> tuple[float, float, int]:
    """Upper bounds (ms) of the p50 and p99 buckets of a Prometheus histogram, and
    its count."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name + "_bucket" and all(s.labels.get(k) == v
                                                  for k, v in labels.items()):
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0

    def q(p: float) -> float:
        return next((le * 1e3 for le, c in buckets if c >= p * total), float("nan"))
    return q(0.5), q(0.99), int(total)



def _vm_bytes(pid: int, field: str) -> int:
    """VmRSS or VmHWM (peak RSS) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _quantiles(xs: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms."""
    if not xs:
        return float("nan"), float("nan")
    xs = sorted(xs)
    return (round(statistics.median(xs) * 1e3, 1),
            round(xs[int(0.99 * (len(xs) - 1))] * 1e3, 1))


async def _loop_lag(samples: list[float], deadline: float) -> None:
    """How late this process's event loop runs a 50 ms timer (report the max: a
    stall of seconds is one sample)."""
    while time.monotonic() < deadline:
        due = time.monotonic() + 0.05
        await asyncio.sleep(0.05)
        samples.append(max(0.0, time.monotonic() - due))


async def _update_bin(session: aiohttp.ClientSession, url: str, run_id: str
                      ) -> tuple[int, int, bytes]:
    """(parameters, fp16 safetensors size, the msgpack bin of it) for the run's adapter."""
    async with session.get(f"{url}/v1/runs/{run_id}/weights/0") as r:
        shapes = {k: v.shape for k, v in tensors_from_bytes(await r.read()).items()}
    params = sum(torch.Size(s).numel() for s in shapes.values())
    update = tensors_to_bytes(encode({k: torch.full(s, 1e-3) for k, s in shapes.items()},
                                     "fp16"))
    return params, len(update), msgpack.packb(update, use_bin_type=True)


class Swarm:
    def __init__(self, url: str, n: int, fingerprint: str, tensor_bin: bytes,
                 deadline: float, prefix: str = "sim") -> None:
        self.url, self.n, self.fp, self.deadline = url, n, fingerprint, deadline
        self.prefix = prefix
        self.tensor_bin = tensor_bin  # msgpack-encoded bin of the safetensors update
        self.lease_latencies: list[float] = []
        self.submissions = 0
        self.bytes_sent = 0
        self.errors: list[str] = []
        self.registered = 0

    def _body(self, worker_id: str, task: dict) -> bytes:
        lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
        fields = {"worker_id": worker_id, "lease_id": task["lease_id"], "fingerprint": self.fp,
                  "version": task["version"], "codec": "fp16", "duration_s": 1.0,
                  "result": {"loss_sum": 1.0, "weight_sum": float(sum(map(len, lp))),
                             "num_tokens": sum(map(len, lp)), "logprobs": lp}}
        # Splice the pre-packed tensor bytes in rather than re-packing 7 MB each time.
        head = bytes([0xDF]) + (len(fields) + 1).to_bytes(4, "big")
        parts = [head] + [msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)
                          for k, v in fields.items()]
        return b"".join(parts) + msgpack.packb("tensors") + self.tensor_bin

    async def worker(self, session: aiohttp.ClientSession, i: int) -> None:
        async with session.post(self.url + "/v1/workers/register",
                                json={"name": f"{self.prefix}-{i}", "device": "cpu",
                                      "max_tokens_per_task": 10_000}) as r:
            if r.status != 201:
                self.errors.append(f"register {r.status}")
                return
            wid = (await r.json())["worker_id"]
        submitted = False
        self.registered += 1
        while time.monotonic() < self.deadline:
            t0 = time.monotonic()
            try:
                async with session.post(f"{self.url}/v1/workers/{wid}/lease",
                                        params={"timeout_s": "2"}) as r:
                    if r.status == 204:
                        continue
                    if r.status != 200:
                        self.errors.append(f"lease {r.status}")
                        continue
                    task = await r.json()
                if submitted:  # the first lease waits for the driver's first request
                    self.lease_latencies.append(time.monotonic() - t0)
                slot = None
                while slot is None and time.monotonic() < self.deadline + 60:
                    async with session.post(f"{self.url}/v1/workers/{wid}/upload-slot",
                                            params={"timeout_s": "20"}) as r:
                        if r.status == 200:
                            slot = (await r.json())["slot"]
                # Built once the slot is held, as a real worker only has its update
                # then: a thousand 7 MB bodies waiting for slots would be the client's
                # memory and event-loop time, not the coordinator's.
                body = self._body(wid, task)
                async with session.post(f"{self.url}/v1/tasks/{task['task_id']}/result",
                                        data=body, headers={"Content-Type": MSGPACK},
                                        params={"slot": slot} if slot else None) as r:
                    await r.read()
                    if r.status != 200:
                        self.errors.append(f"submit {r.status}")
                        continue
                self.submissions += 1
                submitted = True
                self.bytes_sent += len(body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(type(exc).__name__)


async def _wait(s: aiohttp.ClientSession, url: str, request_id: str, deadline: float) -> str:
    """Wait for a request as the SDK would; its final status ("" at the deadline)."""
    while time.monotonic() < deadline:
        async with s.get(f"{url}/v1/requests/{request_id}", params={"timeout_s": "5"}) as r:
            if r.status != 202:
                return (await r.json()).get("status", str(r.status))
    return ""


async def drive(url: str, run_id: str, deadline: float, batch: int) -> int:
    """Keep three forward_backward requests in flight until the deadline. With a
    batch of one datum per worker (the default) work is always waiting, so lease
    latency is service time; smaller batches let the queue run dry at times and
    leases then include waiting for work."""
    sent = 0
    async with aiohttp.ClientSession() as s:
        pending: set[asyncio.Task] = set()

        async def one() -> None:
            async with s.post(f"{url}/v1/runs/{run_id}/forward_backward",
                              json={"batch": [{"text": f"load {i}"} for i in range(batch)],
                                    "timeout_s": 3600}) as r:
                request_id = (await r.json())["request_id"]
            await _wait(s, url, request_id, deadline)

        while time.monotonic() < deadline:
            while len(pending) < 3:
                pending.add(asyncio.create_task(one()))
                sent += 1
            done, pending = await asyncio.wait(pending, timeout=0.5)
        for t in pending:
            t.cancel()
    return sent


async def step(url: str, run_id: str, deadline: float, batch: int, max_steps: int = 10**9
               ) -> tuple[list[float], list[str]]:
    """A second run trained as users do: forward_backward then optim_step, over and
    over, so versions, AdamW and checkpoint writes run under the swarm too.
    Returns (seconds of each completed step, failures)."""
    times: list[float] = []
    failures: list[str] = []
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline and len(times) < max_steps:
            t0 = time.monotonic()
            for op, body in (("forward_backward",
                              {"batch": [{"text": f"step {len(times)} {i}"}
                                         for i in range(batch)]}),
                             ("optim_step", {})):
                async with s.post(f"{url}/v1/runs/{run_id}/{op}",
                                  json={**body, "timeout_s": 3600}) as r:
                    request_id = (await r.json())["request_id"]
                status = await _wait(s, url, request_id, deadline)
                if status not in ("done", ""):
                    failures.append(f"{op} {status}")
            if status == "done":
                times.append(time.monotonic() - t0)
    return times, failures


async def probe_async(args) -> None:
    """The probe process: ``--probes`` workers, their lease latencies as JSON on stdout."""
    from rewardsignal.models import fingerprint

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        _, _, tensor_bin = await _update_bin(session, args.probe_url, args.probe_run)
        swarm = Swarm(args.probe_url, args.probes, fingerprint(MODEL), tensor_bin,
                      time.monotonic() + args.seconds, prefix="probe")
        lag: list[float] = []
        ticker = asyncio.create_task(_loop_lag(lag, swarm.deadline))
        await asyncio.gather(*[swarm.worker(session, i) for i in range(args.probes)],
                             return_exceptions=True)
        await ticker
    print(json.dumps({"lease_latencies": swarm.lease_latencies, "errors": swarm.errors,
                      "submissions": swarm.submissions, "loop_lag": lag}))


async def main_async(args) -> None:
    from rewardsignal.models import fingerprint, resolve_model_path

    resolve_model_path(MODEL)
    data_dir = tempfile.mkdtemp(prefix="signal-load-")
    coord = subprocess.Popen([sys.executable, "-m", "rewardsignal.cli", "coordinator", "--port",
                              "0", "--data-dir", data_dir, "--log-level", "warning",
                              "--lease-timeout-s", "600", "--upload-slots",
                              str(args.upload_slots)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    probe = None
    try:
        url = None
        while url is None:
            m = re.search(r"listening on (http://\S+)", coord.stdout.readline())
            url = m.group(1) if m else None
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.post(url + "/v1/runs", json={"base_model": MODEL,
                                                            "lora_r": args.lora_r}) as r:
                run = await r.json()
            async with session.post(url + "/v1/runs", json={"base_model": MODEL,
                                                            "lora_r": args.lora_r}) as r:
                stepped = await r.json()
            params, update_bytes, tensor_bin = await _update_bin(session, url, run["run_id"])
            # The coordinator with its run set up (interpreter, torch, the base model
            # it loaded to initialise the adapter): what the swarm adds is on top.
            baseline = _vm_bytes(coord.pid, "VmRSS")
            start = time.monotonic()
            deadline = start + args.seconds
            bulk = args.workers - args.probes
            swarm = Swarm(url, bulk, fingerprint(MODEL), tensor_bin, deadline)
            workers = [asyncio.create_task(swarm.worker(session, i)) for i in range(bulk)]
            while swarm.registered < bulk and time.monotonic() < start + 60:
                await asyncio.sleep(0.1)
            # The stepping run alone: the same workers, no backlog (the reference of
            # the fairness ratio, measured in this run).
            alone, alone_failures = await step(url, stepped["run_id"],
                                               time.monotonic() + 60, batch=32, max_steps=5)
            deadline = swarm.deadline = time.monotonic() + args.seconds
            if args.probes:
                probe = subprocess.Popen(
                    [sys.executable, __file__, "--probe-url", url, "--probe-run", run["run_id"],
                     "--probes", str(args.probes),
                     "--seconds", str(max(1.0, deadline - time.monotonic()))],
                    stdout=subprocess.PIPE, text=True)
            measure_from = time.monotonic()
            sub0, bytes0 = swarm.submissions, swarm.bytes_sent
            bulk_lag: list[float] = []
            ticker = asyncio.create_task(_loop_lag(bulk_lag, deadline))
            fbs, (under_swarm, step_failures) = await asyncio.gather(
                drive(url, run["run_id"], deadline, batch=args.batch or args.workers),
                step(url, stepped["run_id"], deadline, batch=32))
            elapsed = time.monotonic() - measure_from
            await asyncio.gather(*workers, ticker, return_exceptions=True)
            probed = (json.loads(await asyncio.to_thread(lambda: probe.communicate(timeout=300)[0]))
                      if probe else {"lease_latencies": [], "errors": [], "submissions": 0,
                                     "loop_lag": []})
            async with session.get(url + "/v1/workers") as r:
                held = len((await r.json())["workers"])
            async with session.get(url + "/metrics") as r:
                text = await r.text()
            if os.environ.get("SIGNAL_BENCH_METRICS"):  # keep the scrape for a closer look
                with open(os.environ["SIGNAL_BENCH_METRICS"], "w") as fh:
                    fh.write(text)
            served = _histogram_quantiles(text, "signal_lease_seconds", {"waited": "no"})
            lag = _histogram_quantiles(text, "signal_event_loop_lag_seconds", {})
        rss = _vm_bytes(coord.pid, "VmHWM")
        subs = swarm.submissions - sub0 + probed["submissions"]
        mb = (swarm.bytes_sent - bytes0 + probed["submissions"] * len(tensor_bin)) / 1e6
        errors = swarm.errors + probed["errors"] + step_failures + alone_failures
        alone_s = statistics.median(alone) if alone else float("nan")
        swarm_s = statistics.median(under_swarm) if under_swarm else float("inf")
        probe_q = _quantiles(probed["lease_latencies"])
        bulk_q = _quantiles(swarm.lease_latencies)
        report = {
            "workers_requested": args.workers, "workers_held": held, "probe_workers": args.probes,
            "upload_slots": args.upload_slots,
            "update_params": params, "update_mb_fp16": update_bytes / 1e6,
            "seconds": round(elapsed, 1), "forward_backward_requests": fbs,
            "optim_steps_on_second_run": len(under_swarm),
            "second_run_step_s_alone": round(alone_s, 3),
            "second_run_step_s_under_swarm": round(swarm_s, 3),
            "fairness_ratio": round(swarm_s / alone_s, 2),
            "submissions": subs, "submissions_per_s": round(subs / elapsed, 1),
            "mb_per_s_ingested": round(mb / elapsed, 1),
            "probe_leases": len(probed["lease_latencies"]),
            "lease_p50_ms": probe_q[0], "lease_p99_ms": probe_q[1],
            "probe_loop_lag_max_ms": round(max(probed["loop_lag"], default=0) * 1e3, 1),
            "bulk_lease_p50_ms": bulk_q[0], "bulk_lease_p99_ms": bulk_q[1],
            "bulk_loop_lag_max_ms": round(max(bulk_lag, default=0) * 1e3, 1),
            "server_lease_p50_ms_upper": served[0], "server_lease_p99_ms_upper": served[1],
            "server_leases_with_work_waiting": served[2],
            "server_loop_lag_p50_ms_upper": lag[0], "server_loop_lag_p99_ms_upper": lag[1],
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "coordinator_rss_before_swarm_mb": round(baseline / 1e6, 1),
            "coordinator_peak_rss_mb": round(rss / 1e6, 1),
            "peak_rss_over_update_size": round(rss / update_bytes, 1),
            "swarm_rss_over_update_size": round((rss - baseline) / update_bytes, 1)}
        print(json.dumps(report, indent=2))
        print(f"targets: p99 lease latency < 250 ms (probe workers): {probe_q[1] < 250}; "
              f"no errors: {not errors}; workers held {held}/{args.workers}; stepping run "
              f"under the swarm / alone {swarm_s / alone_s:.2f} (target <= 3)")
    finally:
        for p in (probe, coord):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--probes", type=int, default=50,
                    help="workers (out of --workers) measuring lease latency from a process "
                         "of their own")
    ap.add_argument("--batch", type=int, default=0,
                    help="datums per forward_backward of the busy run (default: --workers)")
    ap.add_argument("--upload-slots", type=int, default=2,
                    help="the coordinator's --upload-slots (default 2, its default)")
    ap.add_argument("--probe-url", help=argparse.SUPPRESS)  # set when run as the probe
    ap.add_argument("--probe-run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.workers <= 5000 or not 1 <= args.seconds <= 600:
        raise SystemExit("--workers must be in [1, 5000] and --seconds in [1, 600]")
    if not 0 <= args.probes < args.workers and not args.probe_url:
        raise SystemExit("--probes must be in [0, --workers)")
    if not 0 <= args.batch <= 65_536:
        raise SystemExit("--batch must be in [0, 65536] (0: one datum per worker)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    asyncio.run(probe_async(args) if args.probe_url else main_async(args))


if __name__ == "__main__":
    main()
