"""Steps whose checkpoint is written in the background: answered before it
lands, served from memory meanwhile, and after a restart that came before it
landed, replayed from their durable inputs to the same bits."""

from __future__ import annotations

import threading

import torch
from apphelpers import FakeWorker, Harness

from rewardsignal.checkpoints import CheckpointStore
from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes


def _forward_backward(h: Harness, worker: FakeWorker, run_id: str, seed: int) -> None:
    """One forward_backward whose gradient the fake worker draws from ``seed``."""
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": f"example {seed}"}]}, expect=202)
    task = worker.lease()
    gen = torch.Generator().manual_seed(seed)
    grads = {k: torch.randn(s, generator=gen)
             for k, s in h.coordinator.runs[run_id].shapes.items()}
    lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
    code, _ = worker.submit(task, codec="fp32", tensors=tensors_to_bytes(grads),
                            result={"loss_sum": 1.0 + seed, "weight_sum": 2.0, "logprobs": lp},
                            duration_s=0.1)
    assert code == 200
    h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)


def _optim_step(h: Harness, run_id: str, **body) -> dict:
    _, req = h.request("POST", f"/v1/runs/{run_id}/optim_step", json=body, expect=202)
    _, out = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
    return out["result"]


def _new_run(h: Harness) -> str:
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2,
                                                 "learning_rate": 1e-2}, expect=201)
    return run["run_id"]


def _hold_writes(monkeypatch) -> threading.Event:
    """Checkpoint writes of version 1 on wait until the returned event is set."""
    release = threading.Event()
    real_write = CheckpointStore.write

    def slow_write(self, run_id, version, **kw):
        if version >= 1:
            assert release.wait(30), "the test never released the write"
        return real_write(self, run_id, version, **kw)

    monkeypatch.setattr(CheckpointStore, "write", slow_write)
    return release


def test_step_answers_before_its_checkpoint_lands_and_serves_from_memory(tmp_path,
                                                                         monkeypatch):
    h = Harness(tmp_path / "data")
    release = _hold_writes(monkeypatch)
    try:
        worker = FakeWorker(h)
        run_id = _new_run(h)
        _forward_backward(h, worker, run_id, seed=1)
        assert _optim_step(h, run_id)["version"] == 1  # answered, checkpoint held back
        coord = h.coordinator
        path = coord.services.versions.store.path(run_id, 1)
        assert not path.exists()
        _, served = h.request("GET", f"/v1/runs/{run_id}/weights/1", expect=200)
        run = coord.runs[run_id]
        assert all(torch.equal(v, run.adapter[k]) for k, v in tensors_from_bytes(served).items())
        # The gradient stays durable until the checkpoint holds it.
        [(row, loaded)] = h.call(coord.services.pending.load(run_id))
        # Read into memory (recovery's accumulator holds it as it is): the file
        # written over in place does not change it.
        before = {k: v.clone() for k, v in loaded.items()}
        with open(row["path"], "r+b") as fh:
            fh.seek(-64, 2)
            fh.write(bytes(64))
        assert all(torch.equal(loaded[k], v) for k, v in before.items())
        release.set()
        h.call(coord.services.versions.flush(run_id))
        assert path.is_dir()
        assert (path / "adapter_model.safetensors").read_bytes() == served
        assert h.call(coord.services.pending.load(run_id)) == []
    finally:
        release.set()
        h.close()


