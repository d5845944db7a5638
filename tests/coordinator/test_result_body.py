"""A result whose tensors come after its msgpack map (``protocol.RESULT``): the
coordinator names the format at registration, steps on it exactly as on a result
with the tensors inside the map, and refuses a body that does not add up."""

from __future__ import annotations

import torch
from apphelpers import FakeWorker, Harness, fake_step, new_run, real_worker_steps

from rewardsignal.protocol import MSGPACK, RESULT, tensors_to_bytes


def test_tensors_after_the_map_step_the_run_as_tensors_inside_it(tmp_path):
    adapters = []
    for as_result in (False, True):
        h = Harness(tmp_path / f"as_result_{as_result}")
        try:
            rid = new_run(h)
            worker = FakeWorker(h)
            assert worker.result_types == [MSGPACK, RESULT]
            fake_step(h, worker, rid, as_result=as_result)
            assert h.coordinator.runs[rid].version == 1
            adapters.append({k: v.clone() for k, v in h.coordinator.runs[rid].adapter.items()})
        finally:
            h.close()
    msgpack_inside, after_the_map = adapters
    assert all(torch.equal(after_the_map[k], v) for k, v in msgpack_inside.items())


def test_a_result_body_that_does_not_add_up_is_refused_and_changes_nothing(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        worker = FakeWorker(h)
        _, req = h.request("POST", f"/v1/runs/{rid}/forward_backward",
                           json={"batch": [{"text": "hello"}]}, expect=202)
        task = worker.lease()
        status, body = h.request("POST", f"/v1/tasks/{task['task_id']}/result",
                                 data=b"\x00\x00\x10\x00{}",  # a 4 KiB map in 2 bytes
                                 headers={"Content-Type": RESULT})
        assert status == 400 and "ends before its map" in body["error"]["message"]
        assert h.coordinator.runs[rid].accum.empty
        # The task is still this worker's to finish.
        grads = {k: torch.full(s, 0.01) for k, s in h.coordinator.runs[rid].shapes.items()}
        lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
        status, _ = worker.submit(task, as_result=True, codec="fp32",
                                  tensors=tensors_to_bytes(grads), duration_s=0.1,
                                  result={"loss_sum": 1.0, "weight_sum": 2.0, "logprobs": lp})
        assert status == 200
        _, done = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
        assert done["status"] == "done" and not h.coordinator.runs[rid].accum.empty
    finally:
        h.close()


def test_a_real_worker_sends_its_gradients_after_the_map(tmp_path, monkeypatch):
    from rewardsignal.coordinator.api import workers as workers_api

    read: list[int] = []
    real = workers_api.unpack_result

    def counted(body, **kw):
        read.append(len(body))
        return real(body, **kw)

    monkeypatch.setattr(workers_api, "unpack_result", counted)
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        real_worker_steps(h, rid, 2)
        assert len(read) == 2 and h.coordinator.runs[rid].accum.calls == 2
    finally:
        h.close()
