"""A version pushed to a waiting worker goes into its model before the next
task comes (``Worker._take_version`` -> ``Engine.preload`` on the compute
thread), so the task's compute starts on weights already in place. A real
worker against an in-process coordinator, training a few steps."""

from __future__ import annotations

import asyncio
import threading

import torch
from apphelpers import Harness, new_run

from rewardsignal.lora import LoraSpec, init_adapter
from rewardsignal.precision import Precision
from rewardsignal.worker.engine import Engine, _cache_key
from rewardsignal.worker.loop import Worker, WorkerConfig


def test_a_pushed_version_is_in_the_model_before_its_task_computes(tmp_path, monkeypatch):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        copies: list[tuple[int, str]] = []  # (version, by whom) of each copy into the model
        activate, preload = Engine.activate, Engine.preload
        preloading = threading.local()

        def counting(self, model_id, spec, run_id, version, adapter, precision=Precision()):
            _, key = self._peft_model(model_id, spec, precision)
            if self._loaded.get((_cache_key(model_id, precision), key)) != (run_id, version):
                copies.append((version, "preload" if getattr(preloading, "on", False)
                               else "task"))
            return activate(self, model_id, spec, run_id, version, adapter, precision)

        def marked(self, *args):
            assert threading.current_thread().name.startswith("compute")
            preloading.on = True
            try:
                return preload(self, *args)
            finally:
                preloading.on = False

        monkeypatch.setattr(Engine, "preload", marked)
        monkeypatch.setattr(Engine, "activate", counting)
        steps = 4
        url = str(h.client.make_url("")).rstrip("/")
        worker = Worker(WorkerConfig(coordinator=url, device="cpu", max_tasks=steps))

        async def go() -> None:
            running = asyncio.ensure_future(worker.run())
            pair = {"requests": [{"op": "forward_backward",
                                  "args": {"batch": [{"text": "one two three"}]}},
                                 {"op": "optim_step", "args": {}}]}
            for _ in range(steps):
                resp = await h.client.post(f"/v1/runs/{rid}/requests?wait_s=60", json=pair)
                assert resp.status == 200, await resp.text()
            assert await asyncio.wait_for(running, 60) == 0

        h.call(go())
        assert h.coordinator.runs[rid].version == steps
        # Version 0 came with the first task; versions 1-3 were pushed while the
        # worker waited and copied in then, on the compute thread, so no task's
        # compute copied them again.
        assert copies == [(0, "task"), (1, "preload"), (2, "preload"), (3, "preload")], copies
        assert worker.weights.bytes_downloaded > 0  # version 0 only
    finally:
        h.close()


def test_a_preload_never_loads_a_model_and_its_failures_leave_no_version_named(
        tiny_spec: LoraSpec, caplog):
    engine = Engine("cpu")
    task = {"base_model": "signal-tiny", "lora": tiny_spec.to_json()}
    engine.preload(task, "r", 1, {})
    assert _cache_key("signal-tiny", Precision()) not in engine.models
    assert not engine._loaded
    # With the model in memory: a version copied in is named; one whose copy
    # fails partway (here: a tensor of the wrong shape) is not, so the task's
    # own activate copies it again; a task that names no LoRA is only logged.
    adapter = {k: torch.zeros(v.shape) for k, v in init_adapter("signal-tiny", tiny_spec).items()}
    engine.activate("signal-tiny", tiny_spec, "r", 0, adapter)
    engine.preload(task, "r", 1, adapter)
    key = next(iter(engine._loaded))
    assert engine._loaded[key] == ("r", 1)
    last = sorted(adapter)[-1]
    engine.preload(task, "r", 2, {**adapter, last: torch.zeros(3, 3)})
    assert key not in engine._loaded
    engine.preload({"base_model": "signal-tiny"}, "r", 3, adapter)
    assert "preloading version 3 of run r failed: KeyError" in caplog.text