def test_steps_whose_checkpoints_never_landed_are_replayed_to_the_same_bits(tmp_path,
                                                                            monkeypatch):
    # Prepare: version 1 lands; the checkpoints of versions 2 and 3 never do (as
    # if the coordinator were killed before they were written).
    real_write = CheckpointStore.write

    def failing_write(self, run_id, version, **kw):
        if version >= 2:
            raise OSError("disk gone")
        return real_write(self, run_id, version, **kw)

    h = Harness(tmp_path / "data")
    worker = FakeWorker(h)
    run_id = _new_run(h)
    _forward_backward(h, worker, run_id, seed=1)
    _optim_step(h, run_id)
    monkeypatch.setattr(CheckpointStore, "write", failing_write)
    _forward_backward(h, worker, run_id, seed=2)
    _forward_backward(h, worker, run_id, seed=3)  # two gradients: added in their order
    _optim_step(h, run_id, learning_rate=3e-2)
    _forward_backward(h, worker, run_id, seed=4)
    assert _optim_step(h, run_id, weight_decay=0.1)["version"] == 3
    _forward_backward(h, worker, run_id, seed=5)  # accepted after the last step
    before = h.coordinator.runs[run_id]
    adapter = {k: v.clone() for k, v in before.adapter.items()}
    opt_state = {k: v.clone() for k, v in before.opt_state.items()}
    h.close()
    monkeypatch.setattr(CheckpointStore, "write", real_write)
    assert CheckpointStore(tmp_path / "data" / "checkpoints").latest(run_id) == 1

    # Execute: the coordinator comes back from its data directory.
    h = Harness(tmp_path / "data")
    try:
        run = h.coordinator.runs[run_id]
        # Assert: at the version its clients were told, bit for bit, with the
        # gradient accepted after that step still pending (once).
        assert run.version == 3 and run.opt_step == 3
        assert all(torch.equal(run.adapter[k], v) for k, v in adapter.items())
        assert all(torch.equal(run.opt_state[k], v) for k, v in opt_state.items())
        assert run.accum.calls == 1
        h.call(h.coordinator.services.versions.flush(run_id))
        assert CheckpointStore(tmp_path / "data" / "checkpoints").latest(run_id) == 3
        assert [r["version"] for r, _ in h.call(h.coordinator.services.pending.load(run_id))
                ] == [3]
        assert _optim_step(h, run_id)["version"] == 4
    finally:
        h.close()


def test_save_state_right_after_a_step_waits_for_its_checkpoint(tmp_path, monkeypatch):
    h = Harness(tmp_path / "data")
    release = _hold_writes(monkeypatch)
    try:
        worker = FakeWorker(h)
        run_id = _new_run(h)
        _forward_backward(h, worker, run_id, seed=1)
        assert _optim_step(h, run_id)["version"] == 1
        _, req = h.request("POST", f"/v1/runs/{run_id}/save_state", json={"name": "kept"},
                           expect=202)
        threading.Timer(0.5, release.set).start()  # the checkpoint lands a little later
        _, out = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=10",
                           expect=200)
        assert out["result"]["version"] == 1 and out["result"]["name"] == "kept"
        assert CheckpointStore(tmp_path / "data" / "checkpoints").names(run_id) == {"kept": 1}
    finally:
        release.set()
        h.close()


def test_reading_a_version_still_being_written_waits_for_it(tmp_path, monkeypatch):
    """load_state, init_from and delete_run read or remove checkpoints: each waits
    for a background write of the version it names instead of missing it (or
    racing it into a removed directory)."""
    h = Harness(tmp_path / "data")
    release = _hold_writes(monkeypatch)
    try:
        worker = FakeWorker(h)
        run_id = _new_run(h)
        _forward_backward(h, worker, run_id, seed=1)
        assert _optim_step(h, run_id)["version"] == 1
        v1 = {k: v.clone() for k, v in h.coordinator.runs[run_id].adapter.items()}
        other = _new_run(h)
        _, req = h.request("POST", f"/v1/runs/{other}/load_state",
                           json={"from_run": run_id, "version": 1}, expect=202)
        threading.Timer(0.5, release.set).start()
        _, out = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=10",
                           expect=200)
        assert out["result"]["loaded_from"] == f"{run_id}@1"
        loaded = h.coordinator.runs[other].adapter
        assert all(torch.equal(loaded[k], v) for k, v in v1.items())

        release.clear()
        _forward_backward(h, worker, run_id, seed=2)
        assert _optim_step(h, run_id)["version"] == 2
        v2 = {k: v.clone() for k, v in h.coordinator.runs[run_id].adapter.items()}
        threading.Timer(0.5, release.set).start()
        _, child = h.request("POST", "/v1/runs", json={
            "base_model": "signal-tiny", "lora_r": 2, "init_from": f"{run_id}@2"}, expect=201)
        start = h.coordinator.runs[child["run_id"]].adapter
        assert all(torch.equal(start[k], v) for k, v in v2.items())

        release.clear()
        _forward_backward(h, worker, run_id, seed=3)
        assert _optim_step(h, run_id)["version"] == 3
        threading.Timer(0.5, release.set).start()
        h.request("DELETE", f"/v1/runs/{run_id}", expect=200)
        store = h.coordinator.services.versions.store
        assert not store.run_dir(run_id).exists()  # the late write did not bring it back
        assert h.coordinator.services.versions.adapter_bytes(run_id, 3) is None
    finally:
        release.set()
        h.close()


