"""How a worker gets a task's weights: the exact delta in its lease when it
holds the version before, the full download when it fell further behind or the
delta does not check out; the same fp32 bits either way."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from apphelpers import FakeWorker, Harness, fake_step

from rewardsignal import protocol
from rewardsignal.errors import ValidationError
from rewardsignal.worker.weights import WeightCache

# Two fake workers, one stepping: with verification on, the other would owe the
# stepper's results a recomputation it never leases. Verification is not the
# subject here (tests/coordinator/trust is).


def _lease(h: Harness, worker: FakeWorker, have: dict,
           deltas: tuple[str, ...] = protocol.DELTA_CODECS) -> dict:
    """A lease as ``signal-worker`` asks for it (msgpack, with the versions held
    and the delta codecs it applies)."""
    status, task = h.request(
        "POST", f"/v1/workers/{worker.worker_id}/lease?timeout_s=5&deltas={','.join(deltas)}",
        data=protocol.pack({"have": have}),
        headers={"Content-Type": protocol.MSGPACK, "Accept": protocol.MSGPACK})
    assert status == 200, task
    return task


def _download(h: Harness, worker: FakeWorker):
    async def download(task: dict) -> bytes:
        resp = await h.client.get(task["weights_url"],
                                  headers={"X-Signal-Worker": worker.worker_id})
        assert resp.status == 200
        return await resp.read()

    return download


def _get(h: Harness, cache: WeightCache, task: dict, worker: FakeWorker) -> dict:
    return h.call(cache.get(task, _download(h, worker)))


def _finish(worker: FakeWorker, task: dict) -> None:
    lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
    code, _ = worker.submit(task, result={"loss_sum": 1.0, "weight_sum": 1.0, "logprobs": lp},
                            duration_s=0.1)
    assert code == 200


def _exact(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_worker_behind_by_several_versions_gets_exact_weights(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0)
    try:
        stepper, worker = FakeWorker(h, "stepper"), FakeWorker(h, "behind")
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2,
                                                     "learning_rate": 1e-2}, expect=201)
        run_id = run["run_id"]
        coord_run = h.coordinator.runs[run_id]
        cache = WeightCache()
        # The worker takes a task at version 1 (no version held: a full download).
        fake_step(h, stepper, run_id)
        h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "a"}]},
                  expect=202)
        task = _lease(h, worker, cache.have())
        assert task["version"] == 1 and "weights_delta" not in task
        assert _exact(_get(h, cache, task, worker), coord_run.adapter)
        assert cache.bytes_downloaded > 0 and cache.bytes_delta == 0
        _finish(worker, task)

        # Three versions later: no delta from version 1 is kept; the full weights.
        for _ in range(3):
            fake_step(h, stepper, run_id)
        h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "b"}]},
                  expect=202)
        task = _lease(h, worker, cache.have())
        assert cache.have() == {run_id: 1} and task["version"] == 4
        assert "weights_delta" not in task
        full = cache.bytes_downloaded
        assert _exact(_get(h, cache, task, worker), coord_run.adapter)
        assert cache.bytes_downloaded == 2 * full
        _finish(worker, task)

        # One version behind: the delta in the lease, bit for bit the new version,
        # smaller than the adapter, and no download.
        fake_step(h, stepper, run_id)
        h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "c"}]},
                  expect=202)
        task = _lease(h, worker, cache.have())
        assert task["version"] == 5 and task["weights_delta"]["from_version"] == 4
        assert _exact(_get(h, cache, task, worker), coord_run.adapter)
        assert cache.bytes_downloaded == 2 * full
        assert 0 < cache.bytes_delta < full
    finally:
        h.close()


def _one_behind(h: Harness) -> tuple[str, WeightCache, dict, FakeWorker]:
    """A worker that holds version 0 of a new run, and its lease of a task on
    version 1, which carries the delta between them: (run id, the worker's
    cache, the task, the worker)."""
    stepper, worker = FakeWorker(h, "stepper"), FakeWorker(h, "w")
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    run_id = run["run_id"]
    cache = WeightCache()
    h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "a"}]},
              expect=202)
    task = _lease(h, worker, {})
    _get(h, cache, task, worker)
    _finish(worker, task)
    fake_step(h, stepper, run_id)
    h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "b"}]},
              expect=202)
    task = _lease(h, worker, cache.have())
    assert task["weights_delta"]["from_version"] == 0
    return run_id, cache, task, worker


def test_a_delta_that_does_not_check_out_falls_back_to_the_download(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0)
    try:
        run_id, cache, task, worker = _one_behind(h)
        data = bytearray(task["weights_delta"]["data"])
        data[0] ^= 1  # one flipped bit: the result's sha256 no longer matches
        task["weights_delta"]["data"] = bytes(data)
        got = _get(h, cache, task, worker)
        assert _exact(got, h.coordinator.runs[run_id].adapter)
        assert cache.bytes_delta == 0 and cache.bytes_downloaded > 0
    finally:
        h.close()


def test_a_delta_from_an_older_coordinator_still_applies(tmp_path):
    """A coordinator from before ``xor-planes3-zlib`` sends ``xor-planes-zlib``
    (two planes deflated): the worker applies it, bit for bit, with no download."""
    h = Harness(tmp_path / "data", verify_fraction=0.0)
    try:
        run_id, cache, task, worker = _one_behind(h)
        versions = h.coordinator.services.versions
        before, after = (versions.adapter_bytes(run_id, v) for v in (0, 1))
        assert before is not None and after is not None
        assert task["weights_delta"]["codec"] == protocol.XOR_DELTA
        task["weights_delta"] = {"from_version": 0, "codec": protocol.XOR_DELTA_V1,
                                 "data": protocol.xor_delta(before, after,
                                                            protocol.XOR_DELTA_V1)}
        downloaded = cache.bytes_downloaded
        got = _get(h, cache, task, worker)
        assert _exact(got, h.coordinator.runs[run_id].adapter)
        assert cache.bytes_downloaded == downloaded and cache.bytes_delta > 0
    finally:
        h.close()


def test_a_worker_that_does_not_name_the_codec_gets_no_delta(tmp_path):
    """A worker from before ``xor-planes3-zlib`` (it names no codec, or only the
    old one) downloads the version rather than be sent a delta it cannot apply."""
    h = Harness(tmp_path / "data", verify_fraction=0.0)
    try:
        run_id, cache, task, worker = _one_behind(h)  # one that names it gets the delta
        _finish(worker, task)
        fake_step(h, FakeWorker(h, "stepper2"), run_id)
        for deltas in ((), (protocol.XOR_DELTA_V1,)):
            h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "c"}]},
                      expect=202)
            task = _lease(h, worker, {run_id: task["version"]}, deltas)
            assert "weights_delta" not in task
            _finish(worker, task)
    finally:
        h.close()


def test_old_workers_get_json_leases_without_deltas(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0)
    try:
        worker = FakeWorker(h)
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny"}, expect=201)
        h.request("POST", f"/v1/runs/{run['run_id']}/forward", json={"batch": [{"text": "a"}]},
                  expect=202)
        task = worker.lease()  # no body, JSON
        assert task is not None and task["version"] == 0 and "weights_delta" not in task
    finally:
        h.close()


def test_lease_refuses_a_malformed_have_map(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0)
    try:
        worker = FakeWorker(h)
        status, body = h.request("POST", f"/v1/workers/{worker.worker_id}/lease?timeout_s=0",
                                 json={"have": {"run-x": "latest"}})
        assert status == 400 and "have" in body["error"]["message"]
    finally:
        h.close()


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 4099])
def test_xor_delta_rebuilds_the_new_bytes_exactly(size):
    gen = torch.Generator().manual_seed(size)
    old = torch.randn(size, generator=gen)
    new = old + 1e-3 * torch.randn(size, generator=gen)
    a, b = old.numpy().tobytes() + b"\x01", new.numpy().tobytes() + b"\x02"
    delta = protocol.xor_delta(a, b)
    assert delta is not None
    assert protocol.apply_xor_delta(a, delta) == b
    assert hashlib.sha256(protocol.apply_xor_delta(a, delta)).digest() == \
        hashlib.sha256(b).digest()
    assert protocol.xor_delta(a, b + b"x") is None  # shapes changed: no delta
    with pytest.raises(ValidationError):
        protocol.apply_xor_delta(a + b"xyzw", delta)


def test_a_pushed_version_is_kept_only_if_it_applies_and_checks_out():
    old = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    new = {k: v + 0.01 for k, v in old.items()}
    old_b, new_b = protocol.tensors_to_bytes(old), protocol.tensors_to_bytes(new)
    cache = WeightCache()
    cache._keep(("run-1", 1), old_b)
    update = {"run_id": "run-1", "version": 2,
              "weights_sha256": hashlib.sha256(new_b).hexdigest(),
              "weights_delta": {"from_version": 1, "codec": protocol.XOR_DELTA,
                                "data": protocol.xor_delta(old_b, new_b)}}
    # From a version not held, with a wrong sha256, or malformed: not kept.
    assert not cache.take({**update, "weights_delta": {**update["weights_delta"],
                                                       "from_version": 0}})
    assert not cache.take({**update, "weights_sha256": "0" * 64})
    assert not cache.take({**update, "version": "2"})
    assert cache.have() == {"run-1": 1}
    assert cache.take(update)
    assert cache.have() == {"run-1": 2}
    assert cache.take(update)  # again: already held

    async def no_download(task: dict) -> bytes:
        raise AssertionError("a pushed version needs no download")

    got = asyncio.run(cache.get({"run_id": "run-1", "version": 2}, no_download))
    assert _exact(got, new)
