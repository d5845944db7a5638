"""Small pure helpers over named tensor dicts (adapters, gradients, deltas)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


class FlatTensors(dict[str, torch.Tensor]):
    """Named tensors that are views tiling one 1-D buffer, in dict order (a
    decoded submission: the safetensors body is already laid out so). Whole-set
    arithmetic (sums, scaling, finiteness) is then one kernel call on ``flat``
    instead of one per tensor, with the same element-wise bits. Any change to
    the dict's entries (not to the tensors' values, which stay views) drops the
    buffer, and the dict is then an ordinary one.

    The views are made the first time the set is read as a dict (an item, the
    values, a copy): the whole-set paths (``flat_buffer``) never need them, and
    a set of hundreds of small tensors spends most of its making on them (a
    quarter of a millisecond for 56, in a step of a few). Its names and length
    come from ``layout`` until then. Every dict method a caller can reach is
    one of this class's, so a view-less set never shows as empty, with one
    exception: C code that reads a dict's storage itself (``PyDict_Next``,
    ``json.dumps``, unbound ``dict.`` methods) sees it empty until the views
    are made, so hand such code ``dict(tensors)``. Making them is safe from
    several threads at once: a reader sees the layout's answer until every
    view is in."""

    __slots__ = ("flat", "layout", "_made")

    def __init__(self, flat: torch.Tensor, layout: tuple[tuple[str, tuple[int, ...]], ...]
                 ) -> None:
        """Views of ``flat`` (1-D, as many elements as the layout) by ``layout``:
        (name, shape) of each tensor in buffer order."""
        size = sum(math.prod(shape) for _, shape in layout)
        if size != flat.numel():
            raise ValueError(f"layout covers {size} elements, buffer has {flat.numel()}")
        super().__init__()
        self.flat: torch.Tensor | None = flat
        self.layout = layout
        self._made = False

    def with_buffer(self, flat: torch.Tensor) -> FlatTensors:
        """The same names and shapes over another buffer (e.g. ``self.flat * s``)."""
        return FlatTensors(flat, self.layout)

    def _views(self) -> FlatTensors:
        """Itself, with its views made (once)."""
        flat = self.flat if not self._made else None
        if flat is not None:
            parts = flat.split([math.prod(shape) for _, shape in self.layout])
            # ``view(*shape)``: half the cost of ``view(shape)`` (a tuple
            # argument is parsed slower).
            views = [(name, t.view(*shape) if shape else t.view(()))
                     for (name, shape), t in zip(self.layout, parts, strict=True)]
            # All in by one C call (no other thread runs inside it), and only
            # then marked made: another thread reading meanwhile (views release
            # the interpreter lock) gets the layout's names, never a part of
            # them. Two threads making them at once put in the same views.
            dict.update(self, views)
            self._made = True
        return self

    def _unflatten(self) -> None:
        self._views()
        self.flat = None

    def __reduce__(self) -> tuple:
        if self.flat is not None:
            return (type(self), (self.flat, self.layout))
        return (dict, (dict(self.items()),))

    # Reading: names and length from the layout; anything else makes the views.
    def __len__(self) -> int:
        return dict.__len__(self) if self._made else len(self.layout)

    def __iter__(self) -> Iterator[str]:
        if self._made:
            return dict.__iter__(self)
        return self._names()

    def _names(self) -> Iterator[str]:
        for name, _ in self.layout:
            if self.flat is None:  # as a dict's iteration, when an entry changes
                raise RuntimeError("dictionary changed during iteration")
            yield name

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self._views(), key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return dict.__getitem__(self._views(), key)

    def get(self, *args: Any) -> Any:
        return dict.get(self._views(), *args)

    def keys(self) -> Any:
        return dict.keys(self._views())

    def values(self) -> Any:
        return dict.values(self._views())

    def items(self) -> Any:
        return dict.items(self._views())

    def copy(self) -> dict[str, torch.Tensor]:
        return dict.copy(self._views())

    def __reversed__(self) -> Iterator[str]:
        return dict.__reversed__(self._views())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FlatTensors):
            other = other._views()
        return dict.__eq__(self._views(), other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __or__(self, other: Any) -> Any:
        return dict.__or__(self._views(), other)

    def __ror__(self, other: Any) -> Any:
        return dict.__ror__(self._views(), other)

    def __repr__(self) -> str:
        return dict.__repr__(self._views())

    # Writing: the views first, then the buffer is dropped.
    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._unflatten()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._unflatten()
        super().__delitem__(key)

    def __ior__(self, other: Any) -> FlatTensors:  # type: ignore[override]
        self._unflatten()
        dict.update(self, other)
        return self

    def pop(self, *args: Any) -> Any:
        self._unflatten()
        return super().pop(*args)

    def popitem(self) -> tuple[str, torch.Tensor]:
        self._unflatten()
        return super().popitem()

    def clear(self) -> None:
        self._unflatten()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._unflatten()
        super().update(*args, **kwargs)

    def setdefault(self, *args: Any) -> Any:
        self._unflatten()
        return super().setdefault(*args)


def flat_buffer(a: Tensors, layout: tuple | None = None) -> torch.Tensor | None:
    """The buffer of a set that is flat (with exactly ``layout``, when given):
    element-wise arithmetic on it is the same as on each of its tensors. None
    for any other set, which the per-tensor path serves."""
    if not isinstance(a, FlatTensors) or a.flat is None:
        return None
    return a.flat if layout is None or a.layout == layout else None


def flat_by_name(tensors: Tensors, device: str | torch.device | None = None) -> FlatTensors:
    """``tensors`` in fp32 as one buffer, by name: the order a safetensors file
    of them is laid out in (the same bits as ``t.float()`` for each). One
    concatenation on their device (then one copy to ``device``, when given);
    tensors on several devices go to the CPU first."""
    names = sorted(tensors)
    with torch.no_grad():  # one tensor outside any graph, without a detach per part
        parts = [tensors[n].ravel() for n in names]
        if len({t.device for t in parts}) > 1:  # a device map: layers on several GPUs
            parts = [t.cpu() for t in parts]
        flat = torch.cat(parts).float() if parts else torch.zeros(0)
        if device is not None:
            flat = flat.to(device)
    return FlatTensors(flat, tuple((n, tuple(tensors[n].shape)) for n in names))


def tree_clone(a: Tensors) -> Tensors:
    if isinstance(a, FlatTensors) and (flat := flat_buffer(a)) is not None:
        return a.with_buffer(flat.clone())
    return {k: v.clone() for k, v in a.items()}


def tree_add_(a: Tensors, b: Tensors) -> None:
    """``a += b``, tensor by tensor (``a``'s tensors are written in place)."""
    into = flat_buffer(a)
    add = flat_buffer(b, a.layout) if isinstance(a, FlatTensors) else None
    if into is not None and add is not None:
        into.add_(add)
        return
    for k, v in b.items():
        a[k].add_(v)


def tree_div(a: Tensors, s: float) -> Tensors:
    if isinstance(a, FlatTensors) and (flat := flat_buffer(a)) is not None:
        return a.with_buffer(flat / s)
    return {k: v / s for k, v in a.items()}


def all_finite(a: Tensors) -> str | None:
    """The first tensor holding a NaN or infinity (None: all finite)."""
    flat = flat_buffer(a)
    if flat is not None and bool(torch.isfinite(flat).all()):
        return None
    for name, t in a.items():
        if not bool(torch.isfinite(t).all()):
            return name
    return None


def tree_add(a: Tensors, b: Tensors) -> Tensors:
    return {k: a[k] + b[k] for k in a}


def tree_scale(a: Tensors, s: float) -> Tensors:
    return {k: v * s for k, v in a.items()}


def tree_zeros_like(a: Tensors) -> Tensors:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def global_norm(a: Tensors) -> float:
    """As ``torch.nn.utils.clip_grad_norm_`` computes it (the norm of the
    per-tensor norms), so clipping keeps its bits."""
    if not a:
        return 0.0
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(v.float()) for v in a.values()])))


def l2_norm(a: Tensors) -> float:
    """The global L2 norm for checks and metrics: one kernel call on a flat
    set (equal to ``global_norm`` up to rounding)."""
    flat = flat_buffer(a)
    return float(torch.linalg.vector_norm(flat)) if flat is not None else global_norm(a)


def tree_max_abs_diff(a: Tensors, b: Tensors) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
