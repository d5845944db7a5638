"""The compute engine of a worker: a cache of frozen base models, LoRA adapters
swapped in per task, and the three computations (forward/backward, forward,
sample). Synchronous and single-threaded by design: the worker loop calls it
from one thread while a heartbeat runs beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rewardsignal.aggregation.tensors import FlatTensors, flat_by_name
from rewardsignal.data.types import Datum
from rewardsignal.lora import LoraSpec, peft_config, saved_name
from rewardsignal.losses import loss_of
from rewardsignal.precision import TORCH_NAMES, Precision
from rewardsignal.worker.hardware import worker_gpus
from rewardsignal.worker.model_cache import (
    ModelCache,
    default_budget_bytes,
    module_bytes,
    release_device_memory,
)
from rewardsignal.worker.sampling import SampleParams, generate

log = logging.getLogger("signal.worker")

# Any id works for padding: padded positions are masked out of attention and loss.
_PAD_ID = 0


@dataclass
class ForwardResult:
    loss_sum: float
    weight_sum: float
    num_tokens: int
    logprobs: list[list[float]]
    grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _spec_key(spec: LoraSpec) -> str:
    blob = json.dumps({k: v for k, v in spec.to_json().items() if k != "seed"}, sort_keys=True)
    return "a" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def _cache_key(model_id: str, precision: Precision) -> str:
    """One cached base per (model, precision); the default keeps the bare id."""
    return model_id if precision.is_default else f"{model_id}@{precision.label()}"


def default_dtype(device: torch.device) -> torch.dtype:
    """Frozen-base dtype: bf16 on GPUs that support it, fp16 on older GPUs, fp32
    on CPU (where the numerics rule is checked exactly)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Engine:
    def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None, *,
                 cache_bytes: int | None = None, device_map: str | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        # ``device_map="auto"``: each base is spread over every visible GPU
        # (``models.load_model``); ``self.device`` is then the first of them.
        self.device_map = device_map
        self.gpus = worker_gpus(self.device, device_map)
        free = _cuda_free_bytes(self.gpus) if self.device.type == "cuda" else None
        self.models = ModelCache(cache_bytes or default_budget_bytes(self.device, gpus=self.gpus),
                                 free_bytes=free, on_evict=self._unload)
        self._tokenizers: dict[str, object] = {}
        self._fingerprints: dict[str, str] = {}
        self._loaded: dict[tuple[str, str], tuple[str, int]] = {}  # adapter -> (run, version)
        # Each cached model's LoRA parameters by saved name, per adapter: walking
        # the module tree (named_parameters, PEFT's set_adapter) costs milliseconds
        # per task, as much as a small model's whole step on a GPU.
        self._params: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    # -- base models and adapters ------------------------------------------------
    @property
    def auto_dtype(self) -> str:
        """What a run at base_dtype "auto" loads here ("bf16" | "fp16" | "fp32")."""
        return {v: k for k, v in TORCH_NAMES.items()}[str(self.dtype).removeprefix("torch.")]

    def fingerprint(self, model_id: str, precision: Precision = Precision()) -> str:
        """The base's fingerprint combined with the precision it is loaded at, as
        the coordinator combines them for the run (``Precision.fingerprint``)."""
        if model_id not in self._fingerprints:
            from rewardsignal.models import fingerprint

            self._fingerprints[model_id] = fingerprint(model_id)
        return precision.fingerprint(self._fingerprints[model_id])

    def tokenizer(self, model_id: str):
        if model_id not in self._tokenizers:
            from rewardsignal.models import load_tokenizer

            self._tokenizers[model_id] = load_tokenizer(model_id)
        return self._tokenizers[model_id]

    def _peft_model(self, model_id: str, spec: LoraSpec, precision: Precision):
        from peft import get_peft_model

        key = _spec_key(spec)
        cache_key = _cache_key(model_id, precision)
        model = self.models.get(cache_key)
        if model is None:
            from rewardsignal.memory import shape_of, weight_bytes
            from rewardsignal.models import load_model

            dtype = precision.resolve(self.auto_dtype)
            self.models.make_room(weight_bytes(shape_of(model_id), dtype, precision.quantization))
            base = load_model(model_id, dtype=getattr(torch, TORCH_NAMES[dtype]),
                              device=str(self.device), quantization=precision.quantization,
                              device_map=self.device_map)
            # PEFT up-casts bf16/fp16 adapter weights to fp32 (autocast_adapter_dtype),
            # so LoRA weights, grads and optimizer state stay fp32 over a bf16 base
            # (and over a quantized one, whose LoRA layers are PEFT's bnb layers).
            model = get_peft_model(base, peft_config(spec), adapter_name=key)
            model.train(False)  # new LoRA modules start in training mode: one mode for all
            self.models.put(cache_key, model, module_bytes(model))
        elif key not in model.peft_config:
            model.add_adapter(key, peft_config(spec))
            model.train(model.training)  # its modules take the model's mode
        if model.active_adapter != key:
            model.set_adapter(key)
        return model, key

    def _unload(self, model_id: str) -> None:
        """Forget which run versions the evicted model held and free its memory."""
        for k in [k for k in self._loaded if k[0] == model_id]:
            del self._loaded[k]
        self._params.clear()  # keyed by model object: drop what may name the evicted one
        release_device_memory(self.device)

    def activate(self, model_id: str, spec: LoraSpec, run_id: str, version: int,
                 adapter: dict[str, torch.Tensor], precision: Precision = Precision()):
        """Put the run's adapter weights for ``version`` into the cached model of
        ``model_id`` at ``precision``."""
        model, key = self._peft_model(model_id, spec, precision)
        model_id = _cache_key(model_id, precision)
        if self._loaded.get((model_id, key)) != (run_id, version):
            params = self._lora_params(model, key)
            if params.keys() != adapter.keys():
                raise ValueError("adapter tensor names do not match the model's LoRA layers")
            # Forgotten first: a copy that fails partway leaves no version named.
            self._loaded.pop((model_id, key), None)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(adapter[name].to(device=p.device, dtype=p.dtype))
            self._loaded[(model_id, key)] = (run_id, version)
        return model, key

    def preload(self, task: dict, run_id: str, version: int,
                adapter: dict[str, torch.Tensor]) -> None:
        """``activate`` ahead of a task, while the worker waits for it (a version
        pushed to it), on the model, LoRA and precision of the run's last
        ``task``, when that model is in memory already: never loads one. A
        failure is logged; the task's own ``activate`` then loads the version."""
        try:
            precision = Precision.from_json(task)
            if _cache_key(task["base_model"], precision) in self.models:
                self.activate(task["base_model"], LoraSpec.from_json(task["lora"]), run_id,
                              version, adapter, precision)
        except Exception as exc:  # anything: the task's compute does it again, and says why
            log.warning("preloading version %s of run %s failed: %s: %s", version, run_id,
                        type(exc).__name__, exc)

    # -- computations ---------------------------------------------------------------
    def _target_logprobs(self, model, batch: Sequence[Datum], temperature: float = 1.0
                         ) -> tuple[torch.Tensor, ...]:
        width = max(len(d) for d in batch)
        ids = _padded([d.input_ids for d in batch], width, _PAD_ID, torch.long)
        tgt = _padded([d.target_ids for d in batch], width, 0, torch.long)
        w = _padded([d.weights for d in batch], width, 0.0, torch.float32)
        mask = (torch.arange(width) < torch.tensor([len(d) for d in batch]).unsqueeze(1)).long()
        first = self._input_device(model)
        logits = model(input_ids=ids.to(first), attention_mask=mask.to(first)).logits.float()
        # On the device the logits come out on: the input's, or with a device
        # map the output layer's GPU.
        tgt, mask, w = (t.to(logits.device) for t in (tgt, mask, w))
        if temperature != 1.0:  # a sample's check at its temperature (``logit_temperature``)
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        return logprobs * mask, w, mask

    def _input_device(self, model) -> torch.device:
        """Where a batch's ids go: the worker's device, or with a device map the
        GPU of the input embedding."""
        if self.device_map is None:
            return self.device
        return model.get_input_embeddings().weight.device

    def _lora_params(self, model, key: str) -> dict[str, torch.Tensor]:
        """The LoRA parameters of adapter ``key`` in ``model`` by saved name (cached)."""
        by_key = self._params.setdefault(id(model), {})
        if key not in by_key:
            by_key[key] = {saved_name(n, key): p for n, p in model.named_parameters()
                           if f".{key}." in n}
        return by_key[key]

    def _accumulate(self, model, datums: Sequence[Datum], loss_fn: str, loss_config: dict, *,
                    backward: bool, micro_tokens: int, loss_scale: float = 1.0,
                    temperature: float = 1.0) -> tuple[float, float, list[list[float]]]:
        """Forward (and backward of ``loss_scale`` x the loss sum) in micro-batches
        of at most ``micro_tokens`` padded tokens; gradients add up in ``.grad``."""
        # Each micro-batch's loss, weight sum and logprobs stay on the device until
        # every micro-batch is queued: reading one back is a host sync, which on a
        # GPU would leave it idle while the next micro-batch is prepared. They are
        # added up afterwards, as floats in the same order (the same bits).
        parts = []
        for chunk in _micro_batches(datums, micro_tokens):
            with torch.set_grad_enabled(backward):
                lp_BT, w_BT, _ = self._target_logprobs(model, chunk, temperature)
                extra = {k: _padded([d.extra[k] for d in chunk], w_BT.shape[1], 0.0,
                                    torch.float32).to(w_BT.device)
                         for k in ("logprobs", "advantages") if all(k in d.extra for d in chunk)}
                loss = loss_of(loss_fn, lp_BT, w_BT, extra, loss_config)
            if backward:
                (loss * loss_scale).backward()
            parts.append((chunk, loss.detach(), w_BT.abs().sum(), lp_BT.detach()))
        loss_total, weight_total, logprobs_out = 0.0, 0.0, []
        for chunk, loss, wsum, lp_BT in parts:
            loss_total += float(loss)
            weight_total += float(wsum)
            lp = lp_BT.cpu()
            logprobs_out += [lp[i, : len(d)].tolist() for i, d in enumerate(chunk)]
        return loss_total, weight_total, logprobs_out

    def forward_backward(self, model, key: str, datums: Sequence[Datum], loss_fn: str,
                         loss_config: dict, *, backward: bool = True,
                         micro_tokens: int = 4096, temperature: float = 1.0) -> ForwardResult:
        """Sum of weighted per-token losses over ``datums`` and, with ``backward``,
        its gradient w.r.t. the active LoRA weights (fp32)."""
        params = self._lora_params(model, key)
        for p in params.values():
            p.grad = None
        # Dropout (LoRA's and the base's) fires while training only: a forward
        # without backward (forward, compute_logprobs, evaluation) is deterministic.
        _train_mode(model, backward)
        loss_total, weight_total, logprobs = self._accumulate(
            model, datums, loss_fn, loss_config, backward=backward, micro_tokens=micro_tokens,
            temperature=temperature)
        grads = None
        if backward:
            grads = _flat_grads(params)
            for p in params.values():
                p.grad = None
        return ForwardResult(loss_total, weight_total, sum(len(d) for d in datums), logprobs,
                             grads)

    def train_local(self, model, key: str, model_id: str, datums: Sequence[Datum],
                    *, steps: int, batch_size: int, learning_rate: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0,
                    micro_tokens: int = 4096) -> tuple[dict[str, torch.Tensor], dict]:
        """``steps`` local AdamW steps (mean token loss of ``batch_size`` datums
        each, cycling through the shard in a seeded order) from the loaded
        adapter. Returns (delta = local - start, metrics)."""
        import random

        params = self._lora_params(model, key)
        start = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=learning_rate, betas=tuple(betas),
                                eps=eps, weight_decay=weight_decay)
        rng = random.Random(seed)
        _train_mode(model, True)
        order: list[int] = []
        losses, grad_norms, tokens, samples = [], [], 0, 0
        started = time.monotonic()
        try:
            for _ in range(steps):
                batch: list[Datum] = []
                while len(batch) < min(batch_size, len(datums)):
                    if not order:
                        order = list(range(len(datums)))
                        rng.shuffle(order)
                    batch.append(datums[order.pop()])
                weight = sum(abs(w) for d in batch for w in d.weights) or 1.0
                opt.zero_grad(set_to_none=True)
                loss_sum, _, _ = self._accumulate(model, batch, "cross_entropy", {},
                                                  backward=True, micro_tokens=micro_tokens,
                                                  loss_scale=1.0 / weight)
                # Each norm onto one device: with a device map the LoRA layers
                # (and their gradients) live on several GPUs.
                grad_norms.append(float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm().to(self.device) for p in params.values()
                     if p.grad is not None]))))
                opt.step()
                losses.append(loss_sum / weight)
                tokens += sum(len(d) for d in batch)
                samples += len(batch)
            delta = {n: (p.detach() - start[n]).float().cpu() for n, p in params.items()}
        finally:
            # The local steps moved the cached adapter: forget which version it holds
            # (in whichever precision's model it lives).
            for k in [k for k in self._loaded if k[1] == key]:
                del self._loaded[k]
            for p in params.values():
                p.grad = None
        metrics = {"train_loss_mean": sum(losses) / len(losses), "train_loss_last": losses[-1],
                   "train_loss_first": losses[0],
                   "grad_norm_mean": sum(grad_norms) / len(grad_norms), "steps": steps,
                   "num_samples": samples, "tokens": tokens,
                   "duration_s": time.monotonic() - started}
        return delta, metrics

    @torch.no_grad()
    def stop_ids(self, model, model_id: str) -> tuple[int, ...]:
        """Where generation ends by default: the model's generation config (end of
        turn for chat models), else the tokenizer's end-of-sequence token."""
        ids = model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer(model_id).eos_token_id
        return tuple(ids) if isinstance(ids, list | tuple) else (() if ids is None else (ids,))

    def sample(self, model, model_id: str, prompts: list[list[int]], seeds: list[list[int]],
               params: SampleParams) -> tuple[list[list[dict]], list | None]:
        """Batched generation (``worker.sampling``) in eval mode: dropout off."""
        _train_mode(model, False)
        return generate(model, self.tokenizer(model_id), prompts, seeds, params,
                        self._input_device(model))


