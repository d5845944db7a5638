"""Per-token losses, as pure functions of target logprobs: computed on workers,
checked by the coordinator before it queues any task (both import this module).

Every loss returns ``(loss_sum, weight_sum)``: the *sum* of weighted per-token
losses over the shard and the sum of |weights| (the token count for plain
cross-entropy). The coordinator adds both over shards and divides once, which
makes N workers exactly equal to one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rewardsignal.errors import ValidationError

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


def cross_entropy(logprobs_BT: torch.Tensor, weights_BT: torch.Tensor,
                  extra: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    return -(weights_BT * logprobs_BT).sum()


def importance_sampling(logprobs_BT: torch.Tensor, weights_BT: torch.Tensor,
                        extra: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    ratio_BT = torch.exp(logprobs_BT - extra["logprobs"])
    return -(weights_BT * ratio_BT * extra["advantages"]).sum()


def ppo(logprobs_BT: torch.Tensor, weights_BT: torch.Tensor, extra: dict[str, torch.Tensor],
        config: dict) -> torch.Tensor:
    low = float(config.get("clip_low_threshold", 0.8))
    high = float(config.get("clip_high_threshold", 1.2))
    ratio_BT = torch.exp(logprobs_BT - extra["logprobs"])
    adv_BT = extra["advantages"]
    surrogate_BT = torch.minimum(ratio_BT * adv_BT, ratio_BT.clamp(low, high) * adv_BT)
    return -(weights_BT * surrogate_BT).sum()


def cispo(logprobs_BT: torch.Tensor, weights_BT: torch.Tensor, extra: dict[str, torch.Tensor],
          config: dict) -> torch.Tensor:
    """The clipped ratio, held constant, weighs the log-likelihood's gradient."""
    low = float(config.get("clip_low_threshold", 0.8))
    high = float(config.get("clip_high_threshold", 1.2))
    ratio_BT = torch.exp(logprobs_BT - extra["logprobs"]).clamp(low, high).detach()
    return -(weights_BT * ratio_BT * logprobs_BT * extra["advantages"]).sum()


def dro(logprobs_BT: torch.Tensor, weights_BT: torch.Tensor, extra: dict[str, torch.Tensor],
        config: dict) -> torch.Tensor:
    """Advantage-weighted log-likelihood with a quadratic penalty on the log
    ratio to the sampler (``beta``, default 0.05)."""
    beta = float(config.get("beta", 0.05))
    log_ratio_BT = logprobs_BT - extra["logprobs"]
    objective_BT = logprobs_BT * extra["advantages"] - 0.5 * beta * log_ratio_BT ** 2
    return -(weights_BT * objective_BT).sum()


_FNS = {"cross_entropy": cross_entropy, "importance_sampling": importance_sampling, "ppo": ppo,
        "cispo": cispo, "dro": dro}
_RL_INPUTS = ("logprobs", "advantages")
REQUIRED_INPUTS = {"cross_entropy": (), "importance_sampling": _RL_INPUTS, "ppo": _RL_INPUTS,
                   "cispo": _RL_INPUTS, "dro": _RL_INPUTS}


def check_loss_fn(name: str, config: dict | None) -> dict:
    """Validate a loss name and its config (coordinator side, before any task)."""
    if name not in _FNS:
        raise ValidationError(f"unknown loss_fn {name!r}; expected one of {list(LOSS_FNS)}")
    config = config or {}
    if not isinstance(config, dict):
        raise ValidationError("loss_fn_config must be an object")
    clip = {"clip_low_threshold", "clip_high_threshold"}
    allowed = {"ppo": clip, "cispo": clip, "dro": {"beta"}}.get(name, set())
    unknown = set(config) - allowed
    if unknown:
        raise ValidationError(f"unknown loss_fn_config key(s) for {name}: {sorted(unknown)}")
    for k, v in config.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 100:
            raise ValidationError(f"loss_fn_config.{k} must be a positive number, got {v!r}")
    if name in ("ppo", "cispo") and config.get("clip_low_threshold", 0.8) > config.get(
            "clip_high_threshold", 1.2):
        raise ValidationError("clip_low_threshold must not exceed clip_high_threshold")
    return config


def check_loss_inputs(name: str, extras: Sequence[Mapping[str, object]]) -> None:
    """Every datum carries the inputs ``name`` needs (``loss_fn_inputs.*``)."""
    for i, extra in enumerate(extras):
        missing = [k for k in REQUIRED_INPUTS[name] if k not in extra]
        if missing:
            raise ValidationError(f"batch[{i}]: loss_fn {name} needs loss_fn_inputs."
                                  f"{missing[0]}")


def loss_of(name: str, logprobs_BT: torch.Tensor, weights_BT: torch.Tensor,
            extra: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """The loss ``name`` sums over the batch (a 0-dim tensor, no host sync)."""
    for key in REQUIRED_INPUTS[name]:
        if key not in extra:
            raise ValidationError(f"loss_fn {name} needs loss_fn_inputs.{key} on every datum")
    return _FNS[name](logprobs_BT, weights_BT, extra, config)


def compute_loss(name: str, logprobs_BT: torch.Tensor, weights_BT: torch.Tensor,
                 extra: dict[str, torch.Tensor], config: dict) -> tuple[torch.Tensor, float]:
    """``loss_of`` and the batch's total absolute weight."""
    return loss_of(name, logprobs_BT, weights_BT, extra, config), float(weights_BT.abs().sum())
