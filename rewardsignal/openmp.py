"""PyTorch's OpenMP threads: how long an idle one busy-waits before it sleeps
(a worker's), and how many a tensor job gets (the coordinator's).

PyTorch's CPU kernels run on libgomp's thread team. When a parallel region
ends, each helper thread of the team spins for ``GOMP_SPINCOUNT`` iterations
(300,000 by default, when the team fits the cores) waiting for the next one,
then sleeps. Inside a step the next region comes within microseconds, so the
spin pays; after the step's last one it burns a core for 7-8 ms (on the
2-core machine of ``bench/RESULTS.md``) while the worker encodes and sends its
result, the coordinator checks it and runs AdamW, and the worker applies the
new version: everything the step waits on then shares the other core.

``short_spin`` sets 30,000 (about a millisecond): still far longer than the
gaps between one step's parallel regions, so the compute is not slowed
(``bench/RESULTS.md``, "Fixed cost, eighth pass"). libgomp reads the variable
once, when it is loaded (by ``import torch``), so this must run before that.
A choice of the user's (``GOMP_SPINCOUNT``, or ``OMP_WAIT_POLICY``, which sets
the spin itself) is kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

SPIN_COUNT = 30_000


def short_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process (and its children) unless the user
    chose a spin; whether it did."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


# -- how many threads a tensor job gets (the coordinator) ---------------------------------
#
# PyTorch forks a team of every intra-op thread for an element-wise op over more
# than 32,768 elements. The coordinator's jobs are element-wise over an adapter
# (checks, sums, AdamW): for a small one the fork and join cost more than they
# save even on a quiet machine (AdamW over 60k parameters: 0.65 ms on one
# thread, 0.87 on two), and on a busy one each region waits for a helper thread
# to get a core. Beyond a few million parameters the team pays (40M: 745 ms on
# one thread, 504 on two). torch.set_num_threads holds for the calling thread
# and for threads that start torch work later, not for threads that already have.

PARALLEL_FROM = 16 << 20  # bytes of tensors a job handles: 4M fp32 elements

_threads: int | None = None  # the team size for big jobs, once serial_by_default ran


def serial_by_default() -> None:
    """One intra-op thread for this thread and every thread that starts torch
    work from now on; jobs over ``PARALLEL_FROM`` bytes or more still get the
    team there was (``threads_for``). For a server process (the coordinator)."""
    import torch

    global _threads
    if _threads is None:
        _threads = torch.get_num_threads()
    torch.set_num_threads(1)


@contextlib.contextmanager
def threads_for(nbytes: int) -> Iterator[None]:
    """The team a job over ``nbytes`` bytes of tensors gets, on this thread,
    while it runs. Nothing unless ``serial_by_default`` ran (tests, the SDK's
    process)."""
    if _threads is None or _threads == 1 or nbytes < PARALLEL_FROM:
        yield
        return
    import torch

    torch.set_num_threads(_threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
