"""How long an idle OpenMP thread busy-waits before it sleeps.

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

import os

SPIN_COUNT = 30_000


def short_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process (and its children) unless the user
    chose a spin; whether it did."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
