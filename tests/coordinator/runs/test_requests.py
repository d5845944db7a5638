"""The request registry keeps the newest finished requests and every open one."""

from __future__ import annotations

import asyncio

import pytest

from rewardsignal.coordinator.runs.requests import RequestRegistry
from rewardsignal.coordinator.store.db import Database
from rewardsignal.errors import NotFoundError


def test_only_the_oldest_finished_requests_are_dropped() -> None:
    async def go() -> None:
        reg = RequestRegistry(keep_finished=2)
        reqs = [reg.create("alice", "run-1", "forward") for _ in range(5)]
        for r in (reqs[0], reqs[2], reqs[3], reqs[4]):
            r.future.set_result({"i": 1})
        await asyncio.sleep(0)  # done callbacks run on the loop
        for r in reqs[:1] + reqs[2:3]:
            with pytest.raises(NotFoundError):
                reg.get(r.request_id, "alice")
        assert reg.get(reqs[1].request_id, "alice") is reqs[1]  # still open: kept
        for r in reqs[3:]:
            assert reg.get(r.request_id, "alice").future.result() == {"i": 1}
        # A request that reuses a finished id (a replay after restart) is not
        # dropped while it is open, even when its old entry is the oldest.
        again = reg.create("alice", "run-1", "forward", request_id=reqs[3].request_id)
        reqs[1].future.set_result({"i": 2})
        await asyncio.sleep(0)
        assert reg.get(again.request_id, "alice") is again

    asyncio.run(go())


def test_the_database_keeps_a_window_of_finished_requests_and_every_open_one(tmp_path):
    async def go() -> None:
        db = Database(tmp_path / "signal.db", keep_finished=3)
        ids = [f"req-{i}" for i in range(8)]
        for rid in ids:
            await db.add_request(rid, "alice", "run-1", "forward", {}, None)
        for rid in ids[:1] + ids[2:]:  # req-1 stays open
            await db.finish_request(rid, "done", {"rid": rid})
        # Finished requests older than the newest keep_finished + 1 accepted go.
        kept = [rid for rid in ids if await db.finished_request(rid) is not None]
        assert kept == ids[4:]
        assert [r["request_id"] for r in await db.open_requests()] == ["req-1"]
        await db.close()

    asyncio.run(go())
