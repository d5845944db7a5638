"""The worker channel (``GET /v1/workers/{worker_id}/channel``, a WebSocket):
a lease, and a result that carries the next lease, each one exchange answered
by the frames a streamed lease is made of. Bad exchanges get the error the
route would give, as one frame, and change nothing; the token is checked at
every exchange; the coordinator closes its channels when it stops."""

from __future__ import annotations

import asyncio

import aiohttp
from apphelpers import (
    FakeWorker,
    Harness,
    fb_result,
    leased_forward_backward,
    new_run,
    requests_by_method,
)

from rewardsignal.coordinator.api.channel import close_channels
from rewardsignal.coordinator.store.keys import create_key, key_hash, revoke_key
from rewardsignal.protocol import (
    CHANNEL_MAX_BODY_BYTES,
    MSGPACK,
    RESULT,
    XOR_DELTA,
    apply_xor_delta,
    pack,
    unpack,
)


def _message(head: dict, body: bytes = b"") -> bytes:
    packed = pack(head)
    return len(packed).to_bytes(4, "big") + packed + body


async def _frame(ws: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    assert int.from_bytes(msg.data[:4], "big") == len(msg.data) - 4
    return unpack(msg.data[4:], max_bytes=1 << 30)


def test_a_channel_leases_and_takes_a_result_that_carries_the_next_lease(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        worker = FakeWorker(h)
        _, reg = h.request("POST", "/v1/workers/register", expect=201,
                           json={"name": "other", "device": "cpu"})
        assert reg["channel"] == f"/v1/workers/{reg['worker_id']}/channel"
        rid = new_run(h)
        v0 = h.request("GET", f"/v1/runs/{rid}/weights/0", expect=200)[1]

        async def go() -> tuple[dict, list[dict]]:
            ws = await h.client.ws_connect(f"/v1/workers/{worker.worker_id}/channel")
            lease = {"have": {rid: 0}, "timeout_s": 10, "deltas": [XOR_DELTA]}
            await ws.send_bytes(_message({"op": "lease", "lease": lease}))
            fb = await h.client.post(f"/v1/runs/{rid}/forward_backward",
                                     json={"batch": [{"text": "one"}]})
            assert fb.status == 202
            task = (await _frame(ws))["task"]  # the task ends the exchange
            await ws.send_bytes(_message(
                {"op": "result", "task_id": task["task_id"], "content_type": RESULT},
                fb_result(h, worker, task, lease=lease)))
            frames = [await _frame(ws)]  # the answer, then the lease goes on
            step = await h.client.post(f"/v1/runs/{rid}/optim_step?wait_s=10", json={})
            assert step.status == 200, await step.text()
            frames.append(await _frame(ws))  # the new version, pushed
            nxt = await h.client.post(f"/v1/runs/{rid}/forward_backward",
                                      json={"batch": [{"text": "two"}]})
            assert nxt.status == 202
            frames.append(await _frame(ws))
            # A lease that finds no task ends with {"end": true}.
            await ws.send_bytes(_message({"op": "lease", "lease": {**lease, "have": {rid: 1},
                                                                  "timeout_s": 0.2}}))
            frames.append(await _frame(ws))
            await ws.close()
            return task, frames

        task, (answer, pushed, last, end) = h.call(go())
        assert task["version"] == 0 and task["run_id"] == rid
        assert answer == {"answer": {"status": "accepted"}}
        update = pushed["version"]
        assert (update["run_id"], update["version"]) == (rid, 1)
        v1 = h.request("GET", f"/v1/runs/{rid}/weights/1", expect=200)[1]
        assert apply_xor_delta(v0, update["weights_delta"]["data"]) == v1
        assert last["task"]["version"] == 1
        assert end == {"end": True}
        # Every exchange is counted under its route, as a WS request: none was HTTP.
        assert requests_by_method(h, "/v1/workers/{worker_id}/lease") == {"WS": 2}
        assert requests_by_method(h, "/v1/tasks/{task_id}/result") == {"WS": 1}
    finally:
        h.close()


def test_a_bad_exchange_gets_the_routes_error_as_a_frame_and_changes_nothing(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        worker = FakeWorker(h)
        rid = new_run(h)
        fb, task = leased_forward_backward(h, worker, rid)
        path = f"/v1/workers/{worker.worker_id}/channel"

        async def go() -> list[tuple[dict, str]]:
            ws = await h.client.ws_connect(path)
            result = {"op": "result", "task_id": task["task_id"], "content_type": RESULT}
            bad = [
                (b"\x00\x00", "4-byte length"),
                (b"\x00\x00\x00\x09abc", "4-byte length"),  # a head past the message's end
                (_message([1, 2]), "map"),  # type: ignore[arg-type]
                (_message({"op": "upload"}), "unknown op"),
                (_message({"op": ["lease"]}), "unknown op"),
                (_message({"op": "lease", "lease": {"have": {rid: -1}}}), "have"),
                (_message({**result, "content_type": "text/plain"}), "content_type"),
                (_message({**result, "task_id": 7}), "task_id"),
                (_message(result, b"junk"), "result body"),
                (_message(result, fb_result(h, worker, task, lease={"colour": 1})), "colour"),
            ]
            errors = []
            for data, named in bad:
                await ws.send_bytes(data)
                reply = await _frame(ws)
                assert reply["status"] == 400, (named, reply)
                errors.append((reply["error"], named))
            # After all that, the channel still serves: the result is taken.
            await ws.send_bytes(_message(result, fb_result(h, worker, task)))
            taken = [await _frame(ws), await _frame(ws)]
            # A text message closes the channel: it takes binary messages only.
            await ws.send_str("hello")
            closing = await asyncio.wait_for(ws.receive(), 10)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1003
            await ws.close()
            assert taken == [{"answer": {"status": "accepted"}}, {"end": True}]
            return errors

        for error, named in h.call(go()):
            assert error["code"] == "invalid_request" and named in error["message"], (named, error)
        h.request("GET", f"/v1/requests/{fb['request_id']}?timeout_s=5", expect=200)
    finally:
        h.close()


def test_the_worker_token_is_checked_at_the_upgrade_and_at_every_exchange(tmp_path):
    db = tmp_path / "data" / "signal.db"
    h = Harness(tmp_path / "data")
    create_key(db, "fleet", "worker", key_hash("wt-fleet"))
    create_key(db, "other", "worker", key_hash("wt-other"))
    try:
        worker = FakeWorker(h, token="wt-fleet")
        path = f"/v1/workers/{worker.worker_id}/channel"

        async def go() -> tuple[int, int, int, dict, aiohttp.WSMessage]:
            upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAAAA=="}
            refused = await h.client.get(path, headers=upgrade)
            unknown = await h.client.get("/v1/workers/w-nobody/channel", headers=worker.headers)
            # A valid token, but not the one the worker registered with.
            other = await h.client.get(path, headers={**upgrade,
                                                      "Authorization": "Bearer wt-other"})
            ws = await h.client.ws_connect(path, headers=worker.headers)
            lease = {"op": "lease", "lease": {"have": {}, "timeout_s": 0.1}}
            await ws.send_bytes(_message(lease))
            assert await _frame(ws) == {"end": True}
            assert revoke_key(db, "fleet")
            await ws.send_bytes(_message(lease))
            revoked = await _frame(ws)
            closed = await asyncio.wait_for(ws.receive(), 10)
            await ws.close()
            return refused.status, unknown.status, other.status, revoked, closed

        refused, unknown, other, revoked, closed = h.call(go())
        assert refused == 401 and unknown == 404 and other == 403
        assert revoked["status"] == 401 and revoked["error"]["code"] == "unauthorized"
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1008
    finally:
        h.close()


def test_a_stopping_coordinator_closes_its_channels_idle_or_leasing_and_opens_none(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        idle, leasing = FakeWorker(h, "idle"), FakeWorker(h, "leasing")

        async def go() -> tuple[list[aiohttp.WSMessage], int]:
            a = await h.client.ws_connect(f"/v1/workers/{idle.worker_id}/channel")
            b = await h.client.ws_connect(f"/v1/workers/{leasing.worker_id}/channel")
            await b.send_bytes(_message({"op": "lease", "lease": {"have": {}, "timeout_s": 30}}))
            await asyncio.sleep(0.2)  # b's lease is parked
            await close_channels(h.app)
            closed = [await asyncio.wait_for(ws.receive(), 10) for ws in (a, b)]
            late = await h.client.get(f"/v1/workers/{idle.worker_id}/channel")
            return closed, late.status

        closed, late = h.call(go())
        for msg in closed:
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001, msg
        assert late == 503
    finally:
        h.close()


def test_a_worker_that_leaves_ends_its_parked_lease_and_one_that_abandons_gets_no_task(
        tmp_path):
    """The channel is read while its exchange runs: a closed channel's parked
    lease ends at once, and a task sent in an exchange the worker abandoned
    (close code 4000) goes back to the queue for another worker."""
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        leaving, abandoning, other = FakeWorker(h, "a"), FakeWorker(h, "b"), FakeWorker(h, "c")
        rid = new_run(h)
        lease = {"op": "lease", "lease": {"have": {}, "timeout_s": 30}}

        async def go() -> tuple[dict, str]:
            a = await h.client.ws_connect(f"/v1/workers/{leaving.worker_id}/channel")
            await a.send_bytes(_message(lease))
            await asyncio.sleep(0.2)  # parked
            await a.close()
            for _ in range(100):  # bounded: 10 s
                if _lease_exchanges_done(h) == 1:
                    break
                await asyncio.sleep(0.1)
            counted = _lease_exchanges_done(h)
            b = await h.client.ws_connect(f"/v1/workers/{abandoning.worker_id}/channel")
            await b.send_bytes(_message(lease))
            fb = await h.client.post(f"/v1/runs/{rid}/forward_backward",
                                     json={"batch": [{"text": "one"}]})
            assert fb.status == 202
            sent = (await _frame(b))["task"]
            await b.close(code=4000)  # as if the task frame had never been read
            return counted, sent["task_id"]

        counted, task_id = h.call(go())
        assert counted == 1  # the parked lease ended when its channel closed
        again = other.lease(timeout_s=5)
        assert again is not None and again["task_id"] == task_id
    finally:
        h.close()


def test_a_message_over_the_channels_limit_closes_it(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        worker = FakeWorker(h)

        async def go() -> aiohttp.WSMessage:
            ws = await h.client.ws_connect(f"/v1/workers/{worker.worker_id}/channel")
            head = {"op": "result", "task_id": "t-x", "content_type": MSGPACK}
            await ws.send_bytes(_message(head, bytes(CHANNEL_MAX_BODY_BYTES + (64 << 10) + 1)))
            return await asyncio.wait_for(ws.receive(), 10)

        closed = h.call(go())
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1009
    finally:
        h.close()


def _lease_exchanges_done(h: Harness) -> float:
    """Lease exchanges on channels that have ended (read on the loop itself)."""
    latency = h.coordinator.metrics.request_latency
    return sum(s.value for m in latency.collect() for s in m.samples
               if s.name.endswith("_count") and s.labels.get("method") == "WS"
               and s.labels.get("route") == "/v1/workers/{worker_id}/lease")


def test_one_channel_a_worker_and_its_results_only(tmp_path):
    """A second channel of the same worker replaces the first; a result on a
    channel that names another worker is refused (403) and not taken."""
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        worker, other = FakeWorker(h, "w"), FakeWorker(h, "other")
        rid = new_run(h)
        _, task = leased_forward_backward(h, other, rid)
        path = f"/v1/workers/{worker.worker_id}/channel"

        async def go() -> tuple[aiohttp.WSMessage, dict]:
            first = await h.client.ws_connect(path)
            second = await h.client.ws_connect(path)
            replaced = await asyncio.wait_for(first.receive(), 10)
            # other's result, sent on worker's channel.
            await second.send_bytes(_message(
                {"op": "result", "task_id": task["task_id"], "content_type": RESULT},
                fb_result(h, other, task)))
            refused = await _frame(second)
            await second.close()
            return replaced, refused

        replaced, refused = h.call(go())
        assert replaced.type == aiohttp.WSMsgType.CLOSE and replaced.data == 1008
        assert refused["status"] == 403 and other.worker_id in refused["error"]["message"]
        assert not h.coordinator.scheduler.finished
        # Its own worker's request is taken: the refusal took nothing.
        h.request("POST", f"/v1/tasks/{task['task_id']}/result", data=fb_result(h, other, task),
                  headers={"Content-Type": RESULT}, expect=200)
    finally:
        h.close()


def test_a_result_without_a_lease_is_answered_and_the_exchange_ends(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        worker = FakeWorker(h)
        rid = new_run(h)
        _, task = leased_forward_backward(h, worker, rid)
        msg = {"worker_id": worker.worker_id, "lease_id": task["lease_id"],
               "fingerprint": task["fingerprint"], "version": task["version"],
               "error": "out of memory"}

        async def go() -> list[dict]:
            ws = await h.client.ws_connect(f"/v1/workers/{worker.worker_id}/channel")
            await ws.send_bytes(_message({"op": "result", "task_id": task["task_id"],
                                          "content_type": MSGPACK}, pack(msg)))
            frames = [await _frame(ws), await _frame(ws)]
            await ws.close()
            return frames

        assert h.call(go()) == [{"answer": {"status": "released"}}, {"end": True}]
    finally:
        h.close()
