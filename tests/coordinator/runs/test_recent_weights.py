"""The adapter files a coordinator keeps in memory, and the deltas between them."""

from __future__ import annotations

import asyncio
import hashlib
import os

import torch

from rewardsignal.coordinator.runs.versions import make_adapter_file, make_adapter_file_and_delta
from rewardsignal.coordinator.runs.weights import RecentWeights
from rewardsignal.protocol import apply_xor_delta


def test_keeps_the_newest_versions_and_deltas_between_consecutive_ones():
    async def go() -> None:
        recent = RecentWeights(keep_versions=2)
        files = [os.urandom(1000) for _ in range(4)]
        for v, data in enumerate(files):
            recent.put("r", v, data)
        assert recent.file("r", 1) is None and recent.file("r", 3) == files[3]
        delta = await recent.delta("r", 2, 3)
        assert delta is not None and apply_xor_delta(files[2], delta) == files[3]
        assert await recent.delta("r", 1, 3) is None  # two behind: the full weights
        older = await recent.delta("r", 1, 2)  # kept with version 2
        assert older is not None and apply_xor_delta(files[1], older) == files[2]
        assert await recent.delta("r", 0, 1) is None  # dropped with version 1
        assert recent.bytes == 2000

    asyncio.run(go())


def test_whole_runs_are_dropped_beyond_the_byte_budget_but_never_the_newest():
    async def go() -> None:
        recent = RecentWeights(keep_bytes=2500)
        recent.put("a", 0, b"x" * 1000)
        recent.put("b", 0, b"y" * 1000)
        recent.put("c", 0, b"z" * 1000)  # 3000 > 2500: "a", least recently put, goes
        assert recent.file("a", 0) is None and recent.file("b", 0) is not None
        recent.put("d", 0, b"w" * 5000)  # alone over budget: kept, the others go
        assert recent.file("d", 0) is not None and recent.file("c", 0) is None
        assert recent.bytes == 5000

    asyncio.run(go())


def test_a_new_versions_file_hash_and_delta_whether_hashed_beside_it_or_not():
    g = torch.Generator().manual_seed(0)
    for n in (1000, 600_000):  # 4 KB, and 2.4 MB (hashed in a second thread)
        old = {"a.lora_A": torch.randn(n, generator=g)}
        new = {"a.lora_A": old["a.lora_A"] - 1e-3 * torch.randn(n, generator=g)}
        before, _ = make_adapter_file(old)
        (data, sha), delta = make_adapter_file_and_delta(new, before)
        assert (data, sha) == make_adapter_file(new)
        assert sha == hashlib.sha256(data).hexdigest()
        assert delta is not None and apply_xor_delta(before, delta) == data
        assert make_adapter_file_and_delta(new, None) == ((data, sha), None)
