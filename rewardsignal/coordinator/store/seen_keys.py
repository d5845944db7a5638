"""Which idempotency keys may be in the database, known on the event loop.

Nearly every keyed request carries a key never used before, and finding that
out in SQLite costs a trip to the database thread and back (0.3-0.4 ms on the
step's path on a busy 2-core machine). ``SeenKeys`` answers it on the loop: a
Bloom filter over (owner, key) with two bits per key in a fixed 1 MiB bitmap.
It can be wrong only one way. "Maybe" sends the caller to the database as
before; "not seen" is certain, because every key is added on the event loop
before the write that stores it is queued, and those written by an earlier
process are added when the database opens. Bits are never cleared (a key that
expired or was deleted reads "maybe": one lookup, as before), so the filter
fills with age: at 600,000 keys (a week of a keyed call a second) about 2% of
new keys still go to the database, at a million about 5%.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_BITS = 1 << 23
_MASK = _BITS - 1


def _positions(owner: str, key: str) -> tuple[int, int]:
    # str hashes are SipHash, salted per process: the bitmap lives in memory only.
    h = hash((owner, key))
    return h & _MASK, (h >> 23) & _MASK


def bitmap_of(pairs: Iterable[tuple[str, str]]) -> bytearray:
    """A bitmap with the bits of each (owner, key) set."""
    bits = bytearray(_BITS // 8)
    for owner, key in pairs:
        for i in _positions(owner, key):
            bits[i >> 3] |= 1 << (i & 7)
    return bits


class SeenKeys:
    """Used on the event loop only. Until ``load`` the answer is always "maybe"."""

    def __init__(self) -> None:
        self._bits = bytearray(_BITS // 8)
        self._loaded = False

    def add(self, owner: str, key: str) -> None:
        for i in _positions(owner, key):
            self._bits[i >> 3] |= 1 << (i & 7)

    def load(self, stored: bytearray) -> None:
        """Take in the keys already in the database (``bitmap_of`` them, made
        on any thread), keeping every key added here meanwhile."""
        mine = np.frombuffer(self._bits, dtype=np.uint8)
        np.bitwise_or(mine, np.frombuffer(stored, dtype=np.uint8), out=mine)
        self._loaded = True

    def may_hold(self, owner: str, key: str) -> bool:
        if not self._loaded:
            return True
        bits = self._bits
        return all(bits[i >> 3] >> (i & 7) & 1 for i in _positions(owner, key))
