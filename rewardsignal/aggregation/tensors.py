"""Small pure helpers over named tensor dicts (adapters, gradients, deltas)."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def tree_add(a: Tensors, b: Tensors) -> Tensors:
    return {k: a[k] + b[k] for k in a}


def tree_scale(a: Tensors, s: float) -> Tensors:
    return {k: v * s for k, v in a.items()}


def tree_zeros_like(a: Tensors) -> Tensors:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def global_norm(a: Tensors) -> float:
    if not a:
        return 0.0
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(v.float()) for v in a.values()])))


def tree_max_abs_diff(a: Tensors, b: Tensors) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
