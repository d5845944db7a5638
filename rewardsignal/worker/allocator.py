"""A worker process's C allocator: keep freed memory for the next step.

A training step on CPU allocates and frees the same large buffers (activations,
logits, their gradients) step after step. glibc's malloc hands a buffer above
its mmap threshold back to the kernel when it is freed, and a thread other than
the main one (the worker computes on one) gets arenas of its own that do the
same, so the next step page-faults every page back in, zeroed by the kernel:
about 1.9 million page faults per 65k-token step of signal-tiny, a quarter of
the step (``bench/RESULTS.md``, "A CPU worker's allocator").

``keep_freed_memory`` sets one arena, no mmap for large blocks, and a high trim
threshold: the process keeps the heap it reached and reuses it, as PyTorch's
CUDA caching allocator keeps GPU memory. The arena limit only holds if it is set
before any thread is started, so it runs before torch is imported. Linux with
glibc only; a parameter the user set themselves (``MALLOC_ARENA_MAX`` or
``glibc.malloc.arena_max``, and so on: ``rewardsignal.libc``) keeps their value.
"""

from __future__ import annotations

from rewardsignal import libc

# mallopt takes a C int: the trim threshold's ceiling is 2 GiB of free heap top.
SETTINGS = ((libc.M_ARENA_MAX, 1), (libc.M_MMAP_MAX, 0), (libc.M_TRIM_THRESHOLD, 2**31 - 1),
            (libc.M_TOP_PAD, 64 << 20))


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` to this process's glibc malloc; whether it did."""
    return libc.mallopt(SETTINGS)