def _cuda_free_bytes(gpus: list[int]):
    """Free memory of the worker's GPUs as this process can use it: what the
    driver reports free plus what PyTorch's allocator holds cached but unused
    (activations of the last task), which a new load reuses without asking the
    driver."""
    def free() -> int:
        return sum(torch.cuda.mem_get_info(i)[0] + torch.cuda.memory_reserved(i)
                   - torch.cuda.memory_allocated(i) for i in gpus)

    return free


def _train_mode(model, training: bool) -> None:
    """``model.train(training)`` when the model is not in that mode already: the
    call visits every module (0.76 ms for signal-tiny's 341, on a step of 27).
    The engine changes modes only through here, which keeps every module in
    the model's mode."""
    if model.training != training:
        model.train(training)


def _flat_grads(params: dict[str, torch.Tensor]) -> FlatTensors:
    """The parameters' gradients (zeros where none) in fp32 on the CPU as one
    buffer, by name: the order of the safetensors file they are sent as, which
    is then the buffer itself (``protocol.tensors_to_bytes``). One copy to the
    host, not one per tensor, where the gradients share a device."""
    return flat_by_name({n: p.grad if p.grad is not None else torch.zeros_like(p)
                         for n, p in params.items()}, "cpu")


def _padded(rows: Sequence[Sequence[float]], width: int, fill: float, dtype: torch.dtype
            ) -> torch.Tensor:
    """``rows`` as one (len(rows), width) tensor, each row filled out with ``fill``:
    one conversion instead of one small tensor per row."""
    return torch.tensor([[*r, *[fill] * (width - len(r))] for r in rows], dtype=dtype)


def _micro_batches(datums: Sequence[Datum], micro_tokens: int) -> list[list[Datum]]:
    batches: list[list[Datum]] = []
    cur: list[Datum] = []
    width = 0
    for d in datums:
        w = max(width, len(d))
        if cur and w * (len(cur) + 1) > micro_tokens:
            batches.append(cur)
            cur, w = [], len(d)
        cur.append(d)
        width = w
    if cur:
        batches.append(cur)
    return batches
