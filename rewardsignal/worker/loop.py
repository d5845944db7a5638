"""The worker process: register, long-poll for tasks, compute, submit.

Network I/O is asyncio (aiohttp); compute runs in one background thread so
heartbeats keep flowing while a task trains. Connection trouble is retried with
capped exponential backoff; a coordinator that forgot this worker (restart) is
answered by registering again. First Ctrl-C finishes the current task, the
second abandons it (the coordinator is told, so it re-queues at once).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import torch

from rewardsignal import protocol, tracing
from rewardsignal.data.examples import example_to_datum
from rewardsignal.errors import SignalError, ValidationError, error_from_json
from rewardsignal.lora import LoraSpec
from rewardsignal.precision import Precision
from rewardsignal.worker import export, hardware, vllm_sampler
from rewardsignal.worker.channel import Leasing
from rewardsignal.worker.engine import Engine
from rewardsignal.worker.lease_stream import decode_reply
from rewardsignal.worker.model_cache import default_budget_bytes, release_device_memory
from rewardsignal.worker.sampling import SampleParams, row_seed
from rewardsignal.worker.status import StatusLine
from rewardsignal.worker.weights import WeightCache

_MAX_BACKOFF_S = 30.0
_LEASE_POLL_S = 20.0
# Submissions up to this size go without reserving an upload slot first (one
# round trip less per task); the coordinator holds them until a slot frees.
_SLOT_FREE_BYTES = 1 << 20
# A run's task fields that name its model (``Worker._runs``), and runs kept.
_MODEL_FIELDS = ("base_model", "lora", "base_dtype", "quantization")
_RUNS_KEPT = 64


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str
    token: str | None = None
    device: str = "auto"
    name: str = ""
    max_tokens_per_task: int | None = None
    micro_batch_tokens: int | None = None
    codec: str = "fp32"
    threads: int | None = None
    model_cache_gb: float | None = None  # None: a share of device memory
    memory_gb: float | None = None  # memory offered to placement (per GPU); None: the device's
    device_map: str | None = None  # "auto": each base spread over every visible GPU
    sampler: str = "builtin"  # "vllm": sample tasks on vLLM (worker.vllm_sampler)
    vllm_memory: float = 0.3  # share of the GPU the vLLM engine takes
    max_tasks: int | None = None  # stop after this many (tests, benchmarks)
    channel: bool = True  # lease on the coordinator's worker channel when it offers one


def cache_budget(config: WorkerConfig, device: torch.device, gpus: list[int]) -> int | None:
    """Bytes for cached base models: ``--model-cache-gb``, else a share of
    ``--memory-gb`` (per GPU of ``gpus``) when the worker offers less than it
    has, else None (the engine takes a share of its GPUs' memory)."""
    if config.model_cache_gb:
        return int(config.model_cache_gb * 2**30)
    if config.memory_gb:
        return default_budget_bytes(
            device, hardware.offered_memory_bytes(device, config.memory_gb, gpus))
    return None


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        if config.threads:
            # Several workers on one machine must not each spin up a thread per
            # core: oversubscription made steps 10x slower on a 2-core box.
            torch.set_num_threads(config.threads)
        self.device = hardware.resolve_device(config.device)
        if config.device_map is not None and (self.device.type != "cuda"
                                              or self.device.index is not None):
            raise ValidationError(f"--device-map {config.device_map} spreads models over every "
                                  f"GPU this worker sees: use it with --device cuda, not "
                                  f"{config.device}")
        self.gpus = hardware.worker_gpus(self.device, config.device_map)
        self.vllm = vllm_sampler.make_sampler(config.sampler, self.device, config.device_map,
                                                 config.vllm_memory)
        # What training may use of the GPU: all of it, or what vLLM leaves.
        self.share = 1.0 - config.vllm_memory if self.vllm is not None else 1.0
        budget = (cache_budget(config, self.device, self.gpus)
                  or default_budget_bytes(self.device, gpus=self.gpus))
        self.engine = Engine(str(self.device), cache_bytes=int(budget * self.share),
                             device_map=config.device_map)
        self.name = config.name or f"{socket.gethostname()}-{self.device.type}"
        self.status = StatusLine(self.name)
        self.worker_id: str | None = None
        self.stopping = False
        self.weights = WeightCache()
        self.leasing = Leasing(config.coordinator, self._take_version, self.weights.have,
                               self.status, channel=config.channel)
        # Each run's model, LoRA and precision, from its last task: a version of
        # it pushed meanwhile goes into the model before the next task comes.
        self._runs: dict[str, dict] = {}
        self._session: aiohttp.ClientSession | None = None
        self._main: asyncio.Task | None = None
        self._busy = False
        self._said_precisions = False
        # Whether the coordinator reads tensors after a result's map (``RESULT``).
        self._tensors_after = False
        # Whether a result may carry the next lease (``_submit``).
        self._lease_with_result = False
        # The lease asked for while the last result was on its way (``_submit``).
        self._next_lease: asyncio.Task | None = None
        self.tasks_done = 0
        # All torch work on one long-lived thread: every new thread that enters
        # a parallel region gets its own OpenMP team, and idle teams spinning
        # beside the busy one cost up to 2x on small machines.
        self._compute_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    # -- HTTP -------------------------------------------------------------------------------
    @property
    def _http(self) -> aiohttp.ClientSession:
        assert self._session is not None, "used only inside run()"
        return self._session

    def _headers(self) -> dict:
        h = {"X-Signal-Worker": self.worker_id or ""}
        if self.config.token:
            h["Authorization"] = f"Bearer {self.config.token}"
        return h

    async def _call(self, method: str, path: str, *, json=None, data=None, params=None,
                    content_type=None, accept=None, timeout_s: float = 60.0):
        headers = self._headers()
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        url = self.config.coordinator.rstrip("/") + path
        async with self._http.request(
                method, url, json=json, data=data, params=params, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await resp.read()
            if resp.status == 204:
                return None
            payload = decode_reply(resp, body)
            if resp.status >= 400:
                raise error_from_json(resp.status, payload)
            return payload

    async def _lease(self) -> dict | None:
        assert self.worker_id is not None, "leases come after registering"
        return await self.leasing.lease(self._headers(), self.worker_id, self._lease_fields())

    async def register(self) -> None:
        tokens = (self.config.max_tokens_per_task
                  or int(hardware.default_task_tokens(self.device, self.gpus) * self.share))
        precisions = hardware.precisions(self.device, self.engine.auto_dtype)
        memory = int(hardware.offered_memory_bytes(self.device, self.config.memory_gb, self.gpus)
                     * self.share)
        reply = await self._call("POST", "/v1/workers/register", json={
            "name": self.name, "device": str(self.device),
            "hardware": hardware.describe(self.device, self.gpus), "max_tokens_per_task": tokens,
            "precisions": precisions, "memory_bytes": memory,
            "host_memory_bytes": hardware.host_memory_bytes(self.device, self.config.memory_gb),
            "checks": list(protocol.CHECK_FEATURES), "tasks": list(protocol.OPTIONAL_TASKS)})
        self.worker_id = reply["worker_id"]
        self._tensors_after = protocol.RESULT in (reply.get("result_types") or ())
        self._lease_with_result = reply.get("lease_with_result") is True
        await self.leasing.offer(reply.get("channel"))
        self.status.event(f"registered with {self.config.coordinator} as {self.worker_id} "
                          f"(device {self.device}, {tokens} tokens per task, offers "
                          f"{memory / 2**30:.2f} GiB)")
        if not precisions["quantization"] and not self._said_precisions:
            # Said once: the coordinator sends this worker no quantized run's tasks.
            self._said_precisions = True
            self.status.event(f"this worker cannot serve nf4/int8 runs: {precisions['note']}")

    # -- main loop -----------------------------------------------------------------------------
    async def run(self) -> int:
        self._main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            loop.add_signal_handler(signal.SIGTERM, self._on_sigint)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests drive the worker in-process)
        code = 0
        async with aiohttp.ClientSession() as self._session:
            self.leasing.session = self._session
            try:
                code = await self._serve()
            except asyncio.CancelledError:
                pass
            finally:
                if self._next_lease is not None:  # a task it brought goes back with goodbye
                    self._next_lease.cancel()
                    await asyncio.gather(self._next_lease, return_exceptions=True)
                await self.leasing.close()
                await self._goodbye()
        self._compute_pool.shutdown(wait=False, cancel_futures=True)
        if self.vllm is not None:
            self.vllm.close()
        self.status.event(f"stopped after {self.tasks_done} tasks{self._peak_memory_note()}")
        return code

    async def _serve(self) -> int:
        """Lease and compute until stopped; the exit code."""
        backoff = 1.0
        while not self.stopping:
            if self.config.max_tasks is not None and self.tasks_done >= self.config.max_tasks:
                return 0
            try:
                if self.worker_id is None:
                    await self._register_or_explain()
                self.status.update("idle", waiting="task")
                ahead, self._next_lease = self._next_lease, None
                task = await (ahead if ahead is not None else self._lease())
                backoff = 1.0
                if task is not None:
                    await self._handle(task)
            except _Refused as exc:
                self.status.event(str(exc))
                return 2
            except SignalError as exc:
                await self._after_error(exc, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.status.event(f"coordinator unreachable at {self.config.coordinator}: "
                                  f"{_cause(exc)}; retrying in {backoff:.0f}s (backoff doubles "
                                  f"up to {_MAX_BACKOFF_S:.0f}s)")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        return 0

    async def _register_or_explain(self) -> None:
        """Register; a coordinator that answers 401/404 here will not change its
        mind by retrying, so those end the worker with one line."""
        url = self.config.coordinator
        try:
            await self.register()
        except SignalError as exc:
            if exc.code == "unauthorized":
                raise _Refused(f"refused by {url}: {exc.message}") from None
            if exc.http_status == 404 or exc.code == "not_found":
                raise _Refused(f"{url} answered 404 to POST /v1/workers/register: is it a "
                               "Signal coordinator? Check --coordinator.") from None
            raise

    async def _after_error(self, exc: SignalError, backoff: float) -> None:
        if exc.code == "unknown_worker":
            self.status.event("coordinator does not know this worker (restarted?); "
                              "registering again")
            self.worker_id = None
        elif exc.code == "quarantined":
            self.status.event(f"quarantined by the coordinator: {exc.message}; "
                              "check this machine, retrying later")
            await asyncio.sleep(min(backoff * 10, 300))
        else:
            self.status.event(f"coordinator error: {exc.code}: {exc.message}")
            await asyncio.sleep(backoff)

    async def _goodbye(self) -> None:
        """Tell the coordinator this worker is leaving (it re-queues what it held
        at once); best effort, a few seconds at most."""
        if self.worker_id is None:
            return
        try:
            await asyncio.wait_for(self._call("POST", f"/v1/workers/{self.worker_id}/goodbye",
                                              timeout_s=3), 3)
        except (Exception, asyncio.CancelledError):  # leaving anyway; leases will expire
            pass

    def _peak_memory_note(self) -> str:
        """Peak device memory PyTorch allocated in this process (weights, adapters,
        activations; not the allocator's cache nor the CUDA context), so it can be
        compared with ``torch.cuda.max_memory_allocated`` of a reference loop."""
        if self.device.type != "cuda":
            return ""
        peak = sum(torch.cuda.max_memory_allocated(i) for i in self.gpus)
        return f"; peak GPU memory allocated {peak / 2**30:.2f} GiB ({peak} bytes)"

    def _on_sigint(self) -> None:
        if self._busy and not self.stopping:
            self.stopping = True
            self.status.event("finishing the current task, then exiting "
                              "(Ctrl-C again to abandon it)")
            return
        # Idle (in a long-poll) or asked twice: stop now; a task in hand is reported
        # back as abandoned so the coordinator re-queues it without waiting.
        self.stopping = True
        if self._main is not None:
            self._main.cancel()

    async def _handle(self, task: dict) -> None:
        self._busy = True
        hb = asyncio.create_task(self._heartbeats(task["lease_timeout_s"]))
        try:
            adapter = await self.weights.get(task, self._download)
            if task["kind"] in ("forward_backward", "forward"):
                self._runs.pop(task["run_id"], None)  # the newest last, the oldest out first
                self._runs[task["run_id"]] = {k: task.get(k) for k in _MODEL_FIELDS}
                while len(self._runs) > _RUNS_KEPT:
                    del self._runs[next(iter(self._runs))]
            started = time.monotonic()
            self.status.update("computing", task=task["kind"], run=task["run_id"],
                               version=task["version"])
            if task["kind"] == "export_merged":
                msg = await export.export_task(
                    task, adapter, self._compute_pool, self.engine, self._http,
                    self.config.coordinator, self._headers(), self.status)
            else:
                tracing.mark("worker: compute queued")
                msg = await asyncio.get_running_loop().run_in_executor(
                    self._compute_pool, self._compute, task, adapter)
                tracing.mark("worker: compute returned")
            msg["duration_s"] = time.monotonic() - started
            tokens = sum(len(d["model_input"]) for d in task["payload"].get("datums", []))
            if task["kind"] == "train":
                tokens = msg["result"]["tokens"]
            if tokens:
                self.status.last_rate = tokens / max(msg["duration_s"], 1e-9)
            reply = await self._submit(task, msg)
            self.tasks_done += 1
            self.status.tasks_done = self.tasks_done
            if reply.get("status") != "accepted":
                self.status.event(f"task {task['task_id']}: {reply.get('status')}")
        except asyncio.CancelledError:
            await self._report_failure(task, "worker shut down mid-task (Ctrl-C)")
            raise
        except SignalError as exc:
            self.status.event(f"task {task['task_id']} not accepted: {exc.code}: {exc.message}")
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise
        except Exception as exc:  # a compute failure: tell the coordinator so it re-queues
            self.status.event(f"task {task['task_id']} failed: {type(exc).__name__}: {exc}")
            await self._report_failure(task, f"{type(exc).__name__}: {exc}")
        finally:
            hb.cancel()
            self._busy = False

    def _take_version(self, update: dict) -> None:
        """A version pushed while this worker waits (a lease's ``version`` frame):
        kept, and put into the model on the compute thread (which runs the next
        task after it) instead of at the start of that task's compute."""
        if not self.weights.take(update):
            return
        run = self._runs.get(update["run_id"])
        adapter = self.weights.held(update["run_id"], update["version"])
        if run is not None and adapter is not None:
            self._compute_pool.submit(self.engine.preload, run, update["run_id"],
                                      update["version"], adapter)

    async def _heartbeats(self, lease_timeout_s: float) -> None:
        while True:
            await asyncio.sleep(max(lease_timeout_s / 3, 0.2))
            try:
                await self._call("POST", f"/v1/workers/{self.worker_id}/heartbeat", timeout_s=10)
            except Exception:  # a missed heartbeat is not fatal; the next one may land
                pass

    async def _report_failure(self, task: dict, error: str) -> None:
        try:
            await asyncio.shield(self._submit(task, {"error": error}, timeout_s=5))
        except Exception:
            pass  # best effort: the lease will expire on its own

    async def _submit(self, task: dict, msg: dict, timeout_s: float = 300) -> dict:
        """Submit, retrying a few times on connection trouble: a computed result is
        worth more than the seconds it takes (a duplicate is a no-op server-side)."""
        fields = {**msg, "worker_id": self.worker_id, "lease_id": task["lease_id"]}
        kind = protocol.RESULT if "tensors" in msg and self._tensors_after else protocol.MSGPACK
        pack = protocol.pack_result if kind == protocol.RESULT else protocol.pack
        # The next lease goes out with the result, not a round trip after it:
        # over a link 50 ms each way the next task then comes 100 ms sooner. A
        # coordinator that takes it in the result's own request answers the
        # result first and then leases (one request a step).
        ahead = "result" in msg and self._may_lease_ahead()
        # A body over 1 MiB waits for an upload slot: it leases on its own, after.
        within = (ahead and self._lease_with_result
                  and len(msg.get("tensors") or b"") <= _SLOT_FREE_BYTES)
        lease = self._lease_fields() if within else {}
        body = pack({**fields, "lease": lease} if within else fields)
        big = "tensors" in msg and len(body) > _SLOT_FREE_BYTES
        if big and within:  # its map tipped it over (rare): packed again, without
            within, body = False, pack(fields)
        if ahead and not big and not within:
            self._next_lease = asyncio.create_task(self._lease())
        for attempt in range(4):
            try:
                # Big bodies go out only once the coordinator has a slot for them.
                params = {"slot": await self._upload_slot(task)} if big else None
                tracing.mark("worker: result posted")
                if within:
                    return await self._post_leasing(task, body, kind, timeout_s, lease)
                reply = await self._call("POST", f"/v1/tasks/{task['task_id']}/result",
                                         data=body, content_type=kind,
                                         params=params, timeout_s=timeout_s)
                tracing.mark("worker: result answered")
                return reply
            except (aiohttp.ClientError, OSError, TimeoutError):
                if attempt == 3:
                    raise
                await asyncio.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def _lease_fields(self) -> dict:
        """A lease's fields (on its own, or sent with a result): the versions
        held, how long to wait for a task, the delta codecs this worker applies."""
        return {"have": self.weights.have(), "timeout_s": _LEASE_POLL_S,
                "deltas": list(protocol.DELTA_CODECS)}

    async def _post_leasing(self, task: dict, body: bytes, kind: str, timeout_s: float,
                            lease: dict) -> dict:
        """Send a result that carries the next lease: its answer, with the rest
        of the lease read meanwhile as the next lease (``_next_lease``)."""
        assert self.worker_id is not None, "results come after registering"
        answer, self._next_lease = await self.leasing.post_leasing(
            self._headers(), self.worker_id, task["task_id"], body, kind, timeout_s, lease)
        return answer

    def _may_lease_ahead(self) -> bool:
        """Whether to ask for the next task while a result is sent: not when this
        worker is stopping or the task being submitted is its last."""
        last = self.config.max_tasks is not None and self.tasks_done + 1 >= self.config.max_tasks
        return not (self.stopping or last or self._next_lease is not None)

    async def _upload_slot(self, task: dict) -> str:
        self.status.update("waiting to upload", task=task["kind"], run=task["run_id"])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            reply = await self._call("POST", f"/v1/workers/{self.worker_id}/upload-slot",
                                     params={"timeout_s": "20"}, timeout_s=60)
            if reply is not None:
                return reply["slot"]
        raise SignalError("no upload slot within 600 s; the coordinator is overloaded")

    async def _download(self, task: dict) -> bytes:
        """GET the task's weights, showing bytes as they arrive."""
        url = self.config.coordinator.rstrip("/") + task["weights_url"]
        async with self._http.get(url, headers=self._headers(),
                                     timeout=aiohttp.ClientTimeout(total=3600)) as resp:
            if resp.status >= 400:
                raise error_from_json(resp.status, decode_reply(resp, await resp.read()))
            total = resp.content_length or 0
            chunks, got = [], 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                chunks.append(chunk)
                got += len(chunk)
                self.status.update("downloading", run=task["run_id"], version=task["version"],
                                   bytes=f"{got / 1e6:.1f}/{total / 1e6:.1f} MB")
            return b"".join(chunks)

    # -- compute (in a thread) -----------------------------------------------------------------
    def _compute(self, task: dict, adapter: dict) -> dict:
        from rewardsignal.aggregation.codecs import encode

        tracing.mark("worker: compute begins")
        base = task["base_model"]
        spec = LoraSpec.from_json(task["lora"])
        precision = Precision.from_json(task)
        model, key = self.engine.activate(base, spec, task["run_id"], task["version"], adapter,
                                          precision)
        msg = {"fingerprint": self.engine.fingerprint(base, precision),
               "version": task["version"]}
        payload = task["payload"]
        if task["kind"] == "sample":
            return {**msg, "result": self._sample(model, base, payload, task, adapter)}
        tok = self.engine.tokenizer(base)
        datums = [example_to_datum(d, tok, where=f"datums[{i}]")
                  for i, d in enumerate(payload["datums"])]
        if task["kind"] == "train":
            delta, metrics = self.engine.train_local(
                model, key, base, datums, steps=payload["local_steps"],
                batch_size=payload["batch_size"], learning_rate=payload["learning_rate"],
                betas=(payload["beta1"], payload["beta2"]), eps=payload["eps"],
                weight_decay=payload["weight_decay"], seed=payload["seed"],
                micro_tokens=self._micro_tokens(datums))
            codec = payload.get("codec", self.config.codec)
            return {**msg, "codec": codec, "result": metrics,
                    "tensors": protocol.tensors_to_bytes(encode(delta, codec))}
        backward = task["kind"] == "forward_backward"
        res = self._with_oom_retry(model, key, datums, payload, backward)
        tracing.mark("worker: forward and backward done")
        msg["result"] = {"loss_sum": res.loss_sum, "weight_sum": res.weight_sum,
                         "num_tokens": res.num_tokens, "logprobs": res.logprobs}
        if backward:
            msg["codec"] = self.config.codec
            msg["tensors"] = protocol.tensors_to_bytes(encode(res.grads, self.config.codec))
        tracing.mark("worker: result encoded")
        return msg

    def _sample(self, model, base: str, payload: dict, task: dict, adapter: dict) -> dict:
        """A group of prompts, ``num_samples`` sequences each, seeded by their
        place in the whole request (``prompt_offset``), so the split of a request
        over workers does not change a sequence. On vLLM when this worker runs
        it and the task keeps the built-in path's meaning there."""
        prompts = payload["prompt_tokens"]
        n = payload.get("num_samples", 1)
        offset = payload.get("prompt_offset", 0)
        seeds = [[row_seed(payload.get("seed"), offset + p, s) for s in range(n)]
                 for p in range(len(prompts))]
        stop_ids = (*self.engine.stop_ids(model, base), *payload.get("stop_ids", ()))
        params = SampleParams(
            max_tokens=payload["max_tokens"], temperature=payload["temperature"],
            top_p=payload.get("top_p", 1.0), top_k=payload.get("top_k", 0),
            stop_ids=stop_ids, stop_strings=tuple(payload.get("stop_strings", ())),
            prompt_logprobs=bool(payload.get("prompt_logprobs")))
        samples, prompt_lps = (self._sample_on_vllm(model, base, task, adapter, prompts, seeds,
                                                    params)
                               or self.engine.sample(model, base, prompts, seeds, params))
        result: dict = {"outputs": [s for group in samples for s in group]}
        if prompt_lps is not None:
            result["prompt_logprobs"] = prompt_lps
        return result

    def _sample_on_vllm(self, model, base: str, task: dict, adapter: dict,
                        prompts: list[list[int]], seeds: list[list[int]], params: SampleParams
                        ) -> tuple[list[list[dict]], list | None] | None:
        """``worker.vllm_sampler`` for this task; None: the built-in path samples."""
        if self.vllm is None or self.vllm.broken:
            return None
        from rewardsignal.models import resolve_model_path
        from rewardsignal.worker.vllm_sampler import MAX_MODEL_LEN, unsupported

        precision = Precision.from_json(task)
        context = int(getattr(model.config, "max_position_embeddings", MAX_MODEL_LEN))
        if unsupported(precision, params, max(len(p) for p in prompts), context):
            return None

        try:
            return self.vllm.generate(
                model_path=str(resolve_model_path(base)), base_model=base,
                dtype=precision.resolve(self.engine.auto_dtype),
                spec=LoraSpec.from_json(task["lora"]), run_id=task["run_id"],
                version=task["version"], adapter=adapter, tokenizer=self.engine.tokenizer(base),
                output_size=model.get_output_embeddings().weight.shape[0], context=context,
                prompts=prompts, seeds=seeds, params=params)
        except Exception as exc:  # vLLM's failures are its own many types
            self.vllm.give_up(exc)
            return None

    def _micro_tokens(self, datums) -> int:
        micro = self.config.micro_batch_tokens or (4096 if self.device.type == "cpu" else 16384)
        return max(micro, max(len(d) for d in datums))

    def _with_oom_retry(self, model, key, datums, payload, backward):
        """Run the shard in micro-batches; on out-of-memory halve the micro-batch
        and retry. Sums are additive, so the result does not depend on the split."""
        micro = self._micro_tokens(datums)
        longest = max(len(d) for d in datums)
        while True:
            try:
                return self.engine.forward_backward(
                    model, key, datums, payload["loss_fn"], payload["loss_fn_config"],
                    backward=backward, micro_tokens=max(micro, longest),
                    temperature=float(payload.get("logit_temperature", 1.0)))
            except torch.OutOfMemoryError:
                if micro <= longest:
                    raise
            # Outside the except block: its traceback, whose frames hold the failed
            # pass's activations, is gone, so releasing the cache frees them.
            micro //= 2
            release_device_memory(self.device)
            self.status.event(f"out of memory; retrying with micro-batches of {micro} tokens")


class _Refused(Exception):
    """The coordinator refused this worker for good (bad token, not a coordinator)."""


def _cause(exc: BaseException) -> str:
    """What went wrong with a connection, with the errno when there is one."""
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if os_error is not None and os_error.errno is not None:
        return f"{os_error.strerror or type(os_error).__name__} (errno {os_error.errno})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run_worker(config: WorkerConfig) -> int:
    return asyncio.run(Worker(config).run())
