"""The request registry keeps the newest finished requests and every open one."""

from __future__ import annotations

import asyncio
import json

import pytest

from rewardsignal.coordinator.runs.requests import RequestRegistry
from rewardsignal.coordinator.store.db import Database, NewRequest
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
            await db.add_requests("alice", "run-1", [NewRequest(rid, "forward", {}, None)])
        for rid in ids[:1] + ids[2:]:  # req-1 stays open
            await db.finish_request(rid, "done", {"rid": rid})
        # Finished requests older than the newest keep_finished + 1 accepted go.
        kept = [rid for rid in ids if await db.finished_request(rid) is not None]
        assert kept == ids[4:]
        assert [r["request_id"] for r in await db.open_requests()] == ["req-1"]
        await db.close()

    asyncio.run(go())


def test_requests_accepted_together_are_stored_all_or_none(tmp_path):
    """``add_requests``: one transaction, the key with them; a row that cannot be
    written (here a request id already taken) leaves none of them, nor the key."""
    async def go() -> None:
        db = Database(tmp_path / "signal.db")
        await db.add_requests("alice", "run-1", [NewRequest("req-1", "forward", {}, None)])
        with pytest.raises(Exception, match="UNIQUE"):
            await db.add_requests("alice", "run-1", [
                NewRequest("req-2", "forward_backward", {"n": 2}, 5.0),
                NewRequest("req-1", "optim_step", {}, 5.0)], idem_key="k", answer={"a": 1})
        assert [r["request_id"] for r in await db.open_requests()] == ["req-1"]
        assert await db.find_key("alice", "k") is None
        await db.add_requests("alice", "run-1", [
            NewRequest("req-2", "forward_backward", {"n": 2}, 5.0),
            NewRequest("req-3", "optim_step", {}, 5.0)], idem_key="k", answer={"a": 1})
        assert [(r["request_id"], r["kind"]) for r in await db.open_requests()] == [
            ("req-1", "forward"), ("req-2", "forward_backward"), ("req-3", "optim_step")]
        assert (await db.find_key("alice", "k"))["answer"] == {"a": 1}
        await db.close()

    asyncio.run(go())


def test_request_rows_round_trip_and_rows_stored_as_json_text_still_read(tmp_path):
    """Arguments and results are stored as msgpack (what msgpack cannot hold,
    a big int or a lone surrogate, falls back to JSON text), and rows written
    as JSON text by earlier versions read back the same."""
    async def go() -> None:
        db = Database(tmp_path / "signal.db")
        args = {"datums": [{"model_input": [1, 2, 3], "weights": [0.5, 1.0, -2.25]}],
                "seed": 2 ** 70, "nan": None}
        result = {"loss": 1.25, "logprobs": [[-0.1, -2.5e-8]], "version": 3}
        await db.add_requests("alice", "run-1", [NewRequest("req-new", "forward", args, None)])
        await db.add_requests("alice", "run-1", [NewRequest("req-open", "forward", {"n": [1, 2]}, None)])
        await db.add_requests("alice", "run-2", [NewRequest("req-odd", "sample", {"stop": ["\ud800"]}, None)])
        await db.finish_request("req-new", "done", result, keep_args=True)
        await db._do(lambda: db._c().execute(
            "INSERT INTO requests VALUES ('req-old', 0, 'alice', 'run-1', 'forward', ?, NULL, "
            "'done', ?, 0, 0)", (json.dumps({"n": 1}), json.dumps({"loss": 0.5}))))
        stored = await db._do(lambda: dict(db._c().execute(
            "SELECT request_id, typeof(args) FROM requests").fetchall()))
        assert stored == {"req-new": "text", "req-open": "blob", "req-old": "text",
                          "req-odd": "text"}
        assert (await db.finished_request("req-new"))["result"] == result
        assert (await db.finished_request("req-old"))["result"] == {"loss": 0.5}
        done = await db.done_requests("run-1", "forward")
        assert [(d["request_id"], d["args"]) for d in done] == [("req-old", {"n": 1}),
                                                                ("req-new", args)]
        assert [r["args"] for r in await db.open_requests()] == [{"n": [1, 2]},
                                                                {"stop": ["\ud800"]}]
        await db.close()

    asyncio.run(go())
