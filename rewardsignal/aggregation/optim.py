"""The server optimizer: AdamW as pure functions, matching ``torch.optim.AdamW``.

State per parameter: ``exp_avg``, ``exp_avg_sq``; one shared ``step`` count.
Inputs are never mutated; each call returns new parameter and state dicts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

from rewardsignal.aggregation.tensors import FlatTensors, Tensors, flat_buffer, global_norm
from rewardsignal.errors import ValidationError


@dataclass(frozen=True)
class AdamWConfig:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None

    def __post_init__(self) -> None:
        def num(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not num(self.learning_rate) or not 0 <= self.learning_rate <= 10:
            raise ValidationError(f"learning_rate must be in [0, 10], got {self.learning_rate!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not num(v) or not 0 <= v < 1:
                raise ValidationError(f"{name} must be in [0, 1), got {v!r}")
        if not num(self.eps) or not self.eps > 0:
            raise ValidationError(f"eps must be > 0, got {self.eps!r}")
        if not num(self.weight_decay) or self.weight_decay < 0:
            raise ValidationError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip_norm is not None and (not num(self.grad_clip_norm)
                                                or self.grad_clip_norm <= 0):
            raise ValidationError(f"grad_clip_norm must be > 0, got {self.grad_clip_norm!r}")

    def to_json(self) -> dict:
        return asdict(self)


def clip_by_global_norm(grads: Tensors, max_norm: float) -> tuple[Tensors, float]:
    """As ``torch.nn.utils.clip_grad_norm_``: scale by max_norm/(norm+1e-6) when
    the norm exceeds it. Returns (clipped grads, norm before clipping). The norm
    sums the per-tensor norms in name order, so it has the same bits whatever
    order the gradient's tensors arrived in (torch sums in parameter order: the
    same value to about 1e-7)."""
    norm = global_norm({k: grads[k] for k in sorted(grads)})
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return grads, norm  # not mutated: the same set serves
    if isinstance(grads, FlatTensors) and (flat := flat_buffer(grads)) is not None:
        return grads.with_buffer(flat * coef), norm
    return {k: g * coef for k, g in grads.items()}, norm


@functools.lru_cache(maxsize=16)
def _state_layout(layout: tuple[tuple[str, tuple[int, ...]], ...]
                  ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The moments' layout for parameters laid out so (made once per layout)."""
    return (tuple((f"exp_avg.{n}", s) for n, s in layout)
            + tuple((f"exp_avg_sq.{n}", s) for n, s in layout))


def adamw_step(params: Tensors, grads: Tensors, state: Tensors, step: int,
               cfg: AdamWConfig) -> tuple[Tensors, Tensors, int]:
    """One AdamW update (decoupled weight decay, bias correction), the same
    arithmetic as torch's single-tensor implementation. ``state`` holds
    ``exp_avg.<name>`` / ``exp_avg_sq.<name>``; missing entries start at 0.
    Returns (new params, new state, new step)."""
    if set(grads) != set(params):
        raise ValidationError("gradient names do not match parameter names")
    if cfg.grad_clip_norm is not None:
        grads, _ = clip_by_global_norm(grads, cfg.grad_clip_norm)
    step += 1
    bias1 = 1 - cfg.beta1 ** step
    bias2_sqrt = math.sqrt(1 - cfg.beta2 ** step)
    step_size = cfg.learning_rate / bias1
    # A flat gradient (a decoded submission's sums) sets the order: the new
    # parameters and moments come out flat in it, so the next step finds its
    # inputs as buffers and makes no copies (the first step gathers them).
    names = list(grads) if flat_buffer(grads) is not None else list(params)
    # One flat vector per quantity: the same element-wise arithmetic (so the same
    # bits) as a loop over the tensors, in a dozen kernel calls instead of a
    # dozen per tensor (an adapter has hundreds of small ones).
    gf = flat_buffer(grads)
    if (gf is not None and isinstance(grads, FlatTensors)
            and (fp := flat_buffer(params, grads.layout)) is not None):
        # Both flat alike (every step after the first): no tensor is looked at.
        layout = grads.layout
        dtypes = {fp.dtype, gf.dtype}
    else:
        layout = tuple((n, tuple(params[n].shape)) for n in names)
        dtypes = {params[n].dtype for n in names} | {grads[n].dtype for n in names}
    if len(dtypes) > 1:
        raise ValidationError("parameters and gradients must share one dtype")
    state_layout = _state_layout(layout)

    def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in tensors]
                         ) if tensors else torch.zeros(0)

    def moment(prefix: str) -> torch.Tensor:
        if all(f"{prefix}.{n}" in state for n in names):
            return flat([state[f"{prefix}.{n}"] for n in names])
        return flat([state[f"{prefix}.{n}"] if f"{prefix}.{n}" in state
                     else torch.zeros_like(params[n]) for n in names])

    size = sum(math.prod(shape) for _, shape in layout)
    p = flat_buffer(params, layout)
    p = flat([params[n] for n in names]) if p is None else p
    g = flat_buffer(grads, layout)
    g = flat([grads[n] for n in names]) if g is None else g
    mv = flat_buffer(state, state_layout)
    m, v = (mv[:size], mv[size:]) if mv is not None else (moment("exp_avg"),
                                                            moment("exp_avg_sq"))
    # The new moments are written into one buffer (the same operations as
    # ``m.lerp(g, 1 - beta1)`` and ``v * beta2 + (1 - beta2) * g * g``).
    new_mv = torch.empty(2 * size, dtype=g.dtype, device=g.device)
    torch.lerp(m, g, 1 - cfg.beta1, out=new_mv[:size])
    torch.mul(v, cfg.beta2, out=new_mv[size:])
    new_mv[size:].add_((1 - cfg.beta2) * g * g)
    m, v = new_mv[:size], new_mv[size:]
    p = p * (1 - cfg.learning_rate * cfg.weight_decay)
    denom = v.sqrt() / bias2_sqrt + cfg.eps
    p = p.addcdiv(m, denom, value=-step_size)
    # Views into the new flat vectors (none of them is written in place).
    return FlatTensors(p, layout), FlatTensors(new_mv, state_layout), step
