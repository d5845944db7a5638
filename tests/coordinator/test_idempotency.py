"""Idempotency keys over the real HTTP surface: a retried call with the same key
gets the original request (or run) back, whatever happened in between: still
being accepted, finished, or a coordinator restart. Keys are per user."""

from __future__ import annotations

import asyncio

from apphelpers import Harness

from rewardsignal.coordinator.store.keys import create_key, key_hash

FB = {"batch": [{"text": "one two three"}]}


def _post(h: Harness, path: str, key: str | None, json: dict, headers: dict | None = None):
    hdrs = {**(headers or {}), **({"X-Idempotency-Key": key} if key else {})}
    return h.request("POST", path, json=json, headers=hdrs)


def test_same_key_same_request_across_a_restart(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        code, run = _post(h, "/v1/runs", "create-1", {"base_model": "signal-tiny", "lora_r": 2})
        assert code == 201
        code, again = _post(h, "/v1/runs", "create-1", {"base_model": "signal-tiny", "lora_r": 2})
        assert code == 201 and again["run_id"] == run["run_id"]
        _, runs = h.request("GET", "/v1/runs")
        assert len(runs["runs"]) == 1
        rid = run["run_id"]
        code, first = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-1", FB)
        assert code == 202
        code, second = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-1", FB)
        assert code == 202 and second["request_id"] == first["request_id"]
        code, other = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-2", FB)
        assert other["request_id"] != first["request_id"]
        assert h.coordinator.runs[rid].processor.queue.qsize() + len(
            h.coordinator.scheduler.tasks) >= 1
    finally:
        h.close()
    h = Harness(tmp_path / "data")  # the same data directory, a new coordinator
    try:
        code, replay = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-1", FB)
        assert code == 202 and replay["request_id"] == first["request_id"]
        code, run_again = _post(h, "/v1/runs", "create-1", {"base_model": "signal-tiny"})
        assert code == 201 and run_again["run_id"] == rid
        _, runs = h.request("GET", "/v1/runs")
        assert len(runs["runs"]) == 1
    finally:
        h.close()


def test_concurrent_retries_share_one_request(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)

        async def both():
            async def one():
                resp = await h.client.post(f"/v1/runs/{run['run_id']}/forward_backward",
                                           json=FB, headers={"X-Idempotency-Key": "same"})
                return resp.status, await resp.json(), resp.headers.get("Idempotent-Replayed")
            return await asyncio.gather(one(), one(), one())

        answers = h.call(both())
        assert {a[0] for a in answers} == {202}
        assert len({a[1]["request_id"] for a in answers}) == 1
        assert sorted(str(a[2]) for a in answers) == ["None", "true", "true"]
    finally:
        h.close()


def test_keys_are_per_user_and_checked(tmp_path):
    db = tmp_path / "data" / "signal.db"
    create_key(db, "ann", "user", key_hash("sk-ann"))
    create_key(db, "bob", "user", key_hash("sk-bob"))
    h = Harness(tmp_path / "data")
    try:
        ann, bob = ({"Authorization": f"Bearer sk-{n}"} for n in ("ann", "bob"))
        _, ra = _post(h, "/v1/runs", "k", {"base_model": "signal-tiny", "lora_r": 2}, ann)
        _, rb = _post(h, "/v1/runs", "k", {"base_model": "signal-tiny", "lora_r": 2}, bob)
        assert ra["run_id"] != rb["run_id"]  # the same key from two users: two runs
        for bad in ("", "x" * 129, "has space", "ünï"):
            code, body = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny"},
                                   headers={**ann, "X-Idempotency-Key": bad})
            assert code == 400 and "Idempotency-Key" in body["error"]["message"], bad
        _, mine = h.request("GET", "/v1/runs", headers=ann)
        assert len(mine["runs"]) == 1  # the refused calls created nothing
    finally:
        h.close()


def test_a_refused_body_is_not_remembered(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        code, _ = _post(h, "/v1/runs", "k1", {"base_model": "no-such-model"})
        assert code == 404
        code, run = _post(h, "/v1/runs", "k1", {"base_model": "signal-tiny", "lora_r": 2})
        assert code == 201 and run["run_id"].startswith("run-")
    finally:
        h.close()


def test_a_request_is_read_while_its_key_is_looked_up_and_a_found_key_answers_first(tmp_path):
    """The body of a keyed request is read and checked while its key is looked
    up in the database (``Coordinator.once``'s ``prepare``), not after; a retry
    whose key is found is answered from it even when its body would now be
    refused, as before."""
    h = Harness(tmp_path / "data")
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        rid = run["run_id"]
        db = h.coordinator.services.db
        find_key, order = db.find_key_soon, []

        def slow_find_key(owner, key):
            order.append("lookup begins")

            async def slow():
                await asyncio.sleep(0.2)
                order.append("lookup ends")
                return await find_key(owner, key)

            return asyncio.ensure_future(slow())

        read_body = h.coordinator.services.tokenizers.datums

        def datums(*args, **kwargs):
            order.append("body checked")
            return read_body(*args, **kwargs)

        db.find_key_soon = slow_find_key
        h.coordinator.services.tokenizers.datums = datums
        code, first = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-1", FB)
        assert code == 202
        assert order == ["lookup begins", "body checked", "lookup ends"]
        pair = {"requests": [{"op": "forward_backward", "args": FB},
                             {"op": "optim_step", "args": {}}]}
        order.clear()
        code, both = _post(h, f"/v1/runs/{rid}/requests", "pair-1", pair)
        assert code == 202 and len(both["requests"]) == 2
        assert order == ["lookup begins", "body checked", "lookup ends"]
    finally:
        h.close()
    h = Harness(tmp_path / "data")  # a restart: the keys are found in the database only
    try:
        bad = {"batch": "not a list"}
        code, again = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-1", bad)
        assert code == 202 and again["request_id"] == first["request_id"]
        code, again = _post(h, f"/v1/runs/{rid}/requests", "pair-1", {"requests": []})
        assert code == 202 and again["requests"] == both["requests"]
        code, refused = _post(h, f"/v1/runs/{rid}/forward_backward", "fb-new", bad)
        assert code == 400 and "batch" in refused["error"]["message"]
    finally:
        h.close()
