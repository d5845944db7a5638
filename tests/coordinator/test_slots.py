"""Upload slots: a bounded number of submission bodies in flight, and a slot a
dead worker reserved comes back."""

from __future__ import annotations

import asyncio
import time

import torch
from apphelpers import FakeWorker, Harness

from rewardsignal.coordinator.scheduling.slots import UploadSlots
from rewardsignal.protocol import MSGPACK, pack, tensors_to_bytes


def test_slots_bound_and_expire():
    async def go():
        slots = UploadSlots(2, hold_s=0.1)
        a, b = await slots.reserve(1), await slots.reserve(1)
        assert a and b and a != b
        assert await slots.reserve(0.05) is None  # both held
        assert slots.take(a) and not slots.take(a)  # a slot is used once
        assert not slots.take(None) and not slots.take("s-forged")
        slots.release()  # the upload that took ``a`` finished
        c = await slots.reserve(0.05)
        assert c is not None
        await asyncio.sleep(0.15)
        assert slots.expire() == 2  # b and c were reserved and never used
        assert await slots.reserve(0.05) is not None
    asyncio.run(go())


def test_holding_uses_a_reserved_slot_or_waits_for_one_and_always_gives_it_back():
    async def go():
        slots = UploadSlots(1)
        reserved = await slots.reserve(1)
        async with slots.holding(reserved):  # the reserved slot: no wait
            assert await slots.reserve(0.05) is None
        waiting = asyncio.ensure_future(slots.reserve(1))  # free again after the block
        assert await waiting is not None and slots.take(await waiting)
        entered = asyncio.Event()

        async def unreserved() -> None:
            async with slots.holding(None):  # waits: the one slot is in use
                entered.set()
                raise RuntimeError("the upload failed")

        failing = asyncio.ensure_future(unreserved())
        await asyncio.sleep(0.05)
        assert not entered.is_set()
        slots.release()  # the upload holding it finished
        await asyncio.gather(failing, return_exceptions=True)
        assert entered.is_set()
        assert await slots.reserve(0.05) is not None  # given back despite the error
    asyncio.run(go())


def _slot(h, w: FakeWorker, timeout_s: float) -> str | None:
    status, body = h.request("POST", f"/v1/workers/{w.worker_id}/upload-slot?timeout_s="
                             f"{timeout_s}")
    assert status in (200, 204), body
    return body["slot"] if status == 200 else None


def test_a_slot_goes_back_after_the_upload_or_when_its_holder_vanishes(tmp_path):
    h = Harness(tmp_path / "data", upload_slots=1)
    try:
        h.coordinator.services.upload_slots.hold_s = 0.3
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        a, b = FakeWorker(h, "a"), FakeWorker(h, "b")
        slot = _slot(h, a, 1)
        assert slot and _slot(h, b, 0.1) is None  # the only slot is a's
        # a uploads with it: the slot is free again afterwards.
        h.request("POST", f"/v1/runs/{run['run_id']}/forward_backward",
                  json={"batch": [{"text": "x"}]}, expect=202)
        task = a.lease()
        shapes = h.coordinator.runs[run["run_id"]].shapes
        lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
        msg = {"worker_id": a.worker_id, "lease_id": task["lease_id"],
               "fingerprint": task["fingerprint"], "version": task["version"], "codec": "fp32",
               "tensors": tensors_to_bytes({k: torch.zeros(s) for k, s in shapes.items()}),
               "result": {"loss_sum": 1.0, "weight_sum": 1.0, "logprobs": lp}}
        status, out = h.request("POST", f"/v1/tasks/{task['task_id']}/result?slot={slot}",
                                data=pack(msg), headers={"Content-Type": MSGPACK})
        assert status == 200 and out["status"] == "accepted", out
        held = _slot(h, b, 1)
        assert held is not None
        # b vanishes without uploading: after the hold, the tick gives the slot back.
        assert _slot(h, a, 0.1) is None
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:
            h.call(asyncio.sleep(0.1))
            h.coordinator.tick()
            got = _slot(h, a, 0.05)
        assert got is not None
    finally:
        h.close()
