"""Gradients summed between steps, kept per worker so that one worker's part
can be taken out exactly.

A ``forward_backward`` request sums its shards into ``PartialSums``: one running
sum per worker that computed them (thread-safe: shard gradients arrive from
submission threads). Once the request's sum is durable it becomes a
``Contribution`` (its parts by worker) and the run's ``Accumulator`` merges the
parts into its own per-worker sums. At ``optim_step`` the accumulator adds the
workers' sums in a fixed order, divides the ``mean`` part by its total weight
and adds the ``sum`` part: exactly the gradient of the whole accumulated batch
(DESIGN.md's rule). When verification quarantines a worker, ``remove_worker``
drops its sums (nothing is subtracted, so what is left is exactly the honest
workers' sum) and hands back the shards it computed, to be recomputed.

At most ``MAX_SUMS`` sums are kept apart, per request and per run's open step
(``Groups``): each is an adapter-sized fp32 buffer, and a step whose shards went
to 1,000 workers held 1,000 of them (14 GB for signal-small at r=64, and the
coordinator ran out of memory). A worker beyond that many shares the sum of one
already there, chosen by its id; taking it out takes its sum-mates' parts out
too, and their shards are recomputed with its own. Two costs beyond 8 workers
(up to 8, nothing changes): which workers share depends on which 8 came first,
so the sum's bits depend on arrival order; and each request folds workers its
own way, so a worker quarantined at the step may be in several of the step's
sums (with 1,000 workers over 4 requests, about half the step's shards are
recomputed). A recovered gradient's sum is never shared (it has no shards to
recompute).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rewardsignal.aggregation.tensors import Tensors, tree_add_, tree_clone, tree_div
from rewardsignal.errors import ValidationError

# The worker a gradient is attributed to when it came back from disk after a
# restart (per-worker parts are not kept on disk): it cannot be taken out.
RECOVERED = ""


class GradientSum:
    """Running sum of tensors with the same names and shapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sum: Tensors | None = None
        self._shared = False  # another GradientSum holds the same tensors

    def add(self, tensors: Tensors, *, owned: bool = False) -> None:
        """Add ``tensors``. The first addend becomes the sum as it is: with
        ``owned`` the caller hands it over (e.g. a freshly decoded submission);
        otherwise it is shared, and copied before anything is added to it, so
        the caller's tensors are never written (a step's one gradient is summed
        without a copy)."""
        with self._lock:
            if self._sum is None:
                self._sum, self._shared = tensors, not owned
            else:
                if self._shared:  # the same bits as adding in place, into a copy
                    self._sum, self._shared = tree_clone(self._sum), False
                tree_add_(self._sum, tensors)

    def share(self) -> GradientSum:
        """A copy holding the same tensors; neither writes to them after this."""
        out = GradientSum()
        with self._lock:
            out._sum = self._sum
            out._shared = self._shared = self._sum is not None
        return out

    @property
    def empty(self) -> bool:
        return self._sum is None

    def value(self) -> Tensors:
        if self._sum is None:
            raise ValidationError("no gradient has been added")
        return self._sum


# Gradient sums kept apart per request and per run's open step (module docstring).
MAX_SUMS = 8


class Groups:
    """Which sum each name's gradients go into: a name (a worker, or a request's
    part) has its own key while fewer than ``limit`` keys exist, and otherwise
    the key of one already there, chosen by the name's crc32. Also which workers
    each key's sum holds (a worker may be in several), to take them out."""

    def __init__(self, limit: int = MAX_SUMS) -> None:
        self.limit = limit
        self._key: dict[str, str] = {}  # name -> key
        self._members: dict[str, set[str]] = {}  # key -> workers in its sum
        self._of: dict[str, set[str]] = {}  # worker -> keys of the sums it is in

    def copy(self) -> Groups:
        out = Groups(self.limit)
        out._key = dict(self._key)
        out._members = {k: set(v) for k, v in self._members.items()}
        out._of = {w: set(v) for w, v in self._of.items()}
        return out

    def place(self, name: str, workers: Iterable[str] = ()) -> str:
        """The key of ``name``'s sum; ``workers`` (default: ``name``) are in it."""
        key = self._key.get(name)
        if key is None:
            # Gradients recovered after a restart have no shards to compute again:
            # nothing is folded into their sum, or taking a worker out would lose them.
            keys = sorted(k for k in self._members if k != RECOVERED)
            if len(self._members) < self.limit or not keys or name == RECOVERED:
                key = name
            else:
                key = keys[zlib.crc32(name.encode()) % len(keys)]
            self._key[name] = key
        members = set(workers) or {name}
        self._members.setdefault(key, set()).update(members)
        for w in members:
            self._of.setdefault(w, set()).add(key)
        return key

    def key_of(self, worker: str) -> str | None:
        """The key of a sum ``worker`` is in (the one, for a request's)."""
        return min(self._of[worker]) if self._of.get(worker) else None

    def take(self, worker: str) -> dict[str, set[str]]:
        """The keys of the sums ``worker`` is in, with every worker in each,
        forgotten."""
        taken = {key: self._members.pop(key, set()) for key in self._of.pop(worker, set())}
        for key, members in taken.items():
            for w in members:
                self._of.get(w, set()).discard(key)
        self._key = {n: k for n, k in self._key.items() if k not in taken}
        return taken