def test_a_version_still_being_written_stays_leasable_when_an_older_one_lands(tmp_path,
                                                                              monkeypatch):
    h = Harness(tmp_path / "data")
    gates = {1: threading.Event(), 2: threading.Event()}
    real_write = CheckpointStore.write

    def gated_write(self, run_id, version, **kw):
        if version in gates:
            assert gates[version].wait(30), "the test never released the write"
        return real_write(self, run_id, version, **kw)

    monkeypatch.setattr(CheckpointStore, "write", gated_write)
    try:
        worker = FakeWorker(h)
        run_id = _new_run(h)
        for seed in (1, 2):
            _forward_backward(h, worker, run_id, seed=seed)
            _optim_step(h, run_id)
        gates[1].set()  # version 1 lands while version 2 is still being written
        store = h.coordinator.services.versions.store
        h.call(_until(lambda: (store.path(run_id, 1) / "manifest.json").exists()))
        h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "x"}]},
                  expect=202)
        task = worker.lease()
        assert task is not None and task["version"] == 2
        _, served = h.request("GET", task["weights_url"],
                              headers={"X-Signal-Worker": worker.worker_id}, expect=200)
        import hashlib

        assert hashlib.sha256(served).hexdigest() == task["weights_sha256"]
    finally:
        for g in gates.values():
            g.set()
        h.close()


async def _until(cond, timeout_s: float = 10.0) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def test_a_fast_runs_checkpoints_wait_their_interval_and_the_steps_between_replay(tmp_path):
    """Background checkpoints of a run start at most once per interval; versions
    committed in between wait (the newest replaces the one before), so a crash
    replays several steps from their kept gradients, to the same bits."""
    import asyncio

    h = Harness(tmp_path / "data", checkpoint_interval_s=60)
    worker = FakeWorker(h)
    run_id = _new_run(h)
    versions = h.coordinator.services.versions
    for seed in range(1, 5):  # version 1 is written at once; 2, 3 and 4 wait
        _forward_backward(h, worker, run_id, seed=seed)
        _optim_step(h, run_id)
    async def landed() -> None:
        await asyncio.gather(*versions._writing.values())

    h.call(landed())
    store = CheckpointStore(tmp_path / "data" / "checkpoints")
    assert store.versions(run_id) == [0, 1]
    assert [r["version"] for r, _ in h.call(h.coordinator.services.pending.load(run_id))
            ] == [1, 2, 3]  # kept: the steps after version 1 may have to be replayed
    run = h.coordinator.runs[run_id]
    adapter = {k: v.clone() for k, v in run.adapter.items()}
    opt_state = {k: v.clone() for k, v in run.opt_state.items()}
    # A crash: the waiting version is never written.
    versions._timers.pop(run_id).cancel()
    versions._deferred.clear()
    h.close()
    assert store.versions(run_id) == [0, 1]

    h = Harness(tmp_path / "data", checkpoint_interval_s=0.2)
    try:
        run = h.coordinator.runs[run_id]
        assert run.version == 4 and run.opt_step == 4
        assert all(torch.equal(run.adapter[k], v) for k, v in adapter.items())
        assert all(torch.equal(run.opt_state[k], v) for k, v in opt_state.items())
        # The replayed steps' checkpoints wait their turn too (3 was replaced by 4);
        # step 6 is written when the interval is up, with no call to wait on.
        worker = FakeWorker(h)
        for seed in (5, 6):
            _forward_backward(h, worker, run_id, seed=seed)
            _optim_step(h, run_id)
        h.call(_until(lambda: store.latest(run_id) == 6, timeout_s=5))
        assert 3 not in store.versions(run_id)
        # Gradients are dropped once a checkpoint after them has landed.
        pending = tmp_path / "data" / "pending" / run_id
        h.call(_until(lambda: not list(pending.glob("*.safetensors"))))
    finally:
        h.close()


