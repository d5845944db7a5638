"""The Signal SDK: ``AsyncSignalClient`` (the one implementation) and its runs.

Every operation is a future on the coordinator: the POST answers 202 with a
request id, and the client long-polls ``GET /v1/requests/{id}`` until the result
is there (no busy polling). Errors arrive as the same typed exceptions the
coordinator raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from rewardsignal.errors import (
    NotFoundError,
    RequestTimeoutError,
    SignalError,
    ValidationError,
    error_from_json,
    http_status_for,
)
from rewardsignal.sdk import hub
from rewardsignal.sdk.evaluation import evaluate_examples
from rewardsignal.sdk.jobs import AsyncFederatedJob
from rewardsignal.sdk.payloads import init_from_field, neg_grad
from rewardsignal.sdk.transport import DEFAULT_RETRY_WINDOW_S, Transport, new_idempotency_key

DEFAULT_URL = "http://127.0.0.1:8000"
_WAIT_CHUNK_S = 30.0


class AsyncSignalClient:
    """``retry_window_s``: how long a call rides out an unreachable or restarting
    coordinator (retrying with backoff) before it raises
    ``CoordinatorUnavailableError``, which names the request to resume."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *,
                 timeout_s: float = 600.0,
                 retry_window_s: float = DEFAULT_RETRY_WINDOW_S) -> None:
        if isinstance(api_key, str) and api_key.startswith(("http://", "https://")):
            raise ValidationError(f"{api_key!r} was given as the API key (the first "
                                  f"argument); pass the coordinator's address as "
                                  f"base_url={api_key!r}")
        self.api_key = api_key if api_key is not None else os.environ.get("SIGNAL_API_KEY")
        self.base_url = (base_url or os.environ.get("SIGNAL_URL")
                         or os.environ.get("SIGNAL_COORDINATOR") or DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self._transport = Transport(self.base_url, self.api_key, retry_window_s)
        # Set once the coordinator answered that it has no POST /v1/runs/{id}/requests.
        self._no_requests_route = False

    async def __aenter__(self) -> AsyncSignalClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    async def _http(self, method: str, path: str, *, body: Any = None,
                    params: dict | None = None, timeout_s: float = 60.0,
                    raw: bool = False) -> Any:
        """One HTTP call; calls that change something carry a fresh idempotency
        key, so that they too are retried through a coordinator restart."""
        key = new_idempotency_key() if method == "POST" else None
        return await self._transport.call(method, path, body=body, params=params,
                                          timeout_s=timeout_s, idempotency_key=key, raw=raw)

    async def _op(self, run_id: str, op: str, body: dict, timeout_s: float | None) -> dict:
        timeout_s = timeout_s or self.timeout_s
        return await self._accept_and_wait(run_id, op, body, timeout_s)

    async def _accept_and_wait(self, run_id: str, op: str, body: dict, timeout_s: float
                               ) -> dict:
        """Queue an operation and wait for its result. The first wait rides on the
        queueing call itself (``?wait_s``): one round trip when the operation
        finishes within a wait chunk; a coordinator that answers 202 instead
        (still running, or one from before ``wait_s``) is waited on as usual."""
        accepted = await self._http("POST", f"/v1/runs/{run_id}/{op}",
                                    body={**body, "timeout_s": timeout_s},
                                    params={"wait_s": f"{min(_WAIT_CHUNK_S, timeout_s):.3f}"},
                                    timeout_s=min(_WAIT_CHUNK_S, timeout_s) + 60)
        return (await self._result(accepted, timeout_s + 10, told=False))[0]

    async def _result(self, state: dict, timeout_s: float, *, told: bool) -> tuple[dict, bool]:
        """A request's result from the state an answer gave (``?wait_s``): at
        once when it is done, else waited on (saying once that it waits for a
        worker); and whether that was said."""
        if state.get("status") == "done" and "result" in state:
            return state["result"], told
        told = _tell_if_waiting(state, told)
        return await self._wait(state["request_id"], timeout_s, told=told), told

    async def _accept_all_and_wait(self, run_id: str, ops: Sequence[tuple[str, dict]],
                                   timeout_s: float) -> list[dict]:
        """Queue several operations in one call (``POST /v1/runs/{id}/requests``:
        in order, all or none, one round trip) and wait for each one's result;
        the first that failed raises its own error. A coordinator from before
        that route gets them one after another, each queued once the one before
        was accepted (the same order), and the results are awaited together."""
        deadline = time.monotonic() + timeout_s + 10
        if self._no_requests_route:
            return await self._accept_in_turn(run_id, ops, timeout_s, deadline)
        try:
            accepted = await self._http(
                "POST", f"/v1/runs/{run_id}/requests",
                body={"requests": [{"op": op, "args": args} for op, args in ops],
                      "timeout_s": timeout_s},
                params={"wait_s": f"{min(_WAIT_CHUNK_S, timeout_s):.3f}"},
                timeout_s=min(_WAIT_CHUNK_S, timeout_s) + 60)
        except NotFoundError as exc:
            if "unknown operation 'requests'" not in exc.message:
                raise
            self._no_requests_route = True  # not asked again of this coordinator
            return await self._accept_in_turn(run_id, ops, timeout_s, deadline)
        results, told = [], False
        for state in accepted["requests"]:
            if state.get("status") == "failed":
                raise error_from_json(http_status_for(state["error"]["code"]), state)
            # One deadline for all of them: each wait gets what is left.
            result, told = await self._result(state, max(deadline - time.monotonic(), 1.0),
                                              told=told)
            results.append(result)
        return results

    async def _accept_in_turn(self, run_id: str, ops: Sequence[tuple[str, dict]],
                              timeout_s: float, deadline: float) -> list[dict]:
        """``_accept_all_and_wait`` against a coordinator without ``/requests``:
        each accepted in turn (one refused raises at once), then all waited on
        together until ``deadline``; the first failure raises."""
        ids = [await self._accept(run_id, op, args, timeout_s) for op, args in ops]
        left = max(deadline - time.monotonic(), 1.0)
        waits = [asyncio.ensure_future(self.wait(rid, timeout_s=left)) for rid in ids]
        try:
            return list(await asyncio.gather(*waits))
        finally:  # after a failure, the other waits end too
            for w in waits:
                w.cancel()

    async def _accept(self, run_id: str, op: str, body: dict, timeout_s: float) -> str:
        """Queue an operation; its request id (the result comes from ``wait``)."""
        accepted = await self._http("POST", f"/v1/runs/{run_id}/{op}",
                                    body={**body, "timeout_s": timeout_s})
        return accepted["request_id"]

    async def wait(self, request_id: str, *, timeout_s: float | None = None) -> dict:
        """Long-poll a request until it finishes; returns its result or raises
        its typed error. Rides out a coordinator restart (the request was stored
        when it was accepted, and runs again after the restart)."""
        return await self._wait(request_id, timeout_s, told=False)

    async def _wait(self, request_id: str, timeout_s: float | None, *, told: bool) -> dict:
        """``wait``; ``told``: the caller already said the request waits for a worker."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError(f"request {request_id} still pending after "
                                          f"{timeout_s}s; wait on it again with wait()")
            chunk = min(_WAIT_CHUNK_S, left)
            reply = await self._transport.call(
                "GET", f"/v1/requests/{request_id}", params={"timeout_s": f"{chunk:.3f}"},
                timeout_s=chunk + 30, request_id=request_id)
            if reply["status"] == "done":
                return reply["result"]
            told = _tell_if_waiting(reply, told)

    # -- client-level calls --------------------------------------------------------------
    async def health(self) -> dict:
        return await self._http("GET", "/healthz")

    async def list_models(self, *, details: bool = False) -> list[Any]:
        """The base models this coordinator serves: their ids, or with
        ``details=True`` dicts with ``model_id``, ``param_count`` (None when the
        coordinator has not seen its config), ``source`` (builtin | hub | local),
        ``revision`` / ``family`` / ``notes`` (from the operator's models file),
        ``workers_able`` and ``workers_loaded`` (live workers that can serve it /
        have been given work on it)."""
        models = (await self._http("GET", "/v1/models"))["models"]
        return models if details else [m["model_id"] for m in models]

    async def status(self) -> dict:
        """What the dashboard shows: the caller's runs and jobs, all workers,
        rejection counts by reason, task queue counts."""
        return await self._http("GET", "/v1/status")

    async def list_workers(self) -> list[dict]:
        return (await self._http("GET", "/v1/workers"))["workers"]

    async def create_run(self, base_model: str, *, lora_r: int = 8,
                         lora_alpha: float | None = None, lora_dropout: float = 0.0,
                         lora_target_modules: Sequence[str] | None = None,
                         learning_rate: float = 1e-4, seed: int = 0, max_length: int = 2048,
                         base_dtype: str = "auto", quantization: str | None = None,
                         gpu_config: str | None = None, init_from: str | Path | None = None,
                         log_to: Sequence[str] | None = None, wandb_project: str | None = None,
                         **optimizer: float) -> AsyncRun:
        """A new run. ``base_dtype`` ("auto" | "bf16" | "fp16" | "fp32") and
        ``quantization`` (None | "nf4" | "int8", on CUDA workers with bitsandbytes)
        say how workers load the frozen base; LoRA stays fp32. ``gpu_config``
        ("A100-80GB:2") is a placement hint: the least memory a worker needs. If
        no registered worker can host the run, the coordinator's warnings are
        printed (the run is created all the same: workers may join later).

        ``init_from`` starts from existing LoRA weights instead of the seeded
        ones: a PEFT adapter directory on this machine (sent with the request) or
        ``"run_id@version"`` of one of your runs. The base model and the LoRA
        shapes (``lora_r``, ``lora_alpha``, ``lora_target_modules``) must match
        the adapter's; the optimizer state starts fresh.

        ``log_to=["tensorboard", "wandb"]`` logs the run's step and round metrics
        (loss, tokens, learning rate, grad norm, eval loss, rejections) to
        TensorBoard event files under its checkpoint directory and/or to W&B
        (``wandb_project``), from the coordinator (which needs those extras)."""
        body = {"base_model": base_model, "lora_r": lora_r, "lora_alpha": lora_alpha,
                "lora_dropout": lora_dropout, "learning_rate": learning_rate, "seed": seed,
                "max_length": max_length, "base_dtype": base_dtype,
                "quantization": quantization, "gpu_config": gpu_config,
                "lora_target_modules": list(lora_target_modules) if lora_target_modules
                else None, **optimizer, **init_from_field(init_from)}
        if log_to is not None:
            body["log_to"] = list(log_to)
        if wandb_project is not None:
            body["wandb_project"] = wandb_project
        info = await self._http("POST", "/v1/runs", body=body, timeout_s=600)
        for warning in info.get("warnings") or ():
            print(f"signal: warning: {warning}", file=sys.stderr, flush=True)
        return AsyncRun(self, info["run_id"])

    async def get_run(self, run_id: str) -> dict:
        return await self._http("GET", f"/v1/runs/{run_id}")

    async def list_runs(self) -> list[dict]:
        return (await self._http("GET", "/v1/runs"))["runs"]

    async def delete_run(self, run_id: str) -> dict:
        """Delete a run with its checkpoints, saved states, pending requests (they
        fail), federated jobs (cancelled) and metric series. Not undoable."""
        return await self._http("DELETE", f"/v1/runs/{run_id}")

    def run(self, run_id: str) -> AsyncRun:
        """A handle on an existing run."""
        return AsyncRun(self, run_id)

    async def upload_dataset(self, dataset: str | Path | Sequence[Any]) -> str:
        """Upload a JSONL file (or a list of examples) for federated jobs; returns
        its dataset id."""
        if isinstance(dataset, str | Path):
            path = Path(dataset)
            if not path.is_file():
                raise ValidationError(f"dataset file {str(path)!r} does not exist")
            raw, name = path.read_bytes(), path.name
        else:
            raw = "".join(json.dumps(ex) + "\n" for ex in dataset).encode()
            name = "examples.jsonl"
        async with self._transport.session.post(
                f"{self.base_url}/v1/datasets", data=raw, params={"name": name},
                headers={**self._transport.headers(), "Content-Type": "application/x-ndjson"},
                timeout=aiohttp.ClientTimeout(total=3600)) as resp:
            payload = await resp.json(content_type=None)
            if resp.status >= 400:
                raise error_from_json(resp.status, payload)
        return payload["dataset_id"]


class AsyncRun:
    def __init__(self, client: AsyncSignalClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    async def info(self) -> dict:
        return await self.client.get_run(self.run_id)

    async def delete(self) -> dict:
        """Delete this run and everything it owns (see ``delete_run``)."""
        return await self.client.delete_run(self.run_id)

    async def list_artifacts(self) -> list[dict]:
        """The run's saved states (``save_state``), oldest version first: ``name``,
        ``version``, ``mode``, ``checkpoint_path``, ``files``."""
        return (await self.client._http("GET", f"/v1/runs/{self.run_id}/artifacts"))[
            "artifacts"]

    async def jobs(self) -> list[dict]:
        """The run's federated jobs, oldest first (what ``job.status()`` says)."""
        return (await self.client._http("GET", f"/v1/runs/{self.run_id}/jobs"))["jobs"]

    async def evaluate(self, data: str | Path | Sequence[Any], *, version: int | None = None,
                       batch_size: int = 256, timeout_s: float | None = None) -> dict:
        """Mean per-token cross-entropy and perplexity of held-out ``data`` (a JSONL
        path on this machine, or a list of examples) under ``version`` (default:
        the latest), split over the workers like a ``forward``; nothing changes.
        Returns ``loss``, ``perplexity``, ``num_examples``, ``num_tokens``,
        ``version``. Errors in a file name its 1-based line."""
        async def chunk(batch: list, at: int | None) -> dict:
            return await self.client._op(self.run_id, "evaluate", {
                "batch": batch, "version": at}, timeout_s)

        return await evaluate_examples(chunk, data, version=version, batch_size=batch_size)

    async def forward_backward(self, batch: Sequence[Any], loss_fn: str = "cross_entropy", *,
                               loss_fn_config: dict | None = None, reduction: str = "mean",
                               timeout_s: float | None = None) -> dict:
        """Gradients of the batch's loss, accumulated on the coordinator until
        ``optim_step``. Returns ``loss`` (weighted mean), ``num_tokens``,
        per-datum ``logprobs``."""
        return await self.client._op(self.run_id, "forward_backward", {
            "batch": list(batch), "loss_fn": loss_fn, "loss_fn_config": loss_fn_config or {},
            "reduction": reduction}, timeout_s)

    async def forward(self, batch: Sequence[Any], loss_fn: str = "cross_entropy", *,
                      loss_fn_config: dict | None = None, timeout_s: float | None = None
                      ) -> dict:
        """Per-token logprobs and loss, no gradients. ``datums`` holds each
        example in token form."""
        return await self.client._op(self.run_id, "forward", {
            "batch": list(batch), "loss_fn": loss_fn, "loss_fn_config": loss_fn_config or {}},
            timeout_s)

    async def forward_backward_custom(
            self, batch: Sequence[Any],
            loss_fn: Callable[[list[dict], list[Any]], Any], *,
            timeout_s: float | None = None) -> dict:
        """A loss the server never sees: logprobs come back, ``loss_fn(datums,
        logprobs)`` runs here in torch, and only d(loss)/d(logprob) per token goes
        back, as the weights of a linear surrogate (-sum w * logprob)."""
        import torch

        fwd = await self.forward(batch, timeout_s=timeout_s)
        logprobs = [torch.tensor(lp, dtype=torch.float32, requires_grad=True)
                    for lp in fwd["logprobs"]]
        loss = loss_fn(fwd["datums"], logprobs)
        loss.backward()
        surrogate = [{"model_input": d["model_input"],
                      "loss_fn_inputs": {"target_tokens": d["loss_fn_inputs"]["target_tokens"],
                                         "weights": neg_grad(lp)}}
                     for d, lp in zip(fwd["datums"], logprobs, strict=True)]
        res = await self.forward_backward(surrogate, reduction="sum", timeout_s=timeout_s)
        return {"loss": float(loss.detach()), "num_tokens": res["num_tokens"],
                "logprobs": fwd["logprobs"], "version": res["version"]}

    async def optim_step(self, learning_rate: float | None = None, beta1: float = 0.9,
                         beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                         grad_clip_norm: float | None = None, *,
                         timeout_s: float | None = None) -> dict:
        """AdamW on everything accumulated since the last step; returns the new
        ``version`` once its checkpoint is written."""
        return await self.client._op(self.run_id, "optim_step", {
            "learning_rate": learning_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
            "weight_decay": weight_decay, "grad_clip_norm": grad_clip_norm}, timeout_s)

    async def forward_backward_optim_step(
            self, batch: Sequence[Any], loss_fn: str = "cross_entropy", *,
            loss_fn_config: dict | None = None, reduction: str = "mean",
            learning_rate: float | None = None, beta1: float = 0.9, beta2: float = 0.999,
            eps: float = 1e-8, weight_decay: float = 0.0, grad_clip_norm: float | None = None,
            timeout_s: float | None = None) -> tuple[dict, dict]:
        """``forward_backward`` then ``optim_step``, pipelined: both are queued in
        one call (the step right behind the batch; a run applies its requests in
        the order accepted), and its answer brings both results. The same effect
        as the two calls in turn, in one round trip when the step finishes
        within a wait chunk. Returns (``forward_backward``'s result,
        ``optim_step``'s result); a failed ``forward_backward`` raises its own
        error."""
        fb, step = await self.client._accept_all_and_wait(self.run_id, [
            ("forward_backward", {"batch": list(batch), "loss_fn": loss_fn,
                                  "loss_fn_config": loss_fn_config or {},
                                  "reduction": reduction}),
            ("optim_step", {"learning_rate": learning_rate, "beta1": beta1, "beta2": beta2,
                            "eps": eps, "weight_decay": weight_decay,
                            "grad_clip_norm": grad_clip_norm})], timeout_s or self.client.timeout_s)
        return fb, step

    async def sample(self, prompts: Sequence[str] | None = None, *,
                     prompt_tokens: Sequence[Sequence[int]] | None = None,
                     num_samples: int = 1, max_tokens: int = 64, temperature: float = 1.0,
                     top_p: float = 1.0, top_k: int = 0,
                     stop: Sequence[str | int] | None = None, seed: int | None = None,
                     include_prompt_logprobs: bool = False, version: int | None = None,
                     timeout_s: float | None = None) -> dict:
        """Generate ``num_samples`` sequences per prompt, spread over the fleet.

        ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off. ``stop``
        takes strings and/or token ids (the model's end-of-sequence ends a sequence
        too). With ``seed``, each sequence's randomness comes from (seed, prompt
        index, sample index): the same request gives the same tokens however the
        fleet splits it. ``version`` samples an older version (default: the latest
        when the request is accepted).

        Returns ``sequences``: per prompt, ``num_samples`` dicts with ``tokens``,
        ``logprobs`` (one per token, under the distribution it was drawn from:
        ``log_softmax(logits / temperature)``, the model's own at temperature 1),
        ``text`` (without the stop string) and ``stop_reason`` (``"stop"`` or
        ``"length"``); ``prompt_tokens`` (the ids each prompt was sampled from);
        ``prompt_logprobs`` when asked (None first); ``version``; and,
        as before, ``outputs`` / ``tokens`` / ``logprobs`` of each prompt's first
        sample."""
        return await self.client._op(self.run_id, "sample", {
            "prompts": list(prompts) if prompts is not None else None,
            "prompt_tokens": [list(p) for p in prompt_tokens] if prompt_tokens is not None
            else None, "num_samples": num_samples, "temperature": temperature,
            "max_tokens": max_tokens, "top_p": top_p, "top_k": top_k,
            "stop": list(stop) if stop is not None else [], "seed": seed,
            "include_prompt_logprobs": include_prompt_logprobs, "version": version}, timeout_s)

    async def compute_logprobs(self, sequences: Sequence[Sequence[int]], *,
                               version: int | None = None,
                               timeout_s: float | None = None) -> list[list[float | None]]:
        """Per-token logprobs of each token sequence under ``version`` (default:
        the latest): None for the first token, then log p(token | tokens before)."""
        res = await self.client._op(self.run_id, "compute_logprobs", {
            "sequences": [list(s) for s in sequences], "version": version}, timeout_s)
        return res["logprobs"]

    async def save_state(self, mode: str = "adapter", name: str | None = None, *,
                         version: int | None = None, push_to_hub: bool = False, hub_model_id: str | None = None,
                         private: bool | None = None, timeout_s: float | None = None) -> dict:
        """Pin the current version under ``name`` and export it (``adapter``: a
        PEFT adapter; ``merged``: the adapter merged into the base). ``version``
        exports an earlier version still kept instead. Returns the artifact:
        ``name``, ``version``, ``checkpoint_path``, ``files``.

        ``push_to_hub=True`` also publishes the export to the Hugging Face Hub as
        ``hub_model_id`` (``private`` as given; the repo is created if missing):
        the files are downloaded here and pushed from this machine with its token
        (``HF_TOKEN``); the result's ``hub`` says where. Needs the ``hub`` extra."""
        token = hub.check_push(hub_model_id) if push_to_hub else None
        body: dict[str, Any] = {"mode": mode, "name": name}
        if version is not None:
            body["version"] = version
        meta = await self.client._op(self.run_id, "save_state", body, timeout_s)
        if token is not None:
            assert hub_model_id is not None
            with tempfile.TemporaryDirectory(prefix="signal-push-") as tmp:
                folder = await self.download(meta, tmp)
                meta["hub"] = await asyncio.to_thread(
                    hub.push_folder, folder, hub_model_id, token=token, private=private,
                    message=f"Signal run {self.run_id} version {meta['version']} ({mode})")
        return meta

    async def load_state(self, name: str | None = None, *, version: int | None = None,
                         from_run: str | None = None, optimizer: bool = False,
                         timeout_s: float | None = None) -> dict:
        """Make a saved state (``name``, from ``save_state``) or a kept ``version``
        this run's next version, from this run or ``from_run`` (one of yours with
        the same base and LoRA shapes); ``optimizer=True`` restores its AdamW
        state too. Gradients not yet stepped are dropped. Returns ``version``,
        ``loaded_from``."""
        body: dict[str, Any] = {"name": name, "version": version, "optimizer": optimizer}
        if from_run is not None:
            body["from_run"] = from_run
        return await self.client._op(self.run_id, "load_state", body, timeout_s)

    async def train_federated(
            self, dataset: str | Path | Sequence[Any], *, rounds: int, local_steps: int = 8,
            batch_size: int = 8, inner_learning_rate: float | None = None,
            outer_optimizer: str = "fedavg", outer_learning_rate: float | None = None,
            outer_momentum: float = 0.9, aggregator: str = "mean", trim_fraction: float = 0.2,
            clip_norm: float | None = None, tasks_per_round: int | None = None,
            min_updates_per_round: int | None = None, round_timeout_s: float | None = None,
            max_staleness: int = 0, delta_norm_max: float | None = None, codec: str = "fp32",
            eval_dataset: str | Path | Sequence[Any] | None = None, seed: int = 0
    ) -> AsyncFederatedJob:
        """Let the coordinator run federated rounds over ``dataset`` (a JSONL path
        on this machine, uploaded, or a list of examples): each round, workers
        train ``local_steps`` AdamW steps from the current version and submit
        deltas, which are validated, combined and applied by the outer optimizer."""
        body: dict[str, Any] = {
            "rounds": rounds, "local_steps": local_steps, "batch_size": batch_size,
            "inner_learning_rate": inner_learning_rate, "outer_optimizer": outer_optimizer,
            "outer_learning_rate": outer_learning_rate, "outer_momentum": outer_momentum,
            "aggregator": aggregator, "trim_fraction": trim_fraction, "clip_norm": clip_norm,
            "tasks_per_round": tasks_per_round, "min_updates_per_round": min_updates_per_round,
            "round_timeout_s": round_timeout_s, "max_staleness": max_staleness,
            "delta_norm_max": delta_norm_max, "codec": codec, "seed": seed}
        body["dataset_id"] = await self.client.upload_dataset(dataset)
        if eval_dataset is not None:
            body["eval_dataset_id"] = await self.client.upload_dataset(eval_dataset)
        reply = await self.client._http("POST", f"/v1/runs/{self.run_id}/train_federated",
                                        body=body, timeout_s=600)
        return AsyncFederatedJob(self.client, reply["job_id"], reply["request_id"])

    async def download(self, artifact: dict | str, dest: str | Path) -> Path:
        """Fetch a saved state into ``dest`` (verifying each file's sha256)."""
        name = artifact["name"] if isinstance(artifact, dict) else artifact
        meta = await self.client._http("GET", f"/v1/runs/{self.run_id}/artifacts/{name}")
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for f in meta["files"]:
            data = await self.client._http(
                "GET", f"/v1/runs/{self.run_id}/artifacts/{name}/files/{f['path']}", raw=True,
                timeout_s=3600)
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise SignalError(f"downloaded {f['path']} does not match its sha256; retry")
            (out / f["path"]).write_bytes(data)
        return out


def _tell_if_waiting(reply: dict, told: bool) -> bool:
    """Say once (on stderr) that a request waits for a worker; whether it was said."""
    if reply.get("waiting_for_workers") and not told:
        print(f"signal: request {reply['request_id']} is waiting for a worker that can serve "
              "its run (none is connected); start one with `signal-worker "
              "--coordinator URL`", file=sys.stderr, flush=True)
        return True
    return told