class PartialSums:
    """A request's shard gradients, one running sum per worker, at most
    ``MAX_SUMS`` (a task's sink)."""

    def __init__(self, limit: int = MAX_SUMS) -> None:
        self._lock = threading.Lock()
        self.groups = Groups(limit)
        self.by_key: dict[str, GradientSum] = {}

    def add(self, tensors: Tensors, *, owned: bool = False, worker: str = RECOVERED) -> None:
        with self._lock:
            part = self.by_key.setdefault(self.groups.place(worker), GradientSum())
        part.add(tensors, owned=owned)

    def key_of(self, worker: str) -> str:
        """The key of the sum ``worker``'s gradients went into."""
        with self._lock:
            return self.groups.key_of(worker) or worker

    def drop(self, worker: str) -> set[str]:
        """Drop the sum holding ``worker``'s gradients; the workers whose shards
        it held (``worker`` and any that shared it), to compute again."""
        with self._lock:
            redo = {worker}
            for key, members in self.groups.take(worker).items():
                self.by_key.pop(key, None)
                redo |= members
            return redo

    def total(self) -> Tensors | None:
        """The sum over workers (a new buffer), in key order; None if empty."""
        return _ordered_sum([s for _, s in sorted(self.by_key.items()) if not s.empty])


def _ordered_sum(sums: list[GradientSum], *, new: bool = True) -> Tensors | None:
    """The sums added in order; ``new=False``: one sum may come back as it is
    (the caller only reads it)."""
    if not sums:
        return None
    if len(sums) == 1 and not new:
        return sums[0].value()
    out = tree_clone(sums[0].value())
    for s in sums[1:]:
        tree_add_(out, s.value())
    return out


@dataclass
class Part:
    """One worker's share of one request (or a few workers' that share a sum):
    its gradient sum and bookkeeping, and the task payloads of the shards it
    computed (to recompute them elsewhere)."""

    grads: Tensors | None = field(default=None, repr=False)
    weight: float = 0.0
    tokens: int = 0
    loss_sum: float = 0.0
    shards: list[dict[str, Any]] = field(default_factory=list, repr=False)
    workers: set[str] = field(default_factory=set)  # empty: the one its key names


@dataclass(frozen=True)
class Contribution:
    """One accepted ``forward_backward``: its summed gradient and bookkeeping,
    and (live path) the same split by worker."""

    request_id: str
    grads: Tensors = field(repr=False)
    weight: float        # sum of |token weights| (the mean's denominator)
    reduction: str       # "mean" | "sum"
    tokens: int
    loss_sum: float
    loss_weight: float
    parts: dict[str, Part] | None = field(default=None, repr=False)

    def by_worker(self) -> dict[str, Part]:
        """Its parts by sum key (a worker's id, or the first of those sharing it)."""
        if self.parts is not None:
            return self.parts
        return {RECOVERED: Part(self.grads, self.weight, self.tokens, self.loss_sum)}

    def workers(self) -> set[str]:
        return {w for key, p in (self.parts or {}).items() for w in (p.workers or {key})}


@dataclass
class _WorkerSums:
    mean: GradientSum = field(default_factory=GradientSum)
    sum: GradientSum = field(default_factory=GradientSum)
    weight_mean: float = 0.0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    # (request id, reduction, shard payload) of what it computed this step
    shards: list[tuple[str, str, dict]] = field(default_factory=list)

    def share(self) -> _WorkerSums:
        return _WorkerSums(self.mean.share(), self.sum.share(), self.weight_mean, self.tokens,
                           self.loss_sum, self.loss_weight, list(self.shards))