def test_a_version_never_checkpointed_is_served_while_held_in_memory(tmp_path):
    import hashlib

    h = Harness(tmp_path / "data", checkpoint_interval_s=0.2)
    try:
        worker = FakeWorker(h)
        run_id = _new_run(h)
        for seed in (1, 2, 3):  # 1 is written at once, 2 waits and 3 replaces it
            _forward_backward(h, worker, run_id, seed=seed)
            _optim_step(h, run_id)
        store = CheckpointStore(tmp_path / "data" / "checkpoints")
        h.call(_until(lambda: store.latest(run_id) == 3, timeout_s=5))
        assert 2 not in store.versions(run_id)
        # Version 2 never reached the disk; a later checkpoint landed; it is still
        # held in memory, so it is served (a task or a sample pinned to it works).
        _, body = h.request("GET", f"/v1/runs/{run_id}/weights/2",
                            headers={"X-Signal-Worker": ""}, expect=200)
        assert tensors_from_bytes(body).keys() == h.coordinator.runs[run_id].adapter.keys()
        sha = h.call(h.coordinator.services.versions.adapter_sha256(run_id, 2))
        assert hashlib.sha256(body).hexdigest() == sha
    finally:
        h.close()


def test_a_slow_checkpoint_spaces_out_the_next_ones(tmp_path):
    """Background checkpoints take at most ``WRITE_SHARE`` of the time: after a
    write that took 0.3 s the next waits 3 s however short the interval (a big
    adapter's writes would otherwise take the CPU its steps need); ``flush``
    still writes the newest at once."""
    import asyncio
    import time

    from rewardsignal.coordinator.runs.versions import WRITE_SHARE

    h = Harness(tmp_path / "data", checkpoint_interval_s=0.01)
    try:
        worker = FakeWorker(h)
        run_id = _new_run(h)
        versions = h.coordinator.services.versions
        write = versions.store.write

        def slow_write(*args, **kwargs):
            time.sleep(0.3)
            return write(*args, **kwargs)

        versions.store.write = slow_write  # type: ignore[method-assign]
        _forward_backward(h, worker, run_id, seed=1)
        _optim_step(h, run_id)  # version 1: written at once, in 0.3 s
        h.call(_until(lambda: versions._took.get(run_id, 0) >= 0.3, timeout_s=5))
        for seed in (2, 3):
            _forward_backward(h, worker, run_id, seed=seed)
            _optim_step(h, run_id)
        h.call(asyncio.sleep(1.0))  # well past the interval, within 0.3 / WRITE_SHARE
        assert 0.3 / WRITE_SHARE > 1.5
        store = CheckpointStore(tmp_path / "data" / "checkpoints")
        assert store.versions(run_id) == [0, 1]
        h.call(versions.flush(run_id))
        assert store.latest(run_id) == 3
    finally:
        h.close()
