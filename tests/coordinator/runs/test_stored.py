"""A request is queued while its acceptance is synced to the database: its
shards reach workers at once, but nothing it does outlives the process before
it is stored, and a request that cannot be stored fails with nothing done."""

from __future__ import annotations

import asyncio
import threading

import torch
from apphelpers import FakeWorker, Harness, answer, fake_step, new_run, submit_shard

from rewardsignal.coordinator.store import db as db_module

FB = {"batch": [{"text": "one two three"}]}


def test_shards_go_out_while_the_request_is_synced_and_count_once_it_is_stored(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        worker_id = FakeWorker(h).worker_id
        coord = h.coordinator
        db = coord.services.db
        gate = threading.Event()

        async def go() -> None:
            # The database thread is busy (a slow disk): the request's write waits.
            blocked = asyncio.get_running_loop().run_in_executor(db._pool, gate.wait, 10)
            post = asyncio.ensure_future(h.client.post(f"/v1/runs/{rid}/forward_backward",
                                                       json=FB))
            # The worker gets the shard and its gradient is accepted before the
            # request is stored; the caller has not heard 202 yet.
            assert await submit_shard(h, worker_id, rid) == 200
            await asyncio.sleep(0.2)
            assert not post.done()
            assert coord.runs[rid].accum.empty  # not counted: not durable yet
            pending = tmp_path / "data" / "pending" / rid
            assert not list(pending.glob("*.safetensors"))  # nor written
            (req,) = [r for r in coord.requests._items.values() if r.kind == "forward_backward"]
            assert not req.future.done()
            gate.set()
            await blocked
            status, body = await answer(await post)
            assert status == 202 and body["request_id"] == req.request_id
            result = await asyncio.wait_for(asyncio.shield(req.future), 10)
            assert result["loss_sum"] == 1.0
            assert not coord.runs[rid].accum.empty
            # Stored before it finished: the database has both, in that order.
            row = await db.finished_request(req.request_id)
            assert row is not None and row["status"] == "done"
            assert (tmp_path / "data" / "pending" / rid / f"{req.request_id}.safetensors"
                    ).exists()

        h.call(go())
    finally:
        h.close()


def test_a_request_that_cannot_be_stored_fails_and_changes_nothing(tmp_path, monkeypatch):
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        worker = FakeWorker(h)
        worker_id = worker.worker_id
        fake_step(h, worker, rid)  # version 1, through the normal path
        coord = h.coordinator
        h.call(coord.services.db._do(lambda: None))  # its writes are done
        before = {k: v.clone() for k, v in coord.runs[rid].adapter.items()}
        real_pack = db_module._pack

        def full_disk(obj):
            raise OSError(28, "No space left on device")

        # A forward_backward whose row cannot be written: its shard still goes out
        # (it was queued), but its gradient never counts and the caller hears why.
        monkeypatch.setattr(db_module, "_pack", full_disk)

        async def go() -> None:
            post = asyncio.ensure_future(h.client.post(f"/v1/runs/{rid}/forward_backward",
                                                       json=FB))
            status, body = await answer(await post)
            assert status == 500, body
            assert "could not store the request" in body["error"]["message"]
            assert "No space left" in body["error"]["message"]
            monkeypatch.setattr(db_module, "_pack", real_pack)
            assert await submit_shard(h, worker_id, rid) == 200
            await asyncio.sleep(0.2)
            assert coord.runs[rid].accum.empty
            # A stored forward_backward, then an optim_step that cannot be stored:
            # AdamW may run, but no version is made and the gradient stays.
            post = asyncio.ensure_future(h.client.post(
                f"/v1/runs/{rid}/forward_backward?wait_s=10", json=FB))
            assert await submit_shard(h, worker_id, rid) == 200
            assert (await post).status == 200
            monkeypatch.setattr(db_module, "_pack", full_disk)
            status, body = await answer(await h.client.post(f"/v1/runs/{rid}/optim_step",
                                                            json={}))
            assert status == 500 and "could not store" in body["error"]["message"]
            monkeypatch.setattr(db_module, "_pack", real_pack)
            await asyncio.sleep(0.2)
            assert not coord.runs[rid].accum.empty

        h.call(go())
        assert coord.runs[rid].version == 1
        assert all(torch.equal(before[k], v) for k, v in coord.runs[rid].adapter.items())
        # The run carries on: the next step applies the kept gradient with its own.
        fake_step(h, worker, rid)
        assert coord.runs[rid].version == 2
        assert coord.runs[rid].history[-1]["tokens"] > 0
    finally:
        h.close()


def test_an_outcome_whose_write_fails_once_is_stored_on_a_retry_and_not_applied_twice(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        worker = FakeWorker(h)
        db = h.coordinator.services.db
        real_finish = db.finish_request
        failed = []

        async def finish_once(request_id, status, result, **kw):
            if not failed and "step" in result:  # the optim_step's: a barrier
                failed.append(request_id)
                raise OSError(5, "Input/output error")
            await real_finish(request_id, status, result, **kw)

        db.finish_request = finish_once
        fake_step(h, worker, rid)  # the optim_step's outcome is stored on the retry
        fake_step(h, worker, rid)  # and the run's queue goes on
        assert len(failed) == 1
        assert h.coordinator.runs[rid].version == 2
        row = h.call(real_finish.__self__.finished_request(failed[0]))
        assert row is not None and row["status"] == "done" and row["result"]["version"] == 1
    finally:
        h.close()
    h = Harness(tmp_path / "data")  # a restart runs neither step again
    try:
        assert h.coordinator.runs[rid].version == 2
    finally:
        h.close()