@dataclass
class Accumulator:
    calls: int = 0
    workers: dict[str, _WorkerSums] = field(default_factory=dict)
    # Shards taken out with a quarantined worker, waiting to be recomputed
    # (by ``optim_step``, before it steps): (request id, reduction, payload).
    owed: list[tuple[str, str, dict]] = field(default_factory=list)
    # Contributions on their way to the disk: not counted until ``add``ed.
    staged: list[Contribution] = field(default_factory=list)
    # What was added and taken out, in order (what ``matches`` compares).
    log: list[tuple[str, str]] = field(default_factory=list)
    # Which sum each part's workers are in (at most ``MAX_SUMS``).
    groups: Groups = field(default_factory=Groups, repr=False, compare=False)
    # Guards the above against a big contribution added from a thread while a
    # snapshot is taken on the event loop.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                  compare=False)

    def stage(self, c: Contribution) -> None:
        """``c`` is being made durable: a step may compute on it ahead of time."""
        with self._lock:
            self.staged.append(c)

    def unstage(self, c: Contribution) -> None:
        """``c`` will never be added (it could not be stored)."""
        with self._lock:
            self.staged = [s for s in self.staged if s is not c]

    def snapshot(self) -> Snapshot:
        """The accumulator now and its staged contributions (cheap: no tensor
        is copied; the arithmetic is in ``Snapshot.ahead``)."""
        with self._lock:
            copy = Accumulator(self.calls, {w: ws.share() for w, ws in self.workers.items()},
                               log=list(self.log), groups=self.groups.copy())
            return Snapshot(copy, tuple(self.staged),
                            [*self.log, *(("add", c.request_id) for c in self.staged)])

    def matches(self, snap: Snapshot) -> bool:
        """Whether this is now what ``snap.ahead()`` computed: every staged
        contribution added, in that order, and nothing else changed."""
        with self._lock:
            return self.log == snap.expected_log

    def add(self, c: Contribution) -> None:
        """The one place a contribution is counted (live path and recovery)."""
        with self._lock:
            self.staged = [s for s in self.staged if s is not c]
            self.log.append(("add", c.request_id))
            self._add(c)

    def _add(self, c: Contribution) -> None:
        for name, part in c.by_worker().items():
            ws = self.workers.setdefault(self.groups.place(name, part.workers), _WorkerSums())
            if part.grads is not None:
                if c.reduction == "mean":
                    ws.mean.add(part.grads)
                else:
                    ws.sum.add(part.grads)
            if c.reduction == "mean":
                ws.weight_mean += part.weight
            ws.tokens += part.tokens
            ws.loss_sum += part.loss_sum
            ws.loss_weight += part.weight
            ws.shards.extend((c.request_id, c.reduction, s) for s in part.shards)
        self.calls += 1

    def remove_worker(self, worker: str) -> int:
        """Take ``worker``'s part out (exactly: the other sums are untouched) and
        owe its shards, with those of any worker sharing its sum; how many
        shards are owed."""
        with self._lock:
            gone = [ws for key in sorted(self.groups.take(worker))
                    if (ws := self.workers.pop(key, None)) is not None]
            if not gone:
                return 0
            self.log.append(("remove", worker))
        shards = [s for ws in gone for s in ws.shards]
        self.owed.extend(shards)
        return len(shards)

    def _ordered(self) -> list[_WorkerSums]:
        return [ws for _, ws in sorted(self.workers.items())]

    @property
    def weight_mean(self) -> float:
        return sum(ws.weight_mean for ws in self._ordered())

    @property
    def mean(self) -> GradientSum:
        out = GradientSum()
        total = _ordered_sum([ws.mean for ws in self._ordered() if not ws.mean.empty])
        if total is not None:
            out.add(total, owned=True)
        return out

    @property
    def tokens(self) -> int:
        return sum(ws.tokens for ws in self.workers.values())

    @property
    def empty(self) -> bool:
        with self._lock:  # a big contribution may be being added from a thread
            return all(ws.mean.empty and ws.sum.empty for ws in self.workers.values())

    @property
    def loss(self) -> float | None:
        ws = self._ordered()
        weight = sum(w.loss_weight for w in ws)
        return sum(w.loss_sum for w in ws) / weight if weight else None

    def gradient(self) -> Tensors:
        """The step's gradient, to be read only: it may be the sum itself."""
        parts = []
        ws = self._ordered()
        weight_mean = sum(w.weight_mean for w in ws)
        mean = _ordered_sum([w.mean for w in ws if not w.mean.empty], new=False)
        if mean is not None and weight_mean != 0:
            parts.append(tree_div(mean, weight_mean))
        summed = _ordered_sum([w.sum for w in ws if not w.sum.empty], new=False)
        if summed is not None:
            parts.append(summed)
        if not parts:
            raise ValidationError("the accumulated batches carry no loss weight (every token "
                                  "weight is 0), so there is no gradient to step on")
        out = parts[0]
        for p in parts[1:]:
            out = {k: out[k] + p[k] for k in out}
        return out


@dataclass(frozen=True)
class Snapshot:
    """An accumulator as it was, and the contributions staged on it then."""

    copy: Accumulator
    staged: tuple[Contribution, ...]
    # The accumulator's log once the staged contributions are added in order.
    expected_log: list[tuple[str, str]]

    def ahead(self) -> Accumulator:
        """The accumulator once the staged contributions are added in order
        (call once, in a thread for big gradients: it sums them)."""
        for c in self.staged:
            self.copy.add(c)
        return self.copy
