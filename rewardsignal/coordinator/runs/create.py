"""A new run: its arguments read from a request body, then its version-0 state
(fingerprint, adapter shapes, seeded initial adapter) built off the event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator.catalog import ModelCatalog
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.runs.init_from import InitFrom, check_weights, read_init
from rewardsignal.coordinator.runs.state import Run, RunSpec, new_run_id
from rewardsignal.coordinator.tracking import check_backends
from rewardsignal.lora import LoraSpec, adapter_shapes, init_adapter
from rewardsignal.memory import gpu_config_memory_bytes, shape_of
from rewardsignal.models import fingerprint, model_info, resolve_model_path
from rewardsignal.precision import BASE_DTYPES, QUANTIZATIONS, Precision


@dataclass(frozen=True)
class RunRequest:
    base_model: str
    lora: LoraSpec
    optimizer: AdamWConfig
    max_length: int
    precision: Precision = Precision()
    gpu_config: str | None = None
    init: InitFrom | None = None
    log_to: tuple[str, ...] = ()
    wandb_project: str | None = None


def read_adamw(b: Body, defaults: AdamWConfig) -> AdamWConfig:
    """AdamW hyper-parameters from a body (``create_run`` and ``optim_step``)."""
    clip = b.float("grad_clip_norm", None, lo=0, lo_open=True)
    return AdamWConfig(
        learning_rate=b.float("learning_rate", defaults.learning_rate, lo=0, hi=10),
        beta1=b.float("beta1", defaults.beta1, lo=0, hi=0.999999),
        beta2=b.float("beta2", defaults.beta2, lo=0, hi=0.99999999),
        eps=b.float("eps", defaults.eps, lo=0, lo_open=True, hi=1.0),
        weight_decay=b.float("weight_decay", defaults.weight_decay, lo=0, hi=10),
        grad_clip_norm=clip if clip is not None else defaults.grad_clip_norm)


def read_run_request(b: Body, catalog: ModelCatalog | None = None, *,
                     log_to: tuple[str, ...] = (), wandb_project: str | None = None
                     ) -> RunRequest:
    """Blocking (resolves the model on disk): call it in a thread. With the
    operator's models file (``catalog``), only the models it lists; ``log_to``
    and ``wandb_project`` are the coordinator's tracking defaults."""
    base = b.str("base_model", max_len=256)
    if catalog is not None:
        catalog.get(base)  # 400 naming the file, before anything is fetched
    resolve_model_path(base)  # NotFoundError -> 404 with advice
    info = model_info(base)
    r = b.int("lora_r", 8, lo=1, hi=1024)
    targets = b.list("lora_target_modules", None, max_len=64)
    lora = LoraSpec(r=r, alpha=b.float("lora_alpha", 2.0 * r, lo=0, lo_open=True),
                    dropout=b.float("lora_dropout", 0.0, lo=0, hi=0.99),
                    target_modules=tuple(targets) if targets is not None
                    else info.default_target_modules,
                    seed=b.int("seed", 0, lo=0, hi=2**63 - 1))
    optimizer = read_adamw(b, AdamWConfig())
    max_length = b.int("max_length", 2048, lo=2, hi=1 << 20)
    precision = Precision(b.str("base_dtype", "auto", choices=BASE_DTYPES),
                          b.str("quantization", None, choices=QUANTIZATIONS))
    gpu_config = b.str("gpu_config", None, max_len=64)
    if gpu_config is not None:
        gpu_config_memory_bytes(gpu_config)  # malformed -> 400; unknown GPUs are a warning
    init = read_init(b, base, lora)
    tracked = b.list("log_to", None, max_len=4)
    log_to = tuple(dict.fromkeys(tracked)) if tracked is not None else log_to
    wandb_project = b.str("wandb_project", wandb_project, max_len=128)
    check_backends(log_to, wandb_project)
    b.done()
    if init is not None and init.adapter is not None:
        check_weights(init.adapter, adapter_shapes(base, lora), init.label)  # 400 now
    return RunRequest(base, lora, optimizer, max_length, precision, gpu_config, init,
                      log_to, wandb_project)


def build_run(owner: str, req: RunRequest,
              start: dict[str, torch.Tensor] | None = None) -> Run:
    """Version 0 of a new run (blocking: hashes the base, builds the adapter):
    seeded, or ``start`` / the uploaded ``init_adapter`` when given."""
    fp = req.precision.fingerprint(fingerprint(req.base_model))
    shapes = adapter_shapes(req.base_model, req.lora)
    if start is None and req.init is not None:
        start = req.init.adapter
    adapter = (check_weights(start, shapes, req.init.label if req.init else "init")
               if start is not None else init_adapter(req.base_model, req.lora))
    spec = RunSpec(new_run_id(), owner, req.base_model, fp, req.lora, req.optimizer,
                   req.max_length, time.time(), req.precision, req.gpu_config, req.log_to,
                   req.wandb_project)
    return Run(spec=spec, version=0, adapter=adapter, opt_state={}, opt_step=0,
               shapes=dict(shapes), shape=shape_of(req.base_model))
